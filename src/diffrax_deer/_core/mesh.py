"""A window's mesh redistributed to equidistribute its local errors (static shapes)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Real


# A twentieth of the nodes stay spread uniformly over the window, so that no stretch
# is left without nodes where the indicator happened to be small; and the density
# changes by at most this factor from one indicator interval to the next (a
# feature may sit across a boundary, and steps should not jump).
UNIFORM_FRACTION = 0.05
GRADING = 4.0


class AdaptedMesh(eqx.Module):
    r"""A redistributed mesh and what it is expected to achieve.

    **Arguments:**

    - `ts`: the new nodes, `N + 1` of them, from `t_0` to `t_1`.
    - `improvement`: the predicted ratio of the window's error on the new mesh to
        its error on the old one (below 1: better).
    """

    ts: Real[Array, " nodes"]
    improvement: Real[Array, ""]


def equidistribute(
    ts: Real[Array, " coarse"],
    density: Real[Array, " coarse_steps"],
    num_intervals: int,
) -> Real[Array, " nodes"]:
    r"""Nodes that split $\int \rho\,dt$ into `num_intervals` equal parts.

    With $\rho$ constant on each interval of `ts`, its integral $W(t)$ is piecewise
    linear: a cumulative sum. The new nodes are $W^{-1}(k W(t_1) / N)$, an inverse
    interpolation. Shapes are static: the number of nodes never changes.

    **Arguments:**

    - `ts`: the grid on which the density is given, increasing.
    - `density`: $\rho > 0$ on each of its intervals.
    - `num_intervals`: $N$, the intervals of the new mesh.
    """
    widths = density * (ts[1:] - ts[:-1])
    cumulative = jnp.concatenate([jnp.zeros((1,), ts.dtype), jnp.cumsum(widths)])
    fractions = jnp.arange(num_intervals + 1, dtype=ts.dtype) / num_intervals
    new_ts = jnp.interp(fractions * cumulative[-1], cumulative, ts)
    return new_ts.at[0].set(ts[0]).at[-1].set(ts[-1])


def adapt_mesh(
    ts: Real[Array, " coarse"],
    scaled_local_errors: Real[Array, " coarse_steps"],
    order: int,
    num_intervals: int,
) -> AdaptedMesh:
    r"""A mesh of `num_intervals` intervals on which the local errors are equal.

    On interval $j$ of `ts` (length $H_j$), the local error made by the current
    mesh, $\eta_j$ (already scaled by the tolerance), grows like $h^{p+1}$ in the
    step $h$ of an order-$p$ method, so equal errors need the density
    $\rho_j \propto \eta_j^{1/(p+1)} / H_j$ of nodes per unit time (de Boor's
    equidistribution). It is graded, raised so that it falls by at most a factor
    of 4 from one interval to the next (a feature may sit across a boundary, and
    steps should not jump), and a twentieth of the nodes stay uniform.
    `equidistribute` then places the nodes.

    The predicted improvement compares the error of the new mesh, interval by
    interval $\eta_j (h_j^{\text{new}} / h_j)^{p+1}$ summed over the new intervals,
    with the old one, in the sum over intervals (errors carried to the window's
    end, non-stiff) and in the largest one (errors damped), whichever is worse.

    **Arguments:**

    - `ts`: the grid of the indicator (the coarse grid of the error estimate).
    - `scaled_local_errors`: $\eta_j \ge 0$ per interval, from two intervals of
        the current mesh each.
    - `order`: $p$.
    - `num_intervals`: the intervals of the new mesh.
    """
    dtype = ts.dtype
    lengths = ts[1:] - ts[:-1]
    errors = jnp.maximum(scaled_local_errors.astype(dtype), 0)
    root = errors ** jnp.asarray(1 / (order + 1), dtype)
    density = _graded(root / jnp.where(lengths == 0, 1, lengths))
    window = ts[-1] - ts[0]
    total = jnp.sum(density * lengths)
    density = density + UNIFORM_FRACTION * total / jnp.where(window == 0, 1, window)
    # Nothing to go by (all zero): keep the mesh uniform.
    density = jnp.where(total > 0, density, 1)
    new_ts = equidistribute(ts, density, num_intervals)
    # Per interval j of `ts`: the new step there, against the current one (half of
    # H_j: the indicator came from two fine intervals).
    new_step = jnp.sum(density * lengths) / num_intervals / density
    ratio = (2 * new_step / jnp.where(lengths == 0, 1, lengths)) ** (order + 1)
    new_count = density * lengths * num_intervals / jnp.sum(density * lengths)
    new_errors = errors / 2 * ratio
    worst = jnp.max(errors)
    summed = jnp.sum(new_count * new_errors) / jnp.where(
        jnp.sum(errors) > 0, jnp.sum(errors), 1
    )
    largest = jnp.max(new_errors) / jnp.where(worst > 0, worst / 2, 1)
    improvement = jnp.where(total > 0, jnp.maximum(summed, largest), 1)
    return AdaptedMesh(ts=new_ts, improvement=improvement)


def _graded(density: Real[Array, " steps"]) -> Real[Array, " steps"]:
    r"""The smallest density above `density` that changes by at most `GRADING`
    between neighbours: $\tilde\rho_j = \max_k \rho_k\, g^{-|j - k|}$, two
    running maxima in log space."""
    dtype = density.dtype
    tiny = jnp.finfo(dtype).tiny
    log_density = jnp.log(jnp.maximum(density, tiny))
    offsets = jnp.arange(density.shape[0], dtype=dtype) * jnp.log(
        jnp.asarray(GRADING, dtype)
    )
    forward = jax.lax.cummax(log_density + offsets) - offsets
    backward = jax.lax.cummax(log_density - offsets, reverse=True) + offsets
    return jnp.exp(jnp.maximum(forward, backward))
