//! The bytes as a safetensors state file: parsing it, and loading it into
//! every layer type (with and without affine parameters and running
//! statistics, as f32 and f64), then running a forward pass with whatever
//! was loaded. Every step must return Ok or Err, never panic or abort.
//! Inputs starting with an even byte describe a file rather than being one
//! (see `assembled`), so that most runs get past the header check.
use std::sync::Arc;

use arbitrary::{self, Unstructured};
use normlab::layers::prelude::*;
use normlab::layers::{
    BatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig, LocalResponseNormConfig,
    RmsNormConfig,
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
    let x = Tensor::new(
        vec![2, 3, 2],
        (0..12).map(|i| T::from_f64(i as f64)).collect(),
    )
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

/// A safetensors file assembled from the bytes: names a layer looks for,
/// float and integer dtypes, odd shapes (0, 1, 3, huge) and data offsets
/// that mostly agree with them. Random bytes rarely get past the header
/// check; these reach the loaders.
fn assembled(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    const NAMES: [&str; 7] = [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "l.weight",
        "l.num_batches_tracked",
    ];
    const DTYPES: [(&str, usize); 7] = [
        ("F32", 4),
        ("F64", 8),
        ("F16", 2),
        ("BF16", 2),
        ("I64", 8),
        ("I32", 4),
        ("U8", 1),
    ];
    const DIMS: [usize; 8] = [0, 1, 2, 3, 6, 1 << 32, 1 << 62, usize::MAX];
    let mut header = Vec::new();
    let mut offset = 0usize;
    for _ in 0..u.int_in_range(0..=5)? {
        let name = u.choose(&NAMES)?;
        let (dtype, width) = *u.choose(&DTYPES)?;
        let rank = u.int_in_range(0..=3)?;
        let shape: Vec<usize> = (0..rank)
            .map(|_| u.choose(&DIMS).copied())
            .collect::<arbitrary::Result<_>>()?;
        let len = shape
            .iter()
            .try_fold(width, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 4096)
            .unwrap_or(width);
        let len = if u.ratio(1, 8)? { len + 1 } else { len };
        header.push(format!(
            r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
            offset + len
        ));
        offset += len;
    }
    let header = format!("{{{}}}", header.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let body = u.bytes(offset.min(u.len()))?;
    bytes.extend_from_slice(body);
    bytes.resize(8 + header.len() + offset, 0x3f);
    Ok(bytes)
}

/// The bytes as a safetensors state file: parsing it, and loading it into
/// every layer type (with and without affine parameters and running
/// statistics, as f32 and f64), then running a forward pass with whatever
/// was loaded. Every step must return Ok or Err, never panic or abort.
/// Inputs starting with an even byte describe a file rather than being one
/// (see `assembled`), so that most runs get past the header check.
pub fn state_file(data: &[u8]) {
    // First byte odd: the bytes are the file; even: they describe one.
    let bytes = match data.split_first() {
        Some((&mode, rest)) if mode % 2 == 0 => match assembled(&mut Unstructured::new(rest)) {
            Ok(bytes) => bytes,
            Err(_) => return,
        },
        _ => data.to_vec(),
    };
    let Ok(file) = StateFile::from_bytes(bytes) else {
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
}
