"""DeerAdjoint against diffrax's default adjoint, finite differences and jax.jvp.

One solve saves every `SaveAt` mode at once (`subs` with `t0`, `t1`, `ts`, `steps` and
`fn`, plus `dense`, `solver_state`, `controller_state`, `made_jump`), over one window
and over three. Windows come from `dt0` (a traced count: the single-window branch
and the checkpointed loop) or from `StepTo` (a static count: `lax.scan`).

Compilation dominates the runtime: every compiled function is built once (cached
builders below) and shared between tests; `dt0` is a traced argument, so one
compilation serves one window and three.
"""

import functools
import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer import DeerAdjoint, DeerSolver, DeerState


jax.config.update("jax_enable_x64", True)


def field(t, y, k):
    """Lotka-Volterra with a prey growth rate `k`."""
    return jnp.stack([k * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def energy(t, y, k):
    return t * jnp.sum(y**2)


def split(t, y, k):
    return y[0], k * y[1]


T0, T1 = 0.0, 2.0
Y0 = jnp.array([1.0, 1.0])
K = 1.5
SOLVER = DeerSolver(num_steps=16)
MAX_STEPS = 4
# t0, t1, a repeated time and 2/3, a window boundary when there are three windows.
SAVE_TS = jnp.array([0.0, 0.3, 2 / 3, 2 / 3, 1.0, 1.7, 2.0])
DENSE_TS = jnp.linspace(T0, T1, 11)
SAVEAT = diffrax.SaveAt(
    subs=[
        diffrax.SubSaveAt(t0=True, t1=True, ts=SAVE_TS),
        diffrax.SubSaveAt(t0=True, t1=True, steps=True),
        diffrax.SubSaveAt(t1=True, ts=SAVE_TS[1:-1], steps=2, fn=energy),
        diffrax.SubSaveAt(t1=True, fn=split),
    ],
    dense=True,
    solver_state=True,
    controller_state=True,
    made_jump=True,
)
ADJOINTS = {"deer": DeerAdjoint(), "default": diffrax.RecursiveCheckpointAdjoint()}


def controller(windows, dtype=jnp.float64):
    """`None`: dt0 (ConstantStepSize); an int: StepTo with that many windows."""
    if windows is None:
        return diffrax.ConstantStepSize()
    return diffrax.StepTo(jnp.linspace(T0, T1, windows + 1, dtype=dtype))


def solve(y0, k, dt0, *, adjoint="deer", windows=None, saveat=SAVEAT, throw=True):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        SOLVER,
        jnp.asarray(T0, y0.dtype),
        jnp.asarray(T1, y0.dtype),
        dt0,
        y0,
        k,
        saveat=saveat,
        stepsize_controller=controller(windows, y0.dtype),
        adjoint=ADJOINTS[adjoint],
        max_steps=MAX_STEPS,
        throw=throw,
    )


def outputs(sol):
    return dict(
        ts=sol.ts,
        ys=sol.ys,
        dense=jax.vmap(sol.evaluate)(DENSE_TS),
        solver_state=sol.solver_state,
        made_jump=sol.made_jump,
        result=sol.result._value,
        # diffrax's counts; DeerAdjoint adds the Newton figures (test_stats).
        stats={k: sol.stats[k] for k in ("num_steps", "num_accepted_steps")},
    )


def loss(out):
    # Every saved float, weighted differently; unfilled slots (inf) left out.
    leaves = jax.tree.leaves((out["ys"], out["dense"]))
    return sum(jnp.sum(jnp.where(jnp.isfinite(x), jnp.sin(x), 0.0)) for x in leaves)


def full_loss(y0, k, dt0, windows, adjoint="deer", throw=True):
    sol = solve(y0, k, dt0, adjoint=adjoint, windows=windows, throw=throw)
    out = outputs(sol)
    return loss(out), (out, sol.stats)


@functools.cache
def value_and_grad(adjoint, windows):
    """Outputs, loss and d loss / d (y0, k), compiled once; `dt0` is traced.

    With `throw=False`, so that test_failed_window can read the result.
    """

    def run(y0, k, dt0):
        (value, (out, stats)), grads = jax.value_and_grad(
            full_loss, argnums=(0, 1), has_aux=True
        )(y0, k, dt0, windows, adjoint, False)
        return out, stats, value, grads

    return jax.jit(run)


def run(adjoint, num_windows, kind, y0=Y0, k=K):
    """`kind="dt0"`: dt0 = (t1 - t0) / num_windows; `"stepto"`: a StepTo grid."""
    if kind == "dt0":
        return value_and_grad(adjoint, None)(y0, k, (T1 - T0) / num_windows)
    return value_and_grad(adjoint, num_windows)(y0, k, None)


def assert_close(actual, desired, rtol):
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        a, d = np.asarray(a), np.asarray(d)
        if np.issubdtype(d.dtype, np.inexact):
            scale = np.max(np.abs(d[np.isfinite(d)]), initial=1.0)
            np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * scale)
        else:
            np.testing.assert_array_equal(a, d)


