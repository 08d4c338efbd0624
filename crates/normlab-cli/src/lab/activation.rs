//! ReLU and tanh for candle CPU tensors, each one op forward and one op
//! backward.
//!
//! candle 0.11 differentiates `relu` as `dy · (x ≥ 0)` through a zero
//! tensor, a comparison into a `u8` mask, a conversion of the mask back to
//! floats and a product: four full-size temporaries per activation and
//! step. Both derivatives here are taken from the output `z`, which candle
//! keeps anyway:
//!
//! ```text
//! relu:  z = max(x, 0)   dx = dz · [z > 0]
//! tanh:  z = tanh(x)     dx = dz · (1 − z²)
//! ```
//!
//! ReLU's gradient at 0 is 0 (PyTorch's convention; candle passes it on);
//! NaN propagates forward, and its gradient passes through, as in PyTorch
//! (`z <= 0 ? 0 : dz`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Values per parallel task: smaller tensors run on the calling thread.
const TASK: usize = 32 * 1024;

/// Which non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// max(x, 0).
    Relu,
    /// tanh(x).
    Tanh,
}

/// `max(x, 0)`, NaN kept.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(Kind::Relu))
}

/// `tanh(x)`.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(Kind::Tanh))
}

struct Forward(Kind);

fn values<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    crate::lab::cpu::contiguous(s, l, "activation", "the input")
}

fn map<T: Copy + Send + Sync + Default>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    if x.len() < 2 * TASK {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
    } else {
        out.par_chunks_mut(TASK)
            .zip(x.par_chunks(TASK))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v)));
    }
    out
}

fn zip_map<T: Copy + Send + Sync + Default>(
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); a.len()];
    let run = |o: &mut [T], a: &[T], b: &[T]| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    };
    if a.len() < 2 * TASK {
        run(&mut out, a, b);
    } else {
        out.par_chunks_mut(TASK)
            .zip(a.par_chunks(TASK).zip(b.par_chunks(TASK)))
            .for_each(|(o, (a, b))| run(o, a, b));
    }
    out
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Relu => "relu",
            Kind::Tanh => "tanh",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // `!(v <= 0)` keeps NaN, as PyTorch's relu does.
        let out = match (s.dtype(), self.0) {
            (DType::F32, Kind::Relu) => CpuStorage::F32(map(values(s, l)?, |v: f32| {
                if v > 0.0 || v.is_nan() {
                    v
                } else {
                    0.0
                }
            })),
            (DType::F64, Kind::Relu) => CpuStorage::F64(map(values(s, l)?, |v: f64| {
                if v > 0.0 || v.is_nan() {
                    v
                } else {
                    0.0
                }
            })),
            (DType::F32, Kind::Tanh) => CpuStorage::F32(map(values(s, l)?, f32::tanh)),
            (DType::F64, Kind::Tanh) => CpuStorage::F64(map(values(s, l)?, f64::tanh)),
            (other, _) => {
                candle_core::bail!("{}: unsupported dtype {other:?} (f32, f64)", self.name())
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, z: &Tensor, dz: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            z.apply_op2_no_bwd(&dz.contiguous()?, &Backward(self.0))?,
        ))
    }
}

/// `dx` from `(z, dz)`.
struct Backward(Kind);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Relu => "relu-backward",
            Kind::Tanh => "tanh-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1.dtype(), s2.dtype(), self.0) {
            (DType::F32, DType::F32, Kind::Relu) => {
                CpuStorage::F32(zip_map(values(s1, l1)?, values(s2, l2)?, |z: f32, dz| {
                    if z <= 0.0 {
                        0.0
                    } else {
                        dz
                    }
                }))
            }
            (DType::F64, DType::F64, Kind::Relu) => {
                CpuStorage::F64(zip_map(values(s1, l1)?, values(s2, l2)?, |z: f64, dz| {
                    if z <= 0.0 {
                        0.0
                    } else {
                        dz
                    }
                }))
            }
            (DType::F32, DType::F32, Kind::Tanh) => {
                CpuStorage::F32(zip_map(values(s1, l1)?, values(s2, l2)?, |z: f32, dz| {
                    dz * (1.0 - z * z)
                }))
            }
            (DType::F64, DType::F64, Kind::Tanh) => {
                CpuStorage::F64(zip_map(values(s1, l1)?, values(s2, l2)?, |z: f64, dz| {
                    dz * (1.0 - z * z)
                }))
            }
            (a, b, _) => candle_core::bail!("{}: dtypes {a:?} and {b:?}", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_backward_match_candle_and_finite_differences() {
        let v: Vec<f64> = (0..200)
            .map(|i| ((i * 37) % 101) as f64 / 25.0 - 2.0)
            .collect();
        let x =
            Var::from_tensor(&Tensor::from_vec(v.clone(), (4, 50), &Device::Cpu).unwrap()).unwrap();
        let weights = Tensor::from_vec(
            (0..200)
                .map(|i| ((i * 13) % 7) as f64 - 3.0)
                .collect::<Vec<_>>(),
            (4, 50),
            &Device::Cpu,
        )
        .unwrap();
        for kind in [Kind::Relu, Kind::Tanh] {
            let (ours, theirs) = match kind {
                Kind::Relu => (relu(&x).unwrap(), x.relu().unwrap()),
                Kind::Tanh => (tanh(&x).unwrap(), x.tanh().unwrap()),
            };
            let a: Vec<f64> = ours.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f64> = theirs.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{kind:?} forward");
            let g = (&ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx: Vec<f64> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f64> = weights.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..v.len() {
                // Central differences away from ReLU's kink (the inputs
                // are multiples of 1/25, none within 1e-6 of 0 but 0 itself).
                let f = |t: f64| match kind {
                    Kind::Relu => t.max(0.0),
                    Kind::Tanh => t.tanh(),
                };
                let expected = if kind == Kind::Relu && v[i] == 0.0 {
                    0.0
                } else {
                    w[i] * (f(v[i] + 1e-6) - f(v[i] - 1e-6)) / 2e-6
                };
                assert!(
                    (dx[i] - expected).abs() < 1e-6,
                    "{kind:?} dx[{i}] {} vs {expected}",
                    dx[i]
                );
            }
        }
    }

    #[test]
    fn relu_keeps_nan_and_large_tensors_run_in_parallel() {
        let x = Var::from_tensor(
            &Tensor::from_vec(vec![f32::NAN, -1.0, 2.0, 0.0], 4, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = relu(&x).unwrap();
        let values: Vec<f32> = y.to_vec1().unwrap();
        assert!(values[0].is_nan() && values[1] == 0.0 && values[2] == 2.0 && values[3] == 0.0);
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = g.get(&x).unwrap().to_vec1().unwrap();
        assert_eq!(dx, [1.0, 0.0, 1.0, 0.0]);
        let n = 5 * TASK + 3;
        let big: Vec<f32> = (0..n).map(|i| (i % 11) as f32 - 5.0).collect();
        let t = Tensor::from_vec(big.clone(), n, &Device::Cpu).unwrap();
        let y: Vec<f32> = tanh(&t).unwrap().to_vec1().unwrap();
        assert!(y.iter().zip(&big).all(|(&y, &x)| y == x.tanh()));
    }
}
