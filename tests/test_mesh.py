"""The in-window mesh: Hermite interpolation on any grid, equidistribution, and a
window solved again on an adapted mesh, with its dense output and derivatives."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer import DeerSolver, RadauIIA
from diffrax_deer._core.hermite import hermite_on_grid, quintic_hermite_on_grid
from diffrax_deer._core.mesh import adapt_mesh, equidistribute


jax.config.update("jax_enable_x64", True)


# ------------------------------------------------------------------------------------
# Interpolation on a non-uniform grid
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_intervals", [9, 700], ids=["compare-all", "search"])
def test_hermite_on_any_grid_reproduces_its_polynomials(num_intervals):
    rng = np.random.default_rng(0)
    # Steps varying by up to a factor of 3 from one to the next.
    increments = np.concatenate(
        [[0.0], np.cumsum(rng.uniform(0.5, 1.5, num_intervals))]
    )
    nodes = -0.8 + 3.3 * increments / increments[-1]
    cubic = np.array([0.7, -1.3, 0.4, 2.1])
    quintic = np.array([0.25, -0.6, 2.1, 0.4, -1.3, 0.7])

    def at(coefficients, t, derivative=0):
        value = np.polyval(np.polyder(coefficients, derivative), t)
        return jnp.asarray(np.stack([value, -2 * value], axis=-1))

    # Between nodes, at nodes, and slightly outside (extrapolating the end pieces).
    outside = [
        nodes[0] - 0.3 * (nodes[1] - nodes[0]),
        nodes[-1] + 0.4 * (nodes[-1] - nodes[-2]),
    ]
    times = jnp.asarray(
        np.concatenate([rng.uniform(-0.8, 2.5, 50), nodes[:5], outside])
    )
    ts = jnp.asarray(nodes)
    cubic_values = jax.vmap(hermite_on_grid, in_axes=(None, None, None, 0))(
        ts, at(cubic, nodes), at(cubic, nodes, 1), times
    )
    np.testing.assert_allclose(cubic_values, at(cubic, times), rtol=1e-10, atol=1e-10)
    quintic_values = jax.vmap(
        quintic_hermite_on_grid, in_axes=(None, None, None, None, 0)
    )(ts, at(quintic, nodes), at(quintic, nodes, 1), at(quintic, nodes, 2), times)
    np.testing.assert_allclose(quintic_values, at(quintic, times), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------
# Equidistribution
# ------------------------------------------------------------------------------------


def test_equidistribute_splits_the_integral_of_the_density_equally():
    ts = jnp.array([0.0, 1.0, 3.0, 4.0])
    density = jnp.array([1.0, 4.0, 1.0])  # integral 1 + 8 + 1 = 10
    new_ts = equidistribute(ts, density, 5)
    np.testing.assert_allclose(new_ts, [0.0, 1.25, 1.75, 2.25, 2.75, 4.0])


@pytest.mark.slow
def test_adapted_mesh_puts_nodes_where_the_local_error_is():
    ts = jnp.linspace(0.0, 1.0, 17)
    local = jnp.full((16,), 1e-6).at[3].set(1e2)  # one interval far out of tolerance
    mesh = adapt_mesh(ts, local, order=5, num_intervals=32)
    steps = np.diff(np.asarray(mesh.ts))
    assert mesh.ts[0] == 0 and mesh.ts[-1] == 1 and np.all(steps > 0)
    inside = (mesh.ts[1:] > ts[2]) & (mesh.ts[:-1] < ts[5])
    # Most nodes go to the interval and its neighbours; the rest stay spread out.
    assert np.sum(inside) >= 20
    assert np.max(steps) < 0.2
    assert float(mesh.improvement) < 1e-2


# ------------------------------------------------------------------------------------
# A window solved again on an adapted mesh
# ------------------------------------------------------------------------------------

# y' = -rate (y - sin t): a fast layer of width 1/rate at t = 0 (y0 is off the slow
# solution), then the slow solution. Exact solution in closed form.
RATES = jnp.array([40.0, 2.0])
Y0 = jnp.array([1.0, -0.5])
T1 = 2.0
SAVE_TS = jnp.linspace(0.0, T1, 41)


def relaxation(t, y, rates):
    return -rates * (y - jnp.sin(t))


def exact(t, y0, rates):
    t = np.asarray(t)[:, None]
    rates = np.asarray(rates)
    slow = (rates**2 * np.sin(t) - rates * np.cos(t)) / (rates**2 + 1)
    slow0 = -rates / (rates**2 + 1)
    return slow + (np.asarray(y0) - slow0) * np.exp(-rates * t)


def solver(adapt):
    return DeerSolver(
        num_steps=32,
        rtol=1e-6,
        atol=1e-6,
        method=RadauIIA(stages=3),
        adapt_mesh=adapt,
    )


@eqx.filter_jit
def solve(solver, y0, rates, saveat):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(relaxation),
        solver,
        0.0,
        T1,
        T1,
        y0,
        args=rates,
        saveat=saveat,
        throw=False,
    )


SAVE_ALL = diffrax.SaveAt(
    subs=[diffrax.SubSaveAt(ts=SAVE_TS), diffrax.SubSaveAt(t0=True, steps=True)],
    dense=True,
    solver_state=True,
)


@pytest.mark.slow
def test_adapted_mesh_resolves_a_fast_layer_uniform_cannot():
    errors, states = {}, {}
    for adapt in (False, True):
        sol = solve(solver(adapt), Y0, RATES, SAVE_ALL)
        assert sol.result == diffrax.RESULTS.successful
        ys, step_ys = sol.ys
        errors[adapt] = np.max(np.abs(np.asarray(ys) - exact(SAVE_TS, Y0, RATES)))
        states[adapt] = sol.solver_state
        if adapt:
            # Dense output on the adapted mesh, between and at save points; and the
            # other saving modes (t0, the window's end).
            times = jnp.linspace(0.0, T1, 97)
            dense = jax.vmap(sol.evaluate)(times)
            np.testing.assert_allclose(dense, exact(times, Y0, RATES), atol=3e-6)
            ends = exact(np.array([0.0, T1]), Y0, RATES)
            np.testing.assert_allclose(step_ys[0], ends[0], atol=1e-15)
            np.testing.assert_allclose(step_ys[1], ends[1], atol=1e-6)
    assert int(states[False].total_remeshes) == 0
    assert float(states[False].scaled_error) > 100
    assert int(states[True].total_remeshes) == 1
    assert float(states[True].scaled_error) <= 1
    assert errors[True] < 3e-6 and errors[False] > 1e-4
    # The estimate is still honest on the adapted mesh.
    estimate = float(states[True].error_estimate)
    assert 0.1 * errors[True] < estimate < 10 * errors[True]


@pytest.mark.slow
def test_derivatives_through_an_adapted_mesh_match_finite_differences():
    # The mesh is chosen from the first solve's error estimate, which is not
    # differentiated: derivatives are those of the solution on that mesh held
    # fixed (exact for it, by the implicit function theorem). Moving the mesh with
    # the parameters would change the answer by no more than the discretisation
    # error, so finite differences of the whole solve agree to about that.
    saveat = diffrax.SaveAt(ts=SAVE_TS)
    weights = jnp.linspace(-1.0, 1.0, SAVE_TS.shape[0] * 2).reshape(-1, 2)

    def loss(y0, rates):
        return jnp.sum(weights * solve(solver(True), y0, rates, saveat).ys)

    grad_y0, grad_rates = jax.jit(jax.grad(loss, argnums=(0, 1)))(Y0, RATES)
    step = 1e-6
    for argnum, grad, point in ((0, grad_y0, Y0), (1, grad_rates, RATES)):
        for k in range(2):
            direction = jnp.zeros(2).at[k].set(step)
            shifted = [Y0, RATES]
            shifted[argnum] = point + direction
            plus = loss(*shifted)
            shifted[argnum] = point - direction
            minus = loss(*shifted)
            finite = (plus - minus) / (2 * step)
            np.testing.assert_allclose(grad[k], finite, rtol=1e-4)
