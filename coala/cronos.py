"""CRONOS: ADMM for the convex ReLU program, with Nystrom-preconditioned conjugate gradients.

The program and the maps ``F`` and ``G`` are defined in ``coala.cvxnn``. ADMM
splits it as ``min 1/2||F u - y||^2 + beta ||v||_{2,1} + I_{>=0}(s)`` subject to
``u = v`` and ``G u = s``, with scaled duals ``lam`` (for ``u = v``) and ``nu``
(for ``G u = s``)::

    u   <- solve (F^T F + rho I + rho G^T G) u = F^T y + rho (v - lam) + rho G^T (s - nu)
    v   <- group soft-threshold(u + lam, beta / rho)
    s   <- max(G u + nu, 0)
    lam <- lam + gamma_a (u - v);   nu <- nu + gamma_a (G u - s)

The u-system is solved by preconditioned conjugate gradients (``pcg``), warm
started from the previous u. Its matrix changes only when residual balancing
changes rho, so the randomized Nystrom preconditioner (Frangella, Tropp & Udell,
"Randomized Nystrom preconditioning", SIAM J. Matrix Anal. Appl. 2023) is built
once per run and rebuilt at each change of rho. One ADMM iteration, stopping rule
and balancing included, is one jitted XLA program (``admm_step``).

NOTE: On standardized LM features PCG with the Nystrom preconditioner usually stops
at its iteration cap. The eigenvalues of ``X^T X`` spread over several decades and
repeat in all 2P blocks of ``G^T G``, so a rank-r sketch captures only the top
r / 2P of each block. ``BlockNystromPreconditioner`` (``preconditioner="block_nystrom"``)
inverts that block-diagonal part exactly and sketches only ``F^T F``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from coala import cvxnn

logger = logging.getLogger(__name__)

Array = jax.Array

# PCG exit status codes.
PCG_CONVERGED = 0
PCG_MAX_ITERATIONS = 1
PCG_BREAKDOWN = 2
PCG_STATUS_NAMES = {PCG_CONVERGED: "converged", PCG_MAX_ITERATIONS: "max_iterations", PCG_BREAKDOWN: "breakdown"}


# ----------------------------------------------------------------------------------------------
# Preconditioned conjugate gradients


class PCGResult(NamedTuple):
    """Result of ``pcg``.

    Attributes:
      x: (N,) the approximate solution.
      iterations: number of CG iterations run.
      residual_norm: ``||b - A x||_2`` as tracked by the recurrence.
      status: ``PCG_CONVERGED``, ``PCG_MAX_ITERATIONS`` or ``PCG_BREAKDOWN``
        (a non-positive or non-finite curvature ``p^T A p``; x is the last good iterate).
    """

    x: Array
    iterations: Array
    residual_norm: Array
    status: Array


def pcg(
    matvec: Callable[[Array], Array],
    b: Array,
    x0: Array | None = None,
    precond: Callable[[Array], Array] | None = None,
    tol: float | Array = 1e-6,
    max_iters: int | Array = 100,
) -> PCGResult:
    """Solve ``A x = b`` for symmetric positive definite A by preconditioned conjugate gradients.

    Runs as one ``lax.while_loop``; ``tol`` and ``max_iters`` may be traced values.
    Stops when ``||b - A x|| <= tol * ||b||``, after ``max_iters`` iterations, or on
    breakdown. A zero right-hand side returns ``x = 0`` after zero iterations.

    Args:
      matvec: the map ``x -> A x`` on (N,) vectors.
      b: (N,) right-hand side.
      x0: (N,) warm start; zeros when ``None``.
      precond: the map ``r -> M^{-1} r`` of an SPD preconditioner; identity when ``None``.
      tol: relative residual tolerance (> 0).
      max_iters: iteration cap (>= 0).
    """
    if precond is None:
        precond = _identity
    b_norm = jnp.linalg.norm(b)
    zero_rhs = b_norm == 0
    x = jnp.zeros_like(b) if x0 is None else jnp.where(zero_rhs, jnp.zeros_like(b), x0)
    r = b - matvec(x)
    z = precond(r)
    rz = jnp.vdot(r, z)
    threshold = tol * b_norm
    max_iters = jnp.asarray(max_iters, dtype=jnp.int32)

    # Carry: iteration, x, r, z, p, r.z, ||r||, breakdown flag.
    init = (jnp.asarray(0, jnp.int32), x, r, z, z, rz, jnp.linalg.norm(r), jnp.asarray(False))

    def keep_going(carry: tuple) -> Array:
        k, _, _, _, _, _, r_norm, broke = carry
        return (k < max_iters) & (r_norm > threshold) & ~broke

    def cg_iteration(carry: tuple) -> tuple:
        k, x, r, z, p, rz, r_norm, _ = carry
        Ap = matvec(p)
        curvature = jnp.vdot(p, Ap)
        broke = ~(jnp.isfinite(curvature) & (curvature > 0) & jnp.isfinite(rz))
        alpha = jnp.where(broke, 0.0, rz / jnp.where(broke, 1.0, curvature))
        x_new = x + alpha * p
        r_new = r - alpha * Ap
        z_new = precond(r_new)
        rz_new = jnp.vdot(r_new, z_new)
        beta = jnp.where(rz == 0, 0.0, rz_new / jnp.where(rz == 0, 1.0, rz))
        p_new = z_new + beta * p
        # On breakdown keep the previous iterate so the result stays finite.
        x_new, r_new, r_norm_new = jax.lax.cond(
            broke,
            lambda: (x, r, r_norm),
            lambda: (x_new, r_new, jnp.linalg.norm(r_new)),
        )
        return (k + 1, x_new, r_new, z_new, p_new, rz_new, r_norm_new, broke)

    k, x, _, _, _, _, r_norm, broke = jax.lax.while_loop(keep_going, cg_iteration, init)
    status = jnp.where(
        r_norm <= threshold, PCG_CONVERGED, jnp.where(broke, PCG_BREAKDOWN, PCG_MAX_ITERATIONS)
    ).astype(jnp.int32)
    return PCGResult(x=x, iterations=k, residual_norm=r_norm, status=status)


def _identity(r: Array) -> Array:
    return r


# ----------------------------------------------------------------------------------------------
# Randomized Nystrom preconditioner


class NystromPreconditioner(NamedTuple):
    """A rank-r Nystrom approximation ``U diag(S) U^T`` of a PSD matrix H, used for ``H + mu I``.

    Attributes:
      U: (N, r) orthonormal columns.
      S: (r,) eigenvalue estimates, descending, non-negative.
      mu: the shift of the system ``H + mu I`` (> 0).
    """

    U: Array
    S: Array
    mu: Array


def nystrom_approximation(
    matvec: Callable[[Array], Array], dim: int, rank: int, mu: float | Array, key: Array, dtype: Any = jnp.float32
) -> NystromPreconditioner:
    """Build the randomized Nystrom preconditioner of ``H + mu I`` from ``rank`` products with H.

    Follows Algorithm 2.1 of Frangella, Tropp & Udell (2023): a Gaussian test matrix
    ``Omega`` (N, r) with orthonormal columns, the sketch ``Y = H Omega`` and a small
    shift ``sigma = sqrt(N) * eps * ||Y||_F`` for stability. The core
    ``Omega^T (Y + sigma Omega)`` is inverted through its eigendecomposition with
    eigenvalues floored above zero (in place of the paper's Cholesky factor), so a
    rank-deficient H or a zero sketch gives finite output. A non-finite result falls
    back to the identity preconditioner (``U = 0``).

    Args:
      matvec: the map ``x -> H x`` on (N,) vectors, H symmetric PSD.
      dim: N.
      rank: r, 1 <= r <= N.
      mu: the shift of the system (> 0).
      key: JAX PRNG key for the test matrix.
      dtype: floating dtype of the result.
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"Nystrom rank must be between 1 and the system size {dim}, got {rank}.")
    omega = jax.random.normal(key, (dim, rank), dtype=dtype)
    omega, _ = jnp.linalg.qr(omega)
    sketch = jax.vmap(matvec, in_axes=1, out_axes=1)(omega)  # (N, r) = H Omega
    eps = jnp.finfo(dtype).eps
    shift = math.sqrt(dim) * eps * jnp.linalg.norm(sketch)
    shifted = sketch + shift * omega
    core = omega.T @ shifted
    core = 0.5 * (core + core.T)
    core_eigenvalues, core_vectors = jnp.linalg.eigh(core)
    floor = jnp.maximum(jnp.max(core_eigenvalues) * eps * rank, jnp.finfo(dtype).tiny)
    inv_sqrt = core_vectors @ jnp.diag(1.0 / jnp.sqrt(jnp.maximum(core_eigenvalues, floor))) @ core_vectors.T
    factor = shifted @ inv_sqrt
    U, singular_values, _ = jnp.linalg.svd(factor, full_matrices=False)
    S = jnp.maximum(singular_values**2 - shift, 0.0)
    finite = jnp.all(jnp.isfinite(U)) & jnp.all(jnp.isfinite(S))
    U = jnp.where(finite, U, 0.0)
    S = jnp.where(finite, S, 0.0)
    return NystromPreconditioner(U=U, S=S, mu=jnp.asarray(mu, dtype=dtype))


