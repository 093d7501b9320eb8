"""AlpacaEval 2 metrics: win rate, discrete win rate, standard error, LC win rate, Table 1 aggregation.

Preferences follow alpaca_eval's coding: a float in [1, 2] is the probability
that the model's output (``output_2``) beats the reference (``output_1``), plus
one, so 1 means the reference wins, 2 means the model wins and 1.5 is a tie.
The discrete coding 0/1/2 is accepted too, with 0 meaning a tie. NaN rows (pairs
the judge returned no preference for) are dropped and counted.

The win rate, discrete win rate and standard error are alpaca_eval's own
``alpaca_eval.metrics.get_winrate`` (version 0.6.6). The length-controlled (LC)
win rate is alpaca_eval's ``get_length_controlled_winrate`` GLM, fed from local
copies of the two files it otherwise downloads from the Hugging Face hub
(``df_gamed.csv`` and ``instruction_difficulty.csv`` of the data set
``tatsu-lab/alpaca_eval``); see ``find_lc_files``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from coala.io import PathLike, read_json

logger = logging.getLogger(__name__)

HUB_REPO_ID = "tatsu-lab/alpaca_eval"
GAMED_FILE = "df_gamed.csv"
DIFFICULTY_FILE = "instruction_difficulty.csv"
LC_FILES = (GAMED_FILE, DIFFICULTY_FILE)
LC_GLM_NAME = "length_controlled_v1"
MINIMAL_GLM_NAME = "length_controlled_minimal"
# The package's length_controlled_v1 GLM without the per-instruction difficulty term, used when
# some instructions are not in the official set (their difficulty is unknown).
LC_FORMULA_WITHOUT_DIFFICULTY = "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1"


class MetricsError(ValueError):
    """Preferences or result files that cannot be turned into metrics."""


def import_alpaca_eval_metrics() -> Any:
    """Import ``alpaca_eval.metrics``, silencing the ``pkg_resources`` deprecation warning of alpaca-eval 0.6.6.

    NOTE: alpaca-eval 0.6.6 imports ``pkg_resources``, which setuptools 81 and later no
    longer ship, so the environment needs ``setuptools<81``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        try:
            import alpaca_eval.metrics as metrics
        except ModuleNotFoundError as error:
            if error.name == "pkg_resources":
                raise MetricsError(
                    "alpaca-eval 0.6.6 needs pkg_resources, which setuptools 81 and later removed. "
                    "Install an older setuptools: pip install 'setuptools<81'"
                ) from error
            raise
    return metrics


# ---------------------------------------------------------------------------
# Win rate


def preferences_to_array(preferences: Sequence[float | None]) -> np.ndarray:
    """Validate preferences and return them as float64 (n,), with ``None`` turned into NaN.

    Accepted values: floats in [1, 2], the discrete tie code 0, and NaN/None.
    """
    values = np.array([np.nan if p is None else p for p in preferences], dtype=np.float64)
    valid = np.isnan(values) | (values == 0) | ((values >= 1) & (values <= 2))
    if not valid.all():
        bad = np.flatnonzero(~valid)
        examples = ", ".join(f"row {i}: {values[i]!r}" for i in bad[:5])
        raise MetricsError(
            f"{bad.size} preferences are outside alpaca_eval's coding ({examples}). "
            "Use floats in [1, 2] (1 = reference wins, 2 = model wins, 1.5 = tie) or 0 for a tie."
        )
    return values


def compute_winrate(preferences: Sequence[float | None]) -> dict[str, Any]:
    """Compute alpaca_eval's win rate, discrete win rate and standard error (percent) of preferences.

    NaN rows are dropped before the package receives them and counted in ``n_nan``.
    Ties (1.5, or 0 in the discrete coding) count as half a win.

    Returns:
      ``win_rate``, ``standard_error``, ``discrete_win_rate`` (percent),
      ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total`` (non-NaN rows) and ``n_nan``.
    """
    values = preferences_to_array(preferences)
    finite = values[~np.isnan(values)]
    n_nan = int(values.size - finite.size)
    if finite.size == 0:
        raise MetricsError(f"All {values.size} preferences are NaN (or there are none); there is nothing to score.")
    if n_nan:
        logger.warning("Dropped %d NaN preferences of %d", n_nan, values.size)
    metrics = import_alpaca_eval_metrics()
    result = metrics.get_winrate(pd.DataFrame({"preference": finite}))
    return {**{key: _to_builtin(value) for key, value in result.items()}, "n_nan": n_nan}


