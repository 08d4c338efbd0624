//! SyncBatchNorm in candle over thread ranks equals BatchNorm on the
//! concatenated batch: outputs, input gradients, γ/β gradients summed over
//! ranks and running statistics, with uneven shards and an empty one.

use std::sync::Arc;

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use normlab_candle::{Communicator, ThreadGroup};

const SHAPE: [usize; 3] = [4, 3, 3];

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(99);
    (0..n * 36)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            (3.0 * ((i / 9) % 4) as f64 + 2.0 * (u - 0.5)) as f32
        })
        .collect()
}

/// y, dx, dweight, dbias, running mean, running var of one layer on `x`.
type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn step(layer: &dyn ModuleT, map: &VarMap, x: Vec<f32>, dy: Vec<f32>, n: usize) -> Result<Run> {
    let dims = [n, SHAPE[0], SHAPE[1], SHAPE[2]];
    let x = Var::from_tensor(&Tensor::from_vec(x, &dims, &Device::Cpu)?)?;
    let dy = Tensor::from_vec(dy, &dims, &Device::Cpu)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    let grads = (&y * &dy)?.sum_all()?.backward()?;
    let get = |name: &str| -> Result<Vec<f32>> {
        let vars = map.data().lock().unwrap();
        vars[name].as_tensor().to_vec1()
    };
    let grad_of = |name: &str| -> Result<Vec<f32>> {
        let vars = map.data().lock().unwrap();
        match grads.get(vars[name].as_tensor()) {
            Some(g) => g.to_vec1(),
            None => Ok(vec![0.0; SHAPE[0]]),
        }
    };
    let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
    let dx = match grads.get(x.as_tensor()) {
        Some(g) => flat(g)?,
        None => Vec::new(),
    };
    Ok((
        flat(&y)?,
        dx,
        grad_of("weight")?,
        grad_of("bias")?,
        get("running_mean")?,
        get("running_var")?,
    ))
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

fn check(shards: &[usize]) -> Result<()> {
    let total: usize = shards.iter().sum();
    let (x, dy) = (data(total, 1), data(total, 2));
    let group = ThreadGroup::new(shards.len()).unwrap();
    let handles: Vec<_> = group
        .into_iter()
        .map(|comm| {
            let (shards, x, dy) = (shards.to_vec(), x.clone(), dy.clone());
            std::thread::spawn(move || -> Result<Run> {
                let rank = comm.rank();
                let start = shards[..rank].iter().sum::<usize>() * 36;
                let len = shards[rank];
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
                let layer = normlab_candle::sync_batch_norm(4, 1e-5, Arc::new(comm), vb)?;
                let cut = |v: &[f32]| v[start..start + len * 36].to_vec();
                step(&layer, &map, cut(&x), cut(&dy), len)
            })
        })
        .collect();
    let ranks: Vec<Run> = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Result<_>>()?;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let bn = normlab_candle::batch_norm(4, 1e-5, vb)?;
    let whole = step(&bn, &map, x, dy, total)?;
    let cat = |f: fn(&Run) -> &Vec<f32>| -> Vec<f32> {
        ranks.iter().flat_map(|r| f(r).clone()).collect()
    };
    close(&cat(|r| &r.0), &whole.0, "y");
    close(&cat(|r| &r.1), &whole.1, "dx");
    let sum = |f: fn(&Run) -> &Vec<f32>| -> Vec<f32> {
        (0..4)
            .map(|c| ranks.iter().map(|r| f(r)[c]).sum())
            .collect()
    };
    close(&sum(|r| &r.2), &whole.2, "dweight summed over ranks");
    close(&sum(|r| &r.3), &whole.3, "dbias summed over ranks");
    for r in &ranks {
        close(&r.4, &whole.4, "running_mean");
        close(&r.5, &whole.5, "running_var");
    }
    Ok(())
}

#[test]
fn two_ranks_with_uneven_shards() -> Result<()> {
    check(&[2, 5])
}

#[test]
fn three_ranks_with_an_empty_shard() -> Result<()> {
    check(&[3, 0, 4])
}
