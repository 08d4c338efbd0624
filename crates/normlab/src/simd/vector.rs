//! Eight compute lanes as one value ([`V8`]) with arithmetic operators
//! that are single vector instructions at the AVX2 levels.
//!
//! Written as loops over `[f32; 8]`, LLVM's SLP vectorizer pairs unrelated
//! lanes of two accumulators (`Σd` and `Σd²` summed in one loop became
//! `vinsertps` + two-lane adds, four times slower than the memory traffic).
//! Here each operator is one `vaddps`/`vsubps`/`vmulps` (two for f64
//! lanes) where the level has AVX, and the same lane-wise operation in
//! plain Rust at the baseline level: every level rounds alike (no fused
//! multiply-add), so results stay bit-identical across levels.

use std::marker::PhantomData;
use std::ops::{Add, AddAssign, Mul, Sub};

use crate::float::Lane;
use crate::simd::Isa;

/// Lanes per vector.
pub const VECTOR: usize = 8;

/// Eight lanes of type `C`, computed with the instructions of level `L`.
#[derive(Clone, Copy, Debug)]
pub struct V8<C, L> {
    /// The lane values.
    pub lanes: [C; VECTOR],
    isa: PhantomData<L>,
}

impl<C: Lane, L: Isa> V8<C, L> {
    /// The lanes given.
    #[inline(always)]
    pub fn new(lanes: [C; VECTOR]) -> Self {
        Self {
            lanes,
            isa: PhantomData,
        }
    }

    /// Every lane `c`.
    #[inline(always)]
    pub fn splat(c: C) -> Self {
        Self::new([c; VECTOR])
    }

    /// Every lane 0.
    #[inline(always)]
    pub fn zero() -> Self {
        Self::splat(C::ZERO)
    }

    /// The lanes widened to f64 (exact).
    #[inline(always)]
    pub fn wide(self) -> V8<f64, L> {
        V8::new(C::wide8::<L>(self.lanes))
    }
}

impl<L: Isa> V8<f64, L> {
    /// The sum of the lanes, pairwise in a fixed order (short dependency
    /// chains, the same bits at every level).
    #[inline(always)]
    pub fn sum(self) -> f64 {
        let v = self.lanes;
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
}

impl<C: Lane, L: Isa> Add for V8<C, L> {
    type Output = Self;
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self::new(C::add8::<L>(self.lanes, other.lanes))
    }
}

impl<C: Lane, L: Isa> Sub for V8<C, L> {
    type Output = Self;
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        Self::new(C::sub8::<L>(self.lanes, other.lanes))
    }
}

impl<C: Lane, L: Isa> Mul for V8<C, L> {
    type Output = Self;
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Self::new(C::mul8::<L>(self.lanes, other.lanes))
    }
}

impl<C: Lane, L: Isa> AddAssign for V8<C, L> {
    #[inline(always)]
    fn add_assign(&mut self, other: Self) {
        *self = *self + other;
    }
}

/// Sixteen lanes of type `C` as one value: one AVX-512 instruction per
/// operator for f32 lanes at the AVX-512 level (half the instructions of
/// two [`V8`]s; each lane's operation is the same, so are the bits), two
/// eight-lane operations elsewhere.
#[derive(Clone, Copy, Debug)]
pub struct V16<C, L> {
    /// The lane values.
    pub lanes: [C; 16],
    isa: PhantomData<L>,
}

impl<C: Lane, L: Isa> V16<C, L> {
    /// The lanes given.
    #[inline(always)]
    pub fn new(lanes: [C; 16]) -> Self {
        Self {
            lanes,
            isa: PhantomData,
        }
    }

    /// Every lane `c`.
    #[inline(always)]
    pub fn splat(c: C) -> Self {
        Self::new([c; 16])
    }

    /// Every lane zero.
    #[inline(always)]
    pub fn zero() -> Self {
        Self::splat(C::ZERO)
    }

    /// The two eight-lane halves.
    #[inline(always)]
    pub fn halves(self) -> (V8<C, L>, V8<C, L>) {
        let (a, b) = crate::float::split16(self.lanes);
        (V8::new(a), V8::new(b))
    }

    /// Sixteen lanes from two halves.
    #[inline(always)]
    pub fn join(a: V8<C, L>, b: V8<C, L>) -> Self {
        Self::new(crate::float::join16(a.lanes, b.lanes))
    }
}

impl<C: Lane, L: Isa> Add for V16<C, L> {
    type Output = Self;
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self::new(C::op16::<L>(self.lanes, other.lanes, 0))
    }
}

impl<C: Lane, L: Isa> Sub for V16<C, L> {
    type Output = Self;
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        Self::new(C::op16::<L>(self.lanes, other.lanes, 1))
    }
}

impl<C: Lane, L: Isa> Mul for V16<C, L> {
    type Output = Self;
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Self::new(C::op16::<L>(self.lanes, other.lanes, 2))
    }
}

