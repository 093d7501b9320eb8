"""Stage 1 library: text encoding, length-bucketed forward passes, pooling, resumable shards, output folder.

Text encoding (``encode_prompt``, ``encode_example``) is shared with guided
decoding, so a response scored at inference time is tokenized exactly as in
Stage 1.

Resume: every finished batch is committed as one shard file under
``<output>/.partial/`` next to ``settings.json``, the settings fingerprint of the
run. A rerun with equal settings loads the committed shards and computes only
the missing batches. The batch plan depends only on the encoded lengths and
the batch size, so a resumed run pads every batch exactly as an uninterrupted
run does and its arrays are bit-for-bit equal on the same device and dtype.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from coala.features import (
    CHOSEN_FILE,
    MANIFEST_FILE,
    META_FILE,
    REJECTED_FILE,
    SCORER_FILE,
)
from coala.io import (
    atomic_save_npy,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from coala.pooling import pool_hidden

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTIAL_DIR = ".partial"
SETTINGS_FILE = "settings.json"
# Unpooled (--pool none) outputs: token features stacked over texts, and row offsets into them.
CHOSEN_TOKENS_FILE = "chosen_tokens.npy"
REJECTED_TOKENS_FILE = "rejected_tokens.npy"
CHOSEN_OFFSETS_FILE = "chosen_offsets.npy"
REJECTED_OFFSETS_FILE = "rejected_offsets.npy"
OUTPUT_FILES = (
    CHOSEN_FILE, REJECTED_FILE, META_FILE, MANIFEST_FILE, SCORER_FILE,
    CHOSEN_TOKENS_FILE, REJECTED_TOKENS_FILE, CHOSEN_OFFSETS_FILE, REJECTED_OFFSETS_FILE,
)


class ExtractionError(ValueError):
    """Extraction cannot start or continue: bad settings, nothing to extract, or a resume mismatch."""


# ----------------------------------------------------------------------------- text encoding


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized prompt + response.

    Attributes:
      input_ids: the token ids, at most ``max_length`` of them.
      response_start: index in ``input_ids`` of the first response token.
      truncated: whether tokens were cut to fit ``max_length``.
    """

    input_ids: list[int]
    response_start: int
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _as_id_list(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(token) for token in encoded]


def encode_prompt(tokenizer: Any, prompt: str, prompt_messages: Sequence[dict[str, str]] | None = None) -> list[int]:
    """Tokenize a prompt up to the point where the response starts.

    With a chat template the prompt is rendered with ``add_generation_prompt=True``
    from ``prompt_messages`` (roles "user"/"assistant") or, when None, from one
    user turn holding ``prompt``. Without a template it is the tokenizer's plain
    encoding of ``prompt``, including its BOS token if the tokenizer adds one.
    An empty prompt without messages always uses the plain encoding, so unpaired
    texts (reviews) are encoded as they are.
    """
    if getattr(tokenizer, "chat_template", None) and (prompt_messages or prompt):
        messages = [dict(message) for message in prompt_messages] if prompt_messages else [{"role": "user", "content": prompt}]
        return _as_id_list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return _as_id_list(tokenizer(prompt).input_ids)


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    prompt_messages: Sequence[dict[str, str]] | None = None,
) -> EncodedExample:
    """Tokenize prompt + response as ``encode_prompt(...) + tokenizer(response, add_special_tokens=False)``.

    No end-of-turn token is appended after the response. The guided decoder scores
    a partial response by pooling exactly these tokens, so a finished response's
    feature equals the feature the decoder computes mid-generation on the same tokens.

    Truncation to ``max_length`` keeps the response: the prompt is cut from the
    left first (its oldest tokens, including any BOS or template header, go
    first). If the response alone is longer than ``max_length``, the prompt is
    dropped and the response's first ``max_length`` tokens are kept.
    """
    if max_length <= 0:
        raise ExtractionError(f"max_length must be positive, got {max_length}.")
    prompt_ids = encode_prompt(tokenizer, prompt, prompt_messages)
    response_ids = _as_id_list(tokenizer(response, add_special_tokens=False).input_ids)
    total = len(prompt_ids) + len(response_ids)
    if total <= max_length:
        return EncodedExample(prompt_ids + response_ids, len(prompt_ids), False)
    if len(response_ids) >= max_length:
        return EncodedExample(response_ids[:max_length], 0, True)
    kept_prompt = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    return EncodedExample(kept_prompt + response_ids, len(kept_prompt), True)


