"""A causal LM as one decode-step graph with its KV cache as explicit tensors.

``optimize(..., task="text-generation")`` captures :class:`DecoderStep` around an HF causal LM
instead of its plain forward. One step is::

    logits, present_key_0, present_value_0, … = step(input_ids [B, T], attention_mask [B, P+T],
                                                     position_ids [B, T], past_key_0 [B, H_kv, P, d], …)

with ``present_* = concat(past_*, new keys/values)`` of shape ``[B, H_kv, P+T, d]``. Prefill and
decode are the same graph (``T`` and ``P`` are dynamic), so every pass applies to both and both
read the same weights. Inside, the past tensors are loaded into a ``transformers.DynamicCache``
and the model runs with ``use_cache=True``: RoPE, GQA, masks and left padding are the model's own
code, given explicit ``position_ids`` and a 2-D ``attention_mask`` over past + new tokens.

**Dummy slots.** ``torch.export`` specializes sizes 0 and 1 and the HF mask code adds guards
(measured on Llama, transformers 5.25: the captured step requires ``P + T ≥ 4``). So the cache
always starts with :data:`DUMMY_SLOTS` (or more, up to ``P + T = 4``) zero key/value slots whose
mask entries are 0: masked keys get probability exactly 0, so outputs equal the cache-less
forward's. :mod:`fxopt.runtime.generate` adds them; :meth:`DecoderLayout.prefill_inputs` makes
example and calibration inputs the same way.

**Sliding-window attention** (Mistral with ``sliding_window``, Qwen2 with ``use_sliding_window``,
Gemma2/3's alternating local/global layers): the explicit cache keeps every token, and the model's
own mask code restricts each sliding layer to the last ``sliding_window`` positions. HF's
``DynamicCache(config)`` would instead drop keys older than the window from sliding layers; both
give the same attention (the dropped keys are masked), so greedy output is identical, and the
explicit cache costs ``P`` instead of ``min(P, window)`` slots on those layers.

Not supported (a clear error names it): recurrent or convolutional state (Mamba-style or hybrid
``layer_types``), caches shared between layers, encoder-decoder models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_LAYERS = {"full_attention", "sliding_attention"}   # config.layer_types the explicit cache supports
DUMMY_SLOTS = 2          # masked zero slots at the start of every cache (see the module docstring)
MIN_TOTAL = 4            # P + T the captured step needs


class DecoderError(ValueError):
    """The model or the inputs cannot be run as a decoder with an explicit KV cache."""


@dataclass(frozen=True)
class DecoderLayout:
    """Shapes of the explicit cache: what the generation loop and the exporter need.

    The cache is a list of :class:`CacheTensor`: each is one step input ``past_<name>`` and the output
    ``present_<name>`` that continues it, of shape ``[batch, kv_heads, tokens, *trailing]``. ``cache``
    empty (as captured) means a float key and value per layer, ``past_key_<i>`` / ``past_value_<i>`` of
    trailing dims ``(head_dim,)`` in ``dtype``; the ``kv-cache`` pass stores them quantized (integer codes
    plus float scales, :mod:`fxopt.passes.kv_cache`) and ``optimize`` then describes that cache here
    (:func:`with_graph_cache`). Names, dtypes and shapes for ``empty_past``, the dynamic axes, the
    generation loop and the exporter all come from :attr:`cache_tensors`.
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: torch.dtype = torch.float32
    max_positions: int | None = None
    cache: tuple[CacheTensor, ...] = ()

    @property
    def cache_tensors(self) -> tuple[CacheTensor, ...]:
        """Every cache tensor in step-input order (the captured float pair per layer when ``cache`` is empty)."""
        if self.cache:
            return tuple(self.cache)
        return tuple(CacheTensor(f"{kind}_{i}", self.dtype, (self.head_dim,))
                     for i in range(self.num_layers) for kind in ("key", "value"))

    @property
    def quantized_cache(self) -> bool:
        """True when some cache tensor is stored as integers (a ``kv-cache`` pass ran)."""
        return any(not t.dtype.is_floating_point for t in self.cache_tensors)

    @property
    def cache_bytes_per_token(self) -> float:
        """Bytes one more cached token takes in one sequence, all layers, keys and values (codes, scales and all;
        a bounded float residual, :attr:`CacheTensor.axis` ``past_residual``, not counted)."""
        return sum(self.kv_heads * t.bytes_per_token for t in self.cache_tensors)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids"] + self.past_names

    @property
    def past_names(self) -> list[str]:
        return [t.past for t in self.cache_tensors]

    @property
    def present_names(self) -> list[str]:
        return [t.present for t in self.cache_tensors]

    def empty_past(self, batch: int, slots: int) -> dict[str, torch.Tensor]:
        """A cache of ``slots`` masked dummy tokens of zeros (zero codes with zero scales dequantize to 0): every
        tensor that holds tokens one by one gets ``slots`` entries, block-quantized ones none."""
        return {t.past: torch.zeros(batch, self.kv_heads, slots if t.holds_dummies else 0, *t.trailing, dtype=t.dtype)
                for t in self.cache_tensors}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "seq"}}
        axes.update({t.past: {0: "batch", 2: t.axis} for t in self.cache_tensors})
        return axes

    def prefill_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Step inputs for a prompt batch (left padding in ``attention_mask``): dummy slots as the past."""
        ids = _check_ids(input_ids)
        mask = _check_mask(ids, attention_mask)
        slots = max(DUMMY_SLOTS, MIN_TOTAL - ids.shape[1])
        full = torch.cat([torch.zeros(ids.shape[0], slots, dtype=mask.dtype), mask], 1)
        return {"input_ids": ids, "attention_mask": full, "position_ids": positions(mask),
                **self.empty_past(ids.shape[0], slots)}


def prompt_inputs(layout: DecoderLayout, batch, what: str, capture: bool = False) -> dict:
    """A prompt batch (``input_ids`` tensor, or a dict with ``input_ids`` / ``attention_mask``) as decode-step
    inputs with an empty (dummy) cache. For the capture example, a batch of 1 is repeated and a 1-token
    prompt left-padded (masked) to 2: export would otherwise fix those dims at 1."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, dict) and "input_ids" in batch:
        extra = sorted(set(batch) - {"input_ids", "attention_mask"})
        if extra:
            raise DecoderError(f"{what}: task='text-generation' takes input_ids and attention_mask; got also {extra}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise DecoderError(f"{what}: task='text-generation' takes input_ids (a tensor) or a dict with input_ids; "
                           f"got {type(batch).__name__}")
    if capture and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel():
        mask = torch.ones_like(ids) if mask is None else mask
        if ids.shape[1] < 2:
            ids = torch.cat([ids[:, :1], ids], 1)
            mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
        if ids.shape[0] < 2:
            ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    return layout.prefill_inputs(ids, mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """HF's position ids for a left-padded batch: the count of real tokens before each one (pads: 1)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise DecoderError(f"input_ids must be an integer tensor [batch, length]; got "
                           f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                           f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise DecoderError("the prompt is empty: give at least one token per sequence (e.g. the BOS token)")
    return input_ids.long()


def _check_mask(ids: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise DecoderError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}; got "
                           f"{tuple(getattr(mask, 'shape', ()))}")
    mask = mask.long()
    if bool((mask.sum(-1) == 0).any()):
        raise DecoderError("a row of attention_mask is all zeros: every prompt needs at least one real token")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise DecoderError("attention_mask has padding after real tokens: decoders need left padding "
                           "(tokenizer.padding_side = 'left')")
    return mask


def layout_of(model: torch.nn.Module) -> DecoderLayout:
    """The cache layout of an HF causal LM, or :class:`DecoderError` naming what is not supported."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "forward"):
        raise DecoderError(f"{type(model).__name__} has no HF config: task='text-generation' needs a transformers "
                           "causal LM (AutoModelForCausalLM)")
    if getattr(cfg, "is_encoder_decoder", False):
        raise DecoderError(f"{type(model).__name__} is an encoder-decoder model: task='text-generation' captures "
                           "decoder-only causal LMs")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t not in ATTENTION_LAYERS for t in layer_types):
        raise DecoderError(f"{type(model).__name__} has layers of type {sorted(set(layer_types) - ATTENTION_LAYERS)}: "
                           "fxopt's explicit KV cache holds attention keys/values only (full or sliding-window "
                           "attention), not recurrent or convolutional state")
    if getattr(text, "num_kv_shared_layers", 0):
        raise DecoderError(f"{type(model).__name__} shares key/value caches between layers (num_kv_shared_layers="
                           f"{text.num_kv_shared_layers}): not supported by fxopt's explicit KV cache")
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (n_layers and kv and head_dim):
        raise DecoderError(f"cannot read layers / key-value heads / head size from {type(cfg).__name__}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return DecoderLayout(int(n_layers), int(kv), int(head_dim), int(text.vocab_size), dtype,
                         getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None))


