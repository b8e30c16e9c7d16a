"""``kv-cache`` — store a decoder's KV cache quantized: integer codes plus float16 scales, read back dequantized.

Runs on a decode-step graph (``optimize(..., task="text-generation")``, :mod:`fxopt.ir.decoder`), whose
cache is explicit: inputs ``past_key_<i>`` / ``past_value_<i>`` ``[B, H_kv, P, d]`` and outputs
``present_* = concat(past, new)``. After the pass the cache is stored as integers and attention reads
what is stored, dequantized; cached tokens are never quantized again.

**Granularity ``token``** (default; keys and values): every cached vector of ``d`` values (one token, one
KV head; keys after RoPE) is cut into ``d/g`` groups of ``g`` consecutive values (``group_size``, default 32,
the block of llama.cpp's ``q8_0``/``q4_0``; ``min(g, d)``), each with its own scale. With ``x`` a group:

* ``bits=8``, symmetric (``q8_0``): ``s = fp16(max|x| / 127)``, ``q = clamp(round(x / s), −127, 127)`` as int8;
  ``x̂ = q·s``.
* ``bits=4``, symmetric (``q4_0``'s grid, made symmetric): ``s = fp16(max|x| / 7)``,
  ``q = clamp(round(x / s), −7, 7)``, stored as ``u = q + 8`` in 4 bits; ``x̂ = (u − 8)·s``.
* ``symmetric=false`` (``q8_1``/``q4_1``-like, KIVI's asymmetric form): ``m = fp16(min x)``,
  ``s = fp16((max x − min x) / (2^bits − 1))``, ``q = clamp(round((x − m) / s), 0, 2^bits − 1)`` unsigned, ``m``
  stored beside ``s``; ``x̂ = q·s + m``.

**Granularity ``channel``** (KIVI: Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache"): keys per *channel*, values per token as above. A few key channels carry most of the range, so a
per-token scale, set by them, leaves the other channels few levels; one scale and minimum per channel over
a block of ``G = key_block`` tokens (default 32) follows each channel's own range. KIVI's way to never
re-quantize: a block is quantized once, when its ``G`` tokens are all there; the newest ``R < G`` keys wait
in float in a residual tensor. Per layer: ``x`` = the ``G`` values of one channel in one block,
asymmetric as above with ``2^bits − 1`` levels (``m``, ``s`` per channel per block). One step with ``T`` new
keys: ``full = concat(residual, new)``; its first ``n = ⌊(R + T)/G⌋·G`` tokens are quantized as ``n/G``
blocks and appended to the codes, scales and minima; the rest is the new residual. ``R`` is read from the
attention mask (``R = (len(mask) − T) mod G``: the format keeps ``R < G``, and an empty cache holds only
the dummy slots, in the residual), not from the cache tensors' shapes, which count blocks.

``s`` and ``m`` are rounded to float16 *before* ``q`` is computed, so ``q`` is the nearest code for the
scale that is stored. ``round`` is half-to-even (torch and ONNX ``Round``). A group of zeros (the masked
dummy slots a cache starts with, :data:`fxopt.ir.decoder.DUMMY_SLOTS`) has ``s = 0``: the division uses
``max(s, 2⁻²⁴)`` (the smallest float16 step), so ``q`` is 0 (``u = 8`` symmetric 4-bit) and ``x̂ = 0`` —
never NaN; the all-zero codes of an empty cache dequantize to 0 too. Scales and minima are clamped to
float16's largest finite value (65504).

What is stored (per layer; ``d`` head size, ``g`` group, ``G`` key block), and bytes per token per KV head:

========================  ====================================  ============================  =======================
tensor                    token                                 channel (keys)                bytes / token
========================  ====================================  ============================  =======================
``past_<kind>_<i>``       int8 ``[P, d]`` / uint8 ``[P, d/2]``  uint8 ``[n, d]`` / ``[n, d/2]``  ``d·bits/8``
``past_<kind>_scale_<i>`` float16 ``[P, d/g]``                  float16 ``[n/G, d]``          ``2d/g`` / ``2d/G``
``past_<kind>_min_<i>``   float16 ``[P, d/g]`` (asymmetric)     float16 ``[n/G, d]``          ``2d/g`` / ``2d/G``
``past_key_residual_<i>`` —                                     model dtype ``[R < G, d]``    bounded, not per token
========================  ====================================  ============================  =======================

(4-bit codes are packed along ``d``: byte ``j`` holds value ``2j`` in its low nibble, ``2j+1`` in its high
nibble; 8-bit asymmetric codes are uint8.) With ``d = 64`` and ``g = G = 32``, per value: int8 1.0625 bytes
(0.266× fp32), int4 symmetric 0.5625 (0.141×), int4 asymmetric 0.625 (0.156×); ``granularity=channel``,
``bits=4``: keys 0.625, values 0.5625, 0.148× fp32 (plus ≤ 31 float keys per layer and head).

Rewrite, for every ``present_<kind>_<i>`` output that is ``concat(A, new)`` along the token dim, where
``A`` holds the past (``past_<kind>_<i>``, through the empty tensor an HF ``DynamicCache`` starts with) and
``new`` does not read it:

1. ``past_<kind>_<i>`` becomes the codes input; ``past_<kind>_scale_<i>`` (``…_min_<i>``, ``past_key_residual_<i>``)
   follow it.
2. ``present_<kind>_<i> = concat(past codes, quantize(new))``, and likewise for scales and minima (per
   channel: the whole blocks of ``concat(residual, new)``, and the rest as ``present_key_residual_<i>``).
3. Every other use of the float present (attention, GQA's head expansion) reads
   ``dequantize(present parts)`` (per channel, followed by the residual): prefill and decode attend to the
   keys and values the cache holds.
4. The float path ``concat(empty, past)`` is removed. ``sym_size`` reads of the past move to the codes
   (per channel, the token count becomes ``len(mask) − T``), torch.export's input guards get a zero-stride
   stand-in of the float past's shape, and a past read elsewhere reads its dequantized form. The graph's
   pytree spec and ``CaptureInfo`` (input/output names, dynamic axes: ``past``, ``past_quantized``,
   ``past_blocks_<G>``, ``past_residual``) follow; so do the pipeline's example inputs, calibration batches
   and reference outputs, so later passes calibrate and measure drift on the new cache. Drift from then on
   compares the cache outputs with the original model's cache stored the same way (integer codes count 1
   per mismatch); the stats give the logits' drift alone. Per channel, the example inputs get
   ``2·G`` more masked zero slots (two blocks), since torch.export, tracing the graph again for ONNX,
   specializes dims of size 0 and 1.

Quantize and dequantize are plain ATen ops (``abs``, ``amax``/``amin``, ``div``, ``round``, ``clamp``,
``to``, ``floor`` to unpack, ``slice``/``cat``), so the graph runs in PyTorch and exports to ONNX as it is;
the ONNX decoder takes and returns the quantized cache. ``optimize`` describes it in ``result.decoder``
(:class:`fxopt.ir.decoder.DecoderLayout` ``cache``), which ``generate``, ``ort_step`` and ``empty_past`` follow.
ONNX Runtime 1.32's CPU ``GroupQueryAttention`` takes int8 and packed-int4 caches, but with static
``k_scale``/``v_scale`` inputs (``PER_TENSOR`` or ``PER_CHANNEL``, ``kv_cache_bit_width`` 8 or 4): no
per-token or per-block scales. This format is not lowered to it; the graph dequantizes itself, and
ONNX Runtime GenAI folders are refused for such decoders (:mod:`fxopt.lowering.genai`).

Not applicable (a note says so) when the graph has no ``past_*`` inputs with ``present_*`` outputs, or its
cache is already stored as integers. A present that is not ``concat(past, new)`` is a
:class:`~fxopt.passes.base.PreconditionError` naming it.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from ..ir.graph import ExampleInputs
from ..ir.meta import CAPTURE, PROVENANCE, VAL
from .base import NotApplicable, Pass, PassContext, PassResult, PreconditionError, register_pass

aten = torch.ops.aten

BITS = (8, 4)
GRANULARITIES = ("token", "channel")
SCALE_DTYPE = torch.float16
_F16_MAX = float(torch.finfo(torch.float16).max)
_TINY = 2.0 ** -24                  # smallest float16 step: the divisor of an all-zero group
_END = 2 ** 63 - 1
_PAST = re.compile(r"past_(key|value)_(\d+)$")
PASS_NAME = "kv-cache"


# --------------------------------------------------------------------------- the format


@dataclass(frozen=True)
class KVFormat:
    """How one cache tensor (keys or values of a layer, head size ``head_dim``) is stored.

    ``channel=False``: per token, ``group`` consecutive values of head_dim share a scale.
    ``channel=True``: per channel, ``group`` consecutive tokens share a scale and a minimum per channel
    (always asymmetric); the newest ``< group`` tokens wait in float in a residual tensor."""

    bits: int
    group: int
    symmetric: bool
    head_dim: int
    channel: bool = False

    @property
    def groups(self) -> int:
        return self.head_dim // self.group

    @property
    def code_dtype(self) -> torch.dtype:
        if self.bits == 4:
            return torch.uint8
        return torch.int8 if self.symmetric else torch.uint8

    @property
    def code_width(self) -> int:
        """Trailing dim of the codes: ``d`` (8 bits) or ``d/2`` (two 4-bit codes a byte)."""
        return self.head_dim if self.bits == 8 else self.head_dim // 2

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def parts(self) -> tuple[str, ...]:
        """Suffixes of the stored tensors: codes (''), scales, minima when asymmetric, the float residual
        when per channel."""
        if self.channel:
            return ("", "scale", "min", "residual")
        return ("", "scale") if self.symmetric else ("", "scale", "min")

    def axis(self, part: str) -> str:
        """Name of the part's dim 2 (:class:`fxopt.ir.decoder.CacheTensor` ``axis``)."""
        if not self.channel:
            return "past"
        return {"": "past_quantized", "residual": "past_residual"}.get(part, f"past_blocks_{self.group}")

    def trailing(self, part: str) -> int:
        if not part:
            return self.code_width
        return self.head_dim if self.channel else self.groups

    def bytes_per_value(self) -> float:
        """Bytes per stored value, scales included (the residual, bounded, not counted)."""
        per = 2 / self.group * (2 if self.channel else len(self.parts) - 1)
        return self.bits / 8 + per

    def describe(self) -> str:
        if self.channel:
            return (f"int{self.bits} asymmetric per channel, blocks of {self.group} tokens with float16 scale and "
                    f"min, newest < {self.group} tokens in float: {self.bytes_per_value():.4g} bytes per value")
        kind = "symmetric" if self.symmetric else "asymmetric (float16 min)"
        return (f"int{self.bits} {kind}, per-token groups of {self.group} along head_dim {self.head_dim} "
                f"with float16 scales: {self.bytes_per_value():.4g} bytes per value")


