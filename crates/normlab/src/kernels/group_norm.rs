//! GroupNorm on `[N, C, *]`: channels split into G groups of C/G; statistics
//! per (sample, group) over its C/G channels and all spatial positions;
//! γ and β per channel.
//!
//! ```text
//! μ_ng = mean of x[n, group g]   σ²_ng = Σ(x-μ_ng)²/(C/G·spatial)   r_ng = 1/√(σ²_ng+ε)
//! y = γ_c·(x-μ_ng)·r_ng + β_c
//! dx = r·(g - mean(g) - x̂·mean(g·x̂)),  g = γ_c·dy, means over the group
//! dγ_c = Σ_n Σ_s dy·x̂   dβ_c = Σ_n Σ_s dy
//! ```
//! Each group is one contiguous block of `C/G·spatial` values.

use super::parallel::{self, min_units};
use super::rows::write_sums;
use super::slices::{self, Affine};
use super::BiasGrad;
use super::{
    check_param, check_saved, check_view, grad_buffer, param_at, DxCoefficients, Epsilon, Grads,
    NcsLayout, Saved,
};
use crate::error::{check_len, ensure, Result};
use crate::float::{Lane, OutputBuffer};
use crate::moments::Moments;
use crate::simd::activation::Act;
use crate::simd::convert::{fence, Store};
use crate::simd::{sums, transform};
use crate::Activation;
use crate::{Float, NormError, Tensor, View};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const OP: &str = "group_norm";

/// `[N, G, C/G, spatial]`: a channel-first layout split into groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    /// The channel-first layout.
    pub ncs: NcsLayout,
    /// Number of groups G (divides C).
    pub groups: usize,
}

impl GroupLayout {
    /// Checks `groups > 0` and `C % groups == 0`.
    ///
    /// # Errors
    /// [`NormError::InvalidArgument`] for 0 groups, [`NormError::GroupsNotDivisible`].
    pub fn new(op: &'static str, ncs: NcsLayout, groups: usize, shape: &[usize]) -> Result<Self> {
        ensure(groups > 0, op, "num_groups", groups, "at least 1")?;
        if !ncs.c.is_multiple_of(groups) {
            return Err(NormError::GroupsNotDivisible {
                op,
                channels: ncs.c,
                groups,
                shape: shape.into(),
            });
        }
        let layout = Self { ncs, groups };
        // N·G·(C/G)·spatial must fit, as every product of it: C = 0 is
        // divisible by any G, and N·G is the number of saved groups.
        crate::error::numel(op, "x", &shape4(layout))?;
        Ok(layout)
    }

    /// The checks of [`Self::new`] again, for a layout built field by field.
    fn validate(self, op: &'static str) -> Result<Self> {
        let shape = [self.ncs.n, self.ncs.c, self.ncs.spatial];
        crate::error::numel(op, "x", &shape)?;
        Self::new(op, self.ncs, self.groups, &shape)
    }

    fn channels_per_group(&self) -> usize {
        self.ncs.c / self.groups
    }

    fn group_len(&self) -> usize {
        self.channels_per_group() * self.ncs.spatial
    }
}

/// Forward: writes `y` and `saved` (N·G groups).
///
/// # Errors
/// When a slice length disagrees with the layout.
pub fn forward<T: Float, P: Float>(
    x: &[T],
    layout: GroupLayout,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut (impl OutputBuffer<T> + ?Sized),
    saved: &mut Saved,
) -> Result<()> {
    eps.validate(OP)?;
    check_args(OP, x, layout, weight, bias, saved)?;
    let y = crate::float::slots(y);
    check_len(OP, "y", y.len(), &shape4(layout))?;
    forward_unchecked(x, layout, weight, bias, eps, y, saved, None);
    Ok(())
}

