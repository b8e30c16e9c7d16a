"""``constant-folding`` — evaluate, once, what does not depend on the graph's inputs.

Rewrite rules:

1. A pure ``call_function`` whose inputs are all parameters, buffers, literals or other
   foldable nodes is *foldable* (no placeholder, no ``sym_size`` of an input reaches it).
2. Each foldable node with a user that is not foldable (or the output) is evaluated in
   PyTorch and replaced by a ``get_attr`` of a new buffer ``_folded.<node>``; the foldable
   nodes behind it die and a following ``dce`` removes them and the parameters only they read.
3. A result larger than ``max_bytes`` is not materialized (a note says which): folding must not
   trade a cheap op for a large constant.

Typical wins on HF graphs captured with static shapes: position ids, causal / padding masks
(arange → index → compare), rotary tables, and weight transposes.

Exact: the folded values are computed by the same kernels on the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..ir.graph import add_constant, get_attr
from ..ir.meta import PROVENANCE
from ._purity import is_pure, mutated_closure
from .base import NotApplicable, Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass
class ConstantFolding(Pass):
    name: ClassVar[str] = "constant-folding"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "precompute input-independent subgraphs (masks, position ids, rotary tables)"
    max_bytes: int = 64 << 20

    def _foldable(self, gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
        unsafe = mutated_closure(gm.graph)
        foldable: set[torch.fx.Node] = set()
        for n in gm.graph.nodes:
            if n.op == "call_function" and is_pure(n) and n not in unsafe and not _is_fxopt_op(n) and all(
                    (a.op == "get_attr") or (a in foldable) for a in n.all_input_nodes):
                foldable.add(n)
        return foldable

    def requires(self, gm, ctx):
        f = self._foldable(gm)
        if not any(u not in f and not _is_check(u) for n in f for u in n.users):
            raise NotApplicable("no node depends only on parameters and constants")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        foldable = self._foldable(gm)
        # dtype/device assertions on a value we evaluate ourselves are settled: drop them
        checks = [u for n in foldable for u in n.users if _is_check(u)]
        for u in dict.fromkeys(checks):
            gm.graph.erase_node(u)
        boundary = [n for n in gm.graph.nodes if n in foldable and any(u not in foldable for u in n.users)]
        env: dict[torch.fx.Node, object] = {}

        def value(a):
            if isinstance(a, torch.fx.Node):
                if a.op == "get_attr":
                    return get_attr(gm, a.target)
                return env[a]
            return a

        folded, skipped, added = 0, [], 0
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n not in foldable:
                    continue
                args = pytree.tree_map(value, n.args)
                kwargs = pytree.tree_map(value, n.kwargs)
                env[n] = n.target(*args, **kwargs)
        for n in boundary:
            out = env[n]
            if not isinstance(out, torch.Tensor):
                continue
            same = next((a for a in n.all_input_nodes if a.op == "get_attr" and _same_tensor(get_attr(gm, a.target), out)),
                        None)
            if same is not None:                     # a no-op (cast to its own dtype, alias): read the attr itself
                n.replace_all_uses_with(same)
                folded += 1
                continue
            nbytes = out.numel() * out.element_size()
            if nbytes > self.max_bytes:
                skipped.append(f"{n.name} ({nbytes} bytes > max_bytes={self.max_bytes})")
                continue
            const = add_constant(gm, f"_folded.{n.name}", out.detach().clone().contiguous(), before=n)
            PROVENANCE.set(const, self.name)
            n.replace_all_uses_with(const)
            folded += 1
            added += nbytes
        if folded or checks:
            gm.graph.eliminate_dead_code()
        notes = [f"not folded (too large): {', '.join(skipped)}"] if skipped else []
        if not folded and not skipped:
            notes.append("nothing to fold: every input-independent value is only used by other foldable nodes")
        return PassResult(gm, folded > 0 or bool(checks), stats={"folded": folded, "bytes_added": added,
                                                                 "checks_removed": len(set(checks))}, notes=notes)


def _is_fxopt_op(n) -> bool:
    """Quantizers are kept as ops: folding Q/DQ of a weight would undo quantization (fuse-qdq
    pre-quantizes weights into integer constants instead)."""
    return isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fxopt"


def _is_check(n) -> bool:
    return n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default


def _same_tensor(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
        a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()

