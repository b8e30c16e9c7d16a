import numpy as np
import onnx
import pytest
import torch

import fxopt
from fxopt import models
from fxopt._io import OutputPathError
from fxopt.backends import OrtBackend
from fxopt.ir import capture
from fxopt.lowering import LoweringError, export_onnx
from tests.helpers import outputs


def test_tiny_gpt_exports_and_matches(tiny_gpt, tmp_path):
    res = fxopt.optimize(tiny_gpt.model, "cleanup", tiny_gpt.example_inputs, dynamic=True)
    rep = res.export_onnx(tmp_path / "gpt.onnx")
    assert rep.verified and rep.max_abs < 1e-4
    model = onnx.load(str(rep.path))
    onnx.checker.check_model(model, full_check=True)
    assert rep.inputs == ["idx"] and rep.outputs == ["output"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    assert not list(tmp_path.glob(".*"))                  # no temp files left by the atomic write
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    # other batch and sequence sizes run in ORT and match
    idx = torch.randint(0, 256, (3, 17))
    got = OrtBackend(rep.path).run((idx,))[0]
    assert np.abs(got - outputs(res.module, (idx,))[0].numpy()).max() < 1e-4


def test_static_export_has_fixed_dims(tiny_gpt, tmp_path):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    rep = export_onnx(gm, tmp_path / "s.onnx", tiny_gpt.example_inputs)
    dims = [d.dim_value for d in onnx.load(str(rep.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == list(tiny_gpt.example_inputs[0].shape)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny", "llama-tiny", "mixtral-tiny"])
def test_hf_configs_match_in_onnx_runtime(name, tmp_path):
    lm = models.hf_tiny(name, layers=2)
    res = fxopt.optimize(lm.model, "cleanup", lm.example_inputs, dynamic=True)
    rep = res.export_onnx(tmp_path / f"{name}.onnx")
    assert rep.verified and rep.max_abs < 1e-4
    expected = {"bert-tiny": ["last_hidden_state", "pooler_output"]}.get(name, ["logits"])
    assert rep.outputs == expected
    # compare against the *original* HF model, not only the graph
    ids = torch.randint(1, 100, (3, 9))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    extra = {} if name == "bert-tiny" else {"use_cache": False}
    ref = outputs(lm.model, feeds, **extra)[0].numpy()
    got = OrtBackend(rep.path).run(feeds)[0]
    assert np.abs(got - ref).max() < 1e-4


def test_unwritable_path_fails_before_exporting(tiny_gpt, tmp_path):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="cannot create the folder"):
        export_onnx(gm, blocker / "model.onnx", tiny_gpt.example_inputs)
    with pytest.raises(OutputPathError, match="is a folder"):
        export_onnx(gm, tmp_path, tiny_gpt.example_inputs)


def test_read_only_folder(tiny_gpt, tmp_path):
    import os
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):            # root ignores permission bits
            pytest.skip("running as a user that can write read-only folders")
        with pytest.raises(OutputPathError, match="not writable"):
            export_onnx(gm, ro / "m.onnx", tiny_gpt.example_inputs)
    finally:
        ro.chmod(0o700)


def test_failed_export_keeps_the_old_file(tiny_gpt, tmp_path, monkeypatch):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old model")

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(LoweringError, match="exporter exploded"):
        export_onnx(gm, path, tiny_gpt.example_inputs)
    assert path.read_bytes() == b"old model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_verification_catches_a_wrong_graph(tiny_gpt, tmp_path, monkeypatch):
    """If ORT and PyTorch disagree, export_onnx says so instead of returning quietly."""
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    import fxopt.lowering.onnx_export as ox
    real = ox.call
    monkeypatch.setattr(ox, "call", lambda m, i: real(m, i) + 1.0)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old model")
    with pytest.raises(LoweringError, match=r"max \|Δ\| .* > atol \+ rtol·max\|y\|.*existing file is unchanged") as e:
        export_onnx(gm, path, tiny_gpt.example_inputs)
    assert "verify=False" in str(e.value)
    assert path.read_bytes() == b"old model"                 # verified before it replaces anything
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_quantized_verification_names_the_cosine_criterion(tmp_path, monkeypatch):
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(4, 16)
    res = fxopt.optimize(m, "insert-qdq,fuse-qdq", (x,), calibration=[(x,)])
    import fxopt.lowering.onnx_export as ox
    real = ox.call
    monkeypatch.setattr(ox, "call", lambda g, i: -real(g, i))
    with pytest.raises(LoweringError, match=r"row cosine mean -1.0+ < min_cos=0.995 .*export_onnx\(..., min_cos=...\)"):
        res.export_onnx(tmp_path / "q.onnx")


def test_path_that_takes_no_files_fails_before_exporting(tiny_gpt, monkeypatch):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported before checking the path"))
    with pytest.raises(OutputPathError, match="cannot write /proc/x.onnx"):
        export_onnx(gm, "/proc/x.onnx", tiny_gpt.example_inputs)


class StatefulCache(torch.nn.Module):
    """A cache kept in the model, as transformers' StaticCache does: each call writes one step."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("keys", torch.zeros(1, 16, 8))

    def forward(self, x, pos):
        self.keys.index_copy_(1, pos, self.proj(x))
        return self.keys.sum(1)


def test_graph_that_writes_its_buffers_is_refused(tmp_path):
    m = StatefulCache().eval()
    x, pos = torch.randn(1, 1, 8), torch.tensor([0])
    res = fxopt.optimize(m, "cleanup", (x, pos))
    path = tmp_path / "s.onnx"
    with pytest.raises(LoweringError, match=r"writes into its own buffers keys .*cache as inputs"):
        res.export_onnx(path)
    assert not path.exists()


def test_blocked_narrow_range_quantize_is_refused(tmp_path):
    class M(torch.nn.Module):
        def forward(self, x):
            s = torch.ones(2, 2)
            z = torch.zeros(2, 2, dtype=torch.int8)
            return torch.ops.fxopt.dequantize(torch.ops.fxopt.quantize(x, s, z, 1, 4, -7, 7), s, z, 1, 4)
    gm = capture(M(), (torch.randn(2, 8),))
    with pytest.raises(LoweringError, match="blocked quantize with the narrow range"):
        export_onnx(gm, tmp_path / "m.onnx", (torch.randn(2, 8),))


def test_matmul_nbits_zero_points_layout_is_what_onnx_runtime_reads():
    """One com.microsoft MatMulNBits node with fxopt's packing: ORT must compute x·((u − z)·s)ᵀ with the
    zero point of block b of row n in byte b // 2 of row n, low nibble first (rows padded separately)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fxopt.ir import qops
    torch.manual_seed(0)
    n, k, block = 3, 48, 16                                           # 3 blocks a row: odd, padded per row
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    z = torch.tensor([[1, 9, 14], [3, 12, 6], [15, 0, 7]], dtype=torch.uint8)
    s = torch.rand(n, 3) + 0.5
    x = torch.randn(2, k)
    w = (u.float() - z.float().repeat_interleave(block, 1)) * s.repeat_interleave(block, 1)
    ref = (x.double() @ w.double().t()).numpy()

    def ort_run(zp: np.ndarray) -> np.ndarray:
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=block)
        inits = [numpy_helper.from_array(qops.pack_uint4_blocks(u, block).numpy(), "B"),
                 numpy_helper.from_array(s.reshape(-1).numpy(), "S"), numpy_helper.from_array(zp, "Z")]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"A": x.numpy()})[0]

    packed = qops.pack_zero_points(z).numpy()
    assert packed.shape == (3, 2)
    scale = np.abs(ref).max()
    assert np.abs(ort_run(packed) - ref).max() <= 1e-5 * scale
    assert np.abs(qops.matmul_nbits(x, qops.pack_uint4_blocks(u, block), s.reshape(-1), k, n, 4, block,
                                    torch.from_numpy(packed)).numpy() - ref).max() <= 1e-5 * scale
    swapped = ((packed >> 4) | (packed << 4)).astype(np.uint8)        # high nibble first: a different matrix
    assert np.abs(ort_run(swapped) - ref).max() > 0.1 * scale
    flat = np.append(z.reshape(-1).numpy(), 0)                        # packed across rows: 5 bytes, refused
    with pytest.raises(Exception, match="zero_points"):
        ort_run((flat[0::2] | (flat[1::2] << 4)).astype(np.uint8))


