"""Stage 2: train the two-layer ReLU preference head with CRONOS on Stage 1 features.

Chosen features of the train split get label +1 and rejected ones -1. The convex
reformulation of the network is solved by ADMM with Nystrom-preconditioned
conjugate gradients (coala/cronos.py), the ReLU network is recovered from the
iterate that scores best on the validation split, and the head folder is written:

    python cronos_trainer.py --model_name SmolLM2-135M-Instruct
    python cronos_trainer.py --features_dir extracted_features/SmolLM2-135M-Instruct__edu_sample__attn
    python cronos_trainer.py --model_name SmolLM2-135M-Instruct --compare_adamw

--model_name finds the feature folder ``<output_base>/<model_name>__<dataset>__<pool>``
written by extract.py; the model part of the folder name must equal the name
exactly. When several folders match, narrow the match with --dataset and --pool
or pass --features_dir.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from coala.config import add_config_flag, namespace_to_dict, parse_args_with_config
from coala.io import atomic_write, atomic_write_json, atomic_write_text, setup_logging, sha256_file

logger = logging.getLogger("cronos_trainer")


# ----------------------------------------------------------------------------------------------
# Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flag(parser)
    where = parser.add_argument_group("input and output")
    where.add_argument("--model_name", type=str, default=None,
                       help="model part of the Stage 1 folder name to look up under --output_base")
    where.add_argument("--output_base", type=str, default="extracted_features/",
                       help="folder that extract.py --output_base wrote feature folders into")
    where.add_argument("--dataset", type=str, default=None,
                       help="with --model_name: keep only folders of this data set name")
    where.add_argument("--pool", type=str, default=None, choices=["attn", "mean", "last"],
                       help="with --model_name: keep only folders of this pooling")
    where.add_argument("--features_dir", type=str, default=None,
                       help="Stage 1 feature folder to train on (overrides the --model_name lookup)")
    where.add_argument("--output_dir", type=str, default=None,
                       help="head folder to write; default cvxNN_trained_<model_name>")

    solver = parser.add_argument_group("CRONOS solver (the authors' release used P=10, rank 20, "
                                       "beta 1e-3, rho 1e-4, gamma_a 1, 6 ADMM and 32 PCG iterations)")
    solver.add_argument("--num_patterns", type=int, default=10,
                        help="P, sampled ReLU activation patterns; the head has 2P neurons")
    solver.add_argument("--beta", type=float, default=1.0,
                        help="group-lasso strength on the neuron weights (> 0); the release used 1e-3")
    solver.add_argument("--rho", type=float, default=0.3,
                        help="ADMM penalty (> 0); the release used 1e-4, which converges slowly on standardized features")
    solver.add_argument("--admm_iters", type=int, default=500,
                        help="ADMM iterations; the release ran 6, too few to reach a 1e-3 objective gap")
    solver.add_argument("--pcg_iters", type=int, default=32, help="PCG iteration cap per ADMM iteration")
    solver.add_argument("--pcg_tol", type=float, default=1e-5,
                        help="PCG relative residual tolerance ||b - A u|| / ||b||")
    solver.add_argument("--nystrom_rank", type=int, default=20,
                        help="rank of the randomized Nystrom preconditioner; 0 runs plain CG")
    solver.add_argument("--preconditioner", type=str, default="block_nystrom", choices=["nystrom", "block_nystrom"],
                        help="PCG preconditioner of the u-update: nystrom sketches the whole system; block_nystrom "
                             "inverts the block-diagonal part rho (I + X^T X) exactly and sketches only F^T F")
    solver.add_argument("--step_ratio", type=float, default=1.0, help="dual step gamma_a, in (0, 2)")
    solver.add_argument("--abs_tol", type=float, default=1e-5,
                        help="absolute tolerance of the stopping rule on the primal and dual residuals "
                             "(Boyd et al. 2011, 3.3.1); 0 with --rel_tol 0 runs all --admm_iters")
    solver.add_argument("--rel_tol", type=float, default=1e-3,
                        help="relative tolerance of the residual stopping rule, in [0, 1)")
    solver.add_argument("--patience", type=int, default=0,
                        help="stop once validation accuracy has not improved for this many ADMM iterations; 0 = off")
    solver.add_argument("--balance_tau", type=float, default=1.0,
                        help="residual balancing: multiply or divide rho by this factor (> 1) when one residual "
                             "exceeds --balance_mu times the other; 1 keeps rho fixed")
    solver.add_argument("--balance_mu", type=float, default=10.0, help="residual imbalance (> 1) that changes rho")
    solver.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                        help="standardize features with the train mean and std (stored in the head)")
    solver.add_argument("--seed", type=int, default=0, help="seed of the patterns and the Nystrom sketch")
    solver.add_argument("--x64", action="store_true", help="run in float64 (default float32)")

    adamw = parser.add_argument_group("AdamW comparison (the same network trained non-convexly)")
    adamw.add_argument("--compare_adamw", action="store_true",
                       help="also run the AdamW learning-rate search and write adamw_comparison.md")
    adamw.add_argument("--adamw_lr_min", type=float, default=1e-6, help="smallest learning rate of the grid")
    adamw.add_argument("--adamw_lr_max", type=float, default=10**-2.5, help="largest learning rate of the grid")
    adamw.add_argument("--adamw_lr_count", type=int, default=8, help="log-spaced learning rates in the grid")
    adamw.add_argument("--adamw_seeds", type=int, default=3, help="seeds per learning rate")
    adamw.add_argument("--adamw_epochs", type=int, default=30, help="epochs per run")
    adamw.add_argument("--adamw_batch_size", type=int, default=1024, help="samples per AdamW step")
    adamw.add_argument("--adamw_weight_decay", type=float, default=1e-4, help="AdamW decoupled weight decay")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser


def resolve_features_dir(args: argparse.Namespace) -> Path:
    """Return the feature folder from --features_dir, or the single match of the --model_name lookup."""
    from coala.features import find_feature_dirs

    if args.features_dir:
        return Path(args.features_dir)
    if not args.model_name:
        raise SystemExit("Pass --model_name (to find a folder under --output_base) or --features_dir.")
    candidates = find_feature_dirs(args.output_base, args.model_name)
    if args.dataset:
        candidates = [path for path in candidates if path.name.split("__")[1:2] == [args.dataset]]
    if args.pool:
        candidates = [path for path in candidates if path.name.split("__")[-1].split("-")[0] == args.pool]
    if len(candidates) == 1:
        return candidates[0]
    base = Path(args.output_base)
    if not candidates:
        present = sorted(path.name for path in base.iterdir() if path.is_dir()) if base.is_dir() else []
        raise SystemExit(
            f"No finished feature folder for model {args.model_name!r} under {base}/ "
            f"(dataset filter {args.dataset!r}, pool filter {args.pool!r}). Folders there: {present or 'none'}. "
            f"Extract features first, e.g. python extract.py --model_path <path or hub id> --output_base {base}"
        )
    names = "\n  ".join(str(path) for path in candidates)
    raise SystemExit(
        f"Several feature folders match model {args.model_name!r}:\n  {names}\n"
        "Pass one with --features_dir, or narrow the match with --dataset and --pool."
    )


def validate_settings(args: argparse.Namespace) -> None:
    """Reject nonsense settings before any data is read."""
    if args.num_patterns < 1:
        raise SystemExit(f"--num_patterns={args.num_patterns} is invalid; it must be >= 1.")
    try:
        solver_settings(args).validate()
    except ValueError as error:
        raise SystemExit(f"Invalid solver setting: {error}") from error
    if args.compare_adamw and not (0 < args.adamw_lr_min <= args.adamw_lr_max and args.adamw_lr_count >= 1):
        raise SystemExit("The AdamW grid needs 0 < --adamw_lr_min <= --adamw_lr_max and --adamw_lr_count >= 1.")


def solver_settings(args: argparse.Namespace) -> "CronosSettings":  # noqa: F821
    """Return the CRONOS settings given on the command line."""
    from coala.cronos import CronosSettings

    return CronosSettings(
        beta=args.beta, rho=args.rho, step_ratio=args.step_ratio, admm_iters=args.admm_iters,
        pcg_iters=args.pcg_iters, pcg_tol=args.pcg_tol, nystrom_rank=args.nystrom_rank,
        preconditioner=args.preconditioner, seed=args.seed,
        abs_tol=args.abs_tol, rel_tol=args.rel_tol, patience=args.patience, balance_tau=args.balance_tau,
        balance_mu=args.balance_mu,
    )


# ----------------------------------------------------------------------------------------------
# Outputs


def plot_history(history: list[dict], path: Path) -> None:
    """Write a PNG of the objective and the train/validation accuracies per ADMM iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [record["iteration"] for record in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(iterations, [record["objective"] for record in history], label="last iterate")
    left.plot(iterations, [record["objective_average"] for record in history], label="ergodic average")
    left.plot(iterations, [record["dual_bound"] for record in history], label="dual bound (lower bound on optimum)",
              linestyle="--")
    left.set_yscale("log")
    left.set_xlabel("ADMM iteration")
    left.set_ylabel("objective")
    left.legend()
    for key, label in (("train_accuracy", "train"), ("validation_accuracy", "validation"),
                       ("validation_accuracy_average", "validation (average)")):
        if key in history[0]:
            right.plot(iterations, [record[key] for record in history], label=label)
    right.set_xlabel("ADMM iteration")
    right.set_ylabel("text accuracy")
    right.legend()
    figure.tight_layout()

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)
    plt.close(figure)


