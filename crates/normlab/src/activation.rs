//! Activations that a normalization can apply to its output in the same
//! pass ([`Activation`]), with their f64 definitions.
//!
//! A normalization followed by an activation, `y = φ(z)` with
//! `z = x̂·γ + β`, is one pass forward and one backward when fused: forward
//! writes `y` straight from the registers that hold `z`, and backward
//! recomputes `z` from `x`, the saved statistics, γ and β, so that
//! `dz = φ'(z)·dy` never goes through memory (the unfused pair stores `z`,
//! reads it back for the activation, stores `dz` and reads it again).

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
}

/// `max(z, 0)`, NaN kept (`f64::max` would drop it).
#[inline(always)]
pub(crate) fn relu<C: PartialOrd + Copy + Default>(z: C) -> C {
    // `!(z <= 0)` is true for NaN: the NaN passes, as in PyTorch.
    if z <= C::default() {
        C::default()
    } else {
        z
    }
}

/// `e^x` for f32 results, computed in f64: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2` (Cody–Waite: `n·ln2` in two parts, the first exact for
/// `|n| < 2^21`), `e^r` by its Taylor series to `r^11/11!` (truncation below
/// 7e-15 relative), and `2^n` built in the exponent bits. Branch-free, so
/// that eight lanes compile to vector instructions; the same operations at
/// every SIMD level give the same bits. `x` is clamped to ±708 (where `2^n`
/// still fits the exponent); NaN stays NaN.
#[inline(always)]
fn exp_for_f32(x: f64) -> f64 {
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

/// `tanh(z)` for f32 lanes: computed in f64 as `1 - 2/(e^{2|z|} + 1)` with
/// the sign of z (absolute error about 1e-16, under 1e-8 of the result for
/// `|z| ≥ 2^-10`), `z - z³/3` below that (the next term is under 1e-12 of
/// the result), ±1 beyond `|z| = 20`; rounded once to f32.
#[inline(always)]
pub(crate) fn tanh_f32(z: f32) -> f32 {
    let z = z as f64;
    let a = z.abs().min(20.0);
    let big = 1.0 - 2.0 / (exp_for_f32(2.0 * a) + 1.0);
    let small = a - a * a * a * (1.0 / 3.0);
    let t = if a < 1.0 / 1024.0 { small } else { big };
    // NaN: `a` became 20 through `min`; give the NaN back.
    (if z.is_nan() { z } else { t.copysign(z) }) as f32
}

/// `σ(z) = 1/(1 + e^-z)` for f32 lanes, in f64 (relative error about
/// 1e-15 before the one rounding to f32).
#[inline(always)]
pub(crate) fn sigmoid_f32(z: f32) -> f32 {
    let z = z as f64;
    (1.0 / (1.0 + exp_for_f32(-z))) as f32
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
        for a in Activation::ALL {
            assert_eq!(Activation::from_name(a.name()), Some(a));
        }
    }
}
