"""``insert-qdq`` — quantize/dequantize pairs around linears (the reference form of quantization).

Every selected ``linear(x, W, b)`` becomes ``linear(DQ(Q(x)), DQ(Q(W)), b)`` with fxopt's ops
(:mod:`fxopt.ir.qops`), which simulate integer arithmetic exactly in float: running the graph in
PyTorch gives the quantized model's numbers, and ``fuse-qdq`` / lowering turn the pairs into
integer kernels. Schemes:

``w8a8-static``
    activations per tensor, range from calibration (``calib=minmax`` or ``percentile``):
    asymmetric uint8 ``s = (max − min)/255``, ``z = round(−min/s)`` (ORT's fast u8×s8 path), or
    symmetric int8 with ``symmetric=true``; weights per output channel, symmetric int8
    ``s_i = max_j |W_ij| / q`` on ``[−q, q]``, where ``q`` depends on ``target`` (below).
``w8a8-dynamic``
    activations quantized at run time: per token (``granularity=token``, symmetric int8,
    ``s_t = max_j |x_tj| / 127``; the accurate choice, as in ZeroQuant / LLM.int8) or per tensor
    (``granularity=tensor``, ONNX ``DynamicQuantizeLinear`` semantics; what ORT fuses into
    ``DynamicQuantizeMatMul``); weights as above.
``w8-weight-only``
    weights per channel int8; activations stay float.
``w4-weight-only``
    weights group-wise int4 (ZeroQuant): one scale per ``group`` (32/64/128) input columns of
    each output row, ``s = max|W_group| / 7`` on ``[−8, 7]``. With ``weight_symmetric=false``
    the groups are asymmetric uint4 with a zero point each (GPTQ/AWQ style, ONNX Runtime
    ``MatMulNBits`` with ``zero_points``): ``lo = min(min W_g, 0)``, ``hi = max(max W_g, 0)``,
    ``s = (hi − lo)/15``, ``z = clamp(round(−lo/s), 0, 15)``, ``q = clamp(round(W/s) + z, 0, 15)``,
    ``Ŵ = (q − z)·s``; the range is widened to contain 0 so that a group of one sign keeps its
    values instead of clamping them, and an all-zero group gets ``s = 1e-12``, ``z = 0`` (no division
    by zero). It helps where groups are off-centre: their ``[min, max]`` uses all 16 levels where
    ``±max|W|`` wastes part of them. Only ``w4-weight-only`` takes it: the int8 weight kernels the
    other schemes lower to (ORT's u8×s8 ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul``, torch's
    x86 qlinear) take symmetric weights, so ``weight_symmetric=false`` with them is a ``ValueError``.
    Embedding tables of their own stay symmetric (``GatherBlockQuantized`` without zero points); a
    table tied to a quantized linear is looked up in that linear's codes, zero points included.
    ``weight_zero_point=float`` (with ``weight_symmetric=false``) makes the zero point a float, not
    an integer: ``s = (max W_g − min W_g)/15``, ``z = −min W_g / s``, ``q = clamp(round(W/s + z), 0, 15)``,
    ``Ŵ = (q − z)·s = q·s + min W_g`` — min-max affine groups, llama.cpp's Q4_1 and HQQ's form, which
    ``MatMulNBits`` takes as float ``zero_points``. Both ends of every group are exact (no widening to
    0); a checkpoint already on such a grid (SmolLM2's Q4_1 GGUF, groups of 32) is reproduced exactly.
    The pair is ``fxopt::quantize_affine`` / ``fxopt::dequantize_affine`` (ONNX has no
    ``QuantizeLinear`` with a float zero point).

**Target CPU** (``target=auto``, the default: this machine; or ``portable``, ``avx2``, ``avx512``,
``avx512-vnni``, ``avx-vnni``, ``amx``, ``arm-dotprod``, ``arm-i8mm``; :mod:`fxopt.backends.isa`).
Linears whose activations reach the integer GEMM as **u8** (``w8a8-static`` asymmetric,
``w8a8-dynamic`` per tensor) run on ONNX Runtime's and oneDNN's u8×s8 kernels. Without VNNI those
add pairs of products into a saturating int16 (``VPMADDUBSW``): ``|a₀w₀ + a₁w₁| ≤ 2·255·q`` fits
only for ``q ≤ 64``. So on ``avx2``/``avx512``/``portable`` targets these weights use ``q = 64``
(7-bit magnitudes, ORT's ``reduce_range``; exact on every CPU), on VNNI/AMX/ARM dot-product targets
``q = 127``. s8 activations (``symmetric=true``, per token) and weight-only schemes keep ``q = 127``.
Measured on MiniLM W8A8 static + SmoothQuant (cosine vs. fp32 over 128 held-out passages): the
64-level weights cost little next to the activations' per-tensor error
(``python3 benchmarks/bench_quant_minilm.py``); full-range weights on an AVX2 CPU lose whole
products instead.

Embedding tables (``embeddings=true``, the default) are stored int8 per row: the rows a lookup
gathers are dequantized with their gathered scales, ``E[ids] ≈ q[ids] · s[ids]`` — in MiniLM the
word embeddings are over half the file. With ``scheme=w4-weight-only`` (or ``embedding_bits=4``)
tables are int4 in blocks of ``group`` columns instead, ``s = max|E_block| / 7``: ``fuse-qdq`` packs
them two values a byte and ONNX Runtime gathers them with ``GatherBlockQuantized`` — only the
looked-up rows are ever dequantized.

A table tied to a linear that is quantized (an LM head sharing the embedding's weight, as in
SmolLM2 and Llama with ``tie_word_embeddings``) is looked up in that linear's codes, so one quantized
copy of the table exists: a linear's weight is quantized per output channel = per vocabulary row,
and in blocks along the hidden dim, which is what a lookup needs. int8 schemes:
``embedding(q, ids) · embedding(s[:, None], ids)`` on the linear's own ``Q(W)`` and scale; int4 (and
``weight_symmetric=false``, integer or float zero points): ``embedding(DQ(Q(W)), ids)`` on the
linear's own dequantize, which ``fuse-qdq`` turns into a gather of the linear's packed weight. Every
looked-up row is the linear's dequantized weight row, bit for bit (on a target whose u8 activations
make the linear's weights 7-bit, ``[−64, 64]``, the lookup reads those). The note says
``<table>: embedding tied to <linear>: lookups read <linear>'s <int8|int4|uint4 ...> codes``;
``stats["tied_embeddings"]`` counts such lookups (included in ``embeddings``). A shared table that
some op reads in float (a linear left float by ``exclude`` or ``max_error``) stays float, with the note
``<table>: embedding table shared with another op (tied: <op> reads it in float), kept in float``;
``embedding_bits`` other than the linear's bits gives the lookups a copy of their own, with a note.
SmolLM2-135M, ``insert-qdq{scheme=w4-weight-only,group=32},fuse-qdq`` exported: 87.7 MB (the
Q4_1 GGUF it comes from: 98.4 MB; with ``embeddings=false``, the table float: 200.9 MB); the
lookup's own int4 error adds 0.4 % to its perplexity (docs/passes/insert-qdq.md, "Tied embedding
tables", has the figures and the commands).

One activation quantizer serves all linears that read the same value (q, k and v share it).
``include`` / ``exclude`` select linears by module path (substring or glob). With
``max_error > 0`` a linear whose simulated output error on calibration rows (mean over tokens
of ``‖Q(x)Q(W)ᵀ − xWᵀ‖² / ‖xWᵀ‖²``) exceeds it stays in float, with a note — the lever for inputs
with extreme outliers (SmolLM2's ``down_proj`` at the attention-sink token). Linears whose
input dim is not a multiple of ``group`` (w4) stay float with a note. With ``outliers > 0``
(static scheme), an activation whose calibrated peak exceeds ``outliers`` × its 99.9th
percentile of ``|x|`` — the attention-sink token of LLMs, whose ``down_proj`` input reaches
~3000 where other tokens stay near 10 — is quantized per token at run time instead of with one
static scale, with a note.

Not exact: the record's drift is the quantization error on the example inputs.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from ..backends import isa
from ..ir import qops
from ..ir.graph import add_constant, get_attr
from ..ir.meta import PROVENANCE, QSPEC, SOURCE_PATH, QuantSpec, describe
from ..ir.structure import LinearInfo, linears
from . import _fakequant as fq
from .base import NotApplicable, Pass, PassContext, PassResult, register_pass
from .calibration import check_batches, observe, tensor_range

SCHEMES = ("w8a8-static", "w8a8-dynamic", "w8-weight-only", "w4-weight-only")


@register_pass
@dataclass
class InsertQDQ(Pass):
    name: ClassVar[str] = "insert-qdq"
    run_after: ClassVar[tuple[str, ...]] = ("smoothquant",)
    summary: ClassVar[str] = "insert Q/DQ around linears: W8A8 static/dynamic, int8/int4 weight-only"
    scheme: str = "w8a8-static"
    group: int = 128
    granularity: str = "token"
    calib: str = "minmax"
    percentile: float = 99.99
    symmetric: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_error: float = 0.0
    outliers: float = 0.0
    embeddings: bool = True
    embedding_bits: int = 0
    attention: bool = False
    sample_rows: int = 512
    weight_symmetric: bool = True
    weight_zero_point: str = "int"
    target: str = "auto"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        if self.granularity not in ("token", "tensor"):
            raise ValueError("granularity must be 'token' or 'tensor'")
        if self.calib not in ("minmax", "percentile"):
            raise ValueError("calib must be 'minmax' or 'percentile'")
        if self.scheme == "w4-weight-only" and self.group not in (16, 32, 64, 128, 256):
            raise ValueError("group must be 16, 32, 64, 128 or 256")
        if self.embedding_bits not in (0, 4, 8):
            raise ValueError("embedding_bits must be 8, 4, or 0 (4 with scheme=w4-weight-only, else 8)")
        isa.normalize(self.target) if self.target != "auto" else None       # a clear error for a bad name
        if self.weight_zero_point not in ("int", "float"):
            raise ValueError(f"weight_zero_point must be 'int' or 'float'; got {self.weight_zero_point!r}")
        if self.weight_zero_point == "float" and (self.weight_symmetric or self.scheme != "w4-weight-only"):
            raise ValueError("weight_zero_point=float needs scheme=w4-weight-only and weight_symmetric=false: float "
                             "zero points are ONNX Runtime MatMulNBits' min-max affine groups (llama.cpp Q4_1 style)")
        if not self.weight_symmetric and self.scheme != "w4-weight-only":
            raise ValueError(
                f"weight_symmetric=false is supported with scheme=w4-weight-only only, not {self.scheme}: the int8 "
                "weight kernels fuse-qdq targets (ONNX Runtime's u8xs8 MatMulIntegerToFloat / DynamicQuantizeMatMul, "
                "torch's x86 qlinear) take symmetric weights with zero point 0")

    @property
    def quantizes_activations(self) -> bool:
        return self.scheme.startswith("w8a8")

    def _selected(self, gm) -> tuple[list[LinearInfo], list[str]]:
        out, notes = [], []
        for li in linears(gm):
            path = li.path
            if any(n.target in (qops.DEQUANTIZE, qops.QUANTIZE) for n in li.node.all_input_nodes):
                continue                                  # already quantized
            if self.include and not any(_match(path, p) for p in self.include):
                continue
            if any(_match(path, p) for p in self.exclude):
                notes.append(f"{path}: excluded by pattern, kept in float")
                continue
            if self.scheme == "w4-weight-only" and li.in_features % self.group:
                notes.append(f"{path}: {li.in_features} input channels are not a multiple of group={self.group}, kept in float")
                continue
            out.append(li)
        return out, notes

    def requires(self, gm, ctx: PassContext) -> None:
        sel, _ = self._selected(gm)
        has_emb = self.embeddings and any(n.op == "call_function" and n.target is torch.ops.aten.embedding.default
                                          and not PROVENANCE.get(n) and n.args[0].op == "get_attr" and get_attr(gm, n.args[0].target).is_floating_point()
                                          for n in gm.graph.nodes)
        if not sel and not has_emb:
            raise NotApplicable("no linear with a parameter weight to quantize (or all excluded / already quantized)")
        if self.scheme == "w8a8-static" or self.max_error > 0:
            check_batches(ctx.calibration, f"insert-qdq{{scheme={self.scheme}}}")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        sel, notes = self._selected(gm)
        inputs = list(dict.fromkeys(li.node.args[0] for li in sel))
        attns = self._decompose_attention(gm, notes) if self.attention and self.quantizes_activations else []
        if self.attention and not self.quantizes_activations:
            notes.append(f"attention=true ignored: {self.scheme} quantizes no activations")
        att_inputs = [x for a in attns for x in (a.q, a.kt, a.probs, a.v)]
        stats, calib_report = {}, {}
        if self.scheme == "w8a8-static" or self.max_error > 0:
            stats = observe(gm, ctx.calibration, inputs + (att_inputs if self.scheme == "w8a8-static" else []),
                            sample_rows=self.sample_rows if self.max_error > 0 else 0,
                            sample_values=1 << 20 if self.calib == "percentile" or self.outliers > 0 else 0,
                            desc="insert-qdq calibration", layerwise=ctx.calibration_mode == "layerwise",
                            report=calib_report)
        per_token: set[torch.fx.Node] = set()
        if self.scheme == "w8a8-static" and self.outliers > 0:
            for x in inputs:
                st = stats.get(x)
                vals = st.extra.get("abs_values") if st else None
                if vals is None or not vals.numel():
                    continue
                peak = max(-float(st.min.min()), float(st.max.max()))
                p999 = float(torch.quantile(vals[: 1 << 24].to(torch.float32), 0.999))
                if p999 > 0 and peak > self.outliers * p999:
                    per_token.add(x)
                    users = [li.path for li in sel if li.node.args[0] is x]
                    notes.append(f"{', '.join(users)}: input peak {peak:.4g} is {peak / p999:.0f}× its 99.9th "
                                 f"percentile, quantized per token at run time instead of statically")
        kept, errors = [], {}
        if self.max_error > 0:
            for li in sel:
                st = stats.get(li.node.args[0])
                rows = st.extra.get("rows") if st else None
                if rows is None:
                    kept.append(li)
                    continue
                err = self._error(gm, li, rows, st, per_token)
                errors[li.path] = round(err, 6)
                if err > self.max_error:
                    notes.append(f"{li.path}: simulated error {err:.3g} > max_error {self.max_error}, kept in float")
                else:
                    kept.append(li)
            sel = kept
        cov_notes, cov = self._coverage(gm, sel)           # before the rewrite hides the linears' weights
        act_q: dict[torch.fx.Node, tuple] = {}
        for li in sel:
            x = li.node.args[0]
            if self.quantizes_activations:
                if x not in act_q:
                    act_q[x] = self._quantize_activation(gm, x, stats.get(x), li, static=x not in per_token)
                li.node.replace_input_with(x, self._dequantize_activation(gm, act_q[x], x, li))
            wq = self._fake_quant_weight(gm, li, per_token)
            li.node.replace_input_with(li.node.args[1], wq)
        for a in attns:
            for x, mm in ((a.q, a.scores), (a.kt, a.scores), (a.probs, a.out), (a.v, a.out)):
                site = _Site(mm, a.path)
                aq = self._quantize_activation(gm, x, stats.get(x), site, static=True)
                mm.replace_input_with(x, self._dequantize_activation(gm, aq, x, site))
        n_emb, n_tied, n_info = self._quantize_embeddings(gm, notes) if self.embeddings else (0, 0, 0)
        gm.graph.lint()
        spec = self.scheme + ("" if not self.scheme == "w8a8-dynamic" else f" per-{self.granularity}")
        return PassResult(gm, bool(sel) or n_emb > 0 or bool(attns), stats={
                                                            "quantized": len(sel), "embeddings": n_emb,
                                                            "tied_embeddings": n_tied,
                                                            "attention_matmuls": 2 * len(attns),
                                                            "calibration": calib_report,
                                                            "weights_touched": cov.n_touched,
                                                            "weights_eligible": cov.n_eligible,
                                                            "weight_share": round(cov.share, 4),
                                                            "scheme": spec,
                                                            "kept_float": len(notes) - len(per_token) - n_info,
                                                            **self._target_stats(sel, per_token),
                                                            "per_token_fallback": len(per_token),
                                                **({"errors": errors} if errors else {})}, notes=cov_notes + notes)

    @staticmethod
    def _coverage(gm, sel) -> tuple[list[str], object]:
        """The share of the eligible weights (linears, stacked MoE experts) this run quantizes, as notes."""
        from ..ir.structure import expert_weights, weight_coverage
        cov = weight_coverage(gm, [li.weight for li in sel])
        notes = [f"quantized {cov.n_touched} of {cov.n_eligible} eligible weights ({100 * cov.share:.0f} % of their "
                 "bytes)"]
        experts = expert_weights(gm)[0]
        if experts:
            notes.append(f"{len(experts)} stacked MoE expert weights left in float: insert-qdq quantizes linear "
                         "weights only")
        return notes, cov

    # ------------------------------------------------------------------ activations

    def _quantize_activation(self, gm, x: torch.fx.Node, st, li: LinearInfo, static: bool = True):
        """The quantizer of ``x``, inserted right after it (after the last placeholder for an input)."""
        g = gm.graph
        val = x.meta.get("val")
        point = x if x.op != "placeholder" else [n for n in g.nodes if n.op == "placeholder"][-1]
        nxt = point.next                         # everything goes, in order, before this node
        base = f"_qdq.{_safe(li.path)}.input"
        if self.scheme == "w8a8-static" and static:
            lo, hi = tensor_range(st, self.calib, self.percentile)
            scale, zp, qmin, qmax = fq.static_qparams(lo, hi, self.symmetric)
            dtype = torch.int8 if self.symmetric else torch.uint8
            s = add_constant(gm, base + "_scale", torch.tensor(scale, dtype=torch.float32), before=nxt)
            z = add_constant(gm, base + "_zero_point", torch.tensor(zp, dtype=dtype), before=nxt)
            with g.inserting_before(nxt):
                q = g.call_function(qops.QUANTIZE, (x, s, z, -1, 0, qmin, qmax))
            q.meta["val"] = val.to(dtype) if val is not None else None
            QSPEC.set(q, QuantSpec(dtype, qmin, qmax, "per_tensor", symmetric=self.symmetric))
            out = ("static", q, s, z)
        else:
            per_tensor = self.granularity == "tensor" and self.scheme == "w8a8-dynamic"
            with g.inserting_before(nxt):
                if per_tensor:
                    q = g.call_function(qops.DYNAMIC_QUANTIZE, (x,))
                    parts = [g.call_function(operator.getitem, (q, i)) for i in range(3)]
                else:
                    q = g.call_function(qops.QUANTIZE_PER_TOKEN, (x, 127))
                    parts = [g.call_function(operator.getitem, (q, i)) for i in range(2)]
            QSPEC.set(q, QuantSpec(torch.uint8, 0, 255, "per_tensor", symmetric=False, dynamic=True) if per_tensor
                      else QuantSpec(torch.int8, -127, 127, "per_token", dynamic=True))
            out = ("tensor" if per_tensor else "token", q, *parts)
        for n in out[1:]:
            PROVENANCE.set(n, self.name)
            SOURCE_PATH.set(n, li.path)
        return out

    def _dequantize_activation(self, gm, aq, x, li: LinearInfo) -> torch.fx.Node:
        """One DQ per consumer, right before it (ORT wants a DQ per node unit)."""
        g = gm.graph
        kind = aq[0]
        with g.inserting_before(li.node):
            if kind == "static":
                _, q, s, z = aq
                dq = g.call_function(qops.DEQUANTIZE, (q, s, z, -1, 0))
            elif kind == "tensor":
                _, _, q, s, z = aq
                dq = g.call_function(qops.DEQUANTIZE, (q, s, z, -1, 0))
            else:
                _, _, q, s = aq
                dq = g.call_function(qops.DEQUANTIZE_PER_TOKEN, (q, s))
        val = x.meta.get("val")
        dq.meta["val"] = val.to(torch.float32) if val is not None else None
        PROVENANCE.set(dq, self.name)
        SOURCE_PATH.set(dq, li.path)
        return dq

    # ------------------------------------------------------------------ weights

    def _target_stats(self, sel, per_token) -> dict:
        if not self.quantizes_activations:
            return {}
        u8 = sum(self._u8_activations(li, per_token) for li in sel)
        return {"target": isa.resolve(self.target), "u8s8_linears": u8,
                "u8s8_weight_qmax": isa.weight_qmax(self.target) if u8 else None}

    def _u8_activations(self, li, per_token=frozenset()) -> bool:
        """This linear's activations reach the GEMM as u8 (static asymmetric, dynamic per tensor)."""
        if self.scheme == "w8a8-static":
            return not self.symmetric and li.node.args[0] not in per_token
        return self.scheme == "w8a8-dynamic" and self.granularity == "tensor"

    def _weight_qmax(self, li, per_token=frozenset()) -> int:
        """127, or 64 where a u8×s8 GEMM on the target adds pairs into a saturating int16."""
        return isa.weight_qmax(self.target) if self._u8_activations(li, per_token) else isa.FULL_QMAX

    def _fake_quant_weight(self, gm, li: LinearInfo, per_token=frozenset()) -> torch.fx.Node:
        w = get_attr(gm, li.weight).detach().to(torch.float32)
        wnode = li.node.args[1]
        base = f"_qdq.{_safe(li.path)}.weight"
        if self.scheme == "w4-weight-only" and self.weight_zero_point == "float":
            return self._fake_quant_weight_affine(gm, li, w, wnode, base)
        if self.scheme == "w4-weight-only" and not self.weight_symmetric:
            scale, zp = fq.grouped_asym_qparams(w, self.group)           # uint8 zero points in [0, 15]
            axis, block, qmin, qmax, gran = 1, self.group, 0, 15, "per_group"
        elif self.scheme == "w4-weight-only":
            n, k = w.shape
            scale = (w.reshape(n, k // self.group, self.group).abs().amax(-1) / 7.0).clamp_min(1e-12)
            zp = torch.zeros_like(scale, dtype=torch.int8)
            axis, block, qmin, qmax, gran = 1, self.group, -8, 7, "per_group"
        else:
            q = self._weight_qmax(li, per_token)
            scale = (w.abs().amax(1) / float(q)).clamp_min(1e-12)
            zp = torch.zeros(w.shape[0], dtype=torch.int8)
            axis, block, qmin, qmax, gran = 0, 0, -q, q, "per_channel"
        s = add_constant(gm, base + "_scale", scale, before=li.node)
        z = add_constant(gm, base + "_zero_point", zp, before=li.node)
        g = gm.graph
        with g.inserting_before(li.node):
            q = g.call_function(qops.QUANTIZE, (wnode, s, z, axis, block, qmin, qmax))
            dq = g.call_function(qops.DEQUANTIZE, (q, s, z, axis, block))
        q.meta["val"] = torch.empty(w.shape, dtype=zp.dtype)
        dq.meta["val"] = torch.empty(w.shape, dtype=torch.float32)
        QSPEC.set(q, QuantSpec(zp.dtype, qmin, qmax, gran, axis=axis, group_size=block, symmetric=zp.dtype == torch.int8))
        for n in (q, dq):
            PROVENANCE.set(n, self.name)
            SOURCE_PATH.set(n, li.path)
        return dq

    def _fake_quant_weight_affine(self, gm, li: LinearInfo, w: torch.Tensor, wnode, base: str) -> torch.fx.Node:
        """Min-max affine int4 groups with float zero points: ``quantize_affine`` → ``dequantize_affine``."""
        scale, zp = fq.grouped_affine_qparams(w, self.group)
        s = add_constant(gm, base + "_scale", scale, before=li.node)
        z = add_constant(gm, base + "_zero_point", zp, before=li.node)
        g = gm.graph
        with g.inserting_before(li.node):
            q = g.call_function(qops.QUANTIZE_AFFINE, (wnode, s, z, self.group, 15))
            dq = g.call_function(qops.DEQUANTIZE_AFFINE, (q, s, z, self.group))
        q.meta["val"] = torch.empty(w.shape, dtype=torch.uint8)
        dq.meta["val"] = torch.empty(w.shape, dtype=torch.float32)
        QSPEC.set(q, QuantSpec(torch.uint8, 0, 15, "per_group", axis=1, group_size=self.group, symmetric=False))
        for n in (q, dq):
            PROVENANCE.set(n, self.name)
            SOURCE_PATH.set(n, li.path)
        return dq

    def _quantize_embeddings(self, gm, notes: list[str]) -> tuple[int, int, int]:
        """Quantize the float embedding tables; returns (lookups quantized, of which read a tied linear's
        codes, notes added about quantized tables — not tables kept float)."""
        from ..ir.structure import shared_parameters
        tied_q: dict[str, tuple[torch.fx.Node | None, str]] = {}
        for sp in shared_parameters(gm):                  # before any lookup is rewritten
            found = _tied_weight_quantizer(sp)
            tied_q.update((t, found) for t in sp.targets)
        done = tied = info = 0
        for n in list(gm.graph.nodes):
            if not (n.op == "call_function" and n.target is torch.ops.aten.embedding.default) or PROVENANCE.get(n):
                continue                                       # (lookups this pass made itself: scale tables)
            wnode = n.args[0]
            if not (isinstance(wnode, torch.fx.Node) and wnode.op == "get_attr"):
                continue
            w = get_attr(gm, wnode.target)
            path = SOURCE_PATH.get(n) or wnode.target.rsplit(".", 1)[0]
            if not w.is_floating_point() or w.dim() != 2:
                continue
            q, why = tied_q.get(wnode.target, (None, ""))
            if wnode.target in tied_q and q is None:
                notes.append(f"{wnode.target}: embedding table shared with another op (tied: {why}), kept in float")
                continue
            if any(_match(path, p) for p in self.exclude):
                continue
            base = f"_qdq.{_safe(wnode.target)}"
            bits = self.embedding_bits or (4 if self.scheme == "w4-weight-only" else 8)
            if q is not None:
                head, kind = SOURCE_PATH.get(q) or describe(q), _code_kind(q)
                if bits == (8 if kind == "int8" else 4):
                    out = self._embedding_tied(gm, n, q, path)
                    notes.append(f"{wnode.target}: embedding tied to {head}: lookups read {head}'s {kind} codes "
                                 "(one quantized copy of the table)")
                    tied += 1
                    info += 1
                    n.replace_all_uses_with(out)
                    gm.graph.erase_node(n)
                    done += 1
                    continue
                notes.append(f"{wnode.target}: embedding tied to {head} ({kind}), embedding_bits={bits}: the lookups "
                             f"get an int{bits} copy of their own (the file holds the table twice)")
                info += 1
            if bits == 4 and w.shape[1] % self.group:
                notes.append(f"{wnode.target}: {w.shape[1]} columns are not a multiple of group={self.group}, "
                             "table stored int8 instead of int4")
                info += 1
                bits = 8
            if bits == 4:
                out = self._embedding_int4(gm, n, wnode, w, base, path)
            else:
                out = self._embedding_int8(gm, n, wnode, w, base, path)
            n.replace_all_uses_with(out)
            gm.graph.erase_node(n)
            done += 1
        return done, tied, info

    def _embedding_tied(self, gm, n, q: torch.fx.Node, path: str) -> torch.fx.Node:
        """The lookup ``n`` on the codes of the linear weight quantizer ``q`` (same table, tied).

        Per-row int8 (the linear's per-output-channel weight): ``embedding(q, ids) · embedding(s[:, None], ids)``,
        as :meth:`_embedding_int8`; blocked int4 / uint4 / min-max affine: ``embedding(DQ(q), ids)`` on the
        linear's own dequantize, which ``fuse-qdq`` turns into ``gather_nbits`` on the linear's packed weight.
        Either way each gathered row is the linear's dequantized weight row, bit for bit."""
        g = gm.graph
        val = n.meta.get("val")
        if q.target is qops.QUANTIZE and q.args[4] == 0:
            _hoist(g, q, n)
            with g.inserting_before(n):
                s_col = g.call_function(torch.ops.aten.unsqueeze.default, (q.args[1], 1))
                rows = g.call_function(torch.ops.aten.embedding.default, (q, *n.args[1:]), dict(n.kwargs))
                srows = g.call_function(torch.ops.aten.embedding.default, (s_col, n.args[1]))
                f = g.call_function(torch.ops.aten._to_copy.default, (rows,), {"dtype": torch.float32})
                out = g.call_function(torch.ops.aten.mul.Tensor, (f, srows))
            s_val = q.args[1].meta.get("val")
            made = ((s_col, s_val.unsqueeze(1) if s_val is not None else None),
                    (rows, val.to(torch.int8) if val is not None else None),
                    (srows, val[..., :1] if val is not None else None), (f, val), (out, val))
        else:
            dq = next(u for u in q.users if u.target in (qops.DEQUANTIZE, qops.DEQUANTIZE_AFFINE))
            _hoist(g, dq, n)
            with g.inserting_before(n):
                out = g.call_function(torch.ops.aten.embedding.default, (dq, *n.args[1:]), dict(n.kwargs))
            made = ((out, val),)
        for m, v in made:
            m.meta["val"] = v
            PROVENANCE.set(m, self.name)
            SOURCE_PATH.set(m, path)
        return out

    def _decompose_attention(self, gm, notes: list[str]) -> list:
        from . import _attention
        out = []
        for n in list(gm.graph.nodes):
            if not (n.op == "call_function" and n.target is _attention.SDPA):
                continue
            path = SOURCE_PATH.get(n) or _attention.module_path(n)
            if self.include and not any(_match(path, p) for p in self.include):
                continue
            if any(_match(path, p) for p in self.exclude):
                notes.append(f"{path}: attention excluded by pattern, kept in float")
                continue
            reason = _attention.why_not(n)
            if reason:
                notes.append(f"{path}: attention kept fused in float: {reason}")
                continue
            out.append(_attention.decompose(gm, n, self.name))
        if not out and not any("attention" in m for m in notes):
            notes.append("attention=true: the graph has no scaled_dot_product_attention (attention written as "
                         "separate matmuls is not matched), nothing to quantize there")
        return out

    def _embedding_int8(self, gm, n, wnode, w, base: str, path: str) -> torch.fx.Node:
        scale = (w.detach().to(torch.float32).abs().amax(1) / 127.0).clamp_min(1e-12)
        s = add_constant(gm, base + "_scale", scale, before=n)
        s2 = add_constant(gm, base + "_row_scale", scale.reshape(-1, 1).clone(), before=n)
        z = add_constant(gm, base + "_zero_point", torch.zeros(w.shape[0], dtype=torch.int8), before=n)
        g = gm.graph
        with g.inserting_before(n):
            q = g.call_function(qops.QUANTIZE, (wnode, s, z, 0, 0, -127, 127))
            rows = g.call_function(torch.ops.aten.embedding.default, (q, *n.args[1:]), dict(n.kwargs))
            srows = g.call_function(torch.ops.aten.embedding.default, (s2, n.args[1]))
            f = g.call_function(torch.ops.aten._to_copy.default, (rows,), {"dtype": torch.float32})
            out = g.call_function(torch.ops.aten.mul.Tensor, (f, srows))
        val = n.meta.get("val")
        for m, v in ((q, torch.empty(w.shape, dtype=torch.int8)), (rows, val.to(torch.int8) if val is not None else None),
                     (srows, val[..., :1] if val is not None else None), (f, val), (out, val)):
            m.meta["val"] = v
            PROVENANCE.set(m, self.name)
            SOURCE_PATH.set(m, path)
        QSPEC.set(q, QuantSpec(torch.int8, -127, 127, "per_channel", axis=0))
        return out

    def _embedding_int4(self, gm, n, wnode, w, base: str, path: str) -> torch.fx.Node:
        v, d = w.shape
        scale = (w.detach().to(torch.float32).reshape(v, d // self.group, self.group).abs().amax(-1) / 7.0
                 ).clamp_min(1e-12)
        s = add_constant(gm, base + "_scale", scale, before=n)
        z = add_constant(gm, base + "_zero_point", torch.zeros_like(scale, dtype=torch.int8), before=n)
        g = gm.graph
        with g.inserting_before(n):
            q = g.call_function(qops.QUANTIZE, (wnode, s, z, 1, self.group, -8, 7))
            dq = g.call_function(qops.DEQUANTIZE, (q, s, z, 1, self.group))
            out = g.call_function(torch.ops.aten.embedding.default, (dq, *n.args[1:]), dict(n.kwargs))
        for m, val in ((q, torch.empty(w.shape, dtype=torch.int8)), (dq, torch.empty(w.shape, dtype=torch.float32)),
                       (out, n.meta.get("val"))):
            m.meta["val"] = val
            PROVENANCE.set(m, self.name)
            SOURCE_PATH.set(m, path)
        QSPEC.set(q, QuantSpec(torch.int8, -8, 7, "per_group", axis=1, group_size=self.group))
        return out

    def _error(self, gm, li: LinearInfo, rows: torch.Tensor, st, per_token=frozenset()) -> float:
        w = get_attr(gm, li.weight).detach().to(torch.float32)
        exact = rows @ w.t()
        if self.scheme == "w4-weight-only" and self.weight_zero_point == "float":
            wq = fq.weight_grouped_affine(w, self.group)
        elif self.scheme == "w4-weight-only":
            wq = fq.weight_grouped(w, self.group) if self.weight_symmetric else fq.weight_grouped_asym(w, self.group)
        else:
            wq = fq.weight_per_channel(w, self._weight_qmax(li, per_token))
        if self.scheme == "w8a8-static":
            lo, hi = tensor_range(st, self.calib, self.percentile)
            scale, zp, qmin, qmax = fq.static_qparams(lo, hi, self.symmetric)
            xq = fq.act_affine(rows, scale, zp, qmin, qmax)
        elif self.scheme == "w8a8-dynamic":
            xq = fq.act_per_token(rows) if self.granularity == "token" else fq.act_dynamic_tensor(rows)
        else:
            xq = rows
        return fq.relative_error(xq @ wq.t(), exact)


@dataclass
class _Site:
    """Where a quantized activation is consumed (a linear, or an attention matmul)."""

    node: torch.fx.Node
    path: str


def _tied_weight_quantizer(sp) -> tuple[torch.fx.Node | None, str]:
    """The weight quantizer ``Q(W)`` of the linear a shared table is tied to, or ``(None, why not)``.

    Every op that reads the table must be an embedding lookup or an ``insert-qdq`` weight quantizer
    whose dequantized weight only linears (as their weight) and lookups read."""
    emb = torch.ops.aten.embedding.default
    found = []
    for u in sp.users:
        if u.op == "call_function" and u.target is emb:
            continue
        if not (u.op == "call_function" and u.target in (qops.QUANTIZE, qops.QUANTIZE_AFFINE)
                and PROVENANCE.get(u) == InsertQDQ.name):
            return None, f"{describe(u)} reads it in float"
        dqs = [d for d in u.users if d.target in (qops.DEQUANTIZE, qops.DEQUANTIZE_AFFINE)]
        readers = [r for d in dqs for r in d.users]
        if not dqs or not all(d.target is emb or d in dqs for d in u.users) or \
                not all(r.target is emb or (r.target is torch.ops.aten.linear.default and r.args[1] in dqs)
                        for r in readers):
            return None, f"{describe(u)} is not a linear's weight quantizer"
        if not any(r.target is torch.ops.aten.linear.default for r in readers):
            return None, f"{describe(u)} feeds no linear"
        found.append(u)
    if not found:
        return None, "no quantized linear reads it"
    return found[0], ""


def _code_kind(q: torch.fx.Node) -> str:
    """What codes a linear's weight quantizer makes: int8 per row, int4, uint4 (zero points), uint4 affine."""
    if q.target is qops.QUANTIZE_AFFINE:
        return "uint4 (float zero point)"
    if q.args[4] == 0:
        return "int8"
    return "int4" if q.args[5] < 0 else "uint4 (zero point)"


def _hoist(g: torch.fx.Graph, node: torch.fx.Node, before: torch.fx.Node) -> None:
    """Move ``node`` and those of its inputs that come after ``before`` to just ahead of it (a weight's
    ``Q``/``DQ`` and constants, which the LM head at the end of the graph and the lookup at its start share)."""
    order = {x: i for i, x in enumerate(g.nodes)}
    move, stack = set(), [node]
    while stack:
        x = stack.pop()
        if order[x] > order[before] and x not in move:
            move.add(x)
            stack += x.all_input_nodes
    for x in sorted(move, key=order.__getitem__):
        before.prepend(x)


def _match(path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(path, pattern) or pattern in path


def _safe(path: str) -> str:
    return path.replace(".", "_") or "root"

