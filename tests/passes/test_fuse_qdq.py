import numpy as np
import onnx
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.backends import OrtBackend
from fxopt.ir import qops
from fxopt.ir import get_attr
from fxopt.ir.meta import QLINEAR
from fxopt.passes.insert_qdq import InsertQDQ
from tests.helpers import count, hamlet_lines, max_abs, outputs


def _pooled(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def test_weights_become_int8_and_float_copies_are_freed(tiny_gpt):
    (idx,) = tiny_gpt.example_inputs
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq{embeddings=false},fuse-qdq", tiny_gpt.example_inputs,
                         calibration=[(idx,)])
    before, after = res.records[-2], res.records[-1]
    st = after.stats
    assert st["weights_prequantized"] == 9 and st["int8_linears"] == 9 and st["bytes_freed"] > 0
    assert count(res.module, torch.ops.aten.linear.default) == 0
    assert count(res.module, qops.QUANTIZE) == 9                          # activations only
    marked = [n for n in res.module.graph.nodes if QLINEAR.has(n)]
    assert len(marked) == 9 and {QLINEAR.get(n).scheme for n in marked} == {"w8a8-static"}
    assert QLINEAR.get(marked[0]).activation == "u8 per-tensor static"
    # the tied embedding keeps its float weight; the head reads an int8 copy
    emb = next(n for n in res.module.graph.nodes if n.target is torch.ops.aten.embedding.default)
    from fxopt.ir import get_attr
    assert torch.equal(get_attr(res.module, emb.args[0].target), tiny_gpt.model.tok.weight)
    # same function up to float-sum order (rare one-step rounding flips downstream)
    assert max_abs(outputs(res.module, (idx,))[0], outputs(before_module(tiny_gpt), (idx,))[0]) < 1.0
    assert after.drift_mean < 2 * before.drift_mean + 1e-3
    assert after.param_bytes < before.param_bytes


def before_module(lm):
    (idx,) = lm.example_inputs
    return fxopt.optimize(lm.model, "insert-qdq{embeddings=false}", lm.example_inputs, calibration=[(idx,)]).module


def test_requires_insert_qdq_first(tiny_gpt):
    with pytest.raises(fxopt.PassError, match="'fuse-qdq' needs 'insert-qdq'"):
        fxopt.optimize(tiny_gpt.model, "fuse-qdq", tiny_gpt.example_inputs)


def test_redundant_pairs_are_removed():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.tensor(0.1))
            self.register_buffer("z", torch.tensor(3, dtype=torch.uint8))

        def forward(self, x):
            q = qops.quantize(x, self.s, self.z, -1, 0, 0, 255)
            q2 = qops.quantize(qops.dequantize(q, self.s, self.z, -1, 0), self.s, self.z, -1, 0, 0, 255)
            return qops.dequantize(q2, self.s, self.z, -1, 0)
    x = torch.randn(4, 4)
    res = fxopt.optimize(M(), "insert-qdq{scheme=w8-weight-only},fuse-qdq", (x,))
    # insert-qdq finds no linear (a note); fuse-qdq still applies its own rules
    assert res.records[-1].stats["pairs_removed"] == 1
    assert count(res.module, qops.QUANTIZE) == 1 and max_abs(res.module(x), M()(x)) == 0


