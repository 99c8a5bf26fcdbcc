"""DeerSolver through diffrax's public API.

Every `SaveAt` mode, PyTree states and args, integrating backwards in time, `jit`,
`vmap`, gradients with every supported adjoint, float32, and the Newton statistics in
`sol.solver_state`.

The problem is small (a 2-state nonlinear field, `N = 64` intervals per window) and the
compiled functions are shared between tests: compilation dominates the runtime.
"""

import functools

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer import DeerSolver, DeerState
from diffrax_deer._bench.problems import MLPVectorField


# float64 unless a test says otherwise (conftest.py sets this too; repeated here so
# the module does not depend on it).
jax.config.update("jax_enable_x64", True)


def field(t, y, k):
    """A 2-state nonlinear, non-autonomous field with a parameter `k`."""
    return -k * y + jnp.sin(t) * y[::-1] - 0.3 * y**3


T0, T1 = 0.0, 3.0
N = 64  # intervals per window
H = (T1 - T0) / N  # node spacing of a single window over [T0, T1]
Y0 = jnp.array([1.0, 0.5])
K = 0.7
TERM = diffrax.ODETerm(field)
SOLVER = DeerSolver(N)

# Several windows: diffrax steps of 0.75 over [0, 3], each solved by DEER on N
# intervals.
WINDOW = 0.75
NUM_WINDOWS = 4
H_WINDOW = WINDOW / N

NODES = jnp.linspace(T0, T1, N + 1)
# N + 1 points (the same shape as NODES, so one compilation serves both), none on a
# node: fractions 0.37 of the way through every interval, and one at the last midpoint.
OFF_GRID = jnp.concatenate([NODES[:-1] + 0.37 * H, jnp.array([T1 - 0.5 * H])])
# Weights of a scalar loss on the solution at OFF_GRID.
WEIGHTS = jnp.cos(jnp.arange(2.0 * (N + 1))).reshape(N + 1, 2)

# The implicit trapezoidal rule's global error here is ~0.14 h^2 (measured): the bound
# h^2 has a safety factor of ~7 yet is far below anything a wrong solution gives.
TRAPEZOID_TOL = H**2
TRAPEZOID_TOL_WINDOW = H_WINDOW**2


# ------------------------------------------------------------------------------------
# Shared references and compiled solves
# ------------------------------------------------------------------------------------


@functools.cache
def reference(t0=T0, t1=T1):
    """A tight Tsit5 solution with dense output: the 'exact' solution."""
    return diffrax.diffeqsolve(
        TERM,
        diffrax.Tsit5(),
        t0,
        t1,
        None,
        Y0,
        args=K,
        saveat=diffrax.SaveAt(dense=True),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=100_000,
    )


def reference_at(ts, t0=T0, t1=T1):
    ts = jnp.asarray(ts)
    evaluate = reference(t0, t1).evaluate
    return np.asarray(jax.vmap(evaluate)(ts) if ts.ndim else evaluate(ts))


T0_ARRAY, T1_ARRAY = jnp.asarray(T0), jnp.asarray(T1)


def _make_solve(adjoint):
    def solve(y0, k, ts, t0=T0_ARRAY, t1=T1_ARRAY):
        """One window over [t0, t1], saved at `ts`."""
        return diffrax.diffeqsolve(
            TERM,
            SOLVER,
            t0,
            t1,
            t1 - t0,
            y0,
            args=k,
            saveat=diffrax.SaveAt(ts=ts, solver_state=True),
            adjoint=adjoint,
            max_steps=1,
        )

    return solve


solve = eqx.filter_jit(_make_solve(diffrax.RecursiveCheckpointAdjoint()))
solve_forward_mode = _make_solve(diffrax.ForwardMode())


def solve_ys(y0, k, ts):
    return solve(y0, k, ts).ys


def loss(y0, k):
    return jnp.sum(WEIGHTS * solve(y0, k, OFF_GRID).ys)


grad_loss = jax.jit(jax.grad(loss, argnums=(0, 1)))
loss_jit = jax.jit(loss)


@functools.cache
def multi_window_solution():
    """Four windows, saving every window's end and the Newton statistics."""
    return diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T0,
        T1,
        WINDOW,
        Y0,
        args=K,
        saveat=diffrax.SaveAt(steps=True, solver_state=True),
        max_steps=NUM_WINDOWS,
    )


