r"""A window's discretisation evaluated block by block, one block of nodes per device.

With a mesh, the $N + 1$ nodes of a window are padded to $M = PB$, a multiple of the
$P$ devices of its `"time"` axis, and split into $P$ blocks of
$B = \lceil (N + 1) / P \rceil$ consecutive nodes; block $p$ also holds the
intervals out of its nodes, $pB, \ldots, pB + B - 1$ (the layout of
[`diffrax_deer.solve_affine_recurrence`][] with a mesh). Every quantity of interval
$i$ depends only on nodes $i$ and $i + 1$ and that interval's stages, so block $p$
computes those of its own intervals from its nodes and one more, the next block's
first: one row of `ts`, of `ys` (and of a node update) from each neighbour is all
that crosses devices, whatever $N$. Each block runs the wrapped discretisation under
`shard_map`, so its residuals, Jacobians and per-interval solves are local work.

The padding is inert. The padded nodes sit at $t_N$ (intervals of zero length) with
the value $y_0$, and every padded interval's residual, transition, offset and stage
update is set to zero, so Newton never moves them; and since $y_0$ is the window's
own first node, no maximum over nodes (Newton's norms, the scale of `atol=None`)
changes. The first $N + 1$ nodes follow exactly the iterates of the unsplit window.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Inexact, PyTree, Real

from .discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    JacobianMode,
    Residual,
    VectorField,
)
from .sharded_scan import (
    TIME_AXIS,
    _from_next_block,
    _pad_rows,
    padded_length,
    sharded_affine_recurrence,
    sharded_damped_recurrence,
)


def _split(x: Array, mesh: Mesh) -> Array:
    # Rows split along the mesh's time axis (uneven: the last block shorter).
    spec = PartitionSpec(TIME_AXIS, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _pad_with(x: Array, num: int, fill: Array) -> Array:
    # `x` with rows past its own set to `fill`, to `num` rows (padded and selected:
    # XLA's partitioner pads a split array in place, but gathers it to concatenate).
    beyond = (jnp.arange(num) >= x.shape[0]).reshape((num,) + (1,) * (x.ndim - 1))
    return jnp.where(beyond, fill, _pad_rows(x, num))


def _with_next_first(x: Array) -> Array:
    # Inside `shard_map`: this block's rows and the next block's first (the last
    # block repeats its own last row: an interval of zero length, past the window).
    following = _from_next_block(x)
    is_last = jax.lax.axis_index(TIME_AXIS) == jax.lax.axis_size(TIME_AXIS) - 1
    return jnp.concatenate([x, jnp.where(is_last, x[-1], following)[None]])


def _mask_beyond(tree: PyTree[Array], rows: Array, num_steps: int) -> PyTree[Array]:
    # Zero in the rows (intervals) past the window's `num_steps`.
    def mask(x):
        beyond = (rows >= num_steps).reshape(rows.shape + (1,) * (x.ndim - 1))
        return jnp.where(beyond, jnp.zeros((), x.dtype), x)

    return jtu.tree_map(mask, tree)


def _traceable_in_blocks(
    vector_field: VectorField, ts: Array, ys: Array, args: PyTree
) -> VectorField:
    # `vector_field` as a jaxpr with its arrays hoisted (traced here, outside
    # `shard_map`): equinox's closure-converted functions check their arguments'
    # types against the example's, shardings included, which every value inside
    # `shard_map` fails.
    # (A fresh function: `closure_convert` hashes it, and a Module with list
    # fields cannot be hashed.)
    converted, consts = jax.closure_convert(
        lambda t, y, args: vector_field(t, y, args), ts[0], ys[0], args
    )

    def field(t, y, args):
        return converted(t, y, args, *consts)

    return field


class _Layout(eqx.Module):
    """The blocks of one window: `num_steps` intervals over the mesh's devices."""

    mesh: Mesh = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    @property
    def num_nodes(self) -> int:
        """$M$: the padded number of nodes, a multiple of the devices."""
        return padded_length(self.num_steps + 1, self.mesh)

    def on_blocks(
        self,
        body: Callable,
        *,
        nodes: PyTree[Array] = (),
        intervals: PyTree[Array] | None = None,
        blocked: PyTree[Array] | None = None,
        replicated: PyTree[Any] = None,
    ) -> PyTree[Array]:
        """Runs `body(nodes, intervals, blocked, replicated, rows)` on every block.

        `nodes` have $M$ rows (each block gets its own $B$ and the next block's
        first), `intervals` $M - 1$ rows (each block gets its $B$, the last one
        padded), `blocked` a leading axis of one entry per block (as `linearise`
        returns them), `replicated` (any PyTree) goes whole to every block;
        `rows` are the global numbers of the block's intervals. `body` returns
        per-interval arrays of $B$ rows, or arrays with a leading axis of 1; they
        come back concatenated over the blocks, $M$ rows or $P$ entries.
        """
        intervals = jtu.tree_map(lambda x: _pad_rows(x, self.num_nodes), intervals)

        def on_block(nodes, intervals, blocked):
            nodes = jtu.tree_map(_with_next_first, nodes)
            blocked = jtu.tree_map(lambda x: x[0], blocked)
            block = self.num_nodes // jax.lax.axis_size(TIME_AXIS)
            index = jax.lax.axis_index(TIME_AXIS)
            rows = index * block + jnp.arange(block, dtype=index.dtype)
            # Closed over, not passed: replicated on every device, and with the
            # types the vector field was closure-converted with.
            return body(nodes, intervals, blocked, replicated, rows)

        split = PartitionSpec(TIME_AXIS)
        return jax.shard_map(
            on_block,
            mesh=self.mesh,
            in_specs=(split, split, split),
            out_specs=split,
            axis_names={TIME_AXIS},
            # The vector field is a jaxpr traced outside (`_traceable_in_blocks`),
            # which mixes replicated and per-block values unannotated.
            check_vma=False,
        )(nodes, intervals, blocked)

    def intervals_of(self, tree: PyTree[Array] | None) -> PyTree[Array] | None:
        # Per-interval outputs of `on_blocks` ($M$ rows) cut to the $M - 1$
        # intervals between the padded nodes.
        return jtu.tree_map(lambda x: x[: self.num_nodes - 1], tree)


