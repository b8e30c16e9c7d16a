"""``fxopt.optimize``: capture → passes → result with a record per pass."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx

from .ir.capture import CaptureError, capture
from .ir.graph import ExampleInputs, clone, call, flatten_tensors
from .ir.meta import CAPTURE
from .passes.base import PassContext, PassError
from .passes.instruments import Bisect, Dump, Instrument, PassRecord, PrintAfter, diff_records
from .passes.manager import PassManager, make_record
from .passes.pipeline import format_pipeline, resolve


@dataclass
class OptimizeResult:
    """The optimized module and what every pass did to it."""

    module: torch.fx.GraphModule
    records: list[PassRecord]
    pipeline: str
    example_inputs: ExampleInputs
    capture_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    moe_runtime_: Any = field(default=None, repr=False)      # the MoERuntime made by moe_runtime()
    decoder: Any = None              # fxopt.ir.decoder.DecoderLayout when captured with task="text-generation"
    model_config: Any = field(default=None, repr=False)      # the HF config of a decoder (for genai_config.json)

    # ------------------------------------------------------------------ records

    def record(self, key: int | str) -> PassRecord:
        """A record by index (0 = the captured graph) or by pass name (the last one of that name)."""
        if isinstance(key, int):
            for r in self.records:
                if r.index == key:
                    return r
            raise KeyError(f"no record #{key}; records are 0..{self.records[-1].index}")
        matches = [r for r in self.records if r.name == key or r.name.split("{", 1)[0] == key]
        if not matches:
            raise KeyError(f"no pass {key!r} in this pipeline: {', '.join(r.name for r in self.records)}")
        return matches[-1]

    def diff(self, a: int | str = 0, b: int | str | None = None, context: int = 2) -> str:
        """Unified diff of the graph between two records (default: captured vs. final)."""
        rb = self.records[-1] if b is None else self.record(b)
        return diff_records(self.record(a), rb, context=context)

    def report(self) -> str:
        """The pass-by-pass table (and the MoE blocks, their plans and recompilations, if any)."""
        from .passes.moe_recompile import moe_report
        return format_records(self.records) + moe_report(self.module, self.moe_runtime_)

    def moe_runtime(self, **kwargs):
        """A :class:`fxopt.passes.moe_recompile.MoERuntime` serving :attr:`module` (after
        ``moe-recompile``): call it per batch or ``.run(batches)``; :meth:`report` then shows
        its plans and recompilations."""
        from .passes.moe_recompile import MoERuntime
        self.moe_runtime_ = MoERuntime(self.module, **kwargs)
        return self.moe_runtime_

    def summary(self) -> list[dict]:
        return [r.summary() for r in self.records]

    # ------------------------------------------------------------------ running and lowering

    def __call__(self, *args, **kwargs):
        return call(self.module, ExampleInputs(args, kwargs))      # offloaded graphs load weights as they run

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Token ids ``[batch, prompt + new]`` from the optimized decode-step graph, like
        ``transformers``' ``generate`` (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``eos_token_id``, ``pad_token_id``, ``generator``); left padding in
        ``attention_mask``. Needs ``optimize(..., task="text-generation")``."""
        from .ir.decoder import DecoderError
        from .runtime import generate
        if self.decoder is None:
            raise DecoderError("generate() needs a decoder: optimize(model, ..., task='text-generation') captures the "
                               "causal LM with its KV cache")
        module = self.module
        return generate(lambda feed: call(module, ExampleInputs((), feed)), self.decoder, input_ids, attention_mask,
                        **kwargs)

    def export_onnx(self, path: str | Path, *, example_inputs: Any = None, genai: bool | None = None,
                    tokenizer: Any = None, **kwargs):
        """Lower to ONNX and verify it in ONNX Runtime (see :func:`fxopt.lowering.export_onnx`).

        A decoder (``task="text-generation"``) exported to a path without the ``.onnx`` suffix, or with
        ``genai=True``, becomes a folder that ``onnxruntime_genai.Model`` loads (``model.onnx``,
        ``genai_config.json``, the tokenizer's files when ``tokenizer`` is given;
        :mod:`fxopt.lowering.genai`), written atomically."""
        import tempfile

        from .ir.offload import is_offloaded, materialize
        from .lowering import export_onnx
        module = materialize(clone(self.module)) if is_offloaded(self.module) else self.module
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        path = Path(path)
        if self.decoder is not None and any(t.axis != "past" for t in self.decoder.cache_tensors):
            # keys per channel (kv-cache{granularity=channel}): cache tensors whose dim 2 counts blocks, or tokens
            # of whole blocks, not the past length that the decoder-kernel rewrite reads from every past_* input
            kwargs.setdefault("decoder_kernels", False)
        if genai or (genai is None and self.decoder is not None and path.suffix != ".onnx"):
            if self.decoder is None:
                raise ValueError("genai=True needs a result captured with task='text-generation'")
            from .lowering.genai import check_layout, write_genai_folder
            check_layout(self.decoder)               # before the export: a quantized KV cache cannot go to GenAI
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
                report = export_onnx(module, Path(tmp) / "decoder.onnx", inputs, **kwargs)
                write_genai_folder(Path(tmp) / "decoder.onnx", self.decoder, path, model_config=self.model_config,
                                   tokenizer=tokenizer)
            report.path = path
            return report
        return export_onnx(module, path, inputs, **kwargs)

