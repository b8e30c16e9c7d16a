"""``permute-channels`` — channel permutations that let an N:M mask keep more (Pool & Yu, NeurIPS 2021).

Pool & Yu, *Channel Permutations for N:M Sparsity* (NeurIPS 2021). An N:M mask of a consumer
``W [out, C]`` keeps, in each row, the ``n`` largest ``|w|`` of every ``m`` consecutive columns.
Which columns share a group is an accident of the channel order; reordering the ``C`` input
channels — and the producers' output channels with them — is free (the graph computes the same
function) and can put large weights in different groups.

The math, for one coupled group (:func:`fxopt.ir.coupling.coupled_groups`) of ``C`` channels:

1. Stack the consumers' weight columns row-wise: ``X = [|W₁|; |W₂|; …]`` of shape ``[Σ out, C]``
   (column ``c`` of ``X`` holds every weight an N:M mask of a consumer sees for channel ``c``; with
   grouped-query attention the O blocks of all query heads that share a V head are stacked too).
2. Choose ``π`` maximizing ``kept(X[:, π]) = Σ_rows Σ_groups top-n |x|`` with
   :func:`fxopt.passes._permutation_search.search_permutation` (greedy channel swaps between
   groups, stripe blocks, escapes), never below the identity. The unstructured bound
   ``Σ_rows top-(C·n/m) |x|`` is what any permutation could at best reach; the report gives the
   share of the gap ``(after − before) / (bound − before)`` that ``π`` closes.
3. Apply ``π`` to every member: producers' weight rows and biases, per-channel parameters on the
   way (:class:`~fxopt.ir.structure.ChannelGroup` ``params``), consumers' weight columns
   (:func:`fxopt.ir.coupling.apply_permutation`, new tensors through ``set_attr``: the caller's
   tensors are never written).

Objective (``score``): ``magnitude`` (default) is Pool & Yu's ``Σ_kept |w|`` above. ``wanda`` scales
every consumer column by the RMS of its input channel over the calibration data and maximizes
``Σ_kept (|w_ij|·‖x_j‖)²`` — the diagonal (Optimal-Brain-Surgeon) approximation of the consumers'
output error under a Wanda mask (:mod:`fxopt.passes._saliency`), which is what the mask actually
costs when a few channels carry huge activations (LLMs' attention-sink token). Use it with
``nm-sparsity{score=wanda}``, which then keeps exactly the entries the search counted as kept.
A permutation moves a channel's activations with it, so the RMS vector of the permuted graph is
the old one permuted: the two passes agree without sharing state.

Rewrite rules, by group kind:

1. **ffn** (``fc1 → act → fc2``, ``silu(gate)·up → down``): any permutation of the hidden channels.
2. **value-output**: ``π`` is block-diagonal, one search per KV head on that head's ``d`` columns
   (``d`` must be a multiple of ``m``, so that N:M groups never straddle heads — which also makes
   whole-head moves useless for the mask, so none are made).
3. **query-key**: left as they are, with a note: Q and K rows have no N:M consumer whose columns
   move, so no permutation changes what a linear N:M mask keeps (the coupling analysis supports
   them; :mod:`fxopt.ir.coupling`).
4. **experts** (MoE blocks found by :func:`fxopt.ir.moe.find_moe_blocks`, experts stacked as
   ``w_in [E, F', D]``, ``w_out [E, D, F]``): each expert's ``F`` hidden channels, independently —
   expert ``e``'s gate and up rows (``F' = 2F``: gate rows first) or its ``F`` rows of ``w_in``,
   and its columns of ``w_out``; ``act(gate)·up`` is per channel, so this is exact. The objective
   is ``Σ|w|`` of each expert's ``w_out`` columns (``score=wanda`` has no per-expert input
   statistics: experts are searched by magnitude, with a note). Results are in
   ``stats["expert_groups"]``; ``stats["groups"]`` holds the coupled groups of rules 1–2.
5. Refused groups (residual streams, graph outputs, ops not modelled, tied weights, ``C`` or ``d``
   not a multiple of ``m``) are left alone, each with a note naming it and the reason; so are
   stacked expert weights whose MoE block is not recognized.

Stats ``weights_touched`` / ``weights_eligible`` / ``weight_share`` count the linear and expert
weights that a permutation moved, of all that a weight pass could rewrite
(:func:`fxopt.ir.structure.weight_coverage`; query-key rows, residual-stream producers and the LM
head are never moved, so the share stays below 1).

Exact (``exact = True``): the manager checks the outputs are unchanged. Must run before
``nm-sparsity``: permuting columns of an already masked weight would break its N:M pattern, so
``requires`` refuses a graph that carries N:M masks. Each permuted linear gets
:data:`fxopt.ir.meta.PERMUTATION`; a group whose linears already carry one is left as is (a second
run is a fixed point).
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ir.coupling import CoupledGroup, apply_permutation, coupled_groups
from ..ir.graph import get_attr, set_attr
from ..ir.meta import NM_MASK, PERMUTATION, PermutationRecord, describe
from ..ir.moe import MoEMatch, find_moe_blocks
from ..ir.structure import expert_weights, shared_parameters, weight_coverage
from ._permutation_search import kept_magnitude, search_permutation, unstructured_bound
from ._saliency import check_score, input_rms
from .base import NotApplicable, Pass, PassContext, PassResult, PreconditionError, register_pass
from .calibration import check_batches

MAX_M = 16

OBJECTIVE = {"magnitude": "Σ|w|", "wanda": "Σ(|w|·rms(x))²"}

QK_NOTE = ("query-key groups left as they are ({count}): Q and K rows have no N:M consumer whose columns "
           "move, so a permutation would keep the same magnitude")


@dataclass
class _Search:
    perm: torch.Tensor
    before: float
    after: float
    bound: float
    total: float
    seconds: float


@register_pass
@dataclass
class PermuteChannels(Pass):
    name: ClassVar[str] = "permute-channels"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = ("permute coupled channels (FFN, V↔O per head) so an N:M mask keeps more "
                              "magnitude (Pool & Yu 2021); exact")
    n: int = 2
    m: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    time_budget: float | None = 1.0    # seconds of search per group; none: no clock (deterministic, slower)
    seed: int = 0
    escapes: int | None = None         # escape attempts per search block (None: the search's default)
    score: str = "magnitude"           # or "wanda": activation-aware objective (needs calibration)

    def __post_init__(self):
        check_score(self.name, self.score)
        n, m = self.n, self.m
        if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
            raise ValueError(f"permute-channels: n and m must be integers; got n={n!r}, m={m!r}")
        if not 2 <= m <= MAX_M or not 0 < n < m:
            raise ValueError(f"permute-channels: need 2 ≤ m ≤ {MAX_M} and 0 < n < m; got n={n}, m={m}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"permute-channels: time_budget must be > 0 seconds; got {self.time_budget!r}")
        if self.escapes is not None and self.escapes < 0:
            raise ValueError(f"permute-channels: escapes must be ≥ 0 or none; got {self.escapes!r}")
        for opt in ("include", "exclude"):
            v = getattr(self, opt)
            if isinstance(v, str):
                setattr(self, opt, (v,) if v else ())
            elif not all(isinstance(p, str) for p in v):
                raise ValueError(f"permute-channels: {opt} must be a tuple of module-path patterns")
            else:
                setattr(self, opt, tuple(v))

    # ------------------------------------------------------------------ contract

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        masked = [n for n in gm.graph.nodes if NM_MASK.has(n)]
        if masked or any(t.split("{", 1)[0] == "nm-sparsity" for t in ctx.applied):
            where = f" ({describe(masked[0])} carries an N:M mask)" if masked else ""
            raise PreconditionError(
                f"{self.name}: the graph is already N:M masked{where}; permuting channels now would break the "
                "masks' pattern. Run permute-channels before nm-sparsity: "
                f"'permute-channels{{n={self.n},m={self.m}}},nm-sparsity{{n={self.n},m={self.m}}}'")
        if not any(g.kind != "query-key" and g.consumers for g in coupled_groups(gm)) and not expert_weights(gm)[0]:
            raise NotApplicable("no producer → consumer channel group (FFN, or V → O in an attention) and no MoE "
                                "experts in the graph")
        if self.score == "wanda":
            check_batches(ctx.calibration, f"{self.name}{{score=wanda}}")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        notes: list[str] = []
        report: dict[str, dict] = {}
        kept_b = kept_a = bound_t = total_t = 0.0
        qk = permuted = skipped = 0
        changed = False
        moved: set[str] = set()
        groups = list(coupled_groups(gm))
        why = {id(g): self._refusal(gm, g) for g in groups if g.kind != "query-key"}
        rms: dict[str, torch.Tensor] = {}
        if self.score == "wanda":
            consumers = list({li.weight: li for g in groups if g.kind != "query-key" and not why[id(g)]
                              for li in g.consumers}.values())
            rms = input_rms(gm, ctx, consumers, f"{self.name}{{score=wanda}}", notes) if consumers else {}
        for gid, grp in enumerate(groups):
            label = (f"output channels of {grp.name}" if grp.kind == "ffn" else f"{grp.kind} group of {grp.name}")
            if grp.kind == "query-key":
                qk += 1
                continue
            refused = self._refusal(gm, grp)          # again: an earlier group of this run may have moved a member
            if refused:
                notes.append(f"{label}: not permuted: {refused}")
                skipped += 1
                continue
            s = self._search(gm, grp, rms)
            kept_b += s.before
            kept_a += s.after
            bound_t += s.bound
            total_t += s.total
            key = grp.name if grp.name not in report else f"{grp.name}#{gid}"
            report[key] = {
                "kind": grp.kind, "channels": grp.channels,
                "kept_before": _frac(s.before, s.total), "kept_after": _frac(s.after, s.total),
                "bound": _frac(s.bound, s.total), "gap_closed": _gap(s.before, s.after, s.bound),
                "seconds": round(s.seconds, 3),
            }
            if torch.equal(s.perm, torch.arange(grp.channels)):
                continue
            apply_permutation(gm, grp, s.perm)
            members = [f"{mb.target}[dim {mb.dim}]" for mb in grp.members]
            for li in grp.producers + grp.consumers:
                PERMUTATION.set(li.node, PermutationRecord(gid, s.perm.clone(), members))
                moved.add(li.weight)
            permuted += 1
            changed = True
        if qk:
            notes.append(QK_NOTE.format(count=qk))
        experts, expert_notes = self._permute_experts(gm, ctx, moved)
        changed = changed or any(e["permuted"] for e in experts.values())
        cov = weight_coverage(gm, moved)
        if report:
            notes.insert(0, f"permuted {permuted} of {len(report)} searched groups: {self.n}:{self.m} keeps "
                            f"{_frac(kept_b, total_t):.4f} → {_frac(kept_a, total_t):.4f} of their consumers' "
                            f"{OBJECTIVE[self.score]}, "
                            f"{100 * _gap(kept_b, kept_a, bound_t):.1f} % of the gap to the unstructured bound "
                            f"({_frac(bound_t, total_t):.4f}) closed")
        at = 1 if report else 0                       # after the summary of the coupled groups
        notes[at:at] = [f"moved {cov.n_touched} of {cov.n_eligible} eligible weights "
                        f"({100 * cov.share:.1f} % of their bytes)"] + expert_notes
        stats = {
            "pattern": f"{self.n}:{self.m}",
            "score": self.score,
            "objective": OBJECTIVE[self.score],
            "searched": len(report),
            "permuted": permuted,
            "skipped": skipped,
            "query_key_left": qk,
            "groups": report,
            "kept_magnitude_before": _frac(kept_b, total_t),
            "kept_magnitude_after": _frac(kept_a, total_t),
            "gap_closed": _gap(kept_b, kept_a, bound_t),
            "experts_permuted": sum(1 for e in experts.values() if e["permuted"]),
            "expert_groups": experts,
            "weights_touched": cov.n_touched,
            "weights_eligible": cov.n_eligible,
            "weight_share": cov.share,
        }
        return PassResult(gm, changed, stats=stats, notes=notes)

    # ------------------------------------------------------------------ experts (rule 4)

    def _permute_experts(self, gm: torch.fx.GraphModule, ctx: PassContext, moved: set[str]
                         ) -> tuple[dict[str, dict], list[str]]:
        """Search and apply one permutation per expert of every recognized MoE block; adds the
        weights it moved to ``moved``; returns ``stats["expert_groups"]`` and notes."""
        stacked = expert_weights(gm)[0]
        if not stacked:
            return {}, []
        matches, notes = find_moe_blocks(gm, ctx.example_inputs)
        notes = [f"experts not permuted: {n}" for n in notes]
        covered = {t for m in matches for t in (m.block.w_in, m.block.w_out)}
        left = [ew.path for ew in stacked if ew.weight not in covered]
        if left:
            notes.append(f"{len(left)} stacked expert weight(s) not permuted, their MoE block was not recognized: "
                         + ", ".join(left[:4]) + (" ..." if len(left) > 4 else ""))
        if matches and self.score == "wanda":
            notes.append("experts searched by magnitude: wanda needs each expert's input statistics, which "
                         "calibration does not collect")
        shared = {t for sp in shared_parameters(gm) for t in sp.targets}
        report: dict[str, dict] = {}
        for gid, m in enumerate(matches):
            b = m.block
            refused = self._expert_refusal(gm, m, shared)
            if refused:
                notes.append(f"experts of {b.name}: not permuted: {refused}")
                continue
            t0 = time.perf_counter()
            w_in, w_out = get_attr(gm, b.w_in).detach(), get_attr(gm, b.w_out).detach()
            x = w_out.abs().to(torch.float32)                        # [E, D, F]: each expert's consumer columns
            budget = self.time_budget / b.num_experts if self.time_budget is not None else None
            perms, before, after, bound, total = [], 0.0, 0.0, 0.0, float(x.double().sum())
            for e in range(x.shape[0]):
                p = self._search_block(x[e], budget, self.seed + e)
                kb, ka = kept_magnitude(x[e], self.n, self.m), kept_magnitude(x[e][:, p], self.n, self.m)
                if ka <= kb:
                    p, ka = torch.arange(b.d_ff), kb
                perms.append(p)
                before, after, bound = before + kb, after + ka, bound + unstructured_bound(x[e], self.n, self.m)
            perm = torch.stack(perms)                                # [E, F]
            changed = not torch.equal(perm, torch.arange(b.d_ff).expand_as(perm))
            report[b.name] = {"kind": "experts", "experts": int(x.shape[0]), "channels": b.d_ff,
                              "kept_before": _frac(before, total), "kept_after": _frac(after, total),
                              "bound": _frac(bound, total), "gap_closed": _gap(before, after, bound),
                              "seconds": round(time.perf_counter() - t0, 3), "permuted": changed}
            if not changed:
                continue
            rows = torch.cat([perm, perm + b.d_ff], dim=1) if b.gated else perm        # gate rows, then up rows
            set_attr(gm, b.w_in, torch.stack([w_in[e].index_select(0, rows[e]) for e in range(len(perm))]))
            set_attr(gm, b.w_out, torch.stack([w_out[e].index_select(1, perm[e]) for e in range(len(perm))]))
            record = PermutationRecord(1000 + gid, perm.clone(), [f"{b.w_in}[dim 1]", f"{b.w_out}[dim 2]"])
            for n in gm.graph.nodes:
                if n.op == "get_attr" and n.target in (b.w_in, b.w_out):
                    PERMUTATION.set(n, record)
            moved.update((b.w_in, b.w_out))
        return report, notes

    def _expert_refusal(self, gm: torch.fx.GraphModule, m: MoEMatch, shared: set[str]) -> str | None:
        b = m.block
        if self.include and not any(_match(b.name, pat) for pat in self.include):
            return f"not matched by include={'|'.join(self.include)}"
        if any(_match(b.name, pat) for pat in self.exclude):
            return f"{b.name} is excluded by pattern"
        if m.op_node is not None and b.experts:
            return "experts were pruned (the op reads a subset): permute before moe-prune-experts"
        for t in (b.w_in, b.w_out):
            if t in shared:
                return f"{t} is shared with another use"
            if not get_attr(gm, t).is_floating_point():
                return f"{t} is {get_attr(gm, t).dtype}, not float"
        if b.d_ff % self.m:
            return f"expert hidden size {b.d_ff} is not a multiple of m={self.m}"
        if b.d_ff // self.m < 2:
            return f"{b.d_ff} channels per expert make a single group of {self.m}: nothing to reorder"
        if any(PERMUTATION.has(n) for n in gm.graph.nodes if n.op == "get_attr" and n.target in (b.w_in, b.w_out)):
            return "already permuted by an earlier permute-channels"
        return None

    def _search_block(self, x: torch.Tensor, budget: float | None, seed: int) -> torch.Tensor:
        kw = dict(time_budget=budget, seed=seed)
        if self.escapes is not None:
            kw["escapes"] = self.escapes
        p, info = search_permutation(x, self.n, self.m, **kw)
        if info["rounds"] == 0:
            kw.update(time_budget=None, rounds=1)           # the budget ran out before the first round
            p, info = search_permutation(x, self.n, self.m, **kw)
        return p

    # ------------------------------------------------------------------ helpers

    def _refusal(self, gm: torch.fx.GraphModule, grp: CoupledGroup) -> str | None:
        paths = grp.paths()
        if self.include and not any(_match(p, pat) for p in paths for pat in self.include):
            return f"not matched by include={'|'.join(self.include)}"
        hit = [p for p in paths for pat in self.exclude if _match(p, pat)]
        if hit:
            return f"{hit[0]} is excluded by pattern"
        if grp.reasons:
            more = f" (and {len(grp.reasons) - 1} more)" if len(grp.reasons) > 1 else ""
            return grp.reasons[0] + more
        if not grp.consumers:
            return "no linear reads these channels"
        if grp.head_dim % self.m:
            unit = "head dim" if grp.kind == "value-output" else "channel count"
            return f"{unit} {grp.head_dim} is not a multiple of m={self.m}"
        if grp.head_dim // self.m < 2:
            return f"{grp.head_dim} channels per block make a single group of {self.m}: nothing to reorder"
        if any(PERMUTATION.has(li.node) for li in grp.producers + grp.consumers):
            return "already permuted by an earlier permute-channels"
        return None

    def _search(self, gm: torch.fx.GraphModule, grp: CoupledGroup, rms: dict[str, torch.Tensor]) -> _Search:
        t0 = time.perf_counter()
        x = grp.consumer_matrix(gm, rms)
        if self.score == "wanda":
            x = x * x                                  # Σ_kept (|w|·rms)²: the diagonal output error
        d, heads = grp.head_dim, grp.heads
        budget = self.time_budget / heads if self.time_budget is not None else None
        parts = [h * d + self._search_block(x[:, h * d:(h + 1) * d], budget, self.seed + h) for h in range(heads)]
        perm = torch.cat(parts)
        before = kept_magnitude(x, self.n, self.m)
        after = kept_magnitude(x[:, perm], self.n, self.m)
        if after <= before:
            perm, after = torch.arange(grp.channels), before
        return _Search(perm, before, after, _block_bound(x, d, self.n, self.m), float(x.double().sum()),
                       time.perf_counter() - t0)


def _block_bound(x: torch.Tensor, d: int, n: int, m: int) -> float:
    """The unstructured n/m bound of each block of d columns (what any block-diagonal order could keep)."""
    return sum(unstructured_bound(x[:, j:j + d], n, m) for j in range(0, x.shape[1], d))


def _frac(a: float, total: float) -> float:
    return round(a / total, 6) if total > 0 else 1.0


def _gap(before: float, after: float, bound: float) -> float:
    return round((after - before) / (bound - before), 4) if bound > before else 0.0


def _match(path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(path, pattern) or pattern in path
