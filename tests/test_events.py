"""Events with DeerSolver: checked at every node under DeerAdjoint, refused elsewhere.

A DeerSolver step is a whole window, and diffrax checks an event's condition only at
step ends. DeerAdjoint checks it at every node: the first node at which it triggers
plays the part of the end of diffrax's step. So the references are diffrax itself:
Tsit5 at tight tolerances for located event times and their derivatives, and Tsit5 on
the same nodes (`StepTo`) for where an event lands without a root finder, and what is
saved up to it.

Every compiled function is built once (cached builders) and shared between tests.
"""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

from diffrax_deer import DeerAdjoint, DeerSolver, GaussLegendre


jax.config.update("jax_enable_x64", True)


def van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1.0 - y[0] ** 2) * y[1] - y[0]])


def crossing(t, y, args, **kwargs):
    return y[0]


TERM = diffrax.ODETerm(van_der_pol)
Y0 = jnp.array([2.0, 0.0])
MU = 1.0
ROOT_FINDER = optx.Newton(rtol=1e-13, atol=1e-13)
LOCATED = diffrax.Event(crossing, root_finder=ROOT_FINDER)
SUCCESSFUL = int(diffrax.RESULTS.successful._value)
EVENT = int(diffrax.RESULTS.event_occurred._value)


# ------------------------------------------------------------------------------------
# Located events: the example, derivatives through the event time
# ------------------------------------------------------------------------------------

# Sixth order on N = 400 intervals: a discretisation error far below the tolerances.
GL3 = DeerSolver(num_steps=400, method=GaussLegendre(stages=3))


def deer_event_time(y0, mu, t1):
    # One window given by StepTo (the `lax.scan` path); [0, t1] holds one or more
    # crossings of y[0] = 0, the first at t = 2.16.
    sol = diffrax.diffeqsolve(
        TERM,
        GL3,
        0.0,
        t1,
        None,
        y0,
        args=mu,
        event=LOCATED,
        stepsize_controller=diffrax.StepTo(jnp.stack([jnp.zeros_like(t1), t1])),
        adjoint=DeerAdjoint(),
    )
    return sol.ts[0], (sol.ys[0], sol.event_mask, sol.result._value)


@functools.cache
def deer_located():
    """Event times, their gradients (batched over (y0, mu)) and a jvp, compiled
    together."""

    def run(y0s, mus, t1):
        grad = jax.value_and_grad(deer_event_time, argnums=(0, 1), has_aux=True)
        batched = jax.vmap(grad, in_axes=(0, 0, None))(y0s, mus, t1)
        tangent = jax.jvp(
            lambda mu: deer_event_time(y0s[0], mu, t1)[0], (mus[0],), (1.0,)
        )[1]
        return batched, tangent

    return jax.jit(run)


@functools.cache
def tsit5_located():
    def event_time(y0, mu):
        sol = diffrax.diffeqsolve(
            TERM,
            diffrax.Tsit5(),
            0.0,
            10.0,
            0.01,
            y0,
            args=mu,
            event=LOCATED,
            stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
            max_steps=100_000,
        )
        return sol.ts[0]

    return jax.jit(jax.value_and_grad(event_time, argnums=(0, 1)))


# (y0, mu) and central-difference neighbours in y0[0] and mu.
H = 1e-5
Y0S = jnp.stack([Y0, Y0, Y0 + jnp.array([H, 0.0]), Y0 - jnp.array([H, 0.0]), Y0, Y0])
MUS = jnp.array([MU, MU, MU, MU, MU + H, MU - H])


# GaussLegendre(3)'s window, differentiated both ways: about 20 s of compilation.
@pytest.mark.slow
@pytest.mark.parametrize("t1", [7.0, 10.0])
def test_event_inside_a_window_is_located(t1):
    # The example: [0, 7] ends with y[0] > 0 again (two crossings: diffrax's
    # loop saw no sign change), [0, 10] with three.
    (values, (ys, masks, results)), _, _ = _unpack(
        deer_located()(Y0S, MUS, jnp.asarray(t1))
    )
    ref_time, _ = tsit5_located()(Y0, MU)
    np.testing.assert_allclose(values[0], ref_time, rtol=1e-10)
    assert 2.16 < float(values[0]) < 2.17
    np.testing.assert_allclose(ys[0, 0], 0.0, atol=1e-10)
    assert bool(masks[0])
    assert int(results[0]) == EVENT


