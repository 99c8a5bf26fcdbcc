"""The Levenberg-Marquardt-damped recurrence solve (parallel Kalman smoother)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffrax_deer._core.damped_scan import (
    _filter_combine,
    _filter_combine_diagonal,
    _lifted_associative_scan,
    _rows,
    solve_damped_recurrence,
)
from diffrax_deer._core.scan import _compose_diagonal, solve_affine_recurrence


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # hypothesis is optional here
    given = None


DAMPINGS = (0.0, 1e-3, 1.0, 1e3)

# Compiling the scan takes seconds (it unrolls log2 N levels), so the tests share a
# few shapes: one jitted function, every damping of a problem in one vmapped call.
solve_each_damping = jax.jit(jax.vmap(solve_damped_recurrence, in_axes=(None, None, 0)))
solve_batch = jax.jit(jax.vmap(solve_each_damping, in_axes=(0, 0, None)))


def dense_transitions(transitions):
    """(N, n) diagonals -> (N, n, n) matrices; dense input is returned as it is."""
    transitions = np.asarray(transitions)
    if transitions.ndim == 3:
        return transitions
    num_steps, n = transitions.shape
    dense = np.zeros((num_steps, n, n))
    dense[:, np.arange(n), np.arange(n)] = transitions
    return dense


def normal_equations_solution(transitions, offsets, damping):
    """The minimiser, from the dense normal equations (L^T L + lambda I) d = L^T c.

    The residuals r_i = d_{i+1} - A_i d_i - b_i are r = L d - c for the unknowns
    d = (d_1, ..., d_N): L is block lower-bidiagonal with I on the diagonal and -A_i
    below it (A_0 d_0 drops out as d_0 = 0), and c = (b_0, ..., b_{N-1}).
    """
    A = dense_transitions(transitions)
    b = np.asarray(offsets, dtype=np.float64)
    N, n = b.shape
    L = np.eye(N * n)
    for i in range(1, N):
        L[i * n : (i + 1) * n, (i - 1) * n : i * n] = -A[i]
    hessian = L.T @ L + damping * np.eye(N * n)
    d = np.linalg.solve(hessian, L.T @ b.reshape(-1))
    return np.concatenate([np.zeros(n), d]).reshape(N + 1, n)


def random_problem(num_steps, n, diagonal, seed):
    rng = np.random.default_rng(seed)
    if diagonal:
        transitions = rng.uniform(-1.2, 1.2, size=(num_steps, n))
    else:
        transitions = rng.normal(size=(num_steps, n, n)) / np.sqrt(n)
    return transitions, rng.normal(size=(num_steps, n))


def embed(transitions, offsets, num_steps, n):
    """The problem padded to `num_steps` steps and `n` components, with zeros.

    The padding decouples: a zero transition after step N cuts d_{N+1}, ... off from
    d_N, and zero rows and columns of A_i cut the extra components off, and all of
    them are zero at the minimum. So the padded minimiser restricted to the original
    steps and components is the original one, and one compiled shape tests many.
    """
    steps, size = offsets.shape
    padded_offsets = np.zeros((num_steps, n))
    padded_offsets[:steps, :size] = offsets
    if transitions.ndim == 2:
        padded = np.zeros((num_steps, n))
        padded[:steps, :size] = transitions
    else:
        padded = np.zeros((num_steps, n, n))
        padded[:steps, :size, :size] = transitions
    return padded, padded_offsets


def relative_error(result, reference):
    reference = np.asarray(reference)
    scale = max(np.max(np.abs(reference)), 1e-300)
    return np.max(np.abs(np.asarray(result) - reference)) / scale


# --------------------------------------------------------------------------------------
# Exactness in float64
# --------------------------------------------------------------------------------------


SHAPES = [(num_steps, n) for num_steps in (1, 2, 7, 33) for n in (1, 3)]
BATCH = len(SHAPES) + 4


def solve_embedded(problems, dampings):
    """Solve `BATCH` problems, embedded in N = 33, n = 3, for 4 dampings at once.

    Always the same shapes, so one compilation per representation serves every test
    that uses this. Checks each against the normal equations; returns the padded
    solutions, shape (BATCH, 4, 34, 3).
    """
    assert len(problems) == BATCH and len(dampings) == len(DAMPINGS)
    padded = [embed(*problem, 33, 3) for problem in problems]
    transitions = np.stack([t for t, _ in padded])
    offsets = np.stack([b for _, b in padded])
    results = np.asarray(solve_batch(transitions, offsets, jnp.asarray(dampings)))
    assert np.all(np.isfinite(results))
    for (A, b), result in zip(problems, results, strict=True):
        N, n = b.shape
        for damping, d in zip(dampings, result, strict=True):
            reference = normal_equations_solution(A, b, damping)
            assert relative_error(d[: N + 1, :n], reference) < 1e-10, (N, n, damping)
            assert np.all(d[N + 1 :] == 0) and np.all(d[:, n:] == 0)
    return transitions, offsets, results


@pytest.mark.slow
@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
def test_matches_normal_equations_and_the_recurrence(diagonal):
    # Every (N, n) of SHAPES and four full-size random problems, in one vmapped call.
    problems = [random_problem(N, n, diagonal, seed=N + n) for N, n in SHAPES]
    problems += [random_problem(33, 3, diagonal, seed=seed) for seed in range(4)]
    transitions, offsets, results = solve_embedded(problems, DAMPINGS)

    # lambda = 0 is the plain recurrence solution.
    plain = jax.jit(jax.vmap(solve_affine_recurrence, in_axes=(0, 0, None)))(
        jnp.asarray(np.stack([dense_transitions(t) for t in transitions])),
        offsets,
        jnp.zeros(3),
    )
    for k in range(BATCH):
        assert relative_error(results[k, 0], plain[k]) < 1e-13


@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
@pytest.mark.parametrize("num_steps", [0, 1, 2])
def test_shortest_sequences_unpadded(num_steps, diagonal):
    # A scan of one element, and none, at their own shapes.
    transitions, offsets = random_problem(num_steps, 2, diagonal, seed=num_steps)
    results = solve_each_damping(transitions, offsets, jnp.asarray(DAMPINGS))
    assert results.shape == (len(DAMPINGS), num_steps + 1, 2)
    for damping, result in zip(DAMPINGS, results, strict=True):
        reference = normal_equations_solution(transitions, offsets, damping)
        np.testing.assert_allclose(result, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reverse", [False, True])
def test_lifted_scan_is_associative_scan(reverse):
    # The hand-written first level (odd and even lengths, empty halves) against
    # jax.lax.associative_scan, on affine maps. The lift shifts its rows, as the
    # smoother's does, so row slicing is checked too.
    rng = np.random.default_rng(5)
    E, g = jnp.asarray(rng.normal(size=(2, 9, 2)))
    combine = _compose_diagonal

    def lift(rows):
        return _rows(E, rows, shift=1), _rows(g, rows)

    @functools.partial(jax.jit, static_argnums=0)
    def both(num):
        want = jax.lax.associative_scan(combine, lift(range(num)), reverse=reverse)
        return want, _lifted_associative_scan(combine, lift, num, reverse=reverse)

    for num in (0, 1, 2, 3, 4, 7, 8):
        want, got = both(num)
        for x, y in zip(got, want, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-13, err_msg=f"num={num}")


def test_diagonal_combine_is_the_dense_one():
    # The elementwise filter combine (used for memory) against the generic algebra.
    rng = np.random.default_rng(3)

    def element():
        A, b, eta = rng.normal(size=(3, 5, 4))
        C, J = rng.uniform(0, 3, size=(2, 5, 4))
        return A, b, C, eta, J

    earlier, later = element(), element()
    for got, want in zip(
        _filter_combine_diagonal(earlier, later),
        _filter_combine(True, earlier, later),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-13)


# --------------------------------------------------------------------------------------
# Long sequences in float32
# --------------------------------------------------------------------------------------


def banded_solution(transitions, offsets, damping):
    """The minimiser for diagonal A_i in float64, per component a tridiagonal solve."""
    a, b = np.asarray(transitions, np.float64), np.asarray(offsets, np.float64)
    N, n = b.shape
    d = np.zeros((N + 1, n))
    for k in range(n):
        # Row i (unknown d_{i+1}) of L^T L + lambda I: diagonal 1 + lambda + a_{i+1}^2,
        # off-diagonal -a_{i+1}; right-hand side b_i - a_{i+1} b_{i+1}.
        a_next = np.append(a[1:, k], 0.0)
        b_next = np.append(b[1:, k], 0.0)
        bands = np.zeros((3, N))
        bands[0, 1:] = -a_next[:-1]
        bands[1] = 1 + damping + a_next**2
        bands[2, :-1] = -a_next[:-1]
        d[1:, k] = scipy.linalg.solve_banded((1, 1), bands, b[:, k] - a_next * b_next)
    return d


@pytest.mark.slow
def test_float32_long_sequence_is_stable():
    # N = 1e4 in float32, diagonal (one compilation: the long scan takes long to
    # compile). Each component is its own scalar problem, so the three columns are
    # three regimes: contractive, |a| near 1, and mildly expansive (growth ~ e^2.5).
    num_steps = 10_000
    rng = np.random.default_rng(11)
    transitions = np.stack(
        [
            rng.uniform(-0.99, 0.99, num_steps),
            rng.uniform(0.95, 1.0, num_steps),
            rng.uniform(0.999, 1.0005, num_steps),
        ],
        axis=1,
    )
    offsets = rng.normal(size=(num_steps, 3))
    dampings = np.array([0.0, 1e-3, 1.0, 1e6])
    single = np.asarray(
        solve_each_damping(
            transitions.astype(np.float32),
            offsets.astype(np.float32),
            dampings.astype(np.float32),
        )
    )
    assert single.dtype == np.float32
    assert np.all(np.isfinite(single))
    for damping, result in zip(dampings, single, strict=True):
        if damping == 0:
            reference = np.zeros((num_steps + 1, 3))
            for i in range(num_steps):
                reference[i + 1] = transitions[i] * reference[i] + offsets[i]
        else:
            reference = banded_solution(transitions, offsets, damping)
        for k in range(3):
            # float32 round-off, amplified by the conditioning: observed <= 1e-5.
            error = relative_error(result[:, k], reference[:, k])
            assert error < 1e-4, (damping, k, error)


# --------------------------------------------------------------------------------------
# Property: more damping, shorter step (ridge regression)
# --------------------------------------------------------------------------------------


if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(
        seed=st.integers(0, 2**32 - 1),
        diagonal=st.booleans(),
        norm=st.floats(0.1, 1.0),
        dampings=st.lists(st.floats(0.0, 1e4), min_size=4, max_size=4),
    )
    def test_more_damping_shorter_step(seed, diagonal, norm, dampings):
        # Random shapes and dampings: the normal-equations minimiser (checked inside
        # solve_embedded), whose length decreases and whose residual grows with
        # lambda (ridge regression). ||A_i|| = norm <= 1 keeps the normal equations
        # (the reference) well conditioned at lambda = 0.
        rng = np.random.default_rng(seed)
        problems = []
        for k in range(BATCH):
            N, n = int(rng.integers(1, 34)), int(rng.integers(1, 4))
            transitions, offsets = random_problem(N, n, diagonal, seed + k)
            norms = np.linalg.norm(dense_transitions(transitions), ord=2, axis=(1, 2))
            scale = norm / norms.reshape((-1,) + (1,) * (transitions.ndim - 1))
            problems.append((transitions * scale, offsets))
        dampings = np.sort(dampings)
        _, _, results = solve_embedded(problems, dampings)
        for (transitions, offsets), result in zip(problems, results, strict=True):
            N, n = offsets.shape
            ds = [d[: N + 1, :n] for d in result]
            lengths = np.array([np.linalg.norm(d) for d in ds])
            residuals = np.array([_residual_norm(transitions, offsets, d) for d in ds])
            assert np.all(np.diff(lengths) <= 1e-9 * lengths[0] + 1e-12)
            assert np.all(np.diff(residuals) >= -1e-9 * residuals[-1] - 1e-12)

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_more_damping_shorter_step():
        pass


def _residual_norm(transitions, offsets, d):
    A = dense_transitions(transitions)
    predicted = np.einsum("nij,nj->ni", A, d[:-1]) + offsets
    return np.linalg.norm(d[1:] - predicted)
