"""Upcycling a dense Llama-style model into a mixture of experts whose routing follows real data.

Used by ``bench_moe.py`` (issue #5 item 6). For each chosen decoder layer, the dense MLP
``down(silu(gate(x)) * up(x))`` is replaced by an :class:`fxopt.nn.MoELayer` with ``E``
experts built by :meth:`fxopt.nn.MoELayer.from_mlp`: each a copy of that MLP with independent
multiplicative Gaussian noise of relative size ``noise`` (``W_e = W ⊙ (1 + noise · N(0, 1))``),
so every expert computes nearly what the dense MLP does and the upcycled model stays close to
the original.

The router is initialized from the data: the layer's MLP inputs (the output of
``post_attention_layernorm``) are collected on real text and clustered with spherical k-means
(cosine similarity) into ``E`` clusters; router row ``e`` is the unit centroid ``ĉ_e`` scaled by
``τ / median ‖x‖``. Then ``argmax_e x·W_r[e]`` is exactly the token's k-means cluster (cosine
assignment does not depend on ``‖x‖``), so the top-1 expert of a token is its cluster, and the
load per expert follows how real text populates the clusters — skewed, and shifting with the
text domain. The top-k *ids* do not depend on ``τ`` (a positive scale of the logits); ``τ`` only
sets how peaked the routing weights are, and is chosen so that the mean top-1 router
probability on the fitting data equals ``top1_prob``.

The first position of every window (the attention sink, whose hidden state is an outlier) is
left out of the clustering; it is routed like any other token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from _common import run_with_hooks

from fxopt.nn import MoELayer


class UpcycledMLP(nn.Module):
    """Stands in for a ``LlamaMLP``: the same call signature (``mlp(x)``), the MoE layer inside."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


@dataclass
class UpcycleInfo:
    layers: list[int]
    num_experts: int
    top_k: int
    noise: float
    top1_prob: float
    samples: int                                   # hidden states clustered per layer
    tau: dict[int, float] = field(default_factory=dict)
    cluster_share: dict[int, list[float]] = field(default_factory=dict)   # k-means cluster sizes / samples
    kmeans_iters: dict[int, int] = field(default_factory=dict)


def mlp_inputs(model: nn.Module, layers: list[int], batches: list[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """The inputs of ``model.model.layers[i].mlp`` over ``batches``, position 0 of each window left out:
    ``{i: [N, D]}``."""
    acc: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook(i):
        def fn(_m, args):
            x = args[0].detach()
            acc[i].append(x[:, 1:].reshape(-1, x.shape[-1]).float())
        return fn

    hs = [model.model.layers[i].mlp.register_forward_pre_hook(hook(i)) for i in layers]
    run_with_hooks(model, hs, batches)
    return {i: torch.cat(v) for i, v in acc.items()}


def spherical_kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unit centroids ``[k, D]``, the cluster of each row and the iterations run (k-means++ seeding on
    cosine distance, Lloyd iterations until no row changes cluster)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    n = u.shape[0]
    c = [u[int(torch.randint(0, n, (1,), generator=g))]]
    for _ in range(1, k):
        dist = (1 - (u @ torch.stack(c).t()).max(dim=1).values).clamp_min(0)
        c.append(u[int(torch.multinomial(dist / dist.sum(), 1, generator=g))])
    cent = torch.stack(c)
    assign = torch.full((n,), -1, dtype=torch.long)
    it = 0
    for it in range(1, iters + 1):
        new = (u @ cent.t()).argmax(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = u[assign == j]
            if members.numel():
                cent[j] = torch.nn.functional.normalize(members.sum(0), dim=0)
            else:                                  # an empty cluster takes the worst-served row
                far = int((u * cent[assign]).sum(1).argmin())
                cent[j] = u[far]
    return cent.float(), assign, it


def _tau_for(x: torch.Tensor, dirs: torch.Tensor, target: float) -> float:
    """``τ`` with mean top-1 softmax probability of ``τ · x·dirsᵀ`` equal to ``target`` (bisection)."""
    s = x @ dirs.t()
    lo, hi = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        p = torch.softmax(mid * s, dim=-1).max(dim=-1).values.mean()
        lo, hi = (mid, hi) if p < target else (lo, mid)
    return math.sqrt(lo * hi)


def upcycle(model: nn.Module, layers: list[int], fit_batches: list[dict[str, torch.Tensor]], *, num_experts: int = 8,
            top_k: int = 2, noise: float = 0.01, top1_prob: float = 0.5, capacity_factor=None,
            routing: str = "vanilla", max_samples: int = 4096, seed: int = 0) -> UpcycleInfo:
    """Replace ``model.model.layers[i].mlp`` for ``i`` in ``layers`` by :class:`UpcycledMLP` in place
    (module docstring). ``capacity_factor`` / ``routing`` are passed to the :class:`MoELayer`s."""
    g = torch.Generator().manual_seed(seed)
    xs = mlp_inputs(model, layers, fit_batches)
    info = UpcycleInfo(layers=list(layers), num_experts=num_experts, top_k=top_k, noise=noise, top1_prob=top1_prob,
                       samples=0)
    for i in layers:
        mlp = model.model.layers[i].mlp
        gate, up, down = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        d_ff, d_model = gate.shape
        x = xs[i]
        if x.shape[0] > max_samples:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_samples]]
        info.samples = x.shape[0]
        cent, assign, iters = spherical_kmeans(x, num_experts, seed=seed + i)
        scale = float(x.norm(dim=-1).median())
        tau = _tau_for(x / scale, cent, top1_prob)
        moe = MoELayer.from_mlp(gate, up, down, num_experts, top_k, router_weight=cent * (tau / scale), noise=noise,
                                generator=g, activation="silu", capacity_factor=capacity_factor, routing=routing,
                                norm_topk=True)
        model.model.layers[i].mlp = UpcycledMLP(moe.eval())
        counts = torch.bincount(assign, minlength=num_experts).double()
        info.tau[i] = tau
        info.cluster_share[i] = (counts / counts.sum()).tolist()
        info.kmeans_iters[i] = iters
    return info
