"""Helpers shared by the tests."""
from __future__ import annotations

from pathlib import Path

import torch

from fxopt.ir.graph import ExampleInputs, call, flatten_tensors

DATA = Path(__file__).parent / "data"


def hamlet_lines(n: int, min_words: int = 5) -> list[str]:
    """Real text committed under tests/data (public-domain Hamlet excerpt)."""
    lines = [ln.strip() for ln in (DATA / "hamlet_excerpt.txt").read_text().splitlines() if len(ln.split()) >= min_words]
    return lines[:n]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def outputs(module, inputs, **extra) -> list[torch.Tensor]:
    ex = ExampleInputs.of(inputs)
    return flatten_tensors(call(module, ExampleInputs(ex.args, {**ex.kwargs, **extra})))


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)
