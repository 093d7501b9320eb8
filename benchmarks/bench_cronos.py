"""Benchmark Stage 2: CRONOS against the AdamW learning-rate search on real SmolLM2-135M features.

Run it on feature folders that extract.py wrote (mean pooling), for example the
HH-RLHF harmless test pairs and the AlpacaEval preference pairs:

    python extract.py --model_path ~/.cache/coala-tests/SmolLM2-135M-Instruct \
        --data_path ../shared/data/alpaca_eval/preference_pairs.jsonl.gz --drop_empty --pool mean \
        --output_base /tmp/bench_features
    python benchmarks/bench_cronos.py --features /tmp/bench_features/SmolLM2-135M-Instruct__preference_pairs__mean

For each folder it reports the relative objective gap of the default float32
CRONOS run (residual stopping rule) to a long float64 run of the same program,
the float64 run's own residuals, and its certified gap: the distance from its
objective to the best lower bound on the optimum that its dual iterates give
(``cronos.dual_bound``). The float32 run's first iteration within 1e-3 of the
reference and its first iteration with a certified duality gap of 1e-3 are
reported with their wall times. It also reports the test accuracy and wall
time of a run stopped by validation patience. It reports the same figures and the wall time
for the AdamW search (8 learning rates from 1e-6 to 10^-2.5, 3 seeds, 30
epochs, batch 1024), both cold (compilation included) and compiled. Objectives of the two methods are compared as the non-convex
objective ``1/2 ||f(X) - y||^2 + beta/2 (||theta1||^2 + ||theta2||^2)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala.io import atomic_write_json, setup_logging  # noqa: E402

logger = logging.getLogger("bench_cronos")


def benchmark_folder(folder: Path, args: argparse.Namespace) -> dict:
    """Run the float64 reference, the default CRONOS run and the AdamW search on one feature folder."""
    import jax
    import jax.numpy as jnp

    from coala import adamw_baseline, cronos, cvxnn
    from coala.features import load_features

    features = load_features(folder)
    data = cvxnn.build_training_data(
        features.chosen, features.rejected, features.chosen_split, features.rejected_split, features.paired
    )
    splits = {name: cronos.EvalSplit(split.X, split.y, split.pairs) for name, split in data.splits.items()}
    train = data.splits["train"]
    D, _ = cvxnn.sample_patterns(train.X, args.num_patterns, seed=0)
    settings = cronos.CronosSettings(beta=args.beta, rho=args.rho, admm_iters=args.admm_iters,
                                     pcg_iters=32, pcg_tol=1e-5, nystrom_rank=20,
                                     preconditioner=args.preconditioner, rel_tol=args.rel_tol,
                                     abs_tol=args.abs_tol)

    # Long float64 reference of the same program (no per-iteration accuracies). Its best dual bound
    # certifies how far its objective can be from the optimum.
    with jax.enable_x64(True):
        reference_settings = cronos.CronosSettings(beta=args.beta, rho=args.reference_rho,
                                                   admm_iters=args.reference_iters, pcg_iters=50, pcg_tol=1e-8,
                                                   nystrom_rank=20, preconditioner="block_nystrom", rel_tol=1e-6,
                                                   abs_tol=1e-9)
        problem64 = cronos.make_problem(train.X, train.y, D, dtype=jnp.float64)
        reference = cronos.run_cronos(problem64, reference_settings, progress=False)
    reference_objective = reference.history[-1]["objective"]
    reference_bound = max(record["dual_bound"] for record in reference.history)

    # The default float32 run, as cronos_trainer.py runs it, and a run with validation patience.
    problem = cronos.make_problem(train.X, train.y, D, dtype=jnp.float32)
    result = cronos.run_cronos(problem, settings, splits["train"], splits.get("validation"), progress=False)
    early_settings = dataclasses.replace(settings, patience=args.patience)
    early = cronos.run_cronos(problem, early_settings, splits["train"], splits.get("validation"), progress=False)
    early_weights = cvxnn.recover_weights(early.v_kept)
    early_test = cronos.accuracies(
        cvxnn.relu_network(data.splits["test"].X, early_weights.theta1, early_weights.theta2), splits["test"]
    )
    weights = cvxnn.recover_weights(result.v_kept)
    test_scores = cvxnn.relu_network(data.splits["test"].X, weights.theta1, weights.theta2)
    test_accuracy, test_pairwise = cronos.accuracies(test_scores, splits["test"])
    gaps = [abs(record["objective"] - reference_objective) / reference_objective for record in result.history]
    reaching = [record for record, gap in zip(result.history, gaps) if gap <= 1e-3]
    certified = [record for record in result.history if record["duality_gap"] <= 1e-3]

    # The non-convex objective of a network: squared loss + beta/2 (||theta1||^2 + ||theta2||^2), which
    # equals the convex objective at a recovered feasible point.
    def nonconvex_objective(theta1: np.ndarray, theta2: np.ndarray) -> float:
        residual = cvxnn.relu_network(train.X, theta1, theta2) - train.y
        return float(0.5 * residual @ residual + args.beta / 2 * (np.sum(theta1**2) + np.sum(theta2**2)))

    adamw_settings = adamw_baseline.AdamWSettings(hidden=2 * args.num_patterns, weight_decay=args.adamw_weight_decay)
    adamw = adamw_baseline.adamw_search(splits["train"], splits.get("validation"), splits.get("test"), adamw_settings)
    # Both methods again, now compiled: the steady-state cost without XLA compilation.
    adamw_warm = adamw_baseline.adamw_search(splits["train"], splits.get("validation"), splits.get("test"),
                                             adamw_settings)
    early_warm = cronos.run_cronos(problem, early_settings, splits["train"], splits.get("validation"), progress=False)
    adamw_objectives = []
    for run in adamw["runs"]:
        params, _ = adamw_baseline.train_one_jit(
            jnp.asarray(train.X, jnp.float32), jnp.asarray(train.y, jnp.float32), jax.random.PRNGKey(run["seed"]),
            jnp.asarray(run["learning_rate"], jnp.float32), 2 * args.num_patterns, 30, 1024, args.adamw_weight_decay,
        )
        adamw_objectives.append(nonconvex_objective(np.asarray(params["theta1"]), np.asarray(params["theta2"])))
    last = result.history[-1]
    return {
        "folder": str(folder),
        "train_samples": int(len(train.y)),
        "validation_samples": int(len(data.splits["validation"].y)),
        "test_samples": int(len(data.splits["test"].y)),
        "dim": int(train.X.shape[1]),
        "reference_objective": reference_objective,
        "reference_iters": args.reference_iters,
        "reference_rho": args.reference_rho,
        "reference_dual_bound": reference_bound,
        "reference_certified_gap": (reference_objective - reference_bound) / reference_objective,
        "reference_seconds": reference.seconds,
        "reference_status": reference.status,
        "reference_iterations": reference.iterations,
        "preconditioner": args.preconditioner,
        "rho": args.rho,
        "reference_pcg_iterations_mean": float(np.mean([record["pcg_iterations"] for record in reference.history])),
        "reference_residuals": {key: reference.history[-1][key] for key in
                                ("primal_residual", "primal_tolerance", "dual_residual", "dual_tolerance",
                                 "constraint_violation", "pcg_iterations")},
        "reference_last_relative_change": abs(reference.history[-1]["objective"] - reference.history[-101]["objective"])
        / reference_objective if len(reference.history) > 100 else None,
        "cronos": {
            "seconds": result.seconds,
            "compile_seconds": result.compile_seconds,
            "status": result.status,
            "iterations": result.iterations,
            "final_residuals": {key: last[key] for key in
                                ("primal_residual", "primal_tolerance", "dual_residual", "dual_tolerance")},
            "objective": last["objective"],
            "relative_gap": gaps[-1],
            "first_iteration_within_1e-3": reaching[0]["iteration"] if reaching else None,
            "seconds_to_within_1e-3": reaching[0]["seconds"] if reaching else None,
            "duality_gap": last["duality_gap"],
            "first_iteration_certified_1e-3": certified[0]["iteration"] if certified else None,
            "seconds_to_certified_1e-3": certified[0]["seconds"] if certified else None,
            "constraint_violation": last["constraint_violation"],
            "pcg_iterations_mean": float(np.mean([record["pcg_iterations"] for record in result.history])),
            "kept": result.kept,
            "test_accuracy": test_accuracy,
            "test_pairwise_accuracy": test_pairwise,
            "nonconvex_objective": nonconvex_objective(weights.theta1, weights.theta2),
        },
        "cronos_patience": {
            "patience": args.patience,
            "seconds": early.seconds,
            "seconds_compiled": early_warm.seconds,
            "compile_seconds": early.compile_seconds,
            "status": early.status,
            "iterations": early.iterations,
            "kept": early.kept,
            "relative_gap_at_stop": abs(early.history[-1]["objective"] - reference_objective) / reference_objective,
            "test_accuracy": early_test[0],
            "test_pairwise_accuracy": early_test[1],
        },
        "adamw": {
            "seconds": adamw["seconds"],
            "seconds_compiled": adamw_warm["seconds"],
            "selected": adamw["selected"],
            "best_test_accuracy": adamw["best_test_accuracy"],
            "best_nonconvex_objective": min(adamw_objectives),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, nargs="+", required=True,
                        help="Stage 1 feature folders written by extract.py (pool mean) to benchmark")
    parser.add_argument("--num_patterns", type=int, default=10, help="P")
    parser.add_argument("--beta", type=float, default=1.0, help="group-lasso strength")
    parser.add_argument("--rho", type=float, default=0.3, help="ADMM penalty")
    parser.add_argument("--admm_iters", type=int, default=500, help="ADMM iterations of the float32 run")
    parser.add_argument("--reference_iters", type=int, default=3000,
                        help="ADMM iteration cap of the float64 reference (it stops earlier at relative tolerance 1e-6)")
    parser.add_argument("--reference_rho", type=float, default=0.3,
                        help="ADMM penalty of the float64 reference, which always uses the block_nystrom preconditioner")
    parser.add_argument("--rel_tol", type=float, default=1e-3, help="relative residual tolerance of the float32 run")
    parser.add_argument("--abs_tol", type=float, default=1e-5, help="absolute residual tolerance of the float32 run")
    parser.add_argument("--patience", type=int, default=10,
                        help="validation patience (ADMM iterations) of the early-stopped float32 run")
    parser.add_argument("--preconditioner", type=str, default="block_nystrom", choices=["nystrom", "block_nystrom"],
                        help="PCG preconditioner of both float32 CRONOS runs")
    parser.add_argument("--adamw_weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--output", type=Path, default=Path("/tmp/coala_bench_cronos.json"), help="results JSON")
    args = parser.parse_args()
    setup_logging()

    results = {}
    for folder in args.features:
        logger.info("Benchmarking %s", folder)
        results[folder.name] = benchmark_folder(folder, args)
        atomic_write_json(args.output, results)
        print(json.dumps(results[folder.name], indent=2))
    print(f"Results written to {args.output}")


if __name__ == "__main__":
    main()
