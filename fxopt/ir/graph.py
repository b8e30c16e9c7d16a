"""Small helpers over a captured GraphModule that every pass and instrument uses."""
from __future__ import annotations

import collections
import re
from typing import Any, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from .meta import op_name
from .offload import is_offloaded, offload_map, run_offloaded


def clone(module):
    """Deep copy of a (graph) module; silences the pytree-spec deprecation noise deepcopy triggers."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


def graph_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (nodes, meta, codegen) that *shares* its
    parameters and buffers: rewrite its graph freely (export-time lowering does) without touching
    ``gm``, and without copying the weights."""
    import copy
    import warnings

    with warnings.catch_warnings():      # deep-copying the pytree specs re-creates torch's deprecated LeafSpec
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def to_device(gm: torch.fx.GraphModule, device: str | torch.device, dtype: torch.dtype | None = None
              ) -> torch.fx.GraphModule:
    """Move a captured graph to ``device`` (and floating tensors to ``dtype``) in place; returns ``gm``.

    ``Module.to`` is not enough for an exported graph: it moves parameters and buffers but not
    (1) tensor constants held as plain attributes, nor (2) the device baked into nodes at capture
    (``arange(..., device=cpu)``, ``to(x, cpu, torch.bool)``, ``_assert_tensor_metadata(device=cpu)``),
    so the moved graph fails with "tensors on different devices" at the first such node. This moves
    every tensor attribute, rewrites every ``torch.device`` argument to ``device``, and — when
    ``dtype`` changes floating tensors — drops the ``_assert_tensor_metadata`` checks, which assert the
    dtypes seen at capture."""
    device = torch.device(device)
    gm.to(device=device, dtype=dtype) if dtype is not None else gm.to(device=device)
    for mod in gm.modules():
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                moved = value.to(device)
                if dtype is not None and moved.is_floating_point():
                    moved = moved.to(dtype)
                setattr(mod, name, moved)

    def swap(a):
        return device if isinstance(a, torch.device) else a

    assert_op = torch.ops.aten._assert_tensor_metadata.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is assert_op and dtype is not None:
            gm.graph.erase_node(node)
            continue
        node.args = torch.fx.node.map_aggregate(node.args, swap)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()
    return gm


def get_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor behind a ``get_attr`` target such as ``encoder.layer.0.output.dense.weight``.

    On an offloaded graph (:mod:`fxopt.ir.offload`) the tensor is loaded from its file; the
    module keeps no reference to it."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.Tensor) and obj.is_meta:
        om = offload_map(gm)
        if om is not None and target in om.files:
            return om.load(target)
    return obj


def attr_meta(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor object registered at ``target`` without loading it (a ``meta`` tensor when offloaded):
    for shapes, dtypes and byte counts."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor, *, as_parameter: bool | None = None,
             _raw: bool = False) -> None:
    """Set (or create) the tensor at a dotted path, creating intermediate modules as needed.

    Replacing a Parameter keeps it a Parameter (``requires_grad=False``); new tensors become
    buffers unless ``as_parameter`` says otherwise. On an offloaded graph a large value goes to a
    new file (copy on write) and the module holds a ``meta`` tensor for it.
    """
    if not _raw:
        om = offload_map(gm)
        if om is not None and isinstance(value, torch.Tensor) and not value.is_meta:
            if value.numel() * value.element_size() >= om.min_bytes:
                om.save(target, value)
                value = torch.empty_like(value, device="meta")
            else:
                om.files.pop(target, None)
    *parents, leaf = target.split(".")
    mod = gm
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    current = getattr(mod, leaf, None)
    if as_parameter is None:
        as_parameter = isinstance(current, torch.nn.Parameter)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if leaf in vars(mod) and not isinstance(vars(mod)[leaf], torch.nn.Module):
        delattr(mod, leaf)
    if as_parameter:
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        mod.register_buffer(leaf, value)


def del_attr(gm: torch.nn.Module, target: str) -> None:
    *parents, leaf = target.split(".")
    mod = gm
    for part in parents:
        mod = getattr(mod, part)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif leaf in mod._buffers:
        del mod._buffers[leaf]
    elif hasattr(mod, leaf):
        delattr(mod, leaf)


def delete_unused_attrs(gm: torch.nn.Module) -> tuple[list[str], int]:
    """Delete every parameter/buffer no ``get_attr`` reads; returns (names, bytes freed).

    A tied tensor stays alive through the name still in use (its bytes are not counted)."""
    used = used_attr_targets(gm)
    om = offload_map(gm)
    names, freed = [], 0
    live = {_storage_key(gm, t, om) for t in used if isinstance(attr_meta(gm, t), torch.Tensor)}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            if _storage_key(gm, name, om) not in live:
                freed += t.numel() * t.element_size()
            del_attr(gm, name)
            if om is not None:
                om.files.pop(name, None)
            names.append(name)
    return names, freed


def storage_key(gm, target: str) -> tuple:
    """Identity of the storage behind ``target``: two targets with the same key alias one tensor
    (for offloaded weights, the same file)."""
    return _storage_key(gm, target, offload_map(gm))


