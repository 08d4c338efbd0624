//! The lab's optimizers, updating each f32 variable in place in one pass.
//!
//! candle-nn's optimizers build every update from tensor ops: a momentum
//! step is four ops and AdamW's eleven per variable, each a fresh tensor.
//! A 20-block MLP has 81 variables, so the update alone was several hundred
//! candle ops per training step. Here each variable is one in-place pass
//! over its values with the optimizer state in plain vectors; the
//! arithmetic is candle's, in the same order and in f32 (scalars rounded to
//! f32 as candle's `affine` rounds them), so the results are the same bits.

use std::cell::RefCell;

use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};

/// The contiguous f32 values of a storage.
fn values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    crate::lab::cpu::contiguous(storage, layout, op, "the gradient")
}

/// The contiguous f32 values of a storage, mutably.
fn values_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: the variable is not contiguous"),
        (other, _) => candle_core::bail!("{op}: f32 only, got {:?}", other.dtype()),
    }
}

/// The gradient of `var`, contiguous, if it has one.
fn gradient(grads: &candle_core::backprop::GradStore, var: &Var) -> Result<Option<Tensor>> {
    Ok(match grads.get(var.as_tensor()) {
        Some(g) => Some(g.contiguous()?),
        None => None,
    })
}

fn check_f32(vars: &[Var]) -> Result<()> {
    for v in vars {
        ensure!(
            v.dtype() == DType::F32,
            "the lab's optimizers update f32 variables, got {:?} of shape {:?}",
            v.dtype(),
            v.shape().dims()
        );
    }
    Ok(())
}

/// SGD with momentum (PyTorch's form, no dampening):
///
/// ```text
/// v ← μ·v + g
/// θ ← θ − lr·v
/// ```
pub struct MomentumSgd {
    vars: Vec<(Var, Vec<f32>)>,
    lr: f64,
    momentum: f64,
}

impl MomentumSgd {
    /// Zero velocities for `vars` (f32).
    ///
    /// # Errors
    /// A variable of another dtype.
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64) -> Result<MomentumSgd> {
        check_f32(&vars)?;
        Ok(MomentumSgd {
            vars: vars
                .into_iter()
                .map(|v| {
                    let n = v.elem_count();
                    (v, vec![0.0; n])
                })
                .collect(),
            lr,
            momentum,
        })
    }

    /// One update of every variable that has a gradient in `grads`.
    ///
    /// # Errors
    /// candle errors.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (var, velocity) in &mut self.vars {
            if let Some(g) = gradient(grads, var)? {
                let op = SgdUpdate {
                    velocity: RefCell::new(velocity),
                    lr: self.lr as f32,
                    momentum: self.momentum as f32,
                };
                var.as_tensor().inplace_op2(&g, &op)?;
            }
        }
        Ok(())
    }
}

struct SgdUpdate<'a> {
    velocity: RefCell<&'a mut Vec<f32>>,
    lr: f32,
    momentum: f32,
}

impl InplaceOp2 for SgdUpdate<'_> {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let theta = values_mut(s1, l1, self.name())?;
        let g = values(s2, l2, self.name())?;
        let mut velocity = self.velocity.borrow_mut();
        if theta.len() != g.len() || theta.len() != velocity.len() {
            candle_core::bail!("sgd-update: {} values, {} gradients", theta.len(), g.len());
        }
        for ((t, v), &g) in theta.iter_mut().zip(velocity.iter_mut()).zip(g) {
            *v = *v * self.momentum + g;
            *t -= *v * self.lr;
        }
        Ok(())
    }
}

/// AdamW (Loshchilov and Hutter), as candle-nn computes it: at step `t`,
///
/// ```text
/// m ← β₁·m + (1 − β₁)·g            v ← β₂·v + (1 − β₂)·g²
/// m̂ = m / (1 − β₁ᵗ)                v̂ = v / (1 − β₂ᵗ)
/// θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
/// ```
///
/// with β₁ = 0.9, β₂ = 0.999, ε = 1e-8.
pub struct AdamW {
    vars: Vec<(Var, Vec<f32>, Vec<f32>)>,
    lr: f64,
    weight_decay: f64,
    step: i32,
}

/// candle-nn's (and PyTorch's) defaults.
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

impl AdamW {
    /// Zero moments for `vars` (f32).
    ///
    /// # Errors
    /// A variable of another dtype.
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<AdamW> {
        check_f32(&vars)?;
        Ok(AdamW {
            vars: vars
                .into_iter()
                .map(|v| {
                    let n = v.elem_count();
                    (v, vec![0.0; n], vec![0.0; n])
                })
                .collect(),
            lr,
            weight_decay,
            step: 0,
        })
    }

    /// One update of every variable that has a gradient in `grads`.
    ///
    /// # Errors
    /// candle errors.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.step += 1;
        let scale_m = 1.0 / (1.0 - BETA1.powi(self.step));
        let scale_v = 1.0 / (1.0 - BETA2.powi(self.step));
        for (var, m, v) in &mut self.vars {
            if let Some(g) = gradient(grads, var)? {
                let op = AdamWUpdate {
                    moments: RefCell::new((m, v)),
                    scale_m: scale_m as f32,
                    scale_v: scale_v as f32,
                    decay: (1.0 - self.lr * self.weight_decay) as f32,
                    lr: self.lr as f32,
                };
                var.as_tensor().inplace_op2(&g, &op)?;
            }
        }
        Ok(())
    }
}

