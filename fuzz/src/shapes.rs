//! Shapes and options from the bytes, fed to the shape-taking public
//! functions of the core: `Tensor::new`, `TensorView::new`, the functional
//! forward/backward forms and the slice kernels with explicit layouts. Dims
//! include 0 and huge values (2^31, 2^40, usize::MAX, …); weights, running
//! statistics and gradients get matching or mismatched shapes. The contract
//! is only "returns Ok or Err": a panic or abort is a bug.
use arbitrary::{Result, Unstructured};
use normlab::kernels::batch_norm::{self, BatchNormOptions, RunningStatsMut};
use normlab::kernels::group_norm::{self, GroupLayout};
use normlab::kernels::instance_norm::{instance_norm, instance_norm_backward};
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{self, lrn, lrn_backward};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::kernels::rows::{self, RowNorm};
use normlab::kernels::NcsLayout;
use normlab::{
    EpsPlacement, Epsilon, EvenWindow, LrnOptions, LrnRegion, Momentum, RunningVarEstimator, Saved,
    Tensor, TensorView,
};

/// Values are only built for tensors smaller than this.
const MAX_BUILT: usize = 4096;
fn size(u: &mut Unstructured<'_>) -> Result<usize> {
    const SPECIAL: [usize; 12] = [
        0,
        1,
        2,
        3,
        1 << 31,
        1 << 32,
        1 << 40,
        1 << 62,
        usize::MAX,
        usize::MAX / 2 + 1,
        (1 << 32) + 1,
        usize::MAX / 3,
    ];
    Ok(if u.ratio(1, 4)? {
        *u.choose(&SPECIAL)?
    } else {
        u.int_in_range(0..=9)?
    })
}

fn shape(u: &mut Unstructured<'_>) -> Result<Vec<usize>> {
    let rank = u.int_in_range(0..=5)?;
    (0..rank).map(|_| size(u)).collect()
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn value(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => -f32::INFINITY,
        3 => f32::MAX,
        4 => 0.0,
        5 => f32::MIN_POSITIVE / 2.0,
        _ => f32::from(u.arbitrary::<i8>()?) / 8.0,
    })
}

fn values(u: &mut Unstructured<'_>, n: usize) -> Result<Vec<f32>> {
    (0..n).map(|_| value(u)).collect()
}

/// Values for `shape` when it is small, else a few values (a mismatch).
fn data_for(u: &mut Unstructured<'_>, shape: &[usize]) -> Result<Vec<f32>> {
    match numel(shape) {
        Some(n) if n < MAX_BUILT && !u.ratio(1, 16)? => values(u, n),
        _ => {
            let n = u.int_in_range(0..=8)?;
            values(u, n)
        }
    }
}

/// Tensor of a shape like `like` (or an odd one) when it can be built.
fn tensor_like(u: &mut Unstructured<'_>, like: &[usize]) -> Result<Option<Tensor<f32>>> {
    let shape = if u.ratio(3, 4)? {
        like.to_vec()
    } else {
        shape(u)?
    };
    if numel(&shape).is_none() || numel(&shape) >= Some(MAX_BUILT) {
        return Ok(None);
    }
    let data = data_for(u, &shape)?;
    Ok(Tensor::new(shape, data).ok())
}

/// An optional per-channel or per-feature parameter, mostly of `like`'s shape.
fn param(u: &mut Unstructured<'_>, like: &[usize]) -> Result<Option<Tensor<f32>>> {
    if u.ratio(1, 3)? {
        return Ok(None);
    }
    tensor_like(u, like)
}

fn eps(u: &mut Unstructured<'_>) -> Result<Epsilon> {
    let value = *u.choose(&[1e-5, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e300])?;
    let placement = if u.arbitrary()? {
        EpsPlacement::InsideSqrt
    } else {
        EpsPlacement::AddToStd
    };
    Ok(Epsilon { value, placement })
}

fn lrn_options(u: &mut Unstructured<'_>) -> Result<LrnOptions> {
    Ok(LrnOptions {
        size: size(u)?,
        alpha: *u.choose(&[1e-4, 0.0, -1.0, f64::NAN, 1e300])?,
        beta: *u.choose(&[0.75, 0.0, -1.0, f64::INFINITY])?,
        k: *u.choose(&[1.0, 0.0, -1.0, f64::NAN])?,
        alpha_over_size: u.arbitrary()?,
        region: if u.arbitrary()? {
            LrnRegion::AcrossChannels
        } else {
            LrnRegion::WithinChannel
        },
        even_window: if u.arbitrary()? {
            EvenWindow::Torch
        } else {
            EvenWindow::Onnx
        },
    })
}

