"""Preference data: every accepted input format turned into aligned triplets or labeled texts.

Entry points:

    load_preferences(source, ...) -> PreferenceData
    preferences_from_records(records, ...) -> PreferenceData   (in-memory records, same parsers)
    assign_split(key, seed, fractions) -> "train" | "validation" | "test"
    split_key(item) -> the text a split is assigned by (the prompt, or the id when there is none)
    alternating_population(turns) -> list[(prompt_turns, chosen, rejected)]
    render_messages(messages) -> "Student: ...\\nTutor: ..."

Accepted sources (``datasets/README.md`` has a one-record example of each):

* a JSON array or JSONL file (optionally ``.gz``) whose records hold
  - ``prompt``, ``chosen``, ``rejected``: triplets. Each may be a string or a chat
    message list ``[{"role", "content"}, ...]``. In a list the last assistant message
    is the response and the earlier messages are the prompt (UltraFeedback-binarized).
  - ``chosen``, ``rejected`` only: Anthropic HH-RLHF transcripts. The prompt is the text
    up to and including the last ``"\\n\\nAssistant:"`` turn both transcripts share,
    and each response is the rest of its transcript.
  - ``turns`` / ``messages`` / ``conversation`` / ``conversations``: student-tutor
    conversations, turned into triplets by the Alternating Population Strategy.
  - ``text``, ``label``: unpaired texts (IMDb: 1 positive, 0 negative).
  - ``prompt``, ``response``, ``helpfulness``: HelpSteer ratings, binarized per prompt.
* a folder (rules in ``_resolve_folder``): ``pos/`` + ``neg/`` text files, or one data file.
* a Hugging Face dataset id, loaded with ``datasets.load_dataset`` (see ``HUB_ADAPTERS``).

Every record is checked before any model work: a bad record raises ``DataError``
naming the file, the record (the 1-based line for JSONL) and the field.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coala.io import atomic_write_text, sha256_path

logger = logging.getLogger(__name__)

OFFLINE_DATA_ENV = "COALA_OFFLINE_DATA"


def offline_data_dir() -> Path:
    """Return the folder of the offline data files (``hh-rlhf/``, ``alpaca_eval/``).

    ``$COALA_OFFLINE_DATA`` when set, else ``shared/data`` next to the repository folder.
    """
    configured = os.environ.get(OFFLINE_DATA_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

HH_ASSISTANT_MARKER = "\n\nAssistant:"
CONVERSATION_KEYS = ("turns", "messages", "conversation", "conversations")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")

# Roles accepted in chat lists and conversations, and the chat-template role each maps to.
ROLE_TO_CHAT_ROLE = {
    "student": "user",
    "user": "user",
    "human": "user",
    "tutor": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
ROLE_LABELS = {"student": "Student", "user": "User", "human": "Human", "tutor": "Tutor",
               "assistant": "Assistant", "gpt": "Assistant", "system": "System"}


class DataError(ValueError):
    """Invalid preference data. The message names the file, the record number and the field."""


class EmptyTextError(DataError):
    """A text field that is present but empty or whitespace only."""


@dataclass(frozen=True)
class Triplet:
    """One preference pair.

    Attributes:
      prompt: the prompt text (for chat data, the conversation so far rendered as text;
        see ``prompt_messages``).
      chosen: the preferred response.
      rejected: the dispreferred response.
      pair_id: a stable id, e.g. ``"train.jsonl:17"`` or ``"conv-03:turn-2"``.
      prompt_messages: the prompt as chat messages ``[{"role", "content"}, ...]``
        when the source had structure (conversations, chat lists), else ``None``.
    """

    prompt: str
    chosen: str
    rejected: str
    pair_id: str
    prompt_messages: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class LabeledText:
    """One unpaired text with a label: +1 positive (chosen-like), -1 negative."""

    text: str
    label: int
    text_id: str
    prompt: str = ""


@dataclass
class PreferenceData:
    """Loaded preference data.

    Attributes:
      source: the path or hub id it came from.
      format: one of "triplets-json", "hh-rlhf", "pos-neg", "conversations", "labeled-json",
        "helpsteer-json", "hf:<id>".
      paired: ``True`` when ``triplets`` is filled, ``False`` for ``texts``.
      triplets: aligned (prompt, chosen, rejected) records.
      texts: unpaired labeled texts.
      dropped: counts of records dropped and why, e.g. ``{"identical": 3}``.
      content_hash: SHA-256 of the source bytes (or of the hub id, split and fingerprint).
    """

    source: str
    format: str
    paired: bool
    triplets: list[Triplet] = field(default_factory=list)
    texts: list[LabeledText] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    content_hash: str = ""

    def __len__(self) -> int:
        return len(self.triplets) if self.paired else len(self.texts)


# A record on its way to a parser: (location for errors, default id, the record itself).
# The location reads like "data/train.jsonl line 3"; the default id like "train.jsonl:3".
Record = tuple[str, str, dict[str, Any]]


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------


def validate_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Return ``fractions`` as a (train, validation, test) tuple after checking them.

    Raises:
      ValueError: unless there are exactly 3 finite, non-negative numbers summing to 1.
    """
    values = tuple(float(value) for value in fractions)
    if len(values) != 3:
        raise ValueError(f"Split fractions need 3 values (train, validation, test), got {len(values)}: {values}.")
    if any(not math.isfinite(value) or value < 0 for value in values):
        raise ValueError(f"Split fractions must be finite and non-negative, got {values}.")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"Split fractions must sum to 1, got {values} (sum {sum(values):.6g}).")
    return values  # type: ignore[return-value]


