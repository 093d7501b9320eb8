"""Stage 3, COALA fine-tuning: theta2 (the output-layer weights) trained with a convex loss.

Theta1 (the hidden-layer weights) stays frozen, so the hidden activations
``relu(X_std @ theta1)`` of every text are computed once and the preference
score of a text is linear in theta2: ``r = hidden @ theta2``. Two losses over
aligned pairs (chosen w, rejected l), both convex in theta2:

    pairwise   L = mean log(1 + exp(-(beta (r_w - r_l) - gamma)))
    pointwise  L = mean over texts of log(1 + exp(-beta y r + gamma)),
               y = +1 for chosen and -1 for rejected texts

Training runs every epoch inside one compiled program: ``lax.scan`` over
epochs, and inside it ``lax.scan`` over mini-batches of a seeded permutation.
Per-epoch metrics on the train and validation pairs come out of the same scan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

logger = logging.getLogger(__name__)

LOSSES = ("pairwise", "pointwise")
METRIC_NAMES = ("loss", "margin", "accuracy", "sigmoid_margin")


class FinetuneError(ValueError):
    """Invalid fine-tuning input: shapes, settings or data that cannot be trained on."""


# ----------------------------------------------------------------------------
# Losses (pure functions of arrays)


def pairwise_loss(
    theta2: jax.Array,
    hidden_chosen: jax.Array,
    hidden_rejected: jax.Array,
    beta: float,
    gamma: float,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Return the pairwise COALA loss, a scalar.

    Args:
      theta2: (m,) output-layer weights.
      hidden_chosen: (n, m) hidden activations of the chosen texts.
      hidden_rejected: (n, m) hidden activations of the rejected texts, row i
        from the same prompt as row i of ``hidden_chosen``.
      beta: scale of the reward margin.
      gamma: margin offset.
      weights: (n,) optional per-pair weights (0 for padding rows); the loss
        is the weighted mean.
    """
    margin = (hidden_chosen - hidden_rejected) @ theta2
    per_pair = jax.nn.softplus(-(beta * margin - gamma))
    return _weighted_mean(per_pair, weights)


