//! BatchNorm on `[N, C, *]`: statistics per channel over N and every spatial position.
//!
//! ```text
//! M = N·spatial   μ_c = Σx/M   σ²_c = Σ(x-μ_c)²/M   r_c = 1/√(σ²_c+ε)
//! x̂ = (x-μ_c)·r_c   y = γ_c·x̂ + β_c
//! training:   dx = γ_c·r_c·(dy - Σdy/M - x̂·Σ(dy·x̂)/M)     (through μ and σ²)
//! evaluation: dx = γ_c·r_c·dy                             (running stats are constants)
//! dγ_c = Σ dy·x̂   dβ_c = Σ dy
//! running:    r ← (1-m)·r + m·batch, with σ² made unbiased (·M/(M-1)) unless asked otherwise
//! ```
//! Backward is split in two steps, per-channel sums ([`channel_grad_sums`])
//! then the input gradient ([`backward_input`]), so that SyncBatchNorm can
//! all-reduce the sums between them.

use super::parallel::{self, channels, channels_mut, min_units, sum_partials};
use super::slices::Affine;
use super::{affine_at, positions, slices, BiasGrad, ChannelAct};
use super::{
    check_param, check_saved, check_view, grad_buffer, param_at, DxCoefficients, Epsilon, Grads,
    NcsLayout, Saved,
};
use crate::alloc::Scratch;
use crate::error::{check_len, ensure, Result};
use crate::float::Lane;
use crate::float::OutputBuffer;
use crate::moments::Moments;
use crate::simd::activation::Act;
use crate::simd::convert::Store;
use crate::simd::{sums, transform};
use crate::Activation;
use crate::{Float, NormError, Tensor, View};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const OP: &str = "batch_norm";

/// How running statistics follow the batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Momentum {
    /// `r ← (1 - m)·r + m·batch` with `m ∈ [0, 1]` (PyTorch default 0.1).
    Exponential(f64),
    /// Cumulative average: `m = 1/num_batches_tracked` (PyTorch's `momentum=None`).
    Cumulative,
}

impl Default for Momentum {
    fn default() -> Self {
        Momentum::Exponential(0.1)
    }
}

impl Momentum {
    /// Checks `m ∈ [0, 1]`.
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        match *self {
            Momentum::Exponential(m) => {
                ensure((0.0..=1.0).contains(&m), op, "momentum", m, "in [0, 1]")
            }
            Momentum::Cumulative => Ok(()),
        }
    }

    /// The weight of the new batch, given the count of batches *including* it.
    pub fn factor(&self, num_batches_tracked: i64) -> f64 {
        match *self {
            Momentum::Exponential(m) => m,
            Momentum::Cumulative => 1.0 / num_batches_tracked.max(1) as f64,
        }
    }
}

/// Which batch variance goes into `running_var`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunningVarEstimator {
    /// `m2/(M-1)`: PyTorch's choice (default).
    #[default]
    Unbiased,
    /// `m2/M`: ONNX, Keras, Flax.
    Biased,
}

impl RunningVarEstimator {
    /// Degrees of freedom removed.
    pub fn ddof(&self) -> u32 {
        match self {
            Self::Unbiased => 1,
            Self::Biased => 0,
        }
    }
}

/// Running statistics of a layer, borrowed for an update.
#[derive(Debug)]
pub struct RunningStatsMut<'a, T> {
    /// Per-channel running mean.
    pub mean: &'a mut [T],
    /// Per-channel running variance.
    pub var: &'a mut [T],
    /// Batches seen so far (PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: &'a mut i64,
}

/// Spatial sizes (above [`positions::MAX_SPATIAL`]) below which a
/// channel's slices, a few cache lines each, are handled in runs of
/// consecutive slices (one dispatch and one vector loop per run, the
/// statistics accumulated per channel across slices) rather than one call
/// per slice: ResNet's 7×7 and 14×14 maps. At 14×14 (196 values) one call
/// per slice left the bf16 forward at half PyTorch's speed on
/// `[32, 1024, 14, 14]`; 28×28 (784 values) slices are long enough for
/// their own calls.
const SHORT_SPATIAL: usize = 512;

/// Per-channel sums of short slices, `add(run, dy_run, first, totals)`
/// adding run by run: runs of at least a task's worth of slices, each
/// slice `j` of a run belonging to channel `(first + j) % C` and adding
/// into pair `j % m` of `totals` (`m = totals.len() / 2` pairs `Σ, Σ`), a task's own totals of
/// `min(run, C)` entries (a run of fewer slices than channels touches only
/// that many channels: totals for all `C` per task, zeroed and freed on
/// every call, faulted in fresh pages each time). The runs' totals are
/// added in run order, so the result does not depend on the thread count.
fn short_runs<T: Float>(
    x: &[T],
    dy: Option<&[T]>,
    s: usize,
    c: usize,
    add: impl Fn(&[T], Option<&[T]>, usize, &mut [f64]) + Sync,
) -> Vec<(f64, f64)> {
    let run = min_units(s);
    let m = run.min(c);
    let runs = (x.len() / s).div_ceil(run);
    let mut partials = crate::alloc::scratch::<f64>(runs * m * 2);
    parallel::for_each(
        partials
            .par_chunks_mut(m * 2)
            .zip(x.par_chunks(run * s))
            .enumerate(),
        |(t, (part, xr))| {
            let totals = &mut part[..(xr.len() / s).min(m) * 2];
            totals.fill(MaybeUninit::new(0.0));
            // SAFETY: every value was just written.
            let totals = unsafe { &mut *(totals as *mut [MaybeUninit<f64>] as *mut [f64]) };
            let dr = dy.map(|dy| &dy[t * run * s..][..xr.len()]);
            add(xr, dr, (t * run) % c, totals);
        },
    );
    let mut acc = vec![(0.0, 0.0); c];
    for (t, part) in partials.chunks(m * 2).enumerate() {
        let (first, used) = ((t * run) % c, (x.len() / s - t * run).min(m));
        for (k, p) in part[..used * 2].chunks_exact(2).enumerate() {
            // SAFETY: the first `used` pairs of every run were written above.
            let (p0, p1) = unsafe { (p[0].assume_init(), p[1].assume_init()) };
            let a = &mut acc[(first + k) % c];
            a.0 += p0;
            a.1 += p1;
        }
    }
    crate::alloc::recycle(partials);
    acc
}

