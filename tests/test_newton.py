"""Newton that converges and scales: quasi-DEER, damping, guards."""

import functools

import diffrax
import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (
    lorenz,
    sequential_trapezoid,
    trapezoid_linear_reference,
    tsit5_reference,
)
from diffrax_deer import (
    DeerSolver,
    GaussLegendre,
    Trapezoid,
    newton_solve,
)
from diffrax_deer._bench.problems import MLPVectorField


# --------------------------------------------------------------------------------------
# quasi-DEER: only the Jacobian's diagonal enters the scan; same converged trajectory
# --------------------------------------------------------------------------------------


def neural_field(state_size, scale=1.0):
    """A 64-wide softplus MLP: a NeuralODE-style field."""
    field = MLPVectorField(
        state_size=state_size, width=64, depth=2, key=jax.random.key(3)
    )
    return jax.tree.map(lambda x: scale * x if eqx.is_inexact_array(x) else x, field)


@eqx.filter_jit
def solve_final(field, y0, jacobian, method, damping=False, error_estimate=False):
    # Without the error estimate unless asked: these tests are about Newton, and its
    # coarse solve would add a second Newton loop to what each compiles.
    solver = DeerSolver(
        num_steps=200,
        jacobian=jacobian,
        method=method,
        damping=damping,
        max_iters=200,
        error_estimate=error_estimate,
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        0.0,
        2.0,
        2.0,
        y0,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 9), solver_state=True),
    )
    return sol.ys, sol.solver_state


@pytest.mark.slow
def test_diagonal_agrees_with_full_on_64_state_neural_field():
    field = neural_field(64)
    y0 = jax.random.normal(jax.random.key(1), (64,))
    ys_full, state_full = solve_final(
        field, y0, "full", Trapezoid(), error_estimate=True
    )
    ys_diagonal, state_diagonal = solve_final(
        field, y0, "diagonal", Trapezoid(), error_estimate=True
    )
    # Both stop when their update is within 1e-10 (rtol and atol): the same discrete
    # trajectory to about that.
    np.testing.assert_allclose(ys_diagonal, ys_full, rtol=1e-8, atol=1e-8)
    # And the same error estimate: the coarse solve also converges in both modes.
    np.testing.assert_allclose(
        state_diagonal.error_estimate, state_full.error_estimate, rtol=1e-4
    )
    assert np.isfinite(float(state_full.error_estimate))
    # The diagonal Newton direction converges linearly: more iterations.
    assert int(state_diagonal.num_iters) > int(state_full.num_iters)
    assert float(state_diagonal.residual_norm) < 1e-10


@pytest.mark.slow
def test_diagonal_agrees_with_full_for_collocation():
    # Stages decouple per component into s x s systems.
    method = GaussLegendre(stages=2)
    field = neural_field(3)
    y0 = jnp.array([0.5, -1.0, 0.25])
    ys_full, _ = solve_final(field, y0, "full", method)
    ys_diagonal, state = solve_final(field, y0, "diagonal", method)
    np.testing.assert_allclose(ys_diagonal, ys_full, rtol=1e-8, atol=1e-9)
    assert float(state.residual_norm) < 1e-10


@pytest.mark.slow
def test_diagonal_gradient_is_exact():
    # The derivative rule is exact in both modes (the tangent recurrence uses the
    # full Jacobians at the solution): gradients equal the full mode's and finite
    # differences.
    field = neural_field(4)
    y0 = jnp.array([0.5, -1.0, 0.25, 0.1])

    def loss(y0, jacobian):
        ys, _ = solve_final(field, y0, jacobian, Trapezoid())
        return jnp.sum(ys**2)

    grad_full = jax.grad(loss)(y0, "full")
    grad_diagonal = jax.grad(loss)(y0, "diagonal")
    np.testing.assert_allclose(grad_diagonal, grad_full, rtol=1e-8)
    step = 1e-6
    basis = jnp.eye(4)[0]
    finite_difference = (
        loss(y0 + step * basis, "full") - loss(y0 - step * basis, "full")
    ) / (2 * step)
    np.testing.assert_allclose(grad_diagonal[0], finite_difference, rtol=1e-6)


