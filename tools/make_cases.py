#!/usr/bin/env python3
"""Writes normcase/1 conformance cases for every op, option and bad input
into tests/data/normlab/, with expected values from PyTorch in float64.

Development tool: needs torch and numpy (not a dependency of the project or of
its tests; the cases it writes are committed). Inputs are drawn in float32;
expected outputs and gradients are computed in float64 from those float32
values, by PyTorch's own functions where it has the option, and by autograd
through the formula written out where it does not (ε added to σ, AlexNet's
unscaled α, ONNX's even window, LRN within channel).

The bfloat16 and float16 cases (`bf16_*`, `f16_*`, see `sixteen_bit_cases`)
draw their inputs in float32 and round them to the 16-bit type; the reference
is computed in float64 from those rounded values and rounded once to the type.

    ~/.cache/torch-venv/bin/python tools/make_cases.py
"""
import json
import pathlib
import shutil
from decimal import Decimal

import numpy as np
import torch
import torch.nn.functional as F

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "normlab"
SOURCE = f"PyTorch {torch.__version__.split('+')[0]} float64 on float32 inputs (tools/make_cases.py)"
rng = np.random.default_rng(20261125)


def f32(shape, offset=0.0, sd=1.0):
    return torch.tensor((offset + sd * rng.standard_normal(shape)).astype(np.float32), dtype=torch.float64)


def enc(t):
    t = torch.as_tensor(t, dtype=torch.float64)
    vals = t.detach().reshape(-1).numpy().astype(np.float32)
    return {"shape": list(t.shape), "data": [float(v) for v in vals]}


def write(name, op, attrs, inputs, expected=None, dy=None, grads=None, expect_error=False, note=None):
    case = {"format": "normcase/1", "name": name, "source": note or SOURCE, "op": op, "attrs": attrs,
            "inputs": {k: enc(v) for k, v in inputs.items() if v is not None}}
    if expect_error:
        case["expect_error"] = True
    else:
        case["expected"] = {k: enc(v) for k, v in expected.items()}
        case["tolerance"] = {"atol": 1e-5, "rtol": 1e-4}
    if dy is not None:
        case["backward"] = {"dy": enc(dy), "expected": {k: enc(v) for k, v in grads.items() if v is not None},
                            "tolerance": {"atol": 1e-4, "rtol": 1e-3}}
    (OUT / f"{name}.json").write_text(json.dumps(case, separators=(",", ":")) + "\n")