/// The AVX-512 forms of [`V16`]'s operators on f32 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::{__m512, _mm512_add_ps, _mm512_mul_ps, _mm512_sub_ps};
    use std::mem::transmute;

    /// `a + b`, `a - b` or `a·b` (`op` 0, 1, 2; a constant where inlined)
    /// over sixteen f32 lanes, one instruction.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn op_f32(a: [f32; 16], b: [f32; 16], op: u8) -> [f32; 16] {
        // SAFETY: `[f32; 16]` and `__m512` have the same size and every
        // bit pattern is valid in both.
        unsafe {
            let a = transmute::<[f32; 16], __m512>(a);
            let b = transmute::<[f32; 16], __m512>(b);
            let v = match op {
                0 => _mm512_add_ps(a, b),
                1 => _mm512_sub_ps(a, b),
                _ => _mm512_mul_ps(a, b),
            };
            transmute::<__m512, [f32; 16]>(v)
        }
    }
}

/// Lane-wise `f(a, b)` in plain Rust: the baseline level's operators.
#[inline(always)]
pub(crate) fn lanewise<C: Copy>(
    a: [C; VECTOR],
    b: [C; VECTOR],
    f: impl Fn(C, C) -> C,
) -> [C; VECTOR] {
    let mut out = a;
    for k in 0..VECTOR {
        out[k] = f(a[k], b[k]);
    }
    out
}

