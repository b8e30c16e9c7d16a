"""sparse24: the 2:4 kernel lint (CPU), the graph rewrite (CPU, with the conversion stubbed), and the
real semi-structured backend (CUDA only, skipped here without a GPU)."""
import pytest
import torch

import fxopt
from fxopt.backends import BACKENDS, Sparse24Backend
from fxopt.backends import sparse24
from fxopt.backends.sparse24 import check_weight, constraints, lint, lint_report
from fxopt.ir import capture
from fxopt.ir.graph import clone, get_attr, to_device
from fxopt.models import tiny_gpt
from fxopt.passes.nm_sparsity import nm_mask

requires_cuda_sm80 = pytest.mark.skipif(sparse24.cuda_problem() is not None,
                                        reason=f"needs a CUDA GPU with sm80+: {sparse24.cuda_problem()}")


def _masked(out_f, in_f, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    return (w * nm_mask(w, 2, 4)).to(dtype)


def test_registered():
    assert BACKENDS["sparse24"] is Sparse24Backend


def test_constraints_come_from_installed_torch():
    # torch 2.13's tables (SparseSemiStructuredTensorCUSPARSELT / ...CUTLASS._DTYPE_SHAPE_CONSTRAINTS)
    cs, ct = constraints("cusparselt"), constraints("cutlass")
    assert cs[torch.float16] == (16, 16) and cs[torch.bfloat16] == (16, 16) and cs[torch.int8] == (32, 32)
    assert ct[torch.float16] == (32, 64) and ct[torch.int8] == (16, 128) and ct[torch.float32] == (32, 32)
    with pytest.raises(ValueError, match="unknown 2:4 kernel"):
        constraints("tensorrt")


def test_accepts_masked_fp16_weight():
    w = _masked(384, 1536, dtype=torch.float16)
    for kernel in ("cusparselt", "cutlass"):
        c = check_weight(w, kernel=kernel, path="ffn.out")
        assert c.accepted, c.reasons
        assert c.fixups == []
    c = check_weight(_masked(384, 1536), dtype=torch.bfloat16)       # float32 weight: accepted after a cast
    assert c.accepted and c.fixups == ["cast float32→bfloat16"]


def test_rejects_shapes_with_reasons():
    # cuSPARSELt fp16 needs multiples of 16; CUTLASS fp16 needs (32, 64)
    w = _masked(64, 96, dtype=torch.float16)
    assert check_weight(w, kernel="cusparselt").accepted
    c = check_weight(w, kernel="cutlass")
    assert not c.accepted
    assert c.reasons == ["in_features=96 is not a multiple of 64 (≥ 64) as cutlass needs for float16"]
    c = check_weight(_masked(40, 64, dtype=torch.float16), kernel="cusparselt", path="head")
    assert c.reasons == ["out_features=40 is not a multiple of 16 (≥ 16) as cusparselt needs for float16"]
    assert "head [40x64] cusparselt float16: REJECTED: out_features=40" in c.line()
    c = check_weight(_masked(32, 8, dtype=torch.float16), kernel="cusparselt")       # too small
    assert c.reasons == ["in_features=8 is not a multiple of 16 (≥ 16) as cusparselt needs for float16"]


def test_rejects_dense_pattern_and_counts_groups():
    w = torch.ones(32, 64, dtype=torch.float16)
    w[:, 1::4] = 0                                                    # 3 of 4 non-zero in every group
    c = check_weight(w)
    assert c.reasons == ["not 2:4 sparse: 512 of 512 groups of 4 have more than 2 non-zeros; run nm-sparsity{n=2,m=4} first"]
    w[:3, 2::4] = 0                                                   # rows 0..2 (3 x 16 groups) now 2:4
    assert "464 of 512 groups" in check_weight(w).reasons[0]


def test_rejects_dtypes():
    w = _masked(64, 64)
    c = check_weight(w, dtype=torch.float32, kernel="cusparselt")
    assert len(c.reasons) == 1 and c.reasons[0].startswith("dtype float32 is not supported by cusparselt")
    c = check_weight(w, dtype=torch.int8)
    assert c.reasons == ["weight is float32; a int8 kernel needs it quantized first (no quantizer here)"]
    # CUTLASS float32 stores 1:2, so a 2:4 mask is not enough there
    c = check_weight(w, dtype=torch.float32, kernel="cutlass")
    assert len(c.reasons) == 1 and c.reasons[0].startswith("not 1:2 sparse")
    c = check_weight(torch.zeros(2, 4, 16))
    assert c.reasons == ["weight is 3-D (2, 4, 16); the kernel takes 2-D matrices only"]


def test_non_contiguous_is_a_fixup():
    w = _masked(64, 64, dtype=torch.float16)
    wt = torch.empty(64, 64, dtype=torch.float16).t()               # non-contiguous view
    wt.copy_(w)
    c = check_weight(wt)
    assert c.accepted and c.fixups == ["copied to contiguous memory"]


def test_lint_on_tiny_gpt_after_nm_sparsity():
    lm = tiny_gpt(layers=2)
    res = fxopt.optimize(lm.model, "nm-sparsity", lm.example_inputs)
    checks = lint(res.module)
    by_path = {c.path: c for c in checks}
    assert len(checks) == 9                                          # 4 per block + the tied LM head
    masked = [c for c in checks if c.masked]
    assert len(masked) == 8 and all(c.accepted for c in masked)
    head = [c for c in checks if not c.masked]
    assert len(head) == 1 and not head[0].accepted                   # tied to the embedding: left dense
    assert head[0].reasons[0].startswith("not 2:4 sparse")
    assert by_path["blocks.0.qkv"].shape == (192, 64)
    report = lint_report(checks)
    assert report.splitlines()[0] == "2:4 sparse kernel lint: 8 of 9 linears accepted (cusparselt, float16)"
    assert "REJECTED" in report.splitlines()[1]                      # rejected first
    # CUTLASS fp16 needs in_features % 64 == 0: all of TinyGPT's (64, 256) pass
    assert sum(c.accepted for c in lint(res.module, kernel="cutlass")) == 8


def test_lint_on_real_minilm(minilm):
    res = fxopt.optimize(minilm.model, "nm-sparsity", minilm.example_inputs)
    checks = lint(res.module)
    assert len(checks) == 37 and all(c.accepted for c in checks)      # 384 / 1536: multiples of 16 and 64
    assert all(c.fixups == ["cast float32→float16"] for c in checks)


def test_rewrite_on_cpu_with_stub_conversion():
    """The backend's graph rewrite, checked on CPU: the conversion is replaced by a check that the
    weight it gets is 2:4 and in bfloat16 (CPU has no semi-structured kernels)."""
    torch.manual_seed(0)
    lm = tiny_gpt(layers=2)
    res = fxopt.optimize(lm.model, "nm-sparsity", lm.example_inputs)
    seen = []

    def convert(w):
        assert w.dtype == torch.bfloat16 and w.is_contiguous()
        assert check_weight(w, dtype=None).accepted
        seen.append(tuple(w.shape))
        return w.clone()

    before = {k: v.clone() for k, v in res.module.state_dict().items()}
    be = Sparse24Backend(res.module, dtype=torch.bfloat16, device="cpu", convert=convert)
    assert len(seen) == 8
    assert be.notes[0] == "8 of 9 linears run as 2:4 semi-structured sparse GEMMs (cusparselt, bfloat16)"
    assert be.notes[1:] == ["head: no N:M mask (nm-sparsity did not mark it), kept dense"]
    targets = [n.target for n in be.module.graph.nodes if n.op == "call_function"]
    assert targets.count(sparse24._sparse_linear) == 8
    # the caller's graph and tensors are untouched (still float32, same values)
    for k, v in res.module.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    out = be.run(lm.example_inputs)[0]
    with torch.no_grad():
        ref = res.module(*lm.example_inputs)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.03, err                                            # bfloat16 rounding, not a wrong rewrite


def test_backend_refuses_integer_dtype():
    lm = tiny_gpt(layers=1)
    gm = capture(lm.model, lm.example_inputs)
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.bfloat16"):
        Sparse24Backend(gm, dtype=torch.int8, device="cpu", convert=lambda w: w)


def test_backend_needs_cuda():
    if sparse24.cuda_problem() is None:
        pytest.skip("a capable GPU is present")
    lm = tiny_gpt(layers=1)
    gm = capture(lm.model, lm.example_inputs)
    with pytest.raises(RuntimeError, match="sparse24 backend: CUDA is not available"):
        Sparse24Backend(gm)


@requires_cuda_sm80
def test_semi_structured_on_gpu_matches_dense_fp16():
    torch.manual_seed(0)
    lm = tiny_gpt(layers=2)
    res = fxopt.optimize(lm.model, "nm-sparsity", lm.example_inputs)
    be = Sparse24Backend(res.module, dtype=torch.float16)
    assert be.notes[0].startswith("8 of 9 linears")
    w = get_attr(be.module, [n for n in be.module.graph.nodes if n.op == "get_attr" and "sparse24" in n.target][0].target)
    assert isinstance(w, torch.sparse.SparseSemiStructuredTensor)
    dense = to_device(clone(res.module), "cuda", torch.float16)
    with torch.no_grad():
        ref = dense(*(a.cuda() for a in lm.example_inputs))
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    out = be.run(lm.example_inputs)[0]
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()) < 5e-3
    graphed = Sparse24Backend(res.module, dtype=torch.float16, cuda_graph=True)
    other = [a.roll(1, -1) if a.dtype == torch.long else a for a in lm.example_inputs]
    for inputs in (lm.example_inputs, other, lm.example_inputs):      # replays see each call's inputs
        assert torch.equal(graphed.run(inputs)[0], be.run(inputs)[0])


def test_cuda_graph_needs_a_cuda_device():
    lm = tiny_gpt(layers=1)
    gm = capture(lm.model, lm.example_inputs)
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda'"):
        Sparse24Backend(gm, dtype=torch.bfloat16, device="cpu", convert=lambda w: w, cuda_graph=True)
