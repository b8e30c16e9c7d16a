"""PassManager: runs a pipeline with records, instruments, exactness checks and reproducers.

For each pass, in order:

1. ``should_run`` of every instrument (bisection) — a skipped pass is recorded as ``skipped``;
2. order constraints were checked once, up front (:func:`~fxopt.passes.pipeline.check_order`);
3. a snapshot of the graph is kept (``transactional=True``) so a failing pass leaves no
   half-rewritten graph and its *input* can be written as a reproducer;
4. ``requires`` → ``call`` → ``ensures``; ``NotApplicable`` from ``requires`` becomes a note;
5. a :class:`PassRecord`: graph text, op histogram, parameter bytes, drift of the outputs vs.
   the original on the example inputs, seconds, notes and stats;
6. a pass declared ``exact`` that modified the graph must keep the outputs equal to float
   tolerance (``|Δ| ≤ atol + rtol·max|y|``), else :class:`PostconditionError`.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx

from .. import _io
from ..ir.graph import ExampleInputs, clone, call, flatten_tensors, graph_text, op_histogram, parameter_bytes
from ..ir.meta import APPLIED
from .base import NotApplicable, Pass, PassContext, PassError, PassResult, PostconditionError
from .instruments import Instrument, PassRecord
from .pipeline import check_order, format_pass, format_pipeline, resolve


class PassFailedError(PassError):
    """A pass raised; the message names it, the passes before it, and the reproducer folder."""

    def __init__(self, msg: str, reproducer: Path | None = None):
        super().__init__(msg)
        self.reproducer = reproducer


def measure_drift(gm: torch.nn.Module, ctx: PassContext, reference: list[torch.Tensor] | None = None
                  ) -> tuple[float | None, float | None, float | None, str | None]:
    """(max |Δ|, mean |Δ|, max |Δ| / max |y|, problem) of ``gm``'s outputs vs. the reference
    (the original model's outputs unless ``reference`` is given)."""
    ref = reference if reference is not None else ctx.reference_outputs
    if ctx.example_inputs is None or ref is None:
        return None, None, None, None
    outs = flatten_tensors(call(gm, ctx.example_inputs))
    if reference is None:
        ctx.state["last_outputs"] = [t.detach() for t in outs]   # the next exact pass compares against these
    if len(outs) != len(ref):
        return float("inf"), float("inf"), float("inf"), f"the graph now returns {len(outs)} tensors, not {len(ref)}"
    dmax, dsum, n, scale = 0.0, 0.0, 0, 0.0
    for o, r in zip(outs, ref):
        if o.shape != r.shape:
            return float("inf"), float("inf"), float("inf"), f"output shape {tuple(o.shape)} != {tuple(r.shape)}"
        if not (o.is_floating_point() or r.is_floating_point()):
            d = (o != r).to(torch.float64)
        else:
            d = (o.to(torch.float64) - r.to(torch.float64)).abs()
            scale = max(scale, float(r.abs().max()) if r.numel() else 0.0)
        if d.numel():
            dmax = max(dmax, float(d.max()))
            dsum += float(d.sum())
            n += d.numel()
    return dmax, dsum / max(n, 1), dmax / max(scale, 1e-12), None


def make_record(index: int, name: str, gm: torch.fx.GraphModule, ctx: PassContext, *, modified: bool,
                seconds: float, status: str, notes: list[str], stats: dict | None = None,
                drift: bool = True) -> PassRecord:
    dmax = dmean = drel = None
    notes = list(notes)
    if drift:
        dmax, dmean, drel, problem = measure_drift(gm, ctx)
        if problem:
            notes.append(problem)
    return PassRecord(index=index, name=name, modified=modified, seconds=seconds, graph=graph_text(gm),
                      ops=op_histogram(gm), num_nodes=len(gm.graph.nodes), param_bytes=parameter_bytes(gm),
                      drift_max=dmax, drift_mean=dmean, drift_rel=drel, status=status, notes=notes,
                      stats=dict(stats or {}))


class PassManager:
    def __init__(self, passes, instruments: Iterable[Instrument] = (), *, check_exact: bool = True,
                 exact_rtol: float = 1e-4, exact_atol: float = 1e-5, transactional: bool = True,
                 reproducer_dir: str | Path | None = None, measure: bool = True):
        self.passes: list[Pass] = resolve(passes)
        self.instruments = list(instruments)
        self.check_exact = check_exact
        self.exact_rtol, self.exact_atol = exact_rtol, exact_atol
        self.transactional = transactional
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir else None
        self.measure = measure

    @property
    def text(self) -> str:
        return format_pipeline(self.passes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None, *, first_index: int = 1
            ) -> tuple[torch.fx.GraphModule, list[PassRecord]]:
        ctx = ctx or PassContext()
        applied = list(APPLIED.get(gm) or [])
        check_order(self.passes, applied)
        ctx.applied = applied
        records: list[PassRecord] = []
        for offset, p in enumerate(self.passes):
            index = first_index + offset
            name = format_pass(p)
            if not all(inst.should_run(p, index) for inst in self.instruments):
                rec = make_record(index, name, gm, ctx, modified=False, seconds=0.0, status="skipped",
                                  notes=["skipped by bisect"], drift=False)
                records.append(rec)
                for inst in self.instruments:
                    inst.run_after_pass(p, rec, gm, ctx)
                continue
            for inst in self.instruments:
                inst.run_before_pass(p, gm, ctx)
            snapshot = clone(gm) if self.transactional else None
            check = p.exact and self.check_exact and ctx.example_inputs is not None
            before = None
            if check:
                before = ctx.state.get("last_outputs") if self.measure else None
                if before is None:
                    before = [t.detach() for t in flatten_tensors(call(gm, ctx.example_inputs))]
            t0 = time.perf_counter()
            try:
                try:
                    p.requires(gm, ctx)
                except NotApplicable as na:
                    result = PassResult(gm, False, notes=[f"not applied: {na}"])
                    status = "not-applicable"
                else:
                    result = p.call(gm, ctx)
                    if not isinstance(result, PassResult):
                        raise PostconditionError(f"{p.name}: call() must return a PassResult, got {type(result).__name__}")
                    p.ensures(result, ctx)
                    status = "ran"
            except Exception as e:  # noqa: BLE001
                repro = self._reproduce(p, index, snapshot, ctx, e)
                before = ", ".join(format_pass(q) for q in self.passes[:offset]) or "(none)"
                where = f"; reproducer written to {repro}" if repro else ""
                text = str(e)
                if len(text) > 1500:                      # lint errors print the whole graph
                    text = text[:1500] + f" ... [{len(text) - 1500} more characters; see the reproducer]"
                raise PassFailedError(f"pass #{index} {name!r} failed: {type(e).__name__}: {text}\n"
                                      f"passes before it: {before}{where}", repro) from e
            seconds = time.perf_counter() - t0
            gm = result.graph_module
            if result.modified:
                gm.recompile()
                ctx.applied.append(name)
                APPLIED.set(gm, list(ctx.applied))
            ctx.state.pop("last_outputs", None)
            rec = make_record(index, name, gm, ctx, modified=result.modified, seconds=seconds, status=status,
                              notes=result.notes, stats=result.stats, drift=self.measure)
            records.append(rec)
            if check and result.modified:
                dmax, _, drel, _ = measure_drift(gm, ctx, reference=before)
                scale = dmax / drel if drel else 0.0
                bound = self.exact_atol + self.exact_rtol * scale
                if not dmax <= bound:
                    repro = self._reproduce(p, index, snapshot, ctx, None)
                    raise PostconditionError(
                        f"pass #{index} {name!r} is declared exact but changed the outputs: max |Δ| = "
                        f"{dmax:.3g} > {bound:.3g} vs. the graph before it (passes before it: "
                        f"{', '.join(format_pass(q) for q in self.passes[:offset]) or '(none)'})"
                        + (f"; reproducer written to {repro}" if repro else ""))
            for inst in self.instruments:
                inst.run_after_pass(p, rec, gm, ctx)
        return gm, records

    # ------------------------------------------------------------------ reproducer

    def _reproduce(self, p: Pass, index: int, snapshot, ctx: PassContext, err: Exception | None) -> Path | None:
        if self.reproducer_dir is None or snapshot is None:
            return None
        try:
            return write_reproducer(self.reproducer_dir, self.passes, index, p, snapshot, ctx, err)
        except Exception:  # noqa: BLE001 - a reproducer must never hide the real error
            return None


REPRO_SCRIPT = '''"""Re-run the pass that failed on the graph it was given. Run: python repro.py"""
import importlib, pathlib, torch, fxopt
here = pathlib.Path(__file__).parent
importlib.import_module((here / "pass_module.txt").read_text().strip())   # registers the pass
gm = torch.export.load(here / "graph_before.pt2").module()
args, kwargs = torch.load(here / "inputs.pt", weights_only=False)
p = fxopt.passes.parse_pipeline((here / "failing_pass.txt").read_text().strip())[0]
ex = fxopt.ir.ExampleInputs(args, kwargs)
ctx = fxopt.passes.PassContext(example_inputs=ex)
before = fxopt.ir.flatten_tensors(gm(*args, **kwargs))
p.requires(gm, ctx)
result = p.call(gm, ctx)
p.ensures(result, ctx)
gm.recompile()
after = fxopt.ir.flatten_tensors(gm(*args, **kwargs))
drift = max(float((a - b).abs().max()) for a, b in zip(after, before)) if after else 0.0
print("pass ran without error:", result.modified, result.notes)
print(f"max |output change| = {drift:.3g}" + (" (the pass is declared exact)" if p.exact else ""))
'''


def write_reproducer(folder: Path, passes: list[Pass], index: int, p: Pass, snapshot: torch.fx.GraphModule,
                     ctx: PassContext, err: Exception | None) -> Path:
    """Pipeline text, the failing pass, the graph it was given (text and .pt2), inputs, a script."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _io.write_text(folder / "pipeline.txt", format_pipeline(passes) + f"\n# failed at pass #{index}\n")
    _io.write_text(folder / "failing_pass.txt", format_pass(p) + "\n")
    _io.write_text(folder / "pass_module.txt", type(p).__module__ + "\n")
    _io.write_text(folder / "graph_before.txt", graph_text(snapshot))
    msg = "".join(traceback.format_exception(err)) if err is not None else "outputs changed by an exact pass\n"
    problems = []
    if ctx.example_inputs is not None:
        ex: ExampleInputs = ctx.example_inputs
        with _io.atomic_path(folder / "inputs.pt") as tmp:
            torch.save((ex.args, ex.kwargs), tmp)
        try:
            ep = torch.export.export(snapshot, ex.args, ex.kwargs, strict=False)
            with _io.atomic_path(folder / "graph_before.pt2", suffix=".pt2") as tmp:
                torch.export.save(ep, tmp)
            _io.write_text(folder / "repro.py", REPRO_SCRIPT)
        except Exception as e:  # noqa: BLE001
            problems.append(f"could not save graph_before.pt2: {type(e).__name__}: {e}")
    _io.write_text(folder / "error.txt", msg + "".join(f"\n{x}" for x in problems))
    return folder


def run_passes(gm: torch.fx.GraphModule, passes: Any, ctx: PassContext | None = None, **kw):
    """One-shot helper: ``run_passes(gm, "cleanup")`` → (gm, records)."""
    return PassManager(passes, **kw).run(gm, ctx)
