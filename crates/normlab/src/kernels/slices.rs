//! Per-slice passes shared by the channel-wise kernels (BatchNorm, GroupNorm,
//! InstanceNorm): a slice is a contiguous run of one channel's values, all
//! normalized with the same statistics. These turn the f64 statistics into
//! the lanes of the element type (the mean split as `hi + lo`) and call the
//! loops of [`crate::simd`].

use std::mem::MaybeUninit;

use super::DxCoefficients;
use crate::float::Lane;
use crate::simd::activation::Act;
use crate::simd::convert::Store;
use crate::simd::sums::ZSlice;
use crate::simd::{sums, transform};
use crate::Float;

/// A channel's forward coefficients `y = φ((x - mean)·scale + shift)`,
/// `scale = rstd·γ`, `shift = β`: what the forward applies, and what a fused
/// backward recomputes `z` with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Affine {
    /// `rstd·γ`.
    pub scale: f64,
    /// `β`.
    pub shift: f64,
}

impl Affine {
    /// The lanes a fused backward recomputes `z` with (none without `act`).
    #[inline]
    pub(crate) fn z<C: Lane>(self, act: Act) -> ZSlice<C> {
        match act {
            None => ZSlice::none(),
            Some(_) => ZSlice {
                act,
                scale: C::of(self.scale),
                shift: C::of(self.shift),
            },
        }
    }
}

/// `y = φ((x - mean)·scale + shift)` (`φ` the identity without `act`).
#[inline]
pub(crate) fn normalize<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    mean: f64,
    k: Affine,
    store: Store,
    act: Act,
) {
    let (hi, lo) = T::Lane::split(mean);
    let (scale, shift) = (T::Lane::of(k.scale), T::Lane::of(k.shift));
    transform::normalize_slice(x, y, hi, lo, scale, shift, store, act);
}

/// `(Σdz, Σdz·x̂)` with `x̂ = (x - mean)·rstd` and `dz = dy`, or fused
/// `φ'(z)·dy` with `z` from the forward's coefficients `z_k`.
#[inline]
pub(crate) fn grad_sums<T: Float>(
    x: &[T],
    dy: &[T],
    mean: f64,
    rstd: f64,
    z_k: Affine,
    act: Act,
) -> (f64, f64) {
    let (hi, lo) = T::Lane::split(mean);
    sums::slice_grad_sums(x, dy, hi, lo, T::Lane::of(rstd), z_k.z(act))
}

/// `dx = rstd·(w·dz - mean_g) + b·(x - mean)` for a slice of one channel
/// (`dz` as in [`grad_sums`]).
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn input_grad<T: Float>(
    x: &[T],
    dy: &[T],
    mean: f64,
    weight: f64,
    k: DxCoefficients,
    dx: &mut [MaybeUninit<T>],
    store: Store,
    z_k: Affine,
    act: Act,
) {
    let (hi, lo) = T::Lane::split(mean);
    let of = T::Lane::of;
    let z = z_k.z::<T::Lane>(act);
    transform::slice_dx(
        x,
        dy,
        hi,
        lo,
        of(k.rstd),
        of(weight),
        of(k.mean_g),
        of(k.b),
        dx,
        store,
        z.scale,
        z.shift,
        act,
    );
}
