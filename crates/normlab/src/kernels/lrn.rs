//! Local Response Normalization on `[N, C, *]` (rank ≥ 3).
//!
//! ```text
//! S_i = k + a·Σ_{j ∈ W(i)} x_j²        y_i = x_i · S_i^(-β)
//! dx_j = dy_j·S_j^(-β) - 2aβ·x_j·Σ_{i : j ∈ W(i)} dy_i·x_i·S_i^(-β-1)
//! ```
//! Across channels (AlexNet, PyTorch, ONNX) `W(i)` is `size` neighbouring
//! channels at the same position; within channel (Caffe's WITHIN_CHANNEL) it
//! is a `size × size` (× …) box of spatial neighbours in the same channel.
//! Windows are clipped at the edges. `a = α/size` (α over the window volume
//! within channel), as PyTorch, ONNX and Caffe scale it, or plain `α` as in
//! AlexNet's paper.
//!
//! The window sum is separable: a 1-d box sum along each windowed axis. The
//! backward sum over `{i : j ∈ W(i)}` is the same box with its two sides
//! swapped, which matters only for even sizes.

use crate::error::{check_len, ensure, Result};
use crate::float::{Lane, OutputBuffer};
use crate::simd::convert::Store;
use crate::simd::lrn::{self as loops, NegPow};
use crate::{Float, NormError, Tensor, View};
use rayon::prelude::*;

use super::parallel;
use std::mem::MaybeUninit;

const OP: &str = "local_response_norm";

/// Which neighbours enter the sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LrnRegion {
    /// `size` adjacent channels at the same position (default).
    #[default]
    AcrossChannels,
    /// A square (cubic, …) spatial window of side `size` in the same channel.
    WithinChannel,
}

/// Where an even-sized window puts its extra element.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EvenWindow {
    /// `size/2` before, `size/2 - 1` after (PyTorch; default).
    #[default]
    Torch,
    /// `size/2 - 1` before, `size/2` after (ONNX).
    Onnx,
}

/// LRN hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrnOptions {
    /// Window side, ≥ 1.
    pub size: usize,
    /// α (PyTorch default 1e-4).
    pub alpha: f64,
    /// β (default 0.75).
    pub beta: f64,
    /// k (default 1).
    pub k: f64,
    /// `a = α/size` (true, PyTorch/ONNX/Caffe) or `a = α` (AlexNet's paper).
    pub alpha_over_size: bool,
    /// Across or within channels.
    pub region: LrnRegion,
    /// Even-size window convention.
    pub even_window: EvenWindow,
}

impl LrnOptions {
    /// PyTorch's `LocalResponseNorm(size)` defaults: α = 1e-4, β = 0.75, k = 1.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            alpha: 1e-4,
            beta: 0.75,
            k: 1.0,
            alpha_over_size: true,
            region: LrnRegion::AcrossChannels,
            even_window: EvenWindow::Torch,
        }
    }

    /// Elements before and after the centre.
    pub fn window(&self) -> (usize, usize) {
        // Saturating: a size of 0 is refused by every kernel, but this is
        // public and must not underflow on it.
        let before = match self.even_window {
            EvenWindow::Torch => self.size / 2,
            EvenWindow::Onnx => self.size.saturating_sub(1) / 2,
        };
        (before, self.size.saturating_sub(1).saturating_sub(before))
    }

    /// The coefficient `a` of the squared sum for `spatial_rank` spatial axes.
    pub fn scale(&self, spatial_rank: usize) -> f64 {
        if !self.alpha_over_size {
            return self.alpha;
        }
        let volume = match self.region {
            LrnRegion::AcrossChannels => self.size as f64,
            LrnRegion::WithinChannel => (self.size as f64).powi(spatial_rank as i32),
        };
        self.alpha / volume
    }

    fn validate(&self) -> Result<()> {
        ensure(self.size >= 1, OP, "size", self.size, "at least 1")?;
        for (arg, v) in [("alpha", self.alpha), ("beta", self.beta), ("k", self.k)] {
            ensure(v.is_finite(), OP, arg, v, "finite")?;
        }
        Ok(())
    }
}

