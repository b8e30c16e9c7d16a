import pytest
import torch

import fxopt
from fxopt import models
from fxopt.passes import PassError
from fxopt.passes.dce import DeadCodeElimination
from tests.helpers import max_abs, outputs


def test_optimize_result_surface(tiny_gpt, tmp_path):
    res = fxopt.optimize(tiny_gpt.model, ["dce", DeadCodeElimination(), "cse"], tiny_gpt.example_inputs)
    assert res.pipeline == "dce,dce,cse"
    assert res.record(0).name == "capture" and res.record("cse").index == 3
    assert res.record("dce").index == 2                      # the last of that name
    with pytest.raises(KeyError, match="no pass 'gptq'"):
        res.record("gptq")
    with pytest.raises(KeyError, match="no record #9"):
        res.record(9)
    (x,) = tiny_gpt.example_inputs
    assert max_abs(res(x), tiny_gpt.model(x)) == 0
    summary = res.summary()
    assert [s["pass"] for s in summary] == ["capture", "dce", "dce", "cse"]
    assert set(summary[1]) >= {"nodes", "param_bytes", "drift_max", "seconds", "notes", "status", "modified"}
    rep = res.export_onnx(tmp_path / "m.onnx")
    assert rep.verified


def test_diff_shows_what_a_pass_removed():
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "dce,cse,constant-folding", lm.example_inputs, dynamic=False)
    d = res.diff("cse", "constant-folding")
    assert d.startswith("--- 02-cse\n+++ 03-constant-folding")
    assert "-%cos = aten.cos.default" in d and "+%_folded_" in d
    assert res.diff(1, 1) == ""


def test_report_table_lists_every_pass(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "cleanup", tiny_gpt.example_inputs)
    lines = res.report().splitlines()
    assert lines[0].split()[:4] == ["#", "pass", "status", "nodes"]
    assert [ln.split()[1] for ln in lines[2:7]] == ["capture", "dce", "cse", "constant-folding", "dce"]


def test_optimize_input_errors(tiny_gpt):
    with pytest.raises(ValueError, match="needs example_inputs"):
        fxopt.optimize(tiny_gpt.model, "dce")
    with pytest.raises(PassError, match="unknown pass"):
        fxopt.optimize(tiny_gpt.model, "dce,nope", tiny_gpt.example_inputs)
    with pytest.raises(PassError, match="empty"):
        fxopt.optimize(tiny_gpt.model, "dce", tiny_gpt.example_inputs, calibration=[])
    with pytest.raises(PassError, match="wrap it in a list"):
        fxopt.optimize(tiny_gpt.model, "dce", tiny_gpt.example_inputs, calibration=tiny_gpt.example_inputs[0])


def test_no_passes_is_just_capture(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, None, tiny_gpt.example_inputs)
    assert len(res.records) == 1 and res.pipeline == ""


def test_hf_model_is_not_mutated():
    lm = models.hf_tiny("gpt2-tiny", layers=1)
    sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = fxopt.optimize(lm.model, "cleanup", lm.example_inputs)
    assert lm.model.config.use_cache is True
    assert all(torch.equal(sd[k], v) for k, v in lm.model.state_dict().items())
    out = lm.model(**lm.example_inputs)                      # still returns its cache
    assert out.past_key_values is not None
    assert max_abs(outputs(res.module, lm.example_inputs)[0], out.logits) < 1e-5


def test_non_tensor_keyword_inputs_are_bound():
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "cleanup", {**lm.example_inputs, "use_cache": False})
    assert res.records[0].drift_max == 0
    assert "use_cache" not in res.example_inputs.kwargs
    with_hidden = fxopt.optimize(lm.model, "dce", {**lm.example_inputs, "output_hidden_states": True})
    names = with_hidden.module.meta["fxopt_capture"].output_names
    assert names[0] == "logits" and names[1:] == [f"hidden_states_{i}" for i in range(2)]
