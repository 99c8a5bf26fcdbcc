"""DeerSolver fails loudly and clearly: bad options, unsupported problems, and Newton
solves that do not converge or produce non-finite values."""

import re

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrax_deer import DeerAdjoint, DeerSolver, GaussLegendre


# float64 unless a test says otherwise (conftest.py sets this too; repeated here so
# the module does not depend on it).
jax.config.update("jax_enable_x64", True)


def field(t, y, args):
    """A nonlinear 2-state field (Lotka-Volterra)."""
    prey, predator = y[0], y[1]
    return jnp.stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator])


Y0 = jnp.array([1.0, 1.0])
T0, T1 = 0.0, 2.0
N = 64
TERM = diffrax.ODETerm(field)
SOLVER = DeerSolver(N)


def deer_solve(solver=SOLVER, term=TERM, y0=Y0, t1=T1, **kwargs):
    kwargs.setdefault("saveat", diffrax.SaveAt(t1=True, solver_state=True))
    return diffrax.diffeqsolve(term, solver, T0, t1, t1 - T0, y0, **kwargs)


def trace_only(fn):
    """Traces `fn` without compiling or running it: errors raised here are raised at
    trace time."""
    return jax.eval_shape(fn)


# ------------------------------------------------------------------------------------
# Newton not converging, non-finite values
# ------------------------------------------------------------------------------------

ONE_ITERATION = DeerSolver(N, max_iters=1, predictor_steps=0)


@pytest.mark.slow
def test_not_converged_result_without_throw():
    sol = deer_solve(ONE_ITERATION, throw=False)
    assert sol.result == diffrax.RESULTS.nonlinear_max_steps_reached
    assert int(sol.solver_state.num_iters) == 1
    assert float(sol.solver_state.update_norm) > 1.0


@pytest.mark.slow
def test_not_converged_raises_with_throw():
    # DeerSolver's own message, not diffrax's "increase `max_steps`" (which counts
    # windows): what was measured, and the remedies.
    with pytest.raises(RuntimeError) as info:
        deer_solve(ONE_ITERATION, throw=True)
    message = str(info.value)
    for needle in (
        "did not converge in the window [0, 2]",
        "after 1 iteration (max_iters=1)",
        "shorter windows",
        "`dt0`",
        "damping=True",
        "max_iters=...",
    ):
        assert needle in message
    assert re.search(r"the residual is \d\.\d{3}e[-+]\d+", message)
    assert "may need to increase `max_steps`" not in message


@pytest.mark.slow
def test_not_converged_message_under_jit_with_deer_adjoint():
    solve = jax.jit(lambda y0: deer_solve(ONE_ITERATION, y0=y0, adjoint=DeerAdjoint()))
    with pytest.raises(RuntimeError, match=r"after 1 iteration \(max_iters=1\)"):
        solve(Y0).ys.block_until_ready()


def log_field(t, y, args):
    return jnp.log(y - 10.0)  # NaN everywhere near y0


def sqrt_field(t, y, args):
    return -jnp.sqrt(y)  # reaches zero in finite time, then sqrt of a negative


def blow_up_field(t, y, args):
    return y**2  # y(t) = 1 / (1 - t) from y0 = 1: infinite at t = 1 < T1


@pytest.mark.slow
@pytest.mark.parametrize("vector_field", [log_field, sqrt_field])
def test_non_finite_vector_field_is_divergence(vector_field):
    sol = deer_solve(
        term=diffrax.ODETerm(vector_field), y0=jnp.array([1.0, 0.5]), throw=False
    )
    assert sol.result == diffrax.RESULTS.nonlinear_divergence
    # The returned values are the last finite iterate, not NaN.
    assert np.all(np.isfinite(sol.ys))


@pytest.mark.slow
def test_non_finite_raises_with_throw():
    with pytest.raises(RuntimeError, match="diverged.*damping=True"):
        deer_solve(term=diffrax.ODETerm(log_field), y0=jnp.array([1.0, 0.5]))


@pytest.mark.slow
def test_blow_up_is_not_reported_as_success():
    sol = deer_solve(
        term=diffrax.ODETerm(blow_up_field), y0=jnp.array([1.0, 1.0]), throw=False
    )
    assert sol.result != diffrax.RESULTS.successful


