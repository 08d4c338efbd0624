//! 2-D convolution for candle CPU tensors with a gemm backward.
//!
//! candle's own CPU `conv2d` is an im2col + gemm forward, but its backward is
//! slow: the input gradient goes through `conv_transpose2d` (a direct loop,
//! one dot product per output position and kernel tap) and the weight
//! gradient through a convolution whose "kernel" is the whole gradient map.
//! Here all three passes are matrix products over the same unfolding.
//!
//! For one image, with `K = C_in·KH·KW` rows and `P = OH·OW` columns, the
//! unfolding (im2col) is
//!
//! ```text
//! cols[(c, i, j), (oh, ow)] = x[c, oh·s + i − p, ow·s + j − p]   (0 outside the image)
//! ```
//!
//! and with `W` seen as a `[C_out, K]` matrix and `dY` as `[C_out, P]`:
//!
//! ```text
//! y  = W · cols + b
//! dW = Σ_images dY · colsᵀ          db = Σ_images Σ_positions dY
//! dx = col2im(Wᵀ · dY)             (col2im adds each column entry back where im2col took it)
//! ```
//!
//! Images run in parallel, each product single-threaded. The weight
//! gradient adds per-chunk partial sums in a fixed order, with chunks cut
//! from the batch size alone, so results are identical for every thread
//! count.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::lab::cpu::{by_float_dtype, contiguous, CpuFloat};

/// Geometry of a convolution: square stride and zero padding on both sides
/// (dilation 1, one group), as the lab's networks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Zero padding on each side of both spatial axes.
    pub padding: usize,
    /// Step between output positions on both axes.
    pub stride: usize,
}

impl Default for Conv2dConfig {
    /// Padding 0, stride 1 (candle's and PyTorch's defaults).
    fn default() -> Self {
        Conv2dConfig {
            padding: 0,
            stride: 1,
        }
    }
}

/// A convolution layer: `weight` `[C_out, C_in, KH, KW]`, optional `bias` `[C_out]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    /// A layer over existing (trainable) tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Conv2d {
            weight,
            bias,
            config,
        }
    }

    /// The weight `[C_out, C_in, KH, KW]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[C_out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.config)
    }
}

/// `x` `[N, C_in, H, W]` convolved with `weight` `[C_out, C_in, KH, KW]`,
/// plus `bias` `[C_out]` per output channel: `[N, C_out, OH, OW]` with
/// `OH = (H + 2p − KH)/s + 1` (likewise `OW`). CPU tensors of f32 or f64;
/// differentiable in all three arguments.
///
/// # Errors
/// Shapes that do not fit (naming the op, the argument and the shapes),
/// mixed or unsupported dtypes, non-CPU tensors.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: Conv2dConfig,
) -> Result<Tensor> {
    let geometry = Geometry::new(x.dims(), weight.dims(), config)?;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => {
            if b.dims() != [geometry.out_channels] {
                candle_core::bail!(
                    "conv2d: bias has shape {:?}, expected [{}] for weight {:?}",
                    b.dims(),
                    geometry.out_channels,
                    weight.dims()
                );
            }
            x.apply_op3(&weight, &b.contiguous()?, Forward { geometry })
        }
        None => x.apply_op2(&weight, Forward { geometry }),
    }
}

