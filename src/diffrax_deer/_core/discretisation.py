"""The interface between a one-step discretisation and the DEER Newton iteration."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact, Int, PyTree, Real

from .damped_scan import solve_damped_recurrence
from .scan import solve_affine_recurrence


VectorField = Callable[[Array, Array, PyTree[Any]], Array]
# "full": the n x n Jacobians (DEER); "diagonal": only their diagonals (quasi-DEER).
JacobianMode = Literal["full", "diagonal"]
# The residual of every interval: (node part, shape (N, n); stage part or None).
Residual = tuple[Inexact[Array, "steps n"], PyTree[Array] | None]


def evaluate_nodes(
    vector_field: VectorField,
    ts: Real[Array, " points"],
    ys: Inexact[Array, "points n"],
    args: PyTree[Any],
) -> Inexact[Array, "points n"]:
    """Evaluates `vector_field(t_i, y_i, args)` at every point at once."""
    return jax.vmap(vector_field, in_axes=(0, 0, None))(ts, ys, args)


def evaluate_nodes_derivatives_and_stiffness(
    vector_field: VectorField,
    ts: Real[Array, " points"],
    ys: Inexact[Array, "points n"],
    args: PyTree[Any],
) -> tuple[
    Inexact[Array, "points n"], Inexact[Array, "points n"], Real[Array, " points"]
]:
    r"""$y' = f(t_i, y_i)$ and $y'' = \partial_t f + \partial_y f \, f$ at every
    point at once (one JVP of $f$ along the solution's own direction $(1, y')$),
    and a lower bound on $\lVert \partial_y f \rVert_2$ at every point: $\lVert J v
    \rVert / \lVert v \rVert$ along a fixed direction $v$, from the same
    linearisation (one more JVP). $v_k = \cos(2.4 k + 1)$ is quasi-random, so that
    no structured null space (the constants, which a diffusion operator's Jacobian
    annihilates) hides the stiff eigenvalues."""

    def derivatives_and_stiffness(t, y):
        def along(_t, _y):
            return vector_field(_t, _y, args)

        first, along_linear = jax.linearize(along, t, y)
        second = along_linear(jnp.ones_like(t), first)
        probe = jnp.cos(2.4 * jnp.arange(y.shape[0], dtype=y.dtype) + 1)
        probed = along_linear(jnp.zeros_like(t), probe)
        probe_norm = jnp.linalg.norm(probe)  # 0 only for an empty state
        return (
            first,
            second,
            jnp.linalg.norm(probed) / jnp.where(probe_norm == 0, 1, probe_norm),
        )

    return jax.vmap(derivatives_and_stiffness)(ts, ys)


def evaluate_nodes_and_jacobians(
    vector_field: VectorField,
    ts: Real[Array, " points"],
    ys: Inexact[Array, "points n"],
    args: PyTree[Any],
) -> tuple[Inexact[Array, "points n"], Inexact[Array, "points n n"]]:
    """Evaluates the vector field and its Jacobian in `y` at every point at once.

    The Jacobian comes from forward mode (`n` JVPs batched together); the value is
    returned as auxiliary output so the vector field is evaluated once per point.
    """

    def value_and_jacobian(t, y):
        def with_aux(_y):
            value = vector_field(t, _y, args)
            return value, value

        jacobian, value = jax.jacfwd(with_aux, has_aux=True)(y)
        return value, jacobian

    return jax.vmap(value_and_jacobian)(ts, ys)


def rowwise_value_and_jacobian_diagonal(
    function: Callable[[Inexact[Array, "points n"]], Inexact[Array, "points n"]],
    xs: Inexact[Array, "points n"],
) -> tuple[Inexact[Array, "points n"], Inexact[Array, "points n"]]:
    r"""The value of a row-wise map and the diagonal of each row's Jacobian.

    `function` maps every row independently (row $p$ of the output depends only on
    row $p$ of the input). The diagonal $\partial F_{pk} / \partial x_{pk}$ comes
    from $n$ Jacobian-vector products with the basis vectors, one at a time: the
    work of a full Jacobian, but memory $O(P n)$ rather than $O(P n^2)$.
    """
    values, linear = jax.linearize(function, xs)
    size = xs.shape[-1]

    def add_column(k, diagonal):
        basis = jnp.broadcast_to(jnp.arange(size) == k, xs.shape).astype(xs.dtype)
        return diagonal.at[:, k].set(linear(basis)[:, k])

    diagonal = jax.lax.fori_loop(0, size, add_column, jnp.zeros_like(xs))
    return values, diagonal


def evaluate_nodes_and_jacobian_diagonals(
    vector_field: VectorField,
    ts: Real[Array, " points"],
    ys: Inexact[Array, "points n"],
    args: PyTree[Any],
) -> tuple[Inexact[Array, "points n"], Inexact[Array, "points n"]]:
    """Evaluates the vector field and the diagonal of its Jacobian in `y` at every
    point, without forming any `n x n` matrix."""

    def evaluate(_ys):
        return evaluate_nodes(vector_field, ts, _ys, args)

    return rowwise_value_and_jacobian_diagonal(evaluate, ys)


def evaluate_linearised_nodes(
    vector_field: VectorField,
    ts: Real[Array, " points"],
    ys: Inexact[Array, "points n"],
    args: PyTree[Any],
    jacobian: JacobianMode,
) -> tuple[Inexact[Array, "points n"], Inexact[Array, "points ..."]]:
    """The vector field and its Jacobians (`"full"`, shape `(P, n, n)`) or their
    diagonals (`"diagonal"`, shape `(P, n)`) at every point."""
    if jacobian == "diagonal":
        return evaluate_nodes_and_jacobian_diagonals(vector_field, ts, ys, args)
    return evaluate_nodes_and_jacobians(vector_field, ts, ys, args)


class AbstractLinearisation(eqx.Module):
    r"""The derivative of a discretisation's residual at one iterate.

    Solving $\partial R \,[\delta y, \delta z] = v$ (with $\delta y_0$ given, and
    $\delta z$ any stage unknowns) is one affine recurrence over the nodes,
    $\delta y_{i+1} = A_i \delta y_i + b_i(v)$, solved by a parallel scan, followed by
    a per-interval back-substitution for the stages. Newton uses it with
    $v = -R$; the implicit derivative with $v = -\partial_\theta R\,\dot\theta$.
    With `jacobian="diagonal"` the $A_i$ are diagonal (stored as vectors) and the
    solve is only approximate: quasi-DEER.

    **Arguments:**

    - `transitions`: the $A_i$, shape `(N, n, n)`, or their diagonals `(N, n)`.
    """

    transitions: eqx.AbstractVar[Inexact[Array, "steps ..."]]

    @abc.abstractmethod
    def offsets(self, rhs: Residual) -> Inexact[Array, "steps n"]:
        """The $b_i(v)$ of the recurrence: $v$ with the per-interval (and stage)
        systems solved."""

    def stage_offsets(self, rhs: Residual) -> PyTree[Array] | None:
        r"""The stage part of the right-hand side with the stage systems solved
        (none here); Newton's merit is $\frac12(\|b\|^2 + \|$this$\|^2)$."""
        del rhs
        return None

    def stage_update(
        self, rhs: Residual, delta_ys: Inexact[Array, "nodes n"]
    ) -> PyTree[Array] | None:
        """The stage update given the node update (none here)."""
        del rhs, delta_ys
        return None

    def recurrence(
        self, offsets: Inexact[Array, "steps n"], initial: Inexact[Array, " n"]
    ) -> Inexact[Array, "nodes n"]:
        r"""$d_{i+1} = A_i d_i + b_i$ from $d_0$ = `initial`, for all $i$ at once
        (see [`diffrax_deer.solve_affine_recurrence`][])."""
        return solve_affine_recurrence(self.transitions, offsets, initial)

    def damped_recurrence(
        self, offsets: Inexact[Array, "steps n"], damping: Real[Array, ""]
    ) -> Inexact[Array, "nodes n"]:
        r"""The Levenberg-Marquardt-damped solution of $d_{i+1} = A_i d_i + b_i$,
        $d_0 = 0$ (see [`diffrax_deer.solve_damped_recurrence`][])."""
        return solve_damped_recurrence(self.transitions, offsets, damping)

    def solve(
        self, rhs: Residual, initial: Inexact[Array, " n"]
    ) -> tuple[Inexact[Array, "nodes n"], PyTree[Array] | None]:
        """Returns the node update (shape `(N + 1, n)`, starting at `initial`) and
        the stage update (or `None`)."""
        delta_ys = self.recurrence(self.offsets(rhs), initial)
        return delta_ys, self.stage_update(rhs, delta_ys)


