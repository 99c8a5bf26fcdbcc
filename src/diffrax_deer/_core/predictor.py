r"""The initial guess for Newton: nested iteration down to a short sequential solve.

The fine grid's Newton starts from the solution of the same window on a grid
`coarsening` times coarser, itself solved by DEER from a grid coarser again, down to
a base grid of about 64 intervals solved by a short sequential method. Every level's
solution is interpolated (cubic Hermite) onto the next. The only sequential loop
has the base grid's length, whatever `N`; each level adds one Newton solve of
$O(\log M)$ depth, and all levels together cost about $1 / (r - 1)$ of a fine
Newton iteration each.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Inexact, PyTree, Real

from .discretisation import (
    AbstractDiscretisation,
    JacobianMode,
    VectorField,
    evaluate_nodes,
)
from .linear_solve import batched_inverse
from .newton import NewtonStats, newton_solve


# The base grid: measured (trapezoid, N = 1e4), a 64-step RK4 guess lets Newton
# converge on Lotka-Volterra, Van der Pol, FitzHugh-Nagumo and Lorenz over several
# periods, where the constant guess diverges; 16 steps make RK4 itself blow up.
BASE_STEPS = 64
# Each level is this many times finer than the one below it. Measured on the
# cold-start problems (trapezoid, tolerance 1e-10): the total work was lowest for
# 4-8 at N = 1e4 and for 8-16 at N = 1e5; fewer levels compile faster.
COARSENING = 8
# ROS2's gamma (Verwer, Spee, Blom, Hundsdorfer 1999): L-stable, and second order
# for any matrix in place of the Jacobian.
_ROS2_GAMMA = 1 + 1 / math.sqrt(2)
# The loosest Newton tolerance of a coarse level.
_MAX_COARSE_TOLERANCE = 1e-4


def default_predictor_steps(num_steps: int) -> int:
    """Sequential steps of the predictor's base solve: 64 (at most `num_steps`),
    whatever the grid size; finer grids add DEER levels instead."""
    return min(num_steps, BASE_STEPS)


def level_sizes(
    num_steps: int, base_steps: int, coarsening: int | None
) -> tuple[int, ...]:
    r"""The number of intervals of each DEER level below the fine grid, coarsest
    first: $\lceil N / r \rceil$, $\lceil N / r^2 \rceil$, ... while larger than
    the base grid's `base_steps`. Empty without `coarsening` (the base solve is
    interpolated onto the fine grid directly) or when $N \le r \cdot$ `base_steps`.
    """
    if coarsening is None:
        return ()
    sizes = []
    size = num_steps
    while -(-size // coarsening) > base_steps:
        size = -(-size // coarsening)
        sizes.append(size)
    return tuple(reversed(sizes))


def subgrid_indices(num_steps: int, num_coarse: int) -> np.ndarray:
    """The fine nodes that form a grid of `num_coarse` intervals: evenly spaced in
    index, so a coarse grid follows the fine grid's spacing where it varies."""
    return np.round(np.linspace(0, num_steps, num_coarse + 1)).astype(np.int64)


class PredictorLevel(eqx.Module):
    """One level of the predictor: a coarse grid and the solution on it.

    **Arguments:**

    - `num_intervals`: the level's number of intervals $M$.
    - `num_fine_intervals`: the fine grid's $N$; the level's nodes are the fine
        nodes `indices = subgrid_indices(N, M)`.
    - `ts`: the level's nodes, `ts = fine_ts[indices]`.
    - `ys`: the solution at them, shape `(M + 1, n)`.
    - `fs`: the vector field at them (for Hermite interpolation).
    - `stats`: the level's Newton statistics (`None` for the sequential base).
    - `used`: whether `ys` is the level's own solution: false where it was not
        finite and the level passes on its guess.
    """

    num_intervals: int = eqx.field(static=True)
    num_fine_intervals: int = eqx.field(static=True)
    ts: Real[Array, " coarse_nodes"]
    ys: Inexact[Array, "coarse_nodes n"]
    fs: Inexact[Array, "coarse_nodes n"]
    stats: NewtonStats | None
    used: Bool[Array, ""]

    @property
    def indices(self) -> np.ndarray:
        """Which fine nodes the level's nodes are."""
        return subgrid_indices(self.num_fine_intervals, self.num_intervals)

    @property
    def converged(self) -> Bool[Array, ""]:
        """Whether the level holds a converged DEER solution of its own."""
        if self.stats is None:
            return jnp.array(False)
        return self.used & self.stats.converged

    def interpolate(self, indices: np.ndarray, ts: Real[Array, " m"]):
        """The level's solution (cubic Hermite) at the fine nodes `indices`."""
        return interpolate_between_grids(
            self.indices, self.ts, self.ys, self.fs, indices, ts
        )


