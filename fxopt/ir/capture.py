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
2. ``matmul(x, Wᵀ)`` / ``mm(x, Wᵀ)`` with a 2-D ``get_attr`` weight read through ``t`` / ``numpy_T`` /
   ``permute([1, 0])`` / ``transpose(0, 1)`` (Falcon's ``FalconLinear``: ``x @ W.T + b``), and the
   ``add`` of a 1-D bias parameter of ``out`` channels that follows it when it is the matmul's only
   user, becomes ``linear(x, W, b)`` — the same product in ``nn.Linear`` layout, nothing stored anew.
3. Parameters are frozen (``requires_grad=False``) so outputs carry no autograd graph.

Both rewrites are listed in :class:`~fxopt.ir.meta.CaptureInfo` ``normalizations``.

**Dynamic dims** (``dynamic=True``) are chosen per input by its name: ``batch`` (dim 0) for every
input; also the sequence (dim 1) for token inputs (``input_ids``, ``attention_mask``,
``token_type_ids``, ...; ``decoder_*`` inputs get their own ``decoder_seq``; ``cache_position`` is
the sequence) and for inputs of other names; the batch only for image and audio inputs
(``pixel_values``: ViT's patch grid and position table fix H×W; ``input_features``: Whisper's 80
mel bins and 3000 frames are fixed). Export then decides: a requested dim that the model fixes
stays static, and only the dims still symbolic in the captured graph are recorded
(``CaptureInfo.dynamic_axes``, what ONNX lowering makes dynamic), with a note for each one dropped
(in ``normalizations``).
"""
from __future__ import annotations

import functools
import inspect
import traceback
from typing import Any, Mapping

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .graph import ExampleInputs, attr_meta, clone, flatten_tensors, get_attr, set_attr, fresh_attr_name
from .meta import CAPTURE, CaptureInfo, SOURCE_PATH, describe, module_path


aten = torch.ops.aten


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the construct and what to try."""


#: inputs whose dim 1 is a decoder's own sequence (encoder-decoder models: T5, Whisper, BART)
DECODER_TOKEN_INPUTS = frozenset({
    "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "decoder_inputs_embeds",
    "decoder_token_type_ids",
})
#: image / audio inputs: only the batch dim is dynamic (their other dims are fixed by the model's
#: patch grid, position table, mel bins or frame count)
BATCH_ONLY_INPUTS = frozenset({
    "pixel_values", "pixel_mask", "input_features", "input_values", "image_embeds", "pixel_values_videos",
    "image_sizes", "feature_attention_mask",
})


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
        dynamic: ``True`` picks the dynamic dims per input (module docstring: ``batch`` for all,
            ``seq`` for token inputs, batch only for ``pixel_values`` / ``input_features``); a
            mapping ``{input_name: {dim: name}}`` picks exactly; ``None``/``False`` captures static
            shapes. Either way only the dims the model leaves dynamic are recorded.
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
    dyn_axes, dyn_notes = _realized_axes(gm, dyn_axes) if dyn_axes else (dyn_axes, [])
    normalizations = _drop_whole_slices(gm) + _normalize_addmm(gm) + _normalize_matmul(gm) + dyn_notes
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
                out[name] = _default_axes(name, t.dim())
        return out
    if isinstance(dynamic, Mapping):
        unknown = [k for k in dynamic if k not in names]
        if unknown:
            raise CaptureError(f"dynamic axes name unknown inputs {unknown}; the inputs are {names}")
        return {k: {int(d): str(n) for d, n in v.items()} for k, v in dynamic.items()}
    raise CaptureError("dynamic must be True, None, or {input_name: {dim: name}}")


def _default_axes(name: str, rank: int) -> dict[int, str]:
    """The dims ``dynamic=True`` asks for on input ``name`` (module docstring, *Dynamic dims*)."""
    if name == "cache_position":
        return {0: "seq"}
    if name in BATCH_ONLY_INPUTS or rank == 1:
        return {0: "batch"}
    if name in DECODER_TOKEN_INPUTS:
        return {0: "batch", 1: "decoder_seq"}
    return {0: "batch", 1: "seq"}            # input_ids, attention_mask, ...; other names (TinyGPT's idx, x)


def _realized_axes(gm: torch.fx.GraphModule, axes: dict[str, dict[int, str]]
                   ) -> tuple[dict[str, dict[int, str]], list[str]]:
    """Keep the requested dims that are still symbolic in ``gm``'s inputs; a note per dim dropped.

    Export was asked for ``Dim.AUTO``, which lets the model fix a dim (ViT's 3 channels, Whisper's
    80 mel bins, a batch of 1); recording such a dim as dynamic would make ONNX lowering fail."""
    vals = {n.target: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
    kept, notes = {}, []
    for name, dims in axes.items():
        v = vals.get(name)
        if not isinstance(v, torch.Tensor):
            kept[name] = dict(dims)                # no shape to check (a renamed input): as asked
            continue
        keep = {d: n for d, n in dims.items() if d < v.dim() and not is_concrete_int(v.shape[d])}
        for d in sorted(set(dims) - set(keep)):
            size = v.shape[d] if d < v.dim() else "?"
            notes.append(f"dynamic axes: {name} dim {d} ({dims[d]}) kept static at {size}: the model fixes it"
                         + (" (or the example has 1 there: give 2 or more)" if size == 1 else ""))
        if keep:
            kept[name] = keep
    return kept, notes


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


def _drop_whole_slices(gm: torch.fx.GraphModule) -> list[str]:
    """``slice(x, dim, 0, ≥2⁶², 1)`` is ``x``: dynamic captures keep such whole-dim slices (HF's
    ``hidden_states[:, slice(-0, None)]`` before the LM head, ``repeat_kv``), which hide a norm's
    consumers from the structure analyses. They are removed (exact)."""
    n_removed = 0
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target is torch.ops.aten.slice.Tensor):
            continue
        args = list(n.args) + [None] * (5 - len(n.args))
        _, _, start, end, step = args[:5]
        start = n.kwargs.get("start", start)
        end = n.kwargs.get("end", end)
        step = n.kwargs.get("step", step)
        if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step in (None, 1):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            n_removed += 1
    return [f"removed {n_removed} whole-dim slices (no-ops)"] if n_removed else []


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


#: ops that read a 2-D weight transposed: ``W.t()``, ``W.T``, ``W.permute(1, 0)``, ``W.transpose(0, 1)``
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int}
_MATMULS = {aten.matmul.default, aten.mm.default}