class AbstractDiscretisation(eqx.Module):
    r"""A one-step discretisation of $y' = f(t, y)$ written as a residual per interval.

    The residual of interval $[t_i, t_{i+1}]$ depends only on $y_i$, $y_{i+1}$ and
    that interval's own stage unknowns (if any), which is what makes each Newton step
    a linear recurrence over the nodes with $n \times n$ blocks.
    """

    # Whether the predictor's sequential base solve is the L-stable ROS2 rather than
    # RK4: true for the methods meant for stiff problems, whose coarse grids RK4
    # would blow up on.
    stiff_predictor: ClassVar[bool] = False

    @abc.abstractmethod
    def order(self) -> int:
        """The order of convergence of the discretisation."""

    def dense_order(self) -> int:
        """The local order of the dense output's own error between the nodes, on
        its least accurate intervals (the error estimate scales by it); by default
        cubic Hermite's, 4."""
        return 4

    def interval_dense_orders(
        self, dense_info: PyTree[Array]
    ) -> Int[Array, " steps"] | int:
        """The local order of each interval's dense output error, for a method
        whose interpolant differs from interval to interval (by default
        [`diffrax_deer.AbstractDiscretisation.dense_order`][] everywhere)."""
        del dense_info
        return self.dense_order()

    def match_dense_info(
        self,
        coarse_info: PyTree[Array],
        fine_info: PyTree[Array],
        coarse_of_fine: np.ndarray,
    ) -> PyTree[Array]:
        """`coarse_info`, the dense output data of a coarser nested grid, made to
        interpolate each of its intervals as the fine grid does there (fine
        interval `i` lies in coarse interval `coarse_of_fine[i]`): the error
        estimate compares the two grids' dense outputs, which must then be the
        same kind of interpolant. Unchanged by default (one interpolant)."""
        del fine_info, coarse_of_fine
        return coarse_info

    def init_stages(
        self,
        vector_field: VectorField,
        ts: Real[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        args: PyTree[Any],
    ) -> PyTree[Array] | None:
        """Initial stage unknowns from an initial guess of the nodes (none here)."""
        del vector_field, ts, ys, args
        return None

    def transfer_stages(
        self,
        vector_field: VectorField,
        ts: Real[Array, " nodes"],
        stages: PyTree[Array] | None,
        new_ts: Real[Array, " new_nodes"],
        new_ys: Inexact[Array, "new_nodes n"],
        args: PyTree[Any],
    ) -> PyTree[Array] | None:
        """Initial stage unknowns on another grid `new_ts` (within `[ts[0],
        ts[-1]]`, node values `new_ys`) from a solve on `ts` with stage unknowns
        `stages`: to start Newton there next to the answer (a coarser grid for the
        error estimate, an adapted mesh). By default those of the new nodes."""
        del ts, stages
        return self.init_stages(vector_field, new_ts, new_ys, args)

    @abc.abstractmethod
    def residual(
        self,
        vector_field: VectorField,
        ts: Real[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        stages: PyTree[Array] | None,
        args: PyTree[Any],
    ) -> Residual:
        """The residual of every interval."""

    @abc.abstractmethod
    def linearise(
        self,
        vector_field: VectorField,
        ts: Real[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        stages: PyTree[Array] | None,
        args: PyTree[Any],
        jacobian: JacobianMode = "full",
    ) -> tuple[Residual, AbstractLinearisation]:
        r"""The residual and its derivative in the unknowns at one iterate: exact
        (`jacobian="full"`), or with only the diagonal of $\partial f / \partial y$
        (`"diagonal"`, quasi-DEER)."""

    def dense_info(
        self,
        vector_field: VectorField,
        ts: Real[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        stages: PyTree[Array] | None,
        args: PyTree[Any],
    ) -> PyTree[Array]:
        """What [`diffrax_deer.AbstractDiscretisation.interpolate`][] needs besides
        the nodes: by default the vector field at the nodes, for cubic Hermite
        (collocation methods add $y''$ for quintic Hermite)."""
        del stages
        return evaluate_nodes(vector_field, ts, ys, args)

    def interpolate(
        self,
        ts: Real[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        dense_info: PyTree[Array],
        t: Real[Array, ""],
        uniform: bool = False,
    ) -> Inexact[Array, " n"]:
        """The solution at time `t`, from the nodes `ts` (any increasing grid, or a
        uniform one with `uniform=True`, found without a search); by default cubic
        Hermite through the node values and derivatives."""
        from .hermite import hermite_on_grid

        return hermite_on_grid(ts, ys, dense_info, t, uniform)


def closure_convert_field(
    vector_field: VectorField, t: PyTree[Array], y: Inexact[Array, " n"], args: PyTree
) -> tuple[VectorField, PyTree]:
    """`vector_field` with its closed-over arrays (e.g. a network's weights) lifted
    into explicit inputs, so that custom derivatives see and differentiate them;
    returns it and the array leaves of `args` to call it with.

    The non-array leaves of `args` (Python numbers, strings) are closed over instead
    of passed: passed, they would be static arguments, compared by equality on every
    call, which a Python NaN never passes.

    **Arguments:**

    - `vector_field`: `f(t, y, args)`.
    - `t`, `y`, `args`: example arguments (a time, or a step's inputs; the state).
    """
    array_args, static_args = eqx.partition(args, eqx.is_array)

    def field_of_arrays(t, y, array_args):
        return vector_field(t, y, eqx.combine(array_args, static_args))

    converted = eqx.filter_closure_convert(field_of_arrays, t, y, array_args)
    return converted, array_args


def identity_like(jacobians: Inexact[Array, "... n n"]) -> Inexact[Array, "n n"]:
    return jnp.eye(jacobians.shape[-1], dtype=jacobians.dtype)