@pytest.mark.parametrize("pipeline, fused, absent", [
    ("insert-qdq,fuse-qdq", "MatMulIntegerToFloat", "MatMul"),
    ("insert-qdq{scheme=w8a8-dynamic,granularity=tensor},fuse-qdq", "DynamicQuantizeMatMul", "MatMul"),
    ("insert-qdq{scheme=w8-weight-only},fuse-qdq", "MatMulNBits", None),
    ("insert-qdq{scheme=w4-weight-only,group=32},fuse-qdq", "MatMulNBits", None),
])
def test_onnx_runtime_runs_integer_kernels(tiny_gpt, tmp_path, pipeline, fused, absent):
    (idx,) = tiny_gpt.example_inputs
    res = fxopt.optimize(tiny_gpt.model, pipeline, tiny_gpt.example_inputs, calibration=[(idx,)], dynamic=True)
    rep = res.export_onnx(tmp_path / "q.onnx")
    assert rep.verified and rep.quantized == pipeline.startswith("insert-qdq,") or "w8a8" in pipeline
    ops = OrtBackend(rep.path).optimized_op_types()
    assert ops.get(fused, 0) >= 8, ops                           # every block linear (the tied head may differ)
    if absent:                                                   # no float MatMul left on a weight
        assert ops.get(absent, 0) <= 4, ops                      # attention's own matmuls are float
    model = onnx.load(str(rep.path))
    int_inits = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    assert len(int_inits) >= 9                                   # weights stored as integers, not float + Quantize


