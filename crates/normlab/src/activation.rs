//! Activations that a normalization can apply to its output in the same
//! pass ([`Activation`]), with their f64 definitions.
//!
//! A normalization followed by an activation, `y = φ(z)` with
//! `z = x̂·γ + β`, is one pass forward when fused: forward writes `y`
//! straight from the registers that hold `z` (the unfused pair stores `z`
//! and reads it back for the activation). Backward, ReLU recomputes `z` from
//! `x`, the saved statistics, γ and β in both of its passes, so that
//! `dz = [z > 0]·dy` never goes through memory (the unfused pair stores
//! `dz` and reads it twice). Tanh and sigmoid in f32 and f64 take `φ'` from
//! the output `y` in one pass that writes `dz`, then the normalization's
//! backward (see [`Activation::derivative_from_output`]).

/// The activation after a fused normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(z, 0)`; NaN stays NaN. Its gradient is `dy` where `z > 0` or
    /// `z` is NaN and 0 elsewhere (at 0 too), as PyTorch's `relu`.
    Relu,
    /// `tanh(z)`, gradient `dy·(1 - y²)`.
    Tanh,
    /// `σ(z) = 1/(1 + e^-z)`, gradient `dy·(1 - y)·y`.
    Sigmoid,
}

impl Activation {
    /// Every activation.
    pub const ALL: [Activation; 3] = [Activation::Relu, Activation::Tanh, Activation::Sigmoid];

    /// Lower-case name (`relu`, `tanh`, `sigmoid`), as PyTorch's functions.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
        }
    }

    /// Reads a name written by [`Self::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether the fused backward takes `φ'` from the forward's output `y`
    /// (tanh: `1 - y²`, sigmoid: `(1 - y)·y`, as PyTorch's backward) rather
    /// than recomputing it from `x`, in f32 and f64. ReLU's mask is
    /// recomputed: a compare. Recomputing tanh or σ costs an exponential a
    /// value in each of the backward's two passes, which reading `y` once
    /// does not. In bf16 and f16 they are recomputed too: the stored `y` is
    /// too coarse for `1 - y²` to keep the gradients within one unit.
    pub fn derivative_from_output(self) -> bool {
        !matches!(self, Activation::Relu)
    }

    /// `φ(z)` in f64.
    pub fn apply(self, z: f64) -> f64 {
        match self {
            Activation::Relu => relu(z),
            Activation::Tanh => z.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-z).exp()),
        }
    }

    /// `φ'(z)` in f64 (ReLU's is 0 at 0 and 1 at NaN, as its gradient above).
    pub fn derivative(self, z: f64) -> f64 {
        match self {
            Activation::Relu => {
                if z <= 0.0 {
                    0.0
                } else {
                    1.0
                }
            }
            Activation::Tanh => 1.0 - z.tanh().powi(2),
            Activation::Sigmoid => {
                let s = self.apply(z);
                (1.0 - s) * s
            }
        }
    }

    /// `dz = φ'(z)·dy` in f64. ReLU selects rather than multiplies, as
    /// PyTorch's `threshold_backward` and the vector kernels do: where its
    /// mask is closed `dz` is 0 even for an infinite or NaN `dy` (`0·∞`
    /// would be NaN).
    pub fn grad(self, z: f64, dy: f64) -> f64 {
        match self {
            Activation::Relu if z <= 0.0 => 0.0,
            Activation::Relu => dy,
            _ => self.derivative(z) * dy,
        }
    }
}

/// `max(z, 0)` as PyTorch's `clamp_min`: NaN and -0 pass through
/// (`f64::max` would drop the NaN).
#[inline(always)]
pub(crate) fn relu<C: PartialOrd + Copy + Default>(z: C) -> C {
    if z < C::default() {
        C::default()
    } else {
        z
    }
}

/// `1.5·2^52`: adding it rounds to an integer held in the low bits.
const SHIFTER: f64 = 6_755_399_441_055_744.0;
/// `ln 2` in two parts (the fdlibm split): `HI` has 21 trailing zero bits.
const LN2_HI: f64 = 0.693_147_180_369_123_8; // 0x3FE62E42FEE00000
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10; // 0x3DEA39EF35793C76
/// `1/k!` for k = 11 down to 2.
const INV_FACTORIALS: [f64; 10] = [
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
];

/// `e^x` for f32 results, computed in f64: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2` (Cody–Waite: `n·ln2` in two parts, the first exact for
/// `|n| < 2^21`), `e^r` by its Taylor series to `r^11/11!` (truncation below
/// 7e-15 relative), and `2^n` built in the exponent bits. Branch-free, so
/// that eight lanes compile to vector instructions; the same operations at
/// every SIMD level give the same bits. `x` is clamped to ±708 (where `2^n`
/// still fits the exponent); NaN stays NaN.
#[inline(always)]
fn exp_for_f32(x: f64) -> f64 {
    let x = x.clamp(-708.0, 708.0);
    let t = x * std::f64::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = INV_FACTORIALS[0];
    for c in &INV_FACTORIALS[1..] {
        p = p * r + c;
    }
    p = (p * r + 1.0) * r + 1.0;
    // `t`'s low bits hold n (two's complement); `(n + 1023) << 52` is 2^n
    // for n in [-1022, 1023], and the constant's own bits shift out.
    let two_n = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    p * two_n
}