def apply_nystrom(pre: NystromPreconditioner, r: Array) -> Array:
    """Return ``P^{-1} r = (S_r + mu) U diag(1 / (S + mu)) U^T r + (I - U U^T) r`` (N,)."""
    coefficients = pre.U.T @ r
    smallest = pre.S[-1]
    return pre.U @ ((smallest + pre.mu) / (pre.S + pre.mu) * coefficients) + r - pre.U @ coefficients


# ----------------------------------------------------------------------------------------------
# ADMM


class Problem(NamedTuple):
    """The training data of one CRONOS run, on the device.

    Attributes:
      X: (n, d) standardized training features.
      D: (n, P) 0/1 activation patterns.
      y: (n,) labels in {-1, +1}.
      XtX: (d, d) Gram matrix ``X^T X`` (the diagonal blocks of ``G^T G``).
      Fty: (2, d, P) ``F^T y``.
    """

    X: Array
    D: Array
    y: Array
    XtX: Array
    Fty: Array


def make_problem(X: np.ndarray, y: np.ndarray, D: np.ndarray, dtype: Any = jnp.float32) -> Problem:
    """Validate and move a problem to the device in ``dtype``."""
    X = np.asarray(X)
    y = np.asarray(y)
    D = np.asarray(D)
    cvxnn.check_problem(X, y, D)
    Xj = jnp.asarray(X, dtype=dtype)
    Dj = jnp.asarray(D, dtype=dtype)
    yj = jnp.asarray(y, dtype=dtype)
    return Problem(X=Xj, D=Dj, y=yj, XtX=Xj.T @ Xj, Fty=cvxnn.F_transpose_apply(Xj, Dj, yj))