/// Box sums along one axis of a `[outer, len, inner]` buffer:
/// `out[o, i, r] = Σ_{j=i-before}^{i+after} v[o, j, r]`, clipped to `0..len`.
fn box_sum(
    v: &[f64],
    outer: usize,
    len: usize,
    inner: usize,
    before: usize,
    after: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for o in 0..outer {
        let base = o * len * inner;
        for i in 0..len {
            let lo = i.saturating_sub(before);
            let hi = i.saturating_add(after).min(len.saturating_sub(1));
            let dst = &mut out[base + i * inner..][..inner];
            for j in lo..=hi {
                for (d, s) in dst.iter_mut().zip(&v[base + j * inner..][..inner]) {
                    *d += s;
                }
            }
        }
    }
    out
}

/// The windowed sum over every windowed axis of `shape` (`swap`: the transposed window).
fn window_sum(v: Vec<f64>, shape: &[usize], options: &LrnOptions, swap: bool) -> Vec<f64> {
    let (mut before, mut after) = options.window();
    if swap {
        std::mem::swap(&mut before, &mut after);
    }
    let axes: Vec<usize> = match options.region {
        LrnRegion::AcrossChannels => vec![1],
        LrnRegion::WithinChannel => (2..shape.len()).collect(),
    };
    axes.into_iter().fold(v, |acc, axis| {
        let outer = shape[..axis].iter().product();
        let inner = shape[axis + 1..].iter().product();
        box_sum(&acc, outer, shape[axis], inner, before, after)
    })
}

/// `S = k + a·Σ_window x²` for every element.
fn scale_terms<T: Float>(x: &[T], shape: &[usize], options: &LrnOptions) -> Vec<f64> {
    let squares = x.iter().map(|v| v.to_f64() * v.to_f64()).collect();
    let a = options.scale(shape.len() - 2);
    let mut s = window_sum(squares, shape, options, false);
    for v in &mut s {
        *v = options.k + a * *v;
    }
    s
}

fn check_input(shape: &[usize], options: &LrnOptions) -> Result<()> {
    options.validate()?;
    if shape.len() < 3 {
        return Err(NormError::RankTooLow {
            op: OP,
            arg: "x",
            min: 3,
            shape: shape.into(),
        });
    }
    crate::error::numel(OP, "x", shape)?;
    Ok(())
}

/// Forward on a buffer of `shape`: writes `y`.
///
/// # Errors
/// Rank < 3, size 0, non-finite α/β/k, or lengths that disagree with `shape`.
pub fn forward<T: Float>(
    x: &[T],
    shape: &[usize],
    options: &LrnOptions,
    y: &mut (impl OutputBuffer<T> + ?Sized),
) -> Result<()> {
    check_input(shape, options)?;
    let y = crate::float::slots(y);
    check_len(OP, "x", x.len(), shape)?;
    check_len(OP, "y", y.len(), shape)?;
    forward_unchecked(x, shape, options, y);
    Ok(())
}

/// The forward body, arguments checked: one task per sample (windows never
/// cross samples).
fn forward_unchecked<T: Float>(
    x: &[T],
    shape: &[usize],
    options: &LrnOptions,
    y: &mut [MaybeUninit<T>],
) {
    let sample_shape = sample_shape(shape);
    let sample: usize = sample_shape.iter().product();
    if sample == 0 {
        return;
    }
    let samples = x
        .par_chunks(sample)
        .zip(y.par_chunks_mut(sample))
        .with_min_len(super::parallel::min_units(sample));
    if let Some(pow) = fast_path(options, sample / shape[1]) {
        // Streaming stores measured no faster here: the loop is
        // compute-heavy (a power per value) and ordinary stores overlap
        // with it as well.
        let store = Store::Cached;
        parallel::for_each(samples, |(xs, ys)| {
            forward_sample(xs, ys, shape[1], sample / shape[1], options, pow, store)
        });
        return;
    }
    parallel::for_each(samples, |(xs, ys)| {
        let s = scale_terms(xs, &sample_shape, options);
        for ((yv, &xv), &sv) in ys.iter_mut().zip(xs).zip(&s) {
            yv.write(T::from_f64(xv.to_f64() * sv.powf(-options.beta)));
        }
    });
}

