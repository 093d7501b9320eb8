"""Pairwise judges that turn (instruction, reference output, model output) into alpaca_eval preferences.

Three judges write the same annotation records (alpaca_eval's fields
``instruction``, ``output_1`` = reference, ``generator_1``, ``output_2`` =
model, ``generator_2``, ``dataset``, ``annotator``, ``preference``):

- ``LocalJudge``: an offline judge built on any causal LM. It shows both
  responses under the labels A and B, reads the next-token probabilities of the
  two labels, and does so for both presentation orders. With ``q_ref_first``
  = P(model's label) / (P(A) + P(B)) when the reference is shown as A, and
  ``q_model_first`` the same when the model's answer is shown as A, the
  preference is ``1 + (q_ref_first + q_model_first) / 2`` in [1, 2].
  Swapping reference and model swaps the two orders and replaces each q by
  1 - q, so the preference p becomes exactly 3 - p in exact arithmetic; the
  computed values agree up to floating-point rounding of the forward passes.
- ``annotate_with_alpaca_eval``: alpaca_eval's standard AlpacaEval 2 annotator
  (weighted GPT-4-turbo) through an OpenAI-compatible endpoint.
- ``load_annotations``: annotations written earlier, reused as they are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coala.alpaca import AlignedRow, AlpacaDataError, align_on_instruction, read_records
from coala.io import PathLike

logger = logging.getLogger(__name__)

ALPACA_EVAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
LABELS = ("A", "B")

JUDGE_PROMPT = """Which response follows the instruction better: more helpful, accurate and complete, without needless length?

Instruction:
{instruction}

Response A:
{response_a}

Response B:
{response_b}

