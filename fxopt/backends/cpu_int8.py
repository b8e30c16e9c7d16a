"""``cpu-int8`` backend: run ``fuse-qdq``'s integer linears with PyTorch's x86 integer kernels.

``fuse-qdq`` leaves each quantized linear as ``matmul(DQ(q_x), DQ(W_qᵀ)) [+ b]`` marked with
:data:`fxopt.ir.meta.QLINEAR`. This backend rewrites a copy of the graph so that pattern runs as
one oneDNN integer GEMM, ``torch.ops.onednn.qlinear_pointwise`` (u8 activations × s8 per-channel
weights, int32 accumulation, float32 output with the bias fused) — the kernel PyTorch's own x86
quantization lowering uses:

* ``w8a8-static`` (u8 per tensor): scale and zero point are constants of the graph;
* ``w8a8-dynamic`` with ``granularity=tensor``: ``fxopt::dynamic_quantize`` computes them per
  call; they are read as Python numbers before the GEMM;
* per-token activations, int8/int4 weight-only linears and symmetric (s8) activations have no
  such kernel here: they keep running in the reference form, and :attr:`CpuInt8Backend.notes`
  says how many.

The weights are packed once (``onednn.qlinear_prepack``) when the backend is built. oneDNN's u8×s8
GEMM on CPUs without VNNI (``VPMADDUBSW``) adds pairs of products into a saturating int16, so on
such a CPU (or under ``ONEDNN_MAX_CPU_ISA=AVX2``) weights above 64 in magnitude are first re-rounded
to ``[−64, 64]`` (:func:`fxopt.lowering.int8_target.fit_int8_weights`, with a note); a graph
quantized with ``insert-qdq{target=auto}`` on that machine already is.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..ir import qops
from ..ir.graph import ExampleInputs, call, clone, flatten_tensors, get_attr, set_attr
from ..ir.meta import QLINEAR


def available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def _int8_linear(qx: torch.Tensor, x_scale, x_zero_point, packed: torch.Tensor, w_scale: torch.Tensor,
                 w_zero_point: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    xs = float(x_scale)
    xz = int(x_zero_point)
    lead = qx.shape[:-1]
    out = torch.ops.onednn.qlinear_pointwise(qx.reshape(-1, qx.shape[-1]), xs, xz, packed, w_scale, w_zero_point,
                                             bias, 1.0, 0, torch.float32, "none", [], "")
    return out.reshape(*lead, n)


def _is(n, target) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is target


def lower(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose u8×s8 quantized linears call oneDNN; plus notes on what stayed."""
    if not available():
        raise RuntimeError("this PyTorch build has no oneDNN integer kernels (torch.ops.onednn.qlinear_pointwise)")
    from ..lowering.int8_target import fit_int8_weights
    from . import isa

    gm = clone(gm)
    target = isa.onednn_target()
    fitted = fit_int8_weights(gm, target)
    g = gm.graph
    lowered, kept = 0, 0
    for mm in list(g.nodes):
        info = QLINEAR.get(mm)
        if info is None or not _is(mm, torch.ops.aten.matmul.default):
            continue
        dq_x, dq_w = mm.args
        ok = info.activation in ("u8 per-tensor static", "u8 per-tensor dynamic") and _is(dq_x, qops.DEQUANTIZE) \
            and _is(dq_w, qops.DEQUANTIZE) and dq_w.args[0].op == "get_attr"
        if not ok:
            kept += 1
            continue
        qx, xs, xz = dq_x.args[0], dq_x.args[1], dq_x.args[2]
        wt = get_attr(gm, dq_w.args[0].target)                      # [K, N] int8
        n = wt.shape[1]
        packed_name = dq_w.args[0].target + "_onednn"
        set_attr(gm, packed_name, torch.ops.onednn.qlinear_prepack(wt.t().contiguous(), None), as_parameter=False)
        zname = dq_w.args[0].target + "_onednn_zp"
        set_attr(gm, zname, torch.zeros(n, dtype=torch.int64), as_parameter=False)
        users = list(mm.users)
        bias = None
        target_node = mm
        if len(users) == 1 and _is(users[0], torch.ops.aten.add.Tensor) and users[0].args[0] is mm \
                and isinstance(users[0].args[1], torch.fx.Node) and users[0].args[1].op == "get_attr" \
                and get_attr(gm, users[0].args[1].target).dim() == 1:
            bias = users[0].args[1]
            target_node = users[0]
        with g.inserting_before(target_node):
            pk = g.get_attr(packed_name)
            wsn = g.get_attr(dq_w.args[1].target)
            zn = g.get_attr(zname)
            out = g.call_function(_int8_linear, (qx, xs, xz, pk, wsn, zn, bias, n))
        out.meta.update(target_node.meta)
        target_node.replace_all_uses_with(out)
        lowered += 1
    g.eliminate_dead_code()
    gm.recompile()
    notes = [f"{lowered} linears run as oneDNN u8×s8 GEMMs (target {target})"]
    if fitted:
        notes.append(f"{fitted} int8 weights re-rounded to [-64, 64]: oneDNN's u8×s8 pairs saturate int16 on {target}")
    if kept:
        notes.append(f"{kept} quantized linears have no integer kernel here (per-token or s8 activations, "
                     "weight-only) and run in the reference form")
    return gm, notes


class CpuInt8Backend:
    name = "cpu-int8"

    def __init__(self, module: torch.fx.GraphModule):
        self.module, self.notes = lower(module)

    def run(self, inputs: Any) -> list[torch.Tensor]:
        return flatten_tensors(call(self.module, ExampleInputs.of(inputs)))

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
