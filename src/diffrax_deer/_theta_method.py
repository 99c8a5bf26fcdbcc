"""One-step theta methods: backward Euler and the implicit trapezoidal rule."""

from typing import ClassVar

from jaxtyping import Array, Inexact

from ._discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    BatchedLinearSolve,
    evaluate_nodes,
    evaluate_nodes_and_jacobians,
    identity_like,
)
from ._scan import solve_affine_recurrence


class NodeLinearisation(AbstractLinearisation):
    r"""The Newton system of a scheme without stages: $M_i \delta_{i+1} - P_i \delta_i
    = v_i$, i.e. $\delta_{i+1} = A_i \delta_i + M_i^{-1} v_i$ with $A_i = M_i^{-1}
    P_i$.

    **Arguments:**

    - `transitions`: the matrices $A_i$, shape `(N, n, n)`.
    - `step_solve`: the factorised $M_i$.
    """

    transitions: Inexact[Array, "steps n n"]
    step_solve: BatchedLinearSolve

    def solve(self, rhs, initial):
        rhs_nodes, _ = rhs
        offsets = self.step_solve.solve(rhs_nodes)
        return solve_affine_recurrence(self.transitions, offsets, initial), None


class AbstractThetaMethod(AbstractDiscretisation):
    r"""$r_i = y_{i+1} - y_i - h_i\big((1 - \theta) f(t_i, y_i) + \theta f(t_{i+1},
    y_{i+1})\big)$.

    The vector field is evaluated (and linearised) once per node, shared by the two
    intervals that meet there. Its Newton recurrence has $M_i = I - \theta h_i
    J_{i+1}$ and $P_i = I + (1 - \theta) h_i J_i$.
    """

    theta: ClassVar[float]

    def _residual(self, ts, ys, fs) -> Inexact[Array, "steps n"]:
        steps = (ts[1:] - ts[:-1])[:, None]
        increments = (1 - self.theta) * fs[:-1] + self.theta * fs[1:]
        return ys[1:] - ys[:-1] - steps * increments

    def residual(self, vector_field, ts, ys, stages, args):
        del stages
        fs = evaluate_nodes(vector_field, ts, ys, args)
        return self._residual(ts, ys, fs), None

    def linearise(self, vector_field, ts, ys, stages, args):
        del stages
        fs, jacobians = evaluate_nodes_and_jacobians(vector_field, ts, ys, args)
        identity = identity_like(jacobians)
        steps = (ts[1:] - ts[:-1])[:, None, None]
        step_solve = BatchedLinearSolve(identity - self.theta * steps * jacobians[1:])
        transitions = step_solve.solve_matrices(
            identity + (1 - self.theta) * steps * jacobians[:-1]
        )
        linearisation = NodeLinearisation(transitions, step_solve)
        return (self._residual(ts, ys, fs), None), linearisation


class Trapezoid(AbstractThetaMethod):
    r"""The implicit trapezoidal rule: second order, A-stable (the default).

    $$r_i = y_{i+1} - y_i - \tfrac{h_i}{2}\big(f(t_i, y_i) + f(t_{i+1}, y_{i+1})\big)$$
    """

    theta: ClassVar[float] = 0.5

    def order(self) -> int:
        return 2


class BackwardEuler(AbstractThetaMethod):
    r"""Backward (implicit) Euler: first order, L-stable, for stiff problems.

    $$r_i = y_{i+1} - y_i - h_i f(t_{i+1}, y_{i+1})$$
    """

    theta: ClassVar[float] = 1.0

    def order(self) -> int:
        return 1
