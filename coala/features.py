"""The Stage 1 feature folder: naming, reading, and finding it again by model name.

``extract.py --output_base BASE`` writes one folder per (model, data set,
pooling) under ``BASE``, named by ``feature_dir_name``::

    BASE/<model_name>__<dataset_name>__<pool>[-response]/
        chosen.npy      float32 (n, d)  pooled features of prompt + chosen
        rejected.npy    float32 (n, d)  pooled features of prompt + rejected;
                                        row i of both comes from the same prompt
        meta.jsonl      one JSON object per row: pair_id, split, token counts
        manifest.json   model, pooling, data source, hashes, counts, FLOPs
        attn_scorer.safetensors   ``scorer`` (d,), only for ``--pool attn``

For unpaired data (IMDb-style positive and negative texts) ``chosen.npy``
holds the positive texts and ``rejected.npy`` the negative ones, the two may
have different row counts, ``meta.jsonl`` rows carry a ``label`` (+1 or -1)
and ``manifest.json`` says ``"paired": false``.

The manifest is written last, so a folder without ``manifest.json`` is an
unfinished extraction.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from coala.io import PathLike, read_json

MANIFEST_FILE = "manifest.json"
META_FILE = "meta.jsonl"
CHOSEN_FILE = "chosen.npy"
REJECTED_FILE = "rejected.npy"
SCORER_FILE = "attn_scorer.safetensors"
SPLITS = ("train", "validation", "test")
POOLINGS = ("attn", "mean", "last", "none")
POOL_SPANS = ("all", "response")


class FeatureError(ValueError):
    """A feature folder that is missing, unfinished, or inconsistent."""


def model_name_from_path(model_path: str, gguf_file: str | None = None) -> str:
    """Return the short model name used in folder names.

    A Hugging Face id ``org/name`` gives ``name``; a local folder gives its last
    path component; a GGUF file (or ``gguf_file`` inside a folder) gives the
    file name without ``.gguf``. Characters outside ``[A-Za-z0-9._-]`` become ``_``.
    """
    if gguf_file:
        raw = Path(gguf_file).name
    else:
        raw = Path(str(model_path).rstrip("/\\")).name or str(model_path)
    if raw.lower().endswith(".gguf"):
        raw = raw[: -len(".gguf")]
    return sanitize_name(raw)


def dataset_name_from_path(data_path: str) -> str:
    """Return the short data set name used in folder names (last path component, no extensions)."""
    raw = Path(str(data_path).rstrip("/\\")).name or str(data_path)
    for suffix in (".gz", ".jsonl", ".json"):
        if raw.lower().endswith(suffix):
            raw = raw[: -len(suffix)]
    return sanitize_name(raw)


def sanitize_name(raw: str) -> str:
    """Replace characters that are unsafe in folder names with ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_") or "unnamed"


def feature_dir_name(model_name: str, dataset_name: str, pool: str, pool_span: str = "all") -> str:
    """Return ``<model_name>__<dataset_name>__<pool>`` (``-response`` appended for response-span pooling)."""
    if pool not in POOLINGS:
        raise FeatureError(f"Unknown pooling {pool!r}; choose one of {POOLINGS}.")
    if pool_span not in POOL_SPANS:
        raise FeatureError(f"Unknown pool_span {pool_span!r}; choose one of {POOL_SPANS}.")
    suffix = "-response" if pool_span == "response" else ""
    return f"{model_name}__{dataset_name}__{pool}{suffix}"


def find_feature_dirs(output_base: PathLike, model_name: str) -> list[Path]:
    """List finished feature folders under ``output_base`` whose model part equals ``model_name``.

    The match is exact on the part of the folder name before the first ``__``,
    so ``SmolLM2-135M`` does not match ``SmolLM2-135M-Instruct``. Folders
    without ``manifest.json`` (unfinished extractions) are skipped.
    """
    base = Path(output_base)
    if not base.is_dir():
        return []
    found = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and child.name.split("__", 1)[0] == model_name and (child / MANIFEST_FILE).is_file():
            found.append(child)
    return found


