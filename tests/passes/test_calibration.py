import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import ExampleInputs, capture
from fxopt.ir.meta import CALIB_STATS
from fxopt.passes import PassFailedError
from fxopt.passes.base import PreconditionError
from fxopt.passes.calibration import channel_rms, check_batches, observe, tensor_range


def test_observe_matches_direct_statistics():
    lm = models.hf_tiny("bert-tiny", layers=1)
    gm = capture(lm.model, lm.example_inputs, dynamic=True)
    ln = [n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default][1]
    batches = []
    for seed in range(3):
        ids = torch.randint(1, 100, (2, 5 + seed), generator=torch.Generator().manual_seed(seed))
        batches.append(ExampleInputs.of({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    stats = observe(gm, batches, [ln], sample_rows=8, sample_values=64)[ln]
    # the same value, computed by running a graph that returns it
    outs = []
    for b in batches:
        interp = torch.fx.Interpreter(gm)
        env = {}
        orig = interp.run_node

        def grab(n, orig=orig):
            v = orig(n)
            env[n] = v
            return v
        interp.run_node = grab
        from fxopt.passes.calibration import flat_inputs
        interp.run(*flat_inputs(gm, b))
        outs.append(env[ln].reshape(-1, env[ln].shape[-1]))
    allx = torch.cat(outs)
    assert torch.allclose(stats.min, allx.amin(0)) and torch.allclose(stats.max, allx.amax(0))
    assert torch.allclose(stats.absmax_per_channel, allx.abs().amax(0))
    assert stats.num_batches == 3 and stats.extra["rows"].shape == (8, 64)
    # Wanda's per-channel norm, as an RMS over every row of every batch
    assert int(stats.extra["count"]) == allx.shape[0]
    assert torch.allclose(channel_rms(stats), allx.double().pow(2).mean(0).sqrt().float(), rtol=1e-6)
    assert CALIB_STATS.get(ln) is stats
    lo, hi = tensor_range(stats, "percentile", 50.0)
    assert lo > float(allx.min()) and hi < float(allx.max())


def test_bad_calibration_data_is_refused():
    with pytest.raises(PreconditionError, match="needs calibration data"):
        check_batches(None, "smoothquant")
    with pytest.raises(PreconditionError, match="empty"):
        check_batches([], "smoothquant")
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    with pytest.raises(PreconditionError, match="batch 1 input 'arg0' contains NaN"):
        check_batches([ExampleInputs.of((torch.randn(2, 8),)), ExampleInputs.of((x,))], "smoothquant")
    y = torch.randn(2, 8)
    y[0, 0] = float("inf")
    with pytest.raises(PreconditionError, match="contains inf"):
        check_batches([ExampleInputs.of((y,))], "insert-qdq")


def test_optimize_reports_bad_calibration(tiny_gpt):
    with pytest.raises(PassFailedError, match="smoothquant needs calibration data"):
        fxopt.optimize(tiny_gpt.model, "smoothquant", tiny_gpt.example_inputs)


def test_calibration_of_other_shapes_captures_dynamic(tiny_gpt):
    (idx,) = tiny_gpt.example_inputs
    calib = [(idx[:, :10],), (idx[:3, :20],)]
    res = fxopt.optimize(tiny_gpt.model, "smoothquant", tiny_gpt.example_inputs, calibration=calib)
    from fxopt.ir.meta import CAPTURE
    assert CAPTURE.get(res.module).dynamic_axes == {"idx": {0: "batch", 1: "seq"}}
    assert res.records[-1].modified


class FixedShape(torch.nn.Module):
    """Reshapes to constants: no dynamic capture exists for it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).reshape(2, 4, 8)


def test_a_model_without_dynamic_shapes_is_captured_static_with_a_note():
    from fxopt.ir.meta import CAPTURE
    x = torch.randn(2, 4, 8)
    res = fxopt.optimize(FixedShape(), "cleanup", (x,))
    assert CAPTURE.get(res.module).dynamic_axes == {}
    assert "dynamic axes: x dim 1 (seq) kept static at 4: the model fixes it" in res.records[0].notes
    with pytest.raises(fxopt.PassError, match=r"calibration batch 1: 'x' has shape \(1, 8, 8\), but dim 0 of the "
                                              r"captured graph is fixed at 2 .*Pad or cut"):
        fxopt.optimize(FixedShape(), "smoothquant", (x,), calibration=[(torch.randn(2, 4, 8),), (torch.randn(1, 8, 8),)])
