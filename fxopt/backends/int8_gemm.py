"""Exact emulation of the CPU integer GEMMs fxopt lowers to — the test oracle for other CPUs.

ONNX Runtime (MLAS) and oneDNN compute ``C = A·B`` for ``A`` u8 ``[M, K]`` (activations, raw
values, zero point applied afterwards) and ``B`` s8 ``[K, N]`` (weights) with the instruction of
the CPU (:mod:`fxopt.backends.isa`):

* **VNNI / AMX / ARM dot products** multiply bytes and accumulate in int32: ``C = Σ_k a_k·b_k``
  exactly.
* **AVX2 / AVX-512BW without VNNI** use ``VPMADDUBSW``, which multiplies adjacent byte pairs and
  adds each pair into a *saturating* int16, then ``VPMADDWD`` with ones widens to int32:

  ``C = Σ_{i} sat16(a_{2i}·b_{2i} + a_{2i+1}·b_{2i+1})``,  ``sat16(v) = clamp(v, −32768, 32767)``

  (``K`` padded with zeros to even). A pair saturates only when ``|a₀b₀ + a₁b₁| > 32767``, which
  needs ``|b| > 64`` somewhere in it since ``a ≤ 255``: weights on ``[−64, 64]`` are exact
  (:data:`fxopt.backends.isa.REDUCED_QMAX`).

The zero-point corrections (``− z_a·Σ_k b_k``) are exact int32 arithmetic in both kernels, so the
dequantized output of a linear is ``s_a·s_b·(C − z_a·Σ_k b_k)``. :func:`u8s8_matmul` computes it
for a target, so that a VNNI machine can check what an AVX2 machine computes, bit for bit in the
integer part; :func:`saturated_pairs` counts the pairs that would saturate.
"""
from __future__ import annotations

import torch

from . import isa

INT16_MIN, INT16_MAX = -32768, 32767


def _pairs(a: torch.Tensor, b: torch.Tensor, rows: int):
    """Yield (row slice, pair sums ``[r, K/2, N]`` in int32) over chunks of ``a``'s rows."""
    a = a.to(torch.int32)
    b = b.to(torch.int32)
    k = a.shape[1]
    if k % 2:
        a = torch.nn.functional.pad(a, (0, 1))
        b = torch.nn.functional.pad(b, (0, 0, 0, 1))
    b0, b1 = b[0::2], b[1::2]                                 # [K/2, N]
    for i in range(0, a.shape[0], rows):
        blk = a[i:i + rows]
        yield slice(i, i + rows), blk[:, 0::2, None] * b0 + blk[:, 1::2, None] * b1


def u8s8_gemm(a: torch.Tensor, b: torch.Tensor, target: str | None = "auto", rows: int = 64) -> torch.Tensor:
    """``Σ_k a_k·b_k`` as ``target``'s u8×s8 kernel computes it (int64 ``[M, N]``).

    ``a``: uint8 ``[M, K]`` (raw quantized activations), ``b``: int8 ``[K, N]``."""
    if a.dtype != torch.uint8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"u8s8_gemm needs uint8 [M, K] and int8 [K, N]; got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    if isa.resolve(target) not in isa.SATURATING:
        return a.to(torch.int64) @ b.to(torch.int64)
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.int64)
    for sl, p in _pairs(a, b, rows):
        out[sl] = p.clamp_(INT16_MIN, INT16_MAX).sum(1, dtype=torch.int64)
    return out


def saturated_pairs(a: torch.Tensor, b: torch.Tensor, rows: int = 64) -> int:
    """How many ``VPMADDUBSW`` pairs of ``a·b`` leave int16 (0 means the AVX2 kernel is exact)."""
    n = 0
    for _, p in _pairs(a, b, rows):
        n += int(((p < INT16_MIN) | (p > INT16_MAX)).sum())
    return n


def worst_pair(b: torch.Tensor) -> int:
    """The largest ``|a₀b₀ + a₁b₁|`` any u8 activations can make with weights ``b`` ``[K, N]``: with
    ``a`` free on ``[0, 255]`` it is ``255·max(Σ positive, −Σ negative)`` over each pair. The chosen
    int8 form never saturates when this is ≤ 32767."""
    b = b.to(torch.int64)
    if b.shape[0] % 2:
        b = torch.nn.functional.pad(b, (0, 0, 0, 1))
    b0, b1 = b[0::2], b[1::2]
    pos = b0.clamp_min(0) + b1.clamp_min(0)
    neg = b0.clamp_max(0) + b1.clamp_max(0)
    return int(255 * torch.maximum(pos, -neg).max()) if b.numel() else 0


def u8s8_matmul(xq: torch.Tensor, x_scale: float, x_zero_point: int, wq_t: torch.Tensor, w_scale: torch.Tensor,
                target: str | None = "auto") -> torch.Tensor:
    """``DQ(xq) @ DQ(wq_t)`` as ``target``'s kernel computes it (float32, ``[..., N]``).

    ``xq``: uint8 ``[..., K]``; ``wq_t``: int8 ``[K, N]`` with zero point 0; ``w_scale``: ``[N]``
    or a scalar."""
    lead = xq.shape[:-1]
    a = xq.reshape(-1, xq.shape[-1])
    acc = u8s8_gemm(a, wq_t, target) - int(x_zero_point) * wq_t.to(torch.int64).sum(0)
    out = acc.to(torch.float64) * float(x_scale) * w_scale.to(torch.float64)
    return out.to(torch.float32).reshape(*lead, wq_t.shape[1])