def optimize(
    model: torch.nn.Module,
    passes: Any = "cleanup",
    example_inputs: Any = None,
    calibration: Iterable[Any] | None = None,
    *,
    dynamic: bool | dict | None = None,
    instruments: Iterable[Instrument] = (),
    print_after: bool | Iterable[str] | None = None,
    print_after_change: bool = False,
    dump_dir: str | Path | None = None,
    bisect: int | None = None,
    reproducer_dir: str | Path | None = None,
    check_exact: bool = True,
    measure_drift: bool = True,
    capture_method: str = "auto",
    layerwise_calibration: bool = False,
    offload_dir: str | Path | None = None,
    task: str = "forward",
) -> OptimizeResult:
    """Capture ``model`` and run ``passes`` on it.

    Args:
        model: an ``nn.Module`` (never mutated; a deep copy is captured) or a GraphModule
            returned by an earlier ``optimize`` (its passes are recorded, and continue).
        passes: pipeline text (``"cleanup"``, ``"dce,cse"``), a list of names / texts / Pass
            objects, or None for no pass.
        example_inputs: a tensor, a tuple (positional) or a dict (keyword; HF tokenizer output).
            Non-tensor values (``use_cache=True``, a cache) are bound at capture; the model only ever
            runs on deep copies of them, so the caller's objects are unchanged, whatever happens.
        calibration: an iterable of inputs of the same form, for passes that calibrate; every batch
            is checked against ``example_inputs`` up front (same form, no missing input; extra keys
            are ignored with a warning).
        dynamic: ``None`` (default): batch and sequence dims dynamic where the model allows it (so the
            graph, its backends and its ONNX export take other shapes), else static with a note in
            the capture record — chosen per input: token inputs batch and sequence, image/audio
            inputs (``pixel_values``, ``input_features``) batch only, ``decoder_*`` their own sequence; ``True``: dynamic or an error; ``False``: static shapes; a dict
            ``{input: {dim: name}}`` picks the axes.
        print_after: ``True`` prints the graph after every pass, or a set of pass names;
        print_after_change: print only after passes that changed the graph.
        dump_dir: write ``NNN_<pass>.txt`` per pass there.
        bisect: run only the first N passes (the rest are recorded as skipped).
        reproducer_dir: where a failing pass writes its reproducer.
        check_exact: verify that passes declared exact keep the outputs (float tolerance, widened to
            the dtype's own rounding in bfloat16/float16 models).
        measure_drift: record each pass's drift vs. the original model (in float64; a graph that
            cannot be measured gets drift ``None`` and a note saying why).
        layerwise_calibration: calibrate one layer at a time for all batches (each layer's weights
            fetched once; see :func:`fxopt.passes.calibration.observe`).
        offload_dir: keep the captured graph's weights in files there, loaded only when read
            (:mod:`fxopt.ir.offload`): the pipeline's copies and snapshots then cost no weight
            memory. The folder must outlive the returned module.
        task: ``"forward"`` (default) captures the model's forward; ``"text-generation"`` captures an
            HF causal LM as one decode step with its KV cache as explicit inputs and outputs
            (:mod:`fxopt.ir.decoder`), so that the result can :meth:`~OptimizeResult.generate`.
            ``example_inputs`` and each calibration batch are then ``input_ids`` (or a dict with
            ``input_ids`` and optionally a left-padded ``attention_mask``).
    """
    layout = None
    if task == "text-generation":
        from .ir import decoder
        if dynamic is False:
            raise decoder.DecoderError("task='text-generation' needs dynamic shapes (prompt and cache lengths change "
                                       "every step): leave dynamic unset")
        step = decoder.wrap(model)
        layout = step.layout
        example_inputs = decoder.prompt_inputs(layout, example_inputs, "example_inputs", capture=True)
        if calibration is not None and not isinstance(calibration, (torch.Tensor, dict)):
            calibration = [decoder.prompt_inputs(layout, b, f"calibration batch {i}") for i, b in enumerate(calibration)]
        model, dynamic = step, layout.dynamic_axes()
    elif task != "forward":
        raise ValueError(f"task must be 'forward' or 'text-generation'; got {task!r}")
    if example_inputs is None:
        raise ValueError("optimize needs example_inputs: a tensor, a tuple of positional inputs, or a dict of "
                         "keyword inputs (e.g. tokenizer(texts, return_tensors='pt'))")
    given = ExampleInputs.of(example_inputs)
    inputs, constants = given.split_constants()   # non-tensor kwargs (use_cache=False) are bound at capture
    pass_list = resolve(passes)          # bad pipeline text fails before the (slow) capture
    calib = _calibration(calibration, given)
    auto_dynamic = dynamic is None       # dynamic batch/sequence where the model allows it, else static with a note
    static_reason = None

    t0 = time.perf_counter()
    if isinstance(model, torch.fx.GraphModule) and CAPTURE.get(model) is not None:
        gm = clone(model)
        reference_model = model
    else:
        # capture runs the model on (a copy of) the inputs with FakeTensors: an input object the model
        # updates in place (an HF DynamicCache) would keep fake keys, so capture gets its own copy
        try:
            if auto_dynamic:
                try:
                    gm = capture(model, _private_copy(given), dynamic=True, method=capture_method)
                except CaptureError as e:
                    if calib is not None and _shapes_differ(inputs, calib):
                        raise CaptureError(f"{e}\nThe calibration batches have other shapes than example_inputs, "
                                           "which needs dynamic dims: pad every batch to one shape, or fix the "
                                           "construct above") from e
                    static_reason = str(e).strip().splitlines()[0][:200]
                    gm = capture(model, _private_copy(given), dynamic=False, method=capture_method)
            else:
                gm = capture(model, _private_copy(given), dynamic=dynamic, method=capture_method)
        except CaptureError as e:
            hint = _unflattenable_hint(constants)
            if hint:
                raise CaptureError(f"{e}\n{hint}") from e
            raise
        reference_model = model
        if CAPTURE.get(gm) is not None and constants:     # what was bound, as the caller gave it (not the run copy)
            CAPTURE.get(gm).bound_kwargs.update(_private_copy(ExampleInputs((), constants)).kwargs)
    if calib is not None:
        problem = _static_mismatch(gm, inputs, calib)
        if problem:
            raise PassError(problem)
    if offload_dir is not None:
        from .ir.offload import offload_parameters
        offload_parameters(gm, offload_dir)
    capture_seconds = time.perf_counter() - t0

    bound = CAPTURE.get(gm).bound_kwargs if CAPTURE.get(gm) else {}
    # the reference run gets a fresh copy of the caller's constants: the copies bound at capture were run
    # there (a cache was extended, with FakeTensors)
    ref_inputs = _private_copy(ExampleInputs(inputs.args, {**inputs.kwargs, **(
        {} if isinstance(model, torch.fx.GraphModule) else {**{k: v for k, v in bound.items() if k not in constants},
                                                           **constants})}))
    flags = {m: m.training for m in reference_model.modules()}   # restored exactly: never mutate the caller's model
    reference, ref_problem = None, None
    try:
        if not isinstance(reference_model, torch.fx.GraphModule):  # exported graphs refuse .eval(); they are eval already
            reference_model.eval()
        reference = [t.detach() for t in flatten_tensors(call(reference_model, ref_inputs))]
    except Exception as e:  # noqa: BLE001 - the graph was captured; only drift is lost, and the record says why
        ref_problem = (f"drift not measured: the original model failed on example_inputs ({type(e).__name__}: "
                       f"{(str(e).strip().splitlines() or [''])[0][:300]})")
    finally:
        for m, flag in flags.items():
            m.training = flag

    ctx = PassContext(example_inputs=inputs, reference_outputs=reference,
                      calibration=calib, calibration_mode="layerwise" if layerwise_calibration else "batch")
    insts: list[Instrument] = list(instruments)
    if print_after or print_after_change:
        names = None if print_after in (True, None) else set(print_after)
        insts.append(PrintAfter(names, only_changed=print_after_change))
    if dump_dir:
        insts.append(Dump(dump_dir))
    if bisect is not None:
        insts.append(Bisect(bisect))
    manager = PassManager(pass_list, insts, check_exact=check_exact, reproducer_dir=reproducer_dir,
                          measure=measure_drift)

    notes0 = list(CAPTURE.get(gm).normalizations) if CAPTURE.get(gm) else []
    notes0 += [f"{k} ({type(v).__name__}) is bound at capture: the graph always uses the value it was captured with"
               for k, v in constants.items() if not isinstance(model, torch.fx.GraphModule) and not _plain(v)]
    if ref_problem and measure_drift:
        notes0.append(ref_problem)
    if static_reason:
        notes0.append(f"captured with static shapes (the exported file takes only these input shapes): the dynamic "
                      f"capture failed: {static_reason}")
    rec0 = make_record(0, "capture", gm, ctx, modified=False, seconds=capture_seconds, status="captured",
                       notes=notes0, drift=measure_drift)
    for inst in insts:
        if isinstance(inst, Dump):
            inst.write(rec0)
    gm, records = manager.run(gm, ctx)
    if layout is not None:               # a pass may store the cache in another form (kv-cache): describe the graph's
        layout = decoder.with_graph_cache(layout, gm)
    return OptimizeResult(module=gm, records=[rec0] + records, pipeline=format_pipeline(pass_list),
                          example_inputs=ctx.example_inputs, capture_seconds=capture_seconds, decoder=layout,
                          model_config=getattr(getattr(model, "model", None), "config", None) if layout else None)



