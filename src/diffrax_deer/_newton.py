"""Newton's method on the residual of a whole trajectory, one parallel scan per step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Inexact, Int, PyTree, Real

from ._discretisation import AbstractDiscretisation, VectorField


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


def _all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]))


def _max_rms(x: Inexact[Array, "nodes n"]) -> Real[Array, ""]:
    return jnp.max(jnp.sqrt(jnp.mean(jnp.abs(x) ** 2, axis=-1)))


def newton_solve(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Inexact[Array, " nodes"],
    guess: Inexact[Array, "nodes n"],
    stages: PyTree[Array] | None,
    args: PyTree,
    *,
    rtol: float,
    atol: float,
    max_iters: int,
) -> tuple[Inexact[Array, "nodes n"], PyTree[Array] | None, NewtonStats]:
    r"""Solves $r_i(y_i, y_{i+1}) = 0$ for all intervals at once by Newton's method.

    `guess[0]` is the initial value and stays fixed. Each iteration evaluates $f$ and
    $\partial f/\partial y$ at every node or stage point (vectorised), forms the
    affine recurrence $\delta_{i+1} = A_i \delta_i + b_i$, $\delta_0 = 0$, with
    $b_i$ from $-r$, solves it with a parallel scan, and updates $y \leftarrow y +
    \delta$ (and the stage unknowns, if any). It stops when the node update is within
    `atol + rtol * |y|` in the RMS norm at every node, at `max_iters`, or when
    something becomes non-finite.

    This is pure JAX and knows nothing of diffrax. It is not meant to be
    differentiated: see [`diffrax_deer.solve_window`][] for derivatives.

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays of shape `(n,)`.
    - `discretisation`: the per-interval residual, e.g. [`diffrax_deer.Trapezoid`][].
    - `ts`: the `N + 1` grid nodes.
    - `guess`: the starting iterate, shape `(N + 1, n)`; `guess[0]` is $y_0$.
    - `stages`: the starting stage unknowns, from `discretisation.init_stages`.
    - `args`: passed to `vector_field`.
    - `rtol`, `atol`: the stopping tolerances.
    - `max_iters`: the most Newton iterations to take.

    **Returns:**

    The node values $y_i$, shape `(N + 1, n)`; the stage unknowns (or `None`); and
    [`diffrax_deer.NewtonStats`][].
    """
    real_dtype = jnp.finfo(guess.dtype).dtype
    zero_update = jnp.zeros(guess.shape[1:], guess.dtype)

    def cond_fun(carry):
        num_iters, _, _, update_norm, _, finite = carry
        return (num_iters < max_iters) & (update_norm > 1) & finite

    def body_fun(carry):
        num_iters, ys, stages, _, _, _ = carry
        residual, linearisation = discretisation.linearise(
            vector_field, ts, ys, stages, args
        )
        negative_residual = jtu.tree_map(jnp.negative, residual)
        update, stage_update = linearisation.solve(negative_residual, zero_update)
        new_ys = ys + update
        new_stages = jtu.tree_map(jnp.add, stages, stage_update)
        scale = atol + rtol * jnp.maximum(jnp.abs(ys), jnp.abs(new_ys))
        update_norm = _max_rms(update / scale)
        finite = jnp.isfinite(update_norm) & _all_finite((new_ys, new_stages))
        ys, stages = jtu.tree_map(
            lambda new, old: jnp.where(finite, new, old),
            (new_ys, new_stages),
            (ys, stages),
        )
        update_norm = jnp.where(finite, update_norm, jnp.inf)
        return num_iters + 1, ys, stages, update_norm, _max_rms(residual[0]), finite

    init = (
        jnp.array(0, jnp.int32),
        guess,
        stages,
        jnp.array(jnp.inf, real_dtype),
        jnp.array(jnp.inf, real_dtype),
        jnp.array(True),
    )
    num_iters, ys, stages, update_norm, residual_norm, finite = jax.lax.while_loop(
        cond_fun, body_fun, init
    )
    stats = NewtonStats(
        num_iters=num_iters,
        update_norm=update_norm,
        residual_norm=residual_norm,
        converged=finite & (update_norm <= 1),
        diverged=~finite,
    )
    return ys, stages, stats
