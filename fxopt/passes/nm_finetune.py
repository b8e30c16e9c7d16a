"""``nm-finetune`` — recover accuracy after ``nm-sparsity`` by distillation, keeping the N:M masks.

One-shot N:M magnitude pruning changes what a model computes (MiniLM's 2:4 embeddings fall to
cosine ≈ 0.64 vs. the dense model). NVIDIA's recipe (Mishra et al. 2021) retrains with the mask
fixed; with no training set at hand, this pass *distills* on the calibration batches: the dense
graph is the teacher, the masked graph the student.

For calibration batches ``x_b`` (``ctx.calibration``), teacher outputs ``T_b = f(x_b; W_dense)``
(the graph with the weights ``nm-sparsity`` saw before masking — it leaves them in
``ctx.state`` for this pass) and the student ``f(x_b; W)``, the pass minimizes with Adam

* ``loss=mse`` (default): ``L = Σ_outputs ‖f − T‖² / ‖T‖²`` (relative squared error, summed over the
  graph's floating outputs, so outputs of different scales weigh alike);
* ``loss=cosine``: ``L = Σ_outputs mean_rows (1 − cos(f_row, T_row))`` along the last dim;
* ``loss=kl``: ``L = Σ_outputs mean_rows KL(softmax(T_row) ‖ softmax(f_row))`` along the last dim —
  for language-model logits (Hinton et al. 2015's distillation loss at temperature 1).

Rewrite rules:

1. ``method=masked`` (default; masked fine-tuning): every masked linear's weight ``W`` (and its bias)
   is trained; the mask ``M`` (``n`` largest ``|w|`` per group of ``m`` of the masked weight, i.e.
   the mask ``nm-sparsity`` applied) is fixed. Each step zeroes ``∂L/∂W`` outside ``M`` and after the
   optimizer step re-applies ``W ← W ⊙ M``, so masked weights stay exactly 0.
2. ``method=sr-ste`` (Zhou et al. 2021, *Learning N:M Fine-grained Structured Sparse Neural
   Networks From Scratch*): dense weights ``W̃`` (starting from the teacher's) are trained; the
   forward uses ``W̃ ⊙ M(W̃)`` with ``M`` recomputed from ``|W̃|`` at every step, the gradient goes
   straight through (STE) and gets the sparse-refined term ``λ_w (1 − M(W̃)) ⊙ W̃`` that pulls the
   pruned weights towards 0, so the mask can change while training but settles. The written
   weight is ``W̃ ⊙ M(W̃)``, a valid N:M pattern.
3. ``train=all`` also trains every other floating parameter the graph reads (norms, embeddings);
   the default ``masked`` trains only the masked linears (weights + biases).

Trained tensors are written with :func:`fxopt.ir.graph.set_attr` (new tensors: the caller's and
the teacher's are never written); each masked linear keeps its :data:`~fxopt.ir.meta.NM_MASK`
(with ``kept_magnitude`` re-measured on the dense weight for the final mask under ``sr-ste``).
``ensures`` checks every masked weight is still N:M sparse.

Not applicable (a note, nothing changed) without N:M-masked linears or without calibration data.
A ``PreconditionError`` when the dense weights are unknown (``nm-sparsity`` did not run in the
same pipeline) or the graph is offloaded. Not exact: that is the point. ``stats``: ``loss_before``,
``loss_after`` (mean over the calibration batches), ``steps``, ``seconds``, ``trained_tensors``,
``trained_parameters``, ``mask_changed`` (share of mask entries changed, ``sr-ste`` only).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx
from torch.func import functional_call

from ..ir.graph import ExampleInputs, flatten_tensors, get_attr, set_attr
from ..ir.meta import NM_MASK, NMMask
from ..ir.offload import is_offloaded
from ..ir.structure import linears
from .base import NotApplicable, Pass, PassContext, PassResult, PostconditionError, PreconditionError, register_pass
from .nm_sparsity import DENSE_WEIGHTS, is_nm_sparse, nm_mask


class _STE(torch.autograd.Function):
    """``w ⊙ mask`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, w, mask):  # noqa: D102
        return w * mask

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The distillation loss of the module docstring over matching floating outputs."""
    total = None
    for s, t in zip(student, teacher):
        if not (s.is_floating_point() and t.is_floating_point()) or s.numel() == 0:
            continue
        s, t = s.float(), t.float()
        if kind == "mse":
            term = (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
        elif kind == "kl":
            ls = torch.log_softmax(s.reshape(-1, s.shape[-1]), dim=-1)
            lt = torch.log_softmax(t.reshape(-1, t.shape[-1]), dim=-1)
            term = (lt.exp() * (lt - ls)).sum(-1).mean()
        else:
            s2 = s.reshape(-1, s.shape[-1]) if s.dim() > 0 else s.reshape(1, 1)
            t2 = t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
            term = (1 - torch.nn.functional.cosine_similarity(s2, t2, dim=-1, eps=1e-8)).mean()
        total = term if total is None else total + term
    if total is None:
        raise PreconditionError("nm-finetune: the graph has no floating-point output to distill")
    return total


def _run(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor], ex: ExampleInputs) -> list[torch.Tensor]:
    return flatten_tensors(functional_call(gm, tensors, ex.args, ex.kwargs, strict=False))


@register_pass
@dataclass
class NMFinetune(Pass):
    name: ClassVar[str] = "nm-finetune"
    exact: ClassVar[bool] = False
    run_after: ClassVar[tuple[str, ...]] = ("nm-sparsity",)
    summary: ClassVar[str] = "distill the N:M-masked graph towards the dense one on calibration data; masks kept"
    steps: int = 100
    lr: float = 1e-4
    loss: Literal["mse", "cosine", "kl"] = "mse"
    method: Literal["masked", "sr-ste"] = "masked"
    train: Literal["masked", "all"] = "masked"
    decay: float = 2e-4               # SR-STE's λ_w
    seed: int = 0
    time_budget: float = 0.0          # seconds; 0 = no limit (a limit makes the result machine-dependent)

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"nm-finetune: steps must be an integer ≥ 1; got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"nm-finetune: lr must be a finite number > 0; got {self.lr!r}")
        if self.loss not in ("mse", "cosine", "kl"):
            raise ValueError(f"nm-finetune: loss must be 'mse', 'cosine' or 'kl'; got {self.loss!r}")
        if self.method not in ("masked", "sr-ste"):
            raise ValueError(f"nm-finetune: method must be 'masked' or 'sr-ste'; got {self.method!r}")
        if self.train not in ("masked", "all"):
            raise ValueError(f"nm-finetune: train must be 'masked' or 'all'; got {self.train!r}")
        if not self.decay >= 0:
            raise ValueError(f"nm-finetune: decay must be ≥ 0; got {self.decay!r}")
        if not self.time_budget >= 0:
            raise ValueError(f"nm-finetune: time_budget must be ≥ 0 seconds; got {self.time_budget!r}")

    # ------------------------------------------------------------------ what is trained

    @staticmethod
    def _masked(gm) -> list[tuple[object, NMMask, str | None]]:
        """(linear info, its NMMask, bias target) of every linear nm-sparsity masked."""
        out = []
        for li in linears(gm):
            mk = NM_MASK.get(li.node)
            if mk is not None and mk.weight == li.weight:
                out.append((li, mk, li.bias))
        return out

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        masked = self._masked(gm)
        if not masked:
            raise NotApplicable("no linear carries an N:M mask (run nm-sparsity first)")
        if not ctx.calibration:
            raise NotApplicable("no calibration data to distill on (pass calibration=[batch, ...] to optimize)")
        if is_offloaded(gm):
            raise PreconditionError(f"{self.name}: the graph's weights are offloaded to disk; training needs them "
                                    "in memory (optimize without offload_dir)")
        dense = ctx.state.get(DENSE_WEIGHTS)
        if dense is None:
            li = masked[0][0]
            raise PreconditionError(
                f"{self.name}: the dense weights of the masked linears (e.g. {li.path}) are unknown, so there is no "
                "teacher: run nm-finetune in the same pipeline as nm-sparsity (e.g. 'nm-sparsity,nm-finetune')")
        for li, mk, _b in masked:
            w = get_attr(gm, li.weight)
            d = dense.get(li.weight)
            if d is not None and d.shape != w.shape:
                raise PreconditionError(f"{self.name}: {li.path}: dense weight {tuple(d.shape)} does not match the "
                                        f"graph's {tuple(w.shape)} (a pass between nm-sparsity and nm-finetune "
                                        "reshaped it)")
            if not w.is_floating_point():
                raise PreconditionError(f"{self.name}: {li.path}: weight is {w.dtype}; only float weights can be "
                                        "fine-tuned (run nm-finetune before quantization)")

    # ------------------------------------------------------------------ the rewrite

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        dense: dict[str, torch.Tensor] = ctx.state[DENSE_WEIGHTS]
        masked = self._masked(gm)
        batches: list[ExampleInputs] = [ExampleInputs.of(b) for b in ctx.calibration]

        # the graph's tensors by name; functional_call overrides the ones it is given (tied names follow)
        current = {t: get_attr(gm, t).detach() for t in _attr_targets(gm)}
        teacher_tensors = {t: d for t, d in dense.items() if t in current}

        masks: dict[str, torch.Tensor] = {}
        trained: dict[str, torch.Tensor] = {}
        for li, mk, bias in masked:
            w = current[li.weight]
            if self.method == "masked":
                masks[li.weight] = nm_mask(w, mk.n, mk.m)            # the mask nm-sparsity applied
                trained[li.weight] = w.clone().float().requires_grad_(True)
            else:
                start = teacher_tensors.get(li.weight, w)
                trained[li.weight] = start.clone().float().requires_grad_(True)
            if bias is not None and current[bias].is_floating_point():
                trained[bias] = current[bias].clone().float().requires_grad_(True)
        if self.train == "all":
            for t, v in current.items():
                if t not in trained and v.is_floating_point() and v.numel() > 0:
                    trained[t] = v.clone().float().requires_grad_(True)
        nm = {li.weight: (mk.n, mk.m) for li, mk, _ in masked}

        def student_tensors() -> dict[str, torch.Tensor]:
            out = {}
            for t, p in trained.items():
                if t in nm and self.method == "sr-ste":
                    out[t] = _STE.apply(p, nm_mask(p.detach(), *nm[t]).to(p.dtype))
                else:
                    out[t] = p
                out[t] = out[t].to(current[t].dtype)
            return out

        with torch.no_grad():
            teacher_out = [[o.detach() for o in _run(gm, teacher_tensors, b)] for b in batches]

        def evaluate() -> float:
            with torch.no_grad():
                st = student_tensors()
                return sum(float(distill_loss(_run(gm, st, b), t, self.loss))
                           for b, t in zip(batches, teacher_out)) / len(batches)

        loss_before = evaluate()
        opt = torch.optim.Adam(list(trained.values()), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        steps = 0
        deadline = t0 + self.time_budget if self.time_budget > 0 else math.inf
        was_grad = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        try:
            while steps < self.steps and time.perf_counter() < deadline:
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                i = order.pop()
                opt.zero_grad(set_to_none=True)
                loss = distill_loss(_run(gm, student_tensors(), batches[i]), teacher_out[i], self.loss)
                if not torch.isfinite(loss):
                    raise PreconditionError(f"{self.name}: the loss became {float(loss)} at step {steps}; "
                                            f"lower lr (now {self.lr})")
                loss.backward()
                with torch.no_grad():
                    for t, p in trained.items():
                        if p.grad is None or t not in nm:
                            continue
                        if self.method == "masked":
                            p.grad.mul_(masks[t])                    # masked weights get no update
                        elif self.decay > 0:                        # SR-STE's sparse-refined term
                            keep = nm_mask(p, *nm[t])
                            p.grad.add_(self.decay * p * (~keep))
                opt.step()
                with torch.no_grad():
                    for t, mask in masks.items():
                        trained[t].mul_(mask)                        # masks re-applied: exact zeros
                steps += 1
        finally:
            torch.set_grad_enabled(was_grad)

        # write the result: new tensors, N:M masks in the written weights
        changed_mask = total_mask = 0
        with torch.no_grad():
            for t, p in trained.items():
                v = p.detach()
                if t in nm:
                    keep = nm_mask(v, *nm[t]) if self.method == "sr-ste" else masks[t]
                    v = v * keep
                    if self.method == "sr-ste":
                        before = current[t] != 0
                        changed_mask += int((keep != before).sum())
                        total_mask += keep.numel()
                set_attr(gm, t, v.to(current[t].dtype).contiguous())
            for li, mk, _b in masked:
                if self.method == "sr-ste":
                    d = teacher_tensors.get(li.weight, current[li.weight]).abs().double()
                    keep = get_attr(gm, li.weight) != 0
                    NM_MASK.set(li.node, NMMask(mk.n, mk.m, mk.weight, kept_magnitude=float(d[keep].sum()),
                                                total_magnitude=mk.total_magnitude))
        loss_after = evaluate_after(gm, batches, teacher_out, self.loss)
        stats = {
            "method": self.method,
            "loss": self.loss,
            "loss_before": round(loss_before, 6),
            "loss_after": round(loss_after, 6),
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 3),
            "batches": len(batches),
            "trained_tensors": len(trained),
            "trained_parameters": sum(p.numel() for p in trained.values()),
        }
        if self.method == "sr-ste":
            stats["mask_changed"] = round(changed_mask / max(total_mask, 1), 6)
        notes = [f"distilled {len(masked)} masked linears on {len(batches)} calibration batches for {steps} steps: "
                 f"{self.loss} loss {loss_before:.4g} → {loss_after:.4g}"]
        if steps < self.steps:
            notes.append(f"stopped after {steps} of {self.steps} steps: time_budget={self.time_budget} s reached")
        return PassResult(gm, steps > 0, stats=stats, notes=notes)

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        super().ensures(result, ctx)
        gm = result.graph_module
        for li, mk, _b in self._masked(gm):
            if not is_nm_sparse(get_attr(gm, li.weight), mk.n, mk.m):
                raise PostconditionError(f"{self.name}: {li.path} is not {mk.n}:{mk.m} sparse after fine-tuning")


def evaluate_after(gm, batches, teacher_out, kind) -> float:
    """Mean loss of the graph as written (its own tensors) over the batches."""
    with torch.no_grad():
        return sum(float(distill_loss(_run(gm, {}, b), t, kind)) for b, t in zip(batches, teacher_out)) / len(batches)


def _attr_targets(gm: torch.fx.GraphModule) -> list[str]:
    """Parameter / buffer names the graph reads through get_attr (the names functional_call takes)."""
    registered = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    registered |= {k for k, _ in gm.named_buffers(remove_duplicate=False)}
    seen, out = set(), []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in seen and n.target in registered:
            seen.add(n.target)
            out.append(n.target)
    return out