def _compiled_memory_over_trajectory(size, jacobian):
    # XLA's own accounting of the compiled solve (temporaries + outputs), in units
    # of the trajectory itself, (N + 1) x n float32 values.
    num_steps = 1000
    field = jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x,
        neural_field(size),
    )
    y0 = jnp.zeros((size,), jnp.float32)

    def solve(y0):
        solver = DeerSolver(num_steps=num_steps, jacobian=jacobian, max_iters=5)
        zero, one = jnp.float32(0), jnp.float32(1)
        term = diffrax.ODETerm(field)
        return diffrax.diffeqsolve(term, solver, zero, one, one, y0, throw=False).ys

    analysis = jax.jit(solve).lower(y0).compile().memory_analysis()
    used = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    return used / ((num_steps + 1) * size * 4)


@pytest.mark.slow
def test_diagonal_memory_is_linear_in_state_size():
    # The diagonal mode never forms N x n x n: at n = 256 it needs a small multiple
    # of the trajectory (measured 6.9x; the floor is 10x); the full mode
    # needs about 4 n times it.
    assert _compiled_memory_over_trajectory(256, "diagonal") <= 10
    assert _compiled_memory_over_trajectory(64, "full") > 64 / 2


# --------------------------------------------------------------------------------------
# Chaos: one long window fails cleanly; windows of length 1 converge
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lorenz_long_window_reports_failure_without_nan():
    # Lorenz on [0, 20] with dt = 0.005 in one window: Newton does not converge in
    # 30 iterations. With damping it must say so (not NaN), with its statistics.
    solver = DeerSolver(num_steps=4000, damping=True, max_iters=30)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lorenz),
        solver,
        0.0,
        20.0,
        20.0,
        jnp.array([1.0, 1.0, 1.0]),
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        throw=False,
    )
    state = sol.solver_state
    assert sol.result != diffrax.RESULTS.successful
    assert bool(jnp.all(jnp.isfinite(sol.ys)))
    assert 1 <= int(state.num_iters) <= 30
    assert bool(jnp.isfinite(state.residual_norm))
    assert float(state.residual_norm) > 0


@pytest.mark.slow
def test_lorenz_in_unit_windows_matches_tsit5():
    # Windows of length 1 are short enough for Newton: the result is the sequential
    # trapezoidal solution on the same grid, and follows Tsit5 to the trapezoid's
    # discretisation error while the dynamics stay predictable.
    save_ts = jnp.linspace(0.0, 8.0, 33)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lorenz),
        DeerSolver(num_steps=1000),
        0.0,
        20.0,
        1.0,
        jnp.array([1.0, 1.0, 1.0]),
        saveat=diffrax.SaveAt(ts=save_ts),
    )
    assert sol.result == diffrax.RESULTS.successful
    sequential = sequential_trapezoid(
        lorenz, [1.0, 1.0, 1.0], np.linspace(0.0, 8.0, 8001)
    )[::250]
    np.testing.assert_allclose(sol.ys, sequential, rtol=1e-6, atol=1e-6)
    reference = tsit5_reference(lorenz, [1.0, 1.0, 1.0], 0.0, 8.0, save_ts)
    error = np.max(np.abs(np.asarray(sol.ys) - reference), axis=1)
    assert error[save_ts <= 4.0].max() < 5e-3  # measured 1.1e-3 (h = 1e-3)
    assert error.max() < 0.5


# --------------------------------------------------------------------------------------
# Guards: non-finite steps are rejected, the best iterate is kept, failure is reported
# --------------------------------------------------------------------------------------


def blowing_up(t, y, args):
    # y' = y^2 from y0 = 1 has a pole at t = 1: no solution on [0, 2].
    return y**2