class BlockedLinearisation(AbstractLinearisation):
    r"""A linearisation held block by block, as
    [`NodeBlocks`][diffrax_deer._core.node_blocks.NodeBlocks] makes it: every
    method runs the wrapped linearisation's on each block, and the recurrences are
    split across the devices ([`diffrax_deer.solve_affine_recurrence`][] and
    [`diffrax_deer.solve_damped_recurrence`][] with the mesh). Whole-window arrays
    have the padded window's $M$ nodes and $M - 1$ intervals; the padded intervals'
    transitions, offsets and stage updates are zero.

    **Arguments:**

    - `blocked`: the wrapped discretisation's linearisation of every block (each
        leaf with a leading axis of one entry per block).
    - `layout`: the blocks.
    """

    blocked: AbstractLinearisation
    layout: _Layout

    def _per_interval(self, method: Callable, nodes=(), intervals=None):
        layout = self.layout

        def body(nodes, intervals, linearisation, _, rows):
            return _mask_beyond(
                method(linearisation, nodes, intervals), rows, layout.num_steps
            )

        out = layout.on_blocks(
            body, nodes=nodes, intervals=intervals, blocked=self.blocked
        )
        return layout.intervals_of(out)

    @property
    def transitions(self):
        return self._per_interval(lambda linearisation, *_: linearisation.transitions)

    def offsets(self, rhs):
        return self._per_interval(
            lambda linearisation, _, rhs: linearisation.offsets(rhs), intervals=rhs
        )

    def stage_offsets(self, rhs):
        return self._per_interval(
            lambda linearisation, _, rhs: linearisation.stage_offsets(rhs),
            intervals=rhs,
        )

    def stage_update(self, rhs, delta_ys):
        return self._per_interval(
            lambda linearisation, delta_ys, rhs: linearisation.stage_update(
                rhs, delta_ys
            ),
            nodes=delta_ys,
            intervals=rhs,
        )

    def recurrence(self, offsets, initial):
        return sharded_affine_recurrence(
            self.transitions, offsets, initial, self.layout.mesh
        )

    def damped_recurrence(self, offsets, damping):
        return sharded_damped_recurrence(
            self.transitions, offsets, damping, self.layout.mesh
        )


