"""permute-channels: exact on each architecture and the real MiniLM, more magnitude kept by the N:M
mask that follows, stats and meta, refusals, order, fixed point, options."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import capture, get_attr
from fxopt.ir.coupling import coupled_groups
from fxopt.ir.graph import clone
from fxopt.ir.meta import NM_MASK, PERMUTATION
from fxopt.ir.structure import linears
from fxopt.passes import NotApplicable, PassContext, PassError, PassFailedError, format_pipeline, parse_pipeline
from fxopt.passes._permutation_search import kept_magnitude
from fxopt.passes.nm_sparsity import NMSparsity, is_nm_sparse, nm_mask
from fxopt.passes.permute_channels import PermuteChannels
from tests.helpers import max_abs, outputs

FAST = "permute-channels{time_budget=0.05}"


def _load(name):
    return models.tiny_gpt() if name == "tiny-gpt" else models.hf_tiny(name, layers=2)


# name: (ffn groups, value-output groups) searched in 2 layers
SEARCHED = {"bert-tiny": (2, 2), "gpt2-tiny": (2, 2), "llama-tiny": (2, 2), "mixtral-tiny": (0, 2), "tiny-gpt": (2, 2)}


@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-tiny", "llama-tiny", "mixtral-tiny"])
def test_exact_and_keeps_more_on_hf_architectures(name):
    lm = _load(name)
    if name in ("llama-tiny", "mixtral-tiny"):
        assert lm.model.config.num_key_value_heads < lm.model.config.num_attention_heads    # GQA + RoPE
    ref = outputs(lm.model, lm.example_inputs)[0]
    res = fxopt.optimize(lm.model, FAST, lm.example_inputs)                 # the manager checks exactness
    rec = res.records[-1]
    assert rec.status == "ran" and rec.modified
    assert max_abs(outputs(res.module, lm.example_inputs)[0], ref) < 1e-5 * max(1.0, float(ref.abs().max()))
    ffn, vo = SEARCHED[name]
    kinds = sorted(g["kind"] for g in rec.stats["groups"].values())
    assert kinds == ["ffn"] * ffn + ["value-output"] * vo
    assert rec.stats["query_key_left"] == 2 and any("query-key groups left" in n for n in rec.notes)
    for g in rec.stats["groups"].values():
        assert g["kept_before"] <= g["kept_after"] <= g["bound"] < 1
        assert g["gap_closed"] == pytest.approx((g["kept_after"] - g["kept_before"]) / (g["bound"] - g["kept_before"]),
                                                abs=2e-4)
    assert rec.stats["kept_magnitude_after"] > rec.stats["kept_magnitude_before"]


def test_stats_match_the_mask_and_meta_records_the_permutation():
    lm = _load("bert-tiny")
    gm = capture(lm.model, lm.example_inputs)
    fc1 = "encoder.layer.0.intermediate.dense"
    w1 = get_attr(gm, f"{fc1}.weight").detach().clone()
    w2 = get_attr(gm, "encoder.layer.0.output.dense.weight").detach().clone()
    res = PermuteChannels(time_budget=0.05)(gm)
    st = res.stats["groups"][fc1]
    # the permutation recorded on both linears is what moved fc1's rows and fc2's columns
    nodes = {li.path: li.node for li in linears(gm)}
    rec = PERMUTATION.get(nodes[fc1])
    assert torch.equal(PERMUTATION.get(nodes["encoder.layer.0.output.dense"]).perm, rec.perm)
    assert torch.equal(rec.perm.sort().values, torch.arange(128)) and not torch.equal(rec.perm, torch.arange(128))
    assert torch.equal(get_attr(gm, f"{fc1}.weight"), w1[rec.perm])
    assert torch.equal(get_attr(gm, "encoder.layer.0.output.dense.weight"), w2[:, rec.perm])
    assert f"{fc1}.bias[dim 0]" in rec.members and "encoder.layer.0.output.dense.weight[dim 1]" in rec.members
    # the reported fractions are the N:M kept magnitude of fc2 before/after, computed directly
    total = float(w2.abs().double().sum())
    assert st["kept_before"] == pytest.approx(kept_magnitude(w2.abs(), 2, 4) / total, abs=1e-6)
    assert st["kept_after"] == pytest.approx(kept_magnitude(w2[:, rec.perm].abs(), 2, 4) / total, abs=1e-6)
    # value-output: block-diagonal, per head of 16
    vo = PERMUTATION.get(nodes["encoder.layer.0.attention.self.value"]).perm
    assert torch.equal(vo.view(4, 16) // 16, torch.arange(4)[:, None].expand(4, 16))


def test_pipeline_masks_are_n_m_and_keep_more_than_plain_masking():
    lm = _load("llama-tiny")
    plain = fxopt.optimize(lm.model, "nm-sparsity{n=2,m=4}", lm.example_inputs).records[-1].stats["kept_magnitude"]
    res = fxopt.optimize(lm.model, "permute-channels{n=2,m=4,time_budget=0.05},nm-sparsity{n=2,m=4}",
                         lm.example_inputs)
    perm, sparse = res.records[1], res.records[2]
    masked = [li for li in linears(res.module) if NM_MASK.has(li.node)]
    assert len(masked) == sparse.stats["masked"] == 14
    assert all(is_nm_sparse(get_attr(res.module, li.weight), 2, 4) for li in masked)
    kept = sparse.stats["kept_magnitude"]
    consumers = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    for path, frac in kept.items():
        if path in consumers:
            assert frac > plain[path]
        else:
            assert frac == plain[path]                       # producers' rows moved: same mask magnitude
    # the permutation pass predicted what the mask keeps for its consumers
    down = perm.stats["groups"]["model.layers.0.mlp.gate_proj"]
    assert kept["model.layers.0.mlp.down_proj"] == pytest.approx(down["kept_after"], abs=1e-6)


def test_real_minilm_exact_and_more_magnitude_kept(minilm):
    ref = outputs(minilm.model, minilm.example_inputs)[0]
    plain = {}                                                  # 2:4 without permutation, from the model itself
    for path, mod in minilm.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach().abs()
            plain[path] = (float(w[nm_mask(w, 2, 4)].double().sum()), float(w.double().sum()))
    gm = capture(minilm.model, minilm.example_inputs)
    perm = PermuteChannels(n=2, m=4, time_budget=0.2)(gm).stats
    assert max_abs(outputs(gm, minilm.example_inputs)[0], ref) < 1e-4          # exact before masking
    assert perm["searched"] == perm["permuted"] == 12                    # 6 FFNs + 6 V→O (12 heads each)
    assert perm["query_key_left"] == 6 and perm["skipped"] == 13         # 12 residual-stream groups + pooler
    sparse = NMSparsity(n=2, m=4)(gm).stats
    assert sparse["masked"] == 37 == len(plain)
    assert all(is_nm_sparse(get_attr(gm, li.weight), 2, 4) for li in linears(gm) if NM_MASK.has(li.node))
    for path, frac in sparse["kept_magnitude"].items():
        assert frac >= round(plain[path][0] / plain[path][1], 6) - 1e-6, path
    with_perm = sparse["kept_magnitude_total"]
    without = sum(k for k, _ in plain.values()) / sum(t for _, t in plain.values())
    assert with_perm > without + 1e-3
    # the searched groups' share of the gap closed is real progress, the consumers gained what was reported
    assert 0.05 < perm["gap_closed"] < 1
    down = perm["groups"]["encoder.layer.0.intermediate.dense"]
    assert sparse["kept_magnitude"]["encoder.layer.0.output.dense"] == pytest.approx(down["kept_after"], abs=1e-6)


def test_never_writes_the_callers_tensors():
    lm = _load("tiny-gpt")
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    gm = capture(lm.model, lm.example_inputs)
    res = PermuteChannels(time_budget=0.05)(gm)
    assert res.modified and res.stats["permuted"] == 4
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_second_run_is_a_fixed_point():
    lm = _load("tiny-gpt")
    res = fxopt.optimize(lm.model, f"{FAST},{FAST}", lm.example_inputs)
    assert [r.modified for r in res.records[1:]] == [True, False]
    assert res.records[2].stats["permuted"] == 0
    assert sum("already permuted" in n for n in res.records[2].notes) == 4


def test_refusals_are_notes_naming_the_group():
    lm = _load("bert-tiny")
    gm = capture(lm.model, lm.example_inputs)
    res = PermuteChannels(n=4, m=16, time_budget=0.05)(clone(gm))
    # head dim 16 = one group of 16: V→O has nothing to reorder; the FFN (128 channels) is searched
    assert sorted(g["kind"] for g in res.stats["groups"].values()) == ["ffn", "ffn"]
    assert any("value-output group of encoder.layer.0.attention.self.value" in n and "single group of 16" in n
               for n in res.notes)
    assert any(n.startswith("output channels of pooler.dense: not permuted") and "graph output" in n
               for n in res.notes)
    res = PermuteChannels(time_budget=0.05, exclude=("*.attention.*",))(clone(gm))
    assert sorted(g["kind"] for g in res.stats["groups"].values()) == ["ffn", "ffn"]
    assert any("excluded by pattern" in n for n in res.notes)
    res = PermuteChannels(time_budget=0.05, include=("encoder.layer.1.*",))(clone(gm))
    assert sorted(res.stats["groups"]) == ["encoder.layer.1.attention.self.value", "encoder.layer.1.intermediate.dense"]


def test_not_applicable_without_a_coupled_group():
    m, x = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    gm = capture(m, (x,))
    assert all(not g.permutable for g in coupled_groups(gm))
    with pytest.raises(NotApplicable, match="no producer"):
        PermuteChannels().requires(gm, PassContext())
    res = fxopt.optimize(m, "permute-channels", (x,))
    assert res.records[-1].status == "not-applicable" and not res.records[-1].modified


def test_refuses_to_run_after_masking():
    lm = _load("tiny-gpt")
    # in one pipeline the declared order is checked before the (slow) capture
    with pytest.raises(PassError, match="'nm-sparsity' must run after 'permute-channels'"):
        fxopt.optimize(lm.model, f"nm-sparsity,{FAST}", lm.example_inputs)
    # on a graph masked by an earlier optimize() call, the pass itself refuses
    masked = fxopt.optimize(lm.model, "nm-sparsity", lm.example_inputs)
    with pytest.raises(PassFailedError, match="Run permute-channels before nm-sparsity"):
        fxopt.optimize(masked.module, FAST, lm.example_inputs)


def test_options_round_trip_and_errors():
    text = "permute-channels{n=4,m=8,exclude=*.value|pooler,time_budget=0.5,seed=3,escapes=10}"
    (p,) = parse_pipeline(text)
    assert (p.n, p.m, p.exclude, p.time_budget, p.seed, p.escapes) == (4, 8, ("*.value", "pooler"), 0.5, 3, 10)
    assert parse_pipeline(format_pipeline([p])) == [p]
    assert format_pipeline(parse_pipeline("permute-channels{n=2,m=4}")) == "permute-channels"
    for bad in ("permute-channels{n=4,m=4}", "permute-channels{m=32}", "permute-channels{time_budget=0}",
                "permute-channels{escapes=-1}", "permute-channels{n=0}"):
        with pytest.raises(PassError, match="permute-channels: "):
            parse_pipeline(bad)
    (p,) = parse_pipeline("permute-channels{time_budget=none}")
    assert p.time_budget is None and format_pipeline([p]) == "permute-channels{time_budget=None}"


def test_without_a_clock_the_search_is_reproducible():
    lm = _load("tiny-gpt")
    runs = []
    for _ in range(2):
        gm = capture(lm.model, lm.example_inputs)
        res = PermuteChannels(time_budget=None, escapes=20)(gm)
        runs.append((res.stats["gap_closed"], [PERMUTATION.get(n).perm for n in gm.graph.nodes if PERMUTATION.has(n)]))
    (gap_a, perms_a), (gap_b, perms_b) = runs
    assert gap_a == gap_b > 0 and len(perms_a) == len(perms_b) == 8          # 4 groups × (producer, consumer)
    assert all(torch.equal(a, b) for a, b in zip(perms_a, perms_b))
    assert res.notes[0].startswith("permuted 4 of 4 searched groups: 2:4 keeps")


def test_wanda_objective_is_exact_predicts_the_wanda_mask_and_cuts_the_output_error():
    from tests.passes.test_nm_sparsity import Spiky, _spiky_data
    m = Spiky().eval()
    calib = _spiky_data()
    pipe = "permute-channels{time_budget=none,score=wanda},nm-sparsity{score=wanda}"
    res = fxopt.optimize(m, pipe, calib[0], calibration=calib)            # the manager checks exactness of the permutation
    perm, sparse = res.records[1], res.records[2]
    assert perm.status == "ran" and perm.modified and perm.stats["objective"] == "Σ(|w|·rms(x))²"
    # the objective, by hand: fc2's columns scaled by its input RMS, squared
    h = torch.cat([torch.relu(m.fc1(x)) * m.gain for (x,) in calib])
    x2 = (m.fc2.weight.detach().abs() * h.double().pow(2).mean(0).sqrt().float()).pow(2)
    g = perm.stats["groups"]["fc1"]
    p = PERMUTATION.get(next(li.node for li in linears(res.module) if li.path == "fc2")).perm
    total = float(x2.double().sum())
    assert g["kept_before"] == pytest.approx(kept_magnitude(x2, 2, 4) / total, abs=1e-6)
    assert g["kept_after"] == pytest.approx(kept_magnitude(x2[:, p], 2, 4) / total, abs=1e-6)
    assert g["kept_after"] > g["kept_before"]
    # nm-sparsity{score=wanda} on the permuted graph keeps what the search counted as kept
    assert sparse.stats["kept_saliency_sq"]["fc2"] == pytest.approx(g["kept_after"], abs=1e-6)
    # and the permuted + masked model is closer to the original than the wanda mask alone, on held-out data
    plain = fxopt.optimize(m, "nm-sparsity{score=wanda}", calib[0], calibration=calib)
    held = [x for (x,) in _spiky_data(4, seed=1)]
    err_p = sum(float((res.module(x) - m(x)).pow(2).mean()) for x in held)
    err_0 = sum(float((plain.module(x) - m(x)).pow(2).mean()) for x in held)
    assert err_p < err_0


def test_wanda_objective_needs_calibration():
    from tests.passes.test_nm_sparsity import Spiky, _spiky_data
    with pytest.raises(PassError, match="calibration"):
        fxopt.optimize(Spiky().eval(), "permute-channels{score=wanda}", _spiky_data(1)[0])
    with pytest.raises(ValueError, match="score must be one of"):
        PermuteChannels(score="l2")


@pytest.mark.parametrize("name", ["llama-tiny", "mixtral-tiny"])
def test_dynamic_shape_capture_keeps_the_value_output_groups(name):
    """Dynamic captures write repeat_kv's ``x[:, :, None]`` with whole-dim slices around the unsqueeze;
    the V → O groups must still be found (and permuted exactly)."""
    lm = _load(name)
    ref = outputs(lm.model, lm.example_inputs)[0]
    res = fxopt.optimize(lm.model, FAST, lm.example_inputs, dynamic=True)
    rec = res.records[-1]
    assert rec.status == "ran" and rec.modified
    kinds = sorted(g["kind"] for g in rec.stats["groups"].values())
    assert kinds.count("value-output") == SEARCHED[name][1]
    assert any(n.target is torch.ops.aten.slice.Tensor for n in res.module.graph.nodes)   # the pattern was there
    assert max_abs(outputs(res.module, lm.example_inputs)[0], ref) < 1e-5 * max(1.0, float(ref.abs().max()))