/// Below this `|z|`, `tanh(z) = z - z³/3` to f64 precision of the f32 result.
const TANH_SMALL: f64 = 1.0 / 1024.0;
/// Beyond this `|z|`, `tanh(z)` rounds to ±1 in f32 (and in f64 to within 1e-17).
const TANH_CLAMP: f64 = 20.0;

/// `tanh(z)` for f32 lanes: computed in f64 as `1 - 2/(e^{2|z|} + 1)` with
/// the sign of z (absolute error about 1e-16, under 1e-8 of the result for
/// `|z| ≥ 2^-10`), `z - z³/3` below that (the next term is under 1e-12 of
/// the result), ±1 beyond `|z| = 20`; rounded once to f32.
#[inline(always)]
pub(crate) fn tanh_f32(z: f32) -> f32 {
    let z = z as f64;
    let a = z.abs().min(TANH_CLAMP);
    let big = 1.0 - 2.0 / (exp_for_f32(2.0 * a) + 1.0);
    let small = a - a * a * a * (1.0 / 3.0);
    let t = if a < TANH_SMALL { small } else { big };
    // NaN: `a` became 20 through `min`; give the NaN back.
    (if z.is_nan() { z } else { t.copysign(z) }) as f32
}

/// `σ(z) = 1/(1 + e^-z)` for f32 lanes, in f64 (relative error about
/// 1e-15 before the one rounding to f32).
#[inline(always)]
pub(crate) fn sigmoid_f32(z: f32) -> f32 {
    let z = z as f64;
    // NaN: the input itself, as the AVX2 form blends it back (`-z` would
    // flip its sign bit).
    (if z.is_nan() {
        z
    } else {
        1.0 / (1.0 + exp_for_f32(-z))
    }) as f32
}

