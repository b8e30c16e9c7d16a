import io
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fxopt
from fxopt.ir import capture, get_attr, set_attr
from fxopt.ir.graph import ExampleInputs
from fxopt.passes import (Bisect, Dump, NotApplicable, Pass, PassContext, PassFailedError, PassManager, PassResult,
                          PostconditionError, PreconditionError, PrintAfter, register_pass)


@register_pass
@dataclass
class _ScaleHead(Pass):
    """Lossy on purpose: scales the LM head, so outputs change."""
    name: ClassVar[str] = "test-scale-head"
    factor: float = 2.0

    def call(self, gm, ctx):
        set_attr(gm, "head.weight", get_attr(gm, "head.weight") * self.factor)
        return PassResult(gm, True, stats={"factor": self.factor})


@register_pass
@dataclass
class _LyingExact(_ScaleHead):
    name: ClassVar[str] = "test-lying-exact"
    exact: ClassVar[bool] = True


@register_pass
@dataclass
class _Crash(Pass):
    name: ClassVar[str] = "test-crash"

    def call(self, gm, ctx):
        for n in list(gm.graph.nodes):            # half-rewrites the graph, then fails
            if n.op == "call_function":
                n.meta["scribbled"] = True
        raise RuntimeError("boom at node linear_3")


@register_pass
@dataclass
class _Never(Pass):
    name: ClassVar[str] = "test-never"

    def requires(self, gm, ctx):
        raise NotApplicable("graph has no conv2d")

    def call(self, gm, ctx):  # pragma: no cover - never reached
        raise AssertionError


@register_pass
@dataclass
class _NeedsCalib(Pass):
    name: ClassVar[str] = "test-needs-calib"

    def requires(self, gm, ctx):
        if not ctx.calibration:
            raise PreconditionError("test-needs-calib: pass calibration=[batches] to optimize()")

    def call(self, gm, ctx):
        return PassResult(gm, False, notes=[f"{len(ctx.calibration)} batches"])


def test_records_describe_every_pass(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "dce,test-scale-head{factor=1.5},test-never", tiny_gpt.example_inputs)
    assert [r.name for r in res.records] == ["capture", "dce", "test-scale-head{factor=1.5}", "test-never"]
    cap, dce, scale, never = res.records
    assert cap.status == "captured" and cap.drift_max == 0
    assert dce.drift_max == 0 and dce.param_bytes <= cap.param_bytes and dce.ops
    assert scale.modified and scale.drift_max > 1e-3 and scale.drift_mean > 0 and scale.stats == {"factor": 1.5}
    assert never.status == "not-applicable" and not never.modified
    assert never.notes == ["not applied: graph has no conv2d"]
    assert never.graph == scale.graph                     # nothing changed
    assert all(r.seconds >= 0 for r in res.records)
    table = res.report()
    assert "test-scale-head{factor=1.5}" in table and "not-applicable" in table
    assert "+" in res.diff("capture", "dce") or res.diff("capture", "dce") == "" or "-" in res.diff("capture", "dce")


def test_exact_pass_that_changes_outputs_is_caught(tiny_gpt, tmp_path):
    with pytest.raises(PostconditionError, match=r"'test-lying-exact' is declared exact.*max \|Δ\|"):
        fxopt.optimize(tiny_gpt.model, "dce,test-lying-exact", tiny_gpt.example_inputs, reproducer_dir=tmp_path)
    assert (tmp_path / "failing_pass.txt").read_text().strip() == "test-lying-exact"
    res = fxopt.optimize(tiny_gpt.model, "test-lying-exact", tiny_gpt.example_inputs, check_exact=False)
    assert res.records[-1].drift_max > 0


def test_failure_names_the_pass_and_leaves_a_reproducer(tiny_gpt, tmp_path):
    with pytest.raises(PassFailedError) as ei:
        fxopt.optimize(tiny_gpt.model, "dce,cse,test-crash", tiny_gpt.example_inputs, reproducer_dir=tmp_path / "r")
    msg = str(ei.value)
    assert "pass #3 'test-crash' failed: RuntimeError: boom at node linear_3" in msg
    assert "passes before it: dce, cse" in msg and str(tmp_path / "r") in msg
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"pipeline.txt", "failing_pass.txt", "graph_before.txt", "graph_before.pt2", "inputs.pt", "repro.py",
            "error.txt"} <= files
    assert "boom" in (tmp_path / "r" / "error.txt").read_text()
    # the saved graph is the one *before* the failing pass and reloads
    gm = torch.export.load(tmp_path / "r" / "graph_before.pt2").module()
    (x,) = tiny_gpt.example_inputs
    assert torch.allclose(gm(x), tiny_gpt.model(x), atol=1e-5)