/// The forward body, arguments checked; `y = φ(x̂·γ + β)` with an activation.
#[allow(clippy::too_many_arguments)]
fn forward_unchecked<T: Float, P: Float>(
    x: &[T],
    layout: GroupLayout,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
    act: Act,
) {
    let store = Store::for_output::<T>(x.len());
    let (len, s, cpg) = (
        layout.group_len(),
        layout.ncs.spatial,
        layout.channels_per_group(),
    );
    if len == 0 {
        return;
    }
    if s >= PIPELINE_MIN_SPATIAL {
        forward_pipelined(x, layout, weight, bias, eps, y, saved, store, act);
        return;
    }
    parallel::for_each(
        x.par_chunks(len)
            .zip(y.par_chunks_mut(len))
            .zip(saved.mean.par_iter_mut().zip(saved.rstd.par_iter_mut()))
            .enumerate()
            .with_min_len(min_units(len)),
        |(group, ((x_grp, y_grp), (mean, rstd)))| {
            let m = Moments::of_slice(x_grp);
            (*mean, *rstd) = (m.mean, eps.rstd(m.var(0)));
            let first_channel = (group % layout.groups) * cpg;
            if s < TINY_SPATIAL {
                // Value by value in f64, rounded once (see `TINY_SPATIAL`).
                let chans = x_grp.chunks_exact(s).zip(y_grp.chunks_exact_mut(s));
                for (i, (x_ch, y_ch)) in chans.enumerate() {
                    let c = first_channel + i;
                    let (scale, shift) = (*rstd * param_at(weight, c, 1.0), param_at(bias, c, 0.0));
                    for (v, out) in x_ch.iter().zip(y_ch) {
                        let z = (v.to_f64() - m.mean) * scale + shift;
                        out.write(T::from_f64(act.map_or(z, |a| a.apply(z))));
                    }
                }
                return;
            }
            if s < SHORT_CHANNEL {
                // Short channels (8×8, 16×16 maps at 40 channels a group):
                // the group's slices in one pass with per-channel
                // coefficients, rather than one call per slice.
                let (hi, lo) = T::Lane::split(m.mean);
                let coefs: Vec<[T::Lane; 4]> = (first_channel..first_channel + cpg)
                    .map(|c| {
                        let scale = T::Lane::of(*rstd * param_at(weight, c, 1.0));
                        [hi, lo, scale, T::Lane::of(param_at(bias, c, 0.0))]
                    })
                    .collect();
                transform::normalize_slices(x_grp, y_grp, s, 0, &coefs, act);
                return;
            }
            for (i, (x_ch, y_ch)) in x_grp
                .chunks_exact(s)
                .zip(y_grp.chunks_exact_mut(s))
                .enumerate()
            {
                let c = first_channel + i;
                let k = Affine {
                    scale: *rstd * param_at(weight, c, 1.0),
                    shift: param_at(bias, c, 0.0),
                };
                slices::normalize(x_ch, y_ch, m.mean, k, store, act);
            }
        },
    );
}

/// Spatial size below which a group's channels are passed over in one call
/// with per-channel coefficients (`transform::normalize_slices`,
/// `sums::grad_sums_slices`, `transform::input_grad_slices`) instead of one
/// call per channel: the diffusion UNet's 8×8 and 16×16 maps have 40
/// channels of 64 or 256 values a group, where the per-call cost was a
/// large share of the work.
const SHORT_CHANNEL: usize = 512;

/// Spatial sizes below which a group is normalized value by value in f64
/// (forward and backward, rounded once), without a vector call per channel:
/// `[N, C]` inputs (GroupNorm in an MLP) and 2×2 maps, where each channel's
/// one to seven values went through a padded vector and its call cost some
/// 30 ns a value (a 6 × 64 MLP's training step with GroupNorm(4) took
/// 2.5 ms against LayerNorm's 0.76 ms).
const TINY_SPATIAL: usize = 8;

/// Spatial size from which the forward overlaps each group's
/// normalizing pass with the next group's statistics pass. On
/// `[32, 64, 56, 56]` (spatial 3136) that took GroupNorm(32) from 2.57 to
/// 1.96 ms and InstanceNorm from 2.53 to 1.72 ms; on `[64, 256, 28, 28]`
/// (spatial 784, one call per channel) it gained nothing (5.67 against
/// 5.57 ms) (`normlab bench --threads 2`, four or five alternating runs).
const PIPELINE_MIN_SPATIAL: usize = 2048;

/// Moments of one group, channel by channel (each channel one chunk around
/// its own shift guess), merged in order: the same bits as the pipelined
/// computation of [`forward_pipelined`], which sums a channel while it
/// writes the previous group.
fn group_moments<T: Float>(group: &[T], spatial: usize) -> Moments {
    group
        .chunks_exact(spatial)
        .fold(Moments::EMPTY, |acc, channel| {
            let guess = Moments::shift_guess(channel);
            let sums = crate::simd::sums::centred_sums(channel, guess);
            acc.merge(Moments::of_chunk_from(channel, guess, sums))
        })
}

