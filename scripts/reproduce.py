#!/usr/bin/env python
"""Regenerate Figure 1 and Tables 1, 2, 3 and 7 of Feng & Pilanci (ICML 2026) at one of three scales.

    python scripts/reproduce.py {figure1,table1,table2,table3,table7} --scale {ci,small,paper}

The shell scripts scripts/figure1_reward_margins.sh etc. call this. Every
stage runs the project's own command-line programs in this process (their
``main(argv)``), so Python and torch start once. Finished stages are reused
from the work folder, so table2 reuses table1's generations. A finished stage
runs again when its settings changed or an upstream run was rewritten after it.

Scales:
  ci     a tiny randomly initialized Llama built on the spot, 40 AlpacaEval
         preference pairs, one optimizer step per baseline, 2 instructions,
         one seed. Seconds to minutes; checks the plumbing, not the numbers.
  small  SmolLM2-135M-Instruct converted from the offline GGUF, the embedded
         datasets/edu_sample pairs, 3 seeds where the paper averages 3, the
         local SmolLM2 judge, CPU.
  paper  the paper's models and data (configs/<model>_<dataset>.yaml) on a
         GPU, the AlpacaEval 2 GPT-4-turbo judge; needs hub and API access.

Outputs: RESULTS_ROOT/<table>/table.md and table.csv, each row next to the
paper's published number for the same cell and the difference.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from coala.data import OFFLINE_DATA_ENV, offline_data_dir  # noqa: E402
from coala.io import atomic_write_text, setup_logging  # noqa: E402
from coala.paper import PAPER_TABLE1, PAPER_TABLE2, PAPER_TABLE3, PAPER_TABLE7, PAPER_TABLE3_TRAIN_PAIRS  # noqa: E402

logger = logging.getLogger("reproduce")
METHODS = ("COALA", "ORPO", "DPO", "SFT")


@dataclass
class Scale:
    """Settings of one reproduction scale."""

    name: str
    models: dict[str, str]  # label -> model folder or hub id (filled by prepare_models)
    datasets: dict[str, str]  # paper column label -> data path
    seeds: list[int]
    max_pairs: int | None
    max_length: int
    baseline_flags: list[str]
    cronos_flags: list[str]
    adamw_flags: list[str]
    finetune_flags: list[str]
    eval_instances: int | None
    max_new_tokens: int
    judge: str
    configs: dict[tuple[str, str], str] = field(default_factory=dict)


def alpaca_reference() -> Path:
    """Return the path of the AlpacaEval 2 reference outputs (GPT-4-turbo, 805 instructions) in the offline data folder."""
    return offline_data_dir() / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json.gz"


def check_offline_data(scale: Scale, table: str) -> None:
    """Exit with a clear message before any work when a file this table needs is missing."""
    needed = [Path(path) for path in scale.datasets.values() if scale.name != "paper"]
    if table in ("table1", "table2"):
        needed.append(alpaca_reference())
    missing = [path for path in needed if not path.exists()]
    if not missing:
        return
    offline = offline_data_dir()
    if not missing[0].is_relative_to(offline):
        raise SystemExit(f"Data path not found: {missing[0]}.")
    raise SystemExit(
        f"Data file not found: {missing[0]}. Set {OFFLINE_DATA_ENV} to the folder that contains "
        f"{missing[0].relative_to(offline)}"
        + (" (the gpt4_1106_preview model outputs of the tatsu-lab/alpaca_eval hub data set)."
           if missing[0] == alpaca_reference() else ".")
    )


def make_scale(name: str, work: Path) -> Scale:
    """Return the settings of scale ``name`` (ci, small or paper). The ci model is built under ``work``."""
    if name == "ci":
        return Scale(
            name=name,
            models={"tiny-llama": str(work / "models" / "tiny-llama")},
            datasets={"AlpacaPairs": str(offline_data_dir() / "alpaca_eval" / "preference_pairs.jsonl.gz")},
            seeds=[0],
            max_pairs=40,
            max_length=64,
            baseline_flags=[
                "--max_steps", "2", "--gradient_accumulation_steps", "1", "--eval_steps", "1",
                "--max_eval_pairs", "4", "--lora_r", "4", "--lora_alpha", "8",
                "--warmup_steps", "0", "--learning_rate", "0.005",
            ],
            cronos_flags=["--admm_iters", "3", "--pcg_iters", "8", "--nystrom_rank", "5", "--no_progress"],
            adamw_flags=["--adamw_lr_count", "2", "--adamw_seeds", "1", "--adamw_epochs", "3"],
            finetune_flags=["--epochs", "20"],
            eval_instances=2,
            max_new_tokens=8,
            judge="local:TINY",  # replaced by the built model's folder in prepare_models
        )
    if name == "small":
        return Scale(
            name=name,
            models={"SmolLM2-135M": str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct")},
            datasets={"Edu": str(REPO_ROOT / "datasets" / "edu_sample")},
            seeds=[0, 1, 2],
            max_pairs=None,
            max_length=256,
            baseline_flags=["--eval_steps", "2", "--max_eval_pairs", "16", "--warmup_steps", "0.1"],
            cronos_flags=["--no_progress"],
            adamw_flags=[],
            finetune_flags=[],
            eval_instances=20,
            max_new_tokens=64,
            judge="local:MODEL",  # replaced by the converted model's folder in prepare_models
        )
    if name == "paper":
        models = {"Mistral-7B": "mistral_7b", "Dolphin-7B": "dolphin2.6_7b", "Llama-3.1-8B": "llama3.1_8b"}
        datasets = {"Edu": "edufeedback", "IMDb": "imdb", "Ultra": "ultrafeedback"}
        configs = {(m, d): str(REPO_ROOT / "configs" / f"{mk}_{dk}.yaml") for m, mk in models.items() for d, dk in datasets.items()}
        return Scale(
            name=name,
            models=dict(models),  # replaced by each config's model_path in prepare_models
            datasets=dict(datasets),
            seeds=[0, 1, 2],
            max_pairs=None,
            max_length=512,
            baseline_flags=[],
            cronos_flags=[],
            adamw_flags=[],
            finetune_flags=[],
            eval_instances=None,
            max_new_tokens=512,
            judge="alpaca_eval",
            configs=configs,
        )
    raise SystemExit(f"Unknown scale {name!r}; use ci, small or paper.")


# ---------------------------------------------------------------------------
# Models and data


def prepare_models(scale: Scale, work: Path) -> None:
    """Build the tiny ci model, or convert SmolLM2's GGUF once; the paper scale reads model paths from its configs."""
    if scale.name == "ci":
        target = Path(scale.models["tiny-llama"])
        if not (target / "config.json").is_file():
            sys.path.insert(0, str(REPO_ROOT / "tests"))
            from conftest import build_tiny_model

            build_tiny_model(target)
        scale.judge = f"local:{target}"
    elif scale.name == "small":
        from coala.backbone import ensure_converted_smollm2

        folder = ensure_converted_smollm2(REPO_ROOT / "models")
        scale.models = {"SmolLM2-135M": str(folder)}
        scale.judge = f"local:{folder}"
    else:
        import yaml

        for (model, dataset), config in scale.configs.items():
            scale.models[model] = yaml.safe_load(Path(config).read_text())["dpo"]["model_path"]
            scale.datasets[dataset] = yaml.safe_load(Path(config).read_text())["dpo"]["data_path"]


