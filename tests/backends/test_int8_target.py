"""int8 on every CPU: ISA detection, the exact AVX2 oracle, fitting weights to a target, file metadata."""
import json
import subprocess
import sys
import warnings

import onnx
import pytest
import torch
from onnx import numpy_helper

import fxopt
from fxopt.backends import OrtBackend, int8_gemm, isa
from fxopt.backends.cpu_int8 import available
from fxopt.lowering.int8_target import fit_int8_weights, max_weight


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 96)
        self.b = torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _w8a8(target: str):
    m = TwoLinears().eval()
    x = torch.randn(4, 10, 64)
    calib = [(torch.randn(4, 10, 64) * 2,) for _ in range(2)]
    return fxopt.optimize(m, f"insert-qdq{{target={target}}},fuse-qdq", (x,), calibration=calib, dynamic=True), x


# ---------------------------------------------------------------------------- detection


def test_targets_normalize_and_bad_names_are_refused():
    assert isa.normalize("VNNI") == "avx512-vnni" and isa.normalize("avx_vnni") == "avx-vnni"
    assert isa.weight_qmax("avx2") == isa.weight_qmax("portable") == isa.weight_qmax("avx512") == 64
    assert isa.weight_qmax("avx512-vnni") == isa.weight_qmax("amx") == isa.weight_qmax("arm-dotprod") == 127
    with pytest.raises(ValueError, match="unknown int8 target 'sse2'"):
        isa.normalize("sse2")


def test_detection_reads_flags_and_the_override(monkeypatch):
    assert isa._from_flags("x86_64", {"avx2", "fma"})[0] == "avx2"
    assert isa._from_flags("x86_64", {"avx2", "avx512bw"})[0] == "avx512"
    assert isa._from_flags("x86_64", {"avx2", "avx512bw", "avx512_vnni"})[0] == "avx512-vnni"
    assert isa._from_flags("x86_64", {"avx2", "avx_vnni"})[0] == "avx-vnni"
    assert isa._from_flags("x86_64", {"avx512_vnni", "amx_int8"})[0] == "amx"
    assert isa._from_flags("aarch64", {"asimd", "asimddp"})[0] == "arm-dotprod"
    assert isa._from_flags("aarch64", {"asimd", "asimddp", "i8mm"})[0] == "arm-i8mm"
    monkeypatch.setenv("FXOPT_ISA", "avx2")
    info = isa.detect()
    assert info.target == "avx2" and info.overridden and not info.exact_s8 and "FXOPT_ISA" in info.line()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("FXOPT_ISA")
    assert isa.onednn_target() in isa.SATURATING


# ---------------------------------------------------------------------------- the oracle


def test_avx2_emulation_saturates_pairs_and_is_exact_below_the_bound():
    a = torch.tensor([[255, 255, 255, 0]], dtype=torch.uint8)
    b = torch.tensor([[127], [127], [-127], [5]], dtype=torch.int8)
    assert int(int8_gemm.u8s8_gemm(a, b, "avx512-vnni")) == 255 * 127            # exact: 64770 − 32385
    assert int(int8_gemm.u8s8_gemm(a, b, "avx2")) == 32767 - 255 * 127             # first pair clamps to 32767
    assert int8_gemm.saturated_pairs(a, b) == 1 and int8_gemm.worst_pair(b) == 2 * 255 * 127
    torch.manual_seed(0)
    a = torch.randint(0, 256, (32, 256), dtype=torch.uint8)
    a[:4] = 255                                                                   # extreme activations too
    w = torch.randint(-64, 65, (256, 48), dtype=torch.int8)
    assert int8_gemm.worst_pair(w) <= 32767 and int8_gemm.saturated_pairs(a, w) == 0
    assert torch.equal(int8_gemm.u8s8_gemm(a, w, "avx2"), a.long() @ w.long())


ORACLE_CHECK = r"""
import json, torch
from fxopt.backends import int8_gemm
torch.manual_seed(0)
a = torch.randint(0, 256, (48, 384), dtype=torch.uint8)
out = {}
for qmax in (127, 64):
    w = torch.randint(-qmax, qmax + 1, (96, 384), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    y = torch.ops.onednn.qlinear_pointwise(a, 1.0, 3, packed, torch.ones(96), torch.zeros(96, dtype=torch.int64),
                                           None, 1.0, 0, torch.float32, "none", [], "")
    emu = int8_gemm.u8s8_matmul(a, 1.0, 3, w.t().contiguous(), torch.ones(96), "avx2")
    exact = int8_gemm.u8s8_matmul(a, 1.0, 3, w.t().contiguous(), torch.ones(96), "avx512-vnni")
    out[qmax] = [float((y - emu).abs().max()), float((y - exact).abs().max())]
print(json.dumps(out))
"""


