"""Weights on disk (fxopt.ir.offload) and layer-wise calibration (fxopt.passes.calibration)."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt._io import OutputPathError
from fxopt.ir import ExampleInputs, capture
from fxopt.ir.graph import attr_meta, clone, get_attr, parameter_bytes, set_attr
from fxopt.ir.offload import is_offloaded, materialize, offload_parameters
from fxopt.ir.structure import linears
from fxopt.passes.calibration import layer_key, observe
from tests.helpers import max_abs, outputs


def _batches(n=3, seq=16, vocab=120):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (2, seq), generator=g)
        out.append(ExampleInputs.of({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    return out


@pytest.fixture
def llama():
    lm = models.hf_tiny("llama-tiny", layers=4, width=128)
    return lm, capture(lm.model, lm.example_inputs)


def test_layerwise_statistics_equal_batch_statistics(llama):
    _, gm = llama
    nodes = [li.node.args[0] for li in linears(gm)]
    batches = _batches()
    rep_b, rep_l = {}, {}
    a = observe(gm, batches, nodes, sample_rows=8, sample_values=300, report=rep_b)
    b = observe(gm, batches, nodes, sample_rows=8, sample_values=300, layerwise=True, report=rep_l)
    assert set(a) == set(b) and len(a) == len(set(nodes))
    for n in a:
        assert torch.equal(a[n].min, b[n].min) and torch.equal(a[n].max, b[n].max), n.name
        assert torch.equal(a[n].extra["rows"], b[n].extra["rows"])
        assert torch.equal(a[n].extra["abs_values"], b[n].extra["abs_values"])
        assert a[n].num_batches == b[n].num_batches == 3
    assert rep_b["mode"] == "batch" and rep_l["mode"] == "layerwise"
    assert rep_l["segments"] >= 4                       # at least one segment per decoder layer
    keys = {layer_key(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert {f"model.layers.{i}" for i in range(4)} <= keys


def test_offloaded_graph_runs_from_files(llama, tmp_path):
    lm, gm = llama
    ref = outputs(gm, lm.example_inputs)
    nbytes = parameter_bytes(gm)
    om = offload_parameters(gm, tmp_path, min_bytes=1024)
    assert is_offloaded(gm) and om.files
    # the module holds meta tensors only for offloaded targets; bytes are still counted once per storage
    assert all(attr_meta(gm, t).is_meta for t in om.files)
    assert parameter_bytes(gm) == nbytes
    tgt = next(iter(om.files))
    assert not get_attr(gm, tgt).is_meta
    assert max_abs(outputs(gm, lm.example_inputs)[0], ref[0]) == 0.0
    # copy on write: a snapshot taken before a write still reads the old weight
    snap = clone(gm)
    old = get_attr(gm, tgt).clone()
    set_attr(gm, tgt, old * 2)
    assert torch.equal(get_attr(gm, tgt), old * 2) and torch.equal(get_attr(snap, tgt), old)
    assert max_abs(outputs(snap, lm.example_inputs)[0], ref[0]) == 0.0
    materialize(snap)
    assert not is_offloaded(snap) and not attr_meta(snap, tgt).is_meta
    assert max_abs(outputs(snap, lm.example_inputs)[0], ref[0]) == 0.0


def test_tied_weights_are_written_once(tmp_path):
    from fxopt.ir.structure import shared_parameters
    lm = models.tiny_gpt(layers=1)
    gm = capture(lm.model, lm.example_inputs)
    shared = sorted(tuple(sp.targets) for sp in shared_parameters(gm))
    om = offload_parameters(gm, tmp_path, min_bytes=1024)
    assert sorted(tuple(sp.targets) for sp in shared_parameters(gm)) == shared   # aliasing seen through the files
    tied = [t for t in om.files if t.endswith("tok.weight") or t.endswith("head.weight")]
    if len(tied) == 2:                                  # the graph reads both names
        assert om.files[tied[0]] == om.files[tied[1]]
    assert len(list(tmp_path.glob("*.pt"))) == len(set(om.files.values()))


def test_offload_folder_that_is_a_file_is_refused(llama, tmp_path):
    _, gm = llama
    f = tmp_path / "weights"
    f.write_text("not a folder")
    with pytest.raises(OutputPathError, match="offload folder"):
        offload_parameters(gm, f)


@pytest.mark.parametrize("pipe,tol", [("smoothquant{alpha=0.5}", 1e-5), ("insert-qdq{scheme=w8a8-static}", 0.0)])
def test_layerwise_offloaded_passes_match_in_memory(tmp_path, pipe, tol):
    lm = models.hf_tiny("llama-tiny", layers=4, width=128)
    calib = [b.kwargs for b in _batches()]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plain = fxopt.optimize(lm.model, pipe, lm.example_inputs, calibration=calib)
    lw = fxopt.optimize(lm.model, pipe, lm.example_inputs, calibration=calib, layerwise_calibration=True,
                        offload_dir=tmp_path / "w")
    assert is_offloaded(lw.module)
    a = outputs(plain.module, lm.example_inputs)[0]
    b = lw(**lm.example_inputs).logits
    assert max_abs(a, b) <= tol
    # the same rewrite, not merely close outputs: same groups smoothed / linears quantized, same weights
    for key in ("smoothed", "quantized"):
        assert plain.records[-1].stats.get(key) == lw.records[-1].stats.get(key)
    assert plain.records[-1].stats.get("smoothed", 1) > 0
    for t in sorted(fxopt.ir.graph.used_attr_targets(plain.module)):
        assert torch.equal(get_attr(plain.module, t), get_attr(lw.module, t)), t
    rep = lw.records[-1].stats["calibration"]
    assert rep["mode"] == "layerwise" and rep["weight_loads"] > 0
    # resident weights while calibrating: about one decoder layer, not the model
    assert rep["peak_weight_bytes"] < parameter_bytes(plain.module) / 2
    for k, v in lm.model.state_dict().items():          # the caller's model is untouched
        assert torch.equal(v, before[k])
