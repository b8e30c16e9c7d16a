"""An exported ONNX decoder as a folder that ``onnxruntime_genai.Model(folder)`` loads and generates with.

``res.export_onnx("decoder.onnx")`` on a ``task="text-generation"`` result writes one decode step
(``docs/decoding.md``). :func:`write_genai_folder` turns that file into a GenAI model folder:

1. ``model.onnx`` — the same graph with its cache inputs/outputs renamed to GenAI's names
   (``past_key_<i>`` → ``past_key_values.<i>.key``, ``past_value_<i>`` → ``past_key_values.<i>.value``,
   ``present_key_<i>`` → ``present.<i>.key``, ``present_value_<i>`` → ``present.<i>.value``: what
   GenAI's own model builder writes); ``input_ids``, ``attention_mask``, ``position_ids`` and
   ``logits`` keep their names. Weights over 2 GB go to ``model.onnx.data``.
2. ``genai_config.json`` — model type, context length, vocabulary, BOS/EOS/PAD ids, heads, KV heads,
   head size, hidden size, layers, the input/output name maps, and search defaults (greedy,
   ``max_length`` = context length, ``past_present_share_buffer: false``: the step's present is
   ``concat(past, new)``, not a preallocated buffer).
3. the tokenizer's files when one is given (``tokenizer.save_pretrained``), for ``og.Tokenizer``.

GenAI starts every sequence with an empty cache (past length 0) and feeds ``position_ids`` and a
2-D ``attention_mask`` itself; the exported step computes the cache-less forward there without
fxopt's dummy slots (measured: logits within 1.2e-7 of HF at past 0 and 1 on the tiny Llama).

A decoder whose cache the ``kv-cache`` pass stores quantized (codes plus scale tensors per layer,
:mod:`fxopt.passes.kv_cache`) is refused (:func:`check_layout`): GenAI 0.18 feeds one float — or, for models
its own builder writes, int8/uint8 with static scales inside ``GroupQueryAttention`` — ``past_key_values``
tensor per layer and kind, and has no way to carry fxopt's per-token scale (or per-channel block and residual)
tensors from step to step.

The folder is built in a temporary folder beside ``folder``, loaded once with
``onnxruntime_genai.Model`` when that package is installed, and only then moved into place: a
failed write never replaces an existing folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..ir.decoder import DecoderLayout

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
PAST_NAMES = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT_NAMES = ("present.%d.key", "present.%d.value")
TWO_GB = 2**31

#: GenAI's ``model.type`` for every fxopt decoder. The exported step is generic (explicit mask, positions and
#: per-layer key/value tensors), which GenAI's "llama" path runs for any architecture; some other types expect
#: another cache layout (measured on 0.18: "gpt2" wants one combined ``past_%d`` tensor and fails to load).
MODEL_TYPE = "llama"


class GenAIError(ValueError):
    """The ONNX file, the layout or the model config cannot be written as a GenAI folder."""


def check_layout(layout: DecoderLayout) -> None:
    """:class:`GenAIError` when GenAI cannot feed this decoder's cache (anything but a float key and value per layer)."""
    if not layout.cache:
        return
    extra = [t.past for t in layout.cache_tensors if not (t.dtype.is_floating_point and t.axis == "past"
                                                          and t.trailing == (layout.head_dim,))]
    odd = ", ".join(f"{t.past} ({str(t.dtype).replace('torch.', '')}, [{t.axis}, {', '.join(map(str, t.trailing))}])"
                    for t in layout.cache_tensors if t.past in extra[:4])
    raise GenAIError(f"this decoder stores its KV cache quantized ({odd}{', ...' if len(extra) > 4 else ''}: the "
                     "kv-cache pass). onnxruntime-genai feeds one past_key_values.<i>.key/value tensor per layer "
                     "(float, or int8/uint8 with static scales inside its own GroupQueryAttention models) and cannot "
                     "carry these codes and scales from step to step. Export a plain ONNX decoder instead "
                     "(res.export_onnx('decoder.onnx')) and run it with fxopt.runtime.ort_step, or leave kv-cache out "
                     "of the pipeline for a GenAI folder")


def genai_names(layout: DecoderLayout) -> dict[str, str]:
    """fxopt's cache names → GenAI's (``past_key_0`` → ``past_key_values.0.key``, ...)."""
    names = {}
    for i in range(layout.num_layers):
        for j, kind in enumerate(("key", "value")):
            names[f"past_{kind}_{i}"] = PAST_NAMES[j] % i
            names[f"present_{kind}_{i}"] = PRESENT_NAMES[j] % i
    return names


