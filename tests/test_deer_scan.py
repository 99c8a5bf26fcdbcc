"""`deer_scan` against `jax.lax.scan`: outputs, gradients, cells, transformations."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer import DeerScanStats, deer_scan


N = 200  # sequence length
INPUTS, HIDDEN = 3, 4
# The floors against `lax.scan`: outputs (absolute), gradients (relative).
OUTPUT_FLOOR = {jnp.float64: 1e-12, jnp.float32: 1e-5}
GRADIENT_FLOOR = {jnp.float64: 1e-10, jnp.float32: 1e-4}


@pytest.fixture(autouse=True)
def strict_promotion():
    # diffrax's test settings: no implicit dtype or rank promotion.
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


def cast(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree
    )


def gru(dtype=jnp.float64, hidden=HIDDEN):
    # Built in float64 from one key and cast, so both dtypes have the same weights.
    return cast(eqx.nn.GRUCell(INPUTS, hidden, key=jax.random.key(0)), dtype)


def inputs(dtype=jnp.float64, length=N, batch=()):
    shape = (*batch, length, INPUTS)
    return jax.random.normal(jax.random.key(1), shape, jnp.float64).astype(dtype)


def gru_step(cell, h, x):
    h = cell(x, h)
    return h, 2 * h  # an output that is not the carry


@eqx.filter_jit
def run(scan, cell, init, xs, **options):
    return scan(lambda h, x: gru_step(cell, h, x), init, xs, **options)


@eqx.filter_jit
def gradients(scan, cell, init, xs):
    def loss(cell, init, xs):
        final, ys = scan(lambda h, x: gru_step(cell, h, x), init, xs)
        return jnp.sum(ys**2) + jnp.sum(jnp.sin(final))

    return jax.grad(loss, argnums=(0, 1, 2))(cell, init, xs)


def max_difference(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def max_relative_difference(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------------------------
# GRU: values and gradients at the floors
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_gru_matches_lax_scan(dtype):
    cell, xs, init = gru(dtype), inputs(dtype), jnp.zeros(HIDDEN, dtype)
    final, ys, stats = run(deer_scan, cell, init, xs, return_stats=True)
    final_ref, ys_ref = run(jax.lax.scan, cell, init, xs)
    assert ys.dtype == dtype and ys.shape == (N, HIDDEN)
    assert isinstance(stats, DeerScanStats) and bool(stats.newton.converged)
    # Measured: 4e-16 (float64, 5 iterations), 2.4e-7 (float32, 4 iterations).
    assert max_difference((final, ys), (final_ref, ys_ref)) < OUTPUT_FLOOR[dtype]
    assert 1 <= int(stats.newton.num_iters) <= 10
    # The carries returned for warm starts are the sequence lax.scan steps through.
    assert max_difference(stats.carries, ys_ref / 2) < OUTPUT_FLOOR[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_gru_gradients_match_lax_scan(dtype):
    # With respect to the cell's weights, `init` and `xs`; measured 8e-16 (float64)
    # and 6e-7 (float32) relative.
    cell, xs = gru(dtype), inputs(dtype)
    init = 0.1 * jnp.ones(HIDDEN, dtype)
    grads = gradients(deer_scan, cell, init, xs)
    grads_ref = gradients(jax.lax.scan, cell, init, xs)
    assert max_relative_difference(grads, grads_ref) < GRADIENT_FLOOR[dtype]


# --------------------------------------------------------------------------------------
# Other cells: LSTM (tuple carry), a custom cell with PyTree carry, inputs, outputs
# --------------------------------------------------------------------------------------


def lstm_step(cell, carry, x):
    h, c = cell(x, carry)
    return (h, c), h


@pytest.mark.slow
def test_lstm_tuple_carry_values_and_gradients():
    cell = eqx.nn.LSTMCell(INPUTS, HIDDEN, key=jax.random.key(2))
    xs = inputs()
    init = (jnp.zeros(HIDDEN), 0.1 * jnp.ones(HIDDEN))

    def loss(scan, cell, init, xs):
        (h, c), ys = scan(lambda carry, x: lstm_step(cell, carry, x), init, xs)
        return jnp.sum(ys**2) + jnp.sum(h * c), (h, c, ys)

    @eqx.filter_jit
    def value_and_grad(scan, cell, init, xs):
        return jax.value_and_grad(
            lambda *a: loss(scan, *a), argnums=(0, 1, 2), has_aux=True
        )(cell, init, xs)

    (_, outputs), grads = value_and_grad(deer_scan, cell, init, xs)
    (_, outputs_ref), grads_ref = value_and_grad(jax.lax.scan, cell, init, xs)
    assert max_difference(outputs, outputs_ref) < 1e-12
    assert max_relative_difference(grads, grads_ref) < 1e-10


class LeakyCell(eqx.Module):
    """A user's own cell: a dict carry (a vector and a scalar), inputs a tuple of an
    integer token and a dict, outputs a tuple."""

    embedding: jax.Array
    weight: jax.Array
    leak: jax.Array

    def __call__(self, carry, x):
        token, extra = x
        drive = self.embedding[token] + extra["signal"] * self.weight @ carry["state"]
        state = (1 - self.leak) * carry["state"] + self.leak * jnp.tanh(drive)
        energy = 0.9 * carry["energy"] + jnp.sum(state**2)
        return {"state": state, "energy": energy}, (state[0], energy)


@pytest.mark.slow
def test_custom_cell_with_pytree_carry_and_inputs():
    keys = jax.random.split(jax.random.key(3), 3)
    cell = LeakyCell(
        embedding=jax.random.normal(keys[0], (5, 3)),
        weight=jax.random.normal(keys[1], (3, 3)),
        leak=jnp.array(0.5),
    )
    tokens = jax.random.randint(keys[2], (N,), 0, 5)
    xs = (tokens, {"signal": jnp.linspace(0.0, 1.0, N)})
    init = {"state": jnp.zeros(3), "energy": jnp.array(0.0)}

    def loss(scan, cell, init, signal):
        # (A lambda: lax.scan hashes `f`, which a Module holding tracers is not.)
        xs = (tokens, {"signal": signal})
        final, (first, energy) = scan(lambda carry, x: cell(carry, x), init, xs)
        return jnp.sum(first * energy) + final["energy"], (final, first, energy)

    grad = eqx.filter_jit(
        lambda scan, *a: jax.grad(lambda *b: loss(scan, *b), (0, 1, 2), has_aux=True)(
            *a
        )
    )
    grads, outputs = grad(deer_scan, cell, init, xs[1]["signal"])
    grads_ref, outputs_ref = grad(jax.lax.scan, cell, init, xs[1]["signal"])
    assert max_difference(outputs, outputs_ref) < 1e-12
    assert max_relative_difference(grads, grads_ref) < 1e-10


# --------------------------------------------------------------------------------------
# Transformations and lax.scan's options
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vmap_over_a_batch_and_jvp():
    cell, xs = gru(), inputs(batch=(3,))
    init = 0.1 * jax.random.normal(jax.random.key(4), (3, HIDDEN))

    @eqx.filter_jit
    def batched(scan, cell, init, xs):
        return jax.vmap(lambda h, x: run(scan, cell, h, x))(init, xs)

    assert (
        max_difference(
            batched(deer_scan, cell, init, xs), batched(jax.lax.scan, cell, init, xs)
        )
        < 1e-12
    )

    # Forward mode along a direction in the weights, `init` and `xs` together.
    tangents = jax.tree.map(jnp.ones_like, (cell, init[0], xs[0]))

    @eqx.filter_jit
    def forward(scan):
        return jax.jvp(lambda *a: run(scan, *a), (cell, init[0], xs[0]), tangents)

    assert max_difference(forward(deer_scan), forward(jax.lax.scan)) < 1e-11


@pytest.mark.slow
def test_reverse_and_no_xs():
    cell, xs, init = gru(), inputs(), jnp.zeros(HIDDEN)
    reversed_outputs = run(deer_scan, cell, init, xs, reverse=True)
    assert (
        max_difference(
            reversed_outputs, run(jax.lax.scan, cell, init, xs, reverse=True)
        )
        < 1e-12
    )

    # xs=None with length: an autonomous recurrence.
    def step(h, _):
        h = jnp.tanh(jnp.array([[0.5, -1.0], [1.0, 0.5]]) @ h + 0.1)
        return h, jnp.sum(h)

    init2 = jnp.array([1.0, -1.0])
    outputs = deer_scan(step, init2, length=50)
    assert max_difference(outputs, jax.lax.scan(step, init2, length=50)) < 1e-12
    # No steps: `init` and empty outputs, as lax.scan.
    final, ys = deer_scan(step, init2, length=0)
    assert np.array_equal(final, init2) and ys.shape == (0,)


def test_warm_start_from_the_previous_carries():
    cell, xs, init = gru(), inputs(), jnp.zeros(HIDDEN)
    _, ys, stats = run(deer_scan, cell, init, xs, return_stats=True)
    # Nearby weights, as in the next training step: a warm start from the previous
    # carries takes fewer iterations than the cold start, to the same answer.
    nudged = jax.tree.map(lambda w: w * 1.001 if eqx.is_inexact_array(w) else w, cell)
    _, ys_cold, cold = run(deer_scan, nudged, init, xs, return_stats=True)
    _, ys_warm, warm = run(
        deer_scan, nudged, init, xs, return_stats=True, guess=stats.carries
    )
    assert int(warm.newton.num_iters) < int(cold.newton.num_iters)
    assert max_difference(ys_warm, ys_cold) < 1e-12
    # At the same weights the guess is the answer: one iteration confirms it.
    _, _, same = run(deer_scan, cell, init, xs, return_stats=True, guess=stats.carries)
    assert int(same.newton.num_iters) == 1


@pytest.mark.slow
def test_diagonal_jacobian_reaches_the_same_sequence():
    cell, xs, init = gru(hidden=8), inputs(), jnp.zeros(8)
    ys_ref = run(jax.lax.scan, cell, init, xs)[1]
    _, _, full = run(deer_scan, cell, init, xs, return_stats=True)
    _, ys_diagonal, diagonal = run(
        deer_scan, cell, init, xs, jacobian="diagonal", return_stats=True
    )
    # quasi-DEER converges linearly, so more iterations, to the same sequence (its
    # last update is within 1e-10; the error left is about that). Its derivatives
    # are exact: the window's tangent rule, tested in test_newton.py, uses the full
    # Jacobians.
    assert int(diagonal.newton.num_iters) > int(full.newton.num_iters)
    assert max_difference(ys_diagonal, ys_ref) < 1e-9


@pytest.mark.slow
def test_damping_is_not_used_where_plain_deer_converges():
    # Damping is a rescue from overflow: where plain DEER converges, the same
    # iterations and the same sequence.
    cell, xs, init = gru(), inputs(), jnp.zeros(HIDDEN)
    _, ys_full, full = run(deer_scan, cell, init, xs, return_stats=True)
    _, ys_damped, damped = run(
        deer_scan, cell, init, xs, damping=True, return_stats=True
    )
    assert int(damped.newton.num_iters) == int(full.newton.num_iters)
    assert max_difference(ys_damped, ys_full) == 0


# --------------------------------------------------------------------------------------
# Non-convergence is never silent; bad input fails at trace time
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_non_convergence_raises_unless_asked_for_the_status():
    cell, xs, init = gru(), inputs(), jnp.zeros(HIDDEN)
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_iters"):
        run(deer_scan, cell, init, xs, max_iters=2)
    _, ys, stats = run(
        deer_scan, cell, init, xs, max_iters=2, throw=False, return_stats=True
    )
    assert not bool(stats.newton.converged) and int(stats.newton.num_iters) == 2
    assert bool(jnp.all(jnp.isfinite(ys)))
    with pytest.raises(ValueError, match="return_stats=True"):
        deer_scan(lambda h, x: gru_step(cell, h, x), init, xs, throw=False)


def test_divergence_names_damping():
    # The chaotic logistic map: DEER's scan over N steps of |A_i| up to 3.9 overflows.
    def logistic(h, x):
        h = 3.9 * h * (1 - h) + x
        return h, h

    xs = 0.01 * jax.random.normal(jax.random.key(5), (N, 1))
    with pytest.raises(eqx.EquinoxRuntimeError, match="diverged.*damping=True"):
        eqx.filter_jit(lambda xs: deer_scan(logistic, jnp.array([0.3]), xs))(xs)


def test_bad_input_fails_at_trace_time():
    cell, xs, init = gru(), inputs(), jnp.zeros(HIDDEN)
    with pytest.raises(TypeError, match="same structure, shapes and dtypes"):
        deer_scan(lambda h, x: (h[:2], h), init, xs)
    with pytest.raises(ValueError, match="real floating"):
        deer_scan(lambda h, x: (h, h), jnp.zeros(2, jnp.int32), xs)
    with pytest.raises(ValueError, match="`xs` with a leading axis, or `length`"):
        deer_scan(lambda h, x: (h, h), init)
    with pytest.raises(ValueError, match="different leading axis sizes"):
        deer_scan(lambda h, x: (h, h), init, (xs, xs[:3]))
    with pytest.raises(ValueError, match="`jacobian`"):
        deer_scan(lambda h, x: gru_step(cell, h, x), init, xs, jacobian="dense")
    with pytest.raises(ValueError, match="guess"):
        deer_scan(lambda h, x: gru_step(cell, h, x), init, xs, guess=xs)
