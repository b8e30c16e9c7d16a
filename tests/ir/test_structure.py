import pytest
import torch

from fxopt import models
from fxopt.ir import capture, get_attr, set_attr
from fxopt.ir.structure import channel_groups, linears, norm_groups, norms, shared_parameters
from tests.helpers import max_abs, outputs


def _paths(infos):
    return sorted(li.path for li in infos)


def apply_permutation(gm, group, perm):
    """Move the group's channels: producer rows (+bias, +params), consumer columns."""
    for li in group.producers:
        set_attr(gm, li.weight, get_attr(gm, li.weight)[perm].contiguous())
    for target, dim in group.params:
        set_attr(gm, target, get_attr(gm, target).index_select(dim, perm).contiguous())
    for li in group.consumers:
        set_attr(gm, li.weight, get_attr(gm, li.weight)[:, perm].contiguous())


def test_tiny_gpt_norm_groups(tiny_gpt):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    groups = {g.norm.path: g for g in norm_groups(gm)}
    assert set(groups) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_f"}
    assert _paths(groups["blocks.0.ln1"].linears) == ["blocks.0.qkv"] and groups["blocks.0.ln1"].only_linears
    assert _paths(groups["blocks.1.ln2"].linears) == ["blocks.1.fc1"]
    assert _paths(groups["ln_f"].linears) == ["head"]
    assert groups["ln_f"].norm.weight == "ln_f.weight" and groups["ln_f"].norm.kind == "layer_norm"


def test_bert_post_ln_norm_feeds_the_residual_too():
    lm = models.hf_tiny("bert-tiny", layers=2)
    gm = capture(lm.model, lm.example_inputs)
    g = {g.norm.path: g for g in norm_groups(gm)}["encoder.layer.0.output.LayerNorm"]
    assert _paths(g.linears) == ["encoder.layer.1.attention.self.key", "encoder.layer.1.attention.self.query",
                                 "encoder.layer.1.attention.self.value"]
    assert not g.only_linears and any(n.target is torch.ops.aten.add.Tensor for n in g.others)


def test_llama_rmsnorm_is_found_from_the_graph():
    lm = models.hf_tiny("llama-tiny", layers=2)
    gm = capture(lm.model, lm.example_inputs)
    found = norms(gm)
    assert len(found) == 5 and {n.kind for n in found} == {"rms_norm"}
    g = {g.norm.path: g for g in norm_groups(gm)}
    assert _paths(g["model.layers.0.input_layernorm"].linears) == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert g["model.layers.1.post_attention_layernorm"].only_linears
    assert _paths(g["model.layers.1.post_attention_layernorm"].linears) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_tied_embedding_is_reported_shared():
    lm = models.hf_tiny("llama-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs)
    shared = shared_parameters(gm)
    assert len(shared) == 1
    ops = sorted(str(u.target) for u in shared[0].users)
    assert ops == ["aten.embedding.default", "aten.linear.default"]
    tg = models.tiny_gpt()
    assert any("head.weight" in s.targets or "tok.weight" in s.targets
               for s in shared_parameters(capture(tg.model, tg.example_inputs)))


def test_untied_model_has_no_shared_parameters():
    lm = models.hf_tiny("bert-tiny", layers=1)
    assert shared_parameters(capture(lm.model, lm.example_inputs)) == []


@pytest.mark.parametrize("name, producers, consumers", [
    ("tiny-gpt", ["blocks.0.fc1"], ["blocks.0.fc2"]),
    ("gpt2-tiny", ["transformer.h.0.mlp.c_fc"], ["transformer.h.0.mlp.c_proj"]),
    ("bert-tiny", ["encoder.layer.0.intermediate.dense"], ["encoder.layer.0.output.dense"]),
    ("llama-tiny", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.down_proj"]),
])
def test_ffn_channel_groups_and_permutation_is_exact(name, producers, consumers):
    lm = models.tiny_gpt() if name == "tiny-gpt" else models.hf_tiny(name, layers=2)
    gm = capture(lm.model, lm.example_inputs)
    ref = outputs(gm, lm.example_inputs)[0]
    groups = channel_groups(gm)
    ok = [g for g in groups if g.permutable]
    assert any(_paths(g.producers) == producers and _paths(g.consumers) == consumers for g in ok)
    # every permutable group found must really be permutable: permute all of them at once
    torch.manual_seed(0)
    for g in ok:
        apply_permutation(gm, g, torch.randperm(g.channels))
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-4
    assert len(ok) == 2        # one FFN per layer; attention and residual groups escape


def test_escapes_name_the_reason(tiny_gpt):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    by_producer = {g.producers[0].path: g for g in channel_groups(gm)}
    proj = by_producer["blocks.0.proj"]
    assert not proj.permutable
    assert any("not computed from a linear of this group" in e or "flows into" in e for e in proj.escapes)
    head = by_producer["head"]
    assert any("graph output" in e for e in head.escapes)
    qkv = by_producer["blocks.0.qkv"]
    assert any("split" in e for e in qkv.escapes)


def test_linears_report_shapes(tiny_gpt):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    lin = {li.path: li for li in linears(gm)}
    assert (lin["blocks.0.fc1"].in_features, lin["blocks.0.fc1"].out_features) == (64, 256)
    assert lin["blocks.0.fc1"].bias == "blocks.0.fc1.bias" and lin["head"].bias is None


def test_gpt2_norms_reach_their_linears_through_views():
    lm = models.hf_tiny("gpt2-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs)
    g = {g.norm.path: g for g in norm_groups(gm)}
    assert _paths(g["transformer.h.0.ln_1"].linears) == ["transformer.h.0.attn.c_attn"]
    assert g["transformer.h.0.ln_2"].only_linears


def test_channel_group_reports_are_deterministic(tiny_gpt):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    first = [g.escapes for g in channel_groups(gm)]
    assert all([g.escapes for g in channel_groups(gm)] == first for _ in range(3))