/// The forward for large spatial sizes, groups in runs of a fixed length
/// (one rayon task each): a group is normalized and written while the
/// statistics of the next group of the run are read, segment by segment
/// ([`transform::normalize_and_sum_next`]), so that the memory reads of one
/// pass and the writes of the other overlap instead of taking turns. Each
/// group's moments are those of [`group_moments`], whichever way they are
/// computed, so results do not depend on the runs or the thread count.
#[allow(clippy::too_many_arguments)]
fn forward_pipelined<T: Float, P: Float>(
    x: &[T],
    layout: GroupLayout,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
    store: Store,
    act: Act,
) {
    let (len, s, cpg) = (
        layout.group_len(),
        layout.ncs.spatial,
        layout.channels_per_group(),
    );
    let run = min_units(len);
    parallel::for_each(
        x.par_chunks(len * run)
            .zip(y.par_chunks_mut(len * run))
            .zip(
                saved
                    .mean
                    .par_chunks_mut(run)
                    .zip(saved.rstd.par_chunks_mut(run)),
            )
            .enumerate(),
        |(task, ((xs, ys), (means, rstds)))| {
            let mut moments = group_moments(&xs[..len], s);
            let groups = xs.chunks_exact(len).zip(ys.chunks_exact_mut(len));
            for (i, (x_grp, y_grp)) in groups.enumerate() {
                let (mean, rstd) = (moments.mean, eps.rstd(moments.var(0)));
                (means[i], rstds[i]) = (mean, rstd);
                let (hi, lo) = T::Lane::split(mean);
                let first_channel = ((task * run + i) % layout.groups) * cpg;
                let next = xs.get((i + 1) * len..(i + 2) * len);
                // The shift guesses of the next group's channels up front:
                // their loads miss the cache together rather than one by one.
                let guesses: Vec<T::Lane> = next.map_or_else(Vec::new, |next| {
                    next.chunks_exact(s).map(Moments::shift_guess).collect()
                });
                let mut next_moments = Moments::EMPTY;
                for (j, (x_ch, y_ch)) in x_grp
                    .chunks_exact(s)
                    .zip(y_grp.chunks_exact_mut(s))
                    .enumerate()
                {
                    let c = first_channel + j;
                    let scale = T::Lane::of(rstd * param_at(weight, c, 1.0));
                    let shift = T::Lane::of(param_at(bias, c, 0.0));
                    let (next_ch, guess) = match next {
                        Some(next) => (&next[j * s..][..s], guesses[j]),
                        None => (&[][..], T::Lane::ZERO),
                    };
                    let sums = transform::normalize_and_sum_next(
                        x_ch, y_ch, hi, lo, scale, shift, store, next_ch, guess, act,
                    );
                    if next.is_some() {
                        next_moments =
                            next_moments.merge(Moments::of_chunk_from(next_ch, guess, sums));
                    }
                }
                moments = next_moments;
            }
            fence(store);
        },
    );
}

/// Backward: writes `dx`, and `dweight`/`dbias` (length C) when given.
///
/// # Errors
/// When a slice length disagrees with the layout.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float, P: Float>(
    x: &[T],
    dy: &[T],
    layout: GroupLayout,
    weight: Option<&[P]>,
    eps: &Epsilon,
    saved: &Saved,
    dx: &mut (impl OutputBuffer<T> + ?Sized),
    dweight: Option<&mut [P]>,
    dbias: Option<&mut [P]>,
) -> Result<()> {
    check_args(OP, x, layout, weight, None, saved)?;
    let dx = crate::float::slots(dx);
    check_len(OP, "dy", dy.len(), &shape4(layout))?;
    check_len(OP, "dx", dx.len(), &shape4(layout))?;
    for (arg, g) in [("dweight", &dweight), ("dbias", &dbias)] {
        if let Some(g) = g {
            check_len(OP, arg, g.len(), &[layout.ncs.c])?;
        }
    }
    backward_unchecked(x, dy, layout, weight, eps, saved, dx, dweight, dbias, None);
    Ok(())
}

