r"""The affine and damped recurrences with the time axis split across devices.

Each of the $P$ devices of a mesh axis named `"time"` holds a block of
$B = \lceil (N + 1) / P \rceil$ consecutive nodes and the steps out of them. An
associative scan over the whole sequence then splits into

1. a local scan of each block (no communication);
2. an exchange of the $P$ per-block composed elements (for the affine recurrence the
   maps $(A, b)$ of each block: $P$ matrices of size $n \times n$), followed on every
   device by a scan over those $P$ elements, which gives each block the composition
   of all blocks before it;
3. that composition applied to every local prefix (no communication).

So only $O(P n^2)$ values move between devices, whatever $N$. Reverse-mode
derivatives transpose the same program (the exchange becomes a reduce-scatter of the
same size).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, ArrayLike, Inexact, Real

from .damped_scan import (
    _filter_combine,
    _filter_combine_diagonal,
    _identity_like,
    _lifted_associative_scan,
    _matmul,
    _matvec,
    _rows,
    _solve,
    _transpose,
)
from .scan import _compose, _compose_diagonal, is_diagonal


TIME_AXIS = "time"


def num_time_blocks(mesh: Mesh) -> int:
    """The number of devices along the mesh's `"time"` axis."""
    return int(mesh.shape[TIME_AXIS])


def check_time_mesh(mesh: Mesh) -> None:
    """Raises a clear error unless `mesh` is a `jax.sharding.Mesh` with a `"time"`
    axis."""
    if not isinstance(mesh, Mesh):
        raise ValueError(
            "`mesh` must be a `jax.sharding.Mesh` with an axis named 'time', e.g. "
            "`jax.sharding.Mesh(jax.devices(), ('time',))`; got "
            f"{type(mesh).__name__}."
        )
    if TIME_AXIS not in mesh.axis_names:
        raise ValueError(
            "`mesh` must have an axis named 'time' (the devices the time axis is "
            f"split over); got axes {mesh.axis_names!r}."
        )


def padded_length(num: int, mesh: Mesh) -> int:
    """The smallest multiple of the number of time blocks that is at least `num`."""
    blocks = num_time_blocks(mesh)
    return -(-num // blocks) * blocks


def _pad_rows(x: Array, num: int) -> Array:
    # x padded with zero rows to `num` rows. `lax.pad`, not a concatenation: XLA's
    # partitioner pads a split array in place, but gathers it whole to concatenate.
    padding = [(0, num - x.shape[0], 0)] + [(0, 0, 0)] * (x.ndim - 1)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), padding)


def _time_spec(x: Array) -> PartitionSpec:
    return PartitionSpec(TIME_AXIS, *([None] * (x.ndim - 1)))


def _block_scan(
    combine: Callable[[tuple, tuple], tuple],
    local_prefixes: tuple,
    *,
    reverse: bool = False,
) -> tuple[tuple, Array]:
    """Inside `shard_map`: the carry into this block, from the local inclusive
    prefixes of every block.

    Gathers each block's composed element (its last local prefix, or its first with
    `reverse`), scans those $P$ elements on every device, and returns the composition
    of all blocks before this one in scan order, and whether there is one (`False`
    on the first block).
    """
    num_blocks = jax.lax.axis_size(TIME_AXIS)
    index = jax.lax.axis_index(TIME_AXIS)
    end = 0 if reverse else -1
    totals = jax.tree.map(
        lambda x: jax.lax.all_gather(x[end], TIME_AXIS), local_prefixes
    )
    scanned = jax.lax.associative_scan(combine, totals, reverse=reverse)
    before = index + 1 if reverse else index - 1
    has_carry = (before >= 0) & (before < num_blocks)
    safe = jnp.clip(before, 0, num_blocks - 1)
    carry = jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, safe, keepdims=False), scanned
    )
    return carry, has_carry


def _shard_map(body: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    return jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={TIME_AXIS}
    )


