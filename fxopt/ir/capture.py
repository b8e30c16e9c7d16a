"""Capture: ``nn.Module`` → one normalized FX GraphModule of pre-dispatch ATen ops.

The primary path is ``torch.export.export(model, args, kwargs, strict=False).module()``: an FX
graph at the pre-dispatch ATen level (``aten.linear``, ``aten.layer_norm`` and
``aten.scaled_dot_product_attention`` survive, nothing is decomposed), parameters as
``get_attr`` nodes, and the source module of every node in ``node.meta["nn_module_stack"]``.

Where export fails, ``torch.fx.symbolic_trace`` is tried; a symbolically traced module has no
Python control flow left, so it is exported in turn, giving the *same* normalized form — passes
match one way only.

Before export the model is deep-copied (the caller's model is never touched), put in eval mode,
and its parameters frozen. HF causal LMs return a ``DynamicCache`` by default that export cannot
flatten: the copy gets ``config.use_cache = False``. Non-tensor keyword inputs are bound to the
copy's ``forward`` so the graph's inputs are tensors only.

After export the graph is normalized:

1. ``addmm(bias, x, W)`` with a ``get_attr`` weight of shape ``[in, out]`` (GPT-2's ``Conv1D``)
   becomes ``linear(x, Wᵀ, bias)``: the parameter is stored transposed so every pass sees one
   linear form. Shared weights are never transposed in place.
2. Parameters are frozen (``requires_grad=False``) so outputs carry no autograd graph.
"""
from __future__ import annotations

import functools
import inspect
import traceback
from typing import Any, Mapping

import torch
import torch.fx

from .graph import ExampleInputs, clone, flatten_tensors, get_attr, set_attr, fresh_attr_name
from .meta import CAPTURE, CaptureInfo, SOURCE_PATH, describe, module_path


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the construct and what to try."""


DYNAMIC_NAMES = {0: "batch", 1: "seq"}


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic: bool | Mapping[str, Mapping[int, str]] | None = None,
    method: str = "auto",
) -> torch.fx.GraphModule:
    """Capture ``model`` on ``example_inputs`` into a normalized GraphModule.

    Args:
        model: any ``nn.Module``; it is deep-copied, never mutated.
        example_inputs: a tensor, a tuple (positional), a dict / ``BatchEncoding`` (keyword).
        dynamic: ``True`` makes dim 0 of every tensor input the ``batch`` dim and dim 1 (for
            inputs of rank ≥ 2) the ``seq`` dim; a mapping ``{input_name: {dim: name}}`` picks
            exactly; ``None``/``False`` captures static shapes.
        method: ``"auto"`` (export, then symbolic_trace+export), ``"export"`` or ``"fx"``.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture takes an nn.Module, got {type(model).__name__}")
    inputs = ExampleInputs.of(example_inputs)
    # A sliced (non-contiguous) example makes export guard on its strides, and every later
    # contiguous batch would fail that guard: capture on contiguous copies.
    inputs = ExampleInputs(tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in inputs.args),
                           {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in inputs.kwargs.items()})
    tensor_inputs, constants = inputs.split_constants()
    work, constants = _prepared_copy(model, constants)
    dyn_axes = _dynamic_axes(work, tensor_inputs, dynamic)
    dyn_shapes = _export_dynamic_shapes(work, tensor_inputs, dyn_axes) if dyn_axes else None

    errors: list[str] = []
    gm = None
    used = ""
    if method in ("auto", "export"):
        try:
            gm = _export(work, tensor_inputs, dyn_shapes)
            used = "export"
        except Exception as e:  # noqa: BLE001 - we report it
            errors.append("torch.export: " + _explain(e, model))
            if method == "export":
                raise CaptureError(_failure_message(model, errors)) from e
    if gm is None and method in ("auto", "fx"):
        try:
            gm = _symbolic_then_export(work, tensor_inputs, dyn_shapes)
            used = "symbolic_trace+export"
        except Exception as e:  # noqa: BLE001
            errors.append("torch.fx.symbolic_trace: " + _explain(e, model))
            raise CaptureError(_failure_message(model, errors)) from e
    if gm is None:
        raise CaptureError(f"unknown capture method {method!r}: use 'auto', 'export' or 'fx'")

    for p in gm.parameters():
        p.requires_grad_(False)
    normalizations = _normalize_addmm(gm)
    gm.graph.lint()
    gm.recompile()

    with torch.no_grad():
        out = work(*tensor_inputs.args, **tensor_inputs.kwargs)
    CAPTURE.set(gm, CaptureInfo(
        method=used,
        input_names=[n.name for n in gm.graph.nodes if n.op == "placeholder"],
        output_names=_output_names(out),
        dynamic_axes={k: dict(v) for k, v in (dyn_axes or {}).items()},
        bound_kwargs=dict(constants),
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        normalizations=normalizations,
    ))
    return gm