def config_flags(scale: Scale, model: str, dataset: str) -> list[str]:
    config = scale.configs.get((model, dataset))
    return ["--config", config] if config else []


def done(path: Path) -> bool:
    return path.exists()


# Settings that name where a run went, how it logged, or an extra report. They do not change what it computed.
UNCOMPARED_SETTINGS = frozenset({"config", "output_dir", "no_progress", "verbose", "device", "compare_adamw"})


def parsed_settings(parser: argparse.ArgumentParser, argv: list[str], section: str) -> dict[str, Any]:
    """Return the settings a stage would run with, as JSON values (the form its saved config has)."""
    from coala.config import parse_args_with_config

    return json_values(parse_args_with_config(parser, argv, section=section))


def json_values(args: argparse.Namespace) -> dict[str, Any]:
    """Return parsed settings as they read back from a saved JSON config (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def same_setting(saved: Any, current: Any) -> bool:
    """Compare two setting values, treating a relative and an absolute spelling of one path as equal."""
    if saved == current:
        return True
    return isinstance(saved, str) and isinstance(current, str) and os.path.abspath(saved) == os.path.abspath(current)


def reusable(output: Path, marker: Path, saved: Path, settings: dict[str, Any], inputs: tuple[Path, ...] = ()) -> bool:
    """Return True when ``marker`` exists, the run's ``saved`` settings equal ``settings`` and no input is newer.

    A finished run whose settings changed (new defaults, an edited YAML config) or
    whose ``inputs`` (files of upstream runs) were rewritten after it is deleted, so
    that the stage runs again from scratch.
    """
    if not done(marker):
        return False
    stored = json.loads(saved.read_text()) if saved.is_file() else {}
    reasons = [
        f"{name}: {stored[name]!r} -> {value!r}"
        for name, value in settings.items()
        # With None the stage derives the value (a model name, a default path) and saves the derived value.
        if name in stored and name not in UNCOMPARED_SETTINGS and value is not None and not same_setting(stored[name], value)
    ]
    reasons += [f"{path} is newer" for path in inputs if path.exists() and path.stat().st_mtime > marker.stat().st_mtime]
    if not reasons:
        return True
    logger.warning("Rerunning %s: %s", output, "; ".join(reasons))
    shutil.rmtree(output)
    return False


# ---------------------------------------------------------------------------
# Stages (each skipped when its output exists with the same settings)


def run_coala(scale: Scale, work: Path, model: str, dataset: str, seed: int, compare_adamw: bool = False) -> dict[str, Path]:
    """Stage 1, CRONOS (optionally with the AdamW comparison) and Stage 3; return their folders."""
    import cronos_trainer
    import extract
    import finetune_coala

    base = work / "coala" / model / dataset
    features, head, tuned = base / "features", base / f"head-seed{seed}", base / f"finetuned-seed{seed}"
    flags = config_flags(scale, model, dataset)
    if not done(features / "manifest.json"):
        argv = [*flags, "--model_path", scale.models[model], "--data_path", scale.datasets[dataset], "--pool", "attn",
                "--max_length", str(scale.max_length), "--output_dir", str(features), "--device", "cpu" if scale.name != "paper" else "auto"]
        if scale.max_pairs:
            argv += ["--max_pairs", str(scale.max_pairs)]
        extract.main(argv)
    # The AdamW settings are always compared, so a head trained with --compare_adamw also serves runs without it.
    argv = [*flags, "--features_dir", str(features), "--output_dir", str(head), "--seed", str(seed), *scale.cronos_flags,
            *scale.adamw_flags]
    settings = parsed_settings(cronos_trainer.build_parser(), argv, "cronos")
    head_ready = reusable(head, head / "head.safetensors", head / "config.json", settings, inputs=(features / "manifest.json",))
    if not head_ready or (compare_adamw and not done(head / "adamw_comparison.json")):
        cronos_trainer.main([*argv, "--compare_adamw"] if compare_adamw else argv)
    argv = [*flags, "--model_path", str(head), "--output_dir", str(tuned), "--seed", str(seed), *scale.finetune_flags]
    settings = parsed_settings(finetune_coala.build_parser(), argv, "finetune")
    if not reusable(tuned, tuned / "metrics.json", tuned / "resolved_config.json", settings, inputs=(head / "head.safetensors",)):
        finetune_coala.main(argv)
    return {"features": features, "head": head, "finetuned": tuned}


def run_baseline(scale: Scale, work: Path, method: str, model: str, dataset: str, seed: int) -> Path:
    from coala import baselines
    from coala.config import parse_args_with_config

    out = work / "baselines" / model / dataset / f"{method}-seed{seed}"
    argv = [*config_flags(scale, model, dataset), "--model_path", scale.models[model], "--data_path", scale.datasets[dataset],
            "--output_dir", str(out), "--seed", str(seed), "--max_length", str(scale.max_length), *scale.baseline_flags]
    if scale.max_pairs:
        argv += ["--max_pairs", str(scale.max_pairs)]
    settings = parsed_settings(baselines.build_parser(method), argv, method)
    if reusable(out, out / baselines.METRICS_FILE, out / baselines.RUN_CONFIG_FILE, settings):
        return out
    args = parse_args_with_config(baselines.build_parser(method), argv, section=method)
    baselines.run_baseline(method, args)
    return out


def run_eval(scale: Scale, work: Path, method: str, model: str, dataset: str, seed: int) -> Path:
    """Generate answers to the AlpacaEval instructions with one method and judge them against the reference."""
    import eval_alpaca

    out = work / "eval" / model / method / dataset / f"seed{seed}"
    common = [*config_flags(scale, model, dataset)]
    if method == "COALA":
        tuned = run_coala(scale, work, model, dataset, seed)["finetuned"]
        source = ["--model_path", scale.models[model], "--head", str(tuned)]
        upstream = tuned / "head.safetensors"
    else:
        adapter = run_baseline(scale, work, method.lower(), model, dataset, seed)
        source = ["--model_path", str(adapter)]
        upstream = adapter / "metrics.json"
    generate = ["generate", *common, *source, "--eval_set", str(alpaca_reference()), "--output_dir", str(out),
                "--max_new_tokens", str(scale.max_new_tokens), "--seed", str(seed), "--generator_name", method]
    if scale.eval_instances:
        generate += ["--max_instances", str(scale.eval_instances)]
    if scale.name != "paper":
        generate += ["--device", "cpu"]
    settings = json_values(eval_alpaca.parse_command_line(generate)[1])
    if reusable(out, out / "metrics.json", out / "generation_config.json", settings, inputs=(upstream,)):
        return out
    if not done(out / "model_outputs.json") or scale.eval_instances is None:
        eval_alpaca.main(generate)
    judge = ["judge", *common, "--outputs", str(out / "model_outputs.json"), "--reference", str(alpaca_reference()), "--judge", scale.judge,
             "--method", method, "--dataset", dataset, "--model_name", model, "--seed", str(seed)]
    eval_alpaca.main(judge)
    return out


# ---------------------------------------------------------------------------
# Writing tables


def write_table(results_dir: Path, title: str, notes: list[str], columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write table.md (title, notes, markdown table) and table.csv into ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |")
    atomic_write_text(results_dir / "table.md", "\n".join(lines) + "\n")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results_dir / "table.csv", buffer.getvalue())
    print("\n".join(lines))


def format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def difference(ours: float | None, paper: float | None) -> float | None:
    if ours is None or paper is None or (isinstance(ours, float) and math.isnan(ours)):
        return None
    return ours - paper


def judge_label(scale: Scale) -> str:
    if scale.judge.startswith("local:"):
        return f"local pairwise judge on {next(iter(scale.models))} (eval_alpaca.py judge --judge local:MODEL)"
    return scale.judge


def scale_note(scale: Scale) -> str:
    models = ", ".join(scale.models)
    data = ", ".join(f"{label} = {Path(path).name}" for label, path in scale.datasets.items())
    return f"Scale {scale.name}: models {models}; data {data}; seeds {scale.seeds}."


# ---------------------------------------------------------------------------
# Figure 1


def figure1(scale: Scale, work: Path, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    model, dataset = next(iter(scale.models)), next(iter(scale.datasets))
    seed = scale.seeds[0]
    coala = json.loads((run_coala(scale, work, model, dataset, seed)["finetuned"] / "metrics.json").read_text())
    dpo = json.loads((run_baseline(scale, work, "dpo", model, dataset, seed) / "metrics.json").read_text())

    coala_train = coala["history"]["train"]["margin"]
    coala_val = coala["history"]["validation"]["margin"]
    dpo_train = [(row["step"], row["rewards/margins"]) for row in dpo["train"] if "rewards/margins" in row]
    dpo_val = [(row["step"], row["rewards/margins"]) for row in dpo["validation"] if "rewards/margins" in row]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(range(1, len(coala_train) + 1), coala_train, label="train")
    left.plot(range(1, len(coala_val) + 1), coala_val, label="validation")
    left.set(title=f"COALA (Stage 3) on {dataset}", xlabel="epoch", ylabel="mean reward margin r_w - r_l")
    right.plot([s for s, _ in dpo_train], [m for _, m in dpo_train], label="train")
    right.plot([s for s, _ in dpo_val], [m for _, m in dpo_val], "o-", label="validation")
    right.set(title=f"DPO (LoRA) on {dataset}", xlabel="optimizer step", ylabel="TRL rewards/margins")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(f"Reward margins, {model}")
    figure.tight_layout()
    results.mkdir(parents=True, exist_ok=True)
    figure.savefig(results / "reward_margins.png", dpi=120)
    plt.close(figure)

    for method, train, val in (("COALA", coala_train, coala_val), ("DPO", [m for _, m in dpo_train], [m for _, m in dpo_val])):
        rows.append({
            "method": method,
            "train margin first": train[0] if train else None,
            "train margin last": train[-1] if train else None,
            "validation margin last": val[-1] if val else None,
            "train margin rose monotonically": all(b >= a for a, b in zip(train, train[1:])) if train else None,
            "paper": "rises monotonically" if method == "COALA" else "noisy",
        })
    write_table(results, "Figure 1: reward margins per step, COALA vs DPO", [
        scale_note(scale),
        "The paper shows the margins as a figure without numbers; its claim is that COALA's margins rise monotonically and DPO's are noisy. The last column is that claim, the one before it our measurement.",
        "COALA's margin is the head's r_w - r_l; DPO's is TRL's beta-scaled log-ratio margin, so the two scales are not comparable, only their shapes.",
        "Plot: reward_margins.png.",
    ], ["method", "train margin first", "train margin last", "validation margin last", "train margin rose monotonically", "paper"], rows)


# ---------------------------------------------------------------------------
# Table 1 and Table 2


def table1(scale: Scale, work: Path, results: Path) -> None:
    from coala.winrate import aggregate_runs, collect_runs

    for model in scale.models:
        for dataset in scale.datasets:
            for seed in scale.seeds:
                for method in METHODS:
                    run_eval(scale, work, method, model, dataset, seed)
    table = aggregate_runs(collect_runs(work / "eval"))
    rows = []
    for record in table.to_dict("records"):
        paper = PAPER_TABLE1.get((record["model"], record["method"], record["dataset"]), {})
        row = {"model": record["model"], "method": record["method"], "dataset": record["dataset"], "seeds": record["seeds"]}
        for key, label in (("length_controlled_winrate", "LC WR"), ("win_rate", "WR"), ("avg_length", "len")):
            mean, std = record[f"{key}_mean"], record[f"{key}_std"]
            row[label] = None if math.isnan(mean) else f"{mean:.2f}±{std:.2f}"
            published = paper.get(label)
            row[f"paper {label}"] = None if published is None else f"{published[0]:.2f}±{published[1]:.2f}"
            row[f"diff {label}"] = difference(None if math.isnan(mean) else mean, None if published is None else published[0])
        rows.append(row)
    reasons = sorted({r for r in table.get("lc_missing_reason", []) if r})
    notes = [
        scale_note(scale),
        f"Judge: {judge_label(scale)}. The paper's judge is AlpacaEval 2's GPT-4-turbo annotator; any other judge makes the numbers a different measurement.",
        "Paper cells exist only for Mistral-7B, Dolphin-7B and Llama-3.1-8B on EduFeedback, IMDb and UltraFeedback; other rows show n/a there.",
    ]
    if scale.name == "small":
        notes.append(
            "The local SmolLM2-135M judge picked the same winner as GPT-4-turbo on 53.5% of 200 AlpacaEval pairs "
            "(benchmarks/bench_judge.py), close to chance. Differences of a few points between methods here are noise."
        )
    notes += paper_context_table1(scale, {row["model"] for row in rows})
    if scale.eval_instances:
        notes.append(f"Only the first {scale.eval_instances} of the 805 AlpacaEval 2 instructions, {scale.max_new_tokens} new tokens per answer.")
    if reasons:
        notes.append("LC win rate missing: " + reasons[0])
    columns = ["model", "method", "dataset", "seeds"]
    for label in ("LC WR", "WR", "len"):
        columns += [label, f"paper {label}", f"diff {label}"]
    write_table(results, "Table 1: AlpacaEval 2 win rates (mean ± std over seeds)", notes, columns, rows)


def paper_context_table1(scale: Scale, our_models: set[str]) -> list[str]:
    """Return one note per data set of this scale with the paper's WR per model and method, when no row has a paper cell."""
    notes = []
    for dataset in scale.datasets:
        paper_models = sorted({model for model, _, cell_dataset in PAPER_TABLE1 if cell_dataset == dataset})
        if not paper_models or our_models & set(paper_models):
            continue
        parts = []
        for model in paper_models:
            cells = ", ".join(f"{method} {PAPER_TABLE1[(model, method, dataset)]['WR'][0]:.2f}" for method in METHODS
                              if (model, method, dataset) in PAPER_TABLE1)
            parts.append(f"{model}: {cells}")
        notes.append(f"For comparison, the paper's WR on {dataset} (other models): " + "; ".join(parts) + ".")
    return notes


