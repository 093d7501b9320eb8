"""Benchmark Stage 1 extraction: length-bucketed batches vs padding every batch to max_length.

Part 1 (throughput): SmolLM2-135M-Instruct on HH-RLHF pairs. "bucketed" is this
repository's plan (sequences sorted by length, each batch padded to its longest
member); "naive" keeps file order and pads every batch to max_length, as the
original release does. Both run the same forward pass (base transformer, no
output layer) and mean pooling; their batches are interleaved so that other
jobs on a shared machine slow both alike. Reported per method: real tokens/s,
padded-token fraction, achieved GFLOP/s (2 x parameters x real tokens / s).

Part 2 (pool_span probe): held-out pairwise accuracy of logistic regression
(4-fold over pairs) on whole-sequence vs response-span mean pooling, on HH-RLHF
and on the AlpacaEval preference pairs. Both spans are pooled from the same
forward pass.

    python benchmarks/bench_extract.py                       # full sizes
    python benchmarks/bench_extract.py --num_pairs 32 --probe_pairs 100 --max_length 256
    python benchmarks/bench_extract.py --plan_only             # padding of both plans, no model run

Results are printed and written as JSON to benchmarks/cache/bench_extract.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala import backbone, extraction
from coala.data import load_preferences, offline_data_dir
from coala.io import atomic_write_json, setup_logging
from coala.pooling import pool_hidden

SHARED_DATA = offline_data_dir()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", default=None, help="model folder; default SmolLM2-135M-Instruct converted into --model_cache")
    parser.add_argument("--model_cache", default=str(Path.home() / ".cache" / "coala-tests"), help="folder holding the converted SmolLM2 model")
    parser.add_argument("--hh_path", default=str(SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), help="HH-RLHF file")
    parser.add_argument("--alpaca_path", default=str(SHARED_DATA / "alpaca_eval" / "preference_pairs.jsonl.gz"), help="AlpacaEval preference pairs")
    parser.add_argument("--num_pairs", type=int, default=256, help="pairs for the throughput comparison")
    parser.add_argument("--max_length", type=int, default=512, help="max tokens per sequence (both parts)")
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per batch (both methods)")
    parser.add_argument("--probe_pairs", type=int, default=400, help="pairs per data set for the pool_span probe; 0 skips the probe")
    parser.add_argument("--folds", type=int, default=4, help="cross-validation folds of the probe")
    parser.add_argument("--plan_only", action="store_true", help="report only the padding of both batch plans (tokenizer only, no forward passes)")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "cache" / "bench_extract.json"), help="JSON results file")
    return parser


def forward_pooled(model, examples, pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return whole-sequence and response-span mean pooling (B, H) of one right-padded batch."""
    input_ids, attention_mask, lengths, starts = extraction.pad_batch(examples, pad_id, "cpu")
    if width is not None and input_ids.shape[1] < width:
        extra = width - input_ids.shape[1]
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=pad_id)
        attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
    with torch.inference_mode():
        hidden = extraction.last_hidden_states(model, input_ids, attention_mask)
        whole = pool_hidden(hidden, extraction.span_mask(lengths, starts, hidden.shape[1], "all"), "mean")
        response = pool_hidden(hidden, extraction.span_mask(lengths, starts, hidden.shape[1], "response"), "mean")
    return whole, response


def padding_plan(tokenizer, args) -> dict:
    """Return padded-token fractions of both batch plans at the requested size, from tokenization alone."""
    data = load_preferences(args.hh_path, max_pairs=args.num_pairs)
    encoded = extraction.encode_preferences(tokenizer, data, args.max_length)
    lengths = [example.length for example in encoded.examples]
    real, padded = extraction.padding_counts(lengths, extraction.plan_batches(lengths, args.batch_size))
    naive_total = args.max_length * len(lengths)
    return {
        "pairs": len(encoded.records),
        "real_tokens": real,
        "bucketed_padded_fraction": round(padded / (real + padded), 4),
        "naive_padded_fraction": round((naive_total - real) / naive_total, 4),
        "token_ratio_naive_over_bucketed": round(naive_total / (real + padded), 2),
    }


