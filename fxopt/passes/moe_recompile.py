"""``moe-recompile`` — MoE blocks as ``fxopt::moe`` ops with a per-expert capacity plan, and the
runtime guard that re-plans and recompiles when the load shifts (DynaMoE, Kossmann et al. 2022).

Rewrite rules (each block found by :func:`fxopt.ir.moe.find_moe_blocks`):

1. The routed part of the block (router logits → softmax/top-k → dispatch → experts →
   weighted combine) becomes one ``fxopt::moe`` node (:mod:`fxopt.ir.moeops`); the router
   linear and a shared expert stay as they are. An existing ``fxopt::moe`` node gets new
   arguments.
2. ``capacity=plan``: expert ``e`` gets the capacity factor
   ``c_e = (1 + slack) · E · (s̄_e + σ·δ_e)`` (rounded up to 0.01, ``σ = sigmas``, 1 by
   default) from the routing profile on the calibration batches
   (:mod:`fxopt.passes.moe_profile`): ``s̄_e`` is the expert's mean share of the ``T·k``
   assignments and ``δ_e`` its spread across batches (at least the binomial ``√n̄_e · √(1 + 1/B) / T·k`` of the next batch, ``B`` batches measured),
   i.e. ``cap_e = (1 + slack) · (mean load + σ standard deviations)`` slots: hot experts get more slots than Switch's uniform capacity,
   cold ones fewer (at least one).
3. ``capacity=uniform``: ``c_e = factor`` for every expert (Switch Transformer, Fedus et al.
   2021: ``C = factor · T·k / E``), the baseline plans are compared with.
4. ``capacity=dropless``: every expert takes every token routed to it (the original block).
5. ``routing=vanilla`` serves assignments in positional order; ``routing=bpr`` serves round j
   of the k-major dispatch by decreasing routing weight of choice j (V-MoE batch-priority
   routing, Riquelme et al. 2021, generalized per round: :func:`fxopt.ir.moeops.route`).

With a capacity that covers every expert's load the rewritten block computes what the
original does (float tolerance: only the order of the sum over the k choices changes). With a
plan, assignments past ``cap_e`` are dropped; the pass reports, on the calibration batches,
the tokens the plan would drop and its padded slots next to uniform capacity 1.25.

At run time :class:`MoERuntime` wraps the GraphModule: it measures each batch's load (the
op's eager kernel records it) and re-plans a block when

* *shift*: one batch drops more than ``max_drop`` of its assignments and some expert's load
  exceeds its capacity by more than ``burst_sigmas`` (3) binomial standard deviations
  ``√cap_e`` — re-planned from that batch; or
* *overflow* / *waste*: over the ``window`` batches since its last plan it dropped more than
  ``max_drop`` of its assignments / padded more than ``max_waste`` of its slots on average —
  re-planned from those batches;

the new plan is rule 2 on those loads (same slack and σ), never below any expert's largest
load among them. It switches to the graph variant of the new plan — built once and cached by
plan, so a steady workload (per-batch noise included) never recompiles, a shifted one
recompiles once, and returning to an earlier workload reuses its variant.
"""
from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
import torch.fx

from ..ir import moeops
from ..ir.graph import ExampleInputs
from ..ir.meta import MOE, MoEBlock, RoutingProfile
from ..ir.moe import MoEMatch, find_moe_blocks, rewrite_to_op
from .base import NotApplicable, Pass, PassContext, PassResult, PreconditionError, register_pass
from .moe_profile import ensure_profiles


def round_up(v: float, step: float = 0.01) -> float:
    return round(math.ceil(v / step - 1e-9) * step, 6)


