"""Analytic floating-point operation (FLOP) counts per method and stage.

The authors' release estimated TFLOPs as wall time x an assumed 231 TFLOP/s.
This module counts them from the model's shape and the token counts instead,
so the comparison does not depend on how busy the machine was.

Conventions (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
Table 1; one multiply-add = 2 FLOPs):

* forward pass, per token of a sequence of length T:
  ``2 N + 2 L T d``, with N the non-embedding parameters, L the layers and d
  the hidden size. The second term is the attention score term
  (``2 n_layer n_ctx d_attn``) with the context set to the sequence's own
  length. The logits term ``2 V d`` per token (V the vocabulary) is added
  when ``with_logits`` is true: Stage 1 reads hidden states and never
  computes logits, the trainers always do.
* full backward: 2 x forward (gradients for activations and for weights).
* LoRA backward: the activation gradients flow through the frozen weights
  (about 1 x forward) and only the adapters get weight gradients, plus the
  adapters' own forward and backward, ``2 A`` and ``4 A`` per token for A
  adapter parameters.
* SFT: forward + backward on prompt + chosen. DPO: policy forward + backward
  on chosen and rejected plus the frozen reference model's forward on both.
  ORPO: policy forward + backward on chosen and rejected, no reference.
  All three times the number of epochs.
* COALA: Stage 1 forward on chosen and rejected once (no logits), plus the
  CRONOS solver's matrix-vector products with the feature matrix X (n x d).
  Each product costs ``2 n d`` FLOPs per activation pattern. Stage 3 adds
  fine-tuning theta2 (the output-layer weights) on the frozen hidden layer.

Transformers' ``Trainer`` counts ``6 x num_parameters(exclude_embeddings=True)
x input tokens`` (padding included) for every training step
(``PreTrainedModel.floating_point_ops`` in transformers 5.25). That equals
``full_finetune_flops`` with the attention and logits terms left out; TRL's
DPO total omits the reference model and TRL's experimental ORPO trainer
reports 0 (trl 1.16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np

ARCHITECTURES = ("llama", "gpt2")
LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj"),
}


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer, enough to count its FLOPs without loading it.

    Attributes:
      num_layers: transformer blocks L.
      hidden_size: model width d.
      num_parameters: non-embedding parameters N (every weight except token and
        position embeddings; an untied output layer counts here).
      embedding_parameters: token and position embedding parameters.
      vocab_size: vocabulary V.
      intermediate_size: MLP width (``4 d`` for GPT-2).
      num_key_value_heads / num_attention_heads: give the key and value
        projection width ``d * num_key_value_heads / num_attention_heads``.
      architecture: ``"llama"`` (also Mistral, SmolLM2) or ``"gpt2"``.
    """

    num_layers: int
    hidden_size: int
    num_parameters: int
    embedding_parameters: int
    vocab_size: int
    intermediate_size: int = 0
    num_attention_heads: int = 1
    num_key_value_heads: int = 1
    architecture: str = "llama"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_parameters", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)!r}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"ModelShape.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}.")

    @property
    def kv_size(self) -> int:
        """Width of the key and value projections (grouped-query attention)."""
        return self.hidden_size * self.num_key_value_heads // self.num_attention_heads

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelShape":
        """Build a shape from a config's ``model_shape`` section; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known - {"name", "max_position_embeddings", "tie_word_embeddings"})
        if unknown:
            raise ValueError(f"model_shape has unknown keys {unknown}; valid keys: {sorted(known)}.")
        missing = sorted(k for k in ("num_layers", "hidden_size", "num_parameters", "embedding_parameters", "vocab_size") if k not in values)
        if missing:
            raise ValueError(f"model_shape is missing {missing}.")
        return cls(**{key: values[key] for key in known if key in values})

    @classmethod
    def from_model(cls, model: Any) -> "ModelShape":
        """Read the shape of a loaded transformers model (counts parameters, tied weights once)."""
        config = model.config
        architecture = "gpt2" if getattr(config, "model_type", "") == "gpt2" else "llama"
        total = sum(p.numel() for p in model.parameters())
        non_embedding = model.num_parameters(exclude_embeddings=True)
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        return cls(
            num_layers=getattr(config, "num_hidden_layers", None) or config.n_layer,
            hidden_size=hidden,
            num_parameters=int(non_embedding),
            embedding_parameters=int(total - non_embedding),
            vocab_size=config.vocab_size,
            intermediate_size=(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden),
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            architecture=architecture,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenCounts:
    """Token statistics of a set of sequences: their count, total tokens and sum of squared lengths.

    The squared lengths feed the attention score term, which grows with the
    sequence length.
    """

    sequences: int
    tokens: int
    squared_tokens: int

    @classmethod
    def from_lengths(cls, lengths: Iterable[int]) -> "TokenCounts":
        array = np.asarray(list(lengths), dtype=np.int64)
        if array.size and array.min() < 0:
            raise ValueError(f"Sequence lengths must be non-negative, got minimum {int(array.min())}.")
        return cls(int(array.size), int(array.sum()), int((array * array).sum()))

    @classmethod
    def uniform(cls, sequences: int, length: int) -> "TokenCounts":
        """Counts for ``sequences`` sequences of ``length`` tokens each (a configured estimate)."""
        if sequences < 0 or length < 0:
            raise ValueError(f"sequences and length must be non-negative, got {sequences} and {length}.")
        return cls(sequences, sequences * length, sequences * length * length)

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.sequences + other.sequences, self.tokens + other.tokens, self.squared_tokens + other.squared_tokens)


def lora_parameter_count(shape: ModelShape, rank: int = 16) -> int:
    """Return the adapter parameters A of LoRA rank ``rank`` on the standard target modules.

    A (in x out) weight gets ``rank * (in + out)`` adapter parameters. Targets:
    q, k, v, o, gate, up, down projections for Llama-style models; ``c_attn``
    and both ``c_proj`` layers (attention output and MLP output) for GPT-2,
    which is what peft matches for ``target_modules=["c_attn", "c_proj"]``.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}.")
    d, m, kv = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size, shape.kv_size
    if shape.architecture == "gpt2":
        per_layer = (d + 3 * d) + (d + d) + (m + d)
    else:
        per_layer = 2 * (d + d) + 2 * (d + kv) + 2 * (d + m) + (m + d)
    return rank * per_layer * shape.num_layers