def grads_of(fn, x, weight=None, bias=None):
    """Forward y and gradients of sum(y * dy) for a random dy."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    dy = f32(tuple(y.shape))
    wanted = [t for t in leaves if t is not None]
    g = torch.autograd.grad(y, wanted, dy)
    it = iter(g)
    out = {k: (next(it) if t is not None else None) for k, t in zip(("dx", "dweight", "dbias"), leaves)}
    return y.detach(), dy, out


def normalize(x, dims, eps, add_to_std, centred=True):
    mean = x.mean(dim=dims, keepdim=True) if centred else 0.0
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / (var.sqrt() + eps if add_to_std else (var + eps).sqrt())


def channel_view(t, x):
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


# ---------------------------------------------------------------- batch_norm
def batch_norm_cases():
    for shape in [(4, 3), (3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 2, 2), (1, 3, 4, 4)]:
        c = shape[1]
        tag = f"{len(shape) - 2}d" if len(shape) > 2 else "0d"
        for momentum, nbt, est, affine in [(0.1, None, "unbiased", True), (0.3, None, "biased", False),
                                           (None, 4, "unbiased", True)]:
            x = f32(shape, 0.5, 2.0)
            w, b = (f32((c,), 1.0, 0.3), f32((c,), 0.0, 0.3)) if affine else (None, None)
            rm, rv = f32((c,), 0.0, 0.5), f32((c,), 0.0, 0.2).abs() + 0.5
            m = momentum if momentum is not None else 1.0 / (nbt + 1)
            rm2, rv2 = rm.clone(), rv.clone()
            y, dy, g = grads_of(lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, True, m, 1e-5), x, w, b)
            if est == "biased":  # PyTorch keeps the unbiased one; redo the update with the biased variance
                dims = [0] + list(range(2, x.dim()))
                count = x.numel() // c
                rv2 = (1 - m) * rv + m * x.var(dim=dims, unbiased=False)
            name = f"batch_norm_train_{tag}_m{'none' if momentum is None else momentum}_{est}{'' if affine else '_noaffine'}"
            inputs = {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv}
            if nbt is not None:
                inputs["num_batches_tracked"] = torch.tensor(float(nbt))
            write(name, "batch_norm", {"eps": 1e-5, "training": True, "momentum": momentum, "running_var_estimator": est},
                  inputs, {"y": y, "running_mean": rm2, "running_var": rv2}, dy, g)
        # evaluation, gradient with running statistics as constants
        x = f32(shape, -1.0, 1.5)
        w, b = f32((c,), 1.0, 0.3), f32((c,), 0.0, 0.3)
        rm, rv = f32((c,), -1.0, 0.5), f32((c,), 0.0, 0.5).abs() + 0.5
        y, dy, g = grads_of(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3), x, w, b)
        write(f"batch_norm_eval_{tag}", "batch_norm", {"eps": 1e-3, "training": False, "momentum": 0.1},
              {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv},
              {"y": y, "running_mean": rm, "running_var": rv}, dy, g)
    # ε added to σ, both modes (formula by autograd)
    x = f32((5, 3, 4), 2.0, 0.7)
    w, b = f32((3,), 1.0, 0.3), f32((3,), 0.0, 0.3)
    y, dy, g = grads_of(lambda x, w, b: normalize(x, [0, 2], 0.1, True) * channel_view(w, x) + channel_view(b, x), x, w, b)
    write("batch_norm_train_eps_add_to_std", "batch_norm", {"eps": 0.1, "eps_placement": "add_to_std", "training": True},
          {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g)
    rm, rv = f32((3,), 2.0, 0.3), f32((3,), 0.0, 0.3).abs() + 0.2
    fn = lambda x, w, b: (x - channel_view(rm, x)) / (channel_view(rv, x).sqrt() + 0.1) * channel_view(w, x) + channel_view(b, x)
    y, dy, g = grads_of(fn, x, w, b)
    write("batch_norm_eval_eps_add_to_std", "batch_norm", {"eps": 0.1, "eps_placement": "add_to_std", "training": False},
          {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv}, {"y": y}, dy, g)
    # large offset
    x = f32((16, 4, 8), 1e4, 0.01)
    y, dy, g = grads_of(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), x, None, None)
    write("batch_norm_train_large_offset", "batch_norm", {"eps": 1e-5, "training": True}, {"x": x}, {"y": y}, dy, g)
    # zero-size batch: empty output, running statistics unchanged
    x = torch.zeros((0, 3, 4), dtype=torch.float64)
    rm, rv = f32((3,)), f32((3,)).abs() + 0.5
    write("batch_norm_train_empty_batch", "batch_norm", {"eps": 1e-5, "training": True, "momentum": 0.1},
          {"x": x, "running_mean": rm, "running_var": rv}, {"y": x, "running_mean": rm, "running_var": rv})


# ---------------------------------------------------------------- layer_norm / rms_norm
def layer_and_rms_cases():
    for shape, axis in [((4, 6), -1), ((2, 3, 5), 1), ((2, 3, 5), -2), ((2, 3, 4, 2), 0), ((3, 1), -1)]:
        ax = axis % len(shape)
        ns = shape[ax:]
        for variant in ["affine", "no_bias", "no_affine"]:
            x = f32(shape, 1.0, 2.0)
            w = f32(ns, 1.0, 0.3) if variant != "no_affine" else None
            b = f32(ns, 0.0, 0.3) if variant == "affine" else None
            y, dy, g = grads_of(lambda x, w, b: F.layer_norm(x, ns, w, b, 1e-5), x, w, b)
            dims = list(range(ax, len(shape)))
            mean = x.mean(dim=dims, keepdim=True)
            rstd = 1 / (x.var(dim=dims, unbiased=False, keepdim=True) + 1e-5).sqrt()
            write(f"layer_norm_{len(shape)}d_axis{axis}_{variant}", "layer_norm", {"eps": 1e-5, "axis": axis},
                  {"x": x, "weight": w, "bias": b}, {"y": y, "mean": mean, "rstd": rstd}, dy, g)
        for variant in ["weight", "no_weight"]:
            x = f32(shape, 0.3, 1.5)
            w = f32(ns, 1.0, 0.3) if variant == "weight" else None
            y, dy, g = grads_of(lambda x, w, b: F.rms_norm(x, ns, w, 1e-6), x, w, None)
            write(f"rms_norm_{len(shape)}d_axis{axis}_{variant}", "rms_norm", {"eps": 1e-6, "axis": axis},
                  {"x": x, "weight": w}, {"y": y}, dy, g)
    x = f32((3, 8), -2.0, 1.0)
    w, b = f32((8,), 1.0, 0.3), f32((8,), 0.0, 0.3)
    y, dy, g = grads_of(lambda x, w, b: normalize(x, [-1], 0.05, True) * w + b, x, w, b)
    write("layer_norm_eps_add_to_std", "layer_norm", {"eps": 0.05, "axis": -1, "eps_placement": "add_to_std"},
          {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g)
    y, dy, g = grads_of(lambda x, w, b: normalize(x, [-1], 0.05, True, centred=False) * w, x, w, None)
    write("rms_norm_eps_add_to_std", "rms_norm", {"eps": 0.05, "axis": -1, "eps_placement": "add_to_std"},
          {"x": x, "weight": w}, {"y": y}, dy, g)
    x = f32((4, 1024), 1e4, 0.01)
    y, dy, g = grads_of(lambda x, w, b: F.layer_norm(x, (1024,), None, None, 1e-5), x)
    write("layer_norm_large_offset", "layer_norm", {"eps": 1e-5, "axis": -1}, {"x": x}, {"y": y}, dy, g)


# ---------------------------------------------------------------- group_norm / instance_norm
def group_and_instance_cases():
    for shape, groups in [((2, 6, 5), 1), ((2, 6, 5), 3), ((2, 6, 5), 6), ((3, 4), 2), ((2, 4, 3, 3), 2), ((1, 8, 2, 2, 2), 4)]:
        c = shape[1]
        for affine in [True, False]:
            x = f32(shape, 2.0, 1.0)
            w, b = (f32((c,), 1.0, 0.3), f32((c,), 0.0, 0.3)) if affine else (None, None)
            y, dy, g = grads_of(lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5), x, w, b)
            write(f"group_norm_{'x'.join(map(str, shape))}_g{groups}{'' if affine else '_noaffine'}", "group_norm",
                  {"eps": 1e-5, "num_groups": groups}, {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g)
    x = f32((2, 4, 6), 0.0, 2.0)
    w, b = f32((4,), 1.0, 0.3), f32((4,), 0.0, 0.3)
    fn = lambda x, w, b: normalize(x.reshape(2, 2, -1), [-1], 0.1, True).reshape(x.shape) * channel_view(w, x) + channel_view(b, x)
    y, dy, g = grads_of(fn, x, w, b)
    write("group_norm_eps_add_to_std", "group_norm", {"eps": 0.1, "num_groups": 2, "eps_placement": "add_to_std"},
          {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g)
    for shape in [(2, 3, 5), (3, 2, 4, 3), (1, 2, 2, 2, 3)]:
        c = shape[1]
        for affine in [True, False]:
            x = f32(shape, -1.0, 1.5)
            w, b = (f32((c,), 1.0, 0.3), f32((c,), 0.0, 0.3)) if affine else (None, None)
            y, dy, g = grads_of(lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5), x, w, b)
            write(f"instance_norm_{len(shape) - 2}d{'' if affine else '_noaffine'}", "instance_norm", {"eps": 1e-5},
                  {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g)
    # running statistics: updated from the instances in training, used in evaluation
    x = f32((3, 2, 5), 1.0, 2.0)
    w, b = f32((2,), 1.0, 0.3), f32((2,), 0.0, 0.3)
    rm, rv = f32((2,), 0.0, 0.5), f32((2,), 0.0, 0.3).abs() + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y, dy, g = grads_of(lambda x, w, b: F.instance_norm(x, rm2, rv2, w, b, True, 0.2, 1e-5), x, w, b)
    write("instance_norm_train_running_stats", "instance_norm", {"eps": 1e-5, "use_input_stats": True, "momentum": 0.2},
          {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv},
          {"y": y, "running_mean": rm2, "running_var": rv2}, dy, g)
    y, dy, g = grads_of(lambda x, w, b: F.instance_norm(x, rm, rv, w, b, False, 0.2, 1e-5), x, w, b)
    write("instance_norm_eval_running_stats", "instance_norm", {"eps": 1e-5, "use_input_stats": False},
          {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv}, {"y": y}, dy, g)


# ---------------------------------------------------------------- lrn
def lrn_formula(x, size, alpha, beta, k, over_size, even, within):
    return x / lrn_den(x, size, alpha, k, over_size, even, within) ** beta


def lrn_den(x, size, alpha, k, over_size=True, even="torch", within=False):
    """k + a * (window sum of x^2): the base of LRN's power."""
    before = size // 2 if even == "torch" else (size - 1) // 2
    after = size - 1 - before
    sq = x * x
    if within:  # box over every spatial axis
        s = sq
        for axis in range(2, x.dim()):
            pad = [0, 0] * (x.dim() - 1 - axis) + [before, after]
            padded = F.pad(s.movedim(axis, -1), pad[-2:]).movedim(-1, axis)
            s = sum(padded.narrow(axis, i, x.shape[axis]) for i in range(size))
        a = alpha / size ** (x.dim() - 2) if over_size else alpha
    else:
        padded = F.pad(sq.movedim(1, -1), (before, after)).movedim(-1, 1)
        s = sum(padded.narrow(1, i, x.shape[1]) for i in range(size))
        a = alpha / size if over_size else alpha
    return k + a * s


