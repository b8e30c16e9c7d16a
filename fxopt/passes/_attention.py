"""Scaled dot-product attention written out as its two matmuls, so they can be quantized.

``aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`` is one op
in the captured graph. ``insert-qdq{attention=true}`` needs its matmuls as nodes::

    S = (q @ kᵀ) · scale                      scale = 1/√d unless given
    keep = causal (lower triangle, top-left aligned, as SDPA) ∧ bool mask
    S = where(keep, S, float32 min)          a finite fill: a row with no visible key makes no NaN
    S = S + mask                             for an additive float mask
    P = softmax(S, −1) · any(keep, −1)       rows that see no key are 0, as the fused op returns
    o = P @ v

The fused op's ONNX lowering guards such rows with ``IsNaN``/``Where`` over the whole score
tensor; here one reduction of the (head-broadcast) mask and a product do it.

Exact in float up to summation order (tested against the fused op). Refused, with the reason,
for dropout > 0 and ``enable_gqa`` (K/V heads fewer than Q heads, expanded inside the op).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from ..ir.meta import PROVENANCE, SOURCE_PATH, module_path

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_MIN = float(torch.finfo(torch.float32).min)      # finite: a fully masked row never makes NaN
_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class Attention:
    """The nodes of one decomposed attention: ``scores = q @ kt``, ``out = probs @ v``."""

    q: torch.fx.Node
    kt: torch.fx.Node
    probs: torch.fx.Node
    v: torch.fx.Node
    scores: torch.fx.Node
    out: torch.fx.Node
    path: str


def sdpa_options(n: torch.fx.Node) -> dict:
    opts = dict(zip(_ARGS, n.args[3:]))
    opts.update(n.kwargs)
    return opts


def why_not(n: torch.fx.Node) -> str | None:
    opts = sdpa_options(n)
    if opts.get("dropout_p", 0.0) not in (0, 0.0):
        return f"dropout_p={opts['dropout_p']} (inference graphs have none)"
    if opts.get("enable_gqa", False):
        return "enable_gqa=True (K/V heads are expanded inside the fused op)"
    q = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
    if q is None or not isinstance(q.shape[-1], int):
        return "the head dim is not a known constant"
    return None


def decompose(gm: torch.fx.GraphModule, n: torch.fx.Node, provenance: str) -> Attention:
    """Replace the SDPA node ``n`` by its matmuls; returns the new nodes."""
    g = gm.graph
    q, k, v = n.args[:3]
    opts = sdpa_options(n)
    qv = q.meta["val"]
    scale = opts.get("scale") or 1.0 / math.sqrt(qv.shape[-1])
    mask = opts.get("attn_mask")
    path = module_path(n)
    new: list[torch.fx.Node] = []

    def call(op, *args, **kwargs):
        node = g.call_function(op, args, kwargs)
        fake_args = torch.fx.node.map_arg(args, lambda a: a.meta["val"])
        fake_kwargs = torch.fx.node.map_arg(kwargs, lambda a: a.meta["val"])
        with _fake_mode(qv):
            node.meta["val"] = op(*fake_args, **fake_kwargs)
        new.append(node)
        return node

    with g.inserting_before(n):
        kt = call(aten.transpose.int, k, -2, -1)
        scores = call(aten.matmul.default, q, kt)
        s = call(aten.mul.Tensor, scores, float(scale))
        keep = None                                    # bool: which keys each query may see
        if opts.get("is_causal", False):
            keep = call(aten.tril.default, call(aten.ones_like.default, s, dtype=torch.bool))
        if isinstance(mask, torch.fx.Node) and mask.meta["val"].dtype == torch.bool:
            keep = mask if keep is None else call(aten.logical_and.default, keep, mask)
        if keep is not None:
            s = call(aten.masked_fill.Scalar, s, call(aten.logical_not.default, keep), _MIN)
        if isinstance(mask, torch.fx.Node) and mask.meta["val"].dtype != torch.bool:
            s = call(aten.add.Tensor, s, mask)
        probs = call(aten._softmax.default, s, -1, False)
        if isinstance(mask, torch.fx.Node) and mask.meta["val"].dtype == torch.bool:
            # a query that may see no key gets zeros, as the fused op gives (not a uniform average)
            probs = call(aten.mul.Tensor, probs, call(aten.any.dim, keep, -1, True))
        out = call(aten.matmul.default, probs, v)
    for m in new:
        PROVENANCE.set(m, provenance)
        SOURCE_PATH.set(m, path)
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return Attention(q, kt, probs, v, scores, out, path)


def _fake_mode(val):
    from torch._guards import detect_fake_mode
    import contextlib

    mode = detect_fake_mode([val])
    return mode if mode is not None else contextlib.nullcontext()
