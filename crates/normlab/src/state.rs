//! Parameters and buffers as safetensors, under PyTorch's names.
//!
//! A layer's state is `weight`, `bias`, `running_mean`, `running_var` and
//! `num_batches_tracked` (an int64 scalar), each present when the layer has
//! it; a model prefixes them with the layer's path (`features.1.weight`), as
//! PyTorch's `state_dict` does. A PyTorch state dict saved with
//! `safetensors.torch.save_file` therefore loads with [`StateFile::load`].
//! Floating-point tensors may be stored as F64, F32, F16 or BF16 and are
//! converted to the layer's element type on load.

use std::borrow::Cow;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::{Float, NormError, Result, Tensor};

/// One entry of a state dict.
#[derive(Clone, Debug, PartialEq)]
pub enum StateTensor<T> {
    /// A floating-point parameter or buffer.
    Float(Tensor<T>),
    /// An int64 scalar (`num_batches_tracked`).
    Int64(i64),
}

/// Something with a state dict: every layer of [`crate::layers`].
pub trait StateDict<T: Float> {
    /// `(name, tensor)` pairs under PyTorch's names, without prefix.
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)>;
    /// Reads every tensor this layer has from `view`.
    ///
    /// # Errors
    /// [`NormError::State`] for a missing tensor, wrong shape or unsupported dtype.
    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()>;
}

/// `prefix.name`, or `name` without prefix.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Little-endian bytes of a state tensor, in its own dtype.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode<T: Float>(t: &StateTensor<T>) -> Result<Encoded> {
    Ok(match t {
        StateTensor::Int64(v) => Encoded {
            dtype: Dtype::I64,
            shape: vec![],
            bytes: v.to_le_bytes().to_vec(),
        },
        StateTensor::Float(t) => {
            let values = t.data().iter().map(|v| v.to_f64());
            let (dtype, bytes): (Dtype, Vec<u8>) = match T::NAME {
                "float64" => (Dtype::F64, values.flat_map(f64::to_le_bytes).collect()),
                "float32" => (
                    Dtype::F32,
                    values.flat_map(|v| (v as f32).to_le_bytes()).collect(),
                ),
                "float16" => (
                    Dtype::F16,
                    values
                        .flat_map(|v| half::f16::from_f64(v).to_le_bytes())
                        .collect(),
                ),
                "bfloat16" => (
                    Dtype::BF16,
                    values
                        .flat_map(|v| half::bf16::from_f64(v).to_le_bytes())
                        .collect(),
                ),
                other => {
                    return Err(NormError::State(format!(
                        "cannot store element type {other}"
                    )))
                }
            };
            Encoded {
                dtype,
                shape: t.shape().to_vec(),
                bytes,
            }
        }
    })
}

/// Serializes the state of several layers, each under its prefix.
///
/// # Errors
/// [`NormError::State`] when two entries share a name or serialization fails.
pub fn to_bytes<T: Float>(layers: &[(&str, &dyn StateDict<T>)]) -> Result<Vec<u8>> {
    let mut entries = Vec::new();
    for (prefix, layer) in layers {
        for (name, tensor) in layer.state_dict() {
            entries.push((join(prefix, &name), encode(&tensor)?));
        }
    }
    let mut names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(NormError::State(format!(
            "two tensors are named `{}`",
            w[0]
        )));
    }
    safetensors::serialize(entries.iter().map(|(n, e)| (n.as_str(), e)), None)
        .map_err(|e| NormError::State(e.to_string()))
}

/// Writes the state of several layers to a `.safetensors` file.
///
/// # Errors
/// As [`to_bytes`], and I/O errors naming the file.
pub fn save<T: Float>(path: impl AsRef<Path>, layers: &[(&str, &dyn StateDict<T>)]) -> Result<()> {
    let bytes = to_bytes(layers)?;
    std::fs::write(path.as_ref(), bytes).map_err(|source| NormError::Io {
        path: path.as_ref().display().to_string(),
        source,
    })
}

/// Refuses loaded running statistics that could only poison every later
/// evaluation: a non-finite mean, a non-finite or negative variance, a
/// negative `num_batches_tracked`. `prefix` is the layer's path in the file,
/// for the message.
///
/// # Errors
/// [`NormError::InvalidState`] naming the first offending tensor and index.
pub fn check_running_stats(
    prefix: &str,
    mean: impl IntoIterator<Item = f64>,
    var: impl IntoIterator<Item = f64>,
    num_batches_tracked: Option<i64>,
) -> Result<()> {
    let invalid = |name: &str, problem, index, value| NormError::InvalidState {
        name: join(prefix, name),
        problem,
        index,
        value,
    };
    if let Some((i, v)) = mean.into_iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(invalid("running_mean", "is not finite", i, v));
    }
    for (i, v) in var.into_iter().enumerate() {
        if !v.is_finite() {
            return Err(invalid("running_var", "is not finite", i, v));
        }
        if v < 0.0 {
            return Err(invalid("running_var", "is negative", i, v));
        }
    }
    match num_batches_tracked {
        Some(n) if n < 0 => Err(invalid("num_batches_tracked", "is negative", 0, n as f64)),
        _ => Ok(()),
    }
}