@dataclass
class EncodedData:
    """Every text to embed, in output order.

    Attributes:
      paired: True for (chosen, rejected) pairs; then ``examples`` alternates
        chosen, rejected, chosen, rejected (sequence 2i and 2i+1 form pair i).
      examples: the encoded sequences.
      records: one dict per pair (paired) or per text (unpaired) with the meta
        fields known before extraction, plus "_split_key", the text the split is assigned by.
      labels: (unpaired only) +1 or -1 per example.
      prompt_tokens: untruncated prompt length per pair or text.
      dropped_identical_tokens: pairs dropped because chosen and rejected ids were identical.
    """

    paired: bool
    examples: list[EncodedExample]
    records: list[dict[str, Any]]
    labels: list[int] = field(default_factory=list)
    dropped_identical_tokens: int = 0

    @property
    def truncated(self) -> int:
        """Number of pairs (or texts) with at least one truncated sequence."""
        if not self.paired:
            return sum(example.truncated for example in self.examples)
        return sum(self.examples[i].truncated or self.examples[i + 1].truncated for i in range(0, len(self.examples), 2))


def encode_preferences(tokenizer: Any, data: Any, max_length: int, progress: bool = False) -> EncodedData:
    """Encode a ``coala.data.PreferenceData``; drop pairs whose chosen and rejected ids are identical.

    Raises:
      ExtractionError: when no pair or text is left to extract.
    """
    from tqdm.auto import tqdm

    from coala.data import split_key

    if data.paired:
        examples: list[EncodedExample] = []
        records: list[dict[str, Any]] = []
        dropped = 0
        for triplet in tqdm(data.triplets, desc="tokenize", unit="pair", disable=not progress):
            messages = list(triplet.prompt_messages) if triplet.prompt_messages else None
            chosen = encode_example(tokenizer, triplet.prompt, triplet.chosen, max_length, messages)
            rejected = encode_example(tokenizer, triplet.prompt, triplet.rejected, max_length, messages)
            if chosen.input_ids == rejected.input_ids:
                dropped += 1
                continue
            examples.extend([chosen, rejected])
            records.append({
                "pair_id": triplet.pair_id,
                "prompt_tokens": len(encode_prompt(tokenizer, triplet.prompt, messages)),
                "_split_key": split_key(triplet),
            })
        if dropped:
            logger.warning("Dropped %d pairs whose chosen and rejected token ids are identical after truncation to %d tokens", dropped, max_length)
        if not records:
            raise ExtractionError(
                f"All {len(data.triplets)} pairs of {data.source} have identical chosen and rejected tokens "
                f"after truncation to max_length={max_length}; raise --max_length."
            )
        return EncodedData(True, examples, records, dropped_identical_tokens=dropped)

    examples, records, labels = [], [], []
    for text in tqdm(data.texts, desc="tokenize", unit="text", disable=not progress):
        examples.append(encode_example(tokenizer, text.prompt, text.text, max_length))
        labels.append(int(text.label))
        records.append({
            "text_id": text.text_id,
            "label": int(text.label),
            "prompt_tokens": len(encode_prompt(tokenizer, text.prompt)) if text.prompt else 0,
            "_split_key": split_key(text),
        })
    if not records:
        raise ExtractionError(f"{data.source} contains no texts to extract.")
    return EncodedData(False, examples, records, labels=labels)


# ----------------------------------------------------------------------------- batching and forward passes


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Group sequence indices into batches of similar length (longest first; ties keep input order).

    Returns a list of int64 index arrays, each of at most ``batch_size`` entries.
    Longest-first puts the largest batch first, so an out-of-memory error shows at once.
    """
    if batch_size <= 0:
        raise ExtractionError(f"batch_size must be positive, got {batch_size}.")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padding_counts(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> tuple[int, int]:
    """Return (real tokens, padding tokens) of a batch plan with right-padding to each batch's longest sequence."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(lengths.sum())
    padded = sum(int(lengths[batch].max()) * len(batch) for batch in batches) - real
    return real, padded


