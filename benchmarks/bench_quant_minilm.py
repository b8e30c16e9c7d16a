"""Quantized all-MiniLM-L6-v2 in ONNX Runtime: fxopt's schemes vs. ORT's own quantizers (issue #3).

Engines (all ONNX Runtime, CPU, ``--threads`` intra-op threads, graph optimizations "all"):

* **ORT fp32** — ``fxopt.optimize(minilm, "cleanup")`` exported with
  ``export_onnx(fused_attention=False)``: attention as the dynamo exporter writes SDPA (what
  ``torch.onnx.export`` gives; measured as fast as ``torch.onnx.export``'s own file, ±4 %): the
  baseline, and the file ORT's quantizers start from;
* **ORT fp32, fxopt fused attention** — the same graph exported by default, SDPA as ONNX Runtime's
  ``MultiHeadAttention`` (:mod:`fxopt.lowering.attention`);
* **ORT quantize_dynamic** — ``onnxruntime.quantization.quantize_dynamic`` on the baseline fp32 file
  (after ``quant_pre_process``), per-channel int8 weights; and, as an ablation, on the fused-attention
  file (``ort-dynamic-fa``): what ORT's quantizer would do with fxopt's lowering;
* **ORT quantize_static** — ``quantize_static`` (QDQ format, MinMax, per-channel, activations
  QUInt8, weights QInt8) with a calibration reader over the same calibration batches fxopt sees;
  ORT's default op set (MatMul incl. attention's, Add, Mul, Gather, Softmax, Where... all
  quantized) and, as a second row, only the linears (``nodes_to_quantize`` = the MatMul/Gemm nodes
  with an initializer weight: the set fxopt quantizes; ``MatMulConstBOnly`` is ignored in QDQ format);
* **fxopt** — the pipelines in ``VARIANTS`` (W8A8 static ± SmoothQuant, W8A8 dynamic per tensor /
  per token, int8 / int4 weight-only, int4 symmetric or asymmetric with zero points), each
  ``optimize(..., calibration=..., dynamic=True)`` then ``export_onnx(verify=False)`` with its
  defaults (fused attention; static int8 linears as ``MatMulIntegerToFloat`` with the bias inside,
  :mod:`fxopt.lowering.qlinear`); ``sq-auto-qdq`` is the same pipeline as ``sq-auto`` exported as
  plain QDQ with the exporter's SDPA, to separate the lowering's share from the quantization's;
  ``sq-auto-portable`` is ``sq-auto`` quantized and exported for ``target=portable`` (weights on
  ``[−64, 64]``, exact on every CPU): the form an AVX2 CPU gets from ``target=auto``. Its accuracy is
  what an AVX2 CPU computes on any machine (no pair can saturate); its speed is this CPU's. The
  table's header names this CPU's int8 ISA (:mod:`fxopt.backends.isa`).

Data (real text, disjoint): calibration = ``--calib`` passages of Hamlet; evaluation = ``--eval``
passages, half *Paradise Lost*, half the *Sonnets* (1–4 consecutive lines joined). Every batch is
``--batch`` × ``--seq`` (``padding="max_length"``, truncation).

Accuracy: cosine between each engine's mean-pooled (attention-mask weighted) embeddings and those
of the PyTorch fp32 model, over the evaluation set (mean and min over sentences).

Latency: every session is built first, then ``--rounds`` rounds each run every engine ``--runs``
times on the same batch (engine order rotated per round), so load from other processes hits all
engines alike; the median over all runs is quoted, with the interquartile range. Every engine is
timed twice in those rounds: with ``--threads`` (2) intra-op threads and with ``--also-threads``
(1) — one thread is steadier on a shared machine and shows how each graph scales with threads.

Op counts: ``OrtBackend.optimized_op_types()`` — the graph after ORT's optimizations, i.e. what ORT
actually executes: integer kernels (``MatMulIntegerToFloat``, ``DynamicQuantizeMatMul``,
``QLinearMatMul``, ``MatMulInteger``, ``MatMulNBits``) vs. float ``MatMul``/``FusedMatMul``/``Gemm``.

The ORT profile (``--no-profile`` skips it) adds each graph's time by op category (int8 GEMM,
float GEMM, Q/DQ, LayerNorm, GELU, softmax + mask, layout, elementwise) for several engines, their
runs interleaved too, to see where the time of the quantized graphs goes.

    python3 benchmarks/bench_quant_minilm.py                 # ≈ 5–10 min on 2 cores (more when shared)
    python3 benchmarks/bench_quant_minilm.py --quick         # fewer variants/rounds, ≈ 3 min
    python3 benchmarks/bench_quant_minilm.py --markdown --keep /tmp/qminilm
    python3 benchmarks/bench_quant_minilm.py --variants w4-g32 w4-asym-g32 --no-ort-quant --no-profile   # some rows

Progress goes to stderr; the tables go to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fxopt
from fxopt import models
from fxopt.backends.ort import OrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fxopt_revision, log, render_table  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"

# (key, label, pipeline)
VARIANTS = [
    ("sq-auto", "fxopt W8A8 static + SQ α=auto", "smoothquant{alpha=auto},insert-qdq,fuse-qdq"),
    ("sq-auto-att", "fxopt W8A8 static + SQ α=auto + attention matmuls",
     "smoothquant{alpha=auto},insert-qdq{attention=true},fuse-qdq"),
    ("sq-0.5", "fxopt W8A8 static + SQ α=0.5", "smoothquant{alpha=0.5},insert-qdq,fuse-qdq"),
    ("static", "fxopt W8A8 static (no SQ)", "insert-qdq,fuse-qdq"),
    ("dyn-tensor", "fxopt W8A8 dynamic per-tensor", "insert-qdq{scheme=w8a8-dynamic,granularity=tensor},fuse-qdq"),
    ("dyn-tensor-att", "fxopt W8A8 dynamic per-tensor + attention matmuls",
     "insert-qdq{scheme=w8a8-dynamic,granularity=tensor,attention=true},fuse-qdq"),
    ("dyn-token", "fxopt W8A8 dynamic per-token", "insert-qdq{scheme=w8a8-dynamic},fuse-qdq"),
    ("w8", "fxopt W8 weight-only", "insert-qdq{scheme=w8-weight-only},fuse-qdq"),
    ("w4-g32", "fxopt W4 weight-only g32", "insert-qdq{scheme=w4-weight-only,group=32},fuse-qdq"),
    ("w4-g64", "fxopt W4 weight-only g64", "insert-qdq{scheme=w4-weight-only,group=64},fuse-qdq"),
    ("w4-g128", "fxopt W4 weight-only g128", "insert-qdq{scheme=w4-weight-only,group=128},fuse-qdq"),
    ("w4-asym-g32", "fxopt W4 weight-only asym g32",
     "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false},fuse-qdq"),
    ("w4-asym-g64", "fxopt W4 weight-only asym g64",
     "insert-qdq{scheme=w4-weight-only,group=64,weight_symmetric=false},fuse-qdq"),
    ("w4-asym-g128", "fxopt W4 weight-only asym g128",
     "insert-qdq{scheme=w4-weight-only,group=128,weight_symmetric=false},fuse-qdq"),
    ("w4-fzp-g32", "fxopt W4 weight-only float-zp g32",
     "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false,weight_zero_point=float},fuse-qdq"),
    ("w4-fzp-g64", "fxopt W4 weight-only float-zp g64",
     "insert-qdq{scheme=w4-weight-only,group=64,weight_symmetric=false,weight_zero_point=float},fuse-qdq"),
    ("w4-fzp-g128", "fxopt W4 weight-only float-zp g128",
     "insert-qdq{scheme=w4-weight-only,group=128,weight_symmetric=false,weight_zero_point=float},fuse-qdq"),
]
# The portable int8 form (7-bit weights where u8×s8 pairs saturate): what an AVX2 CPU runs, exactly.
VARIANTS.insert(1, ("sq-auto-portable", "fxopt W8A8 static + SQ α=auto, target portable (AVX2 form)",
                    "smoothquant{alpha=auto,target=portable},insert-qdq{target=portable},fuse-qdq"))
# Ablation: the same pipeline exported as plain QDQ with the exporter's SDPA (no fxopt lowering rewrites).
VARIANTS.insert(1, ("sq-auto-qdq", "fxopt W8A8 static + SQ α=auto, plain QDQ export",
                    "smoothquant{alpha=auto},insert-qdq,fuse-qdq"))
EXPORT_OPTIONS = {"sq-auto-qdq": dict(fused_attention=False, integer_linears=False),
                  "sq-auto-portable": dict(target="portable")}
QUICK = ("sq-auto", "sq-auto-portable", "sq-auto-qdq", "sq-auto-att", "static", "dyn-tensor", "w4-g64")
PROFILED = ("fp32", "fp32-fa", "ort-dynamic", "ort-dynamic-fa", "sq-auto-qdq", "ort-static-linears", "sq-auto", "sq-auto-att", "static", "dyn-tensor", "dyn-token", "w8", "w4-g32")

INT_KERNELS = {"MatMulIntegerToFloat": "MMI2F", "DynamicQuantizeMatMul": "DQMM", "QLinearMatMul": "QLMM",
               "MatMulInteger": "MMInt", "MatMulNBits": "NBits", "QAttention": "QAttn", "QGemm": "QGemm"}
FLOAT_MM = ("MatMul", "FusedMatMul", "Gemm")

TARGETS = dict(speedup_fp32=1.45, speedup_dyn=1.10, mean_cos=0.99, min_cos=0.98, size_w8a8=0.27, size_w4=0.16)


@dataclass
class Engine:
    key: str
    label: str
    how: str                          # pipeline text or the ORT call
    path: Path | None = None
    backend: OrtBackend | None = None
    times: list[float] = field(default_factory=list)
    cos: np.ndarray | None = None
    ops: dict[str, int] = field(default_factory=dict)
    build_s: float | None = None      # optimize + export (or ORT quantize) wall time
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def mib(self) -> float | None:
        return self.path.stat().st_size / 2**20 if self.path and self.path.exists() else None

    def lat(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times else None

    def iqr(self) -> tuple[float, float] | None:
        if len(self.times) < 4:
            return None
        q = statistics.quantiles(self.times, n=4)
        return q[0] * 1e3, q[2] * 1e3



# --------------------------------------------------------------------------- data


def passages(path: Path, n: int, *, skip: int = 0, min_words: int = 4) -> list[str]:
    """``n`` passages of 1–4 consecutive non-trivial lines (lengths cycle), after ``skip`` lines."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()[skip:]]
    lines = [ln for ln in lines if len(ln.split()) >= min_words and not ln.isupper()]
    out, i, k = [], 0, 0
    while len(out) < n and i < len(lines):
        size = 1 + (k % 4)
        out.append(" ".join(lines[i:i + size]))
        i, k = i + size, k + 1
    if len(out) < n:
        raise SystemExit(f"{path} has only {len(out)} passages, {n} wanted")
    return out


