"""``smoothquant`` — migrate activation outliers into weights (Xiao, Lin et al., *SmoothQuant*, 2022).

A linear ``Y = X Wᵀ`` is unchanged when each input channel ``j`` is divided by ``s_j`` and the
matching weight column multiplied by it: ``Y = (X diag(s)⁻¹)(W diag(s))ᵀ``. Choosing

    s_j = max|X_j|^α / max|W_{:,j}|^(1−α)

flattens the few activation channels with huge ranges (which ruin per-tensor int8 activation
scales) at the cost of slightly wider weight columns (which per-channel weight scales absorb).
``max|W_{:,j}|`` is taken over *every* consumer of ``X``: one ``s`` per smoothing group.

The division ``X diag(s)⁻¹`` costs nothing when it is folded into whatever produced ``X``.
Groups come from the graph (:mod:`fxopt.ir.structure`), never from module names:

1. **norm → linears**: ``X`` is a LayerNorm / RMSNorm output. ``γ ← γ/s`` (and ``β ← β/s``);
   every linear reading ``X`` gets ``W ← W·diag(s)``. A consumer that is not a linear
   (BERT's post-LN residual add, a router written as a matmul) is *compensated* by an inserted
   ``X·s`` in front of it, so the function stays exact.
2. **linear → linear** (gated MLP): ``down(silu(gate(x)) · up(x))`` is linear in ``up``'s output,
   so ``up`` rows (and bias) ``← /s`` and ``down`` columns ``← ·s``. Found from channel coupling
   plus a check that the path from producer to consumer is linear in the producer.
3. **V → O** (multi-head attention): attention is linear in V per channel, so V rows ``← /s``,
   O columns ``← ·s``. With grouped-query attention (GQA: one KV head serves ``rep`` query
   heads, O column ``(g, j)`` reads V channel ``(g // rep, j)``) ``s`` is tied across the query
   heads of a group: ``max|X|`` and ``max|W|`` are taken over the ``rep`` columns that read one V
   channel, one ``s`` per KV channel divides V's row and multiplies all ``rep`` O columns.

A group is skipped with a note when it touches a shared (tied) tensor, when its norm has no
affine weight, when it matches ``exclude``, or when calibration saw nothing for it.

**α.** A number applies to every group; ``alpha=auto`` searches α ∈ {0.1, 0.2, …, 0.9} per
group on sampled calibration rows, minimizing the relative error of the quantized product
``‖Q_a(X/s) Q_w(W s)ᵀ − X Wᵀ‖² / ‖X Wᵀ‖²`` summed over the group's linears, with ``Q_w``
per-channel symmetric int8 and ``Q_a`` per-tensor asymmetric uint8 (``search=static``) or
per-token symmetric int8 (``search=dynamic``). With u8 activations ``Q_w`` uses the weight range
``insert-qdq{target=...}`` will use (``target``, default ``auto``: ``[−64, 64]`` on CPUs whose u8×s8
GEMM saturates int16 pairs, ``[−127, 127]`` with VNNI/AMX/ARM dot products; see
:mod:`fxopt.backends.isa`). ``overrides="down_proj=0.8|query=0.6"`` sets α for
groups whose consumer path contains a key.

Exact: in float the function is unchanged (the manager checks it); quantization comes later
(``insert-qdq``).

Worked example: ``X = [[1, 100], [2, -50]]``, ``W = [[1, 1]]``, α = 0.5:
``max|X| = (2, 100)``, ``max|W| = (1, 1)`` → ``s = (√2, 10)``; ``X/s = [[0.71, 10], [1.41, −5]]``
(range ratio 14 instead of 100) and ``W·s = [[1.41, 10]]``; ``(X/s)(W s)ᵀ = XWᵀ = [[101], [−48]]``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx

from ..backends import isa
from ..ir.graph import add_constant, get_attr, set_attr
from ..ir.meta import PROVENANCE, SOURCE_PATH, describe, module_path
from ..ir.structure import (LinearInfo, channel_groups, compute_users, norm_groups, scales_linearly,
                            shared_parameters, value_output_pairs)
from .base import NotApplicable, Pass, PassContext, PassResult, register_pass
from . import _fakequant as fq
from .calibration import check_batches, observe

ALPHA_GRID = [round(0.1 * i, 1) for i in range(1, 10)]


@dataclass
class SmoothGroup:
    kind: str                                  # "norm" | "linear" | "v-o"
    source: str                                # module path of what s is folded into
    x_node: torch.fx.Node                      # the value X whose channels are smoothed
    consumers: list[LinearInfo]
    fold: list[tuple[str, int]]                # tensors divided by s along dim
    compensate: list[tuple[torch.fx.Node, torch.fx.Node]] = field(default_factory=list)  # (user, via)
    skip: str | None = None
    tie: tuple[int, int, int] | None = None    # (kv_heads, rep, head_dim): GQA V→O, one s per KV channel

    def tied(self, v: torch.Tensor) -> torch.Tensor:
        """Per-channel statistic of X reduced over the query heads sharing a KV head, expanded back."""
        if self.tie is None:
            return v
        kv, rep, d = self.tie
        return v.reshape(kv, rep, d).amax(1, keepdim=True).expand(kv, rep, d).reshape(-1)

    def fold_scale(self, s: torch.Tensor) -> torch.Tensor:
        """``s`` as the folded tensors see it: per KV channel under GQA."""
        if self.tie is None:
            return s
        kv, rep, d = self.tie
        return s.reshape(kv, rep, d)[:, 0].reshape(-1)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.source}"


@register_pass
@dataclass
class SmoothQuant(Pass):
    name: ClassVar[str] = "smoothquant"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "fold SmoothQuant scales into norms and preceding linears (Xiao & Lin 2022)"
    alpha: float | str = 0.5
    search: str = "static"
    overrides: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    linear_pairs: bool = True
    value_output: bool = True
    sample_rows: int = 256
    target: str = "auto"

    def __post_init__(self):
        if isinstance(self.alpha, str) and self.alpha != "auto":
            raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        if not isinstance(self.alpha, str) and not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.search not in ("static", "dynamic"):
            raise ValueError("search must be 'static' or 'dynamic'")
        if self.target != "auto":
            isa.normalize(self.target)                 # a clear error for a bad name
        for o in self.overrides:
            if "=" not in o:
                raise ValueError(f"override {o!r} must look like key=alpha (e.g. down_proj=0.8)")

    # ------------------------------------------------------------------ groups

    def groups(self, gm: torch.fx.GraphModule) -> list[SmoothGroup]:
        shared = {t for sp in shared_parameters(gm) for t in sp.targets}
        out: list[SmoothGroup] = []
        for g in norm_groups(gm):
            if not g.linears:
                continue
            grp = SmoothGroup("norm", g.norm.path, g.norm.node, g.linears,
                              [(t, 0) for t in (g.norm.weight, g.norm.bias) if t])
            if g.norm.weight is None:
                grp.skip = "the norm has no affine weight to fold into"
            # every non-linear consumer (and linears reading X as a weight) is compensated by X·s
            grp.compensate = [(u, via) for u, via in compute_users(g.norm.node)
                              if not any(u is li.node and u.args[0] is via for li in g.linears)]
            out.append(grp)
        if self.linear_pairs:
            for cg in channel_groups(gm):
                if not cg.permutable:
                    continue
                for prod in cg.producers:
                    if scales_linearly(prod.node, cg.consumers):
                        xs = {c.node.args[0] for c in cg.consumers}
                        if len(xs) != 1:
                            continue
                        fold = [(prod.weight, 0)] + ([(prod.bias, 0)] if prod.bias else [])
                        out.append(SmoothGroup("linear", prod.path, next(iter(xs)), cg.consumers, fold))
        self._vo_skipped: list[str] = []
        if self.value_output:
            pairs, self._vo_skipped = value_output_pairs(gm)
            for p in pairs:
                fold = [(p.value.weight, 0)] + ([(p.value.bias, 0)] if p.value.bias else [])
                tie = (p.heads, p.rep, p.value.out_features // p.heads) if p.rep > 1 else None
                out.append(SmoothGroup("v-o", p.value.path, p.output.node.args[0], [p.output], fold, tie=tie))
        for grp in out:
            if grp.skip:
                continue
            touched = [t for t, _ in grp.fold] + [c.weight for c in grp.consumers]
            tied = [t for t in touched if t in shared]
            if tied:
                grp.skip = f"{tied[0]} is shared with another use (tied weights are never rescaled)"
            elif self.exclude and any(fnmatch.fnmatch(c.path, pat) or pat in c.path
                                      for c in grp.consumers for pat in self.exclude):
                grp.skip = "excluded by pattern"
        return out

    # ------------------------------------------------------------------ pass

    def requires(self, gm, ctx: PassContext) -> None:
        if not self.groups(gm):
            raise NotApplicable("no norm→linear, linear→linear or V→O group to smooth in this graph")
        check_batches(ctx.calibration, "smoothquant")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        groups = self.groups(gm)
        active = [g for g in groups if not g.skip]
        need_rows = self.alpha == "auto"
        calib_report: dict = {}
        stats = observe(gm, ctx.calibration, list(dict.fromkeys(g.x_node for g in active)),
                        sample_rows=self.sample_rows if need_rows else 0, desc="smoothquant calibration",
                        layerwise=ctx.calibration_mode == "layerwise", report=calib_report)
        from ..ir.structure import weight_coverage
        notes, per_group, applied, smoothed = [], {}, 0, []
        for g in groups:
            if g.skip:
                notes.append(f"skipped {g.name}: {g.skip}")
                continue
            st = stats.get(g.x_node)
            if st is None or st.absmax_per_channel is None:
                notes.append(f"skipped {g.name}: calibration saw no value for {describe(g.x_node)}")
                continue
            xmax = g.tied(st.absmax_per_channel.to(torch.float32))
            wmax = g.tied(torch.stack([get_attr(gm, c.weight).detach().abs().amax(0).to(torch.float32)
                                       for c in g.consumers]).amax(0))
            if xmax.shape != wmax.shape:
                notes.append(f"skipped {g.name}: {xmax.numel()} activation channels vs {wmax.numel()} weight columns")
                continue
            alpha, err = self._alpha(g, xmax, wmax, st.extra.get("rows"), gm, st)
            s = smoothing_scale(xmax, wmax, alpha)
            smoothed += [c.weight for c in g.consumers]
            self._apply(gm, g, s)
            applied += 1
            ratio_before = float(xmax.max() / xmax.median().clamp_min(1e-8))
            xs = xmax / s
            ratio_after = float(xs.max() / xs.median().clamp_min(1e-8))
            per_group[g.name] = {"alpha": alpha, "s_max": round(float(s.max()), 4),
                                 "outlier_ratio": [round(ratio_before, 1), round(ratio_after, 1)]}
            if err is not None:
                per_group[g.name]["search_error"] = err
        notes += [f"V→O not smoothed: {r}" for r in self._vo_skipped]
        if not applied:
            notes.append("no group was smoothed")
        cov = weight_coverage(gm, smoothed)
        notes.insert(0, f"smoothed the inputs of {cov[0]} of {cov[1]} eligible weights ({100 * cov[2]:.0f} % of their bytes)")
        return PassResult(gm, applied > 0, stats={"groups": per_group, "smoothed": applied, "calibration": calib_report,
                                                  "skipped": len(groups) - applied, "weights_touched": cov[0],
                                                  "weights_eligible": cov[1], "weight_share": round(cov[2], 4)},
                          notes=notes)

    # ------------------------------------------------------------------ α

    def _override(self, g: SmoothGroup) -> float | None:
        for o in self.overrides:
            key, val = o.split("=", 1)
            if any(key in c.path for c in g.consumers) or key in g.source:
                return float(val)
        return None

    def _alpha(self, g, xmax, wmax, rows, gm, st=None) -> tuple[float, dict | None]:
        """α from an override, the fixed value, or the grid search.

        The search simulates what ``insert-qdq`` will do: with ``search=static`` the activation
        gets *one static range*, the calibrated per-channel extremes divided by ``s`` — the
        range every token must share, attention-sink tokens included, even when the sampled rows
        hold none of them — and the error is the mean over sampled tokens of the relative
        output error (so a token with huge activations cannot hide that the others lost their
        precision). With ``search=dynamic`` each sampled token gets its own scale and the error is
        the total squared error relative to the output energy."""
        ov = self._override(g)
        if ov is not None:
            return ov, None
        if self.alpha != "auto":
            return float(self.alpha), None
        if rows is None or rows.numel() == 0:
            return 0.5, None
        weights = [get_attr(gm, c.weight).detach().to(torch.float32) for c in g.consumers]
        ref = [rows @ w.t() for w in weights]
        norm = sum(float((r * r).sum()) for r in ref) or 1.0
        static = self.search == "static" and st is not None and st.min is not None
        # the weights insert-qdq will make: 7-bit where the target's u8×s8 GEMM saturates int16 pairs
        # (u8 activations: static, dynamic per tensor), full int8 for per-token s8 activations
        qmax = isa.FULL_QMAX if self.search == "dynamic" else isa.weight_qmax(self.target)
        best, best_err, errs = 0.5, float("inf"), {}
        for a in ALPHA_GRID:
            s = smoothing_scale(xmax, wmax, a)
            if self.search == "dynamic":
                xq = fq.act_per_token(rows / s)
            elif static:
                lo = float((st.min.to(torch.float32) / s).min())
                hi = float((st.max.to(torch.float32) / s).max())
                xq = fq.act_affine(rows / s, *fq.static_qparams(lo, hi, False))
            else:
                xq = fq.act_dynamic_tensor(rows / s)
            if static:
                e = sum(fq.relative_error(xq @ fq.weight_per_channel(w * s, qmax).t(), r) for w, r in zip(weights, ref))
            else:
                e = sum(float(((xq @ fq.weight_per_channel(w * s, qmax).t() - r) ** 2).sum()) for w, r in zip(weights, ref))
                e /= norm
            errs[a] = e
            if errs[a] < best_err:
                best, best_err = a, errs[a]
        base = errs.get(0.5)
        return best, {"best": round(best_err, 6), "at_0.5": round(base, 6) if base is not None else None}

    # ------------------------------------------------------------------ rewrite

    def _apply(self, gm: torch.fx.GraphModule, g: SmoothGroup, s: torch.Tensor) -> None:
        # rescaled in (at least) float32 and rounded once to the tensor's dtype: in a bf16/fp16 model
        # s is never rounded to the low-precision dtype first
        sf = g.fold_scale(s)
        for target, dim in g.fold:
            t = get_attr(gm, target)
            shape = [1] * t.dim()
            shape[dim] = -1
            wide = torch.promote_types(t.dtype, torch.float32)
            set_attr(gm, target, (t.detach().to(wide) / sf.to(wide).reshape(shape)).to(t.dtype).contiguous())
        for c in g.consumers:
            w = get_attr(gm, c.weight)
            wide = torch.promote_types(w.dtype, torch.float32)
            set_attr(gm, c.weight, (w.detach().to(wide) * s.to(wide)).to(w.dtype).contiguous())
        for user, via in g.compensate:
            val = via.meta.get("val")             # X·s in X's dtype: a float32 s would promote a bf16 X
            dtype = val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32
            const = add_constant(gm, f"_smooth.{user.name}", s.to(dtype, copy=True), before=user)
            with gm.graph.inserting_before(user):
                mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (via, const))
            mul.meta["val"] = via.meta.get("val")
            PROVENANCE.set(mul, self.name)
            SOURCE_PATH.set(mul, module_path(user) or g.source)
            user.replace_input_with(via, mul)


def smoothing_scale(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^α / max|W|^(1−α)``, 1 where a channel never fired, clamped away from 0."""
    x = xmax.clamp_min(1e-5)
    w = wmax.clamp_min(1e-5)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(xmax > 0, s, torch.ones_like(s))
    return s.clamp(min=1e-5, max=1e5)
