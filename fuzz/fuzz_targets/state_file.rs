//! The bytes as a safetensors state file: parsing it, and loading it into
//! every layer type (with and without affine parameters and running
//! statistics, as f32 and f64), then running a forward pass with whatever
//! was loaded. Every step must return Ok or Err, never panic or abort.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use normlab::layers::{
    BatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig,
    LocalResponseNormConfig, RmsNormConfig,
};
use normlab::state::{StateDict, StateFile};
use normlab::{Float, SingleProcess, Tensor};

/// Loads `layer` from every prefix the file uses (and from none); after a
/// successful load, runs `forward` on a small input.
fn load_all<T: Float, L: StateDict<T>>(
    file: &StateFile,
    prefixes: &[String],
    mut layer: L,
    forward: impl Fn(&mut L, &Tensor<T>),
) {
    let x = Tensor::new(vec![2, 3, 2], (0..12).map(|i| T::from_f64(i as f64)).collect())
        .expect("12 values for [2, 3, 2]");
    for prefix in prefixes {
        if file.load(prefix, &mut layer).is_ok() {
            forward(&mut layer, &x);
            let _ = layer.state_dict();
        }
    }
}

fn layers<T: Float>(file: &StateFile, prefixes: &[String]) {
    for affine in [true, false] {
        for track in [true, false] {
            let bn = BatchNormConfig::new(3)
                .with_affine(affine)
                .with_track_running_stats(track);
            if let Ok(layer) = bn.init::<T>() {
                load_all(file, prefixes, layer, |l, x| {
                    if let Ok(out) = l.forward(x) {
                        let _ = l.backward(x, &out, x);
                    }
                    l.set_mode(normlab::Mode::Eval);
                    let _ = l.forward(x);
                });
            }
            if let Ok(layer) = bn.init_sync::<T>(Arc::new(SingleProcess)) {
                load_all(file, prefixes, layer, |l, x| {
                    let _ = l.forward(x);
                });
            }
            let inorm = InstanceNormConfig::new(3)
                .with_affine(affine)
                .with_track_running_stats(track);
            if let Ok(layer) = inorm.init::<T>() {
                load_all(file, prefixes, layer, |l, x| {
                    let _ = l.forward(x);
                    l.set_mode(normlab::Mode::Eval);
                    let _ = l.forward(x);
                });
            }
        }
        if let Ok(layer) = GroupNormConfig::new(3, 3).with_affine(affine).init::<T>() {
            load_all(file, prefixes, layer, |l, x| {
                let _ = l.forward(x);
            });
        }
        for bias in [true, false] {
            let ln = LayerNormConfig::new(&[3, 2])
                .with_elementwise_affine(affine)
                .with_bias(bias);
            if let Ok(layer) = ln.init::<T>() {
                load_all(file, prefixes, layer, |l, x| {
                    let _ = l.forward(x);
                });
            }
        }
        if let Ok(layer) = RmsNormConfig::new(&[2])
            .with_elementwise_affine(affine)
            .init::<T>()
        {
            load_all(file, prefixes, layer, |l, x| {
                let _ = l.forward(x);
            });
        }
    }
    if let Ok(layer) = LocalResponseNormConfig::new(2).init() {
        load_all::<T, _>(file, prefixes, layer, |l, x| {
            let _ = l.forward(x);
        });
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = StateFile::from_bytes(data.to_vec()) else {
        return;
    };
    // The empty prefix, and the prefix of every name (`features.1.weight`
    // → `features.1`), so that tensors under a layer's path are reached.
    let mut prefixes = vec![String::new()];
    for name in file.names() {
        if let Some((prefix, _)) = name.rsplit_once('.') {
            prefixes.push(prefix.to_string());
        }
    }
    prefixes.sort();
    prefixes.dedup();
    prefixes.truncate(8);
    layers::<f32>(&file, &prefixes);
    layers::<f64>(&file, &prefixes);
});
