"""The main job (scripts/quickstart.sh) end to end on a tiny model with reduced settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from coala.features import load_features
from coala.head import load_head
from conftest import REPO_ROOT


def test_quickstart_reduced_run_writes_every_output(tiny_model_dir, tmp_path):
    workdir = tmp_path / "work"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "QUICKSTART_WORKDIR": str(workdir),
        "MODEL": str(tiny_model_dir),
        "QUICKSTART_MAX_PAIRS": "24",
        "QUICKSTART_MAX_LENGTH": "200",
        "QUICKSTART_ADMM_ITERS": "2",
        "QUICKSTART_EPOCHS": "5",
        "QUICKSTART_MAX_NEW_TOKENS": "6",
        "QUICKSTART_NUM_PROMPTS": "2",
    }
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    model_name = tiny_model_dir.name
    features = load_features(workdir / "extracted_features" / f"{model_name}__edu_sample__attn")
    assert features.chosen.shape[0] == 24
    assert features.attn_scorer() is not None

    stage2 = load_head(workdir / f"cvxNN_trained_{model_name}")
    stage2_metrics = json.loads((workdir / f"cvxNN_trained_{model_name}" / "metrics.json").read_text())
    assert "validation_accuracy" in stage2_metrics["final"]

    stage3_dir = workdir / f"Finetuned_cvxmlp_{model_name}"
    stage3 = load_head(stage3_dir)
    np.testing.assert_array_equal(stage3.theta1, stage2.theta1)
    assert stage3.config["stage"] == "coala_finetune"
    metrics = json.loads((stage3_dir / "metrics.json").read_text())
    assert len(metrics["history"]["train"]["margin"]) == 6
    assert (stage3_dir / "reward_margins.png").read_bytes()[:4] == b"\x89PNG"

    summary = json.loads((stage3_dir / "quickstart_summary.json").read_text())
    assert summary["pairs"]["pairs"] == 24
    assert len(summary["generation"]["examples"]) == 2
    for example in summary["generation"]["examples"]:
        assert isinstance(example["plain"], str)
        assert isinstance(example["guided"], str)
        assert np.isfinite(example["plain_score"])
        assert np.isfinite(example["guided_score"])
    for heading in ("Pairs: 24", "Stage 2 (CRONOS)", "Stage 3 (COALA)", "guided (head score", "Main job finished"):
        assert heading in completed.stdout
