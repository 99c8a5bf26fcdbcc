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

    The window $[t_0, t_1]$ holds $N$ intervals between the nodes `ts` (uniform, or
    an adapted mesh). The trapezoid and backward
    Euler use on each interval the cubic Hermite polynomial matching $y$ and
    $y' = f(t, y)$ at both ends ($C^1$, third-order accurate); the collocation
    methods the quintic that also matches $y''$ ($C^2$, fifth-order accurate); an
    explicit diffrax solver uses its own interpolation.

    **Arguments:**

    - `t0`, `t1`: the window.
    - `ts`: the nodes, shape `(N + 1,)`.
    - `ys`: the node values, flattened, shape `(N + 1, n)`.
    - `info`: what the method's `interpolate` needs (e.g. the vector field at the
        nodes).
    - `template`: zero-size arrays with the structure, shapes and dtypes of $y$, to
        unflatten the result.
    - `method`: the window's discretisation.
    - `uniform`: whether the nodes are known to be uniform (then a time's interval
        is found by arithmetic rather than a search).
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    ts: Real[Array, " nodes"]
    ys: Inexact[Array, "nodes n"]
    info: PyTree[Array]
    template: PyTree[Shaped[Array, "0 ..."]]
    method: AbstractDiscretisation = eqx.field(static=True)
    uniform: bool = eqx.field(static=True, default=False)

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
        y_flat = self.method.interpolate(self.ts, self.ys, self.info, t0, self.uniform)
        return self._unravel(y_flat)

    def _unravel(self, y_flat: Inexact[Array, " n"]) -> PyTree[Array]:
        example = jtu.tree_map(
            lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), self.template
        )
        _, unravel = ravel(example)
        return unravel(y_flat)

    def nodes(self) -> tuple[Real[Array, " nodes"], PyTree[Array]]:
        """The window's nodes (uniform, or an adapted mesh; the first and last
        exactly $t_0$ and $t_1$) and the solution there, each leaf with a leading
        axis of length $N + 1$."""
        return self.ts, jax.vmap(self._unravel)(self.ys)


def structure_template(y: PyTree[Array]) -> PyTree[Shaped[Array, "0 ..."]]:
    """Zero-size arrays that remember the structure, shapes and dtypes of `y`."""
    return jtu.tree_map(lambda leaf: jnp.zeros((0,) + jnp.shape(leaf), leaf.dtype), y)


def ravel(tree: PyTree[Array]) -> tuple[Array, Callable[[Array], PyTree[Array]]]:
    """`jax.flatten_util.ravel_pytree`, with leaves of different dtypes promoted to
    a common one explicitly (it would raise under strict dtype promotion), and
    unflattened back to their own."""
    with jax.numpy_dtype_promotion("standard"):
        return ravel_pytree(tree)
