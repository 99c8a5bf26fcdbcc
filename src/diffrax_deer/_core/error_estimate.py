"""A window's global error, estimated by Richardson extrapolation on a nested grid."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Inexact, PyTree, Real

from .discretisation import (
    AbstractDiscretisation,
    JacobianMode,
    VectorField,
    closure_convert_field,
)
from .newton import NewtonStats, newton_solve
from .predictor import containing_intervals


class ErrorEstimate(eqx.Module):
    r"""The estimated global error of a window's nodes, and how it was obtained.

    **Arguments:**

    - `node_errors`: the estimated error $e_i \approx y_i - y(t_i)$ at every node,
        shape `(N + 1, n)` (zero at the first node; between the nodes of the coarse
        grid, interpolated linearly).
    - `coarse_stats`: the [`diffrax_deer.NewtonStats`][] of the coarse solve.
    - `valid`: whether the estimate can be trusted: the coarse solve converged and
        every error is finite. Where it is false, `node_errors` is infinite.
    - `coarse_ts`, `coarse_ys`, `coarse_stages`: the coarse grid and its solution
        (the re-meshing reads its local errors from them).
    - `coarse_errors`: `node_errors` at the coarse nodes, shape `(M + 1, n)`.
    - `midpoints`: the midpoint of every fine interval, shape `(N,)`.
    - `dense_errors`: the estimated error of the dense output there, shape
        `(N, n)` (see [`diffrax_deer.estimate_error`][]); infinite where `valid`
        is false.
    """

    node_errors: Inexact[Array, "nodes n"]
    coarse_stats: NewtonStats
    valid: Bool[Array, ""]
    coarse_ts: Real[Array, " coarse"]
    coarse_ys: Inexact[Array, "coarse n"]
    coarse_stages: PyTree[Array] | None
    coarse_errors: Inexact[Array, "coarse n"]
    midpoints: Real[Array, " steps"]
    dense_errors: Inexact[Array, "steps n"]


def _stop_gradient(x):
    return jax.lax.stop_gradient(x) if eqx.is_array(x) else x


def coarse_indices(num_intervals: int) -> np.ndarray:
    """The fine nodes that form the coarse grid: every other one, and the last.

    With an odd number of intervals the last fine interval is kept as it is (it
    adds nothing to the difference, so its own error is missed).
    """
    indices = np.arange(0, num_intervals + 1, 2)
    if indices[-1] != num_intervals:
        indices = np.append(indices, num_intervals)
    return indices


def estimate_error(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Real[Array, " nodes"],
    ys: Inexact[Array, "nodes n"],
    stages: PyTree[Array] | None,
    args: PyTree,
    *,
    rtol: Real[Array, ""] | float,
    atol: Real[Array, ""] | float | None,
    max_iters: int,
    jacobian: JacobianMode = "full",
) -> ErrorEstimate:
    r"""Estimates the global error of a converged window by Richardson extrapolation.

    The same method solves the window again on the nested coarse grid
    $T_j = t_{2j}$ (every other node), by Newton from the fine solution. For a
    method of order $p$ the global errors of the two grids are
    $e^{h} \approx C h^p$ and $e^{2h} \approx C (2h)^p$ at the shared nodes, so

    $$e_{2j} \approx \frac{y^{h}_{2j} - y^{2h}_j}{2^p - 1},$$

    a global error estimate at every coarse node, which accounts for how the
    window's dynamics propagate errors (it compares two trajectories, not local
    errors). Newton starts next to the coarse answer (the two differ by the
    discretisation error), so the coarse solve takes one to three iterations on
    half the intervals. The grid need not be uniform: a smooth mesh and its
    every-other-node coarsening are a nested pair like a uniform one.

    Between the nodes the dense output has an error of its own, which can exceed
    the nodes' (of local order $s + 1$ for collocation on stiff intervals). It is
    estimated the same way, at the midpoint $m_i$ of every fine interval: the
    two grids' dense outputs differ by $D_i = u^{h}(m_i) - u^{2h}(m_i)$. With the
    global error $G$ (carried from the nodes, order $p$) and the interpolant's
    own error $L$ (order $q$), $D \approx (2^p - 1) G + (2^q - 1) L$, so

    $$e(m_i) \approx \bar e_i + \frac{D_i - (2^p - 1) \bar e_i}{2^q - 1},$$

    with $\bar e_i$ the node estimate interpolated to $m_i$ and $q = \min(p, q_i)$,
    $q_i$ the order of the interval's interpolant (`interval_dense_orders`), the
    same kind on both grids (`match_dense_info`), or $D$ would measure the cruder.

    Nothing here is differentiated (the inputs are wrapped in `stop_gradient`).

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays.
    - `discretisation`: the window's method, of order `discretisation.order()`.
    - `ts`: the `N + 1` fine nodes, $N \ge 2$.
    - `ys`: the converged fine solution, shape `(N + 1, n)`.
    - `stages`: its stage unknowns (or `None`): the coarse solve starts from
        them, restricted to the coarse grid (see
        [`diffrax_deer.AbstractDiscretisation.transfer_stages`][]).
    - `args`: passed to `vector_field`.
    - `rtol`, `atol`, `max_iters`, `jacobian`: the coarse Newton solve's.

    **Returns:**

    An [`diffrax_deer.ErrorEstimate`][].
    """
    num_intervals = ts.shape[0] - 1
    if num_intervals < 2:
        raise ValueError(
            "An error estimate needs at least 2 intervals per window (it compares "
            f"the grid with every other node of it); got {num_intervals}."
        )
    vector_field, args = closure_convert_field(vector_field, ts[0], ys[0], args)
    vector_field, ts, ys, stages, args = jtu.tree_map(
        _stop_gradient, (vector_field, ts, ys, stages, args)
    )
    indices = coarse_indices(num_intervals)
    coarse_ts = ts[indices]
    guess = ys[indices]
    coarse_stages = discretisation.transfer_stages(
        vector_field, ts, stages, coarse_ts, guess, args
    )
    coarse_ys, coarse_stages, stats = newton_solve(
        vector_field,
        discretisation,
        coarse_ts,
        guess,
        coarse_stages,
        args,
        rtol=rtol,
        atol=atol,
        max_iters=max_iters,
        jacobian=jacobian,
    )
    factor = 2.0 ** discretisation.order() - 1
    coarse_errors = (guess - coarse_ys) / jnp.asarray(factor, ys.dtype)
    node_errors = _interpolate_linearly(ts, coarse_ts, coarse_errors)
    midpoints, dense_errors = _dense_errors(
        vector_field,
        discretisation,
        (ts, ys, stages),
        (coarse_ts, coarse_ys, coarse_stages),
        indices,
        coarse_errors,
        factor,
        args,
    )
    valid = (
        stats.converged
        & jnp.all(jnp.isfinite(node_errors))
        & jnp.all(jnp.isfinite(dense_errors))
    )
    node_errors, coarse_errors, dense_errors = (
        jnp.where(valid, e, jnp.inf) for e in (node_errors, coarse_errors, dense_errors)
    )
    return ErrorEstimate(
        node_errors=node_errors,
        coarse_stats=stats,
        valid=valid,
        coarse_ts=coarse_ts,
        coarse_ys=coarse_ys,
        coarse_stages=coarse_stages,
        coarse_errors=coarse_errors,
        midpoints=midpoints,
        dense_errors=dense_errors,
    )


def _interpolate_linearly(ts, nodes, values):
    """Each column of `values` (given at `nodes`) at the times `ts`."""
    return jax.vmap(jnp.interp, in_axes=(None, None, 1), out_axes=1)(ts, nodes, values)


def _dense_errors(
    vector_field, discretisation, fine, coarse, indices, coarse_errors, factor, args
):
    """The dense output's estimated error at every fine interval's midpoint (see
    `estimate_error`), from the two grids, each given as `(ts, ys, stages)`, the
    fine nodes that form the coarse grid (`indices`), the coarse nodes' errors and
    the nodes' Richardson factor $2^p - 1$."""
    (ts, ys, _), (coarse_ts, coarse_ys, _) = fine, coarse
    midpoints = 0.5 * (ts[:-1] + ts[1:])
    # The coarse interval that holds each fine one (the one its first node opens).
    coarse_of_fine = containing_intervals(indices, np.arange(ts.shape[0] - 1))
    fine_info = discretisation.dense_info(vector_field, *fine, args)
    coarse_info = discretisation.match_dense_info(
        discretisation.dense_info(vector_field, *coarse, args),
        fine_info,
        coarse_of_fine,
    )

    def dense_output(grid_ts, grid_ys, info):
        return jax.vmap(
            lambda t: discretisation.interpolate(grid_ts, grid_ys, info, t)
        )(midpoints)

    dtype = coarse_errors.dtype
    orders = jnp.broadcast_to(
        discretisation.interval_dense_orders(coarse_info), coarse_ts.shape[0] - 1
    )[coarse_of_fine]
    orders = jnp.minimum(orders, discretisation.order()).astype(dtype)
    difference = dense_output(ts, ys, fine_info) - dense_output(
        coarse_ts, coarse_ys, coarse_info
    )
    carried = _interpolate_linearly(midpoints, coarse_ts, coarse_errors)
    own = difference - jnp.asarray(factor, dtype) * carried
    return midpoints, carried + own / (2.0**orders - 1)[:, None]


