"""Sweep CRONOS's preconditioner and rho against the certified float64 references of bench_cronos.py.

    python benchmarks/bench_cronos.py --features F1 F2 --output /tmp/coala_bench_cronos.json
    python benchmarks/sweep_cronos_rho.py --reference /tmp/coala_bench_cronos.json

For every folder in the bench_cronos.py results, it runs float32 CRONOS for
--admm_iters iterations (no stopping rule) with each (preconditioner, rho) pair. It
prints the relative objective gap to the reference after 100, 200, 400 and the last
iteration, the first iteration within 1e-3 with its wall time, and the mean PCG
iteration count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala.io import atomic_write_json, setup_logging  # noqa: E402

SETTINGS = (("nystrom", 1.0), ("block_nystrom", 1.0), ("block_nystrom", 0.3), ("block_nystrom", 0.1))


def sweep_folder(folder: str, reference_objective: float, admm_iters: int) -> list[dict]:
    """Run every (preconditioner, rho) pair of SETTINGS on one feature folder; return one row per pair."""
    import jax.numpy as jnp

    from coala import cronos, cvxnn
    from coala.features import load_features

    features = load_features(folder)
    data = cvxnn.build_training_data(
        features.chosen, features.rejected, features.chosen_split, features.rejected_split, features.paired
    )
    train = data.splits["train"]
    splits = {name: cronos.EvalSplit(split.X, split.y, split.pairs) for name, split in data.splits.items()}
    D, _ = cvxnn.sample_patterns(train.X, 10, seed=0)
    problem = cronos.make_problem(train.X, train.y, D, dtype=jnp.float32)
    rows = []
    for preconditioner, rho in SETTINGS:
        settings = cronos.CronosSettings(beta=1.0, rho=rho, admm_iters=admm_iters, pcg_iters=32, pcg_tol=1e-5,
                                         nystrom_rank=20, preconditioner=preconditioner)
        result = cronos.run_cronos(problem, settings, splits["train"], splits["validation"], progress=False)
        gaps = [abs(record["objective"] - reference_objective) / reference_objective for record in result.history]
        first = next((record for record, gap in zip(result.history, gaps) if gap <= 1e-3), None)
        row = {
            "preconditioner": preconditioner,
            "rho": rho,
            "gap_at": {k: gaps[k - 1] for k in (100, 200, 400, admm_iters) if k <= admm_iters},
            "first_iteration_within_1e-3": None if first is None else first["iteration"],
            "seconds_to_within_1e-3": None if first is None else first["seconds"],
            "seconds_per_200_iterations": result.history[min(200, admm_iters) - 1]["seconds"],
            "pcg_iterations_mean": float(np.mean([record["pcg_iterations"] for record in result.history])),
        }
        print(Path(folder).name, json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="results JSON written by bench_cronos.py")
    parser.add_argument("--admm_iters", type=int, default=600, help="ADMM iterations of every float32 run")
    parser.add_argument("--output", type=Path, default=Path("/tmp/coala_sweep_cronos_rho.json"), help="results JSON")
    args = parser.parse_args()
    setup_logging()

    references = json.loads(args.reference.read_text())
    results = {}
    for name, reference in references.items():
        results[name] = sweep_folder(reference["folder"], reference["reference_objective"], args.admm_iters)
        atomic_write_json(args.output, results)
    print(f"Results written to {args.output}")


if __name__ == "__main__":
    main()
