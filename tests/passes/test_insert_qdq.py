import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import capture, qops
from fxopt.passes.insert_qdq import InsertQDQ
from tests.helpers import count, max_abs, outputs


class OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("target,qmax", [("avx512-vnni", 127), ("amx", 127), ("avx2", 64), ("portable", 64)])
def test_static_numerics_match_the_formula(target, qmax):
    m = OneLinear().eval()
    calib = [(torch.linspace(-1.0, 3.0, 16).reshape(2, 8),)]
    x = torch.randn(3, 8)
    res = fxopt.optimize(m, f"insert-qdq{{target={target}}}", (x,), calibration=calib)
    # activation: asymmetric uint8 over the calibrated range [-1, 3]
    s = 4.0 / 255
    z = round(1.0 / s)
    xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    w = m.fc.weight.detach()
    ws = w.abs().amax(1, keepdim=True) / qmax     # u8 activations: 7-bit weights where VPMADDUBSW saturates
    wq = torch.clamp(torch.round(w / ws), -qmax, qmax) * ws
    expected = xq @ wq.t() + m.fc.bias.detach()
    assert max_abs(res.module(x), expected) < 1e-5
    st = res.records[-1].stats
    assert st["quantized"] == 1 and st["scheme"] == "w8a8-static"
    assert st["target"] == target and st["u8s8_weight_qmax"] == qmax


def test_s8_activations_keep_full_range_weights_on_every_target():
    m = OneLinear().eval()
    x = torch.randn(3, 8)
    res = fxopt.optimize(m, "insert-qdq{target=avx2,symmetric=true}", (x,), calibration=[(x,)])
    q = [n for n in res.module.graph.nodes if n.target is qops.QUANTIZE and n.args[0].op == "get_attr"]
    assert [n.args[5:] for n in q] == [(-127, 127)]          # s8×s8 pairs stay within 2·127·127 < 32768
    assert res.records[-1].stats["u8s8_linears"] == 0


def test_unknown_target_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown int8 target 'avx3'.*portable"):
        InsertQDQ(target="avx3")


def test_one_activation_quantizer_per_value():
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "insert-qdq", lm.example_inputs, calibration=[lm.example_inputs])
    # q/k/v share one quantizer, gate/up another; o_proj, down_proj, lm_head one each
    assert count(res.module, qops.QUANTIZE) == 5 + 8
    assert count(res.module, qops.DEQUANTIZE) == 8 + 8


def test_static_on_tiny_gpt(tiny_gpt):
    (idx,) = tiny_gpt.example_inputs
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq{embeddings=false}", tiny_gpt.example_inputs, calibration=[(idx,)])
    gm = res.module
    n_lin = 2 * 4 + 1
    assert count(gm, qops.QUANTIZE) == n_lin + n_lin          # one per activation value + one per weight
    assert count(gm, qops.DEQUANTIZE) == 2 * n_lin           # one DQ per consumer and per weight
    assert res.records[-1].drift_rel < 0.05


@pytest.mark.parametrize("text, q_op, dq_op", [
    ("insert-qdq{scheme=w8a8-dynamic}", qops.QUANTIZE_PER_TOKEN, qops.DEQUANTIZE_PER_TOKEN),
    ("insert-qdq{scheme=w8a8-dynamic,granularity=tensor}", qops.DYNAMIC_QUANTIZE, qops.DEQUANTIZE),
])
def test_dynamic_schemes(tiny_gpt, text, q_op, dq_op):
    res = fxopt.optimize(tiny_gpt.model, text, tiny_gpt.example_inputs)
    assert count(res.module, q_op) == 9                       # per layer: ln1, attention out, ln2, gelu; ln_f
    assert count(res.module, dq_op) >= 9
    assert res.records[-1].drift_rel < 0.05


