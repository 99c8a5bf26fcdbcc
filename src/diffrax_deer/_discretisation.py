"""The interface between a one-step discretisation and the DEER Newton iteration."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Inexact, PyTree


VectorField = Callable[[Array, Array, PyTree[Any]], Array]


def evaluate_nodes(
    vector_field: VectorField,
    ts: Inexact[Array, " nodes"],
    ys: Inexact[Array, "nodes n"],
    args: PyTree[Any],
) -> Inexact[Array, "nodes n"]:
    """Evaluates `vector_field(t_i, y_i, args)` at every node at once."""
    return jax.vmap(vector_field, in_axes=(0, 0, None))(ts, ys, args)


def evaluate_nodes_and_jacobians(
    vector_field: VectorField,
    ts: Inexact[Array, " nodes"],
    ys: Inexact[Array, "nodes n"],
    args: PyTree[Any],
) -> tuple[Inexact[Array, "nodes n"], Inexact[Array, "nodes n n"]]:
    """Evaluates the vector field and its Jacobian in `y` at every node at once.

    The Jacobian comes from forward mode (`n` JVPs batched together); the value is
    returned as auxiliary output so the vector field is evaluated once per node.
    """

    def value_and_jacobian(t, y):
        def with_aux(_y):
            value = vector_field(t, _y, args)
            return value, value

        jacobian, value = jax.jacfwd(with_aux, has_aux=True)(y)
        return value, jacobian

    return jax.vmap(value_and_jacobian)(ts, ys)


class BatchedLinearSolve(eqx.Module):
    r"""One LU factorisation per interval, $M_i$, to apply $M_i^{-1}$ many times.

    The factorisations are made once per Newton iteration (or once per derivative
    evaluation) with `lineax.LU`, batched over intervals, and reused for every
    right-hand side: the transition matrices, the residual and tangents.

    **Arguments:**

    - `matrices`: the per-interval matrices $M_i$, shape `(N, n, n)`.
    """

    factorisations: Any

    def __init__(self, matrices: Inexact[Array, "steps n n"]):
        def factorise(matrix):
            return lx.LU().init(lx.MatrixLinearOperator(matrix), {})

        self.factorisations = eqx.filter_vmap(factorise)(matrices)

    def solve(self, vectors: Inexact[Array, "steps n"]) -> Inexact[Array, "steps n"]:
        """Returns $M_i^{-1} v_i$ for every interval $i$."""

        def solve_one(factorisation, vector):
            solution, _, _ = lx.LU().compute(factorisation, vector, {})
            return solution

        return eqx.filter_vmap(solve_one)(self.factorisations, vectors)

    def solve_matrices(
        self, matrices: Inexact[Array, "steps n n"]
    ) -> Inexact[Array, "steps n n"]:
        """Returns $M_i^{-1} B_i$ for every interval $i$ (column by column)."""
        solve_columns = jax.vmap(self.solve, in_axes=-1, out_axes=-1)
        return solve_columns(matrices)


class LinearisedSteps(eqx.Module):
    r"""The Newton system of a one-step discretisation, as an affine recurrence.

    Linearising the residual $r_i(y_i, y_{i+1})$ of every interval around the current
    iterate gives $M_i \delta_{i+1} - P_i \delta_i = -r_i$, i.e.
    $\delta_{i+1} = A_i \delta_i + M_i^{-1}(-r_i)$ with $A_i = M_i^{-1} P_i$.

    **Arguments:**

    - `transitions`: the matrices $A_i$, shape `(N, n, n)`.
    - `step_solve`: the factorised $M_i$, to map a right-hand side $v_i$ to
        $M_i^{-1} v_i$.
    """

    transitions: Inexact[Array, "steps n n"]
    step_solve: BatchedLinearSolve


class AbstractDiscretisation(eqx.Module):
    r"""A one-step discretisation of $y' = f(t, y)$ written as a residual per interval.

    The residual $r_i$ of interval $[t_i, t_{i+1}]$ depends only on $y_i$ and
    $y_{i+1}$ (stage values, if any, are eliminated inside the interval), which is
    what makes each Newton step a linear recurrence over the nodes.
    """

    order: ClassVar[int]

    @abc.abstractmethod
    def residual(
        self,
        ts: Inexact[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        fs: Inexact[Array, "nodes n"],
    ) -> Inexact[Array, "steps n"]:
        """The residual of every interval, given node values `ys` and the vector
        field `fs` evaluated at them."""

    @abc.abstractmethod
    def linearise(
        self,
        ts: Inexact[Array, " nodes"],
        ys: Inexact[Array, "nodes n"],
        jacobians: Inexact[Array, "nodes n n"],
    ) -> LinearisedSteps:
        """The derivative of the residual with respect to the node values, as the
        affine recurrence of [`diffrax_deer.LinearisedSteps`][]."""


def identity_like(jacobians: Inexact[Array, "... n n"]) -> Inexact[Array, "n n"]:
    return jnp.eye(jacobians.shape[-1], dtype=jacobians.dtype)