/// The backward body, arguments checked: one task per run of groups (so
/// that a single image with many groups still fills every core), each
/// group's channel sums kept apart and added into dγ, dβ in sample order.
#[allow(clippy::too_many_arguments)]
fn backward_unchecked<T: Float, P: Float>(
    x: &[T],
    dy: &[T],
    layout: GroupLayout,
    weight: Option<&[P]>,
    eps: &Epsilon,
    saved: &Saved,
    dx: &mut [MaybeUninit<T>],
    dweight: Option<&mut [P]>,
    dbias: Option<&mut [P]>,
    fused: Option<(Option<&[P]>, Activation)>,
) {
    let store = Store::for_output::<T>(x.len());
    let act = fused.map(|(_, act)| act);
    let bias = fused.and_then(|(bias, _)| bias);
    let (len, s, cpg) = (
        layout.group_len(),
        layout.ncs.spatial,
        layout.channels_per_group(),
    );
    let c_total = layout.ncs.c;
    if len == 0 || layout.ncs.n == 0 {
        for out in [dweight, dbias].into_iter().flatten() {
            out.fill(P::from_f64(0.0));
        }
        return;
    }
    // Per group: (Σdy·x̂, Σdy) of each of its channels.
    let per_group: Vec<Vec<(f64, f64)>> = parallel::collect(
        x.par_chunks(len)
            .zip(dy.par_chunks(len))
            .zip(dx.par_chunks_mut(len))
            .enumerate()
            .with_min_len(min_units(len))
            .map(|(group, ((x_grp, dy_grp), dx_grp))| {
                let (mean, rstd) = (saved.mean[group], saved.rstd[group]);
                let first_channel = (group % layout.groups) * cpg;
                // Each channel's (Σdy, Σdy·x̂): short channels in one pass over
                // the group (every channel shares the coefficients: one entry).
                let short = s < SHORT_CHANNEL;
                let (hi, lo) = T::Lane::split(mean);
                // The forward's coefficients of channel `i` of the group, from
                // which a fused backward recomputes `z`.
                let affine = |i: usize| Affine {
                    scale: rstd * param_at(weight, first_channel + i, 1.0),
                    shift: param_at(bias, first_channel + i, 0.0),
                };
                let tiny = s < TINY_SPATIAL;
                // `dz` at one value of channel `i`: `dy`, or `φ'(z)·dy` with `z`
                // as the tiny forward computes it.
                let dz_at = |i: usize, v: f64, d: f64| match act {
                    None => d,
                    Some(a) => {
                        let k = affine(i);
                        a.grad((v - mean) * k.scale + k.shift, d)
                    }
                };
                let channel_sums: Vec<(f64, f64)> = if tiny {
                    x_grp
                        .chunks_exact(s)
                        .zip(dy_grp.chunks_exact(s))
                        .enumerate()
                        .map(|(i, (x_ch, dy_ch))| {
                            x_ch.iter().zip(dy_ch).fold((0.0, 0.0), |(a, b), (v, d)| {
                                let (v, d) = (v.to_f64(), d.to_f64());
                                let dz = dz_at(i, v, d);
                                (a + dz, b + dz * ((v - mean) * rstd))
                            })
                        })
                        .collect()
                } else if short {
                    let mut totals = vec![0.0; 2 * cpg];
                    let coefs: Vec<[T::Lane; 5]> = (0..cpg)
                        .map(|i| {
                            let z = affine(i).z::<T::Lane>(act);
                            [hi, lo, T::Lane::of(rstd), z.scale, z.shift]
                        })
                        .collect();
                    sums::grad_sums_slices(x_grp, dy_grp, s, 0, &coefs, &mut totals, act);
                    totals.chunks_exact(2).map(|t| (t[0], t[1])).collect()
                } else {
                    x_grp
                        .chunks_exact(s)
                        .zip(dy_grp.chunks_exact(s))
                        .enumerate()
                        .map(|(i, (x_ch, dy_ch))| {
                            slices::grad_sums(x_ch, dy_ch, mean, rstd, affine(i), act)
                        })
                        .collect()
                };
                let (mut sum_g, mut sum_g_xhat) = (0.0, 0.0);
                for (i, &(sum_dy, sum_dy_xhat)) in channel_sums.iter().enumerate() {
                    let w = param_at(weight, first_channel + i, 1.0);
                    sum_g += w * sum_dy;
                    sum_g_xhat += w * sum_dy_xhat;
                }
                let k = DxCoefficients::new(eps, rstd, sum_g / len as f64, sum_g_xhat / len as f64);
                let weight_of = |i: usize| param_at(weight, first_channel + i, 1.0);
                if tiny {
                    let chans = x_grp
                        .chunks_exact(s)
                        .zip(dy_grp.chunks_exact(s))
                        .zip(dx_grp.chunks_exact_mut(s));
                    for (i, ((x_ch, dy_ch), dx_ch)) in chans.enumerate() {
                        let w = weight_of(i);
                        for ((v, d), out) in x_ch.iter().zip(dy_ch).zip(dx_ch) {
                            let (v, d) = (v.to_f64(), d.to_f64());
                            let dz = dz_at(i, v, d);
                            out.write(T::from_f64(k.rstd * (w * dz - k.mean_g) + k.b * (v - mean)));
                        }
                    }
                } else if short {
                    let of = T::Lane::of;
                    let coefs: Vec<[T::Lane; 8]> = (0..cpg)
                        .map(|i| {
                            let z = affine(i).z::<T::Lane>(act);
                            let (w, mean_g, b) = (of(weight_of(i)), of(k.mean_g), of(k.b));
                            [hi, lo, of(k.rstd), w, mean_g, b, z.scale, z.shift]
                        })
                        .collect();
                    transform::input_grad_slices(x_grp, dy_grp, dx_grp, s, 0, &coefs, act);
                } else {
                    let chans = x_grp
                        .chunks_exact(s)
                        .zip(dy_grp.chunks_exact(s))
                        .zip(dx_grp.chunks_exact_mut(s));
                    for (i, ((x_ch, dy_ch), dx_ch)) in chans.enumerate() {
                        let w = weight_of(i);
                        slices::input_grad(x_ch, dy_ch, mean, w, k, dx_ch, store, affine(i), act);
                    }
                }
                channel_sums
                    .into_iter()
                    .map(|(sum_dy, sum_dy_xhat)| (sum_dy_xhat, sum_dy))
                    .collect::<Vec<_>>()
            }),
    );
    let (mut dw, mut db) = (vec![0.0; c_total], vec![0.0; c_total]);
    for (group, sums) in per_group.iter().enumerate() {
        let first_channel = (group % layout.groups) * cpg;
        for (i, &(a, b)) in sums.iter().enumerate() {
            dw[first_channel + i] += a;
            db[first_channel + i] += b;
        }
    }
    write_sums(dweight, &dw);
    write_sums(dbias, &db);
}

