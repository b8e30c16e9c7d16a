"""Export-time integer linears: fuse-qdq's static int8 linears → MatMulIntegerToFloat with the bias inside."""
import numpy as np
import onnx
import torch

import fxopt
from fxopt.backends import OrtBackend
from fxopt.ir import qops
from fxopt.ir.meta import QLINEAR
from fxopt.ir.graph import graph_copy
from fxopt.lowering.qlinear import fuse_integer_linears


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _static(m):
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 8, 32, generator=g),) for _ in range(4)]
    return fxopt.optimize(m, "insert-qdq,fuse-qdq", calib[0], calibration=calib), calib


def test_rewrite_is_the_same_arithmetic_and_leaves_the_callers_graph():
    res, calib = _static(MLP().eval())
    gm = res.module
    new = graph_copy(gm)
    n = fuse_integer_linears(new)
    assert n == 2
    ops = [x for x in new.graph.nodes if x.target is qops.MATMUL_INTEGER_TO_FLOAT]
    assert len(ops) == 2
    assert ops[0].args[5] is not None and ops[1].args[5] is None          # fc1's bias inside, fc2 has none
    assert not any(x.target is torch.ops.aten.add.Tensor for x in new.graph.nodes)
    assert sum(1 for x in gm.graph.nodes if QLINEAR.has(x)) == 2          # the caller's graph is unchanged
    assert not any(x.target is qops.MATMUL_INTEGER_TO_FLOAT for x in gm.graph.nodes)
    x = calib[2][0]
    assert torch.allclose(new(x), gm(x), atol=1e-5, rtol=1e-5)


def test_onnx_runtime_runs_one_kernel_per_linear_with_the_bias(tmp_path):
    res, calib = _static(MLP().eval())
    rep = res.export_onnx(tmp_path / "q.onnx", dynamic=False)
    assert rep.verified and "2 static int8 linears → com.microsoft.MatMulIntegerToFloat (bias inside)" in rep.notes
    nodes = [nd for nd in onnx.load(str(rep.path)).graph.node if nd.op_type == "MatMulIntegerToFloat"]
    assert len(nodes) == 2 and len(nodes[0].input) == 7 and nodes[0].input[6]           # the bias input
    ops = OrtBackend(rep.path).optimized_op_types()
    assert ops.get("MatMulIntegerToFloat") == 2 and "Add" not in ops and "BiasGelu" not in ops, ops
    assert "MatMul" not in ops and "DequantizeLinear" not in ops, ops
    old = res.export_onnx(tmp_path / "qdq.onnx", dynamic=False, integer_linears=False)
    old_ops = OrtBackend(old.path).optimized_op_types()
    # plain QDQ leaves float work behind: the bias Add / BiasGelu, or here (static shapes) a float Gemm
    assert any(k in old_ops for k in ("Add", "BiasGelu", "Gemm", "MatMul")), old_ops
    x = calib[3]
    a, b = OrtBackend(rep.path).run(x)[0], OrtBackend(old.path).run(x)[0]
    ref = res.module(*x).detach().numpy()
    assert np.abs(a - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_dynamic_and_weight_only_linears_are_not_rewritten():
    m = MLP().eval()
    x = torch.randn(4, 8, 32)
    for pipe in ("insert-qdq{scheme=w8a8-dynamic,granularity=tensor},fuse-qdq", "insert-qdq{scheme=w8-weight-only},fuse-qdq"):
        res = fxopt.optimize(m, pipe, (x,), calibration=[(x,)])
        assert fuse_integer_linears(graph_copy(res.module)) == 0