/// Per-channel moments of short slices: each channel's sums centred on one
/// shift (the mean of its first sample's leading values), accumulated
/// across its slices; a channel whose shift proves too far from its mean,
/// or whose squares leave the lanes' range, is redone slice by slice.
fn short_moments<T: Float>(x: &[T], layout: NcsLayout) -> Vec<Moments> {
    let (c, s) = (layout.c, layout.spatial);
    let shifts: Vec<T::Lane> = x
        .chunks_exact(s)
        .take(c)
        .map(Moments::shift_guess)
        .collect();
    let totals = short_runs(x, None, s, c, |run, _, first, totals| {
        sums::centred_sums_slices(run, s, first, &shifts, totals)
    });
    let count = (layout.n * s) as f64;
    // On the calling thread: a channel is a few operations, unless its sums
    // fail the check and it is redone.
    totals
        .into_iter()
        .enumerate()
        .map(|(ch, (s1, s2))| {
            Moments::from_centred_sums_checked(count, shifts[ch], s1, s2).unwrap_or_else(|| {
                x.chunks_exact(s)
                    .skip(ch)
                    .step_by(c)
                    .fold(Moments::EMPTY, |acc, sl| acc.merge(Moments::of_slice(sl)))
            })
        })
        .collect()
}

/// Per-channel moments of `x` laid out as `layout`: channel `c` gathers
/// `x[n, c, :]` for every `n`. Parallel over channels.
///
/// # Errors
/// When `x.len()` is not `N·C·spatial`.
pub fn channel_moments<T: Float>(x: &[T], layout: NcsLayout) -> Result<Vec<Moments>> {
    check_len(OP, "x", x.len(), &[layout.n, layout.c, layout.spatial])?;
    let (c, s) = (layout.c, layout.spatial);
    if x.is_empty() {
        // No values (N, C or spatial 0): every channel is empty, and C may be
        // as large as any dimension a caller writes, so this is fallible.
        return crate::alloc::try_filled(OP, "moments", c, Moments::EMPTY);
    }
    if s <= positions::MAX_SPATIAL {
        return Ok(positions::moments(x, c, s));
    }
    if s < SHORT_SPATIAL {
        return Ok(short_moments(x, layout));
    }
    // Memory order, samples in tasks of at least `MIN_TASK_VALUES` values;
    // each channel's per-sample moments are merged in sample order, whatever
    // the number of threads.
    let per_sample: Vec<Vec<Moments>> = parallel::collect(
        x.par_chunks(c * s)
            .with_min_len(min_units(c * s))
            .map(|sample| sample.chunks_exact(s).map(Moments::of_slice).collect()),
    );
    Ok((0..c)
        .map(|ch| {
            per_sample
                .iter()
                .fold(Moments::EMPTY, |acc, m| acc.merge(m[ch]))
        })
        .collect())
}

/// `y = γ_c·(x - mean_c)·rstd_c + β_c` for every channel.
///
/// # Errors
/// When a slice length disagrees with the layout.
pub fn normalize<T: Float, P: Float>(
    x: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    y: &mut (impl OutputBuffer<T> + ?Sized),
) -> Result<()> {
    check_channel_args(x, layout, saved, weight, bias)?;
    let y = crate::float::slots(y);
    check_len(OP, "y", y.len(), &[layout.n, layout.c, layout.spatial])?;
    normalize_unchecked(x, layout, saved, weight, bias, y, None);
    Ok(())
}

/// The forward's per-channel coefficients `(rstd·γ, β)`: computed here
/// alone, so that a fused backward recomputes `z` from the very values the
/// forward normalized with.
fn affine_coefs<P: Float>(
    saved: &Saved,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
) -> (Scratch<f64>, Scratch<f64>) {
    let c = saved.rstd.len();
    let scale = Scratch::collect(
        c,
        (0..c).map(|ch| saved.rstd[ch] * param_at(weight, ch, 1.0)),
    );
    let shift = Scratch::collect(c, (0..c).map(|ch| param_at(bias, ch, 0.0)));
    (scale, shift)
}