def assign_split(key: str, seed: int, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """Return the split ("train", "validation" or "test") of ``key`` under ``seed``.

    The SHA-256 of the seed and the key, read as a number in [0, 1), is compared with
    the cumulative fractions. The result depends only on (key, seed, fractions), so
    every pair with the same prompt lands in the same split, on any machine.
    """
    train, validation, _ = validate_split_fractions(fractions)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"Split seed must be an integer, got {seed!r}.")
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    if position < train:
        return SPLIT_NAMES[0]
    if position < train + validation:
        return SPLIT_NAMES[1]
    return SPLIT_NAMES[2]


def split_key(item: Triplet | LabeledText) -> str:
    """Return the text a split is assigned by: the prompt, or the item's id when the prompt is empty.

    Data without prompts (pos/neg folders, IMDb reviews) would otherwise all share the key
    ``""`` and land in one split.

    NOTE: triplets of one conversation have different prompts, so they may land in different
    splits. A later turn's prompt then contains an earlier turn's chosen answer as history.
    """
    if item.prompt:
        return item.prompt
    return item.pair_id if isinstance(item, Triplet) else item.text_id


# ----------------------------------------------------------------------------------------
# Chat messages and the Alternating Population Strategy
# ----------------------------------------------------------------------------------------


def render_messages(messages: Sequence[dict[str, str]]) -> str:
    """Render chat messages as plain text, one ``"Role: content"`` line per message.

    Used as ``Triplet.prompt`` when the prompt has several messages; the roles keep
    their source names (``Student``/``Tutor``, ``User``/``Assistant``).
    """
    lines = []
    for message in messages:
        role = message["role"]
        label = ROLE_LABELS.get(role, role.capitalize())
        lines.append(f"{label}: {message['content']}")
    return "\n".join(lines)


def prompt_text(messages: Sequence[dict[str, str]]) -> str:
    """Return the prompt text of a message list: the content of a lone user message, else the rendering."""
    if len(messages) == 1 and ROLE_TO_CHAT_ROLE.get(messages[0]["role"]) == "user":
        return messages[0]["content"]
    return render_messages(messages)


def to_chat_messages(messages: Sequence[dict[str, str]]) -> tuple[dict[str, str], ...]:
    """Return the messages with chat-template roles (student -> user, tutor -> assistant)."""
    return tuple({"role": ROLE_TO_CHAT_ROLE[m["role"]], "content": m["content"]} for m in messages)


def normalize_messages(value: Any, where: str, field_name: str) -> list[dict[str, str]]:
    """Check a chat message list and return it as ``[{"role", "content"}]`` with lower-case roles.

    Accepts ``{"role", "content"}`` and ShareGPT-style ``{"from", "value"}`` messages.
    """
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, field '{field_name}': expected a non-empty list of chat messages, "
                        f"got {_describe(value)}.")
    messages = []
    for index, message in enumerate(value, start=1):
        spot = f"{where}, field '{field_name}', message {index}"
        if not isinstance(message, dict):
            raise DataError(f"{spot}: expected an object with 'role' and 'content', got {_describe(message)}.")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_TO_CHAT_ROLE:
            raise DataError(f"{spot}: invalid role {role!r}. Use one of {sorted(ROLE_TO_CHAT_ROLE)}.")
        if not isinstance(content, str):
            raise DataError(f"{spot}: missing or non-string 'content' ({_describe(content)}).")
        if not content.strip():
            raise DataError(f"{spot}: empty text. Fill in the message or remove the record.")
        messages.append({"role": role.lower(), "content": content})
    return messages


