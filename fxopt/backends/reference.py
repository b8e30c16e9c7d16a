"""``reference`` backend: the GraphModule itself, run in eager PyTorch.

It is the ground truth of every test: fxopt's Q/DQ ops have exact PyTorch kernels, so a
quantized graph runs here with simulated quantization, bit-for-bit what the passes meant.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import ExampleInputs, call, flatten_tensors


class ReferenceBackend:
    name = "reference"

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def run(self, inputs: Any) -> list[torch.Tensor]:
        """Flat list of output tensors for ``inputs`` (tensor, tuple, dict or ExampleInputs)."""
        return flatten_tensors(call(self.module, ExampleInputs.of(inputs)))

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
