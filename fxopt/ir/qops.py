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

from typing import Optional

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


# --------------------------------------------------------------------------- dynamic activations


@torch.library.custom_op("fxopt::dynamic_quantize", mutates_args=())
def dynamic_quantize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor dynamic uint8, exactly ONNX ``DynamicQuantizeLinear``:

    ``s = (max(0, max x) − min(0, min x)) / 255``, ``z = saturate(round(−min(0, min x) / s))``,
    ``q = saturate(round(x / s) + z)``. Returns ``(q, s, z)``.
    """
    xf = x.to(torch.float32)
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    s = (hi - lo) / 255.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.clamp(torch.round(-lo / s), 0, 255)
    q = torch.clamp(torch.round(xf / s) + z, 0, 255).to(torch.uint8)
    return q, s.reshape(()), z.to(torch.uint8).reshape(())


@dynamic_quantize.register_fake
def _dynamic_quantize_fake(x):
    return (torch.empty_like(x, dtype=torch.uint8), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.uint8))


@torch.library.custom_op("fxopt::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor, quant_max: int) -> tuple[Tensor, Tensor]:
    """Per-token (per row of the last dim) symmetric int8: ``s = max|x_row| / q_max``,
    ``q = clamp(round(x / s), −q_max, q_max)``. Returns ``(q, s)`` with ``s`` of shape ``[..., 1]``."""
    xf = x.to(torch.float32)
    s = xf.abs().amax(-1, keepdim=True) / float(quant_max)
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(xf / s), -quant_max, quant_max).to(torch.int8)
    return q, s


@quantize_per_token.register_fake
def _quantize_per_token_fake(x, quant_max):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("fxopt::dequantize_per_token", mutates_args=())
def dequantize_per_token(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(torch.float32) * scale


@dequantize_per_token.register_fake
def _dequantize_per_token_fake(q, scale):
    return torch.empty_like(q, dtype=torch.float32)


DYNAMIC_QUANTIZE = torch.ops.fxopt.dynamic_quantize.default
QUANTIZE_PER_TOKEN = torch.ops.fxopt.quantize_per_token.default
DEQUANTIZE_PER_TOKEN = torch.ops.fxopt.dequantize_per_token.default


# --------------------------------------------------------------------------- float zero points (min-max affine groups)


def _affine_expand(t: Tensor, block_size: int, k: int) -> Tensor:
    return t.to(torch.float32).repeat_interleave(block_size, dim=-1)[..., :k]


@torch.library.custom_op("fxopt::quantize_affine", mutates_args=())
def quantize_affine(w: Tensor, scale: Tensor, zero_point: Tensor, block_size: int, quant_max: int) -> Tensor:
    """Group-wise affine quantization with a *float* zero point, along the last dim in blocks of
    ``block_size``: ``q = clamp(round(w / s + z), 0, quant_max)`` (uint8). With ``s = (max − min)/15``
    and ``z = −min/s`` every group's minimum and maximum are exact grid points (llama.cpp's Q4_1,
    HQQ): ``ŵ = (q − z)·s = q·s + min``. ONNX has no ``QuantizeLinear`` with a float zero point;
    the ONNX form is written out (and ``fuse-qdq`` evaluates it on constants)."""
    k = w.shape[-1]
    sf, zf = _affine_expand(scale, block_size, k), _affine_expand(zero_point, block_size, k)
    return torch.clamp(torch.round(w.to(torch.float32) / sf + zf), 0, quant_max).to(torch.uint8)


@quantize_affine.register_fake
def _quantize_affine_fake(w, scale, zero_point, block_size, quant_max):
    return torch.empty_like(w, dtype=torch.uint8)


@torch.library.custom_op("fxopt::dequantize_affine", mutates_args=())
def dequantize_affine(q: Tensor, scale: Tensor, zero_point: Tensor, block_size: int) -> Tensor:
    """``(q − z)·s`` per group of ``block_size`` along the last dim, ``z`` a float zero point
    (the dequantization ONNX Runtime's ``MatMulNBits`` applies with float ``zero_points``)."""
    k = q.shape[-1]
    return (q.to(torch.float32) - _affine_expand(zero_point, block_size, k)) * _affine_expand(scale, block_size, k)


@dequantize_affine.register_fake
def _dequantize_affine_fake(q, scale, zero_point, block_size):
    return torch.empty_like(q, dtype=torch.float32)


QUANTIZE_AFFINE = torch.ops.fxopt.quantize_affine.default
DEQUANTIZE_AFFINE = torch.ops.fxopt.dequantize_affine.default


# --------------------------------------------------------------------------- packed low-bit weights


def pack_nbits(q: Tensor, block_size: int, bits: int = 4) -> Tensor:
    """Signed int4 values ``[N, K]`` (in ``[-8, 7]``) → ONNX Runtime ``MatMulNBits`` layout:
    uint8 ``[N, K/block, block/2]``, value ``+8`` (the default zero point), low nibble first."""
    if bits != 4:
        raise ValueError("only 4-bit packing is implemented")
    return pack_uint4_blocks((q.to(torch.int16) + 8).to(torch.uint8), block_size)


def pack_uint4_blocks(u: Tensor, block_size: int) -> Tensor:
    """Unsigned 4-bit values ``[N, K]`` (in ``[0, 15]``, stored as they are) → uint8
    ``[N, K/block, block/2]``, two values a byte, low nibble first (``MatMulNBits``'s ``B``)."""
    n, k = u.shape
    if int(u.min()) < 0 or int(u.max()) > 15:
        raise ValueError("4-bit values must lie in [0, 15]")
    u = u.to(torch.uint8).reshape(n, k // block_size, block_size)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def pack_zero_points(zp: Tensor) -> Tensor:
    """Per-block 4-bit zero points ``[N, n_blocks]`` (in ``[0, 15]``) → ``MatMulNBits``'s ``zero_points``:
    uint8 ``[N, ceil(n_blocks / 2)]``, block ``2j`` in the low nibble and ``2j+1`` in the high nibble of
    byte ``j``; with an odd block count the last byte of each row has a high nibble of 0 (padding).
    Rows are padded separately, as ONNX Runtime reads them (checked against ORT by
    tests/lowering/test_onnx_export.py::test_matmul_nbits_zero_points_layout_is_what_onnx_runtime_reads)."""
    n, nb = zp.shape
    if int(zp.min()) < 0 or int(zp.max()) > 15:
        raise ValueError("4-bit zero points must lie in [0, 15]")
    z = zp.to(torch.uint8)
    if nb % 2:
        z = torch.cat([z, z.new_zeros(n, 1)], dim=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous()


def unpack_zero_points(packed: Tensor, n_blocks: int) -> Tensor:
    """Inverse of :func:`pack_zero_points`: ``[N, n_blocks]`` uint8 in ``[0, 15]``."""
    n = packed.shape[0]
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, -1)[:, :n_blocks]


def unpack_uint4(packed: Tensor, k: int) -> Tensor:
    """Packed nibbles ``[N, ...]`` (low nibble first) → ``[N, K]`` int16 in ``[0, 15]``, as stored."""
    n = packed.shape[0]
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    return torch.stack((lo, hi), dim=-1).reshape(n, -1)[:, :k]


def unpack_nbits(packed: Tensor, k: int, bits: int = 4) -> Tensor:
    """Inverse of :func:`pack_nbits`: ``[N, K]`` signed values."""
    return (unpack_uint4(packed, k) - 8).to(torch.int8)


@torch.library.custom_op("fxopt::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, packed: Tensor, scales: Tensor, k: int, n: int, bits: int, block_size: int,
                 zero_points: Optional[Tensor] = None) -> Tensor:
    """``x @ Wᵀ`` with ``W[i, j] = (u[i, j] − z[i, j // block]) · scales[i, j // block]`` stored packed
    (``MatMulNBits``): ``u`` the stored 4-bit values in ``[0, 15]``; ``z`` = 8 without ``zero_points``
    (symmetric int4), else the per-block zero points unpacked from ``zero_points`` (uint8
    ``[N, ceil(n_blocks/2)]``, see :func:`pack_zero_points`) or, when ``zero_points`` is a float
    tensor, taken as they are (``[N · n_blocks]``, one float zero point per block, not packed)."""
    u = unpack_uint4(packed, k).to(torch.float32)
    n_blocks = -(-k // block_size)
    if zero_points is None:
        z = torch.full((n, n_blocks), 8.0)
    elif zero_points.is_floating_point():             # float zero points, one per block, not packed
        z = zero_points.reshape(n, n_blocks).to(torch.float32)
    else:
        z = unpack_zero_points(zero_points.reshape(n, -1), n_blocks).to(torch.float32)
    z = z.repeat_interleave(block_size, dim=1)[:, :k]
    w = (u - z) * scales.reshape(n, -1).to(torch.float32).repeat_interleave(block_size, dim=1)[:, :k]
    return x.to(torch.float32) @ w.t()


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, packed, scales, k, n, bits, block_size, zero_points=None):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


MATMUL_NBITS = torch.ops.fxopt.matmul_nbits.default


@torch.library.custom_op("fxopt::gather_nbits", mutates_args=())
def gather_nbits(packed: Tensor, indices: Tensor, scales: Tensor, d: int, block_size: int,
                 zero_points: Optional[Tensor] = None) -> Tensor:
    """Rows of a 4-bit table: ``out[..., j] = (u[idx, j] − z[idx, j // block]) · scales[idx, j // block]``
    (``GatherBlockQuantized``).

    ``packed``: uint8 ``[V, d/2]``, two values per byte, low nibble first (``u`` in ``[0, 15]``);
    ``scales``: ``[V, d/block]``. ``z`` = 8 without ``zero_points`` (symmetric int4 stored ``+8``),
    else the per-block zero points of the gathered rows: uint8 ``[V, ceil(d/block / 2)]`` packed as
    ``MatMulNBits``' (:func:`pack_zero_points`; ``GatherBlockQuantized`` reads them the same way), or
    a float tensor ``[V, d/block]`` taken as it is (min-max affine groups, which ``GatherBlockQuantized``
    cannot take: its ONNX form is written out). Only the gathered rows are unpacked."""
    flat = indices.reshape(-1)
    u = unpack_uint4(packed[flat], d).to(torch.float32)
    n_blocks = -(-d // block_size)
    if zero_points is None:
        z = torch.full((flat.numel(), n_blocks), 8.0)
    elif zero_points.is_floating_point():
        z = zero_points.reshape(-1, n_blocks)[flat].to(torch.float32)
    else:
        z = unpack_zero_points(zero_points[flat], n_blocks).to(torch.float32)
    z = z.repeat_interleave(block_size, dim=1)[:, :d]
    s = scales.reshape(-1, n_blocks)[flat].to(torch.float32).repeat_interleave(block_size, dim=1)[:, :d]
    return ((u - z) * s).reshape(*indices.shape, d)


@gather_nbits.register_fake
def _gather_nbits_fake(packed, indices, scales, d, block_size, zero_points=None):
    return packed.new_empty((*indices.shape, d), dtype=torch.float32)


GATHER_NBITS = torch.ops.fxopt.gather_nbits.default


def pack_rows_nbits(q: Tensor) -> Tensor:
    """Signed int4 values ``[V, d]`` → uint8 ``[V, d/2]`` (value ``+8``, low nibble first), the layout of
    ``GatherBlockQuantized`` with uint8 data."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


# --------------------------------------------------------------------------- integer linear with float output


@torch.library.custom_op("fxopt::matmul_integer_to_float", mutates_args=())
def matmul_integer_to_float(a: Tensor, a_scale: Tensor, a_zero_point: Tensor, b: Tensor, b_scale: Tensor,
                            bias: Optional[Tensor] = None) -> Tensor:
    """``((a − z_a)·s_a) @ (b · s_b) + bias`` for an 8-bit activation ``a [..., K]`` quantized per tensor
    and an int8 weight ``b [K, N]`` with one scale per column (symmetric): what
    ``DQ(a) @ DQ(b) + bias`` computes, as one op. Its ONNX form is ONNX Runtime's
    ``MatMulIntegerToFloat`` with the bias inside (made at export by :mod:`fxopt.lowering.qlinear`)."""
    x = (a.to(torch.float32) - a_zero_point.to(torch.float32)) * a_scale.to(torch.float32)
    w = b.to(torch.float32) * b_scale.to(torch.float32)
    y = x @ w
    return y + bias.to(torch.float32) if bias is not None else y


@matmul_integer_to_float.register_fake
def _matmul_integer_to_float_fake(a, a_scale, a_zero_point, b, b_scale, bias=None):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)


MATMUL_INTEGER_TO_FLOAT = torch.ops.fxopt.matmul_integer_to_float.default
