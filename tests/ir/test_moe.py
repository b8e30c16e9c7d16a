"""MoE recognition in captured graphs (HF Mixtral / Qwen2-MoE / OLMoE with batched_mm experts, fxopt's
MoELayer) and the rewrite into fxopt::moe."""
import pytest
import torch

from fxopt import models
from fxopt.ir import capture, moeops
from fxopt.ir.graph import ExampleInputs, call, flatten_tensors
from fxopt.ir.meta import MOE
from fxopt.ir.moe import find_moe_blocks, rewrite_to_op
from fxopt.nn import MoELayer
from tests.helpers import max_abs


@pytest.fixture(scope="module", params=["mixtral-tiny", "qwen2-moe-tiny", "olmoe-tiny"])
def hf_moe(request):
    torch.manual_seed(0)
    lm = models.hf_tiny(request.param, layers=2)
    return request.param, lm, capture(lm.model, lm.example_inputs)


EXPECTED = {   # (experts, top-k, renormalized top-k, shared expert)
    "mixtral-tiny": (4, 2, True, False),
    "qwen2-moe-tiny": (8, 2, False, True),
    "olmoe-tiny": (8, 2, False, False),
}


def test_recognizes_hf_blocks(hf_moe):
    name, lm, gm = hf_moe
    matches, notes = find_moe_blocks(gm, lm.example_inputs)
    assert notes == []
    e, k, norm, shared = EXPECTED[name]
    assert [m.block.name for m in matches] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for m in matches:
        b = m.block
        assert (b.num_experts, b.top_k, b.norm_topk, b.shared_expert is not None) == (e, k, norm, shared)
        assert b.gated and b.activation == "silu" and b.d_model == 64
        assert b.router.endswith("mlp.gate.weight")
        assert b.w_in.endswith("experts.gate_up_proj") and b.w_out.endswith("experts.down_proj")
    if shared:
        se = matches[0].block.shared_expert
        assert se.gate == "model.layers.0.mlp.shared_expert_gate.weight"
        assert len(se.weights) == 3


def test_rewrite_dropless_is_exact(hf_moe):
    name, lm, gm0 = hf_moe
    gm = capture(lm.model, lm.example_inputs)
    matches, _ = find_moe_blocks(gm, lm.example_inputs)
    n_before = len(gm.graph.nodes)
    for m in matches:
        node = rewrite_to_op(gm, m, capacity=[])
        assert MOE.get(node).name == m.block.name
    gm.graph.lint()
    gm.recompile()
    ops = [n for n in gm.graph.nodes if n.target is moeops.MOE_OP]
    assert len(ops) == 2 and len(gm.graph.nodes) < n_before
    assert not any(n.target is torch.ops.aten.topk.default for n in gm.graph.nodes)
    ex = ExampleInputs.of(lm.example_inputs)
    ref = flatten_tensors(call(gm0, ex))[0]
    got = flatten_tensors(call(gm, ex))[0]
    assert max_abs(got, ref) < 1e-5
    again, _ = find_moe_blocks(gm, lm.example_inputs)           # the op nodes are blocks too
    assert [m.op_node for m in again] == ops


def test_hf_default_grouped_experts_are_recognized_too():
    import transformers as tf
    cfg_cls, model_cls, kw, layers = models.TINY_CONFIGS["mixtral-tiny"]
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**dict(kw, num_hidden_layers=1))).eval()   # grouped_mm experts
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gm = capture(model, ex)
    (m,), notes = find_moe_blocks(gm, ex)
    assert notes == [] and m.block.source == "grouped" and m.block.name == "model.layers.0.mlp"
    rewrite_to_op(gm, m, capacity=[])
    gm.recompile()
    assert not any("grouped_mm" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert max_abs(gm(**ex).logits, model(**ex).logits) < 1e-5


def test_dynamic_capture_is_recognized():
    lm = models.hf_tiny("olmoe-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs, dynamic=True)
    matches, notes = find_moe_blocks(gm, lm.example_inputs)
    assert len(matches) == 1 and notes == []


class Net(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.moe = MoELayer(16, 24, 4, **kw)

    def forward(self, x):
        x = self.proj(x)
        return x + self.moe(x)


@pytest.mark.parametrize("kw,source", [(dict(top_k=1), "gathered"),
                                       (dict(top_k=2, gated=False, activation="gelu", norm_topk=False), "gathered"),
                                       (dict(top_k=2, capacity_factor=1.5, routing="bpr"), "fxopt-op")])
def test_recognizes_fxopt_layer(kw, source):
    torch.manual_seed(0)
    m, x = Net(**kw).eval(), torch.randn(2, 8, 16)
    gm = capture(m, (x,))
    (match,), notes = find_moe_blocks(gm, (x,))
    b = match.block
    assert notes == [] and b.name == "moe" and b.source == source
    assert (b.top_k, b.gated, b.norm_topk, b.activation) == (kw["top_k"], kw.get("gated", True),
                                                             kw.get("norm_topk", True), kw.get("activation", "silu"))
    if source == "fxopt-op":
        assert b.capacity == [1.5] * 4 and b.routing == "bpr"


class ModuleListMoE(torch.nn.Module):
    """MoE-like code fxopt does not handle: per-expert nn.Linear modules and a dense combine."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 4, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        w, i = torch.softmax(self.gate(x), -1).topk(2, -1)
        dense = torch.zeros(x.shape[0], 4).scatter(1, i, w)
        return sum(dense[:, e:e + 1] * self.experts[e](x) for e in range(4))


def test_unrecognized_moe_like_code_is_a_note():
    m, x = ModuleListMoE().eval(), torch.randn(6, 8)
    gm = capture(m, (x,))
    matches, notes = find_moe_blocks(gm, (x,))
    assert matches == []
    assert len(notes) == 1 and "left alone" in notes[0] and "topk" in notes[0]
