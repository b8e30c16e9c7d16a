import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import CaptureError, capture
from fxopt.ir.meta import CAPTURE, module_path
from tests.helpers import count, max_abs, outputs

aten = torch.ops.aten


def test_tiny_gpt_capture_is_exact_and_keeps_module_paths(tiny_gpt):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    assert max_abs(outputs(gm, tiny_gpt.example_inputs)[0], outputs(tiny_gpt.model, tiny_gpt.example_inputs)[0]) == 0
    paths = {module_path(n) for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default}
    assert {"blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc2", "head"} <= paths
    # pre-dispatch ATen level: nothing decomposed
    assert count(gm, aten.layer_norm.default) == 5
    assert count(gm, aten.scaled_dot_product_attention.default) == 2
    # parameters are get_attr nodes, frozen
    assert any(n.op == "get_attr" and n.target == "blocks.0.fc1.weight" for n in gm.graph.nodes)
    assert not any(p.requires_grad for p in gm.parameters())
    info = CAPTURE.get(gm)
    assert info.method == "export" and info.output_names == ["output"] and info.input_names == ["idx"]


def test_capture_never_mutates_the_model(tiny_gpt):
    m = tiny_gpt.model.train()
    m.blocks[0].training = False          # a mixed state must come back exactly
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [mod.training for mod in m.modules()]
    grads = [p.requires_grad for p in m.parameters()]
    fxopt.optimize(m, "cleanup", tiny_gpt.example_inputs)
    assert [mod.training for mod in m.modules()] == flags
    assert [p.requires_grad for p in m.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert "forward" not in vars(m)


def test_gpt2_conv1d_addmm_becomes_linear():
    lm = models.hf_tiny("gpt2-tiny", layers=2)
    gm = capture(lm.model, lm.example_inputs)
    assert count(gm, aten.addmm.default) == 0
    assert count(gm, aten.linear.default) == 2 * 4 + 1          # c_attn, c_proj, c_fc, mlp.c_proj per layer + lm_head
    lin = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert module_path(lin) == "transformer.h.0.attn.c_attn"
    w = gm.get_parameter(lin.args[1].target)
    assert tuple(w.shape) == (3 * 64, 64)                          # stored [out, in] like nn.Linear
    assert any("addmm->linear: transformer.h.0.mlp.c_fc" == s for s in CAPTURE.get(gm).normalizations)
    ref = outputs(lm.model, lm.example_inputs, use_cache=False)[0]
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-5
    # the caller's Conv1D weight is untouched
    assert tuple(lm.model.transformer.h[0].attn.c_attn.weight.shape) == (64, 3 * 64)


def test_causal_lm_with_default_dynamic_cache_is_captured():
    lm = models.hf_tiny("llama-tiny", layers=2)
    assert lm.model.config.use_cache is True
    gm = capture(lm.model, lm.example_inputs)
    assert lm.model.config.use_cache is True                      # the copy's config was changed, not the caller's
    assert CAPTURE.get(gm).output_names == ["logits"]
    assert CAPTURE.get(gm).bound_kwargs == {"use_cache": False}
    ref = lm.model(**lm.example_inputs, use_cache=False).logits
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref) < 1e-5


def test_hf_architectures_capture(hf_model):
    gm = capture(hf_model.model, hf_model.example_inputs)
    ref = outputs(hf_model.model, hf_model.example_inputs,
                  **({"use_cache": False} if "use_cache" in CAPTURE.get(gm).bound_kwargs else {}))
    got = outputs(gm, hf_model.example_inputs)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert max_abs(a, b) < 1e-5
    assert count(gm, aten.linear.default) > 0


def test_dynamic_batch_and_sequence():
    lm = models.hf_tiny("bert-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs, dynamic=True)
    assert CAPTURE.get(gm).dynamic_axes["input_ids"] == {0: "batch", 1: "seq"}
    ids = torch.randint(1, 100, (5, 23))
    new = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert max_abs(outputs(gm, new)[0], outputs(lm.model, new)[0]) < 1e-5


def test_static_capture_rejects_other_shapes():
    lm = models.hf_tiny("bert-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs)
    ids = torch.randint(1, 100, (5, 23))
    with pytest.raises(Exception):
        gm(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_positional_and_keyword_inputs_give_the_same_graph(tiny_gpt):
    (idx,) = tiny_gpt.example_inputs
    a = capture(tiny_gpt.model, (idx,))
    b = capture(tiny_gpt.model, {"idx": idx})
    assert max_abs(outputs(a, (idx,))[0], outputs(b, {"idx": idx})[0]) == 0


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


def test_symbolic_trace_path_normalizes_to_the_same_form():
    m = _MLP().eval()
    x = torch.randn(2, 3, 8)
    via_fx = capture(m, (x,), method="fx")
    via_export = capture(m, (x,), method="export")
    assert CAPTURE.get(via_fx).method == "symbolic_trace+export"
    ops = lambda g: sorted(str(n.target) for n in g.graph.nodes if n.op == "call_function")  # noqa: E731
    assert ops(via_fx) == ops(via_export)
    assert {module_path(n) for n in via_fx.graph.nodes if n.target is aten.linear.default} == {"fc1", "fc2"}
    assert max_abs(via_fx(x), m(x)) == 0


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:                      # control flow on tensor values
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_names_the_construct():
    with pytest.raises(CaptureError) as ei:
        capture(_DataDependent(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert "_DataDependent" in msg and "torch.export" in msg and "symbolic_trace" in msg
    assert "test_capture.py" in msg                   # the model line that broke capture
    assert "torch.cond" in msg or "torch.where" in msg  # and what to try


def test_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        capture(_MLP(), 3.5)
    with pytest.raises(ValueError, match="example_inputs are required"):
        capture(_MLP(), None)
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(CaptureError, match="unknown inputs"):
        capture(_MLP(), (torch.randn(2, 8),), dynamic={"nope": {0: "batch"}})


def test_non_contiguous_example_does_not_pin_strides():
    lm = models.hf_tiny("llama-tiny", layers=1, batch=4, seq=32)
    ids = lm.example_inputs["input_ids"]
    view = ids[:2, :16]
    gm = capture(lm.model, {"input_ids": view, "attention_mask": torch.ones_like(view)}, dynamic=True)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert max_abs(outputs(gm, full)[0], outputs(lm.model, full, use_cache=False)[0]) < 1e-5
