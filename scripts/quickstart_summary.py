"""Summarize a main-job run: pairs, Stage 2 accuracies, Stage 3 margins, guided vs plain generations.

    python scripts/quickstart_summary.py --stage2_dir cvxNN_trained_SmolLM2-135M-Instruct/ \
        --stage3_dir Finetuned_cvxmlp_SmolLM2-135M-Instruct/ --model_path models/SmolLM2-135M-Instruct

Generations use held-out (test split, then validation) prompts of the
extracted data set, each sampled once plainly and once guided by the Stage 3
head with the same seed, and both are scored by that head. The summary is
printed and written to ``<stage3_dir>/quickstart_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala.io import atomic_write_json, read_json, setup_logging  # noqa: E402

FALLBACK_PROMPTS = [
    "Explain why the sky is blue to a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    "Give me three tips for learning a new language.",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage2_dir", required=True, help="Head folder written by cronos_trainer.py.")
    parser.add_argument("--stage3_dir", required=True, help="Head folder written by finetune_coala.py.")
    parser.add_argument("--model_path", required=True, help="The backbone the features were extracted with.")
    parser.add_argument("--num_prompts", type=int, default=3, help="Prompts to generate for (>= 1).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Tokens per generation (>= 1).")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="lambda: weight of the normalized head score.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed shared by the plain and guided runs.")
    parser.add_argument("--output", default=None, help="Summary JSON (default: <stage3_dir>/quickstart_summary.json).")
    return parser


def held_out_prompts(manifest: dict[str, Any], meta: list[dict[str, Any]], count: int) -> list[tuple[str, Any]]:
    """Return up to ``count`` (prompt, prompt_messages) of test pairs, then validation pairs, from the data set."""
    from coala.data import DataError, load_preferences

    pair_ids = [row["pair_id"] for split in ("test", "validation") for row in meta if row.get("split") == split and "pair_id" in row]
    if not pair_ids or not manifest.get("data_path"):
        return []
    try:
        data = load_preferences(manifest["data_path"])
    except (DataError, OSError) as error:
        print(f"Could not reload {manifest['data_path']} for prompts ({error}); using built-in prompts.")
        return []
    by_id = {triplet.pair_id: triplet for triplet in data.triplets}
    found = [by_id[pair_id] for pair_id in pair_ids if pair_id in by_id]
    return [(triplet.prompt, triplet.prompt_messages) for triplet in found[:count]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.num_prompts < 1 or args.max_new_tokens < 1:
        raise SystemExit("--num_prompts and --max_new_tokens must be >= 1.")

    from coala.backbone import load_backbone
    from coala.features import load_features
    from coala.guided import GuidanceConfig, PreferenceHead, generate

    stage2_metrics = read_json(Path(args.stage2_dir) / "metrics.json")
    stage3_metrics = read_json(Path(args.stage3_dir) / "metrics.json")
    stage3_config = read_json(Path(args.stage3_dir) / "config.json")
    features = load_features(stage3_config["features_dir"])
    counts = features.manifest.get("counts", {})

    # Generations: plain and guided from the same seed, both scored by the Stage 3 head.
    model, tokenizer = load_backbone(args.model_path)
    head = PreferenceHead.from_dir(args.stage3_dir, model, tokenizer)
    prompts = held_out_prompts(features.manifest, features.meta, args.num_prompts)
    if len(prompts) < args.num_prompts:
        prompts += [(text, None) for text in FALLBACK_PROMPTS[: args.num_prompts - len(prompts)]]
    texts = [prompt for prompt, _ in prompts]
    messages = [message_list for _, message_list in prompts]
    config = GuidanceConfig(guidance_scale=args.guidance_scale)
    started = time.perf_counter()
    plain = generate(model, tokenizer, texts, max_new_tokens=args.max_new_tokens, seed=args.seed, prompt_messages=messages)
    guided = generate(model, tokenizer, texts, max_new_tokens=args.max_new_tokens, seed=args.seed, head=head,
                      config=config, prompt_messages=messages)
    seconds = time.perf_counter() - started
    plain_scores = head.score(texts, plain, prompt_messages=messages)
    guided_scores = head.score(texts, guided, prompt_messages=messages)

    summary = {
        "model": args.model_path,
        "data": features.manifest.get("data_path"),
        "pairs": {key: counts.get(key) for key in ("pairs", "train", "validation", "test")},
        "stage2": stage2_metrics.get("final", {}),
        "stage3": stage3_metrics.get("summary", {}),
        "generation": {
            "guidance_scale": config.guidance_scale, "guide_every": config.guide_every,
            "num_candidates": config.num_candidates, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "seconds": seconds,
            "examples": [
                {"prompt": text, "plain": plain_text, "guided": guided_text,
                 "plain_score": float(plain_score), "guided_score": float(guided_score)}
                for text, plain_text, guided_text, plain_score, guided_score
                in zip(texts, plain, guided, plain_scores, guided_scores)
            ],
        },
    }
    output = Path(args.output or Path(args.stage3_dir) / "quickstart_summary.json")
    atomic_write_json(output, summary)
    print_summary(summary)
    print(f"Wrote {output}")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    pairs, stage2, stage3 = summary["pairs"], summary["stage2"], summary["stage3"]
    print()
    print(f"Model {summary['model']}, data {summary['data']}")
    print(f"Pairs: {pairs['pairs']} (train {pairs['train']}, validation {pairs['validation']}, test {pairs['test']})")
    print(f"Stage 2 (CRONOS) accuracy: validation {number(stage2.get('validation_accuracy'))} "
          f"(pairwise {number(stage2.get('validation_pairwise_accuracy'))}), test {number(stage2.get('test_accuracy'))} "
          f"(pairwise {number(stage2.get('test_pairwise_accuracy'))})")
    for split in ("train", "validation", "test"):
        if split in stage3:
            initial = stage3.get(f"{split}_initial", {})
            start = f"{number(initial.get('margin'))} -> " if initial else ""
            print(f"Stage 3 (COALA) {split} margin {start}{number(stage3[split]['margin'])}, "
                  f"accuracy {number(stage3[split]['accuracy'])}, mean sigmoid margin {number(stage3[split]['sigmoid_margin'])}")
    print(f"Stage 3 kept epoch {stage3.get('best_epoch')}; train margin rose monotonically: {stage3.get('train_margin_monotonic')}")
    generation = summary["generation"]
    print(f"\nGenerations (lambda {generation['guidance_scale']}, N {generation['guide_every']}, "
          f"C {generation['num_candidates']}, {generation['max_new_tokens']} tokens, seed {generation['seed']}):")
    for index, example in enumerate(generation["examples"], start=1):
        print(f"\n[{index}] prompt: {example['prompt'][-300:]}")
        print(f"    plain  (head score {example['plain_score']:+.3f}): {example['plain']}")
        print(f"    guided (head score {example['guided_score']:+.3f}): {example['guided']}")


if __name__ == "__main__":
    main()