def _storage_key(gm, target: str, om) -> tuple:
    t = attr_meta(gm, target)
    if om is not None and target in om.files:
        return ("file", om.files[target])
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def fresh_attr_name(gm: torch.nn.Module, base: str) -> str:
    """A dotted attribute path not used yet, derived from ``base``."""
    base = re.sub(r"[^0-9a-zA-Z_.]", "_", base)
    # a part named like a Module attribute ("to", "eval", "weight" of a method...) would shadow it
    base = ".".join(p + "_" if hasattr(torch.nn.Module, p) else p for p in base.split("."))
    name, i = base, 0
    while True:
        try:
            get_attr(gm, name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}_{i}"


def add_constant(gm: torch.fx.GraphModule, base: str, value: torch.Tensor, *, before: torch.fx.Node) -> torch.fx.Node:
    """Register ``value`` as a buffer and insert a ``get_attr`` for it before ``before``."""
    name = fresh_attr_name(gm, base)
    set_attr(gm, name, value, as_parameter=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def used_attr_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def op_histogram(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many nodes run each op (placeholders, get_attr and output excluded)."""
    c = collections.Counter(op_name(n) for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output"))
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def parameter_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of every distinct tensor the graph reads through ``get_attr`` (tied weights counted once)."""
    om = offload_map(gm)
    seen: set[tuple] = set()
    total = 0
    for target in used_attr_targets(gm):
        t = attr_meta(gm, target)
        if not isinstance(t, torch.Tensor):
            continue
        key = _storage_key(gm, target, om)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


_NOISE = re.compile(r"\s*#.*$")


def graph_text(gm: torch.fx.GraphModule) -> str:
    """A stable, diffable text of the graph: one line per node, with module paths.

    Node *names* are kept (they are what users grep for); attribute values are summarized
    by shape and dtype.
    """
    from .meta import module_path

    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            lines.append(f"%{n.name} = input {_val_str(n)}")
        elif n.op == "get_attr":
            try:
                t = attr_meta(gm, n.target)
                desc = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__
            except AttributeError:
                desc = "missing"
            lines.append(f"%{n.name} = param {n.target} {desc}")
        elif n.op == "output":
            lines.append(f"return {_arg_str(n.args[0])}")
        else:
            args = ", ".join([_arg_str(a) for a in n.args] + [f"{k}={_arg_str(v)}" for k, v in n.kwargs.items()])
            where = module_path(n)
            lines.append(f"%{n.name} = {op_name(n)}({args}){'  @ ' + where if where else ''}")
    return "\n".join(lines) + "\n"


def _val_str(n: torch.fx.Node) -> str:
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    return ""


def _arg_str(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg_str(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg_str(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a)


def flatten_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tuple, dict, ModelOutput, tensor), in pytree order."""
    if hasattr(out, "to_tuple") and not isinstance(out, torch.Tensor):   # HF ModelOutput
        out = out.to_tuple()
    leaves, _ = pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def call(module: torch.nn.Module, inputs: "ExampleInputs") -> Any:
    """Run ``module`` on normalized example inputs under ``no_grad`` (offloaded graphs load weights as they go)."""
    if isinstance(module, torch.fx.GraphModule) and is_offloaded(module):
        return run_offloaded(module, inputs)
    with torch.no_grad():
        return module(*inputs.args, **inputs.kwargs)


def flat_inputs(gm: torch.fx.GraphModule, inputs: "ExampleInputs") -> list:
    """Inputs in placeholder order (exported modules take a pytree spec)."""
    import torch.fx._pytree as fx_pytree

    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return list(fx_pytree.tree_flatten_spec((inputs.args, inputs.kwargs), spec))
    if inputs.kwargs:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return [*inputs.args, *[inputs.kwargs[n] for n in names[len(inputs.args):]]]
    return list(inputs.args)


class ExampleInputs:
    """Positional and keyword example inputs, normalized from whatever the user passed.

    Accepted forms: a tensor; a tuple/list (positional); a dict or HF ``BatchEncoding``
    (keyword); or an explicit ``(args_tuple, kwargs_dict)`` pair built with
    :meth:`ExampleInputs.of`.
    """

    def __init__(self, args: tuple = (), kwargs: dict | None = None):
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    @classmethod
    def of(cls, x: Any) -> "ExampleInputs":
        if isinstance(x, ExampleInputs):
            return x
        if x is None:
            raise ValueError("example_inputs are required: pass a tensor, a tuple of positional inputs, "
                             "or a dict of keyword inputs (e.g. a tokenizer's output)")
        if isinstance(x, torch.Tensor):
            return cls((x,), {})
        if isinstance(x, collections.abc.Mapping):
            return cls((), dict(x))
        if isinstance(x, (tuple, list)):
            return cls(tuple(x), {})
        raise TypeError(f"example_inputs of type {type(x).__name__} not understood: pass a tensor, a tuple "
                        "(positional inputs) or a dict (keyword inputs)")

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                yield f"arg{i}", a
        for k, v in self.kwargs.items():
            if isinstance(v, torch.Tensor):
                yield k, v

    def split_constants(self) -> tuple["ExampleInputs", dict[str, Any]]:
        """Keyword inputs that are not tensors (``use_cache=False``) are bound at capture."""
        tensors = {k: v for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)}
        consts = {k: v for k, v in self.kwargs.items() if k not in tensors}
        return ExampleInputs(self.args, tensors), consts

    def __repr__(self) -> str:
        def d(x):
            return f"Tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else repr(x)
        parts = [d(a) for a in self.args] + [f"{k}={d(v)}" for k, v in self.kwargs.items()]
        return f"ExampleInputs({', '.join(parts)})"
