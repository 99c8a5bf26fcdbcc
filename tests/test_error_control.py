"""Error control: the window's error estimate against true errors, adaptive windows
from diffrax's controllers, and the estimate reported on fixed grids."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from conftest import tsit5_reference
from diffrax_deer import (
    DeerSolver,
    GaussLegendre,
    RadauIIA,
    Trapezoid,
    estimate_error,
    solve_window,
)


jax.config.update("jax_enable_x64", True)


# ------------------------------------------------------------------------------------
# The estimate against the true error
# ------------------------------------------------------------------------------------

# A linear field with a rotation and a decay: exact solution expm(t A) y0.
LINEAR_A = np.array([[-0.3, 2.0, 0.0], [-2.0, -0.3, 0.5], [0.0, -0.5, -1.0]])
LINEAR_Y0 = np.array([1.0, 0.0, -0.5])


def linear_field(t, y, args):
    return jnp.asarray(LINEAR_A) @ y


def van_der_pol(t, y, mu):
    x, v = y[0], y[1]
    return jnp.stack([v, mu * (1 - x**2) * v - x])


@eqx.filter_jit
def window_and_estimate(field, method, ts, y0, args):
    ys, stages, stats = solve_window(
        field,
        method,
        ts,
        y0,
        args,
        rtol=1e-13,
        atol=1e-13,
        max_iters=50,
        predictor_steps=ts.shape[0] - 1,
    )
    estimate = estimate_error(
        field, method, ts, ys, stages, args, rtol=1e-13, atol=1e-13, max_iters=50
    )
    info = method.dense_info(field, ts, ys, stages, args)
    dense = jax.vmap(lambda t: method.interpolate(ts, ys, info, t))(estimate.midpoints)
    return ys, stats, estimate, dense


def _assert_estimate_within_10x(estimated, true, floor):
    # At every node where the true error is above round-off (`floor`), the norm of
    # the estimate is within a factor of 10 of the norm of the true error.
    true_norms = np.linalg.norm(true, axis=-1)
    estimated_norms = np.linalg.norm(estimated, axis=-1)
    above = true_norms > floor
    assert np.sum(above) >= 0.8 * len(true_norms[1:]), "test grid too fine"
    ratios = estimated_norms[above] / true_norms[above]
    assert np.all((ratios > 0.1) & (ratios < 10)), ratios


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, num_steps",
    [(Trapezoid(), 64), (RadauIIA(stages=3), 16)],
    ids=["trapezoid", "radau3"],
)
def test_estimate_within_10x_of_true_error_linear(method, num_steps):
    ts = jnp.linspace(0.0, 4.0, num_steps + 1)
    ys, stats, estimate, dense = window_and_estimate(
        linear_field, method, ts, jnp.asarray(LINEAR_Y0), None
    )
    assert bool(stats.converged) and bool(estimate.valid)

    def exact(times):
        return np.stack([scipy.linalg.expm(t * LINEAR_A) @ LINEAR_Y0 for t in times])

    # Only the coarse grid's nodes carry an estimate (between them it is
    # interpolated); round-off here is about 1e-14.
    _assert_estimate_within_10x(
        np.asarray(estimate.node_errors)[::2], (np.asarray(ys) - exact(ts))[::2], 1e-12
    )
    # Between the nodes, the dense output's own estimate.
    midpoints = np.asarray(estimate.midpoints)
    _assert_estimate_within_10x(
        np.asarray(estimate.dense_errors), np.asarray(dense) - exact(midpoints), 1e-12
    )


def prothero_robinson(t, y, stiffness):
    # y' = -stiffness (y - sin t) + cos t: y = sin t from y(0) = 0, and on a grid
    # with h * stiffness >> 1 the collocation methods' stage order (not their
    # order) limits the dense output.
    return -stiffness * (y - jnp.sin(t)) + jnp.cos(t)


@pytest.mark.parametrize("stiffness", [1e4, 1e8])
def test_dense_estimate_within_10x_of_true_error_when_stiff(stiffness):
    # Radau IIA's nodes are accurate to about 1e-11 here, its dense output between
    # them to about 1e-6: the node estimate alone would under-report the values
    # `SaveAt(ts=...)` returns by orders of magnitude.
    ts = jnp.linspace(0.0, 4.0, 17)
    ys, stats, estimate, dense = window_and_estimate(
        prothero_robinson, RadauIIA(stages=3), ts, jnp.zeros(1), jnp.array(stiffness)
    )
    assert bool(stats.converged) and bool(estimate.valid)
    midpoints = np.asarray(estimate.midpoints)
    true = np.asarray(dense) - np.sin(midpoints)[:, None]
    _assert_estimate_within_10x(np.asarray(estimate.dense_errors), true, 1e-12)
    assert np.max(np.abs(true)) > 100 * np.max(
        np.abs(np.asarray(ys)[:, 0] - np.sin(ts))
    )


def test_dense_estimate_compares_like_interpolants_on_both_grids():
    # h * stiffness = 1.5: the fine grid interpolates with quintic Hermite, and
    # the coarse grid, twice as stiff per interval, would switch to its
    # collocation polynomial (order 4 against 6): the difference of the two
    # dense outputs then measures the coarse polynomial, not the fine Hermite.
    method = RadauIIA(stages=3)
    ts = jnp.linspace(0.0, 4.0, 17)
    ys, stats, estimate, dense = window_and_estimate(
        prothero_robinson, method, ts, jnp.zeros(1), jnp.array(6.0)
    )
    assert bool(stats.converged) and bool(estimate.valid)
    args = jnp.array(6.0)
    fine_info = method.dense_info(prothero_robinson, ts, ys, None, args)
    coarse_info = method.dense_info(prothero_robinson, ts[::2], ys[::2], None, args)
    assert not np.any(np.asarray(fine_info["stiff"]))
    assert np.all(np.asarray(coarse_info["stiff"]))
    midpoints = np.asarray(estimate.midpoints)
    true = np.asarray(dense) - np.sin(midpoints)[:, None]
    _assert_estimate_within_10x(np.asarray(estimate.dense_errors), true, 1e-13)


@pytest.mark.slow
def test_estimate_within_10x_of_true_error_van_der_pol():
    ts = jnp.linspace(0.0, 6.0, 33)
    y0 = jnp.array([2.0, 0.0])
    mu = jnp.array(1.0)
    method = GaussLegendre(stages=3)
    ys, stats, estimate, _ = window_and_estimate(van_der_pol, method, ts, y0, mu)
    assert bool(stats.converged) and bool(estimate.valid)
    reference = tsit5_reference(van_der_pol, y0, 0.0, 6.0, ts, args=mu, tol=1e-13)
    _assert_estimate_within_10x(
        np.asarray(estimate.node_errors)[::2],
        (np.asarray(ys) - reference)[::2],
        1e-10,
    )


# ------------------------------------------------------------------------------------
# Adaptive windows
# ------------------------------------------------------------------------------------

VDP_Y0 = jnp.array([2.0, 0.0])
NUM_SAVES = 101


@eqx.filter_jit
def adaptive_solve(solver, mu, t1, tolerance, save_ts):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol),
        solver,
        0.0,
        t1,
        None,
        VDP_Y0,
        args=mu,
        saveat=diffrax.SaveAt(ts=save_ts, solver_state=True),
        stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=2000,
        throw=False,
    )


@pytest.mark.slow
def test_pid_controller_chooses_windows():
    t1 = jnp.array(20.0)
    save_ts = jnp.linspace(0.0, t1, NUM_SAVES)
    reference = tsit5_reference(van_der_pol, VDP_Y0, 0.0, t1, save_ts, args=1.0)
    errors = {}
    for label, solver in [("deer", DeerSolver()), ("tsit5", diffrax.Tsit5())]:
        sol = adaptive_solve(solver, jnp.array(1.0), t1, jnp.array(1e-6), save_ts)
        assert sol.result == diffrax.RESULTS.successful
        errors[label] = np.max(np.abs(np.asarray(sol.ys) - reference))
        if label == "deer":
            state, stats = sol.solver_state, sol.stats
    # As accurate as Tsit5 at the same tolerances, within a factor of 10.
    assert errors["deer"] < 10 * errors["tsit5"]
    assert errors["deer"] < 1e-4
    # Several windows, every accepted one within tolerance at every node.
    assert int(stats["num_accepted_steps"]) >= 3
    assert int(stats["num_steps"]) == int(stats["num_accepted_steps"]) + int(
        stats["num_rejected_steps"]
    )
    assert 0 < float(state.max_scaled_error) <= 1
    assert int(state.total_estimate_iters) > 0


@pytest.mark.slow
def test_relaxation_jump_gets_short_windows():
    # Stiff Van der Pol: slow drift, then a jump of x from about -1 to 2 on a time
    # scale 1/mu. Equal windows fail there; the controller rejects windows whose
    # Newton solve fails or whose estimate is large, and shortens them.
    mu, t1 = 100.0, jnp.array(150.0)
    save_ts = jnp.linspace(0.0, t1, NUM_SAVES)
    reference = diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol),
        diffrax.Kvaerno5(),
        0.0,
        t1,
        None,
        VDP_Y0,
        args=mu,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=100_000,
    ).ys
    sol = adaptive_solve(DeerSolver(), jnp.array(mu), t1, jnp.array(1e-6), save_ts)
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.stats["num_rejected_steps"]) > 0
    assert np.max(np.abs(np.asarray(sol.ys[:, 0] - reference[:, 0]))) < 1e-3


@pytest.mark.slow
def test_failed_newton_solve_is_rejected_and_retried_shorter():
    # Two Newton iterations are not enough for long windows: those report infinite
    # errors and are retried shorter, until the solve succeeds.
    solver = DeerSolver(max_iters=2)
    t1 = jnp.array(20.0)
    save_ts = jnp.linspace(0.0, t1, NUM_SAVES)
    sol = adaptive_solve(solver, jnp.array(1.0), t1, jnp.array(1e-6), save_ts)
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.stats["num_rejected_steps"]) > 0
    reference = tsit5_reference(van_der_pol, VDP_Y0, 0.0, t1, save_ts, args=1.0)
    assert np.max(np.abs(np.asarray(sol.ys) - reference)) < 1e-4


# ------------------------------------------------------------------------------------
# Fixed grids: the estimate reported, and optionally enforced
# ------------------------------------------------------------------------------------


@eqx.filter_jit
def fixed_solve(solver, t1, dt0):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol),
        solver,
        0.0,
        t1,
        dt0,
        VDP_Y0,
        args=1.0,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        throw=False,
    )


GL3 = GaussLegendre(stages=3)
TOLERANCES = dict(rtol=1e-8, atol=1e-8)
FIXED_T1 = jnp.array(4.0)


@pytest.mark.slow
def test_fixed_grid_reports_estimate():
    sol = fixed_solve(DeerSolver(8, method=GL3, **TOLERANCES), FIXED_T1, FIXED_T1)
    assert sol.result == diffrax.RESULTS.successful
    state = sol.solver_state
    reference = tsit5_reference(
        van_der_pol, VDP_Y0, 0.0, FIXED_T1, FIXED_T1[None], 1.0, tol=1e-13
    )
    true_error = np.sqrt(np.mean((np.asarray(sol.ys[-1]) - reference[-1]) ** 2))
    # The window's largest nodal error bounds the one at t1, by not much here.
    assert true_error <= 1.5 * float(state.error_estimate)
    assert float(state.error_estimate) < 10 * true_error
    # Far above the tolerance: reported, but the solve still succeeds.
    assert float(state.scaled_error) > 10


@pytest.mark.slow
def test_max_error_ratio_fails_a_grid_too_coarse():
    strict = dict(method=GL3, max_error_ratio=10.0, **TOLERANCES)
    coarse = fixed_solve(DeerSolver(8, **strict), FIXED_T1, FIXED_T1)
    assert coarse.result == diffrax.RESULTS.dt_min_reached
    assert float(coarse.solver_state.scaled_error) > 10
    fine = fixed_solve(DeerSolver(64, **strict), FIXED_T1, FIXED_T1)
    assert fine.result == diffrax.RESULTS.successful
    assert float(fine.solver_state.scaled_error) <= 10
    # Several windows: each is judged on its own.
    windows = fixed_solve(DeerSolver(64, **strict), FIXED_T1, jnp.array(1.0))
    assert windows.result == diffrax.RESULTS.successful
    assert int(windows.stats["num_accepted_steps"]) == 4
    assert 0 < float(windows.solver_state.max_scaled_error) <= 10


def test_deer_solver_without_arguments_on_fixed_windows_asks_for_tolerances():
    # As with diffrax's implicit solvers: the tolerances come from an adaptive
    # controller, so fixed windows need them given.
    with pytest.raises(ValueError, match="tolerances"):
        jax.eval_shape(lambda: fixed_solve(DeerSolver(), FIXED_T1, FIXED_T1))


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_error_ratio"):
        DeerSolver(num_steps=8, max_error_ratio=10.0)  # no tolerances to compare
    with pytest.raises(ValueError, match="max_error_ratio"):
        DeerSolver(rtol=1e-6, atol=1e-6, max_error_ratio=0.5)
    with pytest.raises(ValueError, match="error_estimate"):
        DeerSolver(error_estimate="yes")
