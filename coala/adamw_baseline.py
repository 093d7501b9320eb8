"""The non-convex baseline: the same two-layer ReLU network trained with optax AdamW.

The network is ``relu(X @ theta1) @ theta2`` with ``theta1`` (d, 2P) and
``theta2`` (2P,), no biases, exactly the architecture CRONOS recovers. It is
trained on the squared loss ``1/2 mean((f(x) - y)^2)`` with labels in {-1, +1}
and decoupled weight decay, over a log-spaced learning-rate grid and several
seeds. The learning rate is chosen by mean validation text accuracy over seeds;
the test split is only reported.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coala.cronos import EvalSplit, accuracies

logger = logging.getLogger(__name__)

Array = jax.Array


@dataclass
class AdamWSettings:
    """Settings of the AdamW learning-rate search.

    Attributes:
      hidden: number of hidden ReLU units (2P to match CRONOS).
      learning_rates: the grid searched.
      seeds: number of seeds per learning rate.
      epochs: passes over the training data.
      batch_size: samples per step.
      weight_decay: AdamW decoupled weight decay.
    """

    hidden: int = 20
    learning_rates: tuple[float, ...] = tuple(np.logspace(-6, -2.5, 8).tolist())
    seeds: int = 3
    epochs: int = 30
    batch_size: int = 1024
    weight_decay: float = 1e-4

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.hidden < 1:
            raise ValueError(f"hidden={self.hidden} is invalid; it must be >= 1.")
        if not self.learning_rates or not all(lr > 0 and math.isfinite(lr) for lr in self.learning_rates):
            raise ValueError(f"learning_rates={self.learning_rates} is invalid; give finite values > 0.")
        for name in ("seeds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; it must be >= 1.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} is invalid; it must be >= 0.")


def learning_rate_grid(low: float = 1e-6, high: float = 10**-2.5, count: int = 8) -> tuple[float, ...]:
    """Return ``count`` log-spaced learning rates from ``low`` to ``high`` inclusive."""
    if not 0 < low <= high or count < 1:
        raise ValueError(f"Learning-rate grid needs 0 < low <= high and count >= 1, got {low}, {high}, {count}.")
    return tuple(np.logspace(math.log10(low), math.log10(high), count).tolist())


def init_params(key: Array, d: int, hidden: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Return He-initialized ``theta1`` (d, hidden) and ``theta2`` (hidden,)."""
    key1, key2 = jax.random.split(key)
    return {
        "theta1": jax.random.normal(key1, (d, hidden), dtype) * math.sqrt(2.0 / d),
        "theta2": jax.random.normal(key2, (hidden,), dtype) * math.sqrt(1.0 / hidden),
    }


def network(params: dict[str, Array], X: Array) -> Array:
    """Return ``relu(X @ theta1) @ theta2`` (m,)."""
    return jax.nn.relu(X @ params["theta1"]) @ params["theta2"]


def _weighted_loss(params: dict[str, Array], X: Array, y: Array, weights: Array) -> Array:
    residual = network(params, X) - y
    return 0.5 * jnp.sum(weights * residual * residual) / jnp.maximum(jnp.sum(weights), 1.0)


