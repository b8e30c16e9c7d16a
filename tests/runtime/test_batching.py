"""Bucketed prefill: a mixed-length batch prefilled without computing on padding equals a padded prefill."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.ir.decoder import DecoderError
from fxopt.ir.graph import ExampleInputs, call
from fxopt.runtime.batching import bucketed_prefill, plan_buckets

LENGTHS = [3, 12, 7, 12, 5, 9]


def _batch():
    ids = torch.randint(3, 100, (len(LENGTHS), max(LENGTHS)), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, ids.shape[1] - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def llama():
    lm = models.hf_tiny("llama-tiny", layers=2)
    ids, mask = _batch()
    res = fxopt.optimize(lm.model, "cleanup", {"input_ids": ids, "attention_mask": mask}, task="text-generation")
    return lm.model, res


def test_plan_buckets_bounds_the_padding():
    assert plan_buckets(LENGTHS, 0.0) == [[0], [4], [2], [5], [1, 3]]          # one bucket per length
    assert plan_buckets(LENGTHS, 1.0) == [[0, 4, 2, 5, 1, 3]]                   # plain padding
    for waste in (0.1, 0.3, 0.5):
        for rows in plan_buckets(LENGTHS, waste):
            top = max(LENGTHS[i] for i in rows)
            assert sum(top - LENGTHS[i] for i in rows) <= waste * top * len(rows)
    assert sorted(i for b in plan_buckets(LENGTHS, 0.3) for i in b) == list(range(len(LENGTHS)))
    with pytest.raises(DecoderError, match="max_waste"):
        plan_buckets(LENGTHS, 1.5)


@pytest.mark.parametrize("max_waste", [0.0, 0.3, 1.0])
def test_bucketed_prefill_equals_padded_prefill(llama, max_waste):
    _, res = llama
    ids, mask = _batch()
    step = lambda feed: call(res.module, ExampleInputs((), feed))  # noqa: E731
    logits, cache, full_mask, pos, buckets = bucketed_prefill(step, res.decoder, ids, mask, max_waste=max_waste)
    feed = res.decoder.prefill_inputs(ids, mask)
    ref = step(feed)
    assert torch.equal(full_mask, feed["attention_mask"]) and torch.equal(pos, feed["position_ids"][:, -1:])
    # float summation order of GEMMs of another shape only (measured max 1.2e-7)
    assert (logits - ref["logits"][:, -1]).abs().max() < 1e-5
    for name in res.decoder.present_names:                            # the real tokens' keys and values
        for i, n in enumerate(LENGTHS):
            assert (cache[name][i, :, -n:] - ref[name][i, :, -n:]).abs().max() < 1e-5
        if max_waste == 0:                                            # nothing computed on padding: zero slots
            pads = (full_mask == 0)[:, None, :, None].expand_as(cache[name])
            assert torch.all(cache[name][pads] == 0)