def batches_of(tok, texts: list[str], batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    return [dict(tok(texts[i:i + batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))
            for i in range(0, len(texts), batch)]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def ort_embeddings(eng: Engine, batches) -> np.ndarray:
    sess = eng.backend.session
    idx = [o.name for o in sess.get_outputs()].index("last_hidden_state")
    out = []
    for b in batches:
        hidden = sess.run(None, eng.backend.feeds(b))[idx]
        out.append(mean_pool(hidden, b["attention_mask"].numpy()))
    return np.concatenate(out)


# --------------------------------------------------------------------------- engines


def build_fxopt(eng: Engine, lm, calib, workdir: Path, threads: int) -> None:
    t0 = time.perf_counter()
    res = fxopt.optimize(lm.model, eng.how, calib[0], calibration=calib, dynamic=True)
    eng.path = workdir / f"{eng.key}.onnx"
    res.export_onnx(eng.path, verify=False, **EXPORT_OPTIONS.get(eng.key, {}))
    eng.build_s = time.perf_counter() - t0
    for r in res.records[1:]:
        if r.status != "ran":
            eng.notes.append(f"{r.name}: {r.status}")
        for nt in r.notes:
            if "kept in float" in nt or "skipped" in nt:
                eng.notes.append(nt)
    eng.backend = OrtBackend(eng.path, threads=threads, opt_level="all")


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration batches."""

    def __init__(self, batches, names):
        self.data = [{k: v.numpy() for k, v in b.items() if k in names} for b in batches]
        self.it = iter(self.data)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.data)


def preprocess(fp32: Path, workdir: Path) -> tuple[Path, str]:
    from onnxruntime.quantization import quant_pre_process
    out = workdir / f"{fp32.stem}_pre.onnx"
    try:
        quant_pre_process(str(fp32), str(out))
        return out, "quant_pre_process ok"
    except Exception as e:  # noqa: BLE001
        log(f"quant_pre_process failed ({type(e).__name__}: {str(e)[:200]}); trying skip_symbolic_shape")
    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
        return out, "quant_pre_process (skip_symbolic_shape)"
    except Exception as e:  # noqa: BLE001
        log(f"quant_pre_process failed again ({type(e).__name__}: {str(e)[:200]}); quantizing the raw export")
        return fp32, f"quant_pre_process failed: {type(e).__name__}"


def build_ort(eng: Engine, src: Path, calib, workdir: Path, threads: int) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    t0 = time.perf_counter()
    eng.path = workdir / f"{eng.key}.onnx"
    if eng.key.startswith("ort-dynamic"):
        quantize_dynamic(str(src), str(eng.path), per_channel=True, weight_type=QuantType.QInt8)
    else:
        names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib, names)
        kw = {}
        if eng.key == "ort-static-linears":
            # MatMulConstBOnly is honoured only by the QOperator path: in QDQ format ORT quantizes the
            # attention MatMuls too. Name the linears (MatMul/Gemm with an initializer B) instead.
            g = onnx.load(str(src), load_external_data=False).graph
            inits = {i.name for i in g.initializer}
            kw = dict(op_types_to_quantize=["MatMul", "Gemm"],
                      nodes_to_quantize=[n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits])
        quantize_static(str(src), str(eng.path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, **kw)
    eng.build_s = time.perf_counter() - t0
    eng.backend = OrtBackend(eng.path, threads=threads, opt_level="all")


# --------------------------------------------------------------------------- timing and profiling


def time_interleaved(engines: list[Engine], feeds_of, rounds: int, runs: int) -> None:
    live = [e for e in engines if e.backend is not None]
    feeds = {e.key: feeds_of(e) for e in live}
    for e in live:                                   # warm-up (first runs allocate, pack weights)
        for _ in range(2):
            e.backend.session.run(None, feeds[e.key])
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        for e in order:
            sess, f = e.backend.session, feeds[e.key]
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, f)
                e.times.append(time.perf_counter() - t0)
        log(f"timing round {r + 1}/{rounds}: " + ", ".join(f"{e.key} {e.times[-1] * 1e3:.0f}" for e in live[:4]) + " ms ...")


CATEGORIES = [
    ("int8 GEMM", ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulInteger", "QGemm",
                   "MatMulNBits")),
    ("float GEMM", ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")),
    ("Q/DQ", ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")),
    ("LayerNorm", ("SkipLayerNormalization", "LayerNormalization", "SkipSimplifiedLayerNormalization")),
    ("GELU", ("BiasGelu", "Gelu", "FastGelu")),
    ("softmax+mask", ("Softmax", "Where", "IsNaN", "QLinearSoftmax", "QLinearWhere")),
    ("layout", ("Transpose", "Reshape", "Slice", "Concat", "Gather", "GatherND", "Shape", "Unsqueeze", "Squeeze",
                "Expand", "Cast", "Range")),
    ("elementwise", ("Add", "Mul", "Sub", "Div", "QLinearAdd", "QLinearMul")),
]


def categorize(by_op: dict[str, float]) -> dict[str, float]:
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    for op, ms in by_op.items():
        cat = next((name for name, ops in CATEGORIES if op in ops), "other")
        out[cat] += ms
    return out


def profile_interleaved(engines: list[Engine], feeds_of, threads: int, runs: int, workdir: Path
                        ) -> dict[str, tuple[dict[str, float], float]]:
    """ms per run by op type (ORT profiler; the graph after ORT's optimizations) for each engine, the
    engines' runs interleaved like the timing rounds; the first (warm-up) run is not counted."""
    import onnxruntime as ort
    sessions = {}
    for e in engines:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        so.enable_profiling = True
        so.profile_file_prefix = str(workdir / f"prof_{e.key}")
        sessions[e.key] = (ort.InferenceSession(str(e.path), so, providers=["CPUExecutionProvider"]), feeds_of(e))
    for _ in range(runs + 1):
        for sess, feeds in sessions.values():
            sess.run(None, feeds)
    out = {}
    for e in engines:
        sess, _ = sessions[e.key]
        events = json.loads(Path(sess.end_profiling()).read_text())
        model_runs = sorted((ev for ev in events if ev.get("name") == "model_run"), key=lambda ev: ev["ts"])
        start = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0   # drop the warm-up run
        by_op: dict[str, float] = {}
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] >= start:
                op = ev.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + ev["dur"] / 1e3 / runs
        out[e.label] = (dict(sorted(by_op.items(), key=lambda kv: -kv[1])), sum(by_op.values()))
    return out


# --------------------------------------------------------------------------- tables


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def ops_summary(ops: dict[str, int]) -> tuple[str, str]:
    ints = ", ".join(f"{INT_KERNELS[k]} {v}" for k, v in ops.items() if k in INT_KERNELS) or "none"
    fl = ", ".join(f"{k} {ops[k]}" for k in FLOAT_MM if ops.get(k)) or "0"
    return ints, fl


def main_table(engines: list[Engine], base: Engine, dyn: Engine | None, alt: dict[str, Engine], alt_threads: int):
    head = ["engine", "median ms", "IQR ms", "min ms", "x ORT fp32", "x ORT dyn"]
    if alt:
        head += [f"ms {alt_threads}T", f"IQR {alt_threads}T", f"x fp32 {alt_threads}T", f"x dyn {alt_threads}T"]
    head += ["mean cos", "min cos", "MiB", "x size", "int kernels (ORT graph)", "float MatMul/Gemm", "Q / DQ left",
             "build s"]
    a_base, a_dyn = alt.get("fp32"), alt.get("ort-dynamic")
    body = []
    for e in engines:
        if e.error:
            body.append([e.label, f"FAILED: {e.error}"])
            continue
        lat, iqr = e.lat(), e.iqr()
        ints, fl = ops_summary(e.ops)
        qdq = f"{e.ops.get('QuantizeLinear', 0) + e.ops.get('DynamicQuantizeLinear', 0)} / {e.ops.get('DequantizeLinear', 0)}"
        body.append([
            e.label, _f(lat, ".1f"), f"{iqr[0]:.0f}-{iqr[1]:.0f}" if iqr else "-",
            _f(min(e.times) * 1e3 if e.times else None, ".1f"),
            _f(base.lat() / lat if lat and base.lat() else None),
            _f(dyn.lat() / lat if dyn and lat and dyn.lat() else None),
        ] + ([] if not alt else [
            _f(alt[e.key].lat(), ".1f") if e.key in alt else "-",
            "{:.0f}-{:.0f}".format(*alt[e.key].iqr()) if e.key in alt and alt[e.key].iqr() else "-",
            _f(a_base.lat() / alt[e.key].lat() if e.key in alt and a_base and a_base.lat() else None),
            _f(a_dyn.lat() / alt[e.key].lat() if e.key in alt and a_dyn and a_dyn.lat() else None),
        ]) + [
            _f(float(e.cos.mean()) if e.cos is not None else None, ".5f"),
            _f(float(e.cos.min()) if e.cos is not None else None, ".5f"),
            _f(e.mib, ".1f"), _f(e.mib / base.mib if e.mib and base.mib else None, ".3f"),
            ints, fl, qdq, _f(e.build_s, ".1f"),
        ])
    return head, body


def render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    return render_table(head, body, markdown, left_last=False)
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    for r in body:
        out.append(line(r) if len(r) == len(head) else line(r[:1]) + "  " + r[1])
    return "\n".join(out)


def environment(threads: int) -> list[str]:
    import onnx
    import onnxruntime
    import transformers
    from fxopt.backends import isa
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"CPU: {isa.detect().line()}; ORT intra-op threads {threads}, load average at start {os.getloadavg()[0]:.2f}",
        f"python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}; fxopt {fxopt_revision()}",
    ]


def targets(engines: dict[str, Engine], base: Engine, alt: dict[str, Engine], alt_threads: int) -> list[str]:
    out = []

    def ok(flag: bool) -> str:
        return "MET" if flag else "MISSED"

    dyn = engines.get("ort-dynamic")
    dyn_fa = engines.get("ort-dynamic-fa")
    for key in ("sq-auto", "sq-auto-portable", "sq-auto-qdq", "sq-auto-att", "sq-0.5"):
        e = engines.get(key)
        if not e or e.error or not e.times:
            continue
        s_fp, s_dyn = base.lat() / e.lat(), (dyn.lat() / e.lat() if dyn and dyn.times else None)
        out.append(f"{e.label}: speed-up {s_fp:.2f}x vs ORT fp32 (target >= {TARGETS['speedup_fp32']}) "
                   f"{ok(s_fp >= TARGETS['speedup_fp32'])}; "
                   + (f"{s_dyn:.2f}x vs ORT quantize_dynamic (target >= {TARGETS['speedup_dyn']}) "
                      f"{ok(s_dyn >= TARGETS['speedup_dyn'])}; " if s_dyn else "")
                   + f"mean cos {e.cos.mean():.4f} (>= {TARGETS['mean_cos']}) {ok(e.cos.mean() >= TARGETS['mean_cos'])}, "
                   f"min cos {e.cos.min():.4f} (>= {TARGETS['min_cos']}) {ok(e.cos.min() >= TARGETS['min_cos'])}; "
                   f"file {e.mib / base.mib:.3f}x (<= {TARGETS['size_w8a8']}) {ok(e.mib / base.mib <= TARGETS['size_w8a8'])}")
        if key in alt and "fp32" in alt and "ort-dynamic" in alt:
            a = alt[key].lat()
            out[-1] += (f" [with {alt_threads} thread(s): {alt['fp32'].lat() / a:.2f}x vs fp32, "
                        f"{alt['ort-dynamic'].lat() / a:.2f}x vs quantize_dynamic]")
        if dyn_fa is not None and dyn_fa.times:
            out[-1] += (f"; ablation: {dyn_fa.lat() / e.lat():.2f}x vs quantize_dynamic given fxopt's "
                        f"fused-attention fp32" + (f" ({alt['ort-dynamic-fa'].lat() / alt[key].lat():.2f}x with "
                                                   f"{alt_threads} thread(s))" if key in alt and "ort-dynamic-fa" in alt
                                                   else ""))
    for key in ("w4-g32", "w4-g64", "w4-g128", "w4-asym-g32", "w4-asym-g64", "w4-asym-g128",
                "w4-fzp-g32", "w4-fzp-g64", "w4-fzp-g128"):
        e = engines.get(key)
        if e and not e.error and e.mib:
            out.append(f"{e.label}: file {e.mib / base.mib:.3f}x fp32 (target <= {TARGETS['size_w4']}) "
                       f"{ok(e.mib / base.mib <= TARGETS['size_w4'])}; mean cos {e.cos.mean():.4f}")
    return out


def param_breakdown(model) -> str:
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n and p.dim() == 2)
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tot = sum(p.numel() for p in model.parameters())
    rest = tot - emb - lin

    def ratio(emb_bytes, lin_bytes):
        return (emb * emb_bytes + lin * lin_bytes + rest * 4) / (tot * 4)

    return (f"parameters: {tot / 1e6:.2f} M = embedding tables {emb / 1e6:.2f} M ({100 * emb / tot:.0f} %) + linear "
            f"weights {lin / 1e6:.2f} M ({100 * lin / tot:.0f} %) + other {rest / 1e6:.2f} M. Lower bounds on the "
            f"file (scales ignored): int8 linears only {ratio(4, 1):.2f}x fp32; int8 linears + int8 embeddings "
            f"{ratio(1, 1):.3f}x; int4 linears + int8 embeddings {ratio(1, 0.5):.3f}x; int4 linears + int4 embeddings "
            f"{ratio(0.5, 0.5):.3f}x")


