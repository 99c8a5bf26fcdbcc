"""Plain DEER: undamped Newton steps, each one parallel scan."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Inexact, PyTree, Real

from .norms import error_estimate
from .step import (
    BestIterate,
    NewtonProblem,
    NewtonProgress,
    newton_direction,
    select,
    trial_point,
)


# Without damping, a non-finite step is halved and retried; Newton is stuck once
# the step has shrunk this far.
MIN_STEP_FRACTION = 2.0**-20


class PlainNewtonState(eqx.Module):
    """The state of plain Newton's loop: the iterate and scalars only.

    The linearisation is not carried: each iteration forms it at its start and lets
    it go, so it is not live through the next one (memory: one linearisation).

    **Arguments:**

    - `ys`, `stages`: the current iterate.
    - `best`: the iterate with the smallest residual so far.
    - `step_fraction`: the fraction of the Newton step to take (1 unless a
        non-finite step was halved).
    - `progress`: counters and flags, see `NewtonProgress`.
    """

    ys: Inexact[Array, "nodes n"]
    stages: PyTree[Array] | None
    best: BestIterate
    step_fraction: Real[Array, ""]
    progress: NewtonProgress


def _plain_step(
    problem: NewtonProblem, state: PlainNewtonState, halve_non_finite: bool
) -> PlainNewtonState:
    # A non-finite step is halved and retried (relinearising at the same point:
    # failures only), or with `halve_non_finite=False` ends the loop so that the
    # rescue can take over.
    residual, linearisation = problem.linearise(state.ys, state.stages)
    best = state.best.update(state.ys, state.stages, residual)
    negative_residual = jtu.tree_map(jnp.negative, residual)
    offsets = linearisation.offsets(negative_residual)
    delta_ys, delta_stages = newton_direction(linearisation, negative_residual, offsets)
    fraction = state.step_fraction
    trial = trial_point(
        problem, state.ys, state.stages, fraction, delta_ys, delta_stages
    )
    finite = trial.finite
    whole = fraction == 1
    estimate = error_estimate(trial.update_norm, state.progress.update_norm)
    converged = finite & whole & (estimate <= 1)
    if halve_non_finite:
        new_fraction = jnp.where(finite, 1.0, fraction / 2)
        stuck = new_fraction < MIN_STEP_FRACTION
    else:
        new_fraction = fraction
        stuck = ~finite
    ys, stages = select(finite, (trial.ys, trial.stages), (state.ys, state.stages))
    progress = state.progress.after_step(
        accepted=finite,
        newton_step=whole,
        update_norm=trial.update_norm,
        error_estimate=estimate,
        non_finite=~finite,
        converged=converged,
        stuck=stuck,
    )
    return PlainNewtonState(
        ys, stages, best, jnp.asarray(new_fraction, fraction.dtype), progress
    )


def plain_newton(
    problem: NewtonProblem,
    guess: Inexact[Array, "nodes n"],
    stages: PyTree[Array] | None,
    max_iters: int,
    halve_non_finite: bool,
) -> PlainNewtonState:
    """Undamped Newton from `guess` until converged, `max_iters`, or stuck (a
    non-finite step: halved and retried with `halve_non_finite`, else final)."""
    real_dtype = jnp.finfo(guess.dtype).dtype
    init = PlainNewtonState(
        ys=guess,
        stages=stages,
        best=BestIterate(guess, stages, jnp.array(jnp.inf, real_dtype)),
        step_fraction=jnp.array(1, real_dtype),
        progress=NewtonProgress.start(real_dtype),
    )

    def cond_fun(state):
        return (state.progress.num_iters < max_iters) & ~state.progress.terminate

    def body_fun(state):
        return _plain_step(problem, state, halve_non_finite)

    return jax.lax.while_loop(cond_fun, body_fun, init)