#[allow(clippy::type_complexity)]
struct AdamWUpdate<'a> {
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    lr: f32,
}

impl InplaceOp2 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let theta = values_mut(s1, l1, self.name())?;
        let g = values(s2, l2, self.name())?;
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if theta.len() != g.len() || theta.len() != m.len() {
            candle_core::bail!(
                "adamw-update: {} values, {} gradients",
                theta.len(),
                g.len()
            );
        }
        let (b1, c1) = (BETA1 as f32, (1.0 - BETA1) as f32);
        let (b2, c2) = (BETA2 as f32, (1.0 - BETA2) as f32);
        let eps = ADAM_EPS as f32;
        for (((t, m), v), &g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *m = *m * b1 + g * c1;
            *v = *v * b2 + (g * g) * c2;
            let m_hat = *m * self.scale_m;
            let v_hat = *v * self.scale_v;
            *t = *t * self.decay - (m_hat / (v_hat.sqrt() + eps)) * self.lr;
        }
        Ok(())
    }
}

/// Whether every value of every f32 or f64 variable is finite, read from
/// the storages directly (no tensor ops).
///
/// # Errors
/// Variables not on the CPU.
pub fn all_finite<'a>(vars: impl IntoIterator<Item = &'a Var>) -> Result<bool> {
    for var in vars {
        let (storage, layout) = var.as_tensor().storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            anyhow::bail!("the lab trains on the CPU");
        };
        let finite = match (cpu, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => v[a..b].iter().all(|x| x.is_finite()),
            (CpuStorage::F64(v), Some((a, b))) => v[a..b].iter().all(|x| x.is_finite()),
            _ => {
                // Other dtypes and layouts: through a tensor op.
                let t = var.as_tensor();
                !t.dtype().is_float()
                    || t.sub(t)?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?
                        .is_finite()
            }
        };
        if !finite {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Optimizer;
    use rand::{Rng, SeedableRng};

    fn random_vars(seed: u64) -> Vec<Var> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        [vec![3, 4], vec![5], vec![2, 3, 3]]
            .into_iter()
            .map(|shape| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
            })
            .collect()
    }

    fn copies(vars: &[Var]) -> Vec<Var> {
        vars.iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
            .collect()
    }

    /// A loss whose gradients differ per variable and step.
    fn grads(vars: &[Var], step: usize) -> candle_core::backprop::GradStore {
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for (i, v) in vars.iter().enumerate() {
            let term = (v.as_tensor().sqr().unwrap() * (0.3 + i as f64 + step as f64 * 0.1))
                .unwrap()
                .sum_all()
                .unwrap();
            loss = (loss + term + v.as_tensor().sin().unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
        vars.iter()
            .map(|v| {
                v.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn sgd_gives_the_same_bits_as_the_tensor_op_form() {
        let ours = random_vars(1);
        let theirs = copies(&ours);
        let mut opt = MomentumSgd::new(ours.clone(), 0.05, 0.9).unwrap();
        let mut velocities: Vec<Tensor> = theirs
            .iter()
            .map(|v| v.as_tensor().zeros_like().unwrap())
            .collect();
        for step in 0..5 {
            opt.step(&grads(&ours, step)).unwrap();
            let g = grads(&theirs, step);
            for (var, velocity) in theirs.iter().zip(&mut velocities) {
                let gv = g.get(var.as_tensor()).unwrap();
                *velocity = ((&*velocity * 0.9).unwrap() + gv).unwrap();
                var.set(&var.as_tensor().sub(&(&*velocity * 0.05).unwrap()).unwrap())
                    .unwrap();
            }
        }
        assert_eq!(bits(&ours), bits(&theirs));
    }

    #[test]
    fn adamw_gives_the_same_bits_as_candle_nn() {
        for weight_decay in [0.0, 0.01] {
            let ours = random_vars(2);
            let theirs = copies(&ours);
            let mut opt = AdamW::new(ours.clone(), 2e-3, weight_decay).unwrap();
            let mut reference = candle_nn::AdamW::new(
                theirs.clone(),
                candle_nn::ParamsAdamW {
                    lr: 2e-3,
                    weight_decay,
                    ..Default::default()
                },
            )
            .unwrap();
            for step in 0..5 {
                opt.step(&grads(&ours, step)).unwrap();
                reference.step(&grads(&theirs, step)).unwrap();
            }
            assert_eq!(bits(&ours), bits(&theirs), "weight decay {weight_decay}");
        }
    }

    #[test]
    fn finiteness_is_read_from_the_values() {
        let vars = random_vars(3);
        assert!(all_finite(&vars).unwrap());
        let bad = Var::from_tensor(
            &Tensor::from_vec(vec![1.0f32, f32::NAN, 2.0], 3, &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert!(!all_finite(vars.iter().chain([&bad])).unwrap());
        let inf =
            Var::from_tensor(&Tensor::from_vec(vec![f64::INFINITY], 1, &Device::Cpu).unwrap())
                .unwrap();
        assert!(!all_finite([&inf]).unwrap());
        let bf16 = Var::zeros(4, DType::BF16, &Device::Cpu).unwrap();
        assert!(all_finite([&bf16]).unwrap());
        let e = MomentumSgd::new(vec![bf16], 0.1, 0.9)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("f32") && e.contains("[4]"), "{e}");
    }
}