class ADMMState(NamedTuple):
    """ADMM variables: u, v, lam (2, d, P); s, nu (2, n, P)."""

    u: Array
    v: Array
    s: Array
    lam: Array
    nu: Array


def initial_state(problem: Problem) -> ADMMState:
    """Return the all-zero ADMM state for ``problem``."""
    n, d = problem.X.shape
    P = problem.D.shape[1]
    zeros_u = jnp.zeros((2, d, P), problem.X.dtype)
    zeros_s = jnp.zeros((2, n, P), problem.X.dtype)
    return ADMMState(u=zeros_u, v=zeros_u, s=zeros_s, lam=zeros_u, nu=zeros_s)


def curvature_apply(problem: Problem, rho: Array, u: Array) -> Array:
    """Return ``(F^T F + rho G^T G) u`` (2, d, P): the PSD part of the u-system, without ``rho I``."""
    Fu = cvxnn.F_apply(problem.X, problem.D, u)
    return cvxnn.F_transpose_apply(problem.X, problem.D, Fu) + rho * cvxnn.gram_apply(problem.XtX, u)


def group_soft_threshold(w: Array, threshold: Array) -> Array:
    """Shrink every neuron block (2, d, P) of w towards zero by ``threshold`` in l2 norm."""
    norms = cvxnn.group_norms(w)[:, None, :]
    scale = jnp.maximum(1.0 - threshold / jnp.maximum(norms, jnp.finfo(w.dtype).tiny), 0.0)
    return w * scale


def dual_bound(problem: Problem, v: Array, nu: Array, rho: Array, beta: Array) -> Array:
    """Return a lower bound on the optimal value of the convex program, from ADMM's current iterates.

    The Lagrange dual of ``min 1/2 ||F u - y||^2 + beta ||u||_{2,1}`` subject to ``G u >= 0`` is
    ``max -1/2 ||w||^2 - w^T y`` over ``w`` (n,) and ``z >= 0`` (2, n, P) with
    ``||(F^T w - G^T z)_g||_2 <= beta`` for every neuron block ``g``. The candidate is the
    residual ``w = F v - y`` and ADMM's multiplier of ``G u >= 0``, ``z = max(-rho nu, 0)``,
    both scaled by the factor ``t`` in ``[0, t_max]`` that maximizes the dual, where
    ``t_max`` makes the pair feasible. By weak duality every feasible pair bounds the
    optimum from below, at every iterate. At a primal-dual solution the bound is tight.

    NOTE: ``objective(v) - dual_bound`` bounds the objective gap of v only when v is
    feasible. ADMM's v violates ``G v >= 0`` until it converges, and even a violation of
    0.5% of ``||G v||`` can leave its objective several percent below the optimum, so the
    gap of an ADMM iterate is no stopping rule. The bound itself is valid at every
    iterate. It certifies a reference run whose constraint violation is at rounding level.

    Args:
      problem: the program.
      v: (2, d, P) primal iterate.
      nu: (2, n, P) scaled dual of ``G u = s``.
      rho: the ADMM penalty that scales ``nu``.
      beta: group-lasso strength.

    Returns:
      A scalar lower bound on the optimal value.
    """
    X, D, y = problem.X, problem.D, problem.y
    w = cvxnn.F_apply(X, D, v) - y
    z = jnp.maximum(-rho * nu, 0.0)
    max_block_norm = jnp.max(cvxnn.group_norms(cvxnn.F_transpose_apply(X, D, w) - cvxnn.G_transpose_apply(X, D, z)))
    tiny = jnp.finfo(X.dtype).tiny
    t_max = jnp.where(max_block_norm > tiny, beta / jnp.maximum(max_block_norm, tiny), jnp.inf)
    w_norm2 = jnp.sum(w * w)
    # The dual is a concave quadratic in t, maximized at -w^T y / ||w||^2.
    t = jnp.clip(-jnp.dot(w, y) / jnp.maximum(w_norm2, tiny), 0.0, t_max)
    # At t = 0 the bound is 0 even when ||w||^2 overflows to inf (0 * inf would give NaN).
    return jnp.where(t > 0, -0.5 * t * t * w_norm2 - t * jnp.dot(w, y), 0.0)


def build_preconditioner(problem: Problem, rho: Array, rank: int, key: Array) -> NystromPreconditioner:
    """Build the Nystrom preconditioner of the u-system ``F^T F + rho G^T G + rho I``."""
    shape = problem.Fty.shape
    dim = int(np.prod(shape))

    def flat_curvature(x: Array) -> Array:
        return curvature_apply(problem, rho, x.reshape(shape)).reshape(-1)

    return nystrom_approximation(flat_curvature, dim, rank, rho, key, dtype=problem.X.dtype)


build_preconditioner_jit = jax.jit(build_preconditioner, static_argnames=("rank",))


