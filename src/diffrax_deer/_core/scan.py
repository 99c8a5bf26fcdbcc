"""Parallel solution of an affine (linear, inhomogeneous) recurrence."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Inexact


def _compose(
    earlier: tuple[Array, Array], later: tuple[Array, Array]
) -> tuple[Array, Array]:
    # (A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2): apply `earlier` first.
    transition_earlier, offset_earlier = earlier
    transition_later, offset_later = later
    transition = transition_later @ transition_earlier
    offset = (transition_later @ offset_earlier[..., None])[..., 0] + offset_later
    return transition, offset


def _compose_diagonal(
    earlier: tuple[Array, Array], later: tuple[Array, Array]
) -> tuple[Array, Array]:
    # The same with diagonal A, stored as vectors: everything is elementwise.
    transition_earlier, offset_earlier = earlier
    transition_later, offset_later = later
    return (
        transition_later * transition_earlier,
        transition_later * offset_earlier + offset_later,
    )


def is_diagonal(transitions: Array, offsets: Array) -> bool:
    """Whether `transitions` holds diagonals `(N, n)` rather than matrices."""
    return transitions.ndim == offsets.ndim


def solve_affine_recurrence(
    transitions: Inexact[Array, "steps n n"] | Inexact[Array, "steps n"],
    offsets: Inexact[Array, "steps n"],
    initial: Inexact[Array, " n"],
    *,
    mesh: Mesh | None = None,
) -> Inexact[Array, "steps+1 n"]:
    r"""Solves $d_{i+1} = A_i d_i + b_i$ for all $i$ at once.

    Affine maps compose associatively, $(A_2, b_2) \circ (A_1, b_1) =
    (A_2 A_1, A_2 b_1 + b_2)$, so `jax.lax.associative_scan` produces every prefix
    composition in $O(\log N)$ depth and $O(N n^3)$ work; with diagonal $A_i$
    (quasi-DEER) composition is elementwise, $O(N n)$ work and memory. The result is
    linear in `offsets` and `initial`, so JAX can transpose it: reverse-mode
    derivatives become the same scan run backwards with $A_i^\top$.

    With a `mesh`, the steps are split across the devices of its `"time"` axis:
    each device scans its own block of steps, the $P$ blocks' composed maps
    ($P$ matrices $n \times n$) are exchanged and scanned, and each device applies
    the composition of the blocks before it to its own prefixes. Only $O(P n^2)$
    values move between devices, for any $N$; the result is the same up to
    round-off.

    **Arguments:**

    - `transitions`: the matrices $A_i$, shape `(N, n, n)`, or their diagonals,
        shape `(N, n)`.
    - `offsets`: the vectors $b_i$, shape `(N, n)`.
    - `initial`: the starting value $d_0$, shape `(n,)`.
    - `mesh`: optional `jax.sharding.Mesh` with an axis named `"time"`: split the
        steps across its devices (`None`: one device).

    **Returns:**

    The array $(d_0, d_1, \ldots, d_N)$ of shape `(N + 1, n)`.
    """
    if mesh is not None:
        from .sharded_scan import sharded_affine_recurrence

        return sharded_affine_recurrence(transitions, offsets, initial, mesh)
    # d_1 = A_0 d_0 + b_0 folded into the first offset: then only the offsets of the
    # prefix compositions are needed, and XLA drops the last level's transitions
    # instead of storing all N prefix products (N n x n matrices, or N n values).
    if is_diagonal(transitions, offsets):
        combine = _compose_diagonal
        first = transitions[0] * initial + offsets[0]
    else:
        combine = _compose
        first = transitions[0] @ initial + offsets[0]
    offsets = offsets.at[0].set(first)
    _, rest = jax.lax.associative_scan(combine, (transitions, offsets))
    return jnp.concatenate([initial[None], rest], axis=0)