def average_length(outputs: Sequence[str]) -> float:
    """Return the mean length in characters of ``outputs``, as AlpacaEval's ``avg_length`` column."""
    if len(outputs) == 0:
        raise MetricsError("Cannot compute the average length of zero outputs.")
    return float(np.mean([len(text) for text in outputs]))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# ---------------------------------------------------------------------------
# Length-controlled win rate


@dataclass(frozen=True)
class LcFiles:
    """Local copies of the two hub files that alpaca_eval's LC GLM reads.

    Attributes:
      gamed: ``df_gamed.csv``, the annotations of two length-gamed baselines with
        the per-instruction difficulty (columns ``model``, ``index``,
        ``preference``, ``std_delta_len``, ``instruction_difficulty``,
        ``not_gamed_baseline``).
      difficulty: ``instruction_difficulty.csv`` (the instruction index, then its
        difficulty), or ``None``; only ``predict_winrate`` reads it, not the
        LC win rate against the annotated reference.
    """

    gamed: Path
    difficulty: Path | None


def find_lc_files(data_dir: PathLike | None = None) -> tuple[LcFiles | None, str]:
    """Locate the LC GLM's hub files in ``data_dir``, else in the Hugging Face cache, without any download.

    Returns:
      ``(files, where)`` with ``where`` naming the folder, or ``(None, reason)``
      when ``df_gamed.csv`` is in neither place.
    """
    searched = []
    if data_dir is not None:
        folder = Path(data_dir)
        searched.append(str(folder))
        if (folder / GAMED_FILE).is_file():
            difficulty = folder / DIFFICULTY_FILE
            return LcFiles(folder / GAMED_FILE, difficulty if difficulty.is_file() else None), str(folder)

    from huggingface_hub import try_to_load_from_cache

    cached = {}
    for name in LC_FILES:
        path = try_to_load_from_cache(HUB_REPO_ID, name, repo_type="dataset")
        cached[name] = Path(path) if isinstance(path, str) else None
    searched.append(f"the Hugging Face cache (dataset {HUB_REPO_ID})")
    if cached[GAMED_FILE] is not None:
        return LcFiles(cached[GAMED_FILE], cached[DIFFICULTY_FILE]), "the Hugging Face cache"
    reason = (
        f"{GAMED_FILE} of the hub data set {HUB_REPO_ID} was not found in {' or '.join(searched)}; "
        f"download {GAMED_FILE} and {DIFFICULTY_FILE} from https://huggingface.co/datasets/{HUB_REPO_ID} "
        "into a folder and pass it with --alpaca_eval_data"
    )
    return None, reason


@contextlib.contextmanager
def _hub_downloads_from(files: LcFiles) -> Iterator[None]:
    """Make alpaca_eval's GLM module read ``files`` where it would call ``hf_hub_download``.

    NOTE: alpaca-eval 0.6.6 calls ``hf_hub_download`` inside the GLM module with
    no option for a local path, so the module's reference to it is swapped for
    a local lookup for the duration of the block. A file outside ``files``
    raises instead of reaching for the network.
    """
    metrics = import_alpaca_eval_metrics()
    module = metrics.glm_winrate
    local = {GAMED_FILE: files.gamed, DIFFICULTY_FILE: files.difficulty}

    def local_hub_download(repo_id: str, filename: str, **_: Any) -> str:
        path = local.get(filename)
        if repo_id != HUB_REPO_ID or path is None:
            raise MetricsError(f"alpaca_eval requested {repo_id}/{filename}, which is not available locally.")
        return str(path)

    original = module.hf_hub_download
    module.hf_hub_download = local_hub_download
    try:
        yield
    finally:
        module.hf_hub_download = original