def central_difference(fn, x, direction, eps):
    return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


def assert_close_to_reference(ys, ts, tol, t0=T0, t1=T1):
    error = np.max(np.abs(np.asarray(ys) - reference_at(ts, t0, t1)))
    assert error < tol, (error, tol)


# ------------------------------------------------------------------------------------
# SaveAt
# ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_saveat_t0_t1_unjitted():
    sol = diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T0,
        T1,
        T1 - T0,
        Y0,
        args=K,
        saveat=diffrax.SaveAt(t0=True, t1=True),
    )
    assert sol.result == diffrax.RESULTS.successful
    np.testing.assert_array_equal(sol.ts, [T0, T1])
    assert sol.ys.shape == (2, 2)
    np.testing.assert_array_equal(sol.ys[0], Y0)
    assert_close_to_reference(sol.ys[1], T1, TRAPEZOID_TOL)
    # The eager call agrees with the same solve under an outer `jit` (last node).
    jitted_last = solve_ys(Y0, K, NODES)[-1]
    np.testing.assert_allclose(sol.ys[1], jitted_last, rtol=1e-13, atol=1e-15)


@pytest.mark.slow
def test_saveat_ts_on_grid_nodes():
    sol = solve(Y0, K, NODES)
    assert sol.result == diffrax.RESULTS.successful
    np.testing.assert_array_equal(sol.ts, NODES)
    np.testing.assert_array_equal(sol.ys[0], Y0)
    assert_close_to_reference(sol.ys, NODES, TRAPEZOID_TOL)


def test_saveat_ts_off_grid_is_cubic_hermite():
    ys_nodes = np.asarray(solve_ys(Y0, K, NODES))
    ys_off = np.asarray(solve_ys(Y0, K, OFF_GRID))
    assert_close_to_reference(ys_off, OFF_GRID, TRAPEZOID_TOL)

    # The values are exactly the cubic Hermite interpolant of the nodes, with the
    # vector field at the nodes as derivatives.
    position = np.asarray((OFF_GRID - T0) / H)
    index = np.floor(position).astype(int)
    s = (position - index)[:, None]
    fs_nodes = np.asarray(jax.vmap(field, (0, 0, None))(NODES, ys_nodes, K))
    hermite = (
        (2 * s**3 - 3 * s**2 + 1) * ys_nodes[index]
        + (s**3 - 2 * s**2 + s) * H * fs_nodes[index]
        + (-2 * s**3 + 3 * s**2) * ys_nodes[index + 1]
        + (s**3 - s**2) * H * fs_nodes[index + 1]
    )
    np.testing.assert_allclose(ys_off, hermite, rtol=0, atol=1e-12)

    # Interpolation error, with the (smooth) global error of the nodes taken out:
    # cubic Hermite adds O(h^3) to it; linear interpolation adds (h^2/8)|y''|.
    exact_nodes = reference_at(NODES)
    exact_off = reference_at(OFF_GRID)
    node_errors = ys_nodes - exact_nodes
    interpolated_node_error = (1 - s) * node_errors[index] + s * node_errors[index + 1]
    hermite_error = np.max(np.abs(ys_off - exact_off - interpolated_node_error))
    linear = (1 - s) * ys_nodes[index] + s * ys_nodes[index + 1]
    linear_error = np.max(np.abs(linear - exact_off - interpolated_node_error))
    assert linear_error > 1e-4  # the test can tell the two apart
    assert hermite_error < 0.02 * linear_error, (hermite_error, linear_error)


@pytest.mark.slow
def test_saveat_steps_several_windows():
    sol = multi_window_solution()
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.stats["num_steps"]) == NUM_WINDOWS
    window_ends = T0 + WINDOW * np.arange(1, NUM_WINDOWS + 1)
    np.testing.assert_allclose(sol.ts, window_ends, rtol=0, atol=1e-14)
    assert sol.ys.shape == (NUM_WINDOWS, 2)
    assert_close_to_reference(sol.ys, window_ends, TRAPEZOID_TOL_WINDOW)