def plan_from_loads(loads: torch.Tensor, assignments: torch.Tensor, slack: float, sigmas: float = 1.0
                    ) -> list[float]:
    """Capacity factors (rule 2) from measured loads ``[B, E]`` of batches of ``assignments [B]``
    (``T_b·k``): ``c_e = (1 + slack) · E · (s̄_e + σ · δ_e)`` with ``s̄_e`` the expert's mean share,
    ``δ_e`` its spread — the standard deviation of its share across the batches, at least the
    binomial ``√n̄_e · √(1 + 1/B) / (T·k)`` of the next batch's count around a mean of ``n̄_e``
    estimated from ``B`` batches (so that a plan made from one batch still covers the next batch
    of the same workload) — and ``σ = sigmas``."""
    n = loads.to(torch.float64)
    a = assignments.to(torch.float64).unsqueeze(1)
    shares = n / a
    mean = n.sum(0) / a.sum()
    spread = shares.std(0, unbiased=False) if n.shape[0] > 1 else torch.zeros_like(mean)
    # a count of mean n̄ varies by √n̄ from batch to batch, and a mean estimated from B batches is off by
    # √(n̄/B) itself: the spread of the *next* batch around the estimate is √n̄ · √(1 + 1/B)
    binomial = (mean * a.mean()).sqrt() / a.mean() * math.sqrt(1.0 + 1.0 / n.shape[0])
    need = mean + sigmas * torch.maximum(spread, binomial)
    e = n.shape[1]
    return [round_up((1.0 + slack) * e * float(v)) for v in need.tolist()]


def plan_from_profile(prof: RoutingProfile, slack: float, sigmas: float = 1.0) -> list[float]:
    return plan_from_loads(prof.loads, torch.tensor(prof.tokens) * prof.top_k, slack, sigmas)


def simulate(caps: list[int], loads: list[int]) -> tuple[int, int, int]:
    """(dropped, kept, slots) of serving ``loads`` with ``caps``."""
    kept = sum(min(c, n) for c, n in zip(caps, loads))
    return sum(loads) - kept, kept, sum(caps)


def profile_cost(block: MoEBlock, prof: RoutingProfile, factors: list[float]) -> dict[str, float]:
    """Dropped share and padding share of a plan over the profiled batches (each layer's loads
    as measured dropless)."""
    dropped = kept = slots = total = 0
    e = block.active_experts
    for b, t in enumerate(prof.tokens):
        caps = moeops.capacities(t, block.top_k, e, factors)
        loads = prof.loads[b].tolist()
        d, k, s = simulate(caps, loads)
        dropped, kept, slots, total = dropped + d, kept + k, slots + s, total + sum(loads)
    return {"dropped": dropped / max(total, 1), "padding": (slots - kept) / max(slots, 1), "slots": slots,
            "assignments": total}


def fmt_factors(f: list[float]) -> str:
    return "dropless" if not f else "[" + ", ".join(f"{v:g}" for v in f) + "]"


