"""dce, cse, constant-folding: structure (before/after), numerics, the non-matching case, modified flag."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir import capture, get_attr
from fxopt.passes import PassContext
from fxopt.passes.constant_folding import ConstantFolding
from fxopt.passes.cse import CommonSubexpressionElimination
from fxopt.passes.dce import DeadCodeElimination
from tests.helpers import count, max_abs, outputs

aten = torch.ops.aten


class Redundant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.register_buffer("table", torch.arange(8.0))

    def forward(self, x):
        a = torch.relu(self.fc(x))
        b = torch.relu(self.fc(x))            # same computation twice
        dead = self.unused(x) * 3             # never used
        pos = (self.table * 2 + 1).exp()      # depends on a buffer only
        return a + b + pos


@pytest.fixture
def redundant():
    torch.manual_seed(0)
    m = Redundant().eval()
    x = torch.randn(2, 8)
    return m, x, capture(m, (x,))


def test_dce_removes_dead_nodes_and_unused_parameters(redundant):
    m, x, gm = redundant
    assert count(gm, aten.linear.default) == 3
    res = DeadCodeElimination()(gm)
    assert res.modified and count(gm, aten.linear.default) == 2
    assert not hasattr(gm.unused, "weight")                       # its parameters are gone
    assert res.stats["tensors_removed"] == 2 and "unused.weight" in res.notes[0]
    assert max_abs(gm(x), m(x)) == 0
    assert not DeadCodeElimination()(gm).modified                # fixed point


def test_cse_merges_identical_computations(redundant):
    m, x, gm = redundant
    res = CommonSubexpressionElimination()(gm)
    assert res.modified and res.stats["merged"] >= 2             # the second linear and relu (+ get_attr dups)
    DeadCodeElimination()(gm)
    assert count(gm, aten.linear.default) == 1 and count(gm, aten.relu.default) == 1
    assert max_abs(gm(x), m(x)) == 0
    assert not CommonSubexpressionElimination()(gm).modified


class InPlace(torch.nn.Module):
    def forward(self, x):
        a = x * 2
        y = a + 1
        a.add_(5)                     # mutates a between two identical computations
        z = a + 1
        return y, z


def test_cse_does_not_merge_across_mutation():
    x = torch.randn(4)
    m = InPlace()
    gm = capture(m, (x,))
    CommonSubexpressionElimination()(gm)
    y, z = gm(x)
    assert torch.allclose(z - y, torch.full_like(y, 5.0))


def test_cse_keeps_randomized_ops():
    class Rand(torch.nn.Module):
        def forward(self, x):
            return torch.rand_like(x) + torch.rand_like(x)
    gm = capture(Rand(), (torch.randn(3),))
    res = CommonSubexpressionElimination()(gm)
    assert count(gm, aten.rand_like.default) == 2 and not res.modified


def test_constant_folding_precomputes_buffer_only_values(redundant):
    m, x, gm = redundant
    res = ConstantFolding()(gm)
    assert res.modified and res.stats["folded"] == 1
    assert count(gm, aten.exp.default) == 0
    folded = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded")]
    assert len(folded) == 1 and folded[0].meta["fxopt_provenance"] == "constant-folding"
    assert torch.equal(get_attr(gm, folded[0].target), (torch.arange(8.0) * 2 + 1).exp())
    assert max_abs(gm(x), m(x)) == 0
    assert not ConstantFolding()(gm).modified


def test_constant_folding_respects_max_bytes(redundant):
    m, x, gm = redundant
    res = ConstantFolding(max_bytes=16)(gm)
    assert not res.modified and "too large" in res.notes[0]


def test_constant_folding_not_applicable_is_a_note():
    gm = capture(torch.nn.ReLU(), (torch.randn(3),))
    res = fxopt.optimize(torch.nn.ReLU(), "constant-folding", (torch.randn(3),))
    rec = res.records[-1]
    assert rec.status == "not-applicable" and "no node depends only on parameters" in rec.notes[0]
    assert gm is not None


def test_static_llama_masks_and_rotary_tables_fold_exactly():
    lm = models.hf_tiny("llama-tiny", layers=2)
    res = fxopt.optimize(lm.model, "cleanup", lm.example_inputs, dynamic=False)
    cap, last = res.records[0], res.records[-1]
    assert last.num_nodes < cap.num_nodes - 25                     # position ids, cos/sin tables, causal mask parts
    for op in ("aten.arange.default", "aten.cos.default", "aten.sin.default", "aten.cumsum.default"):
        assert last.ops.get(op, 0) == 0, op
    assert max(r.drift_max for r in res.records) < 1e-5
    ref = lm.model(**lm.example_inputs, use_cache=False).logits
    assert max_abs(outputs(res.module, lm.example_inputs)[0], ref) < 1e-5


def test_dynamic_graphs_keep_shape_dependent_nodes():
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "cleanup", lm.example_inputs, dynamic=True)
    assert res.records[-1].ops.get("aten.arange.default", 0) >= 1      # depends on seq: not folded
    ids = torch.randint(1, 100, (3, 11))
    new = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = lm.model(**new, use_cache=False).logits
    assert max_abs(outputs(res.module, new)[0], ref) < 1e-5


def test_cleanup_on_every_hf_architecture_is_exact(hf_model):
    res = fxopt.optimize(hf_model.model, "cleanup", hf_model.example_inputs)
    assert all(r.drift_max is not None and r.drift_max < 1e-5 for r in res.records)
    assert res.records[-1].num_nodes <= res.records[0].num_nodes


def test_passes_run_without_a_context(redundant):
    _, x, gm = redundant
    assert DeadCodeElimination().call(gm, PassContext()).modified


def test_constant_folding_leaves_quantizers_and_drops_settled_checks():
    from fxopt.ir import qops
    lm = models.hf_tiny("llama-tiny", layers=1)
    res = fxopt.optimize(lm.model, "dce,cse,constant-folding", lm.example_inputs, dynamic=False)
    cap, folded = res.records[0], res.records[-1]
    consts = [n for n in res.module.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded")]
    assert consts and all(any(u.target is not torch.ops.aten._assert_tensor_metadata.default for u in n.users)
                          for n in consts)                           # no constant that only an assert reads
    assert folded.ops.get("aten._assert_tensor_metadata.default", 0) < cap.ops["aten._assert_tensor_metadata.default"]

    class W(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.register_buffer("s", torch.full((4,), 0.05))
            self.register_buffer("z", torch.zeros(4, dtype=torch.int8))

        def forward(self, x):
            w = qops.dequantize(qops.quantize(self.w, self.s, self.z, 0, 0, -127, 127), self.s, self.z, 0, 0)
            return x @ w.t()
    gm = capture(W(), (torch.randn(2, 4),))
    assert not ConstantFolding()(gm).modified
    assert count(gm, qops.QUANTIZE) == 1