@pytest.mark.slow
def test_saveat_dense_evaluate():
    sol = diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T0,
        T1,
        WINDOW,
        Y0,
        args=K,
        saveat=diffrax.SaveAt(dense=True),
        max_steps=NUM_WINDOWS,
    )
    assert sol.result == diffrax.RESULTS.successful
    ts = jnp.linspace(T0, T1, 37) + 0.013 * jnp.sin(jnp.arange(37.0))
    ts = jnp.clip(ts, T0, T1)
    ys = jax.vmap(sol.evaluate)(ts)
    assert ys.shape == (37, 2)
    assert_close_to_reference(ys, ts, TRAPEZOID_TOL_WINDOW)
    # At the window ends, the window's last node: the same as SaveAt(steps=True).
    window_ends = multi_window_solution().ts
    np.testing.assert_allclose(
        jax.vmap(sol.evaluate)(window_ends),
        multi_window_solution().ys,
        rtol=1e-12,
        atol=1e-14,
    )
    np.testing.assert_array_equal(sol.evaluate(T0), Y0)
    # The derivative of the dense output (the Hermite cubic's) approximates f.
    derivatives = jax.vmap(sol.derivative)(ts)
    fields = jax.vmap(field, (0, 0, None))(ts, ys, K)
    np.testing.assert_allclose(derivatives, fields, rtol=0, atol=TRAPEZOID_TOL_WINDOW)
    # Two-argument form: the increment.
    np.testing.assert_allclose(
        sol.evaluate(0.4, 2.6), sol.evaluate(2.6) - sol.evaluate(0.4), atol=1e-14
    )


def _summary(t, y, args):
    return jnp.stack([t, jnp.sum(y**2), args * y[0]])


@pytest.mark.slow
def test_saveat_fn():
    sol = diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T0,
        T1,
        T1 - T0,
        Y0,
        args=K,
        saveat=diffrax.SaveAt(ts=OFF_GRID, fn=_summary),
        max_steps=1,
    )
    assert sol.ys.shape == (N + 1, 3)
    expected = jax.vmap(_summary, (0, 0, None))(OFF_GRID, solve_ys(Y0, K, OFF_GRID), K)
    np.testing.assert_allclose(sol.ys, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_saveat_subs():
    subs = [
        diffrax.SubSaveAt(t0=True, t1=True),
        diffrax.SubSaveAt(ts=OFF_GRID, fn=_summary),
        diffrax.SubSaveAt(steps=True),
    ]
    sol = diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T0,
        T1,
        WINDOW,
        Y0,
        args=K,
        saveat=diffrax.SaveAt(subs=subs),
        max_steps=NUM_WINDOWS,
    )
    assert isinstance(sol.ys, list) and len(sol.ys) == 3
    endpoints, summaries, steps = sol.ys
    np.testing.assert_array_equal(sol.ts[0], [T0, T1])
    np.testing.assert_array_equal(endpoints[0], Y0)
    assert_close_to_reference(endpoints[1], T1, TRAPEZOID_TOL_WINDOW)

    np.testing.assert_allclose(sol.ts[1], OFF_GRID, rtol=0, atol=0)
    exact = jax.vmap(_summary, (0, 0, None))(OFF_GRID, reference_at(OFF_GRID), K)
    np.testing.assert_allclose(summaries, exact, rtol=0, atol=5 * TRAPEZOID_TOL_WINDOW)

    np.testing.assert_allclose(sol.ts[2], multi_window_solution().ts, atol=1e-14)
    np.testing.assert_allclose(steps, multi_window_solution().ys, rtol=1e-12)


def test_saveat_solver_state_single_window():
    sol = solve(Y0, K, NODES)
    state = sol.solver_state
    assert isinstance(state, DeerState)
    assert 1 <= int(state.num_iters) <= SOLVER.max_iters
    # One window: the totals are that window's.
    assert int(state.total_num_iters) == int(state.num_iters)
    assert int(state.max_num_iters) == int(state.num_iters)
    assert float(state.update_norm) <= 1.0
    assert np.isfinite(float(state.residual_norm))
    assert float(state.residual_norm) < 1e-6