@pytest.mark.slow
@pytest.mark.parametrize("kind, num_windows", [("dt0", 1), ("dt0", 3), ("stepto", 3)])
def test_matches_default_adjoint(kind, num_windows):
    out, _, value, grads = run("deer", num_windows, kind)
    # The reference uses dt0: StepTo's grid gives the same windows, to round-off.
    ref_out, _, ref_value, ref_grads = run("default", num_windows, "dt0")
    assert_close(out, ref_out, rtol=1e-10)
    assert_close((value, grads), (ref_value, ref_grads), rtol=1e-10)
    assert np.all(np.isfinite(np.asarray(out["ys"][0])))
    assert int(out["stats"]["num_steps"]) == num_windows
    assert int(out["result"]) == int(diffrax.RESULTS.successful._value)


def test_stats():
    out, stats, _, _ = run("deer", 3, "dt0")
    state = out["solver_state"]
    assert isinstance(state, DeerState)
    assert int(stats["num_steps"]) == int(stats["num_accepted_steps"]) == 3
    assert int(stats["num_rejected_steps"]) == 0
    assert stats["max_steps"] == MAX_STEPS
    for name in (
        "num_iters",
        "total_num_iters",
        "max_num_iters",
        "update_norm",
        "residual_norm",
    ):
        np.testing.assert_array_equal(stats[name], getattr(state, name))
    assert 1 <= int(stats["num_iters"]) <= int(stats["max_num_iters"])
    assert int(stats["max_num_iters"]) <= int(stats["total_num_iters"])
    assert float(stats["update_norm"]) <= 1.0


DIRECTION = (jnp.array([0.3, -0.7]), 0.5)


def directional(grads):
    return jnp.vdot(grads[0], DIRECTION[0]) + grads[1] * DIRECTION[1]


def test_finite_differences():
    # A fourth-order central difference along one direction of (y0, k).
    h = 1e-4

    def value(s):
        y0, k = Y0 + s * h * DIRECTION[0], K + s * h * DIRECTION[1]
        return float(run("deer", 3, "stepto", y0, k)[2])

    fd = (8 * (value(1) - value(-1)) - (value(2) - value(-2))) / (12 * h)
    np.testing.assert_allclose(fd, directional(run("deer", 3, "stepto")[3]), rtol=1e-6)


Y0S = jnp.array([[1.0, 1.0], [1.3, 0.8], [0.7, 1.2]])


