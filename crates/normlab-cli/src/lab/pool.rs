//! 2-D max-pooling for candle CPU tensors with PyTorch's backward.
//!
//! Windows of `k × k` with stride `k` (the lab pools 2 × 2), rounding the
//! output size down. Each window's gradient goes to its first maximum in
//! row-major order, as in PyTorch, and NaN counts as the maximum (it
//! propagates). The backward finds that position again from the input
//! instead of storing indices.
//!
//! candle 0.11's own backward builds the gradient from an upsampled copy
//! of the output, an equality mask, an average pool and two more upsamples
//! (six full-size temporaries per pool and step), and it multiplies where
//! it means to divide: a window with one maximum passes on a quarter of its
//! gradient (`[[1, 2], [3, 4]]` pooled and summed gives `[0, 0, 0, 0.25]`,
//! where PyTorch gives `[0, 0, 0, 1]`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::lab::cpu::{by_float_dtype, contiguous, CpuFloat};

/// `x` `[N, C, H, W]` max-pooled over `k × k` windows with stride `k`:
/// `[N, C, ⌊H/k⌋, ⌊W/k⌋]`. CPU f32 or f64, differentiable.
///
/// # Errors
/// `x` not 4-D, `k` zero or larger than the image, other dtypes.
pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    let &[n, c, h, w] = x.dims() else {
        candle_core::bail!(
            "max_pool2d: x must be [N, C, H, W], got shape {:?}",
            x.dims()
        );
    };
    if k == 0 || k > h || k > w {
        candle_core::bail!(
            "max_pool2d: window {k}×{k} does not fit x of shape {:?}",
            x.dims()
        );
    }
    let pool = MaxPool {
        planes: n * c,
        height: h,
        width: w,
        k,
    };
    x.contiguous()?.apply_op1(pool)
}

#[derive(Clone, Copy, Debug)]
struct MaxPool {
    /// `N·C` planes of `height × width`.
    planes: usize,
    height: usize,
    width: usize,
    k: usize,
}

impl MaxPool {
    fn out_dims(&self) -> (usize, usize) {
        (self.height / self.k, self.width / self.k)
    }

    /// Offset in the plane of the maximum of window `(oh, ow)`, by
    /// PyTorch's rule: a value replaces the best so far when it is greater
    /// or NaN, so ties keep the first maximum and a NaN always wins (the
    /// last NaN, as in PyTorch's CPU kernel).
    #[inline(always)]
    fn argmax<T: CpuFloat>(&self, plane: &[T], oh: usize, ow: usize) -> usize {
        let (k, width) = (self.k, self.width);
        if k == 2 {
            // The lab's 2×2 pools: the four candidates in row-major order.
            let top = 2 * oh * width + 2 * ow;
            let mut best = top;
            for at in [top + 1, top + width, top + width + 1] {
                let v = plane[at];
                if v > plane[best] || v.is_nan() {
                    best = at;
                }
            }
            return best;
        }
        let mut best = oh * k * width + ow * k;
        for i in 0..k {
            let row = (oh * k + i) * width + ow * k;
            for at in row..row + k {
                let v = plane[at];
                if v > plane[best] || v.is_nan() {
                    best = at;
                }
            }
        }
        best
    }

    fn forward<T: CpuFloat>(&self, x: &[T]) -> Vec<T> {
        let (oh_n, ow_n) = self.out_dims();
        let plane_len = self.height * self.width;
        let mut y = vec![T::ZERO; self.planes * oh_n * ow_n];
        if y.is_empty() {
            return y;
        }
        y.par_chunks_mut(oh_n * ow_n)
            .zip(x.par_chunks(plane_len))
            .for_each(|(out, plane)| {
                for oh in 0..oh_n {
                    for ow in 0..ow_n {
                        out[oh * ow_n + ow] = plane[self.argmax(plane, oh, ow)];
                    }
                }
            });
        y
    }

    /// `dx`: each window's `dy` at its first maximum, 0 elsewhere (also in
    /// the rows and columns the rounding down left out).
    fn backward<T: CpuFloat>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        let (oh_n, ow_n) = self.out_dims();
        let plane_len = self.height * self.width;
        let mut dx = vec![T::ZERO; self.planes * plane_len];
        if dx.is_empty() || oh_n * ow_n == 0 {
            return dx;
        }
        dx.par_chunks_mut(plane_len)
            .zip(x.par_chunks(plane_len))
            .zip(dy.par_chunks(oh_n * ow_n))
            .for_each(|((grad, plane), dy)| {
                for oh in 0..oh_n {
                    for ow in 0..ow_n {
                        grad[self.argmax(plane, oh, ow)] = dy[oh * ow_n + ow];
                    }
                }
            });
        dx
    }
}

