"""What ``optimize`` does with unusual inputs: caches, bf16/fp16 models, bad calibration batches.

Every case checks that the caller's model and inputs are unchanged afterwards, whether
``optimize`` succeeds or raises.
"""
import copy
import inspect
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import get_attr, set_attr
from fxopt.ir.capture import CaptureError
from fxopt.ir.graph import ExampleInputs
from fxopt.passes import Pass, PassContext, PassResult, PostconditionError, measure_drift, register_pass
from fxopt.passes.base import PassError

from tests.helpers import max_abs, outputs

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def prefill_cache(model, seq: int = 8):
    """A DynamicCache of ``seq`` steps, and the name of the forward's cache argument."""
    ids = torch.randint(1, 128, (1, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return cache, name


def cache_state(cache):
    return [(type(layer.keys), type(layer.values), layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def assert_cache_unchanged(cache, state, seq: int = 8):
    assert cache.get_seq_length() == seq
    for layer, (tk, tv, k, v) in zip(cache.layers, state):
        assert type(layer.keys) is torch.Tensor and type(layer.values) is torch.Tensor   # no FakeTensor left
        assert (tk, tv) == (torch.Tensor, torch.Tensor)
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


@pytest.fixture
def registered_cache():
    """DynamicCache registered as a pytree node for this test only (the registration is global)."""
    import torch.fx._pytree as fx_pytree
    import torch.utils._pytree as pytree
    from transformers import DynamicCache
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    was = DynamicCache in pytree.SUPPORTED_NODES
    register_dynamic_cache_export_support()
    yield
    if not was:
        pytree._deregister_pytree_node(DynamicCache)
        fx_pytree._deregister_pytree_flatten_spec(DynamicCache)


def state_dict_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, sd):
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(now[k].dtype == sd[k].dtype and torch.equal(now[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- 1. caches are copied


def test_cache_input_unchanged_when_capture_fails():
    model = tiny_llama()
    cache, name = prefill_cache(model)
    state, sd = cache_state(cache), state_dict_copy(model)
    step = {"input_ids": torch.tensor([[5]]), name: cache, "use_cache": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(CaptureError) as info:
            fxopt.optimize(model, "cleanup", step)
        assert_cache_unchanged(cache, state)
        assert_same_state(model, sd)
        assert "register_dynamic_cache_export_support()" in str(info.value)     # what to do
        with torch.no_grad():                                    # eager calls still compute real logits
            out = model(input_ids=torch.tensor([[5]]), **{name: copy.deepcopy(cache)}, use_cache=True)
    assert type(out.logits) is torch.Tensor and torch.isfinite(out.logits).all()


def test_cache_input_unchanged_and_drift_measured_when_capture_succeeds(registered_cache):
    model = tiny_llama()
    cache, name = prefill_cache(model)
    state, sd = cache_state(cache), state_dict_copy(model)
    step = {"input_ids": torch.tensor([[5]]), name: cache, "use_cache": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        res = fxopt.optimize(model, "cleanup", step)
        assert_cache_unchanged(cache, state)
        assert_same_state(model, sd)
        # the decode step's drift is measured against a real eager run (it used to crash with
        # GuardOnDataDependentSymNode: the reference ran on the cache capture had filled with FakeTensors)
        assert all(r.drift_max == 0 for r in res.records)
        assert any("bound at capture" in n for n in res.records[0].notes)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([[5]]), **{name: copy.deepcopy(cache)}, use_cache=True).logits
    assert max_abs(outputs(res.module, {"input_ids": torch.tensor([[5]])})[0], want) < 1e-5
    assert_cache_unchanged(cache, state)


# --------------------------------------------------------------------------- 2. bf16 / fp16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_smoothquant_on_half_precision_models(name, dtype):
    lm = models.hf_tiny(name, layers=2, batch=2, seq=8)
    model = lm.model.to(dtype)
    sd = state_dict_copy(model)
    res = fxopt.optimize(model, "smoothquant", lm.example_inputs, calibration=[lm.example_inputs])
    rec = res.record("smoothquant")
    assert rec.modified and isinstance(rec.drift_max, float)
    # within the dtype's own rounding (see PassManager._exact_rtol), not float32's
    assert 0 <= rec.drift_rel <= 16 * torch.finfo(dtype).eps
    assert {p.dtype for p in res.module.parameters()} | {b.dtype for b in res.module.buffers()
                                                         if b.is_floating_point()} == {dtype}
    out = outputs(res.module, lm.example_inputs)[0]
    assert out.dtype == dtype
    assert_same_state(model, sd)


@register_pass
@dataclass
class _LyingExactHalf(Pass):
    """Declared exact, but scales the LM head by 1.25."""
    name: ClassVar[str] = "test-reliability-lying-exact"
    exact: ClassVar[bool] = True

    def call(self, gm, ctx):
        set_attr(gm, "head.weight", get_attr(gm, "head.weight") * 1.25)
        return PassResult(gm, True)


def test_half_precision_tolerance_still_catches_a_lying_exact_pass(tiny_gpt):
    model = copy.deepcopy(tiny_gpt.model).to(torch.bfloat16)
    with pytest.raises(PostconditionError, match=r"declared exact but changed the outputs.*for bfloat16"):
        fxopt.optimize(model, "test-reliability-lying-exact", tiny_gpt.example_inputs)


def test_drift_is_computed_in_float64():
    class Const(torch.nn.Module):
        def forward(self, x):
            return x

    ref = torch.tensor([256.0, 1.0], dtype=torch.bfloat16)
    out = torch.tensor([258.0, 1.0078125], dtype=torch.bfloat16)
    ctx = PassContext(example_inputs=ExampleInputs((out,)), reference_outputs=[ref])
    dmax, dmean, drel, problem = measure_drift(Const(), ctx)
    assert problem is None
    assert dmax == 2.0 and dmean == pytest.approx((2.0 + 0.0078125) / 2) and drel == pytest.approx(2.0 / 256)


# --------------------------------------------------------------------------- 3. drift never crashes


def test_drift_problem_is_a_note_not_a_crash():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot run")

    ctx = PassContext(example_inputs=ExampleInputs((torch.ones(2),)), reference_outputs=[torch.ones(2)])
    assert measure_drift(Broken(), ctx) == (None, None, None, "drift not measured: RuntimeError: cannot run")

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.ones(2)
    ctx = PassContext(example_inputs=ExampleInputs((torch.ones(2),)), reference_outputs=[fake])
    dmax, _, _, problem = measure_drift(torch.nn.Identity(), ctx)
    assert dmax is None and "FakeTensors" in problem


@register_pass
@dataclass
class _BreakGraph(Pass):
    """Leaves a graph that cannot run (the LM head gets the wrong shape)."""
    name: ClassVar[str] = "test-reliability-break"

    def call(self, gm, ctx):
        set_attr(gm, "head.weight", get_attr(gm, "head.weight")[:, :3].contiguous())
        return PassResult(gm, True)


@register_pass
@dataclass
class _BreakGraphExact(_BreakGraph):
    name: ClassVar[str] = "test-reliability-break-exact"
    exact: ClassVar[bool] = True


def test_unrunnable_graph_is_recorded_and_an_exact_pass_is_blamed(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "test-reliability-break", tiny_gpt.example_inputs)
    rec = res.record("test-reliability-break")
    assert rec.drift_max is None and any(n.startswith("drift not measured: RuntimeError") for n in rec.notes)
    with pytest.raises(PostconditionError, match="declared exact but the graph after it fails on the example inputs"):
        fxopt.optimize(tiny_gpt.model, "test-reliability-break-exact", tiny_gpt.example_inputs)


# --------------------------------------------------------------------------- 4. calibration batches


@pytest.fixture
def llama_lm():
    return models.hf_tiny("llama-tiny", layers=1, batch=2, seq=8)


def _raises_up_front(model, example, calib, match):
    with pytest.raises(PassError, match=match) as info:
        fxopt.optimize(model, "smoothquant", example, calibration=calib)
    assert info.type is PassError          # refused before capture, not by a pass (PassFailedError)
    return str(info.value)


def test_calibration_batch_missing_a_key(llama_lm):
    ex = llama_lm.example_inputs
    calib = [dict(ex), {"input_ids": ex["input_ids"]}]
    msg = _raises_up_front(llama_lm.model, ex, calib, r"calibration batch 1 is missing \['attention_mask'\]")
    assert "example_inputs is a dict with keys ['attention_mask', 'input_ids']" in msg
    assert list(calib[1]) == ["input_ids"]


def test_calibration_batch_of_another_form(llama_lm, tiny_gpt):
    ex = llama_lm.example_inputs
    msg = _raises_up_front(llama_lm.model, ex, [(ex["input_ids"], ex["attention_mask"])],
                           r"calibration batch 0 is 2 positional inputs")
    assert "example_inputs is a dict with keys ['attention_mask', 'input_ids']" in msg
    _raises_up_front(tiny_gpt.model, tiny_gpt.example_inputs, [{"input_ids": tiny_gpt.example_inputs[0]}],
                     r"calibration batch 0 is a dict with keys \['input_ids'\]; example_inputs is one tensor")


def test_calibration_batch_extra_keys_warn(llama_lm):
    ex = llama_lm.example_inputs
    batch = {**ex, "token_type_ids": torch.zeros_like(ex["input_ids"])}
    with pytest.warns(UserWarning, match=r"calibration batch 0 has keys example_inputs does not have: "
                                         r"\['token_type_ids'\]; they are ignored"):
        res = fxopt.optimize(llama_lm.model, "smoothquant", ex, calibration=[batch])
    assert res.record("smoothquant").modified
    assert "token_type_ids" in batch
