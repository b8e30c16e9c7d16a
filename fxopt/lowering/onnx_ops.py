"""Translation table: fxopt's own ops → ONNX, as onnxscript functions for the dynamo exporter.

``torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATIONS)`` calls these when
it meets an fxopt op. Each translation is exact by construction because :mod:`fxopt.ir.qops`
defines its ops with ONNX (opset 21) semantics:

* ``fxopt::quantize``   → ``QuantizeLinear(x, scale, zero_point, axis, block_size)``; a range
  narrower than the integer type (``[-127, 127]`` for symmetric int8) is applied by clipping
  ``x`` first at ``(q_min − z)·s`` and ``(q_max − z)·s``, which gives the same integers;
* ``fxopt::dequantize`` → ``DequantizeLinear(q, scale, zero_point, axis, block_size)``.

ONNX Runtime's QDQ fusion then turns ``DequantizeLinear → MatMul → QuantizeLinear`` patterns
into integer kernels (issue #3 proves it on the optimized graph).
"""
from __future__ import annotations

import torch
import torch.fx
from onnxscript import opset21 as op

from ..ir import qops  # noqa: F401 - registers torch.ops.fxopt.*

OPSET = 21

FULL_RANGES = {(-128, 127), (0, 255), (-32768, 32767), (0, 65535), (-(2**31), 2**31 - 1)}


def quantize_onnx(x, scale, zero_point, axis: int, block_size: int, quant_min: int, quant_max: int):
    if (quant_min, quant_max) not in FULL_RANGES:
        # Narrow range: clip in float so QuantizeLinear's saturation never goes past it.
        # (Blocked quantize with a narrow range is refused before export: see check_lowerable.)
        z = op.Cast(zero_point, to=1)
        lo = op.Mul(op.Sub(op.Constant(value_float=float(quant_min)), z), scale)
        hi = op.Mul(op.Sub(op.Constant(value_float=float(quant_max)), z), scale)
        if not _scalar_like(scale):
            rank = len(x.shape)
            trailing = list(range(axis % rank + 1, rank))
            if trailing:
                axes = op.Constant(value_ints=trailing)
                lo, hi = op.Unsqueeze(lo, axes), op.Unsqueeze(hi, axes)
        x = op.Max(op.Min(x, hi), lo)
    if block_size > 0:
        return op.QuantizeLinear(x, scale, zero_point, axis=axis, block_size=block_size)
    return op.QuantizeLinear(x, scale, zero_point, axis=axis)


def dequantize_onnx(q, scale, zero_point, axis: int, block_size: int):
    if block_size > 0:
        return op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block_size)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _scalar_like(t) -> bool:
    shape = getattr(t, "shape", None)
    if shape is None:
        return True
    dims = list(shape)
    return len(dims) == 0 or (len(dims) == 1 and dims[0] == 1)


def check_lowerable(gm: torch.fx.GraphModule) -> list[str]:
    """Problems that would make the ONNX wrong or the export fail, each naming the node."""
    from ..ir.meta import describe
    problems = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.fxopt.quantize.default:
            block, qmin, qmax = n.args[4], n.args[5], n.args[6]
            if block > 0 and (qmin, qmax) not in FULL_RANGES:
                problems.append(f"{describe(n)}: blocked quantize with the narrow range [{qmin}, {qmax}] has no "
                                "ONNX form; store the weight pre-quantized (fuse-qdq) or use the full range")
    return problems


TRANSLATIONS = {
    torch.ops.fxopt.quantize.default: quantize_onnx,
    torch.ops.fxopt.dequantize.default: dequantize_onnx,
}