@pytest.mark.parametrize("target", ["auto", "portable"])
def test_minilm_w8a8_static_smoothquant_within_budget(minilm, tmp_path, target):
    """The budget holds for this CPU's int8 form and for the portable one (7-bit weights, exact on
    AVX2): ORT computes what the graph computes on either kind of CPU."""
    from fxopt.backends import int8_gemm, isa
    from fxopt.ir.graph import get_attr
    from fxopt.lowering.int8_target import u8s8_weights

    tok = minilm.tokenizer
    lines = hamlet_lines(80)
    calib = [dict(tok(lines[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 32, 8)]
    evals = dict(tok(lines[40:72], padding=True, return_tensors="pt"))
    res = fxopt.optimize(minilm.model, f"smoothquant{{alpha=auto}},insert-qdq{{target={target}}},fuse-qdq",
                         minilm.example_inputs, calibration=calib, dynamic=True)
    weights = [get_attr(res.module, dq.args[0].target) for _, dq in u8s8_weights(res.module)]
    assert len(weights) >= 36
    if isa.weight_qmax(target) == 64:                   # no VPMADDUBSW pair can leave int16, whatever the input
        assert max(int8_gemm.worst_pair(w) for w in weights) <= 32767
    ref = _pooled(outputs(minilm.model, evals)[0], evals["attention_mask"])
    got = _pooled(outputs(res.module, evals)[0], evals["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, ref)
    assert float(cos.mean()) >= 0.99 and float(cos.min()) >= 0.98          # the accuracy budget
    rep = res.export_onnx(tmp_path / "minilm-w8a8.onnx", target=target)
    assert not any("re-rounded" in n for n in rep.notes)      # quantized for its target: nothing to fit at export
    fp32 = fxopt.optimize(minilm.model, "cleanup", minilm.example_inputs, dynamic=True).export_onnx(tmp_path / "f.onnx")
    assert rep.bytes <= 0.27 * fp32.bytes
    ort_out = torch.from_numpy(OrtBackend(rep.path).run(evals)[0])
    cos_ort = torch.nn.functional.cosine_similarity(_pooled(ort_out, evals["attention_mask"]), ref)
    assert float(cos_ort.mean()) >= 0.99 and float(cos_ort.min()) >= 0.98
    assert OrtBackend(rep.path).optimized_op_types().get("MatMulIntegerToFloat", 0) >= 36


def test_int4_embedding_tables_gather_packed_rows(tmp_path):
    lm = models.hf_tiny("bert-tiny", layers=1)
    pipe = "insert-qdq{scheme=w4-weight-only,group=32}"
    sim = fxopt.optimize(lm.model, pipe, lm.example_inputs)                  # simulated: DQ(table) then lookup
    fused = fxopt.optimize(sim.module, "fuse-qdq", lm.example_inputs)
    assert fused.records[-1].stats["int4_embeddings"] == 3                   # word, position, token type
    assert count(fused.module, qops.GATHER_NBITS) == 3 and count(fused.module, torch.ops.aten.embedding.default) == 0
    # packing is lossless: the packed lookup equals the simulated one bit for bit
    assert max_abs(outputs(fused.module, lm.example_inputs)[0], outputs(sim.module, lm.example_inputs)[0]) == 0.0
    # the table is 4 bits a value (+ one fp32 scale per 32), not float
    word = lm.model.embeddings.word_embeddings.weight
    packed = [fxopt.ir.graph.get_attr(fused.module, n.args[0].target) for n in fused.module.graph.nodes
              if n.op == "call_function" and n.target is qops.GATHER_NBITS]
    assert any(p.dtype == torch.uint8 and p.numel() * 2 == word.numel() for p in packed)
    # int4 quantization error of the table itself stays within the grid: |E − Ê| ≤ s/2 per block
    emb_ids = lm.example_inputs["input_ids"]
    rows = word[emb_ids].detach()
    s = (word.detach().reshape(word.shape[0], -1, 32).abs().amax(-1) / 7.0)[emb_ids].repeat_interleave(32, -1)
    got = qops.gather_nbits(packed[0], emb_ids, fxopt.ir.graph.get_attr(
        fused.module, [n for n in fused.module.graph.nodes if n.op == "call_function"
                       and n.target is qops.GATHER_NBITS][0].args[2].target), word.shape[1], 32)
    assert bool(((got - rows).abs() <= s / 2 + 1e-6).all())
    rep = fused.export_onnx(tmp_path / "e4.onnx")
    assert rep.verified
    ops = OrtBackend(rep.path).optimized_op_types()
    assert ops.get("GatherBlockQuantized", 0) == 3 and ops.get("MatMulNBits", 0) >= 6, ops


def test_embedding_bits_option():
    lm = models.hf_tiny("bert-tiny", layers=1)
    res = fxopt.optimize(lm.model, "insert-qdq{scheme=w4-weight-only,group=32,embedding_bits=8},fuse-qdq",
                         lm.example_inputs)
    assert res.records[-1].stats["int4_embeddings"] == 0 and count(res.module, qops.GATHER_NBITS) == 0
    with pytest.raises(fxopt.passes.base.PassError, match="embedding_bits must be 8, 4"):
        fxopt.passes.pipeline.resolve("insert-qdq{embedding_bits=3}")


class ShiftedMLP(torch.nn.Module):
    """48 → 32 → 8 with off-centre weights and constant groups; with group=16 the first linear has 3 blocks
    a row (odd: one padding nibble per row of zero points), the second 2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(48, 32), torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(32, 48) * 0.05 + 0.04)
            self.b.weight.copy_(torch.randn(8, 32) * 0.05 - 0.03)
            self.a.weight[0, :16] = 0.25                    # constant groups
            self.a.weight[1, 32:] = -0.1
            self.b.weight[2, :16] = 0.0

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_asymmetric_int4_packs_zero_points_and_runs_in_onnx_runtime(tmp_path):
    m = ShiftedMLP().eval()
    x = torch.randn(2, 5, 48)
    pipe = "insert-qdq{scheme=w4-weight-only,group=16,weight_symmetric=false}"
    sim = fxopt.optimize(m, pipe, (x,), dynamic=True)
    fused = fxopt.optimize(sim.module, "fuse-qdq", (x,), dynamic=True)
    st = fused.records[-1].stats
    assert st["int4_linears"] == 2 and count(fused.module, torch.ops.aten.linear.default) == 0
    from fxopt.ir.graph import get_attr
    nodes = [n for n in fused.module.graph.nodes if n.op == "call_function" and n.target is qops.MATMUL_NBITS]
    zps = [get_attr(fused.module, n.args[7].target) for n in nodes]
    assert [tuple(z.shape) for z in zps] == [(32, 2), (8, 1)] and all(z.dtype == torch.uint8 for z in zps)
    assert {QLINEAR.get(n).scheme for n in nodes} == {"w4-weight-only"}
    # the zero points are the Q/DQ graph's, packed: unpacking gives them back
    z_a = get_attr(sim.module, "_qdq.a.weight_zero_point")
    assert torch.equal(qops.unpack_zero_points(zps[0], 3), z_a) and int(z_a.max()) > 0
    # the fused graph computes the Q/DQ graph (float summation order aside)
    x2 = torch.randn(3, 7, 48)
    ref = outputs(sim.module, (x2,))[0]
    assert max_abs(outputs(fused.module, (x2,))[0], ref) <= 1e-5 * float(ref.abs().max())
    rep = fused.export_onnx(tmp_path / "asym4.onnx")
    assert rep.verified and not rep.quantized and rep.max_rel <= 1e-4
    got = OrtBackend(rep.path).run((x2,))[0]
    assert float(np.abs(got - ref.numpy()).max()) <= 1e-4 * float(ref.abs().max())
    be = OrtBackend(rep.path, optimized_model_path=tmp_path / "opt.onnx")
    ops = be.optimized_op_types()
    assert ops.get("MatMulNBits", 0) == 2 and "MatMul" not in ops and "DequantizeLinear" not in ops, ops
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    mm = [n for n in opt.graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) >= 4 and n.input[3] for n in mm)           # zero_points wired in ORT's graph
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in mm} == {4}


class _TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _on_q4_1_grid(m):
    """Put ``m.a``'s weight on llama.cpp Q4_1's grid: per 32 input columns, ``w = min + d·q``, ``d = (max − min)/15``."""
    with torch.no_grad():
        w = m.a.weight.view(32, 2, 32)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        m.a.weight.copy_((torch.round((w - lo) / d).clamp(0, 15) * d + lo).view(32, 64))
    return m


def test_float_zero_points_reproduce_a_q4_1_grid_and_run_in_onnx_runtime(tmp_path):
    m = _on_q4_1_grid(_TwoLayer().eval())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    ref = m(x).detach()
    fzp = "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false,weight_zero_point=float,include=a}"
    izp = "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false,include=a}"
    qdq = fxopt.optimize(m, fzp, (x,))
    fused = fxopt.optimize(m, fzp + ",fuse-qdq", (x,))
    int_zp = fxopt.optimize(m, izp + ",fuse-qdq", (x,))
    assert count(qdq.module, qops.QUANTIZE_AFFINE) == 1 and count(qdq.module, qops.DEQUANTIZE_AFFINE) == 1
    # the grid is reproduced: both ends of every group are grid points, so the error is float rounding only
    assert max_abs(qdq.module(x), ref) < 1e-5 and max_abs(fused.module(x), ref) < 1e-5
    assert max_abs(int_zp.module(x), ref) > 1e-3                    # integer zero points cannot hit the offsets
    mm = [n for n in fused.module.graph.nodes if n.target is qops.MATMUL_NBITS]
    assert len(mm) == 1 and get_attr(fused.module, mm[0].args[7].target).dtype == torch.float32
    assert fused.records[-1].stats["int4_linears"] == 1
    # ONNX: MatMulNBits with float zero points, ORT's result equal to the graph's
    rep = fused.export_onnx(tmp_path / "fzp.onnx", dynamic=False)
    assert rep.verified and rep.max_abs < 1e-5
    ops = OrtBackend(rep.path).optimized_op_types()
    assert ops.get("MatMulNBits") == 1, ops
    zp_inputs = [nd.input[3] for nd in onnx.load(str(rep.path)).graph.node if nd.op_type == "MatMulNBits"]
    inits = {i.name: i for i in onnx.load(str(rep.path)).graph.initializer}
    assert inits[zp_inputs[0]].data_type == onnx.TensorProto.FLOAT
    # the unfused Q/DQ form exports too (written out; ORT folds it on the constant weight)
    rep2 = qdq.export_onnx(tmp_path / "fzp-qdq.onnx", dynamic=False)
    assert rep2.verified and rep2.max_abs < 1e-5


def test_float_zero_point_option_is_validated():
    with pytest.raises(ValueError, match="weight_zero_point=float needs"):
        InsertQDQ(scheme="w4-weight-only", weight_zero_point="float")
    with pytest.raises(ValueError, match="weight_zero_point must be"):
        InsertQDQ(scheme="w4-weight-only", weight_symmetric=False, weight_zero_point="half")
