"""SFT, DPO and ORPO baselines: one optimizer step each on a tiny model, metrics and a reloadable adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from coala import baselines
from coala.config import ConfigError, SECTIONS, parse_args_with_config
from coala.data import assign_split, load_preferences, split_key

REPO_ROOT = Path(__file__).resolve().parent.parent
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
TOPICS = ["photosynthesis", "fractions", "the water cycle", "gravity", "verbs", "volcanoes", "prime numbers", "magnets"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    rows = []
    for i in range(24):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({
            "prompt": f"Question {i}: can you explain {topic} simply?",
            "chosen": f"Sure. {topic.capitalize()} is a clear idea; here is a short, correct example.",
            "rejected": f"No idea about {topic}, figure it out.",
        })
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def run_one_step(method: str, model_dir: Path, data: Path, output_dir: Path) -> dict:
    argv = [
        "--model_path", str(model_dir), "--data_path", str(data), "--output_dir", str(output_dir),
        "--max_steps", "1", "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2",
        "--eval_steps", "1", "--max_eval_pairs", "2", "--max_length", "96", "--lora_r", "4", "--lora_alpha", "8",
        "--warmup_steps", "0", "--learning_rate", "0.01", "--device", "cpu",
    ]
    args = parse_args_with_config(baselines.build_parser(method), argv, section=method)
    return baselines.run_baseline(method, args)


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_one_step_writes_metrics_and_adapter(method, tiny_model_dir, pairs_file, tmp_path):
    output_dir = tmp_path / method
    metrics = run_one_step(method, tiny_model_dir, pairs_file, output_dir)

    saved = json.loads((output_dir / baselines.METRICS_FILE).read_text())
    assert saved["steps"] == 1
    assert saved["train"][0]["step"] == 1
    assert "loss" in saved["train"][0]
    assert saved["validation"], "no validation rows logged"
    assert saved["analytic_flops"] > 0
    assert saved["tokens_chosen"] > 0
    if method != "sft":
        for key in REWARD_KEYS:
            assert key in saved["train"][0], f"{key} missing from the train metrics"
            assert key in saved["validation"][-1], f"{key} missing from the validation metrics"
            assert saved["train"][0][key] == saved["train"][0][key], f"{key} is NaN"
    assert metrics["method"] == method
    assert (output_dir / baselines.RUN_CONFIG_FILE).is_file()

    # The adapter reloads in PEFT format onto the base model and changes its outputs.
    assert (output_dir / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_logits = base(input_ids).logits
        adapted = PeftModel.from_pretrained(base, output_dir)
        adapted_logits = adapted(input_ids).logits
    saved_weights = load_file(output_dir / "adapter_model.safetensors")
    assert any("lora_B" in name for name in saved_weights)
    assert not torch.allclose(base_logits, adapted_logits)


def test_splits_match_stage1(pairs_file):
    splits, info = baselines.load_pair_splits(str(pairs_file), split_seed=3, max_pairs=None, seed=0)
    data = load_preferences(str(pairs_file))
    expected = {name: [] for name in ("train", "validation", "test")}
    for triplet in data.triplets:
        expected[assign_split(split_key(triplet), 3)].append(triplet.pair_id)
    for name, ids in expected.items():
        assert [record["pair_id"] for record in splits[name]] == ids
    assert info["counts"]["train"] == len(expected["train"])


def test_prompt_truncation_keeps_responses(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = {"prompt": "The student asked " * 80 + "the final question?", "chosen": "A clear answer.", "rejected": "A vague one.", "pair_id": "0", "prompt_messages": None}
    (cut,), count = baselines.truncate_prompts(tokenizer, [record], max_length=64)
    assert count == 1
    assert cut["prompt"].endswith("the final question?")
    assert len(tokenizer(cut["prompt"], add_special_tokens=False)["input_ids"]) <= 64


def test_unpaired_texts_pair_by_seeded_shuffle():
    from coala.data import LabeledText

    texts = [LabeledText(f"good {i}", 1, f"p{i}") for i in range(5)] + [LabeledText(f"bad {i}", -1, f"n{i}") for i in range(3)]
    first = baselines.pair_unpaired_texts(texts, seed=1)
    assert len(first) == 3
    assert first == baselines.pair_unpaired_texts(texts, seed=1)
    assert all(row["chosen"].startswith("good") and row["rejected"].startswith("bad") for row in first)


def test_gguf_model_path_rejected(pairs_file, tmp_path):
    args = baselines.build_parser("dpo").parse_args(["--model_path", "m.gguf", "--data_path", str(pairs_file), "--output_dir", str(tmp_path)])
    with pytest.raises(baselines.BaselineError, match="coala.backbone convert"):
        baselines.check_args(args)


def test_bad_beta_rejected(pairs_file, tmp_path):
    args = baselines.build_parser("orpo").parse_args(["--model_path", "m", "--data_path", str(pairs_file), "--output_dir", str(tmp_path), "--beta", "0"])
    with pytest.raises(baselines.BaselineError, match="--beta"):
        baselines.check_args(args)


def script_parsers() -> dict[str, list]:
    """Every top-level script's parser per config section (eval_alpaca.py has one per subcommand)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name.replace("/", "_"), REPO_ROOT / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    parsers: dict[str, list] = {method: [baselines.build_parser(method)] for method in baselines.METHODS}
    for section, script in (("extract", "extract.py"), ("cronos", "cronos_trainer.py"), ("finetune", "finetune_coala.py")):
        if (REPO_ROOT / script).is_file():
            parsers[section] = [load(script).build_parser()]
    if (REPO_ROOT / "eval_alpaca.py").is_file():
        module = load("eval_alpaca.py")
        parsers["eval"] = [module.build_parser(command) for command in module.COMMANDS]
    return parsers


def test_every_config_section_matches_its_script():
    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert configs, "no configs found"
    parsers = script_parsers()
    for path in configs:
        content = yaml.safe_load(path.read_text())
        assert set(content) <= set(SECTIONS), f"{path.name} has unknown sections {sorted(set(content) - set(SECTIONS))}"
        assert "model_shape" in content, f"{path.name} has no model_shape"
        for section, values in content.items():
            if section == "model_shape" or section not in parsers:
                continue
            flags = {action.dest for parser in parsers[section] for action in parser._actions}
            unknown = sorted(set(values) - flags)
            assert not unknown, f"{path.name} section {section} has keys that are not flags: {unknown}"


def test_config_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dpo:\n  betaa: 0.1\n")
    with pytest.raises(ConfigError, match="betaa"):
        parse_args_with_config(baselines.build_parser("dpo"), ["--config", str(path), "--model_path", "m", "--data_path", "d", "--output_dir", "o"], section="dpo")
