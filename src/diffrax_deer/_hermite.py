"""Cubic Hermite interpolation on a uniform grid."""

import jax.numpy as jnp
from jaxtyping import Array, Inexact, Real


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
    num_intervals = values.shape[0] - 1
    index = jnp.clip(jnp.floor(position), 0, num_intervals - 1).astype(jnp.int32)
    s = (position - index).astype(values.dtype)
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
