"""The one-step methods of DeerSolver: tableaux, convergence orders, explicit maps
against diffrax's sequential solvers, derivatives, a stiff problem and DETEST.

Every method is solved through `diffrax.diffeqsolve`. To keep compilation down, each
jitted function is shared between tests (`functools.cache`) and the number of windows
is varied through a traced `dt0` under `jax.vmap` (one compilation per method).
"""

import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import sympy

from conftest import NATIVE_METHODS
from diffrax_deer import (
    BackwardEuler,
    DeerSolver,
    GaussLegendre,
    RadauIIA,
    collocation_tableau,
)
from diffrax_deer._bench.problems import robertson


EXPLICIT_METHODS = {
    "euler": diffrax.Euler(),
    "heun": diffrax.Heun(),
    "midpoint": diffrax.Midpoint(),
    "ralston": diffrax.Ralston(),
    "bosh3": diffrax.Bosh3(),
    "tsit5": diffrax.Tsit5(),
    "dopri5": diffrax.Dopri5(),
    "dopri8": diffrax.Dopri8(),
}
METHODS = NATIVE_METHODS | EXPLICIT_METHODS


# Compile with LLVM's optimisation off: these programs run in milliseconds but take
# seconds to compile, and this cuts compilation by about a third. Numerics are
# unchanged (no fast-math either way).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def relative_error(a, b):
    """max |a - b| relative to max |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------------------
# 1. Exact tableaux against the order conditions
# --------------------------------------------------------------------------------------


def is_zero(expression) -> bool:
    """Exactly zero (no floats involved: every term is a sympy number)."""
    return sympy.simplify(expression) == 0


@pytest.mark.parametrize(
    "family, stages, order",
    [
        ("gauss-legendre", 1, 2),
        ("gauss-legendre", 2, 4),
        ("gauss-legendre", 3, 6),
        ("radau-iia", 1, 1),
        ("radau-iia", 2, 3),
        ("radau-iia", 3, 5),
    ],
)
def test_tableau_order_conditions(family, stages, order):
    c, a, b = collocation_tableau(family, stages)
    assert len(c) == len(b) == len(a) == stages
    entries = (*c, *b, *sum(a, ()))
    assert all(isinstance(x, sympy.Expr) and not x.has(sympy.Float) for x in entries)

    def quadrature(k):
        return sum(b[i] * c[i] ** (k - 1) for i in range(stages))

    # B(p): the quadrature is exact for polynomials of degree < p, and no higher
    # (so p is the order, not just a lower bound on it).
    for k in range(1, order + 1):
        assert is_zero(quadrature(k) - sympy.Rational(1, k)), k
    k = order + 1
    assert not is_zero(quadrature(k) - sympy.Rational(1, k))
    # C(s): each stage integrates polynomials of degree < s exactly on [0, c_i].
    for i in range(stages):
        for k in range(1, stages + 1):
            lhs = sum(a[i][j] * c[j] ** (k - 1) for j in range(stages))
            assert is_zero(lhs - c[i] ** k / sympy.Integer(k)), (i, k)
    # Collocation with b_j = a_sj when c_s = 1 (stiffly accurate).
    if family == "radau-iia":
        assert c[-1] == 1
        assert all(is_zero(a[-1][j] - b[j]) for j in range(stages))
    # The nodes lie in (0, 1] and are distinct, in increasing order.
    floats = [float(x) for x in c]
    assert floats == sorted(floats) and len(set(floats)) == stages
    assert 0 < floats[0] and floats[-1] <= 1


@pytest.mark.parametrize("family", ["gauss-legendre", "radau-iia"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_solver_tableau_is_the_exact_one_rounded(family, stages):
    # The solver's float tableau (50-digit arithmetic) is sympy's exact one, each
    # entry rounded to float64; likewise the dense output's integrated basis.
    from diffrax_deer._methods.collocation import _float_tableau, _lagrange_basis

    c, a, b, integrated = _float_tableau(family, stages)
    exact_c, exact_a, exact_b = collocation_tableau(family, stages)

    def rounded(value):
        return float(sympy.N(value, 40))

    assert c.tolist() == [rounded(x) for x in exact_c]
    assert a.tolist() == [[rounded(x) for x in row] for row in exact_a]
    assert b.tolist() == [rounded(x) for x in exact_b]
    x, theta = sympy.symbols("x theta")
    for k, row in enumerate(integrated):
        basis = _lagrange_basis(exact_c, k, x)
        beta = sympy.Poly(sympy.integrate(basis, (x, 0, theta)), theta)
        coefficients = beta.all_coeffs()[::-1]
        assert row.tolist() == [rounded(v) for v in coefficients], k


def test_gauss_legendre2_nodes_exact():
    c, a, b = collocation_tableau("gauss-legendre", 2)
    s3 = sympy.sqrt(3)
    assert is_zero(c[0] - (sympy.Rational(1, 2) - s3 / 6))
    assert is_zero(c[1] - (sympy.Rational(1, 2) + s3 / 6))
    assert all(is_zero(bj - sympy.Rational(1, 2)) for bj in b)
    # The classical 2-stage Gauss matrix: [[1/4, 1/4 - sqrt3/6], [1/4 + sqrt3/6, 1/4]].
    quarter = sympy.Rational(1, 4)
    expected = ((quarter, quarter - s3 / 6), (quarter + s3 / 6, quarter))
    assert all(is_zero(a[i][j] - expected[i][j]) for i in range(2) for j in range(2))


# --------------------------------------------------------------------------------------
# 2. Convergence orders on y' = A y against expm
# --------------------------------------------------------------------------------------


T_LINEAR = 4.0


def linear_field(t, y, A):
    return A @ y


def linear_problem():
    A = 0.5 * np.random.default_rng(0).normal(size=(10, 10))
    y0 = np.random.default_rng(1).normal(size=10)
    return A, y0, scipy.linalg.expm(T_LINEAR * A) @ y0


# (intervals per window, numbers of windows): the total N stays in the asymptotic
# range and above round-off. Measured (error at t = 4 relative to max |y(4)|; the
# fitted slope):
#   backward Euler  N=32..256   1.5e-1..1.6e-2   1.07
#   trapezoid       N=16..256   1.7e-2..6.3e-5   2.01
#   Gauss-Legendre2 N=16..256   5.0e-5..7.6e-10  4.00
#   Gauss-Legendre3 N=8..64     2.3e-6..8.9e-12  5.99
#   Radau IIA 3     N=16..256   2.2e-6..2.1e-12  5.01
#   Euler           N=64..512   5.6e-2..7.8e-3   0.95
#   Heun, Midpoint, Ralston N=32..256 6.6e-3..1.2e-4 1.91 (for a linear problem all
#                   2-stage 2nd-order RK methods are the same map)
#   Bosh3           N=32..256   4.7e-4..1.0e-6   2.95
#   Tsit5           N=64..256   4.4e-10..5.9e-13 4.77 (small leading coefficient:
#                   pre-asymptotic below N=64, round-off above N=256)
#   Dopri5          N=16..256   2.6e-6..4.0e-12  4.84
#   Dopri8          N=4..16     4.0e-7..4.4e-12  8.23 (round-off from N=32)
# Newton takes 2 iterations everywhere (linear: exact after one).
ORDER_GRIDS = {
    "backward_euler": (4, (8, 16, 32, 64)),
    "trapezoid": (4, (4, 8, 16, 32, 64)),
    "gauss_legendre2": (4, (4, 8, 16, 32, 64)),
    "gauss_legendre3": (4, (2, 4, 8, 16)),
    "radau_iia3": (4, (4, 8, 16, 32, 64)),
    "euler": (8, (8, 16, 32, 64)),
    "heun": (4, (8, 16, 32, 64)),
    "midpoint": (4, (8, 16, 32, 64)),
    "ralston": (4, (8, 16, 32, 64)),
    "bosh3": (4, (8, 16, 32, 64)),
    "tsit5": (4, (16, 32, 64)),
    "dopri5": (4, (4, 8, 16, 32, 64)),
    "dopri8": (4, (1, 2, 4)),
}


def order_study(name):
    """Errors at t = 4 on the grids of ORDER_GRIDS, and the fitted slope."""
    A, y0, exact = linear_problem()
    per_window, windows = ORDER_GRIDS[name]
    # The method's order, not its error estimate (test_error_control): without
    # the estimate's coarse solve, less to compile.
    solver = DeerSolver(
        num_steps=per_window, method=METHODS[name], error_estimate=False
    )
    max_steps = max(windows)  # a Python int: static for diffrax

    @jit
    @jax.vmap
    def solve(dt0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(linear_field),
            solver,
            t0=0.0,
            t1=T_LINEAR,
            dt0=dt0,
            y0=jnp.asarray(y0),
            args=jnp.asarray(A),
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            max_steps=max_steps,
            throw=False,
        )
        return sol.ys[-1], sol.result == diffrax.RESULTS.successful, sol.solver_state

    windows = np.asarray(windows)
    ys, successful, state = solve(jnp.asarray(T_LINEAR / windows))
    errors = np.max(np.abs(np.asarray(ys) - exact), axis=1) / np.max(np.abs(exact))
    steps = T_LINEAR / (per_window * windows)
    slope = np.polyfit(np.log2(steps), np.log2(errors), 1)[0]
    return errors, slope, np.asarray(successful), np.asarray(state.max_num_iters)


# The order of each kind of method: every native method, and three explicit maps
# (1, 7 and 13 stages). The other five explicit maps are diffrax's own solvers,
# whose DEER fixed point equals diffrax's sequential solve on the same grid to
# 1e-10 (test_explicit_map_equals_sequential): they inherit diffrax's order.
ORDER_METHODS = NATIVE_METHODS | {
    name: EXPLICIT_METHODS[name] for name in ("euler", "tsit5", "dopri8")
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ORDER_METHODS))
def test_convergence_order(name):
    errors, slope, successful, max_num_iters = order_study(name)
    assert np.all(successful)
    # Linear problem: the first Newton step is exact, the second confirms it.
    assert np.all(max_num_iters <= 2)
    order = DeerSolver(num_steps=4, method=METHODS[name]).order(None)
    assert abs(slope - order) < 0.3, (slope, order, errors)
    assert np.all(errors > 1e-13), errors  # stayed above round-off


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, num_steps", [("gauss_legendre3", (6, 12, 24)), ("radau_iia3", (8, 16, 32))]
)
def test_dense_output_between_nodes_keeps_the_method_order(name, num_steps):
    # Collocation methods interpolate with quintic Hermite (y, y', y'' at the nodes):
    # at the midpoints of the intervals the error still falls at the method's order.
    # Cubic Hermite, used before, capped it at 4 (measured on Lotka-Volterra, N =
    # 100: GL3's midpoint error went from 6.7e-4 to 8.1e-6; its nodes' is 1.0e-6).
    A, y0, _ = linear_problem()
    errors = []
    for n in num_steps:
        nodes = np.linspace(0.0, T_LINEAR, n + 1)
        midpoints = 0.5 * (nodes[:-1] + nodes[1:])
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(linear_field),
            DeerSolver(num_steps=n, method=METHODS[name]),
            t0=0.0,
            t1=T_LINEAR,
            dt0=T_LINEAR,
            y0=jnp.asarray(y0),
            args=jnp.asarray(A),
            saveat=diffrax.SaveAt(ts=jnp.asarray(midpoints)),
        )
        exact = np.stack([scipy.linalg.expm(t * A) @ y0 for t in midpoints])
        errors.append(np.max(np.abs(np.asarray(sol.ys) - exact)) / np.max(abs(exact)))
    slope = np.polyfit(np.log2(T_LINEAR / np.asarray(num_steps)), np.log2(errors), 1)[0]
    order = METHODS[name].order()
    assert abs(slope - order) < 0.5, (slope, order, errors)


def test_orders_are_declared():
    expected = {
        "backward_euler": 1,
        "trapezoid": 2,
        "gauss_legendre2": 4,
        "gauss_legendre3": 6,
        "radau_iia3": 5,
        "euler": 1,
        "heun": 2,
        "midpoint": 2,
        "ralston": 2,
        "bosh3": 3,
        "tsit5": 5,
        "dopri5": 5,
        "dopri8": 8,
    }
    for name, method in METHODS.items():
        assert DeerSolver(num_steps=4, method=method).order(None) == expected[name]


# --------------------------------------------------------------------------------------
# Shared: Lotka-Volterra with parameters, solved in 4 windows of 100 intervals.
# Used both for explicit maps against diffrax (3.) and for derivatives (4.).
# --------------------------------------------------------------------------------------


LV_T1 = 10.0  # about two periods
# Four windows of 100 intervals: from the RK4 guess, Newton on one window of 400
# explicit Euler steps diverges (measured); on windows of 100 it converges.
LV_WINDOWS, LV_STEPS = 4, 100
LV_Y0 = np.array([1.0, 1.0])
LV_THETA = np.array([1.5, 3.0])  # prey growth, predator death
LV_NODES = LV_T1 * np.arange(LV_WINDOWS * LV_STEPS + 1) / (LV_WINDOWS * LV_STEPS)
LV_H = LV_T1 / (LV_WINDOWS * LV_STEPS)
# Save at every 20th node, and at 24 times between nodes (a fraction 0.15..0.85 of
# an interval past a node), where only the dense output gives the value.
_OFF_GRID = LV_NODES[5:-1:17] + LV_H * np.linspace(0.15, 0.85, 24)
LV_TS = np.sort(np.concatenate([LV_NODES[::20], _OFF_GRID]))
LV_ON_GRID = np.isin(LV_TS, LV_NODES)
FD_EPSILON = 1e-5


def lotka_volterra(t, y, theta):
    prey, predator = y[0], y[1]
    return jnp.stack(
        [theta[0] * prey - prey * predator, -theta[1] * predator + prey * predator]
    )


def lv_solve(method, params, adjoint=None):
    """`sol.ys` at LV_TS, and the Newton statistics, for params = (y0, theta)."""
    if adjoint is None:
        adjoint = diffrax.RecursiveCheckpointAdjoint()
    y0, theta = params[:2], params[2:]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lotka_volterra),
        # Derivatives of the solution; the estimate (not differentiated) is left
        # out, as for the order study.
        DeerSolver(num_steps=LV_STEPS, method=method, error_estimate=False),
        t0=0.0,
        t1=LV_T1,
        dt0=LV_T1 / LV_WINDOWS,
        y0=y0,
        args=theta,
        saveat=diffrax.SaveAt(ts=jnp.asarray(LV_TS), solver_state=True),
        adjoint=adjoint,
        max_steps=LV_WINDOWS,
    )
    return sol.ys, sol.solver_state


# Derivatives through an explicit map are JAX's of the solver's one-step map, taken
# by the same code whatever the tableau: three explicit solvers (1, 7 and 13
# stages) stand for the eight there, and every native method is checked.
DERIVATIVE_METHODS = NATIVE_METHODS | {
    name: EXPLICIT_METHODS[name] for name in ("euler", "tsit5", "dopri8")
}


@functools.cache
def lv_primal(name):
    """The primal ys and Newton statistics: from `lv_forward` where the derivative
    tests compile it anyway, else from a solve of its own (a third of the cost)."""
    if name in DERIVATIVE_METHODS:
        ys, _, _, state = lv_forward(name)
        return ys, state
    params = jnp.asarray(np.concatenate([LV_Y0, LV_THETA]))
    ys, state = jit(functools.partial(lv_solve, METHODS[name]))(params)
    return np.asarray(ys), jax.tree.map(np.asarray, state)


@functools.cache
def lv_forward(name):
    """Forward-mode data for one method, one compilation.

    Rows of one vmapped call: the tangents along the four unit directions of
    params = (y0, theta) (with `ForwardMode`), and the central finite-difference
    points params +- eps e_k. Returns the primal ys, the Jacobian d ys / d params from
    forward mode, the one from finite differences, and the Newton statistics.
    """
    method = METHODS[name]

    @jit
    @jax.vmap
    def jvp(params, tangent):
        def ys(p):
            return lv_solve(method, p, adjoint=diffrax.ForwardMode())

        (ys_primal, state), (ys_tangent, _) = jax.jvp(ys, (params,), (tangent,))
        return ys_primal, ys_tangent, state

    params = np.concatenate([LV_Y0, LV_THETA])
    basis = np.eye(params.size)
    steps = FD_EPSILON * np.maximum(1.0, np.abs(params))
    points = np.concatenate(
        [
            np.broadcast_to(params, basis.shape),
            params + steps[:, None] * basis,
            params - steps[:, None] * basis,
        ]
    )
    tangents = np.concatenate([basis, basis, basis])
    ys, tangents_out, state = jvp(jnp.asarray(points), jnp.asarray(tangents))
    ys, tangents_out = np.asarray(ys), np.asarray(tangents_out)
    k = params.size
    jac_forward = np.moveaxis(tangents_out[:k], 0, -1)
    jac_fd = np.moveaxis((ys[k : 2 * k] - ys[2 * k :]), 0, -1) / (2 * steps)
    return ys[0], jac_forward, jac_fd, jax.tree.map(np.asarray, state)


# --------------------------------------------------------------------------------------
# 3. Explicit maps: DEER's fixed point is diffrax's sequential solve
# --------------------------------------------------------------------------------------


@functools.cache
def lv_sequential(name):
    """diffrax's own sequential solve with the explicit solver, on the DEER grid."""

    @jit
    def solve():
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lotka_volterra),
            EXPLICIT_METHODS[name],
            t0=0.0,
            t1=LV_T1,
            dt0=None,
            y0=jnp.asarray(LV_Y0),
            args=jnp.asarray(LV_THETA),
            stepsize_controller=diffrax.StepTo(ts=jnp.asarray(LV_NODES)),
            saveat=diffrax.SaveAt(ts=jnp.asarray(LV_TS)),
            max_steps=len(LV_NODES) - 1,
        ).ys

    return np.asarray(solve())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPLICIT_METHODS))
