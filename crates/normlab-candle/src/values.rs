//! Moving values between candle's storage and normlab's slices.
//!
//! normlab computes in the input's precision for f32 and f64; f16 and bf16
//! are widened to f32 (statistics in f32 or better) and the results rounded
//! back. Strided inputs are gathered into contiguous buffers first.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Contiguous values in a precision normlab computes in.
#[derive(Debug)]
pub(crate) enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// The values of `layout` in row-major order (strided and broadcast layouts
/// included: a stride of 0 repeats a value).
fn gather<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return data[start..end].to_vec();
    }
    let dims = layout.dims();
    let strides = layout.stride();
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut index = vec![0usize; dims.len()];
    let mut offset = layout.start_offset();
    for _ in 0..total {
        out.push(data[offset]);
        // Odometer: advance the last dimension, carrying into earlier ones.
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            offset += strides[d];
            if index[d] < dims[d] {
                break;
            }
            offset -= strides[d] * dims[d];
            index[d] = 0;
        }
    }
    out
}

/// Reads a CPU storage through its layout.
pub(crate) fn read(op: &str, storage: &CpuStorage, layout: &Layout) -> Result<Values> {
    Ok(match storage {
        CpuStorage::F32(d) => Values::F32(gather(d, layout)),
        CpuStorage::F64(d) => Values::F64(gather(d, layout)),
        CpuStorage::F16(d) => {
            Values::F32(gather(d, layout).into_iter().map(|v| v.to_f32()).collect())
        }
        CpuStorage::BF16(d) => {
            Values::F32(gather(d, layout).into_iter().map(|v| v.to_f32()).collect())
        }
        other => candle_core::bail!(
            "{op}: unsupported dtype {:?} (f32, f64, f16 and bf16 are)",
            other.dtype()
        ),
    })
}

/// Writes computed values back as `dtype`.
pub(crate) fn write(values: Values, dtype: DType) -> CpuStorage {
    match (values, dtype) {
        (Values::F64(v), _) => CpuStorage::F64(v),
        (Values::F32(v), DType::F16) => {
            CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect())
        }
        (Values::F32(v), DType::BF16) => {
            CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect())
        }
        (Values::F32(v), _) => CpuStorage::F32(v),
    }
}

/// The values of a tensor (any device it can be copied from), in the
/// computing precision of `like`.
pub(crate) fn of_tensor(t: &Tensor, like: &Values) -> Result<Values> {
    let flat = t.flatten_all()?;
    Ok(match like {
        Values::F32(_) => Values::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        Values::F64(_) => Values::F64(flat.to_dtype(DType::F64)?.to_vec1()?),
    })
}

/// A tensor of `shape` from computed values, as `dtype`, on `t`'s device.
pub(crate) fn to_tensor(
    values: Values,
    shape: &[usize],
    dtype: DType,
    like: &Tensor,
) -> Result<Tensor> {
    let t = match values {
        Values::F32(v) => Tensor::from_vec(v, shape, like.device())?,
        Values::F64(v) => Tensor::from_vec(v, shape, like.device())?,
    };
    t.to_dtype(dtype)
}

/// Maps a normlab error into candle's.
pub(crate) fn err(e: normlab::NormError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Values of a tensor borrowed from its CPU storage when contiguous and
/// already in the computing precision, copied otherwise.
pub(crate) enum Slices<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    F64(std::borrow::Cow<'a, [f64]>),
}

impl Slices<'_> {
    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        match self {
            Slices::F32(v) => v.len(),
            Slices::F64(v) => v.len(),
        }
    }
}

/// The values of a CPU storage through its layout: borrowed when contiguous
/// f32 or f64, gathered (and f16/bf16 widened to f32) otherwise.
pub(crate) fn read_slices<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Slices<'a>> {
    use std::borrow::Cow;
    if let Some((start, end)) = layout.contiguous_offsets() {
        match storage {
            CpuStorage::F32(v) => return Ok(Slices::F32(Cow::Borrowed(&v[start..end]))),
            CpuStorage::F64(v) => return Ok(Slices::F64(Cow::Borrowed(&v[start..end]))),
            _ => {}
        }
    }
    Ok(match read(op, storage, layout)? {
        Values::F32(v) => Slices::F32(Cow::Owned(v)),
        Values::F64(v) => Slices::F64(Cow::Owned(v)),
    })
}

/// Runs `f` on the values of `t` in the computing precision of `like`,
/// without copying them when they can be borrowed.
pub(crate) fn with_slices<R>(
    t: &Tensor,
    like: &Values,
    f: impl FnOnce(Slices<'_>) -> Result<R>,
) -> Result<R> {
    use std::borrow::Cow;
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            match (cpu, like) {
                (CpuStorage::F32(v), Values::F32(_)) => {
                    return f(Slices::F32(Cow::Borrowed(&v[start..end])))
                }
                (CpuStorage::F64(v), Values::F64(_)) => {
                    return f(Slices::F64(Cow::Borrowed(&v[start..end])))
                }
                _ => {}
            }
        }
    }
    match of_tensor(t, like)? {
        Values::F32(v) => f(Slices::F32(Cow::Owned(v))),
        Values::F64(v) => f(Slices::F64(Cow::Owned(v))),
    }
}
