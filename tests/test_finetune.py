"""Stage 3 fine-tuning: losses against closed forms, convexity, optimum against L-BFGS, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize
from safetensors.numpy import load_file

import finetune_coala
from coala.features import load_features
from coala.finetune import (
    FinetuneError,
    FinetuneSettings,
    pair_loss,
    pair_metrics,
    pairwise_loss,
    pointwise_loss,
    rose_monotonically,
    shuffle_pair_unpaired,
    subsample_pairs,
    train_theta2,
)
from coala.head import HeadParams, load_head, save_head


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def random_pairs(seed: int, n: int, m: int, shift: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen = np.maximum(rng.normal(size=(n, m)) + shift, 0.0).astype(np.float32)
    rejected = np.maximum(rng.normal(size=(n, m)), 0.0).astype(np.float32)
    return chosen, rejected


# ----------------------------------------------------------------------------
# Losses


def test_pairwise_loss_closed_form():
    chosen, rejected = random_pairs(0, 3, 2)
    theta2 = np.array([0.7, -1.3], dtype=np.float32)
    beta, gamma = 2.5, 0.5
    difference = chosen.astype(np.float64) - rejected
    z = beta * difference @ theta2 - gamma
    expected_value = np.mean(softplus(-z))
    expected_grad = np.mean((-beta * sigmoid(-z))[:, None] * difference, axis=0)

    value, grad = jax.value_and_grad(pairwise_loss)(jnp.asarray(theta2), chosen, rejected, beta, gamma)
    np.testing.assert_allclose(float(value), expected_value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)


def test_pointwise_loss_closed_form():
    rng = np.random.default_rng(1)
    hidden = np.maximum(rng.normal(size=(4, 3)), 0).astype(np.float32)
    labels = np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32)
    theta2 = np.array([0.4, -0.2, 1.1], dtype=np.float32)
    beta, gamma = 1.5, 0.3
    scores = hidden.astype(np.float64) @ theta2
    argument = -beta * labels * scores + gamma
    expected_value = np.mean(softplus(argument))
    expected_grad = np.mean((-beta * labels * sigmoid(argument))[:, None] * hidden, axis=0)

    value, grad = jax.value_and_grad(pointwise_loss)(jnp.asarray(theta2), hidden, labels, beta, gamma)
    np.testing.assert_allclose(float(value), expected_value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)


def test_pointwise_pair_loss_averages_texts():
    chosen, rejected = random_pairs(2, 5, 3)
    theta2 = jnp.array([0.3, -0.8, 0.5])
    direct = pointwise_loss(
        theta2, np.concatenate([chosen, rejected]), np.array([1.0] * 5 + [-1.0] * 5), 2.0, 0.1
    )
    through_pairs = pair_loss(theta2, chosen, rejected, "pointwise", 2.0, 0.1)
    np.testing.assert_allclose(float(through_pairs), float(direct), rtol=1e-6)


@pytest.mark.parametrize("loss", ["pairwise", "pointwise"])
def test_loss_convex_along_random_line(loss):
    chosen, rejected = random_pairs(3, 40, 6)
    rng = np.random.default_rng(4)
    start, direction = rng.normal(size=6), rng.normal(size=6)
    steps = np.linspace(-3.0, 3.0, 61)
    values = np.array(
        [float(pair_loss(jnp.asarray(start + t * direction, dtype=jnp.float32), chosen, rejected, loss, 2.5, 0.5)) for t in steps]
    )
    second_differences = values[:-2] - 2 * values[1:-1] + values[2:]
    assert np.all(second_differences >= -1e-5 * np.maximum(1.0, np.abs(values[1:-1])))
    assert np.max(second_differences) > 0


def test_unknown_loss_rejected():
    chosen, rejected = random_pairs(0, 2, 2)
    with pytest.raises(FinetuneError, match="Unknown loss"):
        pair_loss(jnp.zeros(2), chosen, rejected, "hinge", 1.0, 0.0)


# ----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("loss", ["pairwise", "pointwise"])
def test_adamw_matches_lbfgs_optimum(loss):
    # Noisy pairs in 5 dimensions are not separable, so the convex loss has a finite minimizer.
    chosen, rejected = random_pairs(5, 300, 5, shift=0.1)
    beta, gamma = 2.5, 0.5

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = jax.value_and_grad(pair_loss)(jnp.asarray(theta, dtype=jnp.float32), chosen, rejected, loss, beta, gamma)
        return float(value), np.asarray(grad, dtype=np.float64)

    reference = minimize(objective, np.zeros(5), jac=True, method="L-BFGS-B", options={"gtol": 1e-9, "ftol": 1e-14, "maxiter": 2000})
    assert reference.success

    settings = FinetuneSettings(loss=loss, beta=beta, gamma=gamma, learning_rate=3e-3, epochs=3000, batch_size=300, seed=0)
    result = train_theta2(np.zeros(5, dtype=np.float32), chosen, rejected, settings)
    adam_value = float(pair_loss(jnp.asarray(result.final_theta2), chosen, rejected, loss, beta, gamma))

    assert abs(adam_value - reference.fun) <= 1e-3 * max(1.0, abs(reference.fun))
    np.testing.assert_allclose(result.final_theta2, reference.x, atol=1e-3)


def test_swapping_pairs_flips_every_margin():
    chosen, rejected = random_pairs(6, 50, 4)
    theta2 = np.random.default_rng(7).normal(size=4).astype(np.float32)
    margins = (chosen - rejected) @ theta2
    swapped = (rejected - chosen) @ theta2
    assert np.all(margins != 0)
    assert np.all(np.sign(swapped) == -np.sign(margins))

    original = pair_metrics(jnp.asarray(theta2), chosen, rejected, "pairwise", 2.5, 0.5)
    flipped = pair_metrics(jnp.asarray(theta2), rejected, chosen, "pairwise", 2.5, 0.5)
    np.testing.assert_allclose(float(flipped["margin"]), -float(original["margin"]), rtol=1e-5)
    np.testing.assert_allclose(float(flipped["accuracy"]), 1.0 - float(original["accuracy"]), atol=1e-6)
    np.testing.assert_allclose(float(flipped["sigmoid_margin"]), 1.0 - float(original["sigmoid_margin"]), atol=1e-6)


def test_best_epoch_has_lowest_validation_loss():
    chosen, rejected = random_pairs(8, 200, 6)
    val_chosen, val_rejected = random_pairs(9, 40, 6)
    settings = FinetuneSettings(learning_rate=0.05, epochs=60, batch_size=32, seed=1)
    result = train_theta2(np.zeros(6, dtype=np.float32), chosen, rejected, settings, val_chosen, val_rejected)

    val_losses = result.history["validation"]["loss"]
    assert len(val_losses) == 61
    assert len(result.history["train"]["margin"]) == 61
    assert result.best_epoch == int(np.argmin(val_losses))
    kept_loss = float(pair_loss(jnp.asarray(result.theta2), val_chosen, val_rejected, "pairwise", 2.5, 0.5))
    np.testing.assert_allclose(kept_loss, min(val_losses), rtol=1e-5)
    assert result.history["train"]["margin"][-1] > result.history["train"]["margin"][0]
    assert result.steps == 60 * 7


def test_training_is_seeded():
    chosen, rejected = random_pairs(10, 100, 4)
    settings = FinetuneSettings(learning_rate=0.01, epochs=20, batch_size=16, seed=3)
    first = train_theta2(np.zeros(4, dtype=np.float32), chosen, rejected, settings)
    second = train_theta2(np.zeros(4, dtype=np.float32), chosen, rejected, settings)
    other = train_theta2(np.zeros(4, dtype=np.float32), chosen, rejected, FinetuneSettings(learning_rate=0.01, epochs=20, batch_size=16, seed=4))
    np.testing.assert_array_equal(first.final_theta2, second.final_theta2)
    assert not np.array_equal(first.final_theta2, other.final_theta2)
    assert first.selected_by == "train"


@pytest.mark.parametrize(
    "settings, message",
    [
        (FinetuneSettings(loss="hinge"), "--loss"),
        (FinetuneSettings(beta=0.0), "--beta"),
        (FinetuneSettings(learning_rate=-1.0), "--learning_rate"),
        (FinetuneSettings(epochs=0), "--epochs"),
        (FinetuneSettings(batch_size=0), "--batch_size"),
        (FinetuneSettings(weight_decay=-0.1), "--weight_decay"),
    ],
)
def test_invalid_settings_rejected(settings, message):
    with pytest.raises(FinetuneError, match=message):
        settings.validate()


def test_misaligned_pairs_rejected():
    chosen, rejected = random_pairs(0, 5, 3)
    with pytest.raises(FinetuneError, match="misaligned"):
        train_theta2(np.zeros(3), chosen, rejected[:4], FinetuneSettings(epochs=1))
    with pytest.raises(FinetuneError, match=r"expected \(n, 4\)"):
        train_theta2(np.zeros(4), chosen, rejected, FinetuneSettings(epochs=1))


def test_unpaired_shuffle_pairing_is_seeded():
    positives = np.arange(10, dtype=np.float32).reshape(5, 2)
    negatives = -np.arange(14, dtype=np.float32).reshape(7, 2)
    chosen, rejected = shuffle_pair_unpaired(positives, negatives, seed=0)
    again, again_rejected = shuffle_pair_unpaired(positives, negatives, seed=0)
    assert chosen.shape == (5, 2)
    assert rejected.shape == (5, 2)
    np.testing.assert_array_equal(chosen, again)
    np.testing.assert_array_equal(rejected, again_rejected)
    assert sorted(map(tuple, chosen)) == sorted(map(tuple, positives))
    assert len({tuple(row) for row in rejected}) == 5


def test_subsample_and_monotonic_helpers():
    chosen = np.arange(60, dtype=np.float32).reshape(30, 2)
    rejected = -chosen
    kept_chosen, kept_rejected = subsample_pairs(chosen, rejected, 10, seed=0)
    assert kept_chosen.shape == (10, 2)
    np.testing.assert_array_equal(kept_rejected, -kept_chosen)
    assert len({tuple(row) for row in kept_chosen}) == 10
    assert subsample_pairs(chosen, rejected, 0, seed=0)[0].shape == (30, 2)
    assert rose_monotonically([0.0, 0.1, 0.1, 0.3])
    assert not rose_monotonically([0.0, 0.2, 0.1])
    assert not rose_monotonically([0.0, 0.0, 0.0])


# ----------------------------------------------------------------------------
# finetune_coala.py


def write_feature_folder(path: Path, dim: int, pairs: int, seed: int, paired: bool = True) -> Path:
    """Write a synthetic Stage 1 folder: chosen rows are shifted along one direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    chosen = (rng.normal(size=(pairs, dim)) + 0.5 * direction).astype(np.float32)
    rejected = rng.normal(size=(pairs if paired else pairs + 3, dim)).astype(np.float32)
    splits = ["train"] * 8 + ["validation"] + ["test"]
    path.mkdir(parents=True)
    np.save(path / "chosen.npy", chosen)
    np.save(path / "rejected.npy", rejected)
    with open(path / "meta.jsonl", "w", encoding="utf-8") as handle:
        if paired:
            for index in range(pairs):
                handle.write(json.dumps({"pair_id": f"p{index}", "split": splits[index % 10]}) + "\n")
        else:
            for index in range(pairs):
                handle.write(json.dumps({"text_id": f"pos{index}", "label": 1, "split": splits[index % 10]}) + "\n")
            for index in range(len(rejected)):
                handle.write(json.dumps({"text_id": f"neg{index}", "label": -1, "split": splits[index % 10]}) + "\n")
    manifest = {"model_name": "synthetic", "pool": "attn", "pool_span": "all", "hidden_size": dim, "paired": paired}
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return path


