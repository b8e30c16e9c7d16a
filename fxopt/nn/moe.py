"""fxopt's reference mixture-of-experts layer.

:class:`MoELayer` is a routed FFN block: a router ``Linear(D, E)``, ``E`` experts stored as
stacked weights (``w_in [E, F', D]``, ``w_out [E, D, F]``, ``nn.Linear`` layout per expert;
``F' = 2F`` for gated experts, whose first half is the gate), top-k routing with optionally
renormalized weights, and an optional capacity with token dropping:

* ``capacity_factor=None`` — dropless. The forward is plain ATen ops with static shapes: router
  linear → softmax → top-k → a dense one-hot combine over the experts (each expert's weights
  used once, as one ``bmm`` over all experts, on the tokens with the ones not routed to it
  zeroed; ``y = Σ_e combine[:, e] · f_e(x)``), so :func:`fxopt.ir.moe.find_moe_blocks`
  recognizes it in a captured graph as it recognizes HF Mixtral / Qwen2-MoE / OLMoE. Memory is
  ``O(E·T·(D + F'))`` — it never copies expert weights per token — and the compute is ``E/k``
  times the routed work (every expert sees every token); to *serve* dropless without that
  overhead, rewrite with ``moe-recompile{capacity=dropless}`` (the op runs each expert on
  exactly its load).
* ``capacity_factor=c`` (a float, or one float per expert) — each expert serves at most
  ``⌈c_e·T·k/E⌉`` assignments (Fedus et al. 2021, Switch Transformer) in the order set by
  ``routing``: ``"vanilla"`` (positional) or ``"bpr"`` (batch-priority routing, Riquelme et al.
  2021, generalized per round for k > 1: round j of the dispatch served by decreasing weight
  of choice j, see :func:`fxopt.ir.moeops.route`). The forward calls the
  ``fxopt::moe`` op (:mod:`fxopt.ir.moeops`), which a captured graph keeps as one node.

Input ``[..., D]``, output of the same shape; the layer adds no residual.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..ir import moeops


class MoELayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 2, *, gated: bool = True,
                 activation: str = "silu", capacity_factor: float | Sequence[float] | None = None,
                 routing: str = "vanilla", norm_topk: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoELayer: top_k={top_k} must be between 1 and num_experts={num_experts}")
        if activation not in moeops.ACTIVATIONS:
            raise ValueError(f"MoELayer: unknown activation {activation!r}; known: {sorted(moeops.ACTIVATIONS)}")
        if routing not in moeops.ROUTINGS:
            raise ValueError(f"MoELayer: unknown routing {routing!r}; use one of {moeops.ROUTINGS}")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.gated, self.activation, self.routing, self.norm_topk = gated, activation, routing, norm_topk
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * d_ff, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialized as ``nn.Linear`` would be: U(−1/√fan_in, 1/√fan_in)."""
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    @classmethod
    def from_mlp(cls, gate_weight: torch.Tensor, up_weight: torch.Tensor | None, down_weight: torch.Tensor,
                 num_experts: int, top_k: int = 2, *, router_weight: torch.Tensor | None = None, noise: float = 0.0,
                 generator: torch.Generator | None = None, **kwargs) -> "MoELayer":
        """Upcycle a dense FFN into ``num_experts`` copies (Komatsuzaki et al. 2022, sparse upcycling).

        ``down(act(gate(x)) ⊙ up(x))`` (``up_weight`` given: gated) or ``down(act(gate(x)))``, weights
        in ``nn.Linear`` layout. Each copy gets multiplicative noise ``1 + noise·N(0, 1)`` so the
        experts can differ; ``router_weight [E, D]`` (e.g. centroids of real hidden states) sets
        the router. With ``noise=0`` and ``norm_topk`` the layer computes the dense FFN exactly,
        whatever the router."""
        d_ff, d_model = gate_weight.shape
        gated = up_weight is not None
        layer = cls(d_model, d_ff, num_experts, top_k, gated=gated, **kwargs)
        w_in = torch.cat([gate_weight, up_weight]) if gated else gate_weight
        with torch.no_grad():
            for e in range(num_experts):
                jitter_in = 1 + noise * torch.randn(w_in.shape, generator=generator) if noise else 1.0
                jitter_out = 1 + noise * torch.randn(down_weight.shape, generator=generator) if noise else 1.0
                layer.w_in[e].copy_(w_in * jitter_in)
                layer.w_out[e].copy_(down_weight * jitter_out)
            if router_weight is not None:
                layer.router.weight.copy_(router_weight)
        return layer.to(gate_weight.dtype)

    def capacity_plan(self) -> list[float]:
        """Per-expert capacity factors (``[]`` = dropless)."""
        c = self.capacity_factor
        if c is None:
            return []
        if isinstance(c, (int, float)):
            return [float(c)] * self.num_experts
        if len(c) != self.num_experts:
            raise ValueError(f"MoELayer: {len(c)} capacity factors for {self.num_experts} experts")
        return [float(v) for v in c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, self.d_model)
        logits = self.router(h)
        if self.capacity_factor is not None:
            y = moeops.moe(h, logits, self.w_in, self.w_out, self.top_k, self.norm_topk, self.gated,
                           self.activation, self.capacity_plan(), self.routing, [], "")
            return y.reshape(shape)
        return self._dropless(h, logits).reshape(shape)

    def _dropless(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Dropless forward as a dense one-hot combine over the experts (module docstring).

        ``mask [E, T]`` marks the tokens routed to each expert, ``combine [E, T]`` their routing
        weights; every expert runs once on all ``T`` tokens with the tokens not routed to it
        zeroed (``f_e(0) = 0``: the experts have no biases), and ``y = Σ_e combine_e ⊙ f_e(x)``.
        Intermediates are ``[E, D, T]`` and ``[E, F', T]``: memory ``O(E·T·(D + F'))``, never a copy
        of the expert weights per token. Static shapes, so ``torch.export`` captures it without
        data-dependent sizes."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(1, ids, weights).t().to(h.dtype)      # [E, T]
        mask = torch.zeros_like(probs).scatter(1, ids, 1.0).t().to(h.dtype)             # [E, T]
        xs = h.t().unsqueeze(0) * mask.unsqueeze(1)                                      # [E, D, T]
        u = torch.bmm(self.w_in, xs)                                                     # [E, F', T]
        act = moeops.ACTIVATIONS[self.activation]
        if self.gated:
            g, up = u.chunk(2, dim=1)
            u = act(g) * up
        else:
            u = act(u)
        y = torch.bmm(self.w_out, u)                                                     # [E, D, T]
        y = (y * combine.unsqueeze(1)).sum(dim=0)                                        # [D, T]
        return y.t()

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, experts={self.num_experts}, top_k={self.top_k}, "
                f"gated={self.gated}, activation={self.activation}, {cap}, routing={self.routing}")
