"""Pooling of last-layer hidden states into one vector per text, in one shot and incrementally.

Three methods turn the hidden states ``h_t`` (t over the pooled tokens) into one vector:

- ``mean``: the average of ``h_t``.
- ``last``: ``h_t`` at the last pooled token.
- ``attn``: ``sum_t a_t h_t`` with ``a = softmax_t(h_t . w / sqrt(H))``, where ``w`` is
  a fixed unit-norm scorer vector drawn from a seeded generator (``make_attn_scorer``)
  and ``H`` the hidden size. The same scorer is saved next to the features, so
  inference pools exactly as Stage 1 did.

Which tokens are pooled is given by a boolean mask built from sequence lengths,
never from token ids, so padding contributes nothing even when the padding
token equals EOS, and the padding side does not matter.

``pool_hidden`` pools whole padded batches (Stage 1). ``PoolState`` with
``init``/``update``/``value``/``peek`` pools token by token for guided decoding:
``attn`` keeps a running max score, a running softmax normalizer and a running
weighted sum (online softmax), so adding tokens never revisits old ones.
All arithmetic runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

POOL_METHODS = ("attn", "mean", "last")


class PoolingError(ValueError):
    """Invalid pooling arguments: unknown method, bad shapes, or a text with no pooled token."""


def make_attn_scorer(hidden_size: int, seed: int) -> np.ndarray:
    """Draw the attention-pooling scorer ``w``: a unit-norm Gaussian vector (H,) float32 from ``seed``."""
    if hidden_size <= 0:
        raise PoolingError(f"hidden_size must be positive, got {hidden_size}.")
    generator = np.random.default_rng(seed)
    scorer = generator.standard_normal(hidden_size)
    scorer /= np.linalg.norm(scorer)
    return scorer.astype(np.float32)


def _check_method(method: str, scorer: np.ndarray | torch.Tensor | None, hidden_size: int) -> None:
    if method not in POOL_METHODS:
        raise PoolingError(f"Unknown pooling method {method!r}; choose one of {POOL_METHODS}.")
    if method == "attn":
        if scorer is None:
            raise PoolingError("Pooling method 'attn' needs a scorer vector; create one with make_attn_scorer(hidden_size, seed).")
        if tuple(scorer.shape) != (hidden_size,):
            raise PoolingError(f"The attn scorer has shape {tuple(scorer.shape)} but the hidden size is {hidden_size}.")


def _as_scorer(scorer: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(scorer, dtype=torch.float32, device=device)


def attn_scores(hidden: torch.Tensor, scorer: torch.Tensor) -> torch.Tensor:
    """Return the attention-pooling logits ``hidden . w / sqrt(H)``: (..., H) -> (...,) in float32."""
    hidden_size = hidden.shape[-1]
    return (hidden.float() @ scorer) / math.sqrt(hidden_size)


def pool_hidden(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    method: str,
    scorer: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool a padded batch of hidden states into one float32 vector per row.

    Args:
      hidden: (B, T, H) hidden states, any floating dtype, any padding side.
      mask: (B, T) bool, True at the tokens to pool. Build it from lengths (and the
        response start for response-span pooling), never from token ids.
      method: "attn", "mean" or "last" ("last" takes the last True position of each row).
      scorer: (H,) attention scorer, required for "attn".

    Returns:
      (B, H) float32. Positions where ``mask`` is False get exactly zero weight.

    Raises:
      PoolingError: unknown method, mismatched shapes, or a row whose mask is all False.
    """
    if hidden.ndim != 3:
        raise PoolingError(f"hidden must have shape (B, T, H), got {tuple(hidden.shape)}.")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise PoolingError(f"mask shape {tuple(mask.shape)} does not match hidden's (B, T) = {tuple(hidden.shape[:2])}.")
    _check_method(method, scorer, hidden.shape[2])
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise PoolingError(f"Rows {empty} have no token to pool (all-False mask).")
    values = hidden.float()

    if method == "mean":
        summed = (values * mask.unsqueeze(-1)).sum(dim=1)
        return summed / counts.unsqueeze(-1).float()

    if method == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last_index = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
        return values[torch.arange(values.shape[0], device=values.device), last_index]

    # attn: masked softmax over tokens. exp(-inf) is exactly 0, so masked positions get zero weight.
    scores = attn_scores(values, _as_scorer(scorer, values.device))
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return (weights.unsqueeze(-1) * values).sum(dim=1)


