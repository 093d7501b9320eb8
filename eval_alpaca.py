"""Evaluate on AlpacaEval 2: generate outputs, judge them, print Table 1 and Table 2 of the COALA paper.

The paper: Feng & Pilanci, "Convex Optimization for Alignment and Preference Learning on a Single GPU", ICML 2026.

    python eval_alpaca.py generate --model_path M [--head HEAD_DIR] --eval_set E --output_dir O
        writes O/model_outputs.json (AlpacaEval format) and O/generation_config.json
    python eval_alpaca.py judge --outputs O/model_outputs.json --reference R --judge local:MODEL
        writes annotations.json and metrics.json next to the outputs (or in --output_dir)
    python eval_alpaca.py table RESULTS_DIR
        Table 1 (LC WR, WR, average length; mean±std over seeds) as markdown and CSV
    python eval_alpaca.py human VOTES.csv
        Table 2 (win rate ± 95% Wald interval per dataset) as markdown and CSV

Every flag can also come from the ``eval`` section of a YAML file given with --config.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Sequence

from coala.config import add_config_flag, namespace_to_dict, parse_args_with_config

logger = logging.getLogger("eval_alpaca")

COMMANDS = ("generate", "judge", "table", "human")


# -----------------------------------------------------------------------------
# Settings, one parser per subcommand


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"eval_alpaca.py {command}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flag(parser)
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    if command == "generate":
        parser.add_argument("--model_path", required=True, help="hub id, model folder, .gguf file or PEFT adapter folder")
        parser.add_argument("--gguf_file", default=None, help="GGUF file name inside --model_path")
        parser.add_argument("--head", default=None, help="COALA head folder (cronos_trainer.py or finetune_coala.py output); steers decoding")
        parser.add_argument("--eval_set", default="tatsu-lab/alpaca_eval", help="JSON/JSONL(.gz) file with 'instruction' per record, or a hub data set id")
        parser.add_argument("--output_dir", required=True, help="folder for model_outputs.json; rerunning resumes it")
        parser.add_argument("--generator_name", default=None, help="'generator' field of the outputs (default: model folder name, +coala with --head)")
        parser.add_argument("--max_new_tokens", type=int, default=512, help="generated tokens per output, the same for every method")
        parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (> 0)")
        parser.add_argument("--top_p", type=float, default=0.9, help="nucleus probability mass in (0, 1]")
        parser.add_argument("--top_k", type=int, default=50, help="most likely tokens kept before sampling")
        parser.add_argument("--seed", type=int, default=0, help="base seed; the batch at eval-set position i uses seed + i")
        parser.add_argument("--max_instances", type=int, default=None, help="answer only the first N instructions")
        parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
        parser.add_argument("--guidance_scale", type=float, default=1.0, help="weight lambda of the min-max normalized head scores (with --head)")
        parser.add_argument("--guide_every", type=int, default=5, help="apply the head every N generated tokens (with --head)")
        parser.add_argument("--num_candidates", type=int, default=5, help="candidate tokens scored by the head (with --head)")
        parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"], help="model weights dtype")
        parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda; auto picks cuda when available")
    elif command == "judge":
        parser.add_argument("--outputs", default=None, help="model_outputs.json to judge (optional with --judge annotations:FILE)")
        parser.add_argument("--reference", required=True, help="reference outputs (JSON/JSONL(.gz) with instruction and output), e.g. gpt4_1106_preview outputs")
        parser.add_argument("--judge", required=True, help="alpaca_eval | local:MODEL_PATH | annotations:FILE")
        parser.add_argument("--output_dir", default=None, help="folder for annotations.json and metrics.json (default: the folder of --outputs)")
        parser.add_argument("--alpaca_eval_data", default=None, help="folder with df_gamed.csv and instruction_difficulty.csv for the LC win rate")
        parser.add_argument("--lc_approximation", action="store_true", help="without the LC files, also report the length_controlled_minimal GLM (never labelled LC)")
        parser.add_argument("--judge_batch_size", type=int, default=8, help="prompts per forward pass of the local judge (two per pair)")
        parser.add_argument("--judge_max_response_tokens", type=int, default=384, help="local judge: tokens kept of each response and of the instruction")
        parser.add_argument("--max_instances", type=int, default=None, help="judge only the first N outputs")
        parser.add_argument("--method", default=None, help="method label stored in metrics.json for the table command, e.g. COALA")
        parser.add_argument("--dataset", default=None, help="preference data set label stored in metrics.json, e.g. IMDb")
        parser.add_argument("--model_name", default=None, help="model label stored in metrics.json, e.g. Mistral-7B")
        parser.add_argument("--seed", type=int, default=None, help="seed label (default: the seed in generation_config.json)")
        parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"], help="local judge weights dtype")
        parser.add_argument("--device", default="auto", help="torch device for the local judge")
    elif command == "table":
        parser.add_argument("results_dir", help="folder with RESULTS_DIR/<model>/<method>/<dataset>/seed<k>/metrics.json")
        parser.add_argument("--csv", default=None, help="CSV output path (default: RESULTS_DIR/table1.csv)")
    elif command == "human":
        parser.add_argument("votes", help="CSV with columns participant,dataset,question,preferred_method")
        parser.add_argument("--methods", default=None, help="comma-separated method order, e.g. COALA,ORPO,DPO,SFT (default: order of first vote)")
        parser.add_argument("--csv", default=None, help="CSV output path (default: table2.csv next to the votes file)")
    return parser


def parse_command_line(argv: Sequence[str]) -> tuple[str, argparse.Namespace]:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(f"Give a subcommand: one of {', '.join(COMMANDS)}.")
    command = argv[0]
    other_keys = {action.dest for other in COMMANDS if other != command for action in build_parser(other)._actions}
    args = parse_args_with_config(build_parser(command), list(argv[1:]), section="eval", ignored_keys=sorted(other_keys))
    return command, args


# -----------------------------------------------------------------------------
# generate


def run_generate(args: argparse.Namespace) -> None:
    from coala.alpaca import (
        MODEL_OUTPUTS_FILE,
        SamplingSettings,
        generate_outputs,
        load_eval_set,
        make_batch_generator,
    )
    from coala.backbone import load_backbone, resolve_device
    from coala.io import atomic_write_json, read_json

    # Check the settings and the resume state before loading anything
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        guide_every=args.guide_every,
        num_candidates=args.num_candidates,
    )
    output_dir = Path(args.output_dir)
    config = namespace_to_dict(args)
    config_path = output_dir / "generation_config.json"
    if config_path.is_file():
        check_same_generation_settings(read_json(config_path), config, config_path)
    if args.head is not None:
        from coala.head import load_head

        load_head(args.head)  # a broken head folder fails here, before the model loads
    records = load_eval_set(args.eval_set, args.max_instances)

    # Load the model
    device = resolve_device(args.device)
    model, tokenizer = load_backbone(args.model_path, gguf_file=args.gguf_file, dtype=args.dtype, device=device)
    generator_name = args.generator_name or default_generator_name(args.model_path, args.head)
    config.update(generator_name=generator_name, device=device)
    atomic_write_json(config_path, config)

    # Generate, rewriting model_outputs.json after each batch
    generate_batch = make_batch_generator(model, tokenizer, settings, head_dir=args.head)
    outputs = generate_outputs(records, generate_batch, output_dir / MODEL_OUTPUTS_FILE, generator_name, args.batch_size)

    mean_chars = sum(len(row["output"]) for row in outputs) / max(len(outputs), 1)
    print(f"Wrote {len(outputs)} outputs of {generator_name} to {output_dir / MODEL_OUTPUTS_FILE} (mean {mean_chars:.0f} characters)")


RESUME_IGNORED_KEYS = {"config", "verbose", "device", "max_instances", "generator_name", "output_dir"}


def check_same_generation_settings(previous: dict, current: dict, path: Path) -> None:
    """Refuse to resume outputs that were generated with other settings."""
    changed = sorted(
        key for key in set(previous) | set(current)
        if key not in RESUME_IGNORED_KEYS and key in current and previous.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise SystemExit(f"{path} was written with other settings ({details}). Use a new --output_dir or the same settings to resume.")


def default_generator_name(model_path: str, head: str | None) -> str:
    name = Path(model_path.rstrip("/")).name or model_path
    return f"{name}+coala" if head else name


# -----------------------------------------------------------------------------
# judge


def run_judge(args: argparse.Namespace) -> None:
    from coala.alpaca import align_on_instruction, load_eval_set, load_model_outputs
    from coala.io import atomic_write_json
    from coala.judge import align_annotations_to_reference, annotate_with_alpaca_eval, load_annotations
    from coala.winrate import judge_metrics

    # Read and align outputs with the reference
    kind, _, target = args.judge.partition(":")
    if kind not in ("alpaca_eval", "local", "annotations") or (kind != "alpaca_eval" and not target):
        raise SystemExit(f"Invalid --judge {args.judge!r}; use alpaca_eval, local:MODEL_PATH or annotations:FILE.")
    if args.outputs is None and kind != "annotations":
        raise SystemExit("--outputs is required unless --judge annotations:FILE is given.")
    reference = load_eval_set(args.reference)
    rows = None
    if args.outputs is not None:
        outputs = load_model_outputs(args.outputs)[: args.max_instances]
        rows = align_on_instruction(outputs, reference)
    output_dir = Path(args.output_dir or (Path(args.outputs).parent if args.outputs else "."))

    # Annotate
    if kind == "annotations":
        annotations = load_annotations(target, rows)[: args.max_instances]
    elif kind == "alpaca_eval":
        annotations = annotate_with_alpaca_eval(rows)
    else:
        annotations = run_local_judge(args, target, rows)
    positions = align_annotations_to_reference(annotations, reference)
    atomic_write_json(output_dir / "annotations.json", annotations)

    # Metrics, labelled for the table command
    metrics = judge_metrics(annotations, positions, args.alpaca_eval_data, args.lc_approximation)
    generation = read_generation_config(args.outputs)
    metrics["judge"] = args.judge
    metrics["n_reference"] = len(reference)
    metrics["run"] = {
        "model": args.model_name,
        "method": args.method,
        "dataset": args.dataset,
        "seed": args.seed if args.seed is not None else generation.get("seed"),
    }
    metrics["config"] = namespace_to_dict(args)
    atomic_write_json(output_dir / "metrics.json", metrics)

    lc = metrics["length_controlled_winrate"]
    lc_text = f"{lc:.2f}" if lc is not None else f"n/a ({metrics['length_controlled_winrate_missing_reason']})"
    print(f"judge {args.judge} on {metrics['n_total']} pairs ({metrics['n_nan']} NaN dropped)")
    print(f"  win rate            {metrics['win_rate']:.2f} ± {metrics['standard_error']:.2f}")
    print(f"  discrete win rate   {metrics['discrete_win_rate']:.2f}  (wins {metrics['n_wins']}, losses {metrics['n_wins_base']}, draws {metrics['n_draws']})")
    print(f"  LC win rate         {lc_text}")
    if metrics.get("length_controlled_minimal_winrate") is not None:
        print(f"  length_controlled_minimal (approximation, not LC) {metrics['length_controlled_minimal_winrate']:.2f}")
    print(f"  average length      {metrics['avg_length']:.0f} characters")
    print(f"Wrote {output_dir / 'annotations.json'} and {output_dir / 'metrics.json'}")


def read_generation_config(outputs: str | None) -> dict:
    """Return the generation_config.json written next to ``outputs`` by the generate command, or {}."""
    from coala.io import read_json

    if outputs is None:
        return {}
    path = Path(outputs).parent / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def run_local_judge(args: argparse.Namespace, model_path: str, rows: list) -> list[dict]:
    from coala.backbone import load_backbone, resolve_device
    from coala.judge import LocalJudge

    model, tokenizer = load_backbone(model_path, dtype=args.dtype, device=resolve_device(args.device))
    judge = LocalJudge(
        model,
        tokenizer,
        batch_size=args.judge_batch_size,
        max_response_tokens=args.judge_max_response_tokens,
        name=f"local:{Path(model_path.rstrip('/')).name}",
    )
    return judge.annotate(rows, progress=True)


# -----------------------------------------------------------------------------
# table and human


def run_table(args: argparse.Namespace) -> None:
    from coala.io import atomic_write_text
    from coala.winrate import aggregate_runs, collect_runs, format_table_markdown

    runs = collect_runs(args.results_dir)
    table = aggregate_runs(runs)
    csv_path = Path(args.csv or Path(args.results_dir) / "table1.csv")
    atomic_write_text(csv_path, table.to_csv(index=False))
    print(format_table_markdown(table))
    print(f"\n{len(runs)} runs; wrote {csv_path}")


def run_human(args: argparse.Namespace) -> None:
    from coala.human_eval import format_table_markdown, read_votes, rows_for_csv, win_rates
    from coala.io import atomic_write

    votes = read_votes(args.votes)
    methods = [name.strip() for name in args.methods.split(",")] if args.methods else None
    results = win_rates(votes, methods)
    csv_path = Path(args.csv or Path(args.votes).with_name("table2.csv"))
    rows = rows_for_csv(results)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(csv_path, write)
    print(format_table_markdown(results))
    print(f"\n{len(votes)} votes; wrote {csv_path}")


def main(argv: Sequence[str] | None = None) -> None:
    from coala.io import setup_logging

    command, args = parse_command_line(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    {"generate": run_generate, "judge": run_judge, "table": run_table, "human": run_human}[command](args)


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main, interrupted_hint="generate saves answers after every batch; rerun the same command to resume.")