fn axis(u: &mut Unstructured<'_>) -> Result<isize> {
    Ok(if u.ratio(1, 8)? {
        *u.choose(&[isize::MIN, isize::MAX, isize::MIN + 1])?
    } else {
        u.int_in_range(-7..=7)?
    })
}

/// Saved statistics of a plausible or odd length.
fn saved(u: &mut Unstructured<'_>, like: usize) -> Result<Saved> {
    let n = if like < MAX_BUILT && u.ratio(3, 4)? {
        like
    } else {
        u.int_in_range(0..=8)?
    };
    let mut s = Saved::zeros("fuzz", n).expect("a small buffer");
    for r in s.rstd.iter_mut() {
        *r = 1.0;
    }
    Ok(s)
}

fn functional(u: &mut Unstructured<'_>, shape: &[usize], data: &[f32]) -> Result<()> {
    let Ok(x) = TensorView::new(shape, data) else {
        return Ok(());
    };
    let dy_shape = if u.ratio(3, 4)? {
        shape.to_vec()
    } else {
        self::shape(u)?
    };
    let dy_data = data_for(u, &dy_shape)?;
    let dy = TensorView::new(&dy_shape, &dy_data);
    let channels = shape.get(1).copied().unwrap_or(1);
    match u.int_in_range(0..=5u8)? {
        0 | 1 => {
            let rms = u.arbitrary::<bool>()?;
            let axis = axis(u)?;
            let tail = shape
                .get(axis.rem_euclid(shape.len().max(1) as isize) as usize..)
                .unwrap_or(&[])
                .to_vec();
            let weight = param(u, &tail)?;
            let bias = param(u, &tail)?;
            let eps = eps(u)?;
            let (out, saved) = if rms {
                rms_norm(&x, axis, weight.as_ref(), eps)
            } else {
                layer_norm(&x, axis, weight.as_ref(), bias.as_ref(), eps)
            }
            .map_or((None, None), |(y, s)| (Some(y), Some(s)));
            let saved = match saved {
                Some(s) => s,
                None => self::saved(u, 4)?,
            };
            drop(out);
            if let Ok(dy) = dy {
                let _ = if rms {
                    rms_norm_backward(&x, &dy, axis, weight.as_ref(), eps, &saved)
                } else {
                    layer_norm_backward(&x, &dy, axis, weight.as_ref(), bias.is_some(), eps, &saved)
                };
            }
        }
        2 | 3 => {
            let instance = u.arbitrary::<bool>()?;
            let weight = param(u, &[channels])?;
            let bias = param(u, &[channels])?;
            let options = BatchNormOptions {
                use_batch_stats: u.arbitrary()?,
                update_running_stats: u.arbitrary()?,
                eps: eps(u)?,
                momentum: if u.arbitrary()? {
                    Momentum::Cumulative
                } else {
                    Momentum::Exponential(*u.choose(&[0.1, 0.0, 1.0, -0.5, 2.0, f64::NAN])?)
                },
                running_var: if u.arbitrary()? {
                    RunningVarEstimator::Unbiased
                } else {
                    RunningVarEstimator::Biased
                },
            };
            let running_len = if channels < MAX_BUILT && u.ratio(3, 4)? {
                channels
            } else {
                u.int_in_range(0..=8)?
            };
            let mut mean = values(u, running_len)?;
            let mut var = values(u, running_len)?;
            let mut tracked = *u.choose(&[0i64, 1, -1, i64::MAX, i64::MIN])?;
            let running = u.arbitrary::<bool>()?.then_some(RunningStatsMut {
                mean: &mut mean,
                var: &mut var,
                num_batches_tracked: &mut tracked,
            });
            let call = if instance {
                instance_norm
            } else {
                batch_norm::batch_norm
            };
            let saved = match call(&x, running, weight.as_ref(), bias.as_ref(), &options) {
                Ok((_, s)) => s,
                Err(_) => self::saved(u, channels)?,
            };
            if let Ok(dy) = dy {
                let back = if instance {
                    instance_norm_backward
                } else {
                    batch_norm::batch_norm_backward
                };
                let _ = back(
                    &x,
                    &dy,
                    weight.as_ref(),
                    bias.is_some(),
                    options.eps,
                    &saved,
                    options.use_batch_stats,
                );
            }
        }
        4 => {
            let groups = size(u)?;
            let weight = param(u, &[channels])?;
            let bias = param(u, &[channels])?;
            let eps = eps(u)?;
            let saved =
                match group_norm::group_norm(&x, groups, weight.as_ref(), bias.as_ref(), eps) {
                    Ok((_, s)) => s,
                    Err(_) => self::saved(u, 4)?,
                };
            if let Ok(dy) = dy {
                let _ = group_norm::group_norm_backward(
                    &x,
                    &dy,
                    groups,
                    weight.as_ref(),
                    bias.is_some(),
                    eps,
                    &saved,
                );
            }
        }
        _ => {
            let options = lrn_options(u)?;
            let _ = lrn(&x, &options);
            if let Ok(dy) = dy {
                let _ = lrn_backward(&x, &dy, &options);
            }
        }
    }
    Ok(())
}

