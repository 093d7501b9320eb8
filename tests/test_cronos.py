"""Tests of PCG, the Nystrom preconditioner and ADMM against an independent conic solver."""

from __future__ import annotations

import functools
import logging

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coala import cronos, cvxnn


def spd_matrix(N: int, eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))
    return (Q * eigenvalues) @ Q.T


@functools.lru_cache(maxsize=None)
def cvxpy_reference(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """The n=200, d=10, P=4 test problem and its Clarabel optimum: (X, y, D, beta, optimal value)."""
    rng = np.random.default_rng(seed)
    n, d, P, beta = 200, 10, 4, 1.0
    X = rng.standard_normal((n, d))
    y = np.sign(X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n))
    D, _ = cvxnn.sample_patterns(X, P, seed=1)
    return X, y, D, beta, solve_with_cvxpy(X, y, D, beta)


def solve_with_cvxpy(X: np.ndarray, y: np.ndarray, D: np.ndarray, beta: float) -> float:
    """Solve the constrained group-lasso program with Clarabel and return its optimal value."""
    d, P = X.shape[1], D.shape[1]
    U = cp.Variable((d, P))
    Z = cp.Variable((d, P))
    prediction = sum(cp.multiply(D[:, i], X @ (U[:, i] - Z[:, i])) for i in range(P))
    constraints = []
    for i in range(P):
        signs = 2 * D[:, i] - 1
        constraints += [cp.multiply(signs, X @ U[:, i]) >= 0, cp.multiply(signs, X @ Z[:, i]) >= 0]
    penalty = sum(cp.norm(U[:, i]) + cp.norm(Z[:, i]) for i in range(P))
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(prediction - y) + beta * penalty), constraints)
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL
    return float(problem.value)


def test_admm_matches_cvxpy_objective():
    X, y, D, beta, reference = cvxpy_reference()
    settings = cronos.CronosSettings(beta=beta, rho=1.0, admm_iters=1000, pcg_iters=50, pcg_tol=1e-10, nystrom_rank=20)
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        result = cronos.run_cronos(problem, settings, progress=False)
        Gv_norm = float(jnp.linalg.norm(cvxnn.G_apply(problem.X, problem.D, jnp.asarray(result.v_last))))
    last = result.history[-1]
    assert abs(last["objective"] - reference) / reference < 1e-3
    assert last["constraint_violation"] / Gv_norm < 1e-3
    assert last["primal_residual_uv"] < 1e-3


def test_dual_bound_brackets_clarabel_optimum():
    X, y, D, beta, reference = cvxpy_reference()
    settings = cronos.CronosSettings(beta=beta, rho=0.3, admm_iters=1500, pcg_iters=50, pcg_tol=1e-10,
                                     nystrom_rank=20, preconditioner="block_nystrom")
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        result = cronos.run_cronos(problem, settings, progress=False)
    bounds = np.array([record["dual_bound"] for record in result.history])
    assert np.all(bounds <= reference * (1 + 1e-9))
    assert bounds[-1] > bounds[0]
    last = result.history[-1]
    assert last["duality_gap"] < 1e-3
    assert abs(last["objective"] - reference) / reference <= last["duality_gap"]


def test_dual_bound_holds_under_balancing():
    X, y, D, beta, reference = cvxpy_reference()
    settings = cronos.CronosSettings(beta=beta, rho=10.0, admm_iters=300, pcg_iters=50, pcg_tol=1e-10,
                                     nystrom_rank=20, balance_tau=2.0)
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        result = cronos.run_cronos(problem, settings, progress=False)
    assert len({record["rho"] for record in result.history}) > 1
    for record in result.history:
        assert record["dual_bound"] <= reference * (1 + 1e-9)
    assert result.history[-1]["duality_gap"] < 0.05