def test_explicit_map_equals_sequential(name):
    ys, state = lv_primal(name)
    sequential = lv_sequential(name)
    # The same grid and the same one-step map, so the same trajectory up to Newton's
    # tolerance and round-off. Measured: <= 1e-14 relative for every method.
    assert relative_error(ys[LV_ON_GRID], sequential[LV_ON_GRID]) < 1e-10
    # Newton iterations per window: measured at most 5 (Euler), 3 (Heun, Midpoint,
    # Ralston, Bosh3), 2 (Tsit5, Dopri5, Dopri8).
    assert np.all(state.max_num_iters <= 8)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPLICIT_METHODS))
def test_explicit_dense_output_equals_sequential(name):
    # Between nodes the value comes from the solver's own local interpolation (e.g.
    # Tsit5's 4th-order polynomial), the same as diffrax's: equal to round-off
    # (measured <= 1e-14). Cubic Hermite through the nodes would differ by 3.3e-7.
    ys, _ = lv_primal(name)
    sequential = lv_sequential(name)
    off_grid = ~LV_ON_GRID
    assert off_grid.sum() == 24
    assert relative_error(ys[off_grid], sequential[off_grid]) < 1e-10


# --------------------------------------------------------------------------------------
# 4. Derivatives: forward mode and reverse mode against finite differences
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DERIVATIVE_METHODS))
def test_forward_mode_matches_finite_differences(name):
    _, jac_forward, jac_fd, state = lv_forward(name)
    # Central differences with eps = 1e-5: truncation ~eps^2, round-off and Newton
    # jitter ~1e-16 / eps. Measured agreement: 8e-9 to 9e-9 relative for every
    # method but Euler, 3.3e-8. Newton: at most 5 iterations per window (backward
    # Euler, Euler), 3 for the collocation methods and the trapezoid.
    assert relative_error(jac_fd, jac_forward) < 1e-6
    assert np.all(state.max_num_iters <= 8)


