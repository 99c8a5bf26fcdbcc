"""Levenberg-Marquardt-damped solution of an affine recurrence, in parallel.

The damped Newton direction of DEER is the smoothed mean of a linear-Gaussian
state-space model, computed with the parallel Kalman filter and smoother of Särkkä and
García-Fernández (2021), "Temporal parallelization of Bayesian smoothers", as ELK
(Gonzalez et al. 2024) does.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Inexact, Real

from .scan import _compose, _compose_diagonal


# --------------------------------------------------------------------------------------
# The algebra of the transitions, written once for both representations: a dense matrix
# (..., n, n) or a diagonal stored as its vector (..., n), where everything is
# elementwise. Vectors are always (..., n).
# --------------------------------------------------------------------------------------


def _matmul(diagonal: bool, x: Array, y: Array) -> Array:
    return x * y if diagonal else x @ y


def _matvec(diagonal: bool, x: Array, v: Array) -> Array:
    return x * v if diagonal else (x @ v[..., None])[..., 0]


def _transpose(diagonal: bool, x: Array) -> Array:
    return x if diagonal else jnp.swapaxes(x, -1, -2)


def _symmetrise(diagonal: bool, x: Array) -> Array:
    # Covariances and precisions are symmetric in exact arithmetic; keeping them so
    # stops round-off from accumulating an antisymmetric part over log N levels.
    return x if diagonal else 0.5 * (x + jnp.swapaxes(x, -1, -2))


def _identity_like(diagonal: bool, x: Array) -> Array:
    if diagonal:
        return jnp.ones_like(x)
    return jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)


def _dense_solve(matrix: Array, rhs: Array) -> Array:
    """`matrix^{-1} rhs` for a batch of small systems: Gauss-Jordan elimination with
    partial pivoting, in plain `jax.numpy`.

    Not `jnp.linalg.solve`: on CPU, jaxlib 0.10.2 runs batched LAPACK in XLA's
    intra-op thread pool, and two such calls in flight at once (the scan has
    independent ones) deadlocked it in testing. Elementwise elimination is also faster
    than per-matrix LAPACK calls at small n (3.5x at n = 2), 1.3x slower at n = 16.
    """
    n = matrix.shape[-1]
    # Row numbers shaped as a column's entries (..., n) and as rows (..., n, 1).
    batch_ones = (1,) * (matrix.ndim - 2)
    rows = jnp.arange(n).reshape(batch_ones + (n,))
    row_column = rows[..., None]

    def eliminate(col, augmented):
        column = jax.lax.dynamic_index_in_dim(augmented, col, axis=-1, keepdims=False)
        pivot = jnp.argmax(jnp.where(rows >= col, jnp.abs(column), -1), axis=-1)
        pivot_row = jnp.take_along_axis(augmented, pivot[..., None, None], axis=-2)
        col_row = jax.lax.dynamic_slice_in_dim(augmented, col, 1, axis=-2)
        is_col = row_column == col
        is_pivot = row_column == pivot[..., None, None]
        # Swap rows `col` and `pivot`, then clear column `col` above and below.
        augmented = jnp.where(is_pivot, col_row, augmented)
        augmented = jnp.where(is_col, pivot_row, augmented)
        pivot_row = pivot_row / jax.lax.dynamic_index_in_dim(pivot_row, col, axis=-1)
        factors = jax.lax.dynamic_index_in_dim(augmented, col, axis=-1)
        return jnp.where(is_col, pivot_row, augmented - factors * pivot_row)

    augmented = jnp.concatenate([matrix, rhs], axis=-1)
    return jax.lax.fori_loop(0, n, eliminate, augmented)[..., n:]


def _solve(
    diagonal: bool, m: Array, matrices: tuple[Array, ...], vector: Array | None
) -> tuple[tuple[Array, ...], Array | None]:
    """`m^{-1} X` for each `X` in `matrices` and `m^{-1} v`, in one elimination."""
    if diagonal:
        return tuple(x / m for x in matrices), None if vector is None else vector / m
    columns = [*matrices] + ([] if vector is None else [vector[..., None]])
    solution = _dense_solve(m, jnp.concatenate(columns, axis=-1))
    n = m.shape[-1]
    solved = tuple(solution[..., k * n : (k + 1) * n] for k in range(len(matrices)))
    return solved, None if vector is None else solution[..., -1]


# --------------------------------------------------------------------------------------
# Filtering: elements (A, b, C, eta, J) of Särkkä & García-Fernández (2021), Lemma 8.
# --------------------------------------------------------------------------------------


def _filter_combine(diagonal: bool, earlier: tuple, later: tuple) -> tuple:
    r"""$(A_{ij}, b_{ij}, C_{ij}, \eta_{ij}, J_{ij}) = a_i \otimes a_j$, $i$ first.

    With $M = I + C_i J_j$ (invertible: $C_i J_j$ is similar to the positive
    semi-definite $C_i^{1/2} J_j C_i^{1/2}$, so the eigenvalues of $M$ are $\geq 1$)
    and $(X_A, X_C, x) = M^{-1} (A_i, C_i, b_i + C_i \eta_j)$:

        A_ij   = A_j X_A                     b_ij = A_j x + b_j
        C_ij   = A_j X_C A_j^T + C_j         J_ij = A_i^T J_j X_A + J_i
        eta_ij = A_i^T (eta_j - J_j x) + eta_i

    The last two use $(I + J_j C_i)^{-1} J_j = J_j M^{-1}$ and $(I + J_j C_i)^{-1} =
    I - J_j M^{-1} C_i$, so a single elimination with $M$ serves all five, and nothing
    divides by the damping: at $\lambda = 0$, $J = \eta = 0$, $M = I$ and this is
    exactly the composition of affine maps.
    """
    A_i, b_i, C_i, eta_i, J_i = earlier
    A_j, b_j, C_j, eta_j, J_j = later
    mm = functools.partial(_matmul, diagonal)
    mv = functools.partial(_matvec, diagonal)
    tr = functools.partial(_transpose, diagonal)
    sym = functools.partial(_symmetrise, diagonal)

    m = _identity_like(diagonal, C_i) + mm(C_i, J_j)
    (X_A, X_C), x = _solve(diagonal, m, (A_i, C_i), b_i + mv(C_i, eta_j))
    A = mm(A_j, X_A)
    b = mv(A_j, x) + b_j
    C = sym(mm(mm(A_j, sym(X_C)), tr(A_j)) + C_j)
    eta = mv(tr(A_i), eta_j - mv(J_j, x)) + eta_i
    J = sym(mm(tr(A_i), mm(J_j, X_A)) + J_i)
    return A, b, C, eta, J


def _filter_combine_diagonal(earlier: tuple, later: tuple) -> tuple:
    # `_filter_combine` for diagonal elements, written out elementwise with each output
    # a separate expression of the inputs: XLA then fuses each into one loop and
    # stores no (N, n) intermediates (shared quotients like M^{-1} A_i would be
    # stored, as XLA does not duplicate divisions): 7 N n instead of 10.6 N n for the
    # filter at n = 256, N = 1e4.
    A_i, b_i, C_i, eta_i, J_i = earlier
    A_j, b_j, C_j, eta_j, J_j = later
    m = 1 + C_i * J_j
    return (
        A_j * A_i / m,
        A_j * (b_i + C_i * eta_j) / m + b_j,
        A_j * A_j * C_i / m + C_j,
        A_i * (eta_j - J_j * (b_i + C_i * eta_j) / m) + eta_i,
        A_i * A_i * J_j / m + J_i,
    )


def _interleave(even: Array, odd: Array) -> Array:
    # (e0, o0, e1, o1, ...): a stack and a free reshape, which XLA writes as one
    # concatenation (jax's own pad + add interleave stores a padded copy first).
    num = even.shape[0] + odd.shape[0]
    odd = jnp.concatenate([odd, jnp.zeros_like(even[odd.shape[0] :])])
    pairs = jnp.stack([even, odd], axis=1)
    return pairs.reshape((2 * even.shape[0],) + even.shape[1:])[:num]


def _rows(x: Array, rows: range, shift: int = 0) -> Array:
    # x[rows] (shifted by `shift`) as a static strided slice, which XLA fuses.
    return jax.lax.slice_in_dim(x, rows.start + shift, rows.stop + shift, rows.step)


def _lifted_associative_scan(
    combine: Callable[[tuple, tuple], tuple],
    lift: Callable[[range], tuple],
    num: int,
    *,
    reverse: bool = False,
) -> tuple:
    """`jax.lax.associative_scan(combine, lift(range(num)), reverse=reverse)`, without
    storing `lift(range(num))`.

    `lift(rows)` returns the scan elements for the rows in the `range` `rows` (made by
    slicing its inputs), row by row and cheaply. The first level of the scan computes
    the elements it needs inside its two combine passes, where XLA fuses them, so
    only the half-length reduced elements are ever stored.
    """

    def lifted(positions: range) -> tuple:
        # Positions in scan order; with `reverse`, position p is row num - 1 - p.
        if not reverse:
            return lift(positions)
        if len(positions) == 0:
            return lift(range(0))
        rows = range(num - 1 - positions[-1], num - positions[0], positions.step)
        return jax.tree.map(lambda x: jnp.flip(x, axis=0), lift(rows))

    if num < 2:
        return lift(range(num))
    # As jax.lax.associative_scan: combine pairs, scan those, fill in the evens.
    reduced = combine(lifted(range(0, num - 1, 2)), lifted(range(1, num, 2)))
    odd = jax.lax.associative_scan(combine, reduced)
    odd_before = jax.tree.map(lambda x: x[:-1], odd) if num % 2 == 0 else odd
    even_rest = combine(odd_before, lifted(range(2, num, 2)))
    even = jax.tree.map(
        lambda first, rest: jnp.concatenate([first, rest]),
        lifted(range(0, 1)),
        even_rest,
    )
    scanned = jax.tree.map(_interleave, even, odd)
    if reverse:
        scanned = jax.tree.map(lambda x: jnp.flip(x, axis=0), scanned)
    return scanned


def solve_damped_recurrence(
    transitions: Inexact[Array, "steps n n"] | Inexact[Array, "steps n"],
    offsets: Inexact[Array, "steps n"],
    damping: Real[ArrayLike, ""],
    *,
    mesh: Mesh | None = None,
) -> Inexact[Array, "steps+1 n"]:
    r"""The Levenberg-Marquardt-damped solution of $d_{i+1} = A_i d_i + b_i$.

    Returns the minimiser over $d_1, \ldots, d_N$ (with $d_0 = 0$) of

    $$\sum_{i=0}^{N-1} \lVert d_{i+1} - A_i d_i - b_i \rVert^2
        + \lambda \sum_{i=1}^{N} \lVert d_i \rVert^2,$$

    which is the undamped recurrence solution at $\lambda = 0$ and shrinks towards
    zero as $\lambda$ grows (a trust region on the Newton step of DEER).

    **State-space view.** It is the posterior mean (MAP = smoothed mean) of the
    linear-Gaussian model $d_0 = 0$, $d_{i+1} = A_i d_i + b_i + w_i$ with
    $w_i \sim \mathcal{N}(0, I)$, observed as $0 = d_i + v_i$ with
    $v_i \sim \mathcal{N}(0, I/\lambda)$ for $i \geq 1$. The parallel Kalman filter
    and Rauch-Tung-Striebel smoother of Särkkä and García-Fernández (2021) compute it
    with two `jax.lax.associative_scan`s, $O(\log N)$ depth:

    1. *Filter.* Element $k = 1, \ldots, N$ describes step $k$: the Gaussian
       $p(d_k \mid d_{k-1}, y_k) = \mathcal{N}(\mathcal{A}_k d_{k-1} + \beta_k,
       \mathcal{C}_k)$ and the information $y_k$ gives about $d_{k-1}$,
       $\propto \exp(-\tfrac12 d^\top \mathcal{J}_k d + \eta_k^\top d)$. With
       $\gamma = 1/(1 + \lambda)$ and $F = A_{k-1}$, $u = b_{k-1}$ they are
       $(\mathcal{A}, \beta, \mathcal{C}, \eta, \mathcal{J}) =
       (\gamma F, \gamma u, \gamma I, -(1-\gamma) F^\top u, (1-\gamma) F^\top F)$,
       and $F = 0$ for $k = 1$ since $d_0 = 0$ exactly. Their (associative)
       combination conditions one segment's end on the next segment's observations;
       the prefix combinations hold the filtered means $m_k$ and covariances $P_k$.
    2. *Smoother.* The RTS recursion $d_k = m_k + E_k (d_{k+1} - F_k m_k - u_k)$,
       $E_k = P_k F_k^\top (F_k P_k F_k^\top + I)^{-1}$, $d_N = m_N$, is itself an
       affine recurrence run backwards: a second scan over $(E_k, g_k)$, with
       $g_k = m_k - E_k (F_k m_k + u_k)$. Only the means are needed, so the smoothed
       covariances are never formed.

    All quantities are finite at $\lambda = 0$ (then $\mathcal{J} = \eta = 0$, the
    filter is the plain affine scan and the smoother returns it unchanged) and
    bounded for $\lambda > 0$ ($P_k \preceq I / \lambda$, $\lVert E_k \rVert
    \lesssim 1$), so nothing divides by $\lambda$ and the backward pass is stable.

    With dense $A_i$ each combination costs a few $n \times n$ products and one
    pivoted elimination, $O(N n^3)$ work in all (about 9 times the undamped scan's);
    with diagonal $A_i$ every quantity is diagonal and the problem is $n$
    independent scalar ones, $O(N n)$ work and memory. Neither scan stores its
    elements: they are made from the inputs inside the scan's first level, so XLA's
    temporaries and output come to about $7 N n$ values with diagonal $A_i$ (the
    undamped scan: $3.5 N n$).

    **Arguments:**

    - `transitions`: the matrices $A_i$, shape `(N, n, n)`, or their diagonals,
        shape `(N, n)`.
    - `offsets`: the vectors $b_i$, shape `(N, n)`.
    - `damping`: the scalar $\lambda \geq 0$; may be traced.
    - `mesh`: optional `jax.sharding.Mesh` with an axis named `"time"`: split the
        steps across its devices, both scans as
        [`diffrax_deer.solve_affine_recurrence`][] splits its one (`None`: one
        device).

    **Returns:**

    The array $(d_0 = 0, d_1, \ldots, d_N)$ of shape `(N + 1, n)`.
    """
    if mesh is not None:
        from .sharded_scan import sharded_damped_recurrence

        return sharded_damped_recurrence(transitions, offsets, damping, mesh)
    diagonal = transitions.ndim == offsets.ndim
    dtype = jnp.result_type(transitions, offsets)
    transitions = transitions.astype(dtype)
    offsets = offsets.astype(dtype)
    damping = jnp.asarray(damping, dtype=dtype)
    if offsets.shape[0] == 0:
        return jnp.zeros((1,) + offsets.shape[1:], dtype)
    means, covariances = _kalman_filter(diagonal, transitions, offsets, damping)
    return _rts_smoother(diagonal, transitions, offsets, means, covariances)


def _broadcast_rows(flag: Array, x: Array) -> Array:
    # A per-row flag, shaped to broadcast against `x`.
    return flag.reshape(flag.shape + (1,) * (x.ndim - 1))


def _kalman_filter(
    diagonal: bool, transitions: Array, offsets: Array, damping: Array
) -> tuple[Array, Array]:
    """The filtered means $m_k$ and covariances $P_k$, $k = 1, \\ldots, N$ (step 1
    of [`diffrax_deer.solve_damped_recurrence`][])."""
    dtype = offsets.dtype
    mm = functools.partial(_matmul, diagonal)
    mv = functools.partial(_matvec, diagonal)
    tr = functools.partial(_transpose, diagonal)
    # gamma = 1/(1 + lambda) and 1 - gamma = lambda/(1 + lambda), each computed
    # directly: no cancellation at large lambda, no division by lambda.
    gamma = 1 / (1 + damping)
    gain = damping / (1 + damping)

    def filter_elements(rows: range) -> tuple:
        F, u = _rows(transitions, rows), _rows(offsets, rows)
        # Step 1 starts from d_0 = 0 exactly: F = 0.
        first = jnp.arange(rows.start, rows.stop, rows.step) == 0
        F = jnp.where(_broadcast_rows(first, F), jnp.zeros((), dtype), F)
        return (
            gamma * F,
            gamma * u,
            gamma * _identity_like(diagonal, F),
            -gain * mv(tr(F), u),
            gain * mm(tr(F), F),
        )

    if diagonal:
        filter_combine = _filter_combine_diagonal
    else:
        filter_combine = functools.partial(_filter_combine, False)
    _, means, covariances, _, _ = _lifted_associative_scan(
        filter_combine, filter_elements, offsets.shape[0]
    )
    return means, covariances


def _rts_smoother(
    diagonal: bool,
    transitions: Array,
    offsets: Array,
    means: Array,
    covariances: Array,
) -> Array:
    """The smoothed means $(d_0 = 0, d_1, \\ldots, d_N)$ from the filtered ones
    (step 2 of [`diffrax_deer.solve_damped_recurrence`][])."""
    num_steps = offsets.shape[0]
    dtype = offsets.dtype
    mm = functools.partial(_matmul, diagonal)
    mv = functools.partial(_matvec, diagonal)
    tr = functools.partial(_transpose, diagonal)
    # The smoother d_k = E_k d_{k+1} + g_k runs from d_N = m_N down to d_1 (rows
    # 0 .. N-2 of the filter's outputs), in reverse. Its first step, row N-2, folds in
    # the known d_N = m_N (with E = 0 there), so the scan's offsets are the d_k.
    last_mean = means[-1]

    def smoothing_elements(rows: range) -> tuple:
        m, P = _rows(means, rows), _rows(covariances, rows)
        F, u = _rows(transitions, rows, shift=1), _rows(offsets, rows, shift=1)
        FP = mm(F, P)
        S = mm(FP, tr(F)) + _identity_like(diagonal, FP)
        # E = P F^T S^{-1} = (S^{-1} F P)^T, with S symmetric positive definite >= I.
        (SinvFP,), _ = _solve(diagonal, S, (FP,), None)
        E = tr(SinvFP)
        g = m - mv(E, mv(F, m) + u)
        first = jnp.arange(rows.start, rows.stop, rows.step) == num_steps - 2
        g = jnp.where(_broadcast_rows(first, g), g + mv(E, last_mean[None]), g)
        E = jnp.where(_broadcast_rows(first, E), jnp.zeros((), dtype), E)
        return E, g

    _, smoothed = _lifted_associative_scan(
        # The smoothing elements compose as affine maps: the plain scan's combine.
        _compose_diagonal if diagonal else _compose,
        smoothing_elements,
        num_steps - 1,
        reverse=True,
    )
    zero = jnp.zeros_like(last_mean)
    return jnp.concatenate([zero[None], smoothed, last_mean[None]])
