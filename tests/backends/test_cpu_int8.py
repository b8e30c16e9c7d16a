import pytest
import torch

import fxopt
from fxopt.backends import CpuInt8Backend
from fxopt.backends.cpu_int8 import _int8_linear, available
from tests.helpers import max_abs, outputs

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch build has no oneDNN integer kernels")


@pytest.mark.parametrize("pipeline", ["insert-qdq,fuse-qdq",
                                      "insert-qdq{scheme=w8a8-dynamic,granularity=tensor},fuse-qdq"])
def test_integer_gemms_match_the_reference(tiny_gpt, pipeline):
    (idx,) = tiny_gpt.example_inputs
    res = fxopt.optimize(tiny_gpt.model, pipeline, tiny_gpt.example_inputs, calibration=[(idx,)])
    b = CpuInt8Backend(res.module)
    assert b.notes[0].startswith("9 linears run as oneDNN u8×s8 GEMMs")
    calls = [n for n in b.module.graph.nodes if n.target is _int8_linear]
    assert len(calls) == 9
    ref = outputs(res.module, (idx,))[0]
    got = b.run((idx,))[0]
    # same integers, other float summation order: rare one-step rounding flips in later quantizers
    cos = torch.nn.functional.cosine_similarity(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    assert float(cos.mean()) > 0.9999 and float((got - ref).abs().mean()) < 1e-2 * float(ref.abs().mean())
    assert not any(n.target is torch.ops.aten.matmul.default for n in b.module.graph.nodes
                   if n.meta.get("fxopt_qlinear"))
    assert res.module.graph is not b.module.graph                      # the optimized graph is not touched


def test_per_token_linears_stay_in_reference_form(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq{scheme=w8a8-dynamic},fuse-qdq", tiny_gpt.example_inputs)
    b = CpuInt8Backend(res.module)
    assert b.notes[0].startswith("0 linears run as oneDNN u8×s8 GEMMs")
    assert b.notes[1:] == ["9 quantized linears have no integer kernel here (per-token or s8 activations, weight-only) "
                           "and run in the reference form"]
    (idx,) = tiny_gpt.example_inputs
    assert max_abs(b.run((idx,))[0], outputs(res.module, (idx,))[0]) == 0


def test_other_shapes_run_with_the_same_error(tiny_gpt):
    """Captured from one shape (dynamic by default), the integer backend takes others, as the graph does."""
    (idx,) = tiny_gpt.example_inputs
    res = fxopt.optimize(tiny_gpt.model, "insert-qdq,fuse-qdq", tiny_gpt.example_inputs, calibration=[(idx,)])
    b = CpuInt8Backend(res.module)
    for shape in (tuple(idx.shape), (3, 7), (1, 19)):
        x = torch.randint(0, 256, shape)
        ref, got = outputs(res.module, (x,))[0], b.run((x,))[0]
        assert got.shape == ref.shape
        cos = torch.nn.functional.cosine_similarity(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]))
        assert float(cos.mean()) > 0.9999
