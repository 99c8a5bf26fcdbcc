"""One-step theta methods: backward Euler and the implicit trapezoidal rule."""

from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, Inexact

from .._core.discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    evaluate_linearised_nodes,
    evaluate_nodes,
    identity_like,
)
from .._core.linear_solve import BatchedLinearSolve


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

    def offsets(self, rhs):
        rhs_nodes, _ = rhs
        return self.step_solve.solve(rhs_nodes)


class DiagonalNodeLinearisation(AbstractLinearisation):
    r"""The quasi-DEER system of a theta method: $M_i$ and $P_i$ diagonal.

    Only the Jacobian diagonals at the nodes are stored; $A_i = P_i / M_i$ and
    $M_i^{-1}$ are formed elementwise when used (and fused by XLA), which keeps one
    `(N + 1, n)` array, not two `(N, n)` ones, alive across Newton iterations.

    **Arguments:**

    - `jacobian_diagonals`: $\mathrm{diag}\,\partial f / \partial y$ at every node,
        shape `(N + 1, n)`.
    - `steps`: the interval lengths $h_i$, shape `(N,)`.
    - `theta`: the method's $\theta$.
    """

    jacobian_diagonals: Inexact[Array, "nodes n"]
    steps: Inexact[Array, " steps"]
    theta: float = eqx.field(static=True)

    def _implicit(self):
        return 1 - self.theta * self.steps[:, None] * self.jacobian_diagonals[1:]

    @property
    def transitions(self):
        explicit = (
            1 + (1 - self.theta) * self.steps[:, None] * (self.jacobian_diagonals[:-1])
        )
        return explicit / self._implicit()

    def offsets(self, rhs):
        rhs_nodes, _ = rhs
        return rhs_nodes / self._implicit()


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

    def linearise(self, vector_field, ts, ys, stages, args, jacobian="full"):
        del stages
        fs, jacobians = evaluate_linearised_nodes(vector_field, ts, ys, args, jacobian)
        if jacobian == "diagonal":
            # The same recurrence with J replaced by diag(J): elementwise.
            steps = (ts[1:] - ts[:-1]).astype(ys.dtype)
            linearisation = DiagonalNodeLinearisation(jacobians, steps, self.theta)
            return (self._residual(ts, ys, fs), None), linearisation
        identity = identity_like(jacobians)[None]
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
    stiff_predictor: ClassVar[bool] = True

    def order(self) -> int:
        return 1