def alternating_population(
    turns: Sequence[dict[str, str]],
) -> list[tuple[list[dict[str, str]], str, str]]:
    """Turn one conversation into preference triplets by the Alternating Population Strategy.

    Turns alternate student, tutor, student, tutor, ... and ``user``/``assistant`` are accepted
    as the same roles. An optional first ``system`` turn joins every prompt. Triplet k has
    prompt = the conversation up to and including student turn k, chosen = tutor turn k
    and rejected = tutor turn k + 1, so T tutor turns give T - 1 triplets. A final student
    turn without a tutor reply is ignored.

    Returns:
      ``(prompt_turns, chosen, rejected)`` tuples. ``prompt_turns`` keeps the roles as given.

    Raises:
      DataError: when the roles do not alternate or a turn is malformed; the message names the turn.
    """
    messages = normalize_messages(list(turns), "conversation", "turns")
    start = 1 if messages[0]["role"] == "system" else 0
    body = messages[start:]
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if ROLE_TO_CHAT_ROLE[message["role"]] != expected:
            expected_role = "student (or user)" if expected == "user" else "tutor (or assistant)"
            raise DataError(f"turn {start + index + 1}: invalid role {message['role']!r}, expected "
                            f"{expected_role}. Conversations start with a student turn and alternate.")

    tutor_positions = [start + index for index in range(1, len(body), 2)]
    triplets = []
    for k in range(len(tutor_positions) - 1):
        chosen_at, rejected_at = tutor_positions[k], tutor_positions[k + 1]
        prompt = [dict(message) for message in messages[:chosen_at]]
        triplets.append((prompt, messages[chosen_at]["content"], messages[rejected_at]["content"]))
    return triplets


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_bytes(path: Path) -> bytes:
    try:
        if _is_gzip(path):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read ({error}). Check that it is a complete, valid file.") from error


def _iter_jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as handle:
            yield from enumerate(handle, start=1)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read ({error}). Check that it is a complete, valid file.") from error


def iter_file_records(path: Path) -> Iterator[Record]:
    """Yield ``(location, default_id, record)`` for every record of a JSON or JSONL file (gzip allowed).

    JSONL records are numbered by their 1-based line; blank lines are skipped. A JSON file
    must hold an array of objects, numbered from 1.
    """
    name = path.name
    stem = re.sub(r"(\.jsonl|\.json)?(\.gz)?$", "", name)
    if re.search(r"\.jsonl(\.gz)?$", name.lower()):
        for number, raw in _iter_jsonl_lines(path):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: invalid UTF-8 at byte {error.start} of the line. "
                                "Re-encode the file as UTF-8.") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}).") from error
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {_describe(record)}.")
            yield where, f"{stem}:{number}", record
        return

    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: invalid UTF-8 at byte {error.start} (line {line}). "
                        "Re-encode the file as UTF-8.") from error
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from error
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(content).__name__}. "
                        "Wrap the records in [...] or write one object per line as JSONL.")
    for number, record in enumerate(content, start=1):
        where = f"{path} record {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {_describe(record)}.")
        yield where, f"{stem}:{number}", record


def detect_schema(record: dict[str, Any], where: str) -> str:
    """Return the schema of a record: "triplets", "hh-rlhf", "conversations", "labeled" or "helpsteer"."""
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "triplets" if "prompt" in keys else "hh-rlhf"
    if keys & set(CONVERSATION_KEYS):
        return "conversations"
    if {"text", "label"} <= keys:
        return "labeled"
    if {"prompt", "response", "helpfulness"} <= keys:
        return "helpsteer"
    raise DataError(
        f"{where}: unknown record schema with fields {sorted(keys)}. Expected prompt/chosen/rejected "
        f"(triplets), chosen/rejected (HH-RLHF transcripts), one of {list(CONVERSATION_KEYS)} "
        "(conversations), text/label (unpaired texts) or prompt/response/helpfulness (HelpSteer)."
    )


# ----------------------------------------------------------------------------------------
# Record parsers: each turns a record stream into triplets or texts
# ----------------------------------------------------------------------------------------


def _get_field(record: dict[str, Any], name: str, where: str) -> Any:
    if name not in record or record[name] is None:
        raise DataError(f"{where}, field '{name}': missing. Every record of this file needs it.")
    return record[name]


def _get_text(record: dict[str, Any], name: str, where: str) -> str:
    value = _get_field(record, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}, field '{name}': expected a string, got {_describe(value)}.")
    if not value.strip():
        raise EmptyTextError(f"{where}, field '{name}': empty text. Fill it in or remove the record.")
    return value


def _record_id(record: dict[str, Any], default_id: str) -> str:
    value = record.get("id")
    return str(value) if isinstance(value, (str, int)) and str(value) else default_id