# Reverse mode is JAX's transpose of the tangent recurrence that forward mode
# checks on every method above: one method per linearisation (the theta methods',
# each collocation family's, the explicit maps') checks the transpose.
REVERSE_METHODS = ("trapezoid", "gauss_legendre2", "radau_iia3", "tsit5")


@pytest.mark.slow
@pytest.mark.parametrize("name", REVERSE_METHODS)
def test_reverse_mode_matches_forward_mode(name):
    _, jac_forward, jac_fd, _ = lv_forward(name)
    weights = np.random.default_rng(2).normal(size=jac_forward.shape[:-1])

    @jit
    def grad(params):
        def loss(p):
            ys, _ = lv_solve(METHODS[name], p)
            return jnp.sum(jnp.asarray(weights) * ys)

        return jax.grad(loss)(params)

    gradient = np.asarray(grad(jnp.asarray(np.concatenate([LV_Y0, LV_THETA]))))
    from_forward = np.tensordot(weights, jac_forward, axes=weights.ndim)
    from_fd = np.tensordot(weights, jac_fd, axes=weights.ndim)
    # Reverse mode is the transpose of the same implicit linear recurrence: equal
    # to forward mode up to round-off (measured <= 2.8e-15), to finite differences
    # 4e-9 to 1.9e-8.
    assert relative_error(gradient, from_forward) < 1e-10
    assert relative_error(gradient, from_fd) < 1e-6