fn shape4(layout: GroupLayout) -> [usize; 4] {
    [
        layout.ncs.n,
        layout.groups,
        layout.channels_per_group(),
        layout.ncs.spatial,
    ]
}

fn check_args<T: Float, P: Float>(
    op: &'static str,
    x: &[T],
    layout: GroupLayout,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    saved: &Saved,
) -> Result<()> {
    layout.validate(op)?;
    check_len(op, "x", x.len(), &shape4(layout))?;
    let groups = [layout.ncs.n * layout.groups];
    check_len(op, "saved.mean", saved.mean.len(), &groups)?;
    check_len(op, "saved.rstd", saved.rstd.len(), &groups)?;
    if let Some(w) = weight {
        check_len(op, "weight", w.len(), &[layout.ncs.c])?;
    }
    if let Some(b) = bias {
        check_len(op, "bias", b.len(), &[layout.ncs.c])?;
    }
    Ok(())
}

/// GroupNorm of `x` (`[N, C, *]`) with `num_groups` groups; γ, β of shape `[C]`.
///
/// # Errors
/// Rank < 2; `num_groups` 0 or not dividing C; weight/bias not `[C]`; invalid ε.
///
/// ```
/// use normlab::{Tensor, kernels::group_norm::group_norm};
/// let x = Tensor::new(vec![1, 2, 2], vec![0.0f64, 2.0, 10.0, 30.0]).unwrap();
/// let (y, saved) = group_norm(&x, 2, None, None, 0.0.into()).unwrap();
/// assert_eq!(saved.mean, vec![1.0, 20.0]);
/// assert_eq!(y.data(), &[-1.0, 1.0, -1.0, 1.0]);
/// ```
pub fn group_norm<T: Float>(
    x: &(impl View<T> + ?Sized),
    num_groups: usize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    group_norm_with(x, num_groups, weight, bias, eps, None)
}