def lrn_cases():
    for size in [1, 2, 3, 4, 5]:
        x = f32((2, 6, 3, 4), 0.0, 2.0)
        y, dy, g = grads_of(lambda x, w, b: F.local_response_norm(x, size, 0.3, 0.75, 1.5), x)
        write(f"lrn_torch_size{size}", "lrn", {"size": size, "alpha": 0.3, "beta": 0.75, "k": 1.5}, {"x": x}, {"y": y}, dy, g)
    for size, even, over, within, shape in [(4, "onnx", True, False, (2, 7, 3)), (5, "torch", False, False, (1, 6, 2, 3)),
                                            (3, "torch", True, True, (2, 3, 5, 4)), (3, "torch", False, True, (1, 2, 4, 5)),
                                            (2, "onnx", True, True, (2, 2, 4, 4)), (3, "torch", True, True, (2, 2, 7)),
                                            (3, "torch", True, False, (2, 5, 2, 2, 3))]:
        x = f32(shape, 0.0, 2.0)
        y, dy, g = grads_of(lambda x, w, b: lrn_formula(x, size, 0.5, 0.75, 2.0, over, even, within), x)
        region = "within_channel" if within else "across_channels"
        write(f"lrn_{region}_size{size}_{even}_{'over_size' if over else 'plain_alpha'}_{len(shape)}d", "lrn",
              {"size": size, "alpha": 0.5, "beta": 0.75, "k": 2.0, "alpha_over_size": over, "even_window": even, "region": region},
              {"x": x}, {"y": y}, dy, g)