def standin_votes(work: Path, path: Path) -> int:
    """Write votes derived from the local judge: per (dataset, instruction) the method whose answer it preferred most over the reference."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for annotations in sorted((work / "eval").glob("*/*/*/seed*/annotations.json")):
        method, dataset = annotations.parts[-4], annotations.parts[-3]
        for row in json.loads(annotations.read_text()):
            preference = row.get("preference")
            if preference is None or (isinstance(preference, float) and math.isnan(preference)):
                continue
            key = (dataset, f"{annotations.parts[-2]}:{row['instruction'][:80]}")
            if key not in best or preference > best[key][0]:
                best[key] = (float(preference), method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["participant", "dataset", "question", "preferred_method"])
        for (dataset, question), (_, method) in sorted(best.items()):
            writer.writerow(["local-judge-standin", dataset, question, method])
    return len(best)


def table2(scale: Scale, work: Path, results: Path, votes: str | None) -> None:
    from coala.human_eval import read_votes, win_rates

    notes = [scale_note(scale)]
    if votes:
        votes_path = Path(votes)
        notes.append(f"Votes: {votes_path} (human votes supplied by the user).")
    else:
        table1(scale, work, work / "table1-for-table2")
        votes_path = work / "standin_votes.csv"
        count = standin_votes(work, votes_path)
        notes.append(
            f"STAND-IN, NOT HUMAN DATA: no human votes were given (VOTES=file.csv), so each of {count} questions got one vote "
            f"for the method whose answer the local judge ({judge_label(scale)}) preferred most over the reference answer." 
        )
    results_rows = win_rates(read_votes(votes_path), list(METHODS))
    rows = []
    for result in results_rows:
        paper = PAPER_TABLE2.get((result.dataset, result.method))
        rows.append({
            "dataset": result.dataset, "method": result.method, "votes": result.votes, "wins": result.wins,
            "win rate %": 100 * result.rate, "95% Wald ± %": 100 * result.half_width,
            "paper win rate %": None if paper is None else paper[0], "paper ± %": None if paper is None else paper[1],
            "diff %": difference(100 * result.rate, None if paper is None else paper[0]),
        })
    notes.append("Paper cells exist for EduFeedback (Edu) and IMDb only.")
    write_table(results, "Table 2: preference study win rates with 95% Wald intervals", notes,
                ["dataset", "method", "votes", "wins", "win rate %", "95% Wald ± %", "paper win rate %", "paper ± %", "diff %"], rows)


# ---------------------------------------------------------------------------
# Table 3


def table3(scale: Scale, work: Path, results: Path) -> None:
    """Analytic TFLOPs: the paper's models from configs (no download) and, below ci/paper scale, a measured run."""
    import yaml

    from coala import flops

    rows = []
    config_names = {"DistilGPT2": "distilgpt2", "GPT-2": "gpt2", "Mistral-7B": "mistral_7b", "Llama-3.1-8B": "llama3.1_8b", "Dolphin-7B": "dolphin2.6_7b"}
    for label, key in config_names.items():
        config = yaml.safe_load((REPO_ROOT / "configs" / f"{key}_edufeedback.yaml").read_text())
        shape = flops.ModelShape.from_mapping(config["model_shape"])
        length = int(config["extract"]["max_length"])
        counts = flops.TokenCounts.uniform(PAPER_TABLE3_TRAIN_PAIRS, length)
        ours = flops.method_flops(shape, counts, counts, epochs=1.0, lora_rank=16,
                                  coala_settings={"num_patterns": 10, "admm_iters": 6, "pcg_iters": 32, "nystrom_rank": 20, "finetune_epochs": 500, "finetune_pairs": 2000})
        rows.append(table3_row(label, "EduFeedback (configured: 59,045 train pairs x 128 tokens)", ours, PAPER_TABLE3.get(label)))

    if scale.name != "paper":
        model, dataset = next(iter(scale.models)), next(iter(scale.datasets))
        coala = run_coala(scale, work, model, dataset, scale.seeds[0])
        meta = [json.loads(line) for line in (coala["features"] / "meta.jsonl").read_text().splitlines() if line.strip()]
        train = [row for row in meta if row["split"] == "train"]
        chosen = flops.TokenCounts.from_lengths(row["chosen_tokens"] for row in train)
        rejected = flops.TokenCounts.from_lengths(row["rejected_tokens"] for row in train)
        from transformers import AutoConfig, AutoModelForCausalLM

        with_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(scale.models[model]))
        shape = flops.ModelShape.from_model(with_model)
        cronos = json.loads((coala["head"] / "metrics.json").read_text())
        head_config = json.loads((coala["head"] / "config.json").read_text())
        settings = head_config.get("settings", head_config)
        patterns, rank = int(settings.get("num_patterns", 10)), int(settings.get("nystrom_rank", 20))
        matvecs = flops.cronos_matvecs_measured(patterns, [row["pcg_iterations"] for row in cronos["history"]], rank)
        tuned = json.loads((coala["finetuned"] / "metrics.json").read_text())
        adapters = flops.lora_parameter_count(shape, 16)
        ours = {
            "SFT": flops.sft_flops(shape, chosen, 1.0, adapters),
            "DPO": flops.dpo_flops(shape, chosen, rejected, 1.0, adapters),
            "ORPO": flops.orpo_flops(shape, chosen, rejected, 1.0, adapters),
            "COALA": flops.coala_flops(shape, chosen, rejected, num_patterns=patterns, finetune_epochs=len(tuned["history"]["train"]["loss"]), matvecs=matvecs)["total"],
        }
        rows.append(table3_row(model, f"{dataset} (measured: {len(train)} train pairs, {chosen.tokens + rejected.tokens} tokens)", ours, None))

    write_table(results, "Table 3: TFLOPs per method, one epoch", [
        scale_note(scale),
        "Ours: analytic counts (coala/flops.py): forward 2N + attention 2LTd + logits 2Vd per token; LoRA r 16 training = 2 x forward + 6 x adapter parameters per token; DPO adds the reference forward; COALA = Stage 1 forward (no logits) + CRONOS products with X + Stage 3.",
        "Paper: wall time x an assumed 231 TFLOP/s in the authors' release, so the two columns measure different things; the ratio column shows by how much they differ.",
        "Rows for the paper's models use configured token counts (every sequence at the release's max length 128, as its padding makes it) and need no download.",
    ], ["model", "data", "method", "ours TFLOPs", "paper TFLOPs", "ours / paper", "ours COALA / DPO", "paper COALA / DPO"],
        [row for group in rows for row in group])