def span_mask(lengths: torch.Tensor, response_starts: torch.Tensor, width: int, pool_span: str) -> torch.Tensor:
    """Return the (B, width) bool pooling mask of right-padded sequences, built from lengths only.

    ``pool_span`` "all" pools positions [0, length); "response" pools [response_start, length).
    """
    positions = torch.arange(width, device=lengths.device).unsqueeze(0)
    mask = positions < lengths.unsqueeze(1)
    if pool_span == "response":
        mask &= positions >= response_starts.unsqueeze(1)
    elif pool_span != "all":
        raise ExtractionError(f"Unknown pool_span {pool_span!r}; choose 'all' or 'response'.")
    return mask


def pad_batch(examples: Sequence[EncodedExample], pad_id: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: returns input_ids (B, T), attention_mask (B, T), lengths (B,), response_starts (B,)."""
    width = max(example.length for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :example.length] = torch.tensor(example.input_ids, dtype=torch.long)
    lengths = torch.tensor([example.length for example in examples], dtype=torch.long)
    starts = torch.tensor([example.response_start for example in examples], dtype=torch.long)
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return input_ids.to(device), attention_mask.to(device), lengths.to(device), starts.to(device)


def last_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the last layer's hidden states (B, T, H) of a causal LM, skipping the output projection.

    Uses the model's base transformer (``model.base_model``), whose ``last_hidden_state``
    is the input of the language-model head (after the final norm).
    """
    base = getattr(model, "base_model", model)
    output = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output.last_hidden_state


def pad_token_id(tokenizer: Any) -> int:
    """Return an id to fill padding positions with; its value never matters because padding is masked."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


# ----------------------------------------------------------------------------- resumable shard store


class ShardStore:
    """Committed batches of a run under ``<output_dir>/.partial/``, one safetensors file per batch."""

    def __init__(self, output_dir: Path, settings: dict[str, Any]):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / PARTIAL_DIR
        self.settings = settings

    def open(self) -> int:
        """Create the folder or check an existing one's settings; return the number of committed batches.

        Raises:
          ExtractionError: the folder was started with different settings; the
            message names each differing setting and how to start over.
        """
        settings_path = self.folder / SETTINGS_FILE
        if settings_path.is_file():
            previous = read_json(settings_path)
            differences = describe_differences(previous, self.settings)
            if differences:
                raise ExtractionError(
                    f"{self.output_dir} contains an unfinished extraction with other settings ({differences}), "
                    "so it cannot be resumed. Rerun with the same settings, delete the folder, or pass --overwrite."
                )
            committed = len(list(self.folder.glob("batch_*.safetensors")))
            logger.info("Resuming %s: %d batches already committed", self.output_dir, committed)
            return committed
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(settings_path, self.settings)
        return 0

    def shard_path(self, batch_index: int) -> Path:
        return self.folder / f"batch_{batch_index:06d}.safetensors"

    def has(self, batch_index: int) -> bool:
        return self.shard_path(batch_index).is_file()

    def write(self, batch_index: int, arrays: dict[str, np.ndarray], seconds: float) -> None:
        """Commit one batch atomically."""

        def write(tmp: Path) -> None:
            save_file(arrays, str(tmp), metadata={"seconds": repr(seconds)})

        atomic_write(self.shard_path(batch_index), write)

    def read(self, batch_index: int) -> dict[str, np.ndarray]:
        return load_file(str(self.shard_path(batch_index)))

    def seconds(self, batch_index: int) -> float:
        from safetensors import safe_open

        with safe_open(str(self.shard_path(batch_index)), framework="numpy") as handle:
            return float((handle.metadata() or {}).get("seconds", 0.0))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def describe_differences(previous: dict[str, Any], current: dict[str, Any]) -> str:
    """Return "key: old -> new" for every setting that differs, joined by "; " (empty when equal)."""
    parts = []
    for key in sorted(set(previous) | set(current)):
        if previous.get(key) != current.get(key):
            parts.append(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}")
    return "; ".join(parts)


def clear_outputs(output_dir: Path) -> None:
    """Delete the files an extraction writes (and its .partial folder) from ``output_dir``; other files stay."""
    for name in OUTPUT_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / PARTIAL_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------- the extraction loop


def run_batches(
    model: Any,
    encoded: EncodedData,
    batches: Sequence[np.ndarray],
    store: ShardStore,
    pool: str,
    pool_span: str,
    scorer: np.ndarray | None,
    pad_id: int,
    device: str,
    on_batch: Callable[[int, int], None] | None = None,
) -> None:
    """Embed every batch not yet committed in ``store`` and commit it.

    Each shard contains "indices" (b,) and "features": (b, H) pooled float32, or for
    ``pool == "none"`` the (sum of span lengths, H) token features plus "lengths" (b,).
    ``on_batch(batch_index, batch_len)`` is called after each batch, committed or skipped.
    """
    for batch_index, indices in enumerate(batches):
        if store.has(batch_index):
            if on_batch:
                on_batch(batch_index, len(indices))
            continue
        started = time.perf_counter()
        examples = [encoded.examples[i] for i in indices]
        input_ids, attention_mask, lengths, starts = pad_batch(examples, pad_id, device)
        with torch.inference_mode():
            hidden = last_hidden_states(model, input_ids, attention_mask)
            mask = span_mask(lengths, starts, hidden.shape[1], pool_span)
            if pool == "none":
                arrays = {
                    "features": hidden.float()[mask].cpu().numpy(),
                    "lengths": mask.sum(dim=1).cpu().numpy().astype(np.int64),
                }
            else:
                arrays = {"features": pool_hidden(hidden, mask, pool, scorer).cpu().numpy()}
        arrays["indices"] = np.asarray(indices, dtype=np.int64)
        store.write(batch_index, arrays, time.perf_counter() - started)
        if on_batch:
            on_batch(batch_index, len(indices))


def gather_pooled(store: ShardStore, batches: Sequence[np.ndarray], num_sequences: int) -> np.ndarray:
    """Read every committed shard and return pooled features (num_sequences, H) in sequence order."""
    features: np.ndarray | None = None
    for batch_index, indices in enumerate(batches):
        shard = store.read(batch_index)
        _check_shard(store, batch_index, shard, indices)
        if features is None:
            features = np.zeros((num_sequences, shard["features"].shape[1]), dtype=np.float32)
        features[shard["indices"]] = shard["features"]
    assert features is not None
    return features


def gather_tokens(store: ShardStore, batches: Sequence[np.ndarray], num_sequences: int) -> list[np.ndarray]:
    """Read every committed shard of a ``--pool none`` run; return one (span length, H) array per sequence."""
    per_sequence: list[np.ndarray | None] = [None] * num_sequences
    for batch_index, indices in enumerate(batches):
        shard = store.read(batch_index)
        _check_shard(store, batch_index, shard, indices)
        bounds = np.concatenate([[0], np.cumsum(shard["lengths"])])
        for row, sequence_index in enumerate(shard["indices"]):
            per_sequence[int(sequence_index)] = shard["features"][bounds[row]:bounds[row + 1]]
    return [array for array in per_sequence if array is not None]


def _check_shard(store: ShardStore, batch_index: int, shard: dict[str, np.ndarray], indices: np.ndarray) -> None:
    if not np.array_equal(shard["indices"], indices):
        raise ExtractionError(
            f"{store.shard_path(batch_index)} does not hold the planned batch; "
            f"delete {store.folder} (or pass --overwrite) and rerun."
        )


def stack_tokens(arrays: Sequence[np.ndarray], hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-text token features into (total tokens, H) plus offsets (n + 1,): text i is rows offsets[i]:offsets[i+1]."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(array) for array in arrays])
    stacked = np.concatenate(arrays, axis=0) if arrays else np.zeros((0, hidden_size), dtype=np.float32)
    return stacked.astype(np.float32, copy=False), offsets


def sequence_tokens(encoded: EncodedData, pool_span: str) -> list[int]:
    """Return the number of pooled tokens per sequence for ``pool_span``."""
    if pool_span == "response":
        return [example.length - example.response_start for example in encoded.examples]
    return [example.length for example in encoded.examples]


def write_feature_folder(
    output_dir: Path,
    encoded: EncodedData,
    features: np.ndarray | list[np.ndarray],
    splits: Sequence[str],
    pool: str,
    scorer: np.ndarray | None,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write arrays, meta.jsonl and the scorer, then the manifest last; return the counts written.

    Args:
      features: (num_sequences, H) pooled features, or for ``pool == "none"``
        one (tokens, H) array per sequence.
      splits: one split name per pair (paired) or text (unpaired).
      manifest: the manifest fields known so far; "counts" is filled here.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if encoded.paired:
        chosen_rows = list(range(0, len(encoded.examples), 2))
        rejected_rows = list(range(1, len(encoded.examples), 2))
        meta = []
        for pair, record in enumerate(encoded.records):
            chosen, rejected = encoded.examples[2 * pair], encoded.examples[2 * pair + 1]
            meta.append({
                "pair_id": record["pair_id"],
                "split": splits[pair],
                "prompt_tokens": record["prompt_tokens"],
                "chosen_tokens": chosen.length,
                "rejected_tokens": rejected.length,
                "chosen_response_start": chosen.response_start,
                "rejected_response_start": rejected.response_start,
                "truncated": chosen.truncated or rejected.truncated,
            })
    else:
        chosen_rows = [i for i, label in enumerate(encoded.labels) if label == 1]
        rejected_rows = [i for i, label in enumerate(encoded.labels) if label == -1]
        meta = []
        # load_features matches positive rows to chosen.npy and negative rows to rejected.npy in order.
        for i in chosen_rows + rejected_rows:
            record, example = encoded.records[i], encoded.examples[i]
            meta.append({
                "text_id": record["text_id"],
                "label": record["label"],
                "split": splits[i],
                "tokens": example.length,
                "response_start": example.response_start,
                "truncated": example.truncated,
            })

    if pool == "none":
        hidden_size = int(manifest["hidden_size"])
        for rows, tokens_file, offsets_file in (
            (chosen_rows, CHOSEN_TOKENS_FILE, CHOSEN_OFFSETS_FILE),
            (rejected_rows, REJECTED_TOKENS_FILE, REJECTED_OFFSETS_FILE),
        ):
            stacked, offsets = stack_tokens([features[i] for i in rows], hidden_size)
            atomic_save_npy(output_dir / tokens_file, stacked)
            atomic_save_npy(output_dir / offsets_file, offsets)
    else:
        atomic_save_npy(output_dir / CHOSEN_FILE, np.ascontiguousarray(features[chosen_rows], dtype=np.float32))
        atomic_save_npy(output_dir / REJECTED_FILE, np.ascontiguousarray(features[rejected_rows], dtype=np.float32))
    atomic_write_text(output_dir / META_FILE, "".join(json.dumps(row) + "\n" for row in meta))
    if scorer is not None:

        def write_scorer(tmp: Path) -> None:
            save_file({"scorer": np.asarray(scorer, dtype=np.float32)}, str(tmp))

        atomic_write(output_dir / SCORER_FILE, write_scorer)

    split_counts = {name: sum(1 for split in splits if split == name) for name in ("train", "validation", "test")}
    counts = dict(manifest.get("counts", {}))
    counts.update({"pairs" if encoded.paired else "texts": len(encoded.records), **split_counts})
    if not encoded.paired:
        counts.update({"positive": len(chosen_rows), "negative": len(rejected_rows)})
    counts["dropped_identical_tokens"] = encoded.dropped_identical_tokens
    counts["truncated"] = encoded.truncated
    manifest = {**manifest, "counts": counts}
    atomic_write_json(output_dir / MANIFEST_FILE, manifest)
    return counts
