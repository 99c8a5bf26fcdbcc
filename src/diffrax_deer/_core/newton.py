"""Newton's method on the residual of a whole trajectory, one parallel scan per step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Inexact, Int, PyTree, Real

from .damped_scan import solve_damped_recurrence
from .discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    JacobianMode,
    Residual,
    VectorField,
)
from .scan import is_diagonal, solve_affine_recurrence


# Damping is a rescue: Newton runs undamped, as plain DEER, which may let the
# residual grow by many orders of magnitude on its way to converging (from a poor
# guess DEER converges front to back), until a step overflows. Then it resumes from
# the best iterate with Levenberg-Marquardt damping `_FIRST_DAMPING`, adapted by
# Nielsen's rule from the ratio of the actual to the predicted decrease (a step is
# accepted above `_ACCEPT_RATIO`), and switched off again below `_MIN_DAMPING` or
# when a damped step is within tolerance (only an undamped step can show
# convergence). A later rescue resumes from four times the damping last used.
_FIRST_DAMPING = 1.0
_MIN_DAMPING = 1e-6
_ACCEPT_RATIO = 1e-4
# Give up when the damping (or, undamped, the step shrinking) has gone this far
# without an acceptable step: Newton is stuck.
_MAX_DAMPING = 1e12
_MIN_STEP_FRACTION = 2.0**-20


class NewtonStats(eqx.Module):
    """What a DEER Newton solve reports about itself.

    **Arguments:**

    - `num_iters`: Newton iterations taken (each one linear solve, accepted or not).
    - `num_rejected`: iterations whose step was rejected (non-finite, or with
        damping, not decreasing the residual enough) and retried shorter.
    - `update_norm`: the scaled size of the last accepted update,
        $\\max_i \\mathrm{RMS}(\\delta_i / (\\text{atol} + \\text{rtol}|y_i|))$;
        converged when at most 1 on an undamped step.
    - `residual_norm`: $\\max_i \\mathrm{RMS}(r_i)$ of the returned iterate (node and
        stage residuals).
    - `damping`: the Levenberg-Marquardt damping $\\lambda$ at the end (0 when the
        last step was a pure Newton step).
    - `converged`: whether Newton converged within `max_iters`.
    - `diverged`: whether it stopped without converging and its last step was
        non-finite (the vector field, its Jacobian or the update overflowed).
    """

    num_iters: Int[Array, ""]
    num_rejected: Int[Array, ""]
    update_norm: Real[Array, ""]
    residual_norm: Real[Array, ""]
    damping: Real[Array, ""]
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]


def _all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    leaves = jtu.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _max_rms(x: Inexact[Array, "... n"]) -> Real[Array, ""]:
    rms = jnp.sqrt(jnp.mean(jnp.abs(x) ** 2, axis=-1))
    # NaN counts as infinitely large. The guard also keeps XLA:CPU (jaxlib 0.10)
    # from emitting this reduction as a YNN fusion, which is ~30x slower on arrays
    # of shape (N, 1) (a hidden size of 1).
    return jnp.max(jnp.where(jnp.isnan(rms), jnp.inf, rms))


def _residual_norm(residual: Residual) -> Real[Array, ""]:
    return jnp.max(jnp.stack([_max_rms(x) for x in jtu.tree_leaves(residual)]))


def _sum_squares(tree: PyTree[Array]) -> Real[Array, ""]:
    return sum(jnp.sum(jnp.abs(x) ** 2) for x in jtu.tree_leaves(tree))


def _merit(linearisation: AbstractLinearisation, residual: Residual):
    """$\\tfrac12 \\|b(R)\\|^2$: the residual with the per-interval systems of the
    current linearisation solved (the least-squares objective of damped Newton)."""
    negative = jtu.tree_map(jnp.negative, residual)
    offsets = linearisation.offsets(negative)
    stage_offsets = linearisation.stage_offsets(negative)
    return offsets, 0.5 * (_sum_squares(offsets) + _sum_squares(stage_offsets))


def _model_residual(transitions, offsets, delta_ys):
    # delta_{i+1} - A_i delta_i - b_i: zero for the undamped step.
    if is_diagonal(transitions, offsets):
        mapped = transitions * delta_ys[:-1]
    else:
        mapped = jnp.einsum("inm,im->in", transitions, delta_ys[:-1])
    return delta_ys[1:] - mapped - offsets


def newton_solve(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Inexact[Array, " nodes"],
    guess: Inexact[Array, "nodes n"],
    stages: PyTree[Array] | None,
    args: PyTree,
    *,
    rtol: float,
    atol: float,
    max_iters: int,
    jacobian: JacobianMode = "full",
    damping: bool = False,
) -> tuple[Inexact[Array, "nodes n"], PyTree[Array] | None, NewtonStats]:
    r"""Solves $r_i(y_i, y_{i+1}) = 0$ for all intervals at once by Newton's method.

    `guess[0]` is the initial value and stays fixed. Each iteration linearises the
    residual at the current iterate ($f$ and $\partial f/\partial y$, or only its
    diagonal with `jacobian="diagonal"`, at every node or stage point, vectorised),
    which turns the Newton system into the affine recurrence
    $\delta_{i+1} = A_i \delta_i + b_i$, $\delta_0 = 0$, with $b = b(-R)$ the
    residual with the per-interval systems solved. It is solved by a parallel scan.

    With `damping=True`, damping is a rescue. Newton runs undamped, as plain DEER,
    which may let the residual grow by orders of magnitude on its way to converging
    (from a poor guess DEER converges front to back), until a step overflows. Then
    it resumes from the best iterate (or, when the first undamped step after damped
    ones overflows, from where it is)
    with Levenberg-Marquardt steps: $\delta$ minimises
    $\sum_i \|\delta_{i+1} - A_i \delta_i - b_i\|^2 + \lambda \sum_i \|\delta_i\|^2$,
    a parallel Kalman smoother in $O(\log N)$ depth
    ([`diffrax_deer.solve_damped_recurrence`][]). A damped step is accepted when
    the merit $\tfrac12\|b(R)\|^2$ falls by at least $10^{-4}$ of the decrease the
    linear model predicts; $\lambda$ starts at 1 and follows Nielsen's rule from
    that ratio $\rho$ ($\lambda \leftarrow \lambda \max(\tfrac13, 1 - (2\rho - 1)^3)$
    on acceptance, doubling growth on rejection). It is switched off below
    $10^{-6}$ or when a damped step is within tolerance: only an undamped step can
    show convergence, and if that fails, damping resumes where it was. The rescue is
    a second loop after plain Newton's, entered only when plain Newton overflowed,
    so where plain Newton converges its iterations are exactly those without
    damping (the rescue's buffers are still reserved: up to 3x the memory for
    dense Jacobians). Without
    damping, a non-finite step is halved and retried.

    Plain Newton carries only the iterate (and the best one) from one iteration to
    the next: each iteration forms its linearisation and lets it go, so memory is
    about 7 trajectories with diagonal Jacobians and $O(N n^2)$ once with full ones.

    Newton has converged when an undamped step is within `atol + rtol * |y|` in the
    RMS norm at every node. It stops then, at `max_iters`, or when the damping
    passes $10^{12}$ (undamped: the step shrinks below $2^{-20}$) without an
    acceptable step. Unless converged it returns the iterate with the smallest
    residual.

    This is pure JAX and knows nothing of diffrax. It is not meant to be
    differentiated: see [`diffrax_deer.solve_window`][] for derivatives.

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays of shape `(n,)`.
    - `discretisation`: the per-interval residual, e.g. [`diffrax_deer.Trapezoid`][].
    - `ts`: the `N + 1` grid nodes.
    - `guess`: the starting iterate, shape `(N + 1, n)`; `guess[0]` is $y_0$.
    - `stages`: the starting stage unknowns, from `discretisation.init_stages`.
    - `args`: passed to `vector_field`.
    - `rtol`, `atol`: the stopping tolerances.
    - `max_iters`: the most Newton iterations to take.
    - `jacobian`: `"full"` (DEER: quadratic convergence, $O(N n^2)$ memory) or
        `"diagonal"` (quasi-DEER: $O(N n)$ memory, linear convergence).
    - `damping`: whether to continue with Levenberg-Marquardt steps once a plain
        Newton step overflows.

    **Returns:**

    The node values $y_i$, shape `(N + 1, n)`; the stage unknowns (or `None`); and
    [`diffrax_deer.NewtonStats`][].
    """
    real_dtype = jnp.finfo(guess.dtype).dtype
    zero_update = jnp.zeros(guess.shape[1:], guess.dtype)

    def linearise(ys, stages):
        return discretisation.linearise(vector_field, ts, ys, stages, args, jacobian)

    def step(linearisation, negative_residual, offsets, damping_value, damped):
        transitions = linearisation.transitions

        def plain():
            return solve_affine_recurrence(transitions, offsets, zero_update)

        def levenberg_marquardt():
            return solve_damped_recurrence(transitions, offsets, damping_value)

        if damped:
            delta_ys = jax.lax.cond(damping_value > 0, levenberg_marquardt, plain)
        else:
            delta_ys = plain()
        delta_stages = linearisation.stage_update(negative_residual, delta_ys)
        if damped:
            model = _model_residual(transitions, offsets, delta_ys)
            return delta_ys, delta_stages, 0.5 * _sum_squares(model)
        return delta_ys, delta_stages, None

    def cond_fun(carry):
        num_iters, _, _, _, _, stop = carry
        return (num_iters < max_iters) & ~stop

    def trial_point(ys, stages, step_fraction, delta_ys, delta_stages):
        # The iterate after the step, and the step's scaled size (at most 1:
        # within tolerance).
        trial_ys = ys + step_fraction * delta_ys
        trial_stages = jtu.tree_map(
            lambda z, dz: z + step_fraction * dz, stages, delta_stages
        )
        scale = atol + rtol * jnp.maximum(jnp.abs(ys), jnp.abs(trial_ys))
        update_norm = _max_rms(step_fraction * delta_ys / scale)
        finite = jnp.isfinite(update_norm) & _all_finite((trial_ys, trial_stages))
        return trial_ys, trial_stages, update_norm, finite

    def update_best(best, ys, stages, residual):
        # Best iterate so far, judged at the current one, whose residual we have.
        current_norm = _residual_norm(residual)
        current_norm = jnp.where(jnp.isfinite(current_norm), current_norm, jnp.inf)
        return jax.lax.cond(
            current_norm < best[2],
            lambda: (ys, stages, current_norm),
            lambda: best,
        )

    def plain_body(carry):
        # Plain DEER. Only the iterate is carried: its linearisation is formed here
        # and dies here, so it is not live through the next one. A non-finite step
        # is halved and retried (relinearising at the same point: failures only),
        # or with `damping`, ends the loop and the rescue takes over.
        num_iters, (ys, stages), best, control, counts, _ = carry
        step_fraction, last_update_norm = control[2], control[3]
        num_rejected, _ = counts
        residual, linearisation = linearise(ys, stages)
        best = update_best(best, ys, stages, residual)
        negative_residual = jtu.tree_map(jnp.negative, residual)
        offsets = linearisation.offsets(negative_residual)
        delta_ys, delta_stages, _ = step(
            linearisation, negative_residual, offsets, None, damped=False
        )
        trial_ys, trial_stages, update_norm, finite = trial_point(
            ys, stages, step_fraction, delta_ys, delta_stages
        )
        converged = finite & (update_norm <= 1) & (step_fraction == 1)
        if damping:
            new_fraction = step_fraction
            stuck = ~finite
        else:
            new_fraction = jnp.where(finite, 1.0, step_fraction / 2)
            stuck = new_fraction < _MIN_STEP_FRACTION
        iterate = jtu.tree_map(
            lambda t, z: jnp.where(finite, t, z),
            (trial_ys, trial_stages),
            (ys, stages),
        )
        control = (
            *control[:2],
            jnp.asarray(new_fraction, real_dtype),
            jnp.where(finite, update_norm, last_update_norm),
            ~finite,
            *control[5:],
        )
        counts = (num_rejected + (~finite).astype(jnp.int32), converged)
        return num_iters + 1, iterate, best, control, counts, converged | stuck

    def damped_body(carry):
        # The rescue: Levenberg-Marquardt steps, and undamped ones once the damping
        # has fallen. The linearisation is carried, so a rejected step is retried
        # with a larger damping without forming it again.
        num_iters, state, best, control, counts, _ = carry
        ys, stages, residual, linearisation = state
        (
            damping_value,
            damping_growth,
            step_fraction,
            _,
            _,
            restart_damping,
            undamped_run,
        ) = control
        num_rejected, _ = counts
        best = update_best(best, ys, stages, residual)
        best_ys, best_stages, _ = best
        negative_residual = jtu.tree_map(jnp.negative, residual)
        offsets, merit = _merit(linearisation, residual)
        delta_ys, delta_stages, model_merit = step(
            linearisation, negative_residual, offsets, damping_value, damped=True
        )
        trial_ys, trial_stages, update_norm, finite = trial_point(
            ys, stages, step_fraction, delta_ys, delta_stages
        )
        small = update_norm <= 1
        undamped = damping_value == 0
        converged = finite & small & undamped & (step_fraction == 1)
        # Actual over predicted decrease of the merit, both measured with this
        # linearisation's per-interval solves.
        trial_residual = discretisation.residual(
            vector_field, ts, trial_ys, trial_stages, args
        )
        _, trial_merit = _merit(linearisation, trial_residual)
        # Undamped steps need only be finite (their merit may overflow in
        # float32 on the way to converging); damped ones must lower the merit.
        give_up = ~finite
        finite = jnp.where(undamped, finite, finite & jnp.isfinite(trial_merit))
        predicted = merit - model_merit
        ratio = (merit - trial_merit) / jnp.where(predicted > 0, predicted, 1)
        ratio = jnp.where(predicted > 0, ratio, 1)
        accept_damped = finite & ((ratio >= _ACCEPT_RATIO) | small)
        accept = jnp.where(undamped, ~give_up, accept_damped) | converged
        restart = undamped & give_up & ~converged
        nielsen = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
        new_damping = jnp.where(
            undamped,
            jnp.where(restart, restart_damping, 0.0),
            jnp.where(
                accept_damped,
                damping_value * nielsen,
                damping_value * damping_growth,
            ),
        )
        # A small damped step proves nothing: try an undamped one next.
        switch_off = (new_damping < _MIN_DAMPING) | (accept & small)
        restart_damping = jnp.where(
            ~undamped & switch_off,
            jnp.maximum(4 * damping_value, 4 * _MIN_DAMPING),
            restart_damping,
        )
        new_damping = jnp.where(switch_off, 0.0, new_damping)
        new_growth = jnp.where(undamped | accept_damped, 2.0, 2 * damping_growth)
        stuck = new_damping > _MAX_DAMPING

        def keep():
            return state

        def relinearise():
            # At the trial point, or after undamped steps failed, at the best one.
            new_ys, new_stages = jtu.tree_map(
                lambda b, t: jnp.where(restart, b, t),
                (best_ys, best_stages),
                (trial_ys, trial_stages),
            )
            new_residual, new_linearisation = linearise(new_ys, new_stages)
            return new_ys, new_stages, new_residual, new_linearisation

        def finish():
            # Newton stops at convergence: no need for the Jacobians there (the
            # residual is evaluated once, after the loop).
            return trial_ys, trial_stages, residual, linearisation

        # The first undamped step after damped ones failed: resume damping here.
        restart_here = restart & (undamped_run == 0)
        branch = jnp.where(
            converged, 2, jnp.where(accept | (restart & ~restart_here), 1, 0)
        )
        state = jax.lax.switch(branch, (keep, relinearise, finish))
        control = (
            new_damping.astype(real_dtype),
            new_growth.astype(real_dtype),
            step_fraction,
            jnp.where(accept, update_norm, control[3]),
            ~finite,
            jnp.asarray(restart_damping, real_dtype),
            jnp.where(undamped & accept, undamped_run + 1, 0),
        )
        counts = (num_rejected + (~accept).astype(jnp.int32), converged)
        return num_iters + 1, state, best, control, counts, converged | stuck

    def rescue(carry):
        # From the best iterate, with Levenberg-Marquardt steps.
        num_iters, _, best, control, counts, _ = carry
        best_ys, best_stages, _ = best
        residual, linearisation = linearise(best_ys, best_stages)
        first = jnp.array(_FIRST_DAMPING, real_dtype)
        _, _, step_fraction, update_norm, last_non_finite, _, _ = control
        control = (
            first,
            jnp.array(2, real_dtype),
            step_fraction,
            update_norm,
            last_non_finite,
            first,
            jnp.array(0, jnp.int32),
        )
        state = (best_ys, best_stages, residual, linearisation)
        carry = (num_iters, state, best, control, counts, jnp.array(False))
        num_iters, state, best, control, counts, stop = jax.lax.while_loop(
            cond_fun, damped_body, carry
        )
        ys, stages, _, _ = state
        return num_iters, (ys, stages), best, control, counts, stop

    init = (
        jnp.array(0, jnp.int32),
        (guess, stages),
        (guess, stages, jnp.array(jnp.inf, real_dtype)),
        # Control: damping, its growth on rejection, step fraction, last update
        # norm, last step non-finite, restart damping, undamped run. Plain Newton
        # uses only the middle three; `rescue` sets the damping fields itself.
        (
            jnp.array(0, real_dtype),
            jnp.array(2, real_dtype),
            jnp.array(1, real_dtype),
            jnp.array(jnp.inf, real_dtype),
            jnp.array(False),
            jnp.array(_FIRST_DAMPING, real_dtype),
            jnp.array(0, jnp.int32),
        ),
        (jnp.array(0, jnp.int32), jnp.array(False)),
        jnp.array(False),
    )
    carry = jax.lax.while_loop(cond_fun, plain_body, init)
    if damping:
        # A separate loop, so that plain Newton (usually all there is) runs exactly
        # as without damping: its iterations cost the same and XLA can reuse the
        # buffers of one loop for the other.
        num_iters, _, _, control, counts, _ = carry
        needs_rescue = (num_iters < max_iters) & ~counts[1] & control[4]
        carry = jax.lax.cond(needs_rescue, rescue, lambda c: c, carry)
    num_iters, (final_ys, final_stages), best, control, counts, _ = carry
    damping_value, _, _, update_norm, last_non_finite, _, _ = control
    num_rejected, converged = counts
    best_ys, best_stages, best_norm = best
    final_norm = _residual_norm(
        discretisation.residual(vector_field, ts, final_ys, final_stages, args)
    )
    final_norm = jnp.where(jnp.isfinite(final_norm), final_norm, jnp.inf)
    # Converged: the last iterate. Otherwise the one with the smallest residual.
    use_final = converged | (final_norm < best_norm)
    ys, stages = jtu.tree_map(
        lambda last, kept: jnp.where(use_final, last, kept),
        (final_ys, final_stages),
        (best_ys, best_stages),
    )
    residual_norm = jnp.where(use_final, final_norm, best_norm)
    stats = NewtonStats(
        num_iters=num_iters,
        num_rejected=num_rejected,
        update_norm=update_norm,
        residual_norm=residual_norm,
        damping=damping_value,
        converged=converged,
        diverged=~converged & last_non_finite,
    )
    return ys, stages, stats
