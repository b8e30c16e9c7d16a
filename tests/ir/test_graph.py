"""ir.graph.to_device: a captured graph moved with every constant and baked-in device."""
import torch

import fxopt
from fxopt.ir.graph import ExampleInputs, call, clone, flatten_tensors, to_device
from fxopt.models import hf_tiny


def _moved(ex: ExampleInputs, device: str) -> ExampleInputs:
    mv = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return ExampleInputs(tuple(mv(a) for a in ex.args), {k: mv(v) for k, v in ex.kwargs.items()})


def test_to_device_moves_baked_in_devices_and_constants():
    lm = hf_tiny("bert-tiny", 2, batch=2, seq=8, width=64)
    gm = fxopt.optimize(lm.model, "cleanup", lm.example_inputs).module
    baked = [n for n in gm.graph.nodes
             if any(isinstance(a, torch.device) for a in list(n.args) + list(n.kwargs.values()))]
    assert baked, "the captured BERT is expected to hold arange(device=cpu) / to(cpu) nodes"
    ex = _moved(ExampleInputs.of(lm.example_inputs), "meta")
    try:                                       # Module.to alone leaves those nodes on the CPU
        call(clone(gm).to("meta"), ex)
        plain_ok = True
    except (RuntimeError, NotImplementedError):
        plain_ok = False
    assert not plain_ok
    moved = to_device(clone(gm), "meta")
    outs = flatten_tensors(call(moved, ex))
    assert outs and all(o.is_meta for o in outs)
    assert not any(isinstance(a, torch.device) and a.type == "cpu"
                   for n in moved.graph.nodes for a in list(n.args) + list(n.kwargs.values()))


def test_to_device_casts_and_drops_dtype_asserts():
    lm = hf_tiny("bert-tiny", 2, batch=2, seq=8, width=64)
    gm = fxopt.optimize(lm.model, "cleanup", lm.example_inputs).module
    ex = ExampleInputs.of(lm.example_inputs)
    with torch.no_grad():
        ref = flatten_tensors(call(gm, ex))[0]
        out = flatten_tensors(call(to_device(clone(gm), "cpu", torch.bfloat16), ex))[0]
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.05     # bf16 rounding (measured ~0.01)
    assert all(p.dtype == torch.float32 for p in gm.parameters())              # the caller's graph is untouched
