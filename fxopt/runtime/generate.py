"""The generation loop over a decode-step graph (:mod:`fxopt.ir.decoder`): prefill, then one token a step.

The cache is the step's own output: ``present_*`` of one step are the ``past_*`` of the next, so
prefill and every decode step run the same (optimized) graph. A batch is left-padded: the
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
        for _ in range(max_new_tokens):
            res = step(feed)
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


def ort_step(model) -> Callable[[dict], dict]:
    """A ``step`` for :func:`generate` over an ONNX decoder file (or an :class:`fxopt.backends.OrtBackend`)
    exported from a ``task="text-generation"`` result."""
    from ..backends.ort import OrtBackend

    backend = model if isinstance(model, OrtBackend) else OrtBackend(model)

    def step(feed: dict) -> dict:
        outs = backend.session.run(None, {k: v.numpy() for k, v in feed.items() if k in backend.input_names})
        return {name: torch.from_numpy(o) for name, o in zip(backend.output_names, outs)}
    return step
