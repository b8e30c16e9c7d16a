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


def grouped_asym_qparams(w: torch.Tensor, group: int, qmax: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric (zero-point) parameters along the input dim, ``[N, K/group]`` each.

    Per group, with the range widened to contain 0 (so 0 is exact and ``z`` needs no clamping):
    ``lo = min(min W_g, 0)``, ``hi = max(max W_g, 0)``, ``s = (hi − lo) / qmax``,
    ``z = clamp(round(−lo / s), 0, qmax)``. An all-zero group (``hi == lo``) gets ``s = 1e-12``,
    ``z = 0`` (every value quantizes to 0 and dequantizes to exactly 0). Returns float32 scales and
    uint8 zero points (ONNX Runtime ``MatMulNBits`` with ``zero_points``; GPTQ/AWQ style)."""
    n, k = w.shape
    g = w.detach().to(torch.float32).reshape(n, k // group, group)
    lo = g.amin(-1).clamp_max(0.0)
    hi = g.amax(-1).clamp_min(0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.uint8)
    return scale, zp


def weight_grouped_asym(w: torch.Tensor, group: int, qmax: int = 15) -> torch.Tensor:
    """Group-wise asymmetric uint4 (``[0, qmax]``): ``Ŵ = (clamp(round(W/s) + z, 0, qmax) − z) · s`` with
    :func:`grouped_asym_qparams` — what ``fxopt::quantize`` → ``fxopt::dequantize`` compute with them."""
    n, k = w.shape
    scale, zp = grouped_asym_qparams(w, group, qmax)
    s, z = scale.unsqueeze(-1), zp.to(torch.float32).unsqueeze(-1)
    g = w.to(torch.float32).reshape(n, k // group, group)
    return ((torch.clamp(torch.round(g / s) + z, 0, qmax) - z) * s).reshape(n, k)


def grouped_affine_qparams(w: torch.Tensor, group: int, qmax: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max affine groups with a float zero point (llama.cpp Q4_1, HQQ), ``[N, K/group]`` each:
    ``s = (max W_g − min W_g)/qmax``, ``z = −min W_g / s`` (not rounded), so the group's minimum and
    maximum are grid points. A constant group ``c`` gets ``s = 1e-12`` and ``z = −c/s``: every value
    quantizes to 0 and dequantizes to ``c`` (up to float rounding)."""
    n, k = w.shape
    g = w.detach().to(torch.float32).reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    return scale, -lo / scale


def weight_grouped_affine(w: torch.Tensor, group: int, qmax: int = 15) -> torch.Tensor:
    """``Ŵ = (clamp(round(W/s + z), 0, qmax) − z)·s`` with :func:`grouped_affine_qparams`."""
    n, k = w.shape
    scale, zp = grouped_affine_qparams(w, group, qmax)
    s, z = scale.unsqueeze(-1), zp.unsqueeze(-1)
    g = w.to(torch.float32).reshape(n, k // group, group)
    return ((torch.clamp(torch.round(g / s + z), 0, qmax) - z) * s).reshape(n, k)


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