@dataclass
class FeatureSet:
    """Pooled Stage 1 features loaded from a feature folder.

    Attributes:
      chosen: (n_chosen, d) float32 features of chosen (or positive) texts.
      rejected: (n_rejected, d) float32 features of rejected (or negative) texts.
      chosen_split, rejected_split: (n_chosen,), (n_rejected,) arrays of split names.
      paired: whether row i of ``chosen`` and ``rejected`` share a prompt
        (then n_chosen == n_rejected and the split arrays are equal).
      manifest: the folder's ``manifest.json``.
      meta: the rows of ``meta.jsonl``.
      path: the folder.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_split: np.ndarray
    rejected_split: np.ndarray
    paired: bool
    manifest: dict[str, Any]
    meta: list[dict[str, Any]]
    path: Path

    @property
    def dim(self) -> int:
        return int(self.chosen.shape[1])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (chosen, rejected) rows of one split."""
        if name not in SPLITS:
            raise FeatureError(f"Unknown split {name!r}; choose one of {SPLITS}.")
        return self.chosen[self.chosen_split == name], self.rejected[self.rejected_split == name]

    def attn_scorer(self) -> np.ndarray | None:
        """Return the saved attention-pooling scorer (d,), or ``None`` when the pooling is not ``attn``."""
        scorer_path = self.path / SCORER_FILE
        if not scorer_path.is_file():
            return None
        return load_file(str(scorer_path))["scorer"]


def load_features(feature_dir: PathLike) -> FeatureSet:
    """Load and validate a finished feature folder; raise ``FeatureError`` that names the problem and fix."""
    feature_dir = Path(feature_dir)
    if not feature_dir.is_dir():
        raise FeatureError(f"Feature folder not found: {feature_dir}. Run extract.py first or pass --features_dir.")
    manifest_path = feature_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FeatureError(
            f"{feature_dir} has no {MANIFEST_FILE}: the extraction did not finish. "
            "Rerun the same extract.py command to resume it."
        )
    manifest = read_json(manifest_path)
    if manifest.get("pool") == "none":
        raise FeatureError(
            f"{feature_dir} holds unpooled token features (--pool none); the head needs pooled features. "
            "Extract again with --pool attn, mean or last."
        )
    arrays = {}
    for name in (CHOSEN_FILE, REJECTED_FILE):
        path = feature_dir / name
        if not path.is_file():
            raise FeatureError(f"{path} is missing; rerun extract.py for this folder.")
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2:
            raise FeatureError(f"{path} must be 2-D (n, d), got shape {array.shape}.")
        if array.shape[0] == 0:
            raise FeatureError(f"{path} is empty (0 rows); the data set produced no usable pairs.")
        if not np.all(np.isfinite(array)):
            bad = int(np.sum(~np.isfinite(array).all(axis=1)))
            raise FeatureError(f"{path} has {bad} rows with NaN or infinite values; extract again (try --dtype float32).")
        arrays[name] = array.astype(np.float32, copy=False)
    chosen, rejected = arrays[CHOSEN_FILE], arrays[REJECTED_FILE]
    if chosen.shape[1] != rejected.shape[1]:
        raise FeatureError(f"{feature_dir}: chosen has d={chosen.shape[1]} but rejected has d={rejected.shape[1]}.")
    paired = bool(manifest.get("paired", True))
    if paired and chosen.shape[0] != rejected.shape[0]:
        raise FeatureError(
            f"{feature_dir}: paired data needs as many chosen rows as rejected rows, got {chosen.shape[0]} and {rejected.shape[0]}."
        )

    meta = _read_meta(feature_dir / META_FILE)
    chosen_split, rejected_split = _splits_from_meta(meta, paired, chosen.shape[0], rejected.shape[0], feature_dir)
    return FeatureSet(chosen, rejected, chosen_split, rejected_split, paired, manifest, meta, feature_dir)


def _read_meta(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FeatureError(f"{path} is missing; rerun extract.py for this folder.")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise FeatureError(f"{path} line {line_number} is not valid JSON ({error}).") from error
    return rows


def _splits_from_meta(
    meta: list[dict[str, Any]], paired: bool, n_chosen: int, n_rejected: int, where: Path
) -> tuple[np.ndarray, np.ndarray]:
    for index, row in enumerate(meta):
        if row.get("split") not in SPLITS:
            raise FeatureError(f"{where}/{META_FILE} row {index + 1} has split {row.get('split')!r}; expected one of {SPLITS}.")
    if paired:
        if len(meta) != n_chosen:
            raise FeatureError(f"{where}: {META_FILE} has {len(meta)} rows but the arrays have {n_chosen}.")
        splits = np.array([row["split"] for row in meta])
        return splits, splits.copy()
    positives = [row["split"] for row in meta if row.get("label") == 1]
    negatives = [row["split"] for row in meta if row.get("label") == -1]
    if len(positives) != n_chosen or len(negatives) != n_rejected:
        raise FeatureError(
            f"{where}: {META_FILE} lists {len(positives)} positive and {len(negatives)} negative rows, "
            f"but the arrays have {n_chosen} and {n_rejected}."
        )
    return np.array(positives), np.array(negatives)