def non_embedding_parameter_count(shape: ModelShape) -> int:
    """Return N computed from the layer sizes (weights, biases and norms), to check a configured ``num_parameters``.

    An untied output layer is not included, so this equals ``num_parameters``
    for models with tied embeddings (GPT-2, SmolLM2, Llama-3.2-3B).
    """
    d, m, kv, layers = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size, shape.kv_size, shape.num_layers
    if shape.architecture == "gpt2":
        per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
        return layers * per_layer + 2 * d
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * m + 2 * d
    return layers * per_layer + d


def forward_flops(shape: ModelShape, counts: TokenCounts, with_logits: bool = True) -> float:
    """FLOPs of one forward pass over sequences with ``counts``.

    ``2 N tokens + 2 L d sum(T^2)`` plus ``2 V d tokens`` with logits.
    """
    flops = 2.0 * shape.num_parameters * counts.tokens
    flops += 2.0 * shape.num_layers * shape.hidden_size * counts.squared_tokens
    if with_logits:
        flops += 2.0 * shape.vocab_size * shape.hidden_size * counts.tokens
    return flops


def full_finetune_flops(shape: ModelShape, counts: TokenCounts, with_attention: bool = True, with_logits: bool = True) -> float:
    """Forward + full backward (3 x forward) of one training pass.

    With ``with_attention=False`` and ``with_logits=False`` this is Trainer's
    ``6 N tokens``.
    """
    forward = 2.0 * shape.num_parameters * counts.tokens
    if with_attention:
        forward += 2.0 * shape.num_layers * shape.hidden_size * counts.squared_tokens
    if with_logits:
        forward += 2.0 * shape.vocab_size * shape.hidden_size * counts.tokens
    return 3.0 * forward


def lora_train_flops(shape: ModelShape, counts: TokenCounts, lora_parameters: int, with_logits: bool = True) -> float:
    """Forward + LoRA backward of one training pass: ``2 x forward + 6 A tokens``.

    The frozen weights cost one forward and one activation-gradient pass;
    the adapters cost ``2 A`` (forward) + ``4 A`` (activation and weight
    gradients) per token.
    """
    return 2.0 * forward_flops(shape, counts, with_logits) + 6.0 * lora_parameters * counts.tokens


def sft_flops(shape: ModelShape, chosen: TokenCounts, epochs: float = 1.0, lora_parameters: int | None = None) -> float:
    """SFT: training passes on prompt + chosen, times epochs (full fine-tuning when ``lora_parameters`` is None)."""
    step = _train(shape, chosen, lora_parameters)
    return epochs * step


def dpo_flops(shape: ModelShape, chosen: TokenCounts, rejected: TokenCounts, epochs: float = 1.0, lora_parameters: int | None = None) -> float:
    """DPO: policy training passes on chosen and rejected plus the reference model's forward on both."""
    both = chosen + rejected
    return epochs * (_train(shape, both, lora_parameters) + forward_flops(shape, both))


def orpo_flops(shape: ModelShape, chosen: TokenCounts, rejected: TokenCounts, epochs: float = 1.0, lora_parameters: int | None = None) -> float:
    """ORPO: policy training passes on chosen and rejected, no reference model."""
    return epochs * _train(shape, chosen + rejected, lora_parameters)