def _distilbert(dtype):
    from transformers import DistilBertConfig, DistilBertModel
    torch.manual_seed(0)
    m = DistilBertModel(DistilBertConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128)).eval().to(dtype)
    ids = torch.randint(0, 256, (2, 16))
    return m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_float16_export_verifies_with_a_dtype_aware_tolerance(tmp_path):
    m, inputs = _distilbert(torch.float16)
    rep = fxopt.optimize(m, "cleanup", inputs, dynamic=True).export_onnx(tmp_path / "h.onnx")
    assert rep.verified and rep.max_rel < 4 * torch.finfo(torch.float16).eps


def test_bfloat16_export_says_what_to_do_and_writes_nothing(tmp_path):
    m, inputs = _distilbert(torch.bfloat16)
    path = tmp_path / "b.onnx"
    path.write_bytes(b"old")
    with pytest.raises(LoweringError, match=r"bfloat16.*model.float\(\).*verify=False"):
        fxopt.optimize(m, "cleanup", inputs, dynamic=True).export_onnx(path)
    assert path.read_bytes() == b"old"


def test_export_says_which_quantized_linears_have_no_integer_kernel(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(4, 16)
    res = fxopt.optimize(m, "insert-qdq{scheme=w8a8-dynamic},fuse-qdq", (x,))          # per token (the default)
    with pytest.warns(RuntimeWarning, match=r"2 quantized linears have no integer kernel.*granularity=tensor"):
        rep = res.export_onnx(tmp_path / "tok.onnx")
    assert any("no integer kernel" in n for n in rep.notes)
    res = fxopt.optimize(m, "insert-qdq{scheme=w8a8-dynamic,granularity=tensor},fuse-qdq", (x,))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rep = res.export_onnx(tmp_path / "tensor.onnx")
    assert not any("no integer kernel" in n for n in rep.notes)
