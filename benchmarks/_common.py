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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
