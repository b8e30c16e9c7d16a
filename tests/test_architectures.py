"""Every pipeline on tiny random configs of 16 HF architectures: nothing is a silent no-op.

For each architecture (hidden 64, 2 layers, vocab 128, random init):

(a) ``cleanup`` then ``export_onnx``: capture is exact, and ONNX Runtime reproduces the graph;
(b) ``smoothquant,insert-qdq{scheme=w8a8-dynamic},fuse-qdq`` with two calibration batches: every
    linear ends as an integer linear (``QLINEAR``);
(c) ``permute-channels`` (exact, also at a second input shape of a dynamic capture) then
    ``nm-sparsity``: every eligible weight — linears and stacked MoE experts — is masked N:M, or a
    note names it and says why not.

Then the fixes these cases found: dynamic export of image/audio/encoder-decoder models at another
batch, HF's default ``grouped_mm`` MoE experts lowered to ONNX (any token count), and the expert
weights counted, sparsified and permuted (:func:`fxopt.ir.structure.expert_weights`).
"""
from __future__ import annotations

import functools

import pytest
import torch

import fxopt
from fxopt.backends.ort import OrtBackend
from fxopt.ir import capture, get_attr
from fxopt.ir.graph import ExampleInputs
from fxopt.ir.meta import CAPTURE, NM_MASK, PERMUTATION, QLINEAR
from fxopt.ir.structure import expert_weights, linears, weight_coverage
from fxopt.passes.nm_sparsity import expert_nm_mask, is_nm_sparse, nm_mask
from tests.helpers import max_abs, outputs

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

aten = torch.ops.aten
V = 128          # vocab
DEC = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
           max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_hidden_layers=2)


def _ids(b, s, g):
    return torch.randint(1, V, (b, s), generator=g)


def _text(b, s, g):
    ids = _ids(b, s, g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _image(b, s, g):
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)}


def _seq2seq(b, s, g):
    return {**_text(b, s, g), "decoder_input_ids": _ids(b, max(1, s // 2), g)}


def _audio(b, s, g):
    # a tiny Whisper: 32 encoder positions ← 64 frames (the real one: 1500 ← 3000) of 80 mel bins
    return {"input_features": torch.randn(b, 80, 64, generator=g), "decoder_input_ids": _ids(b, max(1, s // 2), g)}


def _text_image(b, s, g):
    return {**_text(b, s, g), **_image(b, s, g)}


ARCHS = {   # name: (model factory, inputs(batch, seq, generator))
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)), _seq2seq),
    "vit": (lambda: tf.ViTModel(tf.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8)), _image),
    "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=V, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=32,
        max_target_positions=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)), _audio),
    "clip": (lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)), _text_image),
    "distilbert": (lambda: tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128)), _text),
    "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=130, pad_token_id=1)), _text),
    "deberta-v2": (lambda: tf.DebertaV2Model(tf.DebertaV2Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
        max_relative_positions=64)), _text),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**DEC)), _text),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DEC, head_dim=16)), _text),
    "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DEC, head_dim=16, sliding_window=8)), _text),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**DEC, head_dim=16)), _text),
    "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
        eos_token_id=0)), _text),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(
        vocab_size=V, hidden_size=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)), _text),
    "gptj": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, bos_token_id=0,
        eos_token_id=0)), _text),
    # MoE: transformers 5's default experts (grouped_mm over 3-D stacked weights)
    "mixtral": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**DEC, num_local_experts=4, num_experts_per_tok=2)),
                _text),
    "qwen2-moe": (lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **DEC, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False)), _text),
}
MOE = ("mixtral", "qwen2-moe")
NAMES = list(ARCHS)


@functools.lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[name][0]().eval()          # fxopt never mutates it (it captures a deep copy)