@pytest.mark.slow
def test_solver_state_accumulates_over_windows():
    sol = multi_window_solution()
    state = sol.solver_state
    # Re-solve each window on its own, from the saved start, and count iterations.
    starts = np.concatenate([[T0], np.asarray(sol.ts[:-1])])
    start_values = jnp.concatenate([Y0[None], sol.ys[:-1]])
    iters = []
    for t0, t1, y0 in zip(starts, np.asarray(sol.ts), start_values, strict=True):
        one = solve(y0, K, jnp.full(N + 1, t1), jnp.asarray(t0), jnp.asarray(t1))
        np.testing.assert_allclose(one.ys[-1], sol.ys[len(iters)], rtol=1e-12)
        iters.append(int(one.solver_state.num_iters))
    assert all(i >= 1 for i in iters)
    assert int(state.num_iters) == iters[-1]
    assert int(state.total_num_iters) == sum(iters)
    assert int(state.max_num_iters) == max(iters)
    assert float(state.update_norm) <= 1.0


# ------------------------------------------------------------------------------------
# PyTrees and direction of time
# ------------------------------------------------------------------------------------


def tree_field(t, y, args):
    x, v, s = y["x"], y["v"], y["s"]  # shapes (2,), (3, 1) and ()
    k, matrix = args["k"], args["matrix"]
    dx = -k * x + jnp.sin(t) * v[:2, 0] - 0.3 * x**3 + 0.1 * s
    dv = matrix @ v - 0.1 * jnp.sum(x**2) * v
    ds = -s + x[0] * x[1]
    return {"x": dx, "v": dv, "s": ds}


def flat_field(t, z, args):
    y = {"x": z[:2], "v": z[2:5].reshape(3, 1), "s": z[5]}
    dy = tree_field(t, y, args)
    return jnp.concatenate([dy["x"], dy["v"][:, 0], dy["s"][None]])


@pytest.mark.slow
def test_pytree_state_and_args_equal_flat_equivalent():
    y0 = {
        "x": jnp.array([1.0, -0.5]),
        "v": jnp.array([[0.3], [0.2], [-0.1]]),
        "s": jnp.array(0.4),
    }
    args = {
        "k": jnp.array(0.5),
        "matrix": jnp.array([[-0.5, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.1, 0.0, -0.4]]),
    }
    z0 = jnp.concatenate([y0["x"], y0["v"][:, 0], y0["s"][None]])
    ts = jnp.linspace(T0, T1 - 0.1, 7) + 0.01 * jnp.arange(7.0) / 7
    saveat = diffrax.SaveAt(ts=ts)
    tree_sol = diffrax.diffeqsolve(
        diffrax.ODETerm(tree_field), SOLVER, T0, T1, T1 - T0, y0, args, saveat=saveat
    )
    flat_sol = diffrax.diffeqsolve(
        diffrax.ODETerm(flat_field), SOLVER, T0, T1, T1 - T0, z0, args, saveat=saveat
    )
    assert tree_sol.result == diffrax.RESULTS.successful
    assert jax.tree.structure(tree_sol.ys) == jax.tree.structure(y0)
    assert tree_sol.ys["x"].shape == (7, 2)
    assert tree_sol.ys["v"].shape == (7, 3, 1)
    np.testing.assert_allclose(tree_sol.ys["x"], flat_sol.ys[:, :2], rtol=1e-11)
    assert tree_sol.ys["s"].shape == (7,)
    np.testing.assert_allclose(
        tree_sol.ys["v"][..., 0], flat_sol.ys[:, 2:5], rtol=1e-11
    )
    np.testing.assert_allclose(tree_sol.ys["s"], flat_sol.ys[:, 5], rtol=1e-11)