/// The body of [`normalize`], arguments checked; `y = φ(x̂·γ + β)` with an
/// activation.
fn normalize_unchecked<T: Float, P: Float>(
    x: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    y: &mut [MaybeUninit<T>],
    act: Act,
) {
    let (c, s) = (layout.c, layout.spatial);
    let store = Store::for_output::<T>(x.len());
    if x.is_empty() {
        return;
    }
    if s <= positions::MAX_SPATIAL || s < SHORT_SPATIAL {
        let (scale, shift) = affine_coefs(saved, weight, bias);
        if s <= positions::MAX_SPATIAL {
            positions::normalize(x, y, (c, s), &saved.mean, &scale, &shift, act);
            return;
        }
        let coefs = Scratch::collect(
            c,
            (0..c).map(|ch| {
                let (hi, lo) = T::Lane::split(saved.mean[ch]);
                [hi, lo, T::Lane::of(scale[ch]), T::Lane::of(shift[ch])]
            }),
        );
        let run = min_units(s);
        parallel::for_each(
            x.par_chunks(run * s)
                .zip(y.par_chunks_mut(run * s))
                .enumerate(),
            |(t, (xr, yr))| transform::normalize_slices(xr, yr, s, (t * run) % c, &coefs, act),
        );
        return;
    }
    // Statistics are given: no per-channel gathering needed, so the slices
    // are visited in memory order, one sequential stream per thread.
    parallel::for_each(
        x.par_chunks(s)
            .zip(y.par_chunks_mut(s))
            .enumerate()
            .with_min_len(min_units(s)),
        |(block, (x_sl, y_sl))| {
            let ch = block % c;
            let k = Affine {
                scale: saved.rstd[ch] * param_at(weight, ch, 1.0),
                shift: param_at(bias, ch, 0.0),
            };
            slices::normalize(x_sl, y_sl, saved.mean[ch], k, store, act);
        },
    );
}

/// Training forward: per-channel statistics, then normalization, each pass
/// in memory order (one sequential stream per thread measured faster than
/// gathering a channel's strided slices to keep it in cache). Returns each
/// channel's moments (from which the caller takes `Saved` and the
/// running-statistics update).
///
/// # Errors
/// When a slice length disagrees with the layout, or ε is invalid.
pub fn forward_train<T: Float, P: Float>(
    x: &[T],
    layout: NcsLayout,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut (impl OutputBuffer<T> + ?Sized),
) -> Result<Vec<Moments>> {
    eps.validate(OP)?;
    let y = crate::float::slots(y);
    check_len(OP, "x", x.len(), &[layout.n, layout.c, layout.spatial])?;
    check_len(OP, "y", y.len(), &[layout.n, layout.c, layout.spatial])?;
    for (arg, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            check_len(OP, arg, p.len(), &[layout.c])?;
        }
    }
    let moments = channel_moments(x, layout)?;
    forward_train_unchecked(x, layout, &moments, weight, bias, eps, y, None);
    Ok(moments)
}

/// Normalizes with the batch `moments` (and `act`); returns the statistics saved.
#[allow(clippy::too_many_arguments)]
fn forward_train_unchecked<T: Float, P: Float>(
    x: &[T],
    layout: NcsLayout,
    moments: &[Moments],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut [MaybeUninit<T>],
    act: Act,
) -> Saved {
    let saved = Saved {
        mean: moments.iter().map(|m| m.mean).collect(),
        rstd: moments.iter().map(|m| eps.rstd(m.var(0))).collect(),
    };
    normalize_unchecked(x, layout, &saved, weight, bias, y, act);
    saved
}

/// Per-channel `(Σdy, Σdy·x̂)`: all the backward needs from the whole batch,
/// and also `dβ` and `dγ`.
///
/// # Errors
/// When a slice length disagrees with the layout.
pub fn channel_grad_sums<T: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_channel_args::<T, T>(x, layout, saved, None, None)?;
    check_len(OP, "dy", dy.len(), &[layout.n, layout.c, layout.spatial])?;
    let c = layout.c;
    if x.is_empty() {
        return Ok((
            crate::alloc::try_filled(OP, "sum_dy", c, 0.0)?,
            crate::alloc::try_filled(OP, "sum_dy_xhat", c, 0.0)?,
        ));
    }
    Ok(channel_grad_sums_unchecked(x, dy, layout, saved, None))
}

/// The body of [`channel_grad_sums`] on a non-empty input, arguments
/// checked; fused, the sums of `dz = φ'(z)·dy` (see [`ChannelAct`]).
fn channel_grad_sums_unchecked<T: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
    fused: Option<ChannelAct<'_>>,
) -> (Vec<f64>, Vec<f64>) {
    let (c, s) = (layout.c, layout.spatial);
    let act = fused.map(|f| f.act);
    if s <= positions::MAX_SPATIAL {
        return positions::grad_sums(x, dy, (c, s), &saved.mean, &saved.rstd, fused);
    }
    if s < SHORT_SPATIAL {
        let coefs: Vec<[T::Lane; 5]> = (0..c)
            .map(|ch| {
                let (hi, lo) = T::Lane::split(saved.mean[ch]);
                let z = affine_at(fused, ch).z::<T::Lane>(act);
                [hi, lo, T::Lane::of(saved.rstd[ch]), z.scale, z.shift]
            })
            .collect();
        let totals = short_runs(x, Some(dy), s, c, |run, dys, first, totals| {
            sums::grad_sums_slices(run, dys.unwrap_or(&[]), s, first, &coefs, totals, act)
        });
        return totals.into_iter().unzip();
    }
    // Memory order, samples in tasks of at least `MIN_TASK_VALUES` values,
    // per-sample sums added in sample order.
    let partials: Vec<(Vec<f64>, Vec<f64>)> = parallel::collect(
        x.par_chunks(c * s)
            .zip(dy.par_chunks(c * s))
            .with_min_len(min_units(c * s))
            .map(|(xs, dys)| {
                xs.chunks_exact(s)
                    .zip(dys.chunks_exact(s))
                    .enumerate()
                    .map(|(ch, (x_sl, dy_sl))| {
                        let z_k = affine_at(fused, ch);
                        slices::grad_sums(x_sl, dy_sl, saved.mean[ch], saved.rstd[ch], z_k, act)
                    })
                    .unzip()
            }),
    );
    let (a, b): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    (sum_partials(c, a), sum_partials(c, b))
}