# --------------------------------------------------------------------------- preparation


def _prepared_copy(model: torch.nn.Module, constants: dict) -> tuple[torch.nn.Module, dict]:
    try:
        work = clone(model)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"could not deep-copy {type(model).__name__} ({type(e).__name__}: {e}); fxopt never mutates the "
            "caller's model, so the model must be copyable (move hooks/handles out of the module)"
        ) from e
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    config = getattr(work, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False       # a DynamicCache output cannot be flattened by export
    params = _forward_params(work)
    if "use_cache" in params and "use_cache" not in constants:
        constants = {**constants, "use_cache": False}
    if constants:
        unknown = [k for k in constants if k not in params and not _has_var_kwargs(work)]
        if unknown:
            raise CaptureError(f"{type(model).__name__}.forward has no parameter(s) {unknown}: "
                               f"it takes {list(params)}")
        work.forward = functools.partial(work.forward, **constants)
    return work, constants


def _forward_params(m: torch.nn.Module) -> dict:
    try:
        return dict(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _has_var_kwargs(m: torch.nn.Module) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _forward_params(m).values())


def _dynamic_axes(work, inputs: ExampleInputs, dynamic) -> dict[str, dict[int, str]] | None:
    if not dynamic:
        return None
    names = _input_names(work, inputs)
    if dynamic is True:
        out = {}
        for name, t in zip(names, _tensors(inputs)):
            if t.dim() >= 1:
                out[name] = {d: DYNAMIC_NAMES[d] for d in range(min(t.dim(), 2))}
        return out
    if isinstance(dynamic, Mapping):
        unknown = [k for k in dynamic if k not in names]
        if unknown:
            raise CaptureError(f"dynamic axes name unknown inputs {unknown}; the inputs are {names}")
        return {k: {int(d): str(n) for d, n in v.items()} for k, v in dynamic.items()}
    raise CaptureError("dynamic must be True, None, or {input_name: {dim: name}}")


def _tensors(inputs: ExampleInputs) -> list[torch.Tensor]:
    return [t for _, t in inputs.tensors()]


def _input_names(work, inputs: ExampleInputs) -> list[str]:
    params = _positional_names(work)
    names = []
    for i, a in enumerate(inputs.args):
        if isinstance(a, torch.Tensor):
            names.append(params[i] if i < len(params) else f"arg{i}")
    names += [k for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)]
    return names


def _export_dynamic_shapes(work, inputs: ExampleInputs, axes: dict[str, dict[int, str]]):
    """The ``dynamic_shapes`` argument of torch.export for the requested axes.

    ``Dim.AUTO`` lets export relate equal dims (input_ids and attention_mask share batch and
    seq) and keep a dim static where the model forces it, instead of failing; the names in
    ``axes`` are what ONNX lowering calls those dims.
    """
    pnames = _positional_names(work)
    auto = torch.export.Dim.AUTO
    spec: dict[str, Any] = {}
    for i, a in enumerate(inputs.args):
        name = pnames[i] if i < len(pnames) else f"arg{i}"
        spec[name] = {d: auto for d in axes.get(name, {})} if isinstance(a, torch.Tensor) else None
    for k, v in inputs.kwargs.items():
        spec[k] = {d: auto for d in axes.get(k, {})} if isinstance(v, torch.Tensor) else None
    if inputs.args and not inputs.kwargs:
        return tuple(spec.values())      # export wants a tuple when every input is positional
    return spec