class Prediction(eqx.Module):
    """The predictor's result: the guess on the fine grid, and every level below it.

    **Arguments:**

    - `guess`: the guess at every fine node, shape `(N + 1, n)`.
    - `levels`: the base solve, then each DEER level from the coarsest up (kept
        for error estimates that compare grids).
    """

    guess: Inexact[Array, "nodes n"]
    levels: tuple[PredictorLevel, ...]


def _rk4_step(vector_field, t, y, args, dt):
    k1 = vector_field(t, y, args)
    k2 = vector_field(t + dt / 2, y + dt / 2 * k1, args)
    k3 = vector_field(t + dt / 2, y + dt / 2 * k2, args)
    k4 = vector_field(t + dt, y + dt * k3, args)
    return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _ros2_step(vector_field, t, y, args, dt, jacobian: JacobianMode):
    # ROS2 (Verwer et al. 1999), with W = I - g h J:
    # W k1 = f(t, y) + g h f_t;  W k2 = f(t + h, y + h k1) - 2 k1 - g h f_t;
    # y+ = y + h (3 k1 + k2) / 2. With jacobian="diagonal", J's diagonal.
    def field(_t, _y):
        return vector_field(_t, _y, args)

    value, linear = jax.linearize(field, t, y)
    basis = jnp.eye(y.shape[0], dtype=y.dtype)
    columns = jax.vmap(lambda v: linear(jnp.zeros_like(t), v), out_axes=1)(basis)
    if jacobian == "diagonal":
        columns = jnp.diag(jnp.diagonal(columns))
    time_derivative = linear(jnp.ones_like(t), jnp.zeros_like(y))
    scale = jnp.asarray(_ROS2_GAMMA, y.dtype) * dt
    inverse = batched_inverse((basis - scale * columns)[None])[0]
    k1 = inverse @ (value + scale * time_derivative)
    k2_rhs = field(t + dt, y + dt * k1) - 2 * k1 - scale * time_derivative
    k2 = inverse @ k2_rhs
    return y + dt / 2 * (3 * k1 + k2)


def sequential_solve(
    vector_field: VectorField,
    ts: Real[Array, " coarse_nodes"],
    y0: Inexact[Array, " n"],
    args: PyTree,
    stiff: bool,
    jacobian: JacobianMode = "full",
) -> Inexact[Array, "coarse_nodes n"]:
    r"""One sequential pass over the nodes `ts`: classical RK4, or with `stiff`,
    the L-stable linearly implicit ROS2 (one Jacobian and one $n \times n$ inverse
    per step, no iteration, so it cannot fail to converge)."""

    def step(y, interval):
        t, dt = interval
        if stiff:
            y_next = _ros2_step(vector_field, t, y, args, dt, jacobian)
        else:
            y_next = _rk4_step(vector_field, t, y, args, dt)
        return y_next, y_next

    _, rest = jax.lax.scan(step, y0, (ts[:-1], ts[1:] - ts[:-1]))
    return jnp.concatenate([y0[None], rest])


def _all_finite(ys: Array) -> Bool[Array, ""]:
    return jnp.all(jnp.isfinite(ys))


def base_solve(
    vector_field: VectorField,
    ts: Real[Array, " coarse_nodes"],
    y0: Inexact[Array, " n"],
    args: PyTree,
    stiff: bool,
    jacobian: JacobianMode = "full",
) -> tuple[Inexact[Array, "coarse_nodes n"], Bool[Array, ""]]:
    """The base grid's sequential solve and whether it is finite.

    RK4 for non-stiff methods; where RK4 is not finite (its step outside its
    stability region) the L-stable ROS2 is run instead, and for `stiff` methods
    ROS2 directly. Where neither is finite the result is the constant $y_0$.
    """
    if stiff:
        ys = sequential_solve(vector_field, ts, y0, args, True, jacobian)
    else:
        ys = sequential_solve(vector_field, ts, y0, args, False, jacobian)
        ys = jax.lax.cond(
            _all_finite(ys),
            lambda: ys,
            lambda: sequential_solve(vector_field, ts, y0, args, True, jacobian),
        )
    finite = _all_finite(ys)
    return jnp.where(finite, ys, jnp.broadcast_to(y0, ys.shape)), finite