/// The same operations as [`tanh_f32`] and [`sigmoid_f32`], four f64 lanes
/// at a time in AVX2 registers (LLVM does not vectorize the scalar forms:
/// the bit manipulation of `2^n` and the selects stay scalar, 20 ns a
/// value). Each step is the scalar one's IEEE operation, so the bits agree.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use super::{INV_FACTORIALS, LN2_HI, LN2_LO, SHIFTER, TANH_CLAMP, TANH_SMALL};
    use std::arch::x86_64::*;
    use std::mem::transmute;

    /// [`super::exp_for_f32`] on four lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn exp4(x: __m256d) -> __m256d {
        // `clamp`: NaN lanes give any number here; callers put the NaN back.
        let x = _mm256_min_pd(
            _mm256_max_pd(x, _mm256_set1_pd(-708.0)),
            _mm256_set1_pd(708.0),
        );
        let shifter = _mm256_set1_pd(SHIFTER);
        let t = _mm256_add_pd(
            _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
            shifter,
        );
        let n = _mm256_sub_pd(t, shifter);
        let r = _mm256_sub_pd(
            _mm256_sub_pd(x, _mm256_mul_pd(n, _mm256_set1_pd(LN2_HI))),
            _mm256_mul_pd(n, _mm256_set1_pd(LN2_LO)),
        );
        let mut p = _mm256_set1_pd(INV_FACTORIALS[0]);
        for &c in &INV_FACTORIALS[1..] {
            p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(c));
        }
        let one = _mm256_set1_pd(1.0);
        p = _mm256_add_pd(
            _mm256_mul_pd(_mm256_add_pd(_mm256_mul_pd(p, r), one), r),
            one,
        );
        let bits = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023));
        let two_n = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(bits));
        _mm256_mul_pd(p, two_n)
    }

    /// [`super::tanh_f32`] on four f64 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tanh4(z: __m256d) -> __m256d {
        let sign = _mm256_set1_pd(-0.0);
        let a = _mm256_min_pd(_mm256_andnot_pd(sign, z), _mm256_set1_pd(TANH_CLAMP));
        let (one, two) = (_mm256_set1_pd(1.0), _mm256_set1_pd(2.0));
        // SAFETY: this function's contract (AVX2).
        let e = unsafe { exp4(_mm256_mul_pd(two, a)) };
        let big = _mm256_sub_pd(one, _mm256_div_pd(two, _mm256_add_pd(e, one)));
        let cube = _mm256_mul_pd(
            _mm256_mul_pd(_mm256_mul_pd(a, a), a),
            _mm256_set1_pd(1.0 / 3.0),
        );
        let small = _mm256_sub_pd(a, cube);
        let is_small = _mm256_cmp_pd::<_CMP_LT_OQ>(a, _mm256_set1_pd(TANH_SMALL));
        let t = _mm256_blendv_pd(big, small, is_small);
        let signed = _mm256_or_pd(t, _mm256_and_pd(sign, z));
        _mm256_blendv_pd(signed, z, _mm256_cmp_pd::<_CMP_UNORD_Q>(z, z))
    }

    /// [`super::sigmoid_f32`] on four f64 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn sigmoid4(z: __m256d) -> __m256d {
        let one = _mm256_set1_pd(1.0);
        // SAFETY: this function's contract (AVX2).
        let e = unsafe { exp4(_mm256_sub_pd(_mm256_setzero_pd(), z)) };
        let s = _mm256_div_pd(one, _mm256_add_pd(one, e));
        _mm256_blendv_pd(s, z, _mm256_cmp_pd::<_CMP_UNORD_Q>(z, z))
    }

    /// `$f` on both halves of eight f32 lanes, widened to f64 and rounded back.
    macro_rules! halves {
        ($v:expr, $f:ident) => {{
            // SAFETY: `[f32; 8]` and `__m256` have the same size and every
            // bit pattern is valid in both; the CPU has AVX2 (the caller's
            // contract).
            unsafe {
                let v = transmute::<[f32; 8], __m256>($v);
                let lo = $f(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
                let hi = $f(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)));
                let out = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
                transmute::<__m256, [f32; 8]>(out)
            }
        }};
    }

    /// `tanh` of eight f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn tanh_f32(v: [f32; 8]) -> [f32; 8] {
        halves!(v, tanh4)
    }

    /// `σ` of eight f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn sigmoid_f32(v: [f32; 8]) -> [f32; 8] {
        halves!(v, sigmoid4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in f32 units in the last place.
    fn ulps(a: f32, b: f32) -> i64 {
        let key = |v: f32| {
            let bits = v.to_bits() as i32 as i64;
            if bits < 0 {
                i32::MIN as i64 - bits
            } else {
                bits
            }
        };
        (key(a) - key(b)).abs()
    }

    #[test]
    fn f32_lanes_round_the_f64_values_correctly_or_within_one_unit() {
        let mut worst = (0, 0);
        let mut z = -30.0f32;
        while z < 30.0 {
            for v in [z, z * 1e-3, z * 1e-6] {
                let tanh = tanh_f32(v);
                let sigmoid = sigmoid_f32(v);
                worst.0 = worst.0.max(ulps(tanh, (v as f64).tanh() as f32));
                let s = Activation::Sigmoid.apply(v as f64) as f32;
                worst.1 = worst.1.max(ulps(sigmoid, s));
            }
            z += 0.000_731;
        }
        assert!(worst.0 <= 1 && worst.1 <= 1, "{worst:?}");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_lanes_give_the_scalar_bits() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut z = -40.0f32;
        while z < 40.0 {
            let v: [f32; 8] =
                std::array::from_fn(|k| z * [1.0, 1e-3, 1e-6, -1.0, 0.5, 3.0, -1e-4, 7.0][k]);
            // SAFETY: AVX2 was detected.
            let (t, s) = unsafe { (avx::tanh_f32(v), avx::sigmoid_f32(v)) };
            for k in 0..8 {
                assert_eq!(t[k].to_bits(), tanh_f32(v[k]).to_bits(), "tanh({})", v[k]);
                assert_eq!(
                    s[k].to_bits(),
                    sigmoid_f32(v[k]).to_bits(),
                    "sigmoid({})",
                    v[k]
                );
            }
            z += 0.0137;
        }
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-30,
            -1e30,
            88.0,
        ];
        // SAFETY: AVX2 was detected.
        let (t, s) = unsafe { (avx::tanh_f32(special), avx::sigmoid_f32(special)) };
        for k in 0..8 {
            let (want_t, want_s) = (tanh_f32(special[k]), sigmoid_f32(special[k]));
            assert!(t[k].to_bits() == want_t.to_bits() || (t[k].is_nan() && want_t.is_nan()));
            assert!(s[k].to_bits() == want_s.to_bits() || (s[k].is_nan() && want_s.is_nan()));
        }
    }

    #[test]
    fn special_values() {
        assert!(tanh_f32(f32::NAN).is_nan() && sigmoid_f32(f32::NAN).is_nan());
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(sigmoid_f32(f32::INFINITY), 1.0);
        assert_eq!(sigmoid_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid_f32(-1000.0), 0.0);
        assert_eq!(tanh_f32(0.0), 0.0);
        assert!(tanh_f32(-0.0).is_sign_negative());
        assert_eq!(tanh_f32(1e-30), 1e-30);
        assert!(relu(f64::NAN).is_nan());
        assert_eq!(relu(-2.0f32), 0.0);
        assert_eq!(Activation::Relu.derivative(0.0), 0.0);
        assert_eq!(Activation::Relu.derivative(f64::NAN), 1.0);
        assert_eq!(Activation::Relu.grad(-1.0, f64::INFINITY), 0.0);
        assert_eq!(Activation::Relu.grad(2.0, f64::INFINITY), f64::INFINITY);
        assert_eq!(Activation::Tanh.grad(0.0, 3.0), 3.0);
        for a in Activation::ALL {
            assert_eq!(Activation::from_name(a.name()), Some(a));
        }
    }
}