/// The sizes of one convolution call, checked once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    in_channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel_h: usize,
    kernel_w: usize,
    out_h: usize,
    out_w: usize,
    padding: usize,
    stride: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], config: Conv2dConfig) -> Result<Geometry> {
        let &[batch, in_channels, height, width] = x else {
            candle_core::bail!("conv2d: x must be [N, C_in, H, W], got shape {x:?}");
        };
        let &[out_channels, w_in, kernel_h, kernel_w] = w else {
            candle_core::bail!("conv2d: weight must be [C_out, C_in, KH, KW], got shape {w:?}");
        };
        if w_in != in_channels {
            candle_core::bail!(
                "conv2d: weight {w:?} takes {w_in} input channels, x {x:?} has {in_channels}"
            );
        }
        if config.stride == 0 {
            candle_core::bail!("conv2d: stride must be at least 1");
        }
        if in_channels == 0 || height == 0 || width == 0 {
            candle_core::bail!(
                "conv2d: x {x:?} has no values per image (C_in, H and W must be at least 1)"
            );
        }
        let padded = |size: usize| {
            config
                .padding
                .checked_mul(2)
                .and_then(|p| p.checked_add(size))
        };
        let (Some(padded_h), Some(padded_w)) = (padded(height), padded(width)) else {
            candle_core::bail!(
                "conv2d: padding {} is too large for x {x:?}",
                config.padding
            );
        };
        if kernel_h == 0 || kernel_w == 0 || kernel_h > padded_h || kernel_w > padded_w {
            candle_core::bail!(
                "conv2d: kernel {kernel_h}×{kernel_w} of weight {w:?} does not fit x {x:?} \
                 padded by {}",
                config.padding
            );
        }
        let (out_h, out_w) = (
            (padded_h - kernel_h) / config.stride + 1,
            (padded_w - kernel_w) / config.stride + 1,
        );
        // Every buffer size below is a product of these: checked once here.
        let sizes = [
            [batch, in_channels, height, width],
            [batch, out_channels, out_h, out_w],
            [in_channels, kernel_h, kernel_w, out_h * out_w.max(1)],
        ];
        if out_h.checked_mul(out_w).is_none()
            || sizes.iter().any(|dims| {
                dims.iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .is_none()
            })
        {
            candle_core::bail!(
                "conv2d: x {x:?} and weight {w:?} give buffers too large to address"
            );
        }
        Ok(Geometry {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel_h,
            kernel_w,
            out_h,
            out_w,
            padding: config.padding,
            stride: config.stride,
        })
    }

    /// Rows of the unfolding: `C_in·KH·KW`.
    fn taps(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }

    /// Output positions per image: `OH·OW`.
    fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    fn image_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }

    fn output_shape(&self) -> Shape {
        Shape::from((self.batch, self.out_channels, self.out_h, self.out_w))
    }

    /// For kernel offset `tap` (`i` or `j`) along an axis of `size` input
    /// values and `outputs` positions: the range of output positions whose
    /// input `o·s + tap − p` lies inside the image.
    fn valid_outputs(&self, tap: usize, size: usize, outputs: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.padding);
        // o·s + tap ≥ p  ⇔  o ≥ ⌈(p − tap)/s⌉
        let first = p.saturating_sub(tap).div_ceil(s);
        // o·s + tap − p ≤ size − 1  ⇔  o ≤ ⌊(size − 1 + p − tap)/s⌋
        let end = match (size + p).checked_sub(tap + 1) {
            Some(last_in) => (last_in / s + 1).min(outputs),
            None => 0,
        };
        first.min(end)..end
    }

    /// Writes the unfolding of one image (`C_in·H·W` values) into `cols`
    /// (`K·P` values, row-major `[K, P]`).
    fn im2col<T: CpuFloat>(&self, image: &[T], cols: &mut [T]) {
        let (p, s) = (self.padding, self.stride);
        let (ow_n, plane) = (self.out_w, self.height * self.width);
        let mut rows = cols.chunks_exact_mut(self.positions());
        for c in 0..self.in_channels {
            let channel = &image[c * plane..(c + 1) * plane];
            for i in 0..self.kernel_h {
                let valid_h = self.valid_outputs(i, self.height, self.out_h);
                for j in 0..self.kernel_w {
                    let valid_w = self.valid_outputs(j, self.width, self.out_w);
                    let row = rows.next().expect("one row per tap");
                    for (oh, out) in row.chunks_exact_mut(ow_n).enumerate() {
                        if !valid_h.contains(&oh) {
                            out.fill(T::ZERO);
                            continue;
                        }
                        let input = &channel[(oh * s + i - p) * self.width..][..self.width];
                        out[..valid_w.start].fill(T::ZERO);
                        out[valid_w.end..].fill(T::ZERO);
                        if valid_w.is_empty() {
                            // The kernel column lies wholly in the padding.
                            continue;
                        }
                        if s == 1 {
                            let from = valid_w.start + j - p;
                            out[valid_w.clone()]
                                .copy_from_slice(&input[from..from + valid_w.len()]);
                        } else {
                            for ow in valid_w.clone() {
                                out[ow] = input[ow * s + j - p];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds each entry of `cols` (`[K, P]`) to the input value im2col took
    /// it from: the input gradient of one image (`C_in·H·W` values, which
    /// this overwrites).
    fn col2im<T: CpuFloat>(&self, cols: &[T], image: &mut [T]) {
        let (p, s) = (self.padding, self.stride);
        let (ow_n, plane) = (self.out_w, self.height * self.width);
        image.fill(T::ZERO);
        let mut rows = cols.chunks_exact(self.positions());
        for c in 0..self.in_channels {
            let channel = &mut image[c * plane..(c + 1) * plane];
            for i in 0..self.kernel_h {
                let valid_h = self.valid_outputs(i, self.height, self.out_h);
                for j in 0..self.kernel_w {
                    let valid_w = self.valid_outputs(j, self.width, self.out_w);
                    let row = rows.next().expect("one row per tap");
                    if valid_w.is_empty() {
                        // The kernel column lies wholly in the padding.
                        continue;
                    }
                    for oh in valid_h.clone() {
                        let from = &row[oh * ow_n..(oh + 1) * ow_n];
                        let input = &mut channel[(oh * s + i - p) * self.width..][..self.width];
                        if s == 1 {
                            let to = valid_w.start + j - p;
                            for (a, &g) in input[to..to + valid_w.len()]
                                .iter_mut()
                                .zip(&from[valid_w.clone()])
                            {
                                *a += g;
                            }
                        } else {
                            for ow in valid_w.clone() {
                                let a = &mut input[ow * s + j - p];
                                *a += from[ow];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst[m×n] (row-major) = lhs · rhs` (or `dst + lhs · rhs` with
/// `accumulate`), where `lhs[r, c]` is at `lhs[r·lhs_rs + c·lhs_cs]` and
/// likewise `rhs`; single-threaded (the convolution runs images in
/// parallel) unless `parallel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: CpuFloat>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    parallel: bool,
) {
    assert!(
        m.checked_mul(n).is_some_and(|mn| dst.len() >= mn),
        "matmul destination too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        // The offset of the last element, None when it overflows.
        let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
            (rows - 1)
                .checked_mul(rs)?
                .checked_add((cols - 1).checked_mul(cs)?)
        };
        assert!(
            last(m, k, lhs_rs, lhs_cs).is_some_and(|at| at < lhs.len()),
            "matmul lhs too short"
        );
        assert!(
            last(k, n, rhs_rs, rhs_cs).is_some_and(|at| at < rhs.len()),
            "matmul rhs too short"
        );
    }
    // SAFETY: every index gemm touches is inside the slices (checked above),
    // `dst` is borrowed mutably and does not alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// The contiguous values of argument `what`.
fn values<'a, T: CpuFloat>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    contiguous(storage, layout, "conv2d", what)
}

/// The forward op, over `(x, weight)` or `(x, weight, bias)`.
struct Forward {
    geometry: Geometry,
}

impl Forward {
    fn run<T: CpuFloat>(&self, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
        let g = self.geometry;
        let (taps, positions) = (g.taps(), g.positions());
        let mut y = vec![T::ZERO; g.batch * g.out_channels * positions];
        if y.is_empty() {
            return y;
        }
        y.par_chunks_mut(g.out_channels * positions)
            .zip(x.par_chunks(g.image_len().max(1)))
            .for_each_init(
                || vec![T::ZERO; taps * positions],
                |cols, (out, image)| {
                    g.im2col(image, cols);
                    if let Some(b) = bias {
                        for (row, &b) in out.chunks_exact_mut(positions).zip(b) {
                            row.fill(b);
                        }
                    }
                    matmul(
                        (g.out_channels, positions, taps),
                        out,
                        bias.is_some(),
                        w,
                        (taps, 1),
                        cols,
                        (positions, 1),
                        false,
                    );
                },
            );
        y
    }

    fn storage(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.geometry.output_shape();
        let storage = by_float_dtype!(x.0.dtype(), "conv2d", |T| {
            let bias = b.map(|(s, l)| values::<T>(s, l, "bias")).transpose()?;
            self.run(
                values::<T>(x.0, x.1, "x")?,
                values(w.0, w.1, "weight")?,
                bias,
            )
        });
        Ok((storage, shape))
    }

    /// `(dx, dweight)` from the forward's `x`, `weight` and the output's gradient.
    fn gradients(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let dy = dy.contiguous()?;
        let geometry = self.geometry;
        let dx = dy.apply_op2_no_bwd(w, &InputGradient { geometry })?;
        let dw = x.apply_op2_no_bwd(&dy, &WeightGradient { geometry })?;
        Ok((dx, dw))
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "conv2d"
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
        "conv2d"
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
        let db = dy.contiguous()?.apply_op1_no_bwd(&BiasGradient {
            geometry: self.geometry,
        })?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `db[c] = Σ_images Σ_positions dy[n, c, ·]`, over `dy` (candle's `sum`
/// over axes 0, 2 and 3 walks the tensor with strides and was a sixth of a
/// training step).
struct BiasGradient {
    geometry: Geometry,
}

impl BiasGradient {
    fn run<T: CpuFloat>(&self, dy: &[T]) -> Vec<T> {
        let g = self.geometry;
        let positions = g.positions().max(1);
        let mut db = vec![T::ZERO; g.out_channels];
        // Images in order, so the sum does not depend on the thread count.
        for image in dy.chunks_exact((g.out_channels * positions).max(1)) {
            for (sum, row) in db.iter_mut().zip(image.chunks_exact(positions)) {
                *sum = row.iter().fold(*sum, |a, &b| a + b);
            }
        }
        db
    }
}

impl candle_core::CustomOp1 for BiasGradient {
    fn name(&self) -> &'static str {
        "conv2d-bias-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from(self.geometry.out_channels);
        let storage = by_float_dtype!(s.dtype(), "conv2d backward", |T| self
            .run(values::<T>(s, l, "dy")?));
        Ok((storage, shape))
    }
}

/// `dx = col2im(Wᵀ · dY)` per image, over `(dy, weight)`.
struct InputGradient {
    geometry: Geometry,
}

impl InputGradient {
    fn run<T: CpuFloat>(&self, dy: &[T], w: &[T]) -> Vec<T> {
        let g = self.geometry;
        let (taps, positions) = (g.taps(), g.positions());
        let mut dx = vec![T::ZERO; g.batch * g.image_len()];
        if dx.is_empty() {
            return dx;
        }
        dx.par_chunks_mut(g.image_len())
            .zip(dy.par_chunks((g.out_channels * positions).max(1)))
            .for_each_init(
                || vec![T::ZERO; taps * positions],
                |cols, (image, dy)| {
                    // Wᵀ[k, co] = W[co·K + k]: row stride 1, column stride K.
                    matmul(
                        (taps, positions, g.out_channels),
                        cols,
                        false,
                        w,
                        (1, taps),
                        dy,
                        (positions, 1),
                        false,
                    );
                    g.col2im(cols, image);
                },
            );
        dx
    }
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "conv2d-input-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let shape = Shape::from((g.batch, g.in_channels, g.height, g.width));
        let storage = by_float_dtype!(s1.dtype(), "conv2d backward", |T| self
            .run(values::<T>(s1, l1, "dy")?, values(s2, l2, "weight")?));
        Ok((storage, shape))
    }
}

/// `dW = Σ_images dY · colsᵀ`, over `(x, dy)`.
struct WeightGradient {
    geometry: Geometry,
}

/// Images per partial weight gradient: chunks are cut from the batch size
/// alone (at most this many partials), so that the sum's order, and so the
/// result, is the same for any thread count.
const WEIGHT_GRADIENT_CHUNKS: usize = 16;

impl WeightGradient {
    fn run<T: CpuFloat>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        let g = self.geometry;
        let (taps, positions) = (g.taps(), g.positions());
        let size = g.out_channels * taps;
        if g.batch == 0 || size == 0 {
            return vec![T::ZERO; size];
        }
        let per_chunk = g.batch.div_ceil(WEIGHT_GRADIENT_CHUNKS);
        let image_len = g.image_len().max(1);
        let dy_len = (g.out_channels * positions).max(1);
        let partials: Vec<Vec<T>> = x
            .par_chunks(per_chunk * image_len)
            .zip(dy.par_chunks(per_chunk * dy_len))
            .map(|(images, dys)| {
                let mut cols = vec![T::ZERO; taps * positions];
                let mut dw = vec![T::ZERO; size];
                for (n, (image, dy)) in images.chunks(image_len).zip(dys.chunks(dy_len)).enumerate()
                {
                    g.im2col(image, &mut cols);
                    // colsᵀ[p, k] = cols[k·P + p]: row stride 1, column stride P.
                    matmul(
                        (g.out_channels, taps, positions),
                        &mut dw,
                        n > 0,
                        dy,
                        (positions, 1),
                        &cols,
                        (1, positions),
                        false,
                    );
                }
                dw
            })
            .collect();
        let mut partials = partials.into_iter();
        let mut dw = partials.next().expect("a non-empty batch has a chunk");
        for partial in partials {
            for (a, b) in dw.iter_mut().zip(partial) {
                *a += b;
            }
        }
        dw
    }
}

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "conv2d-weight-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let shape = Shape::from((g.out_channels, g.in_channels, g.kernel_h, g.kernel_w));
        let storage = by_float_dtype!(s1.dtype(), "conv2d backward", |T| self
            .run(values::<T>(s1, l1, "x")?, values(s2, l2, "dy")?));
        Ok((storage, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// (N, C_in, H, W, C_out, KH, KW, padding, stride): the lab's 3×3 same
    /// convolutions, odd sizes, a kernel as large as the padded image,
    /// stride 2 and 3, a 1×1 kernel, a single image. The strides divide
    /// `H + 2p − KH`: where they do not, candle's own backward fails (its
    /// transposed convolution comes out one row short), and the
    /// finite-difference test covers that case.
    const CASES: [[usize; 9]; 7] = [
        [4, 3, 8, 8, 5, 3, 3, 1, 1],
        [3, 2, 7, 5, 4, 3, 3, 1, 1],
        [2, 3, 5, 6, 2, 3, 2, 0, 1],
        [2, 2, 4, 4, 3, 6, 6, 1, 1],
        [3, 2, 9, 7, 3, 3, 3, 1, 2],
        [2, 4, 5, 5, 3, 1, 1, 0, 1],
        [1, 1, 7, 5, 2, 5, 3, 2, 3],
    ];

    #[test]
    fn forward_and_backward_match_candle_conv2d() {
        for (case, &[n, ci, h, w, co, kh, kw, p, s]) in CASES.iter().enumerate() {
            let seed = case as u64 * 3;
            let x = Var::from_tensor(&random(&[n, ci, h, w], seed, DType::F64)).unwrap();
            let wt = Var::from_tensor(&random(&[co, ci, kh, kw], seed + 1, DType::F64)).unwrap();
            let b = Var::from_tensor(&random(&[co], seed + 2, DType::F64)).unwrap();
            let config = Conv2dConfig {
                padding: p,
                stride: s,
            };
            let ours = conv2d(&x, &wt, Some(&b), config).unwrap();
            let theirs = x
                .conv2d(&wt, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {case}");
            assert!(max_abs_diff(&ours, &theirs) < 1e-12, "case {case} forward");
            // A loss weighting every output differently.
            let weights = random(ours.dims(), seed + 3, DType::F64);
            let ours_grads = (&ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let theirs_grads = (&theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("weight", &wt), ("bias", &b)] {
                let a = ours_grads.get(v).unwrap();
                let e = theirs_grads.get(v).unwrap();
                assert!(max_abs_diff(a, e) < 1e-12, "case {case} d{name}");
            }
        }
    }

    /// A 5 × 5 kernel with padding 2 on a 1 × 2 map: most kernel columns
    /// lie wholly in the padding. Forward against candle, gradients by
    /// finite differences.
    #[test]
    fn kernels_wider_than_the_map_work() {
        let x = Var::from_tensor(&random(&[2, 1, 1, 2], 31, DType::F64)).unwrap();
        let wt = random(&[2, 1, 5, 5], 32, DType::F64);
        let config = Conv2dConfig {
            padding: 2,
            stride: 1,
        };
        let ours = conv2d(&x, &wt, None, config).unwrap();
        let theirs = x.conv2d(&wt, 2, 1, 1, 1).unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-12);
        let grads = ours.sum_all().unwrap().backward().unwrap();
        let dx: Vec<f64> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for (i, &g) in dx.iter().enumerate() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, (2, 1, 1, 2), &Device::Cpu).unwrap();
                conv2d(&t, &wt, None, config)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((numeric - g).abs() < 1e-7, "dx[{i}]: {numeric} vs {g}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, ci, h, w, co) = (2, 2, 5, 4, 3);
        let x = Var::from_tensor(&random(&[n, ci, h, w], 11, DType::F64)).unwrap();
        let wt = Var::from_tensor(&random(&[co, ci, 3, 3], 12, DType::F64)).unwrap();
        let b = Var::from_tensor(&random(&[co], 13, DType::F64)).unwrap();
        let config = Conv2dConfig {
            padding: 1,
            stride: 2,
        };
        let weights = random(&[n, co, 3, 2], 14, DType::F64);
        let loss = |x: &Tensor, wt: &Tensor, b: &Tensor| {
            (conv2d(x, wt, Some(b), config).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (conv2d(&x, &wt, Some(&b), config).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let h_step = 1e-6;
        for which in 0..3 {
            let var = [&x, &wt, &b][which];
            let analytic: Vec<f64> = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for (i, &g) in analytic.iter().enumerate() {
                let shifted = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
                    match which {
                        0 => loss(&t, &wt, &b),
                        1 => loss(&x, &t, &b),
                        _ => loss(&x, &wt, &t),
                    }
                };
                let numeric = (shifted(h_step) - shifted(-h_step)) / (2.0 * h_step);
                assert!(
                    (numeric - g).abs() < 1e-7 * (1.0 + g.abs()),
                    "argument {which} index {i}: finite difference {numeric}, backward {g}"
                );
            }
        }
    }

    #[test]
    fn f32_matches_f64_and_any_thread_count_gives_the_same_bits() {
        let x = random(&[9, 3, 10, 10], 21, DType::F32);
        let wt = random(&[4, 3, 3, 3], 22, DType::F32);
        let b = random(&[4], 23, DType::F32);
        let config = Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (xv, wv, bv) = (
                    Var::from_tensor(&x).unwrap(),
                    Var::from_tensor(&wt).unwrap(),
                    Var::from_tensor(&b).unwrap(),
                );
                let y = conv2d(&xv, &wv, Some(&bv), config).unwrap();
                let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (
                    flat(&y),
                    [&xv, &wv, &bv].map(|v| flat(grads.get(v).unwrap())),
                )
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
        let y64 = conv2d(
            &x.to_dtype(DType::F64).unwrap(),
            &wt.to_dtype(DType::F64).unwrap(),
            Some(&b.to_dtype(DType::F64).unwrap()),
            config,
        )
        .unwrap();
        let y32 = Tensor::from_vec(one.0, y64.shape(), &Device::Cpu).unwrap();
        assert!(max_abs_diff(&y32.to_dtype(DType::F64).unwrap(), &y64) < 1e-5);
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_op_and_shapes() {
        let x = random(&[2, 3, 4, 4], 1, DType::F32);
        let cases = [
            (random(&[2, 4, 3, 3], 2, DType::F32), None, 1),
            (random(&[2, 3, 7, 7], 2, DType::F32), None, 0),
            (random(&[2, 3, 3], 2, DType::F32), None, 0),
            (
                random(&[2, 3, 3, 3], 2, DType::F32),
                Some(random(&[3], 3, DType::F32)),
                1,
            ),
        ];
        for (w, b, p) in cases {
            let config = Conv2dConfig {
                padding: p,
                stride: 1,
            };
            let e = conv2d(&x, &w, b.as_ref(), config).unwrap_err().to_string();
            assert!(e.contains("conv2d") && e.contains('['), "{e}");
        }
        let empty = Tensor::zeros((2, 1, 0, 3), DType::F32, &Device::Cpu).unwrap();
        let e = conv2d(
            &empty,
            &random(&[1, 1, 1, 1], 4, DType::F32),
            None,
            Conv2dConfig {
                padding: 1,
                stride: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("conv2d") && e.contains("[2, 1, 0, 3]"), "{e}");
        let e = conv2d(
            &x,
            &random(&[2, 3, 3, 3], 2, DType::F32),
            None,
            Conv2dConfig {
                padding: usize::MAX / 2,
                stride: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("conv2d") && e.contains("padding"), "{e}");
        let e = conv2d(
            &x,
            &random(&[2, 3, 3, 3], 2, DType::F64),
            None,
            Conv2dConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("conv2d"), "{e}");
    }
}
