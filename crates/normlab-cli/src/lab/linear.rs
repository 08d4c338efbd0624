//! A fully connected layer for candle CPU tensors: one op forward, one op
//! backward.
//!
//! candle-nn's `Linear` is a transpose, a matrix product and a broadcast
//! addition, and its backward a product per operand, the transposes'
//! backward and a reduction for the bias, each with its own temporaries
//! and gradient accumulation. A 20-block MLP runs each of those 21 times
//! per step. Here, with `x` `[B, in]`, `W` `[out, in]`, `b` `[out]`:
//!
//! ```text
//! y  = x · Wᵀ + b
//! dx = dy · W        dW = dyᵀ · x        db = Σ_rows dy
//! ```
//!
//! each product one `gemm` call on the operands' own memory (transposes
//! are strides). Products of more than [`PARALLEL_FLOPS`] multiply–adds
//! use every thread.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::lab::conv::matmul;
use crate::lab::cpu::{by_float_dtype, contiguous, CpuFloat};

/// Multiply–adds from which a product is split over threads: below it
/// (a 64 × 128 batch through a 128 × 128 layer is 2²⁰) waking the pool
/// costs more than it saves.
const PARALLEL_FLOPS: usize = 1 << 22;

/// `weight` `[out, in]` and optional `bias` `[out]`, as PyTorch's `nn.Linear`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer over existing (trainable) tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `x · weightᵀ + bias` for `x` `[B, in]` (CPU, f32 or f64), differentiable
/// in all three.
///
/// # Errors
/// Shapes that do not fit, named with the op and the shapes; mixed or
/// unsupported dtypes.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (&[rows, inputs], &[outputs, w_in]) = (x.dims(), weight.dims()) else {
        candle_core::bail!(
            "linear: x must be [B, in] and weight [out, in], got shapes {:?} and {:?}",
            x.dims(),
            weight.dims()
        );
    };
    if w_in != inputs {
        candle_core::bail!(
            "linear: weight {:?} takes {w_in} features, x {:?} has {inputs}",
            weight.dims(),
            x.dims()
        );
    }
    if rows.checked_mul(inputs.max(outputs)).is_none()
        || outputs.checked_mul(inputs).is_none()
        || rows
            .checked_mul(inputs)
            .and_then(|a| a.checked_mul(outputs))
            .is_none()
    {
        candle_core::bail!(
            "linear: x {:?} and weight {:?} give buffers too large to address",
            x.dims(),
            weight.dims()
        );
    }
    let sizes = Sizes {
        rows,
        inputs,
        outputs,
    };
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) if b.dims() != [outputs] => candle_core::bail!(
            "linear: bias has shape {:?}, expected [{outputs}] for weight {:?}",
            b.dims(),
            weight.dims()
        ),
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, Forward(sizes)),
        None => x.apply_op2(&weight, Forward(sizes)),
    }
}

#[derive(Clone, Copy, Debug)]
struct Sizes {
    rows: usize,
    inputs: usize,
    outputs: usize,
}

impl Sizes {
    fn parallel(&self) -> bool {
        self.rows * self.inputs * self.outputs >= PARALLEL_FLOPS
    }
}

fn values<'a, T: CpuFloat>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    contiguous(s, l, "linear", what)
}

struct Forward(Sizes);

impl Forward {
    fn run<T: CpuFloat>(&self, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
        let Sizes {
            rows,
            inputs,
            outputs,
        } = self.0;
        let mut y = vec![T::ZERO; rows * outputs];
        if let Some(b) = b {
            for row in y.chunks_exact_mut(outputs.max(1)) {
                row.copy_from_slice(b);
            }
        }
        // Wᵀ[k, o] = W[o·in + k]: row stride 1, column stride `in`.
        matmul(
            (rows, outputs, inputs),
            &mut y,
            b.is_some(),
            x,
            (inputs, 1),
            w,
            (1, inputs),
            self.0.parallel(),
        );
        y
    }

