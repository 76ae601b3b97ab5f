"""Shared-context scoring: packed rows give lm-eval's own log-likelihoods, or fall back to them."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evolve.evaluation.hf import ResidentHFLM
from evolve.evaluation.shared_context import plan_requests
from tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("shared") / "m", seed=3)


def _lm(model_dir: Path, attention: str = "sdpa", batch_size: int = 4) -> ResidentHFLM:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return ResidentHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _requests(seed: int = 0) -> list:
    """Multiple-choice-like requests: several contexts, each with 1- and many-token choices that
    share prefixes, a duplicate choice, and contexts of different lengths (padding)."""
    rng = random.Random(seed)
    out = []
    for c in range(9):
        context = [rng.randrange(3, 96) for _ in range(rng.randrange(1, 20))]
        stem = [rng.randrange(3, 96) for _ in range(3)]
        choices = [[rng.randrange(3, 96)], [rng.randrange(3, 96)], stem, stem[:2] + [5], stem + [7, 8],
                   [rng.randrange(3, 96) for _ in range(4)], stem]
        for k, cont in enumerate(choices[: 2 + c % 6]):
            out.append(((f"ctx{c}", f"choice{k}"), context, cont))
    rng.shuffle(out)
    return out


def test_plan_shares_context_and_choice_prefixes():
    requests = [((None, None), [1, 2, 3], cont) for cont in ([4], [5], [6, 7], [6, 8], [6, 7, 9])]
    plan = plan_requests(requests, max_length=64, batch_size=8)
    (batch,) = plan.batches
    # context + tree nodes (6,) and (6, 7): single-token choices and last tokens add no input
    assert batch.input_ids.tolist() == [[1, 2, 3, 6, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    assert len(batch.targets) == 1 + 1 + 2 + 2 + 3
    mask = batch.mask[0, 0]
    assert mask[3].tolist() == [True, True, True, True, False]  # node 6 sees context + itself
    assert mask[4].tolist() == [True] * 5  # node 7 sees context, its parent 6, itself
    assert mask[1].tolist() == [True, True, False, False, False]  # context stays causal
    assert plan.packed == [0, 1, 2, 3, 4] and plan.rest == []


def test_plan_leaves_overlong_requests_to_lm_eval():
    requests = [((None, None), list(range(3, 40)), [5, 6]), ((None, None), [3, 4], [5])]
    plan = plan_requests(requests, max_length=32, batch_size=8)
    assert plan.rest == [0] and plan.packed == [1]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_equals_lm_eval_per_request(tiny_dir, attention):
    lm = _lm(tiny_dir, attention)
    requests = _requests()
    lm.share_context = False
    reference = lm._loglikelihood_tokens(requests)
    lm.share_context = True
    packed = lm._loglikelihood_tokens(requests)
    assert lm.share_context and lm._packing_checked, "the self-check must pass on a Llama"
    plan = next(iter(lm._packed_plans.values()))
    assert plan.rest == [] and plan.tokens < sum(len(c) + len(k) - 1 for _, c, k in requests)
    assert [g for _, g in packed] == [g for _, g in reference]
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in reference], abs=1e-4)
    # the cached plan gives the same answers again
    assert lm._loglikelihood_tokens(requests) == packed


def test_overlong_requests_are_truncated_like_lm_eval(tiny_dir):
    lm = _lm(tiny_dir)
    lm._max_length = 12  # HFLM truncates context + continuation from the left beyond this
    requests = _requests(1)
    lm.share_context = False
    reference = lm._loglikelihood_tokens(requests)
    lm.share_context = True
    packed = lm._loglikelihood_tokens(requests)
    plan = next(iter(lm._packed_plans.values()))
    assert plan.rest and plan.packed
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in reference], abs=1e-4)


class _MaskBlind(torch.nn.Module):
    """A model that ignores custom attention masks and positions (as some kernels would)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids)


def test_model_that_ignores_the_mask_falls_back(tiny_dir, caplog):
    lm = _lm(tiny_dir)
    requests = _requests(2)
    lm.share_context = False
    reference = lm._loglikelihood_tokens(requests)
    lm._model = _MaskBlind(lm.model)
    lm.share_context = True
    with caplog.at_level(logging.WARNING, logger="evolve.shared_context"):
        got = lm._loglikelihood_tokens(requests)
    assert not lm.share_context
    assert "shared-context scoring switched off" in caplog.text
    assert got == reference  # that call's answers came from lm-eval's own path


def test_masks_over_budget_are_rebuilt_per_pass(tiny_dir):
    from evolve.evaluation.shared_context import score_plan

    lm = _lm(tiny_dir)
    requests = _requests(3)
    kept = plan_requests(requests, max_length=lm.max_length, batch_size=4)
    rebuilt = plan_requests(requests, max_length=lm.max_length, batch_size=4, mask_budget=0)
    assert all(b.mask is not None for b in kept.batches)
    assert all(b.mask is None for b in rebuilt.batches)
    totals, greedy = score_plan(lm.model, kept, len(requests))
    again, greedy_again = score_plan(lm.model, rebuilt, len(requests))
    assert torch.equal(totals, again) and torch.equal(greedy, greedy_again)
