"""Recognize mixture-of-experts blocks in a captured graph, and rewrite them into ``fxopt::moe``.

A routed MoE block is found from the graph's structure, never from module names:

1. **Router.** A ``topk`` over the last dim whose input is ``softmax(linear(x, W_r))`` (possibly
   through a dtype cast): ``W_r`` is ``[E, D]``, ``E`` the number of experts, ``k`` the top-k.
2. **Region.** Walking forward from the ``topk`` in graph order, the first node through which
   every path from the ``topk`` passes (its first post-dominator) is where the routing weights
   meet the experts' outputs; the block's output ``C`` is the last node of the chain of layout
   ops after it (view / reshape / transpose / sum over the k choices / dtype cast) that has ``x``'s shape
   ``[T, D]``. The *region* is the set of nodes reached from the ``topk`` up to ``C``.
3. **Experts.** The 3-D parameters ``[E, ·, ·]`` that region nodes consume (gathered by expert
   id in HF's ``batched_mm`` form, used whole by ``bmm`` in :class:`fxopt.nn.MoELayer`'s dense
   one-hot combine (``[E, D, T]`` layout, transposed back at the end), read
   transposed by HF's default ``grouped_mm`` form): the
   first consumed is ``w_in [E, F', D]``, the second ``w_out [E, D, F]``; ``F' = 2F`` means a
   gated expert. The activation is the one unary activation op in the region; the top-k
   weights are renormalized when the region divides them by their own sum.
4. **Shared expert** (Qwen2-MoE). When ``C``'s only consumer adds a dense branch of ``x``,
   scaled or not by ``sigmoid(linear(x))``, that branch is recorded as the shared expert. It
   stays in the graph as ordinary linears.
5. **Check.** With example inputs, the block is recomputed from what was recognized (the
   ``fxopt::moe`` kernel, dropless) and compared with ``C``'s value; a block that does not
   reproduce is left alone with a note, as is any MoE-like ``topk`` that does not fit 1–3.

A graph that already holds an ``fxopt::moe`` node (from :class:`fxopt.nn.MoELayer` with a
capacity, or from an earlier pass) yields that node as a block directly.

The description is a :class:`fxopt.ir.meta.MoEBlock` in ``node.meta["fxopt_moe"]`` of the
block's output node (the ``fxopt::moe`` node after :func:`rewrite_to_op`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx

from . import moeops
from .graph import ExampleInputs, fresh_attr_name, get_attr, set_attr
from .meta import MOE, NN_MODULE_STACK, PROVENANCE, SOURCE_PATH, MoEBlock, SharedExpert, describe, module_path

aten = torch.ops.aten

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default, aten.clone.default}
_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.sum.dim_IntList,
           aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.contiguous.default,
           aten.flatten.using_ints, aten.alias.default, aten.t.default, aten.transpose.int,
           aten.permute.default} | _CASTS
_DIVS = {aten.div.Tensor, aten.div_.Tensor}
_ACTS = {aten.silu.default: "silu", aten.relu.default: "relu", aten.gelu.default: "gelu"}


@dataclass(eq=False)
class MoEMatch:
    """A recognized block: its description and the nodes a rewrite needs."""

    block: MoEBlock
    x: torch.fx.Node                 # the router's input, [T, D]
    logits: torch.fx.Node            # the router's output, [T, E]
    output: torch.fx.Node            # C: the routed experts' combined output ([T, D]), or the op node
    w_in: torch.fx.Node
    w_out: torch.fx.Node
    region: list[torch.fx.Node] = field(default_factory=list)
    op_node: torch.fx.Node | None = None


def _is(n: Any, targets) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def _is_assert(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
        n.target._schema.name.startswith("aten::_assert")


def _val(n) -> Any:
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _shape(n) -> tuple[str, ...] | None:
    v = _val(n)
    return tuple(str(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _getitem(n: torch.fx.Node, i: int) -> torch.fx.Node | None:
    for u in n.users:
        if u.op == "call_function" and u.target is operator.getitem and u.args[1] == i:
            return u
    return None


def _attr_tensor(gm, n) -> torch.Tensor | None:
    if isinstance(n, torch.fx.Node) and n.op == "get_attr":
        try:
            t = get_attr(gm, n.target)
        except AttributeError:
            return None
        return t if isinstance(t, torch.Tensor) else None
    return None


def _router(topk: torch.fx.Node) -> tuple[torch.fx.Node | None, str]:
    """(the router linear, '') or (None, why not)."""
    src = topk.args[0]
    while _is(src, _CASTS):
        src = src.args[0]
    if not _is(src, _SOFTMAX):
        return None, "its scores do not come from a softmax"
    dim = src.args[1] if len(src.args) > 1 else -1
    rank = len(_val(src).shape) if isinstance(_val(src), torch.Tensor) else 2
    if dim not in (-1, rank - 1):
        return None, "the softmax is not over the last dim"
    lin = src.args[0]
    while _is(lin, _CASTS):
        lin = lin.args[0]
    if not _is(lin, {aten.linear.default}):
        return None, "the softmax's input is not a linear (the router)"
    return lin, ""


def _block_name(nodes: list[torch.fx.Node], fallback: str) -> str:
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return fallback
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or fallback


def _walk_region(topk: torch.fx.Node, x_shape) -> tuple[list[torch.fx.Node], torch.fx.Node | None, str]:
    """Nodes reached from ``topk`` up to the block's output C (module docstring, rule 2)."""
    cone: set[torch.fx.Node] = {topk}
    open_: dict[torch.fx.Node, int] = {topk: len(topk.users)}
    region = [topk]
    chain: list[torch.fx.Node] = []
    n = topk.next
    while n.op != "root":
        ins = [a for a in n.all_input_nodes if a in cone]
        if ins:
            if n.op == "output":
                return region, None, "a value inside the block is a graph output"
            if _is_assert(n):
                for a in ins:
                    open_[a] -= 1
                    if open_[a] == 0:
                        del open_[a]
                n = n.next
                continue
            if chain:
                tensors_in = [a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor)]
                absorbable = _is(n, _LAYOUT) and all(a in cone for a in tensors_in)
                if not absorbable:
                    break
            cone.add(n)
            region.append(n)
            for a in ins:
                open_[a] -= 1
                if open_[a] == 0:
                    del open_[a]
            if n.users:
                open_[n] = len(n.users)
            if set(open_) == {n}:
                chain.append(n)
            elif chain:
                break
        n = n.next
    cands = [c for c in chain if _shape(c) == x_shape]
    if not cands:
        return region, None, "no node after the top-k combines the experts back to the input's shape"
    out = cands[-1]
    return region[: region.index(out) + 1], out, ""


