"""`DeerSolver`: the diffrax adapter around the DEER window solve."""

import contextlib
import functools
import typing
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import RESULTS, AbstractSolver, AbstractTerm
from diffrax._term import WrapTerm
from jaxtyping import Array, Inexact, Int, PyTree, Real

from .._core.discretisation import AbstractDiscretisation, JacobianMode
from .._core.predictor import COARSENING, default_predictor_steps
from .._core.validation import as_python_scalar, check_integer, check_tolerance
from .._core.window import solve_window
from .._methods.theta_method import Trapezoid
from .context import check_event_support, enclosing_diffeqsolve
from .dense import warn_if_dense_buffers_are_large
from .failures import raise_if_failed
from .interpolation import DeerInterpolation, ravel, structure_template
from .runge_kutta import EXPLICIT_SOLVERS, ExplicitRungeKutta
from .terms import check_terms


# Newton's relative tolerance when none is given, by dtype (`atol=None` then
# scales with the trajectory: rtol times each component's largest magnitude).
# Chosen by measurement (docs/choosing.md): the error Newton leaves is then below
# the discretisation error of every method and grid measured, and above the
# round-off floor of the update.
_DEFAULT_RTOL = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.float16): 1e-2,
    jnp.dtype(jnp.bfloat16): 1e-2,
}


class DeerState(eqx.Module):
    r"""The solver state of [`diffrax_deer.DeerSolver`][]: Newton statistics, and the
    last window's trajectory for warm starts.

    Read it from `diffeqsolve(..., saveat=SaveAt(..., solver_state=True))` as
    `sol.solver_state`. Passing it back, `diffeqsolve(..., solver_state=
    sol.solver_state)`, warm-starts Newton from the stored trajectory in the window
    with the same `t0` and `t1` (e.g. a one-window solve repeated while training):
    the predictor is skipped and Newton starts next to the answer.

    **Arguments:**

    - `num_iters`: Newton iterations of the last window.
    - `total_num_iters`: Newton iterations summed over all windows so far.
    - `max_num_iters`: the most Newton iterations any window took.
    - `update_norm`: the last window's estimated Newton error in units of the
        tolerance (converged when <= 1).
    - `residual_norm`: the last window's final residual, $\max_i \mathrm{RMS}(r_i)$.
    - `trajectory`: the last window's nodes, flattened, shape `(N + 1, n)` (not
        differentiated).
    - `window_t0`, `window_t1`: the last window (NaN before the first).
    """

    num_iters: Int[Array, ""]
    total_num_iters: Int[Array, ""]
    max_num_iters: Int[Array, ""]
    update_norm: Real[Array, ""]
    residual_norm: Real[Array, ""]
    trajectory: Inexact[Array, "nodes n"]
    window_t0: Real[Array, ""]
    window_t1: Real[Array, ""]


def direction(terms: PyTree[AbstractTerm], t):
    # diffrax integrates in increasing time and wraps the terms with the direction.
    for term in jtu.tree_leaves(terms, is_leaf=lambda x: isinstance(x, WrapTerm)):
        if isinstance(term, WrapTerm):
            return jnp.asarray(term.direction, jnp.result_type(t))
    return jnp.ones((), jnp.result_type(t))


def _check_solver_state(
    solver_state: Any, num_steps: int, y0_flat: Array, t0: Array
) -> None:
    # A `DeerState` of another solve cannot be carried by diffrax's loop (its
    # arrays' shapes and dtypes are part of the loop's type): say so at trace time.
    expected = (num_steps + 1,) + y0_flat.shape
    if not isinstance(solver_state, DeerState):
        raise ValueError(
            "`solver_state` must be the `sol.solver_state` of a DeerSolver solve "
            f"(a `DeerState`); got `{type(solver_state).__name__}`."
        )
    trajectory = solver_state.trajectory
    if trajectory.shape != expected or trajectory.dtype != y0_flat.dtype:
        raise ValueError(
            "`solver_state` comes from another problem: its trajectory has shape "
            f"{trajectory.shape} ({trajectory.dtype}), this solve's has {expected} "
            f"({y0_flat.dtype}: num_steps={num_steps}, {y0_flat.size} state values). "
            "Pass back the `sol.solver_state` of a solve with the same `num_steps`, "
            "`y0` structure and dtype, or no `solver_state`."
        )
    if solver_state.window_t0.dtype != jnp.result_type(t0):
        raise ValueError(
            f"`solver_state` comes from a solve with {solver_state.window_t0.dtype} "
            f"times; this one has {jnp.result_type(t0)} times. Pass `t0`, `t1` and "
            "`dt0` with the same dtype as that solve, or no `solver_state`."
        )