def _eager(op, *args, **kwargs):
    return op(*args, **kwargs)


def _codes(xg, dim: int, fmt: KVFormat, op) -> tuple:
    """Float codes of ``xg`` (groups along ``dim``, kept) and the float16 scale (and minimum), ``keepdim``."""
    if fmt.symmetric and not fmt.channel:
        amax = op(aten.amax.default, op(aten.abs.default, xg), [dim], True)
        s16 = op(aten.to.dtype, op(aten.clamp.default, op(aten.div.Tensor, amax, float(fmt.qmax)), None, _F16_MAX),
                 SCALE_DTYPE)
        s = op(aten.to.dtype, s16, torch.float32)
        q = op(aten.round.default, op(aten.div.Tensor, xg, op(aten.clamp.default, s, _TINY)))
        q = op(aten.clamp.default, q, -float(fmt.qmax), float(fmt.qmax))
        if fmt.bits == 4:
            q = op(aten.add.Tensor, q, 8.0)                      # [-7, 7] → [1, 15]
        return q, [s16]
    lo = op(aten.amin.default, xg, [dim], True)
    hi = op(aten.amax.default, xg, [dim], True)
    m16 = op(aten.to.dtype, op(aten.clamp.default, lo, -_F16_MAX, _F16_MAX), SCALE_DTYPE)
    s16 = op(aten.to.dtype, op(aten.clamp.default, op(aten.div.Tensor, op(aten.sub.Tensor, hi, lo), float(fmt.qmax)),
                               None, _F16_MAX), SCALE_DTYPE)
    m = op(aten.to.dtype, m16, torch.float32)
    s = op(aten.to.dtype, s16, torch.float32)
    q = op(aten.round.default, op(aten.div.Tensor, op(aten.sub.Tensor, xg, m), op(aten.clamp.default, s, _TINY)))
    return op(aten.clamp.default, q, 0.0, float(fmt.qmax)), [s16, m16]