fn channel_sums<T: Float>(
    xs: &[&[T]],
    dys: &[&[T]],
    mean: f64,
    rstd: f64,
    (z_k, act): (Affine, Act),
) -> (f64, f64) {
    xs.iter()
        .zip(dys)
        .fold((0.0, 0.0), |(a, b), (x_sl, dy_sl)| {
            let (da, db) = slices::grad_sums(x_sl, dy_sl, mean, rstd, z_k, act);
            (a + da, b + db)
        })
}

/// How the statistics used in forward depend on `x`.
#[derive(Clone, Copy, Debug)]
pub enum StatsGradient<'a> {
    /// Batch statistics over `count` values per channel (possibly across
    /// ranks), with the channel sums `(Σdy, Σdy·x̂)` over those same values.
    Batch {
        /// Values per channel the statistics were taken over.
        count: f64,
        /// Σdy per channel.
        sum_dy: &'a [f64],
        /// Σdy·x̂ per channel.
        sum_dy_xhat: &'a [f64],
    },
    /// Running statistics: constants.
    Constant,
}

/// The `dx` coefficients of one channel; `batch` is `(count, Σdy, Σdy·x̂)`
/// for batch statistics, `None` for constant ones.
fn channel_coefficients(
    eps: &Epsilon,
    weight: f64,
    rstd: f64,
    batch: Option<(f64, f64, f64)>,
) -> DxCoefficients {
    match batch {
        Some((count, sum_dy, sum_dy_xhat)) => DxCoefficients::new(
            eps,
            rstd,
            weight * sum_dy / count,
            weight * sum_dy_xhat / count,
        ),
        None => DxCoefficients::constant(rstd),
    }
}

/// `dx` from the saved statistics and, for batch statistics, the channel sums.
///
/// # Errors
/// When a slice length disagrees with the layout.
#[allow(clippy::too_many_arguments)]
pub fn backward_input<T: Float, P: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    eps: &Epsilon,
    stats: StatsGradient<'_>,
    dx: &mut (impl OutputBuffer<T> + ?Sized),
) -> Result<()> {
    check_channel_args(x, layout, saved, weight, None)?;
    let dx = crate::float::slots(dx);
    check_len(OP, "dy", dy.len(), &[layout.n, layout.c, layout.spatial])?;
    check_len(OP, "dx", dx.len(), &[layout.n, layout.c, layout.spatial])?;
    if let StatsGradient::Batch {
        sum_dy,
        sum_dy_xhat,
        ..
    } = stats
    {
        check_len(OP, "sum_dy", sum_dy.len(), &[layout.c])?;
        check_len(OP, "sum_dy_xhat", sum_dy_xhat.len(), &[layout.c])?;
    }
    backward_input_unchecked(x, dy, layout, saved, weight, eps, stats, dx, None);
    Ok(())
}

/// The body of [`backward_input`], arguments checked; fused, through the
/// activation (see [`ChannelAct`]).
#[allow(clippy::too_many_arguments)]
fn backward_input_unchecked<T: Float, P: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    eps: &Epsilon,
    stats: StatsGradient<'_>,
    dx: &mut [MaybeUninit<T>],
    fused: Option<ChannelAct<'_>>,
) {
    let (c, s) = (layout.c, layout.spatial);
    let act = fused.map(|f| f.act);
    let store = Store::for_output::<T>(x.len());
    if x.is_empty() {
        return;
    }
    let coefs: Vec<DxCoefficients> = (0..c)
        .map(|ch| {
            let batch = match stats {
                StatsGradient::Batch {
                    count,
                    sum_dy,
                    sum_dy_xhat,
                } => Some((count, sum_dy[ch], sum_dy_xhat[ch])),
                StatsGradient::Constant => None,
            };
            channel_coefficients(eps, param_at(weight, ch, 1.0), saved.rstd[ch], batch)
        })
        .collect();
    if s <= positions::MAX_SPATIAL {
        let w: Vec<f64> = (0..c).map(|ch| param_at(weight, ch, 1.0)).collect();
        positions::input_grad(x, dy, dx, (c, s), &saved.mean, &w, &coefs, fused);
        return;
    }
    if s < SHORT_SPATIAL {
        let lanes: Vec<[T::Lane; 8]> = (0..c)
            .map(|ch| {
                let (hi, lo) = T::Lane::split(saved.mean[ch]);
                let k = coefs[ch];
                let of = T::Lane::of;
                let z = affine_at(fused, ch).z::<T::Lane>(act);
                [
                    hi,
                    lo,
                    of(k.rstd),
                    of(param_at(weight, ch, 1.0)),
                    of(k.mean_g),
                    of(k.b),
                    z.scale,
                    z.shift,
                ]
            })
            .collect();
        let run = min_units(s);
        parallel::for_each(
            x.par_chunks(run * s)
                .zip(dy.par_chunks(run * s))
                .zip(dx.par_chunks_mut(run * s))
                .enumerate(),
            |(t, ((xr, dr), or))| {
                transform::input_grad_slices(xr, dr, or, s, (t * run) % c, &lanes, act)
            },
        );
        return;
    }
    // Memory order: one sequential stream per thread.
    parallel::for_each(
        x.par_chunks(s)
            .zip(dy.par_chunks(s))
            .zip(dx.par_chunks_mut(s))
            .enumerate()
            .with_min_len(min_units(s)),
        |(block, ((x_sl, dy_sl), dx_sl))| {
            let ch = block % c;
            let w = param_at(weight, ch, 1.0);
            let z_k = affine_at(fused, ch);
            slices::input_grad(
                x_sl,
                dy_sl,
                saved.mean[ch],
                w,
                coefs[ch],
                dx_sl,
                store,
                z_k,
                act,
            );
        },
    );
}

