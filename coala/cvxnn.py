"""The convex reformulation of a two-layer ReLU network with sampled activation patterns.

Data ``X`` (n, d), labels ``y`` (n,) in {-1, +1}, and a 0/1 pattern matrix
``D`` (n, P) whose column i is the diagonal of ``D_i = diag(1[X g_i >= 0])``
for a Gaussian generator ``g_i``. The variable ``u`` has shape (2, d, P):
``u[0, :, i]`` is the weight ``u_i`` of a positive neuron and ``u[1, :, i]``
the weight ``z_i`` of a negative one. The program (Pilanci & Ergen 2020) is

    min  1/2 ||F u - y||^2 + beta sum_i (||u_i||_2 + ||z_i||_2)
    s.t. G u >= 0

with the two linear maps

    F u = sum_i D_i X (u_i - z_i)                                (n,)
    G u = ((2 D_i - I) X u_i, (2 D_i - I) X z_i)_i               (2, n, P)

Every function here is a pure JAX function of arrays and never forms ``F``
(an n x 2dP matrix). Because ``(2 D_i - I)^2 = I``, ``G^T G`` is block
diagonal with ``X^T X`` in each of the 2P blocks, which ``gram_apply`` uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

Array = jax.Array

# Blocks whose l2 norm is at or below this value are treated as zero neurons by ``recover_weights``.
ZERO_BLOCK_TOL = 1e-12


def sample_patterns(X: np.ndarray, num_patterns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num_patterns`` activation patterns ``1[X g_i >= 0]`` with ``g_i ~ N(0, I_d)``.

    Args:
      X: (n, d) training features.
      num_patterns: P >= 1.
      seed: seed of the NumPy generator that draws the generators ``g_i``.

    Returns:
      ``(D, generators)``: D is (n, P) with 0/1 entries in ``X.dtype``; generators is (d, P).
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, d), got shape {X.shape}.")
    if int(num_patterns) != num_patterns or num_patterns < 1:
        raise ValueError(f"num_patterns must be an integer >= 1, got {num_patterns!r}.")
    rng = np.random.default_rng(seed)
    generators = rng.standard_normal((X.shape[1], int(num_patterns))).astype(X.dtype)
    D = (X @ generators >= 0).astype(X.dtype)
    return D, generators


def sign_matrix(D: Array) -> Array:
    """Return ``2 D - 1`` (n, P): the diagonals of ``2 D_i - I``."""
    return 2.0 * D - 1.0


def F_apply(X: Array, D: Array, u: Array) -> Array:
    """Return ``F u`` (n,) for u (2, d, P): ``sum_i D_i X (u_i - z_i)``."""
    return jnp.sum(D * (X @ (u[0] - u[1])), axis=1)


def F_transpose_apply(X: Array, D: Array, r: Array) -> Array:
    """Return ``F^T r`` (2, d, P) for r (n,)."""
    block = X.T @ (D * r[:, None])
    return jnp.stack([block, -block])


def G_apply(X: Array, D: Array, u: Array) -> Array:
    """Return ``G u`` (2, n, P): ``(2 D_i - I) X u_i`` and ``(2 D_i - I) X z_i``."""
    signs = sign_matrix(D)
    return jnp.stack([signs * (X @ u[0]), signs * (X @ u[1])])


def G_transpose_apply(X: Array, D: Array, s: Array) -> Array:
    """Return ``G^T s`` (2, d, P) for s (2, n, P)."""
    signs = sign_matrix(D)
    return jnp.stack([X.T @ (signs * s[0]), X.T @ (signs * s[1])])


def gram_apply(XtX: Array, u: Array) -> Array:
    """Return ``G^T G u`` (2, d, P) from the Gram matrix ``X^T X`` (d, d), using ``(2 D_i - I)^2 = I``."""
    return jnp.einsum("ab,jbp->jap", XtX, u)


def group_norms(u: Array) -> Array:
    """Return the l2 norm of every neuron block (2, P) of u (2, d, P)."""
    return jnp.sqrt(jnp.sum(u * u, axis=1))


def objective(X: Array, D: Array, y: Array, u: Array, beta: float | Array) -> Array:
    """Return ``1/2 ||F u - y||^2 + beta * sum of block l2 norms`` (the constraints are not included)."""
    residual = F_apply(X, D, u) - y
    return 0.5 * jnp.sum(residual * residual) + beta * jnp.sum(group_norms(u))


def constraint_violation(X: Array, D: Array, u: Array) -> Array:
    """Return ``||min(G u, 0)||_2``, zero exactly when u satisfies every cone constraint."""
    return jnp.linalg.norm(jnp.minimum(G_apply(X, D, u), 0.0))


def network_output(X: Array, u: Array) -> Array:
    """Return the ReLU network of u on any features X (m, d): ``sum_i relu(X u_i) - relu(X z_i)`` (m,).

    This equals ``relu(X @ theta1) @ theta2`` for the weights of ``recover_weights``
    because ReLU is positively homogeneous. On the training data it equals ``F u``
    when u is feasible.
    """
    return jnp.sum(jax.nn.relu(X @ u[0]), axis=1) - jnp.sum(jax.nn.relu(X @ u[1]), axis=1)


@dataclass
class ReluWeights:
    """Weights of the recovered two-layer ReLU network ``relu(X @ theta1) @ theta2``.

    Attributes:
      theta1: (d, 2P) hidden-layer weights, positive neurons first.
      theta2: (2P,) output-layer weights, ``+sqrt(||u_i||)`` then ``-sqrt(||z_i||)``.
      active: number of neurons with a nonzero block.
    """

    theta1: np.ndarray
    theta2: np.ndarray
    active: int


def recover_weights(u: np.ndarray | Array) -> ReluWeights:
    """Recover the ReLU network from a convex solution u (2, d, P).

    A nonzero block ``w`` becomes a neuron with input weight ``w / sqrt(||w||)`` and
    output weight ``+sqrt(||w||)`` for ``u_i`` or ``-sqrt(||w||)`` for ``z_i``. A zero
    block becomes a neuron with zero weights.
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 3 or u.shape[0] != 2:
        raise ValueError(f"u must have shape (2, d, P), got {u.shape}.")
    _, d, P = u.shape
    norms = np.linalg.norm(u, axis=1)  # (2, P)
    active = norms > ZERO_BLOCK_TOL
    scale = np.where(active, np.sqrt(np.where(active, norms, 1.0)), 0.0)  # sqrt(||w||), 0 for zero blocks
    safe_scale = np.where(active, scale, 1.0)
    theta1 = np.concatenate([u[0] / safe_scale[0], u[1] / safe_scale[1]], axis=1)
    theta1[:, ~np.concatenate([active[0], active[1]])] = 0.0
    theta2 = np.concatenate([scale[0], -scale[1]])
    return ReluWeights(theta1=theta1, theta2=theta2, active=int(active.sum()))


