"""Stage 1 extraction: encoding, truncation, batching, output folder, resume, and input checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from coala import backbone, extraction
from coala.backbone import BackboneError
from coala.config import ConfigError
from coala.data import DataError, PreferenceData, Triplet, load_preferences
from coala.extraction import (
    ExtractionError,
    encode_example,
    encode_preferences,
    encode_prompt,
    plan_batches,
)
from coala.features import FeatureError, load_features
from coala.pooling import make_attn_scorer, pool_hidden


def load_extract_script():
    spec = importlib.util.spec_from_file_location("extract_script", REPO_ROOT / "extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract_script = load_extract_script()

PAIRS = [
    ("How do I bake bread?", "Mix flour, water, salt and yeast.", "Buy it."),
    ("What does chlorophyll do?", "It absorbs light so plants can store sugar.", "Nothing."),
    ("Give me numbers.", "1 2 3 4 5", "6 7"),
    ("Is this answer kind?", "A good answer is clear, correct and kind.", "A bad answer is vague or rude."),
    ("Explain photosynthesis.", "Light turns into chemical energy.", "The student asked."),
    ("Say something.", "Hello there, student!", "Go away."),
    ("Count.", "1 2 3", "1 2 3 4 5 6 7 8 9 0"),
]


def write_pairs(path: Path, pairs=PAIRS) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n" for prompt, chosen, rejected in pairs)
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model or tokenizer load fail loudly, to prove an error came first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(backbone, "load_backbone", refuse)
    monkeypatch.setattr(backbone, "load_tokenizer", refuse)


def run_extract(model_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = ["--model_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out), "--batch_size", "3", "--max_length", "48", *extra]
    return extract_script.main(argv)


# ----------------------------------------------------------------------------- encoding


def test_encode_prompt_uses_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_prompt(tokenizer, "How do I bake bread?")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(expected)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bread?"}]
    decoded = tokenizer.decode(encode_prompt(tokenizer, "ignored", messages))
    assert decoded.count("<|im_start|>") == 4
    assert "ignored" not in decoded


def test_encode_prompt_plain_without_template(tiny_model_pad_eos_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_pad_eos_dir)
    assert not tokenizer.chat_template
    assert encode_prompt(tokenizer, "How do I bake bread?") == tokenizer("How do I bake bread?").input_ids


def test_encode_example_appends_no_end_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = encode_example(tokenizer, "How do I bake bread?", "Mix flour.", max_length=512)
    prompt_ids = encode_prompt(tokenizer, "How do I bake bread?")
    response_ids = tokenizer("Mix flour.", add_special_tokens=False).input_ids
    assert example.input_ids == prompt_ids + response_ids
    assert example.response_start == len(prompt_ids)
    assert not example.truncated
    assert example.input_ids[-1] != tokenizer.eos_token_id


def test_truncation_keeps_response(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "The student asked how photosynthesis turns light into chemical energy. " * 3
    response = "Mix flour, water, salt and yeast."
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    limit = len(response_ids) + 5
    example = encode_example(tokenizer, prompt, response, max_length=limit)
    assert example.truncated
    assert example.input_ids == prompt_ids[-5:] + response_ids
    assert example.response_start == 5

    short = encode_example(tokenizer, prompt, response, max_length=4)
    assert short.input_ids == response_ids[:4]
    assert short.response_start == 0
    assert short.truncated


def test_identical_after_truncation_dropped(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shared = "A good answer is clear, correct and kind. " * 4
    data = PreferenceData(
        source="memory", format="triplets-json", paired=True,
        triplets=[
            Triplet("Q", shared + "yes", shared + "no", "p0"),
            Triplet("Q", "Mix flour.", "Buy it.", "p1"),
        ],
    )
    encoded = encode_preferences(tokenizer, data, max_length=20)
    assert encoded.dropped_identical_tokens == 1
    assert [record["pair_id"] for record in encoded.records] == ["p1"]
    assert len(encoded.examples) == 2

    with pytest.raises(ExtractionError, match="raise --max_length"):
        encode_preferences(tokenizer, PreferenceData("memory", "triplets-json", True, triplets=data.triplets[:1]), max_length=20)


def test_plan_batches_sorts_by_length():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = plan_batches(lengths, batch_size=3)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert batches[0].tolist() == [1, 3, 5]
    padded_real, padded = extraction.padding_counts(lengths, batches)
    assert padded_real == sum(lengths)
    assert padded == (9 * 3 + 5 * 3 + 1 * 1) - sum(lengths)


# ----------------------------------------------------------------------------- the script


def test_extract_writes_loadable_folder(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "features"
    manifest = run_extract(tiny_model_dir, pairs_file, out, "--pool", "attn", "--attn_seed", "3")
    features = load_features(out)
    assert features.chosen.shape == (len(PAIRS), 32)
    assert features.rejected.shape == (len(PAIRS), 32)
    assert not np.allclose(features.chosen, features.rejected)
    assert np.array_equal(features.attn_scorer(), make_attn_scorer(32, 3))
    for key in ("format_version", "model_name", "model_fingerprint", "hidden_size", "num_layers", "num_parameters",
                "pool", "pool_span", "max_length", "dtype", "chat_template", "data_sha256", "split_seed",
                "split_fractions", "paired", "counts", "tokens", "flops", "attn_scorer_seed", "seconds", "versions"):
        assert key in features.manifest, key
    assert features.manifest["chat_template"] is True
    assert features.manifest["counts"]["pairs"] == len(PAIRS)
    assert features.manifest["flops"] == 2 * manifest["num_parameters"] * manifest["tokens"]["real"]
    expected_ids = [triplet.pair_id for triplet in load_preferences(str(pairs_file)).triplets]
    assert [row["pair_id"] for row in features.meta] == expected_ids
    assert not (out / extraction.PARTIAL_DIR).exists()


def test_extract_rows_follow_input_order(tiny_model_dir, pairs_file, tmp_path):
    """Row i contains pair i although batches were sorted by length: compare with pooling each text alone."""
    from transformers import AutoTokenizer

    out = tmp_path / "features"
    run_extract(tiny_model_dir, pairs_file, out, "--pool", "mean", "--pool_span", "response")
    features = load_features(out)
    model, _ = backbone.load_backbone(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for index, (prompt, chosen, rejected) in enumerate(PAIRS):
        for response, row in ((chosen, features.chosen[index]), (rejected, features.rejected[index])):
            example = encode_example(tokenizer, prompt, response, max_length=48)
            with torch.inference_mode():
                hidden = extraction.last_hidden_states(model, torch.tensor([example.input_ids]), torch.ones(1, example.length, dtype=torch.long))
            mask = torch.zeros(1, example.length, dtype=torch.bool)
            mask[0, example.response_start:] = True
            np.testing.assert_allclose(row, pool_hidden(hidden, mask, "mean")[0].numpy(), rtol=1e-4, atol=1e-5)


def test_extract_pool_none_token_files(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "features"
    run_extract(tiny_model_dir, pairs_file, out, "--pool", "none")
    offsets = np.load(out / extraction.CHOSEN_OFFSETS_FILE)
    tokens = np.load(out / extraction.CHOSEN_TOKENS_FILE)
    meta = [json.loads(line) for line in (out / "meta.jsonl").read_text().splitlines()]
    assert offsets.shape == (len(PAIRS) + 1,)
    assert np.diff(offsets).tolist() == [row["chosen_tokens"] for row in meta]
    assert tokens.shape == (offsets[-1], 32)
    with pytest.raises(FeatureError, match="unpooled"):
        load_features(out)


def test_extract_unpaired_texts(tiny_model_pad_eos_dir, tmp_path):
    data = tmp_path / "reviews"
    for label, texts in (("pos", ["A good answer.", "Clear and kind.", "Correct!"]), ("neg", ["Vague.", "Rude and bad."])):
        (data / label).mkdir(parents=True)
        for index, text in enumerate(texts):
            (data / label / f"{label}{index}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "features"
    run_extract(tiny_model_pad_eos_dir, data, out, "--pool", "last")
    features = load_features(out)
    assert features.paired is False
    assert features.chosen.shape == (3, 32)
    assert features.rejected.shape == (2, 32)
    assert features.manifest["counts"]["texts"] == 5


def test_resume_after_crash_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_extract(tiny_model_dir, pairs_file, reference, "--batch_size", "2")

    crashed = tmp_path / "crashed"
    original_write = extraction.ShardStore.write
    calls = {"count": 0}

    def write_then_crash(self, batch_index, arrays, seconds):
        if calls["count"] == 3:
            raise KeyboardInterrupt("simulated crash")
        calls["count"] += 1
        original_write(self, batch_index, arrays, seconds)

    monkeypatch.setattr(extraction.ShardStore, "write", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_extract(tiny_model_dir, pairs_file, crashed, "--batch_size", "2")
    assert not (crashed / "manifest.json").exists()
    assert len(list((crashed / extraction.PARTIAL_DIR).glob("batch_*.safetensors"))) == 3
    monkeypatch.setattr(extraction.ShardStore, "write", original_write)

    computed = []

    def count_forward(model, input_ids, attention_mask):
        computed.append(input_ids.shape[0])
        return original_forward(model, input_ids, attention_mask)

    original_forward = extraction.last_hidden_states
    monkeypatch.setattr(extraction, "last_hidden_states", count_forward)
    run_extract(tiny_model_dir, pairs_file, crashed, "--batch_size", "2")
    assert len(computed) == 2 * len(PAIRS) // 2 - 3
    for name in ("chosen.npy", "rejected.npy"):
        assert np.array_equal(np.load(reference / name), np.load(crashed / name)), name
    assert (reference / "meta.jsonl").read_text() == (crashed / "meta.jsonl").read_text()

    computed.clear()
    finished = run_extract(tiny_model_dir, pairs_file, crashed, "--batch_size", "2")
    assert computed == []
    assert finished["counts"]["pairs"] == len(PAIRS)


def test_changed_settings_refuse_to_resume(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "features"

    def crash(self, batch_index, arrays, seconds):
        raise KeyboardInterrupt("simulated crash")

    original_write = extraction.ShardStore.write
    monkeypatch.setattr(extraction.ShardStore, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        run_extract(tiny_model_dir, pairs_file, out, "--pool", "mean")
    monkeypatch.setattr(extraction.ShardStore, "write", original_write)

    with pytest.raises(ExtractionError, match=r"max_length: 48 -> 40.*--overwrite"):
        run_extract(tiny_model_dir, pairs_file, out, "--pool", "mean", "--max_length", "40")
    write_pairs(pairs_file, PAIRS[:-1])
    with pytest.raises(ExtractionError, match="data_sha256"):
        run_extract(tiny_model_dir, pairs_file, out, "--pool", "mean")

    run_extract(tiny_model_dir, pairs_file, out, "--pool", "mean", "--overwrite")
    assert load_features(out).chosen.shape[0] == len(PAIRS) - 1
    with pytest.raises(ExtractionError, match="finished extraction with other settings.*pool_span"):
        run_extract(tiny_model_dir, pairs_file, out, "--pool", "mean", "--pool_span", "response")


# ----------------------------------------------------------------------------- bad input reaches the user before the model loads


def test_bad_data_reported_before_model_load(tiny_model_dir, tmp_path, no_model_load):
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text(json.dumps({"prompt": "Q", "chosen": "A"}) + "\n", encoding="utf-8")
    empty_text = tmp_path / "empty.jsonl"
    empty_text.write_text(json.dumps({"prompt": "Q", "chosen": "", "rejected": "B"}) + "\n", encoding="utf-8")
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "Q", "chosen": "\xff\xfe", "rejected": "B"}\n')
    cases = [
        (tmp_path / "absent.jsonl", "not found"),
        (missing_field, "rejected"),
        (empty_text, "chosen"),
        (bad_bytes, "UTF-8"),
    ]
    for data_path, message in cases:
        with pytest.raises(DataError, match=message):
            run_extract(tiny_model_dir, data_path, tmp_path / "out")


def test_bad_settings_reported_before_model_load(tiny_model_dir, pairs_file, tmp_path, no_model_load):
    out = tmp_path / "out"
    with pytest.raises(ExtractionError, match="--max_length"):
        run_extract(tiny_model_dir, pairs_file, out, "--max_length", "0")
    with pytest.raises(ExtractionError, match="--batch_size"):
        run_extract(tiny_model_dir, pairs_file, out, "--batch_size", "0")
    with pytest.raises(ExtractionError, match="--max_pairs"):
        run_extract(tiny_model_dir, pairs_file, out, "--max_pairs", "-1")
    with pytest.raises(ExtractionError, match="sum to 1"):
        run_extract(tiny_model_dir, pairs_file, out, "--split_fractions", "0.5", "0.2", "0.2")
    with pytest.raises(ExtractionError, match="exceeds the model's 256 positions"):
        run_extract(tiny_model_dir, pairs_file, out, "--max_length", "1000")
    with pytest.raises(SystemExit):
        run_extract(tiny_model_dir, pairs_file, out, "--pool", "max")

    config = tmp_path / "config.yaml"
    config.write_text("extract:\n  pool: mean\n  max_lenght: 64\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_lenght"):
        run_extract(tiny_model_dir, pairs_file, out, "--config", str(config))


def test_bad_model_path_reported_before_model_load(tiny_model_dir, pairs_file, tmp_path, no_model_load):
    out = tmp_path / "out"
    with pytest.raises(BackboneError, match="not found"):
        run_extract(tmp_path / "no-such-model", pairs_file, out)
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    (not_a_model / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(BackboneError, match=r"no config.json.*weights.gguf.*--gguf_file"):
        run_extract(not_a_model, pairs_file, out)
    with pytest.raises(BackboneError, match="--gguf_file other.gguf not found"):
        run_extract(not_a_model, pairs_file, out, "--gguf_file", "other.gguf")


def test_config_section_sets_flags(tiny_model_dir, pairs_file, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model_shape: {hidden_size: 32}\nextract:\n  pool: last\n  max_length: 40\n", encoding="utf-8")
    out = tmp_path / "out"
    manifest = run_extract(tiny_model_dir, pairs_file, out, "--config", str(config), "--max_length", "44")
    assert manifest["pool"] == "last"
    assert manifest["max_length"] == 44


# ----------------------------------------------------------------------------- integration with a real instruct model


def test_smollm2_hh_rlhf_deterministic(smollm2_dir, hh_rlhf_file, tmp_path):
    argv = ["--model_path", str(smollm2_dir), "--data_path", str(hh_rlhf_file), "--max_pairs", "16",
            "--pool", "attn", "--max_length", "96", "--batch_size", "16"]
    first = extract_script.main([*argv, "--output_dir", str(tmp_path / "first")])
    second = extract_script.main([*argv, "--output_dir", str(tmp_path / "second")])
    features = load_features(tmp_path / "first")
    again = load_features(tmp_path / "second")
    assert features.chosen.shape == (16, 576)
    assert first["chat_template"] is True
    assert first["counts"]["pairs"] == second["counts"]["pairs"] == 16
    differences = np.abs(features.chosen - features.rejected).max(axis=1)
    assert np.all(differences > 1e-3)
    assert np.array_equal(features.chosen, again.chosen)
    assert np.array_equal(features.rejected, again.rejected)
