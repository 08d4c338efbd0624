//! Inputs a hostile caller can pass: shapes whose element count overflows,
//! empty tensors with huge dimensions, absurd sizes, state dicts with bad
//! values. Each gets a typed error or the documented result — never a
//! panic, an abort, or a phantom tensor that passes.

mod common;

use common::*;
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_backward, BatchNormOptions, RunningStatsMut,
};
use normlab::kernels::group_norm::{self, group_norm, group_norm_backward, GroupLayout};
use normlab::kernels::instance_norm::instance_norm;
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{lrn, lrn_backward, LrnOptions};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::kernels::{NcsLayout, Saved};
use normlab::layers::prelude::*;
use normlab::layers::{BatchNormConfig, InstanceNormConfig, LayerNormConfig};
use normlab::state::{self, StateDict, StateFile};
use normlab::{Epsilon, NormError, Tensor, View};

const HUGE: usize = 1 << 40;

/// A view whose shape promises more values than it holds: a caller's own
/// `View` implementation cannot be trusted to keep them consistent.
struct Phantom<'a> {
    shape: &'a [usize],
}

impl View<f32> for Phantom<'_> {
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> &[f32] {
        &[]
    }
}

fn x(shape: &[usize]) -> Tensor<f32> {
    normal(&mut rng(3), shape, 0.0, 1.0).cast()
}

/// An absent parameter of the slice kernels (its element type named).
const NO_PARAM: Option<&[f32]> = None;

#[test]
fn shapes_whose_element_count_overflows_are_refused() {
    for shape in [
        vec![4, 1 << 31, 1 << 31],
        vec![1 << 32, 1 << 32],
        vec![usize::MAX, 2],
        vec![0, HUGE, HUGE],
    ] {
        let err = Tensor::<f32>::new(shape.clone(), vec![]).unwrap_err();
        assert!(
            matches!(err, NormError::SizeOverflow { .. }),
            "{shape:?}: {err}"
        );
        assert!(err.to_string().contains("overflows"), "{err}");
        assert!(Tensor::<f32>::zeros(&shape).is_err());
        assert!(Tensor::<f32>::full(&shape, 1.0).is_err());
    }
}

#[test]
fn phantom_tensors_never_pass() {
    let eps = Epsilon::default();
    for shape in [
        &[4, 1 << 31, 1 << 31][..],
        &[2, 3, 4][..],
        &[2, 1 << 62, 4][..],
    ] {
        let p = Phantom { shape };
        assert!(layer_norm(&p, -1, None, None, eps).is_err(), "{shape:?}");
        assert!(rms_norm(&p, -1, None, eps).is_err());
        assert!(group_norm(&p, 1, None, None, eps).is_err());
        assert!(instance_norm(&p, None, None, None, &BatchNormOptions::training()).is_err());
        assert!(batch_norm(&p, None, None, None, &BatchNormOptions::training()).is_err());
        assert!(lrn(&p, &LrnOptions::new(3)).is_err());
        let saved = Saved::default();
        assert!(layer_norm_backward(&p, &p, -1, None, false, eps, &saved).is_err());
        assert!(rms_norm_backward(&p, &p, -1, None, eps, &saved).is_err());
        assert!(group_norm_backward(&p, &p, 1, None, false, eps, &saved).is_err());
        assert!(batch_norm_backward(&p, &p, None, false, eps, &saved, true).is_err());
        assert!(lrn_backward(&p, &p, &LrnOptions::new(3)).is_err());
    }
}

