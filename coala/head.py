"""The preference head on disk: ``head.safetensors`` + ``config.json`` + ``metrics.json``.

Stage 2 (CRONOS) and Stage 3 (COALA fine-tuning) both write this layout, and
inference reads it. The head is the two-layer ReLU network

    r(h) = theta2 . relu(Theta1^T ((h - feature_mean) / feature_std))

with ``h`` a pooled backbone feature of shape (d,). Tensors in
``head.safetensors``:

    theta1        (d, m) float32   hidden-layer weights, m = 2P neurons
    theta2        (m,)   float32   output-layer weights
    feature_mean  (d,)   float32   standardization mean (zeros when off)
    feature_std   (d,)   float32   standardization std (ones when off)
    attn_scorer   (d,)   float32   only for ``attn`` pooling: the pooling scorer

``config.json`` holds every setting of the run plus a ``pooling`` block
(``pool``, ``pool_span``, ``max_length``, ``hidden_size``, ``model_path``,
``model_name``) copied from the feature manifest, so a head folder is enough
to score texts without the feature folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from coala.io import PathLike, atomic_write, atomic_write_json

HEAD_FILE = "head.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
REQUIRED_TENSORS = ("theta1", "theta2", "feature_mean", "feature_std")


class HeadError(ValueError):
    """A head folder that is missing, corrupt, or inconsistent."""


@dataclass
class HeadParams:
    """A loaded preference head.

    Attributes:
      theta1: (d, m) hidden-layer weights.
      theta2: (m,) output-layer weights.
      feature_mean: (d,) standardization mean.
      feature_std: (d,) standardization std.
      config: the run's ``config.json`` content.
      attn_scorer: (d,) attention-pooling scorer, or ``None`` for other poolings.
    """

    theta1: np.ndarray
    theta2: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    attn_scorer: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        return int(self.theta1.shape[0])

    @property
    def num_neurons(self) -> int:
        return int(self.theta1.shape[1])

    def hidden(self, features: np.ndarray) -> np.ndarray:
        """Return relu activations (n, m) for raw pooled features (n, d)."""
        standardized = (np.asarray(features, dtype=np.float32) - self.feature_mean) / self.feature_std
        return np.maximum(standardized @ self.theta1, 0.0)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Return preference scores (n,) for raw pooled features (n, d)."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise HeadError(f"Features have shape {features.shape}; this head expects (n, {self.input_dim}).")
        return self.hidden(features) @ self.theta2


def save_head(
    output_dir: PathLike,
    params: HeadParams,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``head.safetensors``, ``config.json`` and (optionally) ``metrics.json`` atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _validate_shapes(params, output_dir)
    tensors = {
        "theta1": np.ascontiguousarray(params.theta1, dtype=np.float32),
        "theta2": np.ascontiguousarray(params.theta2, dtype=np.float32),
        "feature_mean": np.ascontiguousarray(params.feature_mean, dtype=np.float32),
        "feature_std": np.ascontiguousarray(params.feature_std, dtype=np.float32),
    }
    if params.attn_scorer is not None:
        tensors["attn_scorer"] = np.ascontiguousarray(params.attn_scorer, dtype=np.float32)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "coala-head", "version": "1"})

    atomic_write(output_dir / HEAD_FILE, write)
    atomic_write_json(output_dir / CONFIG_FILE, params.config)
    if metrics is not None:
        atomic_write_json(output_dir / METRICS_FILE, metrics)
    return output_dir


def load_head(head_dir: PathLike) -> HeadParams:
    """Load a head folder written by ``save_head``; raise ``HeadError`` with the fix on any problem."""
    head_dir = Path(head_dir)
    if not head_dir.is_dir():
        raise HeadError(f"Head folder not found: {head_dir}. Pass the output folder of cronos_trainer.py or finetune_coala.py.")
    weights_path = head_dir / HEAD_FILE
    config_path = head_dir / CONFIG_FILE
    for path in (weights_path, config_path):
        if not path.is_file():
            raise HeadError(f"{path} is missing; {head_dir} is not a complete head folder. Rerun the stage that wrote it.")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise HeadError(f"{weights_path} is corrupt or not a safetensors file ({error}). Rerun the stage that wrote it.") from error
    missing = [name for name in REQUIRED_TENSORS if name not in tensors]
    if missing:
        raise HeadError(f"{weights_path} lacks tensors {missing}; found {sorted(tensors)}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise HeadError(f"{config_path} is not valid JSON ({error}). Rerun the stage that wrote it.") from error
    params = HeadParams(
        theta1=tensors["theta1"],
        theta2=tensors["theta2"],
        feature_mean=tensors["feature_mean"],
        feature_std=tensors["feature_std"],
        config=config,
        attn_scorer=tensors.get("attn_scorer"),
    )
    _validate_shapes(params, head_dir)
    return params


def _validate_shapes(params: HeadParams, where: Path) -> None:
    if params.theta1.ndim != 2:
        raise HeadError(f"{where}: theta1 must be 2-D (d, m), got shape {params.theta1.shape}.")
    d, m = params.theta1.shape
    expected = {"theta2": (m,), "feature_mean": (d,), "feature_std": (d,)}
    for name, shape in expected.items():
        actual = np.shape(getattr(params, name))
        if actual != shape:
            raise HeadError(f"{where}: {name} has shape {actual}, expected {shape} to match theta1 {params.theta1.shape}.")
    if params.attn_scorer is not None and np.shape(params.attn_scorer) != (d,):
        raise HeadError(f"{where}: attn_scorer has shape {np.shape(params.attn_scorer)}, expected ({d},).")
    for name in REQUIRED_TENSORS:
        if not np.all(np.isfinite(getattr(params, name))):
            raise HeadError(f"{where}: {name} contains NaN or infinite values.")
    if np.any(params.feature_std <= 0):
        raise HeadError(f"{where}: feature_std must be positive everywhere.")
