//! Stable mean and variance: one algorithm for every kernel.
//!
//! A [`Moments`] holds `(count, mean, m2)` where `m2 = Σ(x - mean)²`. A run of
//! values is summarized chunk by chunk, in the compute lanes of its element
//! type, by sums centred on a shift near the chunk's mean (an exact two-pass
//! where a cheap guess of the shift is not good enough, see
//! [`Moments::of_chunk`]), and chunks are combined with Chan's formula:
//!
//! ```text
//! n = n_a + n_b   δ = mean_b - mean_a
//! mean = mean_a + δ·n_b/n
//! m2   = m2_a + m2_b + δ²·n_a·n_b/n
//! ```
//!
//! The same merge combines threads and ranks (SyncBatchNorm). The textbook
//! shortcut `E[x²] - E[x]²` cancels catastrophically when |mean| ≫ std and is
//! never used.

use crate::float::{Float, Lane};
use crate::simd::sums;

/// Leading values whose mean is the first guess of a chunk's shift.
pub(crate) const SHIFT_SAMPLE: usize = 16;

/// Values per chunk of the two-pass: small enough to stay in L1 between passes.
pub const CHUNK: usize = 2048;

/// Count, mean and sum of squared deviations of a set of values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Moments {
    /// Number of values.
    pub count: f64,
    /// Their mean (0 when empty).
    pub mean: f64,
    /// `Σ(x - mean)²`.
    pub m2: f64,
}

impl Moments {
    /// No values.
    pub const EMPTY: Moments = Moments {
        count: 0.0,
        mean: 0.0,
        m2: 0.0,
    };

    /// Adds one value (Welford's update).
    ///
    /// ```
    /// let mut m = normlab::Moments::EMPTY;
    /// for x in [1.0, 2.0, 3.0, 4.0] { m.push(x); }
    /// assert_eq!((m.mean, m.var(0)), (2.5, 1.25));
    /// ```
    #[inline]
    pub fn push(&mut self, x: f64) {
        self.count += 1.0;
        let delta = x - self.mean;
        self.mean += delta / self.count;
        self.m2 += delta * (x - self.mean);
    }

