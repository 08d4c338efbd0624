//! The element types the kernels accept.
//!
//! Kernels read elements of type `T`, compute statistics and every
//! intermediate in `f64`, and round once when they write. Widening f32 (or
//! f16/bf16) to f64 is exact, so the only rounding on the way from `x` to `y`
//! is the final one: this is what keeps the statistics exact when the mean is
//! large compared with the spread.

use std::fmt::Debug;

/// A floating-point element type: f32, f64, f16 or bf16.
pub trait Float: Copy + Send + Sync + Debug + Default + PartialEq + 'static {
    /// Type name as PyTorch spells it (`float32`, …), for messages.
    const NAME: &'static str;
    /// Machine epsilon of this type, as `f64` (PyTorch's `finfo(dtype).eps`).
    const EPSILON: f64;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type (round to nearest even).
    fn from_f64(v: f64) -> Self;
}

impl Float for f32 {
    const NAME: &'static str = "float32";
    const EPSILON: f64 = f32::EPSILON as f64;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Float for f64 {
    const NAME: &'static str = "float64";
    const EPSILON: f64 = f64::EPSILON;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Float for half::f16 {
    const NAME: &'static str = "float16";
    const EPSILON: f64 = 0.000_976_562_5;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        half::f16::from_f64(v)
    }
}

impl Float for half::bf16 {
    const NAME: &'static str = "bfloat16";
    const EPSILON: f64 = 0.007_812_5;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        half::bf16::from_f64(v)
    }
}

/// The same slice seen as `f32`, when `T` is `f32` (selects the SIMD paths).
#[inline]
pub(crate) fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32, so the layout is identical.
        Some(unsafe { &*(s as *const [T] as *const [f32]) })
    } else {
        None
    }
}

/// An initialized buffer seen as one that is about to be overwritten.
/// Sound: kernels only ever write initialized values through it.
#[inline]
pub(crate) fn uninit_mut<T>(s: &mut [T]) -> &mut [std::mem::MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout, and every write through the
    // result stores a valid T, so `s` stays initialized.
    unsafe { &mut *(s as *mut [T] as *mut [std::mem::MaybeUninit<T>]) }
}

/// An output buffer of `T` seen as one of `f32`, when `T` is `f32`.
#[inline]
pub(crate) fn as_f32_out<T: 'static>(
    s: &mut [std::mem::MaybeUninit<T>],
) -> Option<&mut [std::mem::MaybeUninit<f32>]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32, so the layout is identical.
        Some(unsafe {
            &mut *(s as *mut [std::mem::MaybeUninit<T>] as *mut [std::mem::MaybeUninit<f32>])
        })
    } else {
        None
    }
}