class BlockNystromPreconditioner(NamedTuple):
    """The exact inverse of the block-diagonal part of the u-system, with a Nystrom sketch of the rest.

    With ``C = I + blockdiag(X^T X)`` (2P equal blocks) the u-system matrix is
    ``A = F^T F + rho C = C^{1/2} (K + rho I) C^{1/2}`` where
    ``K = C^{-1/2} F^T F C^{-1/2}``. The preconditioner is
    ``M = C^{1/2} P_K C^{1/2}`` with ``P_K`` the rank-r Nystrom preconditioner of
    ``K + rho I``, so ``M^{-1} r = C^{-1/2} P_K^{-1} C^{-1/2} r``: symmetric positive
    definite because ``P_K`` is.

    NOTE: The textbook Nystrom preconditioner (``NystromPreconditioner``) sketches the
    whole PSD part ``F^T F + rho G^T G`` and treats everything outside the sketch as
    ``mu I``. Here the part ``rho G^T G = rho blockdiag(X^T X)`` is inverted exactly
    instead: its spectrum (that of ``X^T X``, often spread over six decades) repeats in
    all 2P blocks, so a rank-r sketch would capture only the top r / 2P eigenvalues of
    each block. The sketch is spent on ``K`` alone, whose eigenvalues lie in
    ``[0, 2P]`` because every block ``D_i X C_b^{-1/2}`` (``C_b = I + X^T X``) has
    singular values below 1. ``K`` does not depend on rho, so a change of rho only
    changes the shift ``mu`` and needs no new sketch.

    Attributes:
      eigenvectors: (d, d) orthonormal eigenvectors ``V`` of ``X^T X``.
      inv_sqrt: (d,) ``(1 + e)^{-1/2}`` for the eigenvalues ``e`` of ``X^T X``, so that
        ``C_b^{-1/2} = V diag(inv_sqrt) V^T``.
      nystrom: the Nystrom preconditioner of ``K + mu I`` with ``mu = rho``, on vectors of length 2dP.
    """

    eigenvectors: Array
    inv_sqrt: Array
    nystrom: NystromPreconditioner


def _block_inv_sqrt(pre: BlockNystromPreconditioner, u: Array) -> Array:
    """Return ``C^{-1/2} u`` (2, d, P) for u (2, d, P)."""
    V = pre.eigenvectors
    return jnp.einsum("ab,jbp->jap", V, pre.inv_sqrt[:, None] * jnp.einsum("ba,jbp->jap", V, u))


def build_block_preconditioner(problem: Problem, rho: Array, rank: int, key: Array) -> BlockNystromPreconditioner:
    """Build the block-diagonal-plus-Nystrom preconditioner (``BlockNystromPreconditioner``) of the u-system.

    Costs one eigendecomposition of ``X^T X`` (d, d), shared by all 2P blocks, and
    ``rank`` products with ``K = C^{-1/2} F^T F C^{-1/2}``.
    """
    shape = problem.Fty.shape
    dim = int(np.prod(shape))
    dtype = problem.X.dtype
    gram = 0.5 * (problem.XtX + problem.XtX.T)
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    inv_sqrt = 1.0 / jnp.sqrt(1.0 + jnp.maximum(eigenvalues, 0.0))
    block_part = BlockNystromPreconditioner(eigenvectors, inv_sqrt, NystromPreconditioner(
        U=jnp.zeros((dim, rank), dtype), S=jnp.zeros((rank,), dtype), mu=jnp.asarray(rho, dtype)))

    def flat_K(x: Array) -> Array:
        w = _block_inv_sqrt(block_part, x.reshape(shape))
        FtFw = cvxnn.F_transpose_apply(problem.X, problem.D, cvxnn.F_apply(problem.X, problem.D, w))
        return _block_inv_sqrt(block_part, FtFw).reshape(-1)

    nystrom = nystrom_approximation(flat_K, dim, rank, rho, key, dtype=dtype)
    return block_part._replace(nystrom=nystrom)


build_block_preconditioner_jit = jax.jit(build_block_preconditioner, static_argnames=("rank",))