def relu_network(X: np.ndarray, theta1: np.ndarray, theta2: np.ndarray) -> np.ndarray:
    """Return ``relu(X @ theta1) @ theta2`` (m,) in NumPy."""
    return np.maximum(np.asarray(X) @ theta1, 0.0) @ theta2


def check_problem(X: np.ndarray, y: np.ndarray, D: np.ndarray) -> None:
    """Raise ``ValueError`` naming the problem when X (n, d), y (n,), D (n, P) do not form a valid program."""
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D array (n, d), got shape {X.shape}.")
    n = X.shape[0]
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match X {X.shape}, got {y.shape}.")
    if D.ndim != 2 or D.shape[0] != n or D.shape[1] < 1:
        raise ValueError(f"D must have shape ({n}, P) with P >= 1, got {D.shape}.")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"X has {int(np.sum(~np.isfinite(X)))} NaN or infinite entries; clean the features first.")
    if not np.all(np.isin(y, (-1.0, 1.0))):
        raise ValueError(f"y must contain only -1 and +1, got values {np.unique(y)[:10].tolist()}.")
    if np.unique(y).size < 2:
        raise ValueError(f"y has a single class ({float(y[0]):+.0f}); the classifier needs both +1 and -1 labels.")
    if not np.all(np.isin(D, (0.0, 1.0))):
        raise ValueError("D must contain only 0 and 1 (activation patterns).")


# ----------------------------------------------------------------------------------------------
# Training data from a Stage 1 feature folder

# Feature standard deviations are floored at this value so constant features do not divide by zero.
STD_FLOOR = 1e-6


@dataclass
class LabeledSplit:
    """One split as a classification problem.

    Attributes:
      raw: (m, d) pooled features as stored, chosen rows first, then rejected rows.
      X: (m, d) standardized features.
      y: (m,) labels, +1 for chosen rows and -1 for rejected rows.
      pairs: (k, 2) row indices (chosen, rejected) of aligned pairs, or ``None`` for unpaired data.
    """

    raw: np.ndarray
    X: np.ndarray
    y: np.ndarray
    pairs: np.ndarray | None


