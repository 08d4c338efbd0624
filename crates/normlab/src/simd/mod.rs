//! The kernels' inner loops and their run-time SIMD dispatch.
//!
//! Hot loops are written once, generic over the element type, on vectors
//! of eight compute lanes (`vector::V8`: one AVX instruction per
//! operator at the AVX2 levels, plain Rust at the baseline; the
//! element-wise passes also step by sixteen, `vector::V16`, one 512-bit
//! instruction at the AVX-512 level and two eight-lane ones elsewhere, the
//! same operations per value), and compiled
//! several times by [`simd_fn!`]: for the baseline target (the scalar path,
//! always compiled), with AVX2+FMA+F16C, and with AVX-512 (BF16 included). Elements of every
//! storage type are widened to their compute lanes ([`crate::float::Lane`]:
//! f32 for f32, bf16 and f16; f64 for f64) in registers and narrowed once
//! on store, round to nearest even:
//! - `convert`: widening, narrowing and (streaming) stores;
//! - `sums`: the reductions (centred moments sums, gradient sums);
//! - `transform`: the element-wise passes (normalize, input gradient);
//! - `lrn`: Local Response Normalization's window loops;
//! - `columns`: per-position statistics across channel rows (LayerNorm/RMSNorm over channels);
//! - `vector`: eight lanes as one value with vector operators (`vector::V8`).
//!
//! Each call picks the best level the CPU has (detected once), unless a level is forced with [`force`] — tests use
//! that to run every path, and `normlab bench` to compare them.
//!
//! Every level performs the same floating-point operations in the same
//! order (no fused multiply-add is introduced, reductions use the same lane
//! layout, F16C and the scalar conversions round alike), so all paths give
//! bit-identical results.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

pub(crate) mod activation;
pub(crate) mod columns;
pub(crate) mod convert;
pub(crate) mod lrn;
pub(crate) mod sums;
pub(crate) mod transform;
pub(crate) mod vector;

/// A SIMD instruction-set level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// The baseline target, no run-time features.
    Scalar,
    /// AVX2 with FMA and F16C (x86-64).
    Avx2,
    /// AVX-512 F/BW/VL/DQ with BF16 (x86-64: Cooper Lake, Sapphire Rapids,
    /// Zen 4 and later). An AVX-512 CPU without BF16 runs the AVX2 level.
    /// This level adds the element-wise passes in 512-bit registers and
    /// the bf16 rounding in one instruction.
    Avx512,
}

impl SimdLevel {
    /// Lower-case name (`scalar`, `avx2`, `avx512`).
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// The best level this CPU supports (detected once).
pub fn detected() -> SimdLevel {
    static DETECTED: OnceLock<SimdLevel> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512bf16")
            {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    })
}

/// Every level this CPU can run, lowest first.
pub fn available() -> Vec<SimdLevel> {
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .filter(|&l| l <= detected())
        .collect()
}

const NOT_FORCED: u8 = u8::MAX;
static FORCED: AtomicU8 = AtomicU8::new(NOT_FORCED);

/// Forces a level for every later call (`None`: back to the detected one).
/// A level above what the CPU supports is lowered to [`detected`].
pub fn force(level: Option<SimdLevel>) {
    let v = level.map_or(NOT_FORCED, |l| l.min(detected()) as u8);
    FORCED.store(v, Ordering::Relaxed);
}

/// The level calls use now.
#[inline]
pub fn active() -> SimdLevel {
    match FORCED.load(Ordering::Relaxed) {
        0 => SimdLevel::Scalar,
        1 => SimdLevel::Avx2,
        2 => SimdLevel::Avx512,
        _ => detected(),
    }
}

/// Keeps [`Isa`] to the level types of this crate, which only the
/// dispatching functions of [`simd_fn!`] name, after checking the CPU.
mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Baseline {}
    impl Sealed for super::Avx2 {}
    impl Sealed for super::Avx512 {}
}

/// An instruction-set level as a type, so that a kernel body compiled for
/// one level can ask at compile time what that level has (the 16-bit
/// conversions use F16C only where it is there). Sealed, and its types are
/// not nameable outside the crate: code that claims F16C is code the
/// dispatch chose for a CPU that has it.
pub trait Isa: sealed::Sealed + Copy + 'static {
    /// F16C (`vcvtph2ps`, `vcvtps2ph`) may be used.
    const F16C: bool;
    /// AVX2 integer vectors may be used (the bf16 conversions in registers).
    const AVX2: bool;
    /// The AVX-512 level's instructions may be used: 512-bit vectors
    /// (F, BW), and BF16 and DQ (`vcvtneps2bf16`, `vfpclassps`).
    const AVX512: bool;
}

/// [`SimdLevel::Scalar`] as a type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Baseline;
/// [`SimdLevel::Avx2`] as a type (AVX2, FMA, F16C).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2;
/// [`SimdLevel::Avx512`] as a type (AVX-512 F/BW/VL/DQ/BF16, AVX2, FMA, F16C).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512;

impl Isa for Baseline {
    const F16C: bool = false;
    const AVX2: bool = false;
    const AVX512: bool = false;
}
impl Isa for Avx2 {
    const F16C: bool = true;
    const AVX2: bool = true;
    const AVX512: bool = false;
}
impl Isa for Avx512 {
    const F16C: bool = true;
    const AVX2: bool = true;
    const AVX512: bool = true;
}

/// Defines a function generic over an element type `T: Float`, whose body
/// is compiled once per [`SimdLevel`] with that level's target features and
/// the level's [`Isa`] type bound to the name in brackets; each call
/// dispatches on [`active`].
///
/// ```text
/// simd_fn! { pub fn name<T: Float>[L](x: &[T]) -> f64 { … T::lanes::<L>(…) … } }
/// ```
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>[$l:ident]($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::extra_unused_type_parameters)]
            fn body<$l: $crate::simd::Isa, $t: $bound>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                body::<$crate::simd::Avx2, $t>($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                body::<$crate::simd::Avx512, $t>($($arg),*)
            }

            match $crate::simd::active() {
                // SAFETY: `active` never returns a level above `detected`,
                // so the CPU has the features these variants were compiled for.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::SimdLevel::Avx512 => unsafe { avx512::<$t>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::simd::SimdLevel::Avx2 => unsafe { avx2::<$t>($($arg),*) },
                _ => body::<$crate::simd::Baseline, $t>($($arg),*),
            }
        }
    };
}
pub(crate) use simd_fn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_never_exceeds_the_cpu() {
        force(Some(SimdLevel::Avx512));
        assert!(active() <= detected());
        force(Some(SimdLevel::Scalar));
        assert_eq!(active(), SimdLevel::Scalar);
        force(None);
        assert_eq!(active(), detected());
        assert_eq!(available()[0], SimdLevel::Scalar);
    }
}
