import pytest
import torch

import fxopt
from fxopt import models
from fxopt.passes.smoothquant import SmoothQuant, smoothing_scale
from tests.helpers import max_abs, outputs


def _calib(lm, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 100, (2, 16), generator=g)        # the example shape: static capture
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_scale_formula():
    x = torch.tensor([2.0, 100.0, 0.0])
    w = torch.tensor([1.0, 1.0, 4.0])
    s = smoothing_scale(x, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2 ** 0.5, 10.0]))
    assert s[2] == 1.0                                # a channel that never fired keeps s = 1
    assert torch.allclose(smoothing_scale(x, w, 1.0)[:2], x[:2])


@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-tiny", "llama-tiny"])
def test_folding_is_exact_and_flattens_outliers(name):
    lm = models.hf_tiny(name, layers=2)
    res = fxopt.optimize(lm.model, "smoothquant{alpha=0.8}", lm.example_inputs, calibration=_calib(lm))
    rec = res.records[-1]
    assert rec.modified and rec.drift_rel < 1e-5                  # the manager also checked exactness
    for g, st in rec.stats["groups"].items():
        before, after = st["outlier_ratio"]
        assert after <= before + 1e-6, g


def test_llama_groups_from_the_graph():
    lm = models.hf_tiny("llama-tiny", layers=2)
    res = fxopt.optimize(lm.model, "smoothquant", lm.example_inputs, calibration=_calib(lm))
    rec = res.records[-1]
    groups = set(rec.stats["groups"])
    assert {"norm:model.layers.0.input_layernorm", "norm:model.layers.0.post_attention_layernorm",
            "linear:model.layers.0.mlp.up_proj", "linear:model.layers.1.mlp.up_proj"} <= groups
    assert not any("gate_proj" in g for g in groups)               # silu(gate) is not linear in gate
    assert any("model.norm" in n and "shared with another use" in n for n in rec.notes)   # tied lm_head
    # the tied weight was not touched
    assert torch.equal(res.module.get_parameter("lm_head.weight"), lm.model.lm_head.weight)


def test_value_output_pairs_in_mha_and_compensated_residual():
    lm = models.hf_tiny("bert-tiny", layers=1)
    res = fxopt.optimize(lm.model, "smoothquant", lm.example_inputs, calibration=_calib(lm))
    groups = res.records[-1].stats["groups"]
    assert "v-o:encoder.layer.0.attention.self.value" in groups
    # BERT's post-LN output also feeds the residual: an explicit x·s compensates it
    muls = [n for n in res.module.graph.nodes if n.meta.get("fxopt_provenance") == "smoothquant"]
    assert muls and all(n.target is torch.ops.aten.mul.Tensor for n in muls)


def test_alpha_search_picks_a_better_alpha_than_half(minilm):
    from tests.helpers import hamlet_lines
    tok = minilm.tokenizer
    calib = [dict(tok(hamlet_lines(40)[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 32, 8)]
    res = fxopt.optimize(minilm.model, "smoothquant{alpha=auto}", minilm.example_inputs, calibration=calib)
    stats = res.records[-1].stats["groups"]
    assert len(stats) == 18                         # 12 LayerNorm groups + 6 V→O pairs
    for st in stats.values():
        assert st["search_error"]["best"] <= st["search_error"]["at_0.5"]
    assert res.records[-1].drift_rel < 1e-5


def test_nothing_to_smooth_is_a_note():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    res = fxopt.optimize(m, "smoothquant", (x,), calibration=[(x,)])
    rec = res.records[-1]
    assert rec.status == "not-applicable" and "no norm" in rec.notes[0]


def test_options_are_validated():
    with pytest.raises(ValueError, match="alpha must be"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(ValueError, match="alpha must be"):
        SmoothQuant(alpha="best")
    with pytest.raises(ValueError, match="key=alpha"):
        SmoothQuant(overrides=("down_proj",))


def test_overrides_and_exclude():
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "smoothquant{overrides=down_proj=0.9,exclude=q_proj}", lm.example_inputs,
                         calibration=_calib(lm))
    rec = res.records[-1]
    assert rec.stats["groups"]["linear:model.layers.0.mlp.up_proj"]["alpha"] == 0.9
    assert any("input_layernorm: excluded" in n for n in rec.notes)
    assert max_abs(outputs(res.module, lm.example_inputs)[0], outputs(lm.model, lm.example_inputs, use_cache=False)[0]) < 1e-4


def test_gqa_value_output_is_smoothed_with_tied_scales_and_search_is_reproducible():
    lm = models.hf_tiny("llama-tiny", layers=1)                  # 4 query heads share 2 KV heads
    runs = [fxopt.optimize(lm.model, "smoothquant{alpha=auto}", lm.example_inputs, calibration=_calib(lm))
            for _ in range(2)]
    rec = runs[0].records[-1]
    assert "v-o:model.layers.0.self_attn.v_proj" in rec.stats["groups"]
    assert not any(n.startswith("V→O not smoothed") for n in rec.notes)
    assert rec.stats["groups"] == runs[1].records[-1].stats["groups"]
    # exact in float (the manager checked it too), and the O columns of query heads that read one
    # KV head were scaled alike: W_o' / W_o is one vector per KV channel, repeated for each query head
    assert max_abs(outputs(runs[0].module, lm.example_inputs)[0],
                   outputs(lm.model, lm.example_inputs, use_cache=False)[0]) < 1e-4
    wo = lm.model.model.layers[0].self_attn.o_proj.weight.detach()
    wo2 = fxopt.ir.graph.get_attr(runs[0].module, "model.layers.0.self_attn.o_proj.weight")
    ratio = (wo2 / wo)[0].reshape(2, 2, 16)                       # [kv head, query head in group, dim]
    assert torch.allclose(ratio[:, 0], ratio[:, 1], rtol=1e-5)
    assert not torch.allclose(ratio, torch.ones_like(ratio))


def test_gqa_value_output_found_in_dynamic_captures():
    # dynamic captures keep HF's x[:, :, None] as no-op slices on the way from V to attention
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "smoothquant{alpha=0.5}", lm.example_inputs, calibration=_calib(lm), dynamic=True)
    assert "v-o:model.layers.0.self_attn.v_proj" in res.records[-1].stats["groups"]
