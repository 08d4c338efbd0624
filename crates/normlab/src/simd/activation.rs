//! A fused activation on eight lanes: `φ(z)` forward and `dz = φ'(z)·dy`
//! backward, `z` recomputed by the caller from `x` with the forward's own
//! coefficients (the same operations, so the same bits as the `z` whose
//! `φ(z)` was stored).

use super::vector::V8;
use crate::activation::{relu, Activation};
use crate::float::Lane;
use crate::simd::Isa;

/// The activation a fused kernel applies; `None` for a plain normalization.
pub(crate) type Act = Option<Activation>;

/// Runs `$body` once per activation with `$act` a constant in each arm, so
/// that the kernel's loop is compiled once per activation, [`apply`] and
/// [`grad`] folded away in each (a run-time `act` matched inside the loop
/// kept LayerNorm's backward from vectorizing: 7.9 → 15 ms on
/// `[8192, 1024]` f32, 2 threads).
macro_rules! unswitch {
    ($act:ident, $body:block) => {
        match $act {
            None => {
                let $act: $crate::simd::activation::Act = None;
                $body
            }
            Some($crate::Activation::Relu) => {
                let $act: $crate::simd::activation::Act = Some($crate::Activation::Relu);
                $body
            }
            Some($crate::Activation::Tanh) => {
                let $act: $crate::simd::activation::Act = Some($crate::Activation::Tanh);
                $body
            }
            Some($crate::Activation::Sigmoid) => {
                let $act: $crate::simd::activation::Act = Some($crate::Activation::Sigmoid);
                $body
            }
        }
    };
}
pub(crate) use unswitch;

/// `φ(z)`, or `z` without an activation.
#[inline(always)]
pub(crate) fn apply<C: Lane, L: Isa>(act: Act, z: V8<C, L>) -> V8<C, L> {
    match act {
        None => z,
        Some(Activation::Relu) => V8::new(z.lanes.map(relu)),
        Some(Activation::Tanh) => V8::new(C::tanh8::<L>(z.lanes)),
        Some(Activation::Sigmoid) => V8::new(C::sigmoid8::<L>(z.lanes)),
    }
}

/// `dz = φ'·dy` from the activation's output `y`, in PyTorch's order
/// (`threshold_backward`: 0 where `y ≤ 0`; `tanh_backward`: `dy·(1 - y·y)`;
/// `sigmoid_backward`: `dy·(1 - y)·y`).
#[inline(always)]
pub(crate) fn grad_from_output<C: Lane, L: Isa>(act: Act, dy: V8<C, L>, y: V8<C, L>) -> V8<C, L> {
    let one = V8::<C, L>::splat(C::ONE);
    match act {
        None => dy,
        Some(Activation::Relu) => V8::new(C::where_positive8::<L>(y.lanes, dy.lanes)),
        Some(Activation::Tanh) => dy * (one - y * y),
        Some(Activation::Sigmoid) => dy * (one - y) * y,
    }
}

/// `dz = φ'(z)·dy` as [`grad_from_output`], with `y = φ(z)` recomputed in
/// lanes (ReLU's mask from `z` itself, whose sign is `y`'s). `z` is taken
/// by value: the kernels run with `act` a constant ([`unswitch!`]), where
/// an unused `z` is dead code. (A closure for it, compiled apart from the
/// kernel's `target_feature` body whenever LLVM declined to inline it,
/// called each vector operation out of line: a third of BatchNorm's
/// backward on `[1, 2048, 7, 7]`.)
#[inline(always)]
pub(crate) fn grad<C: Lane, L: Isa>(act: Act, dy: V8<C, L>, z: V8<C, L>) -> V8<C, L> {
    match act {
        None => dy,
        Some(Activation::Relu) => grad_from_output(act, dy, z),
        Some(_) => grad_from_output(act, dy, apply(act, z)),
    }
}
