"""Accuracy of DeerSolver: closed forms, convergence order, nonlinear problems."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from conftest import (
    PROBLEMS,
    mlp_vector_field,
    sequential_trapezoid,
    trapezoid_linear_reference,
    tsit5_reference,
)
from diffrax_deer import DeerSolver, Trapezoid, solve_window
from diffrax_deer._core.predictor import default_predictor_steps


NUM_SAVES = 101  # save times per problem, linspace(t0, t1, NUM_SAVES)
FINE_STEPS = 10_000  # N for the one-window nonlinear tests


def save_times(problem, dtype=jnp.float64):
    return jnp.linspace(problem.t0, problem.t1, NUM_SAVES, dtype=dtype)


def max_relative(a, b):
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


# --------------------------------------------------------------------------------------
# Linear problems with closed forms
# --------------------------------------------------------------------------------------


def linear_field(t, y, A):
    return A @ y


def random_linear_system(n=10):
    A = 0.5 * np.random.default_rng(0).normal(size=(n, n))
    y0 = np.random.default_rng(1).normal(size=n)
    return A, y0


def trapezoid_leading_error(A, y_exact, t, h):
    r"""The leading global error of the trapezoidal rule for y' = A y.

    Per step R(hA) = (I - hA/2)^{-1}(I + hA/2) = exp(hA) + (hA)^3/12 + O(h^5) (the
    method is symmetric, so the next term is two orders higher), hence after t / h
    steps y_N - y(t) = (t h^2 / 12) A^3 exp(tA) y0 (1 + O(h^2)).
    """
    return t * h**2 / 12 * np.linalg.matrix_power(A, 3) @ y_exact


def test_linear_system_matches_expm():
    A, y0 = random_linear_system()
    t1, num_steps = 4.0, 2000
    h = t1 / num_steps
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(linear_field),
        DeerSolver(num_steps=num_steps),
        t0=0.0,
        t1=t1,
        dt0=t1,
        y0=jnp.asarray(y0),
        args=jnp.asarray(A),
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    assert sol.result == diffrax.RESULTS.successful
    y_deer = np.asarray(sol.ys[-1])
    # 1. The same discrete problem solved sequentially: equal up to Newton's
    #    tolerance and round-off (measured 6.6e-14 relative).
    discrete = trapezoid_linear_reference(A, y0, np.linspace(0.0, t1, num_steps + 1))
    assert max_relative(y_deer, discrete[-1]) < 1e-9
    # 2. The exact solution: the error is the trapezoid's O(h^2) error, and matches
    #    its leading term (measured: error 1.3e-4 absolute, 1.0e-6 relative, equal to
    #    the leading term to 4.7e-6 of its size).
    exact = scipy.linalg.expm(t1 * A) @ y0
    predicted = trapezoid_leading_error(A, exact, t1, h)
    error = y_deer - exact
    assert np.linalg.norm(error - predicted) < 1e-2 * np.linalg.norm(predicted)
    assert np.max(np.abs(error)) < 2e-4
    # Linear: the first Newton step is exact, the second confirms it.
    assert int(sol.solver_state.num_iters) <= 2


@eqx.filter_jit
def solve_dahlquist(lam, num_steps, ts):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, lam: lam * y),
        DeerSolver(num_steps=num_steps),
        t0=0.0,
        t1=4.0,
        dt0=4.0,
        y0=jnp.array([1.0]),
        args=lam,
        saveat=diffrax.SaveAt(ts=ts, solver_state=True),
        throw=False,
    )
    return ts, sol.ys[:, 0], sol.result, sol.solver_state.num_iters


@pytest.mark.parametrize("lam", [-3.0, 0.5])
def test_dahlquist_matches_exponential(lam):
    num_steps = 1000
    h = 4.0 / num_steps
    # Save times between the nodes (a third of an interval past every 25th node), so
    # the cubic Hermite dense output is tested too. Between nodes it adds an O(h^3)
    # term (the node derivatives f(y_i) differ from the derivative of the smooth
    # O(h^2) error by O(h^2)), small next to the O(h^2) error itself.
    ts = np.linspace(0.0, 4.0, 41)
    ts[1:-1] += h / 3
    ts, ys, result, num_iters = solve_dahlquist(
        jnp.asarray(lam), num_steps, jnp.asarray(ts)
    )
    assert result == diffrax.RESULTS.successful
    assert int(num_iters) <= 2
    ts = np.asarray(ts)
    exact = np.exp(lam * ts)
    predicted = ts * h**2 * lam**3 / 12 * exact  # as trapezoid_leading_error
    error = np.asarray(ys) - exact
    # Measured max |error|: 4.4e-6 (lam = -3), 4.9e-6 (lam = 0.5), equal to the
    # leading term to 1.8e-3 and 7e-5 of its size (1.6e-5 at the nodes themselves).
    np.testing.assert_allclose(
        error, predicted, rtol=0, atol=1e-2 * np.max(np.abs(predicted))
    )
    assert np.max(np.abs(error)) < 1e-5


def test_dahlquist_stiff_is_discrete_trapezoid():
    # h lam = -4: far outside RK4's stability region (the predictor's coarse step is
    # 16x longer still, so it falls back to the constant guess) but the trapezoidal
    # rule is A-stable: y_i = R^i with R = (1 + h lam / 2) / (1 - h lam / 2) = -1/3.
    lam, num_steps = -1000.0, 1000
    h = 4.0 / num_steps
    ts, ys, result, num_iters = solve_dahlquist(
        jnp.asarray(lam), num_steps, jnp.linspace(0.0, 4.0, 41)
    )
    assert result == diffrax.RESULTS.successful
    assert int(num_iters) <= 2
    node_index = np.rint(np.asarray(ts) / h).astype(int)
    growth = (1 + h * lam / 2) / (1 - h * lam / 2)
    np.testing.assert_allclose(ys, growth**node_index, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "t0, t1, num_steps, dt0, bound",
    [
        # Forward, one window; measured error 1.8e-6.
        (1.0, 5.0, 1000, 4.0, 5e-6),
        # Backward in time, four windows of 250 (the same grid); measured 1.4e-5.
        (5.0, 1.0, 250, -1.0, 5e-5),
    ],
)
def test_time_dependent_field(t0, t1, num_steps, dt0, bound):
    # y' = cos(t) y, y = y0 exp(sin t - sin t0): checks that the grid starts at t0 and
    # carries through windows and reversed time.
    def field(t, y, args):
        return jnp.cos(t) * y

    nodes = np.linspace(t0, t1, 1001)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        DeerSolver(num_steps=num_steps),
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=jnp.array([2.0]),
        saveat=diffrax.SaveAt(ts=jnp.asarray(nodes[::25])),
    )
    assert sol.result == diffrax.RESULTS.successful
    ys = np.asarray(sol.ys[:, 0])
    exact = 2.0 * np.exp(np.sin(nodes[::25]) - np.sin(t0))
    assert np.max(np.abs(ys - exact)) < bound
    sequential = sequential_trapezoid(field, jnp.array([2.0]), nodes)[::25, 0]
    assert max_relative(ys, sequential) < 1e-10


# --------------------------------------------------------------------------------------
# Convergence order, in the manner of diffrax's test_ode_order
# --------------------------------------------------------------------------------------


@eqx.filter_jit
def solve_linear_windows(dt0, A, y0):
    # `dt0` is traced, so one compilation serves every window length.
    return diffrax.diffeqsolve(
        diffrax.ODETerm(linear_field),
        DeerSolver(num_steps=16),
        t0=0.0,
        t1=4.0,
        dt0=dt0,
        y0=y0,
        args=A,
        max_steps=64,
        saveat=diffrax.SaveAt(t1=True),
    ).ys[-1]


def test_convergence_order():
    # 16 intervals per window, 1..32 windows: h = 4 / 2^4 ... 4 / 2^9. Fit the slope of
    # log2(error) against log2(h). Measured slope 2.005.
    A, y0 = random_linear_system()
    exact = scipy.linalg.expm(4.0 * A) @ y0
    num_windows = 2 ** np.arange(6)
    step_sizes = 4.0 / (16 * num_windows)
    errors = []
    for windows in num_windows:
        y1 = solve_linear_windows(
            jnp.asarray(4.0 / windows), jnp.asarray(A), jnp.asarray(y0)
        )
        errors.append(np.max(np.abs(np.asarray(y1) - exact)))
    slope, _ = np.polyfit(np.log2(step_sizes), np.log2(errors), 1)
    assert abs(slope - 2) < 0.2, (slope, errors)


@pytest.mark.slow
def test_convergence_order_in_num_steps():
    # The same, varying the number of intervals of a single window, N = 2^4, 2^6, 2^8
    # (through the core `solve_window`, which DeerSolver.step calls, to keep the
    # compilations cheap; the test above covers 2^4 ... 2^9). Measured slope 2.008.
    A, y0 = random_linear_system()
    exact = scipy.linalg.expm(4.0 * A) @ y0
    num_steps = 2 ** np.arange(4, 10, 2)
    errors = []
    for n in num_steps:
        ys, _, stats = jax.jit(
            lambda ts, A, y0, n=n: solve_window(
                linear_field,
                Trapezoid(),
                ts,
                y0,
                A,
                rtol=1e-10,
                atol=1e-10,
                max_iters=10,
                predictor_steps=default_predictor_steps(int(n)),
            )
        )(jnp.linspace(0.0, 4.0, n + 1), jnp.asarray(A), jnp.asarray(y0))
        assert bool(stats.converged)
        errors.append(np.max(np.abs(np.asarray(ys[-1]) - exact)))
    slope, _ = np.polyfit(np.log2(4.0 / num_steps), np.log2(errors), 1)
    assert abs(slope - 2) < 0.2, (slope, errors)


# --------------------------------------------------------------------------------------
# Nonlinear problems against Tsit5, one window of N = 1e4
# --------------------------------------------------------------------------------------


@functools.cache
def reference_solution(name):
    problem = PROBLEMS[name]
    return tsit5_reference(
        problem.vector_field,
        problem.y0_array(),
        problem.t0,
        problem.t1,
        save_times(problem),
    )


def solve_deer(problem, num_steps, dt0=None, dtype=jnp.float64, vector_field=None):
    """DeerSolver over [t0, t1] (one window unless `dt0`), saved at `save_times`."""
    t0 = jnp.asarray(problem.t0, dtype)
    t1 = jnp.asarray(problem.t1, dtype)
    dt0 = t1 - t0 if dt0 is None else jnp.asarray(dt0, dtype)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(problem.vector_field if vector_field is None else vector_field),
        DeerSolver(num_steps=num_steps),
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=problem.y0_array(dtype),
        saveat=diffrax.SaveAt(ts=save_times(problem, dtype), solver_state=True),
        throw=False,
    )


@functools.cache
def fine_solution(name):
    sol = solve_deer(PROBLEMS[name], FINE_STEPS)
    return np.asarray(sol.ys), sol.result, int(sol.solver_state.num_iters)


# Max abs error against Tsit5 at the 101 save times, N = 1e4 in one window. It is the
# trapezoid's O(h^2) error: measured lotka_volterra 1.28e-5, van_der_pol 4.46e-5,
# fitzhugh_nagumo 6.80e-6, lorenz 4.67e-4, mlp 8.08e-8, and exactly 100x each of
# these at N = 1e3 (second order). Bounds are ~4x the measurement.
TSIT5_BOUNDS = {
    "lotka_volterra": 5e-5,
    "van_der_pol": 2e-4,
    "fitzhugh_nagumo": 3e-5,
    "lorenz": 2e-3,
    "mlp": 3e-7,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_nonlinear_matches_tsit5(name):
    problem = PROBLEMS[name]
    ys, result, num_iters = fine_solution(name)
    assert result == diffrax.RESULTS.successful
    # The floor: from the default (coarse RK4) start, Newton needs few iterations.
    assert num_iters <= 10
    error = np.max(np.abs(ys - reference_solution(name)))
    assert error < TSIT5_BOUNDS[name]
    # The save times are every 100th node: there DEER must equal the same discrete
    # problem solved sequentially, up to Newton's tolerance (rtol = atol = 1e-10;
    # Newton converges quadratically, so measured ~1e-14 relative for all five).
    nodes = np.linspace(problem.t0, problem.t1, FINE_STEPS + 1)
    sequential = sequential_trapezoid(problem.vector_field, problem.y0_array(), nodes)
    assert max_relative(ys, sequential[:: FINE_STEPS // (NUM_SAVES - 1)]) < 1e-10


# --------------------------------------------------------------------------------------
# Long chaotic windows fail loudly; shorter windows are the remedy
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lorenz_long_window_does_not_converge():
    # Over [0, 20] Lorenz is too chaotic for Newton from the coarse predictor within
    # max_iters = 50: the solve must say so rather than return garbage silently.
    lorenz = PROBLEMS["lorenz"]
    kwargs = dict(
        terms=diffrax.ODETerm(lorenz.vector_field),
        solver=DeerSolver(num_steps=FINE_STEPS),
        t0=0.0,
        t1=20.0,
        dt0=20.0,
        y0=lorenz.y0_array(),
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    sol = diffrax.diffeqsolve(**kwargs, throw=False)
    assert sol.result != diffrax.RESULTS.successful
    assert sol.result in (
        diffrax.RESULTS.nonlinear_max_steps_reached,
        diffrax.RESULTS.nonlinear_divergence,
    )
    # DeerSolver's own message (the window, the figures, the remedies).
    with pytest.raises(RuntimeError, match="did not converge in the window"):
        diffrax.diffeqsolve(**kwargs, throw=True)


@pytest.mark.slow
def test_lorenz_short_windows_converge():
    # The remedy: windows of length 1 (dt0=1.0), five of 2000 intervals each. Same grid
    # as one window of N = 1e4 over [0, 5], so the same error bound applies.
    lorenz = PROBLEMS["lorenz"]
    sol = solve_deer(lorenz, 2000, dt0=1.0)
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.stats["num_accepted_steps"]) == 5
    assert int(sol.solver_state.max_num_iters) <= 10
    error = np.max(np.abs(np.asarray(sol.ys) - reference_solution("lorenz")))
    assert error < TSIT5_BOUNDS["lorenz"]
    one_window, _, _ = fine_solution("lorenz")
    assert max_relative(sol.ys, one_window) < 1e-10  # measured 4e-16


# --------------------------------------------------------------------------------------
# Windows vs one window on the same grid
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_windows_agree_with_one_window():
    # One window of 1000 intervals over [0, 10] and four windows (dt0 = 2.5) of 250:
    # the same grid, hence the same discrete solution at every node.
    problem = PROBLEMS["lotka_volterra"]
    nodes = jnp.linspace(0.0, 10.0, 1001)

    def solve(num_steps, dt0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vector_field),
            DeerSolver(num_steps=num_steps),
            t0=0.0,
            t1=10.0,
            dt0=dt0,
            y0=problem.y0_array(),
            saveat=diffrax.SaveAt(ts=nodes),
        )
        assert sol.result == diffrax.RESULTS.successful
        return np.asarray(sol.ys)

    one_window = solve(1000, 10.0)
    windows = solve(250, 2.5)
    sequential = sequential_trapezoid(problem.vector_field, problem.y0_array(), nodes)
    # Measured: 3.6e-15, 2.3e-15 and 1.8e-15 relative. Newton's tolerance is 1e-10.
    assert max_relative(windows, one_window) < 1e-10
    assert max_relative(one_window, sequential) < 1e-10
    assert max_relative(windows, sequential) < 1e-10


# --------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lotka_volterra", "mlp"])
def test_float32_matches_float64(name):
    problem = PROBLEMS[name]
    vector_field = mlp_vector_field(jnp.float32) if name == "mlp" else None
    sol = solve_deer(problem, FINE_STEPS, dtype=jnp.float32, vector_field=vector_field)
    assert sol.result == diffrax.RESULTS.successful
    assert sol.ys.dtype == jnp.float32
    float64, _, _ = fine_solution(name)
    # Measured 1.4e-6 (lotka_volterra) and 2.7e-7 (mlp): float32 round-off, far below
    # the O(h^2) error, which is the same in both dtypes on this grid.
    assert max_relative(sol.ys, float64) < 1e-4
