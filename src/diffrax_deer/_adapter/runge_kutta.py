"""Any diffrax explicit Runge-Kutta solver as the one-step map inside DEER."""

import dataclasses

import diffrax
import equinox as eqx
import jax
import jax.tree_util as jtu

from .._core.explicit_map import AbstractExplicitMap
from .._core.hermite import grid_interval


# Explicit solvers whose `step` is a one-step map of an ODE.
EXPLICIT_SOLVERS = (diffrax.AbstractERK, diffrax.Euler)


def _differentiable_stages(solver):
    # diffrax runs Runge-Kutta stages in a checkpointed loop (a custom_vjp), which
    # forward mode cannot differentiate, and a `lax` while loop cannot be reversed;
    # the "bounded" loop is the same computation and supports both.
    if isinstance(solver, diffrax.AbstractRungeKutta) and solver.scan_kind is None:
        return dataclasses.replace(solver, scan_kind="bounded")
    return solver


class ExplicitRungeKutta(AbstractExplicitMap):
    r"""A diffrax explicit solver's `step` as the one-step map: $r_i = y_{i+1} -
    \Phi(t_i, t_{i+1}, y_i)$.

    Newton on this residual converges to exactly the sequential solver's trajectory
    on the same grid (to round-off): DEER only changes the order of evaluation.
    Dense output uses the solver's own interpolation on each interval. Made for you
    by `DeerSolver(method=diffrax.Tsit5())` (and Euler, Heun, Midpoint, Ralston,
    Bosh3, Dopri5, Dopri8).

    **Arguments:**

    - `solver`: a diffrax explicit Runge-Kutta solver (or `diffrax.Euler()`).
    """

    solver: diffrax.AbstractSolver = eqx.field(
        static=True, converter=_differentiable_stages
    )

    def __check_init__(self):
        if not isinstance(self.solver, EXPLICIT_SOLVERS):
            raise ValueError(
                "`ExplicitRungeKutta` needs a diffrax explicit Runge-Kutta solver "
                f"(e.g. `diffrax.Tsit5()`); got {self.solver!r}."
            )

    def order(self) -> int:
        return self.solver.order(diffrax.ODETerm(lambda t, y, args: y))

    def dense_order(self) -> int:
        # diffrax's interpolants are continuous extensions of order at least p - 1,
        # so their own local error is of order p or more.
        return self.order()

    def _step(self, vector_field, t0, t1, y0, args):
        term = diffrax.ODETerm(vector_field)
        state = self.solver.init(term, t0, t1, y0, args)
        y1, _, dense_info, _, _ = self.solver.step(
            term, t0, t1, y0, args, state, made_jump=False
        )
        return y1, dense_info

    def step_inputs(self, ts):
        return ts[:-1], ts[1:]

    def one_step(self, vector_field, step_input, y, args):
        t0, t1 = step_input
        y1, _ = self._step(vector_field, t0, t1, y, args)
        return y1

    def dense_info(self, vector_field, ts, ys, stages, args):
        del stages
        _, dense_info = jax.vmap(self._step, in_axes=(None, 0, 0, 0, None))(
            vector_field, ts[:-1], ts[1:], ys[:-1], args
        )
        return dense_info

    def interpolate(self, ts, ys, dense_info, t, uniform=False):
        index, _, _ = grid_interval(ts, t, uniform)
        interval_info = jtu.tree_map(lambda x: x[index], dense_info)
        interpolation = self.solver.interpolation_cls(
            t0=ts[index], t1=ts[index + 1], **interval_info
        )
        return interpolation.evaluate(t)