def apply_block_nystrom(pre: BlockNystromPreconditioner, r: Array) -> Array:
    """Return ``M^{-1} r = C^{-1/2} P_K^{-1} C^{-1/2} r`` (N,) for a flat r (N,) = (2 d P,)."""
    d = pre.eigenvectors.shape[0]
    shape = (2, d, r.size // (2 * d))
    w = _block_inv_sqrt(pre, r.reshape(shape)).reshape(-1)
    w = apply_nystrom(pre.nystrom, w)
    return _block_inv_sqrt(pre, w.reshape(shape)).reshape(-1)


Preconditioner = NystromPreconditioner | BlockNystromPreconditioner
PRECONDITIONERS = ("nystrom", "block_nystrom")


def _residual_balance(primal: Array, dual: Array, mu: Array, tau: Array) -> Array:
    """Return the factor (tau, 1 or 1/tau) by which residual balancing multiplies rho.

    Boyd et al. (2011, section 3.4.1): raise rho when the primal residual exceeds
    ``mu`` times the dual residual, lower it in the opposite case. ``tau <= 1``
    turns balancing off.
    """
    active = tau > 1
    up = active & (primal > mu * dual)
    down = active & (dual > mu * primal)
    one = jnp.ones_like(tau)
    return jnp.where(up, tau, jnp.where(down, one / jnp.maximum(tau, one), one))


def admm_step(
    problem: Problem,
    pre: Preconditioner | None,
    state: ADMMState,
    rho: Array,
    beta: Array,
    gamma: Array,
    pcg_tol: Array,
    pcg_iters: Array,
    abs_tol: Array | float = 0.0,
    rel_tol: Array | float = 0.0,
    balance_mu: Array | float = 10.0,
    balance_tau: Array | float = 1.0,
    key: Array | None = None,
    balance: bool = False,
) -> tuple[ADMMState, Preconditioner | None, Array, dict[str, Array]]:
    """Run one ADMM iteration; return the new state, the preconditioner and rho for the next one, and diagnostics.

    The stopping rule of Boyd et al. (2011, section 3.3.1) with ``A = [I; G]`` and
    ``B = -I`` is evaluated here: the iterate has converged when
    ``||r|| <= sqrt(N_r) abs_tol + rel_tol max(||(u, G u)||, ||(v, s)||)`` and
    ``||d|| <= sqrt(N_u) abs_tol + rel_tol rho ||lam + G^T nu||``. With
    ``balance`` (static) and ``balance_tau > 1``, rho is then rebalanced
    (``_residual_balance``). When it changes, the scaled duals are divided by the
    same factor. The Nystrom preconditioner depends on rho, so it is rebuilt from
    ``key`` inside a ``lax.cond`` and the step stays one compiled program. A
    ``BlockNystromPreconditioner`` only takes the new shift (its sketch does not depend on rho). Without
    ``balance`` that branch is not compiled at all, which keeps the first call cheaper.

    Diagnostics: ``pcg_iterations``, ``pcg_residual`` (relative), ``pcg_status``,
    ``primal_residual_uv`` = ||u - v||, ``primal_residual_gs`` = ||G u - s||,
    ``primal_residual`` = ||(u - v, G u - s)||, ``dual_residual`` =
    rho ||(v - v_old) + G^T (s - s_old)||, ``primal_tolerance``, ``dual_tolerance``,
    ``converged`` (both residuals within tolerance) and ``rho`` (the value used).
    """
    shape = state.u.shape
    X, D = problem.X, problem.D
    dtype = X.dtype

    def flat_system(x: Array) -> Array:
        u = x.reshape(shape)
        return (curvature_apply(problem, rho, u) + rho * u).reshape(-1)

    if pre is None:
        precond = None
    elif isinstance(pre, BlockNystromPreconditioner):

        def precond(r: Array) -> Array:
            return apply_block_nystrom(pre, r)
    else:

        def precond(r: Array) -> Array:
            return apply_nystrom(pre, r)

    rhs = problem.Fty + rho * (state.v - state.lam) + rho * cvxnn.G_transpose_apply(X, D, state.s - state.nu)
    solve = pcg(flat_system, rhs.reshape(-1), state.u.reshape(-1), precond, pcg_tol, pcg_iters)
    u = solve.x.reshape(shape)

    v = group_soft_threshold(u + state.lam, beta / rho)
    Gu = cvxnn.G_apply(X, D, u)
    s = jnp.maximum(Gu + state.nu, 0.0)
    lam = state.lam + gamma * (u - v)
    nu = state.nu + gamma * (Gu - s)

    # Residuals and the stopping rule.
    residual_uv = jnp.linalg.norm(u - v)
    residual_gs = jnp.linalg.norm(Gu - s)
    primal = jnp.sqrt(residual_uv**2 + residual_gs**2)
    dual = rho * jnp.linalg.norm((v - state.v) + cvxnn.G_transpose_apply(X, D, s - state.s))
    primal_scale = jnp.maximum(jnp.sqrt(jnp.sum(u * u) + jnp.sum(Gu * Gu)), jnp.sqrt(jnp.sum(v * v) + jnp.sum(s * s)))
    dual_scale = rho * jnp.linalg.norm(lam + cvxnn.G_transpose_apply(X, D, nu))
    abs_tol = jnp.asarray(abs_tol, dtype)
    rel_tol = jnp.asarray(rel_tol, dtype)
    primal_tolerance = math.sqrt(u.size + s.size) * abs_tol + rel_tol * primal_scale
    dual_tolerance = math.sqrt(u.size) * abs_tol + rel_tol * dual_scale
    converged = (primal <= primal_tolerance) & (dual <= dual_tolerance) & ((abs_tol > 0) | (rel_tol > 0))

    # Residual balancing of rho, with the scaled duals and the preconditioner updated to match.
    if not balance:
        info = _step_info(solve, rhs, residual_uv, residual_gs, primal, dual, primal_tolerance, dual_tolerance,
                          converged, rho)
        return ADMMState(u=u, v=v, s=s, lam=lam, nu=nu), pre, rho, info
    factor = _residual_balance(primal, dual, jnp.asarray(balance_mu, dtype), jnp.asarray(balance_tau, dtype))
    factor = jnp.where(converged, 1.0, factor).astype(dtype)
    rho_next = rho * factor
    lam = lam / factor
    nu = nu / factor
    if isinstance(pre, BlockNystromPreconditioner):
        pre = pre._replace(nystrom=pre.nystrom._replace(mu=rho_next))
    elif pre is not None:
        rank = pre.U.shape[1]
        sketch_key = jax.random.PRNGKey(0) if key is None else key

        def rebuild() -> NystromPreconditioner:
            return build_preconditioner(problem, rho_next, rank, sketch_key)

        def keep() -> NystromPreconditioner:
            return pre

        pre = jax.lax.cond(factor != 1, rebuild, keep)

    info = _step_info(solve, rhs, residual_uv, residual_gs, primal, dual, primal_tolerance, dual_tolerance,
                      converged, rho)
    return ADMMState(u=u, v=v, s=s, lam=lam, nu=nu), pre, rho_next, info


def _step_info(
    solve: PCGResult, rhs: Array, residual_uv: Array, residual_gs: Array, primal: Array, dual: Array,
    primal_tolerance: Array, dual_tolerance: Array, converged: Array, rho: Array,
) -> dict[str, Array]:
    """Collect the diagnostics of one ADMM iteration (see ``admm_step``)."""
    rhs_norm = jnp.linalg.norm(rhs)
    return {
        "pcg_iterations": solve.iterations,
        "pcg_residual": solve.residual_norm / jnp.where(rhs_norm > 0, rhs_norm, 1.0),
        "pcg_status": solve.status,
        "primal_residual_uv": residual_uv,
        "primal_residual_gs": residual_gs,
        "primal_residual": primal,
        "dual_residual": dual,
        "primal_tolerance": primal_tolerance,
        "dual_tolerance": dual_tolerance,
        "converged": converged,
        "rho": rho,
    }


admm_step_jit = jax.jit(admm_step, static_argnames=("balance",))


# ----------------------------------------------------------------------------------------------
# Driver


@dataclass
class CronosSettings:
    """Solver settings of a CRONOS run.

    Attributes:
      beta: group-lasso strength (> 0).
      rho: ADMM penalty (> 0); also the shift of the u-system.
      step_ratio: dual step gamma_a, in (0, 2).
      admm_iters: number of ADMM iterations (>= 1).
      pcg_iters: PCG iteration cap per ADMM iteration (>= 1).
      pcg_tol: PCG relative residual tolerance (> 0).
      nystrom_rank: rank of the Nystrom preconditioner; 0 runs plain CG (with either preconditioner).
      preconditioner: ``"nystrom"`` (sketch of the whole u-system, ``NystromPreconditioner``)
        or ``"block_nystrom"`` (exact inverse of the block-diagonal part plus a sketch of
        the rest, ``BlockNystromPreconditioner``).
      seed: seed of the Nystrom test matrix.
      abs_tol, rel_tol: stopping rule on the primal and dual residuals (``admm_step``);
        both 0 runs all ``admm_iters`` iterations.
      patience: stop once the validation accuracy (text, then pairwise) has not
        improved for this many iterations; 0 turns it off. Needs a validation split.
      balance_tau: residual balancing multiplies or divides rho by this factor (> 1)
        when one residual exceeds ``balance_mu`` times the other; 1 keeps rho fixed.
      balance_mu: the imbalance (> 1) that triggers a change of rho.
    """

    beta: float = 1e-3
    rho: float = 1e-4
    step_ratio: float = 1.0
    admm_iters: int = 6
    pcg_iters: int = 32
    pcg_tol: float = 1e-6
    nystrom_rank: int = 20
    preconditioner: str = "nystrom"
    seed: int = 0
    abs_tol: float = 0.0
    rel_tol: float = 0.0
    patience: int = 0
    balance_tau: float = 1.0
    balance_mu: float = 10.0

    def validate(self, system_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first invalid setting and its valid range."""
        checks = [
            ("beta", self.beta > 0 and math.isfinite(self.beta), "a finite number > 0"),
            ("rho", self.rho > 0 and math.isfinite(self.rho), "a finite number > 0"),
            ("step_ratio", 0 < self.step_ratio < 2, "in (0, 2)"),
            ("admm_iters", int(self.admm_iters) == self.admm_iters and self.admm_iters >= 1, "an integer >= 1"),
            ("pcg_iters", int(self.pcg_iters) == self.pcg_iters and self.pcg_iters >= 1, "an integer >= 1"),
            ("pcg_tol", 0 < self.pcg_tol < 1, "in (0, 1)"),
            ("nystrom_rank", int(self.nystrom_rank) == self.nystrom_rank and self.nystrom_rank >= 0, "an integer >= 0"),
            ("preconditioner", self.preconditioner in PRECONDITIONERS, f"one of {', '.join(PRECONDITIONERS)}"),
            ("abs_tol", 0 <= self.abs_tol < 1, "in [0, 1)"),
            ("rel_tol", 0 <= self.rel_tol < 1, "in [0, 1)"),
            ("patience", int(self.patience) == self.patience and self.patience >= 0, "an integer >= 0 (0 = off)"),
            ("balance_tau", 1 <= self.balance_tau < math.inf, "a finite number >= 1 (1 = fixed rho)"),
            ("balance_mu", 1 < self.balance_mu < math.inf, "a finite number > 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; it must be {expected}.")
        if system_size is not None and self.nystrom_rank > system_size:
            raise ValueError(
                f"nystrom_rank={self.nystrom_rank} exceeds the u-system size 2*d*P={system_size}; pass a smaller --nystrom_rank."
            )


@dataclass
class EvalSplit:
    """Features and labels on which iterates are scored.

    Attributes:
      X: (m, d) standardized features.
      y: (m,) labels in {-1, +1}.
      pairs: (k, 2) row indices (chosen, rejected) of aligned pairs, or ``None`` for unpaired data.
    """

    X: np.ndarray
    y: np.ndarray
    pairs: np.ndarray | None = None


@dataclass
class CronosResult:
    """Outcome of ``run_cronos``.

    Attributes:
      v_last: (2, d, P) last v iterate.
      v_average: (2, d, P) ergodic average of v over all iterations.
      v_kept: (2, d, P) the iterate chosen on the validation split.
      kept: ``{"iterate": "last" | "average", "iteration": k, ...}`` with the selection score.
      history: one dict of diagnostics per iteration.
      seconds: wall time of the whole run, including compilation.
      compile_seconds: wall time of the first ADMM step (compilation included).
      status: why the run stopped: ``"converged"`` (residual stopping rule),
        ``"validation_patience"`` or ``"max_iterations"``.
      iterations: ADMM iterations run.
    """

    v_last: np.ndarray
    v_average: np.ndarray
    v_kept: np.ndarray
    kept: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    compile_seconds: float
    settings: CronosSettings = field(default_factory=CronosSettings)
    status: str = "max_iterations"
    iterations: int = 0


def accuracies(scores: np.ndarray, split: EvalSplit) -> tuple[float, float | None]:
    """Return (text accuracy ``mean(sign(score) == y)``, pairwise accuracy ``mean(r_chosen > r_rejected)``).

    A score of exactly zero counts as a wrong prediction. Pairwise accuracy is ``None`` without pairs.
    """
    scores = np.asarray(scores)
    text = float(np.mean(np.sign(scores) == split.y)) if split.y.size else float("nan")
    if split.pairs is None or len(split.pairs) == 0:
        return text, None
    pairwise = float(np.mean(scores[split.pairs[:, 0]] > scores[split.pairs[:, 1]]))
    return text, pairwise


@jax.jit
def _scores(X: Array, v: Array, v_average: Array) -> Array:
    """Return the network outputs (2, m) of the last and the averaged iterate on X (m, d)."""
    return jnp.stack([cvxnn.network_output(X, v), cvxnn.network_output(X, v_average)])


@jax.jit
def _track(
    problem: Problem, v_sum: Array, state: ADMMState, rho: Array, k: Array, beta: Array
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """Add v to the running sum and score the last and the averaged iterate.

    Returns the new sum, the average, objectives (2,) and constraint violations (2,) of
    (last, average), the ``dual_bound`` of the last iterate, and its constraint
    violation relative to ``||G v||``.
    """
    v = state.v
    v_sum = v_sum + v
    v_average = v_sum / k
    objectives = jnp.stack([cvxnn.objective(problem.X, problem.D, problem.y, w, beta) for w in (v, v_average)])
    violations = jnp.stack([cvxnn.constraint_violation(problem.X, problem.D, w) for w in (v, v_average)])
    Gv_norm = jnp.linalg.norm(cvxnn.G_apply(problem.X, problem.D, v))
    relative_violation = jnp.where(Gv_norm > 0, violations[0] / jnp.maximum(Gv_norm, jnp.finfo(v.dtype).tiny), 0.0)
    return v_sum, v_average, objectives, violations, dual_bound(problem, v, state.nu, rho, beta), relative_violation


def _validation_score(record: dict[str, Any], suffix: str) -> tuple[float, float]:
    """Validation text accuracy, then pairwise accuracy, of one iterate (what patience watches)."""
    pairwise = record[f"validation_pairwise_accuracy{suffix}"]
    return (record[f"validation_accuracy{suffix}"], -1.0 if pairwise is None else pairwise)


def _selection_key(record: dict[str, Any], suffix: str) -> tuple[float, float, float]:
    """Rank an iterate: validation text accuracy, then validation pairwise accuracy, then lower objective."""
    pairwise = record[f"validation_pairwise_accuracy{suffix}"]
    return (record[f"validation_accuracy{suffix}"], -1.0 if pairwise is None else pairwise, -record[f"objective{suffix}"])


def run_cronos(
    problem: Problem,
    settings: CronosSettings,
    train: EvalSplit | None = None,
    validation: EvalSplit | None = None,
    progress: bool = True,
) -> CronosResult:
    """Run CRONOS on ``problem``, recording diagnostics per iteration and keeping the best iterate.

    Every iteration records the objective and constraint violation of the last v
    and of the ergodic average, a lower bound on the optimum (``dual_bound``), the
    relative duality gap of the last v (``duality_gap``, a bound on its relative
    objective gap only when v is feasible) and its relative constraint violation
    (``constraint_violation_relative``), the residuals and their tolerances, rho, the PCG
    iteration count, and the accuracies of both iterates on ``train`` and
    ``validation``. The kept iterate maximizes validation text accuracy, then
    validation pairwise accuracy, then lower objective; without a validation split
    the last iterate is kept.

    The run stops after ``admm_iters`` iterations, when the residual stopping rule
    is met (``abs_tol``/``rel_tol``), or when validation accuracy has not improved for
    ``patience`` iterations. ``CronosResult.status`` records which.

    NOTE: The O(1/K) rate of ADMM holds for the ergodic average; the last iterate
    usually converges faster in practice, so both are scored.
    """
    dtype = problem.X.dtype
    shape = problem.Fty.shape
    settings.validate(system_size=int(np.prod(shape)))
    rho = jnp.asarray(settings.rho, dtype)
    beta = jnp.asarray(settings.beta, dtype)
    gamma = jnp.asarray(settings.step_ratio, dtype)
    pcg_tol = jnp.asarray(settings.pcg_tol, dtype)
    pcg_iters = jnp.asarray(settings.pcg_iters, jnp.int32)
    abs_tol = jnp.asarray(settings.abs_tol, dtype)
    rel_tol = jnp.asarray(settings.rel_tol, dtype)
    balance_mu = jnp.asarray(settings.balance_mu, dtype)
    balance_tau = jnp.asarray(settings.balance_tau, dtype)
    sketch_key = jax.random.PRNGKey(settings.seed)

    start = time.perf_counter()
    pre = None
    if settings.nystrom_rank > 0:
        build = build_block_preconditioner_jit if settings.preconditioner == "block_nystrom" else build_preconditioner_jit
        pre = build(problem, rho, settings.nystrom_rank, sketch_key)
        pre = jax.block_until_ready(pre)
    state = initial_state(problem)
    v_sum = jnp.zeros(shape, dtype)
    history: list[dict[str, Any]] = []
    best_key: tuple | None = None
    best_score: tuple | None = None
    since_improvement = 0
    status = "max_iterations"
    kept: dict[str, Any] = {"iterate": "last", "iteration": 0}
    v_kept = np.zeros(shape)
    compile_seconds = 0.0
    eval_splits = {
        name: (jnp.asarray(split.X, dtype), split)
        for name, split in (("train", train), ("validation", validation))
        if split is not None
    }

    iterations = tqdm(range(1, settings.admm_iters + 1), desc="CRONOS ADMM", disable=not progress, leave=False)
    for k in iterations:
        step_start = time.perf_counter()
        state, pre, rho_next, info = admm_step_jit(
            problem, pre, state, rho, beta, gamma, pcg_tol, pcg_iters, abs_tol, rel_tol, balance_mu, balance_tau,
            sketch_key, balance=settings.balance_tau > 1,
        )
        # Balancing rescales nu by rho / rho_next, so rho_next * nu is the unscaled multiplier either way.
        v_sum, v_average, objectives, violations, lower_bound, relative_violation = _track(
            problem, v_sum, state, rho_next, jnp.asarray(k, dtype), beta
        )
        rho = rho_next
        objective_last, objective_average = np.asarray(objectives).tolist()
        violation_last, violation_average = np.asarray(violations).tolist()
        record = {key: value.item() for key, value in jax.device_get(info).items()}
        if k == 1:
            compile_seconds = time.perf_counter() - step_start
        record.update(
            iteration=k,
            objective=float(objective_last),
            objective_average=float(objective_average),
            constraint_violation=float(violation_last),
            constraint_violation_average=float(violation_average),
            constraint_violation_relative=float(relative_violation),
            dual_bound=float(lower_bound),
            duality_gap=float((objective_last - float(lower_bound)) / max(abs(objective_last), 1e-30)),
            pcg_status=PCG_STATUS_NAMES[int(record["pcg_status"])],
            pcg_iterations=int(record["pcg_iterations"]),
            converged=bool(record["converged"]),
        )
        if not all(math.isfinite(record[name]) for name in ("objective", "primal_residual_uv", "dual_residual")):
            raise FloatingPointError(
                f"CRONOS diverged at iteration {k} (objective {record['objective']}); "
                "try a larger --rho, a smaller --step_ratio, or --x64."
            )
        candidates = {"last": state.v, "average": v_average}
        for split_name, (X_device, split) in eval_splits.items():
            scores = np.asarray(_scores(X_device, state.v, v_average))
            for row, suffix in ((0, ""), (1, "_average")):
                text, pairwise = accuracies(scores[row], split)
                record[f"{split_name}_accuracy{suffix}"] = text
                record[f"{split_name}_pairwise_accuracy{suffix}"] = pairwise
        record["seconds"] = time.perf_counter() - start
        history.append(record)

        if validation is not None:
            improved = False
            for iterate_name, v in candidates.items():
                suffix = "" if iterate_name == "last" else "_average"
                score = _validation_score(record, suffix)
                if best_score is None or score > best_score:
                    best_score = score
                    improved = True
                key = _selection_key(record, suffix)
                if best_key is None or key >= best_key:
                    best_key = key
                    kept = {
                        "iterate": iterate_name,
                        "iteration": k,
                        "objective": record[f"objective{suffix}"],
                        "validation_accuracy": record[f"validation_accuracy{suffix}"],
                        "validation_pairwise_accuracy": record[f"validation_pairwise_accuracy{suffix}"],
                    }
                    v_kept = np.asarray(v)
            since_improvement = 0 if improved else since_improvement + 1
        iterations.set_postfix(objective=f"{record['objective']:.4g}", pcg=record["pcg_iterations"])
        if record["converged"]:
            status = "converged"
            break
        if validation is not None and settings.patience > 0 and since_improvement >= settings.patience:
            status = "validation_patience"
            break

    seconds = time.perf_counter() - start
    iterations_run = len(history)
    if validation is None:
        kept = {"iterate": "last", "iteration": iterations_run, "objective": history[-1]["objective"]}
        v_kept = np.asarray(state.v)
    logger.info(
        "CRONOS ran %d iterations (%s) in %.2fs (first step with compilation %.2fs); kept the %s iterate of iteration %d.",
        iterations_run, status, seconds, compile_seconds, kept["iterate"], kept["iteration"],
    )
    return CronosResult(
        v_last=np.asarray(state.v),
        v_average=np.asarray(v_sum / iterations_run),
        v_kept=v_kept,
        kept=kept,
        history=history,
        seconds=seconds,
        compile_seconds=compile_seconds,
        settings=settings,
        status=status,
        iterations=iterations_run,
    )