def pointwise_loss(
    theta2: jax.Array,
    hidden: jax.Array,
    labels: jax.Array,
    beta: float,
    gamma: float,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Return the pointwise COALA loss ``mean log(1 + exp(-beta y r + gamma))``, a scalar.

    Args:
      theta2: (m,) output-layer weights.
      hidden: (n, m) hidden activations of single texts.
      labels: (n,) +1 for chosen texts, -1 for rejected texts.
      beta, gamma: as in ``pairwise_loss``.
      weights: (n,) optional per-text weights.
    """
    scores = hidden @ theta2
    per_text = jax.nn.softplus(-beta * labels * scores + gamma)
    return _weighted_mean(per_text, weights)


def pair_loss(
    theta2: jax.Array,
    hidden_chosen: jax.Array,
    hidden_rejected: jax.Array,
    loss: str,
    beta: float,
    gamma: float,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Return the selected loss (``pairwise`` or ``pointwise``) over aligned pairs, a scalar.

    The pointwise loss of a pair set is the mean over its 2n texts: each
    chosen text with label +1 and each rejected text with label -1.
    """
    if loss == "pairwise":
        return pairwise_loss(theta2, hidden_chosen, hidden_rejected, beta, gamma, weights)
    if loss == "pointwise":
        n = hidden_chosen.shape[0]
        hidden = jnp.concatenate([hidden_chosen, hidden_rejected], axis=0)
        labels = jnp.concatenate([jnp.ones(n), -jnp.ones(n)])
        text_weights = None if weights is None else jnp.concatenate([weights, weights])
        return pointwise_loss(theta2, hidden, labels, beta, gamma, text_weights)
    raise FinetuneError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(values)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def pair_metrics(
    theta2: jax.Array, hidden_chosen: jax.Array, hidden_rejected: jax.Array, loss: str, beta: float, gamma: float
) -> dict[str, jax.Array]:
    """Return loss, mean margin ``r_w - r_l``, accuracy ``P(r_w > r_l)`` and mean ``sigmoid(r_w - r_l)``.

    ``hidden_chosen`` and ``hidden_rejected`` are (n, m); every value is a scalar.
    """
    margin = (hidden_chosen - hidden_rejected) @ theta2
    return {
        "loss": pair_loss(theta2, hidden_chosen, hidden_rejected, loss, beta, gamma),
        "margin": jnp.mean(margin),
        "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "sigmoid_margin": jnp.mean(jax.nn.sigmoid(margin)),
    }


# ----------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class FinetuneSettings:
    """Settings of one fine-tuning run.

    Attributes:
      loss: ``pairwise`` or ``pointwise``.
      beta: reward-margin scale (the authors' release uses 2.5).
      gamma: margin offset (0.5 in the authors' release).
      learning_rate: AdamW step size (1e-4 in the authors' release).
      weight_decay: AdamW decoupled weight decay.
      epochs: passes over the train pairs (500 in the authors' release).
      batch_size: pairs per AdamW step (128 in the authors' release).
      seed: seed of the per-epoch shuffles.
    """

    loss: str = "pairwise"
    beta: float = 2.5
    gamma: float = 0.5
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 500
    batch_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        """Raise ``FinetuneError`` naming the first invalid setting."""
        if self.loss not in LOSSES:
            raise FinetuneError(f"--loss {self.loss!r} is invalid; choose one of {LOSSES}.")
        if not np.isfinite(self.beta) or self.beta <= 0:
            raise FinetuneError(f"--beta must be a positive number, got {self.beta}.")
        if not np.isfinite(self.gamma):
            raise FinetuneError(f"--gamma must be a finite number, got {self.gamma}.")
        if not np.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise FinetuneError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if not np.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise FinetuneError(f"--weight_decay must be >= 0, got {self.weight_decay}.")
        if self.epochs < 1:
            raise FinetuneError(f"--epochs must be >= 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise FinetuneError(f"--batch_size must be >= 1, got {self.batch_size}.")


class FinetuneResult(NamedTuple):
    """Output of ``train_theta2``.

    Attributes:
      theta2: (m,) weights of the best-validation epoch.
      final_theta2: (m,) weights after the last epoch.
      best_epoch: the kept epoch (0 = the initial weights, 1..epochs after training).
      history: per-epoch metrics, ``history["train"]["margin"]`` etc., each a
        list of ``epochs + 1`` floats (entry 0 is before training).
      selected_by: ``"validation"`` or ``"train"`` (no validation pairs).
      steps: AdamW steps taken.
    """

    theta2: np.ndarray
    final_theta2: np.ndarray
    best_epoch: int
    history: dict[str, dict[str, list[float]]]
    selected_by: str
    steps: int


def train_theta2(
    theta2_init: np.ndarray,
    train_chosen: np.ndarray,
    train_rejected: np.ndarray,
    settings: FinetuneSettings,
    val_chosen: np.ndarray | None = None,
    val_rejected: np.ndarray | None = None,
) -> FinetuneResult:
    """Fine-tune theta2 with AdamW on hidden activations; keep the best-validation-loss epoch.

    Args:
      theta2_init: (m,) starting output-layer weights (Stage 2's theta2).
      train_chosen, train_rejected: (n, m) hidden activations of aligned train pairs.
      settings: loss, AdamW and schedule settings.
      val_chosen, val_rejected: (n_val, m) hidden activations of validation
        pairs; without them the epoch with the lowest train loss is kept.

    Returns:
      A ``FinetuneResult``. The whole run is one jitted ``lax.scan`` over
      epochs, so its cost after compilation is a few matrix-vector products per batch.
    """
    settings.validate()
    theta2_init = np.asarray(theta2_init, dtype=np.float32)
    train_chosen, train_rejected = _check_pairs(train_chosen, train_rejected, theta2_init.shape, "train")
    has_validation = val_chosen is not None and val_rejected is not None and len(val_chosen) > 0
    if has_validation:
        val_chosen, val_rejected = _check_pairs(val_chosen, val_rejected, theta2_init.shape, "validation")
    else:
        logger.warning("No validation pairs: the kept epoch is chosen by the train loss instead.")
        val_chosen, val_rejected = train_chosen, train_rejected

    n = train_chosen.shape[0]
    batch_size = min(settings.batch_size, n)
    num_batches = -(-n // batch_size)
    run = _build_run(
        settings.learning_rate, settings.weight_decay, settings.loss, settings.beta, settings.gamma,
        settings.epochs, batch_size, num_batches,
    )
    theta2_best, theta2_final, best_epoch, train_history, val_history = run(
        jnp.asarray(theta2_init),
        jnp.asarray(train_chosen),
        jnp.asarray(train_rejected),
        jnp.asarray(val_chosen),
        jnp.asarray(val_rejected),
        jax.random.PRNGKey(settings.seed),
    )

    history = {"train": _to_lists(train_history)}
    if has_validation:
        history["validation"] = _to_lists(val_history)
    return FinetuneResult(
        theta2=np.asarray(theta2_best, dtype=np.float32),
        final_theta2=np.asarray(theta2_final, dtype=np.float32),
        best_epoch=int(best_epoch),
        history=history,
        selected_by="validation" if has_validation else "train",
        steps=settings.epochs * num_batches,
    )


def _check_pairs(chosen: np.ndarray, rejected: np.ndarray, theta_shape: tuple[int, ...], name: str) -> tuple[np.ndarray, np.ndarray]:
    chosen = np.asarray(chosen, dtype=np.float32)
    rejected = np.asarray(rejected, dtype=np.float32)
    if len(theta_shape) != 1:
        raise FinetuneError(f"theta2 must be 1-D (m,), got shape {theta_shape}.")
    m = theta_shape[0]
    for label, array in (("chosen", chosen), ("rejected", rejected)):
        if array.ndim != 2 or array.shape[1] != m:
            raise FinetuneError(f"{name} {label} activations have shape {array.shape}; expected (n, {m}) to match theta2.")
        if not np.all(np.isfinite(array)):
            raise FinetuneError(f"{name} {label} activations contain NaN or infinite values.")
    if chosen.shape[0] != rejected.shape[0]:
        raise FinetuneError(f"{name} pairs are misaligned: {chosen.shape[0]} chosen rows but {rejected.shape[0]} rejected rows.")
    if chosen.shape[0] == 0:
        raise FinetuneError(f"There are no {name} pairs to fine-tune on.")
    return chosen, rejected


def _to_lists(history: dict[str, jax.Array]) -> dict[str, list[float]]:
    return {name: [float(value) for value in np.asarray(values)] for name, values in history.items()}


@lru_cache(maxsize=16)
def _build_run(
    learning_rate: float,
    weight_decay: float,
    loss: str,
    beta: float,
    gamma: float,
    epochs: int,
    batch_size: int,
    num_batches: int,
):
    """Return a jitted function running every epoch; static settings are closed over.

    Cached, so repeated runs with the same settings (other seeds or data of the
    same shapes) reuse one compiled program.
    """
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    loss_and_grad = jax.value_and_grad(partial(pair_loss, loss=loss, beta=beta, gamma=gamma))

    def metrics(theta2, chosen, rejected):
        return pair_metrics(theta2, chosen, rejected, loss, beta, gamma)

    def run(theta2, train_chosen, train_rejected, val_chosen, val_rejected, key):
        n = train_chosen.shape[0]
        padded = num_batches * batch_size
        # Padding rows repeat pair 0 with weight 0, so every batch has the same shape.
        row_weights = (jnp.arange(padded) < n).astype(jnp.float32)

        def batch_step(carry, batch):
            params, opt_state = carry
            indices, weights = batch
            _, grads = loss_and_grad(params, train_chosen[indices], train_rejected[indices], weights=weights)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        def epoch_step(carry, epoch_key):
            params, opt_state, best_params, best_loss, best_epoch, epoch = carry
            order = jax.random.permutation(epoch_key, n)
            indices = jnp.concatenate([order, jnp.zeros(padded - n, dtype=order.dtype)]).reshape(num_batches, batch_size)
            (params, opt_state), _ = jax.lax.scan(
                batch_step, (params, opt_state), (indices, row_weights.reshape(num_batches, batch_size))
            )
            train = metrics(params, train_chosen, train_rejected)
            val = metrics(params, val_chosen, val_rejected)
            improved = val["loss"] < best_loss
            best_params = jnp.where(improved, params, best_params)
            best_loss = jnp.where(improved, val["loss"], best_loss)
            best_epoch = jnp.where(improved, epoch, best_epoch)
            return (params, opt_state, best_params, best_loss, best_epoch, epoch + 1), (train, val)

        initial_train = metrics(theta2, train_chosen, train_rejected)
        initial_val = metrics(theta2, val_chosen, val_rejected)
        carry = (theta2, optimizer.init(theta2), theta2, initial_val["loss"], jnp.asarray(0), jnp.asarray(1))
        carry, (train_history, val_history) = jax.lax.scan(epoch_step, carry, jax.random.split(key, epochs))
        params, _, best_params, _, best_epoch, _ = carry
        train_history = {name: jnp.concatenate([initial_train[name][None], train_history[name]]) for name in METRIC_NAMES}
        val_history = {name: jnp.concatenate([initial_val[name][None], val_history[name]]) for name in METRIC_NAMES}
        return best_params, params, best_epoch, train_history, val_history

    return jax.jit(run)


# ----------------------------------------------------------------------------
# Pairs and summaries


def shuffle_pair_unpaired(
    positives: np.ndarray, negatives: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair unpaired positive (n_pos, d) and negative (n_neg, d) rows by a seeded shuffle.

    Returns (chosen, rejected), each (min(n_pos, n_neg), d). Both sides are
    shuffled by one ``numpy.random.default_rng(seed)`` and the surplus of the
    larger side is dropped.
    """
    rng = np.random.default_rng(seed)
    count = min(len(positives), len(negatives))
    chosen = positives[rng.permutation(len(positives))[:count]]
    rejected = negatives[rng.permutation(len(negatives))[:count]]
    return chosen, rejected


def subsample_pairs(
    chosen: np.ndarray, rejected: np.ndarray, max_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_pairs`` aligned pairs (n, d), chosen by a seeded draw; 0 keeps all."""
    if max_pairs <= 0 or len(chosen) <= max_pairs:
        return chosen, rejected
    keep = np.sort(np.random.default_rng(seed).choice(len(chosen), size=max_pairs, replace=False))
    return chosen[keep], rejected[keep]


def vector_stats(vector: np.ndarray) -> dict[str, float]:
    """Return mean, std, min, max, l2 norm and nonzero count of a 1-D array."""
    vector = np.asarray(vector, dtype=np.float64)
    return {
        "mean": float(vector.mean()),
        "std": float(vector.std()),
        "min": float(vector.min()),
        "max": float(vector.max()),
        "l2_norm": float(np.linalg.norm(vector)),
        "nonzero": int(np.count_nonzero(vector)),
    }


def rose_monotonically(values: list[float], tolerance: float = 0.0) -> bool:
    """Return whether each value is at least the previous one minus ``tolerance`` and the last exceeds the first.

    A flat series (for example the margins of an all-zero head) is not a rise.
    """
    if len(values) < 2 or values[-1] <= values[0]:
        return False
    return all(later >= earlier - tolerance for earlier, later in zip(values, values[1:]))


def summarize_history(result: FinetuneResult) -> dict[str, Any]:
    """Return the kept epoch's metrics per split and whether the train margin rose monotonically."""
    summary: dict[str, Any] = {"best_epoch": result.best_epoch, "selected_by": result.selected_by}
    for split, history in result.history.items():
        summary[split] = {name: values[result.best_epoch] for name, values in history.items()}
        summary[f"{split}_initial"] = {name: values[0] for name, values in history.items()}
    summary["train_margin_monotonic"] = rose_monotonically(result.history["train"]["margin"])
    return summary


def plot_reward_margins(history: dict[str, dict[str, list[float]]], path: Any, best_epoch: int | None = None) -> None:
    """Write a PNG with the mean reward margin and mean sigmoid margin per epoch (train and validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coala.io import atomic_write

    figure, (margin_axis, sigmoid_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split, values in history.items():
        epochs = np.arange(len(values["margin"]))
        margin_axis.plot(epochs, values["margin"], label=split)
        sigmoid_axis.plot(epochs, values["sigmoid_margin"], label=split)
    margin_axis.set_title("mean reward margin r_w - r_l")
    sigmoid_axis.set_title("mean sigmoid(r_w - r_l)")
    for axis in (margin_axis, sigmoid_axis):
        axis.set_xlabel("epoch")
        if best_epoch is not None:
            axis.axvline(best_epoch, color="gray", linestyle=":", label=f"kept epoch {best_epoch}")
        axis.legend()
    figure.tight_layout()

    def write(tmp: Any) -> None:
        figure.savefig(tmp, format="png", dpi=100)

    try:
        atomic_write(path, write)
    finally:
        plt.close(figure)
