"""The local LM judge on SmolLM2-135M-Instruct, reused annotations, and the alpaca_eval judge's guard."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ALPACA_DIR
from coala.alpaca import AlignedRow, AlpacaDataError, align_on_instruction
from coala.judge import JudgeError, LocalJudge, annotate_with_alpaca_eval, load_annotations

REFERENCE = ALPACA_DIR / "gpt4_1106_preview_model_outputs.json.gz"
# Short answers keep the judge's prompts near 150 tokens, so the SmolLM2 tests stay fast on CPU.
MODEL_ANSWERS = ["I do not know.", "It is a large city with many people."]
MAX_RESPONSE_TOKENS = 24


def reference_records() -> list[dict]:
    with gzip.open(REFERENCE, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def short_rows(count: int = len(MODEL_ANSWERS)) -> list[AlignedRow]:
    reference = reference_records()
    outputs = [{"instruction": reference[i]["instruction"], "output": MODEL_ANSWERS[i], "generator": "short"} for i in range(count)]
    return align_on_instruction(outputs, reference)


def swapped(rows: list[AlignedRow]) -> list[AlignedRow]:
    return [AlignedRow(row.instruction, row.reference, row.model, row.position) for row in rows]


@pytest.fixture(scope="module")
def smollm2_judge(smollm2_dir: Path) -> LocalJudge:
    from coala.backbone import load_backbone

    model, tokenizer = load_backbone(str(smollm2_dir))
    return LocalJudge(model, tokenizer, batch_size=4, max_response_tokens=MAX_RESPONSE_TOKENS, name="local:smollm2")


def test_judge_command_smollm2_and_swap(
    smollm2_dir: Path, smollm2_judge: LocalJudge, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import eval_alpaca

    reference = reference_records()
    outputs = [
        {"instruction": reference[i]["instruction"], "output": answer, "generator": "short", "dataset": "x"}
        for i, answer in enumerate(MODEL_ANSWERS)
    ]
    outputs_path = tmp_path / "run" / "model_outputs.json"
    outputs_path.parent.mkdir()
    outputs_path.write_text(json.dumps(outputs))

    eval_alpaca.main(
        [
            "judge",
            "--outputs", str(outputs_path),
            "--reference", str(REFERENCE),
            "--judge", f"local:{smollm2_dir}",
            "--judge_max_response_tokens", str(MAX_RESPONSE_TOKENS),
            "--judge_batch_size", "4",
            "--alpaca_eval_data", str(tmp_path / "no-lc-files"),
            "--method", "plain",
            "--dataset", "none",
        ]
    )
    annotations = json.loads((tmp_path / "run" / "annotations.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())

    assert [row["output_2"] for row in annotations] == MODEL_ANSWERS
    assert all(1.0 <= row["preference"] <= 2.0 for row in annotations)
    assert all(0.0 < row["label_probability_mass"] <= 1.0 for row in annotations)
    for row in annotations:
        assert row["preference"] == pytest.approx((row["preference_reference_first"] + row["preference_model_first"]) / 2)
    assert metrics["n_total"] == len(MODEL_ANSWERS)
    assert metrics["win_rate"] == pytest.approx(100 * np.mean([row["preference"] - 1 for row in annotations]))
    assert metrics["avg_length"] == pytest.approx(np.mean([len(text) for text in MODEL_ANSWERS]))
    assert metrics["run"]["method"] == "plain"
    assert "LC win rate" in capsys.readouterr().out

    # Swapping output and reference maps each preference p to 3 - p.
    backward = smollm2_judge.annotate(swapped(short_rows()))
    for a, b in zip(annotations, backward):
        assert b["preference"] == pytest.approx(3.0 - a["preference"], abs=1e-4)
        # Each presentation order of the swapped pair is the other order of the original.
        assert b["preference_reference_first"] == pytest.approx(3.0 - a["preference_model_first"], abs=1e-4)


def test_batched_left_padding_matches_single_prompts(smollm2_judge: LocalJudge) -> None:
    prompts = [
        smollm2_judge.build_prompt("Name a fruit.", "Apple.", "A banana is a long yellow fruit that grows in bunches."),
        smollm2_judge.build_prompt("Say hi.", "Hi!", "Hello."),
    ]
    batched = smollm2_judge.label_probabilities(prompts)

    single = LocalJudge(smollm2_judge.model, smollm2_judge.tokenizer, batch_size=1, max_response_tokens=MAX_RESPONSE_TOKENS)
    alone = single.label_probabilities(prompts)

    np.testing.assert_allclose(batched, alone, rtol=1e-3, atol=1e-6)
    assert np.all(batched.sum(axis=1) <= 1.0)


def test_judge_rejects_bad_settings(smollm2_judge: LocalJudge) -> None:
    with pytest.raises(JudgeError, match="batch_size must be positive"):
        LocalJudge(smollm2_judge.model, smollm2_judge.tokenizer, batch_size=0)
    with pytest.raises(JudgeError, match="Got 1 instructions, 2 references"):
        smollm2_judge.judge(["a"], ["b", "c"], ["d"])


def test_multi_token_label_rejected(tiny_model_pad_eos_dir: Path) -> None:
    from coala.backbone import load_backbone

    model, tokenizer = load_backbone(str(tiny_model_pad_eos_dir))
    # Without a chat template the labels follow a space, and the tiny tokenizer splits " B" in two.
    assert len(tokenizer.encode(" B", add_special_tokens=False)) == 2

    with pytest.raises(JudgeError, match="splits the label ' B' into 2 tokens"):
        LocalJudge(model, tokenizer)


# ---------------------------------------------------------------------------
# Reused annotations and the alpaca_eval judge


def test_reused_annotations_must_match_outputs(tmp_path: Path) -> None:
    rows = short_rows(2)
    annotations = [
        {"instruction": row.instruction, "output_1": row.reference["output"], "output_2": row.model["output"], "preference": 1.2}
        for row in rows
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(annotations))
    assert [a["preference"] for a in load_annotations(path, rows)] == [1.2, 1.2]

    annotations[1]["output_2"] = "an older answer"
    path.write_text(json.dumps(annotations))
    with pytest.raises(AlpacaDataError, match="1 annotations .* judge a different output_2"):
        load_annotations(path, rows)

    path.write_text(json.dumps(annotations[:1]))
    with pytest.raises(AlpacaDataError, match="no annotation for 1 of 2 outputs"):
        load_annotations(path, rows)


def test_alpaca_eval_judge_needs_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(JudgeError, match="set OPENAI_API_KEY"):
        annotate_with_alpaca_eval(short_rows(1))
