"""DeerSolver holds to diffrax's own conventions: its test settings (strict dtype and
rank promotion), empty states, the terms it accepts, and every floating dtype.

The suite runs under diffrax's settings (conftest.py), so every test is also a check
of strict promotion; the first test makes sure they stay set.
"""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import NATIVE_METHODS
from diffrax_deer import DeerAdjoint, DeerSolver, GaussLegendre


jax.config.update("jax_enable_x64", True)

METHODS = NATIVE_METHODS | {"tsit5": diffrax.Tsit5()}
ADJOINTS = {"default": diffrax.RecursiveCheckpointAdjoint(), "deer": DeerAdjoint()}


def test_suite_runs_under_diffrax_test_settings():
    assert jax.config.jax_numpy_rank_promotion == "raise"
    assert jax.config.jax_numpy_dtype_promotion == "strict"


# ------------------------------------------------------------------------------------
# Empty states: y0=None or only zero-size leaves, as every diffrax solver takes them
# ------------------------------------------------------------------------------------


def negate(t, y, args):
    return jax.tree.map(jnp.negative, y)


EMPTY_STATES = {
    "none": lambda dtype: None,
    "zero-size": lambda dtype: {
        "a": jnp.zeros((0,), dtype),
        "b": jnp.zeros((3, 0), dtype),
    },
}


def empty_solve(solver, y0, dtype, adjoint=ADJOINTS["default"]):
    t0, t1 = jnp.asarray(0.0, dtype), jnp.asarray(1.0, dtype)
    saveat = diffrax.SaveAt(t0=True, ts=jnp.linspace(t0, t1, 5), dense=True)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(negate),
        solver,
        t0,
        t1,
        (t1 - t0) / 2,
        y0,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=4,
    )
    return sol.result, sol.ts, sol.ys, sol.evaluate(jnp.asarray(0.3, dtype))


@functools.cache
def tsit5_empty(state, dtype):
    return empty_solve(diffrax.Tsit5(), EMPTY_STATES[state](dtype), dtype)


def shapes_and_dtypes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("state", EMPTY_STATES)
def test_empty_state_matches_tsit5(state, method, adjoint):
    dtype = jnp.float64
    solver = DeerSolver(num_steps=4, method=METHODS[method])
    result, ts, ys, value = empty_solve(
        solver, EMPTY_STATES[state](dtype), dtype, ADJOINTS[adjoint]
    )
    expected_result, expected_ts, expected_ys, expected_value = tsit5_empty(
        state, dtype
    )
    assert result == diffrax.RESULTS.successful == expected_result
    np.testing.assert_array_equal(ts, expected_ts)
    assert shapes_and_dtypes(ys) == shapes_and_dtypes(expected_ys)
    assert shapes_and_dtypes(value) == shapes_and_dtypes(expected_value)


@pytest.mark.slow
def test_empty_float32_state_in_float32():
    # `y0=None` flattens to float32 whatever the time dtype; this once gave JAX's
    # "scatter inputs have incompatible types" FutureWarning (an error here, see
    # pyproject.toml) and a diverged Newton solve.
    for state in EMPTY_STATES:
        result, _, ys, _ = empty_solve(
            DeerSolver(4), EMPTY_STATES[state](jnp.float32), jnp.float32
        )
        assert result == diffrax.RESULTS.successful
        expected = tsit5_empty(state, jnp.float32)[2]
        assert shapes_and_dtypes(ys) == shapes_and_dtypes(expected)


# ------------------------------------------------------------------------------------
# Terms: any term whose control is time; clear refusals otherwise
# ------------------------------------------------------------------------------------


class PyTreeTerm(diffrax.AbstractTerm):
    """diffrax's test_everything_pytree term: vector field, control and product are
    all PyTrees of other structures than the state."""

    coeff: float

    def vf(self, t, y, args):
        return {"f": -self.coeff * y["y"]}

    def contr(self, t0, t1, **kwargs):
        return {"t": t1 - t0}

    def prod(self, vf, control):
        return {"y": vf["f"] * control["t"]}


