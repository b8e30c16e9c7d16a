"""``fxopt::moe``: a mixture-of-experts layer with an explicit per-expert capacity plan.

One op computes a whole routed MoE block from the router's logits::

    y = fxopt::moe(x[T, D], router_logits[T, E_all], w_in[E, F', D], w_out[E, D, F],
                   top_k, norm_topk, gated, activation, capacity, routing, experts, block)

**Routing.** ``p = softmax(logits[:, experts])`` (float32; ``experts`` lists the original ids of
the experts kept, ``[]`` = all — keeping a subset is the same as masking the other logits to
``-inf``), ``(w, i) = topk(p, k)``, and with ``norm_topk`` ``w ← w / Σ_k w``.

**Capacity** (Fedus et al. 2021, Switch Transformer). ``capacity`` holds one *capacity factor*
``c_e`` per expert, relative to the uniform share of the ``T·k`` assignments::

    cap_e = min(T, max(1, ⌈c_e · T·k / E⌉))

so ``c_e = 1.25`` everywhere is Switch's capacity factor 1.25, and a *plan* gives each expert
its own ``c_e`` (DynaMoE, Kossmann et al. 2022). ``capacity = []`` is dropless: every expert
takes all the tokens routed to it.

**Dispatch order.** Assignments are served k-major (every token's first choice before any
second choice, as in GShard and V-MoE). Within one k, ``routing="vanilla"`` serves tokens in
positional order; ``routing="bpr"`` (batch-priority routing, Riquelme et al. 2021, V-MoE)
serves round ``j`` by decreasing routing weight of choice ``j`` (for top-1: the router
probability, V-MoE's priority), so when an expert is full the assignments dropped are the ones
that carry the least weight (:func:`route` says why per-round priority is the right
generalization of V-MoE's top-1 score for ``k > 1``). An assignment whose position in its
expert's queue is ``≥ cap_e`` is dropped: it contributes nothing (the residual connection
around the block carries the token on), and the other top-k weights are not renormalized.

**Experts.** Each expert ``e`` processes exactly ``cap_e`` token slots (padding slots hold a
zero row and weight 0): ``h = x_slots · w_in[e]ᵀ``; gated experts split ``h = [g, u]`` and use
``act(g) ⊙ u`` (SwiGLU for ``silu``), plain ones ``act(h)``; then ``y = h · w_out[e]ᵀ``, and
``out[t] = Σ_slots(t) w_slot · y_slot``. Experts of equal capacity run as one batched matmul,
so a uniform plan is one ``bmm`` per projection and a plan with ``g`` distinct capacities is
``g`` of them. Shapes depend only on ``T`` and the plan: a plan is a static-shape program.

**Loads.** When a :class:`LoadRecorder` is active, the eager kernel appends one
:class:`LoadRecord` per call (tokens routed per expert before capacity, tokens kept, slots):
that is how :class:`fxopt.passes.moe_recompile.MoERuntime` measures each batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
ROUTINGS = ("vanilla", "bpr")


def capacities(num_tokens: int, top_k: int, num_experts: int, factors: Sequence[float]) -> list[int]:
    """Slots per expert for a batch of ``num_tokens`` tokens: ``min(T, max(1, ⌈c_e·T·k/E⌉))``.
    Empty ``factors`` (dropless) gives ``T`` slots to every expert."""
    t = int(num_tokens)
    if not factors:
        return [t] * num_experts
    if len(factors) != num_experts:
        raise ValueError(f"capacity plan has {len(factors)} factors for {num_experts} experts")
    share = t * top_k / num_experts
    return [min(t, max(1, math.ceil(float(c) * share - 1e-9))) for c in factors]


def slot_layout(caps: Sequence[int]) -> tuple[list[int], list[tuple[int, list[int], int]]]:
    """Where each expert's slots start, and the groups of experts of equal capacity.

    Slots are laid out group by group (groups by increasing capacity, experts by id inside a
    group), so one group is one contiguous ``[n_g · cap_g, D]`` block: ``(cap, experts, start)``."""
    by_cap: dict[int, list[int]] = {}
    for e, c in enumerate(caps):
        by_cap.setdefault(int(c), []).append(e)
    base = [0] * len(caps)
    groups = []
    pos = 0
    for c in sorted(by_cap):
        members = by_cap[c]
        groups.append((c, members, pos))
        for j, e in enumerate(members):
            base[e] = pos + j * c
        pos += c * len(members)
    return base, groups


def route(logits: Tensor, top_k: int, norm_topk: bool, experts: Sequence[int] = ()) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights [T, k] float32, ids [T, k] int64 local to the kept experts, priority [T, k])``.

    ``priority[t, j]`` orders round ``j`` of the k-major dispatch under ``routing="bpr"``: it is
    the routing weight of choice ``j`` — what the output loses if that assignment is dropped.
    This is V-MoE's batch-priority routing (Riquelme et al. 2021, "Scaling Vision with Sparse
    Mixture of Experts", BPR: tokens sorted by their top-1 router probability) generalized per
    round. For ``k = 1`` the two coincide. For ``k > 1``, sorting every round by the top-1
    probability serves the *second* choices of the most confident tokens first — the ones with
    the *smallest* second weight (with renormalized top-2, ``w₂ = 1 − w₁``) — and drops the
    least confident tokens' second choices, which carry the largest weight; when capacity is
    short almost every drop is a second choice, so that order loses more routing weight than
    positional order. Per-round priority keeps the heaviest assignments of each round, which
    is the greedy minimum of the weight dropped in that round. With ``norm_topk`` and ``k = 1``
    every weight is 1, so the priority is the router probability (V-MoE's top-1 score)."""
    if experts:
        logits = logits.index_select(-1, torch.tensor(list(experts), dtype=torch.long, device=logits.device))
    p = torch.softmax(logits.to(torch.float32), dim=-1)
    w, i = torch.topk(p, top_k, dim=-1)
    if norm_topk:
        priority = w if top_k == 1 else w / w.sum(dim=-1, keepdim=True)
        w = w / w.sum(dim=-1, keepdim=True)
    else:
        priority = w
    return w, i, priority


