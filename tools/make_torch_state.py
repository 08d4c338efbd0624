#!/usr/bin/env python3
"""Writes crates/normlab-candle/tests/data/torch_state.safetensors: the state
dict of a small PyTorch model (BatchNorm2d after a few training steps,
LayerNorm, GroupNorm, RMSNorm) saved with safetensors, plus test inputs and
PyTorch's evaluation outputs under `test.*`.

Development tool (needs torch and safetensors); the file it writes is
committed and read by the tests.

    ~/.cache/torch-venv/bin/python tools/make_torch_state.py
"""
import pathlib

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
out = pathlib.Path(__file__).resolve().parent.parent / "crates/normlab-candle/tests/data/torch_state.safetensors"
model = torch.nn.ModuleDict({
    "bn": torch.nn.BatchNorm2d(3),
    "ln": torch.nn.LayerNorm(5),
    "gn": torch.nn.GroupNorm(2, 4),
    "rms": torch.nn.RMSNorm(5, eps=1e-6),
})
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p is not None else 0.0))
model.train()
for _ in range(3):
    model["bn"](torch.randn(4, 3, 5, 5) * 2 + 1)
model.eval()
state = {k: v.contiguous() for k, v in model.state_dict().items()}
x_bn, x_ln, x_gn = torch.randn(2, 3, 5, 5), torch.randn(3, 5), torch.randn(2, 4, 3)
with torch.no_grad():
    state.update({
        "test.x_bn": x_bn, "test.y_bn": model["bn"](x_bn),
        "test.x_ln": x_ln, "test.y_ln": model["ln"](x_ln), "test.y_rms": model["rms"](x_ln),
        "test.x_gn": x_gn, "test.y_gn": model["gn"](x_gn),
    })
save_file(state, str(out))
print(out, sorted(state))
