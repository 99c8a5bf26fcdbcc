"""The predictor: nested iteration with no sequential loop that grows with N."""

import collections
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lotka_volterra
from diffrax_deer import (
    BackwardEuler,
    DeerAdjoint,
    DeerSolver,
    GaussLegendre,
    RadauIIA,
    Trapezoid,
    solve_window,
)
from diffrax_deer._bench.depth import sequential_loops
from diffrax_deer._core.newton import newton_solve
from diffrax_deer._core.predictor import (
    base_solve,
    level_sizes,
    predict_trajectory,
    subgrid_indices,
)
from diffrax_deer._core.window import _constant_residual_bound


def lotka_volterra_scaled(t, y, args):
    return args * lotka_volterra(t, y, None)


def _window_solve(num_steps, **options):
    # The core window solve (what DeerSolver.step calls), with its derivatives.
    options = dict(dict(predictor_steps=64), **options)

    def solve(y0, scale):
        ts = jnp.linspace(0.0, 10.0, num_steps + 1)
        ys, _, _ = solve_window(
            lotka_volterra_scaled,
            Trapezoid(),
            ts,
            y0,
            scale,
            rtol=1e-10,
            atol=1e-10,
            max_iters=20,
            **options,
        )
        return jnp.sum(ys[-1])

    return solve


def _diffrax_solve(num_steps):
    def solve(y0, scale):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lotka_volterra_scaled),
            DeerSolver(num_steps=num_steps),
            t0=0.0,
            t1=10.0,
            dt0=10.0,
            y0=y0,
            args=scale,
            saveat=diffrax.SaveAt(t1=True),
            adjoint=DeerAdjoint(),
        )
        return jnp.sum(sol.ys[-1])

    return solve


def _loops(solve, mode):
    # Traced only (no compilation): the loops of a solve, its tangent or its
    # gradient.
    if mode == "jvp":

        def function(y0, scale):
            return jax.jvp(solve, (y0, scale), (y0, scale))

    elif mode == "grad":
        function = jax.grad(solve, argnums=(0, 1))
    else:
        function = solve
    return sequential_loops(function, jnp.array([1.0, 1.0]), jnp.array(1.0))


def _scans_and_whiles(loops, num_steps):
    # Binary searches (`jnp.interp`, `searchsorted`: the error estimate's
    # interpolation) are scans of about log2(N) steps: logarithmic depth, allowed.
    search = math.ceil(math.log2(num_steps + 1)) + 1
    lengths = [loop.length for loop in loops if loop.kind == "scan"]
    scans = collections.Counter(length for length in lengths if length > search)
    return scans, sum(loop.kind == "while" for loop in loops)


_SMALL, _LARGE = 300, 30_000


def _check_depth(make_solve, mode):
    # From N = 300 (no DEER level) to N = 3e4 (two): the same scans of fixed
    # length (the base solve's 64 steps, and its ROS2 fallback), and one more
    # Newton while loop per level (per pass, for a gradient through diffrax's
    # checkpointed loop). The old RK4 predictor had a scan of N // 16 steps.
    small_loops, large_loops = (_loops(make_solve(n), mode) for n in (_SMALL, _LARGE))
    small_scans, small_whiles = _scans_and_whiles(small_loops, _SMALL)
    large_scans, large_whiles = _scans_and_whiles(large_loops, _LARGE)
    assert small_scans == large_scans
    assert max(small_scans) == 64
    levels = len(level_sizes(_LARGE, 64, 8)) - len(level_sizes(_SMALL, 64, 8))
    assert levels == 2
    passes = large_whiles - small_whiles
    assert passes > 0 and passes % levels == 0


@pytest.mark.parametrize("mode", ["forward", "jvp", "grad"])
def test_no_sequential_loop_grows_with_the_grid(mode):
    _check_depth(_window_solve, mode)


@pytest.mark.slow
def test_deer_adjoint_has_no_sequential_loop_in_the_grid():
    _check_depth(_diffrax_solve, "grad")


def test_old_predictor_was_sequential_in_the_grid():
    # What the tests above guard against: predictor_coarsening=None with N // 16
    # RK4 steps, the predictor of earlier versions.
    solve = _window_solve(32_000, predictor_steps=2000, predictor_coarsening=None)
    assert 2000 in [loop.length for loop in _loops(solve, "forward")]


