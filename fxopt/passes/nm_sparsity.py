"""``nm-sparsity`` — N:M structured sparsity of linear weights, by magnitude or activation-aware saliency.

For every selected ``linear(x, W, b)`` with ``W`` of shape ``[out, in]``: along the *input*
dimension, each run of ``m`` consecutive columns ``W[i, g·m : (g+1)·m]`` keeps its ``n`` entries
of largest saliency ``S_ij`` and the other ``m − n`` become 0 (NVIDIA's 2:4 pattern, Mishra et al.
2021, "Accelerating Sparse Deep Neural Networks"). The reduction dim of ``x Wᵀ`` is the input dim,
which is the dim sparse tensor cores compress.

``score=magnitude`` (default): ``S_ij = |W_ij|``, no data needed. ``score=wanda`` (Sun et al.,
ICLR 2024): ``S_ij = |W_ij| · ‖X_j‖``, with ``‖X_j‖`` the RMS of input channel ``j`` over the
calibration data — it minimizes the diagonal approximation ``Σ_pruned W_ij² ‖X_j‖²`` of the layer's
output error, and sees the few huge activation channels of LLMs that magnitude cannot
(:mod:`fxopt.passes._saliency` has the derivation). ``wanda`` needs ``calibration=`` batches; a
linear whose input calibration did not see falls back to magnitude, with a note.

The masked weight is written with :func:`fxopt.ir.graph.set_attr` (a new tensor: the caller's
parameter is never written) and the linear node gets :data:`fxopt.ir.meta.NM_MASK`, an
:class:`~fxopt.ir.meta.NMMask` with the kept and total ``Σ|w|`` of the weight.

**Stacked expert weights** (MoE: HF transformers 5 stores each block's experts as 3-D
parameters ``[E, out, in]`` read by a grouped or batched matmul; ``fxopt::moe``): every expert's
matrix is masked the same way along the dim its matmul reduces over
(:func:`fxopt.ir.structure.expert_weights`); the parameter's ``get_attr`` nodes carry the
:data:`~fxopt.ir.meta.NM_MASK`. ``score=wanda`` has no per-expert input statistics (each expert
sees only its routed tokens), so experts are masked by magnitude, with a note.

The stats say how much of what could be masked was: ``weights_touched`` of ``weights_eligible``
(linear and expert weights, :func:`fxopt.ir.structure.weight_coverage`) and ``weight_share``, their
share of the eligible bytes; the first note says it in words.

Skipped, with a note naming the layer:

* linears (and expert weights) whose input features are not a multiple of ``m``;
* weights shared with another use (tied LM head / embedding) while ``skip_shared`` is true —
  zeroing them would change the other use too;
* linears excluded by ``exclude`` (``include`` / ``exclude`` are module-path patterns, substring
  or glob, as in ``insert-qdq``).

Not exact (the drift in the record is the pruning error; no fine-tuning is done here). The
weights stay dense float tensors: ONNX has no N:M sparse format and ONNX Runtime no N:M CPU
kernel, so the exported model is the same size and speed; the value is the pattern itself, for
kernels/hardware that use it (and for the channel-permutation pass, Pool & Yu 2021).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ir.graph import get_attr, set_attr
from ..ir.meta import NM_MASK, NMMask
from ..ir.structure import ExpertWeight, LinearInfo, expert_weights, linears, shared_parameters, weight_coverage
from ._saliency import check_score, input_rms, saliency
from .base import NotApplicable, Pass, PassContext, PassResult, register_pass
from .calibration import check_batches

MAX_M = 16

DENSE_WEIGHTS = "nm-sparsity.dense_weights"
"""``ctx.state`` key: ``{weight target: the weight before masking}`` (the old tensor itself, not a copy),
kept along the pipeline so that ``nm-finetune`` can use the dense graph as its teacher."""

DENSE_NOTE = ("masked weights stay dense float tensors (zeros stored): ONNX has no N:M sparse format and "
              "ONNX Runtime no N:M CPU kernel, so the exported file is neither smaller nor faster")


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of ``w`` ([out, in]) keeping the ``n`` largest ``|w|`` in each group of ``m``
    consecutive input columns of each row. ``in`` must be a multiple of ``m``.

    Ties are broken by ``torch.topk`` (deterministic on CPU for a given tensor)."""
    _check_nm(n, m)
    if w.dim() != 2:
        raise ValueError(f"nm_mask needs a 2-D weight [out, in]; got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if in_f % m:
        raise ValueError(f"in_features={in_f} is not a multiple of m={m}")
    groups = w.detach().abs().to(torch.float32).reshape(out_f, in_f // m, m)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


def is_nm_sparse(w: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive input columns of every row of ``w`` has at most
    ``n`` non-zeros (``in`` must be a multiple of ``m``, else False)."""
    if w.dim() != 2 or w.shape[1] % m:
        return False
    nz = (w.detach() != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)
    return bool((nz <= n).all())


def _check_nm(n, m) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"nm-sparsity: n and m must be integers; got n={n!r}, m={m!r}")
    if not 2 <= m <= MAX_M:
        raise ValueError(f"nm-sparsity: m must be between 2 and {MAX_M}; got m={m}")
    if not 0 < n < m:
        raise ValueError(f"nm-sparsity: n must satisfy 0 < n < m (n=m keeps everything, n=0 zeroes the layer); "
                         f"got n={n}, m={m}")


@register_pass
@dataclass
class NMSparsity(Pass):
    name: ClassVar[str] = "nm-sparsity"
    run_after: ClassVar[tuple[str, ...]] = ("permute-channels",)   # permuting after masking would break the pattern
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = ("N:M structured sparsity (2:4) of linear weights along the input dim, by magnitude "
                              "or activation-aware saliency (score=wanda)")
    n: int = 2
    m: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_shared: bool = True
    score: str = "magnitude"

    def __post_init__(self):
        _check_nm(self.n, self.m)
        check_score(self.name, self.score)
        for opt in ("include", "exclude"):
            v = getattr(self, opt)
            if isinstance(v, str):
                setattr(self, opt, (v,) if v else ())
            elif not all(isinstance(p, str) for p in getattr(self, opt)):
                raise ValueError(f"nm-sparsity: {opt} must be a tuple of module-path patterns")
            else:
                setattr(self, opt, tuple(v))

    def _candidates(self, gm) -> list[LinearInfo | ExpertWeight]:
        found: list[LinearInfo | ExpertWeight] = list(linears(gm))
        seen = {li.weight for li in found}
        found += [ew for ew in expert_weights(gm)[0] if ew.weight not in seen]
        return [c for c in found if not self.include or any(_match(c.path, p) for p in self.include)]

    def _selected(self, gm) -> tuple[list[LinearInfo | ExpertWeight], list[str]]:
        shared = {t for sp in shared_parameters(gm) for t in sp.targets}
        out, notes = [], []
        for li in self._candidates(gm):
            path = li.path
            what = "in_features" if isinstance(li, LinearInfo) else "expert in_features"
            if any(_match(path, p) for p in self.exclude):
                notes.append(f"{path}: excluded by pattern, kept dense")
                continue
            if li.in_features % self.m:
                notes.append(f"{path}: {what}={li.in_features} is not a multiple of m={self.m}, kept dense")
                continue
            if self.skip_shared and li.weight in shared:
                notes.append(f"{path}: weight {li.weight} is shared with another use (tied), kept dense")
                continue
            w = get_attr(gm, li.weight)
            if not w.is_floating_point():
                notes.append(f"{path}: weight is {w.dtype}, not float, kept as is")
                continue
            out.append(li)
        return out, notes

    def requires(self, gm, ctx: PassContext) -> None:
        if not self._candidates(gm):
            raise NotApplicable("no linear (or stacked expert weight) with a parameter weight"
                                + (f" matching include={'|'.join(self.include)}" if self.include else ""))
        if self.score == "wanda":
            check_batches(ctx.calibration, f"{self.name}{{score=wanda}}")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        sel, notes = self._selected(gm)
        lins = [li for li in sel if isinstance(li, LinearInfo)]
        experts = [ew for ew in sel if isinstance(ew, ExpertWeight)]
        rms = input_rms(gm, ctx, lins, f"{self.name}{{score=wanda}}", notes) if self.score == "wanda" and lins else {}
        kept_frac: dict[str, float] = {}
        kept_sal: dict[str, float] = {}
        kept_total = total_total = 0.0
        changed = False
        for li in sel:
            w = get_attr(gm, li.weight)
            sal = saliency(w, rms.get(li.weight))
            if isinstance(li, LinearInfo):
                mask = nm_mask(sal, self.n, self.m)
            else:
                mask = expert_nm_mask(w, li.in_dim, self.n, self.m)
            absw = w.detach().abs().to(torch.float64)
            total = float(absw.sum())
            kept = float(absw[mask].sum())
            if li.weight in rms:
                sq = sal.to(torch.float64).pow(2)
                kept_sal[li.path] = round(float(sq[mask].sum() / sq.sum()), 6) if float(sq.sum()) > 0 else 1.0
            new = w.detach() * mask.to(w.dtype)                # a new tensor: never writes the old one
            if not torch.equal(new, w.detach()):
                changed = True
                ctx.state.setdefault(DENSE_WEIGHTS, {}).setdefault(li.weight, w.detach())   # nm-finetune's teacher
                set_attr(gm, li.weight, new.contiguous())
            record = NMMask(self.n, self.m, li.weight, kept_magnitude=kept, total_magnitude=total)
            for node in _mask_nodes(gm, li):
                NM_MASK.set(node, record)
            kept_frac[li.path] = round(kept / total, 6) if total > 0 else 1.0
            kept_total += kept
            total_total += total
        skipped = len(notes)
        if self.score == "wanda" and experts:
            notes.append(f"{len(experts)} stacked expert weight(s) masked by magnitude: wanda needs each expert's "
                         "input statistics, which calibration does not collect (an expert sees only its routed tokens)")
        cov = weight_coverage(gm, [li.weight for li in sel])
        notes.insert(0, f"masked {cov.n_touched} of {cov.n_eligible} eligible weights ({100 * cov.share:.1f} % of "
                        f"their bytes)" + (f"; left dense: {_some(cov.untouched)}" if cov.untouched else ""))
        if sel:
            notes.append(DENSE_NOTE)
        stats = {
            "pattern": f"{self.n}:{self.m}",
            "score": self.score,
            "masked": len(lins),
            "experts_masked": len(experts),
            "skipped": skipped,
            "weights_touched": cov.n_touched,
            "weights_eligible": cov.n_eligible,
            "weight_share": cov.share,
            "kept_magnitude": kept_frac,
            "kept_magnitude_total": round(kept_total / total_total, 6) if total_total > 0 else 1.0,
            **({"kept_saliency_sq": kept_sal} if kept_sal else {}),
            "weights_zeroed": sum(_numel(li) for li in sel) * (self.m - self.n) // self.m,
        }
        return PassResult(gm, changed, stats=stats, notes=notes)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        super().ensures(result, ctx)
        from .base import PostconditionError
        gm = result.graph_module
        for li in linears(gm):
            mk = NM_MASK.get(li.node)
            if mk is not None and mk.n == self.n and mk.m == self.m and not is_nm_sparse(get_attr(gm, li.weight), mk.n, mk.m):
                raise PostconditionError(f"{self.name}: {li.path} is not {mk.n}:{mk.m} sparse after masking")
        for ew in expert_weights(gm)[0]:
            mk = next((NM_MASK.get(n) for n in _mask_nodes(gm, ew) if NM_MASK.has(n)), None)
            if mk is not None and mk.n == self.n and mk.m == self.m and \
                    not is_nm_sparse(_expert_rows(get_attr(gm, ew.weight), ew.in_dim), mk.n, mk.m):
                raise PostconditionError(f"{self.name}: {ew.path} is not {mk.n}:{mk.m} sparse after masking")


def _expert_rows(w: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``[E, ·, ·]`` → ``[E·out, in]``: every expert's rows, the reduced dim last."""
    return w.movedim(in_dim, -1).reshape(-1, w.shape[in_dim])


def expert_nm_mask(w: torch.Tensor, in_dim: int, n: int, m: int) -> torch.Tensor:
    """:func:`nm_mask` of every expert matrix of a stacked ``[E, ·, ·]`` weight, groups of ``m``
    running along ``in_dim`` (the dim its matmul reduces over); same shape as ``w``."""
    moved = w.movedim(in_dim, -1)
    return nm_mask(moved.reshape(-1, moved.shape[-1]), n, m).reshape(moved.shape).movedim(-1, in_dim)


def _mask_nodes(gm, li) -> list[torch.fx.Node]:
    """Where the mask is recorded: the linear node, or every ``get_attr`` of a stacked expert weight."""
    if isinstance(li, LinearInfo):
        return [li.node]
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == li.weight]


def _numel(li) -> int:
    return li.in_features * li.out_features * (li.experts if isinstance(li, ExpertWeight) else 1)


def _some(paths: list[str], k: int = 4) -> str:
    return ", ".join(paths[:k]) + (f" and {len(paths) - k} more" if len(paths) > k else "")


def _match(path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(path, pattern) or pattern in path