def table3_row(model: str, data: str, ours: dict[str, float], paper: dict[str, float] | None) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        published = None if paper is None else paper[method]
        value = ours[method] / 1e12
        rows.append({
            "model": model, "data": data, "method": method, "ours TFLOPs": value, "paper TFLOPs": published,
            "ours / paper": None if published is None else value / published,
            "ours COALA / DPO": ours["COALA"] / ours["DPO"] if method == "COALA" else None,
            "paper COALA / DPO": (paper["COALA"] / paper["DPO"]) if (paper and method == "COALA") else None,
        })
    return rows


# ---------------------------------------------------------------------------
# Table 7


def table7(scale: Scale, work: Path, results: Path) -> None:
    rows = []
    for model in scale.models:
        for dataset in scale.datasets:
            coala = run_coala(scale, work, model, dataset, scale.seeds[0], compare_adamw=True)
            comparison = json.loads((coala["head"] / "adamw_comparison.json").read_text())
            cronos_acc = 100 * comparison["cronos"]["test_accuracy"]
            adamw_acc = 100 * comparison["adamw"]["selected"]["test_accuracy"]
            paper = PAPER_TABLE7.get((model, dataset))
            rows.append({
                "model": model, "dataset": dataset,
                "CRONOS test acc %": cronos_acc, "AdamW test acc %": adamw_acc,
                "CRONOS wall s": comparison["cronos"]["seconds"], "AdamW search wall s": comparison["adamw"]["seconds"],
                "paper CRONOS %": None if paper is None else paper[0], "paper AdamW %": None if paper is None else paper[1],
                "diff CRONOS %": difference(cronos_acc, None if paper is None else paper[0]),
                "diff AdamW %": difference(adamw_acc, None if paper is None else paper[1]),
            })
    write_table(results, "Table 7: Stage 1 preference classification, CRONOS vs AdamW", [
        scale_note(scale),
        "Accuracy: the head's test-split classification accuracy (chosen +1, rejected -1); AdamW's learning rate is the one chosen on the validation split.",
        "The paper's cells use SFT-trained DistilGPT2, GPT-2, Mistral-7B, Dolphin-7B and Llama-8B backbones; rows without a matching cell show n/a.",
    ], ["model", "dataset", "CRONOS test acc %", "AdamW test acc %", "CRONOS wall s", "AdamW search wall s", "paper CRONOS %", "paper AdamW %", "diff CRONOS %", "diff AdamW %"], rows)


