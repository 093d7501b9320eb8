"""Tests of the convex ReLU program's linear maps, weight recovery and training data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coala import cvxnn


def random_problem(n: int = 50, d: int = 6, P: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    D, _ = cvxnn.sample_patterns(X, P, seed)
    return X, D


def dense_F(X: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Return F as an explicit (n, 2dP) matrix in the flattening order of u (2, d, P)."""
    n, d = X.shape
    P = D.shape[1]
    F = np.zeros((n, 2, d, P))
    for i in range(P):
        F[:, 0, :, i] = D[:, i : i + 1] * X
        F[:, 1, :, i] = -D[:, i : i + 1] * X
    return F.reshape(n, -1)


def dense_G(X: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Return G as an explicit (2nP, 2dP) matrix in the flattening orders of s (2, n, P) and u (2, d, P)."""
    n, d = X.shape
    P = D.shape[1]
    G = np.zeros((2, n, P, 2, d, P))
    for j in range(2):
        for i in range(P):
            G[j, :, i, j, :, i] = (2 * D[:, i : i + 1] - 1) * X
    return G.reshape(2 * n * P, 2 * d * P)


def test_maps_match_dense_matrices():
    X, D = random_problem()
    rng = np.random.default_rng(1)
    u = rng.standard_normal((2, X.shape[1], D.shape[1]))
    r = rng.standard_normal(X.shape[0])
    s = rng.standard_normal((2, X.shape[0], D.shape[1]))
    F, G = dense_F(X, D), dense_G(X, D)
    with jax.enable_x64(True):
        Xj, Dj = jnp.asarray(X), jnp.asarray(D)
        np.testing.assert_allclose(cvxnn.F_apply(Xj, Dj, jnp.asarray(u)), F @ u.ravel(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(cvxnn.F_transpose_apply(Xj, Dj, jnp.asarray(r)).ravel(), F.T @ r, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(cvxnn.G_apply(Xj, Dj, jnp.asarray(u)).ravel(), G @ u.ravel(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(cvxnn.G_transpose_apply(Xj, Dj, jnp.asarray(s)).ravel(), G.T @ s.ravel(), rtol=1e-10, atol=1e-10)
        gram = cvxnn.gram_apply(jnp.asarray(X.T @ X), jnp.asarray(u)).ravel()
        np.testing.assert_allclose(gram, G.T @ G @ u.ravel(), rtol=1e-10, atol=1e-9)


def feasible_point(X: np.ndarray, generators: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return u (2, d, P) whose every block satisfies its cone constraint: positive multiples of g_i."""
    P = generators.shape[1]
    scales = rng.uniform(0.5, 2.0, size=(2, 1, P))
    u = np.stack([generators, generators]) * scales
    u[1, :, 0] = 0.0  # one zero neuron
    return u


def test_recovery_reproduces_F_u_on_feasible_point():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((80, 7))
    D, generators = cvxnn.sample_patterns(X, 4, seed=3)
    u = feasible_point(X, generators, rng)
    with jax.enable_x64(True):
        violation = float(cvxnn.constraint_violation(jnp.asarray(X), jnp.asarray(D), jnp.asarray(u)))
        F_u = np.asarray(cvxnn.F_apply(jnp.asarray(X), jnp.asarray(D), jnp.asarray(u)))
        weights = cvxnn.recover_weights(u)
        gap = cvxnn.recovery_gap(X, D, u, weights)
    assert violation == 0.0
    assert weights.theta1.shape == (7, 8)
    assert weights.theta2.shape == (8,)
    assert weights.active == 7
    np.testing.assert_allclose(cvxnn.relu_network(X, weights.theta1, weights.theta2), F_u, rtol=1e-12, atol=1e-12)
    assert gap["gap"] < 1e-10


def test_recovery_signs_and_zero_blocks():
    u = np.zeros((2, 3, 2))
    u[0, :, 0] = [3.0, 0.0, 4.0]  # norm 5
    u[1, :, 1] = [0.0, 9.0, 0.0]  # norm 9
    weights = cvxnn.recover_weights(u)
    np.testing.assert_allclose(weights.theta2, [np.sqrt(5), 0.0, 0.0, -3.0])
    np.testing.assert_allclose(weights.theta1[:, 0], np.array([3.0, 0.0, 4.0]) / np.sqrt(5))
    np.testing.assert_allclose(weights.theta1[:, 3], [0.0, 3.0, 0.0])
    assert np.all(weights.theta1[:, 1:3] == 0)
    assert weights.active == 2


def test_sample_patterns_rejects_bad_count():
    with pytest.raises(ValueError, match="num_patterns"):
        cvxnn.sample_patterns(np.ones((4, 2)), 0, seed=0)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.array([[np.nan, 1.0], [1.0, 2.0]]), np.array([1.0, -1.0]), "NaN or infinite"),
        (np.ones((2, 2)), np.array([1.0, 1.0]), "single class"),
        (np.ones((2, 2)), np.array([1.0, 0.0]), "only -1 and \\+1"),
        (np.ones((2, 2)), np.array([1.0, -1.0, 1.0]), "shape"),
    ],
)
def test_check_problem_rejects_bad_input(X, y, match):
    with pytest.raises(ValueError, match=match):
        cvxnn.check_problem(X, y, np.ones((2, 1)))


def test_training_data_labels_and_standardization():
    rng = np.random.default_rng(4)
    chosen = rng.normal(3.0, 2.0, size=(10, 4))
    rejected = rng.normal(3.0, 2.0, size=(10, 4))
    chosen[:, 3] = rejected[:, 3] = 7.0  # a constant feature must not divide by zero
    splits = np.array(["train"] * 6 + ["validation"] * 2 + ["test"] * 2)
    data = cvxnn.build_training_data(chosen, rejected, splits, splits, paired=True)
    train = data.splits["train"]
    np.testing.assert_allclose(train.y, [1.0] * 6 + [-1.0] * 6)
    np.testing.assert_allclose(train.X[:, :3].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(train.X[:, :3].std(axis=0), 1.0, atol=1e-12)
    assert data.feature_std[3] == cvxnn.STD_FLOOR
    assert np.all(np.isfinite(train.X))
    np.testing.assert_array_equal(data.splits["test"].pairs, [[0, 2], [1, 3]])


def test_training_data_single_class_rejected():
    chosen = np.ones((4, 2))
    rejected = np.zeros((4, 2))
    with pytest.raises(ValueError, match="single class"):
        cvxnn.build_training_data(
            chosen, rejected, np.array(["train"] * 4), np.array(["test"] * 4), paired=False
        )
