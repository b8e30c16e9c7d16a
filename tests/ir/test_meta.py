import pytest
import torch

from fxopt.ir import capture
from fxopt.ir.meta import ALL_KEYS, CAPTURE, NM_MASK, PROVENANCE, VAL, NMMask, describe, module_path, op_name


def _node(tiny_gpt):
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    return gm, next(n for n in gm.graph.nodes if module_path(n) == "blocks.0.fc1" and n.op == "call_function")


def test_keys_are_typed(tiny_gpt):
    gm, n = _node(tiny_gpt)
    PROVENANCE.set(n, "my-pass")
    assert PROVENANCE.get(n) == "my-pass" and PROVENANCE.has(n)
    with pytest.raises(TypeError, match="fxopt_provenance"):
        PROVENANCE.set(n, 3)
    with pytest.raises(TypeError, match="NMMask"):
        NM_MASK.set(n, {"n": 2})
    NM_MASK.set(n, NMMask(2, 4, "blocks.0.fc1.weight"))
    assert NM_MASK.pop(n).m == 4 and not NM_MASK.has(n)


def test_torch_keys_are_read_only(tiny_gpt):
    _, n = _node(tiny_gpt)
    assert isinstance(VAL.get(n), torch.Tensor)
    with pytest.raises(AttributeError, match="torch.export"):
        VAL.set(n, None)


def test_graph_level_key_and_descriptions(tiny_gpt):
    gm, n = _node(tiny_gpt)
    assert CAPTURE.get(gm).model_class.endswith("TinyGPT")
    assert describe(n) == f"'{n.name}' (aten.linear.default at blocks.0.fc1)"
    assert op_name(n) == "aten.linear.default"
    assert len({k.name for k in ALL_KEYS}) == len(ALL_KEYS)
    assert all(k.name.startswith("fxopt_") for k in ALL_KEYS if k.writable)