@pytest.mark.slow
def test_backwards_in_time_matches_tsit5():
    # Start from the (Tsit5) solution at T1 and integrate back to T0: the solution
    # retraces the forward trajectory. (From Y0 itself the cubic term, which damps
    # forwards, would blow up backwards.)
    y1 = jnp.asarray(reference_at(T1))
    ts = jnp.linspace(T1, T0 + 0.1, 9)
    sol = diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T1,
        T0,
        T0 - T1,
        y1,
        args=K,
        saveat=diffrax.SaveAt(ts=ts, dense=True),
        max_steps=1,
    )
    assert sol.result == diffrax.RESULTS.successful
    np.testing.assert_array_equal(sol.ys[0], y1)
    np.testing.assert_allclose(jax.vmap(sol.evaluate)(ts), sol.ys, rtol=1e-13)
    exact = reference_at(ts)
    # Errors grow backwards (the field damps forwards); compare relative to |y|.
    relative_error = np.max(np.abs(sol.ys - exact) / np.abs(exact))
    assert relative_error < 3 * TRAPEZOID_TOL, relative_error

    # Exactly the same discrete problem as the time-reversed ODE z'(s) = -f(T1 - s, z)
    # solved forwards on s in [0, T1 - T0]: the same nodes, the same trapezoid rule.
    def reversed_field(s, z, k):
        return -field(T1 - s, z, k)

    reversed_sol = diffrax.diffeqsolve(
        diffrax.ODETerm(reversed_field),
        SOLVER,
        0.0,
        T1 - T0,
        T1 - T0,
        y1,
        args=K,
        saveat=diffrax.SaveAt(ts=T1 - ts),
    )
    np.testing.assert_allclose(sol.ys, reversed_sol.ys, rtol=1e-9)


# ------------------------------------------------------------------------------------
# jit and vmap
# ------------------------------------------------------------------------------------

BATCH_Y0 = jnp.array([[1.0, 0.5], [0.2, -0.7], [-1.2, 0.4]])
BATCH_K = jnp.array([0.7, 0.1, 1.5])


@pytest.mark.slow
def test_vmap_over_y0():
    batched = jax.jit(jax.vmap(solve_ys, in_axes=(0, None, None)))(
        BATCH_Y0, K, OFF_GRID
    )
    for i in range(len(BATCH_Y0)):
        np.testing.assert_allclose(
            batched[i], solve_ys(BATCH_Y0[i], K, OFF_GRID), rtol=1e-12, atol=1e-14
        )


@pytest.mark.slow
def test_vmap_over_args():
    batched = jax.jit(jax.vmap(solve_ys, in_axes=(None, 0, None)))(
        Y0, BATCH_K, OFF_GRID
    )
    for i in range(len(BATCH_K)):
        np.testing.assert_allclose(
            batched[i], solve_ys(Y0, BATCH_K[i], OFF_GRID), rtol=1e-12, atol=1e-14
        )


@pytest.mark.slow
def test_vmap_of_grad():
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(BATCH_Y0, BATCH_K)
    for i in range(len(BATCH_Y0)):
        g_y0, g_k = grad_loss(BATCH_Y0[i], BATCH_K[i])
        np.testing.assert_allclose(batched[0][i], g_y0, rtol=1e-10)
        np.testing.assert_allclose(batched[1][i], g_k, rtol=1e-10)


@pytest.mark.slow
def test_grad_of_vmap_sum():
    def batch_loss(y0s, k):
        return jnp.sum(jax.vmap(loss, in_axes=(0, None))(y0s, k))

    g_y0s, g_k = jax.jit(jax.grad(batch_loss, argnums=(0, 1)))(BATCH_Y0, K)
    per_element = [grad_loss(y0, K) for y0 in BATCH_Y0]
    np.testing.assert_allclose(
        g_y0s, jnp.stack([g[0] for g in per_element]), rtol=1e-10
    )
    np.testing.assert_allclose(g_k, sum(g[1] for g in per_element), rtol=1e-10)


# ------------------------------------------------------------------------------------
# Derivatives
# ------------------------------------------------------------------------------------

FD_EPS = 1e-5


@pytest.mark.slow
def test_grad_matches_finite_differences():
    g_y0, g_k = grad_loss(Y0, K)
    for i in range(2):
        e = jnp.zeros(2).at[i].set(1.0)
        fd = central_difference(lambda y0: loss_jit(y0, K), Y0, e, FD_EPS)
        np.testing.assert_allclose(g_y0[i], fd, rtol=1e-6)
    fd_k = central_difference(lambda k: loss_jit(Y0, k), K, 1.0, FD_EPS)
    np.testing.assert_allclose(g_k, fd_k, rtol=1e-6)
    assert abs(float(g_k)) > 1e-2