def test_per_token_matches_a_reference():
    m = OneLinear().eval()
    x = torch.randn(5, 8) * torch.arange(1, 6).reshape(5, 1)
    res = fxopt.optimize(m, "insert-qdq{scheme=w8a8-dynamic}", (x,))
    s = x.abs().amax(1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    w = m.fc.weight.detach()
    ws = w.abs().amax(1, keepdim=True) / 127
    expected = xq @ (torch.clamp(torch.round(w / ws), -127, 127) * ws).t() + m.fc.bias.detach()
    assert max_abs(res.module(x), expected) < 1e-5


def test_weight_only_schemes_leave_activations_float(tiny_gpt):
    r8 = fxopt.optimize(tiny_gpt.model, "insert-qdq{scheme=w8-weight-only,embeddings=false}", tiny_gpt.example_inputs)
    r4 = fxopt.optimize(tiny_gpt.model, "insert-qdq{scheme=w4-weight-only,group=32,embeddings=false}",
                        tiny_gpt.example_inputs)
    for r in (r8, r4):
        assert count(r.module, qops.QUANTIZE) == 9 and count(r.module, qops.DEQUANTIZE) == 9
    assert r8.records[-1].drift_rel < r4.records[-1].drift_rel < 0.2
    q4 = next(n for n in r4.module.graph.nodes if n.target is qops.QUANTIZE)
    assert q4.args[3:] == (1, 32, -8, 7)


def test_include_exclude_and_notes(tiny_gpt):
    (idx,) = tiny_gpt.example_inputs
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq{include=blocks.0.*,exclude=blocks.0.qkv}", tiny_gpt.example_inputs,
                         calibration=[(idx,)])
    assert res.records[-1].stats["quantized"] == 3
    assert "blocks.0.qkv: excluded by pattern, kept in float" in res.records[-1].notes