# ---------------------------------------------------------------- bad input
def error_cases():
    x23, x234 = f32((2, 3)), f32((2, 3, 4))
    c3, c4 = f32((3,)), f32((4,))
    bn = {"eps": 1e-5, "training": True, "momentum": 0.1}
    errs = [
        ("batch_norm_train_one_value_per_channel", "batch_norm", bn, {"x": f32((1, 3))}),
        ("batch_norm_train_one_value_per_channel_4d", "batch_norm", bn, {"x": f32((1, 3, 1, 1))}),
        ("batch_norm_weight_length", "batch_norm", bn, {"x": x234, "weight": c4}),
        ("batch_norm_bias_length", "batch_norm", bn, {"x": x234, "bias": c4}),
        ("batch_norm_running_mean_length", "batch_norm", bn, {"x": x234, "running_mean": c4, "running_var": c3}),
        ("batch_norm_running_var_length", "batch_norm", {**bn, "training": False}, {"x": x234, "running_mean": c3, "running_var": c4}),
        ("batch_norm_eval_without_running_stats", "batch_norm", {**bn, "training": False}, {"x": x234}),
        ("batch_norm_rank_1", "batch_norm", bn, {"x": c3}),
        ("batch_norm_negative_eps", "batch_norm", {**bn, "eps": -1e-5}, {"x": x234}),
        ("batch_norm_momentum_above_one", "batch_norm", {**bn, "momentum": 1.5}, {"x": x234, "running_mean": c3, "running_var": c3.abs()}),
        ("batch_norm_momentum_negative", "batch_norm", {**bn, "momentum": -0.1}, {"x": x234}),
        ("group_norm_channels_not_divisible", "group_norm", {"eps": 1e-5, "num_groups": 4}, {"x": f32((2, 6, 3))}),
        ("group_norm_zero_groups", "group_norm", {"eps": 1e-5, "num_groups": 0}, {"x": f32((2, 6, 3))}),
        ("group_norm_weight_length", "group_norm", {"eps": 1e-5, "num_groups": 3}, {"x": x234, "weight": c4}),
        ("group_norm_negative_eps", "group_norm", {"eps": -1.0, "num_groups": 1}, {"x": x234}),
        ("instance_norm_weight_length", "instance_norm", {"eps": 1e-5}, {"x": x234, "weight": c4}),
        ("instance_norm_one_spatial_value", "instance_norm", {"eps": 1e-5}, {"x": f32((2, 3, 1))}),
        ("instance_norm_eval_without_running_stats", "instance_norm", {"eps": 1e-5, "use_input_stats": False}, {"x": x234}),
        ("layer_norm_weight_shape", "layer_norm", {"eps": 1e-5, "axis": -1}, {"x": x234, "weight": f32((3, 4))}),
        ("layer_norm_bias_shape", "layer_norm", {"eps": 1e-5, "axis": 1}, {"x": x234, "bias": c4}),
        ("layer_norm_axis_too_large", "layer_norm", {"eps": 1e-5, "axis": 3}, {"x": x234}),
        ("layer_norm_axis_too_negative", "layer_norm", {"eps": 1e-5, "axis": -4}, {"x": x234}),
        ("layer_norm_negative_eps", "layer_norm", {"eps": -1e-3, "axis": -1}, {"x": x23}),
        ("rms_norm_weight_shape", "rms_norm", {"eps": 1e-5, "axis": -1}, {"x": x234, "weight": c3}),
        ("rms_norm_axis_out_of_range", "rms_norm", {"eps": 1e-5, "axis": 2}, {"x": x23}),
        ("lrn_rank_2", "lrn", {"size": 3, "alpha": 1e-4, "beta": 0.75, "k": 1.0}, {"x": x23}),
        ("lrn_size_0", "lrn", {"size": 0, "alpha": 1e-4, "beta": 0.75, "k": 1.0}, {"x": x234}),
    ]
    for name, op, attrs, inputs in errs:
        write(f"error_{name}", op, attrs, inputs, expect_error=True,
              note="bad input: the operation must refuse it (tools/make_cases.py)")


# ---------------------------------------------------------------- bfloat16 / float16
# Significand bits after the point, exponent of the smallest normal, largest finite value.
FORMATS = {"bfloat16": (7, -126, (2 - 2.0 ** -7) * 2.0 ** 127), "float16": (10, -14, 65504.0)}
PREFIX = {"bfloat16": "bf16", "float16": "f16"}
SOURCE16 = (f"PyTorch {torch.__version__.split('+')[0]} float64 on {{dtype}} inputs, rounded once to {{dtype}} "
            "(tools/make_cases.py)")
rng16 = np.random.default_rng(20261126)  # its own stream: the float32 cases above stay as they were


def round_to(t, dtype):
    """float64 values rounded to nearest-even in `dtype`, as float64. Done here
    rather than by torch, whose float64 -> bfloat16/float16 cast goes through
    float32 and so rounds twice (1 + 2^-8 + 2^-40 becomes 1, not 1 + 2^-7)."""
    frac, emin, vmax = FORMATS[dtype]
    a = torch.as_tensor(t, dtype=torch.float64).detach().numpy()
    _, e = np.frexp(a)  # |a| = m * 2^e with 1/2 <= m < 1
    ulp = np.ldexp(1.0, np.maximum(e - 1, emin) - frac)
    r = np.round(a / ulp) * ulp  # a / ulp is exact; np.round ties to even
    assert np.all(np.abs(r) <= vmax), f"{dtype} overflow"
    return torch.tensor(r, dtype=torch.float64).reshape(torch.as_tensor(t).shape)


def draw16(dtype, shape, offset=0.0, sd=1.0):
    """Drawn in float32, rounded to `dtype`."""
    v = (offset + sd * rng16.standard_normal(shape)).astype(np.float32).astype(np.float64)
    return round_to(torch.tensor(v), dtype)


class Raw(str):
    """A JSON number written as this exact text."""


def enc16(t, dtype):
    """Values of `dtype`, written as their exact decimals (what the runner requires)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    assert torch.equal(round_to(t, dtype), t), "not a value of the type"
    return {"shape": list(t.shape), "data": [Raw(str(Decimal(float(v)))) for v in t.reshape(-1).tolist()]}


def dumps(v):
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


# Statistics the runner reads as float32 in every case (FORMAT.md).
STATISTICS = {"mean", "rstd", "num_batches_tracked"}

# Backward tolerance: 1 ulp, or an absolute error of 2^-21 (8 float32 rounding
# errors, 2^-24 each) of `scale`, the largest magnitude of the terms whose sum
# is one dx value (`dx_scale`, `lrn_dx_scale`). An implementation that
# evaluates dx = r (g - mean g) - r x̂ mean(g x̂) in float32, its statistics
# and reductions in float64, rounds about 8 times (the coefficients to
# float32, x - mean, the products and differences), each at 2^-24 of a term.
# Where the terms cancel, 1 ulp of dx (2^-8 to 2^-7 of |dx| in bfloat16,
# 2^-11 to 2^-10 in float16) is smaller than that: the atol decides only for
# dx below about 2^-13 (bfloat16) or 2^-10 (float16) of its terms; above,
# the 1-ulp rule alone does. dweight and dbias share the block's tolerance;
# they are sums, kept in float64 by normlab, and meet 1 ulp without it.
BACKWARD_ATOL_FACTOR = 2.0 ** -21


# The statistics (mean, rstd) are accumulated from float32 lanes, as
# PyTorch's CPU kernels do: within a few float32 ulp of the float64
# reference, not rounded from it. rtol 2^-20 (8 float32 ulp at most) admits
# that; for the 16-bit tensors of the case it is far below one ulp (2^-8 of
# the value in bfloat16, 2^-11 in float16), so their 1-ulp rule is unchanged.
STATISTICS_RTOL = 2.0 ** -20


def tolerance16(expected):
    """The forward tolerance of a 16-bit case: 1 ulp, and the statistics' rtol when it has them."""
    if any(k in STATISTICS for k in expected):
        return {"ulp": 1, "rtol": STATISTICS_RTOL}
    return {"ulp": 1}