@pytest.mark.slow
def test_levels_on_a_non_uniform_grid():
    # Nested iteration on a graded grid (denser towards t = 10), with ratio 4 so
    # that two DEER levels fit in N = 2000 (125, 500): each level converges, the
    # extrapolated guess beats the top level's plain interpolation, and the fine
    # Newton converges from it in at most 3 iterations (to 1e-10).
    num_steps = 2000
    fractions = np.linspace(0.0, 1.0, num_steps + 1)
    ts = jnp.asarray(10.0 * (1 - (1 - fractions) ** 1.5))
    y0 = jnp.array([1.0, 1.0])
    assert level_sizes(num_steps, 64, 4) == (125, 500)

    @jax.jit
    def run(ts, y0):
        prediction = predict_trajectory(
            lotka_volterra,
            Trapezoid(),
            ts,
            y0,
            None,
            base_steps=64,
            coarsening=4,
            rtol=1e-10,
            atol=1e-10,
            max_iters=30,
        )
        ys, _, stats = newton_solve(
            lotka_volterra,
            Trapezoid(),
            ts,
            prediction.guess,
            None,
            None,
            rtol=1e-10,
            atol=1e-10,
            max_iters=30,
        )
        top = prediction.levels[-1]
        plain = top.interpolate(np.arange(num_steps + 1), ts)
        return prediction, ys, stats, plain

    prediction, ys, stats, plain = run(ts, y0)
    assert [level.num_intervals for level in prediction.levels] == [64, 125, 500]
    for level in prediction.levels[1:]:
        assert bool(level.converged)
        np.testing.assert_array_equal(
            level.ts, ts[subgrid_indices(num_steps, level.num_intervals)]
        )
    assert bool(stats.converged) and int(stats.num_iters) <= 3
    extrapolated_error = np.max(np.abs(prediction.guess - ys))
    plain_error = np.max(np.abs(plain - ys))
    # Measured: 6.1e-4 against 7.6e-3.
    assert extrapolated_error < plain_error / 5


def test_stiff_base_solve_is_stable():
    # y' = -1000 (y - cos t): 64 steps over [0, 4] put h lambda at -62, where RK4
    # overflows. Non-stiff methods fall back to ROS2 there, stiff ones use it
    # directly; both follow the slow solution y ~ cos t.
    def stiff(t, y, args):
        return -1000.0 * (y - jnp.cos(t))

    ts = jnp.linspace(0.0, 4.0, 65)
    y0 = jnp.array([0.0])
    exact = np.cos(np.asarray(ts))[:, None]
    for is_stiff in (False, True):
        ys, finite = jax.jit(
            lambda ts, y0, is_stiff=is_stiff: base_solve(stiff, ts, y0, None, is_stiff)
        )(ts, y0)
        assert bool(finite)
        np.testing.assert_allclose(ys[2:], exact[2:], atol=2e-3)
    assert BackwardEuler.stiff_predictor and not Trapezoid.stiff_predictor


@pytest.mark.parametrize(
    "method",
    [BackwardEuler(), Trapezoid(), GaussLegendre(3), RadauIIA(3), "tsit5"],
)
def test_constant_residual_bound_is_the_residual_of_its_intervals(method):
    # The window solve compares the predictor's residual with the constant guess's
    # through a bound from a few intervals: it must be those intervals' residual
    # in the whole grid (each interval's residual is its own), hence a lower bound.
    if method == "tsit5":
        method = DeerSolver(num_steps=16, method=diffrax.Tsit5()).method

    def field(t, y, args):
        return jnp.sin(3.0 * t) * y + jnp.cos(t) * y[::-1]

    ts = jnp.linspace(0.0, 2.0, 17) ** 1.5
    y0 = jnp.array([1.0, -0.5])
    constant = jnp.broadcast_to(y0, (17, 2))
    stages = method.init_stages(field, ts, constant, None)
    residual = method.residual(field, ts, constant, stages, None)
    rows = jnp.max(
        jnp.stack(
            [
                jnp.sqrt(jnp.mean(x.reshape(16, -1, x.shape[-1]) ** 2, axis=-1)).max(-1)
                for x in jax.tree_util.tree_leaves(residual)
            ]
        ),
        axis=0,
    )
    bound = _constant_residual_bound(field, method, ts, y0, None)
    intervals = np.r_[0:2, 7:9, 14:16]
    others = np.setdiff1d(np.arange(16), intervals)
    np.testing.assert_allclose(bound, rows[intervals].max(), rtol=1e-12)
    assert bound <= rows.max()
    assert not np.isclose(rows[others].max(), rows[intervals].max())