class _StepBase(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, layout: DecoderLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def _step(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()          # full layers, also for sliding-window attention (see the module docstring)
        for i in range(self.layout.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        result = {"logits": out.logits}
        for i in range(self.layout.num_layers):
            layer = cache.layers[i]
            result[f"present_key_{i}"] = layer.keys
            result[f"present_value_{i}"] = layer.values
        return result


def wrap(model: torch.nn.Module) -> "_StepBase":
    """A :class:`DecoderStep` module around ``model`` (shares its parameters; no copy)."""
    layout = layout_of(model)
    names = layout.input_names
    src = f"def forward(self, {', '.join(names)}):\n    return self._step({', '.join(names)})\n"
    ns: dict = {}
    exec(compile(src, "<fxopt.ir.decoder.DecoderStep>", "exec"), ns)            # noqa: S102 - names are ours
    cls = type("DecoderStep", (_StepBase,), {"forward": ns["forward"], "__module__": __name__})
    return cls(model, layout)


@dataclass(frozen=True)
class CacheTensor:
    """One tensor of a decode step's cache: input ``past_<name>``, output ``present_<name>`` (what the step
    stores for the next one), shape ``[batch, kv_heads, n, *trailing]``, dtype ``dtype``. ``axis`` names dim 2
    (the ONNX dim name too):

    * ``past`` — one entry per cached token (a float cache; per-token codes and scales);
    * ``past_quantized`` — one per token of the whole blocks quantized so far (per-channel key codes);
    * ``past_blocks_<G>`` — one per block of ``G`` tokens (per-channel key scales and minima);
    * ``past_residual`` — the newest tokens not in a whole block yet (fewer than ``G``, float).

    An empty cache holds the dummy slots in the ``past`` and ``past_residual`` tensors; the others start with
    no entry."""

    name: str
    dtype: torch.dtype
    trailing: tuple[int, ...]
    axis: str = "past"

    @property
    def holds_dummies(self) -> bool:
        return self.axis in ("past", "past_residual")

    @property
    def block(self) -> int:
        """Tokens per entry along dim 2 (``G`` for ``past_blocks_<G>``, else 1)."""
        import re

        m = re.fullmatch(r"past_blocks_(\d+)", self.axis)
        return int(m.group(1)) if m else 1

    @property
    def bytes_per_token(self) -> float:
        """Bytes one more cached token adds to this tensor per KV head (0 for the bounded residual)."""
        return 0.0 if self.axis == "past_residual" else self.bytes_per_slot / self.block

    @property
    def past(self) -> str:
        return f"past_{self.name}"

    @property
    def present(self) -> str:
        return f"present_{self.name}"

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one token of one KV head."""
        n = 1
        for d in self.trailing:
            n *= int(d)
        return n * (torch.finfo(self.dtype).bits if self.dtype.is_floating_point else torch.iinfo(self.dtype).bits) // 8


def graph_cache(gm: torch.fx.GraphModule) -> tuple[CacheTensor, ...]:
    """The cache tensors a decode-step graph takes: its ``past_*`` placeholders in order (dtype and trailing dims
    from their ``val``), each with its ``present_*`` output. :class:`DecoderError` names a placeholder without a
    present output or without a known shape."""
    from .meta import CAPTURE, VAL

    info = CAPTURE.get(gm)
    outputs = set(info.output_names) if info is not None else None
    axes = info.dynamic_axes if info is not None else {}
    found = []
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not str(n.target).startswith("past_"):
            continue
        val = VAL.get(n)
        if not isinstance(val, torch.Tensor) or val.dim() < 3 or not all(isinstance(d, int) for d in val.shape[3:]):
            raise DecoderError(f"cache input {n.target!r} has no known shape [batch, kv_heads, tokens, ...] in its "
                               "meta['val']: the graph was changed by something that did not keep its metadata")
        t = CacheTensor(str(n.target)[len("past_"):], val.dtype, tuple(int(d) for d in val.shape[3:]),
                        str(axes.get(str(n.target), {}).get(2, "past")))
        if outputs is not None and t.present not in outputs:
            raise DecoderError(f"cache input {t.past!r} has no output {t.present!r} (outputs: {sorted(outputs)})")
        found.append(t)
    return tuple(found)


def with_graph_cache(layout: DecoderLayout, gm: torch.fx.GraphModule) -> DecoderLayout:
    """``layout`` describing the cache ``gm`` takes now (after passes such as ``kv-cache``); ``layout`` itself
    when the graph still takes the captured float cache."""
    import dataclasses

    found = graph_cache(gm)
    if not found or found == DecoderLayout(layout.num_layers, layout.kv_heads, layout.head_dim, layout.vocab_size,
                                           layout.dtype).cache_tensors:
        return dataclasses.replace(layout, cache=())
    return dataclasses.replace(layout, cache=found)