@functools.cache
def transformed():
    """jax.jvp (StepTo and dt0), vmap(grad) and grad(vmap) of the loss, compiled
    together (one compilation, not four); with `throw=True` (test_failed_window). The
    traced `dt0` gives one window or three."""

    def loss_stepto(y0, k, windows):
        return full_loss(y0, k, None, windows)[0]

    def _transformed(y0s, k, t_y0, t_k, dt0):
        # Forward mode through the StepTo scan (three windows).
        jvp = jax.jvp(lambda y0, k: loss_stepto(y0, k, 3), (y0s[0], k), (t_y0, t_k))
        # Forward mode with dt0: the single-window branch and the loop over windows.
        jvp_dt0 = jax.jvp(
            lambda y0, k: full_loss(y0, k, dt0, None)[0], (y0s[0], k), (t_y0, t_k)
        )
        # StepTo with one window (the fast path): grads batched.
        grad = jax.grad(loss_stepto, argnums=(0, 1))
        vmap_of_grad = jax.vmap(grad, in_axes=(0, None, None))(y0s, k, 1)
        # StepTo with three windows: solves batched, then differentiated.
        grad_of_vmap = jax.grad(
            lambda y0s, k: jnp.sum(jax.vmap(loss_stepto, (0, None, None))(y0s, k, 3)),
            argnums=(0, 1),
        )(y0s, k)
        return jvp, vmap_of_grad, grad_of_vmap, jvp_dt0

    return eqx.filter_jit(_transformed)


ONE_WINDOW = jnp.asarray(T1 - T0)


@pytest.mark.slow
def test_jvp():
    (value, tangent), _, _, _ = transformed()(
        Y0S, jnp.asarray(K), *DIRECTION, ONE_WINDOW
    )
    _, _, ref_value, grads = run("deer", 3, "stepto", y0=Y0S[0])
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(tangent, directional(grads), rtol=1e-10)


@pytest.mark.parametrize("num_windows", [1, 3])
def test_jvp_with_dt0(num_windows):
    dt0 = (T1 - T0) / num_windows
    # (An array: filter_jit would compile again for another Python float.)
    *_, (value, tangent) = transformed()(
        Y0S, jnp.asarray(K), *DIRECTION, jnp.asarray(dt0)
    )
    _, _, ref_value, grads = run("deer", num_windows, "dt0", y0=Y0S[0])
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(tangent, directional(grads), rtol=1e-10)


def test_vmap_of_grad():
    _, grads, _, _ = transformed()(Y0S, jnp.asarray(K), *DIRECTION, ONE_WINDOW)
    for i, y0 in enumerate(Y0S):
        # StepTo([t0, t1]) and dt0 = t1 - t0: the same single window.
        expected = run("deer", 1, "dt0", y0=y0)[3]
        assert_close((grads[0][i], grads[1][i]), expected, rtol=1e-10)


def test_grad_of_vmap():
    _, _, grads, _ = transformed()(Y0S, jnp.asarray(K), *DIRECTION, ONE_WINDOW)
    per_sample = [run("deer", 3, "stepto", y0=y0)[3] for y0 in Y0S]
    assert_close(grads[0], jnp.stack([g[0] for g in per_sample]), rtol=1e-10)
    assert_close(grads[1], sum(g[1] for g in per_sample), rtol=1e-10)


@pytest.mark.slow
def test_float32():
    y0, k = Y0.astype(jnp.float32), jnp.float32(K)
    saveat = diffrax.SaveAt(t0=True, t1=True, ts=SAVE_TS.astype(jnp.float32))

    def value_and_grad32(adjoint):
        def _loss(y0, k):
            sol = solve(y0, k, None, adjoint=adjoint, windows=1, saveat=saveat)
            return jnp.sum(jnp.sin(sol.ys)), sol.ys

        return jax.jit(jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True))

    (value, ys), grads = value_and_grad32("deer")(y0, k)
    (ref_value, ref_ys), ref_grads = value_and_grad32("default")(y0, k)
    assert ys.dtype == grads[0].dtype == grads[1].dtype == jnp.float32
    assert_close((value, ys, grads), (ref_value, ref_ys, ref_grads), rtol=1e-5)