/// GroupNorm followed by an activation, one pass: `y = φ(x̂·γ + β)`, as
/// `φ(F.group_norm(…))`. Its backward is [`group_norm_act_backward`].
///
/// # Errors
/// As [`group_norm`].
pub fn group_norm_act<T: Float>(
    x: &(impl View<T> + ?Sized),
    num_groups: usize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
    act: Activation,
) -> Result<(Tensor<T>, Saved)> {
    group_norm_with(x, num_groups, weight, bias, eps, Some(act))
}

/// [`group_norm`], with an activation when `act` is given.
fn group_norm_with<T: Float>(
    x: &(impl View<T> + ?Sized),
    num_groups: usize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
    act: Act,
) -> Result<(Tensor<T>, Saved)> {
    eps.validate(OP)?;
    let ncs = NcsLayout::of(OP, x.shape(), 2)?;
    let layout = GroupLayout::new(OP, ncs, num_groups, x.shape())?;
    check_param(OP, "weight", weight, &[ncs.c], x.shape())?;
    check_param(OP, "bias", bias, &[ncs.c], x.shape())?;
    let numel = check_view(OP, "x", x)?;
    let mut saved = Saved::for_input(OP, ncs.n * num_groups, numel)?;
    let (w, b) = (weight.map(Tensor::data), bias.map(Tensor::data));
    let (y, ()) = Tensor::filled_by(OP, x.shape(), |y| {
        forward_unchecked(x.data(), layout, w, b, &eps, y, &mut saved, act);
        Ok(())
    })?;
    Ok((y, saved))
}

/// Gradients of [`group_norm`].
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn group_norm_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    num_groups: usize,
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let bias = BiasGrad::Plain { with_bias };
    group_norm_backward_with(x, dy, num_groups, weight, bias, eps, saved)
}

/// Gradients of [`group_norm_act`] (`dy` at its output `y`): as
/// [`super::batch_norm::batch_norm_act_backward`], ReLU's mask recomputed
/// from `x`, the saved statistics, γ and β (the forward's `bias`, also when
/// it is not trained), tanh's and sigmoid's derivative taken from `y`.
///
/// # Errors
/// Shapes that disagree with the forward call's.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    y: Option<&dyn View<T>>,
    dy: &impl View<T>,
    num_groups: usize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    act: Activation,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let mut slot = None;
    let (dy, act) = super::act_output_grad(OP, x.shape(), act, y, dy, &mut slot)?;
    let bias = BiasGrad::Fused { bias, act };
    group_norm_backward_with(x, dy, num_groups, weight, bias, eps, saved)
}

/// The body of [`group_norm_backward`] and [`group_norm_act_backward`].
fn group_norm_backward_with<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    num_groups: usize,
    weight: Option<&Tensor<T>>,
    bias: BiasGrad<'_, T>,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let with_bias = bias.with_bias();
    let ncs = NcsLayout::of(OP, x.shape(), 2)?;
    let layout = GroupLayout::new(OP, ncs, num_groups, x.shape())?;
    crate::error::check_shape(OP, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(OP, "weight", weight, &[ncs.c], x.shape())?;
    if let BiasGrad::Fused { bias, .. } = bias {
        check_param(OP, "bias", bias, &[ncs.c], x.shape())?;
    }
    let numel = check_view(OP, "x", x)?;
    check_view(OP, "dy", dy)?;
    check_saved(OP, saved, ncs.n * num_groups, numel)?;
    let mut dweight = grad_buffer(weight.is_some(), &[ncs.c])?;
    let mut dbias = grad_buffer(with_bias, &[ncs.c])?;
    let (dx, ()) = Tensor::filled_by(OP, x.shape(), |dx| {
        backward_unchecked(
            x.data(),
            dy.data(),
            layout,
            weight.map(Tensor::data),
            &eps,
            saved,
            dx,
            dweight.as_mut().map(Tensor::data_mut),
            dbias.as_mut().map(Tensor::data_mut),
            bias.act().map(|act| (bias.values(), act)),
        );
        Ok(())
    })?;
    Ok(Grads { dx, dweight, dbias })
}