def _shared_expert(gm, out: torch.fx.Node, x: torch.fx.Node) -> SharedExpert | None:
    users = [u for u in out.users if not _is_assert(u)]
    if len(users) != 1 or not _is(users[0], {aten.add.Tensor}):
        return None
    add = users[0]
    other = add.args[1] if add.args[0] is out else add.args[0]
    if not isinstance(other, torch.fx.Node):
        return None
    # ancestors of `other` back to x's ancestors
    stop = set()
    stack = [x]
    while stack:
        a = stack.pop()
        if a in stop:
            continue
        stop.add(a)
        stack.extend(a.all_input_nodes)
    linears, seen, stack = [], set(), [other]
    while stack:
        a = stack.pop()
        if a in seen or a in stop:
            continue
        seen.add(a)
        if _is(a, {aten.linear.default}) and isinstance(a.args[1], torch.fx.Node) and a.args[1].op == "get_attr":
            linears.append(a)
        stack.extend(a.all_input_nodes)
    if not linears:
        return None
    gate = ""
    if _is(other, {aten.mul.Tensor}):
        for a in other.args:
            if _is(a, {aten.sigmoid.default}) and _is(a.args[0], {aten.linear.default}):
                gate = a.args[0].args[1].target
    weights = sorted({lin.args[1].target for lin in linears if lin.args[1].target != gate})
    return SharedExpert(weights=weights, gate=gate, output_node=other.name)


