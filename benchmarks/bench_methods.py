#!/usr/bin/env python
"""Measure SFT, DPO, ORPO and the COALA pipeline on SmolLM2-135M-Instruct and HH-RLHF pairs on CPU.

    python benchmarks/bench_methods.py [--pairs 256] [--steps 2] [--work_dir /tmp/coala-bench-methods]

Each method runs in its own process under /usr/bin/time -v, which reports its
wall time and peak resident memory. A baseline epoch over the train split takes
minutes per optimizer step on a shared 2-core CPU. So the baselines run only
``--steps`` optimizer steps, and the epoch's wall time is extrapolated
linearly from the time per step (the start-up time is counted once). COALA (Stage 1 extraction, CRONOS, Stage 3 fine-tuning)
runs in full. FLOPs are analytic (coala.flops) from the measured token counts.
Results go to WORK_DIR/bench_methods.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala import flops  # noqa: E402
from coala.backbone import ensure_converted_smollm2  # noqa: E402
from coala.data import offline_data_dir  # noqa: E402

HH_RLHF = offline_data_dir() / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def timed(command: list[str], log_path: Path) -> dict:
    """Run ``command`` under /usr/bin/time -v; return wall seconds and peak RSS in MiB."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(["/usr/bin/time", "-v", *command], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    text = log_path.read_text()
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {completed.returncode}; see {log_path}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_seconds": wall, "peak_rss_mib": peak_kb / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256, help="HH-RLHF pairs (first N of the harmless test file).")
    parser.add_argument("--steps", type=int, default=1, help="Optimizer steps measured per baseline.")
    parser.add_argument("--grad_accum", type=int, default=8, help="Micro-batches of 2 pairs per optimizer step (8 gives the paper's batch 16).")
    parser.add_argument("--max_length", type=int, default=128, help="Tokens per prompt + response for every method (the authors' release uses 128).")
    parser.add_argument("--work_dir", default="/tmp/coala-bench-methods", help="Folder for runs and results.")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_converted_smollm2(Path(os.environ.get("COALA_TEST_CACHE", Path.home() / ".cache" / "coala-tests")))
    results: dict = {"pairs": args.pairs, "max_length": args.max_length, "batch": 2 * args.grad_accum, "model": str(model_dir), "cpu_count": os.cpu_count()}

    # Baselines: a fixed number of steps each, extrapolated to one epoch
    for method in ("sft", "dpo", "orpo"):
        out = work / method
        command = [sys.executable, f"baselines/train_{method}.py", "--model_path", str(model_dir), "--data_path", str(HH_RLHF),
                   "--output_dir", str(out), "--max_pairs", str(args.pairs), "--max_length", str(args.max_length),
                   "--max_steps", str(args.steps), "--device", "cpu", "--warmup_steps", "0", "--max_eval_pairs", "2",
                   "--gradient_accumulation_steps", str(args.grad_accum)]
        measured = timed(command, work / f"{method}.log")
        metrics = json.loads((out / "metrics.json").read_text())
        train_pairs = metrics["data"]["counts"]["train"]
        steps_per_epoch = math.ceil(train_pairs / (2 * args.grad_accum))
        train_seconds = metrics["train_seconds"]
        startup = measured["wall_seconds"] - train_seconds
        shape = flops.ModelShape.from_mapping(metrics["model_shape"])
        epoch_fraction = metrics["epochs"]
        results[method.upper()] = {
            **measured,
            "measured_steps": metrics["steps"],
            "seconds_per_step": train_seconds / metrics["steps"],
            "steps_per_epoch": steps_per_epoch,
            "epoch_wall_seconds_extrapolated": startup + train_seconds / metrics["steps"] * steps_per_epoch,
            "epoch_flops": metrics["analytic_flops"] / epoch_fraction,
            "trl_total_flos_measured_steps": metrics["trl_total_flos"],
        }
        (work / "bench_methods.partial.json").write_text(json.dumps(results, indent=2) + "\n")

    # COALA: Stage 1, CRONOS, Stage 3, each in full
    features = work / "features"
    stage1 = timed([sys.executable, "extract.py", "--model_path", str(model_dir), "--data_path", str(HH_RLHF), "--max_pairs", str(args.pairs),
                    "--max_length", str(args.max_length), "--pool", "attn", "--output_dir", str(features), "--device", "cpu", "--overwrite"], work / "extract.log")
    stage2 = timed([sys.executable, "cronos_trainer.py", "--features_dir", str(features), "--output_dir", str(work / "head"), "--no_progress"], work / "cronos.log")
    stage3 = timed([sys.executable, "finetune_coala.py", "--model_path", str(work / "head"), "--output_dir", str(work / "finetuned")], work / "finetune.log")

    meta = [json.loads(line) for line in (features / "meta.jsonl").read_text().splitlines() if line.strip()]
    chosen = flops.TokenCounts.from_lengths(row["chosen_tokens"] for row in meta)
    rejected = flops.TokenCounts.from_lengths(row["rejected_tokens"] for row in meta)
    head_config = json.loads((work / "head" / "config.json").read_text())
    cronos_metrics = json.loads((work / "head" / "metrics.json").read_text())
    settings = head_config.get("settings", head_config)
    patterns = int(settings.get("num_patterns", 10))
    rank = int(settings.get("nystrom_rank", 20))
    matvecs = flops.cronos_matvecs_measured(patterns, [row["pcg_iterations"] for row in cronos_metrics["history"]], rank)
    finetune_metrics = json.loads((work / "finetuned" / "metrics.json").read_text())
    coala = flops.coala_flops(shape, chosen, rejected, num_patterns=patterns, finetune_epochs=len(finetune_metrics["history"]["train"]["loss"]),
                              finetune_pairs=finetune_metrics.get("pairs", {}).get("train") if isinstance(finetune_metrics.get("pairs"), dict) else None,
                              matvecs=matvecs)
    results["COALA"] = {
        "wall_seconds": stage1["wall_seconds"] + stage2["wall_seconds"] + stage3["wall_seconds"],
        "peak_rss_mib": max(stage1["peak_rss_mib"], stage2["peak_rss_mib"], stage3["peak_rss_mib"]),
        "stages": {"extract": stage1, "cronos": stage2, "finetune": stage3},
        "epoch_flops": coala["total"],
        "flops_by_stage": coala,
        "cronos_matvecs": matvecs,
    }
    # DPO in the ratio counts the same pairs that Stage 1 embedded (all splits), so both sides see the same tokens.
    dpo_same_tokens = flops.dpo_flops(shape, chosen, rejected, 1.0, flops.lora_parameter_count(shape, 16))
    results["coala_over_dpo_flops"] = coala["total"] / dpo_same_tokens
    results["coala_over_dpo_wall"] = results["COALA"]["wall_seconds"] / results["DPO"]["epoch_wall_seconds_extrapolated"]
    (work / "bench_methods.json").write_text(json.dumps(results, indent=2) + "\n")

    # Summary
    print(f"SmolLM2-135M-Instruct, {args.pairs} HH-RLHF pairs, max_length {args.max_length}, batch {2 * args.grad_accum}, {os.cpu_count()} CPU cores")
    print("| method | wall time, one epoch (s) | peak RSS (MiB) | analytic TFLOPs, one epoch |")
    print("|---|---|---|---|")
    for method in ("SFT", "DPO", "ORPO"):
        row = results[method]
        print(f"| {method} | {row['epoch_wall_seconds_extrapolated']:.0f} (extrapolated from {row['measured_steps']} of {row['steps_per_epoch']} steps) | {row['peak_rss_mib']:.0f} | {row['epoch_flops'] / 1e12:.3f} |")
    row = results["COALA"]
    print(f"| COALA (Stage 1 + CRONOS + Stage 3) | {row['wall_seconds']:.0f} (measured) | {row['peak_rss_mib']:.0f} | {row['epoch_flops'] / 1e12:.3f} |")
    print(f"COALA / DPO analytic FLOPs on the same pairs: {results['coala_over_dpo_flops']:.3f}; wall time ratio {results['coala_over_dpo_wall']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
