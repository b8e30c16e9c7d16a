import numpy as np
import pytest
import torch

from fxopt.backends import BACKENDS, OrtBackend, ReferenceBackend
from fxopt.ir import capture
from fxopt.lowering import export_onnx


def _compute_nodes(ops: dict[str, int]) -> int:
    """Nodes that compute (a Reshape only relabels a tensor's shape)."""
    return sum(v for k, v in ops.items() if k != "Reshape")


@pytest.fixture
def exported(tiny_gpt, tmp_path):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    return gm, export_onnx(gm, tmp_path / "m.onnx", tiny_gpt.example_inputs), tiny_gpt


def test_reference_runs_the_graph(exported):
    gm, _, lm = exported
    (out,) = ReferenceBackend(gm).run(lm.example_inputs)
    assert torch.equal(out, lm.model(*lm.example_inputs))
    assert set(BACKENDS) == {"reference", "ort", "cpu-int8", "sparse24"}


def test_ort_options_and_optimized_graph(exported, tmp_path):
    gm, rep, lm = exported
    opt_path = tmp_path / "opt.onnx"
    ort = OrtBackend(rep.path, threads=1, opt_level="all", optimized_model_path=opt_path)
    assert opt_path.exists()
    ops = ort.optimized_op_types()
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) + ops.get("Gemm", 0) > 0
    plain = OrtBackend(rep.path, opt_level="disable").optimized_op_types()
    # ORT's fusions shrink the graph; its MatMul+Add → Gemm fusion adds free Reshapes around each Gemm
    assert _compute_nodes(plain) > _compute_nodes(ops)
    ref = lm.model(*lm.example_inputs).detach().numpy()
    assert np.abs(ort.run(lm.example_inputs)[0] - ref).max() < 1e-4
    assert np.abs(ort.run({"idx": lm.example_inputs[0]})[0] - ref).max() < 1e-4


def test_ort_bad_input(exported, tmp_path):
    _, rep, _ = exported
    with pytest.raises(ValueError, match="opt_level"):
        OrtBackend(rep.path, opt_level="max")
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        OrtBackend(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="needs inputs"):
        OrtBackend(rep.path).run({"wrong": torch.zeros(1, 2, dtype=torch.long)})


def test_optimized_op_types_honours_the_level(exported):
    _, rep, _ = exported
    plain = OrtBackend(rep.path, opt_level="disable").optimized_op_types()
    full = OrtBackend(rep.path, opt_level="all").optimized_op_types()
    assert _compute_nodes(plain) > _compute_nodes(full)