# --------------------------------------------------------------------------------------
# 5. A stiff problem: Van der Pol, mu = 1000, on its slow branch
# --------------------------------------------------------------------------------------


MU = 1000.0
STIFF_T1 = 500.0  # the first relaxation jump is near t = 800
STIFF_Y0 = np.array([2.0, 0.0])
STIFF_TS = np.linspace(0.0, STIFF_T1, 51)


def stiff_van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


@functools.cache
@jit
def _stiff_reference():
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(stiff_van_der_pol),
        diffrax.Kvaerno5(),
        t0=0.0,
        t1=STIFF_T1,
        dt0=None,
        y0=jnp.asarray(STIFF_Y0),
        args=MU,
        saveat=diffrax.SaveAt(ts=jnp.asarray(STIFF_TS)),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
        max_steps=100_000,
    )
    return sol.ys


def stiff_reference():
    return np.asarray(_stiff_reference())


def stiff_solve(method, num_steps, dt0):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(stiff_van_der_pol),
        DeerSolver(num_steps=num_steps, method=method),
        t0=0.0,
        t1=STIFF_T1,
        dt0=dt0,
        y0=jnp.asarray(STIFF_Y0),
        args=MU,
        saveat=diffrax.SaveAt(ts=jnp.asarray(STIFF_TS), solver_state=True),
        max_steps=16,
        throw=False,
    )
    return sol.ys, sol.result, sol.solver_state