@dataclass
class TrainingData:
    """Labeled, standardized splits and the standardization statistics of the train split.

    Attributes:
      splits: ``{"train", "validation", "test"}`` -> ``LabeledSplit`` (a split without rows is absent).
      feature_mean: (d,) train mean, zeros when standardization is off.
      feature_std: (d,) train std floored at ``STD_FLOOR``, ones when standardization is off.
    """

    splits: dict[str, LabeledSplit]
    feature_mean: np.ndarray
    feature_std: np.ndarray


def build_training_data(
    chosen: np.ndarray,
    rejected: np.ndarray,
    chosen_split: np.ndarray,
    rejected_split: np.ndarray,
    paired: bool,
    standardize: bool = True,
) -> TrainingData:
    """Label chosen rows +1 and rejected rows -1 per split, and standardize with train statistics.

    Args:
      chosen, rejected: (n_c, d), (n_r, d) pooled features.
      chosen_split, rejected_split: (n_c,), (n_r,) split names per row.
      paired: whether row i of chosen and rejected come from the same prompt.
      standardize: subtract the train mean and divide by the floored train std.

    Raises:
      ValueError: when the shapes disagree, a value is not finite, or the train split
        lacks rows or one of the two classes.
    """
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    if chosen.ndim != 2 or rejected.ndim != 2 or chosen.shape[1] != rejected.shape[1]:
        raise ValueError(f"chosen {chosen.shape} and rejected {rejected.shape} features must be 2-D with the same width d.")
    if paired and chosen.shape[0] != rejected.shape[0]:
        raise ValueError(f"Paired data needs as many chosen rows as rejected rows, got {chosen.shape[0]} and {rejected.shape[0]}.")
    for name, array in (("chosen", chosen), ("rejected", rejected)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} features have {int(np.sum(~np.isfinite(array)))} NaN or infinite entries; extract them again.")
    train_chosen = chosen[chosen_split == "train"]
    train_rejected = rejected[rejected_split == "train"]
    if len(train_chosen) == 0 and len(train_rejected) == 0:
        raise ValueError("The train split has no rows; check the split column of meta.jsonl.")
    if len(train_chosen) == 0 or len(train_rejected) == 0:
        present = "chosen (+1)" if len(train_chosen) else "rejected (-1)"
        raise ValueError(f"The train split has a single class: only {present} rows. The classifier needs both labels.")

    train_rows = np.concatenate([train_chosen, train_rejected])
    if standardize:
        mean = train_rows.mean(axis=0)
        std = np.maximum(train_rows.std(axis=0), STD_FLOOR)
    else:
        mean = np.zeros(chosen.shape[1])
        std = np.ones(chosen.shape[1])

    splits = {}
    for name in ("train", "validation", "test"):
        split_chosen = chosen[chosen_split == name]
        split_rejected = rejected[rejected_split == name]
        if len(split_chosen) + len(split_rejected) == 0:
            continue
        raw = np.concatenate([split_chosen, split_rejected])
        y = np.concatenate([np.ones(len(split_chosen)), -np.ones(len(split_rejected))])
        pairs = None
        if paired:
            index = np.arange(len(split_chosen))
            pairs = np.stack([index, index + len(split_chosen)], axis=1)
        splits[name] = LabeledSplit(raw=raw, X=(raw - mean) / std, y=y, pairs=pairs)
    return TrainingData(splits=splits, feature_mean=mean, feature_std=std)


def recovery_gap(X: np.ndarray, D: np.ndarray, u: np.ndarray, weights: ReluWeights) -> dict[str, float]:
    """Compare the recovered network ``relu(X theta1) theta2`` with ``F u`` on the training data.

    Returns the absolute l2 gap, the gap relative to ``||F u||``, and the constraint
    violation ``||min(G u, 0)||`` that bounds why they differ (zero violation, zero gap).
    """
    F_u = np.asarray(F_apply(jnp.asarray(X), jnp.asarray(D), jnp.asarray(u)))
    network = relu_network(X, weights.theta1, weights.theta2)
    gap = float(np.linalg.norm(network - F_u))
    scale = float(np.linalg.norm(F_u))
    return {
        "gap": gap,
        "relative_gap": gap / scale if scale > 0 else gap,
        "constraint_violation": float(constraint_violation(jnp.asarray(X), jnp.asarray(D), jnp.asarray(u))),
    }
