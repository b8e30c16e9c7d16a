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

Skipped, with a note naming the layer:

* linears whose ``in_features`` is not a multiple of ``m``;
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
from ..ir.structure import LinearInfo, linears, shared_parameters
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

    def _candidates(self, gm) -> list[LinearInfo]:
        return [li for li in linears(gm) if not self.include or any(_match(li.path, p) for p in self.include)]

    def _selected(self, gm) -> tuple[list[LinearInfo], list[str]]:
        shared = {t for sp in shared_parameters(gm) for t in sp.targets}
        out, notes = [], []
        for li in self._candidates(gm):
            path = li.path
            if any(_match(path, p) for p in self.exclude):
                notes.append(f"{path}: excluded by pattern, kept dense")
                continue
            if li.in_features % self.m:
                notes.append(f"{path}: in_features={li.in_features} is not a multiple of m={self.m}, kept dense")
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
            raise NotApplicable("no linear with a parameter weight"
                                + (f" matching include={'|'.join(self.include)}" if self.include else ""))
        if self.score == "wanda":
            check_batches(ctx.calibration, f"{self.name}{{score=wanda}}")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        sel, notes = self._selected(gm)
        rms = input_rms(gm, ctx, sel, f"{self.name}{{score=wanda}}", notes) if self.score == "wanda" and sel else {}
        kept_frac: dict[str, float] = {}
        kept_sal: dict[str, float] = {}
        kept_total = total_total = 0.0
        changed = False
        for li in sel:
            w = get_attr(gm, li.weight)
            sal = saliency(w, rms.get(li.weight))
            mask = nm_mask(sal, self.n, self.m)
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
            NM_MASK.set(li.node, NMMask(self.n, self.m, li.weight, kept_magnitude=kept, total_magnitude=total))
            kept_frac[li.path] = round(kept / total, 6) if total > 0 else 1.0
            kept_total += kept
            total_total += total
        skipped = len(notes)
        if sel:
            notes.append(DENSE_NOTE)
        stats = {
            "pattern": f"{self.n}:{self.m}",
            "score": self.score,
            "masked": len(sel),
            "skipped": skipped,
            "kept_magnitude": kept_frac,
            "kept_magnitude_total": round(kept_total / total_total, 6) if total_total > 0 else 1.0,
            **({"kept_saliency_sq": kept_sal} if kept_sal else {}),
            "weights_zeroed": sum(li.in_features * li.out_features for li in sel) * (self.m - self.n) // self.m,
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


def _match(path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(path, pattern) or pattern in path
