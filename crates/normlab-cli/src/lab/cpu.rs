//! What the lab's candle custom ops share: the element types they compute
//! in, and reading a storage's values.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The element types the lab's ops compute in: f32 and f64 (those `gemm`
/// multiplies).
pub(crate) trait CpuFloat:
    candle_core::WithDType + Copy + Send + Sync + PartialOrd + std::ops::AddAssign + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn is_nan(self) -> bool;
}

impl CpuFloat for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl CpuFloat for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// The values of argument `what` of `op`, which must be of type `T` and
/// contiguous (the ops call `.contiguous()` on their inputs first).
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [T]> {
    if storage.dtype() != T::DTYPE {
        candle_core::bail!(
            "{op}: {what} is {:?}, expected {:?}",
            storage.dtype(),
            T::DTYPE
        );
    }
    let all = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// `$body` with the type alias `$t` set to the element type of `$dtype`
/// (f32 or f64), its `Vec<$t>` wrapped in the matching [`CpuStorage`];
/// other dtypes are an error naming `$op`. The arguments' own dtypes are
/// checked where [`contiguous`] reads them.
macro_rules! by_float_dtype {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::DType::F64 => {
                type $t = f64;
                candle_core::CpuStorage::F64($body)
            }
            other => candle_core::bail!("{}: unsupported dtype {other:?} (f32, f64)", $op),
        }
    };
}
pub(crate) use by_float_dtype;
