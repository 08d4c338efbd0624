//! The data loaders against hostile and unusual files: header sizes that
//! overflow or announce nothing, gzip bombs, multi-member gzip, raw IDX,
//! trailing data, and directories with their own held-out sets.

use std::io::Write;
use std::path::Path;

use normlab_cli::data::{self, from_dir, idx_dataset};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// An uncompressed IDX images file with this header and these pixels.
fn raw_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [2051u32, n, rows, cols] {
        v.extend(x.to_be_bytes());
    }
    v.extend(pixels);
    v
}

fn raw_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(2049u32.to_be_bytes());
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend(labels);
    v
}

fn err(r: anyhow::Result<data::Dataset>) -> String {
    format!("{:#}", r.expect_err("should be refused"))
}

#[test]
fn header_sizes_that_overflow_are_errors_not_panics() {
    let labels = gz(&raw_labels(&[0; 4]));
    // 4 × 2³¹ × 2³¹ = 2⁶⁴ wraps to 0 in unchecked arithmetic.
    for images in [
        raw_images(4, 1 << 31, 1 << 31, &[]),
        gz(&raw_images(4, 1 << 31, 1 << 31, &[])),
    ] {
        let e = err(idx_dataset("hostile-images", &images, "labels", &labels));
        assert!(
            e.contains("hostile-images")
                && e.contains("4 images of 2147483648×2147483648 pixels")
                && e.contains("overflows"),
            "{e}"
        );
    }
    // 2⁶² bytes does not overflow, but is more than any machine has.
    let e = err(idx_dataset(
        "huge-images",
        &raw_images(1, 1 << 31, 1 << 31, &[]),
        "labels",
        &labels,
    ));
    assert!(
        e.contains("huge-images") && (e.contains("needs") || e.contains("overflows")),
        "{e}"
    );
}

#[test]
fn images_without_pixels_are_refused_naming_the_file() {
    let labels = raw_labels(&[1, 2]);
    for (n, rows, cols) in [(2, 0, 28), (2, 28, 0), (0, 28, 28)] {
        let e = err(idx_dataset(
            "empty-images",
            &gz(&raw_images(n, rows, cols, &[])),
            "labels",
            &labels,
        ));
        assert!(
            e.contains(&format!(
                "empty-images: the header announces {n} images of {rows}×{cols} pixels"
            )),
            "{e}"
        );
    }
}

#[test]
fn a_gzip_bomb_is_refused_after_inflating_only_what_the_header_announces() {
    // The header announces 10 images of 28×28 pixels; the stream then goes
    // on with 100 MB of zeros (about 100 kB compressed).
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&raw_images(10, 28, 28, &[])).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..100 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let labels = raw_labels(&[0; 10]);
    let e = err(idx_dataset("bomb.gz", &bomb, "labels", &labels));
    assert!(
        e.contains("bomb.gz: more data than the header announces (10 images of 28×28 pixels)"),
        "{e}"
    );
    // The same bomb in a directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), &bomb).unwrap();
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), &labels).unwrap();
    let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
    assert!(
        e.contains("train-images-idx3-ubyte.gz: more data than the header announces"),
        "{e}"
    );
}

#[test]
fn trailing_data_and_truncation_are_refused() {
    let pixels = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let labels = raw_labels(&[3, 5]);
    let mut long = raw_images(2, 2, 2, &pixels);
    long.push(0);
    let e = err(idx_dataset("long", &long, "labels", &labels));
    assert!(
        e.contains("long: more data than the header announces"),
        "{e}"
    );
    // A gzip member followed by bytes that are not another member.
    let mut garbage = gz(&raw_images(2, 2, 2, &pixels));
    garbage.extend(b"garbage");
    let e = err(idx_dataset("garbage.gz", &garbage, "labels", &labels));
    assert!(e.contains("garbage.gz: not a valid gzip file"), "{e}");
    let e = err(idx_dataset(
        "short",
        &raw_images(2, 2, 2, &pixels[..5]),
        "labels",
        &labels,
    ));
    assert!(
        e.contains("short: 5 bytes of pixels, expected 2×2×2 = 8"),
        "{e}"
    );
    let e = err(idx_dataset(
        "header",
        &[0x00, 0x00, 0x08],
        "labels",
        &labels,
    ));
    assert!(
        e.contains("header: too short for an IDX images header"),
        "{e}"
    );
    let e = err(idx_dataset(
        "header",
        &raw_images(2, 2, 2, &[])[..10],
        "labels",
        &labels,
    ));
    assert!(
        e.contains("header: too short for an IDX images header"),
        "{e}"
    );
    let mut short_labels = raw_labels(&[3, 5]);
    short_labels.pop();
    let e = err(idx_dataset(
        "images",
        &raw_images(2, 2, 2, &pixels),
        "short-labels",
        &short_labels,
    ));
    assert!(e.contains("short-labels: 1 labels, header says 2"), "{e}");
    let e = err(idx_dataset(
        "images",
        &raw_images(2, 2, 2, &pixels),
        "bad-labels",
        &raw_labels(&[3, 10]),
    ));
    assert!(
        e.contains("bad-labels: label 10 (image 1) is not one of the 10 classes"),
        "{e}"
    );
}