def write16(dtype, name, op, attrs, inputs, expected, dy, grads, scale):
    """A case of `dtype`: inputs as given (values of the type), expected
    values rounded once to the type, statistics (mean, rstd) as float32."""
    encode = lambda k, v: enc(v) if k in STATISTICS else enc16(round_to(v, dtype), dtype)
    case = {"format": "normcase/1", "name": f"{PREFIX[dtype]}_{name}", "source": SOURCE16.format(dtype=dtype),
            "dtype": dtype, "op": op, "attrs": attrs,
            "inputs": {k: enc16(v, dtype) for k, v in inputs.items() if v is not None},
            "expected": {k: encode(k, v) for k, v in expected.items()},
            "tolerance": tolerance16(expected)}
    if dy is not None:
        atol = float(np.float32(BACKWARD_ATOL_FACTOR * float(scale)))
        case["backward"] = {"dy": enc16(dy, dtype),
                            "expected": {k: enc16(round_to(v, dtype), dtype) for k, v in grads.items() if v is not None},
                            "tolerance": {"ulp": 1, "atol": atol}}
    (OUT / f"{case['name']}.json").write_text(dumps(case) + "\n")


def grads16(dtype, fn, x, weight=None, bias=None):
    """Forward y and gradients of sum(y * dy) for a random dy of `dtype`."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    dy = draw16(dtype, tuple(y.shape))
    wanted = [t for t in leaves if t is not None]
    g = iter(torch.autograd.grad(y, wanted, dy))
    out = {k: (next(g) if t is not None else None) for k, t in zip(("dx", "dweight", "dbias"), leaves)}
    return y.detach(), dy, out


def dx_scale(x, dy, dims, eps, w=None, centred=True, batch_stats=True, running_var=None):
    """Largest magnitude of the terms of dx = r(g - mean g) - r x̂ mean(g x̂),
    g = weight * dy (means over `dims`); with statistics held constant,
    dx = r g, r from `running_var`."""
    g = dy * w if w is not None else dy
    if not batch_stats:
        return float((g.abs() / (running_var + eps).sqrt()).max())
    mean = x.mean(dim=dims, keepdim=True) if centred else 0.0
    r = 1 / (((x - mean) ** 2).mean(dim=dims, keepdim=True) + eps).sqrt()
    xh = (x - mean) * r
    mg = g.mean(dim=dims, keepdim=True).abs() if centred else 0.0
    return float((r * (g.abs() + mg + xh.abs() * (g * xh).mean(dim=dims, keepdim=True).abs())).max())


def lrn_dx_scale(x, dy, size, alpha, beta, k, **kw):
    """Largest magnitude of the two terms of LRN's dx: dy_i s_i^-β and
    2aβ x_i Σ_j dy_j x_j s_j^(-β-1) over the windows j holding i."""
    x = x.clone().requires_grad_(True)
    s = lrn_den(x, size, alpha, k, **kw)
    c = (beta * (dy * x).abs() * s ** (-beta - 1)).detach()
    (second,) = torch.autograd.grad((c * s).sum(), x)
    return float((dy.abs() * s.detach() ** -beta + second.abs()).max())


def sixteen_bit_cases():
    """Every op in bfloat16 and float16, forward and backward: small shapes,
    a large offset (mean ≫ std) per op family, and shapes with rows or
    channels of thousands of values (SIMD main loops, tails and the kernels'
    blocks). Tolerance: 1 ulp of the type for y and the running statistics
    (mean and rstd, float32, as STATISTICS_RTOL says); backward as
    BACKWARD_ATOL_FACTOR says."""
    for dtype in FORMATS:
        d = lambda *a, **kw: draw16(dtype, *a, **kw)
        w16 = lambda *a, **kw: write16(dtype, *a, **kw)
        # Large offset: bfloat16 spaces values 4 apart near 1000, so its noise
        # is wider (std 6: mean/std ≈ 170); float16 spaces them 0.5 apart (std 1: ≈ 1000).
        big_sd = 6.0 if dtype == "bfloat16" else 1.0

        # layer_norm: y, mean, rstd
        for name, shape, axis, variant, offset, sd in [
                ("2d_affine", (4, 40), -1, "affine", 1.0, 2.0),
                ("3d_axis1_no_bias", (2, 3, 5), 1, "no_bias", 0.5, 1.5),
                ("2d_no_affine", (3, 17), -1, "no_affine", -1.0, 1.0),
                ("large_offset", (4, 256), -1, "affine", 1000.0, big_sd),
                ("wide_3000", (2, 3000), -1, "affine", 0.5, 1.0)]:
            ax = axis % len(shape)
            ns = shape[ax:]
            x = d(shape, offset, sd)
            w = d(ns, 1.0, 0.3) if variant != "no_affine" else None
            b = d(ns, 0.0, 0.3) if variant == "affine" else None
            y, dy, g = grads16(dtype, lambda x, w, b: F.layer_norm(x, ns, w, b, 1e-5), x, w, b)
            dims = list(range(ax, len(shape)))
            mean = x.mean(dim=dims, keepdim=True)
            rstd = 1 / (x.var(dim=dims, unbiased=False, keepdim=True) + 1e-5).sqrt()
            w16(f"layer_norm_{name}", "layer_norm", {"eps": 1e-5, "axis": axis}, {"x": x, "weight": w, "bias": b},
                {"y": y, "mean": mean, "rstd": rstd}, dy, g, dx_scale(x, dy, dims, 1e-5, w))

        # rms_norm
        for name, shape, axis, weighted, offset, sd in [
                ("2d_weight", (4, 40), -1, True, 0.3, 1.5),
                ("3d_axis_m2_no_weight", (2, 3, 5), -2, False, 0.0, 1.0),
                ("large_offset", (4, 256), -1, True, 1000.0, big_sd),
                ("wide_3000", (2, 3000), -1, True, 0.0, 1.0)]:
            ax = axis % len(shape)
            ns = shape[ax:]
            x = d(shape, offset, sd)
            w = d(ns, 1.0, 0.3) if weighted else None
            y, dy, g = grads16(dtype, lambda x, w, b: F.rms_norm(x, ns, w, 1e-6), x, w, None)
            w16(f"rms_norm_{name}", "rms_norm", {"eps": 1e-6, "axis": axis}, {"x": x, "weight": w}, {"y": y}, dy, g,
                dx_scale(x, dy, list(range(ax, len(shape))), 1e-6, w, centred=False))

        # batch_norm, training: gradient through the batch statistics, running statistics updated
        for name, shape, momentum, nbt, est, affine, offset, sd in [
                ("2d", (3, 4, 5), 0.1, None, "unbiased", True, 0.5, 2.0),
                ("0d_130x3_mnone", (130, 3), None, 4, "unbiased", True, -0.5, 1.0),
                ("3d_biased_noaffine", (2, 3, 4, 2, 3), 0.3, None, "biased", False, 0.0, 1.5),
                ("large_offset", (16, 4, 8), 0.1, None, "unbiased", True, 1000.0, big_sd),
                ("wide_2x3000", (2, 1, 3000), 0.1, None, "unbiased", True, 0.5, 1.0)]:
            c = shape[1]
            x = d(shape, offset, sd)
            w, b = (d((c,), 1.0, 0.3), d((c,), 0.0, 0.3)) if affine else (None, None)
            rm, rv = d((c,), 0.0, 0.5), (d((c,), 0.0, 0.2).abs() + 0.5)
            rv = round_to(rv, dtype)
            m = momentum if momentum is not None else 1.0 / (nbt + 1)
            rm2, rv2 = rm.clone(), rv.clone()
            y, dy, g = grads16(dtype, lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, True, m, 1e-5), x, w, b)
            dims = [0] + list(range(2, x.dim()))
            if est == "biased":  # PyTorch keeps the unbiased one; redo the update with the biased variance
                rv2 = (1 - m) * rv + m * x.var(dim=dims, unbiased=False)
            inputs = {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv}
            if nbt is not None:
                inputs["num_batches_tracked"] = torch.tensor(float(nbt))
            wv = w.reshape([1, -1] + [1] * (x.dim() - 2)) if w is not None else None
            w16(f"batch_norm_train_{name}", "batch_norm",
                {"eps": 1e-5, "training": True, "momentum": momentum, "running_var_estimator": est},
                inputs, {"y": y, "running_mean": rm2, "running_var": rv2}, dy, g, dx_scale(x, dy, dims, 1e-5, wv))

        # batch_norm, evaluation: running statistics are constants
        for name, shape, offset in [("2d", (3, 4, 5), -1.0), ("0d_40x5", (40, 5), 0.0), ("wide_2x3000", (2, 1, 3000), 0.5)]:
            c = shape[1]
            x = d(shape, offset, 1.5)
            w, b = d((c,), 1.0, 0.3), d((c,), 0.0, 0.3)
            rm, rv = d((c,), offset, 0.5), round_to(d((c,), 0.0, 0.5).abs() + 0.5, dtype)
            y, dy, g = grads16(dtype, lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3), x, w, b)
            view = lambda t: t.reshape([1, -1] + [1] * (x.dim() - 2))
            w16(f"batch_norm_eval_{name}", "batch_norm", {"eps": 1e-3, "training": False, "momentum": 0.1},
                {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv},
                {"y": y, "running_mean": rm, "running_var": rv}, dy, g,
                dx_scale(x, dy, None, 1e-3, view(w), batch_stats=False, running_var=view(rv)))

        # group_norm
        for name, shape, groups, affine, offset, sd in [
                ("2x6x5_g3", (2, 6, 5), 3, True, 2.0, 1.0),
                ("2x4x3x3_g2_noaffine", (2, 4, 3, 3), 2, False, 0.0, 1.5),
                ("large_offset", (2, 6, 64), 3, True, 1000.0, big_sd),
                ("wide_1x2x3000_g1", (1, 2, 3000), 1, True, 0.5, 1.0)]:
            c = shape[1]
            x = d(shape, offset, sd)
            w, b = (d((c,), 1.0, 0.3), d((c,), 0.0, 0.3)) if affine else (None, None)
            y, dy, g = grads16(dtype, lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5), x, w, b)
            grouped = lambda t: t.reshape(shape[0], groups, -1)
            wv = grouped(w.reshape([1, -1] + [1] * (x.dim() - 2)).expand(shape)) if affine else None
            w16(f"group_norm_{name}", "group_norm", {"eps": 1e-5, "num_groups": groups},
                {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g, dx_scale(grouped(x), grouped(dy), [-1], 1e-5, wv))

        # instance_norm
        for name, shape, affine, offset, sd in [
                ("1d", (2, 3, 5), True, -1.0, 1.5),
                ("2d_noaffine", (3, 2, 4, 3), False, 0.0, 1.0),
                ("large_offset", (2, 3, 128), True, 1000.0, big_sd),
                ("wide_2x3000", (1, 1, 2, 3000), True, 0.5, 1.0)]:
            c = shape[1]
            x = d(shape, offset, sd)
            w, b = (d((c,), 1.0, 0.3), d((c,), 0.0, 0.3)) if affine else (None, None)
            y, dy, g = grads16(dtype, lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5), x, w, b)
            wv = w.reshape([1, -1] + [1] * (x.dim() - 2)) if affine else None
            w16(f"instance_norm_{name}", "instance_norm", {"eps": 1e-5}, {"x": x, "weight": w, "bias": b}, {"y": y},
                dy, g, dx_scale(x, dy, list(range(2, x.dim())), 1e-5, wv))
        x = d((3, 2, 5), 1.0, 2.0)
        w, b = d((2,), 1.0, 0.3), d((2,), 0.0, 0.3)
        rm, rv = d((2,), 0.0, 0.5), round_to(d((2,), 0.0, 0.3).abs() + 0.5, dtype)
        rm2, rv2 = rm.clone(), rv.clone()
        y, dy, g = grads16(dtype, lambda x, w, b: F.instance_norm(x, rm2, rv2, w, b, True, 0.2, 1e-5), x, w, b)
        w16("instance_norm_train_running_stats", "instance_norm", {"eps": 1e-5, "use_input_stats": True, "momentum": 0.2},
            {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv},
            {"y": y, "running_mean": rm2, "running_var": rv2}, dy, g, dx_scale(x, dy, [2], 1e-5, w.reshape(1, -1, 1)))

        # lrn
        for name, shape, size, alpha, beta, k, over, even, within, offset in [
                ("torch_size5", (2, 6, 3, 4), 5, 0.3, 0.75, 1.5, True, "torch", False, 0.0),
                ("across_channels_size4_onnx_plain_alpha", (2, 7, 3), 4, 0.5, 0.75, 2.0, False, "onnx", False, 0.0),
                ("within_channel_size3", (2, 3, 5, 4), 3, 0.5, 0.75, 2.0, True, "torch", True, 0.0),
                ("large_offset", (2, 6, 3, 4), 5, 1e-4, 0.75, 1.0, True, "torch", False, 1000.0),
                ("wide_1x3x3000", (1, 3, 3000), 3, 0.3, 0.75, 1.5, True, "torch", False, 0.0)]:
            x = d(shape, offset, big_sd if offset else 2.0)
            y, dy, g = grads16(dtype, lambda x, w, b: lrn_formula(x, size, alpha, beta, k, over, even, within), x)
            region = "within_channel" if within else "across_channels"
            w16(f"lrn_{name}", "lrn", {"size": size, "alpha": alpha, "beta": beta, "k": k, "alpha_over_size": over,
                                      "even_window": even, "region": region},
                {"x": x}, {"y": y}, dy, g,
                lrn_dx_scale(x, dy, size, alpha, beta, k, over_size=over, even=even, within=within))


# ---------------------------------------------------------------- fused activation
rng_fused = np.random.default_rng(20261201)  # its own stream: the cases above stay as they were
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def fused_cases():
    """batch_norm, layer_norm and group_norm with `"activation"`: y = φ(norm(x)),
    gradients by autograd through φ and PyTorch's own normalization, in
    float32 (`fused_*`) and, for ReLU and tanh, bfloat16 and float16
    (`bf16_fused_*`, `f16_fused_*`, the 16-bit rules above)."""
    def draw(shape, offset=0.0, sd=1.0):
        return torch.tensor((offset + sd * rng_fused.standard_normal(shape)).astype(np.float32), dtype=torch.float64)

    def grads(fn, dy, x, w, b):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
        y = fn(*leaves)
        g = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy))
        return y.detach(), {k: (next(g) if t is not None else None) for k, t in zip(("dx", "dweight", "dbias"), leaves)}

    def cases(draw, rnd):
        """(name, op, attrs, inputs, fn of (x, w, b), the running statistics it
        updates, the normalized dims, the evaluation running_var); `rnd` rounds
        a derived input to the case's type."""
        out = []
        for shape, tag in [((3, 4, 5), "2d"), ((6, 5), "0d")]:
            c = shape[1]
            x, w, b = draw(shape, 0.3, 1.5), draw((c,), 1.0, 0.3), draw((c,), 0.0, 0.4)
            rm, rv = draw((c,), 0.0, 0.5), rnd(draw((c,), 0.0, 0.2).abs() + 0.5)
            dims = [0] + list(range(2, len(shape)))
            # The update PyTorch makes (unbiased variance), written out: the
            # calls below run on copies, so the inputs stay as drawn.
            running = (0.9 * rm + 0.1 * x.mean(dim=dims), 0.9 * rv + 0.1 * x.var(dim=dims, unbiased=True))
            out.append((f"batch_norm_train_{tag}", "batch_norm", {"eps": 1e-5, "training": True, "momentum": 0.1},
                        {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv},
                        lambda x, w, b, rm=rm, rv=rv: F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5),
                        running, dims, None))
        x, w, b = draw((4, 3, 2, 2), -0.5, 1.5), draw((3,), 1.0, 0.3), draw((3,), 0.0, 0.4)
        rm, rv = draw((3,), -0.5, 0.5), rnd(draw((3,), 0.0, 0.5).abs() + 0.5)
        out.append(("batch_norm_eval_2d", "batch_norm", {"eps": 1e-5, "training": False, "momentum": 0.1},
                    {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv},
                    lambda x, w, b, rm=rm, rv=rv: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), None, [0, 2, 3], rv))
        x, w, b = draw((4, 12), 1.0, 2.0), draw((12,), 1.0, 0.3), draw((12,), 0.0, 0.4)
        out.append(("layer_norm_2d", "layer_norm", {"eps": 1e-5, "axis": -1}, {"x": x, "weight": w, "bias": b},
                    lambda x, w, b: F.layer_norm(x, (12,), w, b, 1e-5), None, [-1], None))
        x, w, b = draw((2, 6, 5), 0.5, 1.5), draw((6,), 1.0, 0.3), draw((6,), 0.0, 0.4)
        out.append(("group_norm_2x6x5_g3", "group_norm", {"eps": 1e-5, "num_groups": 3},
                    {"x": x, "weight": w, "bias": b}, lambda x, w, b: F.group_norm(x, 3, w, b, 1e-5), None, None, None))
        return out

    for act, phi in ACTIVATIONS.items():
        to32 = lambda t: torch.tensor(t.numpy().astype(np.float32), dtype=torch.float64)
        for name, op, attrs, inputs, fn, running, _, _ in cases(draw, to32):
            x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
            dy = draw(tuple(x.shape))
            y, g = grads(lambda x, w, b: phi(fn(x, w, b)), dy, x, w, b)
            expected = {"y": y}
            if running is not None:
                expected.update(running_mean=running[0], running_var=running[1])
            write(f"fused_{name}_{act}", op, dict(attrs, activation=act), inputs, expected, dy, g)

    for dtype in ("bfloat16", "float16"):
        d = lambda shape, offset=0.0, sd=1.0: round_to(draw(shape, offset, sd), dtype)
        for act in ("relu", "tanh"):
            phi = ACTIVATIONS[act]
            for name, op, attrs, inputs, fn, running, dims, eval_var in cases(d, lambda t: round_to(t, dtype)):
                x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
                dy = d(tuple(x.shape))
                y, g = grads(lambda x, w, b: phi(fn(x, w, b)), dy, x, w, b)
                # dx's terms are those of the normalization at dz = φ'(z)·dy.
                zz = fn(x, w, b).detach()
                dz = dy * torch.func.grad(lambda v: phi(v).sum())(zz)
                if op == "group_norm":
                    xg, dzg = x.reshape(2, 3, -1), (dz * w.reshape(1, -1, 1)).reshape(2, 3, -1)
                    scale = dx_scale(xg, dzg, [2], 1e-5)
                elif op == "layer_norm":
                    scale = dx_scale(x, dz, dims, 1e-5, w)
                else:
                    wv = w.reshape([1, -1] + [1] * (x.dim() - 2))
                    scale = dx_scale(x, dz, dims, 1e-5, wv, batch_stats=eval_var is None,
                                     running_var=None if eval_var is None else eval_var.reshape(wv.shape))
                expected = {"y": y}
                if running is not None:
                    expected.update(running_mean=running[0], running_var=running[1])
                write16(dtype, f"fused_{name}_{act}", op, dict(attrs, activation=act), inputs, expected, dy, g, scale)


