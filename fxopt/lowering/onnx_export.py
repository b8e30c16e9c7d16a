"""Lower a captured (and optimized) GraphModule to ONNX that ONNX Runtime runs.

Path: ``torch.onnx.export(gm, ..., dynamo=True, custom_translation_table=TRANSLATIONS)`` — the
maintained exporter (torch.export → ONNX through onnxscript's torchlib). The legacy TorchScript
exporter is never used: on MiniLM here it silently produced outputs with cosine 0.958 vs. torch.

Steps, each failing with a message that says what to do:

1. the output path is checked for writability before any work (a file is created there and removed);
2. fxopt ops are checked for an ONNX form (:func:`~fxopt.lowering.onnx_ops.check_lowerable`), and
   graphs that write into their own buffers (a KV cache kept in the model) are refused;
3. in a copy of the graph: int8 weights fitted to the target CPU
   (:mod:`fxopt.lowering.int8_target`), SDPA → ``MultiHeadAttention``, static int8 linears →
   ``MatMulIntegerToFloat``;
4. export with the dynamic axes recorded at capture (``batch``, ``seq``), outputs named as the
   model names them (``last_hidden_state``, ``logits``), weights inside the one file when the
   model is under 2 GB (external data beside it otherwise), the target in the metadata;
5. under a temporary name beside the destination: ``onnx.checker.check_model(full_check=True)``
   (which includes strict shape inference), then verification: ONNX Runtime runs the file on the
   example inputs and its outputs are compared with the GraphModule's (max abs / max rel error,
   row cosines in the report); only then is the file moved into place.

A decode step (``task="text-generation"``: ``past_*`` inputs) is rewritten after export onto ONNX Runtime's
decoder kernels (``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``; :mod:`fxopt.lowering.decoder_ops`)
unless ``decoder_kernels=False``; verification then checks the rewritten file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from .. import _io
from ..ir.graph import ExampleInputs, call, flatten_tensors, graph_copy, parameter_bytes
from ..ir.meta import CAPTURE
from .attention import fuse_attention
from .qlinear import fuse_integer_linears
from .onnx_ops import OPSET, TRANSLATIONS, check_lowerable

TWO_GB = 2 * 1024**3


class LoweringError(RuntimeError):
    """The graph could not be lowered to valid ONNX; the message names the cause."""


@dataclass
class ExportReport:
    path: Path
    bytes: int
    opset: int
    inputs: list[str]
    outputs: list[str]
    ops: dict[str, int]
    seconds: float
    external_data: bool = False
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    min_cos: float | None = None          # over rows of the last dim
    mean_cos: float | None = None
    quantized: bool = False               # the graph holds fxopt quantizers: verified statistically
    verified: bool = False
    notes: list[str] = field(default_factory=list)
    target: str = ""                      # the int8 target CPU (fxopt.backends.isa)

    def __str__(self) -> str:
        v = (f"ORT vs PyTorch: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"
             if self.max_abs is not None else "not verified")
        if self.quantized and self.mean_cos is not None:
            v += f", mean abs {self.mean_abs:.3g}, row cosine mean {self.mean_cos:.5f} / min {self.min_cos:.5f}"
        return (f"{self.path} ({self.bytes / 2**20:.1f} MiB, opset {self.opset}, {sum(self.ops.values())} nodes, "
                f"target {self.target or '-'}, "
                f"{self.seconds:.1f} s); inputs {self.inputs}; outputs {self.outputs}; {v}")


def export_onnx(gm: torch.fx.GraphModule, path: str | os.PathLike, example_inputs: Any, *,
                dynamic: bool | dict | None = True, opset: int = OPSET, verify: bool = True,
                atol: float = 1e-4, rtol: float = 1e-3, min_cos: float = 0.995, check: bool = True,
                fused_attention: bool = True, integer_linears: bool = True,
                target: str | None = "auto", decoder_kernels: bool = True) -> ExportReport:
    """Export ``gm`` to ``path``; returns an :class:`ExportReport`.

    ``dynamic=True`` keeps the dynamic axes recorded at capture, ``None``/``False`` exports
    static shapes, a dict ``{input: {dim: name}}`` picks them. With ``verify`` the ORT outputs
    must match the GraphModule within ``atol + rtol·|y|`` or :class:`LoweringError` is raised.

    ``target`` is the CPU the file is for (:mod:`fxopt.backends.isa`): ``auto`` (this machine),
    ``portable`` (correct on every CPU), ``avx2``, ``avx512``, ``avx512-vnni``, ``avx-vnni``,
    ``amx``, ``arm-dotprod``, ``arm-i8mm``. On targets whose u8×s8 GEMM saturates int16 pairs
    (AVX2, AVX-512 without VNNI, portable) int8 weights above 64 in magnitude are re-rounded to
    ``[−64, 64]`` (:mod:`fxopt.lowering.int8_target`, with a note); the file records its target and
    whether it needs an int8 dot-product CPU in its metadata (``fxopt.int8_target``,
    ``fxopt.int8_requires``), and :class:`fxopt.backends.OrtBackend` warns when it runs on a CPU
    that lacks it.

    Quantized graphs are verified statistically: a one-ulp float difference upstream (ORT's
    LayerNorm vs. PyTorch's) flips a later quantizer's rounding by one step, and flips cascade
    through the layers (measured on MiniLM W8A8 with every ORT fusion disabled: one quantized
    linear matches to 3e-6, two layers to max 0.026, all 37 to mean |Δ| ≈ 3 % of mean |y|). There
    the mean cosine of output rows must be ≥ ``min_cos``.

    The file is written, checked and verified under a temporary name beside ``path`` and moved
    into place only when all of that passed: a failed export never replaces an existing file.

    ``decoder_kernels`` (decode steps only): rewrite attention, rotary and residual RMSNorms onto ORT's
    ``GroupQueryAttention`` / ``SkipSimplifiedLayerNormalization`` (:mod:`fxopt.lowering.decoder_ops`; what
    matched is in the report's notes); ``False`` writes the exporter's generic form.
    """
    import onnx

    from ..backends import isa
    from .int8_target import fit_int8_weights, max_weight

    t0 = time.perf_counter()
    target = isa.resolve(target)
    path = _io.check_writable(path)
    inputs = ExampleInputs.of(example_inputs)
    problems = check_lowerable(gm) + _mutated_buffers(gm)
    if problems:
        raise LoweringError("cannot lower to ONNX:\n  - " + "\n  - ".join(problems))
    if verify and any(t.dtype == torch.bfloat16 for t in list(gm.parameters()) + list(gm.buffers())):
        raise LoweringError("the graph computes in bfloat16, which ONNX Runtime's CPU kernels do not run (no bf16 Mul, "
                            "MatMul, ...), so the file cannot be verified here: export a float32 or float16 copy "
                            "(fxopt.optimize(model.float(), ...)), or pass verify=False to write a bf16 file for a "
                            "runtime that has bf16 kernels")
    info = CAPTURE.get(gm)
    dyn_spec = _dynamic_spec(gm, inputs, dynamic, info)
    output_names = list(info.output_names) if info else None
    external = parameter_bytes(gm) > TWO_GB * 0.9
    exported = graph_copy(gm)                     # rewritten for the target and ORT; the caller's graph is untouched
    fitted = fit_int8_weights(exported, target)
    peak = max_weight(exported)
    requires = "int8-dot-product" if peak > isa.REDUCED_QMAX else "any"
    fused, attn_notes, int_linears = 0, [], 0
    if fused_attention:
        fused, attn_notes = fuse_attention(exported)
    if integer_linears:
        int_linears = fuse_integer_linears(exported)

    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                exported, inputs.args, kwargs=inputs.kwargs or None, dynamo=True, external_data=external,
                dynamic_shapes=dyn_spec, custom_translation_table=TRANSLATIONS, opset_version=opset,
                output_names=output_names, optimize=False, verbose=False, report=False,
            )
            _optimize_onnx(program.model)
    except Exception as e:  # noqa: BLE001
        raise LoweringError(_explain_export_failure(e)) from e
    decoder_notes = []
    if decoder_kernels and _is_decode_step(gm):
        from .decoder_ops import fuse_decoder_ops
        dk = fuse_decoder_ops(program.model)
        decoder_notes = ([dk.summary()] if dk.modified else []) + dk.notes
    meta = {"fxopt.int8_target": target, "fxopt.int8_requires": requires,
            "fxopt.int8_weight_max": str(peak)}
    with contextlib.suppress(AttributeError):
        program.model.metadata_props.update(meta)

    report = ExportReport(path=path, bytes=0, opset=opset, inputs=[], outputs=[], ops={}, seconds=0.0,
                          external_data=external, target=target)
    if fused:
        report.notes.append(f"{fused} scaled_dot_product_attention → com.microsoft.MultiHeadAttention")
    if int_linears:
        report.notes.append(f"{int_linears} static int8 linears → com.microsoft.MatMulIntegerToFloat (bias inside)")
    if fitted:
        report.notes.append(f"{fitted} int8 weights re-rounded to [-64, 64] for target {target} (u8×s8 pairs saturate "
                            f"int16 there); quantize with insert-qdq{{target={target}}} to round them once")
    report.notes += attn_notes + decoder_notes
    slow = _without_integer_kernel(gm)
    if slow:
        msg = (f"{len(slow)} quantized linears have no integer kernel in ONNX Runtime and run as float ops around "
               f"their quantizers (per-token s8 activations: {', '.join(slow[:3])}{' ...' if len(slow) > 3 else ''}); "
               "for integer GEMMs quantize with insert-qdq{scheme=w8a8-static} or "
               "insert-qdq{scheme=w8a8-dynamic,granularity=tensor}")
        report.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    report.quantized = _has_quantizers(gm)
    here = isa.detect()
    cross = requires != "any" and not here.exact_s8
    with _staged(path) as staged:
        program.save(str(staged), external_data=external)
        if check:
            _check(staged)
        model = onnx.load(str(staged), load_external_data=False)
        ops: dict[str, int] = {}
        for node in model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        report.inputs = [i.name for i in model.graph.input]
        report.outputs = [o.name for o in model.graph.output]
        report.ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
        report.bytes = sum(f.stat().st_size for f in staged.parent.iterdir())
        if verify and cross:
            report.notes.append(f"not verified in ONNX Runtime: the file is for {target} (int8 weights up to {peak}) "
                                f"and this CPU ({here.target}) adds u8×s8 pairs into saturating int16, so it cannot "
                                "run it exactly; verify on the target, or export with target='portable'")
        elif verify:
            _verify(gm, report, inputs, atol, rtol, min_cos, staged)
    report.seconds = time.perf_counter() - t0
    return report


#: onnxscript's default rewrite rules that the exporter's graphs need (their pattern matcher costs ~0.2 ms per node
#: and rule: all 46 default rules took 88 of a 30-layer decoder's 198 s of export); ONNX Runtime's own graph
#: optimizer does the rest of their work (Cast/Reshape/Squeeze chains, Clip fusions) when the session loads.
REWRITE_RULES = ("TransposeTranspose", "TransposeIdentity", "CastCast", "CastIdentity", "ReshapeReshape")


def _optimize_onnx(model) -> None:
    """The exporter's ONNX clean-up, in place: constant folding, dead nodes, constants lifted to
    initializers, duplicate initializers merged, common subexpressions, and the rewrite rules in
    :data:`REWRITE_RULES` — what ``torch.onnx.export(optimize=True)`` runs, less the default rewrite
    rules whose matching dominated export time on large graphs."""
    import onnx_ir as ir
    from onnx_ir.passes import common as cp
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) in REWRITE_RULES]
    cp.InlinePass()(model)
    ir.passes.PassManager([
        _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192, output_size_limit=262144),
        rewriter.RewritePass(rules),
        cp.RemoveUnusedNodesPass(), cp.RemoveUnusedFunctionsPass(), cp.RemoveUnusedOpsetsPass(),
    ], steps=2, early_stop=True)(model)
    ir.passes.PassManager([
        cp.RemoveUnusedNodesPass(), cp.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        cp.LiftSubgraphInitializersToMainGraphPass(), cp.DeduplicateInitializersPass(),
        cp.CommonSubexpressionEliminationPass(), cp.OutputFixPass(), cp.NameFixPass(),
    ])(model)


@contextlib.contextmanager
def _staged(path: Path):
    """A temporary folder beside ``path`` holding ``path.name`` (and its external data); on success
    every file in it is moved into place (data before the model), else the folder is removed."""
    import shutil
    import tempfile

    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmpdir / path.name
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            os.chmod(f, 0o666 & ~_io._umask())
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _is_decode_step(gm) -> bool:
    """A ``task="text-generation"`` step (:mod:`fxopt.ir.decoder`): ``input_ids``, ``attention_mask`` and ``past_*`` inputs."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    return "input_ids" in names and "attention_mask" in names and any(n.startswith("past_") for n in names)


def _mutated_buffers(gm) -> list[str]:
    """Ops that write into the graph's own tensors (a KV cache held as a buffer, StaticCache): ONNX
    has no state, so the file would freeze the buffers at their export-time values."""
    found: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            if isinstance(v, torch.fx.Node) and v.op == "get_attr":
                found.setdefault(v.target, str(n.target))
    if not found:
        return []
    names = ", ".join(f"{t} ({op})" for t, op in list(found.items())[:6])
    return [f"the graph writes into its own buffers {names}{' ...' if len(found) > 6 else ''}: state kept in the "
            "model (a KV cache such as transformers' StaticCache) would be frozen into the ONNX file and later steps "
            "would be wrong. Capture a model that takes the cache as inputs and returns the updated cache as "
            "outputs (e.g. DynamicCache past_key_values), or export a forward without the cache (use_cache=False)"]


def _without_integer_kernel(gm) -> list[str]:
    """Module paths of ``fuse-qdq``'s linears that ONNX Runtime cannot run as integer GEMMs (per-token s8)."""
    from ..ir.meta import QLINEAR
    out = []
    for n in gm.graph.nodes:
        q = QLINEAR.get(n)
        if q is not None and q.activation.startswith("s8 per-token"):
            out.append(q.module_path or n.name)
    return out


def _has_quantizers(gm) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target.namespace == "fxopt" and n.target._opname in (
                   "quantize", "dynamic_quantize", "quantize_per_token")
               for n in gm.graph.nodes)


def _verify(gm, report: ExportReport, inputs: ExampleInputs, atol: float, rtol: float, min_cos: float,
            file: Path) -> None:
    import warnings as _w

    from ..backends.ort import OrtBackend

    outs = flatten_tensors(call(gm, inputs))
    # Half-precision outputs carry their own rounding: ORT and PyTorch order fp16 sums differently
    # (measured on DistilBERT fp16, 5 batches: max |Δ| 1.0–1.8 ulp of max|y|, i.e. 1.0–1.7e-3·max|y|);
    # the relative tolerance is at least 4 ulp of the output dtype.
    rtols = [max(rtol, 4 * torch.finfo(t.dtype).eps) if t.dtype in (torch.float16, torch.bfloat16) else rtol
             for t in outs]
    ref = [t.detach().cpu().float().numpy() if t.is_floating_point() else t.detach().cpu().numpy() for t in outs]
    with _w.catch_warnings():
        _w.simplefilter("ignore")                       # the target warning; this file is for this CPU
        got = OrtBackend(file).run(inputs)
    if len(got) != len(ref):
        raise LoweringError(f"ONNX Runtime returned {len(got)} outputs, the graph {len(ref)}")
    max_abs, max_rel, bad, sums, count, cos_min, cos_sum, rows = 0.0, 0.0, [], 0.0, 0, 1.0, 0.0, 0
    for name, r, g, rtol in zip(report.outputs, ref, got, rtols):
        if r.shape != g.shape:
            raise LoweringError(f"output {name!r}: ONNX Runtime shape {g.shape} != PyTorch {r.shape}")
        if not r.size:
            continue
        d = np.abs(r.astype(np.float64) - g.astype(np.float64))
        scale = float(np.abs(r).max())
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float(d.max()) / max(scale, 1e-12))
        sums, count = sums + float(d.sum()), count + d.size
        if np.issubdtype(r.dtype, np.floating) and r.ndim >= 1:
            a, b = r.reshape(-1, r.shape[-1]).astype(np.float64), g.reshape(-1, r.shape[-1]).astype(np.float64)
            c = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            c = np.where((np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0), 1.0, c)
            cos_min, cos_sum, rows = min(cos_min, float(c.min())), cos_sum + float(c.sum()), rows + c.size
            if report.quantized and float(c.mean()) < min_cos:
                bad.append(f"output {name!r}: row cosine mean {float(c.mean()):.5f} < min_cos={min_cos} (min row "
                           f"{float(c.min()):.5f}; quantized graphs are checked by row cosine: lower it with "
                           "export_onnx(..., min_cos=...) if that accuracy is what you want)")
        if not report.quantized and float(d.max()) > atol + rtol * scale:
            bad.append(f"output {name!r}: max |Δ| {float(d.max()):.3g} > atol + rtol·max|y| = {atol} + {rtol}·"
                       f"{scale:.3g} (set with export_onnx(..., atol=..., rtol=...))")
    report.max_abs, report.max_rel = max_abs, max_rel
    report.mean_abs = sums / max(count, 1)
    if rows:
        report.min_cos, report.mean_cos = cos_min, cos_sum / rows
    if bad:
        keep = f"; {report.path} was not written" + (" (the existing file is unchanged)" if report.path.exists() else "")
        raise LoweringError("ONNX Runtime's outputs differ from PyTorch's: " + "; ".join(bad) + keep
                            + ". Export with verify=False to write it anyway")
    report.verified = True


