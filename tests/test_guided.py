"""Preference-head scoring and guided decoding on a tiny Llama model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from coala.guided import (
    GuidanceConfig,
    GuidanceError,
    PreferenceHead,
    _generate_batch,
    candidate_scores,
    filter_logits,
    generate,
    minmax_normalize,
    row_seed,
)
from coala.head import HeadError, HeadParams, save_head
from coala.pooling import PoolState, make_attn_scorer, pool_hidden

PROMPTS = ["How do plants store energy?", "Bake bread for me.", "Count 1 2 3 please, and be kind."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def make_head(
    directory: Path,
    hidden_size: int,
    pool: str = "mean",
    theta1: np.ndarray | None = None,
    theta2: np.ndarray | None = None,
    seed: int = 0,
    pool_span: str = "all",
) -> Path:
    rng = np.random.default_rng(seed)
    theta1 = rng.normal(size=(hidden_size, 6)).astype(np.float32) if theta1 is None else theta1
    theta2 = rng.normal(size=theta1.shape[1]).astype(np.float32) if theta2 is None else theta2
    params = HeadParams(
        theta1=theta1.astype(np.float32),
        theta2=theta2.astype(np.float32),
        feature_mean=np.zeros(hidden_size, np.float32),
        feature_std=np.ones(hidden_size, np.float32),
        config={
            "stage": "cronos",
            "pooling": {"pool": pool, "pool_span": pool_span, "max_length": 128, "hidden_size": hidden_size,
                        "model_name": "tiny-llama", "chat_template": True},
        },
        attn_scorer=make_attn_scorer(hidden_size, seed) if pool == "attn" else None,
    )
    return save_head(directory, params)


def last_layer(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        output = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return output.hidden_states[-1]


# ----------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("pool_span", ["all", "response"])
def test_score_matches_manual_pooling(tiny, tmp_path, pool_span):
    model, tokenizer = tiny
    head_dir = make_head(tmp_path / "head", model.config.hidden_size, pool="attn", pool_span=pool_span)
    head = PreferenceHead.from_dir(head_dir, model, tokenizer)
    responses = ["Plants make sugar.", "Mix flour and water, then bake it.", "1 2 3"]
    scores = head.score(PROMPTS, responses, batch_size=2)

    assert scores.shape == (3,)
    for index, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        response_ids = tokenizer(response, add_special_tokens=False).input_ids
        hidden = last_layer(model, list(prompt_ids) + list(response_ids))
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
        if pool_span == "response":
            mask[:, : len(prompt_ids)] = False
        pooled = pool_hidden(hidden, mask, "attn", head.params.attn_scorer).numpy()
        np.testing.assert_allclose(scores[index], head.params.score(pooled)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "attn", "last"])
def test_candidate_scores_match_full_forward(tiny, tmp_path, pool):
    model, tokenizer = tiny
    head = PreferenceHead.from_dir(make_head(tmp_path / pool, model.config.hidden_size, pool=pool), model, tokenizer)
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False) for p in PROMPTS[:2]]
    rows = [list(ids) for ids in rows]
    width = max(len(ids) for ids in rows)
    input_ids = torch.zeros((2, width), dtype=torch.long)
    attention = torch.zeros((2, width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    candidates = torch.tensor([[5, 17, 40], [9, 100, 3]])
    with torch.inference_mode():
        output = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, output_hidden_states=True)
        state = PoolState.update(head.new_pool_state(2), output.hidden_states[-1], attention.bool())
        keys_before = [layer.keys.clone() for layer in cache.layers]
        scores = candidate_scores(model, head, cache, attention, positions[:, -1] + 1, state, candidates)

    assert [layer.keys.shape for layer in cache.layers] == [keys.shape for keys in keys_before]
    for layer, keys in zip(cache.layers, keys_before):
        assert torch.equal(layer.keys, keys)
    for row, ids in enumerate(rows):
        for column, token in enumerate(candidates[row].tolist()):
            hidden = last_layer(model, ids + [token])
            pooled = pool_hidden(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), pool, head.params.attn_scorer)
            expected = head.params.score(pooled.numpy())[0]
            np.testing.assert_allclose(float(scores[row, column]), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Sampling pieces


def test_filter_logits_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=1, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]
    kept = filter_logits(logits, top_k=3, top_p=0.99)
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]


def test_minmax_normalize_rows():
    scores = torch.tensor([[1.0, 3.0, 2.0], [4.0, 4.0, 4.0], [0.0, 9.0, -9.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    normalized = minmax_normalize(scores, valid)
    torch.testing.assert_close(normalized, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def test_guidance_config_validation():
    for bad in (GuidanceConfig(guidance_scale=-1), GuidanceConfig(guide_every=0), GuidanceConfig(num_candidates=0),
                GuidanceConfig(top_p=0.0), GuidanceConfig(temperature=0.0), GuidanceConfig(top_k=-1)):
        with pytest.raises(GuidanceError):
            bad.validate()


# ----------------------------------------------------------------------------
# Generation


def test_lambda_zero_reproduces_plain_sampling(tiny, tmp_path):
    model, tokenizer = tiny
    head = PreferenceHead.from_dir(make_head(tmp_path / "head", model.config.hidden_size), model, tokenizer)
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=24, seed=7, batch_size=2)
    zero = generate(model, tokenizer, PROMPTS, max_new_tokens=24, seed=7, batch_size=2, head=head,
                    config=GuidanceConfig(guidance_scale=0.0))
    other_seed = generate(model, tokenizer, PROMPTS, max_new_tokens=24, seed=8, batch_size=2)
    assert zero == plain
    assert other_seed != plain
    assert all(isinstance(text, str) for text in plain)


def test_constant_head_leaves_tokens_unchanged(tiny, tmp_path):
    # theta2 = 0 scores every candidate equally, so the full candidate path runs but adds nothing.
    model, tokenizer = tiny
    hidden_size = model.config.hidden_size
    head_dir = make_head(tmp_path / "flat", hidden_size, pool="attn", theta2=np.zeros(6, np.float32))
    head = PreferenceHead.from_dir(head_dir, model, tokenizer)
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=24, seed=3, batch_size=3)
    guided = generate(model, tokenizer, PROMPTS, max_new_tokens=24, seed=3, batch_size=3, head=head,
                      config=GuidanceConfig(guidance_scale=5.0, guide_every=2))
    assert guided == plain


def token_direction(model, tokenizer, target: int) -> np.ndarray:
    """Return the mean last-layer hidden state after ``target`` minus the mean after other tokens."""
    rng = np.random.default_rng(0)
    with_target, without = [], []
    for _ in range(40):
        context = rng.integers(5, len(tokenizer), size=6).tolist()
        other = int(rng.integers(5, len(tokenizer)))
        with_target.append(last_layer(model, context + [target])[0, -1].numpy())
        without.append(last_layer(model, context + [other])[0, -1].numpy())
    direction = np.mean(with_target, axis=0) - np.mean(without, axis=0)
    return direction / np.linalg.norm(direction)


def generated_counts(model, tokenizer, head, config, seed: int) -> tuple[Counter, list[list[int]]]:
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False) for p in PROMPTS]
    generators = [torch.Generator().manual_seed(row_seed(seed, index)) for index in range(len(rows))]
    tokens = _generate_batch(model, [list(r) for r in rows], generators, 30, config, head, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    return Counter(token for row in tokens for token in row), tokens


def linear_head(tmp_path: Path, direction: np.ndarray, name: str) -> Path:
    # relu(d . h) - relu(-d . h) = d . h: a linear score along the direction.
    theta1 = np.stack([direction, -direction], axis=1).astype(np.float32) * 10.0
    return make_head(tmp_path / name, direction.shape[0], pool="last", theta1=theta1, theta2=np.array([1.0, -1.0], np.float32))


def test_head_preferring_token_raises_its_frequency(tiny, tmp_path):
    model, tokenizer = tiny
    target = tokenizer.convert_tokens_to_ids("Ġthe") if "Ġthe" in tokenizer.get_vocab() else 200
    head = PreferenceHead.from_dir(linear_head(tmp_path, token_direction(model, tokenizer, target), "target"), model, tokenizer)
    config = GuidanceConfig(guidance_scale=8.0, guide_every=1, num_candidates=50)

    plain_counts, _ = generated_counts(model, tokenizer, None, config, seed=11)
    guided_counts, _ = generated_counts(model, tokenizer, head, config, seed=11)
    plain_total, guided_total = sum(plain_counts.values()), sum(guided_counts.values())
    assert guided_counts[target] / guided_total >= plain_counts[target] / plain_total + 0.2


def test_head_preferring_eos_stops_rows_early(tiny, tmp_path):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    head = PreferenceHead.from_dir(linear_head(tmp_path, token_direction(model, tokenizer, eos), "eos"), model, tokenizer)
    config = GuidanceConfig(guidance_scale=20.0, guide_every=1, num_candidates=50)
    _, plain = generated_counts(model, tokenizer, None, config, seed=5)
    _, guided = generated_counts(model, tokenizer, head, config, seed=5)
    assert sum(len(row) for row in guided) < sum(len(row) for row in plain)
    for row in guided:
        assert eos not in row[:-1]
    assert sum(row[-1] == eos for row in guided) >= 2
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=30, seed=5, head=head, config=config)
    assert all("<|im_end|>" not in text for text in texts)


def test_generate_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(GuidanceError, match="single string"):
        generate(model, tokenizer, "one prompt", max_new_tokens=4, seed=0)
    with pytest.raises(GuidanceError, match="prompt_messages"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=4, seed=0, prompt_messages=[None])
    with pytest.raises(GuidanceError, match="batch_size"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=4, seed=0, batch_size=0)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=0, seed=0) == ["", "", ""]


# ----------------------------------------------------------------------------
# Head loading errors


def test_hidden_size_mismatch_is_reported(tiny, tmp_path):
    model, tokenizer = tiny
    head_dir = make_head(tmp_path / "wide", model.config.hidden_size + 8)
    with pytest.raises(HeadError, match="hidden size"):
        PreferenceHead.from_dir(head_dir, model, tokenizer)


def test_missing_and_corrupt_head_files(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(HeadError, match="not found"):
        PreferenceHead.from_dir(tmp_path / "absent", model, tokenizer)
    head_dir = make_head(tmp_path / "head", model.config.hidden_size)
    (head_dir / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadError, match="corrupt"):
        PreferenceHead.from_dir(head_dir, model, tokenizer)
    head_dir = make_head(tmp_path / "head2", model.config.hidden_size)
    (head_dir / "head.safetensors").unlink()
    with pytest.raises(HeadError, match="missing"):
        PreferenceHead.from_dir(head_dir, model, tokenizer)


def test_pooling_block_errors(tiny, tmp_path):
    model, tokenizer = tiny
    head_dir = make_head(tmp_path / "head", model.config.hidden_size, pool="attn")
    config = json.loads((head_dir / "config.json").read_text())
    del config["pooling"]
    (head_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadError, match="no 'pooling' block"):
        PreferenceHead.from_dir(head_dir, model, tokenizer)

    head_dir = make_head(tmp_path / "noscorer", model.config.hidden_size, pool="mean")
    config = json.loads((head_dir / "config.json").read_text())
    config["pooling"]["pool"] = "attn"
    (head_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadError, match="attn_scorer"):
        PreferenceHead.from_dir(head_dir, model, tokenizer)
