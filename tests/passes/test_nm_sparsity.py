"""nm-sparsity: the mask on a hand-made weight, N:M validity on real graphs, stats, skips, options."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import capture, get_attr
from fxopt.ir.meta import NM_MASK
from fxopt.ir.structure import linears
from fxopt.passes import format_pipeline, parse_pipeline
from fxopt.passes.nm_sparsity import NMSparsity, is_nm_sparse, nm_mask
from tests.helpers import max_abs, outputs


def _masked(gm):
    return [(li, NM_MASK.get(li.node)) for li in linears(gm) if NM_MASK.get(li.node) is not None]


def test_mask_on_a_hand_made_weight():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, -4.0, 0.0, 1.0],
                      [-2.0, 0.5, -0.4, 3.0, 0.01, 0.02, -0.03, 0.04]])
    expected = torch.tensor([[False, True, True, False, True, True, False, False],
                             [True, False, False, True, False, False, True, True]])
    assert torch.equal(nm_mask(w, 2, 4), expected)
    assert torch.equal(nm_mask(w, 1, 4), torch.tensor([[False, True, False, False, True, False, False, False],
                                                       [False, False, False, True, False, False, False, True]]))
    assert torch.equal(nm_mask(w, 4, 8).sum(1), torch.tensor([4, 4]))
    assert is_nm_sparse(w * expected, 2, 4) and not is_nm_sparse(w, 2, 4)
    assert not is_nm_sparse(torch.zeros(2, 6), 2, 4)            # 6 columns: not groups of 4


class Two(torch.nn.Module):
    def __init__(self, a=8, b=8, c=4):
        super().__init__()
        self.fc1 = torch.nn.Linear(a, b)
        self.fc2 = torch.nn.Linear(b, c)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_masks_weights_and_records_meta():
    torch.manual_seed(0)
    m = Two().eval()
    x = torch.randn(3, 8)
    gm = capture(m, (x,))
    w1 = get_attr(gm, "fc1.weight").detach().clone()
    res = NMSparsity()(gm)
    assert res.modified and res.stats["masked"] == 2 and res.stats["skipped"] == 0
    new = get_attr(gm, "fc1.weight")
    assert torch.equal(new, w1 * nm_mask(w1, 2, 4))
    assert isinstance(new, torch.nn.Parameter)
    mk = NM_MASK.get(next(li.node for li in linears(gm) if li.weight == "fc1.weight"))
    assert (mk.n, mk.m, mk.weight) == (2, 4, "fc1.weight")
    assert mk.kept_magnitude == pytest.approx(float(new.abs().double().sum()))
    assert mk.total_magnitude == pytest.approx(float(w1.abs().double().sum()))
    # the graph computes with the masked weights
    ref = torch.relu(x @ new.t() + m.fc1.bias) @ get_attr(gm, "fc2.weight").t() + m.fc2.bias
    assert max_abs(gm(x), ref) < 1e-6
    assert not NMSparsity()(gm).modified                          # idempotent: fixed point
    assert "dense float" in res.notes[-1] and "ONNX Runtime" in res.notes[-1]


@pytest.mark.parametrize("name", ["tiny-gpt", "bert-tiny", "llama-tiny"])
def test_every_masked_layer_is_2_4(name):
    lm = models.tiny_gpt() if name == "tiny-gpt" else models.hf_tiny(name, layers=2)
    res = fxopt.optimize(lm.model, "nm-sparsity", lm.example_inputs)
    rec = res.records[-1]
    masked = _masked(res.module)
    assert rec.status == "ran" and len(masked) == rec.stats["masked"] > 0
    for li, mk in masked:
        assert is_nm_sparse(get_attr(res.module, li.weight), 2, 4), li.path
        assert rec.stats["kept_magnitude"][li.path] == pytest.approx(mk.kept_magnitude / mk.total_magnitude, abs=1e-6)
    total = sum(mk.kept_magnitude for _, mk in masked) / sum(mk.total_magnitude for _, mk in masked)
    assert rec.stats["kept_magnitude_total"] == pytest.approx(total, abs=1e-6)
    assert 0.5 < rec.stats["kept_magnitude_total"] < 1.0
    assert rec.drift_max is not None and rec.drift_max > 0       # lossy


@pytest.mark.parametrize("n, m", [(1, 4), (4, 8)])
def test_other_patterns(tiny_gpt, n, m):
    res = fxopt.optimize(tiny_gpt.model, f"nm-sparsity{{n={n},m={m}}}", tiny_gpt.example_inputs)
    masked = _masked(res.module)
    assert len(masked) == 8
    for li, mk in masked:
        w = get_attr(res.module, li.weight)
        assert (mk.n, mk.m) == (n, m) and is_nm_sparse(w, n, m)
        assert float((w != 0).double().mean()) == pytest.approx(n / m, abs=0.01)


def test_kept_magnitude_matches_a_direct_computation():
    torch.manual_seed(1)
    m = Two(16, 8, 4).eval()
    w = m.fc1.weight.detach().clone()
    res = fxopt.optimize(m, "nm-sparsity{include=fc1}", (torch.randn(2, 16),))
    a = w.abs().double()
    top2 = a.reshape(8, 4, 4).topk(2, dim=-1).values.sum()
    assert res.records[-1].stats["kept_magnitude"] == {"fc1": pytest.approx(float(top2 / a.sum()), abs=1e-6)}
    assert res.records[-1].stats["masked"] == 1
    assert torch.equal(res.module.fc2.weight, m.fc2.weight)       # not included: untouched


def test_non_multiple_in_features_skipped_with_a_note():
    m = Two(6, 8, 4).eval()                                       # fc1 has 6 inputs
    res = fxopt.optimize(m, "nm-sparsity", (torch.randn(2, 6),))
    rec = res.records[-1]
    assert rec.stats["masked"] == 1 and rec.stats["skipped"] == 1
    assert any(n.startswith("fc1:") and "not a multiple of m=4" in n for n in rec.notes)
    assert torch.equal(res.module.fc1.weight, m.fc1.weight)


def test_tied_lm_head_skipped_with_a_note():
    lm = models.hf_tiny("llama-tiny", layers=2)
    res = fxopt.optimize(lm.model, "nm-sparsity", lm.example_inputs)
    rec = res.records[-1]
    assert any(n.startswith("lm_head:") and "tied" in n for n in rec.notes)
    assert "lm_head" not in rec.stats["kept_magnitude"]
    assert torch.equal(get_attr(res.module, "lm_head.weight"), lm.model.lm_head.weight)


def test_exclude_pattern(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "nm-sparsity{exclude=*.fc2}", tiny_gpt.example_inputs)
    rec = res.records[-1]
    assert rec.stats["masked"] == 6
    assert sum("excluded" in n for n in rec.notes) == 2


def test_option_errors():
    for kw, msg in [(dict(n=0), "0 < n < m"), (dict(n=4, m=4), "0 < n < m"), (dict(n=5, m=4), "0 < n < m"),
                    (dict(n=2, m=32), "m must be between 2 and 16"), (dict(n=1, m=1), "m must be between"),
                    (dict(n=2.0), "integers")]:
        with pytest.raises(ValueError, match=msg):
            NMSparsity(**kw)
    with pytest.raises(Exception, match="0 < n < m"):
        fxopt.optimize(Two(), "nm-sparsity{n=4,m=4}", (torch.randn(1, 8),))
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, 6), 2, 4)


def test_pipeline_text_round_trip():
    passes = parse_pipeline("nm-sparsity{n=1,m=4}")
    assert isinstance(passes[0], NMSparsity) and (passes[0].n, passes[0].m) == (1, 4)
    assert format_pipeline(passes) == "nm-sparsity{n=1}"                # m=4 is the default: not shown
    assert parse_pipeline(format_pipeline(passes)) == passes
    assert format_pipeline(parse_pipeline("nm-sparsity{n=4,m=8}")) == "nm-sparsity{n=4,m=8}"
    assert format_pipeline(parse_pipeline("nm-sparsity")) == "nm-sparsity"
    assert parse_pipeline(format_pipeline(parse_pipeline("nm-sparsity{include=blocks.0.*|head,skip_shared=false}"))
                          )[0] == NMSparsity(include=("blocks.0.*", "head"), skip_shared=False)


def test_optimize_never_mutates_the_callers_model(tiny_gpt):
    before = {k: v.clone() for k, v in tiny_gpt.model.state_dict().items()}
    ref = outputs(tiny_gpt.model, tiny_gpt.example_inputs)[0]
    res = fxopt.optimize(tiny_gpt.model, "nm-sparsity{skip_shared=false}", tiny_gpt.example_inputs)
    assert res.records[-1].stats["masked"] == 9                   # the tied head too, on the copy
    for k, v in tiny_gpt.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert max_abs(outputs(tiny_gpt.model, tiny_gpt.example_inputs)[0], ref) == 0


def test_not_applicable_without_linears():
    res = fxopt.optimize(torch.nn.ReLU(), "nm-sparsity", (torch.randn(3),))
    assert res.records[-1].status == "not-applicable"


def test_onnx_export_keeps_dense_masked_weights(tiny_gpt, tmp_path):
    pytest.importorskip("onnxruntime")
    res = fxopt.optimize(tiny_gpt.model, "nm-sparsity", tiny_gpt.example_inputs)
    report = res.export_onnx(tmp_path / "m.onnx")
    assert report.verified
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(tmp_path / "m.onnx"))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) == 2]
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer if len(i.dims) == 2)
    # MatMul weights are stored transposed, [in, out], dense with their zeros
    sparse = [a for a in weights if (a == 0).mean() == 0.5 and is_nm_sparse(torch.from_numpy(a.copy()).t(), 2, 4)]
    assert len(sparse) == 8


class Spiky(torch.nn.Module):
    """fc2 reads 16 channels of which 2 carry activations ~40× the rest (an LLM's massive activations)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(16, 8, generator=g))
            self.fc2.weight.copy_(torch.randn(8, 16, generator=g))
        gain = torch.ones(16)
        gain[[1, 6]] = 40.0
        self.register_buffer("gain", gain)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) * self.gain)


