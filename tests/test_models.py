"""Model specs (fxopt/models.py): HF folders (head from ``config.architectures``, inputs with and without a
tokenizer) and ``package.module:factory`` resolved from the current folder."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import fxopt
from fxopt import models

from tests.helpers import outputs

tf = pytest.importorskip("transformers")


def _save(model_cls: str, cfg_cls: str, path, **cfg):
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(getattr(tf, cfg_cls)(**cfg)).eval()
    model.save_pretrained(path)
    return model


GPT2 = dict(n_embd=32, n_head=2, n_layer=1, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
BERT = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=96,
            max_position_embeddings=64)


def _word_tokenizer(path, words: int):
    """A word-level fast tokenizer over the first ``words`` words of the bundled text, saved into ``path``."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in models.sample_text().split():
        if len(vocab) >= words:
            break
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)


@pytest.mark.parametrize("arch, auto", [
    ("GPT2LMHeadModel", "AutoModelForCausalLM"),
    ("LlamaForCausalLM", "AutoModelForCausalLM"),
    ("T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("BertForMaskedLM", "AutoModelForMaskedLM"),
    ("BertForSequenceClassification", "AutoModelForSequenceClassification"),
    ("BertModel", "AutoModel"),
    ("GPT2Model", "AutoModel"),
    ("SomethingElse", "AutoModel"),
])
def test_auto_class_from_the_architecture_name(arch, auto):
    assert models.auto_class_name(arch) == auto


def test_gpt2_folder_without_tokenizer_loads_the_lm_head_and_captures(tmp_path):
    ref = _save("GPT2LMHeadModel", "GPT2Config", tmp_path, **GPT2)
    lm = models.load(str(tmp_path))
    assert type(lm.model).__name__ == "GPT2LMHeadModel"          # not the bare GPT2Model
    assert lm.description == f"GPT2LMHeadModel from {tmp_path}"
    ids = lm.example_inputs["input_ids"]
    assert ids.shape == (4, 16) and 0 <= int(ids.min()) and int(ids.max()) < GPT2["vocab_size"]
    assert torch.equal(lm.example_inputs["attention_mask"], torch.ones_like(ids))
    assert lm.tokenizer is None and any("no tokenizer" in n and "random token ids" in n for n in lm.notes)
    assert torch.equal(models.load(str(tmp_path)).example_inputs["input_ids"], ids)     # fixed seed
    with torch.no_grad():
        expected = ref(**lm.example_inputs).logits
    res = fxopt.optimize(lm.model, "dce", lm.example_inputs)     # used to fail: 0-element example inputs
    out = outputs(res.module, lm.example_inputs)[0]
    assert out.shape == (4, 16, GPT2["vocab_size"])
    assert torch.allclose(out, expected, atol=1e-5)


def test_token_ids_respect_short_position_tables(tmp_path):
    _save("BertModel", "BertConfig", tmp_path, **dict(BERT, max_position_embeddings=8))
    lm = models.hf_dir(tmp_path, batch=2)
    assert lm.example_inputs["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("model_cls", ["BertForMaskedLM", "BertModel", "BertForSequenceClassification"])
def test_folder_loads_the_class_its_config_names(tmp_path, model_cls):
    _save(model_cls, "BertConfig", tmp_path, **BERT)
    lm = models.hf_dir(tmp_path)
    assert type(lm.model).__name__ == model_cls
    assert [n for n in lm.notes if "architectures" in n or "no class" in n] == []


def test_unknown_or_missing_architecture_says_what_it_loaded(tmp_path):
    _save("BertModel", "BertConfig", tmp_path, **BERT)
    cfg = tf.AutoConfig.from_pretrained(tmp_path)
    cfg.architectures = ["BertForSomethingNew"]
    cfg.save_pretrained(tmp_path)
    lm = models.hf_dir(tmp_path)
    assert type(lm.model).__name__ == "BertModel"
    assert any("no class 'BertForSomethingNew'" in n for n in lm.notes)
    cfg.architectures = None
    cfg.save_pretrained(tmp_path)
    lm = models.hf_dir(tmp_path)
    assert type(lm.model).__name__ == "BertModel" and any("names no architectures" in n for n in lm.notes)


def test_folder_with_a_tokenizer_tokenizes_real_text(tmp_path):
    _save("BertModel", "BertConfig", tmp_path, **BERT)
    _word_tokenizer(tmp_path, words=BERT["vocab_size"])
    lm = models.hf_dir(tmp_path)
    ids = lm.example_inputs["input_ids"]
    assert lm.tokenizer is not None and lm.notes == []
    assert ids.shape[0] == 4 and ids.shape[1] > 0 and int(ids.max()) < BERT["vocab_size"]
    assert int((ids > 1).sum()) > 0                      # real words, not only [UNK]/[PAD]


def test_tokenizer_beyond_the_vocabulary_falls_back_to_token_ids(tmp_path):
    _save("BertModel", "BertConfig", tmp_path, **dict(BERT, vocab_size=4))
    _word_tokenizer(tmp_path, words=200)
    lm = models.hf_dir(tmp_path)
    ids = lm.example_inputs["input_ids"]
    assert lm.tokenizer is None and ids.shape == (4, 16) and int(ids.max()) < 4
    assert any("ids beyond vocab_size" in n for n in lm.notes)


FACTORY_SOURCE = '''
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval(), (torch.randn(2, 4),)
'''


@pytest.fixture
def factory_in_cwd(tmp_path, monkeypatch):
    """``fxopt_cwd_factory.py`` in a fresh folder that is the current one, and not otherwise on sys.path."""
    name = "fxopt_cwd_factory"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield f"{name}:make"
    sys.modules.pop(name, None)


def test_factory_spec_is_found_in_the_current_folder(factory_in_cwd):
    lm = models.load(factory_in_cwd)
    assert isinstance(lm.model, torch.nn.Sequential) and lm.example_inputs[0].shape == (2, 4)
    assert sys.path[0] == os.getcwd()


def test_factory_errors_still_name_the_spec(factory_in_cwd):
    with pytest.raises(ValueError, match="has no 'nope'"):
        models.load(factory_in_cwd.replace(":make", ":nope"))
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        models.load("no_such_module_here:make")