def _private_copy(inputs: ExampleInputs) -> ExampleInputs:
    """``inputs`` with every non-tensor value deep-copied (tensors are shared).

    Running a model may change an input object in place: an HF ``DynamicCache`` grows by one step
    per call, and under torch.export it is filled with FakeTensors. fxopt only ever runs copies, so
    the caller's objects are the same after ``optimize``, whether it succeeds or raises.
    """
    def copied(name: str, v: Any) -> Any:
        if isinstance(v, torch.Tensor) or _plain(v):
            return v
        try:
            return clone(v)
        except Exception as e:  # noqa: BLE001
            raise PassError(f"example input {name!r} ({type(v).__name__}) cannot be deep-copied ({type(e).__name__}: "
                            f"{e}); fxopt runs the model on copies of non-tensor inputs so that the caller's stay "
                            "unchanged: pass tensors, or an object copy.deepcopy accepts") from e
    return ExampleInputs(tuple(copied(f"arg{i}", a) for i, a in enumerate(inputs.args)),
                         {k: copied(k, v) for k, v in inputs.kwargs.items()})


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _unflattenable_hint(constants: dict[str, Any]) -> str:
    """What to do when an input object (an HF cache) is one torch.export cannot flatten."""
    import torch.utils._pytree as pytree

    bad = [(k, type(v).__name__) for k, v in constants.items()
           if type(v).__name__.endswith("Cache") and type(v) not in pytree.SUPPORTED_NODES]
    if not bad:
        return ""
    names = ", ".join(f"{k!r} is a {t}" for k, t in bad)
    return (f"Example input {names}, which torch.export cannot flatten (the model returns it): register it first "
            "(transformers.integrations.executorch.register_dynamic_cache_export_support() for a DynamicCache; the "
            "graph then uses this cache as a constant), or capture without a cache. Your cache is unchanged.")


