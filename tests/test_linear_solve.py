"""The per-interval inverses: elementwise closed forms and elimination for small
blocks, lineax LU for larger ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer._core.linear_solve import (
    MAX_ELEMENTWISE_SIZE,
    BatchedLinearSolve,
    batched_inverse,
)


def random_blocks(size, num_blocks=64, seed=0):
    """Blocks I - h J with random J of norm ~1 and h up to 4 (so far from the
    identity), and blocks with a zero diagonal that need row exchanges."""
    rng = np.random.default_rng(seed + size)
    jacobians = rng.normal(size=(num_blocks, size, size)) / np.sqrt(size)
    steps = rng.uniform(0.0, 4.0, size=(num_blocks, 1, 1))
    blocks = np.eye(size) - steps * jacobians
    if size == 1:
        return blocks
    permuted = rng.normal(size=(8, size, size))
    permuted[:, np.arange(size), np.arange(size)] = 0.0
    return np.concatenate([blocks, permuted])


# Eager: each size would otherwise be a compilation of its own (seconds for the
# unrolled elimination), and the blocks are few.
_inverse = batched_inverse


# Sizes 5-7 take the same code path as 4 and 8 (slow: each size compiles its own).
_SLOW_SIZES = (5, 6, 7)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(size, marks=[pytest.mark.slow] if size in _SLOW_SIZES else [])
        for size in (*range(1, MAX_ELEMENTWISE_SIZE + 1), 12, 20)
    ],
)
def test_batched_inverse_solves_like_numpy(size):
    blocks = random_blocks(size)
    rhs = np.random.default_rng(1).normal(size=blocks.shape[:2])
    expected = np.linalg.solve(blocks, rhs[..., None])[..., 0]
    solved = np.asarray(BatchedLinearSolve(jnp.asarray(blocks)).solve(jnp.asarray(rhs)))
    # Round-off only: the error bound of a backward-stable solve, cond(M) * eps,
    # with a factor 20 for the explicit inverse (measured at most 4).
    conditions = np.linalg.cond(blocks)[:, None]
    scale = np.max(np.abs(expected), axis=1, keepdims=True)
    bound = 20 * conditions * np.finfo(np.float64).eps * scale
    assert np.all(np.abs(solved - expected) <= bound)


def test_batched_inverse_float32_and_singular():
    blocks = jnp.asarray(random_blocks(3, num_blocks=4), jnp.float32)
    inverse = _inverse(blocks)
    assert inverse.dtype == jnp.float32
    identity = np.eye(3, dtype=np.float32)
    products = np.asarray(inverse) @ np.asarray(blocks)
    np.testing.assert_allclose(
        products, np.broadcast_to(identity, products.shape), atol=1e-4
    )
    # A singular block is reported as non-finite (Newton's failed step), not as a
    # finite wrong answer.
    singular = jnp.asarray([[[1.0, 2.0], [2.0, 4.0]]])
    assert not np.all(np.isfinite(np.asarray(_inverse(singular))))


@pytest.mark.parametrize("size", [2, MAX_ELEMENTWISE_SIZE, 9, 16])
def test_cpu_inverses_call_no_lapack(size):
    # No LAPACK (custom call) per linearisation on CPU, at any block size: two
    # batched LUs running at once deadlocked XLA:CPU on 2 cores (a 10x10 linear
    # problem, N = 2560, with the nested predictor or the error estimate).
    blocks = jnp.zeros((10, size, size))
    text = jax.jit(batched_inverse).lower(blocks).as_text()
    assert "custom_call" not in text
