"""The pure-JAX core: the affine-recurrence scan, Newton, Trapezoid, Hermite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lorenz, trapezoid_linear_reference
from diffrax_deer import Trapezoid, newton_solve, solve_affine_recurrence
from diffrax_deer._core.hermite import (
    hermite_on_uniform_grid,
    quintic_hermite_on_uniform_grid,
)


# --------------------------------------------------------------------------------------
# solve_affine_recurrence
# --------------------------------------------------------------------------------------


def sequential_recurrence(transitions, offsets, initial):
    """d_{i+1} = A_i d_i + b_i, one step at a time with lax.scan."""

    def step(d, transition_and_offset):
        transition, offset = transition_and_offset
        d_next = transition @ d + offset
        return d_next, d_next

    _, rest = jax.lax.scan(step, initial, (transitions, offsets))
    return jnp.concatenate([initial[None], rest])


def random_recurrence(num_steps, n, seed):
    key_a, key_b, key_d = jax.random.split(jax.random.key(seed), 3)
    # Transitions near the identity with a random part of spectral radius ~0.5, so that
    # long products neither blow up nor vanish and a relative comparison is meaningful.
    noise = jax.random.normal(key_a, (num_steps, n, n), jnp.float64)
    transitions = jnp.eye(n)[None] + 0.5 * noise / jnp.sqrt(n) / jnp.sqrt(num_steps)
    offsets = jax.random.normal(key_b, (num_steps, n), jnp.float64)
    initial = jax.random.normal(key_d, (n,), jnp.float64)
    return transitions, offsets, initial


@pytest.mark.slow
@pytest.mark.parametrize("num_steps, n", [(1, 3), (37, 4), (256, 1), (1000, 5)])
def test_affine_recurrence_matches_sequential(num_steps, n):
    transitions, offsets, initial = random_recurrence(num_steps, n, seed=num_steps)
    parallel = jax.jit(solve_affine_recurrence)(transitions, offsets, initial)
    sequential = jax.jit(sequential_recurrence)(transitions, offsets, initial)
    assert parallel.shape == (num_steps + 1, n)
    assert parallel.dtype == jnp.float64
    # The scan reassociates the products: round-off only (measured <= 4e-15 relative).
    np.testing.assert_allclose(parallel, sequential, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(parallel[0], initial)


@pytest.mark.slow
def test_affine_recurrence_transpose_matches_sequential():
    # Reverse mode through the scan (its transpose) against reverse mode through the
    # sequential loop, for a linear functional of the whole trajectory. Gradients in
    # the offsets and initial value are the transposed recurrence; the gradient in the
    # transitions checks the scan's bilinear part too.
    transitions, offsets, initial = random_recurrence(203, 3, seed=7)
    weights = jax.random.normal(jax.random.key(8), (204, 3), jnp.float64)

    def functional(solver):
        def loss(transitions, offsets, initial):
            return jnp.sum(weights * solver(transitions, offsets, initial))

        gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return gradient(transitions, offsets, initial)

    parallel = functional(solve_affine_recurrence)
    sequential = functional(sequential_recurrence)
    for grad_parallel, grad_sequential in zip(parallel, sequential, strict=True):
        np.testing.assert_allclose(
            grad_parallel, grad_sequential, rtol=1e-11, atol=1e-11
        )


def test_affine_recurrence_float32():
    transitions, offsets, initial = random_recurrence(100, 3, seed=3)
    args32 = [x.astype(jnp.float32) for x in (transitions, offsets, initial)]
    parallel = jax.jit(solve_affine_recurrence)(*args32)
    assert parallel.dtype == jnp.float32
    sequential = jax.jit(sequential_recurrence)(transitions, offsets, initial)
    np.testing.assert_allclose(parallel, sequential, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# newton_solve and Trapezoid on a linear ODE: one Newton step is exact
# --------------------------------------------------------------------------------------


def linear_problem(n=6, seed=0):
    rng = np.random.default_rng(seed)
    A = 0.5 * rng.normal(size=(n, n))
    y0 = rng.normal(size=n)
    return A, y0


def linear_field(t, y, A):
    return A @ y


@pytest.mark.parametrize("uniform", [True, False])
def test_newton_linear_ode_is_exact_discrete_trapezoid(uniform):
    A, y0 = linear_problem()
    num_steps = 300
    if uniform:
        ts = np.linspace(0.0, 3.0, num_steps + 1)
    else:
        # Newton and Trapezoid take each interval's own h_i; only the predictor needs
        # a uniform grid, and newton_solve has none.
        fractions = np.sort(np.random.default_rng(1).uniform(size=num_steps - 1))
        ts = np.concatenate([[0.0], 3.0 * fractions, [3.0]])
    guess = jnp.broadcast_to(jnp.asarray(y0), (num_steps + 1, len(y0)))
    ys, stages, stats = jax.jit(
        lambda ts, guess, A: newton_solve(
            linear_field,
            Trapezoid(),
            ts,
            guess,
            None,
            A,
            rtol=1e-10,
            atol=1e-10,
            max_iters=10,
        )
    )(jnp.asarray(ts), guess, jnp.asarray(A))
    # The residual is affine in y, so the first Newton step lands on the discrete
    # solution and the second only confirms it (its update is round-off).
    assert bool(stats.converged)
    assert not bool(stats.diverged)
    assert 1 <= int(stats.num_iters) <= 2
    reference = trapezoid_linear_reference(A, y0, ts)
    scale = np.max(np.abs(reference))
    np.testing.assert_allclose(ys, reference, rtol=0, atol=1e-11 * scale)
    assert stages is None
    np.testing.assert_array_equal(ys[0], y0)


def test_trapezoid_residual_zero_at_discrete_solution():
    A, y0 = linear_problem(n=4, seed=2)
    ts = np.linspace(0.0, 2.0, 201)
    reference = trapezoid_linear_reference(A, y0, ts)
    residual, _ = jax.jit(Trapezoid().residual, static_argnums=0)(
        linear_field, jnp.asarray(ts), jnp.asarray(reference), None, jnp.asarray(A)
    )
    assert residual.shape == (200, 4)
    scale = np.max(np.abs(reference))
    assert float(jnp.max(jnp.abs(residual))) < 1e-13 * scale
    # ...and not zero elsewhere: the exact flow misses the trapezoid rule by O(h^3).
    perturbed = jnp.asarray(reference).at[100].add(1e-3)
    residual, _ = jax.jit(Trapezoid().residual, static_argnums=0)(
        linear_field, jnp.asarray(ts), perturbed, None, jnp.asarray(A)
    )
    assert float(jnp.max(jnp.abs(residual))) > 1e-4


def test_trapezoid_linearise_matches_residual_derivative():
    # The Newton recurrence delta_{i+1} = A_i delta_i + b_i must be the linearisation
    # of the residual: for delta built from the recurrence with offsets b, the
    # directional derivative of r at ys along delta is M_i b_i: solving the
    # linearisation with that right-hand side recovers delta.
    num_steps = 50
    ts = jnp.linspace(0.0, 0.5, num_steps + 1)
    key_y, key_b, key_d = jax.random.split(jax.random.key(4), 3)
    ys = 5.0 * jax.random.normal(key_y, (num_steps + 1, 3), jnp.float64)
    offsets = jax.random.normal(key_b, (num_steps, 3), jnp.float64)
    delta0 = jax.random.normal(key_d, (3,), jnp.float64)

    def residual(ys):
        return Trapezoid().residual(lorenz, ts, ys, None, None)[0]

    @jax.jit
    def recovered(ys, offsets, delta0):
        _, linearisation = Trapezoid().linearise(lorenz, ts, ys, None, None)
        delta = solve_affine_recurrence(linearisation.transitions, offsets, delta0)
        _, directional = jax.jvp(residual, (ys,), (delta,))
        return delta, linearisation.solve((directional, None), delta0)[0]

    delta, solved = recovered(ys, offsets, delta0)
    np.testing.assert_allclose(solved, delta, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# Hermite interpolation
# --------------------------------------------------------------------------------------


def test_hermite_reproduces_cubics():
    coefficients = np.array([0.7, -1.3, 0.4, 2.1])  # c0 + c1 t + c2 t^2 + c3 t^3

    def cubic(t):
        return np.polyval(coefficients[::-1], t)

    def cubic_derivative(t):
        return np.polyval(np.polyder(coefficients[::-1]), t)

    t0, spacing, num_intervals = -0.8, 0.37, 9
    nodes = t0 + spacing * np.arange(num_intervals + 1)
    # Two components (a different cubic in each) to exercise the trailing axes.
    values = jnp.asarray(np.stack([cubic(nodes), -2 * cubic(nodes)], axis=-1))
    derivatives = jnp.asarray(
        np.stack([cubic_derivative(nodes), -2 * cubic_derivative(nodes)], axis=-1)
    )
    # Between nodes, at nodes, at both ends, and slightly outside (extrapolation of
    # the first/last cubic, which is the same cubic).
    positions = np.concatenate(
        [
            np.random.default_rng(0).uniform(0, num_intervals, size=50),
            np.arange(num_intervals + 1),
            [-0.3, num_intervals + 0.4],
        ]
    )
    interpolate = jax.vmap(hermite_on_uniform_grid, in_axes=(None, None, 0, None))
    result = jax.jit(interpolate)(
        values, derivatives, jnp.asarray(positions), jnp.asarray(spacing)
    )
    times = t0 + spacing * positions
    expected = np.stack([cubic(times), -2 * cubic(times)], axis=-1)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


def test_quintic_hermite_reproduces_quintics():
    # c0 + c1 t + ... + c5 t^5, with values, first and second derivatives at nodes.
    polynomial = np.array([0.7, -1.3, 0.4, 2.1, -0.6, 0.25])[::-1]
    first = np.polyder(polynomial)
    second = np.polyder(polynomial, 2)
    t0, spacing, num_intervals = -0.8, 0.37, 9
    nodes = t0 + spacing * np.arange(num_intervals + 1)

    def at(coefficients, t):
        # Two components (a different quintic in each) for the trailing axes.
        value = np.polyval(coefficients, t)
        return jnp.asarray(np.stack([value, -2 * value], axis=-1))

    positions = np.concatenate(
        [
            np.random.default_rng(1).uniform(0, num_intervals, size=50),
            np.arange(num_intervals + 1),
            [-0.3, num_intervals + 0.4],
        ]
    )
    interpolate = jax.vmap(
        quintic_hermite_on_uniform_grid, in_axes=(None, None, None, 0, None)
    )
    result = jax.jit(interpolate)(
        at(polynomial, nodes),
        at(first, nodes),
        at(second, nodes),
        jnp.asarray(positions),
        jnp.asarray(spacing),
    )
    expected = at(polynomial, t0 + spacing * positions)
    np.testing.assert_allclose(result, expected, rtol=1e-11, atol=1e-11)