/// Backward on a buffer of `shape`: writes `dx` (LRN has no parameters).
///
/// # Errors
/// As [`forward`], and `dy`/`dx` lengths.
pub fn backward<T: Float>(
    x: &[T],
    dy: &[T],
    shape: &[usize],
    options: &LrnOptions,
    dx: &mut (impl OutputBuffer<T> + ?Sized),
) -> Result<()> {
    check_input(shape, options)?;
    let dx = crate::float::slots(dx);
    check_len(OP, "x", x.len(), shape)?;
    check_len(OP, "dy", dy.len(), shape)?;
    check_len(OP, "dx", dx.len(), shape)?;
    backward_unchecked(x, dy, shape, options, dx);
    Ok(())
}

/// The backward body, arguments checked.
fn backward_unchecked<T: Float>(
    x: &[T],
    dy: &[T],
    shape: &[usize],
    options: &LrnOptions,
    dx: &mut [MaybeUninit<T>],
) {
    let sample_shape = sample_shape(shape);
    let sample: usize = sample_shape.iter().product();
    if sample == 0 {
        return;
    }
    let samples = x
        .par_chunks(sample)
        .zip(dy.par_chunks(sample))
        .zip(dx.par_chunks_mut(sample))
        .with_min_len(super::parallel::min_units(sample));
    if let Some(pow) = fast_path(options, sample / shape[1]) {
        let store = Store::Cached;
        parallel::for_each(samples, |((xs, dys), dxs)| {
            backward_sample(
                xs,
                dys,
                dxs,
                shape[1],
                sample / shape[1],
                options,
                pow,
                store,
            )
        });
        return;
    }
    let beta = options.beta;
    let coef = 2.0 * options.scale(shape.len() - 2) * beta;
    parallel::for_each(samples, |((xs, dys), dxs)| {
        let s = scale_terms(xs, &sample_shape, options);
        // t_i = dy_i·x_i·S_i^(-β-1), gathered over the transposed window.
        let t = dys
            .iter()
            .zip(xs)
            .zip(&s)
            .map(|((&d, &xv), &sv)| d.to_f64() * xv.to_f64() * sv.powf(-beta - 1.0))
            .collect();
        let gathered = window_sum(t, &sample_shape, options, true);
        for (((dxv, &d), &xv), (&sv, &u)) in
            dxs.iter_mut().zip(dys).zip(xs).zip(s.iter().zip(&gathered))
        {
            dxv.write(T::from_f64(
                d.to_f64() * sv.powf(-beta) - coef * xv.to_f64() * u,
            ));
        }
    });
}

/// `[1, C, spatial…]`: the shape of one sample.
fn sample_shape(shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[0] = 1;
    s
}

/// The vector path covers LRN across channels with β ∈ {0.5, 0.75, 1} (a
/// closed form in square roots) on maps of [`TINY_SPATIAL`] values or more,
/// for every element type; other β, tiny maps and the within-channel region
/// take the general f64 path.
fn fast_path(options: &LrnOptions, spatial: usize) -> Option<NegPow> {
    match options.region {
        LrnRegion::AcrossChannels if spatial >= TINY_SPATIAL => NegPow::of(options.beta),
        _ => None,
    }
}

/// Spatial sizes below which LRN across channels takes the f64 path too:
/// `[N, C, 1]` (LRN in an MLP) and 2×2 maps, where the vector loops ran one
/// padded vector per channel and window term, some 40 ns a value (a 6 × 64
/// MLP's training step with LRN: 4.6 ms, against 1.7 ms in f64).
const TINY_SPATIAL: usize = 8;

/// Spatial positions per tile in the backward: a tile of every channel (terms
/// and scales) stays in L2.
const TILE: usize = 256;

/// Channels `[c - before, c + after]` clipped to `0..channels`.
fn channel_window(
    c: usize,
    channels: usize,
    before: usize,
    after: usize,
) -> std::ops::RangeInclusive<usize> {
    c.saturating_sub(before)..=c.saturating_add(after).min(channels.saturating_sub(1))
}

