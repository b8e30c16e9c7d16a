"""``cse`` — common subexpression elimination.

Rewrite rules:

1. Two ``get_attr`` nodes of the same target become one.
2. Two pure ``call_function`` nodes with the same op and the same arguments (after rule 1/2
   merged their inputs) become one; the later is replaced by the earlier.

Not merged: placeholders, the output, ``call_module`` nodes, impure or randomized ops
(``nondeterministic_seeded``: dropout, rand), in-place ops, and any node that reads a tensor an
in-place op writes (directly or through a view), since equal arguments no longer mean equal
values there.

Exact: the function computed is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from ._purity import is_pure, mutated_closure
from .base import Pass, PassContext, PassResult, register_pass


def _key(x: Any, rep: dict) -> Any:
    if isinstance(x, torch.fx.Node):
        return ("%", rep.get(x, x).name)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_key(v, rep) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _key(v, rep)) for k, v in x.items())))
    if isinstance(x, float):
        return ("f", x.hex()) if x == x else ("f", "nan")     # 0.0 vs -0.0 stay distinct
    if isinstance(x, torch.Tensor):
        return ("t", id(x))
    try:
        hash(x)
        return (type(x).__name__, x)
    except TypeError:
        return ("r", repr(x))


@register_pass
@dataclass
class CommonSubexpressionElimination(Pass):
    name: ClassVar[str] = "cse"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "merge identical pure computations and duplicate parameter reads"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        unsafe = mutated_closure(gm.graph)
        seen: dict[Any, torch.fx.Node] = {}
        rep: dict[torch.fx.Node, torch.fx.Node] = {}
        merged = 0
        for n in list(gm.graph.nodes):
            if n.op == "get_attr":
                key = ("get_attr", n.target)
            elif n.op == "call_function" and is_pure(n) and n not in unsafe and not any(
                    a in unsafe for a in n.all_input_nodes):
                key = ("call", str(n.target), _key(n.args, rep), _key(n.kwargs, rep))
            else:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = n
                continue
            n.replace_all_uses_with(first)
            rep[n] = first
            gm.graph.erase_node(n)
            merged += 1
        return PassResult(gm, merged > 0, stats={"merged": merged})
