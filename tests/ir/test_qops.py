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
    """Activation per-tensor (u8, full range) and weight per-channel (s8 on [-qmax, qmax]) Q/DQ.

    ORT fuses it into a u8×s8 integer GEMM; ``qmax=64`` is exact on every CPU, 127 only where the
    GEMM accumulates in int32 (VNNI, AMX, ARM dot products)."""

    def __init__(self, qmax: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.qmax = qmax
        self.fc = torch.nn.Linear(16, 8)
        self.register_buffer("s", torch.tensor(0.02))
        self.register_buffer("z", torch.tensor(128, dtype=torch.uint8))
        self.register_buffer("ws", self.fc.weight.detach().abs().amax(1) / qmax)
        self.register_buffer("wz", torch.zeros(8, dtype=torch.int8))

    def forward(self, x):
        x = qops.dequantize(qops.quantize(x, self.s, self.z, -1, 0, 0, 255), self.s, self.z, -1, 0)
        w = qops.dequantize(qops.quantize(self.fc.weight, self.ws, self.wz, 0, 0, -self.qmax, self.qmax),
                            self.ws, self.wz, 0, 0)
        return torch.nn.functional.linear(x, w, self.fc.bias)


def test_qdq_graph_captures_and_lowers_exactly_to_onnx(tmp_path):
    from fxopt.backends import OrtBackend
    from fxopt.ir import capture
    from fxopt.lowering import export_onnx

    m = QDQLinear().eval()
    x = torch.randn(3, 5, 16)
    gm = capture(m, (x,), dynamic=True)
    assert sum(n.target is qops.QUANTIZE for n in gm.graph.nodes) == 2
    rep = export_onnx(gm, tmp_path / "qdq.onnx", (x,), target="portable")
    assert rep.ops["QuantizeLinear"] == 2 and rep.ops["DequantizeLinear"] == 2
    assert not any("re-rounded" in n for n in rep.notes)
    assert rep.max_abs < 1e-5
    x2 = torch.randn(7, 2, 16) * 3                                    # other shape, and saturating values
    got = OrtBackend(rep.path).run((x2,))[0]
    ref = flatten_tensors(gm(x2))[0].numpy()
    assert np.abs(got - ref).max() < 1e-5


def _asym_reference(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The asymmetric uint4 formula, one group at a time in plain torch: (s, z, q, Ŵ)."""
    n, k = w.shape
    s = torch.empty(n, k // group)
    z = torch.empty(n, k // group, dtype=torch.uint8)
    q = torch.empty(n, k, dtype=torch.uint8)
    for r in range(n):
        for b in range(k // group):
            g = w[r, b * group:(b + 1) * group]
            lo, hi = torch.clamp(g.min(), max=0.0), torch.clamp(g.max(), min=0.0)
            sc = (hi - lo) / 15 if hi > lo else torch.tensor(1e-12)
            zp = torch.clamp(torch.round(-lo / sc), 0, 15)
            s[r, b], z[r, b] = sc, zp
            q[r, b * group:(b + 1) * group] = torch.clamp(torch.round(g / sc) + zp, 0, 15).to(torch.uint8)
    w_hat = (q.to(torch.float32) - z.to(torch.float32).repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
    return s, z, q, w_hat


def test_asymmetric_groups_match_the_formula_exactly():
    from fxopt.passes import _fakequant as fq
    torch.manual_seed(0)
    w = torch.randn(5, 32) * 0.1 + 0.05                                # shifted: groups mostly positive
    w[0, :8] = 0.3                                                     # constant groups: positive, negative, zero
    w[1, 8:16] = -0.2
    w[2, 16:24] = 0.0
    s_ref, z_ref, q_ref, w_hat_ref = _asym_reference(w, 8)
    s, z = fq.grouped_asym_qparams(w, 8)
    assert z.dtype == torch.uint8 and torch.equal(s, s_ref) and torch.equal(z, z_ref)
    q = qops.quantize(w, s, z, 1, 8, 0, 15)
    assert q.dtype == torch.uint8 and torch.equal(q, q_ref)
    w_hat = qops.dequantize(q, s, z, 1, 8)
    assert torch.equal(w_hat, w_hat_ref) and torch.equal(fq.weight_grouped_asym(w, 8), w_hat_ref)
    assert bool(torch.isfinite(w_hat).all())
    # constant groups come back (0 exactly), and every value is within half a step of its group's grid
    assert torch.allclose(w_hat[0, :8], torch.full((8,), 0.3), rtol=1e-6)
    assert torch.allclose(w_hat[1, 8:16], torch.full((8,), -0.2), rtol=1e-6)
    assert torch.equal(w_hat[2, 16:24], torch.zeros(8))
    assert bool(((w_hat - w).abs() <= s.repeat_interleave(8, 1) / 2 + 1e-7).all())


def test_zero_point_packing_round_trips_and_defaults_to_8():
    torch.manual_seed(1)
    z = torch.randint(0, 16, (4, 3), dtype=torch.uint8)               # odd block count: one padding nibble
    packed = qops.pack_zero_points(z)
    assert packed.shape == (4, 2) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], z[:, 0] | (z[:, 1] << 4)) and torch.equal(packed[:, 1], z[:, 2])
    assert torch.equal(qops.unpack_zero_points(packed, 3), z)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        qops.pack_zero_points(torch.tensor([[16]], dtype=torch.uint8))
    # matmul_nbits without zero points is exactly the one with every zero point 8 (the symmetric path)
    q = torch.randint(-8, 8, (6, 48), dtype=torch.int8)
    s = torch.rand(6 * 3) + 0.1
    x = torch.randn(2, 48)
    packed_w = qops.pack_nbits(q, 16)
    sym = qops.matmul_nbits(x, packed_w, s, 48, 6, 4, 16)
    eights = qops.pack_zero_points(torch.full((6, 3), 8, dtype=torch.uint8))
    assert torch.equal(sym, qops.matmul_nbits(x, packed_w, s, 48, 6, 4, 16, eights))
    w = q.to(torch.float32) * s.reshape(6, 3).repeat_interleave(16, 1)
    assert torch.equal(sym, x @ w.t())


def test_affine_float_zero_point_ops_match_the_formula():
    from fxopt.passes import _fakequant as fq
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 8, generator=g) + 0.5
    w[1, 4:] = 2.0                                              # a constant group
    s, z = fq.grouped_affine_qparams(w, 4)
    q = qops.quantize_affine(w, s, z, 4, 15)
    for r in range(3):
        for b in range(2):
            grp = w[r, 4 * b:4 * b + 4]
            lo, hi = float(grp.min()), float(grp.max())
            sc = max((hi - lo) / 15, 1e-12)
            assert float(s[r, b]) == pytest.approx(sc, rel=1e-6) and float(z[r, b]) == pytest.approx(-lo / sc, rel=1e-6)
            want = torch.clamp(torch.round(grp / s[r, b] + z[r, b]), 0, 15)
            assert torch.equal(q[r, 4 * b:4 * b + 4].to(torch.float32), want)
    wd = qops.dequantize_affine(q, s, z, 4)
    assert torch.allclose(wd, fq.weight_grouped_affine(w, 4), atol=1e-6)
    # both ends of every group are exact grid points; the constant group comes back as itself
    ends = torch.stack([w.view(3, 2, 4).amin(-1), w.view(3, 2, 4).amax(-1)])
    got = torch.stack([wd.view(3, 2, 4).amin(-1), wd.view(3, 2, 4).amax(-1)])
    assert torch.allclose(got, ends, atol=1e-5)
    assert torch.allclose(wd[1, 4:], torch.full((4,), 2.0), atol=1e-5)