#[test]
fn empty_tensors_with_a_huge_dimension_allocate_nothing_for_it() {
    let eps = Epsilon::default();
    // [0, 2^40]: no statistics for 2^40 channels are allocated or needed.
    let x = Tensor::<f32>::new(vec![0, HUGE], vec![]).unwrap();
    let (y, saved) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
    assert_eq!(y.shape(), &[0, HUGE]);
    assert!(saved.mean.is_empty());
    let grads = batch_norm_backward(&x, &x, None, false, eps, &saved, true).unwrap();
    assert_eq!(grads.dx.shape(), &[0, HUGE]);
    // Evaluation without running statistics is still an error, empty or not.
    assert!(matches!(
        batch_norm(&x, None, None, None, &BatchNormOptions::eval()).unwrap_err(),
        NormError::MissingRunningStats { .. }
    ));
    // A bias gradient for 2^46 channels (2^48 bytes, past any 47-bit
    // address space, whatever the overcommit policy) cannot be had: an
    // error, not an abort.
    let x46 = Tensor::<f32>::new(vec![0, 1 << 46], vec![]).unwrap();
    let err =
        batch_norm_backward(&x46, &x46, None, true, eps, &Saved::default(), true).unwrap_err();
    assert!(matches!(err, NormError::OutOfMemory { .. }), "{err}");

    // [2^40, 0]: 2^40 rows of nothing.
    let x = Tensor::<f32>::new(vec![HUGE, 0], vec![]).unwrap();
    let (y, saved) = layer_norm(&x, -1, None, None, eps).unwrap();
    assert_eq!(y.numel(), 0);
    assert!(saved.mean.is_empty());
    assert!(layer_norm_backward(&x, &x, -1, None, false, eps, &saved).is_ok());
    let (_, saved) = rms_norm(&x, -1, None, eps).unwrap();
    assert!(rms_norm_backward(&x, &x, -1, None, eps, &saved).is_ok());

    // GroupNorm/InstanceNorm/LRN on [2^40, 4, 0].
    let x = Tensor::<f32>::new(vec![HUGE, 4, 0], vec![]).unwrap();
    let (y, saved) = group_norm(&x, 2, None, None, eps).unwrap();
    assert_eq!(y.numel(), 0);
    assert!(group_norm_backward(&x, &x, 2, None, false, eps, &saved).is_ok());
    assert!(instance_norm(&x, None, None, None, &BatchNormOptions::training()).is_ok());
    assert!(lrn(&x, &LrnOptions::new(5)).is_ok());
    // No channels at all: InstanceNorm has nothing to normalize.
    let x = Tensor::<f32>::new(vec![3, 0, 5], vec![]).unwrap();
    assert!(instance_norm(&x, None, None, None, &BatchNormOptions::training()).is_ok());
}

#[test]
fn absurd_sizes_are_errors_not_aborts() {
    let err = BatchNormConfig::new(1 << 60).init::<f32>().unwrap_err();
    assert!(matches!(err, NormError::OutOfMemory { .. }), "{err}");
    assert!(err.to_string().contains("out of memory"), "{err}");
    assert!(LayerNormConfig::new(&[1 << 40, 1 << 40])
        .init::<f32>()
        .is_err());
    assert!(Saved::zeros("test", usize::MAX / 8).is_err());
    // An empty C = 0 tensor is divisible by any group count; N·G must still fit.
    let x = Tensor::<f32>::new(vec![4, 0], vec![]).unwrap();
    let err = group_norm(&x, usize::MAX / 2, None, None, Epsilon::default()).unwrap_err();
    assert!(matches!(err, NormError::SizeOverflow { .. }), "{err}");
}

#[test]
fn layouts_built_field_by_field_are_checked() {
    let x = vec![0f32; 12];
    let mut y = vec![0f32; 12];
    let ncs = NcsLayout {
        n: 2,
        c: 3,
        spatial: 2,
    };
    let mut saved = Saved::zeros("test", 2).unwrap();
    let eps = Epsilon::default();
    // Zero groups would divide by zero; a count that does not divide C would
    // misread the buffer.
    for groups in [0, 2] {
        let layout = GroupLayout { ncs, groups };
        assert!(
            group_norm::forward(&x, layout, NO_PARAM, NO_PARAM, &eps, &mut y, &mut saved).is_err()
        );
    }
    let overflowing = NcsLayout {
        n: 1 << 40,
        c: 1 << 40,
        spatial: 1,
    };
    let layout = GroupLayout {
        ncs: overflowing,
        groups: 1,
    };
    assert!(group_norm::forward(&x, layout, NO_PARAM, NO_PARAM, &eps, &mut y, &mut saved).is_err());
    assert!(normlab::kernels::batch_norm::channel_moments(&x, overflowing).is_err());
}