def _failure(ex: Exception) -> str:
    """One table cell for a failed engine (its row still prints; the others still run)."""
    log(traceback.format_exc())
    return f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}".replace("|", "/")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=64, help="calibration passages from Hamlet (default 64)")
    ap.add_argument("--eval", type=int, default=256, help="evaluation passages, Paradise Lost + Sonnets (default 256)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for capture/calibration (default 1)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    ap.add_argument("--runs", type=int, default=3, help="runs per engine per round (default 3)")
    ap.add_argument("--variants", nargs="+", default=None, help=f"fxopt variants ({', '.join(k for k, _, _ in VARIANTS)})")
    ap.add_argument("--no-ort-quant", action="store_true", help="skip ORT's quantize_dynamic / quantize_static rows")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op-type ORT profile")
    ap.add_argument("--profile-runs", type=int, default=8, help="profiled runs per engine (default 8)")
    ap.add_argument("--also-threads", type=int, default=1,
                    help="also time every engine with this many ORT threads, interleaved with the rest "
                         "(0: off; default 1: steadier on a shared machine)")
    ap.add_argument("--quick", action="store_true", help=f"variants {', '.join(QUICK)}, 6 rounds, 128 eval passages")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--keep", type=Path, default=None, help="write the ONNX files here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.variants = args.variants or list(QUICK)
        args.rounds, args.eval = min(args.rounds, 6), min(args.eval, 128)
    keys = args.variants or [k for k, _, _ in VARIANTS]
    unknown = set(keys) - {k for k, _, _ in VARIANTS}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    torch.set_num_threads(args.torch_threads)
    t_start = time.perf_counter()
    env = environment(args.threads)

    tmp = None
    if args.keep:
        workdir = args.keep
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fxopt-qminilm-")
        workdir = Path(tmp.name)

    log("loading all-MiniLM-L6-v2")
    lm = models.minilm(batch=args.batch, seq=args.seq)
    tok = lm.tokenizer
    calib_texts = passages(CORPUS / "hamlet_gut.txt", args.calib, skip=60)
    half = args.eval // 2
    eval_texts = passages(CORPUS / "paradiselost.txt", half) + passages(CORPUS / "sonnets_gut.txt", args.eval - half,
                                                                        skip=40)
    calib = batches_of(tok, calib_texts, args.batch, args.seq)
    evals = batches_of(tok, eval_texts, args.batch, args.seq)
    ntok = [int(b["attention_mask"].sum(1).float().mean()) for b in evals]
    data_line = (f"data: calibration {len(calib_texts)} Hamlet passages ({len(calib)} batches); evaluation "
                 f"{len(eval_texts)} passages ({half} Paradise Lost + {args.eval - half} Sonnets, {len(evals)} batches); "
                 f"batch {args.batch} x seq {args.seq} (padding=max_length), mean real tokens/passage "
                 f"{statistics.mean(ntok):.1f}")
    log(data_line)

    log("PyTorch fp32 reference embeddings")
    with torch.no_grad():
        ref = np.concatenate([mean_pool(lm.model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy())
                              for b in evals])

    engines: list[Engine] = []
    base = Engine("fp32", "ORT fp32 (exporter's SDPA)", "cleanup, export_onnx(fused_attention=False)")
    fa = Engine("fp32-fa", "ORT fp32, fxopt fused attention", "cleanup, export_onnx() (MultiHeadAttention)")
    engines += [base, fa]
    log("fp32: optimize cleanup + export (verified), with the exporter's SDPA and with fused attention")
    t0 = time.perf_counter()
    res = fxopt.optimize(lm.model, "cleanup", calib[0], dynamic=True)
    for e, fused in ((base, False), (fa, True)):
        e.path = workdir / f"{e.key}.onnx"
        rep = res.export_onnx(e.path, verify=True, fused_attention=fused)
        e.build_s = time.perf_counter() - t0
        e.notes.append(f"export verified: max abs {rep.max_abs:.2g}")
        e.backend = OrtBackend(e.path, threads=args.threads, opt_level="all")

    pre_note = ""
    if not args.no_ort_quant:
        src, pre_note = preprocess(base.path, workdir)
        log(f"ORT quantizers on {src.name} ({pre_note})")
        for key, label, how in [
            ("ort-dynamic", "ORT quantize_dynamic (per-channel s8)", "quantize_dynamic(per_channel, QInt8)"),
            ("ort-static", "ORT quantize_static (QDQ, default ops)", "quantize_static(QDQ, MinMax, per_channel, U8/S8)"),
            ("ort-static-linears", "ORT quantize_static (QDQ, linears only)",
             "quantize_static(same, nodes_to_quantize=MatMul/Gemm with initializer B)"),
        ]:
            e = Engine(key, label, how)
            engines.append(e)
            log(f"{key}: {how}")
            try:
                build_ort(e, src, calib, workdir, args.threads)
            except Exception as ex:  # noqa: BLE001
                e.error = _failure(ex)
        # ablation: ORT's dynamic quantizer given fxopt's fused-attention export instead
        src_fa, _ = preprocess(fa.path, workdir)
        e = Engine("ort-dynamic-fa", "ORT quantize_dynamic on fxopt's fused-attention fp32",
                   "quantize_dynamic(per_channel, QInt8) of the fp32-fa file")
        engines.append(e)
        try:
            build_ort(e, src_fa, calib, workdir, args.threads)
        except Exception as ex:  # noqa: BLE001
            e.error = _failure(ex)

    for key, label, pipe in VARIANTS:
        if key not in keys:
            continue
        e = Engine(key, label, pipe)
        engines.append(e)
        log(f"{key}: optimize {pipe!r} + export")
        try:
            build_fxopt(e, lm, calib, workdir, args.threads)
        except Exception as ex:  # noqa: BLE001
            e.error = _failure(ex)

    live = [e for e in engines if e.backend is not None]
    for e in live:
        log(f"{e.key}: accuracy on {len(evals)} batches; ORT-optimized op types")
        try:
            e.cos = cosines(ort_embeddings(e, evals), ref)
            e.ops = e.backend.optimized_op_types()
        except Exception as ex:  # noqa: BLE001
            e.error = _failure(ex)
            e.backend = None

    timing_batch = evals[0]
    alt: dict[str, Engine] = {}
    if args.also_threads:
        for e in engines:
            if e.backend is not None:
                alt[e.key] = Engine(f"{e.key}@{args.also_threads}t", e.label, e.how, path=e.path,
                                    backend=OrtBackend(e.path, threads=args.also_threads, opt_level="all"))
    timed = [e for e in engines if e.backend is not None] + list(alt.values())
    log(f"interleaved timing: {args.rounds} rounds x {args.runs} runs x {len(timed)} engines")
    time_interleaved(timed, lambda e: e.backend.feeds(timing_batch), args.rounds, args.runs)
    load_end = os.getloadavg()[0]

    profiles = {}
    if not args.no_profile:
        chosen = [e for key in PROFILED for e in engines if e.key == key and e.backend is not None]
        log(f"profiling {', '.join(e.key for e in chosen)} (interleaved, {args.profile_runs} runs)")
        try:
            profiles = profile_interleaved(chosen, lambda e: e.backend.feeds(timing_batch), args.threads,
                                           args.profile_runs, workdir)
        except Exception as ex:  # noqa: BLE001
            log(f"profiling failed: {ex}")

    by_key = {e.key: e for e in engines}
    dyn = by_key.get("ort-dynamic") if by_key.get("ort-dynamic") and by_key["ort-dynamic"].times else None
    wall = time.perf_counter() - t_start

    print("\n".join(env))
    print(data_line)
    print(f"timing: batch {args.batch} x seq {args.seq}, {args.rounds} interleaved rounds x {args.runs} runs per engine; "
          f"load average at end {load_end:.2f}; ORT quantizers' input: {pre_note or 'n/a'}")
    print(param_breakdown(lm.model))
    print()
    print(render(*main_table(engines, base, dyn, alt, args.also_threads), args.markdown))
    print()
    print("Pipelines: " + "; ".join(f"{e.key} = {e.how}" for e in engines))
    notes = [f"{e.key}: {n}" for e in engines for n in e.notes]
    if notes:
        print("Notes: " + "; ".join(notes[:20]) + (f" (+{len(notes) - 20} more)" if len(notes) > 20 else ""))
    print()
    print("Targets (issue #3):")
    for line in targets(by_key, base, alt, args.also_threads):
        print("  - " + line)
    if profiles:
        print()
        print(f"ORT profile ({args.profile_runs} interleaved runs, {args.threads} threads), ms per run by op category "
              "(% of summed node time):")
        cats = [name for name, _ in CATEGORIES] + ["other"]
        head = ["engine", "node ms"] + cats
        body = []
        for label, (by_op, total) in profiles.items():
            c = categorize(by_op)
            body.append([label, f"{total:.1f}"] + [f"{c[k]:.1f} ({100 * c[k] / total:.0f}%)" for k in cats])
        print(render(head, body, args.markdown))
        print()
        print("Top op types, ms per run:")
        for label, (by_op, total) in profiles.items():
            print(f"  - {label}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in list(by_op.items())[:10]))
    print()
    print(f"Optimized ORT op types: " + " | ".join(
        f"{e.key}: " + ", ".join(f"{k} {v}" for k, v in e.ops.items()) for e in engines if e.ops and e.key in
        ("fp32", "fp32-fa", "ort-static", "sq-auto", "dyn-tensor")))
    print(f"\nwall time: {wall:.0f} s")
    log(f"done in {wall:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