# ------------------------------------------------------------------------------------
# Unsupported terms, controllers and adjoints
# ------------------------------------------------------------------------------------


def diffusion(t, y, args):
    return 0.1 * jnp.diag(y)


def brownian_motion():
    return diffrax.VirtualBrownianTree(
        T0, T1, tol=1e-3, shape=(2,), key=jax.random.key(0)
    )


SDE_WARNING = "ignore:`DeerSolver` is not marked as converging:UserWarning"


@pytest.mark.filterwarnings(SDE_WARNING)
def test_sde_raises_value_error_at_trace_time():
    terms = diffrax.MultiTerm(TERM, diffrax.ControlTerm(diffusion, brownian_motion()))
    with pytest.raises(ValueError, match="not SDEs.*SDE solvers"):
        trace_only(lambda: deer_solve(term=terms))


@pytest.mark.filterwarnings(SDE_WARNING)
def test_lone_control_term_raises_value_error_at_trace_time():
    term = diffrax.ControlTerm(diffusion, brownian_motion())
    with pytest.raises(ValueError, match="not SDEs.*SDE solvers"):
        trace_only(lambda: deer_solve(term=term))


@pytest.mark.slow
def test_multi_term_of_odes_equals_summed_field():
    def part_a(t, y, args):
        return jnp.stack([1.5 * y[0], -3.0 * y[1]])

    def part_b(t, y, args):
        return jnp.stack([-y[0] * y[1], y[0] * y[1]])

    terms = diffrax.MultiTerm(diffrax.ODETerm(part_a), diffrax.ODETerm(part_b))
    sol_multi = deer_solve(term=terms)
    sol_single = deer_solve()
    assert sol_single.result == diffrax.RESULTS.successful
    assert sol_multi.result == diffrax.RESULTS.successful
    np.testing.assert_allclose(sol_multi.ys, sol_single.ys, rtol=1e-12)


def test_adaptive_step_size_controller_without_estimate_is_refused():
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    # diffrax's own error: without its estimate DeerSolver gives no `y_error`.
    solver = DeerSolver(N, error_estimate=False)
    with pytest.raises(RuntimeError, match="does not provide error estimates"):
        trace_only(lambda: deer_solve(solver, stepsize_controller=controller))


def test_backsolve_adjoint_grad_raises_not_implemented():
    def loss(y0):
        sol = deer_solve(
            y0=y0, adjoint=diffrax.BacksolveAdjoint(), saveat=diffrax.SaveAt(t1=True)
        )
        return jnp.sum(sol.ys)

    # The forward solve alone is fine; its gradient is refused, pointing to the
    # default adjoint.
    trace_only(lambda: loss(Y0))
    with pytest.raises(NotImplementedError, match="RecursiveCheckpointAdjoint"):
        trace_only(lambda: jax.grad(loss)(Y0))


# ------------------------------------------------------------------------------------
# Bad options and states
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=-3), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(num_steps=True), "num_steps"),
        (dict(num_steps="10"), "num_steps"),
        (dict(num_steps=10, max_iters=0), "max_iters"),
        (dict(num_steps=10, max_iters=2.0), "max_iters"),
        (dict(num_steps=10, rtol=-1), "rtol"),
        # Tolerances that would make Newton stop at once, or never.
        (dict(num_steps=10, atol=float("inf")), "atol"),
        (dict(num_steps=10, rtol=float("nan")), "rtol"),
        (dict(num_steps=10, rtol=True), "rtol"),
        (dict(num_steps=10, atol=np.bool_(True)), "atol"),
        (dict(num_steps=10, rtol=1e-3j), "rtol"),
        (dict(num_steps=10, atol="1e-8"), "atol"),
        (dict(num_steps=10, rtol=0, atol=0.0), "both be 0"),
        # Counters are int32: 2**31 would wrap (0 iterations in float64).
        (dict(num_steps=10, max_iters=2**31), "max_iters"),
        (dict(num_steps=2**31), "num_steps"),
        (dict(num_steps=10, predictor_steps=2**31), "predictor_steps"),
        (dict(num_steps=10, damping=1), "damping"),
        (dict(num_steps=10, damping=np.int64(1)), "damping"),
        (dict(num_steps=10, predictor_steps=-1), "predictor_steps"),
        (dict(num_steps=10, predictor_steps=1.5), "predictor_steps"),
        (dict(num_steps=10, method="trapezoid"), "method"),
        (dict(num_steps=10, matmul_precision="exact"), "matmul_precision"),
    ],
)
def test_bad_options_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DeerSolver(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_steps=np.int64(10)),
        dict(num_steps=10, max_iters=np.int32(5)),
        dict(num_steps=10, rtol=np.float32(1e-6)),
        dict(num_steps=10, atol=jnp.float64(1e-8)),
        dict(num_steps=10, max_iters=jnp.int32(5)),
        dict(num_steps=10, predictor_steps=np.array(3)),
        dict(num_steps=10, damping=np.bool_(True)),
        dict(num_steps=10, damping=jnp.bool_(False)),
    ],
    ids=[
        "num_steps=np.int64",
        "max_iters=np.int32",
        "rtol=np.float32",
        "atol=jnp.float64",
        "max_iters=jnp.int32",
        "predictor_steps=np.array",
        "damping=np.bool_",
        "damping=jnp.bool_",
    ],
)
def test_numpy_and_jax_scalar_options_are_accepted(kwargs):
    solver = DeerSolver(**kwargs)
    for name, value in kwargs.items():
        converted = getattr(solver, name)
        assert type(converted) in (bool, int, float)
        assert converted == value
    hash(solver)  # static fields


