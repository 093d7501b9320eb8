"""AlpacaEval data: the eval set, the ``model_outputs.json`` format, resumable generation, alignment.

``model_outputs.json`` is AlpacaEval's format: a JSON list of records with
``instruction``, ``output``, ``generator`` and ``dataset``. Generation rewrites
the file atomically after every batch, so a restarted run skips the
instructions that already have an output.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from coala.io import PathLike, atomic_write_json

logger = logging.getLogger(__name__)

MODEL_OUTPUTS_FILE = "model_outputs.json"
HUB_EVAL_SET = "tatsu-lab/alpaca_eval"
HUB_EVAL_CONFIG = "alpaca_eval_gpt4_baseline"

# Generate one batch: (instructions, first_index) -> outputs. ``first_index`` is the batch's position in
# the eval set, which the driver uses to derive the batch's seed.
BatchGenerator = Callable[[list[str], int], list[str]]


class AlpacaDataError(ValueError):
    """An eval set, outputs file or annotations file that cannot be used as given."""


@dataclass(frozen=True)
class AlignedRow:
    """One instruction present in both the model outputs and the reference.

    Attributes:
      instruction: the shared instruction text.
      model: the model's record (``output``, ``generator``, ...).
      reference: the reference record.
      position: the instruction's position in the reference file (AlpacaEval's
        instruction index when the reference is the official 805-instruction set).
    """

    instruction: str
    model: dict[str, Any]
    reference: dict[str, Any]
    position: int


# ---------------------------------------------------------------------------
# Reading and writing records


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """Read a list of records from JSON, JSONL, or either gzipped (``.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise AlpacaDataError(f"File not found: {path}. Pass a JSON/JSONL file (optionally .gz) of records.")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    try:
        if stem_suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise AlpacaDataError(f"{path} is not valid JSON/JSONL: {error}") from error
    if isinstance(records, dict):
        records = [dict(zip(records, values)) for values in zip(*records.values())] if _is_columnar(records) else [records]
    if not isinstance(records, list) or not all(isinstance(row, dict) for row in records):
        raise AlpacaDataError(f"{path} must contain a list of JSON objects (records).")
    return records


def _is_columnar(payload: dict[str, Any]) -> bool:
    return bool(payload) and all(isinstance(value, list) for value in payload.values())


def load_eval_set(source: str, max_instances: int | None = None) -> list[dict[str, Any]]:
    """Load AlpacaEval instructions (and reference outputs when present) from a file or a hub id.

    Args:
      source: a JSON/JSONL(.gz) file with an ``instruction`` field per record
        (and ``output`` for a reference), or a Hugging Face data set id
        (``tatsu-lab/alpaca_eval`` loads its ``alpaca_eval_gpt4_baseline``
        config, which needs a reachable hub).
      max_instances: keep only the first this many records.

    Returns:
      Records with at least ``instruction`` (str) and ``dataset``.
    """
    if max_instances is not None and max_instances <= 0:
        raise AlpacaDataError(f"max_instances must be positive, got {max_instances}.")
    if Path(source).exists():
        records = read_records(source)
    else:
        records = _load_hub_eval_set(source)
    for number, row in enumerate(records):
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise AlpacaDataError(f"Record {number} of {source} has no non-empty string 'instruction'.")
        row.setdefault("dataset", "alpaca_eval")
    if not records:
        raise AlpacaDataError(f"{source} contains no records.")
    return records[:max_instances] if max_instances else records


def _load_hub_eval_set(source: str) -> list[dict[str, Any]]:
    import datasets

    config = HUB_EVAL_CONFIG if source == HUB_EVAL_SET else None
    try:
        data = datasets.load_dataset(source, config, split="eval")
    except Exception as error:  # datasets raises many types for an unreachable hub or unknown id
        raise AlpacaDataError(
            f"Could not load the eval set {source!r}: it is not a local file and the hub load failed ({error}). "
            "Pass --eval_set with a local JSON/JSONL file."
        ) from error
    return [dict(row) for row in data]


def load_model_outputs(path: PathLike) -> list[dict[str, Any]]:
    """Read a ``model_outputs.json`` and check every record has string ``instruction`` and ``output``."""
    records = read_records(path)
    for number, row in enumerate(records):
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise AlpacaDataError(f"Record {number} of {path} has no string {key!r}; it is not AlpacaEval's model_outputs format.")
    return records


def write_model_outputs(path: PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Write records in AlpacaEval's format atomically."""
    return atomic_write_json(path, list(records))


# ---------------------------------------------------------------------------
# Alignment


def align_on_instruction(
    model_records: Sequence[dict[str, Any]],
    reference_records: Sequence[dict[str, Any]],
) -> list[AlignedRow]:
    """Join model outputs and reference outputs on the exact instruction text.

    Every model instruction must appear exactly once in the reference; a
    reference instruction without a model output is allowed (a subset run, for
    example ``--max_instances``) and logged.

    Raises:
      AlpacaDataError: duplicated instructions on either side, model
        instructions missing from the reference, or no match at all; the
        message gives the count and the first few instructions.
    """
    for side, records in (("model outputs", model_records), ("reference", reference_records)):
        duplicates = _duplicates([row["instruction"] for row in records])
        if duplicates:
            raise AlpacaDataError(
                f"The {side} contain {len(duplicates)} duplicated instructions, e.g. {_preview(duplicates)}; "
                "each instruction must appear once."
            )

    positions = {row["instruction"]: index for index, row in enumerate(reference_records)}
    missing = [row["instruction"] for row in model_records if row["instruction"] not in positions]
    matched = len(model_records) - len(missing)
    if matched == 0:
        raise AlpacaDataError(
            f"None of the {len(model_records)} model instructions appear in the reference's "
            f"{len(reference_records)} instructions; check that both files come from the same eval set."
        )
    if missing:
        raise AlpacaDataError(
            f"{len(missing)} of {len(model_records)} model instructions are missing from the reference, "
            f"e.g. {_preview(missing)}. Judge against the reference of the same eval set."
        )

    rows = [
        AlignedRow(row["instruction"], row, reference_records[positions[row["instruction"]]], positions[row["instruction"]])
        for row in model_records
    ]
    unanswered = len(reference_records) - len(rows)
    if unanswered:
        logger.info("Judging %d of %d reference instructions (%d have no model output)", len(rows), len(reference_records), unanswered)
    return rows


def _duplicates(values: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    duplicates: dict[str, None] = {}
    for value in values:
        if value in seen:
            duplicates[value] = None
        seen.add(value)
    return list(duplicates)


def _preview(instructions: Sequence[str], count: int = 3) -> str:
    shown = [repr(text[:60] + ("..." if len(text) > 60 else "")) for text in instructions[:count]]
    return ", ".join(shown)


# ---------------------------------------------------------------------------
# Prompts and resumable generation


def generate_outputs(
    eval_records: Sequence[dict[str, Any]],
    generate_batch: BatchGenerator,
    output_path: PathLike,
    generator_name: str,
    batch_size: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate an output for every eval instruction not yet in ``output_path``, rewriting the file after each batch.

    Args:
      eval_records: records with ``instruction`` and ``dataset``.
      generate_batch: produces one output per instruction of a batch.
      output_path: the ``model_outputs.json`` to create or resume.
      generator_name: the ``generator`` field written with each output.
      batch_size: prompts per call of ``generate_batch``.

    Returns:
      All records of ``output_path`` after the run, in eval-set order.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise AlpacaDataError(f"batch_size must be positive, got {batch_size}.")
    output_path = Path(output_path)
    done: dict[str, dict[str, Any]] = {}
    if output_path.is_file():
        previous = load_model_outputs(output_path)
        eval_instructions = {row["instruction"] for row in eval_records}
        stale = [row["instruction"] for row in previous if row["instruction"] not in eval_instructions]
        if stale:
            raise AlpacaDataError(
                f"{output_path} contains {len(stale)} instructions that are not in this eval set, e.g. {_preview(stale)}. "
                "Use a new --output_dir for a different eval set."
            )
        done = {row["instruction"]: row for row in previous}
        logger.info("Resuming: %d of %d instructions already have outputs in %s", len(done), len(eval_records), output_path)

    todo = [index for index, row in enumerate(eval_records) if row["instruction"] not in done]
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        outputs = generate_batch([eval_records[index]["instruction"] for index in batch], batch[0])
        if len(outputs) != len(batch):
            raise RuntimeError(f"The generator returned {len(outputs)} outputs for a batch of {len(batch)} prompts.")
        for index, text in zip(batch, outputs):
            record = eval_records[index]
            done[record["instruction"]] = {
                "instruction": record["instruction"],
                "output": text,
                "generator": generator_name,
                "dataset": record.get("dataset", "alpaca_eval"),
            }
        write_model_outputs(output_path, _in_eval_order(eval_records, done))

    result = _in_eval_order(eval_records, done)
    if not batches:
        write_model_outputs(output_path, result)
    return result


def _in_eval_order(eval_records: Sequence[dict[str, Any]], done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [done[row["instruction"]] for row in eval_records if row["instruction"] in done]


# ---------------------------------------------------------------------------
# Samplers


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings shared by plain and head-guided generation.

    Attributes:
      max_new_tokens: generated tokens per output (the same for every method).
      temperature: softmax temperature (> 0).
      top_p: nucleus mass kept before sampling.
      top_k: most likely tokens kept before sampling.
      seed: base seed; the batch starting at eval-set position ``i`` uses ``seed + i``,
        so a resumed run samples the same answers as an uninterrupted one with the same batches.
      batch_size: prompts decoded together.
      guidance_scale: weight lambda of the min-max normalized head scores (guided only).
      guide_every: apply the head every this many tokens (guided only).
      num_candidates: candidate tokens scored by the head (guided only).
    """

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0
    batch_size: int = 8
    guidance_scale: float = 1.0
    guide_every: int = 5
    num_candidates: int = 5

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens > 0,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "batch_size": self.batch_size > 0,
            "guide_every": self.guide_every > 0,
            "num_candidates": self.num_candidates > 0,
        }
        for name, valid in checks.items():
            if not valid:
                raise AlpacaDataError(f"Invalid {name}={getattr(self, name)!r}; see --help for the valid range.")


def make_batch_generator(model: Any, tokenizer: Any, settings: SamplingSettings, head_dir: PathLike | None = None) -> BatchGenerator:
    """Return a ``BatchGenerator`` that decodes with ``coala.guided.generate``, steered by a head when given.

    Plain and guided runs go through the same sampler so that their only
    difference is the head. The prompts passed to the returned function are raw
    instructions; the sampler applies the tokenizer's chat template.
    """
    from coala import guided

    head = guided.PreferenceHead.from_dir(head_dir, model, tokenizer) if head_dir is not None else None
    config = guided.GuidanceConfig(
        guidance_scale=settings.guidance_scale,
        guide_every=settings.guide_every,
        num_candidates=settings.num_candidates,
        top_k=settings.top_k,
        top_p=settings.top_p,
        temperature=settings.temperature,
    )

    def generate_batch(prompts: list[str], first_index: int) -> list[str]:
        outputs = guided.generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=settings.max_new_tokens,
            seed=settings.seed + first_index,
            head=head,
            config=config,
            batch_size=settings.batch_size,
        )
        return [text.strip() for text in outputs]

    return generate_batch

