"""End-to-end tests of cronos_trainer.py on small synthetic feature folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cronos_trainer
from coala.head import load_head

MODEL = "TinyLM"
D_FEATURES = 6
PAIRS = 90
# Few iterations and one data shape for every run, so the jitted ADMM step compiles once per dtype.
FAST = ["--num_patterns", "3", "--admm_iters", "15", "--nystrom_rank", "8", "--rho", "1.0", "--beta", "0.01", "--no_progress"]


def synthetic_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return chosen and rejected features (PAIRS, D_FEATURES) that a preference direction separates."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(D_FEATURES)
    direction[0] = 1.0
    shared = rng.normal(5.0, 3.0, size=(PAIRS, D_FEATURES))
    shared[:, 0] = 5.0 + 0.2 * rng.standard_normal(PAIRS)  # the preference direction varies little within a prompt
    chosen = shared + 1.5 * direction + 0.3 * rng.standard_normal((PAIRS, D_FEATURES))
    rejected = shared - 1.5 * direction + 0.3 * rng.standard_normal((PAIRS, D_FEATURES))
    splits = ["train"] * 60 + ["validation"] * 15 + ["test"] * 15
    return chosen.astype(np.float32), rejected.astype(np.float32), splits


def write_feature_folder(
    base: Path, dataset: str, chosen: np.ndarray, rejected: np.ndarray, splits: list[str],
    paired: bool = True, labels: list[int] | None = None, pool: str = "mean",
) -> Path:
    """Write a Stage 1 feature folder (chosen.npy, rejected.npy, meta.jsonl, manifest.json)."""
    folder = base / f"{MODEL}__{dataset}__{pool}"
    folder.mkdir(parents=True)
    np.save(folder / "chosen.npy", chosen)
    np.save(folder / "rejected.npy", rejected)
    with open(folder / "meta.jsonl", "w", encoding="utf-8") as handle:
        for index, split in enumerate(splits):
            row = {"pair_id": f"p{index}", "split": split}
            if labels is not None:
                row["label"] = labels[index]
            handle.write(json.dumps(row) + "\n")
    manifest = {
        "model_name": MODEL, "model_path": "/models/TinyLM", "gguf_file": None, "pool": pool, "pool_span": "all",
        "max_length": 128, "hidden_size": D_FEATURES, "chat_template": True, "paired": paired,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture
def feature_base(tmp_path: Path) -> Path:
    chosen, rejected, splits = synthetic_features()
    write_feature_folder(tmp_path / "features", "prefs", chosen, rejected, splits)
    return tmp_path / "features"


def test_trainer_writes_head_folder(feature_base, tmp_path):
    output = tmp_path / "head"
    cronos_trainer.main(["--features_dir", str(feature_base / f"{MODEL}__prefs__mean"), "--output_dir", str(output)] + FAST)
    head = load_head(output)
    assert head.theta1.shape == (D_FEATURES, 6)
    assert head.theta2.shape == (6,)
    config = head.config
    assert config["stage"] == "cronos"
    assert Path(config["features_dir"]).is_absolute()
    assert config["pooling"]["pool"] == "mean"
    assert config["pooling"]["model_path"] == "/models/TinyLM"
    assert len(config["feature_manifest_sha256"]) == 64
    assert config["num_patterns"] == 3
    metrics = json.loads((output / "metrics.json").read_text())
    assert len(metrics["history"]) == metrics["admm_iterations_run"]
    assert metrics["admm_iterations_run"] <= 15
    assert metrics["solver_status"] in ("converged", "max_iterations")
    assert config["solver_status"] == metrics["solver_status"]
    assert metrics["final"]["test_accuracy"] >= 0.9
    assert metrics["final"]["test_pairwise_accuracy"] >= 0.9
    assert metrics["kept_iterate"]["iterate"] in ("last", "average")
    assert metrics["recovery"]["relative_gap"] < 0.5
    assert (output / "cronos_history.png").stat().st_size > 1000


def test_patience_flag_stops_early(feature_base, tmp_path):
    output = tmp_path / "head"
    flags = FAST + ["--admm_iters", "200", "--rel_tol", "0", "--abs_tol", "0", "--patience", "3", "--balance_tau", "2"]
    cronos_trainer.main(["--features_dir", str(feature_base / f"{MODEL}__prefs__mean"), "--output_dir", str(output)] + flags)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["solver_status"] == "validation_patience"
    assert metrics["admm_iterations_run"] == len(metrics["history"])
    assert metrics["admm_iterations_run"] < 200
    best = max(max(r["validation_accuracy"], r["validation_accuracy_average"]) for r in metrics["history"])
    assert metrics["kept_iterate"]["validation_accuracy"] == best
    assert metrics["final"]["test_accuracy"] >= 0.9


def test_block_nystrom_flag_trains_head(feature_base, tmp_path):
    output = tmp_path / "head"
    flags = FAST + ["--preconditioner", "block_nystrom"]
    cronos_trainer.main(["--features_dir", str(feature_base / f"{MODEL}__prefs__mean"), "--output_dir", str(output)] + flags)
    head = load_head(output)
    assert head.config["preconditioner"] == "block_nystrom"
    metrics = json.loads((output / "metrics.json").read_text())
    assert all(record["pcg_status"] == "converged" for record in metrics["history"])
    assert metrics["final"]["test_accuracy"] >= 0.9


def test_model_name_lookup_and_default_output(feature_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cronos_trainer.main(["--model_name", MODEL, "--output_base", str(feature_base)] + FAST)
    assert (tmp_path / f"cvxNN_trained_{MODEL}" / "head.safetensors").is_file()


def test_model_name_ambiguous_or_missing(feature_base, tmp_path):
    chosen, rejected, splits = synthetic_features(seed=1)
    write_feature_folder(feature_base, "other", chosen, rejected, splits)
    with pytest.raises(SystemExit, match="(?s)Several feature folders.*--features_dir"):
        cronos_trainer.main(["--model_name", MODEL, "--output_base", str(feature_base)] + FAST)
    with pytest.raises(SystemExit, match="(?s)No finished feature folder for model .OtherLM.*extract.py"):
        cronos_trainer.main(["--model_name", "OtherLM", "--output_base", str(feature_base)] + FAST)
    output = tmp_path / "narrowed"
    cronos_trainer.main(["--model_name", MODEL, "--output_base", str(feature_base), "--dataset", "other",
                         "--output_dir", str(output)] + FAST)
    assert load_head(output).config["features_dir"].endswith(f"{MODEL}__other__mean")


def test_swapped_labels_flip_every_prediction(tmp_path):
    chosen, rejected, splits = synthetic_features(seed=2)
    normal = write_feature_folder(tmp_path / "a", "prefs", chosen, rejected, splits)
    swapped = write_feature_folder(tmp_path / "b", "prefs", rejected, chosen, splits)
    scores = []
    for folder, name in ((normal, "normal"), (swapped, "swapped")):
        cronos_trainer.main(["--features_dir", str(folder), "--output_dir", str(tmp_path / name), "--x64",
                             "--pcg_tol", "1e-10"] + FAST)
        scores.append(load_head(tmp_path / name).score(np.concatenate([chosen, rejected])))
    normal_scores, swapped_scores = scores
    decided = np.abs(normal_scores) > 1e-4
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(np.sign(swapped_scores[decided]), -np.sign(normal_scores[decided]))
    np.testing.assert_allclose(swapped_scores, -normal_scores, rtol=1e-3, atol=1e-4)


def test_compare_adamw_writes_table(feature_base, tmp_path):
    output = tmp_path / "compare"
    cronos_trainer.main(["--features_dir", str(feature_base / f"{MODEL}__prefs__mean"), "--output_dir", str(output),
                         "--compare_adamw", "--adamw_lr_count", "2", "--adamw_lr_min", "1e-3", "--adamw_lr_max", "1e-2",
                         "--adamw_seeds", "1", "--adamw_epochs", "3", "--adamw_batch_size", "32"] + FAST)
    table = (output / "adamw_comparison.md").read_text()
    assert "| CRONOS |" in table
    assert "| AdamW (lr" in table
    comparison = json.loads((output / "adamw_comparison.json").read_text())
    assert len(comparison["adamw"]["runs"]) == 2
    assert comparison["adamw"]["selected"]["learning_rate"] in (1e-3, 1e-2)
    assert 0.0 <= comparison["adamw"]["selected"]["test_accuracy"] <= 1.0


def test_missing_and_unfinished_folders_rejected(tmp_path):
    with pytest.raises(SystemExit, match="Feature folder not found"):
        cronos_trainer.main(["--features_dir", str(tmp_path / "nowhere")] + FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no manifest.json"):
        cronos_trainer.main(["--features_dir", str(tmp_path / "empty")] + FAST)


def test_bad_features_rejected(tmp_path):
    chosen, rejected, splits = synthetic_features()
    mismatch = write_feature_folder(tmp_path / "a", "prefs", chosen, rejected[:-5], splits)
    with pytest.raises(SystemExit, match="90 and 85"):
        cronos_trainer.main(["--features_dir", str(mismatch)] + FAST)
    broken = chosen.copy()
    broken[3, 2] = np.nan
    nonfinite = write_feature_folder(tmp_path / "b", "prefs", broken, rejected, splits)
    with pytest.raises(SystemExit, match="NaN or infinite"):
        cronos_trainer.main(["--features_dir", str(nonfinite)] + FAST)
    # Unpaired data whose negatives all sit in the test split: the train split has one class.
    unpaired = write_feature_folder(
        tmp_path / "c", "prefs", chosen, rejected[:10], ["train"] * PAIRS + ["test"] * 10, paired=False,
        labels=[1] * PAIRS + [-1] * 10,
    )
    with pytest.raises(SystemExit, match="single class"):
        cronos_trainer.main(["--features_dir", str(unpaired)] + FAST)


@pytest.mark.parametrize(
    "flags, match",
    [(["--num_patterns", "0"], "num_patterns=0"), (["--rho", "0"], "rho=0.0"), (["--rho", "-1"], "rho=-1.0"),
     (["--step_ratio", "3"], "step_ratio=3.0"), (["--beta", "-1"], "beta=-1.0"),
     (["--patience", "-1"], "patience=-1"), (["--rel_tol", "2"], "rel_tol=2.0"), (["--balance_tau", "0.5"], "balance_tau=0.5")],
)
def test_nonsense_settings_rejected(feature_base, flags, match):
    with pytest.raises(SystemExit, match=match):
        cronos_trainer.main(["--features_dir", str(feature_base / f"{MODEL}__prefs__mean")] + FAST + flags)
