//! The element types the kernels accept, and the lanes they compute in.
//!
//! A kernel reads elements of a storage type `T` ([`Float`]: f32, f64, f16,
//! bf16), widens them in registers to `T::Lane` ([`Lane`]: f32 for f32, bf16
//! and f16, as PyTorch's CPU kernels do; f64 for f64), computes there, and
//! narrows each output once, round to nearest even. Widening is exact, so
//! the only rounding of a value on its way from `x` to `y` is that of the
//! lane arithmetic and the final store. Statistics are accumulated from f32
//! lanes into f64 over short segments, and centred on a shift close to the
//! mean, so that they stay exact to f32 rounding even when |μ| ≫ σ (see
//! [`crate::moments`]).

use std::fmt::Debug;
use std::mem::MaybeUninit;
use std::ops::{Add, AddAssign, Div, Mul, Sub};

use crate::simd::convert;
use crate::simd::vector;
use crate::simd::Isa;

/// Keeps the element and lane traits to this crate's types: the kernels'
/// unsafe code (outputs allocated uninitialized, streaming stores) relies on
/// what these types are and on every slot being written by their `narrow`.
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}

    /// The output buffers' slots, callable only inside the crate: handing
    /// out `MaybeUninit` views of initialized memory is sound only when
    /// every slot is written before the memory is read again.
    pub trait Slots<T> {
        fn slots(&mut self) -> &mut [std::mem::MaybeUninit<T>];
    }
}

/// The arithmetic type of a kernel's inner loops: f32 or f64 (sealed).
pub trait Lane:
    sealed::Sealed
    + Copy
    + Default
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Magnitudes for which `(x - s)²` neither overflows nor loses bits to
    /// underflow in this type: outside them statistics are taken in f64.
    const SAFE_RANGE: (f64, f64);
    /// Rounds an f64 to this type.
    fn of(v: f64) -> Self;
    /// Widens to f64 (exact).
    fn wide(self) -> f64;
    /// `|self|`.
    fn abs(self) -> Self;
    /// The larger of two values (the other one when either is NaN).
    fn max(self, other: Self) -> Self;
    /// `√self`.
    fn sqrt(self) -> Self;
    /// `tanh(self)`, within one unit in the last place.
    fn tanh(self) -> Self;
    /// `1/(1 + e^-self)`, within one unit in the last place.
    fn sigmoid(self) -> Self;
    /// [`Self::tanh`] of eight lanes, with level `L`'s instructions (the same bits).
    #[inline(always)]
    fn tanh8<L: Isa>(v: [Self; 8]) -> [Self; 8] {
        v.map(<Self as Lane>::tanh)
    }
    /// [`Self::sigmoid`] of eight lanes, with level `L`'s instructions (the same bits).
    #[inline(always)]
    fn sigmoid8<L: Isa>(v: [Self; 8]) -> [Self; 8] {
        v.map(<Self as Lane>::sigmoid)
    }
    /// Eight lanes `a + b` with level `L`'s instructions (`simd::vector::V8`).
    fn add8<L: Isa>(a: [Self; 8], b: [Self; 8]) -> [Self; 8];
    /// Eight lanes `a - b`.
    fn sub8<L: Isa>(a: [Self; 8], b: [Self; 8]) -> [Self; 8];
    /// Eight lanes `a·b`.
    fn mul8<L: Isa>(a: [Self; 8], b: [Self; 8]) -> [Self; 8];
    /// Eight lanes widened to f64 (exact).
    fn wide8<L: Isa>(a: [Self; 8]) -> [f64; 8];
    /// Sixteen lanes `a + b`, `a - b`, `a·b` (`op`: 0, 1, 2) with level
    /// `L`'s instructions (`simd::vector::V16`): two eight-lane operations,
    /// or one AVX-512 instruction for f32 lanes at the AVX-512 level.
    #[inline(always)]
    fn op16<L: Isa>(a: [Self; 16], b: [Self; 16], op: u8) -> [Self; 16] {
        op16_by_halves::<Self, L>(a, b, op)
    }
    /// The first `n` lanes of `a`, then those of `pad` (a blend in registers).
    fn keep8<L: Isa>(a: [Self; 8], pad: [Self; 8], n: usize) -> [Self; 8];
    /// `d` where `z > 0` or `z` is NaN, 0 where `z ≤ 0`: ReLU's gradient
    /// (a compare and an and).
    fn where_positive8<L: Isa>(z: [Self; 8], d: [Self; 8]) -> [Self; 8];
    /// `v` as `(hi, lo)` with `hi + lo ≈ v` to about twice this type's
    /// precision: `x - v` is then computed as `(x - hi) - lo`.
    #[inline(always)]
    fn split(v: f64) -> (Self, Self) {
        let hi = Self::of(v);
        (hi, Self::of(v - hi.wide()))
    }
}

