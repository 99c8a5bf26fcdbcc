"""The implicit trapezoidal rule as a DEER discretisation."""

from typing import ClassVar

from jaxtyping import Array, Inexact

from ._discretisation import (
    AbstractDiscretisation,
    BatchedLinearSolve,
    LinearisedSteps,
    identity_like,
)


class Trapezoid(AbstractDiscretisation):
    r"""Implicit trapezoidal rule: second order, A-stable.

    $$r_i = y_{i+1} - y_i - \tfrac{h_i}{2}\big(f(t_i, y_i) + f(t_{i+1}, y_{i+1})\big)$$

    Its Newton recurrence has $M_i = I - \tfrac{h_i}{2} J_{i+1}$ and
    $P_i = I + \tfrac{h_i}{2} J_i$, where $J_i = \partial f / \partial y$ at node $i$.
    """

    order: ClassVar[int] = 2

    def residual(self, ts, ys, fs) -> Inexact[Array, "steps n"]:
        half_steps = (0.5 * (ts[1:] - ts[:-1]))[:, None]
        return ys[1:] - ys[:-1] - half_steps * (fs[:-1] + fs[1:])

    def linearise(self, ts, ys, jacobians) -> LinearisedSteps:
        del ys
        identity = identity_like(jacobians)
        half_steps = (0.5 * (ts[1:] - ts[:-1]))[:, None, None]
        step_solve = BatchedLinearSolve(identity - half_steps * jacobians[1:])
        transitions = step_solve.solve_matrices(identity + half_steps * jacobians[:-1])
        return LinearisedSteps(transitions=transitions, step_solve=step_solve)