def write_stage2_head(path: Path, features_dir: Path, neurons: int, seed: int) -> Path:
    features = load_features(features_dir)
    train_chosen, train_rejected = features.split("train")
    stacked = np.concatenate([train_chosen, train_rejected])
    rng = np.random.default_rng(seed)
    params = HeadParams(
        theta1=rng.normal(size=(features.dim, neurons)).astype(np.float32),
        theta2=(0.1 * rng.normal(size=neurons)).astype(np.float32),
        feature_mean=stacked.mean(axis=0),
        feature_std=stacked.std(axis=0) + 1e-3,
        config={
            "stage": "cronos",
            "features_dir": str(features_dir.resolve()),
            "pooling": {"pool": "attn", "pool_span": "all", "max_length": 64, "hidden_size": features.dim, "model_name": "synthetic"},
        },
        attn_scorer=rng.normal(size=features.dim).astype(np.float32),
    )
    return save_head(path, params, {"stage": "cronos"})


def test_cli_writes_head_and_metrics(tmp_path, capsys):
    features_dir = write_feature_folder(tmp_path / "features", dim=12, pairs=200, seed=0)
    stage2 = write_stage2_head(tmp_path / "cvxNN_trained_synthetic", features_dir, neurons=8, seed=1)
    output = tmp_path / "Finetuned_cvxmlp_synthetic"

    metrics = finetune_coala.main([
        "--model_path", str(stage2), "--output_dir", str(output), "--epochs", "40",
        "--learning_rate", "0.01", "--batch_size", "32",
    ])
    printed = capsys.readouterr().out

    for name in ("head.safetensors", "config.json", "metrics.json", "reward_margins.png", "resolved_config.json"):
        assert (output / name).is_file(), name
    assert (output / "reward_margins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    source, tuned = load_head(stage2), load_head(output)
    np.testing.assert_array_equal(tuned.theta1, source.theta1)
    np.testing.assert_array_equal(tuned.attn_scorer, source.attn_scorer)
    np.testing.assert_array_equal(tuned.feature_std, source.feature_std)
    assert not np.array_equal(tuned.theta2, source.theta2)
    assert tuned.config["stage"] == "coala_finetune"
    assert tuned.config["pooling"] == source.config["pooling"]
    assert tuned.config["pairs"] == {"train": 160, "validation": 20, "test": 20}
    assert set(tuned.config["theta2_initial"]) >= {"mean", "std", "l2_norm"}
    np.testing.assert_allclose(tuned.config["theta2_final"]["l2_norm"], np.linalg.norm(tuned.theta2), rtol=1e-5)
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["best_epoch"] == metrics["best_epoch"]
    assert len(saved["history"]["train"]["margin"]) == 41
    assert "test" in saved["summary"]
    assert "train margin" in printed
    assert "monotonically" in printed
    assert saved["summary"]["train"]["margin"] > saved["summary"]["train_initial"]["margin"]


def test_cli_pairs_unpaired_data(tmp_path, caplog):
    features_dir = write_feature_folder(tmp_path / "features", dim=6, pairs=50, seed=2, paired=False)
    manifest = json.loads((features_dir / "manifest.json").read_text())
    assert manifest["paired"] is False
    stage2 = write_stage2_head(tmp_path / "head", features_dir, neurons=4, seed=3)
    caplog.set_level("INFO")
    finetune_coala.main(["--model_path", str(stage2), "--output_dir", str(tmp_path / "out"), "--epochs", "3"])
    assert "paired by a seeded shuffle" in caplog.text
    assert load_head(tmp_path / "out").config["paired"] is False


def test_cli_max_pairs_and_features_override(tmp_path):
    features_dir = write_feature_folder(tmp_path / "features", dim=6, pairs=100, seed=4)
    stage2 = write_stage2_head(tmp_path / "head", features_dir, neurons=4, seed=5)
    moved = tmp_path / "moved"
    features_dir.rename(moved)
    finetune_coala.main([
        "--model_path", str(stage2), "--output_dir", str(tmp_path / "out"), "--epochs", "2",
        "--max_pairs", "25", "--features_dir", str(moved),
    ])
    config = load_head(tmp_path / "out").config
    assert config["pairs"]["train"] == 25
    assert config["features_dir"] == str(moved.resolve())
    tensors = load_file(str(tmp_path / "out" / "head.safetensors"))
    assert set(tensors) == {"theta1", "theta2", "feature_mean", "feature_std", "attn_scorer"}


def test_cli_reports_bad_inputs(tmp_path):
    features_dir = write_feature_folder(tmp_path / "features", dim=6, pairs=30, seed=6)
    stage2 = write_stage2_head(tmp_path / "head", features_dir, neurons=4, seed=7)
    with pytest.raises(FinetuneError, match="--beta"):
        finetune_coala.main(["--model_path", str(stage2), "--output_dir", str(tmp_path / "out"), "--beta", "-1"])
    other = write_feature_folder(tmp_path / "other", dim=5, pairs=30, seed=8)
    with pytest.raises(FinetuneError, match="dimension 5"):
        finetune_coala.main(["--model_path", str(stage2), "--output_dir", str(tmp_path / "out"), "--features_dir", str(other)])
    with pytest.raises(ValueError, match="Head folder not found"):
        finetune_coala.main(["--model_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
