"""Pipelines as text that round-trips, MLIR style: ``"dce,smoothquant{alpha=0.5},fuse-qdq"``.

Grammar::

    pipeline := item ("," item)*
    item     := NAME ("{" option ("," option)* "}")?
    option   := KEY "=" VALUE          VALUE: no ",", "{" or "}"; lists are "a|b|c"

A NAME is a registered pass or a preset (a named pipeline, expanded in place). Option values
are converted with the pass dataclass's field types (``int``, ``float``, ``bool``, ``str``,
unions such as ``float | str`` for ``alpha=auto``, and ``tuple[str, ...]``). Formatting writes
only the options that differ from their defaults, so ``format(parse(t))`` is canonical and
``parse(format(parse(t))) == parse(t)``.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Iterable

from .base import Pass, PassError, get_pass_class

PRESETS: dict[str, str] = {
    "cleanup": "dce,cse,constant-folding,dce",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class PipelineSyntaxError(PassError):
    def __init__(self, text: str, pos: int, msg: str):
        self.text, self.pos = text, pos
        super().__init__(f"bad pipeline text at column {pos + 1}: {msg}\n  {text}\n  {' ' * pos}^")


def parse_pipeline(text: str) -> list[Pass]:
    """Text → pass objects (presets expanded)."""
    if not isinstance(text, str):
        raise TypeError(f"pipeline text must be a str, got {type(text).__name__}")
    items = _split_items(text)
    if not items:
        raise PipelineSyntaxError(text, 0, "empty pipeline: name at least one pass, e.g. 'cleanup' or 'dce'")
    passes: list[Pass] = []
    for start, item in items:
        m = _NAME.match(item)
        if not m:
            raise PipelineSyntaxError(text, start, f"expected a pass name, found {item[:12]!r}")
        name = m.group(0)
        rest = item[m.end():].strip()
        opts: dict[str, str] = {}
        if rest:
            if not (rest.startswith("{") and rest.endswith("}")):
                raise PipelineSyntaxError(text, start + m.end(), "options go in braces: name{key=value,...}")
            body = rest[1:-1].strip()
            if body:
                for part in body.split(","):
                    if "=" not in part:
                        raise PipelineSyntaxError(text, start + item.find(part), f"option {part.strip()!r} needs key=value")
                    k, v = part.split("=", 1)
                    k, v = k.strip(), v.strip()
                    if not _NAME.fullmatch(k) or not v:
                        raise PipelineSyntaxError(text, start + item.find(part), f"bad option {part.strip()!r}")
                    if k in opts:
                        raise PipelineSyntaxError(text, start + item.find(part), f"option {k!r} given twice")
                    opts[k] = v
        if name in PRESETS:
            if opts:
                raise PipelineSyntaxError(text, start, f"preset {name!r} takes no options")
            passes += parse_pipeline(PRESETS[name])
            continue
        passes.append(make_pass(name, opts))
    return passes


def _split_items(text: str) -> list[tuple[int, str]]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            if depth:
                raise PipelineSyntaxError(text, i, "nested '{'")
            depth += 1
        elif ch == "}":
            if not depth:
                raise PipelineSyntaxError(text, i, "unmatched '}'")
            depth -= 1
        elif ch == "," and depth == 0:
            items.append((start, text[start:i]))
            start = i + 1
    if depth:
        raise PipelineSyntaxError(text, len(text), "missing '}'")
    items.append((start, text[start:]))
    out = []
    for s, it in items:
        stripped = it.strip()
        if not stripped:
            if text.strip():
                raise PipelineSyntaxError(text, s, "empty item between commas")
            continue
        out.append((s + len(it) - len(it.lstrip()), stripped))
    return out


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """Build a registered pass from its name and (text or typed) options."""
    cls = get_pass_class(name)
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls) if fields else {}
    kwargs = {}
    for k, v in options.items():
        if k not in fields:
            raise PassError(f"pass {name!r} has no option {k!r}; its options are: "
                            f"{', '.join(fields) or '(none)'}")
        kwargs[k] = _convert(v, hints.get(k, str), name, k) if isinstance(v, str) else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PassError(f"pass {name!r}: {e}") from e


def _convert(v: str, tp, pname: str, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for sub in typing.get_args(tp):
            if sub is type(None):
                if v.lower() == "none":
                    return None
                continue
            try:
                return _convert(v, sub, pname, key)
            except PassError:
                continue
        raise PassError(f"pass {pname!r}: option {key}={v!r} is none of {tp}")
    if origin in (tuple, list):
        (sub, *_rest) = typing.get_args(tp) or (str,)
        vals = tuple(_convert(x, sub, pname, key) for x in v.split("|") if x)
        return vals if origin is tuple else list(vals)
    if origin is typing.Literal:
        if v in typing.get_args(tp):
            return v
        raise PassError(f"pass {pname!r}: option {key}={v!r} must be one of {list(typing.get_args(tp))}")
    if tp is bool:
        low = v.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise PassError(f"pass {pname!r}: option {key}={v!r} must be true or false")
    if tp is int:
        try:
            return int(v)
        except ValueError:
            raise PassError(f"pass {pname!r}: option {key}={v!r} must be an integer") from None
    if tp is float:
        try:
            return float(v)
        except ValueError:
            raise PassError(f"pass {pname!r}: option {key}={v!r} must be a number") from None
    return v


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "|".join(_format_value(x) for x in v)
    return str(v)


def format_pass(p: Pass) -> str:
    opts = p.options()
    if not opts:
        return p.name
    return p.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in opts.items()) + "}"


def format_pipeline(passes: Iterable[Pass]) -> str:
    return ",".join(format_pass(p) for p in passes)


def resolve(passes) -> list[Pass]:
    """``passes`` as given to optimize(): text, a list of names / texts / Pass objects, or None."""
    if passes is None:
        return []
    if isinstance(passes, str):
        return parse_pipeline(passes)
    if isinstance(passes, Pass):
        return [passes]
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out += parse_pipeline(p)
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        else:
            raise PassError(f"cannot use {p!r} as a pass: give a name, pipeline text or a Pass object")
    return out


def check_order(passes: list[Pass], already_applied: Iterable[str] = ()) -> None:
    """Enforce the order constraints passes declare (``run_after``, ``requires_passes``)."""
    names = [p.name for p in passes]
    applied = {t.split("{", 1)[0] for t in already_applied}
    for i, p in enumerate(passes):
        for before in p.run_after:
            if before in names[i + 1:] and before not in names[:i]:
                raise PassError(f"pipeline order: {p.name!r} must run after {before!r}, but {before!r} comes later: "
                                f"{','.join(names)}")
        for needed in p.requires_passes:
            if needed not in names[:i] and needed not in applied:
                raise PassError(f"pipeline order: {p.name!r} needs {needed!r} to have run before it; "
                                f"add {needed!r} earlier in the pipeline")
