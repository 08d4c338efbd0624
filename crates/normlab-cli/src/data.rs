//! Data sets: the embedded MNIST test set, and MNIST, Fashion-MNIST (IDX,
//! gzip-compressed or not) or CIFAR-10 (binary batches) from a directory.
//!
//! Every reader checks what it reads (magic numbers, sizes, and for the
//! embedded files their SHA-256) and says which file is wrong. Files are
//! treated as untrusted: header sizes are multiplied with overflow checks,
//! compared with the memory available before anything is allocated, and a
//! compressed file is inflated only as far as its header announces (plus one
//! byte, to notice data beyond it), so a small file cannot expand into an
//! unbounded allocation.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
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

    /// `(channels, height, width)` of every image: the input shape of a network for this set.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
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

/// Classes of MNIST, Fashion-MNIST and CIFAR-10.
const CLASSES: usize = 10;

/// A data set read from a directory: its training images and, when the
/// directory has them (`t10k-*` IDX files, CIFAR-10's `test_batch.bin`),
/// its own held-out images.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Training images.
    pub train: Dataset,
    /// The directory's held-out (test) images, if it has any.
    pub held_out: Option<Dataset>,
}

impl Split {
    /// A data set without held-out images of its own.
    pub fn new(train: Dataset) -> Split {
        Split {
            train,
            held_out: None,
        }
    }

    /// The training and held-out sets, with a phrase saying how they were
    /// made: the directory's own held-out images when it has them,
    /// otherwise a fifth of the images held out by a split seeded with
    /// `seed` (for the embedded MNIST test set: 8,000 and 2,000 images).
    ///
    /// # Errors
    /// Fewer than 5 images, so that a fifth would be empty.
    pub fn into_sets(self, seed: u64) -> Result<(Dataset, Dataset, String)> {
        match self.held_out {
            Some(held) => {
                let how = format!(
                    "{} training images and the directory's own {} held-out images",
                    self.train.len(),
                    held.len()
                );
                Ok((self.train, held, how))
            }
            None => {
                let n = self.train.len();
                let held = n / 5;
                ensure!(
                    held > 0,
                    "{n} images are too few to hold out a fifth of them for evaluation (at least 5 are needed)"
                );
                let (train, held) = self.train.split(n - held, seed)?;
                let how = format!(
                    "split with seed {seed} into {} training and {} held-out images",
                    train.len(),
                    held.len()
                );
                Ok((train, held, how))
            }
        }
    }
}

/// Bytes of memory available to this process (Linux: `MemAvailable` in
/// `/proc/meminfo`); `None` where that is unknown.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Checks that `count` items of `bytes_each` bytes can be held in memory
/// before they are allocated: the product must not overflow and must not
/// exceed [`available_memory`] (when that is known). Returns the product.
///
/// # Errors
/// Overflow, or more bytes than are available; the message names `name`
/// (the file whose header asked for them) and the sizes.
pub fn check_memory(name: &str, count: usize, bytes_each: usize) -> Result<usize> {
    let bytes = count.checked_mul(bytes_each).with_context(|| {
        format!("{name}: {count} × {bytes_each} bytes overflows: the header asks for more memory than can be addressed")
    })?;
    if let Some(available) = available_memory() {
        ensure!(
            bytes as u64 <= available,
            "{name}: loading it needs {bytes} bytes ({:.1} GiB) of memory, but only {available} bytes ({:.1} GiB) are available",
            bytes as f64 / GIB,
            available as f64 / GIB
        );
    }
    Ok(bytes)
}

const GIB: f64 = (1u64 << 30) as f64;

/// The two bytes every gzip member starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A file's contents as a stream: inflated (every member of a multi-member
/// file) when it starts with the gzip magic bytes, as they are otherwise.
/// Reads are bounded by the caller, so a compressed file is inflated only
/// as far as its header says it should go.
struct Source<'a> {
    name: &'a str,
    reader: Box<dyn Read + 'a>,
    gzip: bool,
}