    fn storage(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.0.rows, self.0.outputs));
        let storage = by_float_dtype!(x.0.dtype(), "linear", |T| {
            let b = b.map(|(s, l)| values::<T>(s, l, "bias")).transpose()?;
            self.run(values::<T>(x.0, x.1, "x")?, values(w.0, w.1, "weight")?, b)
        });
        Ok((storage, shape))
    }

    fn gradients(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &InputGradient(self.0))?;
        let dw = dy.apply_op2_no_bwd(x, &WeightGradient(self.0))?;
        Ok((dx, dw))
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.storage((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.gradients(x, w, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.storage((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.gradients(x, w, dy)?;
        let db = dy.contiguous()?.apply_op1_no_bwd(&BiasGradient(self.0))?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `dx = dy · W`, over `(dy, weight)`.
struct InputGradient(Sizes);

/// `dW = dyᵀ · x`, over `(dy, x)`.
struct WeightGradient(Sizes);

/// `db = Σ_rows dy`, over `dy`.
struct BiasGradient(Sizes);

fn input_gradient<T: CpuFloat>(s: Sizes, dy: &[T], w: &[T]) -> Vec<T> {
    let mut dx = vec![T::ZERO; s.rows * s.inputs];
    matmul(
        (s.rows, s.inputs, s.outputs),
        &mut dx,
        false,
        dy,
        (s.outputs, 1),
        w,
        (s.inputs, 1),
        s.parallel(),
    );
    dx
}

fn weight_gradient<T: CpuFloat>(s: Sizes, dy: &[T], x: &[T]) -> Vec<T> {
    let mut dw = vec![T::ZERO; s.outputs * s.inputs];
    // dyᵀ[o, r] = dy[r·out + o]: row stride 1, column stride `out`.
    matmul(
        (s.outputs, s.inputs, s.rows),
        &mut dw,
        false,
        dy,
        (1, s.outputs),
        x,
        (s.inputs, 1),
        s.parallel(),
    );
    dw
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "linear-input-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.0.rows, self.0.inputs));
        let storage = by_float_dtype!(s1.dtype(), "linear backward", |T| {
            input_gradient(
                self.0,
                values::<T>(s1, l1, "dy")?,
                values(s2, l2, "weight")?,
            )
        });
        Ok((storage, shape))
    }
}

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "linear-weight-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.0.outputs, self.0.inputs));
        let storage = by_float_dtype!(s1.dtype(), "linear backward", |T| {
            weight_gradient(self.0, values::<T>(s1, l1, "dy")?, values(s2, l2, "x")?)
        });
        Ok((storage, shape))
    }
}

impl BiasGradient {
    fn run<T: CpuFloat>(&self, dy: &[T]) -> Vec<T> {
        let mut db = vec![T::ZERO; self.0.outputs];
        // Rows in order: the sum does not depend on the thread count.
        for row in dy.chunks_exact(self.0.outputs.max(1)) {
            for (sum, &v) in db.iter_mut().zip(row) {
                *sum += v;
            }
        }
        db
    }
}

impl candle_core::CustomOp1 for BiasGradient {
    fn name(&self) -> &'static str {
        "linear-bias-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from(self.0.outputs);
        let storage = by_float_dtype!(s.dtype(), "linear backward", |T| self
            .run(values::<T>(s, l, "dy")?));
        Ok((storage, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn forward_and_backward_match_candle_nn_linear() {
        // A small layer, one above the parallel threshold, a single row.
        for (case, &(rows, inputs, outputs)) in
            [(5, 7, 3), (64, 256, 300), (1, 4, 2)].iter().enumerate()
        {
            let seed = 10 * case as u64;
            let x = Var::from_tensor(&random(&[rows, inputs], seed)).unwrap();
            let w = Var::from_tensor(&random(&[outputs, inputs], seed + 1)).unwrap();
            let b = Var::from_tensor(&random(&[outputs], seed + 2)).unwrap();
            let ours = linear(&x, &w, Some(&b)).unwrap();
            let theirs = candle_core::Module::forward(
                &candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())),
                &x,
            )
            .unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-12, "case {case} forward");
            let weights = random(&[rows, outputs], seed + 3);
            let g1 = (&ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(d < 1e-12, "case {case} d{name}: {d}");
            }
        }
    }

    /// Products above the parallel threshold give the same bits on any
    /// number of threads.
    #[test]
    fn large_products_give_the_same_bits_on_any_thread_count() {
        let x = random(&[64, 256], 7).to_dtype(DType::F32).unwrap();
        let w = random(&[300, 256], 8).to_dtype(DType::F32).unwrap();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
                    let y = linear(&xv, &wv, None).unwrap();
                    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    [
                        flat(&y),
                        flat(g.get(&xv).unwrap()),
                        flat(g.get(&wv).unwrap()),
                    ]
                })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn gradients_match_finite_differences_and_bad_shapes_are_errors() {
        let x = random(&[3, 4], 1);
        let w = Var::from_tensor(&random(&[2, 4], 2)).unwrap();
        let weights = random(&[3, 2], 3);
        let loss = |w: &Tensor| {
            (linear(&x, w, None).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let g = (linear(&x, &w, None).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic: Vec<f64> = g.get(&w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        for (i, &a) in analytic.iter().enumerate() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                loss(&Tensor::from_vec(v, (2, 4), &Device::Cpu).unwrap())
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((numeric - a).abs() < 1e-7, "dW[{i}] {a} vs {numeric}");
        }
        let e = linear(&x, &random(&[2, 5], 4), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linear") && e.contains("[2, 5]") && e.contains("[3, 4]"),
            "{e}"
        );
        let e = linear(&x, &w, Some(&random(&[3], 5)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linear") && e.contains("[3]"), "{e}");
    }
}