@pytest.mark.slow
def test_derivatives_through_the_event_time():
    (values, _), (grad_y0, grad_mu), tangent = _unpack(
        deer_located()(Y0S, MUS, jnp.asarray(7.0))
    )
    _, (ref_y0, ref_mu) = tsit5_located()(Y0, MU)
    np.testing.assert_allclose(grad_y0[0], ref_y0, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(grad_mu[0], ref_mu, rtol=1e-7)
    # Central differences of DeerAdjoint's own event times.
    fd_y0 = (values[2] - values[3]) / (2 * H)
    fd_mu = (values[4] - values[5]) / (2 * H)
    np.testing.assert_allclose(grad_y0[0, 0], fd_y0, rtol=1e-6)
    np.testing.assert_allclose(grad_mu[0], fd_mu, rtol=1e-6)
    np.testing.assert_allclose(tangent, grad_mu[0], rtol=1e-10)


def _unpack(out):
    ((values, aux), grads), tangent = out
    return (values, aux), grads, tangent


# ------------------------------------------------------------------------------------
# Where an event lands without a root finder; several conditions; saving
# ------------------------------------------------------------------------------------

T1 = 6.0
N = 200
# The conditions take `args`: here the field's parameter is fixed.
FIXED_TERM = diffrax.ODETerm(lambda t, y, args: van_der_pol(t, y, MU))
TRAPEZOID = DeerSolver(num_steps=N)
SAVE_TS = jnp.linspace(0.0, T1, 13)
CONDITIONS = {
    # A downcrossing of y[0] = offset, and y[1] < threshold (boolean).
    "cross": lambda t, y, args, **kwargs: y[0] - args[0],
    "low": lambda t, y, args, **kwargs: y[1] < args[1],
}
UNLOCATED = diffrax.Event(CONDITIONS, direction={"cross": False, "low": None})
SAVEAT = diffrax.SaveAt(
    subs=[diffrax.SubSaveAt(ts=SAVE_TS, t1=True), diffrax.SubSaveAt(steps=True)],
    dense=True,
)
NEVER = (-10.0, -100.0)  # neither condition triggers: the reference solve


@functools.cache
def deer_unlocated():
    def run(offset, threshold, dt0):
        sol = diffrax.diffeqsolve(
            FIXED_TERM,
            TRAPEZOID,
            0.0,
            T1,
            dt0,
            Y0,
            args=(offset, threshold),
            event=UNLOCATED,
            saveat=SAVEAT,
            adjoint=DeerAdjoint(),
            max_steps=3,
        )

        def evaluate(t):
            # The dense output, up to where the solve ended.
            return jnp.where(t <= sol.ts[0][-1], sol.evaluate(t)[0], jnp.inf)

        return sol.ts, sol.ys, sol.event_mask, sol.result._value, jax.vmap(evaluate)

    def outputs(offset, threshold, dt0):
        ts, ys, mask, result, evaluate = run(offset, threshold, dt0)
        nodes = jnp.linspace(0.0, T1, 3 * N + 1)
        return ts, ys, mask, result, evaluate(nodes)

    return jax.jit(outputs)


@functools.cache
def tsit5_on_nodes():
    # Tsit5 stepping from node to node of the three-window DEER grid: diffrax's own
    # convention for an event without a root finder.
    def run(offset, threshold):
        nodes = jnp.linspace(0.0, T1, 3 * N + 1)
        sol = diffrax.diffeqsolve(
            FIXED_TERM,
            diffrax.Tsit5(),
            0.0,
            T1,
            None,
            Y0,
            args=(offset, threshold),
            event=UNLOCATED,
            saveat=diffrax.SaveAt(ts=SAVE_TS, t1=True),
            stepsize_controller=diffrax.StepTo(nodes),
        )
        return sol.ts, sol.event_mask, sol.result._value

    return jax.jit(run)


@pytest.mark.slow
@pytest.mark.parametrize(
    "offset, threshold, triggered",
    [(0.0, -100.0, "cross"), (0.0, -1.0, "low"), (0.0, 10.0, "low")],
    ids=["crossing", "boolean-first", "boolean-at-t0"],
)
def test_unlocated_event_lands_on_the_first_node_like_diffrax(
    offset, threshold, triggered
):
    ts, ys, mask, result, dense = deer_unlocated()(offset, threshold, T1 / 3)
    ref_ts, ref_mask, ref_result = tsit5_on_nodes()(offset, threshold)
    # The same final time, the same saved times (inf after the event), the same
    # mask and result as diffrax on the same nodes.
    np.testing.assert_allclose(ts[0], ref_ts, rtol=1e-13)
    assert {k: bool(v) for k, v in mask.items()} == {
        k: bool(v) for k, v in ref_mask.items()
    }
    assert bool(mask[triggered])
    assert int(result) == int(ref_result) == EVENT
    # Up to the event, the values are those of the solve without an event.
    never_ts, never_ys, never_mask, never_result, never_dense = deer_unlocated()(
        *NEVER, T1 / 3
    )
    assert int(never_result) == SUCCESSFUL
    assert not any(bool(v) for v in never_mask.values())
    t_final = ts[0][jnp.isfinite(ts[0])][-1]
    before = np.asarray(SAVE_TS <= t_final)
    saved = np.asarray(ys[0])[: int(before.sum())]
    np.testing.assert_array_equal(saved, np.asarray(never_ys[0])[: int(before.sum())])
    assert np.all(np.isinf(np.asarray(ys[0])[int(before.sum()) + 1 :]))
    # One `steps` entry per window before the event, then the event's node.
    windows_before = int(np.sum(np.asarray(never_ts[1]) < t_final))
    np.testing.assert_array_equal(
        np.asarray(ts[1])[:windows_before], np.asarray(never_ts[1])[:windows_before]
    )
    if t_final > 0:
        np.testing.assert_allclose(ts[1][windows_before], t_final, rtol=1e-14)
    finite = np.isfinite(np.asarray(dense))
    np.testing.assert_array_equal(
        np.asarray(dense)[finite], np.asarray(never_dense)[finite]
    )


def test_event_in_one_window_against_several():
    # dt0 = t1 - t0 (one window, the single-window branch) against three windows:
    # both land on the first node after the crossing of their own grids.
    t_crossing = float(tsit5_located()(Y0, MU)[0])
    for dt0, num_intervals in [(T1, N), (T1 / 3, 3 * N)]:
        ts, _, mask, result, _ = deer_unlocated()(0.0, -100.0, dt0)
        spacing = T1 / num_intervals
        expected = np.ceil(t_crossing / spacing) * spacing
        t_final = np.asarray(ts[0])[np.isfinite(np.asarray(ts[0]))][-1]
        np.testing.assert_allclose(t_final, expected, rtol=1e-13)
        assert bool(mask["cross"]) and int(result) == EVENT


# ------------------------------------------------------------------------------------
# After the event: nothing more is solved, nothing more fails
# ------------------------------------------------------------------------------------


def blow_up(t, y, args):
    return y**2  # y(t) = y0 / (1 - y0 t): infinite at t = 1 from y0 = 1


@pytest.mark.slow
def test_windows_after_an_event_do_not_raise():
    # The event (y > 5, at t = 0.8 from y0 = 1) lies in the first of two StepTo
    # windows; the second would run into the blow-up at t = 1 and fail. Batched with
    # a solution that never triggers, so the second window still runs for the batch:
    # it must neither raise (throw=True) nor change the stopped element's result.
    event = diffrax.Event(lambda t, y, args, **kwargs: y[0] > 5.0)

    def solve(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(blow_up),
            DeerSolver(num_steps=64),
            0.0,
            2.0,
            None,
            y0,
            event=event,
            stepsize_controller=diffrax.StepTo(jnp.array([0.0, 0.9, 2.0])),
            adjoint=DeerAdjoint(),
        )
        return sol.ts[0], sol.event_mask, sol.result._value

    ts, masks, results = jax.jit(jax.vmap(solve))(jnp.array([[1.0], [0.1]]))
    assert 0.8 <= float(ts[0]) < 0.8 + 0.9 / 64
    np.testing.assert_array_equal(masks, [True, False])
    np.testing.assert_array_equal(results, [EVENT, SUCCESSFUL])
    np.testing.assert_allclose(ts[1], 2.0)


# ------------------------------------------------------------------------------------
# diffrax's own loop: refused
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adjoint",
    [diffrax.RecursiveCheckpointAdjoint(), diffrax.DirectAdjoint()],
    ids=["default", "direct"],
)
def test_event_with_diffrax_loop_is_refused(adjoint):
    def solve():
        return diffrax.diffeqsolve(
            TERM, TRAPEZOID, 0.0, 7.0, 7.0, Y0, args=MU, event=LOCATED, adjoint=adjoint
        )

    with pytest.raises(NotImplementedError, match="DeerAdjoint.*every node"):
        jax.eval_shape(solve)


def test_event_with_an_adaptive_controller_names_fixed_windows():
    # The remedy, DeerAdjoint, takes fixed windows: the refusal says so at once,
    # rather than sending the user to a second refusal.
    def solve():
        return diffrax.diffeqsolve(
            TERM,
            DeerSolver(),
            0.0,
            7.0,
            None,
            Y0,
            args=MU,
            event=LOCATED,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        )

    with pytest.raises(NotImplementedError, match="fixed windows.*StepTo"):
        jax.eval_shape(solve)