def _lc_frame(annotations: Sequence[dict[str, Any]], positions: Sequence[int]) -> pd.DataFrame:
    """Build the DataFrame the GLM reads; its index is each instruction's position in the official set."""
    frame = pd.DataFrame(
        {
            "output_1": [str(row["output_1"]) for row in annotations],
            "output_2": [str(row["output_2"]) for row in annotations],
            "generator_1": [str(row.get("generator_1", "reference")) for row in annotations],
            "generator_2": [str(row.get("generator_2", "model")) for row in annotations],
            "annotator": [str(row.get("annotator", "unknown")) for row in annotations],
            "preference": preferences_to_array([row.get("preference") for row in annotations]),
        },
        index=pd.Index(list(positions), dtype=np.int64),
    )
    frame = frame[frame["preference"].notna()]
    if frame.empty:
        raise MetricsError("Every annotation has a NaN preference; the LC win rate needs at least one.")
    if frame["generator_2"].nunique() != 1 or frame["generator_1"].nunique() != 1:
        raise MetricsError("LC win rate needs annotations of one model against one reference (one generator_1, one generator_2).")
    return frame


def compute_length_controlled(
    annotations: Sequence[dict[str, Any]],
    positions: Sequence[int | None],
    files: LcFiles,
) -> dict[str, Any]:
    """Compute alpaca_eval's LC win rate (percent) with its ``length_controlled_v1`` GLM and local hub files.

    Args:
      annotations: rows with ``output_1`` (reference), ``output_2`` (model),
        ``preference`` and optionally ``generator_1``/``generator_2``.
      positions: each row's position in the official AlpacaEval instruction list,
        or ``None`` for an instruction outside it.
      files: the hub files (see ``find_lc_files``).

    Returns:
      ``length_controlled_winrate``, ``lc_standard_error``, ``lc_glm`` and
      ``lc_note`` (``None`` unless the difficulty term was left out).

    NOTE: a position is only checked to exist in ``df_gamed.csv``. The judge command passes
    positions in its --reference file, which match AlpacaEval's instruction index only when that
    file lists the 805 official instructions in their official order (as the gpt4_1106_preview
    reference outputs do).
    """
    if len(annotations) != len(positions):
        raise MetricsError(f"Got {len(annotations)} annotations but {len(positions)} positions.")
    gamed = pd.read_csv(files.gamed)
    missing_columns = {"index", "instruction_difficulty"} - set(gamed.columns)
    if missing_columns:
        raise MetricsError(f"{files.gamed} lacks columns {sorted(missing_columns)}; it is not alpaca_eval's {GAMED_FILE}.")
    known = set(gamed["index"].drop_duplicates().astype(int))
    if not known:
        raise MetricsError(f"{files.gamed} has no rows; download alpaca_eval's {GAMED_FILE} again.")
    outside = [i for i, position in enumerate(positions) if position is None or int(position) not in known]

    glm_info = None
    note = None
    glm_name = LC_GLM_NAME
    if outside:
        # Any known position satisfies the package's difficulty lookup; the formula leaves the term out.
        filler = min(known)
        outside_rows = set(outside)
        positions = [filler if i in outside_rows else int(p) for i, p in enumerate(positions)]
        glm_info = {
            "formula": LC_FORMULA_WITHOUT_DIFFICULTY,
            "regularize_to_baseline_lambda": 0.2,
            "kwargs": {"n_splits": 5},
        }
        glm_name = f"{LC_GLM_NAME} without instruction_difficulty"
        note = (
            f"{len(outside)} of {len(annotations)} instructions are outside the official AlpacaEval set, "
            "so the GLM's instruction-difficulty term was left out."
        )
        logger.warning(note)

    frame = _lc_frame(annotations, [int(p) for p in positions])
    metrics = import_alpaca_eval_metrics()
    with _hub_downloads_from(files), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        result = metrics.get_length_controlled_winrate(
            frame,
            glm_name=LC_GLM_NAME,
            save_weights_dir=None,
            glm_info=glm_info,
            is_add_glm_preference_inplace=False,
        )
    return {
        "length_controlled_winrate": float(result["length_controlled_winrate"]),
        "lc_standard_error": float(result["lc_standard_error"]),
        "lc_glm": glm_name,
        "lc_note": note,
    }