def _positional_names(work) -> list[str]:
    return [p.name for p in _forward_params(work).values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _export(work, inputs: ExampleInputs, dynamic_shapes) -> torch.fx.GraphModule:
    ep = torch.export.export(work, inputs.args, inputs.kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    return ep.module()


def _symbolic_then_export(work, inputs: ExampleInputs, dyn) -> torch.fx.GraphModule:
    traced = torch.fx.symbolic_trace(work)
    for p in traced.parameters():
        p.requires_grad_(False)
    if hasattr(work, "config"):
        traced.config = work.config
    return _export(traced, inputs, dyn)


# --------------------------------------------------------------------------- errors


def _explain(e: Exception, model: torch.nn.Module) -> str:
    msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    hint = ""
    low = msg.lower()
    if "not a known type" in low or "register a pytree" in low:
        hint = ("the model returns a type that torch.utils._pytree does not know: return tensors, a tuple/dict, "
                "or register the class with torch.utils._pytree.register_pytree_node")
    elif "data-dependent" in low or "data dependent" in low or "guardondatadependent" in low:
        hint = ("control flow or a shape depends on tensor *values*: use torch.cond / torch.where, or make the "
                "branch depend on shapes or constructor arguments")
    elif "symbolically traced variables cannot be used as inputs to control flow" in low:
        hint = "Python control flow on a tensor: rewrite it with torch.where / torch.cond"
    elif "dynamic" in low and ("constraint" in low or "specializ" in low):
        hint = "a dim asked to be dynamic was specialized by the model: capture with dynamic=None or fewer dynamic axes"
    where = _user_frame(e, model)
    return f"{type(e).__name__}: {first[:400]}" + (f" [at {where}]" if where else "") + (f" -> {hint}" if hint else "")


def _user_frame(e: Exception, model) -> str:
    """The innermost frame outside torch / fxopt: usually the model line that broke capture."""
    frames = traceback.extract_tb(e.__traceback__)
    for fr in reversed(frames):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/fxopt/" in f or "/_pytest/" in f or "<" in f:
            continue
        return f"{f}:{fr.lineno} in {fr.name}: {fr.line}"
    return ""


def _failure_message(model, errors: list[str]) -> str:
    return (f"could not capture {type(model).__name__}:\n  - " + "\n  - ".join(errors) +
            "\nWhat to try: pass example_inputs exactly as the model's forward takes them (a dict for HF models), "
            "capture with dynamic=None, or replace the construct named above.")


# --------------------------------------------------------------------------- normalization


def _normalize_addmm(gm: torch.fx.GraphModule) -> list[str]:
    """Rewrite ``addmm(b, x, W[in,out])`` (HF ``Conv1D``) into ``linear(x, Wᵀ, b)``."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.addmm.default:
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
            continue
        bias, x, w = node.args
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        weight = get_attr(gm, w.target)
        if weight.dim() != 2:
            continue
        if len(w.users) == 1 and _unique_storage(gm, w.target):
            set_attr(gm, w.target, weight.detach().t().contiguous())
            new_w = w
        else:
            name = fresh_attr_name(gm, w.target + "_t")
            set_attr(gm, name, weight.detach().t().contiguous(), as_parameter=True)
            with gm.graph.inserting_before(node):
                new_w = gm.graph.get_attr(name)
        new_w.meta["val"] = get_attr(gm, new_w.target)
        with gm.graph.inserting_before(node):
            lin = gm.graph.call_function(torch.ops.aten.linear.default, (x, new_w, bias))
        lin.meta.update(node.meta)
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)
        done.append(f"addmm->linear: {module_path(lin) or lin.name}")
    return done


def _unique_storage(gm, target: str) -> bool:
    t = get_attr(gm, target)
    ptr = t.untyped_storage().data_ptr()
    n = 0
    for _, p in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if p.untyped_storage().data_ptr() == ptr:
            n += 1
    return n <= 1


def _output_names(out: Any) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping) or (hasattr(out, "keys") and hasattr(out, "to_tuple")):   # dict, HF ModelOutput
        names = []
        for k, v in out.items():
            n = len(flatten_tensors(v))
            names += [str(k)] if n == 1 else [f"{k}_{i}" for i in range(n)]
        return names
    return [f"output_{i}" for i in range(len(flatten_tensors(out)))]


__all__ = ["capture", "CaptureError", "describe"]
