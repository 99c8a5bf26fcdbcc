"""Newton's method on the residual of a whole trajectory, one parallel scan per step."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Inexact, Int, PyTree, Real

from ._discretisation import (
    AbstractDiscretisation,
    VectorField,
    evaluate_nodes_and_jacobians,
)
from ._scan import solve_affine_recurrence


class NewtonStats(eqx.Module):
    """What a DEER Newton solve reports about itself.

    **Arguments:**

    - `num_iters`: Newton iterations taken.
    - `update_norm`: the scaled size of the last update, $\\max_i \\mathrm{RMS}(
        \\delta_i / (\\text{atol} + \\text{rtol}|y_i|))$; converged when at most 1.
    - `residual_norm`: $\\max_i \\mathrm{RMS}(r_i)$ at the last linearisation point.
    - `converged`: whether `update_norm <= 1` was reached within `max_iters`.
    - `diverged`: whether an iterate, the vector field or its Jacobian became
        non-finite (the last finite iterate is returned).
    """

    num_iters: Int[Array, ""]
    update_norm: Real[Array, ""]
    residual_norm: Real[Array, ""]
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]


def _max_rms(x: Inexact[Array, "nodes n"]) -> Real[Array, ""]:
    return jnp.max(jnp.sqrt(jnp.mean(jnp.abs(x) ** 2, axis=-1)))


def newton_solve(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Inexact[Array, " nodes"],
    guess: Inexact[Array, "nodes n"],
    args: PyTree,
    *,
    rtol: float,
    atol: float,
    max_iters: int,
) -> tuple[Inexact[Array, "nodes n"], Inexact[Array, "nodes n"], NewtonStats]:
    r"""Solves $r_i(y_i, y_{i+1}) = 0$ for all intervals at once by Newton's method.

    `guess[0]` is the initial value and stays fixed. Each iteration evaluates $f$ and
    $\partial f/\partial y$ at every node (vectorised), forms the affine recurrence
    $\delta_{i+1} = A_i \delta_i - M_i^{-1} r_i$, $\delta_0 = 0$, solves it with a
    parallel scan, and updates $y \leftarrow y + \delta$. It stops when the update is
    within `atol + rtol * |y|` in the RMS norm at every node, at `max_iters`, or when
    something becomes non-finite.

    This is pure JAX and knows nothing of diffrax. It is not meant to be
    differentiated: see [`diffrax_deer.solve_window`][] for derivatives.

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays of shape `(n,)`.
    - `discretisation`: the per-interval residual, e.g. [`diffrax_deer.Trapezoid`][].
    - `ts`: the `N + 1` grid nodes.
    - `guess`: the starting iterate, shape `(N + 1, n)`; `guess[0]` is $y_0$.
    - `args`: passed to `vector_field`.
    - `rtol`, `atol`: the stopping tolerances.
    - `max_iters`: the most Newton iterations to take.

    **Returns:**

    The node values $y_i$, shape `(N + 1, n)`; the vector field there, $f(t_i, y_i)$,
    to first order in the last update ($f + J\delta$: exact up to $O(|\delta|^2)$,
    with no extra evaluation of $f$); and [`diffrax_deer.NewtonStats`][].
    """
    real_dtype = jnp.finfo(guess.dtype).dtype
    zero_update = jnp.zeros(guess.shape[1:], guess.dtype)

    def cond_fun(carry):
        num_iters, _, _, update_norm, _, finite = carry
        return (num_iters < max_iters) & (update_norm > 1) & finite

    def body_fun(carry):
        num_iters, ys, _, _, _, _ = carry
        fs, jacobians = evaluate_nodes_and_jacobians(vector_field, ts, ys, args)
        residual = discretisation.residual(ts, ys, fs)
        linearised = discretisation.linearise(ts, ys, jacobians)
        offsets = -linearised.step_solve.solve(residual)
        update = solve_affine_recurrence(linearised.transitions, offsets, zero_update)
        new_ys = ys + update
        scale = atol + rtol * jnp.maximum(jnp.abs(ys), jnp.abs(new_ys))
        update_norm = _max_rms(update / scale)
        finite = jnp.isfinite(update_norm) & jnp.all(jnp.isfinite(new_ys))
        ys = jnp.where(finite, new_ys, ys)
        fs = jnp.where(finite, fs + (jacobians @ update[..., None])[..., 0], fs)
        update_norm = jnp.where(finite, update_norm, jnp.inf)
        return num_iters + 1, ys, fs, update_norm, _max_rms(residual), finite

    init = (
        jnp.array(0, jnp.int32),
        guess,
        jnp.zeros_like(guess),
        jnp.array(jnp.inf, real_dtype),
        jnp.array(jnp.inf, real_dtype),
        jnp.array(True),
    )
    num_iters, ys, fs, update_norm, residual_norm, finite = jax.lax.while_loop(
        cond_fun, body_fun, init
    )
    stats = NewtonStats(
        num_iters=num_iters,
        update_norm=update_norm,
        residual_norm=residual_norm,
        converged=finite & (update_norm <= 1),
        diverged=~finite,
    )
    return ys, fs, stats
