"""fxopt.lowering.decoder_ops: a decode step exported onto ORT's decoder kernels, and fxopt.runtime.ort_decoder
running it with the cache in place.

Tiny random Llama (4 heads / 2 KV heads) and Qwen2 (projection biases) configs, 2 layers. Structure: the
rewrite's op counts. Numerics: greedy tokens through ONNX Runtime identical to transformers' ``generate``
(batch 1, and batch 3 left-padded by 0/2/4 tokens), with ``ort_step`` (cache through numpy) and with
:class:`OrtDecoder` (shared past/present buffers); prefill logits at every position, pad rows included,
against the exporter's generic file. GPT-2 (LayerNorm, no rotary, fused c_attn) is the non-matching case.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir.decoder import DecoderError
from fxopt.lowering.decoder_ops import KV_CACHE_KEY, SHARED_BUFFER
from fxopt.runtime import CacheHandle, OrtDecoder, generate, ort_step

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

# Measured on these configs (ORT 1.32, CPU): fused vs generic ORT outputs differ by at most 2.4e-7 over six
# prefill/decode shapes (batch 1-3, past 0-9, 0-6 pads) and fused ORT vs PyTorch logits by at most 1.8e-7 (logits
# of magnitude 0.6-1.5), as much as the generic file differs from PyTorch; 2e-6 leaves ~8x headroom and still fails
# on a wrong mask, position or cache slot (those move logits by >1e-2).
ATOL = 2e-6


def _qwen2():
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=128, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         num_hidden_layers=2)
    return tf.Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": lambda: models.hf_tiny("llama-tiny", layers=2).model, "qwen2": _qwen2}


def _prompts():
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


def _hf(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def _run(path, feed):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    model = MODELS[request.param]()
    ids, mask = _prompts()
    res = fxopt.optimize(model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")
    rep = res.export_onnx(tmp_path_factory.mktemp(request.param) / "decoder.onnx")
    return request.param, model, res, rep


def test_rewrite_produces_the_decoder_kernels(exported):
    name, model, res, rep = exported
    layers = res.decoder.num_layers
    assert rep.verified
    assert rep.ops.get("GroupQueryAttention") == layers
    assert rep.ops.get("SkipSimplifiedLayerNormalization") == 2 * layers        # 2 per layer: the final norm too
    assert "MultiHeadAttention" not in rep.ops and "RotaryEmbedding" not in rep.ops   # rotary runs inside GQA
    assert rep.ops["MatMul"] == 5 * layers + 1                                  # q/k/v packed: qkv, o, gate, up, down
    assert rep.ops.get("Add", 0) <= 4 + (layers if name == "qwen2" else 0)      # Qwen2: one packed bias per layer
    assert rep.inputs == res.decoder.input_names and rep.outputs == ["logits", *res.decoder.present_names]
    meta = {p.key: p.value for p in onnx.load(str(rep.path), load_external_data=False).metadata_props}
    assert meta[KV_CACHE_KEY] == SHARED_BUFFER
    assert any("GroupQueryAttention" in n for n in rep.notes)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_identical_to_transformers(exported, batch):
    name, model, res, rep = exported
    ids, mask = _prompts()
    ids, mask = ids[:batch], mask[:batch]
    ref = _hf(model, ids, mask, 24)
    assert torch.equal(generate(ort_step(rep.path), res.decoder, ids, mask, max_new_tokens=24), ref)
    dec = OrtDecoder(rep.path, share_buffer=True)
    assert torch.equal(generate(dec, res.decoder, ids, mask, max_new_tokens=24), ref)
    assert dec.mode == "shared-buffer" and dec.capacity >= ids.shape[1] + 24


def test_logits_match_pytorch_and_the_generic_file(exported, tmp_path):
    name, model, res, rep = exported
    ids, mask = _prompts()
    generic = res.export_onnx(tmp_path / "generic.onnx", decoder_kernels=False)
    assert "GroupQueryAttention" not in generic.ops and "SkipSimplifiedLayerNormalization" not in generic.ops
    feed = res.decoder.prefill_inputs(ids, mask)                        # 2 dummy slots, left padding: pad rows
    fused, plain = _run(rep.path, feed), _run(generic.path, feed)       # that keep no key at all
    for a, b in zip(fused, plain):
        assert a.shape == b.shape and float(np.abs(a - b).max()) < ATOL
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask).logits.numpy()
    real = mask.bool().numpy()
    assert float(np.abs(fused[0][real] - hf[real]).max()) < ATOL
    # a decode step after that prefill, and a prefill from an empty cache (how GenAI feeds it)
    step = {"input_ids": ids[:, -1:], "attention_mask": torch.cat([feed["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1),
            "position_ids": feed["position_ids"][:, -1:] + 1,
            **{p: torch.from_numpy(o) for p, o in zip(res.decoder.past_names, fused[1:])}}
    empty = {**feed, "attention_mask": mask, **res.decoder.empty_past(3, 0)}
    for f in (step, empty):
        for a, b in zip(_run(rep.path, f), _run(generic.path, f)):
            assert float(np.abs(a - b).max()) < ATOL


def test_shared_buffer_grows_and_handles_are_checked(exported):
    name, model, res, rep = exported
    ids, mask = _prompts()
    dec = OrtDecoder(rep.path, capacity=12)                       # smaller than prompt + dummy slots + new tokens
    got = generate(dec, res.decoder, ids, mask, max_new_tokens=30)
    assert torch.equal(got, _hf(model, ids, mask, 30))
    assert dec.capacity >= 2 + 7 + 30 and dec.bytes_copied > 0
    out = dec(res.decoder.prefill_inputs(ids, mask))
    handle = out["present_key_0"]
    assert isinstance(handle, CacheHandle) and tuple(handle.tensor().shape) == (3, 2, 2 + 7, 16)
    other = OrtDecoder(rep.path)
    feed = {"input_ids": ids[:, -1:], "attention_mask": torch.ones(3, 10, dtype=torch.long),
            "position_ids": torch.full((3, 1), 7), **{p: out[q] for p, q in zip(res.decoder.past_names,
                                                                                   res.decoder.present_names)}}
    with pytest.raises(DecoderError, match="another sequence or decoder"):
        other(feed)


def test_gpt2_falls_back_with_a_note(tmp_path):
    lm = models.hf_tiny("gpt2-tiny", layers=2)
    ids, mask = _prompts()
    res = fxopt.optimize(lm.model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")
    rep = res.export_onnx(tmp_path / "gpt2.onnx")
    assert rep.verified and "SkipSimplifiedLayerNormalization" not in rep.ops        # LayerNorm, not RMSNorm
    assert rep.ops.get("GroupQueryAttention", 0) < res.decoder.num_layers
    assert any("stays MultiHeadAttention" in n for n in rep.notes)
    meta = {p.key: p.value for p in onnx.load(str(rep.path), load_external_data=False).metadata_props}
    assert meta[KV_CACHE_KEY] != SHARED_BUFFER
    with pytest.raises(DecoderError, match="cannot share past/present buffers"):
        OrtDecoder(rep.path, share_buffer=True)
    dec = OrtDecoder(rep.path)
    assert dec.mode == "bound"
    ref = _hf(lm.model, ids, mask, 16)
    assert torch.equal(generate(dec, res.decoder, ids, mask, max_new_tokens=16), ref)
    assert torch.equal(generate(ort_step(rep.path), res.decoder, ids, mask, max_new_tokens=16), ref)