@dataclass(frozen=True)
class PoolState:
    """Running pooling statistics of B sequences, updated token by token.

    Attributes:
      method: "attn", "mean" or "last".
      count: (B,) float32 number of tokens pooled so far.
      total: (B, H) float32 running sum: plain sum (mean), softmax-weighted sum
        scaled by ``exp(-running_max)`` (attn), or the last hidden state (last).
      normalizer: (B,) float32 running ``sum_t exp(score_t - running_max)`` (attn only; zeros otherwise).
      running_max: (B,) float32 max score so far, -inf before the first token (attn only).
      scorer: (H,) float32 attention scorer, or None.
    """

    method: str
    count: torch.Tensor
    total: torch.Tensor
    normalizer: torch.Tensor
    running_max: torch.Tensor
    scorer: torch.Tensor | None

    @staticmethod
    def init(
        method: str,
        batch: int,
        hidden_size: int,
        scorer: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> PoolState:
        """Return the empty state for ``batch`` sequences of width ``hidden_size``."""
        _check_method(method, scorer, hidden_size)
        device = torch.device(device)
        return PoolState(
            method=method,
            count=torch.zeros(batch, dtype=torch.float32, device=device),
            total=torch.zeros(batch, hidden_size, dtype=torch.float32, device=device),
            normalizer=torch.zeros(batch, dtype=torch.float32, device=device),
            running_max=torch.full((batch,), float("-inf"), dtype=torch.float32, device=device),
            scorer=_as_scorer(scorer, device) if scorer is not None else None,
        )

    @staticmethod
    def update(state: PoolState, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> PoolState:
        """Return a new state with k more tokens per sequence pooled; ``state`` is left unchanged.

        Args:
          state: the state before these tokens.
          hidden: (B, k) tokens' hidden states as (B, k, H).
          mask: (B, k) bool, True at tokens to pool (default: all True).
        """
        batch, hidden_size = state.total.shape
        if hidden.ndim != 3 or hidden.shape[0] != batch or hidden.shape[2] != hidden_size:
            raise PoolingError(f"hidden must have shape ({batch}, k, {hidden_size}), got {tuple(hidden.shape)}.")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise PoolingError(f"mask shape {tuple(mask.shape)} does not match hidden's (B, k) = {tuple(hidden.shape[:2])}.")
        mask = mask.to(device=state.total.device, dtype=torch.bool)
        values = hidden.to(device=state.total.device, dtype=torch.float32)
        count = state.count + mask.sum(dim=1).float()

        if state.method == "mean":
            total = state.total + (values * mask.unsqueeze(-1)).sum(dim=1)
            return replace(state, count=count, total=total)

        if state.method == "last":
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last_index = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
            picked = values[torch.arange(batch, device=values.device), last_index.clamp(min=0)]
            total = torch.where((last_index >= 0).unsqueeze(-1), picked, state.total)
            return replace(state, count=count, total=total)

        # attn: online softmax. Rescale the old sums to the new running max, then add the new terms.
        scores = attn_scores(values, state.scorer).masked_fill(~mask, float("-inf"))
        new_max = torch.maximum(state.running_max, scores.max(dim=1).values)
        old_scale = _safe_exp_difference(state.running_max, new_max)
        weights = _safe_exp_difference(scores, new_max.unsqueeze(1))
        total = state.total * old_scale.unsqueeze(-1) + (weights.unsqueeze(-1) * values).sum(dim=1)
        normalizer = state.normalizer * old_scale + weights.sum(dim=1)
        return replace(state, count=count, total=total, normalizer=normalizer, running_max=new_max)

    @staticmethod
    def value(state: PoolState) -> torch.Tensor:
        """Return the pooled vectors (B, H) float32; raise if a sequence has no pooled token yet."""
        if bool((state.count == 0).any()):
            empty = torch.nonzero(state.count == 0).flatten().tolist()
            raise PoolingError(f"Sequences {empty} have no pooled token yet; call PoolState.update first.")
        if state.method == "mean":
            return state.total / state.count.unsqueeze(-1)
        if state.method == "last":
            return state.total
        return state.total / state.normalizer.unsqueeze(-1)

    @staticmethod
    def peek(state: PoolState, hidden: torch.Tensor) -> torch.Tensor:
        """Return the pooled vectors if each of C candidate tokens were appended, without committing them.

        Args:
          state: the state of the committed prefix.
          hidden: (B, C, H) hidden states of C alternative next tokens per sequence.

        Returns:
          (B, C, H) float32: entry [b, c] equals ``value(update(state, hidden[b, c]))``.
        """
        batch, hidden_size = state.total.shape
        if hidden.ndim != 3 or hidden.shape[0] != batch or hidden.shape[2] != hidden_size:
            raise PoolingError(f"hidden must have shape ({batch}, C, {hidden_size}), got {tuple(hidden.shape)}.")
        values = hidden.to(device=state.total.device, dtype=torch.float32)
        if state.method == "mean":
            return (state.total.unsqueeze(1) + values) / (state.count + 1).view(batch, 1, 1)
        if state.method == "last":
            return values
        scores = attn_scores(values, state.scorer)
        new_max = torch.maximum(state.running_max.unsqueeze(1), scores)
        old_scale = _safe_exp_difference(state.running_max.unsqueeze(1), new_max)
        weight = torch.exp(scores - new_max)
        total = state.total.unsqueeze(1) * old_scale.unsqueeze(-1) + weight.unsqueeze(-1) * values
        normalizer = state.normalizer.unsqueeze(1) * old_scale + weight
        return total / normalizer.unsqueeze(-1)


def _safe_exp_difference(scores: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
    """Return ``exp(scores - maximum)`` with 0 where ``scores`` is -inf (also when ``maximum`` is -inf)."""
    finite = torch.isfinite(scores)
    difference = torch.where(finite, scores - maximum, torch.zeros_like(scores))
    return torch.where(finite, torch.exp(difference), torch.zeros_like(scores))