class TwoLinears(torch.nn.Module):
    """a → (× spike) → b: ``spike`` puts huge values into b's input (a whole token, or one element)."""

    def __init__(self, spike: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.register_buffer("spike", spike)

    def forward(self, x):
        return self.b(self.a(x) * self.spike)


def test_sensitive_layers_stay_float():
    m = TwoLinears(torch.tensor([1000.0] + [1.0] * 63).reshape(64, 1)).eval()   # one huge token into b
    x = torch.randn(64, 16)
    res = fxopt.optimize(m, "insert-qdq{max_error=0.01}", (x,), calibration=[(x,)])
    rec = res.records[-1]
    assert rec.stats["quantized"] == 1 and rec.stats["errors"]["b"] > 0.01 > rec.stats["errors"]["a"]
    assert any(n.startswith("b: simulated error") for n in rec.notes)


def test_w4_needs_a_multiple_of_the_group():
    m = torch.nn.Sequential(torch.nn.Linear(48, 8)).eval()
    res = fxopt.optimize(m, "insert-qdq{scheme=w4-weight-only,group=32}", (torch.randn(2, 48),))
    assert res.records[-1].status == "not-applicable"
    res = fxopt.optimize(torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval(),
                         "insert-qdq{scheme=w4-weight-only,group=32}", (torch.randn(2, 64),))
    rec = res.records[-1]
    assert rec.notes[0] == "quantized 1 of 2 eligible weights (94 % of their bytes)"
    assert "not a multiple of group=32" in rec.notes[1] and rec.stats["quantized"] == 1
    assert rec.stats["weights_touched"] == 1 and rec.stats["weights_eligible"] == 2


def test_options_and_preconditions(tiny_gpt):
    with pytest.raises(ValueError, match="scheme must be one of"):
        InsertQDQ(scheme="w8a16")
    with pytest.raises(ValueError, match="group must be"):
        InsertQDQ(scheme="w4-weight-only", group=100)
    with pytest.raises(fxopt.passes.PassFailedError, match="needs calibration data"):
        fxopt.optimize(tiny_gpt.model, "insert-qdq", tiny_gpt.example_inputs)
    with pytest.raises(fxopt.PassError, match="'insert-qdq' must run after 'smoothquant'"):
        fxopt.optimize(tiny_gpt.model, "insert-qdq,smoothquant", tiny_gpt.example_inputs)


def test_embedding_tables_are_stored_int8_per_row(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq{scheme=w8-weight-only},fuse-qdq", tiny_gpt.example_inputs)
    rec = res.records[1]
    assert rec.stats["embeddings"] == 2 and rec.stats["tied_embeddings"] == 1   # pos; tok reads the tied head's codes
    assert any("embedding tied to head: lookups read head's int8 codes" in n for n in rec.notes)
    assert not any("kept in float" in n for n in rec.notes)
    pos = next(n for n in res.module.graph.nodes if n.target is torch.ops.aten.embedding.default
               and n.args[0].op == "get_attr" and "pos" in n.args[0].target)
    from fxopt.ir import get_attr
    assert get_attr(res.module, pos.args[0].target).dtype == torch.int8
    assert res.records[-1].drift_rel < 0.02


def test_running_twice_does_not_quantize_its_own_tables(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq{scheme=w8-weight-only},insert-qdq{scheme=w8-weight-only}",
                         tiny_gpt.example_inputs)
    assert not res.records[2].modified and res.records[2].num_nodes == res.records[1].num_nodes


def test_outlier_inputs_fall_back_to_per_token():
    spike = torch.ones(64, 16)
    spike[0, 3] = 1000.0                    # one huge activation (an attention sink) into b
    m = TwoLinears(spike).eval()
    x = torch.randn(64, 16)
    plain = fxopt.optimize(m, "insert-qdq", (x,), calibration=[(x,)])
    res = fxopt.optimize(m, "insert-qdq{outliers=20}", (x,), calibration=[(x,)])
    rec = res.records[-1]
    assert rec.stats["per_token_fallback"] == 1 and any(n.startswith("b: input peak") for n in rec.notes)
    assert count(res.module, qops.QUANTIZE_PER_TOKEN) == 1
    ref = m(x)
    err = lambda out: float(((out - ref)[1:] ** 2).sum() / (ref[1:] ** 2).sum())   # noqa: E731
    assert err(res.module(x)) < 0.01 < err(plain.module(x))


@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-tiny", "llama-tiny"])
def test_attention_decomposition_is_exact_in_float(name):
    from fxopt.passes import _attention
    lm = models.hf_tiny(name, layers=2)
    gm = capture(lm.model, lm.example_inputs)
    ref = outputs(gm, lm.example_inputs)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _attention.SDPA]
    assert len(sdpa) == 2
    for n in sdpa:
        assert _attention.why_not(n) is None
        _attention.decompose(gm, n, "test")
    gm.graph.lint()
    gm.recompile()
    assert count(gm, _attention.SDPA) == 0 and count(gm, torch.ops.aten._softmax.default) == 2
    got = outputs(gm, lm.example_inputs)
    assert max_abs(got[0], ref[0]) <= 1e-5 * max(1.0, float(ref[0].abs().max()))


@pytest.mark.parametrize("scheme, fused", [("w8a8-static", {"QLinearMatMul", "MatMulIntegerToFloat"}),
                                           ("w8a8-dynamic,granularity=tensor", {"DynamicQuantizeMatMul"})])
def test_attention_matmuls_run_as_integer_kernels_in_ort(scheme, fused, tmp_path):
    from fxopt.backends import OrtBackend
    lm = models.hf_tiny("bert-tiny", layers=2)
    plain = fxopt.optimize(lm.model, f"insert-qdq{{scheme={scheme}}},fuse-qdq", lm.example_inputs,
                           calibration=[lm.example_inputs])
    att = fxopt.optimize(lm.model, f"insert-qdq{{scheme={scheme},attention=true}},fuse-qdq", lm.example_inputs,
                         calibration=[lm.example_inputs])
    assert att.records[1].stats["attention_matmuls"] == 4
    ops_plain = OrtBackend(plain.export_onnx(tmp_path / "p.onnx").path).optimized_op_types()
    rep = att.export_onnx(tmp_path / "a.onnx")
    assert rep.verified and rep.min_cos > 0.999                  # ORT computes what the fxopt graph says
    ops = OrtBackend(rep.path).optimized_op_types()
    assert sum(ops.get(k, 0) for k in fused) - sum(ops_plain.get(k, 0) for k in fused) == 4, (ops, ops_plain)
    # quantized attention stays close to the float-attention quantized model (error budget: 5 % of the output scale)
    ref = outputs(plain.module, lm.example_inputs)[0]
    got = outputs(att.module, lm.example_inputs)[0]
    assert max_abs(got, ref) < 0.05 * float(ref.abs().max())


def test_attention_option_without_attention_says_so():
    gm_free = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    res = fxopt.optimize(gm_free, "insert-qdq{attention=true}", (x,), calibration=[(x,)])
    assert any("no scaled_dot_product_attention" in n for n in res.records[-1].notes)
    assert res.records[-1].stats["attention_matmuls"] == 0 and res.records[-1].stats["quantized"] == 2


def test_attention_option_is_ignored_for_weight_only():
    lm = models.hf_tiny("bert-tiny", layers=1)
    res = fxopt.optimize(lm.model, "insert-qdq{scheme=w8-weight-only,attention=true}", lm.example_inputs)
    assert any("attention=true ignored" in n for n in res.records[-1].notes)
    assert res.records[-1].stats["attention_matmuls"] == 0


def test_attention_decomposition_keeps_fully_masked_rows_zero():
    from fxopt.passes import _attention

    class M(torch.nn.Module):
        def forward(self, q, k, v, m):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    q, k, v = (torch.randn(2, 3, 4, 8) for _ in range(3))
    m = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    m[0, 0, 1] = False                                    # query 1 of batch 0 sees no key
    m[1, 0, 2, :2] = False
    gm = capture(M(), (q, k, v, m))
    for n in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _attention.SDPA]:
        _attention.decompose(gm, n, "test")
    gm.recompile()
    ref = M()(q, k, v, m)
    got = outputs(gm, (q, k, v, m))[0]
    assert bool(torch.isfinite(got).all()) and bool((got[0, :, 1] == 0).all())
    assert max_abs(got, ref) < 1e-5