def test_pcg_solves_spd_system():
    N = 60
    A = spd_matrix(N, np.linspace(1.0, 50.0, N), seed=1)
    b = np.random.default_rng(2).standard_normal(N)
    with jax.enable_x64(True):
        A_j = jnp.asarray(A)
        result = cronos.pcg(lambda x: A_j @ x, jnp.asarray(b), tol=1e-10, max_iters=200)
    assert int(result.status) == cronos.PCG_CONVERGED
    assert int(result.iterations) <= N
    np.testing.assert_allclose(np.asarray(result.x), np.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
    assert np.linalg.norm(A @ np.asarray(result.x) - b) <= 1e-9 * np.linalg.norm(b)


NYSTROM_N, NYSTROM_RANK = 300, 40


@jax.jit
def solve_shifted(H: jax.Array, b: jax.Array, mu: jax.Array, key: jax.Array) -> tuple[cronos.PCGResult, cronos.PCGResult, cronos.NystromPreconditioner]:
    """Solve ``(H + mu I) x = b`` by plain CG and by Nystrom-preconditioned CG."""

    def curvature(x):
        return H @ x

    def system(x):
        return H @ x + mu * x

    pre = cronos.nystrom_approximation(curvature, NYSTROM_N, NYSTROM_RANK, mu, key, dtype=H.dtype)

    def precond(r):
        return cronos.apply_nystrom(pre, r)

    plain = cronos.pcg(system, b, tol=1e-8, max_iters=3000)
    preconditioned = cronos.pcg(system, b, precond=precond, tol=1e-8, max_iters=3000)
    return plain, preconditioned, pre


def test_nystrom_cuts_pcg_iterations():
    mu = 1e-3
    eigenvalues = 1e4 * 0.7 ** np.arange(NYSTROM_N)  # fast spectral decay, condition number about 1e7
    H = spd_matrix(NYSTROM_N, eigenvalues, seed=3)
    b = np.random.default_rng(4).standard_normal(NYSTROM_N)
    with jax.enable_x64(True):
        plain, preconditioned, _ = solve_shifted(jnp.asarray(H), jnp.asarray(b), jnp.asarray(mu), jax.random.PRNGKey(0))
    assert int(preconditioned.status) == cronos.PCG_CONVERGED
    assert int(plain.iterations) >= 3 * int(preconditioned.iterations)
    expected = np.linalg.solve(H + mu * np.eye(NYSTROM_N), b)
    np.testing.assert_allclose(np.asarray(preconditioned.x), expected, rtol=1e-5, atol=1e-5)


def test_pcg_zero_and_tiny_rhs():
    A = jnp.asarray(spd_matrix(20, np.linspace(1.0, 5.0, 20), seed=5), dtype=jnp.float32)
    start = jnp.ones(20, jnp.float32)
    zero = cronos.pcg(lambda x: A @ x, jnp.zeros(20, jnp.float32), x0=start, tol=1e-6, max_iters=50)
    assert int(zero.iterations) == 0
    assert np.all(np.asarray(zero.x) == 0)
    assert int(zero.status) == cronos.PCG_CONVERGED
    tiny = cronos.pcg(lambda x: A @ x, jnp.full(20, 1e-30, jnp.float32), tol=1e-4, max_iters=50)
    assert np.all(np.isfinite(np.asarray(tiny.x)))
    assert int(tiny.status) == cronos.PCG_CONVERGED


def test_nystrom_of_zero_and_low_rank_matrices_is_finite():
    N, mu = NYSTROM_N, 1e-2
    ramp = np.arange(N) / N
    b = np.ones(N)
    for H in (np.zeros((N, N)), np.outer(ramp, ramp)):
        with jax.enable_x64(True):
            _, result, pre = solve_shifted(jnp.asarray(H), jnp.asarray(b), jnp.asarray(mu), jax.random.PRNGKey(1))
        assert np.all(np.isfinite(np.asarray(pre.U)))
        assert np.all(np.asarray(pre.S) >= 0)
        assert np.all(np.isfinite(np.asarray(result.x)))
        np.testing.assert_allclose((H + mu * np.eye(N)) @ np.asarray(result.x), b, rtol=1e-6, atol=1e-6)


SMALL_N, SMALL_D, SMALL_P = 60, 5, 3  # one shape for the float32 ADMM tests, so admm_step compiles once


def small_problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((SMALL_N, SMALL_D)).astype(np.float32)
    y = np.where(X[:, 0] + 0.3 * rng.standard_normal(SMALL_N) > 0, 1.0, -1.0)
    D, _ = cvxnn.sample_patterns(X, SMALL_P, seed=0)
    return X, y, D


def test_admm_duplicate_rows_stay_finite():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((20, SMALL_D))
    X = np.concatenate([base, base, base])  # rank-deficient: every row three times
    X[:, 4] = X[:, 3]  # and two identical columns
    y = np.where(np.arange(SMALL_N) % 2 == 0, 1.0, -1.0)
    D, _ = cvxnn.sample_patterns(X, SMALL_P, seed=0)
    problem = cronos.make_problem(X, y, D)
    settings = cronos.CronosSettings(beta=1e-3, rho=1e-4, admm_iters=5, nystrom_rank=10)
    result = cronos.run_cronos(problem, settings, progress=False)
    for record in result.history:
        for key in ("objective", "primal_residual_uv", "primal_residual_gs", "dual_residual", "pcg_residual"):
            assert np.isfinite(record[key]), (key, record)
    assert np.all(np.isfinite(result.v_last))


def test_admm_step_compiles_once(caplog):
    X, y, D = small_problem(seed=7)
    problem = cronos.make_problem(X, y, D)
    settings = cronos.CronosSettings(beta=0.1, rho=1.0, admm_iters=6, nystrom_rank=10)
    split = cronos.EvalSplit(X, y)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        cronos.run_cronos(problem, settings, train=split, validation=split, progress=False)
    compiles = [record for record in caplog.records if "XLA compilation of jit(admm_step)" in record.getMessage()]
    assert len(compiles) <= 1
    cache_size = cronos.admm_step_jit._cache_size()
    cronos.run_cronos(problem, settings, train=split, validation=split, progress=False)
    assert cronos.admm_step_jit._cache_size() == cache_size


def test_history_records_every_iteration():
    X, y, D = small_problem(seed=8)
    problem = cronos.make_problem(X, y, D)
    split = cronos.EvalSplit(X, y, pairs=None)
    result = cronos.run_cronos(problem, cronos.CronosSettings(beta=0.1, rho=1.0, admm_iters=4, nystrom_rank=10), split, split, progress=False)
    assert [record["iteration"] for record in result.history] == [1, 2, 3, 4]
    for key in ("objective", "objective_average", "primal_residual_uv", "primal_residual_gs", "dual_residual",
                "pcg_iterations", "train_accuracy", "validation_accuracy", "validation_accuracy_average", "seconds"):
        assert key in result.history[-1], key
    assert result.kept["iterate"] in ("last", "average")
    assert 1 <= result.kept["iteration"] <= 4


@pytest.mark.parametrize(
    "change, name",
    [({"rho": 0.0}, "rho"), ({"rho": -1.0}, "rho"), ({"beta": 0.0}, "beta"), ({"admm_iters": 0}, "admm_iters"),
     ({"step_ratio": 2.5}, "step_ratio"), ({"pcg_tol": 0.0}, "pcg_tol"), ({"nystrom_rank": -1}, "nystrom_rank"), ({"preconditioner": "jacobi"}, "preconditioner"),
     ({"rel_tol": -1e-3}, "rel_tol"), ({"abs_tol": 1.0}, "abs_tol"), ({"patience": -1}, "patience"),
     ({"balance_tau": 0.5}, "balance_tau"), ({"balance_mu": 1.0}, "balance_mu")],
)
def test_settings_reject_nonsense(change, name):
    with pytest.raises(ValueError, match=name):
        cronos.CronosSettings(**change).validate()


def test_nystrom_rank_above_system_size_rejected():
    with pytest.raises(ValueError, match="nystrom_rank"):
        cronos.CronosSettings(nystrom_rank=50).validate(system_size=40)


def test_residual_balancing_matches_cvxpy():
    X, y, D, beta, reference = cvxpy_reference()
    # rho starts 100x too large, so balancing must lower it and still reach the optimum.
    settings = cronos.CronosSettings(beta=beta, rho=100.0, admm_iters=1000, pcg_iters=50, pcg_tol=1e-10,
                                     nystrom_rank=20, balance_tau=2.0, rel_tol=1e-6, abs_tol=1e-9)
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        result = cronos.run_cronos(problem, settings, progress=False)
        Gv_norm = float(jnp.linalg.norm(cvxnn.G_apply(problem.X, problem.D, jnp.asarray(result.v_last))))
    rhos = [record["rho"] for record in result.history]
    assert min(rhos) < 100.0
    last = result.history[-1]
    assert abs(last["objective"] - reference) / reference < 1e-3
    assert last["constraint_violation"] / Gv_norm < 1e-2


def test_stopping_rule_reports_convergence():
    X, y, D = small_problem(seed=9)
    problem = cronos.make_problem(X, y, D)
    settings = cronos.CronosSettings(beta=1.0, rho=1.0, admm_iters=400, nystrom_rank=10, rel_tol=1e-2, abs_tol=1e-4)
    result = cronos.run_cronos(problem, settings, progress=False)
    assert result.status == "converged"
    assert result.iterations == len(result.history)
    assert result.iterations < 400
    last = result.history[-1]
    assert last["converged"]
    assert last["primal_residual"] <= last["primal_tolerance"]
    assert last["dual_residual"] <= last["dual_tolerance"]
    assert not any(record["converged"] for record in result.history[:-1])
    assert result.v_average.shape == result.v_last.shape

    # Without tolerances every iteration runs.
    unstopped = cronos.run_cronos(problem, cronos.CronosSettings(beta=0.1, rho=1.0, admm_iters=5, nystrom_rank=10),
                                  progress=False)
    assert unstopped.status == "max_iterations"
    assert unstopped.iterations == 5


def test_validation_patience_stops_and_keeps_best():
    X, y, D = small_problem(seed=10)
    problem = cronos.make_problem(X, y, D)
    split = cronos.EvalSplit(X, y)
    patience = 3
    settings = cronos.CronosSettings(beta=0.1, rho=1.0, admm_iters=300, nystrom_rank=10, patience=patience)
    result = cronos.run_cronos(problem, settings, train=split, validation=split, progress=False)
    assert result.status == "validation_patience"
    assert result.iterations < 300
    best = max(max(r["validation_accuracy"], r["validation_accuracy_average"]) for r in result.history)
    tail = result.history[-patience:]
    earlier = result.history[:-patience]
    assert max(max(r["validation_accuracy"], r["validation_accuracy_average"]) for r in earlier) == best
    assert all(max(r["validation_accuracy"], r["validation_accuracy_average"]) <= best for r in tail)
    assert result.kept["validation_accuracy"] == best


def test_balancing_step_compiles_once(caplog):
    X, y, D = small_problem(seed=11)
    problem = cronos.make_problem(X, y, D)
    settings = cronos.CronosSettings(beta=0.1, rho=100.0, admm_iters=12, nystrom_rank=10, balance_tau=2.0)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        result = cronos.run_cronos(problem, settings, progress=False)
    assert len({record["rho"] for record in result.history}) > 1
    compiles = [record for record in caplog.records if "XLA compilation of jit(admm_step)" in record.getMessage()]
    assert len(compiles) <= 1
    cache_size = cronos.admm_step_jit._cache_size()
    cronos.run_cronos(problem, settings, progress=False)
    assert cronos.admm_step_jit._cache_size() == cache_size


def block_structured_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An n=200, d=20, P=5 problem whose feature scales span three decades, like standardized LM features."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((200, 20)) * np.logspace(-1.5, 1.5, 20)
    y = np.sign(X @ rng.standard_normal(20) + 0.5 * rng.standard_normal(200))
    D, _ = cvxnn.sample_patterns(X, 5, seed=2)
    return X, y, D


def test_block_nystrom_cuts_pcg_iterations_on_block_structure():
    X, y, D = block_structured_problem()
    rho, rank = 1.0, 10
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        shape = problem.Fty.shape
        N = int(np.prod(shape))

        def system(x):
            u = x.reshape(shape)
            return (cronos.curvature_apply(problem, rho, u) + rho * u).reshape(-1)

        b = jax.random.normal(jax.random.PRNGKey(3), (N,), jnp.float64)
        key = jax.random.PRNGKey(0)
        plain_pre = cronos.build_preconditioner(problem, jnp.asarray(rho), rank, key)
        block_pre = cronos.build_block_preconditioner(problem, jnp.asarray(rho), rank, key)
        plain = cronos.pcg(system, b, precond=functools.partial(cronos.apply_nystrom, plain_pre), tol=1e-8, max_iters=5000)
        block = cronos.pcg(system, b, precond=functools.partial(cronos.apply_block_nystrom, block_pre), tol=1e-8,
                           max_iters=5000)
        dense = np.asarray(jax.vmap(system, in_axes=1, out_axes=1)(jnp.eye(N)))
    assert int(block.status) == cronos.PCG_CONVERGED
    assert int(plain.iterations) >= 5 * int(block.iterations)
    np.testing.assert_allclose(np.asarray(block.x), np.linalg.solve(dense, np.asarray(b)), rtol=1e-6, atol=1e-6)


def test_block_nystrom_preconditioner_is_symmetric_positive_definite():
    X, y, D = block_structured_problem()
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        pre = cronos.build_block_preconditioner(problem, jnp.asarray(0.3), 10, jax.random.PRNGKey(0))
        N = int(np.prod(problem.Fty.shape))
        M_inv = np.asarray(jax.vmap(functools.partial(cronos.apply_block_nystrom, pre), in_axes=1, out_axes=1)(jnp.eye(N)))
    np.testing.assert_allclose(M_inv, M_inv.T, atol=1e-10)
    assert np.linalg.eigvalsh(0.5 * (M_inv + M_inv.T)).min() > 0


@pytest.mark.parametrize("rho, balance_tau", [(1.0, 1.0), (100.0, 2.0)])
def test_admm_with_block_nystrom_matches_cvxpy(rho, balance_tau):
    X, y, D, beta, reference = cvxpy_reference()
    settings = cronos.CronosSettings(beta=beta, rho=rho, admm_iters=1000, pcg_iters=50, pcg_tol=1e-10, nystrom_rank=20,
                                     preconditioner="block_nystrom", balance_tau=balance_tau, rel_tol=1e-6,
                                     abs_tol=1e-9)
    with jax.enable_x64(True):
        problem = cronos.make_problem(X, y, D, dtype=jnp.float64)
        result = cronos.run_cronos(problem, settings, progress=False)
    last = result.history[-1]
    assert abs(last["objective"] - reference) / reference < 1e-3
    assert all(record["pcg_status"] == "converged" for record in result.history)
    if balance_tau > 1:
        assert min(record["rho"] for record in result.history) < rho