@pytest.mark.slow
@pytest.mark.parametrize("damping", [False, True])
def test_overflow_is_reported_not_nan(damping):
    solver = DeerSolver(num_steps=100, damping=damping, max_iters=20, predictor_steps=0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(blowing_up),
        solver,
        0.0,
        2.0,
        2.0,
        jnp.array([1.0]),
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        throw=False,
    )
    assert sol.result != diffrax.RESULTS.successful
    assert bool(jnp.all(jnp.isfinite(sol.ys)))
    assert bool(jnp.isfinite(sol.solver_state.residual_norm))
    # DeerSolver's own message (the window, the figures, the remedies).
    with pytest.raises(Exception, match="Newton's method (did not converge|diverged)"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(blowing_up), solver, 0.0, 2.0, 2.0, jnp.array([1.0])
        )


@pytest.mark.slow
def test_damping_costs_nothing_when_newton_converges():
    # Damping only starts after a non-finite step: a solve that plain Newton
    # converges takes the very same iterations and gives the same answer.
    field = neural_field(3)
    y0 = jnp.array([0.5, -1.0, 0.25])
    ys_plain, state_plain = solve_final(field, y0, "full", Trapezoid(), False)
    ys_damped, state_damped = solve_final(field, y0, "full", Trapezoid(), True)
    assert int(state_plain.num_iters) == int(state_damped.num_iters)
    np.testing.assert_allclose(ys_damped, ys_plain, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Damping: converges where plain DEER overflows
# --------------------------------------------------------------------------------------


def ghost_network(t, y, args):
    # A 2-unit tanh layer with a linear skip, driving a stiff tanh readout (rate 100).
    # From y = 0 the state relaxes to its only equilibrium, x* = 2.9411, contracting
    # all the way (df/dx < 0 on [0, x*]). But near 0 the field is almost linear,
    # x' ~ 1 - 0.107 x, so DEER's first step from the constant guess heads for
    # x ~ 9.3, where the second unit makes the field expanding (df/dx ~ +0.86): the
    # next step grows like e^{0.86 t} and overflows even float64 over t1 = 1500.
    # Levenberg-Marquardt steps creep up from the front and never go there.
    x, z = y[0], y[1]
    weights_in = jnp.array([1.0, 1.5], y.dtype)
    biases = jnp.array([-3.0, -14.25], y.dtype)
    weights_out = jnp.array([-0.75, 0.7], y.dtype)
    dx = 0.95 - 0.1 * x + weights_out @ jnp.tanh(weights_in * x + biases)
    return jnp.stack([dx, 100.0 * (jnp.tanh(x) - z)])


@pytest.mark.slow
def test_damping_converges_where_plain_deer_overflows():
    t1, num_steps = 1500.0, 1500
    y0 = jnp.zeros(2)
    save = jnp.array([1.0, 2.0, 5.0, 10.0, 50.0, t1])
    results = {}
    for damping in (False, True):
        solver = DeerSolver(
            num_steps=num_steps, damping=damping, predictor_steps=0, max_iters=50
        )
        results[damping] = diffrax.diffeqsolve(
            diffrax.ODETerm(ghost_network),
            solver,
            0.0,
            t1,
            t1,
            y0,
            saveat=diffrax.SaveAt(ts=save, solver_state=True),
            throw=False,
        )
    plain, damped = results[False], results[True]
    # Plain DEER: its second step is non-finite, and halving it never helps.
    assert plain.result == diffrax.RESULTS.nonlinear_divergence
    # Damped: converges, in a few Levenberg-Marquardt steps and a final plain one.
    assert damped.result == diffrax.RESULTS.successful
    assert int(damped.solver_state.num_iters) < 30
    assert float(damped.solver_state.residual_norm) < 1e-12
    # ... to the sequential trapezoid solution on the same grid, and the equilibrium.
    ts = np.linspace(0.0, t1, num_steps + 1)
    reference = sequential_trapezoid(ghost_network, y0, ts)
    nodes = np.asarray(save, dtype=int)
    np.testing.assert_allclose(damped.ys, reference[nodes], rtol=1e-8, atol=1e-10)
    x_end, z_end = np.asarray(damped.ys[-1])
    np.testing.assert_allclose(x_end, 2.9411165, rtol=1e-6)  # the equilibrium
    np.testing.assert_allclose(z_end, np.tanh(x_end), rtol=1e-10)


# --------------------------------------------------------------------------------------
# Property: for any stable linear system and grid, Newton lands on the discrete solution
# --------------------------------------------------------------------------------------


@jax.jit
def _solve_linear(ts, y0, matrix):
    guess = jnp.broadcast_to(y0, (ts.shape[0], y0.shape[0]))
    return newton_solve(
        lambda t, y, a: a @ y,
        Trapezoid(),
        ts,
        guess,
        None,
        matrix,
        rtol=1e-10,
        atol=1e-10,
        max_iters=10,
    )


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    spectral_shift=st.floats(0.1, 3.0),
    horizon=st.floats(0.1, 10.0),
)
def test_linear_systems_converge_to_the_discrete_solution(
    seed, spectral_shift, horizon
):
    rng = np.random.default_rng(seed)
    size, num_steps = 3, 24
    # Stable: the eigenvalues of S - shift I have real parts at most -shift / 2 or so.
    skew = rng.normal(size=(size, size))
    matrix = (
        (skew - skew.T)
        - spectral_shift * np.eye(size)
        + 0.2 * rng.normal(size=(size, size))
    )
    spacings = rng.uniform(0.1, 1.0, size=num_steps)
    ts = np.concatenate([[0.0], np.cumsum(spacings)]) * horizon / spacings.sum()
    y0 = rng.normal(size=size)
    ys, _, stats = _solve_linear(jnp.asarray(ts), jnp.asarray(y0), jnp.asarray(matrix))
    assert bool(stats.converged)
    reference = trapezoid_linear_reference(matrix, y0, ts)
    np.testing.assert_allclose(ys, reference, rtol=1e-9, atol=1e-9)