/// The AVX forms of the operators (every AVX2 level has AVX).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use std::arch::x86_64::{
        __m256, __m256d, _mm256_add_pd, _mm256_add_ps, _mm256_castps256_ps128, _mm256_cvtps_pd,
        _mm256_extractf128_ps, _mm256_mul_pd, _mm256_mul_ps, _mm256_sub_pd, _mm256_sub_ps,
    };
    use std::mem::transmute;

    macro_rules! f32_op {
        ($name:ident, $intrinsic:ident) => {
            /// One AVX instruction over eight f32 lanes.
            ///
            /// # Safety
            /// The CPU has AVX.
            #[target_feature(enable = "avx")]
            #[inline]
            pub unsafe fn $name(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
                // SAFETY: `[f32; 8]` and `__m256` have the same size and
                // every bit pattern is valid in both.
                unsafe {
                    let a = transmute::<[f32; 8], __m256>(a);
                    let b = transmute::<[f32; 8], __m256>(b);
                    transmute::<__m256, [f32; 8]>($intrinsic(a, b))
                }
            }
        };
    }
    f32_op!(add_f32, _mm256_add_ps);
    f32_op!(sub_f32, _mm256_sub_ps);
    f32_op!(mul_f32, _mm256_mul_ps);

    macro_rules! f64_op {
        ($name:ident, $intrinsic:ident) => {
            /// Two AVX instructions over eight f64 lanes.
            ///
            /// # Safety
            /// The CPU has AVX.
            #[target_feature(enable = "avx")]
            #[inline]
            pub unsafe fn $name(a: [f64; 8], b: [f64; 8]) -> [f64; 8] {
                // SAFETY: `[f64; 8]` and `[__m256d; 2]` have the same size
                // and every bit pattern is valid in both.
                unsafe {
                    let a = transmute::<[f64; 8], [__m256d; 2]>(a);
                    let b = transmute::<[f64; 8], [__m256d; 2]>(b);
                    let out = [$intrinsic(a[0], b[0]), $intrinsic(a[1], b[1])];
                    transmute::<[__m256d; 2], [f64; 8]>(out)
                }
            }
        };
    }
    f64_op!(add_f64, _mm256_add_pd);
    f64_op!(sub_f64, _mm256_sub_pd);
    f64_op!(mul_f64, _mm256_mul_pd);

    /// All ones in the first eight entries: the eight entries from `8 - n`
    /// select the first `n` lanes.
    static FIRST_LANES_32: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    static FIRST_LANES_64: [i64; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    /// The first `n` (at most eight) lanes of `a`, the rest from `pad`.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn keep_f32(a: [f32; 8], pad: [f32; 8], n: usize) -> [f32; 8] {
        use std::arch::x86_64::{_mm256_blendv_ps, _mm256_loadu_ps};
        let from = 8 - n.min(8);
        // SAFETY: `from + 8 ≤ 16` entries of the table; same sizes as above.
        unsafe {
            let mask = _mm256_loadu_ps(FIRST_LANES_32.as_ptr().add(from) as *const f32);
            let a = transmute::<[f32; 8], __m256>(a);
            let pad = transmute::<[f32; 8], __m256>(pad);
            transmute::<__m256, [f32; 8]>(_mm256_blendv_ps(pad, a, mask))
        }
    }

    /// [`keep_f32`] for f64 lanes.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn keep_f64(a: [f64; 8], pad: [f64; 8], n: usize) -> [f64; 8] {
        use std::arch::x86_64::{_mm256_blendv_pd, _mm256_loadu_pd};
        let from = 8 - n.min(8);
        // SAFETY: as in `keep_f32`, two halves.
        unsafe {
            let m = FIRST_LANES_64.as_ptr().add(from) as *const f64;
            let mask = [_mm256_loadu_pd(m), _mm256_loadu_pd(m.add(4))];
            let a = transmute::<[f64; 8], [__m256d; 2]>(a);
            let pad = transmute::<[f64; 8], [__m256d; 2]>(pad);
            transmute::<[__m256d; 2], [f64; 8]>([
                _mm256_blendv_pd(pad[0], a[0], mask[0]),
                _mm256_blendv_pd(pad[1], a[1], mask[1]),
            ])
        }
    }

    /// `d` where `!(z <= 0)` (z positive or NaN), else 0.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn positive_f32(z: [f32; 8], d: [f32; 8]) -> [f32; 8] {
        use std::arch::x86_64::{_mm256_and_ps, _mm256_cmp_ps, _mm256_setzero_ps, _CMP_NLE_UQ};
        // SAFETY: same sizes, every bit pattern valid (as above).
        unsafe {
            let z = transmute::<[f32; 8], __m256>(z);
            let d = transmute::<[f32; 8], __m256>(d);
            let mask = _mm256_cmp_ps::<_CMP_NLE_UQ>(z, _mm256_setzero_ps());
            transmute::<__m256, [f32; 8]>(_mm256_and_ps(mask, d))
        }
    }

    /// [`positive_f32`] for f64 lanes.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn positive_f64(z: [f64; 8], d: [f64; 8]) -> [f64; 8] {
        use std::arch::x86_64::{_mm256_and_pd, _mm256_cmp_pd, _mm256_setzero_pd, _CMP_NLE_UQ};
        // SAFETY: as in `positive_f32`, two halves.
        unsafe {
            let z = transmute::<[f64; 8], [__m256d; 2]>(z);
            let d = transmute::<[f64; 8], [__m256d; 2]>(d);
            let zero = _mm256_setzero_pd();
            let lo = _mm256_and_pd(_mm256_cmp_pd::<_CMP_NLE_UQ>(z[0], zero), d[0]);
            let hi = _mm256_and_pd(_mm256_cmp_pd::<_CMP_NLE_UQ>(z[1], zero), d[1]);
            transmute::<[__m256d; 2], [f64; 8]>([lo, hi])
        }
    }

    /// Eight f32 lanes widened to f64 (exact).
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn wide_f32(a: [f32; 8]) -> [f64; 8] {
        // SAFETY: as above; the two halves are converted in lane order.
        unsafe {
            let v = transmute::<[f32; 8], __m256>(a);
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
            transmute::<[__m256d; 2], [f64; 8]>([lo, hi])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Avx2, Baseline};

    type Op<L> = fn(V8<f32, L>, V8<f32, L>) -> V8<f32, L>;

    #[test]
    fn every_level_computes_the_same_lanes() {
        let a = [1.5f32, -2.0, 3.25, 1e-30, 7.0, -0.0, 1e30, 0.1];
        let b = [0.5f32, 4.0, -3.25, 1e-10, 1.0 / 3.0, 0.0, 1e10, 0.2];
        let base = |f: Op<Baseline>| f(V8::new(a), V8::new(b)).lanes;
        assert_eq!(base(|x, y| x + y), lanewise(a, b, |x, y| x + y));
        assert_eq!(base(|x, y| x * y), lanewise(a, b, |x, y| x * y));
        #[cfg(target_arch = "x86_64")]
        if crate::simd::detected() >= crate::simd::SimdLevel::Avx2 {
            let v = |f: Op<Avx2>| f(V8::new(a), V8::new(b)).lanes;
            assert_eq!(v(|x, y| x + y), base(|x, y| x + y));
            assert_eq!(v(|x, y| x - y), base(|x, y| x - y));
            assert_eq!(v(|x, y| x * y), base(|x, y| x * y));
            let w = V8::<f32, Avx2>::new(a).wide();
            assert_eq!(w.lanes, V8::<f32, Baseline>::new(a).wide().lanes);
            for n in 0..=8 {
                let pad = [9.0f32; 8];
                let kept = <f32 as Lane>::keep8::<Avx2>(a, pad, n);
                assert_eq!(kept, <f32 as Lane>::keep8::<Baseline>(a, pad, n));
                assert_eq!(kept[..n], a[..n]);
                let wide = <f64 as Lane>::keep8::<Avx2>(w.lanes, [9.0; 8], n);
                assert_eq!(wide, <f64 as Lane>::keep8::<Baseline>(w.lanes, [9.0; 8], n));
            }
            let d = w * w + w - w;
            let e = V8::<f32, Baseline>::new(a).wide();
            assert_eq!(d.lanes, (e * e + e - e).lanes);
        }
    }
}
