"""write_genai_folder: an fxopt ONNX decoder that onnxruntime_genai loads and decodes greedily like transformers."""
import json

import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir.decoder import DecoderLayout
from fxopt.lowering.genai import GenAIError, genai_names, write_genai_folder

og = pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")

PROMPT = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
NEW = 20


def _tokenizer():
    """A character-level BPE tokenizer (95 printable ASCII + 3 specials) within the tiny vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({chr(c): 3 + i for i, c in enumerate(range(32, 127))})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _decoder(name: str, tmp):
    """A tiny random HF LM (weights widened so greedy output does not settle on one token), captured and exported."""
    lm = models.hf_tiny(name, layers=2)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    res = fxopt.optimize(lm.model, "cleanup", PROMPT, task="text-generation")
    path = tmp / f"{name}.onnx"
    res.export_onnx(path)
    return lm.model, res, path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _decoder("llama-tiny", tmp_path_factory.mktemp("genai"))


def _hf(model, ids, n, eos):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)


def _og(folder, ids, max_length):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, batch_size=ids.shape[0])  # else rows concatenate
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy())
    while not gen.is_done():
        gen.generate_next_token()
    return [[int(t) for t in gen.get_sequence(b)] for b in range(ids.shape[0])]


def _config(model, **ids):
    return {**model.config.to_dict(), **ids}


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_greedy_matches_transformers_token_for_token(name, llama, tmp_path):
    model, res, path = llama if name == "llama-tiny" else _decoder(name, tmp_path)
    eos = 127                                                   # an id neither run emits: all NEW tokens compared
    ref = _hf(model, PROMPT, NEW, eos)
    assert ref.shape[1] == PROMPT.shape[1] + NEW and eos not in ref[0].tolist()
    folder = write_genai_folder(path, res.decoder, tmp_path / "genai", model_config=_config(model, eos_token_id=eos))
    assert _og(folder, PROMPT, PROMPT.shape[1] + NEW) == ref.tolist()
    assert len(set(ref[0, PROMPT.shape[1]:].tolist())) > 5     # not a degenerate repeat of one token


def test_batch_of_two_prompts(llama, tmp_path):
    model, res, path = llama
    ids = torch.cat([PROMPT, torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(5))])
    ref = _hf(model, ids, 12, 127)
    folder = write_genai_folder(path, res.decoder, tmp_path / "genai", model_config=_config(model, eos_token_id=127))
    assert _og(folder, ids, ids.shape[1] + 12) == ref.tolist()


def test_eos_stops_generation_like_transformers(llama, tmp_path):
    model, res, path = llama
    free = _hf(model, PROMPT, NEW, 127)[0].tolist()
    eos = free[PROMPT.shape[1] + 5]                             # a token the model emits: make it the EOS
    ref = _hf(model, PROMPT, NEW, eos)[0].tolist()
    assert ref[-1] == eos and len(ref) < len(free)
    folder = write_genai_folder(path, res.decoder, tmp_path / "genai", model_config=_config(model, eos_token_id=eos))
    assert _og(folder, PROMPT, PROMPT.shape[1] + NEW) == [ref[:-1]]   # GenAI's sequence leaves the EOS out


def test_folder_layout_names_and_config(llama, tmp_path):
    model, res, path = llama
    tok = _tokenizer()
    folder = write_genai_folder(path, res.decoder, tmp_path / "genai", model_config=model.config, tokenizer=tok)
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    m = onnx.load(str(folder / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                               "past_key_values.0.value", "past_key_values.1.key",
                                               "past_key_values.1.value"]
    assert [o.name for o in m.graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                                "present.1.value"]
    before = onnx.load(str(path))
    assert [n.op_type for n in m.graph.node] == [n.op_type for n in before.graph.node]   # only names changed
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert (cfg["model"]["type"], cfg["model"]["vocab_size"], cfg["model"]["context_length"]) == ("llama", 128, 128)
    assert (cfg["model"]["eos_token_id"], cfg["model"]["bos_token_id"], cfg["model"]["pad_token_id"]) == (0, 0, 0)
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (2, 4, 2, 16, 64)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert cfg["search"]["do_sample"] is False and cfg["search"]["past_present_share_buffer"] is False
    ogt = og.Tokenizer(og.Model(str(folder)))
    text = "Shall-I_compare.thee?"          # no spaces: ort-extensions maps this toy tokenizer's plain " " to -1
    assert list(ogt.encode(text)) == tok(text, add_special_tokens=False).input_ids
    assert ogt.decode(ogt.encode(text)) == text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no staging folder left


def test_rewrite_replaces_folder_and_failure_keeps_it(llama, tmp_path):
    model, res, path = llama
    folder = tmp_path / "genai"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    write_genai_folder(path, res.decoder, folder, model_config=model.config)
    assert not (folder / "stale.txt").exists() and (folder / "genai_config.json").exists()
    before = (folder / "genai_config.json").read_text()
    with pytest.raises(GenAIError, match="search|load"):
        write_genai_folder(path, res.decoder, folder, model_config=model.config, search={"num_beams": "x"})
    assert (folder / "genai_config.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_inputs_are_named(llama, tmp_path):
    model, res, path = llama
    wrong = DecoderLayout(num_layers=3, kv_heads=2, head_dim=16, vocab_size=128, max_positions=128)
    with pytest.raises(GenAIError, match="past_key_2"):
        write_genai_folder(path, wrong, tmp_path / "g", model_config=model.config)
    with pytest.raises(GenAIError, match="eos_token_id"):
        write_genai_folder(path, res.decoder, tmp_path / "g", model_config=_config(model, eos_token_id=None))
    with pytest.raises(GenAIError, match="not a file"):
        write_genai_folder(tmp_path / "missing.onnx", res.decoder, tmp_path / "g", model_config=model.config)
    assert not (tmp_path / "g").exists()
    assert genai_names(res.decoder)["present_value_1"] == "present.1.value"


def test_result_export_to_a_folder_is_a_genai_model(llama, tmp_path):
    """``result.export_onnx(folder)`` of a decoder writes the GenAI folder in one call."""
    model, res, _ = llama
    model.config.eos_token_id = 127                               # an id the run never emits (config read at export)
    try:
        rep = res.export_onnx(tmp_path / "smol-genai", tokenizer=_tokenizer())
    finally:
        model.config.eos_token_id = None
    assert rep.verified and rep.path == tmp_path / "smol-genai"
    names = sorted(p.name for p in rep.path.iterdir())
    assert "genai_config.json" in names and "model.onnx" in names and "tokenizer.json" in names
    assert _og(rep.path, PROMPT, PROMPT.shape[1] + NEW) == _hf(model, PROMPT, NEW, 127).tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temporary folder left