# ---------------------------------------------------------------------------


TABLES: dict[str, Callable[..., None]] = {"figure1": figure1, "table1": table1, "table3": table3, "table7": table7}
RESULT_FOLDERS = {"figure1": "figure1", "table1": "table1", "table2": "table2", "table3": "table3", "table7": "table7"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=sorted(RESULT_FOLDERS), help="The figure or table to regenerate.")
    parser.add_argument("--scale", default="small", choices=("ci", "small", "paper"), help="ci: seconds, tiny model; small: SmolLM2 on CPU; paper: the paper's models on a GPU.")
    parser.add_argument("--results_root", default=str(REPO_ROOT / "results"), help="table.md and table.csv go to RESULTS_ROOT/<table>/.")
    parser.add_argument("--work_dir", default=None, help="Runs and caches (default: RESULTS_ROOT/work/runs/<scale>).")
    parser.add_argument("--votes", default=None, help="table2 only: CSV of human votes (participant,dataset,question,preferred_method).")
    args = parser.parse_args(argv)
    setup_logging()

    # Relative paths are taken from the caller's folder; they are made absolute before the chdir below.
    results_root = Path(args.results_root).expanduser().resolve()
    work = Path(args.work_dir).expanduser().resolve() if args.work_dir else results_root / "work" / "runs" / args.scale
    if os.environ.get(OFFLINE_DATA_ENV, "").strip():
        os.environ[OFFLINE_DATA_ENV] = str(offline_data_dir().resolve())
    if args.votes:
        args.votes = str(Path(args.votes).expanduser().resolve())
    scale = make_scale(args.scale, work)
    # Table 2 from supplied votes reads only the votes file: no models, runs or AlpacaEval files.
    votes_only = args.table == "table2" and args.votes is not None
    if votes_only and not Path(args.votes).is_file():
        raise SystemExit(f"Votes file not found: {args.votes}. Pass a CSV with participant,dataset,question,preferred_method.")
    if not votes_only:
        check_offline_data(scale, args.table)
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO_ROOT)
    if not votes_only:
        prepare_models(scale, work)
    results = results_root / RESULT_FOLDERS[args.table]
    if args.table == "table2":
        table2(scale, work, results, args.votes)
    else:
        TABLES[args.table](scale, work, results)
    print(f"Wrote {results / 'table.md'} and {results / 'table.csv'}")
    return 0


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main)
