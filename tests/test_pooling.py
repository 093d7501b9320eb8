"""Pooling: one-shot pooling against a hand computation, padding never leaks, incremental form matches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coala.extraction import encode_example, last_hidden_states
from coala.pooling import PoolingError, PoolState, make_attn_scorer, pool_hidden

METHODS = ("attn", "mean", "last")


def hand_pool(rows: list[np.ndarray], method: str, scorer: np.ndarray) -> np.ndarray:
    """Pool each unpadded (T_i, H) array with plain loops in float64."""
    pooled = []
    for tokens in rows:
        tokens = tokens.astype(np.float64)
        if method == "mean":
            pooled.append(tokens.sum(axis=0) / len(tokens))
        elif method == "last":
            pooled.append(tokens[-1])
        else:
            scores = [float(token @ scorer) / math.sqrt(tokens.shape[1]) for token in tokens]
            top = max(scores)
            weights = [math.exp(score - top) for score in scores]
            total = sum(weights)
            pooled.append(sum(weight / total * token for weight, token in zip(weights, tokens)))
    return np.stack(pooled)


def pad_rows(rows: list[np.ndarray], side: str, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (T_i, H) arrays to (B, T, H) with a loud fill value; return hidden and the length mask."""
    width = max(len(row) for row in rows)
    hidden = np.full((len(rows), width, rows[0].shape[1]), fill, dtype=np.float32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for index, row in enumerate(rows):
        if side == "right":
            hidden[index, : len(row)] = row
            mask[index, : len(row)] = True
        else:
            hidden[index, width - len(row):] = row
            mask[index, width - len(row):] = True
    return torch.from_numpy(hidden), torch.from_numpy(mask)


@pytest.fixture
def ragged_rows() -> list[np.ndarray]:
    generator = np.random.default_rng(3)
    return [generator.standard_normal((length, 8)).astype(np.float32) for length in (5, 1, 3, 7)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", METHODS)
def test_pool_hidden_matches_hand_computation(ragged_rows, method, side):
    scorer = make_attn_scorer(8, seed=1)
    hidden, mask = pad_rows(ragged_rows, side, fill=1e4)
    pooled = pool_hidden(hidden, mask, method, scorer).numpy()
    expected = hand_pool(ragged_rows, method, scorer.astype(np.float64))
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)


def test_attn_padding_gets_zero_weight(ragged_rows):
    scorer = make_attn_scorer(8, seed=1)
    hidden_small, mask = pad_rows(ragged_rows, "right", fill=0.0)
    hidden_huge, _ = pad_rows(ragged_rows, "right", fill=1e30)
    small = pool_hidden(hidden_small, mask, "attn", scorer)
    huge = pool_hidden(hidden_huge, mask, "attn", scorer)
    assert torch.equal(small, huge)


def test_make_attn_scorer_seeded_unit_norm():
    first = make_attn_scorer(16, seed=7)
    again = make_attn_scorer(16, seed=7)
    other = make_attn_scorer(16, seed=8)
    assert first.shape == (16,)
    assert first.dtype == np.float32
    assert np.isclose(np.linalg.norm(first), 1.0, atol=1e-6)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_pool_hidden_rejects_bad_arguments():
    hidden = torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(PoolingError, match="Unknown pooling method"):
        pool_hidden(hidden, mask, "max")
    with pytest.raises(PoolingError, match="needs a scorer"):
        pool_hidden(hidden, mask, "attn")
    with pytest.raises(PoolingError, match="shape"):
        pool_hidden(hidden, mask, "attn", np.ones(5, dtype=np.float32))
    with pytest.raises(PoolingError, match="does not match"):
        pool_hidden(hidden, mask[:, :2], "mean")
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(PoolingError, match=r"Rows \[1\]"):
        pool_hidden(hidden, empty, "mean")


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_equals_eos_model_padding_never_leaks(tiny_model_pad_eos_dir, side):
    """With pad == EOS and texts that end in a real EOS, batched pooling equals pooling each text alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_pad_eos_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_pad_eos_dir).eval()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    texts = [
        ("How do I bake bread?", "Mix flour, water, salt and yeast." + tokenizer.eos_token),
        ("The student asked.", "Chlorophyll absorbs light." + tokenizer.eos_token + tokenizer.eos_token),
        ("A", "good answer is clear"),
    ]
    examples = [encode_example(tokenizer, prompt, response, max_length=64) for prompt, response in texts]
    assert examples[0].input_ids[-1] == tokenizer.eos_token_id
    scorer = make_attn_scorer(model.config.hidden_size, seed=0)

    width = max(example.length for example in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        span = slice(0, example.length) if side == "right" else slice(width - example.length, width)
        input_ids[row, span] = torch.tensor(example.input_ids)
        mask[row, span] = True
    position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        base = model.base_model
        batched = base(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids).last_hidden_state
        alone = [last_hidden_states(model, torch.tensor([example.input_ids]), torch.ones(1, example.length, dtype=torch.long))[0] for example in examples]

    for method in METHODS:
        pooled = pool_hidden(batched, mask, method, scorer)
        expected = torch.stack([pool_hidden(hidden.unsqueeze(0), torch.ones(1, len(hidden), dtype=torch.bool), method, scorer)[0] for hidden in alone])
        torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_incremental_pooling_equals_one_shot(ragged_rows, method):
    scorer = make_attn_scorer(8, seed=2)
    hidden, mask = pad_rows(ragged_rows, "right", fill=123.0)
    expected = pool_hidden(hidden, mask, method, scorer)

    state = PoolState.init(method, batch=len(ragged_rows), hidden_size=8, scorer=scorer)
    before = state
    for start in range(0, hidden.shape[1], 2):
        state = PoolState.update(state, hidden[:, start:start + 2], mask[:, start:start + 2])
    torch.testing.assert_close(PoolState.value(state), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(before.count, torch.zeros(len(ragged_rows)))


@pytest.mark.parametrize("method", METHODS)
def test_peek_equals_committing_each_candidate(method):
    generator = torch.Generator().manual_seed(5)
    scorer = make_attn_scorer(6, seed=4)
    prefix = torch.randn(2, 4, 6, generator=generator)
    candidates = torch.randn(2, 3, 6, generator=generator) * 3
    state = PoolState.update(PoolState.init(method, 2, 6, scorer), prefix)

    peeked = PoolState.peek(state, candidates)
    assert peeked.shape == (2, 3, 6)
    for index in range(3):
        committed = PoolState.value(PoolState.update(state, candidates[:, index:index + 1]))
        torch.testing.assert_close(peeked[:, index], committed, rtol=1e-5, atol=1e-6)
        full = torch.cat([prefix, candidates[:, index:index + 1]], dim=1)
        one_shot = pool_hidden(full, torch.ones(2, 5, dtype=torch.bool), method, scorer)
        torch.testing.assert_close(peeked[:, index], one_shot, rtol=1e-5, atol=1e-6)


def test_pool_state_value_before_any_token_raises():
    state = PoolState.init("mean", 2, 4)
    state = PoolState.update(state, torch.ones(2, 1, 4), torch.tensor([[True], [False]]))
    with pytest.raises(PoolingError, match=r"Sequences \[1\]"):
        PoolState.value(state)
