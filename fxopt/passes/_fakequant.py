"""Float simulations of the quantizers, for searches and sensitivity checks (no graph involved).

They compute exactly what ``fxopt::quantize`` → ``fxopt::dequantize`` compute, vectorized over a
sample of rows, so a pass can measure the error a choice would cause before making it.
"""
from __future__ import annotations

import torch


def weight_per_channel(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-output-channel symmetric int8 ([-qmax, qmax])."""
    scale = (w.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def weight_grouped(w: torch.Tensor, group: int, qmin: int = -8, qmax: int = 7) -> torch.Tensor:
    """Group-wise symmetric along the input dim (ZeroQuant): one scale per ``group`` columns."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    scale = (g.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    return (torch.clamp(torch.round(g / scale), qmin, qmax) * scale).reshape(n, k)


def act_affine(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def static_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) for a per-tensor range; the range always contains 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(max(-lo, hi) / 127.0, 1e-12)
        return scale, 0, -128, 127
    scale = max((hi - lo) / 255.0, 1e-12)
    zp = int(min(255, max(0, round(-lo / scale))))
    return scale, zp, 0, 255


def act_per_token(x: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def act_dynamic_tensor(x: torch.Tensor) -> torch.Tensor:
    s, z, lo, hi = *static_qparams(float(x.min()), float(x.max()), False)[:2], 0, 255
    return act_affine(x, s, z, lo, hi)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over rows (tokens) of ``‖approx − exact‖² / ‖exact‖²``.

    Per row, not over the whole matrix: one token with a huge activation (the attention sink)
    would otherwise dominate the energy and hide that every other token lost its precision."""
    num = ((approx - exact) ** 2).reshape(-1, exact.shape[-1]).sum(-1)
    den = (exact ** 2).reshape(-1, exact.shape[-1]).sum(-1).clamp_min(1e-30)
    return float((num / den).mean())
