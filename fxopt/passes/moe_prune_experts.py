"""``moe-prune-experts`` — drop the experts a task's calibration data rarely uses (Task-MoE style).

Kudugunta et al. 2021 (Task-MoE) route by task so that serving one task needs only that task's
experts. With token-level routing the same saving is available where a task's tokens
concentrate on few experts: measure each expert's share of the assignments on calibration data
from the task, and remove the rest.

Rewrite rules (each block found by :func:`fxopt.ir.moe.find_moe_blocks`; its routing profile
from :mod:`fxopt.passes.moe_profile`, measured on ``ctx.calibration`` when not recorded):

1. Expert ``e`` is kept when ``mean share_e ≥ min_share`` (``share_e`` = its part of the
   ``T·k`` assignments over all calibration batches); at least ``top_k`` experts are kept
   (the most used ones) so that top-k stays defined.
2. The block becomes an ``fxopt::moe`` node whose ``experts`` argument lists the kept ids:
   the router's logits of the removed experts are ignored, which is exactly masking them to
   ``−∞`` — ``softmax`` over the kept logits equals the masked softmax, so top-k picks among
   the kept experts with the same probabilities renormalized over them.
3. ``w_in`` / ``w_out`` are replaced by their kept rows (new parameters; the old ones are
   deleted, so the memory is freed and not exported). A capacity plan keeps each kept
   expert's slots: ``c'_e = c_e · E' / E``.

Not exact: a token that picked a removed expert now takes its next choice. The pass reports
the output error on the example inputs (max |Δ| relative to max |y|) and the bytes saved; the
manager's drift columns give the same against the original model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.fx

from ..ir.graph import call, delete_unused_attrs, flatten_tensors, get_attr
from ..ir.meta import MOE
from ..ir.moe import find_moe_blocks, rewrite_to_op
from .base import NotApplicable, Pass, PassContext, PassResult, PreconditionError, register_pass
from .moe_profile import ensure_profiles


@register_pass
@dataclass
class MoEPruneExperts(Pass):
    name: ClassVar[str] = "moe-prune-experts"
    summary: ClassVar[str] = "remove MoE experts whose share of the calibration tokens is below min_share"

    min_share: float = 0.01

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        if not 0 <= self.min_share < 1:
            raise PreconditionError(f"{self.name}: min_share must be in [0, 1), got {self.min_share}")
        matches, notes = find_moe_blocks(gm, ctx.example_inputs)
        if not matches:
            raise NotApplicable("no MoE block in the graph" + (f" ({'; '.join(notes)})" if notes else ""))
        if ctx.calibration is None and any(m.block.profile is None for m in matches):
            raise PreconditionError(f"{self.name} needs calibration data from the task to serve: pass "
                                    "calibration=[batch, ...] to optimize()")
        ctx.state[self.name + ":matches"] = (matches, notes)

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        matches, notes = ctx.state.pop(self.name + ":matches", None) or find_moe_blocks(gm, ctx.example_inputs)
        notes = list(notes)
        ensure_profiles(gm, matches, ctx, self.name)
        before = [t.detach() for t in flatten_tensors(call(gm, ctx.example_inputs))] if ctx.example_inputs else None
        removed = saved = 0
        stats = {}
        for m in matches:
            b = m.block
            share = b.profile.mean_share
            e = b.active_experts
            ids = list(b.experts) if b.experts else list(range(b.num_experts))
            keep = [j for j in range(e) if float(share[j]) >= self.min_share]
            if len(keep) < b.top_k:
                keep = sorted(torch.topk(share, b.top_k).indices.tolist())
                notes.append(f"{b.name}: fewer than top-{b.top_k} experts reach a share of {self.min_share}; "
                             f"kept the {b.top_k} most used")
            if len(keep) == e:
                continue
            w_in, w_out = get_attr(gm, b.w_in), get_attr(gm, b.w_out)
            idx = torch.tensor(keep, dtype=torch.long)
            new_in, new_out = w_in.index_select(0, idx).clone(), w_out.index_select(0, idx).clone()
            cap = [b.capacity[j] * len(keep) / e for j in keep] if b.capacity else []
            bytes_before = w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
            rewrite_to_op(gm, m, capacity=cap, experts=[ids[j] for j in keep], w_in=new_in, w_out=new_out,
                          pass_name=self.name)
            m.block = replace(m.block, profile=None)          # routing over fewer experts: profile again
            MOE.set(m.output, m.block)
            gone = [ids[j] for j in range(e) if j not in keep]
            freed = bytes_before - (new_in.numel() + new_out.numel()) * new_in.element_size()
            removed += len(gone)
            saved += freed
            dropped_share = float(sum(share[j] for j in range(e) if j not in keep))
            notes.append(f"{b.name}: removed experts {gone} ({100 * dropped_share:.2f} % of the calibration "
                         f"assignments), {freed / 2**20:.2f} MiB")
            stats[f"{b.name}.kept"] = len(keep)
        if not removed:
            return PassResult(gm, False, stats={"experts_removed": 0, "bytes_saved": 0},
                              notes=notes + [f"every expert has a share ≥ {self.min_share}: nothing removed"])
        gm.graph.lint()
        gm.recompile()
        deleted, _ = delete_unused_attrs(gm)
        stats.update({"experts_removed": removed, "bytes_saved": saved})
        if before is not None:
            after = flatten_tensors(call(gm, ctx.example_inputs))
            err = max(float((a.double() - r.double()).abs().max()) for a, r in zip(after, before))
            scale = max(float(r.abs().max()) for r in before)
            stats["max_abs_error"] = err
            stats["rel_error"] = err / max(scale, 1e-12)
            notes.append(f"output error on the example inputs: max |Δ| {err:.3g} ({100 * err / max(scale, 1e-12):.2f} % "
                         f"of max |y|); {saved / 2**20:.2f} MiB of expert weights freed")
        return PassResult(gm, True, stats=stats, notes=notes)
