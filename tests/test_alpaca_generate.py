"""Eval-set files, alignment on instruction text, resumable generation and the generate command."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from coala.alpaca import (
    AlpacaDataError,
    SamplingSettings,
    align_on_instruction,
    generate_outputs,
    load_eval_set,
    load_model_outputs,
    make_batch_generator,
    read_records,
)

INSTRUCTIONS = [
    "Name a fruit.",
    "How do plants make sugar?",
    "Give one tip for baking bread.",
    "What is a good answer?",
    "Count to three.",
]


def eval_records() -> list[dict]:
    return [{"instruction": text, "output": f"reference {i}", "dataset": "tiny"} for i, text in enumerate(INSTRUCTIONS)]


# ---------------------------------------------------------------------------
# Files


def test_read_records_json_jsonl_gzip(tmp_path: Path) -> None:
    records = eval_records()
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in records))

    for name in ("a.json", "b.jsonl", "c.jsonl.gz"):
        assert read_records(tmp_path / name) == records


def test_load_eval_set_checks_instructions(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "ok"}, {"instruction": "  "}]))

    with pytest.raises(AlpacaDataError, match="Record 1 .* no non-empty string 'instruction'"):
        load_eval_set(str(path))


def test_load_eval_set_max_instances(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps(eval_records()))

    records = load_eval_set(str(path), max_instances=2)

    assert [r["instruction"] for r in records] == INSTRUCTIONS[:2]


def test_unknown_eval_set_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(AlpacaDataError, match="Pass --eval_set with a local JSON/JSONL file"):
        load_eval_set("no-such-owner/no-such-eval-set")


# ---------------------------------------------------------------------------
# Alignment


def test_alignment_subset_in_reference_order_positions() -> None:
    reference = eval_records()
    outputs = [{"instruction": INSTRUCTIONS[3], "output": "x"}, {"instruction": INSTRUCTIONS[1], "output": "y"}]

    rows = align_on_instruction(outputs, reference)

    assert [row.position for row in rows] == [3, 1]
    assert rows[0].reference["output"] == "reference 3"
    assert rows[1].model["output"] == "y"


def test_alignment_duplicate_outputs_rejected() -> None:
    outputs = [{"instruction": INSTRUCTIONS[0], "output": "x"}, {"instruction": INSTRUCTIONS[0], "output": "y"}]

    with pytest.raises(AlpacaDataError, match="model outputs contain 1 duplicated instructions, e.g. 'Name a fruit.'"):
        align_on_instruction(outputs, eval_records())


def test_alignment_duplicate_reference_rejected() -> None:
    reference = eval_records() + [eval_records()[2]]

    with pytest.raises(AlpacaDataError, match="reference contain 1 duplicated"):
        align_on_instruction([{"instruction": INSTRUCTIONS[0], "output": "x"}], reference)


def test_alignment_missing_instructions_rejected() -> None:
    outputs = [{"instruction": INSTRUCTIONS[0], "output": "x"}, {"instruction": "Not in the set", "output": "y"}]

    with pytest.raises(AlpacaDataError, match="1 of 2 model instructions are missing from the reference, e.g. 'Not in the set'"):
        align_on_instruction(outputs, eval_records())


def test_alignment_zero_matches_rejected() -> None:
    outputs = [{"instruction": "elsewhere", "output": "y"}]

    with pytest.raises(AlpacaDataError, match="None of the 1 model instructions appear in the reference's 5"):
        align_on_instruction(outputs, eval_records())


def test_model_outputs_format_checked(tmp_path: Path) -> None:
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps([{"instruction": "a", "answer": "b"}]))

    with pytest.raises(AlpacaDataError, match="no string 'output'"):
        load_model_outputs(path)


# ---------------------------------------------------------------------------
# Resumable generation on a real (tiny) model


def load_tiny(model_dir: Path):
    from coala.backbone import load_backbone

    return load_backbone(str(model_dir))


def test_generation_resumes_after_interruption(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_tiny(tiny_model_dir)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, batch_size=2, seed=3)
    sampler = make_batch_generator(model, tokenizer, settings)
    records = eval_records()

    full = generate_outputs(records, sampler, tmp_path / "full.json", "tiny", batch_size=2, progress=False)

    calls: list[int] = []

    def interrupted(instructions: list[str], first_index: int) -> list[str]:
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(first_index)
        return sampler(instructions, first_index)

    path = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        generate_outputs(records, interrupted, path, "tiny", batch_size=2, progress=False)
    partial = load_model_outputs(path)
    assert [row["instruction"] for row in partial] == INSTRUCTIONS[:4]

    calls.clear()
    resumed = generate_outputs(records, interrupted, path, "tiny", batch_size=2, progress=False)

    assert calls == [4]
    assert [row["instruction"] for row in resumed] == INSTRUCTIONS
    assert [row["output"] for row in resumed] == [row["output"] for row in full]
    assert load_model_outputs(path) == resumed
    assert {row["generator"] for row in resumed} == {"tiny"}
    assert {row["dataset"] for row in resumed} == {"tiny"}


def test_resume_rejects_other_eval_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps([{"instruction": "from another set", "output": "x", "generator": "g", "dataset": "d"}]))

    with pytest.raises(AlpacaDataError, match="not in this eval set"):
        generate_outputs(eval_records(), lambda instructions, first: [], path, "tiny", batch_size=2, progress=False)


def write_tiny_head(folder: Path, hidden_size: int) -> Path:
    from coala.head import HeadParams, save_head

    rng = np.random.default_rng(0)
    params = HeadParams(
        theta1=rng.normal(size=(hidden_size, 4)).astype(np.float32),
        theta2=rng.normal(size=4).astype(np.float32),
        feature_mean=np.zeros(hidden_size, np.float32),
        feature_std=np.ones(hidden_size, np.float32),
        config={"pooling": {"pool": "mean", "pool_span": "all", "max_length": 64, "hidden_size": hidden_size, "model_name": "tiny"}},
    )
    return save_head(folder, params)


def test_generate_command_plain_and_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    import eval_alpaca

    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps(eval_records()))
    common = ["--model_path", str(tiny_model_dir), "--eval_set", str(eval_set), "--max_new_tokens", "5", "--batch_size", "2", "--max_instances", "3"]
    head_dir = write_tiny_head(tmp_path / "head", hidden_size=32)

    eval_alpaca.main(["generate", *common, "--output_dir", str(tmp_path / "plain")])
    eval_alpaca.main(["generate", *common, "--output_dir", str(tmp_path / "guided"), "--head", str(head_dir), "--guidance_scale", "5"])

    plain = load_model_outputs(tmp_path / "plain" / "model_outputs.json")
    guided = load_model_outputs(tmp_path / "guided" / "model_outputs.json")
    assert [row["instruction"] for row in plain] == INSTRUCTIONS[:3]
    assert [row["instruction"] for row in guided] == INSTRUCTIONS[:3]
    assert {row["generator"] for row in plain} == {tiny_model_dir.name}
    assert {row["generator"] for row in guided} == {f"{tiny_model_dir.name}+coala"}
    config = json.loads((tmp_path / "guided" / "generation_config.json").read_text())
    assert config["head"] == str(head_dir)
    assert config["guidance_scale"] == 5.0


def test_generate_command_refuses_changed_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    import eval_alpaca

    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps(eval_records()))
    common = ["--model_path", str(tiny_model_dir), "--eval_set", str(eval_set), "--max_instances", "1", "--output_dir", str(tmp_path / "out")]
    eval_alpaca.main(["generate", *common, "--max_new_tokens", "3"])

    with pytest.raises(SystemExit, match=r"max_new_tokens: 3 -> 4"):
        eval_alpaca.main(["generate", *common, "--max_new_tokens", "4"])
