"""Calibration: run the graph on user batches and observe chosen nodes.

Used by the passes that need activation statistics (``smoothquant``, ``insert-qdq`` static).
The graph runs under a :class:`torch.fx.Interpreter` that frees every value after its last use,
so memory stays near one batch's live activations; each watched value is reduced to
statistics on the spot:

* per-channel (last dim) ``min``, ``max`` and ``absmax`` — SmoothQuant's ``max|X_j|``;
* per-channel sum of squares and the row count — the RMS ``‖X_j‖₂ / √rows`` that activation-aware
  pruning scores weights with (Wanda; :func:`channel_rms`);
* per-tensor min / max follow from them;
* a seeded random sample of rows (tokens), for searches that need real activations
  (SmoothQuant's α search, sensitivity checks) — at most ``sample_rows`` rows per node;
* a seeded random sample of |x| values, for percentile ranges (``percentile(stats, 99.99)``).

Bad calibration data (no batch, NaN or inf in a float input) is refused with the batch and
input named. Statistics land in ``node.meta["fxopt_calib"]`` (:data:`fxopt.ir.meta.CALIB_STATS`).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.fx

from ..ir.graph import ExampleInputs, flat_inputs
from ..ir.graph import get_attr
from ..ir.meta import CALIB_STATS, ObserverStats, describe, module_path
from ..ir.offload import OffloadInterpreter, offload_map
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


class _Watcher(OffloadInterpreter):
    def __init__(self, gm, watch: dict[torch.fx.Node, "_Acc"]):
        super().__init__(gm)
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
        self.sumsq: torch.Tensor | None = None
        self.count = 0
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
        sq = (flat * flat).sum(0, dtype=torch.float64)     # float64 accumulation, no float64 copy of x
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.count += flat.shape[0]
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
        if self.sumsq is not None:
            extra["sumsq"] = self.sumsq
            extra["count"] = torch.tensor(self.count)
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
            seed: int = 0, layerwise: bool = False, report: dict | None = None) -> dict[torch.fx.Node, ObserverStats]:
    """Run ``gm`` on every batch and return (and store in meta) the statistics of ``nodes``.

    ``layerwise=False`` runs one batch at a time through the whole graph. ``layerwise=True`` runs
    the graph one *layer* at a time (layers are the module paths up to their first index, e.g.
    ``model.layers.3``): every batch goes through a layer before the next layer starts, the
    layer's weights are fetched once for all batches and released after it, and only the values
    crossing the layer boundary are kept, for every batch. With weights offloaded to disk
    (:mod:`fxopt.ir.offload`) resident weight memory stays near one layer. Both modes give the same
    statistics (each watched node samples with its own seeded generator). ``report``, if given,
    receives the mode, the number of segments, weight loads and peak bytes.
    """
    from tqdm.auto import tqdm

    batches = list(batches)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(set(nodes), key=lambda n: order.get(n, -1))      # graph order: the sampling is reproducible
    per_batch_values = sample_values // max(len(batches), 1) if sample_values else 0
    watch = {n: _Acc(sample_rows, per_batch_values, torch.Generator().manual_seed(seed * 1_000_003 + order[n]))
             for n in nodes}
    if not watch:
        return {}
    show = progress if progress is not None else len(batches) > 4
    with torch.no_grad():
        if layerwise:
            info = _run_layerwise(gm, batches, watch, show, desc)
        else:
            interp = _Watcher(gm, watch)
            for i, b in enumerate(tqdm(batches, desc=desc, disable=not show, leave=False)):
                with _guard_errors(i, b):
                    interp.run(*flat_inputs(gm, b))
            om = offload_map(gm)
            info = {"mode": "batch", "weight_loads": len(batches) * len(om.files) if om else 0}
    if report is not None:
        report.update(info)
    out = {}
    for n, acc in watch.items():
        if acc.cmin is None:
            continue
        st = acc.stats()
        CALIB_STATS.set(n, st)
        out[n] = st
    return out


@contextlib.contextmanager
def _guard_errors(i, b):
    try:
        yield
    except AssertionError as e:
        if "Guard failed" not in str(e):
            raise
        raise PreconditionError(
            f"calibration batch {i} ({b}) does not fit the captured graph's shapes ({str(e).splitlines()[0]}); "
            "capture with dynamic=True, or give calibration batches of the example inputs' shape") from e


def layer_key(n: torch.fx.Node) -> str:
    """The layer a node belongs to: its module path up to the first numeric part (``model.layers.3``)."""
    parts = module_path(n).split(".") if module_path(n) else []
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if parts else ""


def _tensor_bytes(values) -> int:
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor) and not v.is_meta:
            key = (v.untyped_storage().data_ptr(), v.storage_offset())
            if key not in seen:
                seen.add(key)
                total += v.numel() * v.element_size()
    return total


def _run_layerwise(gm: torch.fx.GraphModule, batches: list[ExampleInputs], watch: dict, show: bool, desc: str) -> dict:
    from tqdm.auto import tqdm

    nodes = list(gm.graph.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    last_use: dict[torch.fx.Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = idx[n]
    envs: list[dict] = [{} for _ in batches]
    flats = [flat_inputs(gm, b) for b in batches]
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    weights: dict[str, torch.Tensor] = {}
    om = offload_map(gm)
    segment, segments, loads = None, 0, 0
    peak_w = peak_act = 0
    n_ph = 0
    keys = [layer_key(n) if n.op not in ("placeholder", "get_attr", "output") else None for n in nodes]
    total = sum(1 for k in keys if k is not None)
    bar = tqdm(total=total, desc=f"{desc} (layer-wise)", disable=not show, leave=False)
    for i, n in enumerate(nodes):
        if n.op == "get_attr":
            continue
        if n.op == "placeholder":
            for env, flat in zip(envs, flats):
                env[n] = flat[n_ph]
            n_ph += 1
            continue
        if n.op == "output":
            break
        if keys[i] != segment:
            peak_act = max(peak_act, sum(_tensor_bytes(e.values()) for e in envs))
            weights.clear()                          # the previous layer's weights go
            segment, segments = keys[i], segments + 1
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a.target not in weights:
                weights[a.target] = get_attr(gm, a.target)
                loads += 1 if om is not None and a.target in om.files else 0
        peak_w = max(peak_w, _tensor_bytes(weights.values()))
        acc = watch.get(n)
        for b, env in enumerate(envs):
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    env[a] = weights[a.target]
            interp.env = env
            with _guard_errors(b, batches[b]):
                out = interp.run_node(n)
            env[n] = out
            if acc is not None:
                acc.update(n, out)
        for a in n.all_input_nodes:
            if last_use.get(a) == i:
                for env in envs:
                    env.pop(a, None)
        bar.update(1)
    bar.close()
    return {"mode": "layerwise", "segments": segments, "weight_loads": loads,
            "peak_weight_bytes": peak_w, "peak_activation_bytes": peak_act}


def channel_rms(stats: ObserverStats) -> torch.Tensor:
    """Per-channel (last dim) root mean square over every calibration row: ``√(Σ_t x_tj² / T)``.
    Proportional to Wanda's ``‖X_j‖₂``; the mean makes it independent of the amount of data."""
    if "sumsq" not in stats.extra:
        raise PreconditionError("channel_rms needs statistics recorded by fxopt.passes.calibration.observe")
    return (stats.extra["sumsq"] / max(int(stats.extra["count"]), 1)).sqrt().to(torch.float32)


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
