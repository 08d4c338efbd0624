//! Run-time SIMD dispatch.
//!
//! Hot loops are written once as plain Rust over fixed-width lane arrays,
//! which LLVM turns into vector code, and compiled several times by
//! [`simd_fn!`]: for the baseline target (the scalar path, always compiled),
//! with AVX2+FMA, and with AVX-512. Each call picks the best level the CPU
//! has (detected once), unless a level is forced with [`force`] — tests use
//! that to run every path, and `normlab bench` to compare them.
//!
//! Every level performs the same floating-point operations in the same
//! order (no fused multiply-add is introduced, reductions use the same lane
//! layout), so all paths give bit-identical results.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A SIMD instruction-set level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// The baseline target, no run-time features.
    Scalar,
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// AVX-512 F/BW/VL (x86-64).
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
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
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

/// Defines a function compiled for every [`SimdLevel`], dispatching on
/// [`active`] at each call.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            match $crate::simd::active() {
                // SAFETY: `active` never returns a level above `detected`,
                // so the CPU has the features these variants were compiled for.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::simd::SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
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
