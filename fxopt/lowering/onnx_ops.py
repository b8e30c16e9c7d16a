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
    """Problems that would make the ONNX wrong or the export fail, each naming the node.

    Also adds to :data:`TRANSLATIONS` the translations of other libraries' ops that ``gm`` holds
    (:func:`add_library_translations`): the export that follows this check then finds them."""
    from ..ir.meta import describe
    problems = []
    add_library_translations(gm)
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


def _contrib_schema(name: str, doc: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
                    types: list[tuple[str, list[str]]], attributes: list[tuple[str, str, bool]] = ()) -> None:
    """Register ONNX Runtime contrib op ``com.microsoft.<name>`` (v1) with ONNX's schema registry, once.

    ONNX's registry does not know ONNX Runtime's contrib ops, and the exporter needs a schema to
    build a node. ``inputs``: ``(name, type var, optional)``; ``attributes``: ``(name, "INT" |
    "FLOAT", required)``. Only what fxopt uses is declared, as ORT defines it (onnxscript gives a
    node every output its schema lists, so optional outputs fxopt never reads are left out)."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema(name, 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    opt = OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(OpSchema(
        name, "com.microsoft", 1, doc=doc,
        inputs=[P(n, t, param_option=opt) if o else P(n, t) for n, t, o in inputs],
        outputs=[P(n, t) for n, t in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[A(n, getattr(OpSchema.AttrType, kind), "", required=req) for n, kind, req in attributes]))


_contrib_schema(
    "MatMulNBits", "Y = A · dequantize(B)ᵀ with B packed bits-wide in blocks along K.",
    [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
     ("g_idx", "T4", True), ("bias", "T1", True)],
    [("Y", "T1")],
    [("T1", ["tensor(float)", "tensor(float16)"]), ("T2", ["tensor(uint8)"]),
     ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"]), ("T4", ["tensor(int32)"])],
    [("K", "INT", True), ("N", "INT", True), ("bits", "INT", True), ("block_size", "INT", True),
     ("accuracy_level", "INT", False)])
_MSFT = onnxscript.values.Opset("com.microsoft", 1)


def matmul_nbits_onnx(x, packed, scales, k: int, n: int, bits: int, block_size: int, zero_points=None):
    """``MatMulNBits``; with ``zero_points`` (uint8 ``[N, ceil(n_blocks/2)]``, 4-bit, low nibble first) the
    weights are asymmetric uint4, without it ONNX Runtime's default zero point 8 applies."""
    if zero_points is None:
        return _MSFT.MatMulNBits(x, packed, scales, K=k, N=n, bits=bits, block_size=block_size)
    return _MSFT.MatMulNBits(x, packed, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size)


TRANSLATIONS[torch.ops.fxopt.matmul_nbits.default] = matmul_nbits_onnx


def _blocks(x, block_size: int):
    """[..., K] → [..., K/block, block] (K a multiple of the block, as insert-qdq guarantees)."""
    return op.Reshape(x, op.Concat(op.Shape(x, start=0, end=-1), op.Constant(value_ints=[-1, block_size]), axis=0))


def quantize_affine_onnx(w, scale, zero_point, block_size: int, quant_max: int):
    """``clamp(round(w/s + z), 0, q_max)`` per block, written out (no ONNX op takes a float zero point);
    on a constant weight ONNX Runtime folds it at load."""
    wb = _blocks(w, block_size)
    q = op.Add(op.Div(wb, op.Unsqueeze(scale, op.Constant(value_ints=[-1]))),
               op.Unsqueeze(zero_point, op.Constant(value_ints=[-1])))
    q = op.Clip(op.Round(q), op.Constant(value_float=0.0), op.Constant(value_float=float(quant_max)))
    return op.Cast(op.Reshape(q, op.Shape(w)), to=2)                      # uint8