@pytest.mark.slow
def test_multi_term_of_pytree_terms_as_diffrax_test_everything_pytree():
    # dy = -0.3 y dt - 0.7 y dt, so y(t) = y(t0) exp(-(t - t0)); solved forwards and
    # backwards in time.
    term = diffrax.MultiTerm(PyTreeTerm(0.3), PyTreeTerm(0.7))
    y0 = {"y": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    solver = DeerSolver(num_steps=8, method=GaussLegendre(stages=3))
    for t0, t1 in [(0.4, 0.9), (0.9, 0.4)]:
        ts = jnp.linspace(t0, t1, 23)
        sol = diffrax.diffeqsolve(
            term, solver, t0, t1, t1 - t0, y0, saveat=diffrax.SaveAt(ts=ts)
        )
        exact = (
            np.asarray(y0["y"])[None] * np.exp(-(np.asarray(ts) - t0))[:, None, None]
        )
        np.testing.assert_allclose(sol.ys["y"], exact, rtol=1e-10)


@pytest.mark.slow
def test_control_term_whose_control_is_time_is_an_ode():
    # A vector control (dt, dt, dt) against a 2 x 3 matrix field: y' = -y.
    term = diffrax.ControlTerm(
        lambda t, y, args: -jnp.outer(y, jnp.full((3,), 1 / 3)),
        lambda t0, t1: jnp.full((3,), t1 - t0),
    )
    y0 = jnp.array([1.0, 2.0])
    solver = DeerSolver(num_steps=8, method=GaussLegendre(stages=3))
    sol = diffrax.diffeqsolve(term, solver, 0.0, 1.0, 1.0, y0)
    np.testing.assert_allclose(sol.ys[-1], y0 * np.exp(-1.0), rtol=1e-10)


class SquaredTimeTerm(PyTreeTerm):
    def contr(self, t0, t1, **kwargs):
        return {"t": (t1 - t0) ** 2}


def data_path():
    ts = jnp.linspace(0.0, 1.0, 5)
    return diffrax.LinearInterpolation(ts=ts, ys=ts**2)


@pytest.mark.parametrize(
    "term",
    [
        diffrax.ControlTerm(lambda t, y, args: -y, data_path()),
        diffrax.MultiTerm(PyTreeTerm(0.3), SquaredTimeTerm(0.7)),
    ],
    ids=["data-path", "squared-time"],
)
def test_control_that_is_not_time_is_refused_with_the_remedy(term):
    y0 = {"y": jnp.ones(2)} if isinstance(term, diffrax.MultiTerm) else jnp.ones(2)
    with pytest.raises(ValueError, match=r"control of every term must be time.*to_ode"):
        jax.eval_shape(
            lambda: diffrax.diffeqsolve(term, DeerSolver(8), 0.0, 1.0, 1.0, y0)
        )


@pytest.mark.slow
def test_control_term_to_ode_is_solved():
    # The remedy the refusal names: dy = -y dx with x(t) piecewise linear through
    # t^2 at the quarter points, x(1) - x(0) = 1, so y(1) = exp(-1).
    term = diffrax.ControlTerm(lambda t, y, args: -y, data_path()).to_ode()
    solver = DeerSolver(num_steps=64, method=GaussLegendre(stages=3))
    sol = diffrax.diffeqsolve(term, solver, 0.0, 1.0, 1.0, jnp.array([1.0]))
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-10)


# ------------------------------------------------------------------------------------
# Every floating dtype, with every kind of method
# ------------------------------------------------------------------------------------


def van_der_pol(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


@functools.cache
def van_der_pol_solve(method, dtype):
    t0, t1 = jnp.asarray(0.0, dtype), jnp.asarray(2.0, dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol),
        DeerSolver(num_steps=32, method=METHODS[method]),
        t0,
        t1,
        t1 - t0,
        jnp.array([2.0, 0.0], dtype),
        saveat=diffrax.SaveAt(ts=jnp.linspace(t0, t1, 5)),
        throw=False,
    )
    return sol.result, sol.ys


@pytest.mark.slow
@pytest.mark.parametrize("method", ["trapezoid", "gauss_legendre2"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_with_implicit_methods(dtype, method):
    # LAPACK has no half-precision LU: the per-interval systems are factorised in
    # float32. The answer is the float64 one rounded: a few units in the last place.
    result, ys = van_der_pol_solve(method, dtype)
    _, reference = van_der_pol_solve(method, jnp.float64)
    assert result == diffrax.RESULTS.successful
    assert ys.dtype == dtype
    error = np.max(np.abs(np.asarray(ys, np.float64) - np.asarray(reference)))
    eps = float(jnp.finfo(dtype).eps)
    assert error < 4 * eps * np.max(np.abs(reference)), (error, eps)