def _pack(q, fmt: KVFormat, op):
    """Float codes ``[..., head_dim]`` → stored codes (4 bits: byte ``j`` = ``u[2j] + 16·u[2j+1]``)."""
    if fmt.bits == 4:
        pairs = op(aten.unflatten.int, q, -1, [fmt.head_dim // 2, 2])
        q = op(aten.add.Tensor, op(aten.select.int, pairs, -1, 0), op(aten.mul.Tensor, op(aten.select.int, pairs, -1, 1),
                                                                      16.0))
    return op(aten.to.dtype, q, fmt.code_dtype)


def _unpack(codes, fmt: KVFormat, op):
    """Stored codes → float codes ``[..., head_dim]`` (symmetric 4-bit: minus 8)."""
    q = op(aten.to.dtype, codes, torch.float32)
    if fmt.bits == 4:                                           # low nibble: even index, high nibble: odd
        hi_n = op(aten.floor.default, op(aten.div.Tensor, q, 16.0))
        lo_n = op(aten.sub.Tensor, q, op(aten.mul.Tensor, hi_n, 16.0))
        q = op(aten.flatten.using_ints, op(aten.stack.default, [lo_n, hi_n], -1), -2, -1)
        if fmt.symmetric and not fmt.channel:
            q = op(aten.sub.Tensor, q, 8.0)
    return q


def quantize(x, fmt: KVFormat, op: Callable = _eager) -> list:
    """The stored parts (codes, scales, minima when asymmetric) of ``x`` ``[B, H, N, head_dim]`` (float).
    ``op(aten_op, *args)`` runs each op: eagerly by default; the pass passes a node builder, so the graph
    computes exactly this. Per channel (``fmt.channel``), ``N`` must be a multiple of ``fmt.group``."""
    xf = op(aten.to.dtype, x, torch.float32)
    if fmt.channel:                                             # [B, H, N/G, G, d]: reduce over the G tokens
        q, extra = _codes(op(aten.unflatten.int, xf, -2, [-1, fmt.group]), -2, fmt, op)
        q = op(aten.flatten.using_ints, q, -3, -2)
        extra = [op(aten.squeeze.dim, t, -2) for t in extra]
    else:                                                       # [B, H, N, d/g, g]: reduce over g values
        q, extra = _codes(op(aten.unflatten.int, xf, -1, [fmt.groups, fmt.group]), -1, fmt, op)
        q = op(aten.flatten.using_ints, q, -2, -1)
        extra = [op(aten.squeeze.dim, t, -1) for t in extra]
    return [_pack(q, fmt, op), *extra]


def dequantize(parts: list, fmt: KVFormat, dtype: torch.dtype, op: Callable = _eager):
    """``x̂ [B, H, N, head_dim]`` in ``dtype`` from :func:`quantize`'s parts."""
    q = _unpack(parts[0], fmt, op)
    dim = -2 if fmt.channel else -1
    if fmt.channel:
        qg = op(aten.unflatten.int, q, -2, [-1, fmt.group])
    else:
        qg = op(aten.unflatten.int, q, -1, [fmt.groups, fmt.group])
    x = op(aten.mul.Tensor, qg, op(aten.unsqueeze.default, op(aten.to.dtype, parts[1], torch.float32), dim))
    if len(parts) > 2:
        x = op(aten.add.Tensor, x, op(aten.unsqueeze.default, op(aten.to.dtype, parts[2], torch.float32), dim))
    x = op(aten.flatten.using_ints, x, -3, -2) if fmt.channel else op(aten.flatten.using_ints, x, -2, -1)
    return op(aten.to.dtype, x, dtype)


def store(x: torch.Tensor, fmt: KVFormat) -> list[torch.Tensor]:
    """Every stored part of a float cache tensor ``x`` ``[B, H, N, head_dim]`` (eagerly): :func:`quantize`'s
    parts; per channel, the whole blocks quantized and the rest as the residual."""
    if not fmt.channel:
        return quantize(x, fmt)
    n = x.shape[2] // fmt.group * fmt.group
    return [*quantize(x[:, :, :n], fmt), x[:, :, n:].clone()]


def load(parts: list[torch.Tensor], fmt: KVFormat, dtype: torch.dtype) -> torch.Tensor:
    """The float cache attention reads from the stored parts (eagerly; the inverse of :func:`store` up to
    rounding)."""
    x = dequantize(parts, fmt, dtype)
    return torch.cat([x, parts[3]], 2) if fmt.channel else x


# --------------------------------------------------------------------------- the pass


@dataclass
class _Entry:
    """One cache tensor of the captured step and the nodes that make it."""

    kind: str                       # key | value
    layer: int
    past: torch.fx.Node             # the float placeholder
    present: torch.fx.Node          # concat(A, new)
    new: torch.fx.Node              # this step's keys / values
    held: torch.fx.Node             # A: the past, as the concat reads it

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.layer}"


@register_pass
@dataclass
class KVCacheQuantization(Pass):
    name: ClassVar[str] = PASS_NAME
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = ("store a decoder's KV cache quantized (int8 / packed int4 codes + float16 scales, per "
                              "token or keys per channel); attention reads the dequantized cache")
    bits: int = 8
    granularity: str = "token"
    group_size: int = 32
    symmetric: bool = True
    key_block: int = 32

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"kv-cache: bits must be 8 or 4; got {self.bits!r} (int8 codes, or two 4-bit codes a byte)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"kv-cache: granularity must be 'token' (keys and values in per-token groups along "
                             f"head_dim) or 'channel' (keys per channel in blocks of key_block tokens, KIVI; values "
                             f"per token); got {self.granularity!r}")
        for opt, least in (("group_size", 2), ("key_block", 8)):
            v = getattr(self, opt)
            if isinstance(v, bool) or not isinstance(v, int) or v < least or v & (v - 1):
                raise ValueError(f"kv-cache: {opt} must be a power of two ≥ {least}; got {v!r}"
                                 + (" (an empty cache's dummy slots must fit in the residual)" if least > 2 else ""))

    def format(self, kind: str, head_dim: int) -> KVFormat:
        if kind == "key" and self.granularity == "channel":
            return KVFormat(self.bits, self.key_block, False, head_dim, channel=True)
        return KVFormat(self.bits, min(self.group_size, head_dim), self.symmetric, head_dim)

    # ------------------------------------------------------------------ requires

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        self._entries(gm)

    def _entries(self, gm: torch.fx.GraphModule) -> list[_Entry]:
        info = CAPTURE.get(gm)
        pasts = {n.target: n for n in gm.graph.nodes if n.op == "placeholder" and _PAST.match(str(n.target))}
        if info is None or not pasts:
            raise NotApplicable("not a decode-step graph: no past_key_<i>/past_value_<i> inputs (capture the model "
                                "with optimize(..., task='text-generation'))")
        outs = _output_nodes(gm, info)
        pairs = {name: (p, outs.get("present_" + name[len("past_"):])) for name, p in pasts.items()}
        if not any(o is not None for _, o in pairs.values()):
            raise NotApplicable("not a decode-step graph: no present_key_<i>/present_value_<i> outputs beside the "
                                f"inputs {', '.join(sorted(pasts))}")
        entries = []
        for name, (p, o) in pairs.items():
            val = VAL.get(p)
            if not isinstance(val, torch.Tensor) or val.dim() != 4 or not isinstance(val.shape[3], int):
                raise PreconditionError(f"{self.name}: cache input {name!r} has no [batch, kv_heads, tokens, head_dim] "
                                        "shape with a constant head_dim in its meta['val']")
            if not val.dtype.is_floating_point:
                raise NotApplicable(f"the cache is already stored as integers ({name} is {val.dtype}): "
                                    f"{self.name} runs once per graph")
            if o is None:
                raise PreconditionError(f"{self.name}: cache input {name!r} has no output present_{name[5:]}: the "
                                        "graph is not a decode step fxopt captured")
            kind, layer = _PAST.match(name).groups()
            entries.append(self._match(kind, int(layer), p, o))
        for e in entries:
            hd = e.past.meta["val"].shape[3]
            if hd % min(self.group_size, hd):
                raise PreconditionError(f"{self.name}: head_dim {hd} of {e.past.target} is not a multiple of "
                                        f"group_size={self.group_size}: choose a group_size that divides it")
            if self.bits == 4 and hd % 2:
                raise PreconditionError(f"{self.name}: bits=4 packs two codes a byte along head_dim, which is odd "
                                        f"({hd}) in {e.past.target}: use bits=8")
        return entries

    def _match(self, kind: str, layer: int, past: torch.fx.Node, present: torch.fx.Node) -> _Entry:
        where = f"present_{kind}_{layer} (node {present.name!r}, {present.target})"
        if present.op != "call_function" or present.target is not aten.cat.default:
            raise PreconditionError(f"{self.name}: {where} is not concat(past, new) along the token dim: the pass "
                                    "cannot tell this step's keys/values from the cached ones")
        tensors = present.args[0]
        dim = present.args[1] if len(present.args) > 1 else present.kwargs.get("dim", 0)
        if len(tensors) != 2 or dim not in (2, -2):
            raise PreconditionError(f"{self.name}: {where} concatenates {len(tensors)} tensors along dim {dim}, not "
                                    "(past, new) along the token dim 2")
        held, new = tensors
        if past not in _ancestors(held) or past in _ancestors(new):
            raise PreconditionError(f"{self.name}: {where}: its first operand {held.name!r} does not hold "
                                    f"{past.target} or its second {new.name!r} depends on it")
        if not _same(held.meta["val"].shape[2], past.meta["val"].shape[2]):
            raise PreconditionError(f"{self.name}: {where}: the cached part {held.name!r} has "
                                    f"{held.meta['val'].shape[2]} tokens, the input {past.target} "
                                    f"{past.meta['val'].shape[2]}")
        return _Entry(kind, layer, past, present, new, held)

    # ------------------------------------------------------------------ call

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        entries = self._entries(gm)
        info = CAPTURE.get(gm)
        g = gm.graph
        out_node = next(n for n in g.nodes if n.op == "output")
        formats: dict[str, KVFormat] = {}
        stored_of: dict[str, list[torch.fx.Node]] = {}
        for e in entries:
            stored_of[e.name] = self._rewrite(gm, e, out_node, formats.setdefault(
                e.name, self.format(e.kind, e.past.meta["val"].shape[3])))

        # outputs and inputs in the new order, the pytree spec, the capture record
        old_outputs, old_inputs = list(info.output_names), list(info.input_names)
        names_out, nodes_out = [], []
        for name, node in zip(old_outputs, out_node.args[0]):
            base = name[len("present_"):]
            if not name.startswith("present_") or base not in formats:
                names_out.append(name)
                nodes_out.append(node)
                continue
            for part, n in zip(formats[base].parts, stored_of[base]):
                names_out.append("present_" + part_name(base, part))
                nodes_out.append(n)
        out_node.args = (tuple(nodes_out),)
        _set_signature(gm, names_out)
        info.input_names = [str(n.target) for n in g.nodes if n.op == "placeholder"]
        info.output_names = names_out
        axes = dict(info.dynamic_axes)
        for base, fmt in formats.items():
            batch = dict(axes.get("past_" + base, {0: "batch"})).get(0, "batch")
            for part in fmt.parts:
                axes["past_" + part_name(base, part)] = {0: batch, 2: fmt.axis(part)}
        info.dynamic_axes = {n: axes[n] for n in info.input_names if n in axes}
        g.lint()
        gm.recompile()

        # the pipeline's inputs and reference follow the new cache
        pad = self._pad(formats)
        if ctx.example_inputs is not None:
            ctx.example_inputs = quantize_inputs(ctx.example_inputs, formats, old_inputs, info.input_names, pad)
        if ctx.calibration:
            ctx.calibration = [quantize_inputs(b, formats, old_inputs, info.input_names, pad) for b in ctx.calibration]
        from ..ir.decoder import graph_cache
        cache = graph_cache(gm)
        heads = entries[0].past.meta["val"].shape[1]
        dtype = entries[0].new.meta["val"].dtype
        qbytes = sum(heads * t.bytes_per_token for t in cache)
        fbytes = sum(heads * f.head_dim * dtype.itemsize for f in formats.values())
        stats = {"bits": self.bits, "granularity": self.granularity, "tensors": len(entries),
                 "formats": sorted({f.describe() for f in formats.values()}),
                 "bytes_per_token": round(qbytes, 3), "float_bytes_per_token": int(fbytes),
                 "float_dtype": str(dtype).replace("torch.", ""), "ratio": qbytes / fbytes}
        fixed = sum(heads * f.head_dim * dtype.itemsize * (f.group - 1) for f in formats.values() if f.channel)
        notes = [f"cache stored as {' / '.join(stats['formats'])}; {len(entries)} tensors "
                 f"({len({e.layer for e in entries})} layers): {stats['bytes_per_token']:g} bytes per token vs. "
                 f"{fbytes} in {stats['float_dtype']} ({stats['ratio']:.3f}×)"
                 + (f", plus at most {fixed} bytes of float residual keys per sequence" if fixed else "")]
        if pad:
            notes.append(f"the pipeline's example and calibration inputs get {pad} more masked zero cache slots: "
                         "torch.export specializes dims of size 0 and 1, and every cache dim must be ≥ 2 when the "
                         "graph is traced again (ONNX export)")
        if ctx.reference_outputs is not None and len(ctx.reference_outputs) == len(old_outputs):
            ref = dict(zip(old_outputs, ctx.reference_outputs))
            stored_ref = {}
            for base, fmt in formats.items():
                x = _pad_tokens(ref["present_" + base], pad)
                for part, t in zip(fmt.parts, store(x, fmt)):
                    stored_ref["present_" + part_name(base, part)] = t
            ctx.reference_outputs = [stored_ref.get(n, ref.get(n)) for n in names_out]
            notes.append("drift from here on: logits vs. the original model; cache outputs vs. its cache stored the "
                         "same way (integer codes: 1 per mismatch)")
            stats.update(_logits_drift(gm, ctx, names_out))
        return PassResult(gm, True, stats=stats, notes=notes)

    def _past_tokens(self, g: torch.fx.Graph, op) -> torch.fx.Node:
        """A node for the number of cached tokens, ``len(attention_mask) − len(input_ids)`` (the step's contract)."""
        ph = {str(n.target): n for n in g.nodes if n.op == "placeholder"}
        if "attention_mask" not in ph or "input_ids" not in ph:
            raise PreconditionError(f"{self.name}: granularity=channel reads the cache length from the attention_mask "
                                    "and input_ids inputs, which this graph does not have")
        return op(operator.sub, op(aten.sym_size.int, ph["attention_mask"], 1), op(aten.sym_size.int, ph["input_ids"], 1))

    @staticmethod
    def _pad(formats: dict[str, KVFormat]) -> int:
        """Masked zero slots added to the pipeline's inputs: two key blocks (≥ 2 blocks, ≥ 2 quantized tokens)."""
        return max((2 * f.group for f in formats.values() if f.channel), default=0)

    def _rewrite(self, gm, e: _Entry, out_node, fmt: KVFormat) -> list[torch.fx.Node]:
        """Rules 1–4 (module docstring) for one cache tensor; returns the nodes of its stored parts."""
        g = gm.graph
        pv = e.past.meta["val"]
        dtype = e.new.meta["val"].dtype
        # 1. inputs: the float placeholder becomes the codes; the other parts follow it
        inputs = [e.past]
        for part in fmt.parts[1:]:
            with g.inserting_after(inputs[-1]):
                inputs.append(g.placeholder("past_" + part_name(e.name, part)))
        with _fake_mode(pv):
            for part, ph in zip(fmt.parts, inputs):
                dt = fmt.code_dtype if not part else (dtype if part == "residual" else SCALE_DTYPE)
                # per channel, the codes hold whole blocks: G·n tokens for n blocks (the past's symbol, reused)
                tokens = pv.shape[2] * fmt.group if fmt.channel and not part else pv.shape[2]
                ph.meta["val"] = torch.empty(pv.shape[0], pv.shape[1], tokens, fmt.trailing(part), dtype=dt)
        # 2./3. quantize the new tokens (per channel: the whole blocks of residual + new), append, dequantize
        made: list[torch.fx.Node] = []
        op = _builder(g, made, pv)
        with g.inserting_before(e.present):
            if fmt.channel:
                # P = len(mask) − T cached tokens, R = P mod G of them in the residual (the format keeps R < G), so
                # the whole blocks of residual + new are the first n = ⌊(R + T)/G⌋·G tokens. Read from the mask,
                # not from the cache tensors' shapes, which count blocks and residual tokens.
                tokens = self._past_tokens(g, op)
                r = op(operator.mod, tokens, fmt.group)
                n = op(operator.mul, op(operator.floordiv, op(operator.add, r, op(aten.sym_size.int, e.new, 2)),
                                        fmt.group), fmt.group)
                full = op(aten.cat.default, [inputs[3], e.new], 2)
                blocks = op(aten.slice.Tensor, full, 2, 0, n)
                rest = op(aten.slice.Tensor, full, 2, n, _END)
                stored = [op(aten.cat.default, [old, q], 2) for old, q in zip(inputs, quantize(blocks, fmt, op))]
                deq = op(aten.cat.default, [dequantize(stored, fmt, dtype, op), rest], 2)
                stored.append(rest)
            else:
                stored = [op(aten.cat.default, [old, q], 2) for old, q in zip(inputs, quantize(e.new, fmt, op))]
                deq = dequantize(stored, fmt, dtype, op)
        e.present.replace_all_uses_with(deq, delete_user_cb=lambda u: u is not out_node)
        # 4. the float path goes; what else read the float past reads its stored form
        _erase_dead(g, e.present)
        past_deq = None
        for user in list(e.past.users):
            if user in made:
                continue
            if user.op == "call_function" and user.target is aten.sym_size.int:
                dim = user.args[1] % 4
                if dim == 3 and fmt.code_width != fmt.head_dim:
                    _replace_with_value(user, fmt.head_dim)
                    g.erase_node(user)
                elif dim == 2 and fmt.channel:                   # cached tokens = len(mask) − T
                    with g.inserting_before(user):
                        total = self._past_tokens(g, op)
                    user.replace_all_uses_with(total)
                    g.erase_node(user)
            elif user.op == "call_module" and "guards" in str(user.target):
                if fmt.code_width != fmt.head_dim or fmt.channel:   # the guards check the float past's shape
                    with g.inserting_before(user):
                        tokens = self._past_tokens(g, op) if fmt.channel else op(aten.sym_size.int, e.past, 2)
                        sizes = [op(aten.sym_size.int, e.past, 0), pv.shape[1], tokens, fmt.head_dim]
                        stand_in = op(aten.expand.default, op(aten.zeros.default, [], dtype=dtype), sizes)
                    user.args = tuple(stand_in if a is e.past else a for a in user.args)
            else:
                if past_deq is None:
                    with g.inserting_before(user):
                        past_deq = dequantize(inputs, fmt, dtype, op)
                        if fmt.channel:
                            past_deq = op(aten.cat.default, [past_deq, inputs[3]], 2)
                user.replace_input_with(e.past, past_deq)
        for n in made:
            PROVENANCE.set(n, self.name)
        return stored


# --------------------------------------------------------------------------- helpers


def _output_nodes(gm, info) -> dict[str, torch.fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    if not isinstance(flat, (tuple, list)) or len(flat) != len(info.output_names):
        return {}
    return {name: n for name, n in zip(info.output_names, flat) if isinstance(n, torch.fx.Node)}


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes whose values ``node`` reads (shape reads, ``sym_size``, do not count)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not (n.op == "call_function" and n.target is aten.sym_size.int):
            stack.extend(n.all_input_nodes)
    return seen


def _same(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.node.expr == b.node.expr


def _fake_mode(val):
    import contextlib

    from torch._guards import detect_fake_mode
    mode = detect_fake_mode([val])
    return mode if mode is not None else contextlib.nullcontext()


def _builder(g: torch.fx.Graph, made: list, like) -> Callable:
    """``op(aten_op, *args)`` that adds a node (with its FakeTensor ``val``) at the graph's insertion point."""
    def op(target, *args, **kwargs):
        node = g.call_function(target, args, kwargs)
        mode = _fake_mode(like)

        def val(a):
            v = a.meta["val"]
            return mode.from_tensor(v) if hasattr(mode, "from_tensor") and isinstance(v, torch.Tensor) \
                and not isinstance(v, FakeTensor) else v
        fa = torch.fx.node.map_arg(args, val)
        fk = torch.fx.node.map_arg(kwargs, val)
        with mode:
            node.meta["val"] = target(*fa, **fk)
        made.append(node)
        return node
    return op


def _erase_dead(g: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase ``node`` if unused, then its inputs that become unused (never placeholders or impure nodes)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output", "get_attr") or n.is_impure():
            continue
        inputs = n.all_input_nodes
        g.erase_node(n)
        stack.extend(inputs)


def _replace_with_value(node: torch.fx.Node, value) -> None:
    for user in list(node.users):
        user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


def _set_signature(gm: torch.fx.GraphModule, output_names: list[str]) -> None:
    """Keyword inputs = the placeholders in order; outputs = a dict of ``output_names`` (the exported module's
    pytree spec, which its ``forward`` flattens and unflattens with)."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    in_spec = pytree.tree_flatten(((), dict.fromkeys(names, 0)))[1]
    out_spec = pytree.tree_flatten(dict.fromkeys(output_names, 0))[1]
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))
    for attr, spec in (("_in_spec", in_spec), ("_out_spec", out_spec)):
        if attr in gm.__dict__:
            gm.__dict__[attr] = spec


def part_name(name: str, part: str) -> str:
    """``key_3`` + ``scale`` → ``key_scale_3`` (the codes keep the name: part ``''``)."""
    if not part:
        return name
    kind, layer = name.rsplit("_", 1)
    return f"{kind}_{part}_{layer}"


def quantize_inputs(ex: ExampleInputs, formats: dict[str, KVFormat], before: list[str], after: list[str],
                    pad: int = 0) -> ExampleInputs:
    """Step inputs with a float cache (``before``: the input names in order) → keyword inputs ``after`` with
    each float ``past_<name>`` stored in ``formats[name]`` (:func:`store`), after ``pad`` masked zero slots
    are put in front of every past tensor and of the attention mask."""
    kwargs = {**dict(zip(before, ex.args)), **ex.kwargs}
    stored = {}
    if pad and isinstance(kwargs.get("attention_mask"), torch.Tensor):
        m = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([m.new_zeros(m.shape[0], pad), m], 1)
    for name, fmt in formats.items():
        x = kwargs.get("past_" + name)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            for part, t in zip(fmt.parts, store(_pad_tokens(x, pad), fmt)):
                stored["past_" + part_name(name, part)] = t
    return ExampleInputs((), {n: stored.get(n, kwargs.get(n)) for n in after if n in stored or n in kwargs})


def _pad_tokens(x: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.cat([x.new_zeros(*x.shape[:2], pad, *x.shape[3:]), x], 2) if pad else x


def _logits_drift(gm, ctx: PassContext, names_out: list[str]) -> dict:
    from ..ir.graph import call, flatten_tensors

    try:
        outs = flatten_tensors(call(gm, ctx.example_inputs))
    except Exception:  # noqa: BLE001 - the record's drift says why
        return {}
    if "logits" not in names_out:
        return {}
    i = names_out.index("logits")
    got, ref = outs[i].double(), ctx.reference_outputs[i].double()
    d = float((got - ref).abs().max())
    return {"logits_drift_max": d, "logits_drift_rel": d / max(float(ref.abs().max()), 1e-12)}