/// Backward with statistics held constant (evaluation): `dx = γ·r·dy` needs
/// no channel sums, so slices are visited in memory order in one pass; the
/// sums for dγ, dβ are kept per slice and added in order.
#[allow(clippy::too_many_arguments)]
fn backward_constant<T: Float, P: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    eps: &Epsilon,
    dx: &mut [MaybeUninit<T>],
    fused: Option<ChannelAct<'_>>,
) -> (Vec<f64>, Vec<f64>) {
    let (c, s) = (layout.c, layout.spatial);
    let act = fused.map(|f| f.act);
    let store = Store::for_output::<T>(x.len());
    let sample = c * s;
    if sample == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    if s < SHORT_SPATIAL {
        // Short slices: the sums, then dx, each a pass in runs of slices.
        let sums = channel_grad_sums_unchecked(x, dy, layout, saved, fused);
        backward_input_unchecked(
            x,
            dy,
            layout,
            saved,
            weight,
            eps,
            StatsGradient::Constant,
            dx,
            fused,
        );
        return sums;
    }
    // Slices in memory order, in tasks of at least `MIN_TASK_VALUES` values
    // (a single image is many tasks); each slice's sums kept apart and
    // added per channel in slice order, whatever the number of threads.
    let per_slice: Vec<(f64, f64)> = parallel::collect(
        x.par_chunks(s)
            .zip(dy.par_chunks(s))
            .zip(dx.par_chunks_mut(s))
            .enumerate()
            .with_min_len(min_units(s))
            .map(|(i, ((x_sl, dy_sl), dx_sl))| {
                let ch = i % c;
                let (mean, rstd) = (saved.mean[ch], saved.rstd[ch]);
                let z_k = affine_at(fused, ch);
                let sums = slices::grad_sums(x_sl, dy_sl, mean, rstd, z_k, act);
                let w = param_at(weight, ch, 1.0);
                let k = DxCoefficients::constant(rstd);
                slices::input_grad(x_sl, dy_sl, mean, w, k, dx_sl, store, z_k, act);
                sums
            }),
    );
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
    for (i, (a, b)) in per_slice.into_iter().enumerate() {
        sum_dy[i % c] += a;
        sum_dy_xhat[i % c] += b;
    }
    (sum_dy, sum_dy_xhat)
}

/// Bytes of one channel's `x` and `dy` up to which backward is fused per
/// channel (half of a 512 KiB L2).
const FUSED_CHANNEL_BYTES: usize = 256 << 10;

/// Bytes of one slice (one sample's part of a channel) from which gathering
/// a channel's slices pays: below it the slices are a few cache lines each,
/// spaced `C·S` values apart, and the gathering pass waits on memory for
/// every one of them (ResNet-50's last stage, `[32, 2048, 7, 7]`: 196-byte
/// slices) while two passes in memory order stream.
const FUSED_MIN_SLICE_BYTES: usize = 4 << 10;

/// Backward fused per channel (sums, then `dx` while the channel is in
/// cache) when a channel fits in L2, else two memory-order passes; returns
/// `(Σdy, Σdy·x̂)` per channel.
#[allow(clippy::too_many_arguments)]
fn backward_fused<T: Float, P: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    eps: &Epsilon,
    batch_stats: bool,
    dx: &mut [MaybeUninit<T>],
    fused: Option<ChannelAct<'_>>,
) -> (Vec<f64>, Vec<f64>) {
    let (c, s) = (layout.c, layout.spatial);
    let count = (layout.n * s) as f64;
    let act = fused.map(|f| f.act);
    if s <= positions::MAX_SPATIAL {
        // Whole samples are short rows: sums, then dx, each in memory order.
        let sums = channel_grad_sums_unchecked(x, dy, layout, saved, fused);
        let stats = if batch_stats {
            StatsGradient::Batch {
                count,
                sum_dy: &sums.0,
                sum_dy_xhat: &sums.1,
            }
        } else {
            StatsGradient::Constant
        };
        backward_input_unchecked(x, dy, layout, saved, weight, eps, stats, dx, fused);
        return sums;
    }
    if !batch_stats {
        return backward_constant(x, dy, layout, saved, weight, eps, dx, fused);
    }
    let size = std::mem::size_of::<T>();
    if layout.n * s * 2 * size > FUSED_CHANNEL_BYTES || s * size < FUSED_MIN_SLICE_BYTES {
        // A channel's x and dy would not stay in L2 between the two passes,
        // or its slices are too short to gather: two passes in memory order
        // stream better.
        let sums = channel_grad_sums_unchecked(x, dy, layout, saved, fused);
        let stats = StatsGradient::Batch {
            count,
            sum_dy: &sums.0,
            sum_dy_xhat: &sums.1,
        };
        backward_input_unchecked(x, dy, layout, saved, weight, eps, stats, dx, fused);
        return sums;
    }
    let store = Store::for_output::<T>(x.len());
    parallel::collect(
        channels(x, c, s)
            .into_par_iter()
            .zip(channels(dy, c, s))
            .zip(channels_mut(dx, c, s))
            .enumerate()
            .with_min_len(min_units(layout.n * s))
            .map(|(ch, ((xs, dys), dxs))| {
                let (mean, rstd) = (saved.mean[ch], saved.rstd[ch]);
                let z_k = affine_at(fused, ch);
                let (sum_dy, sum_dy_xhat) = channel_sums(&xs, &dys, mean, rstd, (z_k, act));
                let w = param_at(weight, ch, 1.0);
                let coefs = channel_coefficients(eps, w, rstd, Some((count, sum_dy, sum_dy_xhat)));
                for ((x_sl, dy_sl), dx_sl) in xs.into_iter().zip(dys).zip(dxs) {
                    slices::input_grad(x_sl, dy_sl, mean, w, coefs, dx_sl, store, z_k, act);
                }
                (sum_dy, sum_dy_xhat)
            }),
    )
    .into_iter()
    .unzip()
}

