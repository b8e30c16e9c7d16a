"""``fuse-qdq`` — turn the Q/DQ reference form into integer weights and kernel-ready patterns.

Rewrite rules, in order:

1. **Pre-quantize weights.** ``Q(W, s, z)`` of a parameter is evaluated once; the node becomes a
   ``get_attr`` of an int8 constant and the float weight dies (``W`` is deleted unless another
   op still reads it in float). Files and memory shrink ~4×. A tied embedding lookup that
   ``insert-qdq`` pointed at the linear's ``Q(W)`` now reads the same constant.
2. **Redundant pairs.** ``Q(DQ(q, s, z), s, z)`` with a range that covers ``q``'s is ``q``.
3. **Integer linears.** ``linear(x̂, DQ(W_q, s_w, 0, axis=0), b)`` with a per-channel int8
   weight becomes ``matmul(x̂, DQ(W_qᵀ, s_w, 0, axis=1)) + b``: the weight is stored transposed
   so that ONNX holds ``DequantizeLinear → MatMul`` with nothing in between — the pattern ONNX
   Runtime fuses into ``MatMulIntegerToFloat`` (static ``Q → DQ`` input) or
   ``DynamicQuantizeMatMul`` (``DynamicQuantizeLinear`` input); for weight-only int8 (float
   input) ORT 1.32 rewrites it into an 8-bit ``MatMulNBits``. When a tied lookup reads ``W_q`` too,
   it reads ``permute(W_qᵀ, [1, 0])`` instead: the table is stored once, transposed (in ONNX one
   initializer and a ``Transpose`` before the lookup's ``Gather``, which ONNX Runtime folds at load).
4. **Packed int4.** ``linear(x, DQ(W_q, s, 0, axis=1, block), b)`` with a group-wise int4 weight
   becomes ``fxopt::matmul_nbits(x, packed, s) + b`` (ONNX Runtime's ``MatMulNBits`` layout:
   two values a byte, zero point 8). An asymmetric uint4 weight ``DQ(W_u, s, z, axis=1, block)``
   (values and zero points in ``[0, 15]``, ``insert-qdq{weight_symmetric=false}``) is packed as
   stored and its zero points go to ``matmul_nbits``'s ``zero_points`` input: uint8
   ``[N, ceil(n_blocks/2)]``, two 4-bit zero points a byte, low nibble first. Min-max affine groups
   with float zero points (``insert-qdq{weight_zero_point=float}``: ``quantize_affine`` /
   ``dequantize_affine``) are pre-quantized the same way (rule 1) and packed with their float zero
   points as they are (``MatMulNBits`` reads a float ``zero_points`` input unpacked, one per block).
   The weight of a linear whose dequantize a tied lookup reads too keeps its scales and float zero
   points as ``[N, K/block]`` (``MatMulNBits`` takes that shape as well), for rule 5 to share.
5. **Packed int4 lookups.** ``embedding(DQ(q4, s, 0, axis=1, block), ids)`` of a table of its own
   becomes ``fxopt::gather_nbits(packed [V, H/2], ids, s)`` (``GatherBlockQuantized``, zero point 8).
   A lookup of a table tied to a linear of rule 4 gathers from that linear's constants: its packed
   weight viewed as ``[V, H/2]`` (``reshape``: ``[N, K/block, block/2]`` holds the same bytes), its
   ``[N, K/block]`` scales, and its zero points — uint8 ones packed as ``MatMulNBits`` packs them,
   which is how ``GatherBlockQuantized`` reads them too; float ones (min-max affine groups), which
   ``GatherBlockQuantized`` cannot take, make ``gather_nbits`` dequantize the gathered rows in the
   graph (in ONNX: ``Gather`` of the packed rows, ``BitwiseAnd``/``BitShift``, ``(u − z)·s``). The
   file holds the table once; ``stats["tied_tables"]`` counts these lookups.

Each rewritten linear is marked with :data:`fxopt.ir.meta.QLINEAR` (scheme, weight, activation
form) for backends. The dequantized weights are bit-identical to the fake-quantized ones, but the
pass is not declared exact: ``matmul`` sums in another order than ``linear``, and a float change
of one ulp can flip a later static quantizer's rounding by one step (measured on MiniLM W8A8:
max |Δ| ≈ 1 % of the output scale, mean ≈ 1e-4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from ..ir import qops
from ..ir.graph import add_constant, delete_unused_attrs, get_attr
from ..ir.meta import PROVENANCE, QLINEAR, SOURCE_PATH, QuantizedLinear, module_path
from .base import NotApplicable, Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten


def _is(n, target) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is target


def _const(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "get_attr"


@register_pass
@dataclass
class FuseQDQ(Pass):
    name: ClassVar[str] = "fuse-qdq"
    requires_passes: ClassVar[tuple[str, ...]] = ("insert-qdq",)
    summary: ClassVar[str] = "pre-quantize weights to int8/int4 constants, drop redundant Q/DQ, form integer linears"

    def requires(self, gm, ctx: PassContext) -> None:
        if not any(_is(n, qops.QUANTIZE) or _is(n, qops.DEQUANTIZE) or _is(n, qops.DEQUANTIZE_AFFINE)
                   for n in gm.graph.nodes):
            raise NotApplicable("the graph has no fxopt Q/DQ nodes")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"weights_prequantized": 0, "pairs_removed": 0, "int8_linears": 0, "int4_linears": 0, "tied_tables": 0}
        g = gm.graph
        # 1. pre-quantize weights (integer zero points, and float ones for min-max affine int4 groups)
        quantizers = {qops.QUANTIZE: (qops.quantize, 7), qops.QUANTIZE_AFFINE: (qops.quantize_affine, 5)}
        for n in list(g.nodes):
            kind = quantizers.get(n.target) if n.op == "call_function" else None
            if kind is not None and all(_const(a) for a in n.args[:3]):
                fn, nargs = kind
                w, s, z = (get_attr(gm, a.target) for a in n.args[:3])
                const = add_constant(gm, f"{n.args[0].target}_q", fn(w.detach(), s, z, *n.args[3:nargs]), before=n)
                PROVENANCE.set(const, self.name)
                n.replace_all_uses_with(const)
                g.erase_node(n)
                stats["weights_prequantized"] += 1
        # 2. redundant Q(DQ(q)) pairs
        for n in list(g.nodes):
            if _is(n, qops.QUANTIZE) and _is(n.args[0], qops.DEQUANTIZE):
                dq = n.args[0]
                same = dq.args[1:5] == n.args[1:5]
                q_in = dq.args[0]
                qv = q_in.meta.get("val") if isinstance(q_in, torch.fx.Node) else None
                covers = qv is not None and qv.dtype in qops.QUANT_DTYPES and \
                    (n.args[5], n.args[6]) == qops.dtype_range(qv.dtype)
                if same and covers:
                    n.replace_all_uses_with(q_in)
                    g.erase_node(n)
                    stats["pairs_removed"] += 1
        # 3./4. integer linears (a weight that a tied lookup reads too is stored once: see _transposed, nbits)
        transposed: dict[torch.fx.Node, torch.fx.Node] = {}
        nbits: dict[torch.fx.Node, tuple] = {}
        for n in list(g.nodes):
            if not _is(n, aten.linear.default):
                continue
            x, wd = n.args[0], n.args[1]
            bias = n.args[2] if len(n.args) > 2 else None
            if _is(wd, qops.DEQUANTIZE_AFFINE) and all(_const(a) for a in wd.args[:3]):
                self._affine_int4(gm, n, x, wd, bias, stats, nbits)
                continue
            if not (_is(wd, qops.DEQUANTIZE) and _const(wd.args[0])):
                continue
            wq = get_attr(gm, wd.args[0].target)
            if wq.dtype not in (torch.int8, torch.uint8) or not all(_const(a) for a in wd.args[1:3]):
                continue
            s_w, z_w = get_attr(gm, wd.args[1].target), get_attr(gm, wd.args[2].target)
            axis, block = wd.args[3], wd.args[4]
            # asymmetric uint4 groups (insert-qdq{weight_symmetric=false}): values and zero points in [0, 15]
            asym4 = (wq.dtype == torch.uint8 and z_w.dtype == torch.uint8 and block > 0 and axis == 1
                     and wq.dim() == 2 and z_w.shape == (wq.shape[0], -(-wq.shape[1] // block))
                     and int(wq.max()) <= 15 and int(z_w.max()) <= 15)
            if wq.dtype != torch.int8 and not asym4:
                continue
            if not asym4 and bool((z_w != 0).any()):
                continue                                # integer kernels here take symmetric weights
            path = module_path(n)
            act = _activation_form(x)
            with g.inserting_before(n):
                if block == 0 and axis == 0:
                    wt = self._transposed(gm, n, wd, wq, transposed)
                    wt_shape = tuple(wq.t().shape)
                    dq_t = g.call_function(qops.DEQUANTIZE, (wt, wd.args[1], wd.args[2], 1, 0))
                    out = g.call_function(aten.matmul.default, (x, dq_t))
                    scheme = "w8a8-" + ("static" if act.endswith("static") else "dynamic") if act else "w8-weight-only"
                    stats["int8_linears"] += 1
                    marked, weight_name, group = out, wt.target, 0
                elif asym4 or (block > 0 and axis == 1 and int(wq.min()) >= -8 and int(wq.max()) <= 7):
                    k, nout = wq.shape[1], wq.shape[0]
                    tied = len(wd.users) > 1                  # a lookup reads this weight too (tied table)
                    at = wd if tied else n
                    bits = qops.pack_uint4_blocks(wq, block) if asym4 else qops.pack_nbits(wq, block)
                    packed = add_constant(gm, f"{wd.args[0].target}_nbits", bits, before=at)
                    s2 = s_w.to(torch.float32).reshape(nout, -1) if tied else s_w.to(torch.float32).reshape(-1)
                    scales = add_constant(gm, f"{wd.args[0].target}_nbits_scale", s2.contiguous(), before=at)
                    args = (x, packed, scales, k, nout, 4, block)
                    zps = None
                    if asym4:
                        zps = add_constant(gm, f"{wd.args[0].target}_nbits_zero_points",
                                           qops.pack_zero_points(z_w), before=at)
                        args += (zps,)
                    if tied:
                        nbits[wd] = (packed, scales, zps, k, block)
                    out = g.call_function(qops.MATMUL_NBITS, args)
                    scheme, stats["int4_linears"] = "w4-weight-only", stats["int4_linears"] + 1
                    marked, weight_name, group = out, packed.target, block
                else:
                    continue
                if bias is not None:
                    out = g.call_function(aten.add.Tensor, (out, bias))
            if block == 0 and axis == 0:
                dq_t.meta["val"] = torch.empty(wt_shape, dtype=torch.float32)
                PROVENANCE.set(dq_t, self.name)
                SOURCE_PATH.set(dq_t, path)
            for m in {marked, out}:
                m.meta["val"] = n.meta.get("val")
                PROVENANCE.set(m, self.name)
                SOURCE_PATH.set(m, path)
            QLINEAR.set(marked, QuantizedLinear(scheme, weight_name, path, act, group))
            n.replace_all_uses_with(out)
            g.erase_node(n)
        # 5. int4 embedding tables: embedding(DQ(q4, s, axis=1, block)) → gather_nbits (GatherBlockQuantized);
        #    a table tied to a linear of rule 4 gathers from that linear's packed weight, scales and zero points
        stats["int4_embeddings"] = 0
        for n in list(g.nodes):
            if not (_is(n, aten.embedding.default) and (_is(n.args[0], qops.DEQUANTIZE)
                                                        or _is(n.args[0], qops.DEQUANTIZE_AFFINE))):
                continue
            dq = n.args[0]
            path = module_path(n)
            if dq in nbits:
                packed, scales, zps, d, block = nbits[dq]
                v = get_attr(gm, packed.target).shape[0]
                with g.inserting_before(n):
                    rows = g.call_function(aten.reshape.default, (packed, [v, d // 2]))   # [N, K/b, b/2] → [V, H/2]
                    out = g.call_function(qops.GATHER_NBITS, (rows, n.args[1], scales, d, block, zps))
                rows.meta["val"] = torch.empty((v, d // 2), dtype=torch.uint8)
                for m in (rows, out):
                    PROVENANCE.set(m, self.name)
                    SOURCE_PATH.set(m, path)
                stats["tied_tables"] += 1
            else:
                if not (_is(dq, qops.DEQUANTIZE) and all(_const(a) for a in dq.args[:3]) and dq.args[3] == 1
                        and dq.args[4] > 0):
                    continue
                wq, s_w, z_w = (get_attr(gm, a.target) for a in dq.args[:3])
                if wq.dtype != torch.int8 or wq.dim() != 2 or bool((z_w != 0).any()) or \
                        int(wq.min()) < -8 or int(wq.max()) > 7 or wq.shape[1] % 2:
                    continue
                block = dq.args[4]
                packed = add_constant(gm, f"{dq.args[0].target}_nbits", qops.pack_rows_nbits(wq), before=n)
                scales = add_constant(gm, f"{dq.args[0].target}_nbits_scale", s_w.to(torch.float32).contiguous(),
                                      before=n)
                with g.inserting_before(n):
                    out = g.call_function(qops.GATHER_NBITS, (packed, n.args[1], scales, wq.shape[1], block))
                PROVENANCE.set(out, self.name)
                SOURCE_PATH.set(out, path)
            out.meta["val"] = n.meta.get("val")
            n.replace_all_uses_with(out)
            g.erase_node(n)
            stats["int4_embeddings"] += 1
        changed = any(stats.values())
        if changed:
            g.eliminate_dead_code()
            stats["bytes_freed"] = delete_unused_attrs(gm)[1]
        return PassResult(gm, changed, stats=stats)

    def _affine_int4(self, gm, n, x, wd, bias, stats, nbits) -> None:
        """``linear(x, dequantize_affine(q, s, z, block), b)`` (float zero points) → ``matmul_nbits`` with
        float ``zero_points`` (one per block, not packed) ``+ b``."""
        g = gm.graph
        wq, s_w, z_w = (get_attr(gm, a.target) for a in wd.args[:3])
        block = wd.args[3]
        if wq.dtype != torch.uint8 or wq.dim() != 2 or wq.shape[1] % block or int(wq.max()) > 15:
            return
        k, nout = wq.shape[1], wq.shape[0]
        path = module_path(n)
        tied = len(wd.users) > 1                          # a lookup reads this weight too (tied table)
        at = wd if tied else n
        shape = (nout, -1) if tied else (-1,)
        packed = add_constant(gm, f"{wd.args[0].target}_nbits", qops.pack_uint4_blocks(wq, block), before=at)
        scales = add_constant(gm, f"{wd.args[0].target}_nbits_scale",
                              s_w.to(torch.float32).reshape(shape).contiguous(), before=at)
        zps = add_constant(gm, f"{wd.args[0].target}_nbits_zero_points",
                           z_w.to(torch.float32).reshape(shape).contiguous(), before=at)
        if tied:
            nbits[wd] = (packed, scales, zps, k, block)
        with g.inserting_before(n):
            out = marked = g.call_function(qops.MATMUL_NBITS, (x, packed, scales, k, nout, 4, block, zps))
            if bias is not None:
                out = g.call_function(aten.add.Tensor, (out, bias))
        for m in {marked, out}:
            m.meta["val"] = n.meta.get("val")
            PROVENANCE.set(m, self.name)
            SOURCE_PATH.set(m, path)
        QLINEAR.set(marked, QuantizedLinear("w4-weight-only", packed.target, path, "", block))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        stats["int4_linears"] += 1

    @staticmethod
    def _transposed(gm, n, wd, wq, done: dict) -> torch.fx.Node:
        """``W_qᵀ`` for an int8 linear. When other ops read ``W_q`` too (a tied embedding lookup), they
        read ``permute(W_qᵀ, [1, 0])`` instead, so the table is stored once (transposed, as the
        integer GEMM wants it; ONNX: one initializer and a ``Transpose`` before the ``Gather``)."""
        src = wd.args[0]
        if src in done:
            return done[src]
        others = [u for u in src.users if u is not wd]
        if not others:
            return add_constant(gm, f"{src.target}_t", wq.t().contiguous(), before=n)
        wt = add_constant(gm, f"{src.target}_t", wq.t().contiguous(), before=src)
        with gm.graph.inserting_after(wt):
            back = gm.graph.call_function(aten.permute.default, (wt, [1, 0]))
        back.meta["val"] = torch.empty(tuple(wq.shape), dtype=wq.dtype)
        PROVENANCE.set(back, "fuse-qdq")
        src.replace_all_uses_with(back, delete_user_cb=lambda u: u is not wd)
        done[src] = wt
        return wt


def _activation_form(x) -> str:
    """How the linear's input was quantized, read off the DQ feeding it."""
    if _is(x, qops.DEQUANTIZE_PER_TOKEN):
        return "s8 per-token dynamic"
    if _is(x, qops.DEQUANTIZE):
        src = x.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target.__name__ == "getitem":
            return "u8 per-tensor dynamic"
        if _is(src, qops.QUANTIZE):
            return ("s8" if src.args[5] < 0 else "u8") + " per-tensor static"
    return ""