/// A safetensors file in memory.
#[derive(Clone, Debug)]
pub struct StateFile {
    bytes: Vec<u8>,
}

impl StateFile {
    /// Parses bytes (checks the header now, so later reads cannot fail on it).
    ///
    /// # Errors
    /// [`NormError::State`] for a malformed file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        SafeTensors::deserialize(&bytes)
            .map_err(|e| NormError::State(format!("not a safetensors file: {e}")))?;
        Ok(Self { bytes })
    }

    /// Reads a file.
    ///
    /// # Errors
    /// I/O errors naming the file; [`NormError::State`] for a malformed one.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let bytes = std::fs::read(p).map_err(|source| NormError::Io {
            path: p.display().to_string(),
            source,
        })?;
        Self::from_bytes(bytes).map_err(|e| NormError::State(format!("{}: {e}", p.display())))
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("header validated in from_bytes")
    }

    /// Every tensor name in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        names.sort();
        names
    }

    /// The tensors under `prefix`.
    pub fn view(&self, prefix: &str) -> StateView<'_> {
        StateView {
            tensors: self.tensors(),
            prefix: prefix.to_string(),
        }
    }

    /// Loads `layer`'s state from the tensors under `prefix`.
    ///
    /// # Errors
    /// As [`StateDict::load_state_dict`].
    pub fn load<T: Float>(&self, prefix: &str, layer: &mut dyn StateDict<T>) -> Result<()> {
        layer.load_state_dict(&self.view(prefix))
    }
}

/// The tensors of a file under one prefix.
pub struct StateView<'a> {
    tensors: SafeTensors<'a>,
    prefix: String,
}

impl StateView<'_> {
    /// The prefix of this view's tensors (`features.1`, or empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn get(&self, name: &str) -> Option<(String, TensorView<'_>)> {
        let full = join(&self.prefix, name);
        self.tensors.tensor(&full).ok().map(|t| (full, t))
    }

    /// A floating-point tensor of the given shape, converted to `T`.
    ///
    /// # Errors
    /// [`NormError::State`] when it is missing, has another shape, or is not a float.
    pub fn float<T: Float>(&self, name: &str, shape: &[usize]) -> Result<Tensor<T>> {
        let full = join(&self.prefix, name);
        let (full, view) = self
            .get(name)
            .ok_or_else(|| NormError::State(format!("missing tensor `{full}`")))?;
        if view.shape() != shape {
            return Err(NormError::State(format!(
                "tensor `{full}` has shape {:?}, the layer needs {:?}",
                view.shape(),
                shape
            )));
        }
        let data = view.data();
        let values: Vec<T> = match view.dtype() {
            Dtype::F64 => decode(data, f64::from_le_bytes),
            Dtype::F32 => decode(data, |b| f32::from_le_bytes(b) as f64),
            Dtype::F16 => decode(data, |b| half::f16::from_le_bytes(b).to_f64()),
            Dtype::BF16 => decode(data, |b| half::bf16::from_le_bytes(b).to_f64()),
            other => {
                return Err(NormError::State(format!(
                    "tensor `{full}` has dtype {other:?}, expected a floating-point type"
                )))
            }
        };
        Tensor::new(shape.to_vec(), values)
    }

    /// An integer scalar (shape `[]` or `[1]`), when present.
    ///
    /// # Errors
    /// [`NormError::State`] when present with another shape or a non-integer dtype.
    pub fn int64_opt(&self, name: &str) -> Result<Option<i64>> {
        let Some((full, view)) = self.get(name) else {
            return Ok(None);
        };
        if view.shape().iter().product::<usize>() != 1 {
            return Err(NormError::State(format!(
                "tensor `{full}` has shape {:?}, expected a scalar",
                view.shape()
            )));
        }
        let data = view.data();
        let value = match view.dtype() {
            Dtype::I64 => i64::from_le_bytes(data[..8].try_into().expect("8 bytes")),
            Dtype::I32 => i32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as i64,
            other => {
                return Err(NormError::State(format!(
                    "tensor `{full}` has dtype {other:?}, expected an integer"
                )))
            }
        };
        Ok(Some(value))
    }
}

fn decode<T: Float, const N: usize>(bytes: &[u8], read: impl Fn([u8; N]) -> f64) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|b| T::from_f64(read(b.try_into().expect("chunk of N bytes"))))
        .collect()
}
