"""Fit a quantized graph's int8 weights to the CPU that will run it (export and ``cpu-int8``).

On CPUs without VNNI the u8×s8 GEMM of ONNX Runtime and oneDNN (``VPMADDUBSW``) adds pairs of
byte products into a saturating int16 (:mod:`fxopt.backends.isa`, emulated exactly by
:mod:`fxopt.backends.int8_gemm`). Full-range weights ``[−127, 127]`` then lose whole products
wherever two large activations meet two large weights of one sign — measured on MiniLM W8A8 on an
AVX2 CPU: row cosine vs. the exact arithmetic 0.958 on a single linear, 0.993 end to end.

Rule: a linear whose activations reach the GEMM as **u8** (static per-tensor ``fxopt::quantize``
with ``quant_min = 0``, or ``fxopt::dynamic_quantize``) and whose weight is an int8 per-channel
``fxopt::dequantize`` must have ``|w| ≤ 64`` on a saturating target (``2·255·64 = 32640 ≤ 32767``:
no pair can leave int16, whatever the activations). :func:`fit_int8_weights` rewrites, in the
graph it is given (an export copy: parameters are never mutated, new constants are added), each
such weight that exceeds 64:

1. a pre-quantized weight ``W_q`` (after ``fuse-qdq``) with per-channel scales ``s`` along the
   dequantize's ``axis``: per channel ``c = max|W_q|``; where ``c > 64``,
   ``W_q' = round(W_q · 64 / c)`` and ``s' = s · c / 64`` (re-rounding the integer grid once);
2. a weight still quantized in the graph, ``Q(W, s, 0, axis, 0, −127, 127)``: the range becomes
   ``[−64, 64]`` and the scale ``s · 127 / 64`` — what ``insert-qdq{target=avx2}`` would have made.

A graph quantized for the target in the first place (``insert-qdq{target=...}``, the default
``auto`` being this machine) needs no rewrite; weights on VNNI/AMX/ARM targets are left alone.
s8 activations (``symmetric=true``, per token) meet no ``VPMADDUBSW`` u8 operand and are left too.
"""
from __future__ import annotations

import torch
import torch.fx

from ..backends import isa
from ..ir import qops
from ..ir.graph import add_constant, get_attr

aten = torch.ops.aten


def _is(n, target) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is target


def _u8_activation(x) -> bool:
    """``x`` is the dequantized form of u8 activations (static, or dynamic per tensor)."""
    if not _is(x, qops.DEQUANTIZE):
        return False
    src = x.args[0]
    if _is(src, qops.QUANTIZE):
        return src.args[5] >= 0
    if isinstance(src, torch.fx.Node) and src.op == "call_function" and getattr(src.target, "__name__", "") == "getitem":
        return _is(src.args[0], qops.DYNAMIC_QUANTIZE)
    return False


def u8s8_weights(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(consumer, weight dequantize)`` of every linear/matmul that runs as a u8×s8 GEMM."""
    out = []
    for n in gm.graph.nodes:
        if _is(n, aten.linear.default) or _is(n, aten.matmul.default):
            x, w = n.args[0], n.args[1]
            if _u8_activation(x) and _is(w, qops.DEQUANTIZE) and w.args[4] == 0:
                src = w.args[0]
                if src.op == "get_attr" and get_attr(gm, src.target).dtype == torch.int8:
                    out.append((n, w))
                elif _is(src, qops.QUANTIZE) and src.args[5] < 0 and src.args[2].op == "get_attr" \
                        and get_attr(gm, src.args[2].target).dtype == torch.int8:
                    out.append((n, w))
    return out


def max_weight(gm: torch.fx.GraphModule) -> int:
    """The largest int8 weight magnitude any u8×s8 GEMM of ``gm`` will see (0 if none)."""
    m = 0
    for _, dq in u8s8_weights(gm):
        src = dq.args[0]
        if src.op == "get_attr":
            m = max(m, int(get_attr(gm, src.target).to(torch.int16).abs().max()))
        else:
            m = max(m, max(-int(src.args[5]), int(src.args[6])))
    return m


def fit_int8_weights(gm: torch.fx.GraphModule, target: str | None) -> int:
    """Rewrite, in place, the u8×s8 weights of ``gm`` that could saturate on ``target``; returns how
    many. ``gm`` must be a copy whose parameters may be shared (nothing existing is mutated)."""
    if isa.resolve(target) not in isa.SATURATING:
        return 0
    qmax = isa.REDUCED_QMAX
    g = gm.graph
    count = 0
    for _, dq in u8s8_weights(gm):
        src, s_node = dq.args[0], dq.args[1]
        axis = dq.args[3]
        if src.op == "get_attr":
            wq = get_attr(gm, src.target)
            if int(wq.to(torch.int16).abs().max()) <= qmax:
                continue
            s = get_attr(gm, s_node.target).to(torch.float32)
            if s.numel() == 1:
                c = wq.to(torch.float32).abs().amax().clamp_min(1.0)
                shape = ()
            else:
                ax = axis % wq.dim()
                c = wq.to(torch.float32).abs().amax(dim=1 - ax).clamp_min(1.0)
                shape = [1, 1]
                shape[ax] = -1
            ratio = torch.where(c > qmax, c / qmax, torch.ones_like(c))
            new_q = torch.round(wq.to(torch.float32) / ratio.reshape(shape)).clamp(-qmax, qmax).to(torch.int8)
            new_s = (s * ratio.reshape(s.shape)).contiguous()
            qn = add_constant(gm, f"{src.target}_r{qmax}", new_q.contiguous(), before=dq)
            sn = add_constant(gm, f"{s_node.target}_r{qmax}", new_s, before=dq)
            dq.replace_input_with(src, qn)
            dq.replace_input_with(s_node, sn)
        else:                                                   # Q(W) still in the graph
            lo, hi = src.args[5], src.args[6]
            if max(-lo, hi) <= qmax:
                continue
            s = get_attr(gm, s_node.target).to(torch.float32)
            sn = add_constant(gm, f"{s_node.target}_r{qmax}", (s * (max(-lo, hi) / qmax)).contiguous(), before=src)
            src.args = (src.args[0], sn, *src.args[2:5], -qmax, qmax)
            dq.replace_input_with(s_node, sn)
        count += 1
    if count:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return count
