"""Scoring texts with a preference head and head-guided sampling from the frozen LM.

``PreferenceHead`` loads a Stage 2 or Stage 3 head folder next to its backbone
and scores (prompt, response) texts exactly as Stage 1 pooled them: the same
encoding (``coala.extraction.encode_example``), the same last-layer hidden
states, the same pooling (``coala.pooling``). The head itself is two small
matrices applied in torch:

    r = theta2 . relu(theta1^T ((pooled - feature_mean) / feature_std))

``generate`` samples with top-k then top-p (nucleus) filtering. With a head
and a nonzero guidance scale lambda, the head acts every ``guide_every``
tokens. The ``num_candidates`` most likely tokens of the nucleus pool are
appended to the prefix in one batched forward pass, one token per candidate,
on a shallow copy of the KV cache (see ``candidate_scores``). Their pooled
features come from ``PoolState.peek``, and their head scores are min-max
normalized over the candidates (all equal gives zeros) and added as
``lambda * score`` to those candidates' logits. One token is then sampled
from the reweighted pool. Both paths draw one
uniform number per row and step from the same per-row generator, so
lambda = 0 (or no head) reproduces plain sampling token for token.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from coala.extraction import encode_example, encode_prompt, last_hidden_states, pad_batch, pad_token_id, span_mask
from coala.head import HeadError, HeadParams, load_head
from coala.io import PathLike
from coala.pooling import POOL_METHODS, PoolState, pool_hidden

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]


class GuidanceError(ValueError):
    """Invalid generation arguments: empty prompts, bad sampling settings, mismatched lists."""


# ----------------------------------------------------------------------------
# The head next to the model


def _model_hidden_size(model: Any) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


class PreferenceHead:
    """A preference head bound to its backbone and tokenizer.

    Attributes:
      params: the loaded head (numpy arrays and config).
      pool: pooling method of Stage 1 ("attn", "mean" or "last").
      pool_span: "all" (prompt + response tokens) or "response" (response tokens only).
      max_length: Stage 1's token limit per text.
    """

    def __init__(self, params: HeadParams, model: Any, tokenizer: Any, head_dir: PathLike | None = None) -> None:
        where = head_dir or "head"
        pooling = params.config.get("pooling")
        if not isinstance(pooling, dict):
            raise HeadError(f"{where}: config.json has no 'pooling' block; it was not written by cronos_trainer.py or finetune_coala.py.")
        pool = pooling.get("pool")
        if pool not in POOL_METHODS:
            raise HeadError(f"{where}: pooling method {pool!r} cannot score texts; expected one of {POOL_METHODS}.")
        model_hidden = _model_hidden_size(model)
        recorded_hidden = pooling.get("hidden_size")
        if recorded_hidden is not None and int(recorded_hidden) != model_hidden:
            raise HeadError(
                f"{where} was trained on a backbone with hidden size {recorded_hidden} "
                f"({pooling.get('model_name')}), but the given model has hidden size {model_hidden}. "
                "Load the backbone the head was trained on."
            )
        if params.input_dim != model_hidden:
            raise HeadError(f"{where}: theta1 expects {params.input_dim}-dimensional features but the model's hidden size is {model_hidden}.")
        if pool == "attn" and params.attn_scorer is None:
            raise HeadError(f"{where}: pooling is 'attn' but head.safetensors has no attn_scorer tensor.")
        if pooling.get("chat_template") and getattr(tokenizer, "chat_template", None) is None:
            raise HeadError(f"{where}: the features were encoded with a chat template but the given tokenizer has none.")
        model_name = pooling.get("model_name")
        loaded_name = Path(str(getattr(model.config, "_name_or_path", "") or "")).name
        if model_name and loaded_name and model_name not in loaded_name and loaded_name not in model_name:
            logger.warning("Head %s was trained on %s; scoring with %s (hidden sizes match).", where, model_name, loaded_name)

        self.params = params
        self.model = model
        self.tokenizer = tokenizer
        self.pool: str = pool
        self.pool_span: str = pooling.get("pool_span", "all") or "all"
        self.max_length: int = int(pooling.get("max_length") or 512)
        device = next(model.parameters()).device
        self.device = device
        self.theta1 = torch.as_tensor(params.theta1, dtype=torch.float32, device=device)
        self.theta2 = torch.as_tensor(params.theta2, dtype=torch.float32, device=device)
        self.feature_mean = torch.as_tensor(params.feature_mean, dtype=torch.float32, device=device)
        self.feature_std = torch.as_tensor(params.feature_std, dtype=torch.float32, device=device)
        self.scorer = None if params.attn_scorer is None else torch.as_tensor(params.attn_scorer, dtype=torch.float32, device=device)

    @classmethod
    def from_dir(cls, head_dir: PathLike, model: Any, tokenizer: Any) -> "PreferenceHead":
        """Load a head folder and check it against ``model``; raise ``HeadError`` naming the problem."""
        return cls(load_head(head_dir), model, tokenizer, head_dir=head_dir)

    def score_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Return scores (n,) float32 for pooled last-layer features (n, H)."""
        standardized = (pooled.float() - self.feature_mean) / self.feature_std
        return torch.relu(standardized @ self.theta1) @ self.theta2

    def new_pool_state(self, batch: int) -> PoolState:
        """Return an empty incremental pooling state for ``batch`` sequences."""
        return PoolState.init(self.pool, batch, self.theta1.shape[0], self.scorer, device=self.device)

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        prompt_messages: Sequence[Messages | None] | None = None,
        batch_size: int = 8,
    ) -> np.ndarray:
        """Score (prompt, response) texts as Stage 1 encoded and pooled them.

        Args:
          prompts: n prompt texts.
          responses: n response texts.
          prompt_messages: optional n chat-message lists used instead of the prompt text.
          batch_size: texts per forward pass.

        Returns:
          (n,) float32 preference scores.
        """
        if len(prompts) != len(responses):
            raise GuidanceError(f"score() got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt.")
        if prompt_messages is not None and len(prompt_messages) != len(prompts):
            raise GuidanceError(f"prompt_messages has {len(prompt_messages)} entries for {len(prompts)} prompts.")
        if batch_size < 1:
            raise GuidanceError(f"batch_size must be >= 1, got {batch_size}.")
        scores: list[np.ndarray] = []
        for start in range(0, len(prompts), batch_size):
            encoded = [
                encode_example(
                    self.tokenizer, prompts[i], responses[i], self.max_length,
                    prompt_messages=None if prompt_messages is None else prompt_messages[i],
                )
                for i in range(start, min(start + batch_size, len(prompts)))
            ]
            scores.append(self._score_encoded(encoded).cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def _score_encoded(self, encoded: list[Any]) -> torch.Tensor:
        input_ids, attention, lengths, starts = pad_batch(encoded, pad_token_id(self.tokenizer), self.device)
        hidden = last_hidden_states(self.model, input_ids, attention)
        mask = span_mask(lengths, starts, input_ids.shape[1], self.pool_span)
        return self.score_pooled(pool_hidden(hidden, mask, self.pool, self.scorer))


# ----------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class GuidanceConfig:
    """Sampling and guidance settings.

    Attributes:
      guidance_scale: lambda, the weight of the min-max normalized head score
        added to the candidates' logits (0 = plain sampling).
      guide_every: apply the head every N generated tokens (at tokens 0, N, 2N, ...).
      num_candidates: C, the most likely tokens of the nucleus pool that are scored.
      top_k: size of the top-k filter (0 = off).
      top_p: nucleus mass kept after top-k (1.0 = off).
      temperature: logits are divided by it before filtering (> 0).
    """

    guidance_scale: float = 1.0
    guide_every: int = 5
    num_candidates: int = 5
    top_k: int = 50
    top_p: float = 0.9
    temperature: float = 1.0

    def validate(self) -> None:
        """Raise ``GuidanceError`` naming the first invalid setting."""
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise GuidanceError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}.")
        if self.guide_every < 1:
            raise GuidanceError(f"guide_every must be >= 1, got {self.guide_every}.")
        if self.num_candidates < 1:
            raise GuidanceError(f"num_candidates must be >= 1, got {self.num_candidates}.")
        if self.top_k < 0:
            raise GuidanceError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise GuidanceError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise GuidanceError(f"temperature must be > 0, got {self.temperature}.")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Return float32 logits (B, V) with every token outside the top-k-then-top-p pool set to -inf.

    The most likely token always stays in the pool.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probabilities = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probabilities, dim=-1) - probabilities
        remove_sorted = mass_before >= top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) by inverse CDF with one uniform per row's generator."""
    probabilities = torch.softmax(logits.double(), dim=-1)
    cdf = torch.cumsum(probabilities, dim=-1)
    uniforms = torch.stack([torch.rand((), generator=generator, dtype=torch.float64) for generator in generators])
    targets = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return tokens.clamp(max=logits.shape[-1] - 1)