def compute_length_controlled_minimal(annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fit alpaca_eval's ``length_controlled_minimal`` GLM (length term only, no hub files) and return its win rate.

    This is an approximation of the LC win rate, never the LC win rate itself:
    it lacks the instruction-difficulty term and the regularization towards the
    two length-gamed baselines. It reuses the package's design-matrix and
    logistic-regression helpers with the package's formula for that GLM.
    """
    metrics = import_alpaca_eval_metrics()
    glm = metrics.glm_winrate
    frame = _lc_frame(annotations, range(len(annotations)))
    delta = frame["output_1"].str.len() - frame["output_2"].str.len()
    scale = delta.std()
    data = pd.DataFrame(
        {
            "preference": frame["preference"].replace({0.0: 1.5}) - 1,
            "std_delta_len": delta / scale if scale and np.isfinite(scale) else delta * 0.0,
            "not_gamed_baseline": True,
        }
    ).reset_index(drop=True)
    test = data[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0.0
    formula = glm.GLM_INFO[MINIMAL_GLM_NAME]["formula"]
    n_splits = min(glm.GLM_INFO[MINIMAL_GLM_NAME]["kwargs"]["n_splits"], len(data))
    if n_splits < 2:
        raise MetricsError("The length_controlled_minimal approximation needs at least 2 annotated rows.")
    train_matrix, test_matrix = glm.make_dmatrix_for_model(data, test, formula=formula)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = glm.fit_LogisticRegressionCV(train_matrix, "preference", is_ytrue_proba=True, n_splits=n_splits)
    predicted = model.predict_proba(test_matrix)[:, 1]
    return {
        "length_controlled_minimal_winrate": float(np.mean(predicted) * 100),
        "length_controlled_minimal_standard_error": float(pd.Series(predicted).sem() * 100),
    }


def judge_metrics(
    annotations: Sequence[dict[str, Any]],
    positions: Sequence[int | None],
    alpaca_eval_data: PathLike | None = None,
    approximate_lc: bool = False,
) -> dict[str, Any]:
    """Compute every metric of one judged run: win rates, LC win rate (or why it is missing), average length.

    Args:
      annotations: alpaca_eval annotation records (``output_1`` reference,
        ``output_2`` model, ``preference``).
      positions: each annotation's position in the official instruction list
        (``None`` when outside it), for the LC GLM's difficulty term.
      alpaca_eval_data: folder holding the LC GLM's hub files (see ``find_lc_files``).
      approximate_lc: when the files are missing, also report the package's
        ``length_controlled_minimal`` GLM as ``length_controlled_minimal_winrate``.
    """
    metrics = compute_winrate([row.get("preference") for row in annotations])
    metrics["avg_length"] = average_length([str(row["output_2"]) for row in annotations])
    files, where = find_lc_files(alpaca_eval_data)
    if files is None:
        metrics.update(length_controlled_winrate=None, lc_standard_error=None, length_controlled_winrate_missing_reason=where)
        logger.warning("LC win rate not computed: %s", where)
        if approximate_lc:
            metrics.update(compute_length_controlled_minimal(annotations))
        return metrics
    logger.info("LC GLM files found in %s", where)
    metrics.update(compute_length_controlled(annotations, positions, files))
    metrics["length_controlled_winrate_missing_reason"] = None
    return metrics


# ---------------------------------------------------------------------------
# Table 1: aggregation of metrics.json files over seeds

TABLE_METRICS = (
    ("length_controlled_winrate", "LC WR"),
    ("win_rate", "WR"),
    ("avg_length", "len"),
)
_SEED_FOLDER = re.compile(r"^seed[_-]?(\d+)$")


@dataclass(frozen=True)
class RunResult:
    """One metrics.json of one (model, method, dataset, seed) run."""

    model: str
    method: str
    dataset: str
    seed: int | None
    metrics: dict[str, Any]
    path: Path


def collect_runs(results_dir: PathLike) -> list[RunResult]:
    """Read every ``metrics.json`` under ``results_dir`` and label it with model, method, dataset and seed.

    Labels come from the file's ``run`` block (keys ``model``, ``method``,
    ``dataset``, ``seed``) when present, else from the folder layout
    ``RESULTS_DIR/<model>/<method>/<dataset>/seed<k>/metrics.json``. A path one
    level shorter (``<method>/<dataset>/seed<k>``) leaves the model as ``-``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise MetricsError(f"Results folder not found: {root}. Pass the folder that holds the runs' metrics.json files.")
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        metrics = read_json(path)
        if not isinstance(metrics, dict) or "win_rate" not in metrics:
            logger.info("Skipping %s: it has no win_rate (not a judge result)", path)
            continue
        labels = _labels_from_path(path.parent.relative_to(root))
        labels.update({key: value for key, value in (metrics.get("run") or {}).items() if value is not None})
        missing = [key for key in ("method", "dataset") if not labels.get(key)]
        if missing:
            raise MetricsError(
                f"{path} has no {' or '.join(missing)} label. Put it under "
                "RESULTS_DIR/<model>/<method>/<dataset>/seed<k>/ or pass --method and --dataset to the judge command."
            )
        seed = labels.get("seed")
        runs.append(
            RunResult(
                model=str(labels.get("model") or "-"),
                method=str(labels["method"]),
                dataset=str(labels["dataset"]),
                seed=None if seed is None else int(seed),
                metrics=metrics,
                path=path,
            )
        )
    if not runs:
        raise MetricsError(f"No judge metrics.json files found under {root}.")
    return runs