def multi_window_loss(y0, k, adjoint):
    sol = diffrax.diffeqsolve(
        TERM,
        SOLVER,
        T0,
        T1,
        WINDOW,
        y0,
        args=k,
        saveat=diffrax.SaveAt(ts=OFF_GRID),
        adjoint=adjoint,
        max_steps=NUM_WINDOWS,
    )
    return jnp.sum(WEIGHTS * sol.ys)


@pytest.mark.slow
def test_grad_several_windows_recursive_checkpoint_and_direct_adjoints():
    def grad_with(adjoint):
        loss_fn = functools.partial(multi_window_loss, adjoint=adjoint)
        return jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(Y0, K)

    g_y0, g_k = grad_with(diffrax.RecursiveCheckpointAdjoint())
    d_y0, d_k = grad_with(diffrax.DirectAdjoint())
    np.testing.assert_allclose(d_y0, g_y0, rtol=1e-10)
    np.testing.assert_allclose(d_k, g_k, rtol=1e-10)

    default_adjoint = diffrax.RecursiveCheckpointAdjoint()
    forward = jax.jit(functools.partial(multi_window_loss, adjoint=default_adjoint))
    for i in range(2):
        e = jnp.zeros(2).at[i].set(1.0)
        fd = central_difference(lambda y0: forward(y0, K), Y0, e, FD_EPS)
        np.testing.assert_allclose(g_y0[i], fd, rtol=1e-6)
    fd_k = central_difference(lambda k: forward(Y0, k), K, 1.0, FD_EPS)
    np.testing.assert_allclose(g_k, fd_k, rtol=1e-6)


@pytest.mark.slow
def test_jvp_forward_mode_matches_finite_differences():
    def solve_fm(y0, k):
        return solve_forward_mode(y0, k, OFF_GRID).ys

    tangent_y0 = jnp.array([0.3, -0.8])
    tangent_k = jnp.array(0.5)
    primal, tangent = jax.jit(
        lambda y0, k: jax.jvp(solve_fm, (y0, k), (tangent_y0, tangent_k))
    )(Y0, K)
    np.testing.assert_allclose(primal, solve_ys(Y0, K, OFF_GRID), rtol=1e-12)

    def along(eps):
        return solve_ys(Y0 + eps * tangent_y0, K + eps * tangent_k, OFF_GRID)

    fd = (along(FD_EPS) - along(-FD_EPS)) / (2 * FD_EPS)
    np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-9)
    # Forward and reverse mode agree: <weights, J t> = <J^T weights, t>.
    g_y0, g_k = grad_loss(Y0, K)
    np.testing.assert_allclose(
        jnp.sum(WEIGHTS * tangent), g_y0 @ tangent_y0 + g_k * tangent_k, rtol=1e-10
    )


MLP_T1 = 1.0
MLP_Y0 = jnp.array([1.0, -1.0])
MLP_N = 64


def _mlp_loss(vector_field, solver, stepsize_controller, dt0):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        0.0,
        MLP_T1,
        dt0,
        MLP_Y0,
        stepsize_controller=stepsize_controller,
        max_steps=4096,
    )
    return jnp.sum(sol.ys[-1] * jnp.array([1.0, -2.0]))


def mlp_loss_deer(vector_field):
    return _mlp_loss(
        vector_field, DeerSolver(MLP_N), diffrax.ConstantStepSize(), MLP_T1
    )


def mlp_loss_tsit5(vector_field):
    controller = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    return _mlp_loss(vector_field, diffrax.Tsit5(), controller, None)