def comparison_table(cronos_row: dict, adamw: dict) -> str:
    """Return a Markdown table of validation/test accuracy and wall time for CRONOS and AdamW."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    selected = adamw["selected"]
    lines = [
        "| method | validation acc | validation pairwise | test acc | test pairwise | wall time (s) |",
        "|---|---|---|---|---|---|",
        f"| CRONOS | {cell(cronos_row['validation_accuracy'])} | {cell(cronos_row['validation_pairwise_accuracy'])} | "
        f"{cell(cronos_row['test_accuracy'])} | {cell(cronos_row['test_pairwise_accuracy'])} | {cronos_row['seconds']:.1f} |",
        f"| AdamW (lr {selected['learning_rate']:.2e}, mean of {adamw['settings']['seeds']} seeds) | "
        f"{cell(selected.get('validation_accuracy'))} | {cell(selected.get('validation_pairwise_accuracy'))} | "
        f"{cell(selected.get('test_accuracy'))} | {cell(selected.get('test_pairwise_accuracy'))} | {adamw['seconds']:.1f} (whole search) |",
    ]
    return "\n".join(lines) + f"\n\nBest single AdamW run's test accuracy over the grid: {cell(adamw['best_test_accuracy'])}.\n"


# ----------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parse_args_with_config(parser, argv, section="cronos")
    setup_logging(args.verbose)
    validate_settings(args)

    import jax

    # float64 only inside this run, so a caller's JAX settings are left as they were.
    with jax.enable_x64(bool(args.x64)):
        return train(args)


def train(args: argparse.Namespace) -> Path:
    """Train, score and save the head described by ``args``; return the head folder."""
    import jax
    import jax.numpy as jnp

    from coala import adamw_baseline, cronos, cvxnn
    from coala.features import FeatureError, load_features
    from coala.head import HeadParams, save_head

    # Load and label the features.
    features_dir = resolve_features_dir(args).resolve()
    try:
        features = load_features(features_dir)
        data = cvxnn.build_training_data(
            features.chosen, features.rejected, features.chosen_split, features.rejected_split,
            features.paired, args.standardize,
        )
    except (FeatureError, ValueError) as error:
        raise SystemExit(f"Cannot train on {features_dir}: {error}") from error
    manifest = features.manifest
    model_name = args.model_name or manifest.get("model_name") or features_dir.name.split("__")[0]
    output_dir = Path(args.output_dir or f"cvxNN_trained_{model_name}")
    if (output_dir / "head.safetensors").is_file():
        logger.warning("%s already contains a head; it will be replaced when training finishes. "
                       "Pass --output_dir to keep both.", output_dir)
    dtype = jnp.float64 if args.x64 else jnp.float32
    train = data.splits["train"]
    eval_splits = {name: cronos.EvalSplit(split.X, split.y, split.pairs) for name, split in data.splits.items()}
    if "validation" not in eval_splits:
        logger.warning("%s has no validation rows; the last iterate is kept without validation.", features_dir)
    logger.info(
        "Training on %s: %d train samples, d=%d, P=%d, %s, device %s.",
        features_dir, len(train.y), train.X.shape[1], args.num_patterns, "float64" if args.x64 else "float32",
        jax.devices()[0],
    )

    # Solve the convex program.
    D, _ = cvxnn.sample_patterns(train.X, args.num_patterns, args.seed)
    problem = cronos.make_problem(train.X, train.y, D, dtype=dtype)
    settings = solver_settings(args)
    try:
        settings.validate(system_size=2 * train.X.shape[1] * args.num_patterns)
    except ValueError as error:
        raise SystemExit(f"Invalid solver setting: {error}") from error
    result = cronos.run_cronos(
        problem, settings, eval_splits["train"], eval_splits.get("validation"), progress=not args.no_progress
    )

    # Recover the ReLU network and score it as saved (raw features through the head).
    weights = cvxnn.recover_weights(result.v_kept)
    head = HeadParams(
        theta1=weights.theta1.astype(np.float32),
        theta2=weights.theta2.astype(np.float32),
        feature_mean=data.feature_mean.astype(np.float32),
        feature_std=data.feature_std.astype(np.float32),
        attn_scorer=features.attn_scorer() if manifest.get("pool") == "attn" else None,
    )
    final = {}
    for name, split in data.splits.items():
        text, pairwise = cronos.accuracies(head.score(split.raw), eval_splits[name])
        final[f"{name}_accuracy"] = text
        final[f"{name}_pairwise_accuracy"] = pairwise
    gap = cvxnn.recovery_gap(train.X, D, result.v_kept, weights)

    # Optional AdamW comparison on the same splits.
    comparison = None
    if args.compare_adamw:
        adamw_settings = adamw_baseline.AdamWSettings(
            hidden=2 * args.num_patterns,
            learning_rates=adamw_baseline.learning_rate_grid(args.adamw_lr_min, args.adamw_lr_max, args.adamw_lr_count),
            seeds=args.adamw_seeds, epochs=args.adamw_epochs, batch_size=args.adamw_batch_size,
            weight_decay=args.adamw_weight_decay,
        )
        comparison = adamw_baseline.adamw_search(
            eval_splits["train"], eval_splits.get("validation"), eval_splits.get("test"), adamw_settings
        )
        cronos_row = {key: final.get(key) for key in ("validation_accuracy", "validation_pairwise_accuracy",
                                                        "test_accuracy", "test_pairwise_accuracy")}
        cronos_row["seconds"] = result.seconds
        table = comparison_table(cronos_row, comparison)
        atomic_write_text(output_dir / "adamw_comparison.md", table)
        atomic_write_json(output_dir / "adamw_comparison.json", {"cronos": cronos_row, "adamw": comparison})

    # Write the head folder.
    head.config = {
        **namespace_to_dict(args),
        "stage": "cronos",
        "model_name": model_name,
        "features_dir": str(features_dir),
        "feature_manifest_sha256": sha256_file(features_dir / "manifest.json"),
        "pooling": {key: manifest.get(key) for key in
                    ("pool", "pool_span", "max_length", "hidden_size", "model_name", "model_path", "gguf_file",
                     "chat_template")},
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0]),
        "dtype": "float64" if args.x64 else "float32",
        "num_neurons": 2 * args.num_patterns,
        "kept_iterate": result.kept,
        "solver_status": result.status,
    }
    metrics = {
        "final": final,
        "kept_iterate": result.kept,
        "solver_status": result.status,
        "admm_iterations_run": result.iterations,
        "recovery": gap,
        "active_neurons": weights.active,
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "history": result.history,
    }
    if comparison is not None:
        metrics["adamw"] = comparison
    save_head(output_dir, head, metrics)
    plot_history(result.history, output_dir / "cronos_history.png")

    # Summary.
    print(f"Head written to {output_dir} ({weights.active}/{2 * args.num_patterns} active neurons).")
    if weights.active == 0:
        logger.warning(
            "Every neuron of the recovered network is zero, so the head scores every text 0. "
            "Run more ADMM iterations (--admm_iters, now %d) or lower --beta (now %g).", args.admm_iters, args.beta
        )
    print(f"ADMM stopped after {result.iterations} iterations ({result.status}). "
          f"Kept the {result.kept['iterate']} iterate of ADMM iteration {result.kept['iteration']}; "
          f"final objective {result.history[-1]['objective']:.6g} (relative duality gap "
          f"{result.history[-1]['duality_gap']:.1e}); CRONOS time {result.seconds:.1f}s.")
    for name in data.splits:
        pairwise = final[f"{name}_pairwise_accuracy"]
        print(f"  {name:10s} accuracy {final[f'{name}_accuracy']:.4f}"
              + ("" if pairwise is None else f", pairwise accuracy {pairwise:.4f}"))
    print(f"Recovered network vs F v on train: relative gap {gap['relative_gap']:.2e} "
          f"(constraint violation {gap['constraint_violation']:.2e}).")
    if comparison is not None:
        print(table)
    return output_dir


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main)