def _inputs(name: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    return ARCHS[name][1](batch, seq, torch.Generator().manual_seed(seed))


def _eager(name: str, inputs, gm) -> list[torch.Tensor]:
    """The HF model's outputs, with the keyword inputs capture bound (use_cache=False)."""
    return outputs(_model(name), inputs, **CAPTURE.get(gm).bound_kwargs)


def _close(got: list[torch.Tensor], ref: list[torch.Tensor], rtol: float = 1e-5) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert max_abs(a, b) <= 1e-5 + rtol * float(b.abs().max())


def _param_matmuls(gm) -> list[str]:
    """Matmuls that read a parameter: each is a linear that no weight pass would see."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.matmul.default, aten.mm.default):
            for a in n.args:
                while isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target in (
                        aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int):
                    a = a.args[0]
                if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                    out.append(n.name)
    return out


# --------------------------------------------------------------------------- (a) cleanup + ONNX


#: exported with dynamic dims, and run in ONNX Runtime at another batch (and sequence): image and audio
#: inputs keep their other dims static; HF's default MoE experts lower at any token count
DYNAMIC_EXPORT = ("vit", "whisper", "clip", "mixtral", "qwen2-moe")


@pytest.mark.parametrize("name", NAMES)
def test_cleanup_then_export_is_verified(name, tmp_path):
    ex = _inputs(name)
    dynamic = name in DYNAMIC_EXPORT
    res = fxopt.optimize(_model(name), "cleanup", ex, dynamic=dynamic)
    cap, clean = res.records[0], res.records[-1]
    assert cap.drift_rel is not None and cap.drift_rel < 1e-5, "capture is exact"
    assert clean.status == "ran" and clean.drift_rel < 1e-5
    assert _param_matmuls(res.module) == []                   # every parameter product is an aten.linear
    rep = res.export_onnx(tmp_path / f"{name}.onnx")
    assert rep.verified and rep.max_abs is not None and rep.max_abs < 1e-4, str(rep)
    if not dynamic:
        return
    axes = CAPTURE.get(res.module).dynamic_axes
    for key in ("pixel_values", "input_features"):
        if key in axes:
            assert axes[key] == {0: "batch"}                  # image/audio dims stay static
    if name in MOE:
        assert any("grouped_mm" in str(n.target) for n in res.module.graph.nodes)
    ex2 = _inputs(name, batch=3, seq=6, seed=3)
    got = [torch.from_numpy(a) for a in OrtBackend(rep.path).run(ExampleInputs.of(ex2))]
    _close(got, _eager(name, ex2, res.module), rtol=1e-4)


# --------------------------------------------------------------------------- (b) W8A8 dynamic


@pytest.mark.parametrize("name", NAMES)
def test_w8a8_dynamic_quantizes_every_linear(name):
    ex = _inputs(name)
    calib = [_inputs(name, seed=1), _inputs(name, seed=2)]
    res = fxopt.optimize(_model(name), "smoothquant,insert-qdq{scheme=w8a8-dynamic},fuse-qdq", ex, calibration=calib)
    assert [r.status for r in res.records[1:]] == ["ran"] * 3
    n_linear = res.records[0].ops.get("aten.linear.default", 0)
    qlinear = [n for n in res.module.graph.nodes if QLINEAR.has(n)]
    assert n_linear > 0 and len(qlinear) == n_linear
    assert all(QLINEAR.get(n).scheme == "w8a8-dynamic" for n in qlinear)
    assert res.records[-1].drift_rel < 0.5                    # lossy, not broken
    if name in MOE:                                           # the stacked experts stay float: the pass must say so
        gm = capture(_model(name), ex)
        cov = weight_coverage(gm, [li.weight for li in linears(gm)])
        assert cov.n_touched == n_linear and len(cov.untouched) == 4 and cov.share < 0.9
        qdq = res.record("insert-qdq")
        if not any("expert" in n for n in qdq.notes):
            pytest.xfail("insert-qdq does not yet report the expert weights it leaves in float "
                         "(to come with fxopt.ir.structure.weight_coverage in insert-qdq)")


# --------------------------------------------------------------------------- (c) permute + N:M, dynamic


@pytest.mark.parametrize("name", NAMES)
def test_permute_then_nm_sparsity_on_a_dynamic_capture(name):
    ex, ex2 = _inputs(name), _inputs(name, batch=3, seq=6, seed=3)
    perm = fxopt.optimize(_model(name), "permute-channels{time_budget=0.05}", ex, dynamic=True)
    rec = perm.records[-1]
    assert rec.status == "ran" and rec.modified               # the manager checked it exact on ex
    assert rec.stats["permuted"] + rec.stats["experts_permuted"] > 0
    assert 0 < rec.stats["weights_touched"] < rec.stats["weights_eligible"]
    assert any(n.startswith(f"moved {rec.stats['weights_touched']} of {rec.stats['weights_eligible']} eligible")
               for n in rec.notes)
    if name in MOE:
        assert rec.stats["experts_permuted"] == 2
    _close(outputs(perm.module, ex2), _eager(name, ex2, perm.module))      # exact at another shape too

    sparse = fxopt.optimize(perm.module, "nm-sparsity", ex)
    nm = sparse.records[-1]
    gm = sparse.module
    assert nm.status == "ran" and nm.modified
    masked = [li for li in linears(gm) if NM_MASK.has(li.node)]
    assert len(masked) == nm.stats["masked"] > 0
    assert all(is_nm_sparse(get_attr(gm, li.weight), 2, 4) for li in masked)
    experts = expert_weights(gm)[0]
    assert nm.stats["experts_masked"] == len(experts) == (4 if name in MOE else 0)
    cov = weight_coverage(gm, [li.weight for li in masked] + [e.weight for e in experts])
    assert (nm.stats["weights_touched"], nm.stats["weights_eligible"], nm.stats["weight_share"]) == \
        (cov.n_touched, cov.n_eligible, cov.share)
    for path in cov.untouched:                                # left dense: a note names it and says why
        assert any(n.startswith(f"{path}: ") and "kept dense" in n for n in nm.notes), path
    got, ref = outputs(gm, ex2), _eager(name, ex2, gm)
    assert [t.shape for t in got] == [t.shape for t in ref] and all(torch.isfinite(t).all() for t in got)


# --------------------------------------------------------------------------- MoE experts


def test_expert_weights_are_found_in_every_form():
    """grouped_mm (HF default), folded transposes after cleanup, batched_mm, and fxopt::moe."""
    from fxopt import models
    from fxopt.ir.moe import find_moe_blocks, rewrite_to_op

    ex = _inputs("mixtral")
    grouped = capture(_model("mixtral"), ex)
    folded = fxopt.optimize(_model("mixtral"), "cleanup", ex).module
    lm = models.hf_tiny("mixtral-tiny", layers=2)
    batched = capture(lm.model, lm.example_inputs)
    op_form = capture(lm.model, lm.example_inputs)
    for m in find_moe_blocks(op_form)[0]:
        rewrite_to_op(op_form, m, capacity=[])
    for gm, in_dim in ((grouped, 2), (folded, 1), (batched, 2), (op_form, 2)):
        found, notes = expert_weights(gm)
        assert notes == [] and len(found) == 4
        assert {e.in_dim for e in found} == {in_dim}
        assert sorted((e.in_features, e.out_features) for e in found)[:2] == [(64, 256), (64, 256)]   # gate+up [2F, D]
        assert all(e.experts == 4 for e in found)
    (e0, *_), _ = expert_weights(grouped)
    assert e0.path == "model.layers.0.mlp.experts.gate_up_proj"
    (f0, *_), _ = expert_weights(folded)
    assert f0.path.startswith("model.layers.0.mlp.experts (_folded")    # a made tensor: named by its reader
    # coverage: linears alone are a small share of Mixtral's weight bytes
    cov = weight_coverage(grouped, [li.weight for li in linears(grouped)])
    assert cov.n_eligible == cov.n_touched + 4 and cov.share < 0.2
    assert weight_coverage(grouped, [li.weight for li in linears(grouped)] + [e.weight for e in found]).share == 1.0


class _Odd(torch.nn.Module):
    """A 3-D parameter read by a bmm *and* added elsewhere: not treated as stacked experts."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x):
        return torch.bmm(x, self.w) + self.w


def test_a_3d_weight_with_other_uses_is_not_an_expert_weight():
    gm = capture(_Odd().eval(), (torch.randn(2, 8, 8),))
    found, notes = expert_weights(gm)
    assert found == [] and len(notes) == 1 and "w" in notes[0] and "not treated as stacked expert weights" in notes[0]


@pytest.mark.parametrize("cleanup", [False, True])
def test_nm_sparsity_masks_each_expert_along_its_input_dim(cleanup):
    ex = _inputs("qwen2-moe")
    res = fxopt.optimize(_model("qwen2-moe"), "cleanup,nm-sparsity" if cleanup else "nm-sparsity", ex)
    before = res.records[-2] if cleanup else res.records[0]
    gm = res.module
    rec = res.records[-1]
    found, _ = expert_weights(gm)
    assert rec.stats["experts_masked"] == 4 and rec.stats["weight_share"] == 1.0
    n = rec.stats["weights_touched"]
    assert rec.notes[0] == f"masked {n} of {n} eligible weights (100.0 % of their bytes)"
    assert before.param_bytes == rec.param_bytes               # masks are written in place of the dense weights
    for e in found:
        w = get_attr(gm, e.weight)
        rows = w.movedim(e.in_dim, -1)                          # [E, out, in]
        assert is_nm_sparse(rows.reshape(-1, rows.shape[-1]), 2, 4)
        assert NM_MASK.get(next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == e.weight)).weight \
            == e.weight
    # against a direct computation on the caller's weight (HF layout [E, out, in]: groups along in)
    dense = _model("qwen2-moe").model.layers[0].mlp.experts.down_proj.detach()
    want = dense * expert_nm_mask(dense, 2, 2, 4)
    e = next(e for e in found if e.in_features == 32 and "layers.0." in e.path)
    got = get_attr(gm, e.weight)
    assert torch.equal(got if e.in_dim == 2 else got.transpose(1, 2), want)   # cleanup stores it [E, in, out]
    assert torch.equal(expert_nm_mask(dense, 2, 2, 4)[1], nm_mask(dense[1], 2, 4))