def test_pure_absolute_or_relative_tolerance_is_accepted():
    assert DeerSolver(10, rtol=0, atol=1e-8).rtol == 0
    assert DeerSolver(10, rtol=1e-8, atol=0.0).atol == 0


def test_infinite_tolerance_no_longer_reports_a_wrong_answer_as_success():
    # Accepted before, Newton stopped after one step from the constant guess and
    # reported "successful" far from the answer.
    with pytest.raises(ValueError, match="finite"):
        DeerSolver(num_steps=1000, atol=float("inf"), predictor_steps=0)


@pytest.mark.parametrize("stages", [1.0, True, "2", 4])
def test_bad_collocation_stages_raise_at_construction(stages):
    with pytest.raises(ValueError, match="stages"):
        GaussLegendre(stages=stages)


def test_numpy_collocation_stages_are_accepted():
    method = GaussLegendre(stages=np.int64(2))
    assert type(method.stages) is int and method.stages == 2


def test_valid_options_construct():
    DeerSolver(1)
    DeerSolver(10, rtol=1e-8, atol=1e-9, max_iters=1, predictor_steps=0)
    DeerSolver(10, predictor_steps=5)


@pytest.mark.filterwarnings("ignore:Complex dtype support:UserWarning")
def test_complex_state_raises_value_error():
    y0 = jnp.array([1.0 + 1.0j, 0.5 - 0.2j])
    with pytest.raises(ValueError, match="complex"):
        trace_only(lambda: deer_solve(term=diffrax.ODETerm(lambda t, y, a: -y), y0=y0))


@pytest.mark.slow
def test_python_nan_in_args_is_divergence():
    # A Python float in `args` is a static argument of the closure-converted field;
    # NaN, never equal to itself, once failed its equality check with a ValueError.
    # A jnp.array(nan) was already reported as divergence.
    def decay(t, y, rate):
        return -rate * y

    for rate in (float("nan"), jnp.array(jnp.nan)):
        sol = deer_solve(term=diffrax.ODETerm(decay), args=rate, throw=False)
        assert sol.result == diffrax.RESULTS.nonlinear_divergence


@pytest.mark.parametrize(
    "other_solver, other_y0",
    [(DeerSolver(N // 2), Y0), (SOLVER, jnp.ones(3))],
    ids=["other-num-steps", "other-state-size"],
)
def test_solver_state_of_another_problem_is_refused(other_solver, other_y0):
    state = other_solver.init(TERM, T0, T1, other_y0, None)
    with pytest.raises(ValueError, match="`solver_state` comes from another problem"):
        trace_only(lambda: deer_solve(solver_state=state))


def test_solver_state_of_other_time_dtype_is_refused():
    state = SOLVER.init(TERM, jnp.float32(T0), jnp.float32(T1), Y0, None)
    with pytest.raises(ValueError, match="float32 times"):
        trace_only(lambda: deer_solve(solver_state=state))
