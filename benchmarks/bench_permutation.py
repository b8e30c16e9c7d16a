"""Channel-permutation search for 2:4 sparsity (Pool & Yu, NeurIPS 2021): how much of the gap
between the plain 2:4 mask and the unstructured 50 % bound the search closes, and how fast.

For each size ``W = torch.rand(rows, cols)`` after ``torch.manual_seed(1)`` (the issue's recipe;
64x128 reproduces its figures: total ~ 4083, plain 2:4 ~ 2852, bound ~ 3060), on one CPU thread
(``torch.set_num_threads(1)``):

* plain    -- |W| kept by the 2:4 mask with the columns in their original order;
* after    -- |W| kept after the searched column permutation;
* bound    -- per row, the largest half of |W| (unstructured 50 %), an upper bound;
* % gap    -- (after - plain) / (bound - plain);
* seconds, iterations (swaps applied, escape kicks included), escapes, rounds (stripe-block draws).

Rows marked "budget" run with a wall-clock ``time_budget``; the "default" row is the deterministic
default call (``escapes=400``, no time budget).  The last rows repeat the issue's reference
figures for NVIDIA apex's permutation search at 64x128.

    python3 benchmarks/bench_permutation.py           # ~1-2 minutes
    python3 benchmarks/bench_permutation.py --full    # adds 4096x4096 (+ ~1 minute)
"""
from __future__ import annotations

import argparse
import sys

import torch

from fxopt.passes._permutation_search import kept_magnitude, search_permutation


def run_row(rows, cols, label, **kw):
    torch.manual_seed(1)
    w = torch.rand(rows, cols)
    perm, info = search_permutation(w, 2, 4, **kw)
    assert sorted(perm.tolist()) == list(range(cols)), "not a permutation"
    assert info["kept_after"] >= info["kept_before"]
    assert abs(kept_magnitude(w.abs()[:, perm], 2, 4) - info["kept_after"]) < 1e-6 * info["kept_after"]
    return dict(size=f"{rows}x{cols}", label=label, total=info["total"], plain=info["kept_before"],
                after=info["kept_after"], bound=info["bound"], gap=100 * info["gap_closed"],
                seconds=info["seconds"], iters=info["iterations"], escapes=info["escapes"], rounds=info["rounds"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also 4096x4096")
    ap.add_argument("--seed", type=int, default=0, help="search seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    plan = [
        (64, 128, "default", dict()),
        (64, 128, "budget 1s", dict(time_budget=1.0, escapes=10**9)),
        (256, 1024, "budget 5s", dict(time_budget=5.0)),
        (768, 3072, "budget 10s", dict(time_budget=10.0)),
        (768, 3072, "budget 30s", dict(time_budget=30.0)),
        (1024, 4096, "budget 20s", dict(time_budget=20.0)),
    ]
    if args.full:
        plan.append((4096, 4096, "budget 60s", dict(time_budget=60.0)))

    hdr = (f"{'size':>10} {'run':>11} {'total':>10} {'plain 2:4':>11} {'after':>11} {'bound':>11} "
           f"{'% gap':>6} {'seconds':>8} {'iters':>7} {'escapes':>7} {'rounds':>6}")
    print(hdr)
    print("-" * len(hdr))
    for rows, cols, label, kw in plan:
        print(f"running {rows}x{cols} {label} ...", file=sys.stderr, flush=True)
        r = run_row(rows, cols, label, seed=args.seed, **kw)
        print(f"{r['size']:>10} {r['label']:>11} {r['total']:>10.1f} {r['plain']:>11.1f} {r['after']:>11.1f} "
              f"{r['bound']:>11.1f} {r['gap']:>6.1f} {r['seconds']:>8.2f} {r['iters']:>7d} {r['escapes']:>7d} "
              f"{r['rounds']:>6d}", flush=True)
    print("-" * len(hdr))
    print(f"{'64x128':>10} {'apex dflt':>11} {4083:>10.1f} {2852:>11.1f} {'':>11} {3060:>11.1f} {43.0:>6.1f} "
          f"{'':>8}   (issue's reference figure, apex default)")
    print(f"{'64x128':>10} {'apex 1000e':>11} {4083:>10.1f} {2852:>11.1f} {'':>11} {3060:>11.1f} {47.6:>6.1f} "
          f"{2.4:>8.2f}   (issue's reference figure, apex with 1000 escapes)")
    print("targets: 64x128 >= 48 % in <= 1 s; 768x3072 >= 20 % in <= 10 s (one thread)")


if __name__ == "__main__":
    main()