def test_failed_window():
    # A NaN parameter: the first window's Newton solve diverges and the solve stops
    # there, with the same result and saved values as the default adjoint's.
    nan = jnp.nan
    for kind, num_windows in [("dt0", 1), ("dt0", 3), ("stepto", 3)]:
        out, stats, _, _ = run("deer", num_windows, kind, k=nan)
        ref_out, _, _, _ = run("default", num_windows, "dt0", k=nan)
        assert int(out["result"]) == int(diffrax.RESULTS.nonlinear_divergence._value)
        assert int(stats["num_steps"]) == 1
        assert_close(out["ys"], ref_out["ys"], rtol=0)
        assert_close(out["result"], ref_out["result"], rtol=0)
    with pytest.raises(RuntimeError, match="diverge"):
        transformed()(Y0S, jnp.asarray(nan), *DIRECTION, ONE_WINDOW)


def end_value(k, t1, adjoint):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        SOLVER,
        T0,
        t1,
        1.0,
        Y0,
        k,
        adjoint=adjoint,
        max_steps=MAX_STEPS,
    )
    return sol.ys[0, 0]


@pytest.mark.slow
def test_vmap_of_grad_mixing_one_and_several_windows():
    # The latent-ODE pattern: a different t1 per batch element, here one window of
    # dt0 = 1 for one element and three for the other.
    t1s = jnp.array([1.0, 3.0])
    grads = jax.jit(jax.vmap(jax.grad(end_value), (None, 0, None)), static_argnums=2)(
        K, t1s, DeerAdjoint()
    )
    reference = jax.jit(jax.grad(end_value), static_argnums=2)
    for grad, t1 in zip(grads, t1s, strict=True):
        expected = reference(K, t1, diffrax.RecursiveCheckpointAdjoint())
        np.testing.assert_allclose(grad, expected, rtol=1e-10)


def _trace(**kwargs):
    args = dict(
        terms=diffrax.ODETerm(field),
        solver=SOLVER,
        t0=T0,
        t1=T1,
        dt0=T1 - T0,
        y0=Y0,
        args=K,
        adjoint=DeerAdjoint(),
    )
    args.update(kwargs)
    jax.eval_shape(lambda: diffrax.diffeqsolve(**args))


def test_refuses_other_solvers():
    with pytest.raises(ValueError, match="DeerSolver.*RecursiveCheckpointAdjoint"):
        _trace(solver=diffrax.Tsit5())


def test_refuses_adaptive_step_sizes():
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="StepTo"):
        _trace(stepsize_controller=controller, dt0=None)


def _dense_info_lengths(adjoint=ADJOINTS["deer"], **kwargs):
    # Traced only: diffrax would reserve max_steps = 4096 windows of N + 1 nodes.
    def solve():
        return diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            DeerSolver(num_steps=5000),
            T0,
            T1,
            y0=Y0,
            args=K,
            saveat=diffrax.SaveAt(dense=True),
            adjoint=adjoint,
            **kwargs,
        )

    infos = jax.eval_shape(solve).interpolation.infos
    return {x.shape[0] for x in jax.tree.leaves(infos)}


def test_dense_output_holds_only_the_windows_that_occur():
    # StepTo: the window count is known at trace time (0.64 GB reserved before).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lengths = _dense_info_lengths(dt0=None, stepsize_controller=controller(2))
    assert lengths == {2}


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_dense_output_reserved_for_max_steps_is_warned_of(adjoint):
    remedy = "StepTo" if adjoint == "deer" else "DeerAdjoint.*StepTo"
    # (0.64 GiB before the dense output kept each window's nodes, for re-meshed
    # windows; 0.76 since.)
    match = rf"reserves 0\.7\d GiB.*max_steps.*{remedy}"
    with pytest.warns(UserWarning, match=match):
        assert _dense_info_lengths(ADJOINTS[adjoint], dt0=T1 - T0) == {4096}