def test_precondition_error_is_reported(tiny_gpt):
    with pytest.raises(PassFailedError, match="pass calibration="):
        fxopt.optimize(tiny_gpt.model, "test-needs-calib", tiny_gpt.example_inputs)
    res = fxopt.optimize(tiny_gpt.model, "test-needs-calib", tiny_gpt.example_inputs,
                         calibration=[tiny_gpt.example_inputs, tiny_gpt.example_inputs])
    assert res.records[-1].notes == ["2 batches"]


def test_bisect_runs_only_the_first_n(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "dce,test-scale-head,cse", tiny_gpt.example_inputs, bisect=1)
    assert [r.status for r in res.records] == ["captured", "ran", "skipped", "skipped"]
    assert res.records[-1].notes == ["skipped by bisect"]
    (x,) = tiny_gpt.example_inputs
    assert torch.allclose(res.module(x), tiny_gpt.model(x), atol=1e-5)


def test_print_after_change_and_dump(tiny_gpt, tmp_path):
    buf = io.StringIO()
    gm = capture(tiny_gpt.model, tiny_gpt.example_inputs)
    ex = ExampleInputs.of(tiny_gpt.example_inputs)
    ctx = PassContext(example_inputs=ex, reference_outputs=[tiny_gpt.model(*ex.args).detach()])
    dump = Dump(tmp_path / "d")
    pm = PassManager("dce,test-never,cse", [PrintAfter(only_changed=True, stream=buf), dump])
    gm, recs = pm.run(gm, ctx)
    text = buf.getvalue()
    assert "graph after 01 dce" in text and "test-never" not in text
    assert [p.name for p in dump.written] == ["001_dce.txt", "002_test-never.txt", "003_cse.txt"]
    assert "not applied: graph has no conv2d" in (tmp_path / "d" / "002_test-never.txt").read_text()
    buf2 = io.StringIO()
    PassManager("dce,cse", [PrintAfter({"cse"}, stream=buf2)]).run(gm, ctx)
    assert "graph after 02 cse" in buf2.getvalue() and "01 dce" not in buf2.getvalue()


def test_modified_flag_is_truthful_at_a_fixed_point(tiny_gpt):
    res = fxopt.optimize(tiny_gpt.model, "cleanup,cleanup", tiny_gpt.example_inputs)
    second = res.records[5:]
    assert [r.name for r in second] == ["dce", "cse", "constant-folding", "dce"]
    assert not any(r.modified for r in second)
    assert len({r.graph for r in second}) == 1


def test_optimize_continues_on_a_graph_module(tiny_gpt):
    first = fxopt.optimize(tiny_gpt.model, "test-scale-head", tiny_gpt.example_inputs)
    second = fxopt.optimize(first.module, "dce", tiny_gpt.example_inputs)
    assert second.module.meta["fxopt_applied"] == ["test-scale-head", "dce"]
    assert first.module.meta["fxopt_applied"] == ["test-scale-head"]       # the input graph is not mutated
    assert second.records[0].drift_max == 0                                  # drift vs. the graph it was given


def test_reproducer_script_reruns_the_failing_pass(tiny_gpt, tmp_path, monkeypatch):
    import subprocess
    import sys
    from fxopt.passes.cse import CommonSubexpressionElimination

    def broken(self, gm, ctx):
        raise RuntimeError("cse broke")
    monkeypatch.setattr(CommonSubexpressionElimination, "call", broken)
    with pytest.raises(PassFailedError):
        fxopt.optimize(tiny_gpt.model, "dce,cse", tiny_gpt.example_inputs, reproducer_dir=tmp_path)
    # in a fresh process the real pass runs again on the saved graph
    proc = subprocess.run([sys.executable, str(tmp_path / "repro.py")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pass ran without error" in proc.stdout
