"""The pass contract: ``requires(gm, ctx)`` → ``call(gm, ctx)`` → ``ensures(result, ctx)``.

A pass is a dataclass whose fields are its options, registered under a pipeline name::

    @register_pass
    @dataclass
    class DeadCodeElimination(Pass):
        name: ClassVar[str] = "dce"
        ...

* ``requires`` raises :class:`PreconditionError` for misuse (missing calibration data, ...) or
  :class:`NotApplicable` when the graph has nothing for this pass — the manager records the
  reason as a note and moves on; nothing is changed.
* ``call`` rewrites the GraphModule (in place or not) and returns a :class:`PassResult` whose
  ``modified`` is truthful: pipelines that iterate to a fixed point depend on it.
* ``ensures`` checks postconditions; the default lints the graph.

Class attributes declare what the manager checks: ``exact`` (outputs must stay equal to float
tolerance), ``run_after`` (if both are in a pipeline, those come first) and ``requires_passes``
(must have run earlier, in this pipeline or an earlier one recorded on the graph).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx


class PassError(RuntimeError):
    """Base of the errors a pass or the manager raises; messages name the pass."""


class PreconditionError(PassError):
    pass


class PostconditionError(PassError):
    pass


class NotApplicable(Exception):
    """Raised by ``requires`` when the graph holds nothing this pass rewrites."""


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may read besides the graph: inputs, calibration data, the original outputs."""

    example_inputs: Any = None                     # fxopt.ir.ExampleInputs
    calibration: list | None = None                # list of ExampleInputs
    calibration_mode: str = "batch"                # or "layerwise" (see fxopt.passes.calibration.observe)
    reference_outputs: list[torch.Tensor] | None = None
    applied: list[str] = field(default_factory=list)   # pipeline text of passes run so far
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared along a pipeline


class Pass:
    """Base class; subclasses are dataclasses registered with :func:`register_pass`."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    run_after: ClassVar[tuple[str, ...]] = ()
    requires_passes: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        """Raise PreconditionError / NotApplicable; the default accepts every graph."""

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        try:
            result.graph_module.graph.lint()
        except Exception as e:  # noqa: BLE001
            raise PostconditionError(f"{self.name}: the graph it produced is malformed: {e}") from e

    # -- options, for pipeline text -------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """Options that differ from their defaults (what the pipeline text shows)."""
        if not dataclasses.is_dataclass(self):
            return {}
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            value = getattr(self, f.name)
            if value != default:
                out[f.name] = value
        return out

    def text(self) -> str:
        from .pipeline import format_pass
        return format_pass(self)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        """Run the pass alone (requires → call → ensures), outside a manager."""
        ctx = ctx or PassContext()
        try:
            self.requires(gm, ctx)
        except NotApplicable as na:
            return PassResult(gm, False, notes=[f"not applied: {na}"])
        result = self.call(gm, ctx)
        self.ensures(result, ctx)
        if result.modified:
            result.graph_module.recompile()
        return result


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def get_pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        import difflib
        from .pipeline import PRESETS
        close = difflib.get_close_matches(name, list(_REGISTRY) + list(PRESETS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PassError(f"unknown pass {name!r}.{hint} Known passes: {', '.join(sorted(_REGISTRY))}; "
                        f"presets: {', '.join(sorted(PRESETS))}.")
    return _REGISTRY[name]