Reply with the single letter A or B."""

# Appended after the prompt for a model without a chat template; the label then follows a space.
PLAIN_ANSWER_CUE = "\n\nBetter response:"


class JudgeError(ValueError):
    """A judge that cannot run with the given model, settings or annotations."""


# ---------------------------------------------------------------------------
# Local LM judge


@dataclass(frozen=True)
class LocalJudgement:
    """Preferences of the local judge for n pairs, each array of shape (n,).

    Attributes:
      preference: ``1 + (q_ref_first + q_model_first) / 2`` in [1, 2]; 2 means the model's output wins.
      q_ref_first: probability of the model's label with the reference shown as A.
      q_model_first: probability of the model's label with the model's output shown as A.
      label_mass: mean over both orders of P(A) + P(B) under the full next-token
        distribution; a small value means the judge rarely outputs a label.
    """

    preference: np.ndarray
    q_ref_first: np.ndarray
    q_model_first: np.ndarray
    label_mass: np.ndarray


class LocalJudge:
    """Pairwise judge reading label probabilities of a local causal LM (see the module docstring).

    Args:
      model: a transformers causal LM in eval mode.
      tokenizer: its tokenizer.
      batch_size: prompts per forward pass (each pair needs two prompts).
      max_response_tokens: each response and the instruction are cut to this
        many tokens before they go into the prompt, identically in both orders.
      name: recorded in the annotations' ``annotator`` field.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_response_tokens: int = 384, name: str = "local") -> None:
        if batch_size <= 0:
            raise JudgeError(f"batch_size must be positive, got {batch_size}.")
        if max_response_tokens <= 0:
            raise JudgeError(f"max_response_tokens must be positive, got {max_response_tokens}.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_response_tokens = max_response_tokens
        self.name = name
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.label_ids = self._label_token_ids()

    def _label_token_ids(self) -> tuple[int, int]:
        ids = []
        for label in LABELS:
            text = label if self.uses_chat_template else f" {label}"
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) != 1:
                raise JudgeError(
                    f"The judge's tokenizer splits the label {text!r} into {len(encoded)} tokens {encoded}; "
                    "the local judge needs single-token labels. Use another judge model."
                )
            ids.append(int(encoded[0]))
        if ids[0] == ids[1]:
            raise JudgeError(f"The labels {LABELS} map to the same token id {ids[0]}; use another judge model.")
        return ids[0], ids[1]

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_response_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_response_tokens]) + " [...]"

    def build_prompt(self, instruction: str, response_a: str, response_b: str) -> str:
        """Render the judge prompt for one presentation order, ending where the label token follows."""
        content = JUDGE_PROMPT.format(instruction=instruction, response_a=response_a, response_b=response_b)
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content + PLAIN_ANSWER_CUE

    def label_probabilities(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Return P(A), P(B) under the next-token distribution after each prompt, shape (len(prompts), 2)."""
        import torch
        from tqdm.auto import tqdm

        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
        # Longest first, so each batch contains prompts of similar length and little padding.
        order = sorted(range(len(prompts)), key=lambda index: -len(encoded[index]))
        device = next(self.model.parameters()).device
        result = np.zeros((len(prompts), 2), dtype=np.float64)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="judge", unit="batch", disable=not progress):
            batch = order[start : start + self.batch_size]
            width = max(len(encoded[index]) for index in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = encoded[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            # Left padding shifts positions unless they are counted from each row's first real token.
            positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    position_ids=positions.to(device),
                    logits_to_keep=1,
                ).logits[:, -1, :]
            probabilities = torch.softmax(logits.float(), dim=-1)[:, list(self.label_ids)]
            result[batch] = probabilities.cpu().numpy().astype(np.float64)
        return result

    def judge(self, instructions: Sequence[str], references: Sequence[str], outputs: Sequence[str], progress: bool = False) -> LocalJudgement:
        """Judge each model output against its reference in both orders; arrays of shape (n,)."""
        if not (len(instructions) == len(references) == len(outputs)):
            raise JudgeError(f"Got {len(instructions)} instructions, {len(references)} references and {len(outputs)} outputs.")
        prompts = []
        for instruction, reference, output in zip(instructions, references, outputs):
            instruction, reference, output = (self._truncate(text) for text in (instruction, reference, output))
            prompts.append(self.build_prompt(instruction, reference, output))
            prompts.append(self.build_prompt(instruction, output, reference))
        probabilities = self.label_probabilities(prompts, progress=progress)
        ref_first, model_first = probabilities[0::2], probabilities[1::2]
        mass = np.concatenate([ref_first.sum(axis=1, keepdims=True), model_first.sum(axis=1, keepdims=True)], axis=1)
        if np.any(mass <= 0):
            raise JudgeError("The judge gave zero probability to both labels for some prompt; use another judge model.")
        q_ref_first = ref_first[:, 1] / mass[:, 0]
        q_model_first = model_first[:, 0] / mass[:, 1]
        preference = 1.0 + (q_ref_first + q_model_first) / 2.0
        return LocalJudgement(preference, q_ref_first, q_model_first, mass.mean(axis=1))

    def annotate(self, rows: Sequence[AlignedRow], progress: bool = False) -> list[dict[str, Any]]:
        """Judge aligned rows and return alpaca_eval-style annotation records (reference = ``output_1``)."""
        judgement = self.judge(
            [row.instruction for row in rows],
            [row.reference["output"] for row in rows],
            [row.model["output"] for row in rows],
            progress=progress,
        )
        records = []
        for index, row in enumerate(rows):
            record = _pair_record(row, self.name)
            record.update(
                preference=float(judgement.preference[index]),
                preference_reference_first=float(1.0 + judgement.q_ref_first[index]),
                preference_model_first=float(1.0 + judgement.q_model_first[index]),
                label_probability_mass=float(judgement.label_mass[index]),
            )
            records.append(record)
        return records


def _pair_record(row: AlignedRow, annotator: str) -> dict[str, Any]:
    return {
        "instruction": row.instruction,
        "output_1": row.reference["output"],
        "generator_1": row.reference.get("generator", "reference"),
        "output_2": row.model["output"],
        "generator_2": row.model.get("generator", "model"),
        "dataset": row.model.get("dataset", row.reference.get("dataset", "alpaca_eval")),
        "annotator": annotator,
    }


# ---------------------------------------------------------------------------
# Reused annotations


def load_annotations(path: PathLike, rows: Sequence[AlignedRow] | None = None) -> list[dict[str, Any]]:
    """Read annotations written earlier, optionally matched to the current model outputs.

    Args:
      path: a JSON/JSONL(.gz) list of records with ``instruction``, ``output_1``,
        ``output_2`` and ``preference``.
      rows: when given, the aligned outputs being judged; every one must have
        an annotation of the same instruction whose ``output_2`` is its output.

    Returns:
      The annotation records, in the order of ``rows`` when given.
    """
    records = read_records(path)
    for number, record in enumerate(records):
        missing = [key for key in ("instruction", "output_1", "output_2", "preference") if key not in record]
        if missing:
            raise AlpacaDataError(f"Annotation {number} of {path} lacks {missing}; it is not an alpaca_eval annotations file.")
    if rows is None:
        return records

    by_instruction: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["instruction"] in by_instruction:
            raise AlpacaDataError(f"{path} annotates the instruction {record['instruction'][:60]!r} more than once.")
        by_instruction[record["instruction"]] = record
    missing_rows = [row.instruction for row in rows if row.instruction not in by_instruction]
    if missing_rows:
        raise AlpacaDataError(f"{path} has no annotation for {len(missing_rows)} of {len(rows)} outputs, e.g. {missing_rows[0][:60]!r}.")
    stale = [row.instruction for row in rows if by_instruction[row.instruction]["output_2"] != row.model["output"]]
    if stale:
        raise AlpacaDataError(
            f"{len(stale)} annotations in {path} judge a different output_2 than the current outputs, "
            f"e.g. for {stale[0][:60]!r}; judge the outputs again."
        )
    return [by_instruction[row.instruction] for row in rows]


def align_annotations_to_reference(
    annotations: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]
) -> list[int]:
    """Return each annotation's position in ``reference`` (joined on instruction text)."""
    model_side = [{"instruction": record["instruction"], "output": record["output_2"]} for record in annotations]
    return [row.position for row in align_on_instruction(model_side, reference)]


# ---------------------------------------------------------------------------
# alpaca_eval's annotator (network)


def annotate_with_alpaca_eval(rows: Sequence[AlignedRow], annotators_config: str = ALPACA_EVAL_ANNOTATOR) -> list[dict[str, Any]]:
    """Annotate aligned rows with alpaca_eval's ``PairwiseAnnotator`` (default: weighted GPT-4-turbo).

    The endpoint and key come from alpaca_eval's own settings: the environment
    variable ``OPENAI_API_KEY`` or a client config file named by
    ``OPENAI_CLIENT_CONFIG_PATH`` (any OpenAI-compatible server).

    NOTE: this path needs a network and an API key, so the test suite does not run it.
    """
    has_key = any(os.environ.get(name) for name in ("OPENAI_API_KEY", "OPENAI_API_KEYS"))
    config_path = os.environ.get("OPENAI_CLIENT_CONFIG_PATH")
    if not has_key and not (config_path and Path(config_path).is_file()):
        raise JudgeError(
            "--judge alpaca_eval needs an OpenAI-compatible endpoint: set OPENAI_API_KEY, or OPENAI_CLIENT_CONFIG_PATH "
            "to an alpaca_eval client config file. Use --judge local:MODEL for an offline judge."
        )
    from coala.winrate import import_alpaca_eval_metrics

    import_alpaca_eval_metrics()  # checks that pkg_resources is available before the annotator imports it
    from alpaca_eval.annotators import PairwiseAnnotator

    annotator = PairwiseAnnotator(annotators_config=annotators_config)
    outputs_1 = [dict(instruction=row.instruction, output=row.reference["output"], generator=row.reference.get("generator", "reference")) for row in rows]
    outputs_2 = [dict(instruction=row.instruction, output=row.model["output"], generator=row.model.get("generator", "model")) for row in rows]
    annotated = annotator.annotate_head2head(outputs_1=outputs_1, outputs_2=outputs_2, keys_to_merge=["instruction"], is_ordered=True)
    datasets = {row.instruction: row.model.get("dataset", row.reference.get("dataset")) for row in rows}
    for record in annotated:
        record.setdefault("dataset", datasets.get(record["instruction"]))
        record.setdefault("annotator", annotators_config)
    return list(annotated)