def _split_chat_response(value: list[Any], where: str, name: str) -> tuple[list[dict[str, str]], str]:
    messages = normalize_messages(value, where, name)
    if ROLE_TO_CHAT_ROLE[messages[-1]["role"]] != "assistant":
        raise DataError(f"{where}, field '{name}': the last message has role {messages[-1]['role']!r}, "
                        "but the response must be the last message and have role assistant (or tutor).")
    return messages[:-1], messages[-1]["content"]


def parse_triplet_record(record: dict[str, Any], where: str, pair_id: str) -> Triplet:
    """Build a ``Triplet`` from a prompt/chosen/rejected record (strings or chat message lists)."""
    responses: dict[str, str] = {}
    histories: dict[str, list[dict[str, str]]] = {}
    for name in ("chosen", "rejected"):
        value = _get_field(record, name, where)
        if isinstance(value, list):
            histories[name], responses[name] = _split_chat_response(value, where, name)
        else:
            responses[name] = _get_text(record, name, where)

    if histories.get("chosen") and histories.get("rejected") and histories["chosen"] != histories["rejected"]:
        raise DataError(f"{where}, field 'rejected': its earlier messages differ from those of 'chosen'. "
                        "Both responses must answer the same conversation.")
    history = histories.get("chosen") or histories.get("rejected") or []

    raw_prompt = _get_field(record, "prompt", where)
    if history:
        messages = history
    elif isinstance(raw_prompt, list):
        messages = normalize_messages(raw_prompt, where, "prompt")
    else:
        text = _get_text(record, "prompt", where)
        if not histories:
            return Triplet(text, responses["chosen"], responses["rejected"], pair_id)
        messages = [{"role": "user", "content": text}]
    return Triplet(prompt_text(messages), responses["chosen"], responses["rejected"], pair_id,
                   to_chat_messages(messages))