def assign(ids: Tensor, weights: Tensor, priority: Tensor, caps: Sequence[int], routing: str
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fill each expert's ``cap_e`` slots in dispatch order (module docstring).

    Returns ``slot_token [S]`` (token of each slot, ``T`` for padding), ``slot_weight [S]``,
    ``loads [E]`` (assignments routed to each expert) and ``kept [E]`` (assignments served)."""
    t, k = ids.shape
    e_count = len(caps)
    if priority.dim() == 1:                                          # one priority per token: every round
        priority = priority.unsqueeze(1).expand(t, k)
    if routing == "bpr":                                             # round j by priority of choice j
        order = torch.sort(priority, dim=0, descending=True, stable=True).indices      # [T, k]
    elif routing == "vanilla":
        order = torch.arange(t, device=ids.device).unsqueeze(1).expand(t, k)
    else:
        raise ValueError(f"unknown routing {routing!r}: use one of {ROUTINGS}")
    tok = order.t().reshape(-1)                                      # k-major: all first choices first
    e_seq = ids.gather(0, order).t().reshape(-1)
    w_seq = weights.gather(0, order).t().reshape(-1)
    onehot = F.one_hot(e_seq, e_count)                              # [k·T, E]
    pos = (onehot.cumsum(0) * onehot).sum(-1) - 1                   # position in the expert's queue
    caps_t = torch.tensor(list(caps), dtype=torch.long, device=ids.device)
    base, _ = slot_layout(caps)
    base_t = torch.tensor(base, dtype=torch.long, device=ids.device)
    keep = pos < caps_t[e_seq]
    total = int(sum(caps))
    slot = torch.where(keep, base_t[e_seq] + pos, torch.full_like(pos, total))
    slot_token = torch.full((total + 1,), t, dtype=torch.long, device=ids.device)
    slot_token.scatter_(0, slot, tok)
    slot_weight = torch.zeros(total + 1, dtype=weights.dtype, device=ids.device)
    slot_weight.scatter_(0, slot, w_seq)
    loads = onehot.sum(0)
    kept = (onehot * keep.unsqueeze(-1)).sum(0)
    return slot_token[:total], slot_weight[:total], loads, kept


def run_experts(x: Tensor, slot_token: Tensor, slot_weight: Tensor, w_in: Tensor, w_out: Tensor, caps: Sequence[int],
                gated: bool, activation: str) -> Tensor:
    """The experts on their slots, weighted and summed back per token: ``[T, D]``."""
    t, d = x.shape
    act = ACTIVATIONS[activation]
    xs = torch.cat([x, x.new_zeros(1, d)])[slot_token]              # [S, D]; padding slots read the zero row
    _, groups = slot_layout(caps)
    ys = []
    for cap, members, start in groups:
        n = len(members)
        if cap == 0:
            continue
        xg = xs[start:start + n * cap].reshape(n, cap, d)
        if n == w_in.shape[0]:
            wi, wo = w_in, w_out
        else:
            idx = torch.tensor(members, dtype=torch.long, device=x.device)
            wi, wo = w_in.index_select(0, idx), w_out.index_select(0, idx)
        h = torch.bmm(xg, wi.transpose(1, 2))
        if gated:
            g, u = h.chunk(2, dim=-1)
            h = act(g) * u
        else:
            h = act(h)
        ys.append(torch.bmm(h, wo.transpose(1, 2)).reshape(n * cap, d))
    y = torch.cat(ys) if ys else x.new_zeros(0, d)
    y = y * slot_weight.to(y.dtype).unsqueeze(-1)
    out = x.new_zeros(t + 1, d).index_add_(0, slot_token, y)
    return out[:t]


def flops_per_slot(d_model: int, d_ff: int, gated: bool) -> int:
    """Multiply-adds ×2 of one token through one expert: ``2·D·F·(3 if gated else 2)``."""
    return 2 * d_model * d_ff * (3 if gated else 2)


# --------------------------------------------------------------------------- load recording


@dataclass
class LoadRecord:
    """One call of the MoE op: what the router asked for and what the plan served."""

    block: str
    tokens: int
    top_k: int
    loads: list[int]            # assignments routed to each expert (before capacity)
    caps: list[int]             # slots each expert processed
    kept: list[int]             # assignments served
    flops_per_slot: int

    @property
    def assignments(self) -> int:
        return self.tokens * self.top_k

    @property
    def dropped(self) -> int:
        return int(sum(self.loads) - sum(self.kept))

    @property
    def slots(self) -> int:
        return int(sum(self.caps))

    @property
    def padding(self) -> int:
        return self.slots - int(sum(self.kept))


class LoadRecorder:
    """``with LoadRecorder() as rec: model(x)`` → ``rec.records``: one :class:`LoadRecord` per
    MoE op call (eager kernel only; graphs being exported or traced record nothing)."""

    def __init__(self):
        self.records: list[LoadRecord] = []

    def __enter__(self) -> "LoadRecorder":
        _RECORDERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _RECORDERS.remove(self)


_RECORDERS: list[LoadRecorder] = []


# --------------------------------------------------------------------------- the op


def moe_forward(x: Tensor, router_logits: Tensor, w_in: Tensor, w_out: Tensor, top_k: int, norm_topk: bool,
                gated: bool, activation: str, capacity: Sequence[float], routing: str, experts: Sequence[int],
                block: str = "") -> Tensor:
    """The eager kernel of ``fxopt::moe`` (also what :class:`fxopt.nn.MoELayer` runs)."""
    if x.dim() != 2 or router_logits.dim() != 2:
        raise ValueError(f"fxopt::moe takes x [T, D] and router_logits [T, E], got {tuple(x.shape)} and "
                         f"{tuple(router_logits.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fxopt::moe: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    num_experts = w_in.shape[0]
    w, ids, priority = route(router_logits, top_k, norm_topk, experts)
    if ids.numel() and int(ids.max()) >= num_experts:
        raise ValueError(f"fxopt::moe{' ' + block if block else ''}: the router picks among "
                         f"{router_logits.shape[-1] if not experts else len(experts)} experts but w_in holds "
                         f"{num_experts}")
    t = x.shape[0]
    if capacity:
        caps = capacities(t, top_k, num_experts, capacity)
    else:                       # dropless: each expert exactly its load (ragged in eager)
        caps = torch.bincount(ids.reshape(-1), minlength=num_experts).tolist()
    slot_token, slot_weight, loads, kept = assign(ids, w.to(x.dtype), priority, caps, routing)
    out = run_experts(x, slot_token, slot_weight, w_in, w_out, caps, gated, activation)
    if _RECORDERS:
        rec = LoadRecord(block, t, top_k, loads.tolist(), list(caps), kept.tolist(),
                         flops_per_slot(w_out.shape[1], w_out.shape[2], gated))
        for r in _RECORDERS:
            r.records.append(rec)
    return out


@torch.library.custom_op("fxopt::moe", mutates_args=())
def moe(x: Tensor, router_logits: Tensor, w_in: Tensor, w_out: Tensor, top_k: int, norm_topk: bool, gated: bool,
        activation: str, capacity: list[float], routing: str, experts: list[int], block: str) -> Tensor:
    """A routed MoE block with per-expert capacities (module docstring). Returns ``[T, D]``."""
    return moe_forward(x, router_logits, w_in, w_out, top_k, norm_topk, gated, activation, capacity, routing,
                       experts, block)


@moe.register_fake
def _moe_fake(x, router_logits, w_in, w_out, top_k, norm_topk, gated, activation, capacity, routing, experts, block):
    return torch.empty_like(x)


MOE_OP = torch.ops.fxopt.moe.default

#: positions of the op's arguments (the passes rewrite them)
ARG = {name: i for i, name in enumerate(["x", "router_logits", "w_in", "w_out", "top_k", "norm_topk", "gated",
                                         "activation", "capacity", "routing", "experts", "block"])}


# --------------------------------------------------------------------------- caching assignments?


def routing_cost_share(d_model: int, d_ff: int, num_experts: int, top_k: int, tokens: int, *, factor: float = 1.25,
                       repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Milliseconds (best of ``repeats``) of the router GEMM, of the routing (softmax, top-k,
    dispatch positions) and of the experts for one ``fxopt::moe`` call on random data, and the
    share of the first two.

    Caching token→expert assignments can save at most the router and routing time, and finding a
    cached assignment needs a key of the token's hidden state — hashing it reads the same
    ``T·D`` values the router GEMM reads (``hash_ms``). docs/passes/moe.md records the numbers."""
    import time

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=g)
    wr = torch.randn(num_experts, d_model, generator=g) / d_model ** 0.5
    wi = torch.randn(num_experts, 2 * d_ff, d_model, generator=g) / d_model ** 0.5
    wo = torch.randn(num_experts, d_model, d_ff, generator=g) / d_ff ** 0.5
    caps = capacities(tokens, top_k, num_experts, [factor] * num_experts)
    logits = x @ wr.t()

    def timed(fn) -> float:          # best of ``repeats``: robust to preemption on a shared machine
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    def routing():
        w, i, p = route(logits, top_k, True)
        return assign(i, w, p, caps, "vanilla")

    st, sw, _, _ = routing()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # one core, as documented: no intra-op thread contention on a shared machine
    try:
        with torch.no_grad():
            out = {"router_ms": timed(lambda: x @ wr.t()), "routing_ms": timed(routing),
                   "experts_ms": timed(lambda: run_experts(x, st, sw, wi, wo, caps, True, "silu")),
                   "hash_ms": timed(lambda: hash(x.numpy().tobytes()))}
    finally:
        torch.set_num_threads(threads)
    out["share"] = (out["router_ms"] + out["routing_ms"]) / (out["router_ms"] + out["routing_ms"] + out["experts_ms"])
    return out