/// Forward of one sample `[C, S]`, channel by channel: `x` is read as one
/// sequential stream (each row is reused from cache by the `size` channels
/// whose window holds it) and `y` written as another.
fn forward_sample<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    channels: usize,
    s: usize,
    options: &LrnOptions,
    pow: NegPow,
    store: Store,
) {
    let (before, after) = options.window();
    let (k, a) = (T::Lane::of(options.k), T::Lane::of(options.scale(1)));
    for (c, row) in y.chunks_mut(s).enumerate().take(channels) {
        let window = channel_window(c, channels, before, after);
        let (lo, hi) = (*window.start(), *window.end());
        loops::forward_channel(x, s, c, lo, hi, row, k, a, pow, store);
    }
}

/// Backward of one sample `[C, S]`, tile by tile.
#[allow(clippy::too_many_arguments)]
fn backward_sample<T: Float>(
    x: &[T],
    dy: &[T],
    dx: &mut [MaybeUninit<T>],
    channels: usize,
    s: usize,
    options: &LrnOptions,
    pow: NegPow,
    store: Store,
) {
    let (before, after) = options.window();
    let (k, a) = (T::Lane::of(options.k), T::Lane::of(options.scale(1)));
    let coef = T::Lane::of(2.0 * options.scale(1) * options.beta);
    let tile = TILE.min(s);
    let zero = T::Lane::ZERO;
    let mut terms = vec![zero; channels * tile];
    let mut scale = vec![zero; channels * tile];
    let mut gathered = vec![zero; tile];
    for t0 in (0..s).step_by(TILE) {
        let len = TILE.min(s - t0);
        for c in 0..channels {
            let t = &mut terms[c * tile..][..len];
            t.fill(zero);
            for j in channel_window(c, channels, before, after) {
                loops::add_squares(t, &x[j * s + t0..][..len]);
            }
            let at = c * s + t0;
            loops::grad_terms(
                &x[at..][..len],
                &dy[at..][..len],
                t,
                &mut scale[c * tile..][..len],
                k,
                a,
                pow,
            );
        }
        for c in 0..channels {
            let g = &mut gathered[..len];
            g.fill(zero);
            // The transposed window: every i whose window holds c.
            for i in channel_window(c, channels, after, before) {
                loops::add_assign::<T>(g, &terms[i * tile..][..len]);
            }
            let at = c * s + t0;
            loops::input_grad(
                &x[at..][..len],
                &dy[at..][..len],
                &scale[c * tile..][..len],
                g,
                coef,
                &mut dx[at..][..len],
                store,
            );
        }
    }
}

/// LRN of `x` (`[N, C, *]`, rank ≥ 3).
///
/// # Errors
/// Rank < 3, size 0, non-finite α/β/k.
///
/// ```
/// use normlab::{Tensor, kernels::lrn::{lrn, LrnOptions}};
/// let x = Tensor::new(vec![1, 2, 1], vec![1.0f64, 2.0]).unwrap();
/// let options = LrnOptions { alpha: 1.0, beta: 1.0, k: 1.0, alpha_over_size: false, ..LrnOptions::new(3) };
/// let y = lrn(&x, &options).unwrap();
/// // each window holds both channels: S = 1 + (1 + 4) = 6
/// assert_eq!(y.data(), &[1.0 / 6.0, 2.0 / 6.0]);
/// ```
pub fn lrn<T: Float>(x: &(impl View<T> + ?Sized), options: &LrnOptions) -> Result<Tensor<T>> {
    check_input(x.shape(), options)?;
    super::check_view(OP, "x", x)?;
    let (y, ()) = Tensor::filled_by(OP, x.shape(), |y| {
        forward_unchecked(x.data(), x.shape(), options, y);
        Ok(())
    })?;
    Ok(y)
}

/// `dx` of [`lrn`].
///
/// # Errors
/// As [`lrn`], and `dy` not shaped as `x`.
pub fn lrn_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    options: &LrnOptions,
) -> Result<Tensor<T>> {
    crate::error::check_shape(OP, "dy", dy.shape(), x.shape(), x.shape())?;
    check_input(x.shape(), options)?;
    super::check_view(OP, "x", x)?;
    super::check_view(OP, "dy", dy)?;
    let (dx, ()) = Tensor::filled_by(OP, x.shape(), |dx| {
        backward_unchecked(x.data(), dy.data(), x.shape(), options, dx);
        Ok(())
    })?;
    Ok(dx)
}
