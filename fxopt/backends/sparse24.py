"""``sparse24`` backend: masked linears as 2:4 semi-structured sparse GEMMs on CUDA, and the lint that
says which linears such a kernel accepts.

NVIDIA's sparse tensor cores (Ampere, sm80, and later) multiply a 2:4-sparse matrix — at most 2
non-zeros in every 4 consecutive elements of a row — stored compressed (the kept half + 2-bit
indices) at up to twice the dense rate (Mishra et al. 2021). PyTorch exposes them through
:func:`torch.sparse.to_sparse_semi_structured`, which turns a dense CUDA matrix into a
``SparseSemiStructuredTensor`` whose ``aten.linear`` / ``mm`` / ``addmm`` run cuSPARSELt (default)
or CUTLASS kernels. For ``linear(x, W, b)`` with ``W [out, in]`` the groups run along ``in``, the
reduction dim — the dim ``nm-sparsity`` masks — so a weight masked by ``nm-sparsity{n=2,m=4}``
is in the right layout as is.

:func:`lint` (CPU only, no GPU needed) checks every linear of a graph against the constraints of
the installed PyTorch's classes (``torch.sparse.SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS``;
for torch 2.13):

============  =====================================  ===================================
backend       dtypes                                 weight ``[out, in]``: both ≥ and a multiple of
============  =====================================  ===================================
cuSPARSELt    float16, bfloat16                      (16, 16)
cuSPARSELt    int8, float8_e4m3fn                    (32, 32)
CUTLASS       float16, bfloat16                      (32, 64)
CUTLASS       int8                                   (16, 128)
CUTLASS       float32 (1:2 pattern, not 2:4)         (32, 32)
============  =====================================  ===================================

and that the weight is 2-D, holds a valid 2:4 pattern along ``in`` (1:2 for CUTLASS float32),
and is a parameter read through ``get_attr``. A linear that fails gets its reasons, each naming
what to do. A float32 weight is *accepted after a cast*: the backend converts the model to the
target dtype (``dtype``, float16 by default), as sparse kernels have no float32 2:4 path.
Non-contiguous weights are copied (``fixups``).

:class:`Sparse24Backend` (CUDA only) copies the graph, moves it to the GPU in ``dtype``, and
replaces the weight of every accepted linear by its semi-structured form (a new attribute: the
caller's tensors are never written); the rest keeps running dense. Without CUDA (or on a GPU
older than sm80) it raises ``RuntimeError`` saying so. ``benchmarks/bench_sparse24_gpu.py`` times
it against dense fp16.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from ..ir.graph import ExampleInputs, call, clone, flatten_tensors, fresh_attr_name, get_attr, set_attr, to_device
from ..ir.meta import NM_MASK
from ..ir.structure import linears

# (sparse_min_rows, sparse_min_cols) per dtype, as torch 2.13 declares them; read from the installed
# torch when it has them (they have changed between releases), these are the fallback.
_FALLBACK_CONSTRAINTS = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32),
                   torch.float8_e4m3fn: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128),
                torch.float32: (32, 32)},
}
_CLASSES = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}
KERNELS = ("cusparselt", "cutlass")


def constraints(kernel: str) -> dict[torch.dtype, tuple[int, int]]:
    """``{dtype: (min_rows, min_cols)}`` that ``kernel`` ("cusparselt" | "cutlass") accepts: the weight's
    rows and columns must each be at least, and a multiple of, these."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown 2:4 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    cls = getattr(torch.sparse, _CLASSES[kernel], None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if not table:
        return dict(_FALLBACK_CONSTRAINTS[kernel])
    return {dt: (int(c.sparse_min_rows), int(c.sparse_min_cols)) for dt, c in table.items()}


def _pattern(kernel: str, dtype: torch.dtype) -> tuple[int, int]:
    """(n, m) of the pattern ``kernel`` stores for ``dtype``: 1:2 for CUTLASS float32, else 2:4."""
    return (1, 2) if (kernel == "cutlass" and dtype == torch.float32) else (2, 4)


