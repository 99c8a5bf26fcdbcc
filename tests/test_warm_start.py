"""Warm starts: the solver state carries the last window's trajectory back in."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer import DeerSolver, DeerState


def damped_pendulum(t, y, strength):
    return jnp.stack([y[1], -strength * jnp.sin(y[0]) - 0.1 * y[1]])


# A constant initial guess (predictor_steps=0) makes a cold start take many
# iterations, so the effect of the guess is plain to see.
SOLVER = DeerSolver(num_steps=400, predictor_steps=0)
Y0 = jnp.array([2.0, 0.0])


def solve(strength, solver_state=None, t1=5.0):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(damped_pendulum),
        SOLVER,
        0.0,
        t1,
        t1,
        Y0,
        args=strength,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 11), solver_state=True),
        solver_state=solver_state,
    )
    return sol.ys, sol.solver_state


@pytest.mark.slow
def test_resolving_the_same_problem_takes_at_most_two_iterations():
    ys_cold, state = solve(1.0)
    assert int(state.num_iters) > 5
    ys_warm, warm_state = solve(1.0, state)
    assert int(warm_state.num_iters) <= 2
    np.testing.assert_allclose(ys_warm, ys_cold, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_warm_start_after_a_parameter_step_needs_fewer_iterations():
    # As in training: the parameters moved a little since the last solve.
    _, state = solve(1.0)
    ys_cold, cold_state = solve(1.01)
    ys_warm, warm_state = solve(1.01, state)
    assert int(warm_state.num_iters) < int(cold_state.num_iters)
    np.testing.assert_allclose(ys_warm, ys_cold, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_a_state_from_another_window_is_not_used():
    # The stored trajectory belongs to [0, 5]; a solve over [0, 4] starts cold.
    _, state = solve(1.0)
    _, cold_state = solve(1.0, t1=4.0)
    _, other_state = solve(1.0, state, t1=4.0)
    assert int(other_state.num_iters) == int(cold_state.num_iters)


def van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1.0 - y[0] ** 2) * y[1] - y[0]])


@jax.jit
def solve_van_der_pol(mu, solver_state):
    # The default predictor (a coarse RK4 solve), one window.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol),
        DeerSolver(num_steps=200),
        0.0,
        5.0,
        5.0,
        Y0,
        args=mu,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        solver_state=solver_state,
    )
    return sol.ys, sol.solver_state


def cold_state(num_steps=200):
    """A solver state that belongs to no window (as `DeerSolver.init` gives): the
    solve starts from the predictor. Passed explicitly, so that one compilation
    serves cold and warm starts."""
    zero = jnp.array(0, jnp.int32)
    nan = jnp.array(jnp.nan)
    trajectory = jnp.zeros((num_steps + 1, 2))
    return DeerState(
        num_iters=zero,
        total_num_iters=zero,
        max_num_iters=zero,
        update_norm=nan,
        residual_norm=nan,
        trajectory=trajectory,
        window_t0=nan,
        window_t1=nan,
        error_estimate=nan,
        max_error_estimate=nan,
        dense_error_estimate=nan,
        max_dense_error_estimate=nan,
        scaled_error=nan,
        max_scaled_error=nan,
        total_estimate_iters=zero,
        total_remeshes=zero,
    )


@pytest.mark.slow
def test_warm_start_after_a_large_parameter_change_costs_no_more_than_cold():
    # Van der Pol's mu from 1 to 4: the stored trajectory is far worse than the
    # predictor (it took 18 iterations from it against 3 cold), so the predictor is
    # kept.
    _, state = solve_van_der_pol(1.0, cold_state())
    ys_cold, cold = solve_van_der_pol(4.0, cold_state())
    ys_warm, warm = solve_van_der_pol(4.0, state)
    assert int(warm.num_iters) <= int(cold.num_iters)
    np.testing.assert_allclose(ys_warm, ys_cold, rtol=1e-9, atol=1e-9)
    # ...while re-solving the same problem still starts from the stored trajectory.
    _, again = solve_van_der_pol(4.0, cold)
    assert int(again.num_iters) <= 2
