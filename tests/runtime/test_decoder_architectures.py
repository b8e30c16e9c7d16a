"""The decode-step capture on every causal-LM family the explicit cache supports: greedy output
token-for-token identical to transformers' ``generate`` in PyTorch and in ONNX Runtime.

Tiny random configs (hidden 64, 2 layers, vocab 128). Prompts of 12 tokens, batch 3 with left
padding (0, 2 and 5 pads), 20 new tokens: with ``sliding_window=8`` both the prefill and the decode
run past the window, so the sliding-window mask is exercised (a check below shows that the window
changes the tokens, so identity is not vacuous). Llama, GPT-2, Mixtral and Qwen2-MoE are covered in
``test_generate.py``.
"""
from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.runtime import generate, ort_step

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

V = 128
WINDOW = 8
DEC = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
           max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_hidden_layers=2)

ARCHS = {
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DEC)),
    "qwen2-sliding": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DEC, use_sliding_window=True, sliding_window=WINDOW,
                                                                max_window_layers=1)),
    "mistral-sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(**DEC, sliding_window=WINDOW)),
    "gemma2-hybrid": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DEC, head_dim=16, sliding_window=WINDOW)),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**DEC, partial_rotary_factor=0.5)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**DEC)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                                                  vocab_size=V, max_position_embeddings=128, word_embed_proj_dim=64,
                                                  bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                               num_hidden_layers=2, vocab_size=V, max_position_embeddings=128,
                                                               rotary_pct=0.25, bos_token_id=0, eos_token_id=0)),
}
ORT_ARCHS = ["qwen2", "mistral-sliding", "gemma2-hybrid", "phi", "opt", "gpt-neox"]


def _model(name: str):
    torch.manual_seed(0)
    return ARCHS[name]().eval()


def _prompts():
    ids = torch.randint(3, V, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids, mask


def _hf(model, ids, mask, n=20):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _optimize(model, ids, mask):
    return fxopt.optimize(model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_greedy_identical_in_pytorch(name):
    model = _model(name)
    ids, mask = _prompts()
    res = _optimize(model, ids, mask)
    eos = model.generation_config.eos_token_id
    assert torch.equal(res.generate(ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0),
                       _hf(model, ids, mask))


@pytest.mark.parametrize("name", ORT_ARCHS)
def test_greedy_identical_in_onnx_runtime(name, tmp_path):
    model = _model(name)
    ids, mask = _prompts()
    res = _optimize(model, ids, mask)
    res.export_onnx(tmp_path / "decoder.onnx")
    got = generate(ort_step(tmp_path / "decoder.onnx"), res.decoder, ids, mask, max_new_tokens=20,
                   eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    assert torch.equal(got, _hf(model, ids, mask))


def test_the_sliding_window_changes_the_tokens():
    """Identity above is not vacuous: the same weights without the window generate other tokens."""
    windowed = _model("mistral-sliding")
    full = tf.MistralForCausalLM(tf.MistralConfig(**DEC, sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    ids, mask = _prompts()
    assert not torch.equal(_hf(windowed, ids, mask), _hf(full, ids, mask))
