"""fxopt's quantize / dequantize ops, registered with ``torch.library``.

They are the one reference form of quantization in fxopt: passes insert them, backends
pattern-match them, lowering translates them to ONNX ``QuantizeLinear`` / ``DequantizeLinear``
(see :mod:`fxopt.lowering.onnx_ops`). Fake kernels make graphs that hold them exportable.

Semantics follow ONNX (opset 21) exactly, so lowering is one-to-one::

    quantize:    q = saturate(round_half_to_even(x / s) + z)      saturate to [quant_min, quant_max]
    dequantize:  x̂ = (q − z) · s

Granularity is given by the shape of ``scale`` / ``zero_point``:

* per tensor: ``scale.numel() == 1`` (``axis`` ignored);
* per axis (per channel, per token): 1-D ``scale`` of length ``x.shape[axis]``;
* blocked (group-wise, ZeroQuant): ``block_size > 0`` and ``scale`` has ``x``'s shape with
  ``x.shape[axis] / block_size`` along ``axis``.

The output dtype of ``quantize`` is ``zero_point``'s dtype (int8 / uint8), as in ONNX.
"""
from __future__ import annotations

import torch
from torch import Tensor

QUANT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32)


def _expand(param: Tensor, x: Tensor, axis: int, block_size: int) -> Tensor:
    if param.numel() == 1:
        return param.reshape(())
    axis = axis % x.dim()
    if block_size > 0:
        if param.dim() != x.dim():
            raise ValueError(f"blocked quantization needs a scale of rank {x.dim()}, got shape {tuple(param.shape)}")
        return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    if param.dim() != 1 or param.shape[0] != x.shape[axis]:
        raise ValueError(f"per-axis scale of shape {tuple(param.shape)} does not match dim {axis} of {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


@torch.library.custom_op("fxopt::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
             quant_min: int, quant_max: int) -> Tensor:
    """x (float) → integer tensor of ``zero_point``'s dtype."""
    if zero_point.dtype not in QUANT_DTYPES:
        raise ValueError(f"zero_point must be an integer tensor (int8/uint8/...), got {zero_point.dtype}")
    s = _expand(scale.to(torch.float32), x, axis, block_size)
    z = _expand(zero_point.to(torch.int32), x, axis, block_size)
    q = torch.round(x.to(torch.float32) / s) + z           # torch.round is round-half-to-even, as ONNX
    return torch.clamp(q, quant_min, quant_max).to(zero_point.dtype)


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, axis, block_size, quant_min, quant_max):
    return torch.empty_like(x, dtype=zero_point.dtype)


@torch.library.custom_op("fxopt::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int) -> Tensor:
    """integer tensor → float32: ``(q − z) · s``."""
    s = _expand(scale.to(torch.float32), q, axis, block_size)
    z = _expand(zero_point.to(torch.int32), q, axis, block_size)
    return (q.to(torch.int32) - z).to(torch.float32) * s


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point, axis, block_size):
    return torch.empty_like(q, dtype=torch.float32)


def dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


QUANTIZE = torch.ops.fxopt.quantize.default
DEQUANTIZE = torch.ops.fxopt.dequantize.default