def _train(shape: ModelShape, counts: TokenCounts, lora_parameters: int | None) -> float:
    if lora_parameters is None:
        return full_finetune_flops(shape, counts)
    return lora_train_flops(shape, counts, lora_parameters)


def cronos_matvec_count(num_patterns: int, admm_iters: int, pcg_iters: int, nystrom_rank: int) -> int:
    """Estimate the products with X (or X^T) of one CRONOS solve, each for one activation pattern.

    Per application of the system matrix ``F^T F + rho I + rho G^T G``:
    F u (P products), F^T (P), G u (2P), G^T (2P), so 6P. The Nyström
    preconditioner applies it ``nystrom_rank`` times once; each ADMM iteration
    runs up to ``pcg_iters`` applications, a right-hand side (F^T y and
    G^T (s - nu): 3P) and the slack update G u (2P).
    NOTE: an upper bound when PCG stops early; pass the solver's measured
    count to ``coala_flops`` when it is available.
    """
    per_apply = 6 * num_patterns
    return per_apply * nystrom_rank + admm_iters * (per_apply * pcg_iters + 5 * num_patterns)


def cronos_matvecs_measured(num_patterns: int, pcg_iterations: Iterable[int], nystrom_rank: int) -> int:
    """Products with X of a finished CRONOS solve from its recorded PCG iterations per ADMM iteration.

    Same accounting as ``cronos_matvec_count`` with the real PCG counts.
    """
    iterations = [int(k) for k in pcg_iterations]
    per_apply = 6 * num_patterns
    return per_apply * (nystrom_rank + sum(iterations)) + 5 * num_patterns * len(iterations)


def cronos_flops(num_samples: int, feature_dim: int, matvecs: int) -> float:
    """FLOPs of ``matvecs`` products of X (n x d) with a vector: ``2 n d`` each."""
    return 2.0 * num_samples * feature_dim * matvecs


def finetune_head_flops(num_pairs: int, feature_dim: int, hidden_units: int, epochs: int) -> float:
    """Stage 3: hidden activations once (``2 d h`` per text), then per epoch a forward and backward of theta2 (``6 h`` per text)."""
    texts = 2 * num_pairs
    return 2.0 * texts * feature_dim * hidden_units + epochs * 6.0 * texts * hidden_units


def coala_flops(
    shape: ModelShape,
    chosen: TokenCounts,
    rejected: TokenCounts,
    num_patterns: int = 10,
    admm_iters: int = 6,
    pcg_iters: int = 32,
    nystrom_rank: int = 20,
    finetune_epochs: int = 500,
    finetune_pairs: int | None = None,
    matvecs: int | None = None,
) -> dict[str, float]:
    """COALA's FLOPs per stage: ``{"stage1", "cronos", "finetune", "total"}``.

    Stage 1 is one forward pass without logits over chosen and rejected texts.
    CRONOS runs on the 2n stacked features of dimension d (the hidden size).
    ``matvecs`` is the solver's counted number of products; when ``None`` it
    is estimated by ``cronos_matvec_count``.
    """
    stage1 = forward_flops(shape, chosen + rejected, with_logits=False)
    samples = chosen.sequences + rejected.sequences
    products = matvecs if matvecs is not None else cronos_matvec_count(num_patterns, admm_iters, pcg_iters, nystrom_rank)
    cronos = cronos_flops(samples, shape.hidden_size, products)
    pairs = chosen.sequences if finetune_pairs is None else min(finetune_pairs, chosen.sequences)
    finetune = finetune_head_flops(pairs, shape.hidden_size, 2 * num_patterns, finetune_epochs)
    return {"stage1": stage1, "cronos": cronos, "finetune": finetune, "total": stage1 + cronos + finetune}


def method_flops(
    shape: ModelShape,
    chosen: TokenCounts,
    rejected: TokenCounts,
    epochs: float = 1.0,
    lora_rank: int | None = 16,
    coala_settings: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Total FLOPs of SFT, DPO, ORPO (LoRA of ``lora_rank``, or full fine-tuning when None) and COALA on the same pairs.

    ``chosen`` counts prompt + chosen sequences, ``rejected`` prompt + rejected.
    """
    adapters = None if lora_rank is None else lora_parameter_count(shape, lora_rank)
    coala = coala_flops(shape, chosen, rejected, **dict(coala_settings or {}))
    return {
        "SFT": sft_flops(shape, chosen, epochs, adapters),
        "DPO": dpo_flops(shape, chosen, rejected, epochs, adapters),
        "ORPO": orpo_flops(shape, chosen, rejected, epochs, adapters),
        "COALA": coala["total"],
    }