/// Folds a batch's per-channel `(mean, var)` into running statistics.
/// Nothing is written unless every new value is finite; `num_batches_tracked`
/// is incremented with the update.
///
/// # Errors
/// [`NormError::NonFiniteStatistics`] when the batch statistics (or the
/// updated running values in `T`) are not finite.
pub fn update_running<T: Float>(
    op: &'static str,
    running: RunningStatsMut<'_, T>,
    batch_mean: &[f64],
    batch_var: &[f64],
    momentum: Momentum,
) -> Result<()> {
    let c = running.mean.len();
    check_len(op, "running_var", running.var.len(), &[c])?;
    check_len(op, "batch mean", batch_mean.len(), &[c])?;
    check_len(op, "batch var", batch_var.len(), &[c])?;
    let tracked = running.num_batches_tracked.saturating_add(1);
    let m = momentum.factor(tracked);
    // The new values go to scratch first: an error leaves the running
    // statistics as they were.
    let mut new_mean = Scratch::filled(c, T::default());
    let mut new_var = Scratch::filled(c, T::default());
    // `(1 - m)·running + m·batch` in f64, rounded once to `T`. Finiteness
    // is gathered without a branch per channel (a check per value and type
    // made this loop as slow as BatchNorm1d's normalization on 4096
    // channels); the first failing channel is looked for only on failure.
    let update = |old: T, batch: f64| (1.0 - m) * old.to_f64() + m * batch;
    let mut finite = true;
    for ch in 0..c {
        let (bm, bv) = (batch_mean[ch], batch_var[ch]);
        let nm = T::from_f64(update(running.mean[ch], bm));
        let nv = T::from_f64(update(running.var[ch], bv));
        finite &=
            bm.is_finite() & bv.is_finite() & nm.to_f64().is_finite() & nv.to_f64().is_finite();
        new_mean[ch] = nm;
        new_var[ch] = nv;
    }
    if !finite {
        for ch in 0..c {
            let (bm, bv) = (batch_mean[ch], batch_var[ch]);
            // The first value that is not finite, in the type it must fit:
            // the batch statistics are f64; the updated running values are
            // `T` and may overflow it (an f32 running_var past 3.4e38) even
            // when the f64 statistics are finite.
            let bad = if !bm.is_finite() {
                Some(("batch mean", bm, f64::NAME))
            } else if !bv.is_finite() {
                Some(("batch variance", bv, f64::NAME))
            } else if !new_mean[ch].to_f64().is_finite() {
                Some((
                    "updated running_mean",
                    update(running.mean[ch], bm),
                    T::NAME,
                ))
            } else if !new_var[ch].to_f64().is_finite() {
                Some(("updated running_var", update(running.var[ch], bv), T::NAME))
            } else {
                None
            };
            if let Some((what, value, dtype)) = bad {
                return Err(NormError::NonFiniteStatistics {
                    op,
                    channel: ch,
                    what,
                    value,
                    dtype,
                    mean: bm,
                    var: bv,
                });
            }
        }
    }
    running.mean.copy_from_slice(&new_mean);
    running.var.copy_from_slice(&new_var);
    *running.num_batches_tracked = tracked;
    Ok(())
}

fn check_channel_args<T: Float, P: Float>(
    x: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
) -> Result<()> {
    check_len(OP, "x", x.len(), &[layout.n, layout.c, layout.spatial])?;
    check_len(OP, "saved.mean", saved.mean.len(), &[layout.c])?;
    check_len(OP, "saved.rstd", saved.rstd.len(), &[layout.c])?;
    if let Some(w) = weight {
        check_len(OP, "weight", w.len(), &[layout.c])?;
    }
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), &[layout.c])?;
    }
    Ok(())
}

/// Options of a functional BatchNorm call (PyTorch's `F.batch_norm`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormOptions {
    /// Normalize with batch statistics (`training=True`) or with the running ones.
    pub use_batch_stats: bool,
    /// Fold the batch statistics into the running ones. Independent of
    /// `use_batch_stats`: with running statistics used to normalize, they are
    /// read before the update.
    pub update_running_stats: bool,
    /// ε and its placement.
    pub eps: Epsilon,
    /// Momentum of the running statistics.
    pub momentum: Momentum,
    /// Batch variance used for `running_var`.
    pub running_var: RunningVarEstimator,
}

impl BatchNormOptions {
    /// Training as PyTorch: batch statistics, running statistics updated.
    pub fn training() -> Self {
        Self {
            use_batch_stats: true,
            update_running_stats: true,
            eps: Epsilon::default(),
            momentum: Momentum::default(),
            running_var: RunningVarEstimator::default(),
        }
    }

    /// Evaluation as PyTorch: running statistics, nothing updated.
    pub fn eval() -> Self {
        Self {
            use_batch_stats: false,
            update_running_stats: false,
            ..Self::training()
        }
    }
}

/// Running statistics of a functional call, owned views.
pub type Running<'a, T> = Option<RunningStatsMut<'a, T>>;

