from dataclasses import dataclass
from typing import ClassVar

import pytest

from fxopt.passes import (Pass, PassError, PassResult, PipelineSyntaxError, check_order, format_pipeline,
                          parse_pipeline, register_pass, resolve)
from fxopt.passes.constant_folding import ConstantFolding


@register_pass
@dataclass
class _Opts(Pass):
    name: ClassVar[str] = "test-opts"
    alpha: float | str = 0.5
    bits: int = 8
    symmetric: bool = True
    exclude: tuple[str, ...] = ()

    def call(self, gm, ctx):
        return PassResult(gm, False)


@register_pass
@dataclass
class _After(Pass):
    name: ClassVar[str] = "test-after"
    run_after: ClassVar[tuple] = ("test-opts",)

    def call(self, gm, ctx):
        return PassResult(gm, False)


@register_pass
@dataclass
class _Needs(Pass):
    name: ClassVar[str] = "test-needs"
    requires_passes: ClassVar[tuple] = ("test-opts",)

    def call(self, gm, ctx):
        return PassResult(gm, False)


@pytest.mark.parametrize("text", [
    "dce",
    "dce,cse,constant-folding",
    "test-opts{alpha=0.8,bits=4}",
    "test-opts{alpha=auto,symmetric=false,exclude=lm_head|embed}",
    "constant-folding{max_bytes=1024},dce",
])
def test_round_trip(text):
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert parse_pipeline(format_pipeline(passes)) == passes


def test_options_are_typed_and_defaults_are_not_printed():
    (p,) = parse_pipeline(" test-opts{ bits = 4 , alpha=0.5, exclude=a|b } ")
    assert p.bits == 4 and p.alpha == 0.5 and p.exclude == ("a", "b") and p.symmetric is True
    assert format_pipeline([p]) == "test-opts{bits=4,exclude=a|b}"
    (q,) = parse_pipeline("test-opts{alpha=auto}")
    assert q.alpha == "auto"


def test_presets_expand():
    assert [p.name for p in parse_pipeline("cleanup")] == ["dce", "cse", "constant-folding", "dce"]
    assert [p.name for p in parse_pipeline("cse,cleanup")][:2] == ["cse", "dce"]


def test_resolve_accepts_lists_of_names_objects_and_text():
    passes = resolve(["dce", ConstantFolding(max_bytes=10), "cse,dce", ConstantFolding])
    assert format_pipeline(passes) == "dce,constant-folding{max_bytes=10},cse,dce,constant-folding"
    assert resolve(None) == []


@pytest.mark.parametrize("text, match", [
    ("", "empty pipeline"),
    ("dce,,cse", "empty item"),
    ("dce{", "missing '}'"),
    ("dce}", "unmatched"),
    ("test-opts{bits}", "key=value"),
    ("test-opts{bits=4,bits=5}", "given twice"),
    ("test-opts{a{b}=1}", "nested"),
    ("dce cse", "braces"),
    ("3dce", "pass name"),
])
def test_syntax_errors_point_at_the_column(text, match):
    with pytest.raises(PipelineSyntaxError, match=match) as ei:
        parse_pipeline(text)
    assert "^" in str(ei.value)


def test_unknown_pass_suggests_a_name():
    with pytest.raises(PassError, match=r"unknown pass 'cs'.*Did you mean 'cse'"):
        parse_pipeline("dce,cs")


def test_bad_option_values():
    with pytest.raises(PassError, match="no option 'beta'.*alpha"):
        parse_pipeline("test-opts{beta=1}")
    with pytest.raises(PassError, match="must be an integer"):
        parse_pipeline("test-opts{bits=eight}")
    with pytest.raises(PassError, match="true or false"):
        parse_pipeline("test-opts{symmetric=maybe}")
    with pytest.raises(PassError, match="preset 'cleanup' takes no options"):
        parse_pipeline("cleanup{x=1}")
    with pytest.raises(PassError, match="cannot use"):
        resolve([3])


def test_order_constraints():
    check_order(parse_pipeline("test-opts,test-after"))
    check_order(parse_pipeline("test-after"))                    # run_after binds only if both are present
    with pytest.raises(PassError, match="'test-after' must run after 'test-opts'"):
        check_order(parse_pipeline("test-after,test-opts"))
    with pytest.raises(PassError, match="'test-needs' needs 'test-opts'"):
        check_order(parse_pipeline("test-needs"))
    check_order(parse_pipeline("test-needs"), already_applied=["test-opts{bits=4}"])
