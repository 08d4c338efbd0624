//! Widening 16-bit values to f32, narrowing f32 to 16 bits (round to
//! nearest even), and writing a kernel's output values to memory.
//!
//! bf16 is the upper half of an f32, so it widens by a shift and narrows by
//! adding the rounding bias to the bits. f16 converts with F16C
//! (`vcvtph2ps`, `vcvtps2ph`) where the level has it, and otherwise with the
//! bit-exact integer forms below, which round the same way: every level
//! gives the same bits.

use std::mem::MaybeUninit;

use crate::float::{Float, Lane};
use crate::simd::vector::V16;
use crate::simd::Isa;

/// bf16 bits as f32 (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to bf16 bits, round to nearest even: `(u + 0x7fff + lsb) >> 16`,
/// where `lsb` is the lowest bit kept; a NaN stays a (quiet) NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    let rounded = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((u >> 16) | 0x40) as u16;
    if v.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// f64 to f32 rounded to odd: the f32 on `v`'s side of zero just below or
/// at `|v|`, with its lowest mantissa bit set when the conversion was
/// inexact. Rounding that f32 to nearest even at 16 bits gives the f64
/// correctly rounded (Boldo & Melquiond, "When double rounding is odd",
/// 2005: the intermediate needs at least `p + 2` bits of the target's `p`
/// and an exponent range covering the target's; f32 has 24 against 11 for
/// f16 and 8 for bf16, and reaches below both types' subnormals), where
/// rounding to nearest twice can be off by one unit at a tie.
#[inline(always)]
pub fn f64_to_f32_round_to_odd(v: f64) -> f32 {
    let t = v as f32;
    if !t.is_finite() || t as f64 == v {
        // Exact, NaN, or past f32's range (past every 16-bit type's too).
        return t;
    }
    let mut bits = t.to_bits();
    if (t as f64).abs() > v.abs() {
        // Rounded away from zero: one step back toward zero.
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// The bits of 2¹¹², which scales the f16 exponent bias (15) to f32's (127).
const F16_TO_F32_SCALE_BITS: u32 = (127 + 112) << 23;

/// f16 bits as f32 (exact), without branches: the exponent and mantissa
/// bits moved into place (`em << 13`) read as an f32 that is the value
/// times 2⁻¹¹², subnormals included; infinities and NaNs keep an all-ones
/// exponent.
#[inline(always)]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    let h = bits as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let finite = f32::from_bits(em << 13) * f32::from_bits(F16_TO_F32_SCALE_BITS);
    let special = f32::from_bits((em << 13) | 0x7f80_0000);
    let magnitude = if em >= 0x7c00 { special } else { finite };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// f32 to f16 bits, round to nearest even, without branches (the method
/// of F. Giesen's `float_to_half_fast3_rtne`):
/// - |v| ≥ 2¹⁶: infinity, or a quiet NaN keeping the upper mantissa bits
///   (as `vcvtps2ph` does);
/// - |v| < 2⁻¹⁴ (f16 subnormal or zero): adding 0.5 (= 2⁻¹) aligns the ten
///   mantissa bits at the bottom, rounded by the f32 addition itself;
/// - otherwise: rebias the exponent, add `0xfff + lsb`, keep the top bits
///   (a carry into the exponent rounds up to the next binade or to ∞).
#[inline(always)]
pub fn f32_to_f16_bits(v: f32) -> u16 {
    const F16_OVERFLOW: u32 = (127 + 16) << 23;
    const F16_MIN_NORMAL: u32 = (127 - 14) << 23;
    const SUBNORMAL_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    const REBIAS: u32 = ((15 - 127) << 23) as u32;
    let u = v.to_bits();
    let sign = u & 0x8000_0000;
    let a = u ^ sign;
    let special = if a > 0x7f80_0000 {
        0x7e00 | ((a >> 13) & 0x3ff)
    } else {
        0x7c00
    };
    let subnormal = (f32::from_bits(a) + f32::from_bits(SUBNORMAL_MAGIC))
        .to_bits()
        .wrapping_sub(SUBNORMAL_MAGIC);
    let normal = a
        .wrapping_add(REBIAS.wrapping_add(0xfff))
        .wrapping_add((a >> 13) & 1)
        >> 13;
    let magnitude = if a >= F16_OVERFLOW {
        special
    } else if a < F16_MIN_NORMAL {
        subnormal
    } else {
        normal
    };
    (magnitude | (sign >> 16)) as u16
}

/// f16 values widened into `dst`: with F16C eight at a time where level
/// `L` has it, else with [`f16_bits_to_f32`].
#[inline(always)]
pub fn widen_f16<L: Isa>(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if L::F16C {
        // SAFETY: `L::F16C` is true only in code compiled for, and
        // dispatched to, levels whose CPUs have F16C (see `simd_fn!`).
        unsafe { widen_f16_f16c(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16_bits_to_f32(s.to_bits());
    }
}

/// f32 values rounded into f16 slots: with F16C eight at a time where
/// level `L` has it, else with [`f32_to_f16_bits`].
#[inline(always)]
pub fn narrow_f16<L: Isa>(src: &[f32], dst: &mut [MaybeUninit<half::f16>]) {
    #[cfg(target_arch = "x86_64")]
    if L::F16C {
        // SAFETY: as in `widen_f16`.
        unsafe { narrow_f16_f16c(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(half::f16::from_bits(f32_to_f16_bits(v)));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn widen_f16_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let len = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: eight values are in bounds of both slices at `i`.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const _);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for k in i..len {
        dst[k] = f16_bits_to_f32(src[k].to_bits());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn narrow_f16_f16c(src: &[f32], dst: &mut [MaybeUninit<half::f16>]) {
    use std::arch::x86_64::{
        _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };
    let len = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: eight values are in bounds of both slices at `i`.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let mut h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            keep_in_register_128(&mut h);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut _, h);
        }
        i += 8;
    }
    for k in i..len {
        dst[k].write(half::f16::from_bits(f32_to_f16_bits(src[k])));
    }
}

/// Eight f16 values widened in registers: one `vcvtph2ps` where level `L`
/// has F16C, else [`f16_bits_to_f32`] lane by lane.
#[inline(always)]
pub fn widen8_f16<L: Isa>(src: &[half::f16; 8]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if L::F16C {
        // SAFETY: `L::F16C` is true only in code compiled for, and
        // dispatched to, levels whose CPUs have F16C (see `simd_fn!`).
        return unsafe { widen8_f16c(src) };
    }
    src.map(|h| f16_bits_to_f32(h.to_bits()))
}

/// Eight lanes rounded to f16 in registers: one `vcvtps2ph` where level `L`
/// has F16C, else [`f32_to_f16_bits`] lane by lane.
#[inline(always)]
pub fn narrow8_f16<L: Isa>(v: [f32; 8]) -> [half::f16; 8] {
    #[cfg(target_arch = "x86_64")]
    if L::F16C {
        // SAFETY: as in `widen8_f16`.
        return unsafe { narrow8_f16c(v) };
    }
    v.map(|x| half::f16::from_bits(f32_to_f16_bits(x)))
}

/// Eight bf16 values widened in registers (zero-extend, shift left by 16).
#[inline(always)]
pub fn widen8_bf16<L: Isa>(src: &[half::bf16; 8]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if L::AVX2 {
        // SAFETY: `L::AVX2` is true only for levels whose CPUs have AVX2.
        return unsafe { widen8_bf16_avx2(src) };
    }
    src.map(|b| bf16_bits_to_f32(b.to_bits()))
}

/// Eight lanes rounded to bf16 in registers, as [`f32_to_bf16_bits`]:
/// `(u + 0x7fff + lsb) >> 16`, NaNs made quiet.
#[inline(always)]
pub fn narrow8_bf16<L: Isa>(v: [f32; 8]) -> [half::bf16; 8] {
    #[cfg(target_arch = "x86_64")]
    if L::AVX512 {
        // SAFETY: `L::AVX512` is true only for levels whose CPUs have
        // AVX-512 BF16, DQ and VL (and AVX2).
        return unsafe { narrow8_bf16_avx512(v) };
    }
    #[cfg(target_arch = "x86_64")]
    if L::AVX2 {
        // SAFETY: as in `widen8_bf16`.
        return unsafe { narrow8_bf16_avx2(v) };
    }
    v.map(|x| half::bf16::from_bits(f32_to_bf16_bits(x)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn widen8_f16c(src: &[half::f16; 8]) -> [f32; 8] {
    use std::arch::x86_64::{__m256, _mm256_cvtph_ps, _mm_loadu_si128};
    // SAFETY: sixteen bytes are read from an array of eight f16; `__m256`
    // and `[f32; 8]` have the same size and any bits are valid in both.
    unsafe {
        let h = _mm_loadu_si128(src.as_ptr() as *const _);
        std::mem::transmute::<__m256, [f32; 8]>(_mm256_cvtph_ps(h))
    }
}

/// An empty `asm!` block that takes `h` in a register and gives it back
/// unchanged: the `vcvtps2ph` before it then writes a register, where LLVM
/// would otherwise fold the store that follows into its memory form, which
/// measured slower than the register form and a plain store on an AMD EPYC
/// (Zen) VM: the folded store took most of a BatchNorm eval loop's samples,
/// and `[32, 2048, 7, 7]` f16 eval ran in 0.44 ms against 0.39 ms, one
/// thread.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn keep_in_register_128(h: &mut std::arch::x86_64::__m128i) {
    // SAFETY: the block is empty: no instruction, no memory, no flags.
    unsafe {
        std::arch::asm!(
            "/* {0} */",
            inout(xmm_reg) * h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
}

/// [`keep_in_register_128`] for a 256-bit register.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn keep_in_register_256(h: &mut std::arch::x86_64::__m256i) {
    // SAFETY: as in `keep_in_register_128`.
    unsafe {
        std::arch::asm!(
            "/* {0} */",
            inout(ymm_reg) * h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn narrow8_f16c(v: [f32; 8]) -> [half::f16; 8] {
    use std::arch::x86_64::{__m128i, __m256, _mm256_cvtps_ph, _MM_FROUND_TO_NEAREST_INT};
    // SAFETY: same sizes, any bits valid (f16 is a plain 16-bit pattern).
    unsafe {
        let v = std::mem::transmute::<[f32; 8], __m256>(v);
        let mut h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        keep_in_register_128(&mut h);
        std::mem::transmute::<__m128i, [half::f16; 8]>(h)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn widen8_bf16_avx2(src: &[half::bf16; 8]) -> [f32; 8] {
    use std::arch::x86_64::{__m256i, _mm256_cvtepu16_epi32, _mm256_slli_epi32, _mm_loadu_si128};
    // SAFETY: sixteen bytes are read from an array of eight bf16; the
    // result has the size of `[f32; 8]`, any bits valid.
    unsafe {
        let h = _mm_loadu_si128(src.as_ptr() as *const _);
        let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
        std::mem::transmute::<__m256i, [f32; 8]>(w)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn narrow8_bf16_avx2(v: [f32; 8]) -> [half::bf16; 8] {
    use std::arch::x86_64::{
        __m128i, __m256, _mm256_add_epi32, _mm256_and_si256, _mm256_blendv_epi8,
        _mm256_castps_si256, _mm256_castsi256_si128, _mm256_cmp_ps, _mm256_or_si256,
        _mm256_packus_epi32, _mm256_permute4x64_epi64, _mm256_set1_epi32, _mm256_srli_epi32,
        _CMP_UNORD_Q,
    };
    // SAFETY: same sizes, any bits valid; AVX2 is enabled for this function.
    unsafe {
        let v = std::mem::transmute::<[f32; 8], __m256>(v);
        let u = _mm256_castps_si256(v);
        let upper = _mm256_srli_epi32::<16>(u);
        let lsb = _mm256_and_si256(upper, _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(u, bias));
        let quiet_nan = _mm256_or_si256(upper, _mm256_set1_epi32(0x40));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let bits = _mm256_blendv_epi8(rounded, quiet_nan, nan);
        // Every lane is below 2^16: pack the eight 32-bit lanes to 16 bits
        // (per 128-bit half), then gather the two halves' low quadwords.
        let packed = _mm256_packus_epi32(bits, bits);
        let ordered = _mm256_permute4x64_epi64::<0b00_00_10_00>(packed);
        std::mem::transmute::<__m128i, [half::bf16; 8]>(_mm256_castsi256_si128(ordered))
    }
}

/// Sixteen f16 values widened: one `vcvtph2ps` into a 512-bit register at
/// the AVX-512 level, else two [`widen8_f16`].
#[inline(always)]
pub fn widen16_f16<L: Isa>(src: &[half::f16; 16]) -> [f32; 16] {
    #[cfg(target_arch = "x86_64")]
    if L::AVX512 {
        // SAFETY: `L::AVX512` holds only at the AVX-512 level.
        return unsafe { avx512::widen16_f16(src) };
    }
    let (a, b) = crate::float::split16(*src);
    crate::float::join16(widen8_f16::<L>(&a), widen8_f16::<L>(&b))
}

/// Sixteen lanes rounded to f16: one `vcvtps2ph` at the AVX-512 level
/// (rounding as F16C's), else two [`narrow8_f16`].
#[inline(always)]
pub fn narrow16_f16<L: Isa>(v: [f32; 16]) -> [half::f16; 16] {
    #[cfg(target_arch = "x86_64")]
    if L::AVX512 {
        // SAFETY: as in `widen16_f16`.
        return unsafe { avx512::narrow16_f16(v) };
    }
    let (a, b) = crate::float::split16(v);
    crate::float::join16(narrow8_f16::<L>(a), narrow8_f16::<L>(b))
}

/// Sixteen bf16 values widened (zero-extend, shift left by 16), in one
/// 512-bit register at the AVX-512 level, else two [`widen8_bf16`].
#[inline(always)]
pub fn widen16_bf16<L: Isa>(src: &[half::bf16; 16]) -> [f32; 16] {
    #[cfg(target_arch = "x86_64")]
    if L::AVX512 {
        // SAFETY: as in `widen16_f16`.
        return unsafe { avx512::widen16_bf16(src) };
    }
    let (a, b) = crate::float::split16(*src);
    crate::float::join16(widen8_bf16::<L>(&a), widen8_bf16::<L>(&b))
}

/// Sixteen lanes rounded to bf16: one `vcvtneps2bf16` at the AVX-512 level
/// (a subnormal lane sends the vector to the integer form, as in
/// [`narrow8_bf16`]), else two [`narrow8_bf16`].
#[inline(always)]
pub fn narrow16_bf16<L: Isa>(v: [f32; 16]) -> [half::bf16; 16] {
    #[cfg(target_arch = "x86_64")]
    if L::AVX512 {
        // SAFETY: as in `widen16_f16`.
        return unsafe { avx512::narrow16_bf16(v) };
    }
    let (a, b) = crate::float::split16(v);
    crate::float::join16(narrow8_bf16::<L>(a), narrow8_bf16::<L>(b))
}

/// The 512-bit forms of the sixteen-value conversions.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m256bh, __m256i, __m512, _mm256_loadu_si256, _mm512_castsi512_ps, _mm512_cvtepu16_epi32,
        _mm512_cvtneps_pbh, _mm512_cvtph_ps, _mm512_cvtps_ph, _mm512_fpclass_ps_mask,
        _mm512_slli_epi32, _MM_FROUND_TO_NEAREST_INT,
    };
    use std::mem::transmute;

    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn widen16_f16(src: &[half::f16; 16]) -> [f32; 16] {
        // SAFETY: 32 bytes read from sixteen f16; same sizes, any bits valid.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr() as *const __m256i);
            transmute::<__m512, [f32; 16]>(_mm512_cvtph_ps(h))
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn narrow16_f16(v: [f32; 16]) -> [half::f16; 16] {
        // SAFETY: same sizes, any bits valid.
        unsafe {
            let v = transmute::<[f32; 16], __m512>(v);
            let mut h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            // AVX-512 F implies AVX.
            super::keep_in_register_256(&mut h);
            transmute::<__m256i, [half::f16; 16]>(h)
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn widen16_bf16(src: &[half::bf16; 16]) -> [f32; 16] {
        // SAFETY: 32 bytes read from sixteen bf16; same sizes, any bits valid.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr() as *const __m256i);
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            transmute::<__m512, [f32; 16]>(_mm512_castsi512_ps(w))
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F, DQ, VL and BF16, and AVX2.
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bf16,avx2")]
    #[inline]
    pub unsafe fn narrow16_bf16(v: [f32; 16]) -> [half::bf16; 16] {
        /// `vfpclassps` category: denormal (subnormal).
        const SUBNORMAL: i32 = 0x20;
        // SAFETY: same sizes, any bits valid; the features are enabled here.
        unsafe {
            let x = transmute::<[f32; 16], __m512>(v);
            if _mm512_fpclass_ps_mask::<SUBNORMAL>(x) != 0 {
                let (a, b) = crate::float::split16(v);
                return crate::float::join16(
                    super::narrow8_bf16_avx2(a),
                    super::narrow8_bf16_avx2(b),
                );
            }
            transmute::<__m256bh, [half::bf16; 16]>(_mm512_cvtneps_pbh(x))
        }
    }
}

/// [`narrow8_bf16`] with one `vcvtneps2bf16`, which rounds as
/// [`f32_to_bf16_bits`] does (the same bias, NaNs quieted by the same bit)
/// except that it reads subnormal inputs as zero; a vector with a subnormal
/// lane (`vfpclassps`, a predictable branch) takes the integer form instead,
/// so every level gives the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bf16,avx2")]
#[inline]
unsafe fn narrow8_bf16_avx512(v: [f32; 8]) -> [half::bf16; 8] {
    use std::arch::x86_64::{__m128bh, __m256, _mm256_cvtneps_pbh, _mm256_fpclass_ps_mask};
    /// `vfpclassps` category: denormal (subnormal).
    const SUBNORMAL: i32 = 0x20;
    // SAFETY: same sizes, any bits valid; the features are enabled here.
    unsafe {
        let x = std::mem::transmute::<[f32; 8], __m256>(v);
        if _mm256_fpclass_ps_mask::<SUBNORMAL>(x) != 0 {
            return narrow8_bf16_avx2(v);
        }
        std::mem::transmute::<__m128bh, [half::bf16; 8]>(_mm256_cvtneps_pbh(x))
    }
}

pub use super::vector::VECTOR;

/// Eight lanes of `x` from `at`, widened in registers.
#[inline(always)]
pub fn load<T: Float, L: Isa>(x: &[T], at: usize) -> [T::Lane; VECTOR] {
    let src: &[T; VECTOR] = x[at..at + VECTOR].try_into().expect("eight values");
    T::widen8::<L>(src)
}

/// Sixteen values of `x` from `at`, widened in registers.
#[inline(always)]
pub(crate) fn load16<T: Float, L: Isa>(x: &[T], at: usize) -> V16<T::Lane, L> {
    V16::new(T::widen16::<L>(
        x[at..at + 16].try_into().expect("sixteen values"),
    ))
}

/// Narrows `v` into `out[at..at + 16]`.
#[inline(always)]
pub(crate) fn store16<T: Float, L: Isa>(out: &mut [MaybeUninit<T>], at: usize, v: V16<T::Lane, L>) {
    for (d, value) in out[at..at + 16].iter_mut().zip(T::narrow16::<L>(v.lanes)) {
        d.write(value);
    }
}

/// The `n` (at most eight) values of `x` from `at` as lanes, the lanes past
/// `n` set to `pad`: a whole vector loads as one, and so does a partial one
/// that `x` extends past (then blended with `pad`); only at the end of `x`
/// value by value.
#[inline(always)]
pub fn load_n<T: Float, L: Isa>(x: &[T], at: usize, n: usize, pad: T::Lane) -> [T::Lane; VECTOR] {
    if n == VECTOR {
        return load::<T, L>(x, at);
    }
    if n == 0 {
        return [pad; VECTOR];
    }
    if at + VECTOR <= x.len() {
        // A whole vector is readable: load it and blend in the padding. A
        // vector assembled lane by lane on the stack and read back whole
        // stalls the load (no store forwarding), which cost as much as the
        // rest of a 49-value slice.
        return T::Lane::keep8::<L>(load::<T, L>(x, at), [pad; VECTOR], n);
    }
    let mut v = [pad; VECTOR];
    for (lane, &value) in v.iter_mut().zip(&x[at..at + n]) {
        *lane = value.to_lane();
    }
    v
}

/// Narrows `v` and stores its first `n` lanes (at most eight) at `out[at..]`:
/// a whole vector with one store, streamed when `streaming` and `out[at..]`
/// is 16-byte aligned ([`fill!`] sees to it).
#[inline(always)]
pub fn store_n<T: Float, L: Isa>(
    out: &mut [MaybeUninit<T>],
    at: usize,
    n: usize,
    v: [T::Lane; VECTOR],
    streaming: bool,
) {
    let narrowed = T::narrow8::<L>(v);
    if n == VECTOR {
        let dst: &mut [MaybeUninit<T>; VECTOR] =
            (&mut out[at..at + VECTOR]).try_into().expect("eight slots");
        // Non-temporal stores need 16-byte alignment, which `fill!` gives
        // every whole vector after its head; checked here all the same (a
        // predictable branch) rather than trusted, as this function is safe.
        #[cfg(target_arch = "x86_64")]
        if streaming && (dst.as_ptr() as usize).is_multiple_of(16) {
            stream(dst, narrowed);
            return;
        }
        let _ = streaming;
        for (d, value) in dst.iter_mut().zip(narrowed) {
            d.write(value);
        }
        return;
    }
    for (d, value) in out[at..at + n].iter_mut().zip(narrowed) {
        d.write(value);
    }
}

/// Eight values written with non-temporal stores, 16 bytes at a time;
/// `dst` is 16-byte aligned (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn stream<T: Float>(dst: &mut [MaybeUninit<T>; VECTOR], values: [T; VECTOR]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let bytes = std::mem::size_of::<[T; VECTOR]>();
    debug_assert_eq!(dst.as_ptr() as usize % 16, 0);
    let (src, to) = (values.as_ptr() as *const u8, dst.as_mut_ptr() as *mut u8);
    let mut at = 0;
    while at < bytes {
        // SAFETY: every storage type's eight values are a whole number of
        // 16-byte units (16, 32 or 64 bytes); `to` is 16-byte aligned (the
        // caller's contract); SSE2 is part of the x86-64 baseline.
        unsafe {
            let v = _mm_loadu_si128(src.add(at) as *const __m128i);
            _mm_stream_si128(to.add(at) as *mut __m128i, v);
        }
        at += 16;
    }
}

/// Fills `y` vector by vector: `fill!(T, L, y, store, |at, n| lanes)`
/// evaluates `lanes`, the lanes of `y[at..at + n]` (`n` ≤ 8; lanes past `n`
/// are ignored), for each vector and stores them narrowed straight from
/// registers. With `Store::Streaming` (x86-64), the values before `y`'s
/// first 16-byte boundary are stored first, then whole vectors with
/// non-temporal stores; streaming stores are left unfenced.
///
/// A macro rather than a function taking a closure: a closure is compiled
/// without the target features of the kernel it is written in, and a call
/// per vector measured four times slower than the inlined loop.
macro_rules! fill {
    ($t:ty, $l:ty, $y:expr, $store:expr, |$at:ident, $n:ident| $lanes:expr) => {{
        use $crate::simd::convert::{store_n, unaligned_head, Store, VECTOR};
        let y: &mut [std::mem::MaybeUninit<$t>] = $y;
        let len = y.len();
        let streaming = cfg!(target_arch = "x86_64") && $store == Store::Streaming;
        let mut i = 0;
        if streaming {
            let head = unaligned_head(y);
            if head > 0 {
                let ($at, $n) = (0usize, head);
                store_n::<$t, $l>(y, 0, head, $lanes, false);
            }
            i = head;
            while i + VECTOR <= len {
                let ($at, $n) = (i, VECTOR);
                store_n::<$t, $l>(y, i, VECTOR, $lanes, true);
                i += VECTOR;
            }
        } else {
            while i + VECTOR <= len {
                let ($at, $n) = (i, VECTOR);
                store_n::<$t, $l>(y, i, VECTOR, $lanes, false);
                i += VECTOR;
            }
        }
        if i < len {
            let ($at, $n) = (i, len - i);
            store_n::<$t, $l>(y, i, len - i, $lanes, false);
        }
    }};
}
pub(crate) use fill;

/// How a kernel's output values reach memory.
///
/// A normal store first reads the cache line it writes into (read for
/// ownership), so an output costs two memory transfers; a non-temporal
/// (streaming) store writes the line without reading it and without evicting
/// the input from the caches. Streaming pays off for outputs too large to be
/// read back from cache anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Ordinary stores.
    Cached,
    /// Non-temporal stores (x86-64), ordinary ones elsewhere.
    Streaming,
}

/// Outputs at least this large (bytes) are written with streaming stores:
/// below it (in the 32 MiB of last-level cache an L2 + L3 of this machine
/// kind offers to two cores) the output is likely still cached when the
/// next op reads it.
pub const STREAMING_MIN_BYTES: usize = 16 << 20;

impl Store {
    /// Streaming for an output of `len` values of `T` of [`STREAMING_MIN_BYTES`] or more.
    pub fn for_output<T>(len: usize) -> Self {
        if len.saturating_mul(std::mem::size_of::<T>()) >= STREAMING_MIN_BYTES {
            Store::Streaming
        } else {
            Store::Cached
        }
    }
}

/// Makes streaming stores visible before anyone reads them (they are weakly
/// ordered); nothing for ordinary stores.
#[inline]
pub fn fence(store: Store) {
    #[cfg(target_arch = "x86_64")]
    if store == Store::Streaming {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = store;
}

/// How far ahead of its position a pass streaming its inputs from memory
/// asks for them (bytes; see [`prefetch`]).
///
/// One core of this machine kind keeps too few cache misses in flight for
/// two or three input streams: the hardware prefetcher alone left the
/// LayerNorm backward's gradient sums (`x` and `dy`, `[16384, 4096]` f32)
/// at 9 GB/s, stalled on every line. Measured on that pass, one thread,
/// medians of 15: no prefetch 77–81 ms, 1 KiB ahead 46–59, 2 KiB 45–51,
/// 4 KiB 53–55 ms. The row backward uses it (`normlab bench`, 2 threads,
/// alternating runs: LayerNorm/RMSNorm backward 1.26–1.94× faster on the
/// default suite's rows and on BERT, ViT and LLaMA prefill shapes). The
/// per-channel statistics and gradient sums measured mixed with it
/// (BatchNorm backward 0.78–1.12× on 56×56 maps and 0.73–0.92× on 28×28,
/// GroupNorm forward 1.02–1.54×; element-wise activations unchanged) and
/// do without.
pub const PREFETCH_AHEAD: usize = 2048;

/// Asks the cache for the lines of `data` [`PREFETCH_AHEAD`] bytes past
/// `data[at..at + n]`: called once per step of a loop streaming `data`, it
/// keeps the lines of the next steps on their way. Lines past the end of
/// `data` are not asked for: a caller whose next values follow in memory
/// (the next rows of a block) passes them as part of `data`, and no
/// bandwidth goes to lines no one will read.
#[inline(always)]
pub fn prefetch<T>(data: &[T], at: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let size = std::mem::size_of::<T>();
        let end = ((at + n) * size + PREFETCH_AHEAD).min(std::mem::size_of_val(data));
        let mut offset = at * size + PREFETCH_AHEAD;
        while offset < end {
            // SAFETY: SSE is part of the x86-64 baseline; a prefetch is a
            // hint that never faults (and the address lies within `data`).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    data.as_ptr().cast::<i8>().wrapping_add(offset),
                )
            };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, n);
}

/// Values of `out` before its first 16-byte boundary (all of them when it
/// is shorter), which streaming stores cannot write.
#[inline(always)]
pub fn unaligned_head<T>(out: &[MaybeUninit<T>]) -> usize {
    let size = std::mem::size_of::<T>().max(1);
    ((16 - (out.as_ptr() as usize) % 16) % 16 / size).min(out.len())
}

/// Largest block of values [`write`] narrows at once.
pub const MAX_BLOCK: usize = 512;

/// Narrows lane `values` into `out` (same length; the streaming path checks
/// it, the ordinary one writes the shorter of the two) and stores them: with
/// streaming stores, 16 bytes at a time, when `store` says so and `out` is
/// 16-byte aligned; the rest (and everything else) with ordinary ones.
/// Streaming stores are left unfenced ([`fence`] when done).
#[inline(always)]
pub fn write<T: Float, L: Isa>(out: &mut [MaybeUninit<T>], values: &[T::Lane], store: Store) {
    #[cfg(target_arch = "x86_64")]
    if store == Store::Streaming
        && (out.as_ptr() as usize).is_multiple_of(16)
        && values.len() <= MAX_BLOCK
        && out.len() == values.len()
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let mut narrowed = [MaybeUninit::<T>::uninit(); MAX_BLOCK];
        let narrowed = &mut narrowed[..values.len()];
        T::narrow::<L>(values, narrowed);
        let bytes = std::mem::size_of_val(narrowed);
        let (src, dst) = (narrowed.as_ptr() as *const u8, out.as_mut_ptr() as *mut u8);
        let mut at = 0;
        while at + 16 <= bytes {
            // SAFETY: `dst + at` is 16-byte aligned and 16 bytes are in bounds
            // of both buffers (same length in bytes); every byte of `src` up to
            // `bytes` was written by `narrow`. SSE2 is part of the x86-64 baseline.
            unsafe {
                let v = _mm_loadu_si128(src.add(at) as *const __m128i);
                _mm_stream_si128(dst.add(at) as *mut __m128i, v);
            }
            at += 16;
        }
        // The last values (fewer than 16 bytes) with ordinary stores.
        // SAFETY: the same ranges as above, below `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), bytes - at) };
        return;
    }
    let _ = store;
    T::narrow::<L>(values, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16-bit value nearest `v` (ties to the even bit pattern), by
    /// search over the type's finite magnitudes `0..inf_bits` (monotonic
    /// in their bits) with exact f64 comparisons: the midpoint of two
    /// neighbours is exact in f64. Past the largest finite value by half a
    /// unit or more: infinity (the largest value's pattern is odd).
    fn nearest_16(v: f64, value: impl Fn(u16) -> f64, inf_bits: u16) -> u16 {
        let sign = if v.is_sign_negative() { 0x8000 } else { 0 };
        let a = v.abs();
        // The largest magnitude at or below `a`.
        let (mut lo, mut hi) = (0u16, inf_bits - 1);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if value(mid) <= a {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let below = value(lo);
        let next = lo + 1;
        let above = if next == inf_bits {
            // One unit past the largest value (the unit of its binade).
            2.0 * value(lo) - value(lo - 1)
        } else {
            value(next)
        };
        let mid = (below + above) / 2.0;
        let bits = if a < mid || (a == mid && lo % 2 == 0) {
            lo
        } else {
            next
        };
        bits | sign
    }

    #[test]
    fn f64_to_16_bits_through_round_to_odd_rounds_correctly() {
        let bf16 = |b: u16| bf16_bits_to_f32(b) as f64;
        let f16 = |b: u16| f16_bits_to_f32(b) as f64;
        let check = |v: f64| {
            if v.is_nan() {
                let via = f64_to_f32_round_to_odd(v);
                assert!(bf16_bits_to_f32(f32_to_bf16_bits(via)).is_nan());
                assert!(f16_bits_to_f32(f32_to_f16_bits(via)).is_nan());
                return;
            }
            let via = f64_to_f32_round_to_odd(v);
            assert_eq!(
                f32_to_bf16_bits(via),
                nearest_16(v, bf16, 0x7f80),
                "bf16 of {v:e}"
            );
            assert_eq!(
                f32_to_f16_bits(via),
                nearest_16(v, f16, 0x7c00),
                "f16 of {v:e}"
            );
        };
        // Every 16-bit value, the midpoints between neighbours and the f64s
        // next to them: the ties that rounding to nearest twice gets wrong.
        let up = |x: f64| f64::from_bits(x.to_bits() + 1);
        let down = |x: f64| f64::from_bits(x.to_bits() - 1);
        for (value, inf) in [(&bf16 as &dyn Fn(u16) -> f64, 0x7f80u16), (&f16, 0x7c00)] {
            for bits in 0..inf {
                let (a, b) = (value(bits), value(bits + 1));
                let next = if bits + 1 == inf {
                    2.0 * a - value(bits - 1)
                } else {
                    b
                };
                let mid = (a + next) / 2.0;
                for v in [a, mid, up(mid), down(mid), up(a)] {
                    check(v);
                    check(-v);
                }
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            check(f64::from_bits(state));
            // Magnitudes where the 16-bit types live, 2⁻¹⁵⁰ to 2¹³⁰.
            let exponent = (state >> 52) % 280 + 1023 - 150;
            check(f64::from_bits(
                (state & 0x800f_ffff_ffff_ffff) | exponent << 52,
            ));
        }
        for v in [
            0.0,
            f64::INFINITY,
            f64::NAN,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            65504.0,
            65520.0,
            3.4e38,
        ] {
            check(v);
            check(-v);
        }
    }

    #[test]
    fn scalar_conversions_agree_with_half_on_every_bf16_and_f16() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            let w = f16_bits_to_f32(bits);
            assert!(w.to_bits() == h.to_f32().to_bits() || (w.is_nan() && h.is_nan()));
            if !h.is_nan() {
                assert_eq!(f32_to_f16_bits(w), bits);
            }
            let b = half::bf16::from_bits(bits);
            let wb = bf16_bits_to_f32(bits);
            // A NaN widens with its payload (half quiets signalling ones).
            assert!(wb.to_bits() == b.to_f32().to_bits() || (wb.is_nan() && b.is_nan()));
            if !b.is_nan() {
                assert_eq!(f32_to_bf16_bits(wb), bits);
            }
        }
        // Halfway cases and the neighbours of every rounding boundary.
        let mut state = 0x1234_5678u32;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let v = f32::from_bits(state);
            if v.is_nan() {
                continue;
            }
            assert_eq!(
                f32_to_f16_bits(v),
                half::f16::from_f32(v).to_bits(),
                "{v:e}"
            );
            assert_eq!(
                f32_to_bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn register_conversions_match_the_scalar_ones_on_every_pattern() {
        use crate::simd::{Avx2, Baseline};
        if crate::simd::detected() < crate::simd::SimdLevel::Avx2 {
            return;
        }
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for first in (0..=u16::MAX).step_by(8) {
            let bits: [u16; 8] = std::array::from_fn(|k| first + k as u16);
            let h = bits.map(half::f16::from_bits);
            let b = bits.map(half::bf16::from_bits);
            let (wh, wb) = (widen8_f16::<Avx2>(&h), widen8_bf16::<Avx2>(&b));
            let (sh, sb) = (widen8_f16::<Baseline>(&h), widen8_bf16::<Baseline>(&b));
            for k in 0..8 {
                assert!(same(wh[k], sh[k]) && same(wb[k], sb[k]), "{:#06x}", bits[k]);
            }
        }
        // Random f32 patterns, NaNs and infinities included, and the
        // halfway cases of both 16-bit types.
        let mut state = 0x2545_f491u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut previous = [0f32; 8];
        for round in 0..40_000 {
            let mut v: [f32; 8] = std::array::from_fn(|k| match (round + k) % 4 {
                0 => f32::from_bits(next()),
                1 => f32::from_bits((next() & 0xffff_0000) | 0x8000),
                2 => f32::from_bits((next() & 0xffff_e000) | 0x1000),
                _ => f32::from_bits(next() | 0x7f80_0000),
            });
            // One vector in three with a subnormal or zero lane (which
            // `vcvtneps2bf16` alone would flush).
            if round % 3 == 0 {
                v[round % 8] = f32::from_bits(next() & 0x807f_ffff);
            }
            let nh = narrow8_f16::<Avx2>(v).map(half::f16::to_bits);
            let nb = narrow8_bf16::<Avx2>(v).map(half::bf16::to_bits);
            if crate::simd::detected() == crate::simd::SimdLevel::Avx512 {
                use crate::simd::Avx512;
                assert_eq!(narrow8_f16::<Avx512>(v).map(half::f16::to_bits), nh);
                assert_eq!(
                    narrow8_bf16::<Avx512>(v).map(half::bf16::to_bits),
                    nb,
                    "{v:?}"
                );
                // Sixteen lanes: this vector and the one before.
                let v16 = crate::float::join16(v, previous);
                let b16 = narrow16_bf16::<Avx512>(v16).map(half::bf16::to_bits);
                let h16 = narrow16_f16::<Avx512>(v16).map(half::f16::to_bits);
                let base_b = narrow16_bf16::<Baseline>(v16).map(half::bf16::to_bits);
                let base_h = narrow16_f16::<Baseline>(v16).map(half::f16::to_bits);
                assert_eq!((b16, h16), (base_b, base_h), "{v16:?}");
                let (wb, wh) = (
                    b16.map(half::bf16::from_bits),
                    h16.map(half::f16::from_bits),
                );
                let (w1, w2) = (widen16_bf16::<Avx512>(&wb), widen16_f16::<Avx512>(&wh));
                let (s1, s2) = (widen16_bf16::<Baseline>(&wb), widen16_f16::<Baseline>(&wh));
                for k in 0..16 {
                    assert!(same(w1[k], s1[k]) && same(w2[k], s2[k]), "{:#06x}", b16[k]);
                }
            }
            previous = v;
            assert_eq!(
                nh,
                narrow8_f16::<Baseline>(v).map(half::f16::to_bits),
                "{v:?}"
            );
            assert_eq!(
                nb,
                narrow8_bf16::<Baseline>(v).map(half::bf16::to_bits),
                "{v:?}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lane_widening_matches_the_scalar_one_on_every_pattern() {
        use crate::simd::{Avx512, Baseline};
        if crate::simd::detected() < crate::simd::SimdLevel::Avx512 {
            return;
        }
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for first in (0..=u16::MAX).step_by(16) {
            let bits: [u16; 16] = std::array::from_fn(|k| first + k as u16);
            let (h, b) = (
                bits.map(half::f16::from_bits),
                bits.map(half::bf16::from_bits),
            );
            let (wh, wb) = (widen16_f16::<Avx512>(&h), widen16_bf16::<Avx512>(&b));
            let (sh, sb) = (widen16_f16::<Baseline>(&h), widen16_bf16::<Baseline>(&b));
            for k in 0..16 {
                assert!(same(wh[k], sh[k]) && same(wb[k], sb[k]), "{:#06x}", bits[k]);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16c_and_scalar_conversions_give_the_same_bits() {
        if !is_x86_feature_detected!("f16c") {
            return;
        }
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut hw = vec![0f32; all.len()];
        // SAFETY: F16C checked above.
        unsafe { widen_f16_f16c(&all, &mut hw) };
        for (h, w) in all.iter().zip(&hw) {
            let s = f16_bits_to_f32(h.to_bits());
            assert!(s.to_bits() == w.to_bits() || (s.is_nan() && w.is_nan()));
        }
        let mut state = 0x9e37_79b9u32;
        let values: Vec<f32> = (0..100_003)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                f32::from_bits(state)
            })
            .collect();
        let mut narrowed = vec![MaybeUninit::<half::f16>::uninit(); values.len()];
        // SAFETY: F16C checked above.
        unsafe { narrow_f16_f16c(&values, &mut narrowed) };
        for (v, n) in values.iter().zip(&narrowed) {
            // SAFETY: every slot was written.
            let n = unsafe { n.assume_init() };
            assert_eq!(n.to_bits(), f32_to_f16_bits(*v), "{v:e}");
        }
    }
}