#[test]
fn lrn_windows_of_any_size_are_clipped() {
    let x = x(&[2, 3, 4]);
    for size in [usize::MAX, usize::MAX - 1, 1 << 40] {
        for region in [
            normlab::LrnRegion::AcrossChannels,
            normlab::LrnRegion::WithinChannel,
        ] {
            let options = LrnOptions {
                region,
                ..LrnOptions::new(size)
            };
            let y = lrn(&x, &options).unwrap();
            assert!(y.data().iter().all(|v| v.is_finite()));
            let dx = lrn_backward(&x, &x, &options).unwrap();
            assert!(dx.data().iter().all(|v| v.is_finite()));
        }
    }
    assert_eq!(LrnOptions::new(0).window(), (0, 0));
}

#[test]
fn running_statistics_that_overflow_their_type_name_the_value_and_the_type() {
    // Finite f32 inputs whose variance (1e40) fits in f64 but whose running
    // update does not fit in f32.
    let x = Tensor::new(vec![2, 1], vec![-1e20f32, 1e20]).unwrap();
    let (mut rm, mut rv, mut seen) = (vec![0f32], vec![1f32], 0i64);
    let running = RunningStatsMut {
        mean: &mut rm,
        var: &mut rv,
        num_batches_tracked: &mut seen,
    };
    let err = batch_norm(&x, Some(running), None, None, &BatchNormOptions::training()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            NormError::NonFiniteStatistics {
                what: "updated running_var",
                dtype: "float32",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("updated running_var") && msg.contains("float32"),
        "{msg}"
    );
    assert_eq!((rm[0], rv[0], seen), (0.0, 1.0, 0));
    // An infinite input: the batch mean, in float64.
    let x = Tensor::new(vec![2, 1], vec![f32::INFINITY, 1.0]).unwrap();
    let running = RunningStatsMut {
        mean: &mut rm,
        var: &mut rv,
        num_batches_tracked: &mut seen,
    };
    let err = batch_norm(&x, Some(running), None, None, &BatchNormOptions::training()).unwrap_err();
    assert!(err.to_string().contains("batch mean"), "{err}");
    assert!(err.to_string().contains("float64"), "{err}");
}

/// A state file with BatchNorm(2) tensors, `bias` replaced by `bias`.
fn bn_file(weight: &[f32], bias: &[f32], var: &[f32], tracked: i64) -> StateFile {
    let mut source = BatchNormConfig::new(2).init::<f32>().unwrap();
    source
        .weight_mut()
        .unwrap()
        .data_mut()
        .copy_from_slice(weight);
    let running = source.running_stats_mut().unwrap();
    running.var.data_mut().copy_from_slice(var);
    running.num_batches_tracked = tracked;
    let mut bytes_layer = source;
    let b = bytes_layer.bias_mut().unwrap();
    if bias.len() == b.numel() {
        b.data_mut().copy_from_slice(bias);
        StateFile::from_bytes(state::to_bytes::<f32>(&[("bn", &bytes_layer)]).unwrap()).unwrap()
    } else {
        // A bias of the wrong shape: write it through a layer of that size.
        let mut other = BatchNormConfig::new(bias.len()).init::<f32>().unwrap();
        other.bias_mut().unwrap().data_mut().copy_from_slice(bias);
        let mut entries = bytes_layer.state_dict();
        entries.retain(|(n, _)| n != "bias");
        let bias_entry = other
            .state_dict()
            .into_iter()
            .find(|(n, _)| n == "bias")
            .unwrap();
        entries.push(bias_entry);
        struct Dict(Vec<(String, state::StateTensor<f32>)>);
        impl StateDict<f32> for Dict {
            fn state_dict(&self) -> Vec<(String, state::StateTensor<f32>)> {
                self.0.clone()
            }
            fn load_state_dict(&mut self, _: &state::StateView<'_>) -> normlab::Result<()> {
                Ok(())
            }
        }
        StateFile::from_bytes(state::to_bytes::<f32>(&[("bn", &Dict(entries))]).unwrap()).unwrap()
    }
}

#[test]
fn loading_state_is_all_or_nothing_and_validated() {
    let fresh = BatchNormConfig::new(2).init::<f32>().unwrap();
    let cases: [(StateFile, &str); 5] = [
        // The weight is good; the bias has the wrong shape.
        (
            bn_file(&[5.0, 6.0], &[1.0, 2.0, 3.0], &[1.0, 1.0], 3),
            "bn.bias",
        ),
        (
            bn_file(&[5.0, 6.0], &[1.0, 2.0], &[f32::NAN, 1.0], 3),
            "bn.running_var",
        ),
        (
            bn_file(&[5.0, 6.0], &[1.0, 2.0], &[1.0, -0.5], 3),
            "bn.running_var",
        ),
        (
            bn_file(&[5.0, 6.0], &[1.0, 2.0], &[1.0, f32::INFINITY], 3),
            "bn.running_var",
        ),
        (
            bn_file(&[5.0, 6.0], &[1.0, 2.0], &[1.0, 1.0], -1),
            "bn.num_batches_tracked",
        ),
    ];
    for (file, name) in cases {
        let mut layer = fresh.clone();
        let err = file.load("bn", &mut layer).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
        assert_eq!(layer, fresh, "a refused load changes nothing ({err})");
    }
    // The same file with good values loads whole.
    let mut layer = fresh.clone();
    bn_file(&[5.0, 6.0], &[1.0, 2.0], &[2.0, 0.0], 7)
        .load("bn", &mut layer)
        .unwrap();
    assert_eq!(layer.weight().unwrap().data(), &[5.0, 6.0]);
    assert_eq!(layer.bias().unwrap().data(), &[1.0, 2.0]);
    assert_eq!(layer.running_var().unwrap(), &[2.0, 0.0]);
    assert_eq!(layer.num_batches_tracked(), Some(7));
    // InstanceNorm shares the rule.
    let mut inorm = InstanceNormConfig::new(2)
        .with_track_running_stats(true)
        .init::<f32>()
        .unwrap();
    let before = inorm.clone();
    let file = bn_file(&[5.0, 6.0], &[1.0, 2.0], &[f32::NAN, 1.0], 3);
    assert!(file.load("bn", &mut inorm).is_err());
    assert_eq!(inorm, before);
}

/// The inputs the `shapes` fuzz target once crashed on
/// (tests/fuzz-regressions/shapes/), as named cases.
#[test]
fn crashes_found_by_fuzzing() {
    use normlab::kernels::batch_norm::{channel_moments, forward_train, normalize};
    use normlab::kernels::rows::{forward, RowNorm};
    use normlab::TensorView;
    let eps = Epsilon::default();
    // The element count of a view's shape overflowed in the length check.
    assert!(matches!(
        TensorView::<f32>::new(&[4, 1 << 31, 1 << 31], &[]).unwrap_err(),
        NormError::SizeOverflow { .. }
    ));
    // rows × n overflowed in the row kernels' length check.
    let mut saved = Saved::default();
    let (no_rows, ln) = (&mut [] as &mut [f32], RowNorm::LayerNorm);
    let err = forward(
        ln,
        &[],
        1 << 40,
        1 << 40,
        NO_PARAM,
        NO_PARAM,
        &eps,
        no_rows,
        &mut saved,
    )
    .unwrap_err();
    assert!(matches!(err, NormError::SizeOverflow { .. }), "{err}");
    // No rows of a huge length: a row of n ones was built anyway (a
    // capacity overflow for n ≥ 2^61, gigabytes for n ≈ 2^31).
    for n in [1usize << 61, 1 << 31] {
        forward(ln, &[], 0, n, NO_PARAM, NO_PARAM, &eps, no_rows, &mut saved).unwrap();
    }
    // BatchNorm's slice kernels on layouts with no values: a zero spatial
    // size became a zero chunk size; 2^40 empty channels were gathered.
    for (n, c, spatial) in [(3, 2, 0), (0, 1 << 40, 1), (2, 0, 5)] {
        let layout = NcsLayout { n, c, spatial };
        let saved = Saved {
            mean: vec![0.0; c.min(2)],
            rstd: vec![1.0; c.min(2)],
        };
        if c <= 2 {
            let y = &mut [] as &mut [f32];
            assert!(normalize(&[], layout, &saved, NO_PARAM, NO_PARAM, y).is_ok());
            assert!(forward_train(&[], layout, NO_PARAM, NO_PARAM, &eps, y).is_ok());
        } else {
            // 2^40 channels of moments are not to be had: an error.
            assert!(channel_moments::<f32>(&[], layout).is_err());
        }
    }
}