@register_pass
@dataclass
class MoERecompile(Pass):
    name: ClassVar[str] = "moe-recompile"
    run_after: ClassVar[tuple[str, ...]] = ("moe-prune-experts",)
    summary: ClassVar[str] = "MoE blocks → fxopt::moe ops with a per-expert capacity plan (DynaMoE), vanilla or BPR"

    capacity: Literal["plan", "uniform", "dropless"] = "plan"
    slack: float = 0.25
    factor: float = 1.25
    routing: Literal["vanilla", "bpr"] = "vanilla"
    sigmas: float = 1.0

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        if self.slack < 0 or self.factor <= 0 or self.sigmas < 0:
            raise PreconditionError(f"{self.name}: slack and sigmas must be ≥ 0 and factor > 0 (got "
                                    f"slack={self.slack}, sigmas={self.sigmas}, factor={self.factor})")
        matches, notes = find_moe_blocks(gm, ctx.example_inputs)
        if not matches:
            raise NotApplicable("no MoE block in the graph" + (f" ({'; '.join(notes)})" if notes else ""))
        if self.capacity == "plan" and ctx.calibration is None and any(m.block.profile is None for m in matches):
            first = next(m for m in matches if m.block.profile is None)
            raise PreconditionError(
                f"{self.name}{{capacity=plan}} needs a routing profile for block {first.block.name}: pass "
                "calibration=[batch, ...] to optimize() (batches like the workload), or use capacity=uniform")
        ctx.state[self.name + ":matches"] = (matches, notes)

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        matches, notes = ctx.state.pop(self.name + ":matches", None) or find_moe_blocks(gm, ctx.example_inputs)
        notes = list(notes)
        if self.capacity == "plan":
            ensure_profiles(gm, matches, ctx, self.name)
        t_ex = _example_tokens(matches, ctx)
        modified = False
        stats: dict[str, Any] = {"blocks": len(matches)}
        for m in matches:
            b = m.block
            e = b.active_experts
            if self.capacity == "plan":
                factors = plan_from_profile(b.profile, self.slack, self.sigmas)
            elif self.capacity == "uniform":
                factors = [float(self.factor)] * e
            else:
                factors = []
            changed = m.op_node is None or list(b.capacity) != factors or b.routing != self.routing
            rewrite_to_op(gm, m, capacity=factors, routing=self.routing, pass_name=self.name)
            modified |= changed
            line = f"{b.name}: {e} experts, top-{b.top_k}, capacity {fmt_factors(factors)}"
            if t_ex:
                caps = moeops.capacities(t_ex, b.top_k, e, factors) if factors else None
                if caps:
                    uni = sum(moeops.capacities(t_ex, b.top_k, e, [1.25] * e))
                    line += f"; slots at T={t_ex}: {caps} (Σ {sum(caps)}; uniform 1.25: Σ {uni})"
                    stats[f"{b.name}.slots"] = sum(caps)
            if b.profile is not None and factors:
                cost = profile_cost(m.block, b.profile, factors)
                uni = profile_cost(m.block, b.profile, [1.25] * e)
                line += (f"; on the calibration batches: drops {100 * cost['dropped']:.1f} % of assignments, "
                         f"pads {100 * cost['padding']:.1f} % of slots (uniform 1.25: drops "
                         f"{100 * uni['dropped']:.1f} %, {uni['slots']} slots vs {cost['slots']})")
                stats[f"{b.name}.calib_dropped"] = round(cost["dropped"], 4)
                stats[f"{b.name}.calib_padding"] = round(cost["padding"], 4)
            notes.append(line)
        return PassResult(gm, modified, stats=stats, notes=notes)


def _example_tokens(matches: list[MoEMatch], ctx: PassContext) -> int | None:
    v = matches[0].x.meta.get("val") if matches else None
    if isinstance(v, torch.Tensor) and isinstance(v.shape[0], int):
        return int(v.shape[0])
    if ctx.example_inputs is not None:           # dynamic graph: count the example's tokens
        for _, t in ctx.example_inputs.tensors():
            if t.dim() >= 2:
                return int(t.shape[0] * t.shape[1])
    return None


# --------------------------------------------------------------------------- runtime guard


def moe_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is moeops.MOE_OP]


def moe_blocks(gm: torch.fx.GraphModule) -> list[MoEBlock]:
    """The MoE blocks of a rewritten graph (from the ``fxopt::moe`` nodes' meta), graph order."""
    out = []
    for n in moe_nodes(gm):
        b = MOE.get(n)
        if b is None:
            raise ValueError(f"fxopt::moe node {n.name!r} has no MoEBlock meta: run moe-recompile on the graph")
        out.append(b)
    return out


@dataclass
class RecompileEvent:
    batch: int
    block: str
    reason: str                  # "overflow: 3.1 % dropped" | "waste: 61 % padded"
    old: list[float]
    new: list[float]
    cached: bool                 # the variant existed already: no compilation


@dataclass
class BlockTotals:
    assignments: int = 0
    dropped: int = 0
    kept: int = 0
    slots: int = 0
    flops_per_slot: int = 0

    @property
    def padded(self) -> int:
        return self.slots - self.kept


