"""Per-interval linear solves: one small matrix inverse per interval, batched."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Inexact


# Up to this size the inverses are formed by elementwise arithmetic vectorised over
# the intervals (closed forms for 1 and 2, unrolled Gauss-Jordan elimination above),
# which XLA fuses into a few loops; from 9 on one batched LAPACK LU is faster.
# Measured (CPU, float64, 1e4 blocks): n = 2 0.064 ms against lineax's 1.7 ms,
# n = 4 0.76 against 2.7 ms, n = 8 9.0 against 10.7 ms, n = 12 110 against 28 ms.
MAX_ELEMENTWISE_SIZE = 8


def _inverse_2x2(matrices: Inexact[Array, "steps 2 2"]) -> Inexact[Array, "steps 2 2"]:
    # The adjugate over the determinant.
    a, b = matrices[:, 0, 0], matrices[:, 0, 1]
    c, d = matrices[:, 1, 0], matrices[:, 1, 1]
    inverse_det = 1 / (a * d - b * c)
    first = jnp.stack([d, -b], axis=-1)
    second = jnp.stack([-c, a], axis=-1)
    return jnp.stack([first, second], axis=-2) * inverse_det[:, None, None]


def _inverse_gauss_jordan(
    matrices: Inexact[Array, "steps m m"],
) -> Inexact[Array, "steps m m"]:
    """Gauss-Jordan elimination on $[M \\mid I]$ with partial pivoting, unrolled
    over the `m` columns and vectorised over the blocks."""
    size = matrices.shape[-1]
    identity = jnp.broadcast_to(jnp.eye(size, dtype=matrices.dtype), matrices.shape)
    augmented = jnp.concatenate([matrices, identity], axis=-1)
    rows = jnp.arange(size)
    for k in range(size):
        # Swap row k with the row (at or below it) of the largest entry in column k.
        pivot = jnp.argmax(jnp.abs(augmented[:, k:, k]), axis=1) + k
        pivot_row = jnp.take_along_axis(augmented, pivot[:, None, None], axis=1)[:, 0]
        is_pivot = (rows[None, :] == pivot[:, None])[:, :, None]
        augmented = jnp.where(is_pivot, augmented[:, k][:, None, :], augmented)
        pivot_row = pivot_row / pivot_row[:, k : k + 1]
        # Eliminate column k from every other row, then put the pivot row at k.
        factors = augmented[:, :, k].at[:, k].set(0)
        augmented = augmented - factors[:, :, None] * pivot_row[:, None, :]
        augmented = augmented.at[:, k].set(pivot_row)
    return augmented[:, :, size:]


def _inverse_gauss_jordan_loop(
    matrices: Inexact[Array, "steps m m"],
) -> Inexact[Array, "steps m m"]:
    """`_inverse_gauss_jordan` as a loop over the `m` columns (a `fori_loop`, so
    that the program does not grow with `m`), vectorised over the blocks."""
    size = matrices.shape[-1]
    identity = jnp.broadcast_to(jnp.eye(size, dtype=matrices.dtype), matrices.shape)
    augmented = jnp.concatenate([matrices, identity], axis=-1)
    rows = jnp.arange(size)[None, :]

    def eliminate(k, augmented):
        column = jax.lax.dynamic_index_in_dim(augmented, k, axis=2, keepdims=False)
        below = jnp.where(rows >= k, jnp.abs(column), -jnp.ones((), column.dtype))
        pivot = jnp.argmax(below, axis=1)
        pivot_row = jnp.take_along_axis(augmented, pivot[:, None, None], axis=1)[:, 0]
        row_k = jax.lax.dynamic_index_in_dim(augmented, k, axis=1, keepdims=False)
        is_pivot = (rows == pivot[:, None])[:, :, None]
        augmented = jnp.where(is_pivot, row_k[:, None, :], augmented)
        pivot_value = jax.lax.dynamic_index_in_dim(pivot_row, k, axis=1)
        pivot_row = pivot_row / pivot_value
        is_k = rows == k
        column = jax.lax.dynamic_index_in_dim(augmented, k, axis=2, keepdims=False)
        factors = jnp.where(is_k, jnp.zeros((), column.dtype), column)
        augmented = augmented - factors[:, :, None] * pivot_row[:, None, :]
        return jnp.where(is_k[:, :, None], pivot_row[:, None, :], augmented)

    augmented = jax.lax.fori_loop(0, size, eliminate, augmented)
    return augmented[:, :, size:]


def _inverse_lu(matrix: Inexact[Array, "m m"]) -> Inexact[Array, "m m"]:
    # JAX's own LU, which `lineax.LU` runs.
    factors = jax.scipy.linalg.lu_factor(matrix)
    return jax.scipy.linalg.lu_solve(
        factors, jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    )


def _inverse_lineax(
    matrices: Inexact[Array, "steps m m"],
) -> Inexact[Array, "steps m m"]:
    if jax.sharding.get_abstract_mesh().manual_axes:
        # Inside `shard_map` (a window split over devices): lineax checks its
        # operands' types against their structure, shardings included, which
        # every value there fails.
        return jax.vmap(_inverse_lu)(matrices)

    def invert(matrix):
        operator = lx.MatrixLinearOperator(matrix)
        factorisation = lx.LU().init(operator, {})

        def solve_column(column):
            solution, _, _ = lx.LU().compute(factorisation, column, {})
            return solution

        identity = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
        return jax.vmap(solve_column, in_axes=1, out_axes=1)(identity)

    return jax.vmap(invert)(matrices)


def batched_inverse(
    matrices: Inexact[Array, "steps m m"],
) -> Inexact[Array, "steps m m"]:
    r"""$M_i^{-1}$ for every block $i$.

    For $m \le 8$ by elementwise arithmetic vectorised over the blocks: $1 / M$ for
    $m = 1$, the adjugate over the determinant for $m = 2$, Gauss-Jordan elimination
    with partial pivoting (unrolled over the columns) for $3 \le m \le 8$. No LAPACK
    call, and nothing XLA:CPU's scheduler can run concurrently into a deadlock.
    Larger blocks use Gauss-Jordan elimination as a loop over the columns on CPU
    (jaxlib's batched LAPACK LU can deadlock there), one batched `lineax.LU`
    elsewhere. A singular block gives non-finite
    entries, which Newton treats as a failed step.

    **Arguments:**

    - `matrices`: the blocks $M_i$, shape `(N, m, m)`.
    """
    size = matrices.shape[-1]
    if size == 1:
        return 1 / matrices
    if size == 2:
        return _inverse_2x2(matrices)
    if size <= MAX_ELEMENTWISE_SIZE:
        return _inverse_gauss_jordan(matrices)
    # On CPU, not LAPACK: jaxlib 0.10's batched LU splits its batch over XLA's
    # thread pool and waits for the parts, so two such calls running at once
    # (a DEER solve nested in another's predictor or error estimate) deadlock a
    # 2-core machine. Elimination is 3-6x slower than LAPACK there (n = 12-64),
    # and never hangs. Elsewhere (GPU), one batched LU.
    return jax.lax.platform_dependent(
        matrices, cpu=_inverse_gauss_jordan_loop, default=_inverse_lineax
    )


class BatchedLinearSolve(eqx.Module):
    r"""Applies $M_i^{-1}$ for every interval $i$, with one inversion each.

    Each $M_i$ is inverted once (`batched_inverse`: elementwise closed forms or
    unrolled elimination for $m \le 8$, batched `lineax.LU` above); every later
    right-hand side (the transition matrices, the residual, tangents) is then a
    batched matrix product.
    The blocks are small ($n \times n$, or $sn \times sn$ with stages), so the
    explicit inverse costs no more than the solves it replaces and keeps at most a
    single LAPACK call per linearisation: several independent batched triangular
    solves in one Newton step were what let XLA:CPU's concurrent scheduler deadlock.

    **Arguments:**

    - `matrices`: the per-interval matrices $M_i$, shape `(N, m, m)`.
    """

    inverses: Inexact[Array, "steps m m"]

    def __init__(self, matrices: Inexact[Array, "steps m m"]):
        # Half precision: LAPACK has no float16 or bfloat16, and elimination in it
        # loses digits; invert in float32 and round the inverses back.
        dtype = jnp.result_type(matrices)
        half = jnp.finfo(dtype).bits < 32
        factor_dtype = jnp.dtype(jnp.float32) if half else dtype
        self.inverses = batched_inverse(matrices.astype(factor_dtype)).astype(dtype)

    def solve(self, vectors: Inexact[Array, "steps m"]) -> Inexact[Array, "steps m"]:
        """Returns $M_i^{-1} v_i$ for every interval $i$."""
        return jnp.einsum("imk,ik->im", self.inverses, vectors)

    def solve_matrices(
        self, matrices: Inexact[Array, "steps m k"]
    ) -> Inexact[Array, "steps m k"]:
        """Returns $M_i^{-1} B_i$ for every interval $i$."""
        return self.inverses @ matrices
