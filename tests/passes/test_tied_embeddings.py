"""Tied embedding / LM head: the lookup reads the LM head's quantized codes, and the file holds the table once."""
import os

import numpy as np
import onnx
import pytest
import torch

import fxopt
from fxopt.backends import OrtBackend
from fxopt.ir import get_attr, qops
from tests.helpers import count, max_abs, outputs

aten = torch.ops.aten
V, H = 320, 128          # table elements (and int4 bytes) above the exporter's constant-folding limit (8192)

SCHEMES = {
    "w8-weight-only": "scheme=w8-weight-only",
    "w8a8-dynamic": "scheme=w8a8-dynamic,granularity=tensor",
    "w8a8-static-avx2": "target=avx2",                              # u8 activations: 7-bit weights, [-64, 64]
    "w4": "scheme=w4-weight-only,group=32",
    "w4-asym": "scheme=w4-weight-only,group=32,weight_symmetric=false",
    "w4-float-zp": "scheme=w4-weight-only,group=32,weight_symmetric=false,weight_zero_point=float",
}
KIND = {"w8-weight-only": "int8", "w8a8-dynamic": "int8", "w8a8-static-avx2": "int8", "w4": "int4",
        "w4-asym": "uint4 (zero point)", "w4-float-zp": "uint4 (float zero point)"}


class TiedLM(torch.nn.Module):
    """Embedding → linear → tanh → LM head, the head's weight *is* the table; returns (logits, embeddings)."""

    def __init__(self, tied: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, H)
        with torch.no_grad():
            self.emb.weight.mul_(0.05).add_(torch.linspace(-0.02, 0.03, H))   # off-centre columns: zero points matter
        self.mix = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        e = self.emb(ids)
        return self.head(torch.tanh(self.mix(e))), e


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _run(model, options, pipeline_tail="", ids=None):
    ids = _ids() if ids is None else ids
    pipe = f"insert-qdq{{{options}}}" + pipeline_tail
    return fxopt.optimize(model, pipe, (ids,), calibration=[(_ids(s),) for s in range(1, 4)])


def _eval_node(gm, n):
    """Evaluate a node whose inputs are constants or such nodes (a weight's Q/DQ)."""
    if n.op == "get_attr":
        return get_attr(gm, n.target)
    args = [_eval_node(gm, a) if isinstance(a, torch.fx.Node) else a for a in n.args]
    return n.target(*args)


def _head(gm):
    return next(n for n in gm.graph.nodes if n.target is aten.linear.default and n.args[0].op != "placeholder"
                and get_attr(gm, n.args[1].args[0].args[0].target).shape[0] == V)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_lookup_reads_the_heads_codes_exactly(name):
    m = TiedLM().eval()
    res = _run(m, SCHEMES[name])
    gm, rec = res.module, res.records[-1]
    assert rec.stats["embeddings"] == 1 and rec.stats["tied_embeddings"] == 1
    assert f".weight: embedding tied to head: lookups read head's {KIND[name]} codes" in " ".join(rec.notes)
    assert not any("kept in float" in n for n in rec.notes) and rec.stats["kept_float"] == 0
    # structure: the table has one quantizer (the head's); no lookup reads the float table
    head = _head(gm)
    q = head.args[1].args[0]
    table = q.args[0]
    assert [u for u in table.users] == [q]
    lookups = [n for n in gm.graph.nodes if n.target is aten.embedding.default]
    assert all(n.args[0] is not table for n in lookups)
    assert any(n.args[0] in (q, head.args[1]) for n in lookups)
    # numerics: every looked-up row is the head's dequantized weight row, bit for bit
    w_hat = _eval_node(gm, head.args[1])
    ids = _ids(7, (3, 11))
    logits, e = outputs(gm, (ids,))
    assert torch.equal(e, w_hat[ids])
    # the head is quantized as it is without the tie being used (its constants are the same)
    alone = _run(m, SCHEMES[name] + ",embeddings=false")
    assert torch.equal(_eval_node(alone.module, _head(alone.module).args[1]), w_hat)
    # and (weight-only schemes) the model computes head(tanh(mix(Ê))) with the quantized mix and that head
    if not rec.stats["scheme"].startswith("w8a8"):
        mix = next(n for n in gm.graph.nodes if n.target is aten.linear.default and n is not head)
        ref = torch.tanh(w_hat[ids] @ _eval_node(gm, mix.args[1]).t() + m.mix.bias.detach()) @ w_hat.t()
        assert max_abs(logits, ref) < 1e-6