rng_channels = np.random.default_rng(20261207)


def channel_rows_cases():
    """layer_norm_channels and rms_norm_channels: LayerNorm/RMSNorm over the
    channels at each position of [N, C, *], PyTorch's functions on the input
    with the channels moved last, moved back; float32 (`*_channels_*`) and
    bfloat16/float16 (the 16-bit rules above)."""
    def draw(shape, offset=0.0, sd=1.0):
        return torch.tensor((offset + sd * rng_channels.standard_normal(shape)).astype(np.float32), dtype=torch.float64)

    def moved(norm):
        return lambda x, w, b: norm(x.movedim(1, -1), w, b).movedim(-1, 1)

    ln = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    rms = lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-6)
    for shape in [(2, 4, 3, 5), (3, 6), (1, 8, 40)]:
        c = shape[1]
        for variant in ["affine", "no_affine"]:
            x = draw(shape, 1.0, 2.0)
            w = draw((c,), 1.0, 0.3) if variant == "affine" else None
            b = draw((c,), 0.0, 0.3) if variant == "affine" else None
            tag = f"{len(shape) - 2}d_{variant}"
            y, dy, g = grads_of(moved(ln), x, w, b)
            write(f"layer_norm_channels_{tag}", "layer_norm_channels", {"eps": 1e-5},
                  {"x": x, "weight": w, "bias": b}, {"y": y}, dy, g)
            y, dy, g = grads_of(moved(rms), x, w, None)
            write(f"rms_norm_channels_{tag}", "rms_norm_channels", {"eps": 1e-6},
                  {"x": x, "weight": w}, {"y": y}, dy, g)
    for dtype in ("bfloat16", "float16"):
        d = lambda shape, offset=0.0, sd=1.0: round_to(draw(shape, offset, sd), dtype)
        for shape, offset in [((2, 6, 3, 3), 0.5), ((2, 8, 20), 50.0)]:
            c = shape[1]
            x, w, b = d(shape, offset, 1.5), d((c,), 1.0, 0.3), d((c,), 0.0, 0.3)
            tag = f"{len(shape) - 2}d" + ("_large_offset" if offset > 1 else "")
            for name, op, norm, eps, bias in [("layer_norm_channels", "layer_norm_channels", ln, 1e-5, b),
                                              ("rms_norm_channels", "rms_norm_channels", rms, 1e-6, None)]:
                leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, bias)]
                y = moved(norm)(*leaves)
                dy = d(tuple(y.shape))
                gs = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy))
                g = {k: (next(gs) if t is not None else None) for k, t in zip(("dx", "dweight", "dbias"), leaves)}
                xl, dyl = x.movedim(1, -1), dy.movedim(1, -1)
                scale = dx_scale(xl, dyl * w, [-1], eps, centred=op == "layer_norm_channels")
                write16(dtype, f"{name}_{tag}", op, {"eps": eps}, {"x": x, "weight": w, "bias": bias},
                        {"y": y.detach()}, dy, g, scale)


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    batch_norm_cases()
    layer_and_rms_cases()
    group_and_instance_cases()
    lrn_cases()
    error_cases()
    sixteen_bit_cases()
    fused_cases()
    channel_rows_cases()
    print(f"{len(list(OUT.glob('*.json')))} cases in {OUT}")
