"""Win rates against the official leaderboard, preference codings, the LC GLM offline, Table 1 aggregation."""

from __future__ import annotations

import csv
import gzip
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ALPACA_DIR
from coala import winrate
from coala.winrate import (
    LcFiles,
    MetricsError,
    aggregate_runs,
    collect_runs,
    compute_length_controlled,
    compute_winrate,
    format_table_markdown,
    judge_metrics,
)

LEADERBOARD = ALPACA_DIR / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
REFERENCE = ALPACA_DIR / "gpt4_1106_preview_model_outputs.json.gz"
SIX_MODELS = ("alpaca-7b", "falcon-7b-instruct", "gemma-2b-it", "gpt-3.5-turbo-1106", "phi-2", "vicuna-7b")


def read_annotations(model: str) -> list[dict]:
    with gzip.open(ALPACA_DIR / "annotations" / f"{model}.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


def leaderboard_row(model: str) -> dict[str, str]:
    with open(LEADERBOARD, newline="", encoding="utf-8") as handle:
        rows = {row[""]: row for row in csv.DictReader(handle)}
    return rows[model]


# ---------------------------------------------------------------------------
# Leaderboard


@pytest.mark.parametrize("model", SIX_MODELS)
def test_winrate_matches_leaderboard(model: str) -> None:
    annotations = read_annotations(model)
    expected = leaderboard_row(model)
    result = compute_winrate([row["preference"] for row in annotations])

    assert abs(result["win_rate"] - float(expected["win_rate"])) < 0.01
    assert abs(result["discrete_win_rate"] - float(expected["discrete_win_rate"])) < 0.01
    assert abs(result["standard_error"] - float(expected["standard_error"])) < 0.01
    assert result["n_total"] == int(expected["n_total"])
    assert result["n_wins"] == int(expected["n_wins"])
    assert result["n_wins_base"] == int(expected["n_wins_base"])
    assert result["n_draws"] == int(expected["n_draws"])


def test_phi2_has_803_of_805_rows() -> None:
    annotations = read_annotations("phi-2")
    with gzip.open(REFERENCE, "rt", encoding="utf-8") as handle:
        reference = json.load(handle)
    positions = {row["instruction"]: index for index, row in enumerate(reference)}

    assert len(reference) == 805
    assert len(annotations) == 803
    assert all(row["instruction"] in positions for row in annotations)


# ---------------------------------------------------------------------------
# Preference codings, ties, NaN


def test_discrete_coding_counts_ties_as_half() -> None:
    result = compute_winrate([2, 2, 1, 0])
    scores = [1.0, 1.0, 0.0, 0.5]

    assert result["win_rate"] == pytest.approx(62.5)
    assert result["discrete_win_rate"] == pytest.approx(62.5)
    assert result["standard_error"] == pytest.approx(100 * statistics.stdev(scores) / math.sqrt(4))
    assert (result["n_wins"], result["n_wins_base"], result["n_draws"]) == (2, 1, 1)


def test_float_preferences_and_exact_ties() -> None:
    result = compute_winrate([1.5, 1.5, 1.2, 1.9])

    assert result["win_rate"] == pytest.approx(100 * (0.5 + 0.5 + 0.2 + 0.9) / 4)
    # Rounded: two ties, one loss (1.2 -> 1), one win (1.9 -> 2).
    assert result["discrete_win_rate"] == pytest.approx(50.0)
    assert result["n_draws"] == 2
    assert result["n_wins"] == 1
    assert result["n_wins_base"] == 1


def test_nan_rows_dropped_and_counted() -> None:
    result = compute_winrate([2.0, float("nan"), None, 1.0])

    assert result["n_nan"] == 2
    assert result["n_total"] == 2
    assert result["win_rate"] == pytest.approx(50.0)


@pytest.mark.parametrize("bad", [0.5, 3.0, -1.0])
def test_out_of_range_preference_rejected(bad: float) -> None:
    with pytest.raises(MetricsError, match="outside alpaca_eval's coding"):
        compute_winrate([1.0, bad])


def test_all_nan_preferences_rejected() -> None:
    with pytest.raises(MetricsError, match="All 2 preferences are NaN"):
        compute_winrate([None, float("nan")])


# ---------------------------------------------------------------------------
# Length-controlled win rate


def write_lc_fixture(folder: Path, num_instructions: int, seed: int = 0) -> Path:
    """Write df_gamed.csv and instruction_difficulty.csv in the hub files' format (two gamed baselines)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 1.0, num_instructions)
    frames = []
    for model, sign in (("gpt4_gamed_concise", -1.0), ("gpt4_gamed_verbose", 1.0)):
        delta = sign * np.abs(rng.normal(1.0, 0.3, num_instructions))
        preference = 1.0 / (1.0 + np.exp(-(0.8 * np.tanh(delta) + 0.5 * difficulty)))
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "index": np.arange(num_instructions),
                    "preference": preference,
                    "std_delta_len": delta,
                    "instruction_difficulty": difficulty,
                    "not_gamed_baseline": False,
                }
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_csv(folder / winrate.GAMED_FILE, index=False)
    pd.Series(difficulty, index=pd.RangeIndex(num_instructions, name="index"), name="instruction_difficulty").to_csv(
        folder / winrate.DIFFICULTY_FILE
    )
    return folder


def synthetic_annotations(num: int, seed: int = 1) -> list[dict]:
    """A model that writes longer outputs than the reference and wins more often when it does."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num):
        extra = int(rng.integers(-50, 400))
        preference = float(np.clip(1.2 + extra / 600 + rng.normal(0, 0.1), 1.0, 2.0))
        rows.append(
            {
                "instruction": f"instruction {index}",
                "output_1": "r" * 300,
                "output_2": "m" * (300 + extra),
                "generator_1": "reference",
                "generator_2": "model",
                "preference": preference,
            }
        )
    return rows


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any download by alpaca_eval's GLM module fail the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    glm = winrate.import_alpaca_eval_metrics().glm_winrate

    def reject_download(*args, **kwargs):
        raise AssertionError(f"alpaca_eval tried to download {args} {kwargs}")

    monkeypatch.setattr(glm, "hf_hub_download", reject_download)


def test_lc_runs_offline_from_local_files(tmp_path: Path, no_network: None) -> None:
    data_dir = write_lc_fixture(tmp_path / "lc", num_instructions=60)
    annotations = synthetic_annotations(60)
    files, where = winrate.find_lc_files(data_dir)
    assert files is not None and where == str(data_dir)

    result = compute_length_controlled(annotations, list(range(60)), files)
    raw = compute_winrate([row["preference"] for row in annotations])

    assert 0.0 < result["length_controlled_winrate"] < 100.0
    assert result["lc_glm"] == "length_controlled_v1"
    assert result["lc_note"] is None
    # The model wins through length, so removing the length effect lowers its win rate.
    assert result["length_controlled_winrate"] < raw["win_rate"]
    glm = winrate.import_alpaca_eval_metrics().glm_winrate
    with pytest.raises(AssertionError, match="tried to download"):
        glm.hf_hub_download("tatsu-lab/alpaca_eval", "df_gamed.csv")


def test_lc_leaves_out_difficulty_outside_official_set(tmp_path: Path, no_network: None) -> None:
    data_dir = write_lc_fixture(tmp_path / "lc", num_instructions=60)
    annotations = synthetic_annotations(60)
    files, _ = winrate.find_lc_files(data_dir)
    positions = list(range(50)) + [None] * 10

    result = compute_length_controlled(annotations, positions, files)

    assert result["lc_glm"] == "length_controlled_v1 without instruction_difficulty"
    assert "10 of 60 instructions are outside the official AlpacaEval set" in result["lc_note"]
    assert 0.0 < result["length_controlled_winrate"] < 100.0


def test_lc_missing_files_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    annotations = synthetic_annotations(40)

    metrics = judge_metrics(annotations, list(range(40)), alpaca_eval_data=tmp_path / "empty", approximate_lc=True)

    assert metrics["length_controlled_winrate"] is None
    assert "df_gamed.csv" in metrics["length_controlled_winrate_missing_reason"]
    assert "--alpaca_eval_data" in metrics["length_controlled_winrate_missing_reason"]
    assert 0.0 < metrics["length_controlled_minimal_winrate"] < 100.0
    assert metrics["win_rate"] == pytest.approx(compute_winrate([row["preference"] for row in annotations])["win_rate"])
    assert metrics["avg_length"] == pytest.approx(np.mean([len(row["output_2"]) for row in annotations]))


def test_lc_rejects_foreign_gamed_file(tmp_path: Path) -> None:
    path = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": ["x"], "preference": [0.5]}).to_csv(path, index=False)

    with pytest.raises(MetricsError, match="lacks columns"):
        compute_length_controlled(synthetic_annotations(5), list(range(5)), LcFiles(path, None))


# ---------------------------------------------------------------------------
# Table 1


def write_metrics(root: Path, model: str, method: str, dataset: str, seed: int, **values) -> None:
    folder = root / model / method / dataset / f"seed{seed}"
    folder.mkdir(parents=True)
    payload = {"win_rate": values["win_rate"], "length_controlled_winrate": values.get("lc"), "avg_length": values["length"]}
    if values.get("lc") is None:
        payload["length_controlled_winrate_missing_reason"] = "df_gamed.csv missing"
    (folder / "metrics.json").write_text(json.dumps(payload))


def test_table_aggregates_mean_and_std(tmp_path: Path) -> None:
    wins = [10.0, 12.0, 14.0]
    lcs = [20.0, 21.0, 23.0]
    for seed, (win, lc) in enumerate(zip(wins, lcs)):
        write_metrics(tmp_path, "SmolLM2", "COALA", "IMDb", seed, win_rate=win, lc=lc, length=400 + seed)
        write_metrics(tmp_path, "SmolLM2", "DPO", "IMDb", seed, win_rate=win / 2, lc=None, length=300)

    table = aggregate_runs(collect_runs(tmp_path))
    coala_row = table[(table["method"] == "COALA")].iloc[0]

    assert coala_row["seeds"] == 3
    assert coala_row["win_rate_mean"] == pytest.approx(statistics.mean(wins))
    assert coala_row["win_rate_std"] == pytest.approx(statistics.stdev(wins))
    assert coala_row["length_controlled_winrate_std"] == pytest.approx(statistics.stdev(lcs))
    markdown = format_table_markdown(table)
    assert "| SmolLM2 | COALA | 21.33±1.53 | 12.00±2.00 | 401±1 |" in markdown
    assert "| SmolLM2 | DPO | n/a | 6.00±1.00 | 300±0 |" in markdown
    assert "df_gamed.csv missing" in markdown


def test_table_run_labels_override_path(tmp_path: Path) -> None:
    folder = tmp_path / "anything"
    folder.mkdir()
    run = {"model": "M", "method": "ORPO", "dataset": "Edu", "seed": 4}
    (folder / "metrics.json").write_text(json.dumps({"win_rate": 5.0, "avg_length": 100, "run": run}))

    runs = collect_runs(tmp_path)

    assert [(r.model, r.method, r.dataset, r.seed) for r in runs] == [("M", "ORPO", "Edu", 4)]


def test_table_duplicate_seed_rejected(tmp_path: Path) -> None:
    write_metrics(tmp_path, "M", "COALA", "IMDb", 0, win_rate=1.0, lc=1.0, length=1)
    other = tmp_path / "copy"
    other.mkdir()
    run = {"model": "M", "method": "COALA", "dataset": "IMDb", "seed": 0}
    (other / "metrics.json").write_text(json.dumps({"win_rate": 2.0, "avg_length": 1, "run": run}))

    with pytest.raises(MetricsError, match="Two results"):
        aggregate_runs(collect_runs(tmp_path))


def test_table_unlabelled_run_rejected(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"win_rate": 2.0, "avg_length": 1}))

    with pytest.raises(MetricsError, match="no method or dataset label"):
        collect_runs(tmp_path)


# ---------------------------------------------------------------------------
# Commands


def test_judge_command_reuses_annotations(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    import eval_alpaca

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)

    output_dir = tmp_path / "Mistral" / "SFT" / "Ultra" / "seed0"
    eval_alpaca.main(
        [
            "judge",
            "--reference", str(REFERENCE),
            "--judge", f"annotations:{ALPACA_DIR / 'annotations' / 'phi-2.json.gz'}",
            "--output_dir", str(output_dir),
            "--alpaca_eval_data", str(tmp_path / "no-lc-files"),
        ]
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    expected = leaderboard_row("phi-2")

    assert abs(metrics["win_rate"] - float(expected["win_rate"])) < 0.01
    assert metrics["n_total"] == 803
    assert len(json.loads((output_dir / "annotations.json").read_text())) == 803

    eval_alpaca.main(["table", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| Mistral | SFT | n/a | 2.35±0.00 |" in printed
    assert (tmp_path / "table1.csv").is_file()
