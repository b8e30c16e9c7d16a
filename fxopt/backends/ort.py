"""``ort`` backend: an ONNX Runtime InferenceSession with explicit options.

* ``threads``: intra-op threads (default: ORT's choice); inter-op is 1 (sequential execution).
* ``opt_level``: ``"disable" | "basic" | "extended" | "all"`` graph optimizations.
* ``matmulnbits_accuracy_level``: ORT rewrites weight-only ``DequantizeLinear → MatMul`` into
  ``MatMulNBits`` and by default (level 4) quantizes the *activations* to int8 there; fxopt asks
  for level 1 (fp32 compute) so weight-only models keep their accuracy. 4 trades it for speed.
* ``spin``: ORT's intra-op threads spin-wait after each run (its default, lowest latency when ORT
  has the machine to itself). ``spin=False`` lets them sleep — needed when ORT runs interleaved with
  PyTorch on the same cores: spinning threads took the CPU from the next PyTorch call and made
  eager MiniLM look 28× slower in ``fxopt demo`` on 2 cores (337 ms vs. 12 ms alone).
* ``optimized_model_path``: where ORT saves the graph *after* its optimizations, so callers can
  prove what it fused — :meth:`OrtBackend.optimized_op_types` lists the op types there
  (``MatMulIntegerToFloat``, ``QLinearMatMul``... for quantized models).

A file fxopt exported for an int8 dot-product CPU (``fxopt.int8_requires`` in its metadata, see
:func:`fxopt.lowering.export_onnx`'s ``target``) warns when loaded on a CPU without one, and says
how to re-export it.
"""
from __future__ import annotations

import collections
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..ir.graph import ExampleInputs

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class OrtBackend:
    name = "ort"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, opt_level: str = "all",
                 optimized_model_path: str | os.PathLike | None = None, providers: list[str] | None = None,
                 matmulnbits_accuracy_level: int = 1, spin: bool = True):
        import onnxruntime as ort

        if opt_level not in _LEVELS:
            raise ValueError(f"opt_level must be one of {list(_LEVELS)}, got {opt_level!r}")
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[opt_level])
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        # ORT turns DequantizeLinear(int8/int4 weight) → MatMul into MatMulNBits and, by default,
        # computes it with int8-quantized activations (accuracy level 4). Weight-only models must
        # keep float activations: level 1 = fp32 compute.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(matmulnbits_accuracy_level)))
        if not spin:        # idle threads sleep at once instead of spinning (fair timing next to other engines)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.optimized_model_path = Path(optimized_model_path) if optimized_model_path else None
        if self.optimized_model_path:
            so.optimized_model_filepath = str(self.optimized_model_path)
        self._options = dict(threads=threads, opt_level=opt_level, providers=providers,
                             matmulnbits_accuracy_level=matmulnbits_accuracy_level, spin=spin)
        self.session = ort.InferenceSession(str(self.path), so, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.target_warning = _target_warning(self.path, self.metadata)
        if self.target_warning:
            warnings.warn(self.target_warning, RuntimeWarning, stacklevel=2)

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """Map example inputs onto the session's inputs: keywords by name, positionals in order."""
        ex = ExampleInputs.of(inputs)
        feeds: dict[str, np.ndarray] = {}
        for k, v in ex.kwargs.items():
            if k in self.input_names:
                feeds[k] = _np(v)
        rest = [n for n in self.input_names if n not in feeds]
        tensors = [a for a in ex.args if hasattr(a, "shape")]
        for name, a in zip(rest, tensors):
            feeds[name] = _np(a)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"ONNX model {self.path.name} needs inputs {missing}; got {list(feeds)}")
        return feeds

    def run(self, inputs: Any) -> list[np.ndarray]:
        return self.session.run(None, self.feeds(inputs))

    def optimized_op_types(self) -> dict[str, int]:
        """Op types of the graph after ORT's optimizations (saved once to a temporary file if needed)."""
        import onnx

        if self.optimized_model_path is not None:
            model = onnx.load(str(self.optimized_model_path), load_external_data=False)
        else:
            with tempfile.TemporaryDirectory(prefix="fxopt-ort-") as tmp:
                path = Path(tmp) / "optimized.onnx"
                OrtBackend(self.path, optimized_model_path=path, **self._options)
                model = onnx.load(str(path), load_external_data=False)
        return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def _target_warning(path: Path, meta: dict[str, str]) -> str:
    """Why this CPU cannot run ``path`` exactly ('' when it can): a file exported for an int8
    dot-product CPU (VNNI, AMX, ARM dotprod) holds weights that ``VPMADDUBSW`` would saturate."""
    from . import isa

    if meta.get("fxopt.int8_requires") != "int8-dot-product":
        return ""
    here = isa.detect()
    if here.exact_s8:
        return ""
    return (f"{path.name} was exported by fxopt for {meta.get('fxopt.int8_target', 'a VNNI CPU')} with int8 weights up "
            f"to {meta.get('fxopt.int8_weight_max', '127')}; this CPU ({here.target}) adds u8×s8 products in saturating "
            "int16 pairs, so ONNX Runtime's results will be off. Re-export for it: "
            "result.export_onnx(path, target='portable') (or fxopt export ... --target portable)")


def _np(v) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)