class ShiftedLinear(torch.nn.Module):
    """Linear(32, 6) whose weights are off-centre (mean 0.05, std 0.03), with a constant and a zero group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(32, 6)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(6, 32) * 0.03 + 0.05)
            self.fc.weight[0, :16] = 0.3
            self.fc.weight[1, 16:] = 0.0

    def forward(self, x):
        return self.fc(x)


def test_asymmetric_w4_matches_the_formula():
    from tests.ir.test_qops import _asym_reference
    m = ShiftedLinear().eval()
    x = torch.randn(3, 32)
    res = fxopt.optimize(m, "insert-qdq{scheme=w4-weight-only,group=16,weight_symmetric=false}", (x,))
    assert res.records[-1].stats["quantized"] == 1
    q = next(n for n in res.module.graph.nodes if n.target is qops.QUANTIZE)
    assert q.args[3:] == (1, 16, 0, 15)                               # uint4 range, groups of 16 along K
    from fxopt.ir.graph import get_attr
    s, z = (get_attr(res.module, a.target) for a in q.args[1:3])
    s_ref, z_ref, q_ref, w_hat_ref = _asym_reference(m.fc.weight.detach(), 16)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref) and z.dtype == torch.uint8
    expected = torch.nn.functional.linear(x, w_hat_ref, m.fc.bias.detach())
    assert max_abs(res.module(x), expected) == 0.0
    text = "insert-qdq{scheme=w4-weight-only,group=16,weight_symmetric=false}"     # round-trips as pipeline text
    (p,) = fxopt.passes.pipeline.resolve(text)
    assert p.weight_symmetric is False and fxopt.passes.pipeline.format_pass(p) == text


def test_asymmetric_w4_beats_symmetric_on_shifted_weights_and_max_error_uses_it():
    from fxopt.passes import _fakequant as fq
    m = ShiftedLinear().eval()
    torch.manual_seed(1)
    x = torch.randn(64, 32)
    w = m.fc.weight.detach()
    errs = {}
    for sym in ("true", "false"):
        res = fxopt.optimize(m, f"insert-qdq{{scheme=w4-weight-only,group=16,weight_symmetric={sym},max_error=1}}",
                             (x,), calibration=[(x,)])
        errs[sym] = res.records[-1].stats["errors"]["fc"]
        # the sensitivity check simulates the quantizer the graph holds: its error is the graph's error
        wq = fq.weight_grouped(w, 16) if sym == "true" else fq.weight_grouped_asym(w, 16)
        assert errs[sym] == round(fq.relative_error(x @ wq.t(), x @ w.t()), 6)
        got = res.module(x) - m.fc.bias.detach()
        assert abs(fq.relative_error(got, x @ w.t()) - errs[sym]) < 1e-5
    assert errs["false"] < 0.5 * errs["true"], errs
    assert float((fq.weight_grouped_asym(w, 16) - w).norm()) < float((fq.weight_grouped(w, 16) - w).norm())


def test_weight_symmetric_false_is_refused_outside_w4():
    for scheme in ("w8a8-static", "w8a8-dynamic", "w8-weight-only"):
        with pytest.raises(ValueError, match=f"weight_symmetric=false is supported with scheme=w4-weight-only only, "
                                             f"not {scheme}: .*symmetric weights"):
            InsertQDQ(scheme=scheme, weight_symmetric=False)
    with pytest.raises(fxopt.PassError, match="weight_symmetric=false is supported with scheme=w4-weight-only only"):
        fxopt.passes.pipeline.resolve("insert-qdq{scheme=w8-weight-only,weight_symmetric=false}")
    with pytest.raises(fxopt.PassError, match="must be true or false"):
        fxopt.passes.pipeline.resolve("insert-qdq{scheme=w4-weight-only,weight_symmetric=maybe}")
    InsertQDQ(scheme="w4-weight-only", weight_symmetric=False)             # the supported combination