def _as_method(value: Any) -> Any:
    # A diffrax explicit solver becomes the one-step map of an explicit scheme.
    if isinstance(value, EXPLICIT_SOLVERS):
        return ExplicitRungeKutta(value)
    return value


_JACOBIAN_MODES = typing.get_args(JacobianMode)


def _matmul_precision(precision: str | None):
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def _option(**kwargs):
    return eqx.field(static=True, converter=as_python_scalar, **kwargs)


class DeerSolver(AbstractSolver):
    r"""Solves an ODE over a whole window of steps at once, by DEER.

    One diffrax step is one window $[t_0, t_1]$. DeerSolver discretises it on
    `num_steps` uniform intervals, $t_i = t_0 + i (t_1 - t_0) / N$, and solves for all
    nodes at once: Newton's method on the stacked residual
    $r_i = y_{i+1} - y_i - \tfrac{h}{2}(f(t_i, y_i) + f(t_{i+1}, y_{i+1}))$ (the
    implicit trapezoidal rule, or the residual of another `method`), where each
    Newton step is the linear recurrence
    $\delta_{i+1} = A_i \delta_i + b_i$, solved by a parallel associative scan in
    $O(\log N)$ depth. Newton starts from the same window solved on grids 16, 256,
    ... times coarser (nested iteration) down to 64 sequential steps. Derivatives
    use the implicit function theorem at the converged trajectory: one more linear
    recurrence, never backpropagation through Newton.

    Use `dt0 = t1 - t0` (or `stepsize_controller=diffrax.StepTo([t0, t1])`) for one
    window; a smaller `dt0` gives consecutive windows, each solved in parallel in
    time. Shorter windows are the remedy when Newton does not converge (chaotic
    dynamics over a long window). Values between nodes (`SaveAt(ts=...)`,
    `SaveAt(dense=True)`) come from Hermite interpolation (cubic; quintic for the
    collocation methods) or an explicit solver's own interpolation. With
    `SaveAt(dense=True)` diffrax reserves every window's nodes `max_steps` times:
    set `max_steps` to the number of windows, or use `DeerAdjoint` with `StepTo`,
    which reserves only those (a reservation over 256 MiB is warned of).

    Terms: `diffrax.ODETerm`, or any term whose control is time (`contr(t0, t1)`
    is `t1 - t0` in every leaf, up to a constant factor), alone or in a
    `diffrax.MultiTerm`; DeerSolver solves dy/dt =
    `terms.vf_prod(t, y, args, terms.contr(0, 1))`. SDEs and other controls are
    refused at trace time. Empty states (`y0=None`, zero-size leaves) give an empty
    solution.

    For gradients with many save times pass `adjoint=diffrax_deer.DeerAdjoint()`
    (and windows via `StepTo`, for forward mode too): it saves all times at once,
    so reverse mode does not grow with their number. Passing a previous
    `sol.solver_state` back as `diffeqsolve(..., solver_state=...)` warm-starts
    Newton from that solve's trajectory (see [`diffrax_deer.DeerState`][]).

    A window whose Newton solve did not converge within `max_iters` returns
    `RESULTS.nonlinear_max_steps_reached`; one where the vector field became
    non-finite returns `RESULTS.nonlinear_divergence`. With `throw=True` (the
    default) either raises a `RuntimeError` naming the window, the iterations, the
    residual and the remedies (diffrax's own message would suggest `max_steps`,
    which counts windows); the Newton statistics are in `sol.solver_state` with
    `SaveAt(solver_state=True)` (see [`diffrax_deer.DeerState`][]).

    Events (`diffeqsolve(..., event=...)`) need `adjoint=diffrax_deer.DeerAdjoint()`,
    which checks them at every node; under diffrax's own loop they would be checked
    only at window ends, and are refused.

    ```python
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), DeerSolver(num_steps=1000), t0=0.0, t1=10.0, dt0=10.0,
        y0=y0, args=args, saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 10.0, 101)))
    ```

    **Arguments:**

    - `num_steps`: intervals per window, $N \ge 1$.
    - `rtol`, `atol`: Newton's tolerances on the error it leaves in the
        trajectory: it stops when that error, estimated from the last update and
        how fast the updates contract, is within `atol + rtol * |y|` per component
        (RMS over the state, at every node). `rtol=None` picks by dtype: 1e-10 in
        float64, 1e-5 in float32. `atol=None` scales with the solution: `rtol`
        times each component's largest magnitude in the window, so the test does
        not depend on the state's units (see `docs/choosing.md`).
    - `max_iters`: the most Newton iterations per window.
    - `predictor_steps`: sequential steps of the initial guess's base solve (RK4,
        or the L-stable ROS2 for stiff methods); `None` uses 64 (at most
        `num_steps`) whatever `num_steps`, `0` starts from `y0` at every node.
    - `predictor_coarsening`: the initial guess is nested iteration: the window
        solved by DEER on a grid this many times coarser, recursively, down to the
        base solve, each level interpolated onto the next. `None` interpolates
        the base solve onto the grid directly (with `predictor_steps =
        num_steps // 16`, the RK4 predictor of earlier versions).
    - `jacobian`: `"full"` (DEER: exact Newton, quadratic convergence, memory
        $O(N n^2)$ and work $O(N n^3)$ per iteration) or `"diagonal"` (quasi-DEER:
        only the diagonal of $\partial f / \partial y$ enters the scan; memory and
        scan work $O(N n)$, more iterations, the same converged trajectory; for
        large states, $n \gtrsim 32$). Derivatives are exact either way (they
        use the full Jacobians at the converged trajectory, once).
    - `damping`: a rescue for when plain Newton overflows (chaotic or stiff
        dynamics, trained networks): from the best iterate it continues with
        Levenberg-Marquardt steps, a parallel Kalman smoother, with the damping
        adapted from the actual against the predicted decrease of the residual.
        The rescue is a second loop, entered only after an overflow, so plain
        Newton's iterations cost the same; off by default because it about
        triples compile time and reserves the Kalman smoother's memory (measured
        in `docs/benchmarks.md`). Without it, a non-finite step is halved and
        retried.
    - `method`: the one-step scheme. The implicit trapezoidal rule
        ([`diffrax_deer.Trapezoid`][], 2nd order, A-stable) by default;
        [`diffrax_deer.BackwardEuler`][] (1st, L-stable),
        [`diffrax_deer.GaussLegendre`][] (`stages=2`, `3`: 4th, 6th order) and
        [`diffrax_deer.RadauIIA`][] (`stages=3`: 5th order, L-stable, stiff
        problems); or any diffrax explicit Runge-Kutta solver, e.g.
        `diffrax.Tsit5()`, whose step becomes the one-step map (the converged result
        equals that solver's sequential solve on the same grid).
    """

    num_steps: int = _option()
    rtol: float | None = _option(default=None)
    atol: float | None = _option(default=None)
    max_iters: int = _option(default=50)
    predictor_steps: int | None = _option(default=None)
    predictor_coarsening: int | None = _option(default=COARSENING)
    jacobian: str = _option(default="full")
    damping: bool = _option(default=False)
    matmul_precision: str | None = _option(default="highest")
    method: AbstractDiscretisation = eqx.field(
        static=True, default=Trapezoid(), converter=_as_method
    )

    term_structure: ClassVar = AbstractTerm

    @property
    def interpolation_cls(self):  # pyright: ignore
        return functools.partial(DeerInterpolation, method=self.method)

    def __check_init__(self):
        check_integer(
            "`DeerSolver(num_steps=...)`",
            self.num_steps,
            minimum=1,
            meaning="the number of intervals per window",
        )
        check_integer(
            "`max_iters`",
            self.max_iters,
            minimum=1,
            meaning="the most Newton iterations per window",
        )
        if self.predictor_steps is not None:
            check_integer(
                "`predictor_steps`",
                self.predictor_steps,
                minimum=0,
                meaning="None for the default, 0 for the constant guess y0",
            )
        if self.predictor_coarsening is not None:
            check_integer(
                "`predictor_coarsening`",
                self.predictor_coarsening,
                minimum=2,
                meaning="None, or the ratio between the predictor's nested grids",
            )
        if self.jacobian not in _JACOBIAN_MODES:
            raise ValueError(
                '`jacobian` must be "full" (DEER) or "diagonal" (quasi-DEER, for '
                f"large states); got {self.jacobian!r}."
            )
        if not isinstance(self.damping, bool):
            raise ValueError(f"`damping` must be True or False; got {self.damping!r}.")
        if self.matmul_precision is not None:
            try:
                with _matmul_precision(self.matmul_precision):
                    pass
            except (ValueError, TypeError) as error:
                raise ValueError(
                    "`matmul_precision` must be None or a name that "
                    '`jax.default_matmul_precision` accepts ("highest", "float32", '
                    f'"tensorfloat32", "default", ...); got {self.matmul_precision!r}.'
                ) from error
        check_tolerance("`rtol`", self.rtol)
        check_tolerance("`atol`", self.atol)
        if self.rtol == 0 and (self.atol is None or self.atol == 0):
            # `atol=None` scales with `rtol`, so it is 0 too.
            raise ValueError(
                "`rtol` and `atol` cannot both be 0 (`atol=None` is `rtol` times the "
                "solution's scale): Newton could never stop. Use `rtol=0` with a "
                "positive `atol` for a pure absolute tolerance, or `atol=0` for a "
                "pure relative one."
            )
        if not isinstance(self.method, AbstractDiscretisation):
            raise ValueError(
                "`method` must be a diffrax-deer discretisation (`Trapezoid()`, "
                "`BackwardEuler()`, `GaussLegendre(stages=2 or 3)`, "
                "`RadauIIA(stages=3)`) or a diffrax explicit Runge-Kutta solver "
                f"(e.g. `diffrax.Tsit5()`); got {self.method!r}."
            )

    def order(self, terms: PyTree[AbstractTerm]) -> int:
        return self.method.order()

    def init(self, terms, t0, t1, y0, args) -> DeerState:
        check_terms(terms)
        y_flat, _ = ravel(y0)
        if jnp.issubdtype(y_flat.dtype, jnp.complexfloating):
            raise ValueError(
                "DeerSolver does not support complex states yet: split `y0` into "
                "real and imaginary parts (e.g. a tuple of two real arrays)."
            )
        zero = jnp.array(0, jnp.int32)
        nan = jnp.array(jnp.nan, y_flat.dtype)
        trajectory = jnp.zeros((self.num_steps + 1,) + y_flat.shape, y_flat.dtype)
        nan_time = jnp.full((), jnp.nan, jnp.result_type(t0))
        return DeerState(zero, zero, zero, nan, nan, trajectory, nan_time, nan_time)

    def _tolerances(self, dtype) -> tuple[float, float | None]:
        rtol = _DEFAULT_RTOL[jnp.dtype(dtype)] if self.rtol is None else self.rtol
        # None: scaled with the trajectory by `newton_solve`.
        return rtol, self.atol

    def _empty_step(self, t0, t1, y0, solver_state: DeerState):
        # Nothing to solve (`y0=None`, or only zero-size leaves): the state stays
        # empty, as with every diffrax solver, and Newton does not run.
        y0_flat, _ = ravel(y0)
        zero_norm = jnp.zeros((), solver_state.update_norm.dtype)
        new_state = DeerState(
            num_iters=jnp.array(0, jnp.int32),
            total_num_iters=solver_state.total_num_iters,
            max_num_iters=solver_state.max_num_iters,
            update_norm=zero_norm,
            residual_norm=zero_norm,
            trajectory=solver_state.trajectory,
            window_t0=jnp.asarray(t0, solver_state.window_t0.dtype),
            window_t1=jnp.asarray(t1, solver_state.window_t1.dtype),
        )
        ys = jnp.zeros((self.num_steps + 1, 0), y0_flat.dtype)
        dense_info = dict(ys=ys, info=None, template=structure_template(y0))
        return y0, None, dense_info, new_state, RESULTS.successful

    def step(self, terms, t0, t1, y0, args, solver_state: DeerState, made_jump):
        del made_jump
        # What the enclosing `diffeqsolve` was given: diffrax does not pass it on.
        context = enclosing_diffeqsolve()
        check_event_support(context)
        check_terms(terms)
        y0_flat, unravel = ravel(y0)
        _check_solver_state(solver_state, self.num_steps, y0_flat, t0)
        if y0_flat.size == 0:
            return self._empty_step(t0, t1, y0, solver_state)
        dtype = y0_flat.dtype
        # The control over [0, 1] is the time direction (+-1) times a constant (one
        # for ODETerm; `check_terms` accepts only such controls), so `vf_prod` with
        # it is dy/dt in diffrax's normalised, increasing time.
        unit_control = terms.contr(jnp.zeros((), dtype), jnp.ones((), dtype))

        def vector_field(t, y, args):
            y_tree = unravel(y)
            # Set at trace time, so it also holds for the field's derivatives.
            with _matmul_precision(self.matmul_precision):
                dy = terms.vf_prod(t, y_tree, args, unit_control)
            if jtu.tree_structure(dy) != jtu.tree_structure(y_tree):
                raise ValueError(
                    "The terms' `vf_prod` must return a PyTree with the structure "
                    f"of `y0`, {jtu.tree_structure(y_tree)}; got "
                    f"{jtu.tree_structure(dy)}."
                )
            dy = jtu.tree_map(
                lambda d, x: jnp.broadcast_to(d, jnp.shape(x)), dy, y_tree
            )
            dy_flat, _ = ravel(dy)
            return dy_flat.astype(dtype)

        fractions = jnp.arange(self.num_steps + 1, dtype=dtype) / self.num_steps
        ts = jnp.asarray(t0, dtype) + jnp.asarray(t1 - t0, dtype) * fractions
        ts = ts.at[-1].set(jnp.asarray(t1, dtype))
        rtol, atol = self._tolerances(dtype)
        if self.predictor_steps is None:
            predictor_steps = default_predictor_steps(self.num_steps)
        else:
            predictor_steps = self.predictor_steps
        # Warm start: a trajectory stored for this very window (a repeated solve).
        warm = (
            (solver_state.window_t0 == t0)
            & (solver_state.window_t1 == t1)
            & jnp.all(jnp.isfinite(solver_state.trajectory))
        )
        ys, stages, stats = solve_window(
            vector_field,
            self.method,
            ts,
            y0_flat,
            args,
            guess=solver_state.trajectory.astype(dtype),
            use_guess=warm,
            rtol=rtol,
            atol=atol,
            max_iters=self.max_iters,
            predictor_steps=predictor_steps,
            predictor_coarsening=self.predictor_coarsening,
            jacobian=self.jacobian,
            damping=self.damping,
        )
        result = RESULTS.where(
            stats.converged,
            RESULTS.successful,
            RESULTS.where(
                stats.diverged,
                RESULTS.nonlinear_divergence,
                RESULTS.nonlinear_max_steps_reached,
            ),
        )
        # (DeerAdjoint raises itself, for the windows it keeps.)
        if context is not None and context.throw and not context.deer_adjoint:
            raise_if_failed(
                ~stats.converged,
                stats.diverged,
                stats.num_iters,
                stats.residual_norm,
                stats.update_norm,
                t0 * direction(terms, t0),
                t1 * direction(terms, t0),
                max_iters=self.max_iters,
            )
        new_state = DeerState(
            num_iters=stats.num_iters,
            total_num_iters=solver_state.total_num_iters + stats.num_iters,
            max_num_iters=jnp.maximum(solver_state.max_num_iters, stats.num_iters),
            update_norm=stats.update_norm.astype(dtype),
            residual_norm=stats.residual_norm.astype(dtype),
            trajectory=jax.lax.stop_gradient(ys),
            window_t0=jnp.asarray(t0, solver_state.window_t0.dtype),
            window_t1=jnp.asarray(t1, solver_state.window_t1.dtype),
        )
        dense_info = dict(
            ys=ys,
            info=self.method.dense_info(vector_field, ts, ys, stages, args),
            template=structure_template(y0),
        )
        dense = context is not None and getattr(context.saveat, "dense", False)
        if dense and not context.deer_adjoint:
            # diffrax's own loop reserves `max_steps` windows of this; DeerAdjoint
            # reserves only the windows that occur, or warns itself.
            warn_if_dense_buffers_are_large(dense_info, context.max_steps)
        y1 = unravel(ys[-1])
        return y1, None, dense_info, new_state, result

    def func(self, terms, t0, y0, args) -> Any:
        return terms.vf(t0, y0, args)