    /// Combines two disjoint sets (Chan et al.). Either may be empty.
    #[inline]
    pub fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }

    /// Variance with `ddof` degrees of freedom removed: `m2 / (count - ddof)`.
    /// `ddof = 0` is the biased (population) variance used to normalize,
    /// `ddof = 1` the unbiased one PyTorch keeps in `running_var`.
    /// NaN when `count <= ddof`.
    pub fn var(&self, ddof: u32) -> f64 {
        let denom = self.count - ddof as f64;
        if denom > 0.0 {
            self.m2 / denom
        } else {
            f64::NAN
        }
    }

    /// Moments of a slice, chunk by chunk of [`CHUNK`] values, chunks merged.
    pub fn of_slice<T: Float>(xs: &[T]) -> Moments {
        xs.chunks(CHUNK).fold(Moments::EMPTY, |acc, chunk| {
            acc.merge(Self::of_chunk(chunk))
        })
    }

    /// Moments of one chunk in the compute lanes of `T`, by sums centred on
    /// a shift `s` near the mean: `d = x - s` is exact when |μ| ≫ σ; `Σd`,
    /// `Σd²` are summed in lanes (16 terms at most in the lane type) and in
    /// f64 across segments;
    /// `mean = s + Σd/n`, `m2 = Σd² - (Σd)²/n`.
    ///
    /// The shift is first the mean of the chunk's first values, which is one
    /// pass; when that lands more than a standard deviation from the mean
    /// (so that `m2` would cancel), or when squares would overflow or
    /// underflow the lanes, the chunk is redone as a proper two-pass: a lane
    /// sum for the shift, then the centred sums, or an f64 two-pass for
    /// magnitudes outside the lanes' safe range.
    pub(crate) fn of_chunk<T: Float>(chunk: &[T]) -> Moments {
        if chunk.is_empty() {
            return Moments::EMPTY;
        }
        let guess = Self::shift_guess(chunk);
        Self::of_chunk_from(chunk, guess, sums::centred_sums(chunk, guess))
    }

    /// The first shift of [`Self::of_chunk`]: the mean of the leading values.
    pub(crate) fn shift_guess<T: Float>(chunk: &[T]) -> T::Lane {
        let head = &chunk[..chunk.len().min(SHIFT_SAMPLE)];
        T::Lane::of(head.iter().map(|v| v.to_f64()).sum::<f64>() / head.len().max(1) as f64)
    }

    /// [`Self::of_chunk`] from the centred sums `(Σ(x - guess), Σ(x - guess)²)`
    /// of `chunk`, computed by the caller (with [`sums::centred_sums`], or
    /// fused with other work): accepted when safe, otherwise redone as
    /// described there.
    pub(crate) fn of_chunk_from<T: Float>(
        chunk: &[T],
        guess: T::Lane,
        (s1, s2): (f64, f64),
    ) -> Moments {
        if chunk.is_empty() {
            return Moments::EMPTY;
        }
        let count = chunk.len() as f64;
        if let Some(quick) = Self::from_centred_sums_checked(count, guess, s1, s2) {
            return quick;
        }
        let (sum, max_abs) = sums::sum_and_max_abs(chunk);
        let (low, high) = T::Lane::SAFE_RANGE;
        if !(low..=high).contains(&max_abs) {
            return Self::two_pass(chunk);
        }
        let shift = T::Lane::of(sum / count);
        let (s1, s2) = sums::centred_sums(chunk, shift);
        Moments::from_centred_sums(count, shift.wide(), s1, s2)
    }

    /// [`Self::from_centred_sums`] when the result is accurate: the sums
    /// are finite and above the lanes' underflow range, and the shift lies
    /// within a standard deviation of the mean (then `s1²/n ≤ m2`, and `m2`
    /// loses at most about one bit to the subtraction). `None` otherwise: the
    /// caller redoes the values with a better shift or in f64.
    pub(crate) fn from_centred_sums_checked<C: Lane>(
        count: f64,
        shift: C,
        s1: f64,
        s2: f64,
    ) -> Option<Moments> {
        let m = Moments::from_centred_sums(count, shift.wide(), s1, s2);
        let (low, _) = C::SAFE_RANGE;
        let off = m.mean - shift.wide();
        let safe = m.m2.is_finite() && m.m2 > count * low * low;
        (safe && off * off * count <= m.m2).then_some(m)
    }

    /// Moments of `count` values from their sums centred on `shift`,
    /// `s1 = Σ(x - shift)`, `s2 = Σ(x - shift)²`: `mean = shift + s1/n`,
    /// `m2 = s2 - s1²/n`, accurate when the shift is within a few standard
    /// deviations of the mean (the callers make sure of it).
    #[inline]
    pub(crate) fn from_centred_sums(count: f64, shift: f64, s1: f64, s2: f64) -> Moments {
        let m2 = s2 - s1 * s1 / count;
        Moments {
            count,
            mean: shift + s1 / count,
            // Rounding can leave a tiny negative m2; a NaN stays NaN.
            m2: if m2 < 0.0 { 0.0 } else { m2 },
        }
    }

    /// Two-pass in f64 over one chunk (values outside the lanes' safe range).
    fn two_pass<T: Float>(chunk: &[T]) -> Moments {
        let count = chunk.len() as f64;
        let mean = chunk.iter().map(|x| x.to_f64()).sum::<f64>() / count;
        let m2 = chunk
            .iter()
            .map(|x| {
                let d = x.to_f64() - mean;
                d * d
            })
            .sum::<f64>();
        Moments { count, mean, m2 }
    }
}

/// `Σx²` of a slice in f64 (RMSNorm's statistic; no cancellation, so one pass).
pub fn sum_of_squares<T: Float>(xs: &[T]) -> f64 {
    sums::sum_squares(xs)
}

/// Moments of several disjoint slices combined (e.g. one channel across the batch).
pub fn moments_of_slices<'a, T: Float>(slices: impl IntoIterator<Item = &'a [T]>) -> Moments {
    slices
        .into_iter()
        .fold(Moments::EMPTY, |acc, s| acc.merge(Moments::of_slice(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_matches_direct_two_pass() {
        let xs: Vec<f64> = (0..5000)
            .map(|i| 1e6 + ((i * 37) % 101) as f64 * 0.01)
            .collect();
        let all = Moments::of_slice(&xs);
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let m2: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
        assert!((all.mean - mean).abs() < 1e-9);
        assert!((all.m2 - m2).abs() / m2 < 1e-9);
        let (a, b) = xs.split_at(1234);
        let merged = Moments::of_slice(a).merge(Moments::of_slice(b));
        assert!((merged.m2 - m2).abs() / m2 < 1e-9);
    }

    #[test]
    fn empty_is_identity_and_var_needs_enough_values() {
        let m = Moments::of_slice(&[3.0f32]);
        assert_eq!(m.merge(Moments::EMPTY), m);
        assert_eq!(Moments::EMPTY.merge(m), m);
        assert_eq!(m.var(0), 0.0);
        assert!(m.var(1).is_nan());
    }
}
