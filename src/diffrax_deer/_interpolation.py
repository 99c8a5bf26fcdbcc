"""Dense output over a DEER window, for diffrax's `SaveAt` and `sol.evaluate`."""

import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractLocalInterpolation
from jaxtyping import Array, PyTree, Real, Shaped

from ._hermite import hermite_on_uniform_grid


class DeerInterpolation(AbstractLocalInterpolation):
    r"""Piecewise cubic Hermite interpolation through the nodes of one window.

    The window $[t_0, t_1]$ holds $N$ uniform intervals; on each, the cubic matching
    $y$ and $y' = f(t, y)$ at both ends is used. It is $C^1$ and third-order
    accurate, so it does not limit the accuracy of a second-order discretisation.

    **Arguments:**

    - `t0`, `t1`: the window.
    - `ys`: node values, each leaf with a leading axis of `N + 1` nodes.
    - `fs`: the vector field at the nodes, same structure.
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    ys: PyTree[Shaped[Array, "nodes ..."]]
    fs: PyTree[Shaped[Array, "nodes ..."]]

    def evaluate(
        self, t0: Real[Array, ""], t1: Real[Array, ""] | None = None, left: bool = True
    ) -> PyTree[Array]:
        del left  # the interpolant is continuous
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0)
            )
        num_intervals = jtu.tree_leaves(self.ys)[0].shape[0] - 1
        spacing = (self.t1 - self.t0) / num_intervals
        safe_spacing = jnp.where(spacing == 0, 1, spacing)
        position = (t0 - self.t0) / safe_spacing
        return jtu.tree_map(
            lambda y, f: hermite_on_uniform_grid(y, f, position, spacing),
            self.ys,
            self.fs,
        )