def split_hh_transcripts(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (prompt, chosen response, rejected response).

    The prompt is the text up to and including the last ``"\\n\\nAssistant:"`` that lies in
    the common beginning of both transcripts. When neither response contains that marker
    this is the last marker of each transcript. A few public HH-RLHF records have a
    response that itself contains ``"\\n\\nAssistant:"``, and for them the shared prefix
    keeps the prompt equal on both sides instead of cutting inside one response.
    """
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT_MARKER not in text:
            raise DataError(f"{where}, field '{name}': missing '\\n\\nAssistant:' turn, so this is not an "
                            "HH-RLHF transcript. Give prompt/chosen/rejected fields instead.")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(f"{where}, field 'rejected': the transcript shares no '\\n\\nAssistant:' turn with "
                        "'chosen', so the two do not answer the same prompt.")
    end = cut + len(HH_ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def _parse_triplets(records: Iterable[Record], dropped: Counter, drop_empty: bool = False) -> Iterator[Triplet]:
    for where, default_id, record in records:
        try:
            yield parse_triplet_record(record, where, _record_id(record, default_id))
        except EmptyTextError as error:
            if not drop_empty:
                raise EmptyTextError(f"{error} To drop such records and count them instead, "
                                     "pass drop_empty=True (extract.py: --drop_empty).") from error
            dropped["empty_text"] += 1


def _parse_hh(records: Iterable[Record], dropped: Counter) -> Iterator[Triplet]:
    for where, default_id, record in records:
        chosen = _get_text(record, "chosen", where)
        rejected = _get_text(record, "rejected", where)
        prompt, chosen_response, rejected_response = split_hh_transcripts(chosen, rejected, where)
        if not chosen_response.strip() or not rejected_response.strip():
            # The public HH-RLHF files hold a few transcripts whose last assistant turn is blank.
            dropped["empty_response"] += 1
            continue
        yield Triplet(prompt, chosen_response, rejected_response, _record_id(record, default_id))


def _parse_conversations(records: Iterable[Record], dropped: Counter) -> Iterator[Triplet]:
    for where, default_id, record in records:
        key = next((name for name in CONVERSATION_KEYS if name in record), None)
        if key is None:
            raise DataError(f"{where}, field 'turns': missing. Give the conversation as one of "
                            f"{list(CONVERSATION_KEYS)}.")
        turns = _get_field(record, key, where)
        if not isinstance(turns, list):
            raise DataError(f"{where}, field '{key}': expected a list of turns, got {_describe(turns)}.")
        try:
            derived = alternating_population(turns)
        except DataError as error:
            raise DataError(f"{where}, field '{key}': {error}") from error
        if not derived:
            dropped["fewer_than_two_tutor_turns"] += 1
        conversation_id = _record_id(record, default_id)
        for k, (prompt_turns, chosen, rejected) in enumerate(derived, start=1):
            yield Triplet(prompt_text(prompt_turns), chosen, rejected, f"{conversation_id}:turn-{k}",
                          to_chat_messages(prompt_turns))


def _parse_labeled(records: Iterable[Record], dropped: Counter, allowed: dict[Any, int] | None = None
                   ) -> Iterator[LabeledText]:
    labels = allowed or {1: 1, 0: -1, -1: -1}
    for where, default_id, record in records:
        text = _get_text(record, "text", where)
        raw_label = _get_field(record, "label", where)
        if isinstance(raw_label, bool) or raw_label not in labels:
            raise DataError(f"{where}, field 'label': invalid label {raw_label!r}. "
                            f"Use one of {sorted(labels)} (1 is positive).")
        prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else ""
        yield LabeledText(text, labels[raw_label], _record_id(record, default_id), prompt)


def _parse_helpsteer(records: Iterable[Record], dropped: Counter) -> Iterator[Triplet]:
    # Group the responses of each prompt, in the order prompts first appear.
    groups: dict[str, list[tuple[float, str, str]]] = {}
    for where, default_id, record in records:
        prompt = _get_text(record, "prompt", where)
        response = _get_text(record, "response", where)
        score = _get_field(record, "helpfulness", where)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{where}, field 'helpfulness': expected a number, got {_describe(score)}.")
        groups.setdefault(prompt, []).append((float(score), response, default_id))

    for prompt, responses in groups.items():
        if len(responses) < 2:
            dropped["single_response"] += 1
            continue
        best = max(responses, key=lambda item: item[0])
        worst = min(responses, key=lambda item: item[0])
        if best[0] == worst[0]:
            dropped["tie"] += 1
            continue
        yield Triplet(prompt, best[1], worst[1], f"{best[2]}/{worst[2]}")


PARSERS: dict[str, Callable[[Iterable[Record], Counter], Iterator[Any]]] = {
    "triplets": _parse_triplets,
    "hh-rlhf": _parse_hh,
    "conversations": _parse_conversations,
    "labeled": _parse_labeled,
    "helpsteer": _parse_helpsteer,
}
LOCAL_FORMATS = {
    "triplets": "triplets-json",
    "hh-rlhf": "hh-rlhf",
    "conversations": "conversations",
    "labeled": "labeled-json",
    "helpsteer": "helpsteer-json",
}


def _check_max_pairs(max_pairs: int | None) -> None:
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs must be a positive integer or None, got {max_pairs!r}.")


def _collect(items: Iterator[Any], max_pairs: int | None, dropped: Counter, source: str) -> list[Any]:
    """Keep the first ``max_pairs`` items, dropping triplets whose chosen equals rejected."""
    kept: list[Any] = []
    for item in items:
        if isinstance(item, Triplet) and item.chosen.strip() == item.rejected.strip():
            dropped["identical"] += 1
            continue
        kept.append(item)
        if max_pairs is not None and len(kept) >= max_pairs:
            break
    if dropped.get("identical"):
        logger.warning("%s: dropped %d pairs whose chosen and rejected texts are identical.",
                       source, dropped["identical"])
    other = {reason: count for reason, count in dropped.items() if reason != "identical" and count}
    if other:
        logger.info("%s: dropped records %s.", source, other)
    return kept


def preferences_from_records(
    records: Iterable[Record] | Iterable[dict[str, Any]],
    *,
    source: str = "<records>",
    format_name: str | None = None,
    schema: str | None = None,
    max_pairs: int | None = None,
    content_hash: str = "",
    label_map: dict[Any, int] | None = None,
    drop_empty: bool = False,
) -> PreferenceData:
    """Parse records (plain dicts, or ``(location, default_id, record)`` tuples) into ``PreferenceData``.

    This is the code path files and hub adapters share. ``schema`` (see ``detect_schema``)
    is detected from the first record when not given; ``label_map`` overrides the label
    mapping of "labeled" records. ``drop_empty`` drops triplets with an empty prompt,
    chosen or rejected text (counted as ``empty_text``) instead of raising.
    """
    _check_max_pairs(max_pairs)
    stream = iter(_as_records(records, source))
    first = next(stream, None)
    if first is None:
        raise DataError(f"{source}: no records found. Check that the file or split is not empty.")
    schema = schema or detect_schema(first[2], first[0])
    if schema not in PARSERS:
        raise ValueError(f"Unknown schema {schema!r}; expected one of {sorted(PARSERS)}.")

    def chained() -> Iterator[Record]:
        yield first
        yield from stream

    dropped: Counter = Counter()
    if schema == "labeled":
        items = _parse_labeled(chained(), dropped, label_map)
    elif schema == "triplets":
        items = _parse_triplets(chained(), dropped, drop_empty)
    else:
        items = PARSERS[schema](chained(), dropped)
    kept = _collect(items, max_pairs, dropped, source)
    paired = schema != "labeled"
    if not kept:
        raise DataError(f"{source}: no usable records remain after dropping {dict(dropped)}.")
    return PreferenceData(
        source=source,
        format=format_name or LOCAL_FORMATS[schema],
        paired=paired,
        triplets=kept if paired else [],
        texts=[] if paired else kept,
        dropped={reason: count for reason, count in dropped.items() if count},
        content_hash=content_hash,
    )


def _as_records(records: Iterable[Any], source: str) -> Iterator[Record]:
    for number, item in enumerate(records, start=1):
        if isinstance(item, tuple):
            yield item
        elif isinstance(item, dict):
            yield f"{source} record {number}", f"{source}:{number}", item
        else:
            raise DataError(f"{source} record {number}: expected an object, got {_describe(item)}.")


# ----------------------------------------------------------------------------------------
# Folders of pos/ and neg/ text files
# ----------------------------------------------------------------------------------------


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_text_file(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} record 1, field 'text': invalid UTF-8 at byte {error.start}. "
                        "Re-encode the file as UTF-8.") from error
    if not text.strip():
        raise DataError(f"{path} record 1, field 'text': empty text. Fill in the file or remove it.")
    return text


def load_pos_neg_folder(root: Path, pair_pos_neg: bool | None, max_pairs: int | None) -> PreferenceData:
    """Load a folder with ``pos/`` and ``neg/`` text files, one text per file.

    The texts are paired by file name when ``pair_pos_neg`` is true, or when it is ``None``
    and the two folders contain the same file names. Otherwise they stay unpaired, with
    label +1 for ``pos/`` and -1 for ``neg/``. Pairs have an empty prompt.
    """
    _check_max_pairs(max_pairs)
    positives, negatives = _text_files(root / "pos"), _text_files(root / "neg")
    if not positives or not negatives:
        raise DataError(f"{root}: 'pos/' holds {len(positives)} files and 'neg/' {len(negatives)}; both need text files.")
    pos_names, neg_names = [p.name for p in positives], [p.name for p in negatives]
    names_match = sorted(pos_names) == sorted(neg_names)
    if pair_pos_neg and not names_match:
        unmatched = sorted(set(pos_names) ^ set(neg_names))
        raise DataError(
            f"{root}: pairing was requested but 'pos/' has {len(pos_names)} files and 'neg/' {len(neg_names)}, "
            f"with {len(unmatched)} unmatched names (e.g. {unmatched[:3]}). Give each pos/ file a neg/ file of the "
            "same name, or load them unpaired (pair_pos_neg=False)."
        )
    paired = names_match if pair_pos_neg is None else pair_pos_neg
    content_hash = hashlib.sha256(
        (sha256_path(root / "pos") + sha256_path(root / "neg")).encode("ascii")
    ).hexdigest()
    dropped: Counter = Counter()

    if paired:
        def pairs() -> Iterator[Triplet]:
            for path in positives:
                yield Triplet("", _read_text_file(path), _read_text_file(root / "neg" / path.name), path.name)
        kept = _collect(pairs(), max_pairs, dropped, str(root))
        return PreferenceData(str(root), "pos-neg", True, triplets=kept,
                              dropped={k: v for k, v in dropped.items() if v}, content_hash=content_hash)

    def texts() -> Iterator[LabeledText]:
        for label, files in ((1, positives), (-1, negatives)):
            for path in files:
                yield LabeledText(_read_text_file(path), label, f"{path.parent.name}/{path.name}")
    # NOTE: max_pairs counts texts here, so a small value keeps only positives (pos/ is read first).
    kept = _collect(texts(), max_pairs, dropped, str(root))
    return PreferenceData(str(root), "pos-neg", False, texts=kept, content_hash=content_hash)


# ----------------------------------------------------------------------------------------
# Hugging Face hub ids
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubAdapter:
    """Mapping of one hub data set onto a local schema and split names.

    Attributes:
      schema: the record schema its rows follow (see ``detect_schema``).
      splits: hub split names to use for the loader's ``hf_split`` values, e.g. train -> train_prefs.
      label_map: for "labeled" data, hub label -> +1 / -1.
    """

    schema: str
    splits: dict[str, str] = field(default_factory=dict)
    label_map: dict[Any, int] | None = None


HUB_ADAPTERS: dict[str, HubAdapter] = {
    "huggingfaceh4/ultrafeedback_binarized": HubAdapter(
        "triplets", {"train": "train_prefs", "test": "test_prefs", "validation": "test_prefs"}),
    "anthropic/hh-rlhf": HubAdapter("hh-rlhf"),
    "stanfordnlp/imdb": HubAdapter("labeled", label_map={1: 1, 0: -1}),
    "imdb": HubAdapter("labeled", label_map={1: 1, 0: -1}),
    "nvidia/helpsteer": HubAdapter("helpsteer", {"test": "validation"}),
}
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_adapter(hub_id: str) -> HubAdapter | None:
    """Return the adapter of a hub id, or ``None`` to detect the schema from the first row.

    Ids containing "edufeedback" are read as conversations (the Alternating Population Strategy).
    """
    key = hub_id.lower()
    if key in HUB_ADAPTERS:
        return HUB_ADAPTERS[key]
    if "edufeedback" in key:
        return HubAdapter("conversations")
    return None


def preferences_from_hub_records(
    hub_id: str, rows: Iterable[dict[str, Any]], *, split: str = "train", max_pairs: int | None = None,
    content_hash: str = "",
) -> PreferenceData:
    """Parse rows in a hub data set's schema through its adapter (no network; tests call this directly)."""
    adapter = hub_adapter(hub_id)
    hub_split = adapter.splits.get(split, split) if adapter else split
    label = f"{hub_id}[{hub_split}]"
    records = ((f"{label} row {number}", f"{hub_id}:{hub_split}:{number}", dict(row))
               for number, row in enumerate(rows, start=1))
    return preferences_from_records(
        records,
        source=hub_id,
        format_name=f"hf:{hub_id}",
        schema=adapter.schema if adapter else None,
        max_pairs=max_pairs,
        content_hash=content_hash,
        label_map=adapter.label_map if adapter else None,
    )


def looks_like_hub_id(source: str) -> bool:
    """Return whether a source that is not a local path reads as a hub id (``org/name`` or ``imdb``)."""
    if source.lower().endswith(DATA_FILE_SUFFIXES):
        return False
    return bool(HUB_ID_PATTERN.match(source)) or source.lower() in HUB_ADAPTERS


def load_hub_dataset(hub_id: str, *, split: str, max_pairs: int | None) -> PreferenceData:
    """Load a hub data set with ``datasets.load_dataset`` and parse it through its adapter."""
    adapter = hub_adapter(hub_id)
    hub_split = adapter.splits.get(split, split) if adapter else split
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        import datasets
        rows = datasets.load_dataset(hub_id, split=hub_split)
    except Exception as error:  # datasets raises many types (connection, not found, offline cache misses).
        local_hint = ("Pass a local file instead, e.g. export the split to JSONL on a machine with network "
                      "access and give its path as the data source (formats: datasets/README.md).")
        if offline:
            raise DataError(f"Hugging Face dataset {hub_id!r} (split {hub_split!r}) could not be loaded offline "
                            f"(HF_HUB_OFFLINE=1), so it is probably not in the local cache "
                            f"({type(error).__name__}: {error}). {local_hint}") from error
        raise DataError(f"Hugging Face dataset {hub_id!r} (split {hub_split!r}) could not be loaded: "
                        f"{type(error).__name__}: {error}. {local_hint}") from error
    fingerprint = getattr(rows, "_fingerprint", "")
    content_hash = hashlib.sha256(f"{hub_id}\x00{hub_split}\x00{fingerprint}".encode()).hexdigest()
    return preferences_from_hub_records(hub_id, rows, split=split, max_pairs=max_pairs, content_hash=content_hash)


# ----------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------


def _resolve_folder(root: Path) -> Path | None:
    """Return the data file to read for a folder, or ``None`` for a ``pos/`` + ``neg/`` folder.

    Folder rules, first match wins:
      1. ``pos/`` and ``neg/`` subfolders: pos/neg text files.
      2. ``conversations.jsonl`` (or ``.jsonl.gz``): conversations, Alternating Population Strategy.
      3. ``triplets.jsonl`` (or ``.jsonl.gz``): that file.
      4. exactly one ``.json`` / ``.jsonl`` file (optionally ``.gz``): that file.
    """
    if (root / "pos").is_dir() and (root / "neg").is_dir():
        return None
    for stem in ("conversations", "triplets"):
        for suffix in (".jsonl", ".jsonl.gz"):
            if (root / f"{stem}{suffix}").is_file():
                return root / f"{stem}{suffix}"
    candidates = sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(DATA_FILE_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0]
    found = [p.name for p in candidates] or "no data files"
    raise DataError(f"{root}: cannot tell which data to load (found {found}). Give the folder 'pos/' and 'neg/' "
                    "subfolders, a conversations.jsonl or triplets.jsonl, or exactly one .json/.jsonl file, "
                    "or pass the file path itself.")


def load_preferences(
    source: str,
    *,
    pair_pos_neg: bool | None = None,
    max_pairs: int | None = None,
    hf_split: str = "train",
    drop_empty: bool = False,
) -> PreferenceData:
    """Load preference data from a folder, a JSON/JSONL file (``.gz`` allowed) or a hub id.

    Args:
      source: a folder (rules in ``_resolve_folder``), a file, or a Hugging Face dataset id.
      pair_pos_neg: for ``pos/`` + ``neg/`` folders, ``True`` pairs files by name (a count
        or name mismatch raises ``DataError``), ``False`` keeps them unpaired, ``None`` pairs
        only when the names match one to one.
      max_pairs: keep the first N pairs (or texts) after dropping; ``None`` keeps all.
      hf_split: the split of a hub data set ("train", "test", ...; mapped per adapter).
      drop_empty: drop prompt/chosen/rejected records with an empty text and count them
        as ``empty_text`` instead of raising ``DataError``.

    Raises:
      DataError: naming the file, record and field of the first bad record.
    """
    _check_max_pairs(max_pairs)
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_id(str(source)):
            return load_hub_dataset(str(source), split=hf_split, max_pairs=max_pairs)
        raise DataError(f"Data source not found: {source}. Pass an existing file or folder, or a Hugging Face "
                        "dataset id such as Anthropic/hh-rlhf.")

    if path.is_dir():
        data_file = _resolve_folder(path)
        if data_file is None:
            return load_pos_neg_folder(path, pair_pos_neg, max_pairs)
        path = data_file

    return preferences_from_records(
        iter_file_records(path),
        source=str(source),
        max_pairs=max_pairs,
        content_hash=sha256_path(path),
        drop_empty=drop_empty,
    )


# ----------------------------------------------------------------------------------------
# Writing triplets from conversations
# ----------------------------------------------------------------------------------------


def conversation_triplet_records(conversations_file: Path) -> list[dict[str, Any]]:
    """Return the triplet records the Alternating Population Strategy derives from a conversations file.

    Each record is ``{"id", "prompt", "chosen", "rejected"}`` with ``prompt`` a message list in
    the source roles, so loading the written file gives the same triplets as the conversations.
    """
    records = []
    for where, default_id, record in iter_file_records(conversations_file):
        key = next((name for name in CONVERSATION_KEYS if name in record), None)
        if key is None:
            raise DataError(f"{where}, field 'turns': missing. Give the conversation as one of "
                            f"{list(CONVERSATION_KEYS)}.")
        try:
            derived = alternating_population(_get_field(record, key, where))
        except DataError as error:
            raise DataError(f"{where}, field '{key}': {error}") from error
        conversation_id = _record_id(record, default_id)
        for k, (prompt_turns, chosen, rejected) in enumerate(derived, start=1):
            if chosen.strip() == rejected.strip():
                continue
            records.append({"id": f"{conversation_id}:turn-{k}", "prompt": prompt_turns,
                            "chosen": chosen, "rejected": rejected})
    return records


def records_to_jsonl(records: Iterable[dict[str, Any]]) -> str:
    """Return records as JSONL text: one compact JSON object per line, non-ASCII kept as is."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(argv: Sequence[str] | None = None) -> None:
    """Summarize a data source, or write the triplets of a conversations file."""
    parser = argparse.ArgumentParser(prog="python -m coala.data", description=main.__doc__)
    parser.add_argument("source", help="folder, JSON/JSONL file (.gz allowed) or Hugging Face dataset id")
    parser.add_argument("--write_triplets", default=None,
                        help="write the Alternating Population Strategy triplets of a conversations file "
                             "to this JSONL path")
    parser.add_argument("--max_pairs", type=int, default=None, help="keep the first N pairs (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.write_triplets:
        records = conversation_triplet_records(Path(args.source))
        atomic_write_text(args.write_triplets, records_to_jsonl(records))
        print(f"Wrote {len(records)} triplets to {args.write_triplets}")
        return

    data = load_preferences(args.source, max_pairs=args.max_pairs)
    kind = "pairs" if data.paired else "texts"
    print(f"{data.source}: format {data.format}, {len(data)} {kind}, dropped {data.dropped}, "
          f"sha256 {data.content_hash[:16]}")


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main)