@pytest.mark.skipif(not available(), reason="this PyTorch build has no oneDNN integer kernels")
def test_oracle_matches_onednn_avx2_kernel_bit_for_bit():
    """oneDNN capped to AVX2 computes exactly what the emulation says, saturation included."""
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    r = subprocess.run([sys.executable, "-c", ORACLE_CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["127"][0] == 0.0 and got["127"][1] > 1000        # full-range weights: saturated, as emulated
    assert got["64"] == [0.0, 0.0]                              # 7-bit weights: exact, and equal to VNNI


# ---------------------------------------------------------------------------- fitting and files


def test_fit_rerounds_only_what_can_saturate_and_leaves_the_callers_graph():
    res, x = _w8a8("avx512-vnni")
    assert max_weight(res.module) == 127
    from fxopt.ir.graph import graph_copy
    cp = graph_copy(res.module)
    assert fit_int8_weights(cp, "avx512-vnni") == 0
    assert fit_int8_weights(cp, "avx2") == 2 and max_weight(cp) == 64
    assert max_weight(res.module) == 127                        # parameters shared, never mutated
    ref, got = res.module(x), cp(x)
    cos = torch.nn.functional.cosine_similarity(ref.reshape(-1, 32), got.reshape(-1, 32))
    assert float(cos.min()) > 0.999
    res64, _ = _w8a8("avx2")
    assert max_weight(res64.module) == 64 and fit_int8_weights(graph_copy(res64.module), "avx2") == 0


def _int8_initializers(path):
    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8}, \
        {p.key: p.value for p in m.metadata_props}


def test_export_for_avx2_is_exact_on_every_cpu_and_says_so(tmp_path):
    res, x = _w8a8("avx512-vnni")                 # quantized for VNNI, shipped to an AVX2 fleet
    rep = res.export_onnx(tmp_path / "m.onnx", target="avx2")
    assert rep.target == "avx2" and rep.verified
    assert any("2 int8 weights re-rounded to [-64, 64] for target avx2" in n for n in rep.notes)
    inits, meta = _int8_initializers(rep.path)
    weights = [torch.from_numpy(w) for w in inits.values() if w.ndim == 2]
    assert len(weights) == 2 and max(int8_gemm.worst_pair(w) for w in weights) <= 32767
    assert meta["fxopt.int8_target"] == "avx2" and meta["fxopt.int8_requires"] == "any"
    # with these weights the AVX2 kernel is exact, so ORT here (any ISA) shows what AVX2 computes
    for x2 in (x, torch.randn(3, 7, 64) * 2, torch.randn(1, 1, 64)):   # other shapes: dynamic axes, same error
        got = torch.from_numpy(OrtBackend(rep.path).run((x2,))[0])
        ref = res.module(x2)
        assert got.shape == ref.shape
        cos = torch.nn.functional.cosine_similarity(got.reshape(-1, 32), ref.reshape(-1, 32))
        assert float(cos.mean()) > 0.999                      # the 7-bit re-rounding is the only difference


def test_vnni_file_records_its_need_and_warns_on_a_cpu_without_it(tmp_path, monkeypatch):
    res, x = _w8a8("avx512-vnni")
    rep = res.export_onnx(tmp_path / "v.onnx", target="vnni")
    _, meta = _int8_initializers(rep.path)
    assert meta["fxopt.int8_target"] == "avx512-vnni" and meta["fxopt.int8_requires"] == "int8-dot-product"
    assert meta["fxopt.int8_weight_max"] == "127"
    monkeypatch.setenv("FXOPT_ISA", "avx2")
    with pytest.warns(RuntimeWarning, match="target='portable'"):
        OrtBackend(rep.path)
    rep2 = res.export_onnx(tmp_path / "v2.onnx", target="vnni")   # exporting it on such a CPU: not verifiable here
    assert not rep2.verified and any("not verified in ONNX Runtime" in n for n in rep2.notes)
    monkeypatch.setenv("FXOPT_ISA", "amx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OrtBackend(rep.path)                                     # the right CPU: no warning


def test_auto_target_is_this_machine(tmp_path):
    res, x = _w8a8("auto")
    assert max_weight(res.module) == isa.weight_qmax("auto")
    rep = res.export_onnx(tmp_path / "a.onnx")
    assert rep.target == isa.detect().target and rep.verified and rep.mean_cos > 0.9999