def _spiky_data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g),) for _ in range(n)]


def test_wanda_score_masks_by_weight_times_input_rms_and_cuts_the_output_error():
    m = Spiky().eval()
    calib = _spiky_data()
    res_w = fxopt.optimize(m, "nm-sparsity{score=wanda}", calib[0], calibration=calib)
    res_m = fxopt.optimize(m, "nm-sparsity", calib[0])
    rec = res_w.records[-1]
    assert rec.status == "ran" and rec.stats["score"] == "wanda" and rec.stats["masked"] == 2
    # the mask is the N:M mask of |W| · rms(x), rms over all calibration rows of fc2's input
    h = torch.cat([torch.relu(m.fc1(x)) * m.gain for (x,) in calib])
    rms = h.double().pow(2).mean(0).sqrt().float()
    w2 = m.fc2.weight.detach()
    want = w2 * nm_mask(w2.abs() * rms, 2, 4)
    got = get_attr(res_w.module, "fc2.weight")
    assert torch.equal(got, want) and is_nm_sparse(got, 2, 4)
    assert not torch.equal(got, w2 * nm_mask(w2, 2, 4))           # the spikes change the choice
    kept_sq = (w2.abs() * rms).double().pow(2)
    assert rec.stats["kept_saliency_sq"]["fc2"] == pytest.approx(
        float(kept_sq[got != 0].sum() / kept_sq.sum()), abs=1e-6)
    # on held-out data the wanda mask's output error is far below magnitude's
    held = [x for (x,) in _spiky_data(4, seed=1)]
    err_w = sum(float((res_w.module(x) - m(x)).pow(2).mean()) for x in held)
    err_m = sum(float((res_m.module(x) - m(x)).pow(2).mean()) for x in held)
    assert err_w < 0.5 * err_m


def test_wanda_score_needs_calibration_and_a_known_score():
    m = Spiky().eval()
    x = _spiky_data(1)[0]
    with pytest.raises(fxopt.passes.PassError, match="calibration"):
        fxopt.optimize(m, "nm-sparsity{score=wanda}", x)
    with pytest.raises(ValueError, match="score must be one of magnitude, wanda"):
        NMSparsity(score="hessian")
    spec = parse_pipeline("nm-sparsity{score=wanda}")
    assert format_pipeline(spec) == "nm-sparsity{score=wanda}"
