"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def fxopt_revision() -> str:
    """The fxopt commit, and whether fxopt/ has uncommitted changes (recorded with every table)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "fxopt"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}" + (f" + uncommitted changes in {len(dirty.splitlines())} fxopt file(s)" if dirty else " (clean fxopt/)")


def cpu_line() -> str:
    """The CPU, its int8 ISA (what decides int8 weight ranges and kernels) and its cores: every table's header."""
    from fxopt.backends import isa
    return f"CPU: {isa.detect().line()}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def render_table(head: list[str], body: list[list[str]], markdown: bool, *, left_last: bool = False) -> str:
    """A markdown or aligned-text table. A row shorter than ``head`` is ``[label, message]`` (an
    error) and is printed as such; numbers are right-aligned, the first column (and the last, with
    ``left_last``) left-aligned."""
    full = [r for r in body if len(r) == len(head)]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(r) + " |" if len(r) == len(head) else f"| {r[0]} | {r[1]} |" for r in body]
        return "\n".join(out)
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(head)]
    last = len(head) - 1 if left_last else len(head)

    def line(cells):
        return "  ".join(c.rjust(w) if 0 < i < last else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    for r in body:
        out.append(line(r) if len(r) == len(head) else line(r[:1]) + "  " + r[1])
    return "\n".join(out)


def run_with_hooks(model, hooks, batches) -> None:
    """Run ``model(**b)`` on every batch (no grad) with the given hook handles installed, then remove them."""
    import torch

    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
