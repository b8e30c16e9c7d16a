"""Calibration: run the graph on user batches and observe chosen nodes.

Used by the passes that need activation statistics (``smoothquant``, ``insert-qdq`` static).
The graph runs under a :class:`torch.fx.Interpreter` that frees every value after its last use,
so memory stays near one batch's live activations; each watched value is reduced to
statistics on the spot:

* per-channel (last dim) ``min``, ``max`` and ``absmax`` — SmoothQuant's ``max|X_j|``;
* per-tensor min / max follow from them;
* a seeded random sample of rows (tokens), for searches that need real activations
  (SmoothQuant's α search, sensitivity checks) — at most ``sample_rows`` rows per node;
* a seeded random sample of |x| values, for percentile ranges (``percentile(stats, 99.99)``).

Bad calibration data (no batch, NaN or inf in a float input) is refused with the batch and
input named. Statistics land in ``node.meta["fxopt_calib"]`` (:data:`fxopt.ir.meta.CALIB_STATS`).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx
import torch.fx._pytree as fx_pytree

from ..ir.graph import ExampleInputs
from ..ir.meta import CALIB_STATS, ObserverStats, describe
from .base import PreconditionError


def check_batches(batches: list[ExampleInputs] | None, who: str) -> list[ExampleInputs]:
    if batches is None:
        raise PreconditionError(f"{who} needs calibration data: pass calibration=[batch, ...] to optimize() "
                                "(each batch in the same form as example_inputs)")
    if not batches:
        raise PreconditionError(f"{who}: calibration data is empty")
    for i, b in enumerate(batches):
        for name, t in b.tensors():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
                raise PreconditionError(f"{who}: calibration batch {i} input {name!r} contains {bad}; "
                                        "clean the data (calibration must look like real inputs)")
    return batches


def flat_inputs(gm: torch.fx.GraphModule, inputs: ExampleInputs) -> list:
    """Inputs in placeholder order (exported modules take a pytree spec)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return list(fx_pytree.tree_flatten_spec((inputs.args, inputs.kwargs), spec))
    if inputs.kwargs:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return [*inputs.args, *[inputs.kwargs[n] for n in names[len(inputs.args):]]]
    return list(inputs.args)


class _Watcher(torch.fx.Interpreter):
    def __init__(self, gm, watch: dict[torch.fx.Node, "_Acc"]):
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch

    def run_node(self, n):
        out = super().run_node(n)
        acc = self.watch.get(n)
        if acc is not None:
            acc.update(n, out)
        return out


class _Acc:
    def __init__(self, sample_rows: int, sample_values: int, gen: torch.Generator):
        self.cmin = self.cmax = None
        self.rows: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.n = 0
        self.sample_rows, self.sample_values, self.gen = sample_rows, sample_values, gen

    def update(self, node, out) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        x = out.detach().to(torch.float32)
        flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        lo, hi = flat.amin(0), flat.amax(0)            # NaN propagates through both
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
            raise PreconditionError(f"calibration: {describe(node)} produced NaN/inf on batch {self.n}")
        self.cmin = lo if self.cmin is None else torch.minimum(self.cmin, lo)
        self.cmax = hi if self.cmax is None else torch.maximum(self.cmax, hi)
        if self.sample_rows:
            k = min(self.sample_rows, flat.shape[0])
            idx = torch.randperm(flat.shape[0], generator=self.gen)[:k]
            self.rows.append(flat[idx].clone())
        if self.sample_values:
            v = flat.reshape(-1).abs()
            k = min(self.sample_values, v.numel())
            idx = torch.randint(0, v.numel(), (k,), generator=self.gen)
            self.values.append(v[idx].clone())
        self.n += 1

    def stats(self) -> ObserverStats:
        extra = {}
        if self.rows:
            rows = torch.cat(self.rows)
            if rows.shape[0] > self.sample_rows:
                rows = rows[torch.randperm(rows.shape[0], generator=self.gen)[: self.sample_rows]]
            extra["rows"] = rows
        if self.values:
            extra["abs_values"] = torch.cat(self.values)
        absmax = torch.maximum(self.cmin.abs(), self.cmax.abs()) if self.cmin is not None else None
        return ObserverStats(min=self.cmin, max=self.cmax, absmax_per_channel=absmax, num_batches=self.n,
                             extra=extra)


def observe(gm: torch.fx.GraphModule, batches: Iterable[ExampleInputs], nodes: Iterable[torch.fx.Node], *,
            sample_rows: int = 0, sample_values: int = 0, progress: bool | None = None, desc: str = "calibrating",
            seed: int = 0) -> dict[torch.fx.Node, ObserverStats]:
    """Run ``gm`` on every batch and return (and store in meta) the statistics of ``nodes``."""
    from tqdm.auto import tqdm

    batches = list(batches)
    gen = torch.Generator().manual_seed(seed)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(set(nodes), key=lambda n: order.get(n, -1))      # graph order: the sampling is reproducible
    watch = {n: _Acc(sample_rows, sample_values // max(len(batches), 1) if sample_values else 0, gen) for n in nodes}
    if not watch:
        return {}
    interp = _Watcher(gm, watch)
    show = progress if progress is not None else len(batches) > 4
    with torch.no_grad():
        for i, b in enumerate(tqdm(batches, desc=desc, disable=not show, leave=False)):
            try:
                interp.run(*flat_inputs(gm, b))
            except AssertionError as e:
                if "Guard failed" not in str(e):
                    raise
                raise PreconditionError(
                    f"calibration batch {i} ({b}) does not fit the captured graph's shapes ({str(e).splitlines()[0]}); "
                    "capture with dynamic=True, or give calibration batches of the example inputs' shape") from e
    out = {}
    for n, acc in watch.items():
        if acc.cmin is None:
            continue
        st = acc.stats()
        CALIB_STATS.set(n, st)
        out[n] = st
    return out


def tensor_range(stats: ObserverStats, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
    """Per-tensor (min, max) of an observed value: its extremes, or a symmetric percentile of |x|."""
    lo, hi = float(stats.min.min()), float(stats.max.max())
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        vals = stats.extra.get("abs_values")
        if vals is None or vals.numel() == 0:
            raise PreconditionError("percentile ranges need sample_values > 0 during calibration")
        vals = vals[: 1 << 24]
        p = float(torch.quantile(vals.to(torch.float32), percentile / 100.0)) if vals.numel() < (1 << 24) else \
            float(vals.kthvalue(max(1, int(vals.numel() * percentile / 100.0))).values)
        return max(lo, -p), min(hi, p)
    raise PreconditionError(f"unknown range method {method!r}: use minmax or percentile")
