"""Every ``node.meta`` / ``graph_module.meta`` key that fxopt reads or writes, typed, in one place.

torch.export already fills a few keys that we read but never write (``val``, ``tensor_meta``,
``nn_module_stack``, ``stack_trace``). fxopt's own keys are prefixed ``fxopt_`` so they never
collide with PyTorch's. A key is a small typed descriptor::

    PROVENANCE.set(node, "constant-folding")
    PROVENANCE.get(node)            # -> "constant-folding" or None

``set`` checks the value's type, so a pass that writes the wrong thing fails where it writes,
not three passes later where another reads. The dataclasses below are the values; later passes
(quantization, sparsity, MoE) fill the ones that belong to them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.fx

T = TypeVar("T")


@dataclass(frozen=True)
class MetaKey(Generic[T]):
    """A typed key of ``node.meta`` (or of ``GraphModule.meta`` when ``on_graph``)."""

    name: str
    type: Any
    doc: str
    writable: bool = True
    on_graph: bool = False

    def _store(self, owner) -> dict:
        return owner.meta

    def get(self, owner, default: T | None = None) -> T | None:
        return self._store(owner).get(self.name, default)

    def has(self, owner) -> bool:
        return self.name in self._store(owner)

    def set(self, owner, value: T) -> None:
        if not self.writable:
            raise AttributeError(f"meta key {self.name!r} is written by torch.export, not by fxopt")
        if self.type is not Any and not isinstance(value, self.type):
            raise TypeError(
                f"meta key {self.name!r} takes {getattr(self.type, '__name__', self.type)}, "
                f"got {type(value).__name__}"
            )
        self._store(owner)[self.name] = value

    def pop(self, owner) -> T | None:
        return self._store(owner).pop(self.name, None)


# --------------------------------------------------------------------------- values


@dataclass
class CaptureInfo:
    """How a GraphModule was captured; lowering and the CLI read it back."""

    method: str                                   # "export" or "symbolic_trace+export"
    input_names: list[str]                        # flat tensor inputs, in graph order
    output_names: list[str]                       # flat tensor outputs (ModelOutput keys, output_0, ...)
    dynamic_axes: dict[str, dict[int, str]]       # input name -> {dim: symbolic name}
    bound_kwargs: dict[str, Any] = field(default_factory=dict)  # non-tensor kwargs bound at capture
    model_class: str = ""
    normalizations: list[str] = field(default_factory=list)     # e.g. "addmm->linear: transformer.h.0.attn.c_attn"


@dataclass
class ObserverStats:
    """Calibration statistics of one tensor (filled by calibration, issue #3)."""

    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    absmax_per_channel: torch.Tensor | None = None
    num_batches: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class QuantSpec:
    """How a tensor is quantized: the arguments of ``fxopt::quantize``."""

    dtype: torch.dtype
    quant_min: int
    quant_max: int
    granularity: str            # "per_tensor" | "per_channel" | "per_token" | "per_group"
    axis: int = -1
    group_size: int = 0
    symmetric: bool = True
    dynamic: bool = False


@dataclass
class QuantizedLinear:
    """A linear rewritten to integer form by ``fuse-qdq``; backends pattern-match on it."""

    scheme: str                 # w8a8-static | w8a8-dynamic | w8-weight-only | w4-weight-only
    weight: str                 # int8 constant (transposed [in, out] for matmul forms)
    module_path: str = ""
    activation: str = ""        # "u8 per-tensor static" | "u8 per-tensor dynamic" | "s8 per-token dynamic" | ""
    group_size: int = 0


@dataclass
class NMMask:
    """An N:M sparsity mask applied to a weight (issue #4)."""

    n: int
    m: int
    weight: str                 # qualified name of the masked parameter
    kept_magnitude: float = 0.0
    total_magnitude: float = 0.0


@dataclass
class PermutationRecord:
    """A channel permutation applied to a coupled group (issue #4)."""

    group_id: int
    perm: torch.Tensor
    members: list[str] = field(default_factory=list)


@dataclass
class SharedExpert:
    """A dense expert every token goes through beside the routed ones (Qwen2-MoE), optionally
    scaled by ``sigmoid(x · gateᵀ)``. It stays in the graph as ordinary linears."""

    weights: list[str]          # qualified names of its linears' weights
    gate: str = ""              # weight of the sigmoid gate linear ('' when ungated)
    output_node: str = ""       # node whose value is added to the routed experts' output


@dataclass
class RoutingProfile:
    """Tokens routed to each expert of one block, per calibration batch (issue #5, item 2).

    ``loads[b, e]`` counts the (token, choice) assignments of batch ``b`` that picked expert
    ``e`` (before any capacity); ``tokens[b]`` is the batch's token count, so
    ``share[b, e] = loads[b, e] / (tokens[b] · top_k)``."""

    loads: torch.Tensor         # int64 [batches, experts]
    tokens: list[int]
    top_k: int

    @property
    def shares(self) -> torch.Tensor:
        t = torch.tensor(self.tokens, dtype=torch.float64).unsqueeze(1) * self.top_k
        return self.loads.to(torch.float64) / t

    @property
    def mean_share(self) -> torch.Tensor:
        """Share of all profiled assignments each expert received."""
        return self.loads.sum(0).to(torch.float64) / (sum(self.tokens) * self.top_k)

    @property
    def max_share(self) -> torch.Tensor:
        return self.shares.max(0).values

    @property
    def std_share(self) -> torch.Tensor:
        """Spread of each expert's share across batches (0 with one batch)."""
        s = self.shares
        return s.std(0, unbiased=False) if s.shape[0] > 1 else torch.zeros(s.shape[1], dtype=torch.float64)


@dataclass
class MoEBlock:
    """A recognized mixture-of-experts block (issue #5); set on the node that yields the routed
    experts' combined output (the ``fxopt::moe`` node once rewritten).

    Expert weights are stacked ``w_in [E, F', D]`` (``F' = 2F`` when gated: gate rows first,
    then up rows) and ``w_out [E, D, F]``, ``nn.Linear`` layout per expert."""

    name: str                   # module path of the block (``model.layers.0.mlp``), unique in the graph
    router: str                 # qualified name of the router weight [E_all, D]
    w_in: str
    w_out: str
    num_experts: int            # experts the router scores (before pruning)
    top_k: int
    norm_topk: bool             # top-k weights renormalized to sum to 1
    gated: bool
    activation: str             # key of fxopt.ir.moeops.ACTIVATIONS
    d_model: int
    d_ff: int
    source: str = ""            # "gathered" (expert weights gathered per assignment: HF batched_mm, fxopt.nn.MoELayer),
    #                             "grouped" (HF grouped_mm: tokens sorted by expert), "fxopt-op"
    shared_expert: SharedExpert | None = None
    experts: list[int] = field(default_factory=list)     # original ids of the experts kept ([] = all)
    capacity: list[float] = field(default_factory=list)  # per-expert capacity factors ([] = dropless)
    routing: str = "vanilla"
    profile: RoutingProfile | None = None

    @property
    def active_experts(self) -> int:
        return len(self.experts) if self.experts else self.num_experts


# --------------------------------------------------------------------------- keys

# Written by torch.export; fxopt reads them.
VAL: MetaKey[Any] = MetaKey("val", Any, "FakeTensor (or SymInt / tuple) of the node's output", writable=False)
TENSOR_META: MetaKey[Any] = MetaKey("tensor_meta", Any, "TensorMetadata: shape, dtype, stride", writable=False)
NN_MODULE_STACK: MetaKey[dict] = MetaKey(
    "nn_module_stack", dict, "{key: (module path, module class)} from the root to the innermost module", writable=False
)
STACK_TRACE: MetaKey[str] = MetaKey("stack_trace", str, "Python stack of the source line", writable=False)

# fxopt's own.
PROVENANCE: MetaKey[str] = MetaKey("fxopt_provenance", str, "name of the pass that created this node")
SOURCE_PATH: MetaKey[str] = MetaKey(
    "fxopt_source_path", str, "module path kept for nodes a pass created (they have no nn_module_stack)"
)
CALIB_STATS: MetaKey[ObserverStats] = MetaKey("fxopt_calib", ObserverStats, "calibration statistics of the output")
QSPEC: MetaKey[QuantSpec] = MetaKey("fxopt_qspec", QuantSpec, "quantization spec of a Q node")
QLINEAR: MetaKey[QuantizedLinear] = MetaKey("fxopt_qlinear", QuantizedLinear, "integer linear made by fuse-qdq")
NM_MASK: MetaKey[NMMask] = MetaKey("fxopt_nm_mask", NMMask, "N:M mask applied to the weight of a linear")
PERMUTATION: MetaKey[PermutationRecord] = MetaKey("fxopt_perm", PermutationRecord, "permutation applied")
MOE: MetaKey[MoEBlock] = MetaKey("fxopt_moe", MoEBlock, "MoE block description on the block's output node")

# On GraphModule.meta.
CAPTURE: MetaKey[CaptureInfo] = MetaKey("fxopt_capture", CaptureInfo, "how the graph was captured", on_graph=True)
OFFLOAD: MetaKey[Any] = MetaKey("fxopt_offload", Any, "OffloadMap: the files of weights kept on disk "
                                "(fxopt.ir.offload)", on_graph=True)
APPLIED: MetaKey[list] = MetaKey("fxopt_applied", list, "pipeline text of each pass applied so far", on_graph=True)

ALL_KEYS = [VAL, TENSOR_META, NN_MODULE_STACK, STACK_TRACE, PROVENANCE, SOURCE_PATH, CALIB_STATS, QSPEC, QLINEAR,
            NM_MASK, PERMUTATION, MOE, CAPTURE, APPLIED]


def module_path(node: torch.fx.Node) -> str:
    """The innermost source module path of ``node`` (``encoder.layer.3.attention.self.query``), or ''."""
    kept = SOURCE_PATH.get(node)
    if kept:
        return kept
    stack = NN_MODULE_STACK.get(node)
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path


def describe(node: torch.fx.Node) -> str:
    """``'linear_3' (aten.linear.default at encoder.layer.0.attention.self.query)`` for error messages."""
    where = module_path(node)
    target = node.target if node.op != "call_function" else _op_name(node.target)
    return f"'{node.name}' ({target}{' at ' + where if where else ''})"


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._opname}.{target._overloadname}" if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


def op_name(node: torch.fx.Node) -> str:
    """A short, stable name for the op a node runs: ``aten.linear.default``, ``getitem``, ``placeholder``."""
    if node.op == "call_function":
        return _op_name(node.target)
    if node.op in ("call_module", "call_method"):
        return f"{node.op}:{node.target}"
    return node.op
