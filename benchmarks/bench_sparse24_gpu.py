"""2:4 semi-structured sparse GEMMs on a GPU: dense fp16 vs ``torch.sparse.to_sparse_semi_structured``
(cuSPARSELt and CUTLASS), on transformer linear shapes and on a whole masked model through
``fxopt.backends.sparse24``.

Part 1, linear shapes: ``y = x Wᵀ + b`` with ``x [tokens, in]``, ``W [out, in]`` masked 2:4 by
magnitude (``fxopt.passes.nm_sparsity.nm_mask``), fp16. For each kernel: median milliseconds over
``--iters`` timed calls (CUDA events, after warm-up), the speedup over dense fp16 on the same masked
weight, and the max |Δ| relative to max |y| between the sparse and the dense result (the kernels
accumulate in fp32; differences are rounding only).

Part 2, a model: the real all-MiniLM-L6-v2 (``fxopt.models.minilm``; falls back to
``hf_tiny("bert-tiny", 6, width=384)`` if its package is missing), ``nm-sparsity{n=2,m=4}``, then

* dense fp16: the masked graph copied to the GPU in fp16;
* sparse24 (kernel): ``Sparse24Backend(graph, dtype=float16, kernel=...)``, masked linears as 2:4 GEMMs;

median ms per batch of ``--batch`` × ``--seq`` tokens, speedup, and output agreement with dense fp16.
The lint's report (which linears each kernel accepts) is printed first.

Without CUDA (or on a GPU older than sm80) it prints why and exits with status 0.

    python3 benchmarks/bench_sparse24_gpu.py                       # both parts, ~1 min on a GPU
    python3 benchmarks/bench_sparse24_gpu.py --markdown --iters 200
    python3 benchmarks/bench_sparse24_gpu.py --dry-run             # CPU: exercise the script (no timings of value)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fxopt_revision, log  # noqa: E402

import fxopt  # noqa: E402
from fxopt.backends import sparse24  # noqa: E402
from fxopt.ir.graph import ExampleInputs, call, clone, flatten_tensors, to_device  # noqa: E402
from fxopt.passes.nm_sparsity import nm_mask  # noqa: E402

# (name, tokens, in, out): MiniLM/BERT-base FFN and attention shapes, a Llama-7B MLP
SHAPES = [
    ("MiniLM q/k/v/o", 4096, 384, 384),
    ("MiniLM fc1", 4096, 384, 1536),
    ("MiniLM fc2", 4096, 1536, 384),
    ("BERT-base fc1", 8192, 768, 3072),
    ("BERT-base fc2", 8192, 3072, 768),
    ("Llama-7B up", 4096, 4096, 11008),
    ("Llama-7B down", 4096, 11008, 4096),
]


class Timer:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, perf_counter on CPU (dry run)."""

    def __init__(self, device: str, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)