def containing_intervals(
    coarse_indices: np.ndarray, fine_indices: np.ndarray
) -> np.ndarray:
    """For each fine node (by its index), the coarse interval that holds it, both
    grids being fine nodes given by their indices (a node on a coarse node starts
    that interval; the last node ends the last one)."""
    intervals = np.searchsorted(coarse_indices, fine_indices, side="right") - 1
    return np.clip(intervals, 0, coarse_indices.shape[0] - 2)


def interpolate_between_grids(
    coarse_indices: np.ndarray,
    coarse_ts: Real[Array, " coarse_nodes"],
    coarse_ys: Inexact[Array, "coarse_nodes n"],
    coarse_fs: Inexact[Array, "coarse_nodes n"],
    fine_indices: np.ndarray,
    fine_ts: Real[Array, " fine_nodes"],
) -> Inexact[Array, "fine_nodes n"]:
    r"""Cubic Hermite interpolation from one subgrid of the fine grid to another.

    Both grids are fine nodes (given by their `indices`), so which coarse interval
    holds each target node is known before tracing; on interval
    $[T_k, T_{k+1}]$ of length $H_k$ with $s = (t - T_k) / H_k$ the interpolant is
    $h_{00} Y_k + h_{10} H_k F_k + h_{01} Y_{k+1} + h_{11} H_k F_{k+1}$. Any
    increasing grid works.
    """
    intervals = containing_intervals(coarse_indices, fine_indices)
    start, end = coarse_ts[intervals], coarse_ts[intervals + 1]
    length = end - start
    safe_length = jnp.where(length == 0, 1, length)
    s = ((fine_ts - start) / safe_length).astype(coarse_ys.dtype)[:, None]
    length = length.astype(coarse_ys.dtype)[:, None]
    s2 = s * s
    s3 = s2 * s
    return (
        (2 * s3 - 3 * s2 + 1) * coarse_ys[intervals]
        + (s3 - 2 * s2 + s) * length * coarse_fs[intervals]
        + (3 * s2 - 2 * s3) * coarse_ys[intervals + 1]
        + (s3 - s2) * length * coarse_fs[intervals + 1]
    )


def _coarse_tolerance(tolerance, coarseness: float, order: int, dtype):
    # A coarse level is only a guess: its Newton need only get well inside its own
    # discretisation error, about (N / M)^p times the fine grid's, to which the
    # fine tolerance is meant to be tied. Capped so that a high order does not
    # make the tolerance meaningless. Python floats stay Python floats (Newton may
    # hold them as static fields); traced tolerances stay traced.
    if tolerance is None:
        return None
    factor = coarseness**order
    if isinstance(tolerance, (int, float)):
        return min(tolerance * factor, max(_MAX_COARSE_TOLERANCE, tolerance))
    tolerance = jnp.asarray(tolerance, dtype)
    cap = jnp.maximum(jnp.asarray(_MAX_COARSE_TOLERANCE, dtype), tolerance)
    return jnp.minimum(tolerance * jnp.asarray(factor, dtype), cap)


def extrapolated_values(
    level: PredictorLevel, lower: PredictorLevel, order: int, target_intervals: int
) -> Inexact[Array, "coarse_nodes n"]:
    r"""The level's solution with its leading error term traded for the target
    grid's (Richardson), where it and the `lower` level are converged DEER levels
    of the same method of order $p$.

    With errors $C H^p$ on a grid of spacing $H$: $C H^p \approx (y_H - y_{\rho H})
    / (\rho^p - 1)$ against the level $\rho$ times coarser, so the target grid's
    solution (spacing $H / q$) is about $y_H + (y_H - y_{\rho H})(1 - q^{-p}) /
    (\rho^p - 1)$, one order more accurate than $y_H$ itself: the finer Newton
    starts at about its own grid's accuracy. Elsewhere, `level.ys`.
    """
    below = level.num_intervals / lower.num_intervals
    above = target_intervals / level.num_intervals
    factor = (1 - above**-order) / (below**order - 1)
    difference = level.ys - lower.interpolate(level.indices, level.ts)
    corrected = level.ys + jnp.asarray(factor, level.ys.dtype) * difference
    usable = level.converged & lower.converged & _all_finite(corrected)
    return jnp.where(usable, corrected, level.ys)


def _guess_from(levels, vector_field, args, order, size, ts, y0):
    # The top level interpolated onto a grid of `size` intervals, extrapolated first
    # where the two top levels are DEER levels.
    level = levels[-1]
    if len(levels) >= 3:
        values = extrapolated_values(level, levels[-2], order, size)
        fs = evaluate_nodes(vector_field, level.ts, values, args)
        level = eqx.tree_at(lambda x: (x.ys, x.fs), level, (values, fs))
    indices = subgrid_indices(level.num_fine_intervals, size)
    return level.interpolate(indices, ts).at[0].set(y0)