def _match_topk(gm: torch.fx.GraphModule, topk: torch.fx.Node) -> tuple[MoEMatch | None, str]:
    lin, why = _router(topk)
    if lin is None:
        return None, why
    wr = _attr_tensor(gm, lin.args[1])
    if wr is None or wr.dim() != 2:
        return None, "the router weight is not a 2-D parameter"
    num_experts = wr.shape[0]
    k = topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    if not isinstance(k, int) or dim not in (-1, 1) or not largest:
        return None, "the top-k is not a static largest-k over the experts"
    x = lin.args[0]
    x_shape = _shape(x)
    if x_shape is None or len(x_shape) != 2:
        return None, "the router's input is not 2-D [tokens, hidden]"
    region, out, why = _walk_region(topk, x_shape)
    if out is None:
        return None, why
    # experts: 3-D [E, ., .] parameters consumed inside the region
    consumed: list[torch.fx.Node] = []
    consumers: list[torch.fx.Node] = []
    source = "gathered"
    for n in region:
        for a in n.all_input_nodes:
            if _is(a, {aten.transpose.int}) and sorted(d % 3 for d in a.args[1:3]) == [1, 2]:
                a = a.args[0]                  # HF grouped_mm: the weight read transposed, [E, D, F']
                source = "grouped"
            t = _attr_tensor(gm, a)
            if t is not None and t.dim() == 3 and t.shape[0] == num_experts:
                consumers.append(n)
                if a not in consumed:
                    consumed.append(a)
    if len(consumed) != 2:
        return None, (f"expected 2 stacked expert weights [E={num_experts}, ., .] consumed after the top-k, found "
                      f"{len(consumed)} ({', '.join(c.target for c in consumed) or 'none'}); expert biases, "
                      "transposed or per-expert (ModuleList) weights are not supported (an HF MoE model: load it "
                      "with experts_implementation='batched_mm')")
    w_in_n, w_out_n = consumed
    w_in, w_out = _attr_tensor(gm, w_in_n), _attr_tensor(gm, w_out_n)
    d = int(x_shape[1]) if x_shape[1].isdigit() else w_out.shape[1]
    f = w_out.shape[2]
    if w_in.shape[2] != d or w_out.shape[1] != d or w_in.shape[1] not in (f, 2 * f):
        return None, (f"expert weights of shapes {tuple(w_in.shape)} and {tuple(w_out.shape)} do not fit "
                      f"w_in [E, F or 2F, D={d}], w_out [E, D, F]")
    gated = w_in.shape[1] == 2 * f
    acts = set()
    for n in region:
        if _is(n, set(_ACTS)):
            name = _ACTS[n.target]
            if name == "gelu" and (n.kwargs.get("approximate") == "tanh" or (len(n.args) > 1 and n.args[1] == "tanh")):
                name = "gelu_tanh"
            acts.add(name)
    if len(acts) != 1:
        return None, f"expected one activation between the expert projections, found {sorted(acts) or 'none'}"
    values = _getitem(topk, 0)
    vals = {values} if values is not None else set()
    for n in region:
        if _is(n, _CASTS) and n.args[0] in vals:
            vals.add(n)
    norm = any(_is(n, _DIVS) and n.args[0] in vals and _is(n.args[1], {aten.sum.dim_IntList})
               and n.args[1].args[0] in vals for n in region)
    name = _block_name([lin] + consumers, out.name)
    block = MoEBlock(name=name, router=lin.args[1].target, w_in=w_in_n.target, w_out=w_out_n.target,
                     num_experts=num_experts, top_k=k, norm_topk=norm, gated=gated, activation=acts.pop(),
                     d_model=d, d_ff=f, source=source, shared_expert=_shared_expert(gm, out, x))
    return MoEMatch(block, x, lin, out, w_in_n, w_out_n, region), ""


