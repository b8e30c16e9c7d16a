import sys

import onnx
import pytest

from fxopt.cli import main

FACTORY = "tests.test_cli:make_model"


def make_model():
    import torch
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    return m, (torch.randn(2, 8),)


def test_passes_lists_the_registry(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "constant-folding" in out and "[exact]" in out and "cleanup" in out


def test_optimize_prints_the_table_and_graphs(capsys, tmp_path):
    assert main(["optimize", "tiny-gpt", "--passes", "cleanup", "--print-after-change", "--report",
                 "--dump", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "graph after 01 dce" in out and "constant-folding" in out and "params MiB" in out
    assert (tmp_path / "d" / "000_capture.txt").exists() and (tmp_path / "d" / "004_dce.txt").exists()


def test_optimize_with_onnx_and_bisect(capsys, tmp_path):
    assert main(["optimize", FACTORY, "--passes", "dce,cse", "--bisect", "1", "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "ORT vs PyTorch: max abs" in out
    onnx.checker.check_model(str(tmp_path / "m.onnx"))


def test_inspect(capsys):
    assert main(["inspect", "llama-tiny", "--structure"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.input_layernorm [rms_norm]" in out
    assert "['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj'] → ['model.layers.0.mlp.down_proj']" in out
    assert "shared parameters:" in out and "lm_head.weight" in out
    assert main(["inspect", "tiny-gpt", "--diff", "0", "4", "--ops", "--after", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- 00-capture" in out and "// graph after #1 dce" in out and "aten.linear.default×" in out


def test_export(capsys, tmp_path):
    assert main(["export", "gpt2-tiny", str(tmp_path / "g.onnx"), "--dynamic"]) == 0
    assert "ORT vs PyTorch" in capsys.readouterr().out
    dims = [d.dim_param for d in onnx.load(str(tmp_path / "g.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


def test_export_lowering_switches(capsys, tmp_path):
    assert main(["export", "bert-tiny", str(tmp_path / "b.onnx"), "--dynamic"]) == 0
    assert "scaled_dot_product_attention → com.microsoft.MultiHeadAttention" in capsys.readouterr().out
    assert any(n.op_type == "MultiHeadAttention" for n in onnx.load(str(tmp_path / "b.onnx")).graph.node)
    assert main(["export", "bert-tiny", str(tmp_path / "p.onnx"), "--dynamic", "--no-fused-attention"]) == 0
    assert "MultiHeadAttention" not in capsys.readouterr().out
    assert not any(n.op_type == "MultiHeadAttention" for n in onnx.load(str(tmp_path / "p.onnx")).graph.node)


def test_demo_on_the_builtin_model(capsys, tmp_path):
    from fxopt.backends import isa
    assert main(["demo", "--model", "tiny-gpt", "--repeats", "2", "--onnx", str(tmp_path / "d.onnx")]) == 0
    out = capsys.readouterr().out
    assert "ORT vs PyTorch check: PASS" in out and "ONNX Runtime" in out and "speed-up" in out
    first, second = out.splitlines()[:2]                 # the int8 target first, as in `fxopt env`
    assert first == f"cpu: {isa.detect().line()}" and second.startswith("int8 weights: ")


def test_version_is_one_line_with_the_int8_target(capsys, monkeypatch):
    from importlib.metadata import version
    monkeypatch.delenv("FXOPT_ISA", raising=False)
    from fxopt.backends import isa
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == f"fxopt {version('fxopt')} · int8 ISA {isa.detect().target}\n"
    monkeypatch.setenv("FXOPT_ISA", "avx2")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.rstrip("\n").endswith("· int8 ISA avx2 (FXOPT_ISA)")


@pytest.mark.parametrize("target, meaning", [
    ("avx512-vnni", "int8 weights: full s8 exact"),
    ("amx", "int8 weights: full s8 exact"),
    ("avx2", "int8 weights: 7-bit (|w| ≤ 64), VPMADDUBSW saturates"),
    ("portable", "int8 weights: 7-bit (|w| ≤ 64), VPMADDUBSW saturates"),
])
def test_env_prints_versions_and_the_int8_isa(capsys, monkeypatch, target, meaning):
    from importlib.metadata import version

    import onnxruntime
    import torch

    from fxopt.backends import isa
    monkeypatch.setenv("FXOPT_ISA", target)
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = dict(ln.split(None, 1) for ln in lines[:-1])
    assert rows["fxopt"] == version("fxopt") and rows["torch"] == torch.__version__
    assert rows["onnxruntime"] == onnxruntime.__version__ and rows["onnx"] == version("onnx")
    assert rows["transformers"] in (version("transformers"), "not installed")
    assert rows["cpu"] == isa.detect().line() and f"int8 ISA {target} (FXOPT_ISA)" in rows["cpu"]
    assert lines[-1] == meaning


def test_bad_isa_override_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setenv("FXOPT_ISA", "bogus")
    assert main(["env"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "fxopt: error: unknown int8 target 'bogus'" in err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 2 and "unknown int8 target 'bogus'" in capsys.readouterr().err


def test_leafspec_future_warning_is_silenced(tmp_path):
    import copy
    import warnings

    import torch.utils._pytree as pytree
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        copy.deepcopy(pytree.treespec_leaf())            # what exporting's graph copy does
        if not any("LeafSpec" in str(w.message) for w in seen):
            pytest.skip("this torch no longer warns about LeafSpec")
        seen.clear()
        assert main(["export", FACTORY, str(tmp_path / "m.onnx")]) == 0
        assert [str(w.message) for w in seen if "LeafSpec" in str(w.message)] == []
        copy.deepcopy(pytree.treespec_leaf())            # narrow: other FutureWarnings still show
        warnings.warn("something else", FutureWarning)
        assert [str(w.message) for w in seen] == ["something else"]


def test_gpt2_folder_without_tokenizer(capsys, tmp_path):
    from fxopt import models
    models.hf_tiny("gpt2-tiny", layers=1).model.save_pretrained(tmp_path / "gpt2")
    assert main(["optimize", str(tmp_path / "gpt2"), "--passes", "dce"]) == 0
    out, err = capsys.readouterr()
    assert f"model: GPT2LMHeadModel from {tmp_path / 'gpt2'}" in out and "captured" in out
    assert "note: no tokenizer in" in err and "random token ids (4×16, within vocab_size 128)" in err


def test_factory_in_the_current_folder(capsys, tmp_path, monkeypatch):
    (tmp_path / "fxopt_cli_factory.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "fxopt_cli_factory", raising=False)
    try:
        assert main(["optimize", "fxopt_cli_factory:make", "--passes", "dce"]) == 0
    finally:
        sys.modules.pop("fxopt_cli_factory", None)
    assert "model: fxopt_cli_factory:make" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["optimize", "no-such-model"], "unknown model"),
    (["optimize", "tiny-gpt", "--passes", "dce,,cse"], "empty item"),
    (["optimize", "tiny-gpt", "--passes", "smoothquantt"], "unknown pass"),
    (["optimize", "nosuchmodule_xyz:factory"], "cannot import"),
    (["export", "tiny-gpt", "/proc/fxopt/m.onnx"], "cannot"),
])
def test_errors_exit_2_with_a_message(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_console_script_entry_point():
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="console_scripts") if e.name == "fxopt"]
    assert eps and eps[0].value == "fxopt.cli:main"
    assert sys.modules["fxopt.cli"].main is main


def test_hf_model_folder(capsys, tmp_path):
    from fxopt import models
    lm = models.hf_tiny("bert-tiny", layers=1)
    lm.model.save_pretrained(tmp_path / "bert")
    assert main(["optimize", str(tmp_path / "bert"), "--passes", "dce"]) == 0
    out = capsys.readouterr().out
    assert "BertModel from" in out and "dce" in out
    assert main(["optimize", str(tmp_path)]) == 2
    assert "without config.json" in capsys.readouterr().err


def test_bad_record_key_is_a_clean_error(capsys):
    assert main(["inspect", "tiny-gpt", "--after", "9"]) == 2
    assert "no record #9" in capsys.readouterr().err


def test_written_files_get_the_usual_mode(tmp_path):
    import os
    assert main(["export", "tiny-gpt", str(tmp_path / "m.onnx")]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~mask


def test_generate_streams_tokens_and_reports_speed(tmp_path, capsys):
    from fxopt.cli import main
    assert main(["generate", "llama-tiny", "--max-new-tokens", "6", "--onnx", str(tmp_path / "d.onnx")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out[0].split()) == 6                                 # the streamed token ids (no tokenizer)
    assert out[-1].startswith("prefill ") and "decode" in out[-1] and "engine ONNX Runtime" in out[-1]
    assert (tmp_path / "d.onnx").exists()