def dequantize_affine_onnx(q, scale, zero_point, block_size: int):
    qb = op.Cast(_blocks(q, block_size), to=1)
    w = op.Mul(op.Sub(qb, op.Unsqueeze(zero_point, op.Constant(value_ints=[-1]))),
               op.Unsqueeze(scale, op.Constant(value_ints=[-1])))
    return op.Reshape(w, op.Shape(q))


TRANSLATIONS[torch.ops.fxopt.quantize_affine.default] = quantize_affine_onnx
TRANSLATIONS[torch.ops.fxopt.dequantize_affine.default] = dequantize_affine_onnx


_contrib_schema(
    "GatherBlockQuantized", "Gather along gather_axis from data quantized in blocks along quantize_axis, then dequantize.",
    [("data", "T1", False), ("indices", "Tind", False), ("scales", "T2", False), ("zero_points", "T1", True)],
    [("output", "T2")],
    [("T1", ["tensor(int4)", "tensor(uint4)", "tensor(uint8)"]),
     ("T2", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]), ("Tind", ["tensor(int32)", "tensor(int64)"])],
    [("gather_axis", "INT", False), ("quantize_axis", "INT", False), ("block_size", "INT", False),
     ("bits", "INT", False)])


def gather_nbits_onnx(packed, indices, scales, d: int, block_size: int, zero_points=None):
    """``GatherBlockQuantized`` on uint8 data: without ``zero_points`` ONNX Runtime's default zero point 8
    applies (as ``MatMulNBits``'), uint8 ``zero_points`` are 4-bit and packed per row as ``MatMulNBits``'
    (two a byte, low nibble first). Float zero points (min-max affine groups) have no
    ``GatherBlockQuantized`` form: the gathered rows are unpacked and dequantized in the graph."""
    if zero_points is None:
        return _MSFT.GatherBlockQuantized(packed, indices, scales, gather_axis=0, quantize_axis=1,
                                          block_size=block_size, bits=4)
    if zero_points.dtype != onnxscript.ir.DataType.FLOAT:
        return _MSFT.GatherBlockQuantized(packed, indices, scales, zero_points, gather_axis=0, quantize_axis=1,
                                          block_size=block_size, bits=4)
    return _gather_affine_rows(packed, indices, scales, zero_points, d, block_size)