/// BatchNorm forward as PyTorch's `F.batch_norm`: `x` is `[N, C, *]`;
/// returns `y` and the statistics used (for [`batch_norm_backward`]).
/// A zero-size batch returns an empty `y` and leaves the running statistics alone.
///
/// # Errors
/// Rank < 2; a parameter or running statistic not of length C; evaluation
/// without running statistics; batch statistics over a single value per
/// channel; invalid ε or momentum; non-finite batch statistics (running
/// statistics are then left unchanged).
///
/// ```
/// use normlab::{Tensor, kernels::batch_norm::{batch_norm, BatchNormOptions}};
/// let x = Tensor::new(vec![2, 1], vec![1.0f32, 3.0]).unwrap();
/// let (mut rm, mut rv, mut seen) = (vec![0.0f32], vec![1.0f32], 0i64);
/// let running = normlab::kernels::batch_norm::RunningStatsMut {
///     mean: &mut rm, var: &mut rv, num_batches_tracked: &mut seen };
/// let (y, _) = batch_norm(&x, Some(running), None, None, &BatchNormOptions::training()).unwrap();
/// assert!((y.data()[0] + 1.0).abs() < 1e-4);
/// // running_mean = 0.9·0 + 0.1·2, running_var = 0.9·1 + 0.1·2 (unbiased variance of [1, 3])
/// assert_eq!((rm[0], rv[0], seen), (0.2, 1.1, 1));
/// ```
pub fn batch_norm<T: Float>(
    x: &(impl View<T> + ?Sized),
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
) -> Result<(Tensor<T>, Saved)> {
    batch_norm_with(x, running, weight, bias, options, None)
}

/// BatchNorm followed by an activation, one pass: `y = φ(x̂·γ + β)`, as
/// `φ(F.batch_norm(…))` with the same statistics and running-statistics
/// update as [`batch_norm`]. Its backward is [`batch_norm_act_backward`].
///
/// # Errors
/// As [`batch_norm`].
///
/// ```
/// use normlab::{Activation, Tensor, kernels::batch_norm::{batch_norm_act, BatchNormOptions}};
/// let x = Tensor::new(vec![2, 1], vec![1.0f32, 3.0]).unwrap();
/// let opts = BatchNormOptions::training();
/// let (y, _) = batch_norm_act(&x, None, None, None, &opts, Activation::Relu).unwrap();
/// assert_eq!(y.data()[0], 0.0); // relu(-1)
/// assert!((y.data()[1] - 1.0).abs() < 1e-4);
/// ```
pub fn batch_norm_act<T: Float>(
    x: &(impl View<T> + ?Sized),
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
    act: Activation,
) -> Result<(Tensor<T>, Saved)> {
    batch_norm_with(x, running, weight, bias, options, Some(act))
}

/// [`batch_norm`], with an activation when `act` is given.
fn batch_norm_with<T: Float>(
    x: &(impl View<T> + ?Sized),
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
    act: Act,
) -> Result<(Tensor<T>, Saved)> {
    let op = OP;
    let layout = check_args(op, x.shape(), &running, weight, bias, options)?;
    let update = options.update_running_stats && running.is_some();
    let count = layout.n * layout.spatial;
    let too_few = || NormError::TooFewValues {
        op,
        what: "value per channel",
        shape: x.shape().into(),
    };
    let (w, b) = (weight.map(Tensor::data), bias.map(Tensor::data));
    if check_view(op, "x", x)? == 0 {
        // Zero-size batch (and output): nothing to normalize or update, and
        // no statistics to save (C may be any size here, see `Saved::for_input`).
        // Evaluation without running statistics is still an error.
        if !options.use_batch_stats && running.is_none() {
            return Err(NormError::MissingRunningStats { op });
        }
        return Ok((
            Tensor::new(x.shape().to_vec(), Vec::new())?,
            Saved::default(),
        ));
    }
    let (y, (saved, moments)) = Tensor::filled_by(op, x.shape(), |y| {
        if options.use_batch_stats {
            if count == 1 {
                return Err(too_few());
            }
            let (x, eps) = (x.data(), &options.eps);
            let moments = channel_moments(x, layout)?;
            let saved = forward_train_unchecked(x, layout, &moments, w, b, eps, y, act);
            Ok((saved, Some(moments)))
        } else {
            let r = running
                .as_ref()
                .ok_or(NormError::MissingRunningStats { op })?;
            let saved = Saved {
                mean: r.mean.iter().map(|m| m.to_f64()).collect(),
                rstd: r.var.iter().map(|v| options.eps.rstd(v.to_f64())).collect(),
            };
            normalize_unchecked(x.data(), layout, &saved, w, b, y, act);
            // Running statistics may still be updated from the batch (read before).
            let moments = match (update, count) {
                (false, _) => None,
                (true, 1) => return Err(too_few()),
                (true, _) => Some(channel_moments(x.data(), layout)?),
            };
            Ok((saved, moments))
        }
    })?;
    if let Some(moments) = &moments {
        check_finite_moments(op, moments)?;
        if let (true, Some(running)) = (update, running) {
            update_running_from(op, running, moments, options)?;
        }
    }
    Ok((y, saved))
}

