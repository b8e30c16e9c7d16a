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
import onnxscript
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


def dynamic_quantize_onnx(x):
    q, s, z = op.DynamicQuantizeLinear(x)
    return q, s, z


def quantize_per_token_onnx(x, quant_max: int):
    qmax = op.Constant(value_float=float(quant_max))
    s = op.Div(op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1), qmax)
    s = op.Where(op.Equal(s, op.Constant(value_float=0.0)), op.Constant(value_float=1.0), s)
    q = op.Clip(op.Round(op.Div(x, s)), op.Neg(qmax), qmax)
    return op.Cast(q, to=3), s          # 3 = INT8


def dequantize_per_token_onnx(q, scale):
    return op.Mul(op.Cast(q, to=1), scale)


TRANSLATIONS.update({
    torch.ops.fxopt.dynamic_quantize.default: dynamic_quantize_onnx,
    torch.ops.fxopt.quantize_per_token.default: quantize_per_token_onnx,
    torch.ops.fxopt.dequantize_per_token.default: dequantize_per_token_onnx,
})


def _register_matmul_nbits_schema() -> None:
    """ONNX's registry does not know ONNX Runtime's contrib ops; the exporter needs a schema to
    build the node, so MatMulNBits (com.microsoft, v1) is registered once, as ORT defines it."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    P = OpSchema.FormalParameter
    A = OpSchema.Attribute
    opt = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        doc="Y = A · dequantize(B)ᵀ with B packed bits-wide in blocks along K (ONNX Runtime contrib op).",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[A("K", OpSchema.AttrType.INT, ""), A("N", OpSchema.AttrType.INT, ""),
                    A("bits", OpSchema.AttrType.INT, ""), A("block_size", OpSchema.AttrType.INT, ""),
                    A("accuracy_level", OpSchema.AttrType.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


_register_matmul_nbits_schema()
_MSFT = onnxscript.values.Opset("com.microsoft", 1)


def matmul_nbits_onnx(x, packed, scales, k: int, n: int, bits: int, block_size: int):
    return _MSFT.MatMulNBits(x, packed, scales, K=k, N=n, bits=bits, block_size=block_size)


TRANSLATIONS[torch.ops.fxopt.matmul_nbits.default] = matmul_nbits_onnx