@pytest.mark.slow
def test_stiff_backward_euler():
    # The initial layer (time scale 1 / (3 mu)) is not resolved by h = 0.25 or 1; the
    # L-stable method damps it and then follows the slow manifold, where its error is
    # first order. Windows of 500 intervals: one window (N = 500, h = 1) and four
    # (N = 2000, h = 0.25), in one compilation.
    @jit
    @jax.vmap
    def solve(dt0):
        return stiff_solve(BackwardEuler(), 500, dt0)

    ys, results, state = solve(jnp.array([STIFF_T1, STIFF_T1 / 4]))
    assert np.all(np.asarray(results == diffrax.RESULTS.successful))
    assert np.all(np.isfinite(np.asarray(ys)))
    # Measured: 6 Newton iterations for the single window, at most 4 per window of
    # the four (16 in all).
    assert np.all(np.asarray(state.max_num_iters) <= 10)
    errors = np.max(np.abs(np.asarray(ys) - stiff_reference()), axis=(1, 2))
    # Measured max errors: 2.25e-4 (h = 1) and 5.61e-5 (h = 0.25): ratio 4.0, the
    # first-order ratio for h / 4, so the error is discretisation error.
    assert errors[1] < 1e-4
    assert 3.5 < errors[0] / errors[1] < 4.5


