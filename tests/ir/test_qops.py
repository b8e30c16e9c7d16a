import numpy as np
import pytest
import torch

from fxopt.ir import qops
from fxopt.ir.graph import flatten_tensors


def test_per_tensor_matches_the_formula_and_rounds_half_to_even():
    x = torch.tensor([-1.0, -0.25, 0.0, 0.25, 0.75, 1.25, 100.0])
    s, z = torch.tensor(0.5), torch.tensor(3, dtype=torch.uint8)
    q = torch.ops.fxopt.quantize(x, s, z, -1, 0, 0, 255)
    assert q.dtype == torch.uint8
    # x/s = -2, -0.5, 0, 0.5, 1.5, 2.5, 200 → round-half-even -2, -0, 0, 0, 2, 2, 200 → +3
    assert q.tolist() == [1, 3, 3, 3, 5, 5, 203]
    dq = torch.ops.fxopt.dequantize(q, s, z, -1, 0)
    assert dq.tolist() == [-1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 100.0]


def test_narrow_range_saturates():
    x = torch.tensor([-10.0, 10.0])
    q = torch.ops.fxopt.quantize(x, torch.tensor(0.01), torch.tensor(0, dtype=torch.int8), -1, 0, -127, 127)
    assert q.tolist() == [-127, 127]


def test_per_channel_and_blocked_match_a_loop():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    s = w.abs().amax(1) / 127
    z = torch.zeros(6, dtype=torch.int8)
    q = torch.ops.fxopt.quantize(w, s, z, 0, 0, -127, 127)
    for r in range(6):
        assert torch.equal(q[r], torch.clamp(torch.round(w[r] / s[r]), -127, 127).to(torch.int8))
    err = (torch.ops.fxopt.dequantize(q, s, z, 0, 0) - w).abs()
    assert float((err / s[:, None]).max()) <= 0.5 + 1e-6            # at most half a step
    # blocks of 4 along the input dim (ZeroQuant groups)
    sb = w.reshape(6, 2, 4).abs().amax(-1) / 7
    zb = torch.zeros(6, 2, dtype=torch.int8)
    qb = torch.ops.fxopt.quantize(w, sb, zb, 1, 4, -8, 7)
    for r in range(6):
        for b in range(2):
            ref = torch.clamp(torch.round(w[r, 4 * b:4 * b + 4] / sb[r, b]), -8, 7)
            assert torch.equal(qb[r, 4 * b:4 * b + 4].to(torch.float32), ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="integer"):
        torch.ops.fxopt.quantize(torch.randn(3), torch.tensor(1.0), torch.tensor(0.0), -1, 0, 0, 255)
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.fxopt.quantize(torch.randn(3, 4), torch.ones(5), torch.zeros(5, dtype=torch.int8), 0, 0, -128, 127)


class QDQLinear(torch.nn.Module):
    """Activation per-tensor (u8, full range) and weight per-channel (s8, narrow range) Q/DQ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 8)
        self.register_buffer("s", torch.tensor(0.02))
        self.register_buffer("z", torch.tensor(128, dtype=torch.uint8))
        self.register_buffer("ws", self.fc.weight.detach().abs().amax(1) / 127)
        self.register_buffer("wz", torch.zeros(8, dtype=torch.int8))

    def forward(self, x):
        x = qops.dequantize(qops.quantize(x, self.s, self.z, -1, 0, 0, 255), self.s, self.z, -1, 0)
        w = qops.dequantize(qops.quantize(self.fc.weight, self.ws, self.wz, 0, 0, -127, 127), self.ws, self.wz, 0, 0)
        return torch.nn.functional.linear(x, w, self.fc.bias)


def test_qdq_graph_captures_and_lowers_exactly_to_onnx(tmp_path):
    from fxopt.backends import OrtBackend
    from fxopt.ir import capture
    from fxopt.lowering import export_onnx

    m = QDQLinear().eval()
    x = torch.randn(3, 5, 16)
    gm = capture(m, (x,), dynamic=True)
    assert sum(n.target is qops.QUANTIZE for n in gm.graph.nodes) == 2
    rep = export_onnx(gm, tmp_path / "qdq.onnx", (x,))
    assert rep.ops["QuantizeLinear"] == 2 and rep.ops["DequantizeLinear"] == 2
    assert rep.max_abs < 1e-5
    x2 = torch.randn(7, 2, 16) * 3                                    # other shape, and saturating values
    got = OrtBackend(rep.path).run((x2,))[0]
    ref = flatten_tensors(gm(x2))[0].numpy()
    assert np.abs(got - ref).max() < 1e-5