@dataclass
class StreamReport:
    """What a :class:`MoERuntime` served: one row per block plus the totals."""

    batches: int = 0
    tokens: int = 0
    seconds: list[float] = field(default_factory=list)
    compiles: int = 0            # graph variants built (the first one included)
    recompilations: int = 0      # graph variants built after the first: what re-planning cost in compiles
    plan_switches: int = 0       # batches after which the runtime switched variant (recompiled or cache hit)
    cache_hits: int = 0          # plan switches served by a variant built before (no compilation)
    events: list[RecompileEvent] = field(default_factory=list)   # one per block re-planned: a switch
    #                                                              re-plans one or more blocks at once
    blocks: dict[str, BlockTotals] = field(default_factory=dict)
    plans: dict[str, list[float]] = field(default_factory=dict)
    per_batch: list[dict] = field(default_factory=list)   # {tokens, assignments, dropped, slots, kept}, all blocks
    err_sq: float = 0.0          # Σ ‖y − y_ref‖² over the batches run with a reference
    ref_sq: float = 0.0          # Σ ‖y_ref‖²

    @property
    def rel_error(self) -> float | None:
        """‖y − y_ref‖ / ‖y_ref‖ over the stream (``run(..., reference=...)``), else None."""
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else None

    @property
    def block_replans(self) -> int:
        """Blocks re-planned, counted per block (``len(events)``); several blocks re-planned after
        the same batch make one plan switch and at most one recompilation."""
        return len(self.events)

    @property
    def assignments(self) -> int:
        return sum(b.assignments for b in self.blocks.values())

    @property
    def dropped(self) -> int:
        return sum(b.dropped for b in self.blocks.values())

    @property
    def expert_flops(self) -> int:
        """Expert FLOPs executed, padding slots included."""
        return sum(b.slots * b.flops_per_slot for b in self.blocks.values())

    @property
    def useful_flops(self) -> int:
        """Expert FLOPs spent on assignments actually served."""
        return sum(b.kept * b.flops_per_slot for b in self.blocks.values())

    @property
    def padded_flops(self) -> int:
        return self.expert_flops - self.useful_flops

    def summary(self) -> dict[str, float]:
        return {"batches": self.batches, "tokens": self.tokens, "recompilations": self.recompilations,
                "plan_switches": self.plan_switches, "block_replans": self.block_replans,
                "cache_hits": self.cache_hits, "dropped": self.dropped, "assignments": self.assignments,
                "dropped_share": self.dropped / max(self.assignments, 1), "expert_flops": self.expert_flops,
                "useful_flops": self.useful_flops, "padded_flops": self.padded_flops,
                "padded_share": self.padded_flops / max(self.expert_flops, 1),
                "mean_ms": 1e3 * sum(self.seconds) / max(len(self.seconds), 1), "rel_error": self.rel_error}

    def __str__(self) -> str:
        s = self.summary()
        lines = [f"{self.batches} batches, {self.tokens} tokens: {self.dropped}/{self.assignments} assignments dropped "
                 f"({100 * s['dropped_share']:.2f} %), expert GFLOP {self.expert_flops / 1e9:.3f} of which padding "
                 f"{100 * s['padded_share']:.1f} %, {self.recompilations} recompilations (variants built after the "
                 f"first), {self.plan_switches} plan switches ({self.cache_hits} cache hits), {self.block_replans} "
                 f"block re-plans, mean {s['mean_ms']:.2f} ms/batch"]
        w = max([len(n) for n in self.blocks] + [5])
        lines.append(f"{'block'.ljust(w)}  dropped  slots    padded  plan")
        for name, b in self.blocks.items():
            lines.append(f"{name.ljust(w)}  {b.dropped:<7d}  {b.slots:<7d}  {100 * b.padded / max(b.slots, 1):5.1f} %  "
                         f"{fmt_factors(self.plans.get(name, []))}")
        for ev in self.events:
            lines.append(f"batch {ev.batch}: {ev.block} re-planned ({ev.reason}) {fmt_factors(ev.old)} → "
                         f"{fmt_factors(ev.new)}{' (cached variant)' if ev.cached else ' (compiled)'}")
        return "\n".join(lines)