@pytest.mark.slow
def test_stiff_radau_iia():
    ys, result, state = jit(stiff_solve, static_argnums=(0, 1))(
        RadauIIA(stages=3), 500, STIFF_T1
    )
    assert result == diffrax.RESULTS.successful, result
    assert int(state.num_iters) <= 10
    # 5th order with h = 1 on a slow manifold of time scale ~mu: the discretisation
    # error is negligible; 1.5e-8 measured (stages started at the secant slope) is
    # the reference's and Newton's tolerance.
    assert np.max(np.abs(np.asarray(ys) - stiff_reference())) < 1e-6


ROBERTSON_WINDOWS = np.concatenate([[0.0], np.logspace(-4, 3, 8)])
# Between the nodes, off every node and window end.
ROBERTSON_TS = np.logspace(-4, 3, 57)[1:-1] * 1.013


@functools.cache
def robertson_dense_errors():
    term = diffrax.ODETerm(robertson)
    y0 = jnp.array([1.0, 0.0, 0.0])
    ts = jnp.asarray(ROBERTSON_TS)
    reference = diffrax.diffeqsolve(
        term,
        diffrax.Kvaerno5(),
        t0=0.0,
        t1=ROBERTSON_TS[-1],
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-16),
        max_steps=100_000,
    ).ys
    sol = diffrax.diffeqsolve(
        term,
        DeerSolver(num_steps=32, method=RadauIIA(stages=3)),
        t0=0.0,
        t1=ROBERTSON_WINDOWS[-1],
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.StepTo(jnp.asarray(ROBERTSON_WINDOWS)),
    )
    assert sol.result == diffrax.RESULTS.successful
    # Relative to each component (y2 is 4e-5 to 5e-6 here), floored at 1e-8.
    reference = np.asarray(reference)
    return np.abs(np.asarray(sol.ys) - reference) / (1e-8 + np.abs(reference))


