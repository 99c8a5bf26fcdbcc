"""The Levenberg-Marquardt rescue, entered when a plain Newton step overflows.

Plain DEER may let the residual grow by many orders of magnitude on its way to
converging (from a poor guess DEER converges front to back), until a step overflows.
Then Newton resumes from the best iterate with Levenberg-Marquardt damping
`FIRST_DAMPING`, adapted by Nielsen's rule from the ratio of the actual to the
predicted decrease of the merit (a step is accepted above `ACCEPT_RATIO`), and
switched off again below `MIN_DAMPING` or when a damped step is within tolerance
(only an undamped step can show convergence). A later rescue resumes from four times
the damping last used.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Inexact, Int, PyTree, Real

from ..discretisation import AbstractLinearisation, Residual
from ..scan import is_diagonal
from .norms import error_estimate, sum_squares
from .step import (
    BestIterate,
    NewtonProblem,
    NewtonProgress,
    newton_direction,
    select,
    trial_point,
)


FIRST_DAMPING = 1.0
MIN_DAMPING = 1e-6
ACCEPT_RATIO = 1e-4
# Give up when the damping has grown this far without an acceptable step.
MAX_DAMPING = 1e12


class LevenbergMarquardtState(eqx.Module):
    r"""The state of the rescue loop.

    The linearisation is carried (unlike plain Newton's), so a rejected step is
    retried with a larger damping without forming it again.

    **Arguments:**

    - `ys`, `stages`: the current iterate.
    - `residual`, `linearisation`: at the current iterate.
    - `best`: the iterate with the smallest residual so far.
    - `damping`: the current $\lambda$; 0 for an undamped step.
    - `damping_growth`: the factor $\lambda$ grows by on the next rejection.
    - `restart_damping`: the $\lambda$ to resume from when undamped steps fail.
    - `undamped_run`: accepted undamped steps since the last damped one.
    - `progress`: counters and flags, see `NewtonProgress`.
    """

    ys: Inexact[Array, "nodes n"]
    stages: PyTree[Array] | None
    residual: Residual
    linearisation: AbstractLinearisation
    best: BestIterate
    damping: Real[Array, ""]
    damping_growth: Real[Array, ""]
    restart_damping: Real[Array, ""]
    undamped_run: Int[Array, ""]
    progress: NewtonProgress


def merit(
    linearisation: AbstractLinearisation, residual: Residual
) -> tuple[Inexact[Array, "steps n"], Real[Array, ""]]:
    """The offsets $b(-R)$ and the merit $\\tfrac12 \\|b(R)\\|^2$: the residual with
    the per-interval systems of the linearisation solved (the least-squares
    objective of damped Newton)."""
    negative = jtu.tree_map(jnp.negative, residual)
    offsets = linearisation.offsets(negative)
    stage_offsets = linearisation.stage_offsets(negative)
    return offsets, 0.5 * (sum_squares(offsets) + sum_squares(stage_offsets))


def _model_merit(transitions, offsets, delta_ys) -> Real[Array, ""]:
    # The merit the linear model predicts: of delta_{i+1} - A_i delta_i - b_i, which
    # is zero for the undamped step.
    if is_diagonal(transitions, offsets):
        mapped = transitions * delta_ys[:-1]
    else:
        mapped = jnp.einsum("inm,im->in", transitions, delta_ys[:-1])
    return 0.5 * sum_squares(delta_ys[1:] - mapped - offsets)


class _Damping(eqx.Module):
    damping: Real[Array, ""]
    growth: Real[Array, ""]
    restart: Real[Array, ""]


def _adapt_damping(
    state: LevenbergMarquardtState,
    ratio: Real[Array, ""],
    *,
    accept: Bool[Array, ""],
    accept_damped: Bool[Array, ""],
    restart: Bool[Array, ""],
    small: Bool[Array, ""],
) -> _Damping:
    # Nielsen's rule on acceptance, growing (doubling its growth) on rejection;
    # an undamped step is followed by another, or after a failure by the restart
    # damping.
    undamped = state.damping == 0
    nielsen = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
    damping = jnp.where(
        undamped,
        jnp.where(restart, state.restart_damping, 0.0),
        jnp.where(
            accept_damped,
            state.damping * nielsen,
            state.damping * state.damping_growth,
        ),
    )
    # A small damped step proves nothing: try an undamped one next.
    switch_off = (damping < MIN_DAMPING) | (accept & small)
    restart_damping = jnp.where(
        ~undamped & switch_off,
        jnp.maximum(4 * state.damping, 4 * MIN_DAMPING),
        state.restart_damping,
    )
    damping = jnp.where(switch_off, 0.0, damping)
    growth = jnp.where(undamped | accept_damped, 2.0, 2 * state.damping_growth)
    dtype = state.damping.dtype
    return _Damping(
        damping.astype(dtype), growth.astype(dtype), restart_damping.astype(dtype)
    )


def _damped_step(
    problem: NewtonProblem, state: LevenbergMarquardtState
) -> LevenbergMarquardtState:
    # A Levenberg-Marquardt step, or an undamped one once the damping has fallen.
    best = state.best.update(state.ys, state.stages, state.residual)
    linearisation = state.linearisation
    negative_residual = jtu.tree_map(jnp.negative, state.residual)
    offsets, current_merit = merit(linearisation, state.residual)
    delta_ys, delta_stages = newton_direction(
        linearisation, negative_residual, offsets, state.damping
    )
    model_merit = _model_merit(linearisation.transitions, offsets, delta_ys)
    one = jnp.ones((), state.damping.dtype)
    trial = trial_point(problem, state.ys, state.stages, one, delta_ys, delta_stages)
    small = trial.update_norm <= 1
    undamped = state.damping == 0
    # Only an undamped step can show convergence; the contraction rate is that of
    # consecutive undamped steps (`progress.update_norm` is infinite otherwise).
    estimate = jnp.where(
        undamped,
        error_estimate(trial.update_norm, state.progress.update_norm),
        trial.update_norm,
    )
    converged = trial.finite & undamped & (estimate <= 1)
    # Actual over predicted decrease of the merit, both measured with this
    # linearisation's per-interval solves.
    _, trial_merit = merit(linearisation, problem.residual(trial.ys, trial.stages))
    # Undamped steps need only be finite (their merit may overflow in float32 on
    # the way to converging); damped ones must lower the merit.
    give_up = ~trial.finite
    finite = jnp.where(undamped, trial.finite, trial.finite & jnp.isfinite(trial_merit))
    predicted = current_merit - model_merit
    ratio = (current_merit - trial_merit) / jnp.where(predicted > 0, predicted, 1)
    ratio = jnp.where(predicted > 0, ratio, 1)
    accept_damped = finite & ((ratio >= ACCEPT_RATIO) | small)
    accept = jnp.where(undamped, ~give_up, accept_damped) | converged
    restart = undamped & give_up & ~converged
    damping = _adapt_damping(
        state,
        ratio,
        accept=accept,
        accept_damped=accept_damped,
        restart=restart,
        small=small,
    )

    def keep():
        return state.ys, state.stages, state.residual, linearisation

    def relinearise():
        # At the trial point, or after undamped steps failed, at the best one.
        ys, stages = select(restart, (best.ys, best.stages), (trial.ys, trial.stages))
        return ys, stages, *problem.linearise(ys, stages)

    def finish():
        # Newton stops at convergence: no need for the Jacobians there (the
        # residual is evaluated once, after the loop).
        return trial.ys, trial.stages, state.residual, linearisation

    # The first undamped step after damped ones failed: resume damping here.
    restart_here = restart & (state.undamped_run == 0)
    branch = jnp.where(
        converged, 2, jnp.where(accept | (restart & ~restart_here), 1, 0)
    )
    ys, stages, residual, linearisation = jax.lax.switch(
        branch, (keep, relinearise, finish)
    )
    progress = state.progress.after_step(
        accepted=accept,
        newton_step=undamped,
        update_norm=trial.update_norm,
        error_estimate=estimate,
        non_finite=~finite,
        converged=converged,
        stuck=damping.damping > MAX_DAMPING,
    )
    return LevenbergMarquardtState(
        ys=ys,
        stages=stages,
        residual=residual,
        linearisation=linearisation,
        best=best,
        damping=damping.damping,
        damping_growth=damping.growth,
        restart_damping=damping.restart,
        undamped_run=jnp.where(undamped & accept, state.undamped_run + 1, 0),
        progress=progress,
    )


def levenberg_marquardt_rescue(
    problem: NewtonProblem,
    best: BestIterate,
    progress: NewtonProgress,
    max_iters: int,
) -> LevenbergMarquardtState:
    """From the best iterate, Levenberg-Marquardt steps until converged,
    `max_iters` (counting the plain iterations before), or the damping passes
    `MAX_DAMPING`."""
    residual, linearisation = problem.linearise(best.ys, best.stages)
    dtype = best.residual_norm.dtype
    first = jnp.array(FIRST_DAMPING, dtype)
    init = LevenbergMarquardtState(
        ys=best.ys,
        stages=best.stages,
        residual=residual,
        linearisation=linearisation,
        best=best,
        damping=first,
        damping_growth=jnp.array(2, dtype),
        restart_damping=first,
        undamped_run=jnp.array(0, jnp.int32),
        # Resuming from the best iterate: no contraction rate to go on yet.
        progress=eqx.tree_at(
            lambda p: (p.update_norm, p.terminate),
            progress,
            (jnp.array(jnp.inf, dtype), jnp.array(False)),
        ),
    )

    def cond_fun(state):
        return (state.progress.num_iters < max_iters) & ~state.progress.terminate

    def body_fun(state):
        return _damped_step(problem, state)

    return jax.lax.while_loop(cond_fun, body_fun, init)