def measure_throughput(model, tokenizer, args, num_parameters: int) -> dict:
    data = load_preferences(args.hh_path, max_pairs=args.num_pairs)
    encoded = extraction.encode_preferences(tokenizer, data, args.max_length)
    lengths = [example.length for example in encoded.examples]
    pad_id = extraction.pad_token_id(tokenizer)
    plans = {
        "bucketed": extraction.plan_batches(lengths, args.batch_size),
        "naive": [np.arange(start, min(start + args.batch_size, len(lengths))) for start in range(0, len(lengths), args.batch_size)],
    }
    widths = {"bucketed": None, "naive": args.max_length}
    seconds = {name: 0.0 for name in plans}
    features = {name: np.zeros((len(lengths), model.config.hidden_size), dtype=np.float32) for name in plans}

    # Warm-up outside the timing, then alternate one batch of each method.
    forward_pooled(model, encoded.examples[:2], pad_id)
    steps = max(len(plan) for plan in plans.values())
    for step in tqdm(range(steps), desc="throughput", unit="step"):
        for name, plan in plans.items():
            if step >= len(plan):
                continue
            indices = plan[step]
            started = time.perf_counter()
            whole, _ = forward_pooled(model, [encoded.examples[i] for i in indices], pad_id, widths[name])
            seconds[name] += time.perf_counter() - started
            features[name][indices] = whole.numpy()

    results = {}
    real = int(sum(lengths))
    for name, plan in plans.items():
        if name == "naive":
            total = args.max_length * len(lengths)
        else:
            total = sum(int(max(lengths[i] for i in batch)) * len(batch) for batch in plan)
        results[name] = {
            "seconds": round(seconds[name], 2),
            "real_tokens": real,
            "padded_tokens": total - real,
            "padded_fraction": round((total - real) / total, 4),
            "tokens_per_second": round(real / seconds[name], 1),
            "gflops_per_second": round(2 * num_parameters * real / seconds[name] / 1e9, 2),
        }
    results["speedup"] = round(seconds["naive"] / seconds["bucketed"], 2)
    results["max_abs_feature_difference"] = float(np.abs(features["naive"] - features["bucketed"]).max())
    results["pairs"] = len(encoded.records)
    return results


def probe_accuracy(chosen: np.ndarray, rejected: np.ndarray, folds: int, seed: int = 0) -> float:
    """Return held-out pairwise accuracy of logistic regression on chosen - rejected, folds over pairs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    correct = 0
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(chosen):
        differences = np.concatenate([chosen[train] - rejected[train], rejected[train] - chosen[train]])
        labels = np.concatenate([np.ones(len(train)), np.zeros(len(train))])
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        classifier.fit(differences, labels)
        correct += int((classifier.decision_function(chosen[test] - rejected[test]) > 0).sum())
    return correct / len(chosen)


def run_probe(model, tokenizer, args, name: str, path: str) -> dict:
    data = load_preferences(path, max_pairs=args.probe_pairs)
    encoded = extraction.encode_preferences(tokenizer, data, args.max_length)
    lengths = [example.length for example in encoded.examples]
    pad_id = extraction.pad_token_id(tokenizer)
    hidden_size = model.config.hidden_size
    whole = np.zeros((len(lengths), hidden_size), dtype=np.float32)
    response = np.zeros_like(whole)
    started = time.perf_counter()
    for indices in tqdm(extraction.plan_batches(lengths, args.batch_size), desc=f"probe {name}", unit="batch"):
        pooled_whole, pooled_response = forward_pooled(model, [encoded.examples[i] for i in indices], pad_id)
        whole[indices] = pooled_whole.numpy()
        response[indices] = pooled_response.numpy()
    return {
        "pairs": len(encoded.records),
        "seconds": round(time.perf_counter() - started, 1),
        "accuracy_all": round(probe_accuracy(whole[0::2], whole[1::2], args.folds), 4),
        "accuracy_response": round(probe_accuracy(response[0::2], response[1::2], args.folds), 4),
    }


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    model_path = args.model_path or str(backbone.ensure_converted_smollm2(args.model_cache))
    if args.plan_only:
        print(json.dumps(padding_plan(backbone.load_tokenizer(model_path), args), indent=2))
        return
    model, tokenizer = backbone.load_backbone(model_path, dtype="float32", device="cpu")
    num_parameters = backbone.describe_model(model)["num_parameters"]
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "model": model_path,
        "num_parameters": num_parameters,
    }

    results["throughput"] = measure_throughput(model, tokenizer, args, num_parameters)
    print(json.dumps(results["throughput"], indent=2))
    atomic_write_json(args.output, results)

    if args.probe_pairs > 0:
        results["probe"] = {}
        for name, path in (("hh-rlhf", args.hh_path), ("alpaca_eval", args.alpaca_path)):
            results["probe"][name] = run_probe(model, tokenizer, args, name, path)
            print(name, json.dumps(results["probe"][name]))
            atomic_write_json(args.output, results)

    throughput = results["throughput"]
    print(
        f"bucketed {throughput['bucketed']['tokens_per_second']} tokens/s ({throughput['bucketed']['padded_fraction']:.1%} padding), "
        f"naive {throughput['naive']['tokens_per_second']} tokens/s ({throughput['naive']['padded_fraction']:.1%} padding), "
        f"speedup {throughput['speedup']}x. Results: {args.output}"
    )


if __name__ == "__main__":
    main()