/// [`NormError::NonFiniteStatistics`] for the first channel whose batch mean
/// or variance (kept in f64) is not finite, e.g. from an infinite input.
pub(crate) fn check_finite_moments(op: &'static str, moments: &[Moments]) -> Result<()> {
    let Some(ch) = moments
        .iter()
        .position(|m| !(m.mean.is_finite() && m.m2.is_finite()))
    else {
        return Ok(());
    };
    let (mean, var) = (moments[ch].mean, moments[ch].var(0));
    let (what, value) = if mean.is_finite() {
        ("batch variance", var)
    } else {
        ("batch mean", mean)
    };
    Err(NormError::NonFiniteStatistics {
        op,
        channel: ch,
        what,
        value,
        dtype: f64::NAME,
        mean,
        var,
    })
}

/// Validates a functional call's options and argument shapes; returns `x`'s layout.
pub(crate) fn check_args<T: Float>(
    op: &'static str,
    shape: &[usize],
    running: &Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
) -> Result<NcsLayout> {
    options.eps.validate(op)?;
    options.momentum.validate(op)?;
    let layout = NcsLayout::of(op, shape, 2)?;
    let c = [layout.c];
    check_param(op, "weight", weight, &c, shape)?;
    check_param(op, "bias", bias, &c, shape)?;
    if let Some(r) = running {
        crate::error::check_shape(op, "running_mean", &[r.mean.len()], &c, shape)?;
        crate::error::check_shape(op, "running_var", &[r.var.len()], &c, shape)?;
    }
    Ok(layout)
}

/// Folds per-channel batch moments into running statistics with the
/// options' momentum and variance estimator (see [`update_running`]).
pub(crate) fn update_running_from<T: Float>(
    op: &'static str,
    running: RunningStatsMut<'_, T>,
    moments: &[Moments],
    options: &BatchNormOptions,
) -> Result<()> {
    let ddof = options.running_var.ddof();
    let mean = Scratch::collect(moments.len(), moments.iter().map(|m| m.mean));
    let var = Scratch::collect(moments.len(), moments.iter().map(|m| m.var(ddof)));
    update_running(op, running, &mean, &var, options.momentum)
}

/// Gradients of [`batch_norm`]. `batch_stats` says whether forward used batch
/// statistics (then the gradient flows through them) or running ones.
///
/// # Errors
/// Shapes that disagree with the forward call's.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
    batch_stats: bool,
) -> Result<Grads<T>> {
    let bias = BiasGrad::Plain { with_bias };
    backward_with(x, dy, weight, bias, eps, saved, batch_stats)
}

/// Gradients of [`batch_norm_act`] with respect to `x`, γ and β (`dy` is
/// the gradient at its output `y`). ReLU: one backward through the
/// activation and the normalization, its mask recomputed from `z = x̂·γ + β`
/// (from `x`, the saved statistics and the parameters; `y` is not read).
/// Tanh and sigmoid: their derivative from `y`, as PyTorch's (see
/// [`Activation::derivative_from_output`]), then the normalization's
/// backward; without `y` (and always in bf16 and f16) recomputed from `x`
/// in both passes. `bias` is the forward's β (also when it is not trained:
/// `z` needs it).
///
/// # Errors
/// Shapes that disagree with the forward call's.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_act_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    y: Option<&dyn View<T>>,
    dy: &impl View<T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    act: Activation,
    eps: Epsilon,
    saved: &Saved,
    batch_stats: bool,
) -> Result<Grads<T>> {
    let mut slot = None;
    let (dy, act) = super::act_output_grad(OP, x.shape(), act, y, dy, &mut slot)?;
    let bias = BiasGrad::Fused { bias, act };
    backward_with(x, dy, weight, bias, eps, saved, batch_stats)
}

/// The body of [`batch_norm_backward`] and [`batch_norm_act_backward`].
fn backward_with<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    bias: BiasGrad<'_, T>,
    eps: Epsilon,
    saved: &Saved,
    batch_stats: bool,
) -> Result<Grads<T>> {
    let op = OP;
    let with_bias = bias.with_bias();
    let layout = NcsLayout::of(op, x.shape(), 2)?;
    crate::error::check_shape(op, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(op, "weight", weight, &[layout.c], x.shape())?;
    if let BiasGrad::Fused { bias, .. } = bias {
        check_param(op, "bias", bias, &[layout.c], x.shape())?;
    }
    let numel = check_view(op, "x", x)?;
    check_view(op, "dy", dy)?;
    check_saved(op, saved, layout.c, numel)?;
    if numel == 0 {
        // No values, so no gradient: zeros for the parameters that are there.
        return Ok(Grads {
            dx: Tensor::new(x.shape().to_vec(), Vec::new())?,
            dweight: grad_buffer(weight.is_some(), &[layout.c])?,
            dbias: grad_buffer(with_bias, &[layout.c])?,
        });
    }
    let w = weight.map(Tensor::data);
    // The forward's coefficients, only where the kernels recompute `z`.
    let coefs = bias
        .act()
        .map(|act| (act, affine_coefs(saved, w, bias.values())));
    let fused = coefs.as_ref().map(|(act, (scale, shift))| ChannelAct {
        act: *act,
        scale,
        shift,
    });
    let (shape, x, dy) = (x.shape(), x.data(), dy.data());
    let (dx, (sum_dy, sum_dy_xhat)) = Tensor::filled_by(op, shape, |dx| {
        Ok::<_, NormError>(backward_fused(
            x,
            dy,
            layout,
            saved,
            w,
            &eps,
            batch_stats,
            dx,
            fused,
        ))
    })?;
    let to_tensor = |v: &[f64]| Tensor::from_vec(v.iter().map(|&a| T::from_f64(a)).collect());
    Ok(Grads {
        dx,
        dweight: weight.map(|_| to_tensor(&sum_dy_xhat)),
        dbias: with_bias.then(|| to_tensor(&sum_dy)),
    })
}
