"""Human-study votes to per-dataset win rates with 95% Wald intervals, laid out as Table 2 of Feng & Pilanci,
"Convex Optimization for Alignment and Preference Learning on a Single GPU" (ICML 2026).

Each vote is one participant's choice of the best method for one question of
one dataset. A method's win rate on a dataset is the share of that dataset's
votes that chose it, so the win rates of a dataset sum to 100%. The 95% Wald
interval is ``p +/- z sqrt(p (1 - p) / n)`` with ``z = 1.959964`` (the 97.5%
normal quantile) and ``n`` the dataset's number of votes.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from coala.io import PathLike

REQUIRED_COLUMNS = ("participant", "dataset", "question", "preferred_method")
WALD_Z_95 = 1.959963984540054


class VotesError(ValueError):
    """A votes CSV that cannot be used as given."""


@dataclass(frozen=True)
class WinRate:
    """One method's share of one dataset's votes.

    Attributes:
      dataset: the dataset name.
      method: the method name.
      wins: votes that chose this method.
      votes: all votes of the dataset.
      rate: wins / votes, in [0, 1].
      half_width: the 95% Wald half-width, in [0, 1].
    """

    dataset: str
    method: str
    wins: int
    votes: int
    rate: float
    half_width: float


def wald_interval(wins: int, total: int, z: float = WALD_Z_95) -> tuple[float, float]:
    """Return the rate ``wins / total`` and its Wald half-width ``z sqrt(p (1 - p) / total)``."""
    if total <= 0:
        raise VotesError(f"A Wald interval needs at least one vote, got total={total}.")
    if not 0 <= wins <= total:
        raise VotesError(f"wins={wins} must lie between 0 and total={total}.")
    rate = wins / total
    return rate, z * math.sqrt(rate * (1.0 - rate) / total)


def read_votes(path: PathLike) -> list[dict[str, str]]:
    """Read the votes CSV (header ``participant,dataset,question,preferred_method``) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise VotesError(f"Votes file not found: {path}.")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise VotesError(f"{path} lacks the columns {missing}; its header is {reader.fieldnames}. Expected {list(REQUIRED_COLUMNS)}.")
        votes = [{column: (row[column] or "").strip() for column in REQUIRED_COLUMNS} for row in reader]
    seen: set[tuple[str, str, str]] = set()
    for line, vote in enumerate(votes, start=2):
        empty = [column for column in REQUIRED_COLUMNS if not vote[column]]
        if empty:
            raise VotesError(f"{path} line {line} has empty {empty}.")
        key = (vote["participant"], vote["dataset"], vote["question"])
        if key in seen:
            raise VotesError(f"{path} line {line}: participant {key[0]!r} voted twice on question {key[2]!r} of dataset {key[1]!r}.")
        seen.add(key)
    if not votes:
        raise VotesError(f"{path} contains no votes.")
    return votes


def win_rates(votes: Sequence[dict[str, str]], methods: Sequence[str] | None = None) -> list[WinRate]:
    """Compute each method's win rate and 95% Wald half-width per dataset.

    Args:
      votes: records with ``dataset`` and ``preferred_method``.
      methods: the methods to report, in this order; a method with no votes
        gets 0%. ``None`` reports every voted method in order of first appearance.
    """
    voted = list(dict.fromkeys(vote["preferred_method"] for vote in votes))
    methods = list(methods) if methods else voted
    unknown = sorted(set(voted) - set(methods))
    if unknown:
        raise VotesError(f"Votes name methods {unknown} that are not in the requested methods {methods}.")
    results = []
    for dataset in dict.fromkeys(vote["dataset"] for vote in votes):
        chosen = [vote["preferred_method"] for vote in votes if vote["dataset"] == dataset]
        for method in methods:
            wins = chosen.count(method)
            rate, half_width = wald_interval(wins, len(chosen))
            results.append(WinRate(dataset, method, wins, len(chosen), rate, half_width))
    return results


def format_table_markdown(results: Sequence[WinRate]) -> str:
    """Render win rates as Table 2: one row per dataset, one column per method, ``rate% ± half-width%``."""
    methods = list(dict.fromkeys(result.method for result in results))
    datasets = list(dict.fromkeys(result.dataset for result in results))
    cells = {(result.dataset, result.method): result for result in results}
    lines = ["| dataset | votes | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 2)]
    for dataset in datasets:
        votes = next(result.votes for result in results if result.dataset == dataset)
        row = [f"{100 * cells[dataset, m].rate:.1f}% ± {100 * cells[dataset, m].half_width:.1f}%" for m in methods]
        lines.append(f"| {dataset} | {votes} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def rows_for_csv(results: Sequence[WinRate]) -> list[dict[str, object]]:
    """Return one flat record per (dataset, method) with rates in percent, for a CSV file."""
    return [
        {
            "dataset": result.dataset,
            "method": result.method,
            "wins": result.wins,
            "votes": result.votes,
            "win_rate": 100 * result.rate,
            "wald95_half_width": 100 * result.half_width,
        }
        for result in results
    ]