def graphed(fn):
    """``fn`` captured once as a CUDA graph: the callable replays it (no per-call host work)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def print_table(title: str, cols: list[str], rows: list[list[str]], markdown: bool) -> None:
    print(f"\n{title}\n")
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    sys.stdout.flush()


def converter(kernel: str, dry_run: bool):
    if dry_run:
        return lambda w: w.clone()                   # CPU: dense stand-in, exercises the code paths
    cls = getattr(torch.sparse, sparse24._CLASSES[kernel])
    return lambda w: cls.from_dense(w.contiguous())


def bench_shapes(args, device, dtype, kernels, timer) -> None:
    rows = []
    for name, tokens, fin, fout in SHAPES:
        if args.dry_run:
            tokens, fin, fout = min(tokens, 256), min(fin, 512), min(fout, 512)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(fout, fin, generator=g)
        w = (w * nm_mask(w, 2, 4)).to(device=device, dtype=dtype)
        b = torch.randn(fout, generator=g).to(device=device, dtype=dtype)
        x = torch.randn(tokens, fin, generator=g).to(device=device, dtype=dtype)
        with torch.no_grad():
            y = torch.nn.functional.linear(x, w, b)
            dense_ms = timer(lambda: torch.nn.functional.linear(x, w, b))
            dense_g = None if args.dry_run else timer(graphed(lambda: torch.nn.functional.linear(x, w, b)))
            row = [name, f"{tokens}x{fin} · {fout}x{fin}ᵀ", f"{dense_ms:.3f}",
                   "-" if dense_g is None else f"{dense_g:.3f}"]
            for kernel in kernels:
                problem = None if args.dry_run else sparse24.cuda_problem(kernel)
                if problem:
                    row += ["n/a", "", problem.split(": ", 1)[-1][:48], "", ""]
                    continue
                chk = sparse24.check_weight(w, dtype=dtype, kernel=kernel)
                if not chk.accepted:
                    row += ["rejected", "", "; ".join(chk.reasons)[:40], "", ""]
                    continue
                try:
                    ws = converter(kernel, args.dry_run)(w)
                    ys = torch.nn.functional.linear(x, ws, b)
                    ms = timer(lambda: torch.nn.functional.linear(x, ws, b))
                    row += [f"{ms:.3f}", f"{dense_ms / ms:.2f}x", f"{rel_err(ys, y):.1e}"]
                    if dense_g is not None:
                        gms = timer(graphed(lambda: torch.nn.functional.linear(x, ws, b)))
                        row += [f"{gms:.3f}", f"{dense_g / gms:.2f}x"]
                    else:
                        row += ["-", "-"]
                except Exception as e:  # noqa: BLE001 - a kernel missing from this build is a result too
                    row += ["error", "", f"{type(e).__name__}: {e}"[:60], "", ""]
        log(f"{name}: {' '.join(row[2:])}")
        rows.append(row)
    cols = ["layer", "x · Wᵀ", "dense ms", "dense graph ms"]
    for k in kernels:
        cols += [f"{k} ms", f"{k} speedup", f"{k} rel err", f"{k} graph ms", f"{k} graph speedup"]
    print_table(f"Linear layers, {str(dtype).replace('torch.', '')}, 2:4-masked weights (median of {args.iters})",
                cols, rows, args.markdown)


def load_model(batch: int, seq: int):
    from fxopt import models
    if models.minilm_available():
        lm = models.minilm(batch=batch, seq=seq)
        return lm, "all-MiniLM-L6-v2 (real weights)"
    lm = models.hf_tiny("bert-tiny", 6, batch=batch, seq=seq, width=384)
    return lm, "bert-tiny 6L width 384 (random init; MiniLM package missing)"


def bench_model(args, device, dtype, kernels, timer) -> None:
    lm, desc = load_model(args.batch, args.seq)
    res = fxopt.optimize(lm.model, "nm-sparsity{n=2,m=4}", lm.example_inputs)
    masked = res.module
    for kernel in kernels:
        print(f"\n{sparse24.lint_report(sparse24.lint(masked, dtype=dtype, kernel=kernel))}")
    ex = ExampleInputs.of(lm.example_inputs)

    def move(v):
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            return v.to(dtype) if v.is_floating_point() else v
        return v

    ex_dev = ExampleInputs(tuple(move(a) for a in ex.args), {k: move(v) for k, v in ex.kwargs.items()})
    dense = to_device(clone(masked), device, dtype)
    with torch.no_grad():
        ref = flatten_tensors(call(dense, ex_dev))[0]
        dense_ms = timer(lambda: call(dense, ex_dev))
    dt = str(dtype).replace("torch.", "")
    rows = [[f"dense {dt}", f"{dense_ms:.3f}", "1.00x", "0", "-"]]
    graphs = [False] if args.dry_run else [False, True]
    if not args.dry_run:
        dense_run = sparse24.CudaGraphRunner(dense)
        with torch.no_grad():
            dense_g = timer(lambda: dense_run(ex_dev))
        rows.append([f"dense {dt}, CUDA graph", f"{dense_g:.3f}", f"{dense_ms / dense_g:.2f}x", "0", "-"])
    for kernel in kernels:
        for graph in graphs:
            label = f"sparse24 {kernel}" + (", CUDA graph" if graph else "")
            try:
                be = sparse24.Sparse24Backend(masked, dtype=dtype, kernel=kernel, device=device, cuda_graph=graph,
                                              convert=converter(kernel, True) if args.dry_run else None)
                with torch.no_grad():
                    out = be.run(ex_dev)[0]
                    ms = timer(lambda: be.run(ex_dev))
                rows.append([label, f"{ms:.3f}", f"{dense_ms / ms:.2f}x", f"{rel_err(out, ref):.1e}",
                             be.notes[0].split(" run as")[0]])
            except Exception as e:  # noqa: BLE001
                rows.append([label, "error", "", "", f"{type(e).__name__}: {e}"[:80]])
            log(f"model {label}: {rows[-1][1:]}")
    print_table(f"{desc}, nm-sparsity 2:4, batch {args.batch} x seq {args.seq}, median of {args.iters}",
                ["engine", "ms / batch", "speedup vs dense (no graph)", "rel err vs dense", "linears sparse"], rows, args.markdown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--kernels", nargs="+", default=list(sparse24.KERNELS), choices=list(sparse24.KERNELS))
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="run on CPU with a dense stand-in for the sparse weights (checks the script, not speed)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        device = "cpu"
        dtype = torch.bfloat16
        args.iters, args.warmup, args.batch, args.seq = min(args.iters, 3), 1, min(args.batch, 4), min(args.seq, 32)
        print("DRY RUN on CPU: sparse weights are dense stand-ins; the timings say nothing about 2:4 kernels")
    else:
        problem = sparse24.cuda_problem()
        if problem:
            print(f"bench_sparse24_gpu: nothing to measure here: {problem}.")
            print("Run it on a machine with an NVIDIA GPU (sm80+); `--dry-run` checks the script on CPU.")
            return 0
        device = "cuda"
        print(f"GPU: {torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuSPARSELt available: {torch.backends.cusparselt.is_available()}")
    print(f"fxopt {fxopt_revision()}")
    timer = Timer(device, args.warmup, args.iters)
    bench_shapes(args, device, dtype, args.kernels, timer)
    if not args.skip_model:
        bench_model(args, device, dtype, args.kernels, timer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
