//! Per-slice loops shared by the channel-wise kernels (BatchNorm, GroupNorm,
//! InstanceNorm): a slice is a contiguous run of one channel's values, all
//! normalized with the same statistics. f32 slices take the SIMD paths of
//! [`super::fast`]; other element types compute in f64.

use super::fast::{self, Store};
use super::DxCoefficients;
use std::mem::MaybeUninit;

use crate::float::{as_f32, as_f32_out};
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
    if let (Some(x), Some(y)) = (as_f32(x), as_f32_out(y)) {
        let (hi, lo) = fast::split(mean);
        fast::normalize_slice(x, y, hi, lo, scale as f32, shift as f32, store);
        return;
    }
    for (yv, &xv) in y.iter_mut().zip(x) {
        yv.write(T::from_f64((xv.to_f64() - mean) * scale + shift));
    }
}

/// `(Σdy, Σdy·x̂)` with `x̂ = (x - mean)·rstd`.
#[inline]
pub(crate) fn grad_sums<T: Float>(x: &[T], dy: &[T], mean: f64, rstd: f64) -> (f64, f64) {
    if let (Some(x), Some(dy)) = (as_f32(x), as_f32(dy)) {
        let (hi, lo) = fast::split(mean);
        return fast::slice_grad_sums(x, dy, hi, lo, rstd as f32);
    }
    let (mut s1, mut s2) = (0.0, 0.0);
    for (&xv, &dyv) in x.iter().zip(dy) {
        let d = dyv.to_f64();
        s1 += d;
        s2 += d * (xv.to_f64() - mean) * rstd;
    }
    (s1, s2)
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
    if let (Some(x), Some(dy), Some(dx)) = (as_f32(x), as_f32(dy), as_f32_out(dx)) {
        let (hi, lo) = fast::split(mean);
        fast::slice_dx(
            x,
            dy,
            hi,
            lo,
            k.rstd as f32,
            weight as f32,
            k.mean_g as f32,
            k.b as f32,
            dx,
            store,
        );
        return;
    }
    for ((o, &xv), &d) in dx.iter_mut().zip(x).zip(dy) {
        o.write(T::from_f64(
            k.rstd * (weight * d.to_f64() - k.mean_g) + k.b * (xv.to_f64() - mean),
        ));
    }
}