def test_the_codes_are_the_schemes_formula():
    """Not only self-consistent: the looked-up rows are the int8 / int4 formulas of the head's weight."""
    m = TiedLM().eval()
    w = m.emb.weight.detach()
    ids = _ids(3)
    s8 = w.abs().amax(1, keepdim=True) / 127
    e8 = outputs(_run(m, SCHEMES["w8-weight-only"]).module, (ids,))[1]
    assert torch.equal(e8, (torch.clamp(torch.round(w / s8), -127, 127) * s8)[ids])
    s4 = (w.reshape(V, -1, 32).abs().amax(-1, keepdim=True) / 7)
    w4 = (torch.clamp(torch.round(w.reshape(V, -1, 32) / s4), -8, 7) * s4).reshape(V, H)
    e4 = outputs(_run(m, SCHEMES["w4"]).module, (ids,))[1]
    assert torch.equal(e4, w4[ids])
    s7 = w.abs().amax(1, keepdim=True) / 64                           # avx2 target: the head's 7-bit codes
    e7 = outputs(_run(m, SCHEMES["w8a8-static-avx2"]).module, (ids,))[1]
    assert torch.equal(e7, (torch.clamp(torch.round(w / s7), -64, 64) * s7)[ids])


def _table_copies(model: onnx.ModelProto, min_bytes: int) -> list[onnx.TensorProto]:
    return [i for i in model.graph.initializer if len(i.raw_data) >= min_bytes and
            int(np.prod(i.dims)) in (V * H, V * H // 2)]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_fused_file_holds_the_table_once_and_runs_in_onnx_runtime(name, tmp_path):
    m = TiedLM().eval()
    ids = _ids()
    sim = _run(m, SCHEMES[name])
    fused = _run(m, SCHEMES[name], ",fuse-qdq")
    gm = fused.module
    # the lookup is unchanged by fusing: bit for bit; the logits up to summation order
    ids2 = _ids(5, (3, 11))
    (l_sim, e_sim), (l_fused, e_fused) = outputs(sim.module, (ids2,)), outputs(gm, (ids2,))
    assert torch.equal(e_fused, e_sim)
    assert max_abs(l_fused, l_sim) <= 1e-5 * float(l_sim.abs().max())
    # one copy of the table among the graph's constants, none of it float
    consts = {n.target: get_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    copies = [k for k, t in consts.items() if t.numel() in (V * H, V * H // 2)]
    assert len(copies) == 1 and not consts[copies[0]].is_floating_point(), copies
    int4 = name.startswith("w4")
    st = fused.records[-1].stats
    assert st["tied_tables"] == (1 if int4 else 0) and st["int4_embeddings"] == (1 if int4 else 0)
    assert count(gm, qops.GATHER_NBITS) == (1 if int4 else 0)
    # ONNX: verified in ORT, one initializer holds the table; a Transpose (int8) or Reshape (int4) is the lookup's view
    rep = fused.export_onnx(tmp_path / "tied.onnx")
    assert rep.verified, rep
    model = onnx.load(str(rep.path))
    table = _table_copies(model, V * H // 2)
    assert len(table) == 1, [(i.name, list(i.dims)) for i in table]
    assert table[0].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not [i for i in floats if np.prod(i.dims) >= V * H]
    view = next(n for n in model.graph.node if table[0].name in n.input and n.op_type in ("Transpose", "Reshape"))
    assert view.op_type == ("Reshape" if int4 else "Transpose")
    # ORT's lookup equals PyTorch's exactly (the same (q − z)·s), and its logits within float tolerance
    got_logits, got_e = OrtBackend(rep.path).run((ids2,))
    assert float(np.abs(got_e - e_fused.numpy()).max()) == 0.0
    assert float(np.abs(got_logits - l_fused.numpy()).max()) <= 1e-4 * float(l_fused.abs().max())
    ops = OrtBackend(rep.path).optimized_op_types()
    if int4:
        assert ops.get("MatMulNBits") == 2 and ops.get("GatherBlockQuantized", 0) == (0 if "float" in name else 1), ops
    else:
        assert "MatMul" not in ops, ops                                   # both linears still integer kernels


@pytest.mark.parametrize("name", ["w8-weight-only", "w4", "w4-float-zp"])
def test_file_is_the_float_table_smaller_than_with_the_table_kept_float(name, tmp_path):
    """``embeddings=false`` is what a tied table used to get (float lookup + quantized head): the difference
    between the two files is the float table, V·H·4 bytes, less at most the unsqueezed int8 scales."""
    m = TiedLM().eval()
    tied = _run(m, SCHEMES[name], ",fuse-qdq").export_onnx(tmp_path / "tied.onnx")
    kept = _run(m, SCHEMES[name] + ",embeddings=false", ",fuse-qdq").export_onnx(tmp_path / "kept.onnx")
    flt = fxopt.optimize(m, "cleanup", (_ids(),)).export_onnx(tmp_path / "fp32.onnx")
    init_bytes = lambda rep: sum(len(i.raw_data) for i in onnx.load(str(rep.path)).graph.initializer)  # noqa: E731
    saved = init_bytes(kept) - init_bytes(tied)
    assert V * H * 4 - V * 4 - 64 <= saved <= V * H * 4, saved       # the float table, less [V, 1] int8 scales
    # the file: the same, less the lookup's extra nodes (the float-zero-point rows are dequantized in ~15 ops)
    assert os.path.getsize(kept.path) - os.path.getsize(tied.path) >= 0.85 * V * H * 4
    assert len(_table_copies(onnx.load(str(kept.path)), V * H // 2)) == 2          # the float table + the head's codes
    assert os.path.getsize(tied.path) < 0.4 * os.path.getsize(flt.path)


def test_not_tied_tables_keep_their_own_quantization():
    m = TiedLM(tied=False).eval()
    for opts, qmin in (("scheme=w8-weight-only", -127), ("scheme=w4-weight-only,group=32", -8)):
        res = _run(m, opts)
        st, notes = res.records[-1].stats, res.records[-1].notes
        assert st["embeddings"] == 1 and st["tied_embeddings"] == 0 and not any("tied" in n for n in notes)
        q = [n for n in res.module.graph.nodes if n.target is qops.QUANTIZE and n.args[0].op == "get_attr"
             and n.args[0].target == "emb.weight"]
        assert len(q) == 1 and q[0].args[5] == qmin and "_qdq.emb_weight" in q[0].args[1].target


def test_tied_table_of_a_float_head_stays_float():
    m = TiedLM().eval()
    res = _run(m, "scheme=w4-weight-only,group=32,exclude=head")
    st, notes = res.records[-1].stats, res.records[-1].notes
    assert st["embeddings"] == 0 and st["tied_embeddings"] == 0 and st["kept_float"] == 2      # head, table
    assert any(": embedding table shared with another op (tied: " in n and "at head)" in n
               and n.endswith("reads it in float), kept in float") for n in notes), notes
    assert max_abs(outputs(res.module, (_ids(),))[1], m.emb(_ids())) == 0.0


def test_embedding_bits_other_than_the_heads_gives_the_lookup_its_own_copy(tmp_path):
    m = TiedLM().eval()
    res = _run(m, "scheme=w4-weight-only,group=32,embedding_bits=8", ",fuse-qdq")
    rec = res.records[1]
    assert rec.stats["embeddings"] == 1 and rec.stats["tied_embeddings"] == 0
    assert any("embedding_bits=8: the lookups get an int8 copy of their own" in n for n in rec.notes)
    rep = res.export_onnx(tmp_path / "two.onnx")
    assert rep.verified and len(_table_copies(onnx.load(str(rep.path)), V * H // 2)) == 2


def test_optimize_leaves_the_callers_model_alone():
    m = TiedLM().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = _ids()
    ref = m(ids)
    for opts in (SCHEMES["w4"], SCHEMES["w8-weight-only"]):
        _run(m, opts, ",fuse-qdq")
    assert m.head.weight is m.emb.weight
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(m(ids), ref))


def test_hf_llama_tied_head(tmp_path):
    """A tiny HF Llama with ``tie_word_embeddings=True`` (capture keeps one get_attr for both uses)."""
    import transformers as tf
    tf.logging.set_verbosity_error()
    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=V, num_hidden_layers=1, max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids()
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = fxopt.optimize(model, "insert-qdq{scheme=w4-weight-only,group=32},fuse-qdq", ex)
    rec = res.records[1]
    assert "lm_head.weight: embedding tied to lm_head: lookups read lm_head's int4 codes" in " ".join(rec.notes)
    assert rec.stats["embeddings"] == 1 and res.records[-1].stats["tied_tables"] == 1
    rep = res.export_onnx(tmp_path / "llama.onnx")
    assert rep.verified
    assert len(_table_copies(onnx.load(str(rep.path)), V * H // 2)) == 1
