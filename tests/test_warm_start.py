"""Warm starts: the solver state carries the last window's trajectory back in."""

import diffrax
import jax.numpy as jnp
import numpy as np

from diffrax_deer import DeerSolver


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


def test_resolving_the_same_problem_takes_at_most_two_iterations():
    ys_cold, state = solve(1.0)
    assert int(state.num_iters) > 5
    ys_warm, warm_state = solve(1.0, state)
    assert int(warm_state.num_iters) <= 2
    np.testing.assert_allclose(ys_warm, ys_cold, rtol=1e-10, atol=1e-10)


def test_warm_start_after_a_parameter_step_needs_fewer_iterations():
    # As in training: the parameters moved a little since the last solve.
    _, state = solve(1.0)
    ys_cold, cold_state = solve(1.01)
    ys_warm, warm_state = solve(1.01, state)
    assert int(warm_state.num_iters) < int(cold_state.num_iters)
    np.testing.assert_allclose(ys_warm, ys_cold, rtol=1e-9, atol=1e-9)


def test_a_state_from_another_window_is_not_used():
    # The stored trajectory belongs to [0, 5]; a solve over [0, 4] starts cold.
    _, state = solve(1.0)
    _, cold_state = solve(1.0, t1=4.0)
    _, other_state = solve(1.0, state, t1=4.0)
    assert int(other_state.num_iters) == int(cold_state.num_iters)