impl<'a> Source<'a> {
    fn new(name: &'a str, mut input: impl BufRead + 'a) -> Result<Source<'a>> {
        let head = input
            .fill_buf()
            .with_context(|| format!("{name}: cannot read"))?;
        let gzip = head.starts_with(&GZIP_MAGIC);
        let reader: Box<dyn Read + 'a> = if gzip {
            Box::new(flate2::bufread::MultiGzDecoder::new(input))
        } else {
            Box::new(input)
        };
        Ok(Source { name, reader, gzip })
    }

    /// Up to `n` bytes: fewer only when the data ends first.
    fn read_up_to(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        (&mut self.reader)
            .take(n as u64)
            .read_to_end(&mut out)
            .map_err(|e| {
                if self.gzip {
                    anyhow::anyhow!("{}: not a valid gzip file, or truncated ({e})", self.name)
                } else {
                    anyhow::anyhow!("{}: cannot read ({e})", self.name)
                }
            })?;
        Ok(out)
    }

    /// The header's 32-bit big-endian words.
    fn header<const N: usize>(&mut self, kind: &str) -> Result<[usize; N]> {
        let bytes = self.read_up_to(4 * N)?;
        ensure!(
            bytes.len() == 4 * N,
            "{}: too short for an {kind} header (truncated, or not an {kind} file)",
            self.name
        );
        let mut words = [0; N];
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        }
        Ok(words)
    }

    /// Fails when data follows what the header announced; reads (and
    /// inflates) at most one more byte to find out. For gzip this also
    /// makes the decoder check the member's CRC and length.
    fn expect_end(&mut self, announced: &str) -> Result<()> {
        let extra = self.read_up_to(1)?;
        ensure!(
            extra.is_empty(),
            "{}: more data than the header announces ({announced}): corrupt, or not this kind of file",
            self.name
        );
        Ok(())
    }
}

/// Parses an IDX images file (magic 2051) and its labels file (magic 2049),
/// each gzip-compressed (one or more members) or not: gzip is recognized by
/// its magic bytes, not by the file name.
///
/// # Errors
/// Bad gzip, wrong magic numbers, images with no pixels, sizes that overflow,
/// exceed the available memory, disagree with each other or with the data
/// (truncated files or data beyond the announced size), labels ≥ 10.
pub fn idx_dataset(
    images_name: &str,
    images: &[u8],
    labels_name: &str,
    labels: &[u8],
) -> Result<Dataset> {
    idx_read(images_name, images, labels_name, labels)
}

fn idx_read(
    images_name: &str,
    images: impl BufRead,
    labels_name: &str,
    labels: impl BufRead,
) -> Result<Dataset> {
    let mut src = Source::new(images_name, images)?;
    // The magic number first, so that a wrong kind of file is called that.
    let [magic] = src.header::<1>("IDX images")?;
    ensure!(
        magic == 2051,
        "{images_name}: magic number {magic}, expected 2051 (IDX images)"
    );
    let [n, rows, cols] = src.header::<3>("IDX images")?;
    ensure!(
        n > 0 && rows > 0 && cols > 0,
        "{images_name}: the header announces {n} images of {rows}×{cols} pixels; a data set needs at least one image of at least 1×1 pixel"
    );
    let announced = format!("{n} images of {rows}×{cols} pixels");
    let count = n
        .checked_mul(rows)
        .and_then(|p| p.checked_mul(cols))
        .with_context(|| {
            format!("{images_name}: the header announces {announced}: {n}×{rows}×{cols} bytes overflows")
        })?;
    // The file's bytes and their f32 copy are both held while converting.
    check_memory(images_name, count, 1 + std::mem::size_of::<f32>())?;
    let pixels = src.read_up_to(count)?;
    ensure!(
        pixels.len() == count,
        "{images_name}: {} bytes of pixels, expected {n}×{rows}×{cols} = {count} (truncated or corrupt)",
        pixels.len()
    );
    src.expect_end(&announced)?;

    let mut src = Source::new(labels_name, labels)?;
    let [magic] = src.header::<1>("IDX labels")?;
    ensure!(
        magic == 2049,
        "{labels_name}: magic number {magic}, expected 2049 (IDX labels)"
    );
    let [label_count] = src.header::<1>("IDX labels")?;
    ensure!(
        label_count == n,
        "{labels_name}: {label_count} labels for {n} images in {images_name}"
    );
    let label_bytes = src.read_up_to(n)?;
    ensure!(
        label_bytes.len() == n,
        "{labels_name}: {} labels, header says {n} (truncated or corrupt)",
        label_bytes.len()
    );
    src.expect_end(&format!("{n} labels"))?;
    if let Some((i, bad)) = label_bytes
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= CLASSES)
    {
        bail!(
            "{labels_name}: label {bad} (image {i}) is not one of the {CLASSES} classes (0–{})",
            CLASSES - 1
        );
    }
    Ok(Dataset {
        images: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: label_bytes,
        channels: 1,
        height: rows,
        width: cols,
        classes: CLASSES,
    })
}