fn values<'a, T: CpuFloat>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    contiguous(s, l, "max_pool2d", what)
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (oh, ow) = self.out_dims();
        let dims = l.shape().dims();
        let shape = Shape::from((dims[0], dims[1], oh, ow));
        let storage = by_float_dtype!(s.dtype(), "max_pool2d", |T| self
            .forward(values::<T>(s, l, "x")?));
        Ok((storage, shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &MaxPoolBackward(*self),
        )?))
    }
}

/// The backward as an op over `(x, dy)`.
struct MaxPoolBackward(MaxPool);

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max_pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let storage = by_float_dtype!(s1.dtype(), "max_pool2d backward", |T| self
            .0
            .backward(values::<T>(s1, l1, "x")?, values(s2, l2, "dy")?));
        Ok((storage, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_matches_candle_and_backward_goes_to_the_first_maximum() {
        // 1 image, 2 channels of 5×4: the last row is left out by rounding down.
        let v: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64).collect();
        let x =
            Var::from_tensor(&Tensor::from_vec(v, (1, 2, 5, 4), &Device::Cpu).unwrap()).unwrap();
        let ours = max_pool2d(&x, 2).unwrap();
        let theirs = x.max_pool2d(2).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
        let dy: Vec<f64> = (1..=8).map(f64::from).collect();
        let dy_t = Tensor::from_vec(dy.clone(), (1, 2, 2, 2), &Device::Cpu).unwrap();
        let grads = (&ours * &dy_t)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Expected: for each window, the first (row-major) maximum gets dy.
        let mut expected = vec![0.0; 40];
        for c in 0..2 {
            for oh in 0..2 {
                for ow in 0..2 {
                    let window = [(0, 0), (0, 1), (1, 0), (1, 1)]
                        .map(|(i, j)| c * 20 + (oh * 2 + i) * 4 + ow * 2 + j);
                    let mut best = window[0];
                    for &at in &window[1..] {
                        if xv[at] > xv[best] {
                            best = at;
                        }
                    }
                    expected[best] = dy[c * 4 + oh * 2 + ow];
                }
            }
        }
        assert_eq!(dx, expected);
        // Ties: the whole gradient goes to the first of equal values.
        let flat = Var::from_tensor(&Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let g = max_pool2d(&flat, 2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = g
            .get(&flat)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(dx, [1.0, 0.0, 0.0, 0.0]);
    }

    /// 3 × 3 windows (the general path) on a 7 × 6 map against candle's
    /// forward; the backward puts each window's gradient at its maximum.
    #[test]
    fn larger_windows_take_the_general_path() {
        let v: Vec<f32> = (0..84).map(|i| ((i * 29) % 17) as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(v.clone(), (2, 1, 7, 6), &Device::Cpu).unwrap())
            .unwrap();
        let ours = max_pool2d(&x, 3).unwrap();
        let theirs = x.max_pool2d(3).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&ours), flat(&theirs));
        let g = ours.sum_all().unwrap().backward().unwrap();
        let dx = flat(g.get(&x).unwrap());
        // Four windows per image, each passing 1 to one position holding its maximum.
        assert_eq!(dx.iter().sum::<f32>(), 8.0);
        for (i, &d) in dx.iter().enumerate() {
            if d != 0.0 {
                let (img, r, c) = (i / 42, (i % 42) / 6, i % 6);
                assert!(r < 6, "a position in the row left out got a gradient");
                let (oh, ow) = (r / 3, c / 3);
                let window_max = (0..3)
                    .flat_map(|a| (0..3).map(move |b| (a, b)))
                    .map(|(a, b)| v[img * 42 + (oh * 3 + a) * 6 + ow * 3 + b])
                    .fold(f32::MIN, f32::max);
                assert_eq!(v[i], window_max);
            }
        }
    }

    #[test]
    fn nan_is_the_maximum_and_bad_input_is_an_error() {
        let x =
            Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0, 2.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y = max_pool2d(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(y[0].is_nan());
        let e = max_pool2d(&x, 3).unwrap_err().to_string();
        assert!(
            e.contains("max_pool2d") && e.contains("[1, 1, 2, 2]"),
            "{e}"
        );
        let e = max_pool2d(&x.flatten_all().unwrap(), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_pool2d") && e.contains("[4]"), "{e}");
    }
}
