"""Human-study votes: win rates per dataset, 95% Wald intervals, Table 2 layout."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from coala.human_eval import VotesError, format_table_markdown, read_votes, wald_interval, win_rates


def write_votes(path: Path, counts: dict[str, dict[str, int]]) -> Path:
    """Write one vote per participant and dataset, ``counts[dataset][method]`` votes for each method."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["participant", "dataset", "question", "preferred_method"])
        for dataset, per_method in counts.items():
            participant = 0
            for method, number in per_method.items():
                for _ in range(number):
                    writer.writerow([f"p{participant}", dataset, "q1", method])
                    participant += 1
    return path


def test_wald_interval_hand_computation() -> None:
    rate, half_width = wald_interval(42, 107)

    assert rate == pytest.approx(42 / 107)
    assert half_width == pytest.approx(1.959963984540054 * math.sqrt((42 / 107) * (65 / 107) / 107))
    # Rounded as Table 2 prints it: 39.3% +/- 9.3%.
    assert round(100 * half_width, 1) == 9.3


def test_wald_interval_edges() -> None:
    assert wald_interval(0, 10) == (0.0, 0.0)
    assert wald_interval(10, 10) == (1.0, 0.0)
    with pytest.raises(VotesError, match="at least one vote"):
        wald_interval(0, 0)
    with pytest.raises(VotesError, match="between 0 and total"):
        wald_interval(11, 10)


def test_win_rates_per_dataset(tmp_path: Path) -> None:
    counts = {"EduFeedback": {"COALA": 42, "ORPO": 17, "DPO": 31, "SFT": 17}, "IMDb": {"COALA": 46, "DPO": 27, "SFT": 13}}
    votes = read_votes(write_votes(tmp_path / "votes.csv", counts))

    results = win_rates(votes, methods=["COALA", "ORPO", "DPO", "SFT"])
    by_key = {(r.dataset, r.method): r for r in results}

    assert by_key["IMDb", "ORPO"].wins == 0
    assert by_key["IMDb", "COALA"].votes == 86
    assert by_key["IMDb", "COALA"].rate == pytest.approx(46 / 86)
    assert by_key["EduFeedback", "DPO"].half_width == pytest.approx(1.959963984540054 * math.sqrt((31 / 107) * (76 / 107) / 107))
    for dataset in counts:
        assert sum(r.rate for r in results if r.dataset == dataset) == pytest.approx(1.0)


def test_table2_layout(tmp_path: Path) -> None:
    votes = read_votes(write_votes(tmp_path / "votes.csv", {"IMDb": {"COALA": 3, "SFT": 1}}))

    markdown = format_table_markdown(win_rates(votes, ["COALA", "SFT"]))

    lines = markdown.splitlines()
    assert lines[0] == "| dataset | votes | COALA | SFT |"
    assert lines[2] == "| IMDb | 4 | 75.0% ± 42.4% | 25.0% ± 42.4% |"


def test_unknown_method_rejected(tmp_path: Path) -> None:
    votes = read_votes(write_votes(tmp_path / "votes.csv", {"IMDb": {"COALA": 1, "KTO": 1}}))

    with pytest.raises(VotesError, match=r"\['KTO'\]"):
        win_rates(votes, ["COALA", "SFT"])


def test_missing_column_rejected(tmp_path: Path) -> None:
    path = tmp_path / "votes.csv"
    path.write_text("participant,dataset,method\np1,IMDb,COALA\n")

    with pytest.raises(VotesError, match="lacks the columns"):
        read_votes(path)


def test_double_vote_rejected(tmp_path: Path) -> None:
    path = tmp_path / "votes.csv"
    path.write_text("participant,dataset,question,preferred_method\np1,IMDb,q1,COALA\np1,IMDb,q1,SFT\n")

    with pytest.raises(VotesError, match="voted twice"):
        read_votes(path)


def test_human_command_prints_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import eval_alpaca

    votes_path = write_votes(tmp_path / "votes.csv", {"EduFeedback": {"COALA": 2, "DPO": 2}})
    eval_alpaca.main(["human", str(votes_path), "--methods", "COALA,DPO"])

    printed = capsys.readouterr().out
    assert "| EduFeedback | 4 | 50.0% ± 49.0% | 50.0% ± 49.0% |" in printed
    with open(tmp_path / "table2.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["COALA", "DPO"]
    assert float(rows[0]["win_rate"]) == pytest.approx(50.0)