def sharded_affine_recurrence(
    transitions: Inexact[Array, "steps n n"] | Inexact[Array, "steps n"],
    offsets: Inexact[Array, "steps n"],
    initial: Inexact[Array, " n"],
    mesh: Mesh,
) -> Inexact[Array, "steps+1 n"]:
    r"""[`diffrax_deer.solve_affine_recurrence`][] with the steps split across the
    devices of the mesh axis `"time"`.

    The nodes are split into $P$ blocks of $B = \lceil (N + 1) / P \rceil$, and
    block $p$ holds the steps out of its nodes, $pB, \ldots, pB + B - 1$. It scans
    its own maps into the local prefixes $(\bar A_k, \bar b_k)$ (with $d_0$ folded
    into the first block's first offset); the blocks' composed maps
    $(\bar A_{B-1}, \bar b_{B-1})$ are gathered, $P$ of them, and scanned on every
    device into the state $c_p = d_{pB}$ at the start of each block; then
    $d_{pB + k + 1} = \bar A_k c_p + \bar b_k$ locally. `N + 1` need not be a
    multiple of $P$: the steps are padded with zero maps, and the padding cut off.

    **Arguments:**

    - `transitions`: the $A_i$, shape `(N, n, n)`, or their diagonals `(N, n)`.
    - `offsets`: the $b_i$, shape `(N, n)`.
    - `initial`: $d_0$, shape `(n,)`.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `"time"`.

    **Returns:**

    $(d_0, \ldots, d_N)$, shape `(N + 1, n)`, split along `"time"` in blocks of $B$
    nodes.
    """
    diagonal = is_diagonal(transitions, offsets)
    combine = _compose_diagonal if diagonal else _compose
    num_nodes = offsets.shape[0] + 1
    # Blocks of nodes: block p outputs d_{pB}, ..., d_{pB + B - 1}, so the result is
    # split as the nodes are (no shift by one between devices), and its steps are
    # those out of its nodes (the last block's last step is padding).
    transitions = _pad_rows(transitions, padded_length(num_nodes, mesh))
    offsets = _pad_rows(offsets, padded_length(num_nodes, mesh))

    def body(transitions, offsets, initial):
        first = (
            transitions[0] * initial if diagonal else transitions[0] @ initial
        ) + offsets[0]
        is_first_block = jax.lax.axis_index(TIME_AXIS) == 0
        offsets = offsets.at[0].set(jnp.where(is_first_block, first, offsets[0]))
        local = jax.lax.associative_scan(combine, (transitions, offsets))
        (_, start), has_carry = _block_scan(combine, local)
        local_transitions, local_offsets = local
        if diagonal:
            carried = local_transitions * start[None] + local_offsets
        else:
            carried = (local_transitions @ start[:, None])[..., 0] + local_offsets
        states = jnp.where(has_carry, carried, local_offsets)
        start = jnp.where(has_carry, start, initial)
        return jnp.concatenate([start[None], states[:-1]])

    nodes = _shard_map(
        body,
        mesh,
        in_specs=(_time_spec(transitions), _time_spec(offsets), PartitionSpec()),
        out_specs=_time_spec(offsets),
    )(transitions, offsets, initial)
    return nodes[:num_nodes]


def _broadcast_like(carry: tuple, local: tuple) -> tuple:
    return jax.tree.map(lambda c, x: jnp.broadcast_to(c, x.shape), carry, local)


def _carry_into_block(combine, local: tuple, *, reverse: bool = False) -> tuple:
    # The global inclusive prefixes of this block: the blocks before it (in scan
    # order) composed with each local prefix.
    carry, has_carry = _block_scan(combine, local, reverse=reverse)
    carried = combine(_broadcast_like(carry, local), local)
    return jax.tree.map(lambda c, x: jnp.where(has_carry, c, x), carried, local)


def _row_flags(flag: Array, x: Array) -> Array:
    # A per-row flag, shaped to broadcast against `x`.
    return flag.reshape(flag.shape + (1,) * (x.ndim - 1))


def _sharded_filter(diagonal, transitions, offsets, damping, rows):
    """The filtered means and covariances of this block's rows (global numbers
    `rows`): the Kalman filter of `solve_damped_recurrence`, carried across blocks."""
    dtype = offsets.dtype
    gamma = 1 / (1 + damping)
    gain = damping / (1 + damping)

    def filter_elements(local_rows: range) -> tuple:
        F, u = _rows(transitions, local_rows), _rows(offsets, local_rows)
        # Step 1 starts from d_0 = 0 exactly: F = 0.
        first = _rows(rows, local_rows) == 0
        F = jnp.where(_row_flags(first, F), jnp.zeros((), dtype), F)
        Ft = _transpose(diagonal, F)
        return (
            gamma * F,
            gamma * u,
            gamma * _identity_like(diagonal, F),
            -gain * _matvec(diagonal, Ft, u),
            gain * _matmul(diagonal, Ft, F),
        )

    if diagonal:
        combine = _filter_combine_diagonal
    else:
        combine = functools.partial(_filter_combine, False)
    local = _lifted_associative_scan(combine, filter_elements, offsets.shape[0])
    _, means, covariances, _, _ = _carry_into_block(combine, local)
    return means, covariances


def _from_next_block(x: Array) -> Array:
    # Row 0 of the next block's `x` (zeros on the last block).
    num_blocks = jax.lax.axis_size(TIME_AXIS)
    pairs = [(p, p - 1) for p in range(1, num_blocks)]
    return jax.lax.ppermute(x[0], TIME_AXIS, pairs)


def _from_previous_block(x: Array) -> Array:
    # The last row of the previous block's `x` (zeros on the first block).
    num_blocks = jax.lax.axis_size(TIME_AXIS)
    pairs = [(p, p + 1) for p in range(num_blocks - 1)]
    return jax.lax.ppermute(x[-1], TIME_AXIS, pairs)