def _bad_groups(w: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of ``m`` consecutive elements of a row with more than ``n`` non-zeros."""
    out_f, in_f = w.shape
    nz = (w.detach() != 0).reshape(out_f, in_f // m, m).sum(-1)
    return int((nz > n).sum())


@dataclass
class LinearCheck:
    """The lint's verdict on one linear."""

    path: str                           # module path, e.g. encoder.layer.0.attention.self.query
    weight: str                         # get_attr target of the weight
    shape: tuple[int, int]              # [out, in]
    weight_dtype: torch.dtype           # as stored in the graph
    dtype: torch.dtype                  # the dtype the kernel would run in
    kernel: str                         # "cusparselt" | "cutlass"
    masked: bool                        # the node carries an NM_MASK (from nm-sparsity)
    reasons: list[str] = field(default_factory=list)   # why the kernel would refuse it (empty: accepted)
    fixups: list[str] = field(default_factory=list)    # what the backend does to make it acceptable

    @property
    def accepted(self) -> bool:
        return not self.reasons

    def line(self) -> str:
        verdict = "ok" if self.accepted else "REJECTED: " + "; ".join(self.reasons)
        extra = f" ({'; '.join(self.fixups)})" if self.fixups and self.accepted else ""
        return f"{self.path} [{self.shape[0]}x{self.shape[1]}] {self.kernel} {str(self.dtype).replace('torch.', '')}: " \
               f"{verdict}{extra}"


def check_weight(w: torch.Tensor, *, dtype: torch.dtype | None = torch.float16, kernel: str = "cusparselt",
                 path: str = "", weight: str = "", masked: bool = False) -> LinearCheck:
    """Would ``kernel`` accept ``w`` (a linear weight ``[out, in]``) run in ``dtype`` (None: ``w``'s dtype)?"""
    table = constraints(kernel)
    target = w.dtype if dtype is None else dtype
    shape = tuple(int(s) for s in w.shape)
    chk = LinearCheck(path=path or "(weight)", weight=weight, shape=shape if len(shape) == 2 else (0, 0),
                      weight_dtype=w.dtype, dtype=target, kernel=kernel, masked=masked)
    if w.dim() != 2:
        chk.reasons.append(f"weight is {w.dim()}-D {shape}; the kernel takes 2-D matrices only")
        return chk
    if target not in table:
        ok = ", ".join(str(d).replace("torch.", "") for d in table)
        chk.reasons.append(f"dtype {str(target).replace('torch.', '')} is not supported by {kernel} (supported: {ok}); "
                           "pass dtype=torch.float16 or torch.bfloat16")
    else:
        if w.dtype != target:
            if not (w.is_floating_point() and (target.is_floating_point or target == torch.int8)):
                chk.reasons.append(f"weight is {w.dtype}; cannot be cast to {target}")
            elif target == torch.int8 or target == torch.float8_e4m3fn:
                chk.reasons.append(f"weight is {str(w.dtype).replace('torch.', '')}; a {str(target).replace('torch.', '')} "
                                   "kernel needs it quantized first (no quantizer here)")
            else:
                chk.fixups.append(f"cast {str(w.dtype).replace('torch.', '')}→{str(target).replace('torch.', '')}")
        min_r, min_c = table[target]
        out_f, in_f = shape
        if out_f < min_r or out_f % min_r:
            chk.reasons.append(f"out_features={out_f} is not a multiple of {min_r} (≥ {min_r}) as {kernel} needs for "
                               f"{str(target).replace('torch.', '')}")
        if in_f < min_c or in_f % min_c:
            chk.reasons.append(f"in_features={in_f} is not a multiple of {min_c} (≥ {min_c}) as {kernel} needs for "
                               f"{str(target).replace('torch.', '')}")
    n, m = _pattern(kernel, target)
    if w.shape[1] % m:
        chk.reasons.append(f"in_features={w.shape[1]} is not a multiple of {m}: no {n}:{m} groups")
    else:
        bad = _bad_groups(w, n, m)
        if bad:
            total = w.shape[0] * (w.shape[1] // m)
            chk.reasons.append(f"not {n}:{m} sparse: {bad} of {total} groups of {m} have more than {n} non-zeros; "
                               f"run nm-sparsity{{n={n},m={m}}} first")
    if not w.is_contiguous():
        chk.fixups.append("copied to contiguous memory")
    return chk


def lint(gm: torch.fx.GraphModule, *, dtype: torch.dtype | None = torch.float16, kernel: str = "cusparselt"
         ) -> list[LinearCheck]:
    """One :class:`LinearCheck` per ``aten.linear`` with a parameter weight, in graph order: would a 2:4
    ``kernel`` accept it when the model runs in ``dtype`` (None: each weight's own dtype)? CPU only."""
    out = []
    for li in linears(gm):
        w = get_attr(gm, li.weight)
        out.append(check_weight(w, dtype=dtype, kernel=kernel, path=li.path, weight=li.weight,
                                masked=NM_MASK.get(li.node) is not None))
    return out


def lint_report(checks: list[LinearCheck]) -> str:
    """Text summary: counts, then one line per linear (rejected ones first)."""
    ok = sum(c.accepted for c in checks)
    head = f"2:4 sparse kernel lint: {ok} of {len(checks)} linears accepted"
    if checks:
        head += f" ({checks[0].kernel}, {str(checks[0].dtype).replace('torch.', '')})"
    lines = [c.line() for c in sorted(checks, key=lambda c: c.accepted)]
    return "\n".join([head] + ["  " + ln for ln in lines])


# --------------------------------------------------------------------------------------------------
# The backend (CUDA)
# --------------------------------------------------------------------------------------------------

def cuda_problem(kernel: str | None = None) -> str | None:
    """Why semi-structured sparse GEMMs (of ``kernel``, when given) cannot run here, or None when they can.

    PyTorch's CUTLASS 2:4 kernels are built for compute capability 8.x only (measured on an H200,
    torch 2.11: "sparse_semi_structured_mad_op: Supported only on GPUs with compute capability 8.x");
    cuSPARSELt runs on sm80 and newer."""
    if not torch.cuda.is_available():
        return "CUDA is not available (2:4 semi-structured sparse kernels need an NVIDIA GPU, sm80 or newer)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0: sparse tensor cores need Ampere (sm80) or newer"
    if kernel == "cutlass" and major != 8:
        return (f"GPU compute capability {major}.{minor}: PyTorch's CUTLASS 2:4 kernels run on 8.x only; "
                "use kernel='cusparselt'")
    return None


def _to_semi_structured(w: torch.Tensor, kernel: str) -> torch.Tensor:
    cls = getattr(torch.sparse, _CLASSES[kernel])
    return cls.from_dense(w.contiguous())


def _sparse_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``linear`` with a semi-structured weight; ``x`` is cast to the weight's dtype (a graph exported
    in float32 may cast activations back to float32) and the result back to ``x``'s dtype."""
    dt = x.dtype
    y = torch.nn.functional.linear(x.to(w.dtype), w, b)
    return y if y.dtype == dt else y.to(dt)


def lower(gm: torch.fx.GraphModule, *, dtype: torch.dtype = torch.float16, kernel: str = "cusparselt",
          device: str | torch.device = "cuda", only_masked: bool = True,
          convert: Callable[[torch.Tensor], torch.Tensor] | None = None
          ) -> tuple[torch.fx.GraphModule, list[LinearCheck], list[str]]:
    """A copy of ``gm`` on ``device`` in ``dtype`` whose accepted linears use semi-structured weights.

    ``only_masked``: convert only linears that ``nm-sparsity`` marked (NM_MASK); others keep running
    dense even if their weight happens to be 2:4. ``convert`` replaces the conversion (default:
    ``torch.sparse`` semi-structured ``from_dense`` of ``kernel``); tests use it to check the
    rewrite on CPU. Returns (module, the lint's checks, notes)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"sparse24 backend: dtype must be torch.float16 or torch.bfloat16 (float32: CUTLASS 1:2 only); "
                         f"got {dtype} — integer and float8 2:4 GEMMs need quantized weights and scales, which this "
                         "backend does not produce")
    checks = lint(gm, dtype=dtype, kernel=kernel)
    if convert is None:
        problem = cuda_problem(kernel)
        if problem:
            raise RuntimeError(f"sparse24 backend: {problem}; use fxopt.backends.sparse24.lint() to check the "
                               "layers on CPU")
        convert = lambda w: _to_semi_structured(w, kernel)  # noqa: E731
    out = to_device(clone(gm), device, dtype)     # constants and baked-in devices too (ir.graph.to_device)
    g = out.graph
    by_name = {n.name: n for n in g.nodes}
    converted, dense = 0, []
    for chk, li in zip(checks, linears(gm)):
        node = by_name[li.node.name]
        if only_masked and not chk.masked:
            dense.append(f"{chk.path}: no N:M mask (nm-sparsity did not mark it), kept dense")
            continue
        if not chk.accepted:
            dense.append(f"{chk.path}: kept dense: {'; '.join(chk.reasons)}")
            continue
        w = get_attr(out, li.weight)
        name = fresh_attr_name(out, li.weight.replace(".", "_") + "_sparse24")
        set_attr(out, name, convert(w.detach()), as_parameter=False)
        with g.inserting_before(node):
            wn = g.get_attr(name)
        x = node.args[0]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with g.inserting_after(node):
            new = g.call_function(_sparse_linear, (x, wn, b))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        converted += 1
    g.eliminate_dead_code()
    out.recompile()
    notes = [f"{converted} of {len(checks)} linears run as 2:4 semi-structured sparse GEMMs ({kernel}, "
             f"{str(dtype).replace('torch.', '')})"] + dense
    return out, checks, notes


class CudaGraphRunner:
    """Replay ``module`` as a CUDA graph, one graph per input signature (shapes and dtypes).

    cuSPARSELt's per-call host work (measured on an H200, torch 2.11: ~1 ms of CPU per
    ``_cslt_sparse_mm``, against 14 µs of GPU time for a 4096×384 · 384×1536 product) dominates
    every sparse linear unless the calls are captured once and replayed. The first call with a new
    signature warms the module up on a side stream, captures it, and keeps static input and output
    buffers; later calls copy the inputs in, replay, and return clones of the outputs. Inputs are
    the flat tensors of ``ExampleInputs`` (non-tensor arguments must not change between calls)."""

    def __init__(self, module: torch.nn.Module, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; run without cuda_graph=True on this machine")
        self.module, self.warmup = module, warmup
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, ex: ExampleInputs) -> list[torch.Tensor]:
        import torch.utils._pytree as pytree

        leaves, spec = pytree.tree_flatten((ex.args, ex.kwargs))
        tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        key = (spec, tuple((i, tuple(leaves[i].shape), leaves[i].dtype) for i in tensors),
               tuple(v for v in leaves if not isinstance(v, torch.Tensor)))
        if key not in self.graphs:
            static = list(leaves)
            for i in tensors:
                static[i] = leaves[i].clone()
            args, kwargs = pytree.tree_unflatten(static, spec)
            inp = ExampleInputs(tuple(args), kwargs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(self.warmup):
                    call(self.module, inp)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                outs = flatten_tensors(call(self.module, inp))
            self.graphs[key] = (graph, [static[i] for i in tensors], outs)
        graph, inputs, outs = self.graphs[key]
        for buf, i in zip(inputs, tensors):
            buf.copy_(leaves[i])
        graph.replay()
        return [o.clone() for o in outs]


class Sparse24Backend:
    """Run a graph on CUDA with its N:M-masked linears as 2:4 sparse GEMMs (see the module docstring).

    ``run(inputs)`` moves tensor inputs to the device (floating ones cast to ``dtype``) and returns
    the flat list of outputs on the device. ``cuda_graph=True`` replays the module as a CUDA graph per
    input signature (:class:`CudaGraphRunner`): without it cuSPARSELt's per-call host overhead makes
    the sparse model slower than dense (``benchmarks/bench_sparse24_gpu.py``)."""

    name = "sparse24"

    def __init__(self, module: torch.fx.GraphModule, *, dtype: torch.dtype = torch.float16,
                 kernel: str = "cusparselt", device: str | torch.device = "cuda", only_masked: bool = True,
                 convert: Callable[[torch.Tensor], torch.Tensor] | None = None, cuda_graph: bool = False):
        self.dtype, self.device = dtype, torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"sparse24 backend: cuda_graph=True needs device='cuda'; got {device!r}")
        self.module, self.checks, self.notes = lower(module, dtype=dtype, kernel=kernel, device=device,
                                                     only_masked=only_masked, convert=convert)
        self.graphed = CudaGraphRunner(self.module) if cuda_graph else None

    def _move(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.to(self.device)
            return v.to(self.dtype) if v.is_floating_point() else v
        return v

    def run(self, inputs: Any) -> list[torch.Tensor]:
        ex = ExampleInputs.of(inputs)
        ex = ExampleInputs(tuple(self._move(a) for a in ex.args), {k: self._move(v) for k, v in ex.kwargs.items()})
        if self.graphed is not None:
            return self.graphed(ex)
        with torch.no_grad():
            return flatten_tensors(call(self.module, ex))

    def __call__(self, *args, **kwargs):
        return self.run(ExampleInputs(args, kwargs))
