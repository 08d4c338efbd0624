//! Data sets: the embedded MNIST test set, and MNIST, Fashion-MNIST (IDX
//! gzip) or CIFAR-10 (binary batches) from a directory.
//!
//! Every reader checks what it reads (magic numbers, sizes, and for the
//! embedded files their SHA-256) and says which file is wrong.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

/// Images as `f32` in `[0, 1]`, `[n, channels, height, width]`, with labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Pixel values, row-major `[n, channels, height, width]`.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Channels per image (1 for MNIST, 3 for CIFAR-10).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let m = self.image_len();
        Dataset {
            images: indices
                .iter()
                .flat_map(|&i| self.images[i * m..(i + 1) * m].iter().copied())
                .collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..self.clone_shape()
        }
    }

    fn clone_shape(&self) -> Dataset {
        Dataset {
            images: Vec::new(),
            labels: Vec::new(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes,
        }
    }

    /// A fixed, seeded split into `train` images and the rest held out.
    ///
    /// # Errors
    /// When `train` exceeds the number of images.
    pub fn split(&self, train: usize, seed: u64) -> Result<(Dataset, Dataset)> {
        ensure!(
            train <= self.len(),
            "cannot take {train} training images from {}",
            self.len()
        );
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        Ok((self.select(&order[..train]), self.select(&order[train..])))
    }
}

/// The embedded MNIST test set files, checked against these SHA-256 sums.
const MNIST_IMAGES: &[u8] = include_bytes!("../../../data/mnist/t10k-images-idx3-ubyte.gz");
const MNIST_LABELS: &[u8] = include_bytes!("../../../data/mnist/t10k-labels-idx1-ubyte.gz");
const MNIST_IMAGES_SHA256: &str =
    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6";
const MNIST_LABELS_SHA256: &str =
    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6";

/// Checks bytes against a SHA-256 given in hex.
pub fn verify_sha256(name: &str, bytes: &[u8], expected: &str) -> Result<()> {
    let got: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    ensure!(
        got == expected,
        "{name}: checksum mismatch (sha256 {got}, expected {expected}): the file is corrupt"
    );
    Ok(())
}

/// The MNIST test set shipped with normlab (10,000 images; © Yann LeCun and
/// Corinna Cortes, CC BY-SA 3.0, see data/README.md).
///
/// # Errors
/// When the embedded files fail their checksums or do not parse.
pub fn embedded_mnist() -> Result<Dataset> {
    verify_sha256(
        "data/mnist/t10k-images-idx3-ubyte.gz",
        MNIST_IMAGES,
        MNIST_IMAGES_SHA256,
    )?;
    verify_sha256(
        "data/mnist/t10k-labels-idx1-ubyte.gz",
        MNIST_LABELS,
        MNIST_LABELS_SHA256,
    )?;
    idx_dataset(
        "embedded t10k-images-idx3-ubyte.gz",
        MNIST_IMAGES,
        "embedded t10k-labels-idx1-ubyte.gz",
        MNIST_LABELS,
    )
}

fn gunzip(name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .with_context(|| format!("{name}: not a valid gzip file"))?;
    Ok(out)
}