def _sharded_smoother(diagonal, transitions, offsets, means, covariances, rows, num):
    """This block's smoothed means $d_{r+1}$ for its rows $r$: the RTS smoother of
    `solve_damped_recurrence`, with row $N - 1$ the known end $d_N = m_N$ and rows
    past it (padding) zero maps, run backwards and carried across blocks."""
    dtype = offsets.dtype
    next_transitions = jnp.concatenate(
        [transitions[1:], _from_next_block(transitions)[None]]
    )
    next_offsets = jnp.concatenate([offsets[1:], _from_next_block(offsets)[None]])

    def smoothing_elements(local_rows: range) -> tuple:
        m, P = _rows(means, local_rows), _rows(covariances, local_rows)
        F = _rows(next_transitions, local_rows)
        u = _rows(next_offsets, local_rows)
        E, g = _smoothing_gain(diagonal, m, P, F, u)
        row = _rows(rows, local_rows)
        last, beyond = row == num - 1, row >= num
        g = jnp.where(_row_flags(last, g), m, g)
        g = jnp.where(_row_flags(beyond, g), jnp.zeros((), dtype), g)
        E = jnp.where(_row_flags(last | beyond, E), jnp.zeros((), dtype), E)
        return E, g

    combine = _compose_diagonal if diagonal else _compose
    local = _lifted_associative_scan(
        combine, smoothing_elements, offsets.shape[0], reverse=True
    )
    _, smoothed = _carry_into_block(combine, local, reverse=True)
    return smoothed


def _smoothing_gain(diagonal, m, P, F, u):
    # E = P F^T S^{-1} = (S^{-1} F P)^T with S = F P F^T + I (symmetric, >= I), and
    # g = m - E (F m + u): the smoother's step d = E d_next + g.
    FP = _matmul(diagonal, F, P)
    S = _matmul(diagonal, FP, _transpose(diagonal, F)) + _identity_like(diagonal, FP)
    (SinvFP,), _ = _solve(diagonal, S, (FP,), None)
    E = _transpose(diagonal, SinvFP)
    g = m - _matvec(diagonal, E, _matvec(diagonal, F, m) + u)
    return E, g


def sharded_damped_recurrence(
    transitions: Inexact[Array, "steps n n"] | Inexact[Array, "steps n"],
    offsets: Inexact[Array, "steps n"],
    damping: Real[ArrayLike, ""],
    mesh: Mesh,
) -> Inexact[Array, "steps+1 n"]:
    r"""[`diffrax_deer.solve_damped_recurrence`][] with the steps split across the
    devices of the mesh axis `"time"`.

    Both scans of the parallel Kalman smoother are split as the affine recurrence
    is (see [`diffrax_deer.solve_affine_recurrence`][]): the filter's local prefixes
    are composed with the gathered composition of the blocks before (5 arrays of
    size $n \times n$ or $n$ per block), the smoother's, run backwards, with that of
    the blocks after ($n \times n$ and $n$ per block). Each block's last smoothing
    element needs the next block's first transition and offset: one more
    $n \times n$ and $n$ from each neighbour.

    **Arguments:**

    - `transitions`: the $A_i$, shape `(N, n, n)`, or their diagonals `(N, n)`.
    - `offsets`: the $b_i$, shape `(N, n)`.
    - `damping`: the scalar $\lambda \geq 0$; may be traced.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `"time"`.

    **Returns:**

    $(d_0 = 0, d_1, \ldots, d_N)$, shape `(N + 1, n)`.
    """
    diagonal = is_diagonal(transitions, offsets)
    dtype = jnp.result_type(transitions, offsets)
    transitions = transitions.astype(dtype)
    offsets = offsets.astype(dtype)
    damping = jnp.asarray(damping, dtype=dtype)
    num_steps = offsets.shape[0]
    if num_steps == 0:
        return jnp.zeros((1,) + offsets.shape[1:], dtype)
    # Blocks of nodes, as in `sharded_affine_recurrence`.
    transitions = _pad_rows(transitions, padded_length(num_steps + 1, mesh))
    offsets = _pad_rows(offsets, padded_length(num_steps + 1, mesh))

    def body(transitions, offsets, damping):
        block = offsets.shape[0]
        index = jax.lax.axis_index(TIME_AXIS)
        rows = index * block + jnp.arange(block, dtype=index.dtype)
        means, covariances = _sharded_filter(
            diagonal, transitions, offsets, damping, rows
        )
        smoothed = _sharded_smoother(
            diagonal, transitions, offsets, means, covariances, rows, num_steps
        )
        # Row r holds d_{r+1}: this block's first node is the previous block's last
        # row (d_0 = 0 on the first block).
        return jnp.concatenate([_from_previous_block(smoothed)[None], smoothed[:-1]])

    spec = _time_spec(offsets)
    nodes = _shard_map(
        body,
        mesh,
        in_specs=(_time_spec(transitions), spec, PartitionSpec()),
        out_specs=spec,
    )(transitions, offsets, damping)
    return nodes[: num_steps + 1]
