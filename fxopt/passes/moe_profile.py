"""``moe-profile`` — how many tokens each expert of each MoE block receives on the calibration data.

For every block found by :func:`fxopt.ir.moe.find_moe_blocks` the graph runs on each
calibration batch (a :class:`torch.fx.Interpreter` that keeps only the router logits it
watches), the block's routing is recomputed from the logits exactly as the block computes it
(``softmax → top-k``, over the kept experts after pruning) and the assignments are counted:

    loads[b, e] = #{(t, j) : i_{t,j} = e}  in batch b,      share[b, e] = loads[b, e] / (T_b · k)

The result, a :class:`fxopt.ir.meta.RoutingProfile` per block (per-batch loads, so the mean
share, its spread across batches and the peak share all follow), is stored in the block's
:class:`~fxopt.ir.meta.MoEBlock` (``profile``) on its output node. Loads are measured on the
dropless graph: what the router asks for, before any capacity.

The pass changes nothing in the graph (``modified`` is false); ``moe-recompile`` and
``moe-prune-experts`` profile by themselves when no profile is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Iterable

import torch
import torch.fx

from ..ir import moeops
from ..ir.graph import ExampleInputs
from ..ir.meta import MOE, RoutingProfile
from ..ir.moe import MoEMatch, find_moe_blocks
from .base import NotApplicable, Pass, PassContext, PassResult, register_pass
from .calibration import check_batches, flat_inputs


class _Watch(torch.fx.Interpreter):
    def __init__(self, gm, watch: set[torch.fx.Node]):
        super().__init__(gm, garbage_collect_values=True)
        self.watch, self.seen = watch, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            self.seen[n] = out.detach()
        return out


def profile_routing(gm: torch.fx.GraphModule, batches: Iterable[ExampleInputs], matches: list[MoEMatch], *,
                    progress: bool | None = None, store: bool = True) -> dict[str, RoutingProfile]:
    """Per-block routing profile of ``gm`` on ``batches`` (module docstring)."""
    from tqdm.auto import tqdm

    batches = list(batches)
    watch = {m.logits for m in matches}
    loads: dict[str, list[torch.Tensor]] = {m.block.name: [] for m in matches}
    tokens: dict[str, list[int]] = {m.block.name: [] for m in matches}
    interp = _Watch(gm, watch)
    show = progress if progress is not None else len(batches) > 4
    with torch.no_grad():
        for b in tqdm(batches, desc="routing profile", disable=not show, leave=False):
            interp.seen = {}
            interp.run(*flat_inputs(gm, b))
            for m in matches:
                logits = interp.seen[m.logits]
                blk = m.block
                _, ids, _ = moeops.route(logits.reshape(-1, logits.shape[-1]), blk.top_k, blk.norm_topk, blk.experts)
                loads[blk.name].append(torch.bincount(ids.reshape(-1), minlength=blk.active_experts))
                tokens[blk.name].append(int(ids.shape[0]))
    out = {}
    for m in matches:
        prof = RoutingProfile(loads=torch.stack(loads[m.block.name]), tokens=tokens[m.block.name], top_k=m.block.top_k)
        out[m.block.name] = prof
        if store:
            m.block = replace(m.block, profile=prof)
            MOE.set(m.output, m.block)
    return out


def describe_profile(name: str, prof: RoutingProfile) -> str:
    """``model.layers.0.mlp: shares 0.31/0.12/... (spread ±0.02/...), 4 batches``."""
    mean = "/".join(f"{v:.2f}" for v in prof.mean_share.tolist())
    std = "/".join(f"{v:.2f}" for v in prof.std_share.tolist())
    return f"{name}: expert shares {mean} (spread ±{std}) over {len(prof.tokens)} batches"


def ensure_profiles(gm: torch.fx.GraphModule, matches: list[MoEMatch], ctx: PassContext, who: str) -> None:
    """Profile the blocks that have no profile yet, on ``ctx.calibration``."""
    todo = [m for m in matches if m.block.profile is None]
    if todo:
        batches = check_batches(ctx.calibration, who)
        profile_routing(gm, batches, todo)


@register_pass
@dataclass
class MoEProfile(Pass):
    name: ClassVar[str] = "moe-profile"
    summary: ClassVar[str] = "count the tokens each MoE expert receives on the calibration data"

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        matches, notes = find_moe_blocks(gm, ctx.example_inputs)
        if not matches:
            raise NotApplicable("no MoE block in the graph" + (f" ({'; '.join(notes)})" if notes else ""))
        check_batches(ctx.calibration, self.name)
        ctx.state[self.name + ":matches"] = matches

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        matches = ctx.state.pop(self.name + ":matches", None) or find_moe_blocks(gm, ctx.example_inputs)[0]
        profs = profile_routing(gm, ctx.calibration, matches)
        stats = {"blocks": len(profs)}
        for name, p in profs.items():
            stats[f"{name}.max_share"] = round(float(p.max_share.max()), 4)
        return PassResult(gm, False, stats=stats, notes=[describe_profile(n, p) for n, p in profs.items()])
