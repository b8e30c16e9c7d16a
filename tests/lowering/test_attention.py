"""Export-time fused attention: SDPA → fxopt::attention → ONNX Runtime's MultiHeadAttention."""
import numpy as np
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.backends import OrtBackend
from fxopt.ir import capture
from fxopt.ir.attnops import ATTENTION, MASK_ADDITIVE, MASK_BOOL, MASK_NONE
from fxopt.lowering import export_onnx
from fxopt.ir.graph import graph_copy
from fxopt.lowering.attention import fuse_attention
from fxopt.passes._attention import SDPA


class Attn(torch.nn.Module):
    """Split heads, SDPA with the given mask, merge heads (the HF layout)."""

    def __init__(self, heads=4, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(32, -1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return o.transpose(1, 2).reshape(b, s, -1)


def _ref_sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_attention_op_is_sdpa_for_each_mask_kind():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    keep[0, 0, 2] = False                                    # a row that sees no key
    add = torch.randn(2, 3, 1, 5, generator=g)
    s = 8 ** -0.5
    assert torch.allclose(ATTENTION(q, k, v, None, s, 3, MASK_NONE), _ref_sdpa(q, k, v, None), atol=1e-6)
    assert torch.allclose(ATTENTION(q, k, v, add, s, 3, MASK_ADDITIVE), _ref_sdpa(q, k, v, add), atol=1e-6)
    got = ATTENTION(q, k, v, keep, s, 3, MASK_BOOL)
    ok = keep.any(-1).expand(2, 3, 5)
    assert torch.allclose(got[ok], _ref_sdpa(q, k, v, keep)[ok], atol=1e-6)
    assert torch.equal(got[0, :, 2], torch.zeros(3, 8))      # zeros, as the fused op gives, not NaN


@pytest.mark.parametrize("kind", ["bool", "float", "none"])
def test_exported_multi_head_attention_matches_pytorch(kind, tmp_path):
    torch.manual_seed(0)
    m = Attn().eval()
    x = torch.randn(2, 6, 32)
    mask = {"bool": torch.rand(2, 1, 6, 6) > 0.4, "float": torch.randn(2, 4, 6, 6), "none": None}[kind]
    if kind == "bool":
        mask[1, 0, 3] = False                                # fully masked row: zeros in both
    ex = (x,) if mask is None else (x, mask)
    gm = capture(m, ex)
    rep = export_onnx(gm, tmp_path / "a.onnx", ex, dynamic=False)
    assert rep.verified and rep.max_abs < 1e-5
    assert rep.notes[0] == "1 scaled_dot_product_attention → com.microsoft.MultiHeadAttention"
    ort_ops = OrtBackend(rep.path).optimized_op_types()
    assert ort_ops.get("MultiHeadAttention") == 1 and "Softmax" not in ort_ops
    assert "Transpose" not in ort_ops or kind == "bool"      # ORT cancels the head split/merge transposes
    # the caller's graph still has its SDPA
    assert any(n.target is SDPA for n in gm.graph.nodes)


def test_causal_without_a_mask_is_unidirectional(tmp_path):
    torch.manual_seed(0)
    m = Attn(causal=True).eval()
    x = torch.randn(2, 6, 32)
    gm = capture(m, (x,), dynamic=True)
    rep = export_onnx(gm, tmp_path / "c.onnx", (x,))
    assert rep.verified and rep.max_abs < 1e-5 and rep.notes[0].startswith("1 scaled_dot_product_attention")
    assert OrtBackend(rep.path).optimized_op_types().get("MultiHeadAttention") == 1
    x2 = torch.randn(3, 11, 32)                               # other shapes: the causal pattern follows the length
    got = OrtBackend(rep.path).run((x2,))[0]
    assert np.abs(got - m(x2).detach().numpy()).max() < 1e-5


class CausalMasked(Attn):
    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(32, -1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask,
                                                             dropout_p=0.0, is_causal=False, enable_gqa=False)
        return o.transpose(1, 2).reshape(b, s, -1)


def test_not_eligible_stays_sdpa_with_a_note(tmp_path):
    torch.manual_seed(0)
    m = CausalMasked().eval()
    x, mask = torch.randn(2, 6, 32), torch.ones(6, 6, dtype=torch.bool).tril()     # a rank-2 mask
    gm = capture(m, (x, mask))
    fused, notes = fuse_attention(graph_copy(gm))
    assert fused == 0 and "rank 4" in notes[0]
    rep = export_onnx(gm, tmp_path / "c.onnx", (x, mask), dynamic=False)
    assert rep.verified and "MultiHeadAttention" not in OrtBackend(rep.path).optimized_op_types()


@pytest.mark.parametrize("name", ["bert-tiny", "llama-tiny"])
def test_hf_models_with_padding_fuse_and_match(name, tmp_path):
    lm = models.hf_tiny(name, layers=2)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                          # padding: the mask matters
    feeds = {"input_ids": ids, "attention_mask": mask}
    res = fxopt.optimize(lm.model, "cleanup", feeds, dynamic=True)
    rep = res.export_onnx(tmp_path / f"{name}.onnx")
    assert rep.verified and rep.max_abs < 1e-4
    assert rep.notes[0] == "2 scaled_dot_product_attention → com.microsoft.MultiHeadAttention"
    assert OrtBackend(rep.path).optimized_op_types().get("MultiHeadAttention") == 2
    off = res.export_onnx(tmp_path / f"{name}-off.onnx", fused_attention=False)
    assert "MultiHeadAttention" not in OrtBackend(off.path).optimized_op_types()
    a, b = OrtBackend(rep.path).run(feeds)[0], OrtBackend(off.path).run(feeds)[0]
    assert np.abs(a - b)[mask.bool().numpy()].max() < 1e-4