/// The eight-lane operators of [`Lane`] for one lane type: the AVX forms
/// of `simd::vector::avx` at the AVX2 levels, the same lane-wise
/// operations in plain Rust at the baseline.
macro_rules! lane_vector_ops {
    ($t:ty, $keep:ident, $add:ident, $sub:ident, $mul:ident, $positive:ident) => {
        #[inline(always)]
        fn where_positive8<L: Isa>(z: [$t; 8], d: [$t; 8]) -> [$t; 8] {
            #[cfg(target_arch = "x86_64")]
            if L::AVX2 {
                // SAFETY: `L::AVX2` holds only at levels whose CPUs have AVX2.
                return unsafe { vector::avx::$positive(z, d) };
            }
            let mut out = d;
            for k in 0..8 {
                out[k] = if z[k] <= 0.0 { 0.0 } else { d[k] };
            }
            out
        }
        #[inline(always)]
        fn keep8<L: Isa>(a: [$t; 8], pad: [$t; 8], n: usize) -> [$t; 8] {
            #[cfg(target_arch = "x86_64")]
            if L::AVX2 {
                // SAFETY: `L::AVX2` holds only at levels whose CPUs have AVX2.
                return unsafe { vector::avx::$keep(a, pad, n) };
            }
            let mut out = pad;
            out[..n].copy_from_slice(&a[..n]);
            out
        }
        #[inline(always)]
        fn add8<L: Isa>(a: [$t; 8], b: [$t; 8]) -> [$t; 8] {
            #[cfg(target_arch = "x86_64")]
            if L::AVX2 {
                // SAFETY: as in `keep8`.
                return unsafe { vector::avx::$add(a, b) };
            }
            vector::lanewise(a, b, |x, y| x + y)
        }
        #[inline(always)]
        fn sub8<L: Isa>(a: [$t; 8], b: [$t; 8]) -> [$t; 8] {
            #[cfg(target_arch = "x86_64")]
            if L::AVX2 {
                // SAFETY: as in `keep8`.
                return unsafe { vector::avx::$sub(a, b) };
            }
            vector::lanewise(a, b, |x, y| x - y)
        }
        #[inline(always)]
        fn mul8<L: Isa>(a: [$t; 8], b: [$t; 8]) -> [$t; 8] {
            #[cfg(target_arch = "x86_64")]
            if L::AVX2 {
                // SAFETY: as in `keep8`.
                return unsafe { vector::avx::$mul(a, b) };
            }
            vector::lanewise(a, b, |x, y| x * y)
        }
    };
}

/// [`Lane::op16`] as two eight-lane operations on the halves.
#[inline(always)]
fn op16_by_halves<C: Lane, L: Isa>(a: [C; 16], b: [C; 16], op: u8) -> [C; 16] {
    let (a0, a1) = split16(a);
    let (b0, b1) = split16(b);
    // A closure is compiled without its caller's `target_feature`s:
    // unless inlined, each operator would become a call.
    let f = {
        #[inline(always)]
        |a, b| match op {
            0 => C::add8::<L>(a, b),
            1 => C::sub8::<L>(a, b),
            _ => C::mul8::<L>(a, b),
        }
    };
    join16(f(a0, b0), f(a1, b1))
}

/// The two eight-lane halves of sixteen lanes.
#[inline(always)]
pub(crate) fn split16<C: Copy>(v: [C; 16]) -> ([C; 8], [C; 8]) {
    (
        std::array::from_fn(|k| v[k]),
        std::array::from_fn(|k| v[8 + k]),
    )
}

