"""Preference data: every accepted input format turned into aligned triplets or labeled texts.

Interface (implementation in progress; the signatures below are the contract
other modules code against):

    load_preferences(source, ...) -> PreferenceData
    assign_split(key, seed, fractions) -> "train" | "validation" | "test"
    alternating_population(turns) -> list[(prompt_turns, chosen, rejected)]
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


class DataError(ValueError):
    """Invalid preference data. The message names the file, the record number and the field."""


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
      format: one of "triplets-json", "hh-rlhf", "pos-neg", "conversations", "hf:<id>".
      paired: ``True`` when ``triplets`` is filled, ``False`` for ``texts``.
      triplets: aligned (prompt, chosen, rejected) records.
      texts: unpaired labeled texts.
      dropped: counts of records dropped and why, e.g. ``{"identical": 3}``.
      content_hash: SHA-256 of the source bytes (or of the hub id and revision).
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