fn be_u32(name: &str, bytes: &[u8], at: usize) -> Result<usize> {
    let b = bytes
        .get(at..at + 4)
        .with_context(|| format!("{name}: truncated header"))?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Parses an IDX images file (magic 2051) and labels file (magic 2049), gzip-compressed.
///
/// # Errors
/// Bad gzip, wrong magic numbers, sizes that disagree, labels ≥ 10.
pub fn idx_dataset(
    images_name: &str,
    images_gz: &[u8],
    labels_name: &str,
    labels_gz: &[u8],
) -> Result<Dataset> {
    let images = gunzip(images_name, images_gz)?;
    let labels = gunzip(labels_name, labels_gz)?;
    let magic = be_u32(images_name, &images, 0)?;
    ensure!(
        magic == 2051,
        "{images_name}: magic number {magic}, expected 2051 (IDX images)"
    );
    let magic = be_u32(labels_name, &labels, 0)?;
    ensure!(
        magic == 2049,
        "{labels_name}: magic number {magic}, expected 2049 (IDX labels)"
    );
    let (n, rows, cols) = (
        be_u32(images_name, &images, 4)?,
        be_u32(images_name, &images, 8)?,
        be_u32(images_name, &images, 12)?,
    );
    let pixels = images.get(16..).unwrap_or(&[]);
    ensure!(
        pixels.len() == n * rows * cols,
        "{images_name}: {} bytes of pixels, expected {n}×{rows}×{cols} = {} (truncated or corrupt)",
        pixels.len(),
        n * rows * cols
    );
    let count = be_u32(labels_name, &labels, 4)?;
    let label_bytes = labels.get(8..).unwrap_or(&[]);
    ensure!(
        label_bytes.len() == count,
        "{labels_name}: {} labels, header says {count} (truncated or corrupt)",
        label_bytes.len()
    );
    ensure!(
        count == n,
        "{labels_name}: {count} labels for {n} images in {images_name}"
    );
    if let Some(bad) = label_bytes.iter().find(|&&l| l > 9) {
        bail!("{labels_name}: label {bad} is not a digit class (0–9)");
    }
    Ok(Dataset {
        images: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: label_bytes.to_vec(),
        channels: 1,
        height: rows,
        width: cols,
        classes: 10,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Reads a data set from `dir`: MNIST or Fashion-MNIST (`train-images-idx3-ubyte.gz`
/// and `train-labels-idx1-ubyte.gz`, same format) or CIFAR-10
/// (`data_batch_1.bin` … `data_batch_5.bin`, possibly under
/// `cifar-10-batches-bin/`).
///
/// # Errors
/// When no known files are there, or a file is missing, truncated or corrupt.
pub fn from_dir(dir: &Path) -> Result<Dataset> {
    let images = dir.join("train-images-idx3-ubyte.gz");
    if images.exists() {
        let labels = dir.join("train-labels-idx1-ubyte.gz");
        return idx_dataset(
            &images.display().to_string(),
            &read_file(&images)?,
            &labels.display().to_string(),
            &read_file(&labels)?,
        );
    }
    let cifar = [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("data_batch_1.bin").exists());
    match cifar {
        Some(d) => cifar10(&(1..=5).map(|i| d.join(format!("data_batch_{i}.bin"))).collect::<Vec<_>>()),
        None => bail!(
            "{}: no data set found (expected train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz for MNIST/Fashion-MNIST, or data_batch_1.bin … data_batch_5.bin for CIFAR-10)",
            dir.display()
        ),
    }
}

/// CIFAR-10 binary batches: records of 1 label byte and 3×32×32 pixel bytes.
///
/// # Errors
/// A missing batch, a size that is not a whole number of records, a label ≥ 10.
pub fn cifar10(batches: &[PathBuf]) -> Result<Dataset> {
    const RECORD: usize = 1 + 3 * 32 * 32;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in batches {
        let bytes = read_file(path)?;
        ensure!(
            !bytes.is_empty() && bytes.len() % RECORD == 0,
            "{}: {} bytes is not a whole number of {RECORD}-byte records (truncated or corrupt)",
            path.display(),
            bytes.len()
        );
        for record in bytes.chunks_exact(RECORD) {
            ensure!(
                record[0] < 10,
                "{}: label {} is not a CIFAR-10 class (0–9)",
                path.display(),
                record[0]
            );
            labels.push(record[0]);
            images.extend(record[1..].iter().map(|&p| p as f32 / 255.0));
        }
    }
    Ok(Dataset {
        images,
        labels,
        channels: 3,
        height: 32,
        width: 32,
        classes: 10,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn idx_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [2051u32, n, rows, cols] {
            v.extend(x.to_be_bytes());
        }
        v.extend(pixels);
        gz(&v)
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(2049u32.to_be_bytes());
        v.extend((labels.len() as u32).to_be_bytes());
        v.extend(labels);
        gz(&v)
    }

    #[test]
    fn the_embedded_mnist_test_set_loads_with_its_known_label_counts() {
        let d = embedded_mnist().unwrap();
        assert_eq!(
            (d.len(), d.channels, d.height, d.width),
            (10_000, 1, 28, 28)
        );
        let mut counts = [0usize; 10];
        for &l in &d.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(
            counts,
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        );
        assert!(d.images.iter().all(|&p| (0.0..=1.0).contains(&p)));
        let (train, held) = d.split(8_000, 0).unwrap();
        assert_eq!((train.len(), held.len()), (8_000, 2_000));
        assert_eq!(
            d.split(8_000, 0).unwrap().0,
            train,
            "the split is reproducible"
        );
        assert_ne!(d.split(8_000, 1).unwrap().0.labels, train.labels);
    }

    #[test]
    fn corrupt_files_get_errors_naming_them() {
        let images = idx_images(2, 2, 2, &[0, 255, 7, 9, 1, 2, 3, 4]);
        let labels = idx_labels(&[3, 5]);
        let d = idx_dataset("img", &images, "lab", &labels).unwrap();
        assert_eq!(d.labels, [3, 5]);
        let err = |r: Result<Dataset>| format!("{:#}", r.unwrap_err());
        assert!(
            err(idx_dataset("img", b"not gzip", "lab", &labels)).contains("img: not a valid gzip")
        );
        let wrong_magic = idx_labels(&[3, 5]);
        assert!(err(idx_dataset("img", &wrong_magic, "lab", &labels))
            .contains("img: magic number 2049"));
        let truncated = idx_images(2, 2, 2, &[0, 255, 7]);
        assert!(
            err(idx_dataset("img", &truncated, "lab", &labels)).contains("img: 3 bytes of pixels")
        );
        assert!(err(idx_dataset("img", &images, "lab", &idx_labels(&[3])))
            .contains("lab: 1 labels for 2 images"));
        assert!(
            err(idx_dataset("img", &images, "lab", &idx_labels(&[3, 12]))).contains("label 12")
        );
        assert!(verify_sha256("f", b"abc", MNIST_LABELS_SHA256)
            .unwrap_err()
            .to_string()
            .contains("f: checksum mismatch"));
    }

    #[test]
    fn directories_are_read_or_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
        assert!(e.contains("no data set found"), "{e}");
        // CIFAR-10: a truncated batch is named.
        let mut record = vec![4u8];
        record.extend(vec![128u8; 3 * 32 * 32]);
        for i in 1..=5 {
            std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), &record).unwrap();
        }
        let d = from_dir(dir.path()).unwrap();
        assert_eq!((d.len(), d.channels, d.labels[0]), (5, 3, 4));
        std::fs::write(dir.path().join("data_batch_3.bin"), &record[..100]).unwrap();
        let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
        assert!(
            e.contains("data_batch_3.bin") && e.contains("truncated"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join("data_batch_5.bin")).unwrap();
        std::fs::write(dir.path().join("data_batch_3.bin"), &record).unwrap();
        let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
        assert!(e.contains("data_batch_5.bin: cannot read"), "{e}");
        // MNIST layout.
        let mnist = tempfile::tempdir().unwrap();
        std::fs::write(
            mnist.path().join("train-images-idx3-ubyte.gz"),
            idx_images(1, 1, 1, &[9]),
        )
        .unwrap();
        let e = format!("{:#}", from_dir(mnist.path()).unwrap_err());
        assert!(e.contains("train-labels-idx1-ubyte.gz: cannot read"), "{e}");
    }
}