/// The slice kernels, whose layout is given apart from the slices.
fn slices(u: &mut Unstructured<'_>, data: &[f32]) -> Result<()> {
    let (a, b, c) = (size(u)?, size(u)?, size(u)?);
    let eps = eps(u)?;
    let mut y = vec![0.0f32; data.len()];
    let len = u.int_in_range(0..=8)?;
    let w = values(u, len)?;
    let weight = u.arbitrary::<bool>()?.then_some(&w[..]);
    match u.int_in_range(0..=5u8)? {
        0 | 1 => {
            let norm = if u.arbitrary::<bool>()? {
                RowNorm::LayerNorm
            } else {
                RowNorm::RmsNorm
            };
            let mut saved = Saved::zeros("fuzz", a.min(MAX_BUILT)).expect("a small buffer");
            let _ = rows::forward(norm, data, a, b, weight, weight, &eps, &mut y, &mut saved);
            let mut dx = vec![0.0f32; data.len()];
            let (mut dw, mut db) = (vec![0.0f32; len], vec![0.0f32; len]);
            let _ = rows::backward(
                norm,
                data,
                data,
                a,
                b,
                weight,
                &eps,
                &saved,
                &mut dx,
                Some(&mut dw[..]),
                Some(&mut db[..]),
            );
        }
        2 => {
            let layout = NcsLayout {
                n: a,
                c: b,
                spatial: c,
            };
            let _ = batch_norm::channel_moments(data, layout);
            let _ = batch_norm::forward_train(data, layout, weight, weight, &eps, &mut y);
            let saved = Saved::zeros("fuzz", b.min(MAX_BUILT)).expect("a small buffer");
            let _ = batch_norm::normalize(data, layout, &saved, weight, weight, &mut y);
            let _ = batch_norm::channel_grad_sums(data, data, layout, &saved);
        }
        3 => {
            let layout = GroupLayout {
                ncs: NcsLayout {
                    n: a,
                    c: b,
                    spatial: c,
                },
                groups: size(u)?,
            };
            let mut saved = Saved::zeros("fuzz", a.min(MAX_BUILT)).expect("a small buffer");
            let _ = group_norm::forward(data, layout, weight, weight, &eps, &mut y, &mut saved);
            let mut dx = vec![0.0f32; data.len()];
            let _ = group_norm::backward(
                data, data, layout, weight, &eps, &saved, &mut dx, None, None,
            );
        }
        _ => {
            let shape = shape(u)?;
            let options = lrn_options(u)?;
            let _ = lrn::forward(data, &shape, &options, &mut y);
            let mut dx = vec![0.0f32; data.len()];
            let _ = lrn::backward(data, data, &shape, &options, &mut dx);
        }
    }
    Ok(())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let shape = shape(u)?;
    let data = data_for(u, &shape)?;
    // Building a tensor never allocates from the shape: any shape goes.
    let _ = TensorView::new(&shape, &data);
    let _ = Tensor::new(shape.clone(), data.clone());
    if u.ratio(1, 4)? {
        return slices(u, &data);
    }
    // Every shape goes, empty ones with huge dimensions included: the
    // library must allocate nothing proportional to those it does not need
    // (the fuzz binary's allocator refuses large requests, so an infallible
    // allocation of that kind aborts and is reported).
    functional(u, &shape, &data)
}

/// Shapes and options from the bytes, fed to the shape-taking public
/// functions of the core: `Tensor::new`, `TensorView::new`, the functional
/// forward/backward forms and the slice kernels with explicit layouts. Dims
/// include 0 and huge values (2^31, 2^40, usize::MAX, …); weights, running
/// statistics and gradients get matching or mismatched shapes. The contract
/// is only "returns Ok or Err": a panic or abort is a bug.
pub fn shapes(bytes: &[u8]) {
    let _ = run(&mut Unstructured::new(bytes));
}
