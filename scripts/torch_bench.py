#!/usr/bin/env python3
"""PyTorch CPU timings of normlab's bench cases, for side-by-side comparison.

Usage: torch_bench.py [--threads N] [--dtype f32|bf16|f16] [--budget S] CASE...

Each CASE is a name exactly as `normlab bench --list [--suite S]` prints it:
`<op> <shape>`, optionally followed by a space and a model-family label
(ignored here), e.g. `layer_norm 64x197x768 vit-b16`. Shape dims are joined
by `x`. The ops and what they time (eps 1e-5 everywhere; for the channel ops
the channel dim is 1 and C = shape[1]):

  layer_norm        F.layer_norm over the last dim, weight and bias of its size
  rms_norm          F.rms_norm over the last dim, weight only
  batch_norm_train  F.batch_norm, training=True, momentum 0.1, running stats of C
  batch_norm_eval   F.batch_norm, training=False, with those running stats
  group_norm_g<G>   F.group_norm with G groups, weight and bias of C
  instance_norm     F.instance_norm, use_input_stats=True, weight and bias of C,
                    no running stats
  lrn_n5            F.local_response_norm(x, 5, 1e-4, 0.75, 2.0), no affine

Inputs: x, dy, weight and bias are drawn in that order from a standard normal
in float32 (generator seeded with 0 for every case) and then cast to the
dtype; weight, bias and the running statistics (mean 0, variance 1) are held
in that same dtype.

Timing: forward is the out-of-place functional call on inputs that do not
require grad. Backward is torch.autograd.grad of one forward's retained graph
with respect to x, weight and bias (those the op has), with dy as the output
gradient. Each measurement runs 2 warm-up calls, then times single calls until
at least 5 are done and either 50 are done or the time budget (3 s by
default) is spent, and reports the median in milliseconds.

Output: one JSON line per case, in the order given:
  {"case": NAME, "dtype": D, "threads": N, "fwd_ms": ..., "bwd_ms": ...}
When PyTorch raises for a case (an op it does not implement in the dtype,
say), the line has "error" (the message) and "stage" ("fwd" or "bwd") in
place of the timings it could not take, and the next case runs. A CASE that
cannot be parsed stops the script before anything is timed (exit status 2).

A measuring tool for development, not a dependency: it needs a Python with
torch, e.g. python3 -m venv ~/.cache/torch-venv &&
~/.cache/torch-venv/bin/pip install torch numpy.
"""
import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F

EPS = 1e-5
MOMENTUM = 0.1
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
CHANNEL_OPS = ("batch_norm_train", "batch_norm_eval", "instance_norm", "lrn_n5")


class CaseError(ValueError):
    pass


def parse_case(name):
    """(op, groups or None, shape) of a case name; raises CaseError."""
    parts = name.split(" ")
    if len(parts) not in (2, 3) or not all(parts):
        raise CaseError(f"case `{name}`: expected `<op> <shape>` or `<op> <shape> <label>`")
    op, dims = parts[0], parts[1]
    if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)*", dims):
        raise CaseError(f"case `{name}`: shape `{dims}` is not positive dims joined by `x`")
    shape = tuple(int(d) for d in dims.split("x"))
    groups = None
    m = re.fullmatch(r"group_norm_g([1-9][0-9]*)", op)
    if m:
        groups = int(m.group(1))
        if len(shape) < 2 or shape[1] % groups:
            raise CaseError(f"case `{name}`: {groups} groups need a channel dim they divide")
    elif op in CHANNEL_OPS:
        if len(shape) < 2:
            raise CaseError(f"case `{name}`: {op} needs a channel dim (shape N x C x ...)")
    elif op not in ("layer_norm", "rms_norm"):
        raise CaseError(f"case `{name}`: unknown op `{op}`")
    return op, groups, shape


def build(op, groups, shape, dtype):
    """The forward as f(x, weight, bias), the inputs and the leaves' names."""
    gen = torch.Generator().manual_seed(0)
    features = shape[-1] if op in ("layer_norm", "rms_norm") else shape[1]

    def draw(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(dtype)

    x, dy = draw(*shape), draw(*shape)
    weight, bias = draw(features), draw(features)
    running = lambda: (torch.zeros(features, dtype=dtype), torch.ones(features, dtype=dtype))
    d = features
    if op == "layer_norm":
        f = lambda x, w, b: F.layer_norm(x, (d,), w, b, EPS)
    elif op == "rms_norm":
        bias = None
        f = lambda x, w, b: F.rms_norm(x, (d,), w, EPS)
    elif op == "batch_norm_train":
        rm, rv = running()
        f = lambda x, w, b: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    elif op == "batch_norm_eval":
        rm, rv = running()
        f = lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)
    elif groups is not None:
        f = lambda x, w, b: F.group_norm(x, groups, w, b, EPS)
    elif op == "instance_norm":
        f = lambda x, w, b: F.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS)
    elif op == "lrn_n5":
        weight = bias = None
        f = lambda x, w, b: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
    else:
        raise AssertionError(op)
    return f, x, dy, weight, bias


def median_ms(fn, budget_s, min_reps=5, max_reps=50, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_reps or (len(ts) < max_reps and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def run_case(name, parsed, dtype_name, threads, budget_s):
    line = {"case": name, "dtype": dtype_name, "threads": threads}
    stage = "fwd"
    try:
        f, x, dy, weight, bias = build(*parsed, DTYPES[dtype_name])
        line["fwd_ms"] = median_ms(lambda: f(x, weight, bias), budget_s)
        stage = "bwd"
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
        y = f(*leaves)
        inputs = [t for t in leaves if t is not None]
        line["bwd_ms"] = median_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), budget_s)
    except Exception as e:  # PyTorch refuses: report it and go on with the next case
        msg = str(e).strip().splitlines()
        line["stage"] = stage
        line["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"
    print(json.dumps(line), flush=True)


def main():
    ap = argparse.ArgumentParser(
        description="PyTorch CPU timings of normlab bench cases, one JSON line per case.",
        epilog="CASE names as `normlab bench --list [--suite S]` prints them, e.g. 'layer_norm 4096x768 bert-base'.",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: PyTorch's own)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="storage type of x, dy, weight, bias, running stats")
    ap.add_argument("--budget", type=float, default=3.0, metavar="S", help="time budget per measurement, seconds (default 3)")
    ap.add_argument("cases", nargs="+", metavar="CASE")
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if not args.budget >= 0:
        ap.error("--budget must be a non-negative number of seconds")
    parsed = []
    for name in args.cases:
        try:
            parsed.append(parse_case(name))
        except CaseError as e:
            ap.error(str(e))
    threads = torch.get_num_threads()
    for name, p in zip(args.cases, parsed):
        run_case(name, p, args.dtype, threads, args.budget)


if __name__ == "__main__":
    main()