def _labels_from_path(relative: Path) -> dict[str, Any]:
    parts = list(relative.parts)
    labels: dict[str, Any] = {}
    if parts and _SEED_FOLDER.match(parts[-1]):
        labels["seed"] = int(_SEED_FOLDER.match(parts[-1]).group(1))
        parts = parts[:-1]
    if len(parts) >= 3:
        labels.update(model=parts[-3], method=parts[-2], dataset=parts[-1])
    elif len(parts) == 2:
        labels.update(method=parts[-2], dataset=parts[-1])
    return labels


def aggregate_runs(runs: Sequence[RunResult]) -> pd.DataFrame:
    """Aggregate runs into one row per (model, method, dataset) with mean, std and count of each Table 1 metric.

    The std is the sample standard deviation over seeds (ddof 1), 0 for a single
    seed. A metric that is null in some seeds (an LC win rate without the hub
    files) is averaged over the seeds that have it, and ``<metric>_n`` counts those seeds.
    """
    seen: dict[tuple[str, str, str, int | None], Path] = {}
    for run in runs:
        key = (run.model, run.method, run.dataset, run.seed)
        if key in seen:
            raise MetricsError(f"Two results for model {run.model}, method {run.method}, dataset {run.dataset}, seed {run.seed}: {seen[key]} and {run.path}.")
        seen[key] = run.path

    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.model, run.method, run.dataset), []).append(run)
    rows = []
    for (model, method, dataset), members in groups.items():
        row: dict[str, Any] = {"model": model, "method": method, "dataset": dataset, "seeds": len(members)}
        for key, _ in TABLE_METRICS:
            values = [float(m.metrics[key]) for m in members if m.metrics.get(key) is not None]
            row[f"{key}_mean"] = float(np.mean(values)) if values else math.nan
            if len(values) > 1:
                row[f"{key}_std"] = float(np.std(values, ddof=1))
            else:
                row[f"{key}_std"] = 0.0 if values else math.nan
            row[f"{key}_n"] = len(values)
        reasons = {m.metrics.get("length_controlled_winrate_missing_reason") for m in members} - {None}
        row["lc_missing_reason"] = "; ".join(sorted(reasons)) if reasons else ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["model", "method", "dataset"], kind="stable").reset_index(drop=True)


def format_table_markdown(table: pd.DataFrame) -> str:
    """Render aggregated runs in Table 1's layout: rows (model, method), columns metric x dataset, ``mean±std``."""
    datasets = list(dict.fromkeys(table["dataset"]))
    header = ["model", "method"] + [f"{label} {dataset}" for _, label in TABLE_METRICS for dataset in datasets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for (model, method), group in table.groupby(["model", "method"], sort=False):
        by_dataset = {row["dataset"]: row for _, row in group.iterrows()}
        cells = [str(model), str(method)]
        for key, _ in TABLE_METRICS:
            for dataset in datasets:
                row = by_dataset.get(dataset)
                cells.append(_format_cell(row, key))
                if row is not None and key == "length_controlled_winrate" and row["lc_missing_reason"]:
                    notes.append(f"{model}/{method}/{dataset}: {row['lc_missing_reason']}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if notes:
        text += "\n\nLC WR missing (n/a) for: " + "\n- ".join([""] + sorted(set(notes)))
    return text


def _format_cell(row: pd.Series | None, key: str) -> str:
    if row is None or row[f"{key}_n"] == 0:
        return "n/a"
    decimals = 0 if key == "avg_length" else 2
    return f"{row[f'{key}_mean']:.{decimals}f}±{row[f'{key}_std']:.{decimals}f}"

