//! The data loaders on hostile files: IDX images and labels (gzip, one or
//! several members, or raw) parsed from bytes, and whole data directories —
//! MNIST-style IDX files, CIFAR-10 batches — written from the bytes and read
//! by `data::from_dir`. Every call must return Ok or Err; a panic, an abort
//! or a run past the fuzzer's memory limit (a decompression bomb inflated
//! beyond what its header announces) is a bug.

use std::io::Write;

use crate::data;

/// Splits `bytes` at the first `sep` (the fuzzer finds it from the seeds),
/// or in the middle.
fn halves(bytes: &[u8]) -> (&[u8], &[u8]) {
    const SEP: &[u8] = b"--labels--";
    match bytes.windows(SEP.len()).position(|w| w == SEP) {
        Some(at) => (&bytes[..at], &bytes[at + SEP.len()..]),
        None => bytes.split_at(bytes.len() / 2),
    }
}

/// Gzip-compresses `bytes` (one member).
fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

/// IDX images and labels parsed from the bytes: the first byte chooses
/// whether each part is gzip-compressed here first (so that the fuzzer
/// reaches the header checks through the decompressor as well).
pub fn idx_files(bytes: &[u8]) {
    let Some((&mode, rest)) = bytes.split_first() else {
        return;
    };
    let (images, labels) = halves(rest);
    let wrap = |part: &[u8], bit: u8| {
        if mode & bit != 0 {
            gz(part)
        } else {
            part.to_vec()
        }
    };
    if let Ok(set) = data::idx_dataset("images", &wrap(images, 1), "labels", &wrap(labels, 2)) {
        assert_eq!(set.images.len(), set.len() * set.image_len());
        assert!(set.labels.iter().all(|&l| (l as usize) < set.classes));
    }
}

/// Names a data directory may hold; the first byte picks which files the
/// two parts of the input become.
const NAMES: [(&str, &str); 6] = [
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ("data_batch_1.bin", "test_batch.bin"),
    ("data_batch_1.bin", "data_batch_2.bin"),
    ("data_batch_2.bin", "test_batch.bin"),
];

/// A directory written from the bytes (in a fresh temporary folder), then
/// read by `data::from_dir` and split as the CLI does.
pub fn data_dir(bytes: &[u8]) {
    let Some((&pick, rest)) = bytes.split_first() else {
        return;
    };
    let (first, second) = halves(rest);
    let (a, b) = NAMES[pick as usize % NAMES.len()];
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join(a), first).expect("writing a file");
    if pick & 0x80 == 0 {
        std::fs::write(dir.path().join(b), second).expect("writing a file");
    }
    if let Ok(split) = data::from_dir(dir.path()) {
        if let Ok((train, held_out, _)) = split.into_sets(u64::from(pick)) {
            for set in [&train, &held_out] {
                assert_eq!(set.images.len(), set.len() * set.image_len());
            }
        }
    }
}