/// Sixteen lanes from two halves.
#[inline(always)]
pub(crate) fn join16<C: Copy>(a: [C; 8], b: [C; 8]) -> [C; 16] {
    std::array::from_fn(|k| if k < 8 { a[k] } else { b[k - 8] })
}

impl Lane for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const SAFE_RANGE: (f64, f64) = (1e-10, 1e18);
    lane_vector_ops!(f32, keep_f32, add_f32, sub_f32, mul_f32, positive_f32);
    #[inline(always)]
    fn op16<L: Isa>(a: [f32; 16], b: [f32; 16], op: u8) -> [f32; 16] {
        #[cfg(target_arch = "x86_64")]
        if L::AVX512 {
            // SAFETY: `L::AVX512` holds only at the AVX-512 level.
            return unsafe { vector::avx512::op_f32(a, b, op) };
        }
        op16_by_halves::<Self, L>(a, b, op)
    }
    #[inline(always)]
    fn wide8<L: Isa>(a: [f32; 8]) -> [f64; 8] {
        #[cfg(target_arch = "x86_64")]
        if L::AVX2 {
            // SAFETY: `L::AVX2` holds only at levels whose CPUs have AVX2.
            return unsafe { vector::avx::wide_f32(a) };
        }
        a.map(|v| v as f64)
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        crate::activation::tanh_f32(self)
    }
    #[inline(always)]
    fn tanh8<L: Isa>(v: [f32; 8]) -> [f32; 8] {
        #[cfg(target_arch = "x86_64")]
        if L::AVX2 {
            // SAFETY: `L::AVX2` holds only at levels whose CPUs have AVX2.
            return unsafe { crate::activation::avx::tanh_f32(v) };
        }
        v.map(<Self as Lane>::tanh)
    }
    #[inline(always)]
    fn sigmoid8<L: Isa>(v: [f32; 8]) -> [f32; 8] {
        #[cfg(target_arch = "x86_64")]
        if L::AVX2 {
            // SAFETY: as in `tanh8`.
            return unsafe { crate::activation::avx::sigmoid_f32(v) };
        }
        v.map(<Self as Lane>::sigmoid)
    }
    #[inline(always)]
    fn sigmoid(self) -> Self {
        crate::activation::sigmoid_f32(self)
    }
}

impl Lane for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const SAFE_RANGE: (f64, f64) = (1e-140, 1e140);
    lane_vector_ops!(f64, keep_f64, add_f64, sub_f64, mul_f64, positive_f64);
    #[inline(always)]
    fn wide8<L: Isa>(a: [f64; 8]) -> [f64; 8] {
        a
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
}

/// A floating-point storage type: f32, f64, f16 or bf16 (sealed).
pub trait Float:
    sealed::Sealed + Copy + Send + Sync + Debug + Default + PartialEq + 'static
{
    /// Type name as PyTorch spells it (`float32`, …), for messages.
    const NAME: &'static str;
    /// Machine epsilon of this type, as `f64` (PyTorch's `finfo(dtype).eps`).
    const EPSILON: f64;
    /// The type kernels compute in: f32, or f64 for f64.
    type Lane: Lane;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Widens to the compute lane (exact).
    fn to_lane(self) -> Self::Lane;
    /// Rounds a lane value to this type (round to nearest even).
    fn from_lane(v: Self::Lane) -> Self;
    /// Widens `src` into `dst` (same length), with the conversions level `L` has.
    fn widen<L: Isa>(src: &[Self], dst: &mut [Self::Lane]);
    /// Rounds `src` into `dst` (same length), round to nearest even.
    fn narrow<L: Isa>(src: &[Self::Lane], dst: &mut [MaybeUninit<Self>]);
    /// Eight values widened to lanes in registers (one vector load and, for
    /// 16-bit types, one conversion where level `L` has it).
    fn widen8<L: Isa>(src: &[Self; 8]) -> [Self::Lane; 8];
    /// Eight lanes rounded to this type in registers (round to nearest even).
    fn narrow8<L: Isa>(v: [Self::Lane; 8]) -> [Self; 8];
    /// Sixteen values widened to lanes: two [`Float::widen8`], or one
    /// AVX-512 register where the level and type have one.
    #[inline(always)]
    fn widen16<L: Isa>(src: &[Self; 16]) -> [Self::Lane; 16] {
        let (a, b) = crate::float::split16(*src);
        join16(Self::widen8::<L>(&a), Self::widen8::<L>(&b))
    }
    /// Sixteen lanes rounded to this type: two [`Float::narrow8`], or one
    /// AVX-512 register where the level and type have one (the same bits).
    #[inline(always)]
    fn narrow16<L: Isa>(v: [Self::Lane; 16]) -> [Self; 16] {
        let (a, b) = split16(v);
        join16(Self::narrow8::<L>(a), Self::narrow8::<L>(b))
    }
    /// `src` as lanes: the slice itself when this type is its lane type,
    /// else widened into `buf` (at least as long as `src`).
    #[inline(always)]
    fn lanes<'a, L: Isa>(src: &'a [Self], buf: &'a mut [Self::Lane]) -> &'a [Self::Lane] {
        let buf = &mut buf[..src.len()];
        Self::widen::<L>(src, buf);
        buf
    }
}