def minmax_normalize(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min-max normalize scores (B, C) per row over the ``valid`` entries to [0, 1]. Rows whose scores are all equal give 0."""
    large = torch.finfo(scores.dtype).max
    low = torch.where(valid, scores, torch.full_like(scores, large)).min(dim=1, keepdim=True).values
    high = torch.where(valid, scores, torch.full_like(scores, -large)).max(dim=1, keepdim=True).values
    spread = high - low
    normalized = torch.where(spread > 0, (scores - low) / torch.where(spread > 0, spread, torch.ones_like(spread)), torch.zeros_like(scores))
    return torch.where(valid, normalized, torch.zeros_like(scores))


def row_seed(seed: int, index: int) -> int:
    """Return the generator seed of prompt ``index`` in a call with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(item) for item in value)
    return ids


def generate_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int,
    head: PreferenceHead | None = None,
    config: GuidanceConfig = GuidanceConfig(),
    batch_size: int = 8,
    prompt_messages: Sequence[Messages | None] | None = None,
    show_progress: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt, optionally guided by a preference head; return the new token ids.

    Args:
      model: a causal LM (transformers), used frozen in inference mode.
      tokenizer: its tokenizer; prompts are encoded with ``encode_prompt``.
      prompts: raw user instructions.
      max_new_tokens: at most this many tokens per response (rows stop at EOS).
      seed: row i draws from a generator seeded with ``row_seed(seed, i)``.
      head: the preference head, or ``None`` for plain sampling.
      config: sampling and guidance settings.
      batch_size: prompts per batch (left padding).
      prompt_messages: optional chat-message lists, one per prompt, used instead of the prompt text.
      show_progress: show a tqdm bar over batches.

    Returns:
      The sampled token ids per prompt, ending with the EOS id when the row stopped there.
    """
    config.validate()
    if isinstance(prompts, str):
        raise GuidanceError("prompts must be a list of strings, got a single string; wrap it in a list.")
    if max_new_tokens < 0:
        raise GuidanceError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if batch_size < 1:
        raise GuidanceError(f"batch_size must be >= 1, got {batch_size}.")
    if prompt_messages is not None and len(prompt_messages) != len(prompts):
        raise GuidanceError(f"prompt_messages has {len(prompt_messages)} entries for {len(prompts)} prompts.")
    encoded = [
        encode_prompt(tokenizer, prompt, None if prompt_messages is None else prompt_messages[index])
        for index, prompt in enumerate(prompts)
    ]
    for index, ids in enumerate(encoded):
        if len(ids) == 0:
            raise GuidanceError(f"Prompt {index} encodes to no tokens; pass a non-empty prompt.")
    guided = head is not None and config.guidance_scale > 0
    attention_kind = getattr(model.config, "_attn_implementation", None)
    if guided and attention_kind not in (None, "eager", "sdpa"):
        raise GuidanceError(
            f"Guided decoding scores candidates with a custom 4-D attention mask, which attention implementation "
            f"{attention_kind!r} ignores. Load the model with attn_implementation='sdpa' or 'eager'."
        )
    eos_ids = _eos_token_ids(model, tokenizer)
    if not eos_ids:
        logger.warning("The tokenizer has no EOS token: every response runs to max_new_tokens.")

    batches = range(0, len(prompts), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    outputs: list[list[int]] = []
    for start in batches:
        rows = encoded[start : start + batch_size]
        generators = [torch.Generator().manual_seed(row_seed(seed, start + offset)) for offset in range(len(rows))]
        token_lists = _generate_batch(
            model, rows, generators, max_new_tokens, config, head if guided else None, eos_ids, pad_token_id(tokenizer)
        )
        outputs.extend(token_lists)
    return outputs


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int,
    head: PreferenceHead | None = None,
    config: GuidanceConfig = GuidanceConfig(),
    batch_size: int = 8,
    prompt_messages: Sequence[Messages | None] | None = None,
    show_progress: bool = False,
) -> list[str]:
    """Sample one response per prompt, optionally guided by a preference head.

    Arguments as in ``generate_token_ids``. Each response is decoded once at the
    end with ``skip_special_tokens=True``; incomplete byte sequences decode to
    U+FFFD instead of raising.

    Returns:
      The decoded responses, one per prompt.
    """
    token_lists = generate_token_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, head=head, config=config,
        batch_size=batch_size, prompt_messages=prompt_messages, show_progress=show_progress,
    )
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in token_lists]


@torch.inference_mode()
def _generate_batch(
    model: Any,
    rows: list[list[int]],
    generators: list[torch.Generator],
    max_new_tokens: int,
    config: GuidanceConfig,
    head: PreferenceHead | None,
    eos_ids: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Sample up to ``max_new_tokens`` for a batch of encoded prompts; return each row's new token ids (EOS included)."""
    device = next(model.parameters()).device
    batch = len(rows)
    width = max(len(ids) for ids in rows)

    # Prefill: left padding, positions counted over real tokens only.
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.as_tensor(ids, device=device)
        attention[row, width - len(ids) :] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
        use_cache=True, output_hidden_states=head is not None, logits_to_keep=1,
    )
    logits = output.logits[:, -1]
    next_position = positions[:, -1] + 1

    state = None
    if head is not None:
        state = head.new_pool_state(batch)
        if head.pool_span == "all":
            state = PoolState.update(state, output.hidden_states[-1], attention.bool())
        # NOTE: Stage 1 cuts prompts longer than max_length from the left; here the whole prompt is pooled.

    eos_tensor = torch.as_tensor(sorted(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        # Nucleus pool, reweighted by the head every guide_every tokens.
        pool_logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
        if head is not None and step % config.guide_every == 0:
            pool_logits = _reweight_candidates(model, head, cache, attention, next_position, state, pool_logits, config)
        tokens = sample_tokens(pool_logits, generators)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        for row in torch.nonzero(~finished).flatten().tolist():
            new_tokens[row].append(int(tokens[row]))
        finished = finished | torch.isin(tokens, eos_tensor)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break

        # Commit the sampled tokens: one decoding step on the main cache.
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=1)
        output = model(
            input_ids=tokens.unsqueeze(1), attention_mask=attention, position_ids=next_position.unsqueeze(1),
            cache=cache, use_cache=True, output_hidden_states=head is not None,
        )
        logits = output.logits[:, -1]
        next_position = next_position + 1
        if head is not None:
            state = PoolState.update(state, output.hidden_states[-1], (~finished).unsqueeze(1))
    return new_tokens


def candidate_scores(
    model: Any,
    head: PreferenceHead,
    cache: DynamicCache,
    attention: torch.Tensor,
    next_position: torch.Tensor,
    state: PoolState,
    candidates: torch.Tensor,
) -> torch.Tensor:
    """Return head scores (B, C) of each prefix extended by one candidate token.

    Args:
      model: the causal LM whose ``cache`` contains the prefixes.
      head: the preference head.
      cache: KV cache of the B prefixes. Neither the cache object nor its tensors are modified.
      attention: (B, T) attention mask of the prefixes (left padding as 0).
      next_position: (B,) position id of the next token of each row.
      state: pooling state of the prefixes.
      candidates: (B, C) candidate token ids.

    The C candidates of a row run as C extra tokens of that row in one forward
    pass: all at the same position id, each attending to the prefix and to
    itself only (a 4-D additive mask). This reads the prefix's keys and values
    once per row instead of copying the cache C times. The pass runs on a
    shallow copy of the cache, whose layers append to new tensors, and pooling
    is incremental (``PoolState.peek``), so the prefix is never recomputed.
    """
    batch, count = candidates.shape
    prefix_length = attention.shape[1]
    # NOTE: a sliding-window cache layer keeps fewer keys than the mask has prefix columns once the
    # prefix exceeds the window, so prefixes longer than a model's sliding window are unsupported.
    shadow = copy.copy(cache)
    shadow.layers = [copy.copy(layer) for layer in cache.layers]

    dtype = next(model.parameters()).dtype
    blocked = torch.finfo(dtype).min
    allowed = torch.zeros((), dtype=dtype, device=attention.device)
    prefix = torch.where(attention.bool(), allowed, blocked).to(dtype)
    prefix = prefix[:, None, None, :].expand(batch, 1, count, prefix_length)
    own = torch.full((count, count), blocked, dtype=dtype, device=attention.device).fill_diagonal_(0.0)
    own = own[None, None].expand(batch, 1, count, count)
    mask = torch.cat([prefix, own], dim=-1)

    # The base transformer skips the output projection, as Stage 1's extraction does.
    base = getattr(model, "base_model", model)
    output = base(
        input_ids=candidates,
        attention_mask=mask,
        position_ids=next_position.unsqueeze(1).expand(batch, count),
        cache=shadow,
        use_cache=True,
    )
    pooled = PoolState.peek(state, output.last_hidden_state)
    return head.score_pooled(pooled.reshape(batch * count, -1)).reshape(batch, count)


def _reweight_candidates(
    model: Any,
    head: PreferenceHead,
    cache: DynamicCache,
    attention: torch.Tensor,
    next_position: torch.Tensor,
    state: PoolState,
    pool_logits: torch.Tensor,
    config: GuidanceConfig,
) -> torch.Tensor:
    """Add ``lambda * minmax(score)`` to the logits (B, V) of the C most likely pool tokens."""
    count = min(config.num_candidates, pool_logits.shape[-1])
    candidate_logits, candidates = torch.topk(pool_logits, count, dim=-1)
    valid = torch.isfinite(candidate_logits)
    scores = candidate_scores(model, head, cache, attention, next_position, state, candidates)
    bonus = config.guidance_scale * minmax_normalize(scores, valid)
    return pool_logits.scatter_add(-1, candidates, bonus.to(pool_logits.dtype))
