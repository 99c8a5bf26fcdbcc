"""Dense output over a DEER window, for diffrax's `SaveAt` and `sol.evaluate`."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractLocalInterpolation
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Inexact, PyTree, Real, Shaped

from .._core.discretisation import AbstractDiscretisation


class DeerInterpolation(AbstractLocalInterpolation):
    r"""Interpolation through the nodes of one window, by the window's method.

    The window $[t_0, t_1]$ holds $N$ uniform intervals. The trapezoid and backward
    Euler use on each interval the cubic Hermite polynomial matching $y$ and
    $y' = f(t, y)$ at both ends ($C^1$, third-order accurate); the collocation
    methods the quintic that also matches $y''$ ($C^2$, fifth-order accurate); an
    explicit diffrax solver uses its own interpolation.

    **Arguments:**

    - `t0`, `t1`: the window.
    - `ys`: the node values, flattened, shape `(N + 1, n)`.
    - `info`: what the method's `interpolate` needs (e.g. the vector field at the
        nodes).
    - `template`: zero-size arrays with the structure, shapes and dtypes of $y$, to
        unflatten the result.
    - `method`: the window's discretisation.
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    ys: Inexact[Array, "nodes n"]
    info: PyTree[Array]
    template: PyTree[Shaped[Array, "0 ..."]]
    method: AbstractDiscretisation = eqx.field(static=True)

    def evaluate(
        self, t0: Real[Array, ""], t1: Real[Array, ""] | None = None, left: bool = True
    ) -> PyTree[Array]:
        del left  # the interpolant is continuous
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0)
            )
        if self.ys.shape[-1] == 0:  # an empty state stays empty
            return self._unravel(jnp.zeros((0,), self.ys.dtype))
        num_intervals = self.ys.shape[0] - 1
        spacing = (self.t1 - self.t0) / num_intervals
        y_flat = self.method.interpolate(self.ys, self.info, self.t0, spacing, t0)
        return self._unravel(y_flat)

    def _unravel(self, y_flat: Inexact[Array, " n"]) -> PyTree[Array]:
        example = jtu.tree_map(
            lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), self.template
        )
        _, unravel = ravel(example)
        return unravel(y_flat)

    def nodes(self) -> tuple[Real[Array, " nodes"], PyTree[Array]]:
        """The window's node times $t_0 + i (t_1 - t_0) / N$ (the last exactly $t_1$)
        and the solution there, each leaf with a leading axis of length $N + 1$."""
        num_intervals = self.ys.shape[0] - 1
        fractions = jnp.arange(num_intervals + 1, dtype=self.t0.dtype) / num_intervals
        ts = (self.t0 + (self.t1 - self.t0) * fractions).at[-1].set(self.t1)
        return ts, jax.vmap(self._unravel)(self.ys)


def structure_template(y: PyTree[Array]) -> PyTree[Shaped[Array, "0 ..."]]:
    """Zero-size arrays that remember the structure, shapes and dtypes of `y`."""
    return jtu.tree_map(lambda leaf: jnp.zeros((0,) + jnp.shape(leaf), leaf.dtype), y)


def ravel(tree: PyTree[Array]) -> tuple[Array, Callable[[Array], PyTree[Array]]]:
    """`jax.flatten_util.ravel_pytree`, with leaves of different dtypes promoted to
    a common one explicitly (it would raise under strict dtype promotion), and
    unflattened back to their own."""
    with jax.numpy_dtype_promotion("standard"):
        return ravel_pytree(tree)