def genai_config(layout: DecoderLayout, model_config: Any, *, inputs: list[str], model_type: str | None = None,
                 context_length: int | None = None, search: dict | None = None,
                 generation_config: Any = None) -> dict:
    """The ``genai_config.json`` content for a decoder with ``layout`` and HF ``model_config``."""
    cfg = _as_dict(model_config)
    gen = _as_dict(generation_config) if generation_config is not None else {}
    heads = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd")
    if heads is None or hidden is None:
        raise GenAIError("model_config has no num_attention_heads/hidden_size (n_head/n_embd): pass the HF config of "
                         "the exported model (model.config)")
    context = context_length or layout.max_positions or _first(cfg, "max_position_embeddings", "n_positions")
    if not context:
        raise GenAIError("the context length is unknown: pass context_length= (the model's maximum positions)")
    eos = _ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
    if not eos:
        raise GenAIError("model_config has no eos_token_id: GenAI needs one (set model_config.eos_token_id)")
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    model_inputs = {k: v for k, v in names.items() if v in inputs}
    model_inputs.update(past_key_names=PAST_NAMES[0], past_value_names=PAST_NAMES[1])
    defaults = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": int(context),
                "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
                "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
                "early_stopping": True, "past_present_share_buffer": False}
    return {
        "model": {
            "type": model_type or MODEL_TYPE,
            "context_length": int(context),
            "vocab_size": layout.vocab_size,
            "bos_token_id": int(bos if bos is not None else eos[0]),
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad if pad is not None else eos[0]),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": layout.head_dim,
                "hidden_size": int(hidden),
                "num_attention_heads": int(heads),
                "num_key_value_heads": layout.kv_heads,
                "num_hidden_layers": layout.num_layers,
                "inputs": model_inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_NAMES[0],
                            "present_value_names": PRESENT_NAMES[1]},
            },
        },
        "search": {**defaults, **(search or {})},
    }


def write_genai_folder(onnx_path: str | os.PathLike, layout: DecoderLayout, folder: str | os.PathLike, *,
                       model_config: Any, tokenizer: Any = None, model_type: str | None = None,
                       context_length: int | None = None, search: dict | None = None,
                       generation_config: Any = None, check: bool = True) -> Path:
    """Write ``folder`` (replacing it) for ``onnxruntime_genai.Model``; returns its path.

    Args:
        onnx_path: the decoder from ``res.export_onnx`` (inputs ``layout.input_names``, outputs
            ``logits`` + ``layout.present_names``).
        layout: ``res.decoder``.
        model_config: the HF config of the exported model (``model.config``) or its dict.
        tokenizer: an HF tokenizer, saved into the folder (``og.Tokenizer(model)`` needs it); without
            it the folder still generates from token ids (``generator.append_tokens``).
        model_type: GenAI's ``model.type``; default :data:`MODEL_TYPE` (``llama``), whatever the architecture.
        context_length: default ``layout.max_positions`` (the config's maximum positions).
        search: overrides of the search defaults (greedy, ``max_length`` = context length).
        generation_config: an HF ``GenerationConfig``; its BOS/EOS/PAD ids win over ``model_config``'s.
        check: load the staged folder with ``onnxruntime_genai.Model`` before moving it into place
            (skipped when the package is not installed).
    """
    import onnx_ir as ir

    check_layout(layout)
    src = Path(onnx_path)
    if not src.is_file():
        raise GenAIError(f"{src} is not a file: export the decoder first (res.export_onnx(path))")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GenAIError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)

    model = ir.load(str(src))
    _rename_io(model, layout, src)
    inputs = [v.name for v in model.graph.inputs]
    config = genai_config(layout, model_config, inputs=inputs, model_type=model_type,
                          context_length=context_length, search=search, generation_config=generation_config)

    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        big = sum(t.const_value.nbytes for t in model.graph.initializers.values()
                  if t.const_value is not None) > TWO_GB * 0.9
        ir.save(model, str(staged / MODEL_FILE), external_data=f"{MODEL_FILE}.data" if big else None)
        (staged / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staged))
        if check:
            _load_check(staged)
        _replace(staged, folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return folder


def _rename_io(model, layout: DecoderLayout, src: Path) -> None:
    """Rename the graph's cache inputs/outputs in place to GenAI's names (uses follow: onnx_ir values)."""
    names = genai_names(layout)
    ins = {v.name: v for v in model.graph.inputs}
    outs = {v.name: v for v in model.graph.outputs}
    missing = [n for n in layout.input_names if n not in ins and n != "position_ids"]
    missing += [n for n in ["logits", *layout.present_names] if n not in outs]
    if missing:
        raise GenAIError(f"{src} is not the decoder of this layout: it lacks {', '.join(missing)} (inputs "
                         f"{sorted(ins)}, outputs {sorted(outs)}); export it from the same result "
                         "(res.export_onnx) and pass res.decoder")
    taken = set(ins) | set(outs) | {v.name for node in model.graph for v in node.outputs if v.name}
    clash = [new for old, new in names.items() if new in taken and new not in names]
    if clash:
        raise GenAIError(f"{src} already has values named {', '.join(clash)}: cannot rename the cache to GenAI's names")
    for name, value in {**ins, **outs}.items():
        if name in names:
            value.name = names[name]


def _load_check(staged: Path) -> None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return
    try:
        og.Model(str(staged))
    except Exception as e:  # noqa: BLE001
        raise GenAIError(f"onnxruntime_genai could not load the written folder: {e}") from e


def _replace(staged: Path, folder: Path) -> None:
    """Move ``staged`` to ``folder``; an existing ``folder`` is removed only once the new one is in place."""
    if not folder.exists():
        staged.rename(folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    old.rmdir()
    folder.rename(old)
    try:
        staged.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _as_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        for key in ("num_attention_heads", "hidden_size", "max_position_embeddings"):
            if key not in d and hasattr(config, key):            # attribute_map names (GPT-2: n_head → num_...)
                d[key] = getattr(config, key)
        return d
    raise GenAIError(f"model_config must be an HF config or a dict; got {type(config).__name__}")


def _first(cfg: dict, *keys: str):
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