def _gather_affine_rows(packed, indices, scales, zero_points, d: int, block_size: int):
    """``(u − z)·s`` of the gathered rows only: ``Gather`` of the packed bytes, nibbles split with
    ``BitwiseAnd`` / ``BitShift`` (low first), and the rows' scales and float zero points gathered too."""
    rows = op.Gather(packed, indices, axis=0)                                       # [..., d/2] uint8
    lo = op.BitwiseAnd(rows, op.Constant(value=_u8(15)))
    hi = op.BitShift(rows, op.Constant(value=_u8(4)), direction="RIGHT")
    last = op.Constant(value_ints=[-1])
    u = op.Concat(op.Unsqueeze(lo, last), op.Unsqueeze(hi, last), axis=-1)          # [..., d/2, 2]
    lead = op.Shape(indices)
    blocks = op.Concat(lead, op.Constant(value_ints=[d // block_size, block_size]), axis=0)
    u = op.Cast(op.Reshape(u, blocks), to=1)                                         # [..., d/block, block]
    z = op.Unsqueeze(op.Gather(zero_points, indices, axis=0), last)
    s = op.Unsqueeze(op.Gather(scales, indices, axis=0), last)
    w = op.Mul(op.Sub(u, z), s)
    return op.Reshape(w, op.Concat(lead, op.Constant(value_ints=[d]), axis=0))


def _u8(v: int):
    """A uint8 scalar tensor (BitwiseAnd / BitShift need operands of the data's type)."""
    import onnx
    return onnx.helper.make_tensor("c", onnx.TensorProto.UINT8, [], [v])


TRANSLATIONS[torch.ops.fxopt.gather_nbits.default] = gather_nbits_onnx


# --------------------------------------------------------------------------- MoE (issue #5)
# ``fxopt::moe`` (fxopt.ir.moeops) → static-shape ONNX: Softmax → TopK, the dispatch positions
# by a cumulative sum over one-hot expert ids, one Gather of the ``Σ cap_e`` token slots, one
# batched MatMul per group of experts of equal capacity, the routing weights, and a ScatterND
# with reduction "add" back to the tokens. Static because the token count is: export the graph
# with static shapes (``dynamic=False``); the capacities are then constants of the file.

from ..ir import moeops  # noqa: E402 - registers torch.ops.fxopt.moe


def _ints(values) -> "onnxscript.ir.Value":
    return op.Constant(value_ints=[int(v) for v in values])


def _moe_act(h, activation: str):
    if activation == "silu":
        return op.Mul(h, op.Sigmoid(h))
    if activation == "relu":
        return op.Relu(h)
    if activation == "gelu":
        return op.Gelu(h)
    if activation == "gelu_tanh":
        return op.Gelu(h, approximate="tanh")
    raise ValueError(f"fxopt::moe: no ONNX form for activation {activation!r}")


def moe_onnx(x, router_logits, w_in, w_out, top_k: int, norm_topk: bool, gated: bool, activation: str,
             capacity, routing: str, experts, block: str):
    t, d = x.shape[0], x.shape[1]
    if not isinstance(t, int) or not isinstance(d, int):
        raise ValueError(f"fxopt::moe{' ' + block if block else ''}: the token count is dynamic ({t}); MoE blocks "
                         "lower to static-shape ONNX: export with dynamic=False (one file per batch shape)")
    e = int(w_in.shape[0])
    caps = moeops.capacities(t, top_k, e, list(capacity))
    base, groups = moeops.slot_layout(caps)
    total = sum(caps)
    logits = router_logits
    if experts:
        logits = op.Gather(logits, _ints(experts), axis=1)
    probs = op.Softmax(op.Cast(logits, to=1), axis=-1)
    w, ids = op.TopK(probs, _ints([top_k]), axis=-1, largest=1, sorted=1)
    if norm_topk:
        w = op.Div(w, op.ReduceSum(w, _ints([-1]), keepdims=1))
    if routing == "bpr" and top_k == 1 and norm_topk:                  # moeops.route: every weight is 1,
        priority, _ = op.TopK(probs, _ints([1]), axis=-1, largest=1, sorted=1)   # so the probability
    else:
        priority = w                                                   # the routing weight of choice j
    toks, es, ws = [], [], []
    for j in range(top_k):                                             # k-major dispatch, one round per choice
        col = lambda v: op.Reshape(op.Slice(v, _ints([j]), _ints([j + 1]), _ints([1])), _ints([-1]))
        if routing == "bpr":
            _, order = op.TopK(col(priority), _ints([t]), axis=-1, largest=1, sorted=1)
        else:
            order = _ints(range(t))
        toks.append(order)
        es.append(op.Gather(col(ids), order, axis=0))
        ws.append(op.Gather(col(w), order, axis=0))
    cat = lambda v: v[0] if len(v) == 1 else op.Concat(*v, axis=0)
    tok, e_seq, w_seq = cat(toks), cat(es), cat(ws)
    onehot = op.Cast(op.Equal(op.Unsqueeze(e_seq, _ints([1])), _ints(range(e))), to=7)   # [k·T, E] int64
    pos = op.Sub(op.ReduceSum(op.Mul(op.CumSum(onehot, op.Constant(value_int=0)), onehot), _ints([1]), keepdims=0),
                 op.Constant(value_int=1))
    keep = op.Less(pos, op.Gather(_ints(caps), e_seq, axis=0))
    slot = op.Where(keep, op.Add(op.Gather(_ints(base), e_seq, axis=0), pos), op.Constant(value_int=total))
    slot_token = op.ScatterElements(_ints([t] * (total + 1)), slot, tok, axis=0)
    slot_weight = op.ScatterElements(op.Constant(value_floats=[0.0] * (total + 1)), slot, w_seq, axis=0)
    slot_token = op.Slice(slot_token, _ints([0]), _ints([total]), _ints([0]))
    slot_weight = op.Slice(slot_weight, _ints([0]), _ints([total]), _ints([0]))
    xp = op.Concat(x, op.Expand(op.CastLike(op.Constant(value_float=0.0), x), _ints([1, d])), axis=0)
    xs = op.Gather(xp, slot_token, axis=0)                                          # [S, D]
    ys = []
    for cap, members, start in groups:
        n = len(members)
        xg = op.Reshape(op.Slice(xs, _ints([start]), _ints([start + n * cap]), _ints([0])), _ints([n, cap, d]))
        wi = w_in if n == e else op.Gather(w_in, _ints(members), axis=0)
        wo = w_out if n == e else op.Gather(w_out, _ints(members), axis=0)
        h = op.MatMul(xg, op.Transpose(wi, perm=[0, 2, 1]))
        if gated:
            g, u = op.Split(h, axis=-1, num_outputs=2)
            h = op.Mul(_moe_act(g, activation), u)
        else:
            h = _moe_act(h, activation)
        ys.append(op.Reshape(op.MatMul(h, op.Transpose(wo, perm=[0, 2, 1])), _ints([n * cap, d])))
    y = ys[0] if len(ys) == 1 else op.Concat(*ys, axis=0)
    y = op.Mul(y, op.Unsqueeze(op.CastLike(slot_weight, y), _ints([1])))
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), _ints([t + 1, d]))
    out = op.ScatterND(zeros, op.Unsqueeze(slot_token, _ints([1])), y, reduction="add")
    return op.Slice(out, _ints([0]), _ints([t]), _ints([0]))


TRANSLATIONS[torch.ops.fxopt.moe.default] = moe_onnx


# --------------------------------------------------------------------------- fused attention
# ``fxopt::attention`` (fxopt.ir.attnops, made from SDPA at export by fxopt.lowering.attention)
# → ONNX Runtime's ``com.microsoft.MultiHeadAttention``.

from ..ir import attnops  # noqa: E402 - registers torch.ops.fxopt.attention


_contrib_schema(
    "MultiHeadAttention", "softmax(Q Kᵀ · scale + attention_bias) V per head.",
    [("query", "T", False), ("key", "T", True), ("value", "T", True), ("bias", "T", True),
     ("key_padding_mask", "M", True), ("attention_bias", "T", True), ("past_key", "T", True),
     ("past_value", "T", True), ("past_sequence_length", "M", True), ("cache_indirection", "M", True)],
    [("output", "T")],
    [("T", ["tensor(float)", "tensor(float16)"]), ("M", ["tensor(int32)"])],
    [("num_heads", "INT", True), ("mask_filter_value", "FLOAT", False), ("scale", "FLOAT", False),
     ("unidirectional", "INT", False)])


def attention_onnx(q, k, v, mask, scale: float, num_heads: int, mask_kind: int):
    """``fxopt::attention`` → MultiHeadAttention on [B, S, H·D] views of Q/K/V (see fxopt.ir.attnops)."""
    flat = op.Constant(value_ints=[0, 0, -1])

    def bsd(x):
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

    bias = None
    if mask_kind == attnops.MASK_BOOL:
        bias = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=attnops.FILL))
    elif mask_kind == attnops.MASK_ADDITIVE:
        bias = mask
    if bias is not None:                       # MultiHeadAttention takes [B|1, H|1, S, T]: broadcast S and T
        shape = op.Concat(op.Shape(bias, start=0, end=2), op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3),
                          axis=0)
        bias = op.Expand(bias, shape)
    if mask_kind == attnops.MASK_CAUSAL:
        o = _MSFT.MultiHeadAttention(bsd(q), bsd(k), bsd(v), num_heads=num_heads, scale=float(scale), unidirectional=1)
    else:
        o = _MSFT.MultiHeadAttention(bsd(q), bsd(k), bsd(v), None, None, bias, num_heads=num_heads,
                                     scale=float(scale))
    o = op.Reshape(o, op.Constant(value_ints=[0, 0, num_heads, -1]))          # [B, S, H, Dv]
    if mask_kind == attnops.MASK_BOOL:         # rows that keep no key are 0, as PyTorch's fused SDPA gives
        keep = op.ReduceMax(op.Cast(mask, to=1), op.Constant(value_ints=[-1]), keepdims=1)   # [B|1, H|1, S, 1]
        o = op.Mul(o, op.Transpose(keep, perm=[0, 2, 1, 3]))
    # the product sits before the transpose, so ORT cancels it against the graph's own head merge
    return op.Transpose(o, perm=[0, 2, 1, 3])


