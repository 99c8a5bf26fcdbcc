"""Cubic and quintic Hermite interpolation, on a uniform or any increasing grid."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Inexact, Int, Real


def _interval_and_fraction(values: Array, position: Real[Array, ""]):
    # The interval k holding x = k + s (the first or last one outside [0, N]).
    num_intervals = values.shape[0] - 1
    start = jnp.clip(jnp.floor(position), 0, num_intervals - 1)
    return start.astype(jnp.int32), (position - start).astype(values.dtype)


def hermite_on_uniform_grid(
    values: Inexact[Array, "nodes ..."],
    derivatives: Inexact[Array, "nodes ..."],
    position: Real[Array, ""],
    spacing: Real[Array, ""],
) -> Inexact[Array, "..."]:
    r"""Evaluates the piecewise cubic Hermite interpolant of nodes on a uniform grid.

    With $x = k + s$, $k$ the interval index and $s \in [0, 1]$,
    $y = h_{00}(s) y_k + h_{10}(s) \Delta f_k + h_{01}(s) y_{k+1} + h_{11}(s) \Delta
    f_{k+1}$, the standard Hermite basis. It matches values and derivatives at every
    node, is $C^1$, and is locally third-order accurate.

    **Arguments:**

    - `values`: node values $y_k$, leading axis over the `N + 1` nodes.
    - `derivatives`: node derivatives $f_k = y'(t_k)$, same shape.
    - `position`: the fractional node index $x = (t - t_0) / \Delta$; values outside
        `[0, N]` extrapolate the first or last cubic.
    - `spacing`: the grid spacing $\Delta$.
    """
    index, s = _interval_and_fraction(values, position)
    s2 = s * s
    s3 = s2 * s
    h00 = 2 * s3 - 3 * s2 + 1
    h10 = s3 - 2 * s2 + s
    h01 = -2 * s3 + 3 * s2
    h11 = s3 - s2
    spacing = spacing.astype(values.dtype)
    return (
        h00 * values[index]
        + h10 * spacing * derivatives[index]
        + h01 * values[index + 1]
        + h11 * spacing * derivatives[index + 1]
    )


def quintic_hermite_on_uniform_grid(
    values: Inexact[Array, "nodes ..."],
    derivatives: Inexact[Array, "nodes ..."],
    second_derivatives: Inexact[Array, "nodes ..."],
    position: Real[Array, ""],
    spacing: Real[Array, ""],
) -> Inexact[Array, "..."]:
    r"""Evaluates the piecewise quintic Hermite interpolant of nodes on a uniform
    grid: on each interval the degree-5 polynomial matching $y$, $y'$ and $y''$ at
    both ends. It is $C^2$ and locally sixth-order accurate, enough for the
    sixth-order Gauss-Legendre nodes.

    With $x = k + s$ and $\Delta$ the spacing,
    $y = H_0 y_k + H_1 \Delta y'_k + H_2 \Delta^2 y''_k + H_3 \Delta^2 y''_{k+1}
    + H_4 \Delta y'_{k+1} + H_5 y_{k+1}$, with
    $H_0 = 1 - 10s^3 + 15s^4 - 6s^5$, $H_1 = s - 6s^3 + 8s^4 - 3s^5$,
    $H_2 = (s^2 - 3s^3 + 3s^4 - s^5)/2$, $H_3 = (s^3 - 2s^4 + s^5)/2$,
    $H_4 = -4s^3 + 7s^4 - 3s^5$, $H_5 = 10s^3 - 15s^4 + 6s^5$.

    **Arguments:**

    - `values`, `derivatives`, `second_derivatives`: $y_k$, $y'_k$, $y''_k$ at the
        `N + 1` nodes, leading axis over the nodes.
    - `position`: the fractional node index $x = (t - t_0) / \Delta$; values outside
        `[0, N]` extrapolate the first or last quintic.
    - `spacing`: the grid spacing $\Delta$.
    """
    index, s = _interval_and_fraction(values, position)
    s2 = s * s
    s3 = s2 * s
    s4 = s3 * s
    s5 = s4 * s
    h0 = 1 - 10 * s3 + 15 * s4 - 6 * s5
    h1 = s - 6 * s3 + 8 * s4 - 3 * s5
    h2 = 0.5 * (s2 - 3 * s3 + 3 * s4 - s5)
    h3 = 0.5 * (s3 - 2 * s4 + s5)
    h4 = -4 * s3 + 7 * s4 - 3 * s5
    h5 = 10 * s3 - 15 * s4 + 6 * s5
    spacing = spacing.astype(values.dtype)
    return (
        h0 * values[index]
        + h1 * spacing * derivatives[index]
        + h2 * spacing**2 * second_derivatives[index]
        + h3 * spacing**2 * second_derivatives[index + 1]
        + h4 * spacing * derivatives[index + 1]
        + h5 * values[index + 1]
    )


# Up to this many nodes the interval holding t is found by comparing t with every
# node (one fused reduction); beyond, by binary search.
_COMPARE_ALL_NODES = 512


def grid_interval(ts: Real[Array, " nodes"], t: Real[Array, ""], uniform: bool = False):
    """The interval `k` of the increasing grid `ts` holding `t` (the first or the
    last one outside `[ts[0], ts[-1]]`), the fraction `s` of the way through it,
    and its length. With `uniform=True` the grid is known to be uniform and the
    interval is found by arithmetic, with no search (on a GPU a binary search is a
    loop of small kernels per time)."""
    num_intervals = ts.shape[0] - 1
    if uniform:
        spacing = (ts[-1] - ts[0]) / num_intervals
        position = (t - ts[0]) / jnp.where(spacing == 0, 1, spacing)
        index = jnp.clip(jnp.floor(position), 0, num_intervals - 1).astype(jnp.int32)
        return index, position - index.astype(position.dtype), spacing
    if ts.shape[0] <= _COMPARE_ALL_NODES:
        index = jnp.sum(ts[1:-1] <= t, dtype=jnp.int32)
    else:
        index = jnp.searchsorted(ts[1:-1], t, side="right").astype(jnp.int32)
    index = jnp.clip(index, 0, num_intervals - 1)
    step = ts[index + 1] - ts[index]
    fraction = (t - ts[index]) / jnp.where(step == 0, 1, step)
    return index, fraction, step


def hermite_on_grid(
    ts: Real[Array, " nodes"],
    values: Inexact[Array, "nodes ..."],
    derivatives: Inexact[Array, "nodes ..."],
    t: Real[Array, ""],
    uniform: bool = False,
) -> Inexact[Array, "..."]:
    """The piecewise cubic Hermite interpolant of `hermite_on_uniform_grid` on
    any increasing grid `ts` (see `grid_interval` for `uniform`), at time
    `t`."""
    index, fraction, step = grid_interval(ts, t, uniform)
    local = _local((values, derivatives), index)
    return hermite_on_uniform_grid(*local, fraction, step)


def quintic_hermite_on_grid(
    ts: Real[Array, " nodes"],
    values: Inexact[Array, "nodes ..."],
    derivatives: Inexact[Array, "nodes ..."],
    second_derivatives: Inexact[Array, "nodes ..."],
    t: Real[Array, ""],
    uniform: bool = False,
) -> Inexact[Array, "..."]:
    """The piecewise quintic Hermite interpolant of
    `quintic_hermite_on_uniform_grid` on any increasing grid `ts` (see
    `grid_interval` for `uniform`), at time `t`."""
    index, fraction, step = grid_interval(ts, t, uniform)
    return quintic_hermite_in_interval(
        values, derivatives, second_derivatives, index, fraction, step
    )


def quintic_hermite_in_interval(
    values: Inexact[Array, "nodes ..."],
    derivatives: Inexact[Array, "nodes ..."],
    second_derivatives: Inexact[Array, "nodes ..."],
    index: Int[Array, ""],
    fraction: Real[Array, ""],
    step: Real[Array, ""],
) -> Inexact[Array, "..."]:
    """The quintic Hermite polynomial of interval `index` (of length `step`) at the
    `fraction` of the way through it, as `grid_interval` finds them."""
    local = _local((values, derivatives, second_derivatives), index)
    return quintic_hermite_on_uniform_grid(*local, fraction, step)


def _local(arrays, index):
    # The two nodes of interval `index`, as a grid of one interval (one dynamic
    # slice per array rather than two gathers).
    return tuple(jax.lax.dynamic_slice_in_dim(x, index, 2) for x in arrays)
