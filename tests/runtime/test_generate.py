"""generate() on the decode-step graph: greedy identical to transformers' generate, in PyTorch and ONNX Runtime."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import decoder
from fxopt.runtime import generate, ort_step


def _prompts(batch: int, length: int, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):                       # left padding of growing length
        mask[row, : min(pad * row, length - 1)] = 0
    return ids, mask


def _hf(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mixtral-tiny", "qwen2-moe-tiny"])
@pytest.mark.parametrize("batch,pad", [(1, 0), (3, 2)])
def test_greedy_matches_transformers_token_for_token(name, batch, pad):
    lm = models.hf_tiny(name, layers=2)
    ids, mask = _prompts(batch, 7, pad)
    res = fxopt.optimize(lm.model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")
    got = res.generate(ids, mask, max_new_tokens=24)
    assert torch.equal(got, _hf(lm.model, ids, mask, 24))
    assert lm.model.config.use_cache is True                         # the caller's model is untouched


def test_prompt_lengths_and_cache_lengths_at_the_edges():
    lm = models.hf_tiny("llama-tiny", layers=2)
    ids, _ = _prompts(2, 5)
    res = fxopt.optimize(lm.model, "cleanup", ids, task="text-generation")
    one = ids[:, :1]                                                  # a one-token prompt: past 0, then 1, 2, ...
    assert torch.equal(res.generate(one, max_new_tokens=6), _hf(lm.model, one, torch.ones_like(one), 6))
    assert torch.equal(res.generate(ids, max_new_tokens=1), _hf(lm.model, ids, torch.ones_like(ids), 1))
    assert torch.equal(res.generate(ids, max_new_tokens=0), ids)
    long = torch.randint(3, 100, (1, 40))                             # longer than anything captured or calibrated
    assert torch.equal(res.generate(long, max_new_tokens=8), _hf(lm.model, long, torch.ones_like(long), 8))


def test_eos_stops_and_pads_like_transformers():
    lm = models.hf_tiny("llama-tiny", layers=2)
    ids, mask = _prompts(3, 6, pad=1, seed=3)
    res = fxopt.optimize(lm.model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")
    free = res.generate(ids, mask, max_new_tokens=12)
    eos = int(free[0, 8])                                             # a token row 0 emits: make it the EOS
    got = res.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, _hf(lm.model, ids, mask, 12, eos_token_id=eos))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    lm = models.hf_tiny("llama-tiny", layers=2)
    ids, _ = _prompts(2, 5)
    res = fxopt.optimize(lm.model, "cleanup", ids, task="text-generation")
    a = res.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8,
                     generator=torch.Generator().manual_seed(1))
    b = res.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(res.generate(ids, max_new_tokens=10, do_sample=True, top_k=1), res.generate(ids, max_new_tokens=10))


def test_passes_apply_to_prefill_and_decode_with_one_calibration():
    lm = models.hf_tiny("llama-tiny", layers=2)
    ids, mask = _prompts(2, 7, pad=2)
    calib = [torch.randint(3, 100, (2, 9)) for _ in range(2)]
    res = fxopt.optimize(lm.model, "smoothquant,insert-qdq{scheme=w8a8-dynamic},fuse-qdq", ids, calibration=calib,
                         task="text-generation")
    rec = res.record("insert-qdq")
    assert rec.stats["weights_touched"] == rec.stats["weights_eligible"] == 15
    got = res.generate(ids, mask, max_new_tokens=12)
    ref = _hf(lm.model, ids, mask, 12)
    # one graph for every step: the same quantized weights in prefill and decode; per-token int8 on a
    # random tiny model stays close to the float greedy path
    assert float((got[:, 7:] == ref[:, 7:]).float().mean()) >= 0.75


def test_onnx_decoder_with_past_and_present_generates_the_same_tokens(tmp_path):
    lm = models.hf_tiny("llama-tiny", layers=2)
    ids, mask = _prompts(3, 6, pad=2)
    res = fxopt.optimize(lm.model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")
    rep = res.export_onnx(tmp_path / "decoder.onnx")
    assert rep.verified
    assert rep.inputs == res.decoder.input_names and rep.outputs == ["logits", *res.decoder.present_names]
    got = generate(ort_step(rep.path), res.decoder, ids, mask, max_new_tokens=20)
    assert torch.equal(got, _hf(lm.model, ids, mask, 20))


def test_bad_inputs_and_models_get_clear_errors():
    lm = models.hf_tiny("llama-tiny", layers=1)
    ids, _ = _prompts(2, 5)
    res = fxopt.optimize(lm.model, "cleanup", ids, task="text-generation")
    with pytest.raises(decoder.DecoderError, match="prompt is empty"):
        res.generate(ids[:, :0])
    with pytest.raises(decoder.DecoderError, match="attention_mask must have input_ids' shape"):
        res.generate(ids, torch.ones(2, 4, dtype=torch.long))
    right = torch.ones_like(ids)
    right[0, -1] = 0
    with pytest.raises(decoder.DecoderError, match="left padding"):
        res.generate(ids, right)
    with pytest.raises(decoder.DecoderError, match="exceeds the model's maximum length"):
        res.generate(ids, max_new_tokens=10**6)
    with pytest.raises(decoder.DecoderError, match="needs a decoder"):
        fxopt.optimize(lm.model, "cleanup", ids).generate(ids)
    with pytest.raises(decoder.DecoderError, match="needs dynamic shapes"):
        fxopt.optimize(lm.model, "cleanup", ids, task="text-generation", dynamic=False)
    with pytest.raises(ValueError, match="task must be"):
        fxopt.optimize(lm.model, "cleanup", ids, task="summarize")
    with pytest.raises(decoder.DecoderError, match="has no HF config"):
        fxopt.optimize(torch.nn.Linear(4, 4), "cleanup", ids, task="text-generation")


def test_unsupported_caches_are_named():
    from transformers import Lfm2Config, Lfm2ForCausalLM, T5Config, T5ForConditionalGeneration
    hybrid = Lfm2ForCausalLM(Lfm2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        layer_types=["conv", "full_attention"]))
    with pytest.raises(decoder.DecoderError, match=r"layers of type \['conv'\].*not recurrent or convolutional"):
        decoder.layout_of(hybrid)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8))
    with pytest.raises(decoder.DecoderError, match="encoder-decoder"):
        decoder.layout_of(t5)


def test_a_single_one_token_prompt_still_captures_dynamic_batch_and_length():
    lm = models.hf_tiny("llama-tiny", layers=2)
    one = torch.tensor([[5]])
    res = fxopt.optimize(lm.model, "cleanup", one, task="text-generation")
    axes = fxopt.ir.meta.CAPTURE.get(res.module).dynamic_axes
    assert axes["input_ids"] == {0: "batch", 1: "seq"} and axes["past_key_0"] == {0: "batch", 2: "past"}
    ids, mask = _prompts(3, 6, pad=2)
    assert torch.equal(res.generate(ids, mask, max_new_tokens=8), _hf(lm.model, ids, mask, 8))