def bistable_network(t, y, args):
    # One tanh layer with large weights: unstable at 0, stable near +-3. From the
    # constant guess y0 = 0.01, DEER's first steps grow like e^{8 t}.
    weights_in = jnp.array([[3.0, 0.5], [-0.5, 3.0]], y.dtype)
    return 3.0 * jnp.tanh(weights_in @ y) - y


@pytest.mark.slow
def test_damping_keeps_a_converging_float32_solve_whose_residual_overflows():
    # Plain DEER converges here in float32 although its intermediate residuals
    # square to infinity; damping must not take that for a failure.
    results = []
    for damping in (False, True):
        solver = DeerSolver(num_steps=2000, damping=damping, predictor_steps=0)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(bistable_network),
            solver,
            jnp.float32(0),
            jnp.float32(10),
            jnp.float32(10),
            jnp.array([0.01, -0.02], jnp.float32),
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )
        results.append((sol.ys, int(sol.solver_state.num_iters)))
    (ys_plain, iters_plain), (ys_damped, iters_damped) = results
    assert iters_plain == iters_damped
    np.testing.assert_allclose(ys_damped, ys_plain, rtol=1e-6)
    np.testing.assert_allclose(ys_plain[-1], [-3.0, -3.0], atol=1e-3)


# --------------------------------------------------------------------------------------
# The stopping rule: scale-invariant by default; pure relative or absolute on request
# --------------------------------------------------------------------------------------