@pytest.mark.slow
def test_stiff_dense_output_stays_accurate_between_the_nodes():
    # On Robertson's late windows h ||J|| reaches 1e7: quintic Hermite, fed
    # f(y_i) and f_y f at nodes carrying a 1e-9 error, amplified it into a 26%
    # relative error at t = 101 (measured). The collocation polynomial, used where
    # that amplification exceeds 2, gives 6.3e-6 there and a median of 6e-9.
    errors = robertson_dense_errors()
    assert np.max(errors) < 1e-4, np.max(errors, axis=1)
    assert np.median(errors) < 1e-7


def test_stiff_explicit_map_fails_cleanly():
    # Tsit5 on the same grid as backward Euler's four windows (N = 2000, here in one
    # window): h lambda ~ -750, far outside its stability region, so the sequential
    # map itself blows up. Newton must say so, not return the garbage as a success.
    # Measured: nonlinear_divergence after 1 iteration, returning the last finite
    # iterate (|y| ~ 3e32).
    ys, result, _ = jit(stiff_solve, static_argnums=(0, 1))(
        diffrax.Tsit5(), 2000, STIFF_T1
    )
    assert result != diffrax.RESULTS.successful
    assert result in (
        diffrax.RESULTS.nonlinear_divergence,
        diffrax.RESULTS.nonlinear_max_steps_reached,
    )


