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
   tolerance (``|Δ| ≤ atol + rtol·max|y|``, rtol widened to 16·eps for bfloat16/float16
   graphs, see :meth:`PassManager._exact_rtol`), else :class:`PostconditionError`.

Drift is measured in float64 and never stops the pipeline: when the graph cannot be run or
compared, the record's drift is ``None`` and a note names the reason.
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
    (the original model's outputs unless ``reference`` is given), computed in float64 whatever the
    model's dtype.

    Never raises: when the graph cannot be run or compared, drift is ``None`` and ``problem`` says why.
    """
    ref = reference if reference is not None else ctx.reference_outputs
    if ctx.example_inputs is None or ref is None:
        return None, None, None, None
    try:
        outs = flatten_tensors(call(gm, ctx.example_inputs))
        if reference is None:
            ctx.state["last_outputs"] = [t.detach() for t in outs]   # the next exact pass compares against these
        return _compare(outs, ref)
    except Exception as e:  # noqa: BLE001 - a measurement must not stop the pipeline
        text = (str(e).strip().splitlines() or [""])[0][:300]
        return None, None, None, f"drift not measured: {type(e).__name__}: {text}"


def _compare(outs: list[torch.Tensor], ref: list[torch.Tensor]
             ) -> tuple[float | None, float | None, float | None, str | None]:
    from torch._subclasses.fake_tensor import FakeTensor

    if any(isinstance(t, FakeTensor) for t in [*outs, *ref]):
        return None, None, None, ("drift not measured: the outputs are FakeTensors (an input object such as a "
                                  "cache holds tensors left by tracing)")
    if len(outs) != len(ref):
        return float("inf"), float("inf"), float("inf"), f"the graph now returns {len(outs)} tensors, not {len(ref)}"
    dmax, dsum, n, scale = 0.0, 0.0, 0, 0.0
    for o, r in zip(outs, ref):
        if o.shape != r.shape:
            return float("inf"), float("inf"), float("inf"), f"output shape {tuple(o.shape)} != {tuple(r.shape)}"
        if not (o.is_floating_point() or r.is_floating_point()):
            d = (o != r).to(torch.float64)
        else:
            r64 = r.detach().to(torch.float64)
            d = (o.detach().to(torch.float64) - r64).abs()
            scale = max(scale, float(r64.abs().max()) if r.numel() else 0.0)
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
            before, unchecked = None, None
            if check:
                before = ctx.state.get("last_outputs") if self.measure else None
                if before is None:
                    try:
                        before = [t.detach() for t in flatten_tensors(call(gm, ctx.example_inputs))]
                    except Exception as e:  # noqa: BLE001 - the pass still runs; the record says it was not checked
                        unchecked = f"exactness not checked: the graph before it failed to run ({type(e).__name__}: " \
                                    f"{(str(e).strip().splitlines() or [''])[0][:200]})"
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
                self._check_exact(p, index, offset, gm, ctx, before, snapshot, rec, unchecked)
            for inst in self.instruments:
                inst.run_after_pass(p, rec, gm, ctx)
        return gm, records

    # ------------------------------------------------------------------ exactness

    def _check_exact(self, p: Pass, index: int, offset: int, gm, ctx: PassContext, before, snapshot,
                     rec: PassRecord, unchecked: str | None) -> None:
        """Outputs after an exact pass vs. before it; a note when they cannot be compared."""
        name = format_pass(p)
        earlier = ", ".join(format_pass(q) for q in self.passes[:offset]) or "(none)"
        if before is None:
            rec.notes.append(unchecked or "exactness not checked: no outputs of the graph before it")
            return
        after = ctx.state.get("last_outputs")      # make_record ran the new graph already (measure=True)
        if after is None:
            try:
                after = [t.detach() for t in flatten_tensors(call(gm, ctx.example_inputs))]
            except Exception as e:  # noqa: BLE001 - the graph before it ran: the pass broke it
                repro = self._reproduce(p, index, snapshot, ctx, e)
                raise PostconditionError(
                    f"pass #{index} {name!r} is declared exact but the graph after it fails on the example inputs "
                    f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}); the graph before it "
                    f"ran (passes before it: {earlier})" + (f"; reproducer written to {repro}" if repro else "")) from e
        dmax, _, drel, problem = _compare(after, before)
        if dmax is None:
            rec.notes.append(f"exactness not checked: {problem}")
            return
        scale = dmax / drel if drel else 0.0
        dtype, rtol = self._exact_rtol(gm, before)
        bound = self.exact_atol + rtol * scale
        if not dmax <= bound:
            repro = self._reproduce(p, index, snapshot, ctx, None)
            raise PostconditionError(
                f"pass #{index} {name!r} is declared exact but changed the outputs: max |Δ| = {dmax:.3g} > "
                f"{bound:.3g} (tolerance {self.exact_atol:g} + {rtol:.3g}·max|y| for "
                f"{str(dtype).replace('torch.', '')}) vs. the graph before it (passes before it: {earlier})"
                + (f"; reproducer written to {repro}" if repro else ""))

    # A rewrite that is exact in real arithmetic (smoothquant: W·s and γ/s) still re-rounds every
    # tensor it rescales, so in bfloat16/float16 the outputs move by a few units of the dtype's eps.
    # Measured (smoothquant on random gpt2/llama/bert, 2-24 layers, width 32-256, bf16 and fp16): the
    # model's own rounding, its outputs in that dtype vs. the same weights run in float32, is
    # 0.3-5.2 eps·max|y|; the pass moved the outputs 1.0-2.5x as much, 0.4-6.4 eps·max|y| (two
    # independent roundings instead of one). The bound, 16 eps·max|y|, leaves 2.5x headroom over the
    # largest change measured. In float32 (eps 1.2e-7) ``exact_rtol`` (1e-4) is larger and applies.
    EXACT_EPS_FACTOR = 16
    _COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def _exact_rtol(self, gm: torch.nn.Module, outputs: list[torch.Tensor]) -> tuple[torch.dtype, float]:
        """(the least precise float dtype among the outputs and the weights, the rtol for it)."""
        dtypes = {t.dtype for t in outputs} | {t.dtype for t in gm.parameters()} | {t.dtype for t in gm.buffers()}
        dtypes &= set(self._COMPUTE_DTYPES)
        if not dtypes:
            return torch.float32, self.exact_rtol
        dtype = max(dtypes, key=lambda d: torch.finfo(d).eps)
        return dtype, max(self.exact_rtol, self.EXACT_EPS_FACTOR * torch.finfo(dtype).eps)

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
