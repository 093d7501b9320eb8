"""Stage 3: fine-tune the output-layer weights theta2 of a Stage 2 head with the convex COALA loss.

    python finetune_coala.py --model_path cvxNN_trained_SmolLM2-135M-Instruct/ \
        --output_dir Finetuned_cvxmlp_SmolLM2-135M-Instruct/

The Stage 1 features are found through the head's config.json
(``features_dir``); ``--features_dir`` overrides it. Theta1 stays frozen, so
the hidden activations are computed once and all epochs run as one compiled
JAX program. The output folder has the same layout as Stage 2's, plus
``reward_margins.png``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import jax
import numpy as np

from coala.config import add_config_flag, namespace_to_dict, parse_args_with_config
from coala.features import FeatureSet, load_features
from coala.finetune import (
    LOSSES,
    FinetuneError,
    FinetuneSettings,
    pair_metrics,
    plot_reward_margins,
    shuffle_pair_unpaired,
    subsample_pairs,
    summarize_history,
    train_theta2,
    vector_stats,
)
from coala.head import HeadParams, load_head, save_head
from coala.io import atomic_write_json, setup_logging

logger = logging.getLogger("finetune_coala")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=str, required=True, help="Head folder written by cronos_trainer.py (or a previous finetune_coala.py run).")
    parser.add_argument("--output_dir", type=str, default=None, help="Output folder (default: Finetuned_cvxmlp_<model_name>/).")
    parser.add_argument("--features_dir", type=str, default=None, help="Stage 1 feature folder (default: config.json 'features_dir' of the head).")
    parser.add_argument("--loss", type=str, default="pairwise", choices=LOSSES, help="pairwise: log(1+exp(-(beta (r_w - r_l) - gamma))); pointwise: log(1+exp(-beta y r + gamma)).")
    parser.add_argument("--beta", type=float, default=2.5, help="Reward-margin scale beta (> 0; authors' release: 2.5).")
    parser.add_argument("--gamma", type=float, default=0.5, help="Margin offset gamma (authors' release: 0.5).")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW step size (authors' release: 1e-4).")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (>= 0).")
    parser.add_argument("--epochs", type=int, default=500, help="Passes over the train pairs (authors' release: 500).")
    parser.add_argument("--batch_size", type=int, default=128, help="Pairs per AdamW step (authors' release: 128).")
    parser.add_argument("--max_pairs", type=int, default=2000, help="Train pairs kept by a seeded draw; 0 keeps all (authors' release: at most 2,000).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pair draw, the unpaired-data pairing and the per-epoch shuffles.")
    parser.add_argument("--verbose", action="store_true", help="Log at DEBUG level.")
    add_config_flag(parser)
    return parser


def split_pairs(features: FeatureSet, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return aligned (chosen, rejected) rows of one split; unpaired data is paired by a seeded shuffle."""
    chosen, rejected = features.split(split)
    if features.paired:
        return chosen, rejected
    paired_chosen, paired_rejected = shuffle_pair_unpaired(chosen, rejected, seed)
    logger.info(
        "Unpaired data: %s split paired by a seeded shuffle (seed %d): %d positive x %d negative texts -> %d pairs.",
        split, seed, len(chosen), len(rejected), len(paired_chosen),
    )
    return paired_chosen, paired_rejected