def _dynamic_spec(gm, inputs: ExampleInputs, dynamic, info):
    if not dynamic:
        return None
    axes = dynamic if isinstance(dynamic, dict) else (info.dynamic_axes if info else {})
    if not axes:
        return None
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    spec_args = []
    for i, a in enumerate(inputs.args):
        name = names[i] if i < len(names) else f"arg{i}"
        spec_args.append({int(d): str(v) for d, v in axes.get(name, {}).items()} or None
                         if isinstance(a, torch.Tensor) else None)
    spec_kwargs = {k: ({int(d): str(v) for d, v in axes.get(k, {}).items()} or None) for k in inputs.kwargs}
    if inputs.args and not inputs.kwargs:
        return tuple(spec_args)
    if not inputs.args:
        return spec_kwargs
    return {**{names[i]: s for i, s in enumerate(spec_args)}, **spec_kwargs}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs progress and registry warnings (torchvision ops) we do not want to show."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnxscript", "torch.export", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _explain_export_failure(e: Exception) -> str:
    msg = str(e)
    summary = msg
    if "## Exception summary" in msg:
        summary = msg.split("## Exception summary", 1)[1].strip().split("\n(Refer", 1)[0].strip()
    hint = ""
    low = msg.lower()
    if "dynamic" in low and ("static" in low or "specializ" in low):
        hint = ("\nWhat to try: a dim exported as dynamic is fixed by the model or by a pass (capture records only "
                "the dims that stay symbolic, so this comes from dynamic= given to export_onnx): export with fewer "
                "dynamic axes, e.g. dynamic={'input_ids': {0: 'batch'}}, or with dynamic=False.")
    elif "no decomposition" in low or "unsupported" in low or "not implemented" in low:
        hint = "\nWhat to try: an op has no ONNX translation; add one to fxopt.lowering.onnx_ops.TRANSLATIONS."
    return f"ONNX export failed: {summary[:2000]}{hint}"


def _check(p: Path) -> None:
    """onnx.checker with strict shape inference; ORT contrib ops (com.microsoft), which ONNX's
    registry does not know, get the structural check only."""
    import onnx
    model = onnx.load(str(p), load_external_data=False)
    contrib = any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
    try:
        onnx.checker.check_model(str(p), full_check=not contrib)
    except Exception as e:  # noqa: BLE001
        raise LoweringError(f"the exported model fails onnx.checker: {e}") from e
