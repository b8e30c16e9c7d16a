"""fxopt::moe lowers to static-shape ONNX that ONNX Runtime runs and that matches PyTorch."""
import onnx
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.lowering.onnx_export import LoweringError
from tests.helpers import max_abs
from tests.passes.test_moe_recompile import TwoDomainMoE, batch


def _op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_plan_with_bpr_matches_in_ort(tmp_path):
    torch.manual_seed(0)
    m = TwoDomainMoE().eval()
    calib = [(batch("A", s),) for s in range(3)]
    x = torch.cat([batch("A", 9), batch("B", 9)[:, :16]], 1)          # B's tokens overflow A's plan
    res = fxopt.optimize(m, "moe-recompile{routing=bpr}", x, calibration=calib)
    rep = res.export_onnx(tmp_path / "moe.onnx", dynamic=False)
    assert rep.verified and rep.max_abs < 1e-5
    types = _op_types(rep.path)
    assert {"TopK", "MatMul", "ScatterND", "Gather", "CumSum"} <= types
    assert not any(n.domain not in ("", "ai.onnx") for n in onnx.load(str(rep.path)).graph.node)


def test_qwen2_moe_uniform_capacity_matches_in_ort(tmp_path):
    lm = models.hf_tiny("qwen2-moe-tiny", layers=1)
    res = fxopt.optimize(lm.model, "moe-recompile{capacity=uniform,factor=1.0}", lm.example_inputs)
    rep = res.export_onnx(tmp_path / "qwen.onnx", dynamic=False)
    assert rep.verified and rep.max_abs < 1e-4


def test_dynamic_token_count_is_refused_with_advice(tmp_path):
    torch.manual_seed(0)
    m, x = TwoDomainMoE().eval(), batch("A", 0)
    res = fxopt.optimize(m, "moe-recompile{capacity=uniform}", x, dynamic=True)
    with pytest.raises(LoweringError, match="dynamic=False"):
        res.export_onnx(tmp_path / "dyn.onnx", dynamic=True)


def test_top2_bpr_per_round_priority_matches_in_ort(tmp_path):
    # top-2, renormalized, capacity short enough to drop: round j ordered by the weight of choice j
    from fxopt.nn import MoELayer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoELayer(16, 24, 4, top_k=2, capacity_factor=0.75, routing="bpr")

        def forward(self, x):
            return x + self.moe(x)

    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(1, 32, 16) * 2
    from fxopt.ir import moeops
    with torch.no_grad(), moeops.LoadRecorder() as rec:
        m(x)
    assert rec.records[0].dropped > 0
    with torch.no_grad():
        bpr = m(x)
        w, ids, prio = moeops.route(m.moe.router(x.reshape(-1, 16)), 2, True)
        caps = moeops.capacities(32, 2, 4, [0.75] * 4)
        top1 = moeops.assign(ids, w, w[:, 0], caps, "bpr")[0]       # every round by the top-1 weight
        assert not torch.equal(top1, moeops.assign(ids, w, prio, caps, "bpr")[0])   # the order matters here
        m.moe.routing = "vanilla"
        assert max_abs(m(x), bpr) > 1e-3
        m.moe.routing = "bpr"
    res = fxopt.optimize(m, "dce", x)
    rep = res.export_onnx(tmp_path / "top2.onnx", dynamic=False)
    assert rep.verified and rep.max_abs < 1e-5
