"""Export-time rewrite: ``aten.scaled_dot_product_attention`` → ``fxopt::attention`` → ONNX Runtime's
``MultiHeadAttention``.

What the dynamo exporter writes for one SDPA is about a dozen ONNX nodes: transposes of Q/K/V,
MatMul, Mul by the scale, the mask as ``Where``, ``Softmax``, ``IsNaN``/``Where`` to zero rows that
keep no key, MatMul, transpose back. ONNX Runtime does not fuse that pattern (neither its graph
optimizer nor ``onnxruntime.transformers.optimizer`` recognizes it on MiniLM; measured), so every
node runs on its own over ``[B, H, S, T]`` scores. ``com.microsoft.MultiHeadAttention`` computes the
same in one kernel. Per MiniLM layer (B 8, S 128, 12 heads of 32, one thread) that is ≈4.0 ms →
≈2.6 ms for the attention core (benchmarks/README.md).

:func:`fuse_attention` replaces each eligible SDPA node of the export copy of the graph
(:func:`fxopt.ir.graph.graph_copy`: parameters shared, the caller's graph untouched) by :data:`fxopt.ir.attnops.ATTENTION`, whose PyTorch implementation
*is* SDPA, so the rewrite is exact; the ONNX translation then emits::

    q3 = Reshape(Transpose(q, [0,2,1,3]), [0,0,-1])                 (and k3, v3)
    bias = Where(mask, 0, float32 min) | mask | none                 expanded to [B|1, H|1, S, T]
    o = MultiHeadAttention(q3, k3, v3, attention_bias=bias, num_heads=H, scale=s)
    out = Transpose(Reshape(o, [0,0,H,-1]), [0,2,1,3])  (· any(mask, −1) for a boolean mask)

ORT's transpose optimizer cancels the transposes against the graph's own head split and merge.

Eligible: float32 Q/K/V of rank 4 with the same number of heads (no ``enable_gqa``), no dropout, a
mask that is absent or of rank 4 (bool or float32), or ``is_causal=True`` without a mask and with
the same query and key length (ORT's ``unidirectional=1``; causal LMs captured with an attention
mask pass it as a boolean mask instead). Others stay SDPA, with the reason in the export report's
notes.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from ..ir.attnops import ATTENTION, MASK_ADDITIVE, MASK_BOOL, MASK_CAUSAL, MASK_NONE
from ..ir.meta import describe
from ..passes._attention import SDPA, sdpa_options


def why_not(n: torch.fx.Node) -> str | None:
    """Why the SDPA node ``n`` cannot become ``MultiHeadAttention`` (None: it can)."""
    opts = sdpa_options(n)
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in n.args[:3]]
    if any(v is None for v in vals):
        return "Q/K/V carry no shape information"
    q, k, v = vals
    if any(t.dim() != 4 or t.dtype != torch.float32 for t in vals):
        return "Q/K/V are not float32 tensors of rank 4 [B, H, S, D]"
    if opts.get("dropout_p", 0.0) not in (0, 0.0):
        return f"dropout_p={opts['dropout_p']}"
    if opts.get("is_causal", False):
        if opts.get("attn_mask") is not None:
            return "is_causal=True together with a mask"
        if not _same_dim(q.shape[2], k.shape[2]):
            return "is_causal=True with a key length that may differ from the query length"
    if opts.get("enable_gqa", False) or not (q.shape[1] == k.shape[1] == v.shape[1]):
        return "fewer K/V heads than query heads (grouped-query attention inside the op)"
    if not all(isinstance(d, int) for d in (q.shape[1], q.shape[-1], v.shape[-1])):
        return "the number of heads or the head dim is not a constant"
    mask = opts.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        mv = mask.meta.get("val")
        if mv is None or mv.dim() != 4 or mv.dtype not in (torch.bool, torch.float32):
            return "the mask is not a bool or float32 tensor of rank 4"
    elif mask is not None:
        return "the mask is not a graph value"
    return None


def _same_dim(a, b) -> bool:
    return (a == b) is True if not (isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt)) else str(a) == str(b)


_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}


def _same_shape_view(u: torch.fx.Node, a: torch.fx.Node) -> bool:
    if not (u.op == "call_function" and u.target in _VIEWS and u.args[0] is a):
        return False
    x, y = a.meta.get("val"), u.meta.get("val")
    return x is not None and y is not None and x.dim() == y.dim() and all(
        (p == q) is True or (isinstance(p, torch.SymInt) and str(p) == str(q)) for p, q in zip(x.shape, y.shape))


def fuse_attention(gm: torch.fx.GraphModule) -> tuple[int, list[str]]:
    """Rewrite, *in place*, each eligible SDPA node of ``gm`` into ``fxopt::attention``.

    ``export_onnx`` calls it on :func:`fxopt.ir.graph.graph_copy` of the caller's graph (shared
    parameters), never on the caller's. Returns ``(fused, notes)``: the notes name each SDPA that
    stays and why."""
    graph = gm.graph
    todo, notes = [], []
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target is SDPA]:
        why = why_not(n)
        if why:
            notes.append(f"{describe(n)} stays SDPA: {why}")
        else:
            todo.append(n)
    for n in todo:
        q, k, v = n.args[:3]
        opts = sdpa_options(n)
        qv = q.meta["val"]
        scale = opts.get("scale") or 1.0 / math.sqrt(qv.shape[-1])
        mask = opts.get("attn_mask")
        if opts.get("is_causal", False):
            kind = MASK_CAUSAL
        else:
            kind = MASK_NONE if mask is None else (MASK_BOOL if mask.meta["val"].dtype == torch.bool else MASK_ADDITIVE)
        with graph.inserting_before(n):
            a = graph.call_function(ATTENTION, (q, k, v, mask, float(scale), int(qv.shape[1]), kind))
        a.meta.update(n.meta)
        n.replace_all_uses_with(a)
        graph.erase_node(n)
        for u in list(a.users):                # a reshape to the same shape would stop ORT cancelling
            if _same_shape_view(u, a):         # our transpose against the graph's head merge
                u.replace_all_uses_with(a)
                graph.erase_node(u)
    if todo:
        graph.lint()
        gm.recompile()
    return len(todo), notes
