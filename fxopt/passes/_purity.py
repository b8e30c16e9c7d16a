"""Which nodes may be moved, merged or evaluated ahead of time (shared by CSE and folding)."""
from __future__ import annotations

import torch
import torch.fx

#: Ops that create views: an in-place write through a view writes its base, and vice versa.
VIEW_OPS = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default, torch.ops.aten.slice.Tensor, torch.ops.aten.select.int,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.expand.default,
    torch.ops.aten.alias.default, torch.ops.aten.t.default, torch.ops.aten.as_strided.default,
    torch.ops.aten.split.Tensor, torch.ops.aten.chunk.default, torch.ops.aten.unflatten.int,
    torch.ops.aten.flatten.using_ints, torch.ops.aten.detach.default,
}


def is_mutating(node: torch.fx.Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in t._schema.arguments)


def is_pure(node: torch.fx.Node) -> bool:
    """A call_function whose result depends only on its arguments and that writes nothing."""
    if node.op != "call_function":
        return False
    if node.is_impure() or is_mutating(node):
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in t.tags or torch.Tag.nondeterministic_bitwise in t.tags:
            return False
        if t._schema.name.startswith("aten::_assert") or t._schema.name in ("aten::sym_size", "aten::sym_numel"):
            return False
    return True


def mutated_closure(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node whose value an in-place op may change: the written tensors, their bases and views."""
    marked: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and is_mutating(n):
            schema = n.target._schema
            for i, a in enumerate(schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                    if isinstance(v, torch.fx.Node):
                        marked.add(v)
            marked.add(n)
    changed = True
    while changed:
        changed = False
        for n in graph.nodes:
            if n.op == "call_function" and n.target in VIEW_OPS and n.args and isinstance(n.args[0], torch.fx.Node):
                base = n.args[0]
                if (n in marked) != (base in marked):
                    marked.update((n, base))
                    changed = True
    return marked