def _calibration(calibration, example: ExampleInputs | None = None) -> list[ExampleInputs] | None:
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict)):
        raise PassError("calibration must be an iterable of inputs (a list of batches), not a single batch: "
                        "wrap it in a list")
    batches = []
    for i, c in enumerate(calibration):
        b = ExampleInputs.of(c)
        if example is not None:
            _check_batch(i, b, example)
        batches.append(b.split_constants()[0])
    if not batches:
        raise PassError("calibration data is empty: give at least one batch of inputs")
    return batches


def _form(x: ExampleInputs) -> str:
    if x.kwargs and not x.args:
        return f"a dict with keys {sorted(x.kwargs)}"
    if len(x.args) == 1 and not x.kwargs:
        return "one tensor" if isinstance(x.args[0], torch.Tensor) else "one positional input"
    return f"{len(x.args)} positional inputs" + (f" and keys {sorted(x.kwargs)}" if x.kwargs else "")


def _check_batch(i: int, batch: ExampleInputs, example: ExampleInputs) -> None:
    """A calibration batch must give every tensor input the example gives, in the same form
    (positional or keyword); keys the example does not have are ignored, with a warning."""
    def fail(problem: str) -> None:
        raise PassError(f"calibration batch {i} {problem}; example_inputs is {_form(example)}: give every "
                        "calibration batch in the same form, with the same inputs")

    if len(batch.args) != len(example.args):
        fail(f"is {_form(batch)}")
    for j, (a, e) in enumerate(zip(batch.args, example.args)):
        if isinstance(e, torch.Tensor) and not isinstance(a, torch.Tensor):
            fail(f"has {type(a).__name__} as positional input {j}, where example_inputs has a tensor")
    needed = [k for k, v in example.kwargs.items() if isinstance(v, torch.Tensor)]
    missing = [k for k in needed if not isinstance(batch.kwargs.get(k), torch.Tensor)]
    if missing:
        fail(f"is missing {missing} (it is {_form(batch)})")
    extra = sorted(k for k in batch.kwargs if k not in example.kwargs)
    if extra:
        warnings.warn(f"calibration batch {i} has keys example_inputs does not have: {extra}; they are ignored "
                      f"(the graph was captured with {sorted(example.kwargs)})", stacklevel=4)