@jax.jit
def _solve_lorenz_in_units(scale):
    # Lorenz in other units, z = scale * y: the same problem, so default options must
    # give the same relative accuracy in about as many iterations.
    dtype = scale.dtype
    t1 = jnp.asarray(5.0, dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, z, s: s * lorenz(t, z / s, None)),
        DeerSolver(num_steps=1000),
        jnp.zeros((), dtype),
        t1,
        t1,
        scale * jnp.ones(3, dtype),
        args=scale,
        saveat=diffrax.SaveAt(
            ts=jnp.linspace(0.0, 5.0, 21).astype(dtype), solver_state=True
        ),
        throw=False,
    )
    return sol.ys / scale, sol.solver_state.num_iters, sol.result


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_default_tolerances_are_scale_invariant(dtype):
    # With an absolute default atol, a state far below it passed the test after one
    # update: "successful", with a relative error of 0.2.
    reference = tsit5_reference(
        lorenz, [1.0, 1.0, 1.0], 0.0, 5.0, np.linspace(0, 5, 21)
    )
    outcomes = {}
    for scale in [1e-8, 1e-4, 1.0, 1e4, 1e8]:
        ys, num_iters, result = _solve_lorenz_in_units(jnp.asarray(scale, dtype))
        assert result == diffrax.RESULTS.successful
        error = np.max(np.abs(np.asarray(ys) - reference)) / np.max(np.abs(reference))
        outcomes[scale] = (error, int(num_iters))
    error_at_one, iters_at_one = outcomes[1.0]
    assert error_at_one < 2e-3  # measured 9.1e-4: the trapezoid's error at h = 5e-3
    for error, num_iters in outcomes.values():
        np.testing.assert_allclose(error, error_at_one, rtol=1e-2)
        assert abs(num_iters - iters_at_one) <= 1


def cubic_decay(t, y, args):
    # The second component starts at zero and stays there exactly.
    return -y - y**3


@functools.partial(jax.jit, static_argnames=("rtol", "atol"))
def _solve_cubic_decay(y0, *, rtol, atol):
    ts = jnp.linspace(0.0, 2.0, 101)
    guess = jnp.broadcast_to(y0, (101, 2))
    return newton_solve(
        cubic_decay,
        Trapezoid(),
        ts,
        guess,
        None,
        None,
        rtol=rtol,
        atol=atol,
        max_iters=20,
    )


@pytest.mark.slow
@pytest.mark.parametrize("rtol, atol", [(1e-10, 0.0), (0.0, 1e-10), (1e-10, None)])
def test_pure_relative_and_pure_absolute_tolerances(rtol, atol):
    # atol = 0: the component that stays at zero has a zero scale and a zero update,
    # which counts as within tolerance (not 0/0).
    y0 = jnp.array([1.0, 0.0])
    ys, _, stats = _solve_cubic_decay(y0, rtol=rtol, atol=atol)
    assert bool(stats.converged)
    assert 2 <= int(stats.num_iters) <= 6
    assert np.isfinite(float(stats.update_norm)) and float(stats.update_norm) <= 1
    reference = sequential_trapezoid(cubic_decay, y0, np.linspace(0.0, 2.0, 101))
    np.testing.assert_allclose(ys, reference, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ys[:, 1], 0.0)


def test_zero_tolerances_are_refused():
    with pytest.raises(ValueError, match="both be zero"):
        _solve_cubic_decay(jnp.array([1.0, 0.0]), rtol=0.0, atol=0.0)


def round_off_driven(t, y, args):
    # x1 and x2 are the same solution computed two ways, so w = x1 - x2 stays at
    # round-off (6e-17). Relative to its own size its update never shrinks: the
    # default atol's floor (10 machine epsilons of the largest component) is what
    # lets Newton converge.
    x1, x2, w = y[0], y[1], y[2]
    forcing = jnp.sin(t)
    return jnp.stack(
        [-x1 - 0.1 * x1 + forcing * x1, -1.1 * x2 + forcing * x2, x1 - x2 - w]
    )


@pytest.mark.slow
def test_default_atol_ignores_a_component_at_round_off():
    ts = jnp.linspace(0.0, 5.0, 501)
    guess = jnp.broadcast_to(jnp.array([1.0, 1.0, 0.0]), (501, 3))
    ys, _, stats = jax.jit(
        lambda guess: newton_solve(
            round_off_driven,
            Trapezoid(),
            ts,
            guess,
            None,
            None,
            rtol=1e-10,
            atol=None,
            max_iters=20,
        )
    )(guess)
    assert bool(stats.converged)
    assert int(stats.num_iters) <= 3  # measured 2; without the floor, not in 20
    assert float(jnp.max(jnp.abs(ys[:, 2]))) < 1e-15
