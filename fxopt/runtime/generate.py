"""The generation loop over a decode-step graph (:mod:`fxopt.ir.decoder`): prefill, then one token a step.

The cache is the step's own output: ``present_*`` of one step are the ``past_*`` of the next, so
prefill and every decode step run the same (optimized) graph. Which tensors make the cache comes from the
layout (:attr:`fxopt.ir.decoder.DecoderLayout.cache_tensors`): a float key and value per layer as captured,
or integer codes with their scales (and, keys per channel, block scales and a float residual) after the
``kv-cache`` pass — the loop passes each ``present_<name>`` back as ``past_<name>`` without reading it. A batch is left-padded: the
attention mask covers the dummy slots (0), the prompt (0 for pads, 1 for tokens) and every
generated token (1); positions count real tokens only, as HF's ``generate`` does, so greedy
output matches ``model.generate`` token for token on the same weights.

Sampling follows ``transformers``' order: temperature, then top-k, then top-p (nucleus), then a
draw from the softmax; ``do_sample=False`` is greedy (argmax). Finished sequences (``eos_token_id``
emitted) continue with ``pad_token_id`` (default: the EOS id); the loop stops when all have
finished or after ``max_new_tokens``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.decoder import DecoderError, DecoderLayout


def _filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if temperature <= 0:
        raise DecoderError(f"temperature must be > 0 when sampling; got {temperature}")
    logits = logits / temperature
    if top_k and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()          # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def generate(step: Callable[[dict], dict], layout: DecoderLayout, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Token ids ``[batch, prompt + new]`` (fewer new columns if every sequence hit EOS first).

    ``step`` runs one decode step on a dict of inputs named as in :class:`DecoderLayout` and
    returns ``logits`` and ``present_*``. ``on_token(ids [batch])`` is called with every new column
    (streaming)."""
    if max_new_tokens < 0:
        raise DecoderError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    feed = layout.prefill_inputs(input_ids, attention_mask)
    ids = feed["input_ids"]
    if layout.max_positions and ids.shape[1] + max_new_tokens > layout.max_positions:
        raise DecoderError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                           f"maximum length {layout.max_positions}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    mask = feed["attention_mask"]
    last_pos = feed["position_ids"][:, -1:]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = [ids]
    with torch.no_grad():
        for i in range(max_new_tokens):
            res = step(feed)
            if i == 0:
                _check_outputs(res, layout)
            logits = res["logits"][:, -1, :].float()
            if do_sample:
                probs = _filter(logits, temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if eos:
                done |= torch.isin(nxt, torch.tensor(sorted(eos)))
                if bool(done.all()):
                    break
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            last_pos = last_pos + 1
            feed = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": last_pos,
                    **{p: res[q] for p, q in zip(layout.past_names, layout.present_names)}}
    return torch.cat(out, 1)


def _check_outputs(res: dict, layout: DecoderLayout) -> None:
    missing = [n for n in ["logits", *layout.present_names] if n not in res]
    if missing:
        raise DecoderError(f"the step returned no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (it "
                           f"returns {', '.join(list(res)[:6])}{' ...' if len(res) > 6 else ''}): the layout describes "
                           "another cache than the step's; pass res.decoder of the result the step comes from")


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(bool)": "bool"}


def ort_step(model) -> Callable[[dict], dict]:
    """A ``step`` for :func:`generate` over an ONNX decoder file (or an :class:`fxopt.backends.OrtBackend`)
    exported from a ``task="text-generation"`` result. A feed that lacks one of the file's inputs or gives one in
    another dtype (a float cache for a file that stores it quantized, say) is a :class:`DecoderError` naming it."""
    from ..backends.ort import OrtBackend

    backend = model if isinstance(model, OrtBackend) else OrtBackend(model)
    expected = {i.name: _ORT_TYPES.get(i.type) for i in backend.session.get_inputs()}

    def step(feed: dict) -> dict:
        missing = [n for n in expected if n not in feed]
        wrong = [f"{n} is {str(feed[n].dtype).replace('torch.', '')}, the file takes {t}" for n, t in expected.items()
                 if n in feed and t is not None and str(feed[n].dtype).replace("torch.", "") != t]
        if missing or wrong:
            raise DecoderError(f"the ONNX decoder {getattr(backend, 'path', '')} does not take this feed: "
                               + "; ".join(([f"missing {', '.join(missing[:4])}"] if missing else []) + wrong[:4])
                               + ". Generate with the layout of the result that exported the file (res.decoder)")
        outs = backend.session.run(None, {k: v.numpy() for k, v in feed.items() if k in backend.input_names})
        return {name: torch.from_numpy(o) for name, o in zip(backend.output_names, outs)}
    return step