def _solve_level(
    vector_field, discretisation, ts, guess, args, newton_options, size, num_steps
) -> PredictorLevel:
    rtol, atol, options = newton_options
    coarseness = num_steps / size
    order = discretisation.order()
    stages = discretisation.init_stages(vector_field, ts, guess, args)
    solution, _, stats = newton_solve(
        vector_field,
        discretisation,
        ts,
        guess,
        stages,
        args,
        rtol=_coarse_tolerance(rtol, coarseness, order, guess.dtype),
        atol=_coarse_tolerance(atol, coarseness, order, guess.dtype),
        **options,
    )
    finite = _all_finite(solution)
    ys = jnp.where(finite, solution, guess)
    fs = evaluate_nodes(vector_field, ts, ys, args)
    return PredictorLevel(size, num_steps, ts, ys, fs, stats, finite)


def predict_trajectory(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Real[Array, " nodes"],
    y0: Inexact[Array, " n"],
    args: PyTree,
    *,
    base_steps: int,
    coarsening: int | None,
    rtol: Real[Array, ""] | float,
    atol: Real[Array, ""] | float | None,
    max_iters: int,
    jacobian: JacobianMode = "full",
) -> Prediction:
    r"""A guess for every node of `ts` by nested iteration.

    Level sizes $M_1 < M_2 < \cdots < N$ grow by `coarsening` ($M_{k+1} \approx
    r M_k$); each level's grid is the fine nodes evenly spaced in index. The base
    grid of `base_steps` intervals is solved sequentially (RK4, or the L-stable
    ROS2 for stiff methods and where RK4 is not finite), then each level by DEER
    Newton with the same method, starting from the level
    below interpolated by cubic Hermite. A level's Newton stops at tolerances
    loosened by $r^p$ (the coarse grid's error is about $r^p$ times the finer
    one's), at most `1e-4`. A level whose solution is not finite passes its guess
    on. Nothing here grows sequentially with $N$: one loop of `base_steps` trips,
    and per level one Newton solve, $O(\log M_k)$ deep per iteration.

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays.
    - `discretisation`: the fine grid's method.
    - `ts`: the fine grid, `N + 1` increasing nodes (not necessarily uniform).
    - `y0`: the initial value.
    - `args`: passed to `vector_field`.
    - `base_steps`: intervals of the sequential base grid (at most `N`).
    - `coarsening`: the ratio $r \ge 2$ between levels; `None` interpolates the base
        solve onto the fine grid directly (the RK4 predictor of earlier versions).
    - `rtol`, `atol`, `max_iters`, `jacobian`: the fine Newton solve's, from
        which the levels' are derived (they run plain Newton, without damping).
    """
    num_steps = ts.shape[0] - 1
    base_steps = min(base_steps, num_steps)
    order = discretisation.order()
    indices = subgrid_indices(num_steps, base_steps)
    base_ts = ts[indices]
    base_ys, finite = base_solve(
        vector_field, base_ts, y0, args, discretisation.stiff_predictor, jacobian
    )
    base_fs = evaluate_nodes(vector_field, base_ts, base_ys, args)
    levels = [
        PredictorLevel(base_steps, num_steps, base_ts, base_ys, base_fs, None, finite)
    ]
    newton_options = (
        rtol,
        atol,
        # Coarse levels run plain Newton: a level that fails passes on its guess,
        # and the rescue's loop would add its compile time once per level.
        dict(max_iters=max_iters, jacobian=jacobian),
    )
    for size in level_sizes(num_steps, base_steps, coarsening):
        level_ts = ts[subgrid_indices(num_steps, size)]
        guess = _guess_from(levels, vector_field, args, order, size, level_ts, y0)
        levels.append(
            _solve_level(
                vector_field,
                discretisation,
                level_ts,
                guess,
                args,
                newton_options,
                size,
                num_steps,
            )
        )
    guess = _guess_from(levels, vector_field, args, order, num_steps, ts, y0)
    # Where the field is non-finite along the way (NaN near y0, a blow-up), the
    # constant guess keeps Newton's best iterate finite, so that a divergence
    # returns finite values, as the constant predictor always did.
    guess = jnp.where(_all_finite(guess), guess, constant_guess(ts, y0))
    return Prediction(guess=guess, levels=tuple(levels))


def constant_guess(
    ts: Inexact[Array, " nodes"], y0: Inexact[Array, " n"]
) -> Inexact[Array, "nodes n"]:
    """The guess $y_i = y_0$ at every node."""
    return jnp.broadcast_to(y0, (ts.shape[0], y0.shape[0]))