TRANSLATIONS[torch.ops.fxopt.attention.default] = attention_onnx


# --------------------------------------------------------------------------- integer linears with the bias inside
# ``fxopt::matmul_integer_to_float`` (made from fuse-qdq's static int8 linears at export by
# fxopt.lowering.qlinear) → ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat``.


_contrib_schema(
    "MatMulIntegerToFloat", "(A − a_zero_point)·a_scale @ (B − b_zero_point)·b_scale + bias, 8-bit inputs, float output.",
    [("A", "T1", False), ("B", "T2", False), ("a_scale", "T3", False), ("b_scale", "T3", False),
     ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T3", True)],
    [("Y", "T3")],
    [("T1", ["tensor(int8)", "tensor(uint8)"]), ("T2", ["tensor(int8)", "tensor(uint8)"]),
     ("T3", ["tensor(float)", "tensor(float16)"])])


def matmul_integer_to_float_onnx(a, a_scale, a_zero_point, b, b_scale, bias=None):
    return _MSFT.MatMulIntegerToFloat(a, b, a_scale, b_scale, a_zero_point, None, bias)


TRANSLATIONS[torch.ops.fxopt.matmul_integer_to_float.default] = matmul_integer_to_float_onnx


# --------------------------------------------------------------------------- ops of other libraries
# HF transformers 5's MoE experts (``experts_implementation="grouped_mm"``, the default) run
# ``transformers::grouped_mm_fallback(x [S, K] sorted by expert, w [E, K, N], offs [E])`` under
# torch.export: ``y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] · w[e]``, rows past ``offs[-1]`` zero.
# The op exists only once transformers is imported, which may be after fxopt: its translation is
# added when a graph that holds it is checked (check_lowerable runs before every export).


def grouped_mm_onnx(x, w, offs):
    """One MatMul per expert on its rows (Slice with the runtime offsets: any token count), the
    results concatenated and padded with zero rows up to ``x``'s row count."""
    e = int(w.shape[0])
    ends = op.Cast(offs, to=7)                                             # int64
    axis0 = op.Constant(value_ints=[0])
    start = op.Constant(value_ints=[0])
    parts = []
    for i in range(e):
        end = op.Slice(ends, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]))
        xi = op.Slice(x, start, end, axis0)
        wi = op.Gather(w, op.Constant(value_int=i), axis=0)                 # [K, N]
        parts.append(op.MatMul(xi, wi))
        start = end
    y = parts[0] if e == 1 else op.Concat(*parts, axis=0)
    rest = op.Sub(op.Shape(x, start=0, end=1), start)                      # rows past offs[-1]
    pads = op.Concat(op.Constant(value_ints=[0, 0]), rest, op.Constant(value_ints=[0]), axis=0)
    return op.Pad(y, pads)


LIBRARY_TRANSLATIONS = {("transformers", "grouped_mm_fallback"): grouped_mm_onnx}


def add_library_translations(gm: torch.fx.GraphModule) -> None:
    """Add to :data:`TRANSLATIONS` the translations of other libraries' ops that ``gm`` holds."""
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t not in TRANSLATIONS:
            fn = LIBRARY_TRANSLATIONS.get((t.namespace, t._opname))
            if fn is not None:
                TRANSLATIONS[t] = fn
