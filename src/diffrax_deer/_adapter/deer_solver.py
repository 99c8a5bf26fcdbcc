"""`DeerSolver`: the diffrax adapter around the DEER window solve."""

import contextlib
import functools
import typing
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import RESULTS, AbstractImplicitSolver, AbstractTerm

# `use_stepsize_tol` is diffrax's (private) marker for "take this tolerance from the
# adaptive step-size controller"; `diffeqsolve` replaces it (pinned: diffrax 0.7).
from diffrax._root_finder import use_stepsize_tol
from diffrax._term import WrapTerm
from jax.sharding import Mesh
from jaxtyping import Array, Inexact, Int, PyTree, Real

from .._core import mesh as _mesh
from .._core.discretisation import AbstractDiscretisation, JacobianMode
from .._core.error_estimate import ErrorEstimate, estimate_error, local_errors
from .._core.predictor import COARSENING, default_predictor_steps
from .._core.sharded_scan import check_time_mesh
from .._core.validation import as_python_scalar, check_integer, check_tolerance
from .._core.window import solve_window
from .._methods.collocation import AbstractCollocation, RadauIIA
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
# With an accuracy target (rtol, atol), Newton stops at this fraction of it, as
# implicit Runge-Kutta codes do (kappa in Hairer and Wanner's RADAU5), but never
# below a round-off floor that the update can always reach.
_NEWTON_FRACTION = 1e-2
_NEWTON_FLOOR = {
    jnp.dtype(jnp.float64): 1e-13,
    jnp.dtype(jnp.float32): 1e-6,
    jnp.dtype(jnp.float16): 1e-2,
    jnp.dtype(jnp.bfloat16): 1e-2,
}
# `DeerSolver()` (no grid given): the method and the intervals per window.
_DEFAULT_METHOD = RadauIIA(stages=3)
_DEFAULT_NUM_STEPS = 64
# A window out of tolerance is solved again on an adapted mesh when that mesh is
# predicted to bring its error to this fraction of the tolerance, or to cut it by
# `_REMESH_IMPROVEMENT` (a next pass refines it further), up to `_REMESH_PASSES`
# times; otherwise it is rejected and retried shorter, which costs less.
_REMESH_PREDICTED = 0.7
_REMESH_IMPROVEMENT = 0.1
_REMESH_PASSES = 2


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
    - `error_estimate`: the last window's estimated global error,
        $\max_i \mathrm{RMS}(e_i)$ over its nodes (see
        [`diffrax_deer.estimate_error`][]); infinite when the estimate failed, NaN
        when none was computed (`num_steps=1`, or `error_estimate=False`).
    - `max_error_estimate`: the largest `error_estimate` of the windows so far.
    - `dense_error_estimate`: the same between the nodes: the last window's
        estimated error of the dense output (what `SaveAt(ts=...)` and
        `sol.evaluate` return there), $\max_i \mathrm{RMS}$ over the midpoints of
        its intervals.
    - `max_dense_error_estimate`: the largest `dense_error_estimate` so far.
    - `scaled_error`: the last window's error relative to the tolerances, at its
        nodes and between them, $\max \|e / (\text{atol} + \text{rtol}\,|y|)\|$
        (at most 1: within tolerance); what an adaptive controller judges. NaN
        without tolerances (`DeerSolver(num_steps=N)`).
    - `max_scaled_error`: the largest `scaled_error` of the windows so far.
    - `total_estimate_iters`: Newton iterations of the error estimates' coarse
        solves, summed over all windows.
    - `total_remeshes`: windows solved again on an adapted mesh (`adapt_mesh`).
    """

    num_iters: Int[Array, ""]
    total_num_iters: Int[Array, ""]
    max_num_iters: Int[Array, ""]
    update_norm: Real[Array, ""]
    residual_norm: Real[Array, ""]
    trajectory: Inexact[Array, "nodes n"]
    window_t0: Real[Array, ""]
    window_t1: Real[Array, ""]
    error_estimate: Real[Array, ""]
    max_error_estimate: Real[Array, ""]
    dense_error_estimate: Real[Array, ""]
    max_dense_error_estimate: Real[Array, ""]
    scaled_error: Real[Array, ""]
    max_scaled_error: Real[Array, ""]
    total_estimate_iters: Int[Array, ""]
    total_remeshes: Int[Array, ""]


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


def _from_controller(*values: Any) -> bool:
    # By identity: the values may be arrays, which `in` would compare elementwise.
    return any(value is use_stepsize_tol for value in values)


def _option(**kwargs):
    return eqx.field(static=True, converter=as_python_scalar, **kwargs)


class DeerSolver(AbstractImplicitSolver):
    r"""Solves an ODE over a whole window of steps at once, by DEER.

    One diffrax step is one window $[t_0, t_1]$. DeerSolver discretises it on $N$
    intervals $t_0 < t_1 < \dots < t_N$ and solves for all nodes at once: Newton's
    method on the stacked residual (e.g. the implicit trapezoidal rule's
    $r_i = y_{i+1} - y_i - \tfrac{h_i}{2}(f(t_i, y_i) + f(t_{i+1}, y_{i+1}))$, or
    that of another `method`), where each Newton step is the linear recurrence
    $\delta_{i+1} = A_i \delta_i + b_i$, solved by a parallel associative scan in
    $O(\log N)$ depth. Newton starts from the same window solved on grids 16, 256,
    ... times coarser (nested iteration) down to 64 sequential steps. Derivatives
    use the implicit function theorem at the converged trajectory: one more linear
    recurrence, never backpropagation through Newton.

    **Tolerances, not a grid.** `DeerSolver()` with an adaptive controller lets it
    choose the windows, as diffrax's solvers let it choose their steps:

    ```python
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), DeerSolver(), t0, t1, dt0=None, y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6))
    ```

    Each window holds 64 intervals of [`diffrax_deer.RadauIIA`][] (order 5,
    L-stable); its global error is estimated at every node by solving it again on
    every other node ([`diffrax_deer.estimate_error`][], Richardson extrapolation)
    and returned as `y_error`, scaled so that the controller rejects a window whose
    worst node is out of tolerance; a window whose Newton solve fails returns an
    infinite `y_error` and is retried shorter. Out of tolerance, the window is first
    solved again on a mesh that equidistributes its local errors, where that is
    predicted to help (`adapt_mesh`). The controller's `rtol`, `atol` and norm are
    the solver's (diffrax's mechanism for implicit solvers); Newton stops at 1% of
    them. `sol.stats` counts accepted and rejected windows; the estimates are in
    the solver state ([`diffrax_deer.DeerState`][]).

    **A grid of your own.** `DeerSolver(num_steps=N)` takes `N` uniform intervals
    per window of the trapezoidal rule, Newton at 1e-10 (float64), and no
    re-meshing; with fixed windows (`dt0`, `StepTo`) the estimate is still computed
    and reported. `DeerSolver(rtol=..., atol=...)` on fixed windows compares it with
    those tolerances; `max_error_ratio` fails a window far out of tolerance.
    `DeerSolver()` on fixed windows raises diffrax's message for implicit solvers
    without tolerances.

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

    **Arguments:**

    - `num_steps`: intervals per window, $N \ge 1$; `None` (the default): 64, and
        the tolerance-driven defaults above.
    - `rtol`, `atol`: the accuracy target, against which the error estimate is
        measured; Newton stops when the error it leaves (estimated from the last
        update and how fast the updates contract) is within 1% of
        `atol + rtol * |y|` per component (RMS over the state, at every node).
        `None` (with `num_steps` unset): taken from an adaptive step-size
        controller. With `num_steps` given they are Newton's own tolerances and
        the estimate is only reported: `rtol=None` picks by dtype (1e-10 in
        float64, 1e-5 in float32), and `atol=None` scales with the solution
        (`rtol` times each component's largest magnitude in the window), so the
        test does not depend on the state's units (see `docs/choosing.md`).
        Finite and at least 0; one of them (not both) may be 0.
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
    - `method`: the one-step scheme: by default [`diffrax_deer.RadauIIA`][]
        (`stages=3`), or with `num_steps` given the implicit trapezoidal rule
        ([`diffrax_deer.Trapezoid`][], 2nd order, A-stable);
        [`diffrax_deer.BackwardEuler`][] (1st, L-stable),
        [`diffrax_deer.GaussLegendre`][] (`stages=2`, `3`: 4th, 6th order) and
        [`diffrax_deer.RadauIIA`][] (`stages=3`: 5th order, L-stable, stiff
        problems); or any diffrax explicit Runge-Kutta solver, e.g.
        `diffrax.Tsit5()`, whose step becomes the one-step map (the converged result
        equals that solver's sequential solve on the same grid).
    - `norm`: the norm of the scaled error (per node, over the state); `None`: the
        adaptive controller's, or the RMS norm.
    - `error_estimate`: whether to estimate each window's error (one more Newton
        solve, on half the intervals). Without it adaptive controllers are refused.
        `None` (the default): on, except with a `mesh`.
    - `max_error_ratio`: with tolerances, a window whose estimated error exceeds
        this many times the tolerance makes the solve fail with
        `RESULTS.dt_min_reached` (on fixed windows, which cannot be shortened);
        `None` only reports it.
    - `adapt_mesh`: whether a window out of tolerance is solved again on a mesh
        adapted to its local errors (at most twice); `None`: with `num_steps` unset.
        The mesh is held fixed when differentiating.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `"time"`, e.g.
        `jax.sharding.Mesh(jax.devices(), ("time",))`, splits each window's
        `num_steps + 1` nodes into one block per device of that axis (padded to a
        multiple of them; the padding is inert). Each device computes the
        residuals and linearisations of its own nodes, and every recurrence
        (each Newton step's, diagonal or damped too, the tangent's for `jax.jvp`
        and its transpose for `jax.grad`, with `DeerAdjoint` or diffrax's
        adjoints) is a local scan per device and a scan over the $P$ blocks'
        composed maps, so $O(P n^2)$ values move per Newton iteration whatever
        `num_steps`. The result equals the one-device solve to round-off. Needs
        `num_steps`; the error estimate is not split, so it is off by default
        here and `error_estimate=True` or `adapt_mesh=True` is refused. The
        predictor runs on the whole window on every device (`predictor_steps=0`
        skips it). `None` (the default): one device, the program unchanged. See
        [Scaling out](../how-it-works.md#scaling-out-several-devices).
    """

    num_steps: int | None = _option(default=None)
    rtol: Any = eqx.field(default=None, converter=as_python_scalar)
    atol: Any = eqx.field(default=None, converter=as_python_scalar)
    max_iters: int = _option(default=50)
    predictor_steps: int | None = _option(default=None)
    predictor_coarsening: int | None = _option(default=COARSENING)
    jacobian: str = _option(default="full")
    damping: bool = _option(default=False)
    matmul_precision: str | None = _option(default="highest")
    method: AbstractDiscretisation | None = eqx.field(
        static=True, default=None, converter=_as_method
    )
    norm: Any = None
    error_estimate: bool | None = _option(default=None)
    max_error_ratio: float | None = _option(default=None)
    adapt_mesh: bool | None = _option(default=None)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    term_structure: ClassVar = AbstractTerm

    def __post_init__(self):
        # No grid given: the tolerances (and the norm) are the accuracy target, taken
        # from an adaptive step-size controller unless given, as diffrax's implicit
        # solvers take theirs. A grid given (`num_steps`) keeps them optional.
        if self.method is None:
            self.method = Trapezoid() if self.num_steps is not None else _DEFAULT_METHOD
        if self.adapt_mesh is None:
            self.adapt_mesh = self.num_steps is None
        if self.error_estimate is None:
            # The estimate's coarse solve is not split over a mesh's devices.
            self.error_estimate = self.mesh is None
        if self.num_steps is None:
            if self.rtol is None:
                self.rtol = use_stepsize_tol
            if self.atol is None:
                self.atol = use_stepsize_tol
        if self.norm is None and _from_controller(self.rtol, self.atol):
            self.norm = use_stepsize_tol

    def _check_mesh(self) -> None:
        check_time_mesh(self.mesh)
        if self.num_steps is None:
            raise ValueError(
                "`DeerSolver(mesh=...)` splits each window's grid over the devices: "
                "pass `num_steps=N` (the intervals per window). Adaptive windows "
                "(`num_steps=None`) need the error estimate, which is not split "
                "over devices; use `mesh=None` for them."
            )
        if self.error_estimate or self.adapt_mesh:
            raise ValueError(
                "`DeerSolver(mesh=...)` does not split the error estimate (or the "
                "re-meshing it drives) over the devices: pass "
                "`error_estimate=False` and `adapt_mesh=False` (the defaults with "
                "a mesh), or `mesh=None`."
            )

    def _check_mesh_adjoint(self, context) -> None:
        if (
            self.mesh is not None
            and context is not None
            and context.deer_adjoint
            and isinstance(self.method, AbstractCollocation)
        ):
            # Reverse mode through DeerAdjoint's checkpointed loop traces a JVP of
            # the split Newton loop for these methods, which fails inside JAX.
            raise ValueError(
                "`DeerSolver(mesh=...)` with a collocation method (stage unknowns: "
                f"{type(self.method).__name__}) does not run under `DeerAdjoint` "
                "yet: use diffrax's default adjoint, a method without stages "
                "(`Trapezoid()`, `BackwardEuler()`, an explicit Runge-Kutta "
                "solver), or `mesh=None`."
            )

    @property
    def root_finder(self) -> "DeerSolver":  # pyright: ignore
        """DeerSolver is its own root finder: diffrax reads (and with an adaptive
        controller, fills in) its `rtol`, `atol` and `norm` here."""
        return self

    @property
    def root_find_max_steps(self) -> int:  # pyright: ignore
        return self.max_iters

    @property
    def intervals(self) -> int:
        """Intervals per window: `num_steps`, or the default of `DeerSolver()`."""
        return _DEFAULT_NUM_STEPS if self.num_steps is None else self.num_steps

    @property
    def interpolation_cls(self):  # pyright: ignore
        return functools.partial(
            DeerInterpolation, method=self.method, uniform=not self.adapt_mesh
        )

    def __check_init__(self):
        if self.mesh is not None:
            self._check_mesh()
        if self.num_steps is not None:
            check_integer(
                "`DeerSolver(num_steps=...)`",
                self.num_steps,
                minimum=1,
                meaning="None, or the number of intervals per window",
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
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not use_stepsize_tol:
                check_tolerance(f"`{name}`", value)
        if self.rtol == 0 and (self.atol is None or self.atol == 0):
            # `atol=None` scales with `rtol`, so it is 0 too.
            raise ValueError(
                "`rtol` and `atol` cannot both be 0 (`atol=None` is `rtol` times the "
                "solution's scale): Newton could never stop. Use `rtol=0` with a "
                "positive `atol` for a pure absolute tolerance, or `atol=0` for a "
                "pure relative one."
            )
        if not isinstance(self.error_estimate, bool):
            raise ValueError(
                f"`error_estimate` must be True or False; got {self.error_estimate!r}."
            )
        if self.max_error_ratio is not None:
            if not (
                isinstance(self.max_error_ratio, (int, float))
                and self.max_error_ratio >= 1
            ):
                raise ValueError(
                    "`max_error_ratio` must be None or a number >= 1; got "
                    f"{self.max_error_ratio!r}."
                )
            if self.rtol is None or self.atol is None:
                raise ValueError(
                    "`max_error_ratio` compares the error estimate with the "
                    "tolerances: pass `rtol` and `atol` too (or leave `num_steps` "
                    "unset, to take them from an adaptive step-size controller)."
                )
            if not self.error_estimate:
                raise ValueError("`max_error_ratio` needs `error_estimate=True`.")
        if not isinstance(self.adapt_mesh, bool):
            raise ValueError(
                f"`adapt_mesh` must be None, True or False; got {self.adapt_mesh!r}."
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

    def error_order(self, terms: PyTree[AbstractTerm]) -> int:
        # The estimate is the window's own global error: N intervals of order p on a
        # window of length H make it C (H/N)^p H, so it scales like H^(p+1), and a
        # controller must take the (p+1)-th root of its ratio to the tolerance.
        return self.method.order() + 1

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
        trajectory = jnp.zeros((self.intervals + 1,) + y_flat.shape, y_flat.dtype)
        nan_time = jnp.full((), jnp.nan, jnp.result_type(t0))
        return DeerState(
            num_iters=zero,
            total_num_iters=zero,
            max_num_iters=zero,
            update_norm=nan,
            residual_norm=nan,
            trajectory=trajectory,
            window_t0=nan_time,
            window_t1=nan_time,
            error_estimate=nan,
            max_error_estimate=nan,
            dense_error_estimate=nan,
            max_dense_error_estimate=nan,
            scaled_error=nan,
            max_scaled_error=nan,
            total_estimate_iters=zero,
            total_remeshes=zero,
        )

    def _target(self) -> tuple[Any, Any, Any] | None:
        """The accuracy target `(rtol, atol, norm)`, or None (a grid without one)."""
        if self.rtol is None or self.atol is None:
            return None
        if _from_controller(self.rtol, self.atol, self.norm):
            raise ValueError(
                "`DeerSolver()` takes its tolerances from an adaptive step-size "
                "controller: pass `stepsize_controller=diffrax.PIDController("
                "rtol=..., atol=...)` to `diffeqsolve`. For fixed windows (`dt0`, "
                "`StepTo`) give them yourself, `DeerSolver(rtol=..., atol=...)`, "
                "or fix the grid with `DeerSolver(num_steps=...)`."
            )
        return self.rtol, self.atol, self.norm

    def _newton_tolerances(self, target, dtype) -> tuple[Any, Any]:
        if target is None:
            # Newton's own tolerances; `atol=None` is scaled with the trajectory.
            rtol = _DEFAULT_RTOL[jnp.dtype(dtype)] if self.rtol is None else self.rtol
            return rtol, self.atol
        # A fraction of the target, above round-off, but never looser than the
        # target itself.
        floor = _NEWTON_FLOOR[jnp.dtype(dtype)]
        real_dtype = jnp.finfo(dtype).dtype

        def newton(tolerance):
            tolerance = jnp.asarray(tolerance, real_dtype)
            return jnp.maximum(
                _NEWTON_FRACTION * tolerance, jnp.minimum(floor, tolerance)
            )

        return newton(target[0]), newton(target[1])

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
            error_estimate=zero_norm,
            max_error_estimate=solver_state.max_error_estimate,
            dense_error_estimate=zero_norm,
            max_dense_error_estimate=solver_state.max_dense_error_estimate,
            scaled_error=zero_norm,
            max_scaled_error=solver_state.max_scaled_error,
            total_estimate_iters=solver_state.total_estimate_iters,
            total_remeshes=solver_state.total_remeshes,
        )
        ys = jnp.zeros((self.intervals + 1, 0), y0_flat.dtype)
        time_dtype = solver_state.window_t0.dtype
        ts = jnp.linspace(
            jnp.asarray(t0, time_dtype), jnp.asarray(t1, time_dtype), ys.shape[0]
        )
        dense_info = dict(ts=ts, ys=ys, info=None, template=structure_template(y0))
        return y0, None, dense_info, new_state, RESULTS.successful

    def _vector_field(self, terms, unravel, dtype):
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

        return vector_field

    def step(self, terms, t0, t1, y0, args, solver_state: DeerState, made_jump):
        del made_jump
        # What the enclosing `diffeqsolve` was given: diffrax does not pass it on.
        context = enclosing_diffeqsolve()
        check_event_support(context)
        check_terms(terms)
        self._check_mesh_adjoint(context)
        y0_flat, _ = ravel(y0)
        _check_solver_state(solver_state, self.intervals, y0_flat, t0)
        if y0_flat.size == 0:
            return self._empty_step(t0, t1, y0, solver_state)
        # (DeerAdjoint raises itself, for the windows it keeps; an adaptive
        # controller rejects a failed window and retries it shorter.)
        throw = (
            context is not None
            and context.throw
            and not context.deer_adjoint
            and not context.adaptive
        )
        y1, y_error, dense_info, new_state, result = _cached_window_step(
            self, terms, t0, t1, y0, args, solver_state, throw
        )
        dense = context is not None and getattr(context.saveat, "dense", False)
        if dense and not context.deer_adjoint:
            # diffrax's own loop reserves `max_steps` windows of this; DeerAdjoint
            # reserves only the windows that occur, or warns itself.
            warn_if_dense_buffers_are_large(dense_info, context.max_steps)
        return y1, y_error, dense_info, new_state, result

    def _window_step(self, terms, t0, t1, y0, args, solver_state: DeerState, throw):
        """`step` on a state of positive size: solve the window, estimate its
        error, and raise on failure if `throw`."""
        y0_flat, unravel = ravel(y0)
        dtype = y0_flat.dtype
        vector_field = self._vector_field(terms, unravel, dtype)
        num_steps = self.intervals
        fractions = jnp.arange(num_steps + 1, dtype=dtype) / num_steps
        ts = jnp.asarray(t0, dtype) + jnp.asarray(t1 - t0, dtype) * fractions
        ts = ts.at[-1].set(jnp.asarray(t1, dtype))
        target = self._target()
        rtol, atol = self._newton_tolerances(target, dtype)
        if self.predictor_steps is None:
            predictor_steps = default_predictor_steps(num_steps)
        else:
            predictor_steps = self.predictor_steps
        solve = functools.partial(
            self._solve,
            vector_field=vector_field,
            y0=y0_flat,
            args=args,
            tolerances=(rtol, atol),
            scale=_Scale.of(target, dtype),
            unravel=unravel,
            predictor_steps=predictor_steps,
        )
        # Warm start: a trajectory stored for this very window (a repeated solve).
        warm = (
            (solver_state.window_t0 == t0)
            & (solver_state.window_t1 == t1)
            & jnp.all(jnp.isfinite(solver_state.trajectory))
        )
        guess = solver_state.trajectory.astype(dtype)
        if self.adapt_mesh and self.error_estimate and num_steps >= 2:
            window = self._solve_adapting(
                solve, ts, guess, warm, vector_field, args, unravel
            )
        else:
            window = solve(ts, guess=guess, use_guess=warm)
        stats, error = window.stats, window.error
        result = RESULTS.where(
            stats.converged,
            RESULTS.successful,
            RESULTS.where(
                stats.diverged,
                RESULTS.nonlinear_divergence,
                RESULTS.nonlinear_max_steps_reached,
            ),
        )
        if self.max_error_ratio is not None:
            # A grid too coarse for the tolerance: the window may not be shortened
            # (a fixed grid), so the solve fails, as diffrax's does when the step it
            # needs is below `dtmin`.
            too_coarse = stats.converged & ~(error.scaled_error <= self.max_error_ratio)
            result = RESULTS.where(too_coarse, RESULTS.dt_min_reached, result)
        if throw:
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
        new_state = _next_state(solver_state, window, t0, t1)
        dense_info = dict(
            ts=window.ts,
            ys=window.ys,
            info=self.method.dense_info(
                vector_field, window.ts, window.ys, window.stages, args
            ),
            template=structure_template(y0),
        )
        y1 = unravel(window.ys[-1])
        return y1, error.y_error, dense_info, new_state, result

    def _solve(
        self,
        ts,
        *,
        vector_field,
        y0,
        args,
        tolerances,
        scale,
        unravel,
        predictor_steps,
        guess,
        use_guess=None,
        guess_stages=None,
    ) -> "_Window":
        """Solves the window on the nodes `ts`, and estimates its error."""
        rtol, atol = tolerances
        newton = dict(
            rtol=rtol, atol=atol, max_iters=self.max_iters, jacobian=self.jacobian
        )
        ys, stages, stats = solve_window(
            vector_field,
            self.method,
            ts,
            y0,
            args,
            guess=guess,
            use_guess=use_guess,
            guess_stages=guess_stages,
            predictor_steps=predictor_steps,
            predictor_coarsening=self.predictor_coarsening,
            damping=self.damping,
            mesh=self.mesh,
            **newton,
        )
        if self.error_estimate and ts.shape[0] > 2:
            estimate = estimate_error(
                vector_field, self.method, ts, ys, stages, args, **newton
            )
            error = _WindowError.of(ys, estimate, stats.converged, scale, unravel)
            estimate_iters = estimate.coarse_stats.num_iters
        else:
            estimate = None
            error = _WindowError.none(ys.dtype)
            estimate_iters = jnp.array(0, jnp.int32)
        return _Window(
            ts=ts,
            ys=ys,
            stages=stages,
            stats=stats,
            estimate=estimate,
            error=error,
            num_iters=stats.num_iters,
            estimate_iters=estimate_iters,
            remeshed=jnp.array(False),
        )

    def _solve_adapting(
        self, solve, uniform_ts, warm_guess, warm, vector_field, args, unravel
    ) -> "_Window":
        """Solves the window on the uniform mesh, then, where its error is out of
        tolerance, again on a mesh that equidistributes its local errors, from the
        interpolated solution (Newton starts next to the answer), up to
        `_REMESH_PASSES` times while that is predicted to help. All passes are one
        `lax.scan` over one compiled solve; shapes are static; the mesh is not
        differentiated."""
        method, num_steps = self.method, uniform_ts.shape[0] - 1
        scale = _Scale.of(self._target(), warm_guess.dtype)
        # Traced once, for the passes' carry and inside them, as the same call.
        solve = eqx.filter_jit(solve)

        def plan(current):
            estimate = jax.lax.stop_gradient(current.estimate)
            local = local_errors(vector_field, method, estimate, args, self.jacobian)
            scaled = scale.norms(local, estimate.coarse_ys[1:], unravel)
            mesh = _mesh.adapt_mesh(
                estimate.coarse_ts, scaled, method.order(), num_steps
            )
            # Worth a solve if the new mesh is predicted to bring the error within
            # tolerance, or far down (a next pass then refines it further).
            predicted = current.error.controller_error * mesh.improvement
            worth = (predicted <= _REMESH_PREDICTED) | (
                mesh.improvement <= _REMESH_IMPROVEMENT
            )
            return mesh.ts, worth

        def first_guess(current):
            stages = method.init_stages(vector_field, uniform_ts, warm_guess, args)
            return warm_guess, stages

        def transferred_guess(current, mesh_ts):
            info = method.dense_info(
                vector_field, current.ts, current.ys, current.stages, args
            )
            guess = jax.vmap(
                lambda t: method.interpolate(current.ts, current.ys, info, t)
            )(mesh_ts)
            stages = method.transfer_stages(
                vector_field, current.ts, current.stages, mesh_ts, guess, args
            )
            return guess, stages

        def run(current, mesh_ts, first):
            guess, guess_stages = jax.lax.cond(
                first,
                lambda c: first_guess(c),
                lambda c: transferred_guess(c, mesh_ts),
                current,
            )
            use_guess = jnp.where(first, warm, True)
            new = solve(
                mesh_ts, guess=guess, use_guess=use_guess, guess_stages=guess_stages
            )
            # Keep the better of the two (a misjudged mesh must not make it worse).
            better = first | (
                new.error.controller_error < current.error.controller_error
            )
            kept = jtu.tree_map(
                lambda a, b: jnp.where(better, a, b),
                eqx.filter(new, eqx.is_array),
                eqx.filter(current, eqx.is_array),
            )
            kept = eqx.combine(kept, eqx.filter(new, eqx.is_array, inverse=True))
            previous = jnp.where(first, 0, 1)
            return eqx.tree_at(
                lambda w: (w.num_iters, w.estimate_iters, w.remeshed),
                kept,
                (
                    previous * current.num_iters + new.num_iters,
                    previous * current.estimate_iters + new.estimate_iters,
                    ~first & (current.remeshed | better),
                ),
            )

        def one_pass(carry, index):
            current, go_on = carry
            first = index == 0
            needed = first | (
                go_on
                & current.stats.converged
                & current.estimate.valid
                & (current.error.controller_error > 1)
            )

            def attempt(current):
                mesh_ts, worth = jax.lax.cond(
                    first, lambda c: (uniform_ts, jnp.array(True)), plan, current
                )
                new = jax.lax.cond(worth, run, lambda c, *_: c, current, mesh_ts, first)
                return new, worth

            new, worth = jax.lax.cond(
                needed, attempt, lambda c: (c, jnp.array(False)), current
            )
            return (new, needed & worth), None

        # The first pass's call, for its shapes only (no ops left in the program).
        shapes = eqx.filter_eval_shape(
            lambda: solve(
                uniform_ts,
                guess=warm_guess,
                use_guess=warm,
                guess_stages=first_guess(None)[1],
            )
        )
        (window, _), _ = jax.lax.scan(
            one_pass,
            (_zeros_of(shapes), jnp.array(True)),
            jnp.arange(_REMESH_PASSES + 1),
        )
        return window

    def func(self, terms, t0, y0, args) -> Any:
        return terms.vf(t0, y0, args)


def _zeros_of(shapes: PyTree) -> PyTree:
    """Zeros in place of every `jax.ShapeDtypeStruct` of `shapes`."""
    return jtu.tree_map(
        lambda x: (
            jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
        ),
        shapes,
    )


@eqx.filter_jit
def _cached_window_step(solver, terms, t0, t1, y0, args, solver_state, throw):
    # diffrax traces a solver's `step` three times per `diffeqsolve` (two
    # `eval_shape`s of its loop body, then the loop): as a jitted function of the
    # same static parts and shapes, the window solve is traced once, and the
    # other two reuse it. The field (inside `terms`) and `args` are as hashable
    # here as `diffeqsolve`'s own `filter_jit` requires.
    return solver._window_step(terms, t0, t1, y0, args, solver_state, throw)


def _next_state(solver_state: DeerState, window: "_Window", t0, t1) -> DeerState:
    """The solver state after `window`: its figures, and the running totals."""
    stats, error = window.stats, window.error
    dtype = window.ys.dtype
    return DeerState(
        num_iters=window.num_iters,
        total_num_iters=solver_state.total_num_iters + window.num_iters,
        max_num_iters=jnp.maximum(solver_state.max_num_iters, window.num_iters),
        update_norm=stats.update_norm.astype(dtype),
        residual_norm=stats.residual_norm.astype(dtype),
        trajectory=jax.lax.stop_gradient(window.ys),
        window_t0=jnp.asarray(t0, solver_state.window_t0.dtype),
        window_t1=jnp.asarray(t1, solver_state.window_t1.dtype),
        error_estimate=error.error_estimate,
        max_error_estimate=jnp.fmax(
            solver_state.max_error_estimate, error.error_estimate
        ),
        dense_error_estimate=error.dense_error_estimate,
        max_dense_error_estimate=jnp.fmax(
            solver_state.max_dense_error_estimate, error.dense_error_estimate
        ),
        scaled_error=error.scaled_error,
        max_scaled_error=jnp.fmax(solver_state.max_scaled_error, error.scaled_error),
        total_estimate_iters=solver_state.total_estimate_iters + window.estimate_iters,
        total_remeshes=solver_state.total_remeshes + window.remeshed.astype(jnp.int32),
    )


def _flat_rms_norm(x: PyTree[Array]) -> Real[Array, ""]:
    flat, _ = ravel(x)
    return jnp.sqrt(jnp.mean(jnp.abs(flat) ** 2))


class _Scale(eqx.Module):
    """The tolerance scale $\text{atol} + \text{rtol}|y|$ and the norm errors are
    measured in; without a target, $1 + |y|$ and the RMS norm."""

    rtol: Real[Array, ""]
    atol: Real[Array, ""]
    norm: Any
    has_target: bool = eqx.field(static=True)

    @classmethod
    def of(cls, target, dtype) -> "_Scale":
        real_dtype = jnp.finfo(dtype).dtype
        if target is None:
            one = jnp.ones((), real_dtype)
            return cls(one, one, _flat_rms_norm, False)
        rtol, atol, norm = target
        return cls(
            jnp.asarray(rtol, real_dtype),
            jnp.asarray(atol, real_dtype),
            _flat_rms_norm if norm is None else norm,
            True,
        )

    def at(self, ys):
        return self.atol + self.rtol * jnp.abs(ys)

    def norms(self, errors, ys, unravel):
        """The norm of every row of `errors / scale(ys)`."""
        return jax.vmap(lambda e: self.norm(unravel(e)))(errors / self.at(ys))


class _WindowError(eqx.Module):
    """A window's error estimate in the forms the solver reports it."""

    y_error: PyTree[Array] | None
    error_estimate: Real[Array, ""]
    dense_error_estimate: Real[Array, ""]
    scaled_error: Real[Array, ""]
    controller_error: Real[Array, ""]

    @classmethod
    def none(cls, dtype) -> "_WindowError":
        nan = jnp.array(jnp.nan, dtype)
        return cls(None, nan, nan, nan, nan)

    @classmethod
    def of(
        cls, ys, estimate: ErrorEstimate, converged, scale: "_Scale", unravel
    ) -> "_WindowError":
        r"""The window's error as diffrax's controllers judge a step's.

        A controller divides `y_error` by $\text{atol} + \text{rtol}
        \max(|y_0|, |y_1|)$ and takes its norm. A window's error lives at every
        node and between them (its dense output), so each error is scaled by its
        own tolerance, $\epsilon = \max \|e / (\text{atol} + \text{rtol}|y|)\|$
        over the nodes and the intervals' midpoints, and `y_error` is $\epsilon$
        times the end's scale: the controller then sees $\epsilon$ (for the RMS
        and max norms), and rejects a window whose worst node or dense value is
        out of tolerance. Without a target (a grid given, no tolerances) the scale
        is $1 + |y|$, which is right for any `rtol = atol`. Infinite when Newton
        or the estimate failed.
        """
        ys = jax.lax.stop_gradient(ys)
        node_errors, dense_errors = estimate.node_errors, estimate.dense_errors
        midpoint_ys = 0.5 * (ys[:-1] + ys[1:])
        per_node = scale.norms(node_errors[1:], ys[1:], unravel)
        per_midpoint = scale.norms(dense_errors, midpoint_ys, unravel)
        worst = jnp.maximum(jnp.max(per_node), jnp.max(per_midpoint))
        scaled = jnp.where(converged, worst, jnp.inf)
        end_scale = scale.at(jnp.maximum(jnp.abs(ys[0]), jnp.abs(ys[-1])))
        y_error = unravel(scaled.astype(ys.dtype) * end_scale)

        def largest_rms(errors):
            rms = jnp.sqrt(jnp.mean(errors**2, axis=-1))
            return jnp.where(converged, jnp.max(rms), jnp.inf)

        return cls(
            y_error=y_error,
            error_estimate=largest_rms(node_errors),
            dense_error_estimate=largest_rms(dense_errors),
            scaled_error=scaled if scale.has_target else jnp.full_like(scaled, jnp.nan),
            controller_error=scaled,
        )


class _Window(eqx.Module):
    """One solve of a window: its nodes, Newton's figures and the error estimate."""

    ts: Real[Array, " nodes"]
    ys: Inexact[Array, "nodes n"]
    stages: PyTree[Array] | None
    stats: Any
    estimate: ErrorEstimate | None
    error: _WindowError
    num_iters: Int[Array, ""]
    estimate_iters: Int[Array, ""]
    remeshed: Any
