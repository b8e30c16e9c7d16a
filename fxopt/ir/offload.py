"""Parameters on disk: a captured graph whose weights are loaded only when something reads them.

A pipeline holds several copies of a model's weights: the caller's model, the captured copy,
and the manager's snapshot before each pass. For a model near the size of memory that is the
difference between running and swapping. :func:`offload_parameters` moves every tensor the
graph reads through ``get_attr`` (above ``min_bytes``) into a folder, one ``.pt`` file per
distinct storage (tied weights are written once), and replaces it on the module with a ``meta``
tensor of the same shape and dtype. From then on:

* :func:`fxopt.ir.graph.get_attr` — the one way passes read weights — loads the tensor from its
  file (memory-mapped, ``torch.load(mmap=True)``) and keeps no reference: memory is what the
  caller holds, for as long as it holds it;
* :func:`fxopt.ir.graph.set_attr` of a large tensor writes a **new** file and points the target
  at it (copy on write): a snapshot taken before a pass still points at the old file, so a
  failing pass rolls back correctly;
* :func:`fxopt.ir.graph.call` runs the graph with an interpreter that loads each weight when its
  consumer runs and drops it after (``OffloadInterpreter``);
* calibration's layer-wise mode (:func:`fxopt.passes.calibration.observe` with
  ``layerwise=True``) loads each layer's weights once for all batches.

The file map lives in ``GraphModule.meta`` (:data:`OFFLOAD`), so ``clone`` (deep copy) of an
offloaded graph is cheap and shares the files. :func:`materialize` loads everything back (ONNX
export needs real tensors).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from .. import _io
from .meta import OFFLOAD


@dataclass
class OffloadMap:
    """Where each offloaded ``get_attr`` target lives: ``files[target]`` under ``directory``."""

    directory: str
    files: dict[str, str] = field(default_factory=dict)
    min_bytes: int = 1 << 16

    def path(self, target: str) -> Path:
        return Path(self.directory) / self.files[target]

    def load(self, target: str) -> torch.Tensor:
        try:
            return torch.load(self.path(target), mmap=True, weights_only=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"offloaded weight {target!r}: its file {self.path(target)} is gone; "
                                    f"keep the offload folder {self.directory} until the graph is no longer used") from e

    def save(self, target: str, value: torch.Tensor) -> None:
        name = f"{_safe(target)}.{uuid.uuid4().hex[:10]}.pt"
        with _io.atomic_path(Path(self.directory) / name, suffix=".pt") as tmp:
            torch.save(value.detach().contiguous().clone() if not value.is_contiguous() else value.detach(), tmp)
        self.files[target] = name


def _safe(target: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in target)[:120]


def offload_map(gm) -> OffloadMap | None:
    return OFFLOAD.get(gm) if isinstance(getattr(gm, "meta", None), dict) else None


def is_offloaded(gm) -> bool:
    return offload_map(gm) is not None


def offload_parameters(gm: torch.fx.GraphModule, directory: str | os.PathLike, *, min_bytes: int = 1 << 16
                       ) -> OffloadMap:
    """Move the graph's weights (tensors of ``min_bytes`` or more) to files in ``directory``.

    Returns the map (also stored in ``gm.meta``). Small tensors (norm weights, biases, scales)
    stay in memory: loading them one by one would cost more than it saves."""
    from .graph import attr_meta, set_attr, used_attr_targets

    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _io.OutputPathError(f"cannot create the offload folder {d}: {e.strerror or e}") from e
    if not os.access(d, os.W_OK | os.X_OK):
        raise _io.OutputPathError(f"cannot write weights to the offload folder {d}: it is not writable")
    om = offload_map(gm) or OffloadMap(str(d), min_bytes=min_bytes)
    by_storage: dict[tuple, str] = {}
    for target in sorted(used_attr_targets(gm)):
        t = attr_meta(gm, target)
        if not isinstance(t, torch.Tensor) or t.is_meta or t.numel() * t.element_size() < min_bytes:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in by_storage:                        # tied: one file, two names
            om.files[target] = om.files[by_storage[key]]
        else:
            om.save(target, t)
            by_storage[key] = target
    OFFLOAD.set(gm, om)
    for target in om.files:
        t = attr_meta(gm, target)
        if isinstance(t, torch.Tensor) and not t.is_meta:
            set_attr(gm, target, torch.empty_like(t, device="meta"), _raw=True)
    return om


def materialize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Load every offloaded weight back into memory (in place) and drop the map."""
    from .graph import set_attr

    om = offload_map(gm)
    if om is None:
        return gm
    loaded: dict[str, torch.Tensor] = {}
    for target, name in om.files.items():
        if name not in loaded:
            loaded[name] = om.load(target).clone()   # own memory, not the mapped file
        set_attr(gm, target, loaded[name], _raw=True)
    OFFLOAD.pop(gm)
    return gm


class OffloadInterpreter(torch.fx.Interpreter):
    """Runs an offloaded graph: a weight is loaded when its consumer runs, then dropped."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.om = offload_map(gm)

    def run_node(self, n):
        if n.op == "get_attr" and self.om is not None and n.target in self.om.files:
            return _Lazy(n.target)                  # resolved by the consumer, not held in env
        return super().run_node(n)

    def _fetch(self, a):
        v = self.env[a]
        return self.om.load(v.target) if isinstance(v, _Lazy) else v

    def fetch_args_kwargs_from_env(self, n):
        args = torch.fx.node.map_arg(n.args, self._fetch)
        kwargs = torch.fx.node.map_arg(n.kwargs, self._fetch)
        return args, kwargs


@dataclass(frozen=True)
class _Lazy:
    target: str


def run_offloaded(gm: torch.fx.GraphModule, inputs) -> object:
    """``gm(*inputs)`` for an offloaded graph (inputs: :class:`fxopt.ir.graph.ExampleInputs`)."""
    from .graph import flat_inputs

    with torch.no_grad():
        return OffloadInterpreter(gm).run(*flat_inputs(gm, inputs))     # the graph's codegen rebuilds the output tree