def local_errors(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    estimate: ErrorEstimate,
    args: PyTree,
    jacobian: JacobianMode = "full",
) -> Inexact[Array, "coarse_steps n"]:
    r"""The local error that each coarse interval adds to the estimated global error.

    The global error of the fine solution at the coarse nodes, $d_j$, obeys
    $d_{j+1} = \Phi_j d_j + \lambda_j$: what arrives from the previous node,
    carried by the dynamics ($\Phi_j$, the coarse transition of the Newton
    recurrence at the coarse solution, equal to the fine pair's to the method's
    order), plus what the two fine intervals make there. So
    $\lambda_j = d_{j+1} - \Phi_j d_j$: large where the mesh is too coarse for the
    dynamics, small where errors are only carried along (rotated, damped or grown
    by the flow), which the growth of $d$ alone would not tell apart. One
    linearisation at the coarse solution, no solve.

    **Arguments:**

    - `vector_field`, `discretisation`, `args`, `jacobian`: as for
        [`diffrax_deer.estimate_error`][].
    - `estimate`: its result.

    **Returns:**

    $\lambda_j$ for every coarse interval, shape `(M, n)`.
    """
    vector_field, estimate, args = jtu.tree_map(
        _stop_gradient, (vector_field, estimate, args)
    )
    _, linearisation = discretisation.linearise(
        vector_field,
        estimate.coarse_ts,
        estimate.coarse_ys,
        estimate.coarse_stages,
        args,
        jacobian,
    )
    transitions = linearisation.transitions
    errors = estimate.coarse_errors
    if transitions.ndim == errors.ndim:  # diagonal (quasi-DEER)
        carried = transitions * errors[:-1]
    else:
        carried = jnp.einsum("jnm,jm->jn", transitions, errors[:-1])
    return errors[1:] - carried