def _match_op(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple[MoEMatch | None, str]:
    A = moeops.ARG
    x, logits, wi, wo = (n.args[A[k]] for k in ("x", "router_logits", "w_in", "w_out"))
    known = MOE.get(n)
    if known is not None:
        block = known
    else:
        w_in, w_out = _attr_tensor(gm, wi), _attr_tensor(gm, wo)
        if w_in is None or w_out is None:
            return None, "its expert weights are not parameters of the graph"
        router = logits.args[1].target if _is(logits, {aten.linear.default}) and logits.args[1].op == "get_attr" else ""
        experts = list(n.args[A["experts"]])
        e_all = _val(logits).shape[-1] if _val(logits) is not None else w_in.shape[0]
        block = MoEBlock(name=_block_name([logits, n], n.name), router=router, w_in=wi.target, w_out=wo.target,
                         num_experts=int(e_all), top_k=n.args[A["top_k"]], norm_topk=n.args[A["norm_topk"]],
                         gated=n.args[A["gated"]], activation=n.args[A["activation"]], d_model=w_out.shape[1],
                         d_ff=w_out.shape[2], source="fxopt-op", experts=experts,
                         capacity=list(n.args[A["capacity"]]), routing=n.args[A["routing"]])
    return MoEMatch(block, x, logits, n, wi, wo, [], op_node=n), ""


def find_moe_blocks(gm: torch.fx.GraphModule, example_inputs: Any = None, *, check: bool = True
                    ) -> tuple[list[MoEMatch], list[str]]:
    """All MoE blocks of ``gm`` (graph order) and notes on MoE-like code left alone.

    With ``example_inputs`` (and ``check``), each block found from plain ops is verified by
    recomputing it with the ``fxopt::moe`` kernel (module docstring, rule 5)."""
    matches, notes = [], []
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is moeops.MOE_OP:
            m, why = _match_op(gm, n)
        elif n.target is aten.topk.default:
            m, why = _match_topk(gm, n)
            if m is None and why in ("its scores do not come from a softmax",):
                continue                     # a top-k that is not routing: nothing to say
        else:
            continue
        if m is None:
            notes.append(f"MoE-like top-k {describe(n)} left alone: {why}")
            continue
        known = MOE.get(m.output)
        if known is not None:                # recognized (and maybe profiled) before
            m.block = known
        matches.append(m)
    names: dict[str, int] = {}
    for m in matches:
        c = names.get(m.block.name, 0)
        names[m.block.name] = c + 1
        if c:
            m.block = replace(m.block, name=f"{m.block.name}#{c}")
    if check and example_inputs is not None:
        todo = [m for m in matches if m.op_node is None and MOE.get(m.output) is None]
        if todo:
            bad = verify(gm, todo, ExampleInputs.of(example_inputs))
            for m, err in bad.items():
                notes.append(f"MoE-like block {m.block.name} ({describe(m.output)}) left alone: recomputing it from "
                             f"the recognized router and experts does not reproduce its output (max |Δ| {err:.3g})")
                matches.remove(m)
    return matches, notes


def _flat_inputs(gm: torch.fx.GraphModule, inputs: ExampleInputs) -> list:
    """Inputs in placeholder order (an exported module takes a pytree of args and kwargs)."""
    import torch.fx._pytree as fx_pytree

    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return list(fx_pytree.tree_flatten_spec((inputs.args, inputs.kwargs), spec))
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return [*inputs.args, *[inputs.kwargs[n] for n in names[len(inputs.args):]]]


def verify(gm: torch.fx.GraphModule, matches: list[MoEMatch], inputs: ExampleInputs,
           rtol: float = 1e-4, atol: float = 1e-5) -> dict[MoEMatch, float]:
    """Run ``gm`` once; return the blocks whose recomputation differs from their output."""
    want = {}
    for m in matches:
        want.update({m.x: None, m.logits: None, m.output: None})

    class _Grab(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in want:
                want[n] = out
            return out

    with torch.no_grad():
        _Grab(gm).run(*_flat_inputs(gm, inputs))
    bad = {}
    for m in matches:
        b = m.block
        x, logits, ref = want[m.x], want[m.logits], want[m.output]
        got = moeops.moe_forward(x, logits, get_attr(gm, m.w_in.target), get_attr(gm, m.w_out.target), b.top_k,
                                 b.norm_topk, b.gated, b.activation, [], "vanilla", [])
        err = float((got.double() - ref.reshape(got.shape).double()).abs().max()) if got.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if not err <= atol + rtol * scale:
            bad[m] = err
    return bad


# --------------------------------------------------------------------------- rewrite


def _erase_dead(gm: torch.fx.GraphModule, start: list[torch.fx.Node], region: set[torch.fx.Node]) -> int:
    """Erase ``start`` and, transitively, inputs left without users (pure ops, region-internal
    in-place ops, checks on dead values, parameters reads)."""
    from ..passes._purity import is_mutating, is_pure

    erased = 0
    gone: set[torch.fx.Node] = set()
    work = list(start)
    while work:
        n = work.pop()
        if n in gone or n.op in ("placeholder", "output"):
            continue
        for u in [u for u in n.users if _is_assert(u)]:
            gm.graph.erase_node(u)
            gone.add(u)
            erased += 1
        if n.users:
            continue
        ok = n.op == "get_attr" or is_pure(n) or (is_mutating(n) and n in region) or \
            (n.op == "call_function" and n.target is operator.getitem)
        if not ok:
            continue
        ins = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        gone.add(n)
        erased += 1
        work.extend(ins)
    return erased


def rewrite_to_op(gm: torch.fx.GraphModule, m: MoEMatch, *, capacity: list[float] | None = None,
                  routing: str | None = None, experts: list[int] | None = None,
                  w_in: torch.Tensor | None = None, w_out: torch.Tensor | None = None,
                  pass_name: str = "") -> torch.fx.Node:
    """Replace the block by one ``fxopt::moe`` node (or update the existing one); returns it.

    ``capacity`` / ``routing`` / ``experts`` default to the block's current ones; new expert
    weights (pruning) are stored under fresh names and the old ones left for ``dce``."""
    b = m.block
    capacity = list(b.capacity if capacity is None else capacity)
    routing = b.routing if routing is None else routing
    experts = list(b.experts if experts is None else experts)
    wi_node, wo_node = m.w_in, m.w_out
    anchor = m.op_node if m.op_node is not None else m.output
    new_in = new_out = None

    def kept(target: str, value: torch.Tensor) -> tuple[torch.fx.Node, str]:
        with gm.graph.inserting_before(anchor):
            name = fresh_attr_name(gm, target.replace(".", "_") + "_kept")
            set_attr(gm, name, value, as_parameter=True)
            return gm.graph.get_attr(name), name

    if w_in is not None:
        wi_node, new_in = kept(b.w_in, w_in)
    if w_out is not None:
        wo_node, new_out = kept(b.w_out, w_out)
    args = (m.x, m.logits, wi_node, wo_node, b.top_k, b.norm_topk, b.gated, b.activation, capacity, routing,
            experts, b.name)
    new_block = replace(b, capacity=capacity, routing=routing, experts=experts,
                        w_in=new_in or b.w_in, w_out=new_out or b.w_out)
    if m.op_node is not None:
        old_in, old_out = m.op_node.args[moeops.ARG["w_in"]], m.op_node.args[moeops.ARG["w_out"]]
        m.op_node.args = args
        for old in (old_in, old_out):
            if isinstance(old, torch.fx.Node) and not old.users:
                gm.graph.erase_node(old)
        node = m.op_node
    else:
        with gm.graph.inserting_before(m.output):
            node = gm.graph.call_function(moeops.MOE_OP, args)
        node.meta["val"] = m.output.meta.get("val")
        if NN_MODULE_STACK.get(m.output) is not None:
            node.meta["nn_module_stack"] = dict(NN_MODULE_STACK.get(m.output))
        m.output.replace_all_uses_with(node)
        _erase_dead(gm, [m.output], set(m.region))
        m.region, m.op_node, m.output = [], node, node
    SOURCE_PATH.set(node, b.name)
    if pass_name:
        PROVENANCE.set(node, pass_name)
    MOE.set(node, new_block)
    m.block, m.w_in, m.w_out = new_block, wi_node, wo_node
    return node


def block_bytes(gm: torch.fx.GraphModule, block: MoEBlock) -> int:
    """Bytes of the block's expert weights."""
    return sum(get_attr(gm, t).numel() * get_attr(gm, t).element_size() for t in (block.w_in, block.w_out))