fn open(path: &Path) -> Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .with_context(|| format!("{}: cannot read", path.display()))
}

/// `dir/STEM.gz` or `dir/STEM`, whichever exists (the compressed one when both do).
fn find_idx(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(format!("{stem}.gz")), dir.join(stem)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The images and labels files of an IDX set (`PREFIX-images-idx3-ubyte`,
/// `PREFIX-labels-idx1-ubyte`, `.gz` or not), read; `None` when there are no
/// images files with that prefix.
fn idx_set(dir: &Path, prefix: &str) -> Result<Option<Dataset>> {
    let Some(images) = find_idx(dir, &format!("{prefix}-images-idx3-ubyte")) else {
        return Ok(None);
    };
    let stem = format!("{prefix}-labels-idx1-ubyte");
    let labels = find_idx(dir, &stem).with_context(|| {
        format!(
            "{}: no labels for it ({} or {}.gz)",
            images.display(),
            dir.join(&stem).display(),
            stem
        )
    })?;
    let (images_name, labels_name) = (images.display().to_string(), labels.display().to_string());
    idx_read(&images_name, open(&images)?, &labels_name, open(&labels)?).map(Some)
}

/// Reads a data set from `dir`:
///
/// * MNIST or Fashion-MNIST: `train-images-idx3-ubyte` and
///   `train-labels-idx1-ubyte` (each `.gz` or not) for training, with
///   `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` as the held-out
///   set when present (a directory with only the `t10k-*` files is read as
///   a training set without held-out images);
/// * CIFAR-10: `data_batch_1.bin`, … (up to `data_batch_5.bin`, consecutive
///   from 1) for training and `test_batch.bin` as the held-out set when
///   present, in `dir` or under `dir/cifar-10-batches-bin/`.
///
/// # Errors
/// When no known files are there, or a file is missing, truncated, corrupt,
/// too large, or its images differ in shape from the training images.
pub fn from_dir(dir: &Path) -> Result<Split> {
    ensure!(
        dir.is_dir(),
        "{}: no data set found (not a directory)",
        dir.display()
    );
    if let Some(train) = idx_set(dir, "train")? {
        let held_out = idx_set(dir, "t10k")?;
        if let Some(held) = &held_out {
            ensure!(
                held.dims() == train.dims(),
                "{}: the t10k images are {}×{}, the train images {}×{}: they must have one size",
                dir.display(),
                held.height,
                held.width,
                train.height,
                train.width
            );
        }
        return Ok(Split { train, held_out });
    }
    if let Some(only) = idx_set(dir, "t10k")? {
        return Ok(Split::new(only));
    }
    let cifar = [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("data_batch_1.bin").is_file());
    let Some(d) = cifar else {
        bail!(
            "{}: no data set found (expected train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] for MNIST/Fashion-MNIST, or data_batch_1.bin … data_batch_5.bin for CIFAR-10)",
            dir.display()
        )
    };
    let batches: Vec<PathBuf> = (1..=5)
        .map(|i| d.join(format!("data_batch_{i}.bin")))
        .collect();
    let present = batches.iter().take_while(|p| p.is_file()).count();
    if let Some(later) = batches[present..].iter().find(|p| p.is_file()) {
        bail!(
            "{}: missing, but {} is there: the training batches must be consecutive from data_batch_1.bin",
            batches[present].display(),
            later.display()
        );
    }
    let train = cifar10(&batches[..present])?;
    let test = d.join("test_batch.bin");
    let held_out = if test.is_file() {
        Some(cifar10(&[test])?)
    } else {
        None
    };
    Ok(Split { train, held_out })
}

/// CIFAR-10 binary batches: records of 1 label byte and 3×32×32 pixel bytes.
///
/// # Errors
/// A missing batch, a size that is not a whole number of records, more
/// images than fit in the available memory, a label ≥ 10.
pub fn cifar10(batches: &[PathBuf]) -> Result<Dataset> {
    const PIXELS: usize = 3 * 32 * 32;
    const RECORD: usize = 1 + PIXELS;
    // Sizes first: nothing is allocated until every batch is known to hold
    // whole records and all of them fit in memory.
    let mut records = 0usize;
    let mut sizes = Vec::new();
    for path in batches {
        let len = std::fs::metadata(path)
            .with_context(|| format!("{}: cannot read", path.display()))?
            .len();
        ensure!(
            len > 0 && len % RECORD as u64 == 0,
            "{}: {len} bytes is not a whole number of {RECORD}-byte records (truncated or corrupt)",
            path.display()
        );
        let len = usize::try_from(len).with_context(|| {
            format!(
                "{}: {len} bytes is more than can be addressed",
                path.display()
            )
        })?;
        records = records
            .checked_add(len / RECORD)
            .with_context(|| format!("{}: too many records", path.display()))?;
        sizes.push(len);
    }
    let name = batches
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let values = check_memory(&name, records, PIXELS * std::mem::size_of::<f32>())?
        / std::mem::size_of::<f32>();
    // The memory check above is an estimate; the allocation itself may
    // still be refused, which is an error naming the files, not an abort.
    let mut images: Vec<f32> = Vec::new();
    let mut labels: Vec<u8> = Vec::new();
    images
        .try_reserve_exact(values)
        .and_then(|()| labels.try_reserve_exact(records))
        .map_err(|_| anyhow::anyhow!("{name}: cannot allocate {records} images"))?;
    for (path, &len) in batches.iter().zip(&sizes) {
        // At most the size found above plus one byte: a file that grew
        // since is refused rather than read without bound.
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len)
            .map_err(|_| anyhow::anyhow!("{}: cannot allocate {len} bytes", path.display()))?;
        open(path)?
            .take(len as u64 + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        ensure!(
            bytes.len() == len,
            "{}: changed while being read ({len} bytes, then {})",
            path.display(),
            bytes.len()
        );
        for (k, record) in bytes.chunks_exact(RECORD).enumerate() {
            ensure!(
                (record[0] as usize) < CLASSES,
                "{}: label {} (record {k}) is not a CIFAR-10 class (0–9)",
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
        classes: CLASSES,
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
        // Without the gzip magic bytes a file is read as raw IDX.
        assert!(err(idx_dataset("img", b"not gzip, no IDX", "lab", &labels))
            .contains("img: magic number 1852797984, expected 2051"));
        let mut bad_gzip = images.clone();
        let mid = bad_gzip.len() / 2;
        bad_gzip.truncate(mid);
        assert!(
            err(idx_dataset("img", &bad_gzip, "lab", &labels)).contains("img: not a valid gzip")
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
        assert_eq!(d.held_out, None);
        let d = d.train;
        assert_eq!((d.len(), d.channels, d.labels[0]), (5, 3, 4));
        std::fs::write(dir.path().join("data_batch_3.bin"), &record[..100]).unwrap();
        let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
        assert!(
            e.contains("data_batch_3.bin") && e.contains("truncated"),
            "{e}"
        );
        // Fewer batches are fine; a gap is not.
        std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
        let e = format!("{:#}", from_dir(dir.path()).unwrap_err());
        assert!(
            e.contains("data_batch_3.bin: missing, but") && e.contains("data_batch_4.bin"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join("data_batch_4.bin")).unwrap();
        std::fs::remove_file(dir.path().join("data_batch_5.bin")).unwrap();
        assert_eq!(from_dir(dir.path()).unwrap().train.len(), 2);
        // MNIST layout.
        let mnist = tempfile::tempdir().unwrap();
        std::fs::write(
            mnist.path().join("train-images-idx3-ubyte.gz"),
            idx_images(1, 1, 1, &[9]),
        )
        .unwrap();
        let e = format!("{:#}", from_dir(mnist.path()).unwrap_err());
        assert!(
            e.contains("train-images-idx3-ubyte.gz: no labels")
                && e.contains("train-labels-idx1-ubyte"),
            "{e}"
        );
    }

    #[test]
    fn a_split_keeps_held_out_images_or_holds_out_a_seeded_fifth() {
        let d = Dataset {
            images: (0..20).map(|i| i as f32).collect(),
            labels: (0..20).map(|i| i % 10).collect(),
            channels: 1,
            height: 1,
            width: 1,
            classes: 10,
        };
        let (train, held, how) = Split::new(d.clone()).into_sets(3).unwrap();
        assert_eq!((train.len(), held.len()), (16, 4));
        assert_eq!((train, held), d.split(16, 3).unwrap());
        assert_eq!(
            how,
            "split with seed 3 into 16 training and 4 held-out images"
        );
        let own = d.select(&[0, 1]);
        let (train, held, how) = Split {
            train: d.clone(),
            held_out: Some(own.clone()),
        }
        .into_sets(3)
        .unwrap();
        assert_eq!((train, held), (d.clone(), own));
        assert!(how.contains("own 2 held-out images"), "{how}");
        let e = Split::new(d.select(&[0, 1, 2, 3]))
            .into_sets(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 images are too few"), "{e}");
    }

    #[test]
    fn memory_checks_catch_overflow_and_impossible_sizes() {
        assert_eq!(check_memory("f", 1000, 5).unwrap(), 5000);
        let e = check_memory("f", usize::MAX / 2, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f:") && e.contains("overflows"), "{e}");
        if let Some(available) = available_memory() {
            let e = check_memory("f", available as usize, 2)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("f: loading it needs") && e.contains("available"),
                "{e}"
            );
        }
    }

    /// A reader that hands out at most 4 kB at a time and counts what was consumed.
    struct Counting<'a> {
        bytes: &'a [u8],
        consumed: std::rc::Rc<std::cell::Cell<usize>>,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.fill_buf()?.len().min(buf.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.consume(n);
            Ok(n)
        }
    }

    impl BufRead for Counting<'_> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            Ok(&self.bytes[..self.bytes.len().min(4096)])
        }
        fn consume(&mut self, n: usize) {
            self.bytes = &self.bytes[n..];
            self.consumed.set(self.consumed.get() + n);
        }
    }

    #[test]
    fn a_gzip_bomb_is_inflated_only_as_far_as_its_header_announces() {
        // 2 images of 2×2 pixels announced, 200 MB of zeros following.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for x in [2051u32, 2, 2, 2] {
            e.write_all(&x.to_be_bytes()).unwrap();
        }
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..200 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        let consumed = std::rc::Rc::new(std::cell::Cell::new(0));
        let input = Counting {
            bytes: &bomb,
            consumed: consumed.clone(),
        };
        let labels = idx_labels(&[0, 1]);
        let e = idx_read("bomb", input, "labels", &labels[..]).unwrap_err();
        assert!(
            e.to_string()
                .contains("bomb: more data than the header announces"),
            "{e}"
        );
        // About 200 kB of compressed input; inflating all of it would consume
        // all of it. Only the first few blocks are read.
        assert!(bomb.len() > 150_000, "{}", bomb.len());
        assert!(consumed.get() < 20_000, "consumed {} bytes", consumed.get());
    }
}