class MoERuntime:
    """Runs a ``moe-recompile``d GraphModule on a stream of batches, re-planning on load shifts.

    Args:
        gm: a GraphModule holding ``fxopt::moe`` nodes (``fxopt.optimize(...).module``).
        slack, sigmas: of the plans made at run time (rule 2).
        max_drop: re-plan a block when, over ``window`` batches since its last plan, it dropped
            more than this share of its assignments on average (*overflow*).
        max_waste: re-plan a block when, over ``window`` batches since its last plan, it padded
            more than this share of its slots on average (*waste*).
        window: batches averaged for the overflow and waste tests.
        burst_sigmas: re-plan at once (*shift*) when one batch drops more than ``max_drop`` and
            some expert's load exceeds its capacity by more than this many ``√cap_e`` (binomial
            standard deviations of a count): a new workload, not noise.
        rerun: run a batch that overflowed again on the new plan (no drops; costs a second run).
        compile_fn: ``compile_fn(GraphModule) -> callable`` applied to each variant (e.g.
            ``torch.compile``, or an ONNX Runtime session builder); default: the GraphModule.

    ``runtime(*args, **kwargs)`` runs one batch; :meth:`run` a stream; :attr:`report` holds the
    totals (:class:`StreamReport`).
    """

    def __init__(self, gm: torch.fx.GraphModule, *, slack: float = 0.25, sigmas: float = 1.0, max_drop: float = 0.01,
                 max_waste: float = 0.5, window: int = 4, burst_sigmas: float = 3.0, rerun: bool = False,
                 compile_fn: Callable[[torch.fx.GraphModule], Callable] | None = None):
        nodes = moe_nodes(gm)
        if not nodes:
            raise ValueError("MoERuntime needs a graph with fxopt::moe nodes: run the moe-recompile pass first")
        self.base = gm
        self.slack, self.sigmas = slack, sigmas
        self.max_drop, self.max_waste, self.window, self.rerun = max_drop, max_waste, window, rerun
        self.burst_sigmas = burst_sigmas
        self.compile_fn = compile_fn
        self.blocks: dict[str, MoEBlock] = {}
        self._node_of: dict[str, str] = {}
        for n in nodes:
            A = moeops.ARG
            b = MOE.get(n) or MoEBlock(name=n.name, router="", w_in="", w_out="", num_experts=0,
                                       top_k=n.args[A["top_k"]], norm_topk=n.args[A["norm_topk"]],
                                       gated=n.args[A["gated"]], activation=n.args[A["activation"]], d_model=0,
                                       d_ff=0, capacity=list(n.args[A["capacity"]]), routing=n.args[A["routing"]])
            self.blocks[b.name] = b
            self._node_of[b.name] = n.name
        self.plan: dict[str, tuple[float, ...]] = {k: tuple(b.capacity) for k, b in self.blocks.items()}
        self.variants: dict[tuple, Callable] = {}
        self.history: dict[str, deque] = {k: deque(maxlen=window) for k in self.blocks}
        self.report = StreamReport(blocks={k: BlockTotals() for k in self.blocks},
                                   plans={k: list(v) for k, v in self.plan.items()})
        self.current = self._variant(self._key(self.plan))

    # ------------------------------------------------------------------ variants

    @staticmethod
    def _key(plan: dict[str, tuple[float, ...]]) -> tuple:
        return tuple(sorted(plan.items()))

    def _variant(self, key: tuple) -> Callable:
        if key in self.variants:
            return self.variants[key]
        plan = dict(key)
        graph = copy.deepcopy(self.base.graph)
        by_name = {n.name: n for n in graph.nodes}
        for name, factors in plan.items():
            node = by_name[self._node_of[name]]
            args = list(node.args)
            args[moeops.ARG["capacity"]] = list(factors)
            args[moeops.ARG["block"]] = name
            node.args = tuple(args)
        gm = torch.fx.GraphModule(self.base, graph)      # shares the parameters
        gm.meta.update(self.base.meta)
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(self.base, attr):
                setattr(gm, attr, getattr(self.base, attr))
        fn = self.compile_fn(gm) if self.compile_fn else gm
        self.variants[key] = fn
        self.report.compiles += 1
        if self.report.compiles > 1:
            self.report.recompilations += 1
        return fn

    # ------------------------------------------------------------------ serving

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        with torch.no_grad(), moeops.LoadRecorder() as rec:
            out = self.current(*args, **kwargs)
        changed = self._decide(rec.records)
        if changed and self.rerun and any(r.dropped for r in rec.records):
            with torch.no_grad(), moeops.LoadRecorder() as rec:
                out = self.current(*args, **kwargs)
        self.report.seconds.append(time.perf_counter() - t0)
        self._account(rec.records)
        return out

    def run(self, batches: Iterable[Any], reference: Callable | None = None) -> StreamReport:
        """Serve every batch (a tensor, a tuple of positional inputs or a dict of keyword inputs).

        With ``reference`` (e.g. the dropless model), it runs on each batch too and the report's
        :attr:`StreamReport.rel_error` is ``‖y − y_ref‖ / ‖y_ref‖`` over all outputs."""
        from ..ir.graph import call, flatten_tensors

        for b in batches:
            ex = ExampleInputs.of(b)
            out = self(*ex.args, **ex.kwargs)
            if reference is not None:
                ref = flatten_tensors(call(reference, ex))
                for o, r in zip(flatten_tensors(out), ref):
                    if o.is_floating_point():
                        self.report.err_sq += float((o.double() - r.double()).pow(2).sum())
                        self.report.ref_sq += float(r.double().pow(2).sum())
        return self.report

    def _account(self, records: list[moeops.LoadRecord]) -> None:
        self.report.batches += 1
        seen_tokens = None
        self.report.per_batch.append({"tokens": records[0].tokens if records else 0,
                                      "assignments": sum(r.assignments for r in records),
                                      "dropped": sum(r.dropped for r in records),
                                      "slots": sum(r.slots for r in records),
                                      "kept": sum(int(sum(r.kept)) for r in records)})
        for r in records:
            tot = self.report.blocks.setdefault(r.block, BlockTotals())
            tot.assignments += r.assignments
            tot.dropped += r.dropped
            tot.kept += int(sum(r.kept))
            tot.slots += r.slots
            tot.flops_per_slot = r.flops_per_slot
            seen_tokens = r.tokens
        self.report.tokens += seen_tokens or 0

    def _burst(self, r: moeops.LoadRecord) -> str:
        """Why one batch alone shows a load shift ('' if it does not): it drops more than
        ``max_drop`` *and* some expert's load exceeds its capacity by more than ``burst_sigmas``
        binomial standard deviations ``√cap_e`` — a batch of the planned workload does that with
        negligible probability, since ``cap_e`` is already ``(1 + slack)·(mean + σ·spread)``."""
        if r.dropped <= self.max_drop * r.assignments:
            return ""
        worst, e_worst = 0.0, -1
        for e, (n, c) in enumerate(zip(r.loads, r.caps)):
            z = (n - c) / math.sqrt(max(c, 1))
            if z > worst:
                worst, e_worst = z, e
        if worst <= self.burst_sigmas:
            return ""
        return (f"shift: {100 * r.dropped / max(r.assignments, 1):.1f} % dropped in one batch, expert {e_worst} "
                f"{r.loads[e_worst] - r.caps[e_worst]} over its {r.caps[e_worst]} slots ({worst:.1f} σ)")

    def _decide(self, records: list[moeops.LoadRecord]) -> bool:
        """Apply the guard to one batch's records; switch variant when a block re-plans.

        Per block: a *shift* (:meth:`_burst`) re-plans from this batch alone; otherwise, once
        ``window`` batches have run on the current plan, an average drop share over them above
        ``max_drop`` (*overflow*) or an average padding share above ``max_waste`` (*waste*)
        re-plans from those batches."""
        new_plan = dict(self.plan)
        reasons = {}
        for r in records:
            if r.block not in self.blocks:
                continue
            hist = self.history[r.block]
            hist.append(r)
            burst = self._burst(r)
            if burst:
                reasons[r.block] = (burst, [r])
                continue
            if len(hist) < self.window:
                continue
            total = sum(h.assignments for h in hist)
            drop = sum(h.dropped for h in hist) / max(total, 1)
            waste = sum(h.padding for h in hist) / max(sum(h.slots for h in hist), 1)
            if drop > self.max_drop:
                reasons[r.block] = (f"overflow: {100 * drop:.2f} % dropped over {len(hist)} batches", list(hist))
            elif waste > self.max_waste:
                reasons[r.block] = (f"waste: {100 * waste:.0f} % padded over {len(hist)} batches", list(hist))
        if not reasons:
            return False
        for name, (why, recs) in list(reasons.items()):
            new_plan[name] = self._replan(name, recs)
            if new_plan[name] == self.plan[name]:        # the plan in use is already the best fit
                del reasons[name]
                self.history[name].clear()
        if not reasons:
            return False
        batch = self.report.batches
        for name, (why, _) in reasons.items():
            cached = self._key(new_plan) in self.variants
            self.report.events.append(RecompileEvent(batch, name, why, list(self.plan[name]), list(new_plan[name]),
                                                     cached))
            self.history[name].clear()
        self.report.plan_switches += 1
        if self._key(new_plan) in self.variants:
            self.report.cache_hits += 1
        self.plan = new_plan
        self.report.plans = {k: list(v) for k, v in new_plan.items()}
        self.current = self._variant(self._key(new_plan))
        return True

    def _replan(self, name: str, recs: list[moeops.LoadRecord]) -> tuple[float, ...]:
        """A plan for ``name`` that serves ``recs``: a cached plan that fits them, else a new one.

        The new one is rule 2 on the batches' loads (same slack and σ), raised where needed so
        that every expert's capacity covers its largest load among them: never tighter than the
        window it is made from."""
        fresh = plan_from_loads(torch.tensor([r.loads for r in recs]), torch.tensor([r.assignments for r in recs]),
                                self.slack, self.sigmas)
        e = len(recs[0].loads)
        floor = [max(r.loads[i] * e / max(r.assignments, 1) for r in recs) for i in range(e)]
        fresh = tuple(max(c, round_up(f)) for c, f in zip(fresh, floor))
        candidates = {dict(k)[name] for k in self.variants} | {fresh}
        best, best_slots = fresh, None
        for cand in candidates:
            dropped = slots = kept = total = 0
            for r in recs:
                caps = moeops.capacities(r.tokens, r.top_k, len(r.loads), list(cand)) if cand else list(r.loads)
                d, k, s = simulate(caps, r.loads)
                dropped, kept, slots, total = dropped + d, kept + k, slots + s, total + sum(r.loads)
            fits = dropped <= self.max_drop * total and (slots - kept) <= self.max_waste * slots
            if fits and (best_slots is None or slots < best_slots):
                best, best_slots = cand, slots
        return best


