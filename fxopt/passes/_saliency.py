"""Which weights matter: the saliency scores shared by ``nm-sparsity`` and ``permute-channels``.

``magnitude``
    ``S_ij = |W_ij|`` — the classic criterion (Han et al. 2015; NVIDIA's 2:4 recipe, Mishra et al.
    2021) and Pool & Yu's permutation objective. Needs no data.
``wanda``
    ``S_ij = |W_ij| · ‖X_j‖`` — Sun, Liu, Bair & Kolter, *A Simple and Effective Pruning Approach for
    Large Language Models* (Wanda, ICLR 2024). ``‖X_j‖`` is the RMS of input channel ``j`` of the
    linear over the calibration tokens (:func:`fxopt.passes.calibration.channel_rms`; the RMS is
    ``‖X_j‖₂/√T``, a constant factor per layer, so it ranks exactly as Wanda's norm). Why: zeroing
    ``W_ij`` changes output ``i`` by ``−W_ij x_tj`` on token ``t``, so the layer's squared output
    error is ``‖X (W − Ŵ)ᵀ‖² = Σ_i ‖Σ_{j pruned} W_ij X_:j‖²``, which with the cross terms dropped
    (the diagonal of the Hessian ``XᵀX``, as in Optimal Brain Surgeon) is
    ``Σ_i Σ_{j pruned} W_ij² ‖X_j‖² = Σ_pruned S_ij²``. An N:M mask per row that keeps the ``n``
    largest ``S_ij`` of each group minimizes it group by group. Large language models have a few
    input channels tens to thousands of times larger than the rest (Dettmers et al. 2022; the
    attention-sink token in SmolLM2's ``down_proj`` input reaches ~3000 against a median of ~1):
    a small weight on such a channel matters more than a large one elsewhere, which magnitude
    cannot see.

The permutation objective for ``wanda`` is ``Σ_kept S_ij²``: maximizing it is minimizing the
diagonal output error above over all permutations (the total is fixed). For ``magnitude`` it stays
Pool & Yu's ``Σ_kept |W_ij|``.
"""
from __future__ import annotations

import torch

from ..ir.meta import describe
from ..ir.structure import LinearInfo
from .base import PassContext, PreconditionError
from .calibration import channel_rms, check_batches, observe

SCORES = ("magnitude", "wanda")


def check_score(who: str, score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"{who}: score must be one of {', '.join(SCORES)}; got {score!r}")


def input_rms(gm: torch.fx.GraphModule, ctx: PassContext, lins: list[LinearInfo], who: str,
              notes: list[str]) -> dict[str, torch.Tensor]:
    """``{weight target: RMS of the linear's input channels}`` from one calibration run over ``ctx.calibration``.

    A linear whose input calibration did not see (or whose input's last dim is not its
    ``in_features``) is left out, with a note; callers fall back to magnitude for it."""
    check_batches(ctx.calibration, who)
    xs = {li.weight: li.node.args[0] for li in lins if isinstance(li.node.args[0], torch.fx.Node)}
    stats = observe(gm, ctx.calibration, list(dict.fromkeys(xs.values())), desc=f"{who} calibration",
                    layerwise=ctx.calibration_mode == "layerwise")
    out: dict[str, torch.Tensor] = {}
    for li in lins:
        x = xs.get(li.weight)
        st = stats.get(x) if x is not None else None
        if st is None:
            notes.append(f"{li.path}: calibration saw no value for its input; scored by magnitude")
            continue
        rms = channel_rms(st)
        if rms.shape != (li.in_features,):
            notes.append(f"{li.path}: input {describe(x)} has {tuple(rms.shape)} channels, not {li.in_features}; "
                         "scored by magnitude")
            continue
        out[li.weight] = rms
    if lins and not out:
        raise PreconditionError(f"{who}: score=wanda found no calibrated input for any selected linear")
    return out


def saliency(w: torch.Tensor, rms: torch.Tensor | None) -> torch.Tensor:
    """``|W| · rms`` (columns scaled by their input channel's RMS), or ``|W|`` when ``rms`` is None."""
    a = w.detach().abs().to(torch.float32)
    return a if rms is None else a * rms.to(a.device).unsqueeze(0)
