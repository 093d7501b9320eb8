"""Tests of the preference data loaders, the split assignment and the embedded edu_sample data."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from coala.data import (
    DEFAULT_SPLIT_FRACTIONS,
    SPLIT_NAMES,
    DataError,
    LabeledText,
    Triplet,
    alternating_population,
    assign_split,
    conversation_triplet_records,
    load_preferences,
    main,
    preferences_from_hub_records,
    render_messages,
    split_key,
)
from coala.io import sha256_path

REPO_ROOT = Path(__file__).resolve().parent.parent
EDU_SAMPLE = REPO_ROOT / "datasets" / "edu_sample"


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    text = "".join(json.dumps(record) + "\n" for record in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def conversation(num_tutor_turns: int, roles: tuple[str, str] = ("student", "tutor")) -> list[dict[str, str]]:
    turns = []
    for k in range(1, num_tutor_turns + 1):
        turns.append({"role": roles[0], "content": f"question {k}"})
        turns.append({"role": roles[1], "content": f"answer {k}"})
    return turns


# ------------------------------------------------------------------ triplet files


def test_jsonl_string_triplets(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "id": "geo-1"},
    ])
    data = load_preferences(str(path))
    assert data.format == "triplets-json"
    assert data.paired
    assert len(data) == 2
    assert data.triplets[0] == Triplet("Name a prime.", "7", "8", "pairs:1")
    assert data.triplets[1].pair_id == "geo-1"
    assert data.triplets[0].prompt_messages is None
    assert data.content_hash == sha256_path(path)
    assert data.texts == []


def test_json_array_gzip(tmp_path):
    path = tmp_path / "pairs.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump([{"prompt": "p", "chosen": "good", "rejected": "bad"}], handle)
    data = load_preferences(str(path))
    assert data.triplets == [Triplet("p", "good", "bad", "pairs:1")]
    assert data.content_hash == sha256_path(path)


def test_chat_list_triplets(tmp_path):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    records = [
        {"prompt": "What is 2+2?", "chosen": [{"role": "user", "content": "What is 2+2?"},
                                              {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}]},
        {"prompt": "2+2?", "chosen": history + [{"role": "assistant", "content": "4"}],
         "rejected": history + [{"role": "assistant", "content": "22"}]},
        {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "hi", "rejected": "no"},
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    first, second, third = load_preferences(str(path)).triplets

    assert first.prompt == "What is 2+2?"
    assert first.chosen == "4"
    assert first.rejected == "5"
    assert first.prompt_messages == ({"role": "user", "content": "What is 2+2?"},)

    assert second.chosen == "4"
    assert second.rejected == "22"
    assert second.prompt == "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: 2+2?"
    assert [m["role"] for m in second.prompt_messages] == ["system", "user", "assistant", "user"]

    assert third.prompt == "Say hi"
    assert third.prompt_messages == ({"role": "user", "content": "Say hi"},)


def test_chat_list_history_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]},
    ])
    with pytest.raises(DataError, match=r"chat\.jsonl line 1, field 'rejected'"):
        load_preferences(str(path))


def test_chat_list_last_message_not_assistant(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": "b"},
    ])
    with pytest.raises(DataError, match=r"line 1, field 'chosen'.*last message"):
        load_preferences(str(path))


# ------------------------------------------------------------------ HH-RLHF


HH_PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water?\n\nHuman: Yes\n\nAssistant:"


def test_hh_rlhf_gzip(tmp_path):
    records = [
        {"chosen": HH_PROMPT + " Boil it for nine minutes.", "rejected": HH_PROMPT + " No idea."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl.gz", records, compress=True)
    data = load_preferences(str(path))
    assert data.format == "hh-rlhf"
    assert len(data) == 2
    first = data.triplets[0]
    assert first.prompt == HH_PROMPT
    assert first.chosen == " Boil it for nine minutes."
    assert first.rejected == " No idea."
    assert first.pair_id == "hh:1"
    for triplet, record in zip(data.triplets, records):
        assert triplet.prompt + triplet.chosen == record["chosen"]
        assert triplet.prompt + triplet.rejected == record["rejected"]


def test_hh_rlhf_response_containing_marker(tmp_path):
    chosen = HH_PROMPT + " Sure.\n\nAssistant: Nine minutes."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": HH_PROMPT + " No."}])
    triplet = load_preferences(str(path)).triplets[0]
    assert triplet.prompt == HH_PROMPT
    assert triplet.chosen == " Sure.\n\nAssistant: Nine minutes."
    assert triplet.rejected == " No."


def test_hh_rlhf_different_prompts(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_PROMPT + " ok", "rejected": HH_PROMPT + " fine"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    ])
    with pytest.raises(DataError, match=r"hh\.jsonl line 2, field 'rejected'.*same prompt"):
        load_preferences(str(path))


def test_hh_rlhf_blank_response_dropped(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_PROMPT + " ", "rejected": HH_PROMPT + " Something."},
        {"chosen": HH_PROMPT + " Yes.", "rejected": HH_PROMPT + " No."},
    ])
    data = load_preferences(str(path))
    assert len(data) == 1
    assert data.dropped == {"empty_response": 1}
    assert data.triplets[0].pair_id == "hh:2"


def test_hh_rlhf_missing_marker(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "just text", "rejected": "other text"}])
    with pytest.raises(DataError, match=r"line 1, field 'chosen'.*Assistant"):
        load_preferences(str(path))


def test_real_hh_rlhf_file(hh_rlhf_file):
    data = load_preferences(str(hh_rlhf_file))
    with gzip.open(hh_rlhf_file, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    assert len(raw) == 2312
    assert len(data) + sum(data.dropped.values()) == len(raw)
    assert data.dropped == {"empty_response": 4}
    assert data.content_hash == sha256_path(hh_rlhf_file)
    for triplet in data.triplets:
        record = raw[int(triplet.pair_id.rsplit(":", 1)[1]) - 1]
        assert triplet.prompt.endswith("\n\nAssistant:")
        assert triplet.prompt + triplet.chosen == record["chosen"]
        assert triplet.prompt + triplet.rejected == record["rejected"]
        assert triplet.chosen.strip() != triplet.rejected.strip()


# ------------------------------------------------------------------ conversations


@pytest.mark.parametrize("num_tutor_turns", [1, 2, 3, 4])
def test_aps_counts(num_tutor_turns):
    derived = alternating_population(conversation(num_tutor_turns))
    assert len(derived) == num_tutor_turns - 1
    for k, (prompt, chosen, rejected) in enumerate(derived, start=1):
        assert len(prompt) == 2 * k - 1
        assert prompt[-1] == {"role": "student", "content": f"question {k}"}
        assert chosen == f"answer {k}"
        assert rejected == f"answer {k + 1}"


def test_aps_user_assistant_and_system():
    turns = [{"role": "system", "content": "You tutor."}] + conversation(3, ("user", "assistant"))
    turns.append({"role": "user", "content": "unanswered question"})
    derived = alternating_population(turns)
    assert len(derived) == 2
    assert derived[0][0][0] == {"role": "system", "content": "You tutor."}
    assert derived[1][1] == "answer 2"
    assert derived[1][2] == "answer 3"


def test_aps_rejects_broken_alternation():
    turns = conversation(2)
    turns[2] = {"role": "tutor", "content": "two tutor turns in a row"}
    with pytest.raises(DataError, match=r"turn 3: invalid role 'tutor', expected student"):
        alternating_population(turns)
    with pytest.raises(DataError, match=r"invalid role 'teacher'"):
        alternating_population([{"role": "teacher", "content": "x"}])


def test_render_messages():
    text = render_messages([{"role": "student", "content": "Why?"}, {"role": "tutor", "content": "Because."}])
    assert text == "Student: Why?\nTutor: Because."


def test_conversations_file(tmp_path):
    write_jsonl(tmp_path / "conversations.jsonl", [
        {"id": "c1", "turns": conversation(3)},
        {"id": "c2", "turns": conversation(1)},
        {"messages": conversation(2)},
    ])
    data = load_preferences(str(tmp_path))
    assert data.format == "conversations"
    assert [t.pair_id for t in data.triplets] == ["c1:turn-1", "c1:turn-2", "conversations:3:turn-1"]
    assert data.dropped == {"fewer_than_two_tutor_turns": 1}
    second = data.triplets[1]
    assert second.prompt == "Student: question 1\nTutor: answer 1\nStudent: question 2"
    assert [m["role"] for m in second.prompt_messages] == ["user", "assistant", "user"]
    assert data.triplets[0].prompt == "question 1"


def test_conversation_error_location(tmp_path):
    turns = conversation(2)
    turns[3]["content"] = "  "
    path = write_jsonl(tmp_path / "talks.jsonl", [{"turns": conversation(2)}, {"turns": turns}])
    with pytest.raises(DataError, match=r"talks\.jsonl line 2, field 'turns'.*message 4: empty text"):
        load_preferences(str(path))


def test_conversation_missing_turns(tmp_path):
    path = write_jsonl(tmp_path / "talks.jsonl", [{"id": "a", "turns": conversation(2)}, {"id": "b"}])
    with pytest.raises(DataError, match=r"talks\.jsonl line 2, field 'turns': missing"):
        load_preferences(str(path))


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"pairs\.jsonl\.gz: cannot be read"):
        load_preferences(str(path))


# ------------------------------------------------------------------ pos/neg folders


def make_pos_neg(root: Path, pos: dict[str, str], neg: dict[str, str]) -> Path:
    for sub, files in (("pos", pos), ("neg", neg)):
        (root / sub).mkdir(parents=True)
        for name, text in files.items():
            (root / sub / name).write_text(text, encoding="utf-8")
    return root


def test_pos_neg_unpaired(tmp_path):
    root = make_pos_neg(tmp_path / "d", {"a.txt": "great", "b.txt": "lovely"}, {"c.txt": "awful"})
    data = load_preferences(str(root))
    assert data.format == "pos-neg"
    assert not data.paired
    assert data.texts == [LabeledText("great", 1, "pos/a.txt"), LabeledText("lovely", 1, "pos/b.txt"),
                          LabeledText("awful", -1, "neg/c.txt")]


def test_pos_neg_paired_by_name(tmp_path):
    root = make_pos_neg(tmp_path / "d", {"1.txt": "good one", "2.txt": "good two"},
                        {"2.txt": "bad two", "1.txt": "bad one"})
    data = load_preferences(str(root))
    assert data.paired
    assert data.triplets == [Triplet("", "good one", "bad one", "1.txt"), Triplet("", "good two", "bad two", "2.txt")]
    unpaired = load_preferences(str(root), pair_pos_neg=False)
    assert not unpaired.paired
    assert len(unpaired) == 4


def test_pos_neg_pairing_mismatch(tmp_path):
    counts = make_pos_neg(tmp_path / "counts", {"1.txt": "a", "2.txt": "b"}, {"1.txt": "c"})
    with pytest.raises(DataError, match=r"pairing was requested.*2 files and 'neg/' 1"):
        load_preferences(str(counts), pair_pos_neg=True)
    names = make_pos_neg(tmp_path / "names", {"1.txt": "a"}, {"9.txt": "c"})
    with pytest.raises(DataError, match=r"unmatched names.*1\.txt"):
        load_preferences(str(names), pair_pos_neg=True)


def test_pos_neg_bad_text(tmp_path):
    root = make_pos_neg(tmp_path / "d", {"a.txt": "fine"}, {"b.txt": "fine too"})
    (root / "neg" / "b.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"b\.txt record 1, field 'text': invalid UTF-8"):
        load_preferences(str(root))


# ------------------------------------------------------------------ folder rules


def test_folder_single_file(tmp_path):
    write_jsonl(tmp_path / "anything.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    assert len(load_preferences(str(tmp_path))) == 1


def test_folder_prefers_named_files(tmp_path):
    write_jsonl(tmp_path / "triplets.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    assert load_preferences(str(tmp_path)).format == "triplets-json"
    write_jsonl(tmp_path / "conversations.jsonl", [{"turns": conversation(4)}])
    data = load_preferences(str(tmp_path))
    assert data.format == "conversations"
    assert len(data) == 3


def test_folder_ambiguous(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"cannot tell which data.*a\.jsonl"):
        load_preferences(str(tmp_path))


# ------------------------------------------------------------------ hub adapters (local rows, no network)


def test_ultrafeedback_adapter():
    rows = [{
        "prompt": "Write a haiku.", "prompt_id": "abc",
        "chosen": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Old pond, frog."}],
        "rejected": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "No."}],
        "messages": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Old pond, frog."}],
        "score_chosen": 8.0, "score_rejected": 2.0,
    }]
    data = preferences_from_hub_records("HuggingFaceH4/ultrafeedback_binarized", rows)
    assert data.format == "hf:HuggingFaceH4/ultrafeedback_binarized"
    assert data.triplets[0].prompt == "Write a haiku."
    assert data.triplets[0].chosen == "Old pond, frog."
    assert data.triplets[0].rejected == "No."
    assert data.triplets[0].pair_id == "HuggingFaceH4/ultrafeedback_binarized:train_prefs:1"


def test_hh_hub_adapter():
    rows = [{"chosen": HH_PROMPT + " Nine minutes.", "rejected": HH_PROMPT + " Never."}]
    triplet = preferences_from_hub_records("Anthropic/hh-rlhf", rows).triplets[0]
    assert triplet.prompt == HH_PROMPT
    assert triplet.chosen == " Nine minutes."


@pytest.mark.parametrize("hub_id", ["stanfordnlp/imdb", "imdb"])
def test_imdb_adapter(hub_id):
    rows = [{"text": "A wonderful film.", "label": 1}, {"text": "Dull and long.", "label": 0}]
    data = preferences_from_hub_records(hub_id, rows)
    assert not data.paired
    assert [(t.text, t.label) for t in data.texts] == [("A wonderful film.", 1), ("Dull and long.", -1)]
    with pytest.raises(DataError, match=r"row 1, field 'label': invalid label -1"):
        preferences_from_hub_records(hub_id, [{"text": "unlabeled review", "label": -1}], split="unsupervised")


def test_helpsteer_adapter():
    rows = [
        {"prompt": "Explain tides.", "response": "The Moon pulls the oceans.", "helpfulness": 4},
        {"prompt": "Explain tides.", "response": "Water moves.", "helpfulness": 1},
        {"prompt": "Explain tides.", "response": "Gravity of Moon and Sun.", "helpfulness": 3},
        {"prompt": "Name a color.", "response": "Red.", "helpfulness": 2},
        {"prompt": "Name a color.", "response": "Blue.", "helpfulness": 2},
        {"prompt": "Say hi.", "response": "Hi.", "helpfulness": 4},
    ]
    data = preferences_from_hub_records("nvidia/HelpSteer", rows)
    assert data.triplets == [Triplet("Explain tides.", "The Moon pulls the oceans.", "Water moves.",
                                     "nvidia/HelpSteer:train:1/nvidia/HelpSteer:train:2")]
    assert data.dropped == {"tie": 1, "single_response": 1}


def test_edufeedback_adapter():
    turns = [{"from": "student", "value": "What is a cell?"}, {"from": "tutor", "value": "The unit of life."},
             {"from": "student", "value": "What is a gene?"}, {"from": "tutor", "value": "A stretch of DNA."}]
    data = preferences_from_hub_records("someone/EduFeedback", [{"conversation": turns}])
    assert data.format == "hf:someone/EduFeedback"
    assert data.triplets[0].prompt == "What is a cell?"
    assert data.triplets[0].chosen == "The unit of life."
    assert data.triplets[0].rejected == "A stretch of DNA."


def test_hub_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    with pytest.raises(DataError, match=r"coala-tests/no-such-dataset.*could not be loaded offline.*local file"):
        load_preferences("coala-tests/no-such-dataset")


def test_hub_load_maps_split(monkeypatch):
    import datasets

    requests = []

    def fake_load_dataset(hub_id, split):
        requests.append((hub_id, split))
        if hub_id == "Anthropic/hh-rlhf":
            rows = [{"chosen": HH_PROMPT + " Yes.", "rejected": HH_PROMPT + " No."},
                    {"chosen": HH_PROMPT + " Sure.", "rejected": HH_PROMPT + " Never."}]
        else:
            rows = [{"prompt": f"q{i}", "chosen": [{"role": "user", "content": f"q{i}"},
                                                  {"role": "assistant", "content": "good"}],
                     "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}]}
                    for i in range(3)]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_preferences("HuggingFaceH4/ultrafeedback_binarized", hf_split="test", max_pairs=1)
    assert requests == [("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")]
    assert data.format == "hf:HuggingFaceH4/ultrafeedback_binarized"
    assert len(data) == 1
    assert len(data.content_hash) == 64
    hh = load_preferences("Anthropic/hh-rlhf")
    assert requests[-1] == ("Anthropic/hh-rlhf", "train")
    assert [t.chosen for t in hh.triplets] == [" Yes.", " Sure."]


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError, match=r"Data source not found"):
        load_preferences(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"Data source not found"):
        load_preferences("data/missing.jsonl")


# ------------------------------------------------------------------ splits


def test_split_deterministic_and_seeded():
    keys = [f"prompt {i}" for i in range(2000)]
    first = [assign_split(key, 0) for key in keys]
    assert first == [assign_split(key, 0) for key in keys]
    assert first != [assign_split(key, 1) for key in keys]
    counts = Counter(first)
    for name, fraction in zip(SPLIT_NAMES, DEFAULT_SPLIT_FRACTIONS):
        assert abs(counts[name] / len(keys) - fraction) < 0.03


def test_split_independent_of_python_hash():
    keys = [f"prompt {i}" for i in range(50)]
    code = ("import json,sys; from coala.data import assign_split; "
            f"print(json.dumps([assign_split(k, 7) for k in {keys!r}]))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [assign_split(key, 7) for key in keys]


def test_split_disjoint_by_prompt(tmp_path):
    records = [{"prompt": f"prompt {i % 40}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(400)]
    data = load_preferences(str(write_jsonl(tmp_path / "pairs.jsonl", records)))
    splits_of_prompt: dict[str, set[str]] = {}
    for triplet in data.triplets:
        splits_of_prompt.setdefault(triplet.prompt, set()).add(assign_split(split_key(triplet), 3, (0.5, 0.25, 0.25)))
    assert len(splits_of_prompt) == 40
    assert all(len(splits) == 1 for splits in splits_of_prompt.values())
    assert {next(iter(s)) for s in splits_of_prompt.values()} == set(SPLIT_NAMES)


def test_split_edge_fractions():
    assert {assign_split(f"k{i}", 0, (1.0, 0.0, 0.0)) for i in range(200)} == {"train"}
    assert {assign_split(f"k{i}", 0, (0.0, 0.0, 1.0)) for i in range(200)} == {"test"}


@pytest.mark.parametrize("fractions, message", [
    ((0.8, 0.2), "3 values"),
    ((0.9, 0.2, -0.1), "non-negative"),
    ((0.5, 0.3, 0.1), "sum to 1"),
    ((float("nan"), 0.5, 0.5), "finite"),
])
def test_split_fraction_validation(fractions, message):
    with pytest.raises(ValueError, match=message):
        assign_split("key", 0, fractions)


def test_split_key_without_prompt():
    assert split_key(Triplet("", "a", "b", "pair-9")) == "pair-9"
    assert split_key(LabeledText("text", 1, "pos/1.txt")) == "pos/1.txt"
    assert split_key(Triplet("p", "a", "b", "pair-9")) == "p"


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": "a"}', r"line 2, field 'rejected': missing"),
    ('{"prompt": "p", "chosen": "   ", "rejected": "b"}', r"line 2, field 'chosen': empty text"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', r"line 2, field 'prompt': empty text"),
    ('{"prompt": "p", "chosen": 5, "rejected": "b"}', r"line 2, field 'chosen': expected a string"),
    ('{"prompt": "p", "chosen": "a", ', r"line 2: invalid JSON"),
    ('["not", "an", "object"]', r"line 2: expected a JSON object"),
])
def test_bad_jsonl_records(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        load_preferences(str(path))
    assert str(path) in str(info.value)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid UTF-8"):
        load_preferences(str(path))
    json_path = tmp_path / "bad.json"
    json_path.write_bytes(b'[\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]')
    with pytest.raises(DataError, match=r"bad\.json: invalid UTF-8 at byte 17 \(line 2\)"):
        load_preferences(str(json_path))


def test_json_record_number(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(DataError, match=r"pairs\.json record 2, field 'rejected': missing"):
        load_preferences(str(path))
    path.write_text(json.dumps({"prompt": "p"}))
    with pytest.raises(DataError, match=r"expected a JSON array"):
        load_preferences(str(path))


def test_unknown_schema(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd\.jsonl line 1: unknown record schema.*'answer'"):
        load_preferences(str(path))


def test_identical_pairs_dropped_with_one_warning(tmp_path, caplog):
    records = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same " if i % 2 else "same"} for i in range(4)]
    records.append({"prompt": "q", "chosen": "yes", "rejected": "no"})
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="coala.data"):
        data = load_preferences(str(path))
    assert len(data) == 1
    assert data.dropped == {"identical": 4}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 pairs" in warnings[0].getMessage()


def test_max_pairs_counts_after_dropping(tmp_path):
    records = [{"prompt": "p0", "chosen": "same", "rejected": "same"}]
    records += [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(1, 6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = load_preferences(str(path), max_pairs=3)
    assert [t.prompt for t in data.triplets] == ["p1", "p2", "p3"]
    with pytest.raises(ValueError, match="max_pairs"):
        load_preferences(str(path), max_pairs=0)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no records found"):
        load_preferences(str(path))


# ------------------------------------------------------------------ embedded edu_sample


def test_edu_sample_conversations():
    lines = (EDU_SAMPLE / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert 55 <= len(records) <= 70
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["field"] for r in records}) >= 10
    for record in records:
        assert 4 <= len(record["turns"]) <= 8, record["id"]
        assert len(alternating_population(record["turns"])) == len(record["turns"]) // 2 - 1


def test_edu_sample_triplets_match_regenerated():
    committed = [json.loads(line) for line in (EDU_SAMPLE / "triplets.jsonl").read_text(encoding="utf-8").splitlines()]
    assert committed == conversation_triplet_records(EDU_SAMPLE / "conversations.jsonl")


def test_edu_sample_folder_equals_triplets_file():
    from_folder = load_preferences(str(EDU_SAMPLE))
    from_file = load_preferences(str(EDU_SAMPLE / "triplets.jsonl"))
    assert from_folder.format == "conversations"
    assert len(from_folder) > 100
    assert from_folder.triplets == from_file.triplets
    assert from_folder.dropped == {}


def test_cli_writes_triplets(tmp_path, capsys):
    out = tmp_path / "triplets.jsonl"
    main([str(EDU_SAMPLE / "conversations.jsonl"), "--write_triplets", str(out)])
    assert out.read_text(encoding="utf-8") == (EDU_SAMPLE / "triplets.jsonl").read_text(encoding="utf-8")
    assert "Wrote" in capsys.readouterr().out


def test_empty_text_error_or_drop(tmp_path):
    import json

    from coala.data import DataError, load_preferences

    path = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"},
        {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "   "},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(DataError, match="line 2, field 'rejected': empty text"):
        load_preferences(str(path))
    data = load_preferences(str(path), drop_empty=True)
    assert len(data) == 1
    assert data.dropped == {"empty_text": 1}