impl Float for f32 {
    const NAME: &'static str = "float32";
    const EPSILON: f64 = f32::EPSILON as f64;
    type Lane = f32;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_lane(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_lane(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn widen<L: Isa>(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow<L: Isa>(src: &[f32], dst: &mut [MaybeUninit<Self>]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(v);
        }
    }
    #[inline(always)]
    fn widen8<L: Isa>(src: &[Self; 8]) -> [f32; 8] {
        *src
    }
    #[inline(always)]
    fn narrow8<L: Isa>(v: [f32; 8]) -> [Self; 8] {
        v
    }
    #[inline(always)]
    fn lanes<'a, L: Isa>(src: &'a [Self], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl Float for f64 {
    const NAME: &'static str = "float64";
    const EPSILON: f64 = f64::EPSILON;
    type Lane = f64;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_lane(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_lane(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn widen<L: Isa>(src: &[Self], dst: &mut [f64]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow<L: Isa>(src: &[f64], dst: &mut [MaybeUninit<Self>]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(v);
        }
    }
    #[inline(always)]
    fn widen8<L: Isa>(src: &[Self; 8]) -> [f64; 8] {
        *src
    }
    #[inline(always)]
    fn narrow8<L: Isa>(v: [f64; 8]) -> [Self; 8] {
        v
    }
    #[inline(always)]
    fn lanes<'a, L: Isa>(src: &'a [Self], _: &'a mut [f64]) -> &'a [f64] {
        src
    }
}

impl Float for half::f16 {
    const NAME: &'static str = "float16";
    const EPSILON: f64 = 0.000_976_562_5;
    type Lane = f32;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        convert::f16_bits_to_f32(self.to_bits()) as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        half::f16::from_bits(convert::f32_to_f16_bits(convert::f64_to_f32_round_to_odd(
            v,
        )))
    }
    #[inline(always)]
    fn to_lane(self) -> f32 {
        convert::f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_lane(v: f32) -> Self {
        half::f16::from_bits(convert::f32_to_f16_bits(v))
    }
    #[inline(always)]
    fn widen<L: Isa>(src: &[Self], dst: &mut [f32]) {
        convert::widen_f16::<L>(src, dst);
    }
    #[inline(always)]
    fn narrow<L: Isa>(src: &[f32], dst: &mut [MaybeUninit<Self>]) {
        convert::narrow_f16::<L>(src, dst);
    }
    #[inline(always)]
    fn widen8<L: Isa>(src: &[Self; 8]) -> [f32; 8] {
        convert::widen8_f16::<L>(src)
    }
    #[inline(always)]
    fn widen16<L: Isa>(src: &[Self; 16]) -> [f32; 16] {
        convert::widen16_f16::<L>(src)
    }
    #[inline(always)]
    fn narrow16<L: Isa>(v: [f32; 16]) -> [Self; 16] {
        convert::narrow16_f16::<L>(v)
    }
    #[inline(always)]
    fn narrow8<L: Isa>(v: [f32; 8]) -> [Self; 8] {
        convert::narrow8_f16::<L>(v)
    }
}

impl Float for half::bf16 {
    const NAME: &'static str = "bfloat16";
    const EPSILON: f64 = 0.007_812_5;
    type Lane = f32;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        convert::bf16_bits_to_f32(self.to_bits()) as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        half::bf16::from_bits(convert::f32_to_bf16_bits(convert::f64_to_f32_round_to_odd(
            v,
        )))
    }
    #[inline(always)]
    fn to_lane(self) -> f32 {
        convert::bf16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_lane(v: f32) -> Self {
        half::bf16::from_bits(convert::f32_to_bf16_bits(v))
    }
    #[inline(always)]
    fn widen<L: Isa>(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = convert::bf16_bits_to_f32(s.to_bits());
        }
    }
    #[inline(always)]
    fn narrow<L: Isa>(src: &[f32], dst: &mut [MaybeUninit<Self>]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(half::bf16::from_bits(convert::f32_to_bf16_bits(v)));
        }
    }
    #[inline(always)]
    fn widen8<L: Isa>(src: &[Self; 8]) -> [f32; 8] {
        convert::widen8_bf16::<L>(src)
    }
    #[inline(always)]
    fn widen16<L: Isa>(src: &[Self; 16]) -> [f32; 16] {
        convert::widen16_bf16::<L>(src)
    }
    #[inline(always)]
    fn narrow16<L: Isa>(v: [f32; 16]) -> [Self; 16] {
        convert::narrow16_bf16::<L>(v)
    }
    #[inline(always)]
    fn narrow8<L: Isa>(v: [f32; 8]) -> [Self; 8] {
        convert::narrow8_bf16::<L>(v)
    }
}

/// An initialized buffer seen as one that is about to be overwritten.
/// Sound: kernels only ever write initialized values through it.
#[inline]
pub(crate) fn uninit_mut<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout, and every write through the
    // result stores a valid T, so `s` stays initialized.
    unsafe { &mut *(s as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// An output buffer a kernel overwrites entirely: a slice of initialized
/// values (`&mut [T]`, `&mut Vec<T>`, `&mut [T; N]`) or of uninitialized
/// ones (`&mut [MaybeUninit<T>]`, for outputs allocated without a fill). One
/// kernel function serves both. Sealed: the kernels write every slot.
pub trait OutputBuffer<T: Float>: sealed::Slots<T> {}

impl<T: Float> sealed::Slots<T> for [T] {
    fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        uninit_mut(self)
    }
}

impl<T: Float, const N: usize> sealed::Slots<T> for [T; N] {
    fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        uninit_mut(self)
    }
}

impl<T: Float> sealed::Slots<T> for Vec<T> {
    fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        uninit_mut(self)
    }
}

impl<T: Float> sealed::Slots<T> for [MaybeUninit<T>] {
    fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        self
    }
}

impl<T: Float> OutputBuffer<T> for [T] {}
impl<T: Float, const N: usize> OutputBuffer<T> for [T; N] {}
impl<T: Float> OutputBuffer<T> for Vec<T> {}
impl<T: Float> OutputBuffer<T> for [MaybeUninit<T>] {}

/// The slots of an output buffer (inside the crate only).
#[inline]
pub(crate) fn slots<T: Float>(out: &mut (impl OutputBuffer<T> + ?Sized)) -> &mut [MaybeUninit<T>] {
    sealed::Slots::slots(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Baseline;

    #[test]
    fn lane_conversions_round_to_nearest_even_as_half_does() {
        let values = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 512.0,
            65504.0,
            65519.0,
            65520.0,
            1e-7,
            6e-8,
            3.0e-8,
            -2.5e-6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            f32::MIN_POSITIVE,
            3.4e38,
        ];
        for v in values {
            assert_eq!(
                half::f16::from_lane(v).to_bits(),
                half::f16::from_f32(v).to_bits(),
                "f16 {v}"
            );
            assert_eq!(
                half::bf16::from_lane(v).to_bits(),
                half::bf16::from_f32(v).to_bits(),
                "bf16 {v}"
            );
        }
        assert!(half::f16::from_lane(f32::NAN).is_nan());
        assert!(half::bf16::from_lane(f32::NAN).is_nan());
        let mut widened = [0f32; 1];
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            half::f16::widen::<Baseline>(&[h], &mut widened);
            let w = h.to_f32();
            assert!(w.to_bits() == widened[0].to_bits() || (w.is_nan() && widened[0].is_nan()));
        }
    }
}
