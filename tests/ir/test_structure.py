import dataclasses

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


# --------------------------------------------------------------------------- attention coupling (fxopt.ir.coupling)

from fxopt.ir.coupling import apply_permutation as apply_group, attentions, coupled_groups, permute_heads  # noqa: E402


def _allowed_permutation(group, gen):
    """A random permutation the group allows: per head (block-diagonal); with RoPE one pair
    permutation (i and i+d/2 together) shared by every head."""
    d = group.head_dim
    if group.rope:
        q = torch.randperm(d // 2, generator=gen)
        within = torch.cat([q, q + d // 2])
        return torch.cat([h * d + within for h in range(group.heads)])
    return torch.cat([h * d + torch.randperm(d, generator=gen) for h in range(group.heads)])


def _raw_permute(gm, group, perm):
    """Move the members' slices without any check or RoPE table fix (for the negative controls)."""
    for mb in group.members:
        old = get_attr(gm, mb.target).detach()
        new = old.clone()
        for r in range(mb.index.shape[0]):
            new.index_copy_(mb.dim, mb.index[r], old.index_select(mb.dim, mb.index[r][perm]))
        set_attr(gm, mb.target, new)


ARCH = {  # name: (attentions per layer, query heads, kv heads, rope, ffn producers of layer 0)
    "tiny-gpt": (4, 4, False, ["blocks.0.fc1"]),
    "gpt2-tiny": (4, 4, False, ["transformer.h.0.mlp.c_fc"]),
    "bert-tiny": (4, 4, False, ["encoder.layer.0.intermediate.dense"]),
    "llama-tiny": (4, 2, True, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]),
    "mixtral-tiny": (4, 2, True, []),
}


@pytest.mark.parametrize("name", list(ARCH))
def test_attention_groups_and_random_permutations_are_exact(name):
    heads, kv_heads, rope, ffn = ARCH[name]
    lm = models.tiny_gpt() if name == "tiny-gpt" else models.hf_tiny(name, layers=2)
    gm = capture(lm.model, lm.example_inputs)
    ref = outputs(gm, lm.example_inputs)[0]
    atts = attentions(gm)
    assert len(atts) == 2
    for a in atts:
        assert (a.heads, a.kv_heads) == (heads, kv_heads) and a.qk.permutable and a.vo.permutable
        assert bool(a.qk.rope) == rope and not a.vo.rope
        assert a.vo.head_dim == 16 and a.vo.channels == kv_heads * 16
        (o,) = [mb for mb in a.vo.members if mb.role == "columns"]
        assert o.index.shape == (heads // kv_heads, kv_heads * 16)          # GQA: one O block per query head
        q = [mb for mb in a.qk.members if mb.linear.path.endswith(("q_proj", "query"))]
        assert all(mb.index.shape[0] == heads // kv_heads for mb in q)
    groups = coupled_groups(gm)
    ok = [g for g in groups if g.permutable]
    if ffn:
        assert any(g.kind == "ffn" and _paths(g.producers) == ffn for g in ok)
    assert sorted(g.kind for g in ok) == sorted(["ffn"] * (2 if ffn else 0) + ["value-output", "query-key"] * 2)
    # every refused group says why; the residual stream is among them
    assert all(g.reasons for g in groups if not g.permutable)
    gen = torch.Generator().manual_seed(0)
    for g in ok:                                                            # all permutable groups at once
        apply_group(gm, g, _allowed_permutation(g, gen))
    gm.recompile()
    scale = float(ref.abs().max())
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-5 * max(1.0, scale)
    changed = max_abs(get_attr(gm, atts[0].vo.members[0].target), get_attr(capture(lm.model, lm.example_inputs),
                                                                            atts[0].vo.members[0].target))
    assert changed > 0                                                      # the weights really moved
    for a in attentions(gm):                                                # then whole heads, Q K V O together
        permute_heads(gm, a, torch.randperm(a.kv_heads, generator=gen))
    gm.recompile()
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-5 * max(1.0, scale)


def test_moves_the_coupling_forbids_change_the_outputs():
    """Negative controls: the constraints are real (these tests fail if the analysis were too lax)."""
    lm = models.hf_tiny("llama-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs)
    ref = outputs(gm, lm.example_inputs)[0]
    (a,) = attentions(gm)
    gen = torch.Generator().manual_seed(0)
    # V → O across heads
    across = torch.randperm(a.vo.channels, generator=gen)
    with pytest.raises(ValueError, match="across heads"):
        apply_group(gm, a.vo, across)
    g2 = capture(lm.model, lm.example_inputs)
    _raw_permute(g2, attentions(g2)[0].vo, across)
    g2.recompile()
    assert max_abs(outputs(g2, lm.example_inputs)[0], ref) > 1e-3
    # GQA: every query head's O block must follow its KV head (moving only the first copy changes the outputs)
    g4 = capture(lm.model, lm.example_inputs)
    vo = attentions(g4)[0].vo
    vo.members = [dataclasses.replace(mb, index=mb.index[:1]) if mb.role == "columns" else mb for mb in vo.members]
    _raw_permute(g4, vo, _allowed_permutation(vo, gen))
    g4.recompile()
    assert max_abs(outputs(g4, lm.example_inputs)[0], ref) > 1e-3
    # whole V heads without Q and K
    heads = torch.tensor([16 + j for j in range(16)] + list(range(16)))
    with pytest.raises(ValueError, match="permute_heads"):
        apply_group(gm, a.vo, heads)
    # RoPE: a within-head permutation that splits pairs is refused
    split_pairs = torch.cat([h * 16 + torch.tensor([1, 0] + list(range(2, 16))) for h in range(2)])
    with pytest.raises(ValueError, match="pairs"):
        apply_group(gm, a.qk, split_pairs)
    # RoPE: a pair permutation is exact only with the cos/sin tables re-indexed
    pairs = _allowed_permutation(a.qk, gen)
    g3 = capture(lm.model, lm.example_inputs)
    _raw_permute(g3, attentions(g3)[0].qk, pairs)
    g3.recompile()
    assert max_abs(outputs(g3, lm.example_inputs)[0], ref) > 1e-3
    apply_group(gm, a.qk, pairs)
    gm.recompile()
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-5
    assert sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.index_select.default) == 2
    apply_group(gm, a.qk, _allowed_permutation(a.qk, gen))                  # a second one composes
    (again,) = attentions(gm)                                               # and the graph is analysed again
    apply_group(gm, again.qk, _allowed_permutation(again.qk, gen))
    gm.recompile()
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-5
    assert sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.index_select.default) == 6


class _Attn(torch.nn.Module):
    """Multi-head attention with optional defects the analysis must refuse."""

    def __init__(self, d=32, heads=4, kv_heads=None, v_escapes=False, tie=False):
        super().__init__()
        self.h, self.kv, self.v_escapes = heads, kv_heads or heads, v_escapes
        kv_width = d // heads * self.kv
        self.q, self.o = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.k, self.v = torch.nn.Linear(d, kv_width), torch.nn.Linear(d, kv_width)
        if tie:
            self.o.weight = self.v.weight

    def forward(self, x):
        b, t, d = x.shape
        vx = self.v(x)
        q = self.q(x).view(b, t, self.h, d // self.h).transpose(1, 2)
        k, v = (z.view(b, t, self.kv, d // self.h).transpose(1, 2) for z in (self.k(x), vx))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv != self.h)
        y = self.o(a.transpose(1, 2).reshape(b, t, d))
        return y + vx if self.v_escapes else y                  # V's channels also reach the residual


def test_attention_refusals_name_the_reason():
    x = torch.randn(2, 5, 32)
    (a,) = attentions(capture(_Attn().eval(), (x,)))
    assert a.vo.permutable and a.qk.permutable and a.vo.producers[0].path == "v"
    (a,) = attentions(capture(_Attn(v_escapes=True).eval(), (x,)))
    assert not a.vo.permutable and a.qk.permutable
    assert any("at v)" in r and "read by 'add'" in r and "outside the attention" in r for r in a.vo.reasons)
    (a,) = attentions(capture(_Attn(tie=True).eval(), (x,)))
    assert any("shared with another use" in r for r in a.vo.reasons)
    with pytest.raises(ValueError, match="cannot be permuted"):
        apply_group(capture(_Attn(tie=True).eval(), (x,)), a.vo, torch.arange(32))


def test_sdpa_enable_gqa_groups_are_exact():
    torch.manual_seed(0)
    m, x = _Attn(d=32, heads=4, kv_heads=2).eval(), torch.randn(2, 5, 32)
    gm = capture(m, (x,))
    ref = outputs(gm, (x,))[0]
    (a,) = attentions(gm)
    assert (a.heads, a.kv_heads, a.rep) == (4, 2, 2) and a.vo.permutable and a.qk.permutable and not a.qk.rope
    gen = torch.Generator().manual_seed(1)
    for g in (a.qk, a.vo):
        apply_group(gm, g, _allowed_permutation(g, gen))
    permute_heads(gm, a, torch.tensor([1, 0]))
    gm.recompile()
    assert max_abs(outputs(gm, (x,))[0], ref) < 1e-5
    assert max_abs(get_attr(gm, "o.weight"), m.o.weight) > 0
