#!/usr/bin/env python3
"""PyTorch CPU timings of the training suite of `normlab bench`, for
side-by-side comparison.

Usage: torch_train_bench.py [--threads N] [--runs R] CASE...

Each CASE is a name exactly as `normlab bench --suite training --list`
prints it: `<arch> <depth>x<width> <norm> [tanh] b<batch> <optimizer>`,
e.g. `cnn 3x16 group8 b64 sgd`. The network is the lab's (placement A:
linear or convolution, normalization, activation):

  mlp  flatten; depth × (Linear(in, width), norm, act); Linear(width, 10)
  cnn  depth × (Conv2d(in, width, 3, padding=1), norm, act, and a 2×2 max-pool
       after each of the first two blocks); flatten; Linear(width·7·7, 10)

on 1×28×28 images (MNIST's shape), the lab's Kaiming-normal weights and zero
biases. Norms: batch (BatchNorm1d/2d, momentum 0.1), layer (LayerNorm over the
features; in a CNN GroupNorm with one group, as the lab), group<G>
(GroupNorm(G)), instance (InstanceNorm2d, affine, tracking running
statistics), rms (RMSNorm, eps 1e-6; in a CNN over the channels at each
pixel), lrn (LocalResponseNorm(5), PyTorch's defaults; in an MLP over the features
as channels), none. ε = 1e-5 elsewhere. Optimizers: sgd (lr 0.05, momentum
0.9) and adamw (lr 2e-3, no weight decay), PyTorch's default CPU
implementations (a loop over the parameters; normlab updates each
variable in one in-place pass).

A step: a mini-batch drawn from 8,000 fixed images in a shuffled order (a new
order each epoch), zero the gradients, forward, cross-entropy, backward,
update, and the loss read back as a Python float. 5 untimed steps, then R
timed ones (default 30).

Output: one JSON line per case:
  {"case": NAME, "threads": N, "step_ms": median, "min_step_ms": fastest,
   "steps": R, "batch_size": B}

A measuring tool for development, not a dependency: it needs a Python with
torch, e.g. python3 -m venv ~/.cache/torch-venv &&
~/.cache/torch-venv/bin/pip install torch numpy.
"""
import argparse
import json
import math
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

WARMUP_STEPS = 5
IMAGES = 8000


class ChannelsLastRms(nn.Module):
    """RMSNorm over the channels at each pixel of [N, C, H, W]."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.RMSNorm(channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeatureLrn(nn.Module):
    """LRN over the features of [N, C] seen as [N, C, 1]."""

    def __init__(self):
        super().__init__()
        self.lrn = nn.LocalResponseNorm(5)

    def forward(self, x):
        return self.lrn(x.unsqueeze(2)).squeeze(2)


def norm_layer(norm, width, spatial):
    if norm == "none":
        return None
    if norm == "batch":
        return nn.BatchNorm2d(width) if spatial else nn.BatchNorm1d(width)
    if norm == "layer":
        return nn.GroupNorm(1, width) if spatial else nn.LayerNorm(width)
    if norm.startswith("group"):
        return nn.GroupNorm(int(norm[5:] or 8), width)
    if norm == "instance" and spatial:
        return nn.InstanceNorm2d(width, affine=True, track_running_stats=True)
    if norm == "rms":
        return ChannelsLastRms(width) if spatial else nn.RMSNorm(width, eps=1e-6)
    if norm == "lrn":
        return nn.LocalResponseNorm(5) if spatial else FeatureLrn()
    raise ValueError(f"unknown normalization {norm!r}")


def kaiming(module):
    fan_in = module.weight[0].numel()
    with torch.no_grad():
        module.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
        module.bias.zero_()
    return module


def build(arch, depth, width, norm, activation):
    act = nn.Tanh if activation == "tanh" else nn.ReLU
    layers = []
    if arch == "mlp":
        layers.append(nn.Flatten())
        features = 28 * 28
        for _ in range(depth):
            layers.append(kaiming(nn.Linear(features, width)))
            n = norm_layer(norm, width, False)
            if n is not None:
                layers.append(n)
            layers.append(act())
            features = width
        layers.append(nn.Linear(features, 10))
    else:
        channels, side = 1, 28
        for i in range(depth):
            layers.append(kaiming(nn.Conv2d(channels, width, 3, padding=1)))
            n = norm_layer(norm, width, True)
            if n is not None:
                layers.append(n)
            layers.append(act())
            if i < 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            channels = width
        layers.append(nn.Flatten())
        layers.append(nn.Linear(width * side * side, 10))
    return nn.Sequential(*layers)


def parse(case):
    m = re.fullmatch(r"(mlp|cnn) (\d+)x(\d+) (\S+)( tanh)? b(\d+) (sgd|adamw)", case)
    if not m:
        raise ValueError(f"cannot parse case {case!r}")
    arch, depth, width, norm, tanh, batch, optimizer = m.groups()
    return arch, int(depth), int(width), norm, "tanh" if tanh else "relu", int(batch), optimizer


def measure(case, runs, threads):
    arch, depth, width, norm, activation, batch, optimizer = parse(case)
    torch.manual_seed(0)
    model = build(arch, depth, width, norm, activation)
    model.train()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    images = torch.rand(IMAGES, 1, 28, 28)
    labels = torch.randint(0, 10, (IMAGES,))
    order = []

    def step():
        nonlocal order
        if len(order) < batch:
            order = torch.randperm(IMAGES).tolist()
        idx, order = order[:batch], order[batch:]
        idx = torch.tensor(idx)
        x, y = images.index_select(0, idx), labels.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "case": case,
        "threads": threads,
        "step_ms": times[len(times) // 2],
        "min_step_ms": times[0],
        "steps": runs,
        "batch_size": batch,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    try:
        for case in args.cases:
            parse(case)
    except ValueError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    for case in args.cases:
        print(json.dumps(measure(case, args.runs, args.threads)), flush=True)


if __name__ == "__main__":
    main()