def check_head_matches_features(head: HeadParams, features: FeatureSet) -> None:
    """Raise ``FinetuneError`` when the head was not trained on features like these."""
    if features.dim != head.input_dim:
        raise FinetuneError(
            f"Features in {features.path} have dimension {features.dim} but the head expects {head.input_dim}. "
            "Pass the --features_dir the head was trained on."
        )
    head_pool = (head.config.get("pooling") or {}).get("pool")
    feature_pool = features.manifest.get("pool")
    if head_pool and feature_pool and head_pool != feature_pool:
        raise FinetuneError(f"The head uses pooling {head_pool!r} but {features.path} contains {feature_pool!r} features; pass the --features_dir the head was trained on.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args_with_config(build_parser(), argv, section="finetune")
    setup_logging(args.verbose)
    settings = FinetuneSettings(
        loss=args.loss, beta=args.beta, gamma=args.gamma, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
    )
    settings.validate()
    if args.max_pairs < 0:
        raise FinetuneError(f"--max_pairs must be >= 0 (0 keeps all pairs), got {args.max_pairs}.")
    started = time.perf_counter()

    # Head and features
    head = load_head(args.model_path)
    features_dir = args.features_dir or head.config.get("features_dir")
    if not features_dir:
        raise FinetuneError(f"{args.model_path}/config.json has no 'features_dir'; pass --features_dir.")
    features = load_features(features_dir)
    check_head_matches_features(head, features)
    pooling = dict(head.config.get("pooling") or {})
    model_name = pooling.get("model_name") or features.manifest.get("model_name") or "model"
    output_dir = Path(args.output_dir or f"Finetuned_cvxmlp_{model_name}")
    if (output_dir / "head.safetensors").is_file():
        logger.warning(
            "%s already contains a head; it will be replaced when training finishes. Pass --output_dir to keep both.", output_dir
        )
    logger.info("Head %s (%d neurons), features %s", args.model_path, head.num_neurons, features.path)

    # Pairs and hidden activations (theta1 is frozen, so these are computed once)
    train_chosen, train_rejected = split_pairs(features, "train", args.seed)
    available_train = len(train_chosen)
    train_chosen, train_rejected = subsample_pairs(train_chosen, train_rejected, args.max_pairs, args.seed)
    val_chosen, val_rejected = split_pairs(features, "validation", args.seed + 1)
    test_chosen, test_rejected = split_pairs(features, "test", args.seed + 2)
    if len(train_chosen) == 0:
        raise FinetuneError(f"{features.path} has no train pairs; extract more data or change the split fractions.")
    hidden = {
        "train": (head.hidden(train_chosen), head.hidden(train_rejected)),
        "validation": (head.hidden(val_chosen), head.hidden(val_rejected)),
        "test": (head.hidden(test_chosen), head.hidden(test_rejected)),
    }
    counts = {split: int(len(pair[0])) for split, pair in hidden.items()}
    logger.info("Pairs: %s (train drawn from %d)", counts, available_train)

    # Fine-tuning
    result = train_theta2(head.theta2, *hidden["train"], settings, *hidden["validation"])
    summary = summarize_history(result)
    if counts["test"]:
        test = pair_metrics(result.theta2, *hidden["test"], settings.loss, settings.beta, settings.gamma)
        summary["test"] = {name: float(value) for name, value in test.items()}
    seconds = time.perf_counter() - started

    # Outputs
    config = {
        **namespace_to_dict(args),
        "stage": "coala_finetune",
        "output_dir": str(output_dir),
        "source_head": str(Path(args.model_path).resolve()),
        "source_stage": head.config.get("stage"),
        "features_dir": str(Path(features.path).resolve()),
        "pooling": pooling,
        "paired": features.paired,
        "pairs": counts,
        "theta2_initial": vector_stats(head.theta2),
        "theta2_final": vector_stats(result.theta2),
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0]),
    }
    metrics = {
        "history": result.history,
        "summary": summary,
        "best_epoch": result.best_epoch,
        "selected_by": result.selected_by,
        "steps": result.steps,
        "pairs": counts,
        "seconds": seconds,
    }
    fine_tuned = HeadParams(
        theta1=head.theta1, theta2=result.theta2, feature_mean=head.feature_mean,
        feature_std=head.feature_std, config=config, attn_scorer=head.attn_scorer,
    )
    save_head(output_dir, fine_tuned, metrics)
    atomic_write_json(output_dir / "resolved_config.json", namespace_to_dict(args))
    plot_reward_margins(result.history, output_dir / "reward_margins.png", result.best_epoch)

    # Summary
    print(f"Fine-tuned theta2 on {counts['train']} train pairs for {settings.epochs} epochs ({result.steps} AdamW steps) in {seconds:.1f} s.")
    print(f"Kept epoch {result.best_epoch} (lowest {result.selected_by} loss).")
    for split, history in result.history.items():
        margins, accuracies = history["margin"], history["accuracy"]
        print(
            f"{split.capitalize()} margin {margins[0]:.4f} initially, {margins[-1]:.4f} after the last epoch, "
            f"{margins[result.best_epoch]:.4f} at the kept epoch (accuracy {accuracies[0]:.3f}, {accuracies[-1]:.3f}, "
            f"{accuracies[result.best_epoch]:.3f})."
        )
    if "test" in summary:
        print(f"Test margin {summary['test']['margin']:.4f}, accuracy {summary['test']['accuracy']:.3f} at the kept epoch.")
    monotonic = "rose monotonically" if summary["train_margin_monotonic"] else "did not rise monotonically"
    print(f"The train margin {monotonic} over the {settings.epochs} epochs.")
    print(f"Wrote {output_dir}/")
    return metrics


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main)
