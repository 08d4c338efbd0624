//! Local Response Normalization across channels: window sums of squares,
//! the power `(k + a·S)^(-β)` in closed form, and the backward's terms.

use std::mem::MaybeUninit;

use super::convert::{self, Store};
use crate::float::{Float, Lane};
use crate::simd::simd_fn;

/// `s^(-β)` for the β values with a closed form in square roots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NegPow {
    /// β = 0.5: `1/√s`.
    Half,
    /// β = 0.75: `1/√s · √(1/√s)`.
    ThreeQuarters,
    /// β = 1: `1/s`.
    One,
}

impl NegPow {
    /// The closed form for `beta`, when there is one.
    pub fn of(beta: f64) -> Option<Self> {
        if beta == 0.5 {
            Some(Self::Half)
        } else if beta == 0.75 {
            Some(Self::ThreeQuarters)
        } else if beta == 1.0 {
            Some(Self::One)
        } else {
            None
        }
    }
}

/// `b^(-1/2)`.
#[inline(always)]
fn pow_half<C: Lane>(b: C) -> C {
    C::ONE / b.sqrt()
}

/// `b^(-3/4) = r·√r` with `r = b^(-1/2)`.
#[inline(always)]
fn pow_three_quarters<C: Lane>(b: C) -> C {
    let r = C::ONE / b.sqrt();
    r * r.sqrt()
}

/// `b^(-1)`.
#[inline(always)]
fn pow_one<C: Lane>(b: C) -> C {
    C::ONE / b
}

/// Runs `$body` with `$f` bound to the function for `$pow`: the choice is
/// made once, outside the loop, so that each loop vectorizes.
macro_rules! with_neg_pow {
    ($pow:expr, $f:ident, $body:block) => {
        match $pow {
            NegPow::Half => {
                let $f = pow_half;
                $body
            }
            NegPow::ThreeQuarters => {
                let $f = pow_three_quarters;
                $body
            }
            NegPow::One => {
                let $f = pow_one;
                $body
            }
        }
    };
}

/// Spatial positions per block of the fused forward: the window's partial
/// sums stay in L1 while its rows stream through.
const LRN_BLOCK: usize = 128;

simd_fn! {
    /// Forward of one channel of one sample `x` (`[C, s]` row-major):
    /// `y = x_c·(k + a·Σ_{j=lo}^{hi} x_j²)^(-β)`, block by block, so each
    /// window row is read straight from `x` (in cache: its neighbours just
    /// used it) and no separate sum pass over memory is needed. The sum runs
    /// from `lo` up, the same order in every path.
    pub fn forward_channel<T: Float>[L](x: &[T], s: usize, c: usize, lo: usize, hi: usize, y: &mut [MaybeUninit<T>], k: T::Lane, a: T::Lane, pow: NegPow, store: Store) {
        with_neg_pow!(pow, neg_pow, {
            let mut block = [<T::Lane as Lane>::ZERO; LRN_BLOCK];
            let mut buf = [<T::Lane as Lane>::ZERO; LRN_BLOCK];
            for (b, out) in y.chunks_mut(LRN_BLOCK).enumerate() {
                let (t0, len) = (b * LRN_BLOCK, out.len());
                let sum = &mut block[..len];
                let first = T::lanes::<L>(&x[lo * s + t0..][..len], &mut buf);
                for (o, &v) in sum.iter_mut().zip(first) {
                    *o = v * v;
                }
                for j in lo + 1..=hi {
                    let row = T::lanes::<L>(&x[j * s + t0..][..len], &mut buf);
                    for (o, &v) in sum.iter_mut().zip(row) {
                        *o += v * v;
                    }
                }
                let xc = T::lanes::<L>(&x[c * s + t0..][..len], &mut buf);
                for (sv, &xv) in sum.iter_mut().zip(xc) {
                    *sv = xv * neg_pow(k + a * *sv);
                }
                convert::write::<T, L>(out, sum, store);
            }
            convert::fence(store);
        });
    }
}

simd_fn! {
    /// `acc += x²` element-wise (the backward's window sums).
    pub fn add_squares<T: Float>[L](acc: &mut [T::Lane], x: &[T]) {
        let mut buf = [<T::Lane as Lane>::ZERO; LRN_BLOCK];
        for (a, xs) in acc.chunks_mut(LRN_BLOCK).zip(x.chunks(LRN_BLOCK)) {
            let xs = T::lanes::<L>(xs, &mut buf);
            for (a, &v) in a.iter_mut().zip(xs) {
                *a += v * v;
            }
        }
    }
}

simd_fn! {
    /// `acc += x` element-wise.
    pub fn add_assign<T: Float>[L](acc: &mut [T::Lane], x: &[T::Lane]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
}

simd_fn! {
    /// Backward, first step on one channel row: from the window sums in
    /// `sum`, writes `scale = base^(-β)` into `scale` and
    /// `t = dy·x·base^(-β-1)` into `sum`.
    pub fn grad_terms<T: Float>[L](x: &[T], dy: &[T], sum: &mut [T::Lane], scale: &mut [T::Lane], k: T::Lane, a: T::Lane, pow: NegPow) {
        with_neg_pow!(pow, neg_pow, {
            let (mut xb, mut db) = ([<T::Lane as Lane>::ZERO; LRN_BLOCK], [<T::Lane as Lane>::ZERO; LRN_BLOCK]);
            let blocks = sum.chunks_mut(LRN_BLOCK).zip(scale.chunks_mut(LRN_BLOCK));
            for ((sums, scales), (xs, ds)) in blocks.zip(x.chunks(LRN_BLOCK).zip(dy.chunks(LRN_BLOCK))) {
                let xs = T::lanes::<L>(xs, &mut xb);
                let ds = T::lanes::<L>(ds, &mut db);
                for (((s, r_out), &xv), &d) in sums.iter_mut().zip(scales.iter_mut()).zip(xs).zip(ds) {
                    let base = k + a * *s;
                    let r = neg_pow(base);
                    *r_out = r;
                    *s = d * xv * (r / base);
                }
            }
        });
    }
}

simd_fn! {
    /// Backward, last step: `dx = dy·scale - coef·x·gathered`.
    pub fn input_grad<T: Float>[L](x: &[T], dy: &[T], scale: &[T::Lane], gathered: &[T::Lane], coef: T::Lane, dx: &mut [MaybeUninit<T>], store: Store) {
        let (mut xb, mut db) = ([<T::Lane as Lane>::ZERO; LRN_BLOCK], [<T::Lane as Lane>::ZERO; LRN_BLOCK]);
        let mut values = [<T::Lane as Lane>::ZERO; LRN_BLOCK];
        for (i, out) in dx[..x.len()].chunks_mut(LRN_BLOCK).enumerate() {
            let (at, n) = (i * LRN_BLOCK, out.len());
            let xs = T::lanes::<L>(&x[at..at + n], &mut xb);
            let ds = T::lanes::<L>(&dy[at..at + n], &mut db);
            let values = &mut values[..n];
            let inputs = xs.iter().zip(ds).zip(&scale[at..at + n]).zip(&gathered[at..at + n]);
            for (o, (((&xv, &d), &r), &u)) in values.iter_mut().zip(inputs) {
                *o = d * r - coef * xv * u;
            }
            convert::write::<T, L>(out, values, store);
        }
        convert::fence(store);
    }
}
