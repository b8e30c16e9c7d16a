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


# --------------------------------------------------------------------------- matmul with a parameter → linear


def _falcon(bias: bool):
    tf = pytest.importorskip("transformers")
    cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=bias,
                          bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return tf.FalconForCausalLM(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("bias", [False, True])
def test_falcon_matmul_linears_become_aten_linear(bias):
    """FalconLinear computes ``x @ W.T (+ b)``: captured as matmul(x, numpy_T(W)) (+ add), every pass
    missed it. Normalized, the decoder's 4 linears per layer are ordinary linears."""
    model, ex = _falcon(bias)
    gm = capture(model, ex)
    assert count(gm, aten.matmul.default) == count(gm, aten.numpy_T.default) == 0
    lins = {module_path(n): n for n in gm.graph.nodes if n.target is aten.linear.default}
    for i in range(2):
        for sub in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            n = lins[f"transformer.h.{i}.{sub}"]
            assert n.args[1].op == "get_attr" and n.args[1].target == f"transformer.h.{i}.{sub}.weight"
            assert (n.args[2].target == f"transformer.h.{i}.{sub}.bias") if bias else len(n.args) == 2
    assert len(lins) == 9                                              # + lm_head
    notes = CAPTURE.get(gm).normalizations
    assert "matmul->linear: transformer.h.0.mlp.dense_h_to_4h" + (" (bias folded)" if bias else "") in notes
    assert max_abs(outputs(gm, ex)[0], outputs(model, ex, use_cache=False)[0]) == 0      # exact
    assert not any(k.endswith("_t") for k, _ in gm.named_parameters())  # nothing stored anew


class _MatmulForms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 8))         # [out, in], read transposed: a linear
        self.b = torch.nn.Parameter(torch.randn(6))
        self.w_in_out = torch.nn.Parameter(torch.randn(8, 6))  # [in, out], read as is: not rewritten
        self.b2 = torch.nn.Parameter(torch.randn(4, 6))        # 2-D "bias": stays an add

    def forward(self, x):
        a = x @ self.w.t() + self.b
        c = torch.mm(x.reshape(-1, 8), self.w.permute(1, 0)).reshape(a.shape)
        d = x @ self.w_in_out
        e = x @ self.w.T + self.b2
        f = x @ x.transpose(-1, -2)                            # no parameter
        return a + c + d + e, f


def test_matmul_normalization_matching_and_non_matching_forms():
    m = _MatmulForms().eval()
    x = torch.randn(2, 4, 8)
    gm = capture(m, (x,))
    lin = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert [(n.args[1].target, n.args[2].target if len(n.args) > 2 else None) for n in lin] == \
        [("w", "b"), ("w", None), ("w", None)]                # a (bias folded), c (mm + permute), e (bias kept out)
    assert count(gm, aten.matmul.default) == 2                 # d (not transposed) and f (no parameter)
    ref, got = m(x), gm(x)
    assert all(max_abs(a, b) < 1e-6 for a, b in zip(got, ref))


# --------------------------------------------------------------------------- dynamic dims per input


def _tiny(name):
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "vit":
        m = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8))
        make = lambda b, g: {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)}  # noqa: E731
    elif name == "whisper":
        m = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0))
        make = lambda b, g: {"input_features": torch.randn(b, 80, 32, generator=g),      # noqa: E731
                             "decoder_input_ids": torch.randint(1, 64, (b, 3 + b), generator=g)}
    else:
        m = tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
                             pad_token_id=1),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8), projection_dim=16))

        def make(b, g):
            ids = torch.randint(3, 64, (b, 3 + b), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(b, 3, 32, 32, generator=g)}
    return m.eval(), make


AXES = {
    "vit": {"pixel_values": {0: "batch"}},
    "whisper": {"input_features": {0: "batch"}, "decoder_input_ids": {0: "batch", 1: "decoder_seq"}},
    "clip": {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
             "pixel_values": {0: "batch"}},
}


@pytest.mark.parametrize("name", ["vit", "whisper", "clip"])
def test_dynamic_axes_are_chosen_per_input(name):
    """Image/audio inputs get a dynamic batch only (ViT's 3 channels and patch grid, Whisper's 80 mel
    bins and frame count are fixed by the model); token inputs batch and sequence, a decoder's its own."""
    m, make = _tiny(name)
    g = torch.Generator().manual_seed(0)
    gm = capture(m, make(2, g), dynamic=True)
    info = CAPTURE.get(gm)
    assert info.dynamic_axes == AXES[name]
    assert not any(s.startswith("dynamic axes") for s in info.normalizations)     # nothing asked was dropped
    other = make(3, g)                                                           # another batch (and length)
    for a, b in zip(outputs(gm, other), outputs(m, other)):
        assert a.shape == b.shape and max_abs(a, b) < 1e-5


def test_dims_the_model_fixes_are_not_recorded_as_dynamic():
    m, make = _tiny("vit")
    x = make(1, torch.Generator().manual_seed(0))                    # a batch of 1 is specialized by export
    gm = capture(m, x, dynamic={"pixel_values": {0: "batch", 1: "channels"}})
    info = CAPTURE.get(gm)
    assert info.dynamic_axes == {}
    assert any("pixel_values dim 1 (channels) kept static at 3" in s for s in info.normalizations)
    assert any("pixel_values dim 0 (batch) kept static at 1" in s and "give 2 or more" in s
               for s in info.normalizations)
