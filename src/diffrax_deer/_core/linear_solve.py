"""Per-interval linear solves: one small matrix inverse per interval, batched."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Inexact


class BatchedLinearSolve(eqx.Module):
    r"""Applies $M_i^{-1}$ for every interval $i$, with one factorisation each.

    Each $M_i$ is factorised by `lineax.LU` (batched over intervals) and inverted
    once, by solving against the identity; every later right-hand side (the
    transition matrices, the residual, tangents) is then a batched matrix product.
    The blocks are small ($n \times n$, or $sn \times sn$ with stages), so the
    explicit inverse costs no more than the solves it replaces and keeps a single
    LAPACK call per linearisation: several independent batched triangular solves
    in one Newton step were what let XLA:CPU's concurrent scheduler deadlock.

    **Arguments:**

    - `matrices`: the per-interval matrices $M_i$, shape `(N, m, m)`.
    """

    inverses: Inexact[Array, "steps m m"]

    def __init__(self, matrices: Inexact[Array, "steps m m"]):
        def invert(matrix):
            operator = lx.MatrixLinearOperator(matrix)
            factorisation = lx.LU().init(operator, {})

            def solve_column(column):
                solution, _, _ = lx.LU().compute(factorisation, column, {})
                return solution

            identity = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
            return jax.vmap(solve_column, in_axes=1, out_axes=1)(identity)

        # LAPACK has no float16 or bfloat16: factorise those in float32 and round
        # the inverses back (their error is then that of the rounding).
        dtype = jnp.result_type(matrices)
        half = jnp.finfo(dtype).bits < 32
        factor_dtype = jnp.dtype(jnp.float32) if half else dtype
        inverses = jax.vmap(invert)(matrices.astype(factor_dtype))
        self.inverses = inverses.astype(dtype)

    def solve(self, vectors: Inexact[Array, "steps m"]) -> Inexact[Array, "steps m"]:
        """Returns $M_i^{-1} v_i$ for every interval $i$."""
        return jnp.einsum("imk,ik->im", self.inverses, vectors)

    def solve_matrices(
        self, matrices: Inexact[Array, "steps m k"]
    ) -> Inexact[Array, "steps m k"]:
        """Returns $M_i^{-1} B_i$ for every interval $i$."""
        return self.inverses @ matrices
