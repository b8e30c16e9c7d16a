"""Prefill of a batch of prompts of different lengths without computing on padding.

A left-padded batch of prompts of lengths ``L_1 … L_B`` costs ``B · max L`` token positions in
every linear and ``B · (max L)²`` in attention, although only ``Σ L_i`` are real. The
EffectiveTransformer idea (remove padding before the dense work, restore it after) applies to
prefill directly here, because fxopt's decoders take the KV cache as explicit tensors:

1. **Buckets** (:func:`plan_buckets`): sort the rows by real length and cut the sorted list into
   buckets so that a bucket's padding (``Σ (max L_bucket − L_i)``) stays under ``max_waste`` of its
   positions. ``max_waste=0`` gives one bucket per distinct length (no padding at all); ``1``
   gives one bucket (plain padding).
2. **Prefill per bucket**: each bucket runs the step on its rows, left-padded to the bucket's own
   longest prompt only, from the usual masked dummy slots (:mod:`fxopt.ir.decoder`).
3. **Merge**: each bucket's cache ``[b, H_kv, S_bucket, …]`` is left-padded with zero slots to the
   batch's length ``S = max S_bucket`` and the rows are put back in their original order. Zero
   slots are masked (mask 0) exactly like the dummy slots and the pads of a padded prefill, so the
   decode steps that follow see the same attention: masked keys get probability exactly 0.

The result is what a padded prefill would have produced — the last position's logits of every row,
the cache, and the attention mask over it — with the same token positions (positions count real
tokens only). Numbers differ from a padded prefill only by the float summation order of GEMMs of
another shape (1e-7 relative); greedy tokens are identical in the tests.

Cost: fewer positions computed, but more, smaller steps (one per bucket), so it pays where prompt
lengths differ a lot and the step is compute-bound (``benchmarks/bench_generate.py``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.decoder import DecoderError, DecoderLayout


def plan_buckets(lengths: list[int], max_waste: float = 0.1) -> list[list[int]]:
    """Row indices grouped into buckets (each sorted by length, buckets by their longest prompt) so that
    padding within a bucket is at most ``max_waste`` of the bucket's ``rows × longest`` positions."""
    if not 0.0 <= max_waste <= 1.0:
        raise DecoderError(f"max_waste must be in [0, 1]; got {max_waste}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            cand = buckets[-1] + [i]
            longest = lengths[i]                   # sorted: the newcomer is the longest
            waste = sum(longest - lengths[j] for j in cand) / (longest * len(cand))
            if waste <= max_waste:
                buckets[-1] = cand
                continue
        buckets.append([i])
    return buckets


def bucketed_prefill(step: Callable[[dict], dict], layout: DecoderLayout, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, *, max_waste: float = 0.1
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[list[int]]]:
    """Prefill ``input_ids`` (left-padded, ``attention_mask`` marking real tokens) bucket by bucket.

    Returns ``(logits [B, V]`` of every row's last prompt token, ``cache`` (``present_*`` → ``[B, H_kv, S, …]``),
    ``mask [B, S]`` over the cache, ``last_position [B, 1]``, ``buckets)`` — what the generation loop continues
    from, equal to what a padded prefill gives."""
    full = layout.prefill_inputs(input_ids, attention_mask)            # validates ids and mask
    ids = full["input_ids"]
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).long()
    lengths = [int(v) for v in mask.sum(-1)]
    buckets = plan_buckets(lengths, max_waste)
    parts = []
    for rows in buckets:
        longest = max(lengths[i] for i in rows)
        sub_ids = ids[rows, -longest:]
        sub_mask = mask[rows, -longest:]
        feed = layout.prefill_inputs(sub_ids, sub_mask)
        res = step(feed)
        parts.append((rows, res, feed["attention_mask"], feed["position_ids"][:, -1:]))
    total = max(m.shape[1] for _, _, m, _ in parts)
    batch = ids.shape[0]
    vocab = parts[0][1]["logits"].shape[-1]
    logits = torch.empty(batch, vocab, dtype=parts[0][1]["logits"].dtype)
    out_mask = torch.zeros(batch, total, dtype=mask.dtype)
    last_pos = torch.empty(batch, 1, dtype=torch.long)
    cache: dict[str, torch.Tensor] = {}
    for name in layout.present_names:
        ref = parts[0][1][name]
        cache[name] = torch.zeros(batch, ref.shape[1], total, *ref.shape[3:], dtype=ref.dtype)
    for rows, res, m, pos in parts:
        idx = torch.tensor(rows)
        s = m.shape[1]
        logits[idx] = res["logits"][:, -1, :]
        out_mask[idx, total - s:] = m
        last_pos[idx] = pos
        for name in layout.present_names:
            cache[name][idx, :, total - s:] = res[name]
    return logits, cache, out_mask, last_pos, buckets