def _static_mismatch(gm, inputs: ExampleInputs, batches: list[ExampleInputs]) -> str:
    """Why a calibration batch cannot run through the captured graph ('' if every batch can): a dim
    where it differs from example_inputs that the capture kept static."""
    info = CAPTURE.get(gm)
    if info is None:
        return ""
    names = [info.input_names[i] if i < len(info.input_names) else f"arg{i}" for i in range(len(inputs.args))]
    ref = dict(zip([*names, *inputs.kwargs], [*inputs.args, *inputs.kwargs.values()]))
    for bi, b in enumerate(batches):
        for name, t in zip([*names, *b.kwargs], [*b.args, *b.kwargs.values()]):
            r = ref.get(name)
            if not (isinstance(t, torch.Tensor) and isinstance(r, torch.Tensor)) or t.dim() != r.dim():
                continue
            for d, (a, e) in enumerate(zip(t.shape, r.shape)):
                if a != e and d not in info.dynamic_axes.get(name, {}):
                    why = [n for n in info.normalizations if n.startswith(f"dynamic axes: {name} dim {d} ")]
                    return (f"calibration batch {bi}: {name!r} has shape {tuple(t.shape)}, but dim {d} of the captured "
                            f"graph is fixed at {e} (example_inputs' size){': ' + why[0] if why else ''}. Pad or cut "
                            f"the calibration batches to example_inputs' shape {tuple(r.shape)}, or capture with "
                            "dynamic=True to see why the dim cannot be dynamic")
    return ""


def _shapes_differ(inputs: ExampleInputs, batches: list[ExampleInputs]) -> bool:
    ref = [tuple(t.shape) for _, t in inputs.tensors()]
    return any([tuple(t.shape) for _, t in b.tensors()] != ref for b in batches)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _fmt_drift(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}" if x else "0"


def format_records(records: list[PassRecord]) -> str:
    """A fixed-width table of records (what ``fxopt optimize --report`` prints)."""
    head = ["#", "pass", "status", "nodes", "Δnodes", "params MiB", "max |Δ|", "mean |Δ|", "seconds", "notes"]
    rows = []
    prev = None
    for r in records:
        dn = "" if prev is None else f"{r.num_nodes - prev:+d}"
        prev = r.num_nodes
        note = "; ".join(r.notes)
        if len(note) > 70:
            note = note[:67] + "..."
        rows.append([str(r.index), r.name, r.status + ("*" if r.modified else ""), str(r.num_nodes), dn,
                     _fmt_bytes(r.param_bytes), _fmt_drift(r.drift_max), _fmt_drift(r.drift_mean),
                     f"{r.seconds:.3f}", note])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out) + "\n(* = the pass changed the graph; drift = outputs vs. the original model on the example inputs)\n"