def moe_report(gm: torch.fx.GraphModule, runtime: MoERuntime | None = None) -> str:
    """Each MoE block of a rewritten graph: experts, top-k, routing, plan (and recompilations)."""
    nodes = moe_nodes(gm)
    if not nodes:
        return ""
    lines = ["MoE blocks:"]
    for n in nodes:
        b = MOE.get(n)
        if b is None:
            continue
        kept = f", {b.active_experts}/{b.num_experts} experts kept" if b.experts else ""
        shared = ", shared expert" if b.shared_expert else ""
        plan = runtime.plan.get(b.name, b.capacity) if runtime else b.capacity
        line = (f"  {b.name}: {b.num_experts} experts{kept}, top-{b.top_k}{shared}, routing {b.routing}, "
                f"capacity {fmt_factors(list(plan))}")
        if runtime:
            evs = [e for e in runtime.report.events if e.block == b.name]
            line += f", re-planned {len(evs)}×"
        lines.append(line)
    if runtime:
        rep = runtime.report
        lines.append(f"  runtime: {rep.recompilations} recompilations (variants built after the first), "
                     f"{rep.plan_switches} plan switches ({rep.cache_hits} cache hits), {rep.block_replans} block "
                     f"re-plans, {rep.dropped}/{rep.assignments} assignments dropped")
    return "\n".join(lines) + "\n"