# --------------------------------------------------------------------------------------
# 6. DETEST nonstiff problems (Hull et al. 1972, as diffrax's test_detest.py)
# --------------------------------------------------------------------------------------


DETEST_T1 = 20.0
_C1_MATRIX = np.diag(-np.ones(10)) + np.diag(np.ones(9), -1)
_C1_MATRIX[9, 9] = 0.0


def _orbit_init(eccentricity):
    return [
        1 - eccentricity,
        0.0,
        0.0,
        math.sqrt((1 + eccentricity) / (1 - eccentricity)),
    ]


def _orbit(t, y, xp):
    r_cubed = (y[0] ** 2 + y[1] ** 2) ** 1.5
    return xp.stack([y[2], y[3], -y[0] / r_cubed, -y[1] / r_cubed])


# name: (vector field f(t, y, xp) for xp in (numpy, jax.numpy), y0, windows of 16
# Gauss-Legendre 3 intervals). Measured max error at t = 20 relative to max(1, |y|)
# against DOP853 (rtol = atol = 1e-10), with the windows chosen:
#   A2 4.8e-9, A3 2.0e-8, B1 5.0e-8, B3 4.5e-9, C1 4.8e-9, D1 1.1e-7, D2 2.9e-8,
#   E1 2.3e-8 (Newton: at most 2-4 iterations per window).
DETEST = {
    "A2": (lambda t, y, xp: -0.5 * y**3, [1.0], 2),
    "A3": (lambda t, y, xp: y * xp.cos(t), [1.0], 4),
    "B1": (
        lambda t, y, xp: xp.stack([2 * (y[0] - y[0] * y[1]), -y[1] + y[0] * y[1]]),
        [1.0, 3.0],
        16,
    ),
    "B3": (
        lambda t, y, xp: xp.stack([-y[0], y[0] - y[1] ** 2, y[1] ** 2]),
        [1.0, 0.0, 0.0],
        2,
    ),
    "C1": (lambda t, y, xp: xp.asarray(_C1_MATRIX) @ y, [1.0] + [0.0] * 9, 1),
    "D1": (_orbit, _orbit_init(0.1), 8),
    "D2": (_orbit, _orbit_init(0.3), 16),
    "E1": (
        lambda t, y, xp: xp.stack(
            [y[1], -(y[1] / (t + 1) + y[0] * (1 - 0.25 / (t + 1) ** 2))]
        ),
        [0.6713967071418030, 0.09540051444747446],
        4,
    ),
}


@functools.cache
def detest_solve(field):
    """One compilation per vector field (D1 and D2 share one): `dt0` is traced."""

    @jit
    def solve(y0, dt0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: field(t, y, jnp)),
            DeerSolver(num_steps=16, method=GaussLegendre(stages=3)),
            t0=0.0,
            t1=DETEST_T1,
            dt0=dt0,
            y0=y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            max_steps=16,
        )

    return solve


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DETEST))
def test_detest_gauss_legendre3(name):
    field, y0, windows = DETEST[name]
    y0 = np.asarray(y0)
    reference = scipy.integrate.solve_ivp(
        lambda t, y: field(t, y, np),
        (0.0, DETEST_T1),
        y0,
        method="DOP853",
        rtol=1e-10,
        atol=1e-10,
    )
    assert reference.success
    expected = reference.y[:, -1]
    sol = detest_solve(field)(jnp.asarray(y0), DETEST_T1 / windows)
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.solver_state.max_num_iters) <= 6
    error = np.max(np.abs(np.asarray(sol.ys[-1]) - expected))
    assert error < 1e-6 * max(1.0, np.max(np.abs(expected)))