def test_permute_channels_moves_each_experts_hidden_channels_exactly():
    ex = _inputs("mixtral")
    res = fxopt.optimize(_model("mixtral"), "permute-channels{time_budget=0.05}", ex)
    rec = res.records[-1]
    assert rec.status == "ran" and rec.drift_rel < 1e-5
    groups = rec.stats["expert_groups"]
    assert sorted(groups) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for g in groups.values():
        assert g["permuted"] and g["experts"] == 4 and g["channels"] == 128
        assert g["kept_before"] < g["kept_after"] <= g["bound"] < 1
    gm = res.module
    node = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "model.layers.0.mlp.experts.down_proj")
    perm = PERMUTATION.get(node).perm                            # [E, F]: one permutation per expert
    dense = _model("mixtral").model.layers[0].mlp.experts
    assert perm.shape == (4, 128)
    for e in range(4):
        assert torch.equal(get_attr(gm, node.target)[e], dense.down_proj[e][:, perm[e]])
        p = perm[e]
        assert torch.equal(get_attr(gm, "model.layers.0.mlp.experts.gate_up_proj")[e],
                           dense.gate_up_proj[e][torch.cat([p, p + 128])])
    again = fxopt.optimize(res.module, "permute-channels{time_budget=0.05}", ex).records[-1]
    assert again.stats["experts_permuted"] == 0
    assert sum("experts of" in n and "already permuted" in n for n in again.notes) == 2


class _Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 6, 8))      # [E, out, in], read transposed as HF does

    def forward(self, x, offs):
        return torch.ops.transformers.grouped_mm_fallback(x, self.w.transpose(1, 2), offs)


def test_grouped_mm_translation_matches_for_any_offsets(tmp_path):
    """Experts with no rows, and rows past the last offset (zero, as transformers' kernel leaves them)."""
    import transformers.integrations.moe  # noqa: F401 - registers transformers::grouped_mm_fallback

    m, x = _Grouped().eval(), torch.randn(10, 8)
    offs = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    gm = capture(m, (x, offs))
    rep = fxopt.export_onnx(gm, tmp_path / "g.onnx", (x, offs))
    assert rep.verified and rep.max_abs < 1e-6 and rep.ops.get("MatMul") == 4
    ort = OrtBackend(rep.path)
    for o in ([2, 2, 9, 10], [10, 10, 10, 10]):
        o = torch.tensor(o, dtype=torch.int32)
        (got,) = ort.run(ExampleInputs((x, o), {}))
        assert max_abs(torch.from_numpy(got), m(x, o)) < 1e-5
    assert float(m(x, offs)[8:].abs().max()) == 0