#[test]
fn multi_member_gzip_and_raw_files_read_like_single_member_gzip() {
    let pixels: Vec<u8> = (0..5 * 3 * 4).map(|i| (i * 7 % 256) as u8).collect();
    let images = raw_images(5, 3, 4, &pixels);
    let labels = raw_labels(&[0, 1, 2, 3, 9]);
    let expected = idx_dataset("a", &gz(&images), "b", &gz(&labels)).unwrap();
    assert_eq!(
        (expected.len(), expected.dims(), expected.labels[4]),
        (5, (1, 3, 4), 9)
    );
    assert_eq!(expected.images[1], 7.0 / 255.0);
    // Two members, split inside the pixels; and three for the labels.
    let mut two = gz(&images[..23]);
    two.extend(gz(&images[23..]));
    let mut three = gz(&labels[..3]);
    three.extend(gz(&labels[3..9]));
    three.extend(gz(&labels[9..]));
    assert_eq!(idx_dataset("a", &two, "b", &three).unwrap(), expected);
    // Uncompressed.
    assert_eq!(idx_dataset("a", &images, "b", &labels).unwrap(), expected);
}

/// Writes an IDX set `PREFIX-{images,labels}` into `dir`; `gzip` decides the
/// format and `suffix` the name, independently.
fn write_idx(dir: &Path, prefix: &str, n: u32, side: u32, gzip: bool, suffix: &str) {
    let pixels: Vec<u8> = (0..n * side * side).map(|i| (i % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let encode = |b: Vec<u8>| if gzip { gz(&b) } else { b };
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte{suffix}")),
        encode(raw_images(n, side, side, &pixels)),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-labels-idx1-ubyte{suffix}")),
        encode(raw_labels(&labels)),
    )
    .unwrap();
}

#[test]
fn idx_directories_are_found_raw_or_compressed_with_their_held_out_set() {
    // Raw files, train and t10k: t10k is the held-out set.
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 30, 20, false, "");
    write_idx(dir.path(), "t10k", 7, 20, false, "");
    let split = from_dir(dir.path()).unwrap();
    assert_eq!((split.train.len(), split.train.dims()), (30, (1, 20, 20)));
    let held = split.held_out.clone().expect("t10k is the held-out set");
    assert_eq!((held.len(), held.dims()), (7, (1, 20, 20)));
    let (train, held, how) = split.into_sets(0).unwrap();
    assert_eq!((train.len(), held.len()), (30, 7));
    assert!(how.contains("own 7 held-out images"), "{how}");

    // gzip recognized by its magic bytes, whatever the name says.
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 10, 5, true, "");
    write_idx(dir.path(), "t10k", 5, 5, false, ".gz");
    let split = from_dir(dir.path()).unwrap();
    assert_eq!(split.train.len(), 10);
    assert_eq!(split.held_out.map(|h| h.len()), Some(5));

    // Only t10k files: a training set to split.
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "t10k", 10, 4, true, ".gz");
    let split = from_dir(dir.path()).unwrap();
    assert_eq!((split.train.len(), split.held_out), (10, None));

    // Train and t10k images of different sizes.
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 10, 5, true, ".gz");
    write_idx(dir.path(), "t10k", 5, 6, true, ".gz");
    let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
    assert!(
        e.contains("t10k images are 6×6, the train images 5×5"),
        "{e}"
    );

    // A bad t10k file is named.
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 10, 5, true, ".gz");
    write_idx(dir.path(), "t10k", 5, 5, true, ".gz");
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte.gz"),
        gz(&raw_images(5, 0, 5, &[])),
    )
    .unwrap();
    let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
    assert!(
        e.contains("t10k-images-idx3-ubyte.gz: the header announces 5 images of 0×5"),
        "{e}"
    );

    let e = format!("{:#}", from_dir(&dir.path().join("nope")).unwrap_err());
    assert!(
        e.contains("nope: no data set found (not a directory)"),
        "{e}"
    );
}

fn cifar_batch(labels: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (k, &l) in labels.iter().enumerate() {
        bytes.push(l);
        bytes.extend(vec![(k % 256) as u8; 3 * 32 * 32]);
    }
    bytes
}

#[test]
fn a_cifar_directory_with_a_test_batch_holds_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("data_batch_1.bin"), cifar_batch(&[1, 2, 3])).unwrap();
    std::fs::write(d.join("data_batch_2.bin"), cifar_batch(&[4, 5])).unwrap();
    std::fs::write(d.join("test_batch.bin"), cifar_batch(&[9, 8, 7, 6])).unwrap();
    let split = from_dir(dir.path()).unwrap();
    assert_eq!(split.train.labels, [1, 2, 3, 4, 5]);
    assert_eq!(split.train.dims(), (3, 32, 32));
    let held = split.held_out.expect("test_batch.bin is the held-out set");
    assert_eq!(held.labels, [9, 8, 7, 6]);
    assert_eq!(held.images[3 * 32 * 32], 1.0 / 255.0);
    // A bad test batch is named.
    std::fs::write(d.join("test_batch.bin"), cifar_batch(&[10])).unwrap();
    let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
    assert!(
        e.contains("test_batch.bin: label 10 (record 0) is not a CIFAR-10 class"),
        "{e}"
    );
}