@pytest.mark.slow
def test_grad_wrt_mlp_parameters():
    mlp = MLPVectorField(state_size=2, width=16, depth=2, key=jax.random.key(0))
    grads = eqx.filter_jit(eqx.filter_grad(mlp_loss_deer))(mlp)
    loss_fn = eqx.filter_jit(mlp_loss_deer)

    # Finite differences on a few individual parameters.
    layers = mlp.mlp.layers
    picks = [
        (lambda m: m.mlp.layers[0].weight, (3, 1)),
        (lambda m: m.mlp.layers[1].weight, (5, 7)),
        (lambda m: m.mlp.layers[1].bias, (2,)),
        (lambda m: m.mlp.layers[2].weight, (1, 4)),
        (lambda m: m.mlp.layers[2].bias, (0,)),
    ]
    assert len(layers) == 3
    for where, index in picks:

        def perturbed(eps, where=where, index=index):
            leaf = where(mlp)
            return loss_fn(eqx.tree_at(where, mlp, leaf.at[index].add(eps)))

        fd = (perturbed(FD_EPS) - perturbed(-FD_EPS)) / (2 * FD_EPS)
        analytic = where(grads)[index]
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-10)

    # Against Tsit5's gradients: equal up to the trapezoid discretisation error.
    tsit5_grads = eqx.filter_jit(eqx.filter_grad(mlp_loss_tsit5))(mlp)
    deer_flat, _ = jax.flatten_util.ravel_pytree(eqx.filter(grads, eqx.is_array))
    tsit5_flat, _ = jax.flatten_util.ravel_pytree(eqx.filter(tsit5_grads, eqx.is_array))
    relative = jnp.linalg.norm(deer_flat - tsit5_flat) / jnp.linalg.norm(tsit5_flat)
    assert relative < (MLP_T1 / MLP_N) ** 2, relative
    assert jnp.linalg.norm(tsit5_flat) > 1e-2


@pytest.mark.slow
def test_grad_wrt_end_time():
    t1_weights = jnp.array([1.0, -2.0])

    def end_loss(t1):
        sol = diffrax.diffeqsolve(
            TERM,
            SOLVER,
            T0,
            t1,
            t1 - T0,
            Y0,
            args=K,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=1,
        )
        return jnp.sum(t1_weights * sol.ys[0]), sol.ys[0]

    t1 = jnp.asarray(T1)
    grad, y1 = jax.jit(jax.grad(end_loss, has_aux=True))(t1)
    loss_only = jax.jit(lambda t: end_loss(t)[0])
    fd = central_difference(loss_only, t1, 1.0, FD_EPS)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    # d y(t1) / d t1 = f(t1, y(t1)), up to the discretisation error.
    np.testing.assert_allclose(
        grad, t1_weights @ field(t1, y1, K), rtol=10 * TRAPEZOID_TOL
    )


# ------------------------------------------------------------------------------------
# float32
# ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_float32_end_to_end():
    f32 = jnp.float32
    y0, k = Y0.astype(f32), jnp.asarray(K, f32)
    ts = OFF_GRID.astype(f32)
    t0, t1 = jnp.asarray(T0, f32), jnp.asarray(T1, f32)
    sol = solve(y0, k, ts, t0, t1)
    assert sol.result == diffrax.RESULTS.successful
    assert sol.ys.dtype == f32
    assert sol.ts.dtype == f32
    assert sol.solver_state.update_norm.dtype == f32
    np.testing.assert_allclose(sol.ys, solve_ys(Y0, K, OFF_GRID), rtol=1e-4, atol=1e-5)

    def loss32(y0, k):
        return jnp.sum(WEIGHTS.astype(f32) * solve(y0, k, ts, t0, t1).ys)

    g_y0, g_k = jax.jit(jax.grad(loss32, argnums=(0, 1)))(y0, k)
    assert g_y0.dtype == f32 and g_k.dtype == f32
    r_y0, r_k = grad_loss(Y0, K)
    np.testing.assert_allclose(g_y0, r_y0, rtol=1e-3)
    np.testing.assert_allclose(g_k, r_k, rtol=1e-3)


def test_the_window_solve_is_traced_once_per_diffeqsolve(monkeypatch):
    # diffrax traces a solver's `step` three times (two `eval_shape`s of its loop
    # body, then the loop); the window solve, the bulk of the compile, is traced
    # once and reused (about 3 s of tracing in 4 for the default solver).
    from diffrax_deer._adapter import deer_solver

    calls = []
    window_step = deer_solver.DeerSolver._window_step

    def counted(self, *args):
        calls.append(None)
        return window_step(self, *args)

    monkeypatch.setattr(deer_solver.DeerSolver, "_window_step", counted)
    # A solver of its own, so that no earlier test's trace is reused.
    solver = DeerSolver(num_steps=7)
    jax.eval_shape(
        lambda y0: diffrax.diffeqsolve(TERM, solver, T0, T1, WINDOW, y0, args=K).ys,
        Y0,
    )
    assert len(calls) == 1