class NodeBlocks(AbstractDiscretisation):
    r"""A discretisation whose stage unknowns, residuals and linearisations are
    computed block by block over a mesh's `"time"` axis, one block of nodes per
    device, on the padded window (see the module's docstring: $M$ nodes, $M - 1$
    intervals, the padding inert). Convert with `pad_times`, `pad_nodes`,
    `pad_intervals` and back with `unpad_nodes`, `unpad_intervals`.

    **Arguments:**

    - `discretisation`: the wrapped discretisation.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `"time"`.
    - `num_steps`: $N$, the window's own intervals.
    """

    discretisation: AbstractDiscretisation = eqx.field(static=True)
    mesh: Mesh = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    @property
    def _layout(self) -> _Layout:
        return _Layout(self.mesh, self.num_steps)

    def order(self) -> int:
        return self.discretisation.order()

    def pad_times(self, ts: Real[Array, " nodes"]) -> Real[Array, " padded"]:
        """The grid padded with $t_N$ (intervals of zero length)."""
        return _pad_with(ts, self._layout.num_nodes, ts[-1])

    def pad_nodes(self, ys: Inexact[Array, "nodes n"]) -> Inexact[Array, "padded n"]:
        """Node values padded with $y_0$, split over the devices."""
        return _split(_pad_with(ys, self._layout.num_nodes, ys[0]), self.mesh)

    def pad_intervals(self, tree: PyTree[Array] | None) -> PyTree[Array] | None:
        """Per-interval values padded with zeros, split over the devices."""
        num = self._layout.num_nodes - 1
        return jtu.tree_map(lambda x: _split(_pad_rows(x, num), self.mesh), tree)

    def unpad_nodes(self, ys: Inexact[Array, "padded n"]) -> Inexact[Array, "nodes n"]:
        return ys[: self.num_steps + 1]

    def unpad_intervals(self, tree: PyTree[Array] | None) -> PyTree[Array] | None:
        return jtu.tree_map(lambda x: x[: self.num_steps], tree)

    def _on_nodes(self, method: Callable, ts, ys, stages, replicated):
        # `method(ts, ys, stages, replicated)` on every block's nodes and
        # intervals, masked past the window, cut to the padded window's intervals.
        layout = self._layout

        def body(nodes, stages, _, replicated, rows):
            out = method(*nodes, stages, replicated)
            return _mask_beyond(out, rows, self.num_steps)

        out = layout.on_blocks(
            body, nodes=(ts, ys), intervals=stages, replicated=replicated
        )
        return layout.intervals_of(out)

    def init_stages(self, vector_field, ts, ys, args):
        def init(ts, ys, _, replicated):
            vector_field, args = replicated
            return self.discretisation.init_stages(vector_field, ts, ys, args)

        vector_field = _traceable_in_blocks(vector_field, ts, ys, args)
        return self._on_nodes(init, ts, ys, None, (vector_field, args))

    def residual(
        self,
        vector_field: VectorField,
        ts: Real[Array, " padded"],
        ys: Inexact[Array, "padded n"],
        stages: PyTree[Array] | None,
        args: PyTree[Any],
    ) -> Residual:
        def residual(ts, ys, stages, replicated):
            vector_field, args = replicated
            return self.discretisation.residual(vector_field, ts, ys, stages, args)

        vector_field = _traceable_in_blocks(vector_field, ts, ys, args)
        return self._on_nodes(residual, ts, ys, stages, (vector_field, args))

    def linearise(
        self,
        vector_field: VectorField,
        ts: Real[Array, " padded"],
        ys: Inexact[Array, "padded n"],
        stages: PyTree[Array] | None,
        args: PyTree[Any],
        jacobian: JacobianMode = "full",
    ) -> tuple[Residual, BlockedLinearisation]:
        layout = self._layout
        vector_field = _traceable_in_blocks(vector_field, ts, ys, args)
        # The linearisation's non-array parts, recorded as its blocks are traced.
        structure = []

        def body(nodes, stages, _, replicated, rows):
            vector_field, args = replicated
            residual, linearisation = self.discretisation.linearise(
                vector_field, *nodes, stages, args, jacobian
            )
            arrays, static = eqx.partition(linearisation, eqx.is_array)
            structure.append(static)
            blocked = jtu.tree_map(lambda x: x[None], arrays)
            return _mask_beyond(residual, rows, self.num_steps), blocked

        residual, blocked = layout.on_blocks(
            body, nodes=(ts, ys), intervals=stages, replicated=(vector_field, args)
        )
        linearisation = BlockedLinearisation(
            eqx.combine(blocked, structure[-1]), layout
        )
        return layout.intervals_of(residual), linearisation