def train_one(
    X: Array, y: Array, key: Array, learning_rate: Array, hidden: int, epochs: int, batch_size: int, weight_decay: float
) -> tuple[dict[str, Array], Array]:
    """Train one network with AdamW and return its parameters and final full-batch training loss.

    Every epoch visits a fresh permutation of the n rows in ``ceil(n / batch_size)``
    steps. The last batch is padded with zero-weight rows, so every row counts once.
    """
    n, d = X.shape
    steps = -(-n // batch_size)
    padded = steps * batch_size
    init_key, shuffle_key = jax.random.split(key)
    params = init_params(init_key, d, hidden, X.dtype)
    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate, weight_decay=weight_decay)
    opt_state = optimizer.init(params)
    row_weights = jnp.concatenate([jnp.ones(n, X.dtype), jnp.zeros(padded - n, X.dtype)])

    def step(carry: tuple, batch: tuple) -> tuple:
        params, opt_state = carry
        rows, weights = batch
        grads = jax.grad(_weighted_loss)(params, X[rows], y[rows], weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry: tuple, epoch_key: Array) -> tuple:
        order = jnp.concatenate([jax.random.permutation(epoch_key, n), jnp.zeros(padded - n, jnp.int32)])
        weights = row_weights  # padding rows sit at the end after the permutation
        batches = (order.reshape(steps, batch_size), weights.reshape(steps, batch_size))
        carry, _ = jax.lax.scan(step, carry, batches)
        return carry, None

    (params, _), _ = jax.lax.scan(epoch, (params, opt_state), jax.random.split(shuffle_key, epochs))
    return params, _weighted_loss(params, X, y, jnp.ones(n, X.dtype))


train_one_jit = jax.jit(train_one, static_argnames=("hidden", "epochs", "batch_size", "weight_decay"))


def adamw_search(
    train: EvalSplit, validation: EvalSplit | None, test: EvalSplit | None, settings: AdamWSettings
) -> dict[str, Any]:
    """Run the AdamW grid search; return every run, the chosen learning rate and the wall time.

    The returned ``selected`` block holds the accuracies, averaged over seeds, at the
    learning rate with the best mean validation text accuracy. Without a validation
    split the training accuracy decides. ``best_test_accuracy`` is the best single
    run's test accuracy over the whole grid, an upper bound for any validation-based choice.
    """
    settings.validate()
    X = jnp.asarray(train.X, jnp.float32)
    y = jnp.asarray(train.y, jnp.float32)
    device_splits = {name: (jnp.asarray(split.X, jnp.float32), split) for name, split in
                     (("train", train), ("validation", validation), ("test", test)) if split is not None}
    start = time.perf_counter()
    runs = []
    for learning_rate in settings.learning_rates:
        for seed in range(settings.seeds):
            params, loss = train_one_jit(
                X, y, jax.random.PRNGKey(seed), jnp.asarray(learning_rate, jnp.float32),
                settings.hidden, settings.epochs, settings.batch_size, settings.weight_decay,
            )
            run: dict[str, Any] = {"learning_rate": learning_rate, "seed": seed, "train_loss": float(loss)}
            for name, (X_device, split) in device_splits.items():
                text, pairwise = accuracies(np.asarray(network(params, X_device)), split)
                run[f"{name}_accuracy"] = text
                run[f"{name}_pairwise_accuracy"] = pairwise
            runs.append(run)
            logger.debug("AdamW lr=%.2e seed=%d: %s", learning_rate, seed, run)
    seconds = time.perf_counter() - start

    criterion = "validation_accuracy" if validation is not None else "train_accuracy"
    by_rate = {}
    for learning_rate in settings.learning_rates:
        rate_runs = [run for run in runs if run["learning_rate"] == learning_rate]
        by_rate[learning_rate] = {
            key: _mean([run[key] for run in rate_runs])
            for key in rate_runs[0]
            if key not in ("learning_rate", "seed")
        }
    chosen_rate = max(settings.learning_rates, key=lambda rate: by_rate[rate][criterion])
    best_test = max((run["test_accuracy"] for run in runs), default=None) if test is not None else None
    logger.info("AdamW search: %d runs in %.1fs; chosen learning rate %.2e.", len(runs), seconds, chosen_rate)
    return {
        "runs": runs,
        "selected": {"learning_rate": chosen_rate, "criterion": criterion, **by_rate[chosen_rate]},
        "best_test_accuracy": best_test,
        "seconds": seconds,
        "settings": {
            "hidden": settings.hidden,
            "learning_rates": list(settings.learning_rates),
            "seeds": settings.seeds,
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "weight_decay": settings.weight_decay,
        },
    }


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None
