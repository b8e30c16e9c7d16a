"""``dce`` — dead code elimination.

Rewrite rules:

1. A node with no users whose op has no side effects is erased (repeated until none is left;
   placeholders, the output, impure ops and ``call_module`` guards stay).
2. A parameter or buffer that no ``get_attr`` reads any more is deleted from the module, so
   its memory is freed and it is not exported (the storage of a tied weight stays alive
   through the name still in use).

Exact: the function computed is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ir.graph import delete_unused_attrs
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass
class DeadCodeElimination(Pass):
    name: ClassVar[str] = "dce"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "erase unused nodes and the parameters nothing reads"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed_nodes = before - len(gm.graph.nodes)
        removed_attrs, _ = delete_unused_attrs(gm)
        notes = []
        if removed_attrs:
            shown = ", ".join(removed_attrs[:5]) + (f" (+{len(removed_attrs) - 5} more)" if len(removed_attrs) > 5 else "")
            notes.append(f"deleted unused tensors: {shown}")
        return PassResult(gm, bool(removed_nodes or removed_attrs),
                          stats={"nodes_removed": removed_nodes, "tensors_removed": len(removed_attrs)}, notes=notes)
