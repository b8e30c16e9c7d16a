"""The real all-MiniLM-L6-v2: capture, cleanup and ONNX within 1e-4 of PyTorch on real text."""
import numpy as np
import torch

import fxopt
from fxopt.backends import OrtBackend
from tests.helpers import hamlet_lines, outputs


def _pooled(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def test_minilm_optimize_and_export_match_pytorch(minilm, tmp_path):
    res = fxopt.optimize(minilm.model, "cleanup", minilm.example_inputs, dynamic=True)
    assert res.records[0].ops["aten.linear.default"] == 37
    assert all(r.drift_max < 1e-5 for r in res.records)
    rep = res.export_onnx(tmp_path / "minilm.onnx")
    assert rep.verified and rep.max_abs < 1e-4
    assert rep.outputs == ["last_hidden_state", "pooler_output"]
    # new real text, another batch size and length: ORT vs. the original PyTorch model
    enc = dict(minilm.tokenizer(hamlet_lines(12)[5:12], padding=True, return_tensors="pt"))
    ref = outputs(minilm.model, enc)[0]
    got = torch.from_numpy(OrtBackend(rep.path).run(enc)[0])
    assert float((got - ref).abs().max()) < 1e-4
    cos = torch.nn.functional.cosine_similarity(_pooled(got, enc["attention_mask"]),
                                                _pooled(ref, enc["attention_mask"]), dim=-1)
    assert float(cos.min()) > 0.99999
    assert np.isfinite(got.numpy()).all()
