r"""The Newton system of an explicit one-step map $y_{i+1} = \Phi_i(y_i)$.

Shared by every discretisation whose residual is $r_i = y_{i+1} - \Phi_i(y_i)$: an
explicit Runge-Kutta step (the diffrax adapter's `ExplicitRungeKutta`) and a
recurrent cell $h_{i+1} = \mathrm{cell}(h_i, x_i)$ (`deer_scan`'s `Recurrence`).
"""

import abc
from typing import Any

import jax
from jaxtyping import Array, Inexact, PyTree

from .discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    JacobianMode,
    Residual,
    VectorField,
    rowwise_value_and_jacobian_diagonal,
)


class ExplicitLinearisation(AbstractLinearisation):
    r"""The Newton system of an explicit map $y_{i+1} = \Phi_i(y_i)$:
    $\delta_{i+1} = A_i \delta_i + v_i$ with $A_i = \partial \Phi_i / \partial y_i$,
    no per-interval solve.

    **Arguments:**

    - `transitions`: the $A_i$, shape `(N, n, n)`, or their diagonals `(N, n)`.
    """

    transitions: Inexact[Array, "steps ..."]

    def offsets(self, rhs: Residual) -> Inexact[Array, "steps n"]:
        rhs_nodes, _ = rhs
        return rhs_nodes


class AbstractExplicitMap(AbstractDiscretisation):
    r"""A discretisation given by an explicit map, $r_i = y_{i+1} - \Phi_i(y_i)$.

    Subclasses say what the inputs of step $i$ are (`step_inputs`) and how one step
    maps $y_i$ to $y_{i+1}$ (`one_step`). The residual, and its linearisation with
    full Jacobians $A_i = \partial\Phi_i/\partial y_i$ (forward mode, one
    evaluation of $\Phi_i$ per step) or only their diagonals (quasi-DEER, $O(N n)$
    memory), are written here once. Newton on this residual converges to exactly the
    sequential map's trajectory (to round-off): DEER only changes the order of
    evaluation.
    """

    @abc.abstractmethod
    def step_inputs(self, ts: PyTree[Array]) -> PyTree[Array]:
        """What step $i$ depends on besides $y_i$, stacked along a leading axis of
        length `N` (e.g. its interval $(t_i, t_{i+1})$)."""

    @abc.abstractmethod
    def one_step(
        self,
        vector_field: VectorField,
        step_input: PyTree[Array],
        y: Inexact[Array, " n"],
        args: PyTree[Any],
    ) -> Inexact[Array, " n"]:
        r"""$\Phi_i(y)$, for one step's input (one row of `step_inputs`)."""

    def mapped(
        self,
        vector_field: VectorField,
        ts: PyTree[Array],
        ys_start: Inexact[Array, "steps n"],
        args: PyTree[Any],
    ) -> Inexact[Array, "steps n"]:
        r"""$\Phi_i(y_i)$ for every step at once, from the start values `ys_start`."""
        return jax.vmap(self.one_step, in_axes=(None, 0, 0, None))(
            vector_field, self.step_inputs(ts), ys_start, args
        )

    def residual(self, vector_field, ts, ys, stages, args) -> Residual:
        del stages
        return ys[1:] - self.mapped(vector_field, ts, ys[:-1], args), None

    def linearise(
        self,
        vector_field: VectorField,
        ts: PyTree[Array],
        ys: Inexact[Array, "nodes n"],
        stages: None,
        args: PyTree[Any],
        jacobian: JacobianMode = "full",
    ) -> tuple[Residual, ExplicitLinearisation]:
        del stages
        if jacobian == "diagonal":

            def mapped(_ys_start):
                return self.mapped(vector_field, ts, _ys_start, args)

            values, transitions = rowwise_value_and_jacobian_diagonal(mapped, ys[:-1])
            return (ys[1:] - values, None), ExplicitLinearisation(transitions)

        def map_and_jacobian(step_input, y):
            def with_aux(_y):
                value = self.one_step(vector_field, step_input, _y, args)
                return value, value

            return jax.jacfwd(with_aux, has_aux=True)(y)

        transitions, values = jax.vmap(map_and_jacobian)(self.step_inputs(ts), ys[:-1])
        return (ys[1:] - values, None), ExplicitLinearisation(transitions)
