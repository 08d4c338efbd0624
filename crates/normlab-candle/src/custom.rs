//! The candle custom-op plumbing shared by every normalization: one op type
//! implements [`CustomOp1`](candle_core::CustomOp1) (x),
//! [`CustomOp2`](candle_core::CustomOp2) (x, weight) and
//! [`CustomOp3`](candle_core::CustomOp3) (x, weight, bias) through
//! [`impl_custom_ops!`].

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// A normalization as candle sees it: a forward on CPU storages and a
/// backward on tensors.
pub(crate) trait NormOp {
    /// Op name for candle's graph and for errors.
    fn op_name(&self) -> &'static str;

    /// Whether an activation follows the normalization inside the op.
    fn fused(&self) -> bool {
        false
    }

    /// `y` from `x` and the optional parameters, in `x`'s dtype.
    fn forward_storage(
        &self,
        x: (&CpuStorage, &Layout),
        weight: Option<(&CpuStorage, &Layout)>,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage>;

    /// `(dx, dweight, dbias)` for the forward call's `x` and output `y`,
    /// given `dy`; `bias` is the forward's β when it had one (a fused
    /// activation's backward recomputes its input from it).
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)>;
}

/// Implements candle's `CustomOp1/2/3` for a [`NormOp`].
macro_rules! impl_custom_ops {
    ($op:ty) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $crate::custom::NormOp::op_name(self)
            }

            fn cpu_fwd(
                &self,
                s: &candle_core::CpuStorage,
                l: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let y = $crate::custom::NormOp::forward_storage(self, (s, l), None, None)?;
                Ok((y, l.shape().clone()))
            }

            fn bwd(
                &self,
                x: &candle_core::Tensor,
                res: &candle_core::Tensor,
                dy: &candle_core::Tensor,
            ) -> candle_core::Result<Option<candle_core::Tensor>> {
                Ok(Some(
                    $crate::custom::NormOp::backward(self, x, res, dy, None, None)?.0,
                ))
            }
        }

        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $crate::custom::NormOp::op_name(self)
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let y =
                    $crate::custom::NormOp::forward_storage(self, (s1, l1), Some((s2, l2)), None)?;
                Ok((y, l1.shape().clone()))
            }

            fn bwd(
                &self,
                x: &candle_core::Tensor,
                w: &candle_core::Tensor,
                res: &candle_core::Tensor,
                dy: &candle_core::Tensor,
            ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)>
            {
                let (dx, dw, _) =
                    $crate::custom::NormOp::backward(self, x, res, dy, Some(w), None)?;
                Ok((Some(dx), dw))
            }
        }

        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $crate::custom::NormOp::op_name(self)
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let y = $crate::custom::NormOp::forward_storage(
                    self,
                    (s1, l1),
                    Some((s2, l2)),
                    Some((s3, l3)),
                )?;
                Ok((y, l1.shape().clone()))
            }

            #[allow(clippy::type_complexity)]
            fn bwd(
                &self,
                x: &candle_core::Tensor,
                w: &candle_core::Tensor,
                b: &candle_core::Tensor,
                res: &candle_core::Tensor,
                dy: &candle_core::Tensor,
            ) -> candle_core::Result<(
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
            )> {
                let (dx, dw, db) =
                    $crate::custom::NormOp::backward(self, x, res, dy, Some(w), Some(b))?;
                Ok((Some(dx), dw, db))
            }
        }
    };
}
pub(crate) use impl_custom_ops;

/// Applies an op to `x` with optional `weight` and `bias` (a bias without a
/// weight is added afterwards, broadcast over `bias_shape`; with a fused
/// activation, which needs β inside it, the weight is ones instead).
pub(crate) fn apply<O>(
    op: O,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    bias_shape: &[usize],
) -> Result<Tensor>
where
    O: NormOp
        + candle_core::CustomOp1
        + candle_core::CustomOp2
        + candle_core::CustomOp3
        + Send
        + Sync
        + 'static,
{
    match (weight, bias) {
        (None, Some(b)) if op.fused() => x.apply_op3(&b.ones_like()?, b, op),
        (Some(w), Some(b)) => x.apply_op3(w, b, op),
        (Some(w), None) => x.apply_op2(w, op),
        (None, None) => x.apply_op1(op),
        (None, Some(b)) => x.apply_op1(op)?.broadcast_add(&b.reshape(bias_shape)?),
    }
}
