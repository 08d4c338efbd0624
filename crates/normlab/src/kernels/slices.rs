//! Per-slice passes shared by the channel-wise kernels (BatchNorm, GroupNorm,
//! InstanceNorm): a slice is a contiguous run of one channel's values, all
//! normalized with the same statistics. These turn the f64 statistics into
//! the lanes of the element type (the mean split as `hi + lo`) and call the
//! loops of [`crate::simd`].

use std::mem::MaybeUninit;

use super::DxCoefficients;
use crate::float::Lane;
use crate::simd::convert::Store;
use crate::simd::{sums, transform};
use crate::Float;

/// `y = (x - mean)·scale + shift`.
#[inline]
pub(crate) fn normalize<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    mean: f64,
    scale: f64,
    shift: f64,
    store: Store,
) {
    let (hi, lo) = T::Lane::split(mean);
    let (scale, shift) = (T::Lane::of(scale), T::Lane::of(shift));
    transform::normalize_slice(x, y, hi, lo, scale, shift, store);
}

/// `(Σdy, Σdy·x̂)` with `x̂ = (x - mean)·rstd`.
#[inline]
pub(crate) fn grad_sums<T: Float>(x: &[T], dy: &[T], mean: f64, rstd: f64) -> (f64, f64) {
    let (hi, lo) = T::Lane::split(mean);
    sums::slice_grad_sums(x, dy, hi, lo, T::Lane::of(rstd))
}

/// `dx = rstd·(w·dy - mean_g) + b·(x - mean)` for a slice of one channel.
#[inline]
pub(crate) fn input_grad<T: Float>(
    x: &[T],
    dy: &[T],
    mean: f64,
    weight: f64,
    k: DxCoefficients,
    dx: &mut [MaybeUninit<T>],
    store: Store,
) {
    let (hi, lo) = T::Lane::split(mean);
    let of = T::Lane::of;
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
    );
}
