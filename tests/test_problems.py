"""The registry of problems (`diffrax_deer._bench.problems`): definitions and
references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer._bench.problems import PROBLEM_NAMES, get_problem


@pytest.mark.slow
def test_every_field_keeps_its_dtype_under_strict_promotion():
    # Traced only (`eval_shape`): promotion errors are raised at trace time.
    for name in PROBLEM_NAMES:
        problem = get_problem(name)
        for dtype in (jnp.float32, jnp.float64):
            field = problem.field(dtype)
            t0, y0 = jnp.asarray(problem.t0, dtype), problem.y0_array(dtype)
            with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
                dy = jax.eval_shape(lambda t, y, f=field: f(t, y, None), t0, y0)
            assert dy.dtype == dtype and dy.shape == y0.shape, name


def test_float32_weights_are_the_float64_weights_rounded():
    # One set of weights for every dtype: jax.random would draw other numbers for
    # another dtype, and no float64 reference would fit the float32 problem.
    mlp = get_problem("mlp")
    rounded = mlp.field(jnp.float64, weights_dtype=jnp.float32)
    single = mlp.field(jnp.float32)
    leaves = [
        jax.tree.leaves(eqx.filter(field, eqx.is_inexact_array))
        for field in (rounded, single)
    ]
    assert leaves[0]
    for a, b in zip(*leaves, strict=True):
        assert a.dtype == jnp.float64 and b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float64))


def test_unknown_problem_names_the_choices():
    with pytest.raises(ValueError, match="choose from linear, lotka-volterra"):
        get_problem("lorentz")


# The tight references against the published values at the end of each interval,
# relative to each component (Arenstorf: absolute, as two components of y0 are 0).
# Measured: HIRES 2.0e-10 (Kvaerno5, rtol = atol = 1e-12), OREGO 1.7e-10 (1e-11),
# ROBER 3.1e-10 (rtol 1e-10, atol 1e-20), Arenstorf 1.9e-9 (Tsit5, 1e-12).
PUBLISHED_TOLERANCES = {
    "hires": 1e-9,
    "orego": 1e-9,
    "robertson": 1e-9,
    "arenstorf": 1e-8,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PUBLISHED_TOLERANCES))
def test_tight_reference_reproduces_the_published_values(name):
    problem = get_problem(name)
    assert problem.published.t == problem.t1
    ys = problem.reference(np.array([problem.t0, problem.t1]))
    published = np.asarray(problem.published.y)
    error = np.abs(ys[-1] - published)
    if name != "arenstorf":
        error = error / np.abs(published)
    assert np.max(error) < PUBLISHED_TOLERANCES[name], error