def _transposed_param(gm, n) -> torch.fx.Node | None:
    """The ``get_attr`` node of a 2-D parameter that ``n`` reads transposed, else None."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _TRANSPOSES):
        return None
    w = n.args[0]
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None
    t = attr_meta(gm, w.target)
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        return None
    if n.target is aten.permute.default and [d % 2 for d in n.args[1]] != [1, 0]:
        return None
    if n.target is aten.transpose.int and sorted(d % 2 for d in n.args[1:3]) != [0, 1]:
        return None
    return w


def _normalize_matmul(gm: torch.fx.GraphModule) -> list[str]:
    """Rewrite ``matmul(x, Wᵀ)`` / ``mm(x, Wᵀ)`` (+ ``add`` of a 1-D bias parameter) into ``linear(x, W, b)``.

    Exact: ``linear`` computes the same ``x · Wᵀ (+ b)``; the weight keeps its storage and name. The
    bias is folded only when the add is the product's only user and the bias is a parameter of
    ``out`` elements (so the add broadcasts along the last dim, as ``linear``'s bias does)."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or len(node.args) != 2 or node.kwargs:
            continue
        x, wt = node.args
        w = _transposed_param(gm, wt)
        xv, yv = node.args[0].meta.get("val") if isinstance(x, torch.fx.Node) else None, node.meta.get("val")
        if w is None or not isinstance(xv, torch.Tensor) or xv.dim() < 1 or not isinstance(yv, torch.Tensor):
            continue
        out_f = attr_meta(gm, w.target).shape[0]
        bias, last = None, node
        users = [u for u in node.users if not _is_check(u)]
        if len(users) == 1 and len(node.users) == 1:
            add = users[0]
            if add.op == "call_function" and add.target is aten.add.Tensor and len(add.args) == 2 and not add.kwargs:
                other = add.args[1] if add.args[0] is node else add.args[0]
                is_param = isinstance(other, torch.fx.Node) and other.op == "get_attr"
                bv = attr_meta(gm, other.target) if is_param else None
                av = add.meta.get("val")
                if isinstance(bv, torch.Tensor) and bv.dim() == 1 and bv.shape[0] == out_f and \
                        bv.dtype == yv.dtype and isinstance(av, torch.Tensor) and av.shape == yv.shape:
                    bias, last = other, add
        with gm.graph.inserting_before(last):
            lin = gm.graph.call_function(aten.linear.default, (x, w, bias) if bias is not None else (x, w))
        lin.meta.update(last.meta)
        if "nn_module_stack" not in lin.meta and "nn_module_stack" in node.meta:
            lin.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        last.replace_all_uses_with(lin)
        for dead in dict.fromkeys((last, node, wt)):         # the add, the product, the transpose
            if isinstance(dead, torch.fx.Node) and not dead.users and dead.op == "call_function":
                gm.graph.erase_node(dead)
        done.append(f"matmul->linear: {module_path(lin) or lin.name}" + (" (bias folded)" if bias is not None else ""))
    return done


def _is_check(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
        n.target._schema.name.startswith("aten::_assert")


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
