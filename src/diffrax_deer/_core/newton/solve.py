"""`newton_solve`: plain DEER, then the rescue if asked for and needed."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Inexact, Int, PyTree, Real

from ..discretisation import AbstractDiscretisation, JacobianMode, VectorField
from .levenberg_marquardt import levenberg_marquardt_rescue
from .norms import residual_norm
from .plain import PlainNewtonState, plain_newton
from .step import BestIterate, NewtonProblem, NewtonProgress, select


class NewtonStats(eqx.Module):
    """What a DEER Newton solve reports about itself.

    **Arguments:**

    - `num_iters`: Newton iterations taken (each one linear solve, accepted or not).
    - `num_rejected`: iterations whose step was rejected (non-finite, or with
        damping, not decreasing the residual enough) and retried shorter.
    - `update_norm`: the estimated error of the last iterate, in units of the
        tolerance: the scaled size of the last accepted update,
        $u = \\max_i \\mathrm{RMS}(\\delta_i / (\\text{atol} + \\text{rtol}|y_i|))$,
        times $\\theta / (1 - \\theta)$ for its contraction $\\theta$ against the
        update before (the first update: $u$ itself); converged when at most 1 on an
        undamped step.
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


def _stats(
    problem: NewtonProblem,
    final_ys: Inexact[Array, "nodes n"],
    final_stages: PyTree[Array] | None,
    best: BestIterate,
    progress: NewtonProgress,
    damping: Real[Array, ""],
) -> tuple[Inexact[Array, "nodes n"], PyTree[Array] | None, NewtonStats]:
    # Converged: the last iterate. Otherwise the one with the smallest residual.
    final_norm = residual_norm(problem.residual(final_ys, final_stages))
    use_final = progress.converged | (final_norm < best.residual_norm)
    ys, stages = select(use_final, (final_ys, final_stages), (best.ys, best.stages))
    stats = NewtonStats(
        num_iters=progress.num_iters,
        num_rejected=progress.num_rejected,
        update_norm=progress.error_estimate,
        residual_norm=jnp.where(use_final, final_norm, best.residual_norm),
        damping=damping,
        converged=progress.converged,
        diverged=~progress.converged & progress.last_step_non_finite,
    )
    return ys, stages, stats


def _check_tolerances(rtol, atol) -> None:
    def negative(x):
        return not isinstance(x, jax.Array) and x < 0

    if negative(rtol) or (atol is not None and negative(atol)):
        raise ValueError(f"Tolerances must be >= 0; got rtol={rtol}, atol={atol}.")
    if atol is None and not isinstance(rtol, jax.Array) and rtol == 0:
        raise ValueError("`atol=None` scales with `rtol`, which must then be > 0.")
    if (atol is not None and not isinstance(atol, jax.Array) and atol == 0) and (
        not isinstance(rtol, jax.Array) and rtol == 0
    ):
        raise ValueError("`rtol` and `atol` cannot both be zero.")


def newton_solve(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Inexact[Array, " nodes"],
    guess: Inexact[Array, "nodes n"],
    stages: PyTree[Array] | None,
    args: PyTree,
    *,
    rtol: float,
    atol: float | None,
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
    Plain Newton carries only the iterate (and the best one) from one iteration to
    the next, so memory is about 7 trajectories with diagonal Jacobians and
    $O(N n^2)$ once with full ones. A non-finite step is halved and retried.

    **Stopping rule.** With $u_k = \max_i \mathrm{RMS}(\delta_i / (\text{atol} +
    \text{rtol}\,|y_i|))$ the scaled size of update $k$ and $\theta_k = u_k /
    u_{k-1}$ its contraction, the error left in the iterate is estimated as
    $\theta_k / (1 - \theta_k)\, u_k$ (Hairer and Wanner's RADAU5; $u_0$ itself
    after the first update), and Newton has converged when that is at most 1:
    `rtol` and `atol` bound the error of the returned iterate, not the last step.
    An update that does not contract ($\theta_k \geq 1$) never shows convergence.
    `atol=None` scales with the trajectory: $\text{rtol}$ times each component's
    largest magnitude on the window (at least 10 machine epsilons of the largest
    component), so rescaling the state changes nothing. `rtol=0` or `atol=0` (not
    both) give pure absolute or relative tolerances.

    **Damping.** With `damping=True`, if a plain step overflows Newton resumes from
    the best iterate with Levenberg-Marquardt steps, $\delta$ minimising
    $\sum_i \|\delta_{i+1} - A_i \delta_i - b_i\|^2 + \lambda \sum_i
    \|\delta_i\|^2$, a parallel Kalman smoother
    ([`diffrax_deer.solve_damped_recurrence`][]). A damped step is accepted when the
    merit $\tfrac12\|b(R)\|^2$ falls by at least $10^{-4}$ of the decrease the
    linear model predicts; $\lambda$ starts at 1 and follows Nielsen's rule from
    that ratio $\rho$ ($\lambda \leftarrow \lambda \max(\tfrac13, 1 - (2\rho -
    1)^3)$ on acceptance, doubling growth on rejection), and is switched off below
    $10^{-6}$ or when a damped step is within tolerance: only undamped steps show
    convergence; if they fail, damping resumes. This rescue is a second loop,
    entered only after an overflow, so where plain Newton converges the iterations
    are exactly those without damping (its buffers are still reserved: up to 3x
    the memory for dense Jacobians).

    Newton stops when converged, at `max_iters`, or when the damping passes
    $10^{12}$ (undamped: the step shrinks below $2^{-20}$) without an acceptable
    step; unless converged it returns the iterate with the smallest residual. This
    is pure JAX, and not meant to be differentiated: see
    [`diffrax_deer.solve_window`][] for derivatives.

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays of shape `(n,)`.
    - `discretisation`: the per-interval residual, e.g. [`diffrax_deer.Trapezoid`][].
    - `ts`: the `N + 1` grid nodes.
    - `guess`: the starting iterate, shape `(N + 1, n)`; `guess[0]` is $y_0$.
    - `stages`: the starting stage unknowns, from `discretisation.init_stages`.
    - `args`: passed to `vector_field`.
    - `rtol`, `atol`: the tolerances on the iterate's estimated error (per
        component, `atol + rtol * |y|`); `atol=None` scales with the trajectory.
    - `max_iters`: the most Newton iterations to take.
    - `jacobian`: `"full"` (DEER: quadratic convergence, $O(N n^2)$ memory) or
        `"diagonal"` (quasi-DEER: $O(N n)$ memory, linear convergence).
    - `damping`: whether to continue with Levenberg-Marquardt steps once a plain
        Newton step overflows.

    **Returns:**

    The node values $y_i$, shape `(N + 1, n)`; the stage unknowns (or `None`); and
    [`diffrax_deer.NewtonStats`][].
    """
    _check_tolerances(rtol, atol)
    problem = NewtonProblem(
        vector_field, discretisation, ts, args, rtol, atol, jacobian
    )
    plain = plain_newton(
        problem, guess, stages, max_iters, halve_non_finite=not damping
    )
    if damping:
        return _stats(problem, *_rescue_if_overflowed(problem, plain, max_iters))
    no_damping = jnp.zeros((), plain.step_fraction.dtype)
    return _stats(
        problem, plain.ys, plain.stages, plain.best, plain.progress, no_damping
    )


def _rescue_if_overflowed(
    problem: NewtonProblem, plain: PlainNewtonState, max_iters: int
) -> tuple[
    Inexact[Array, "nodes n"],
    PyTree[Array] | None,
    BestIterate,
    NewtonProgress,
    Real[Array, ""],
]:
    # A separate loop, so that plain Newton (usually all there is) runs exactly as
    # without damping: its iterations cost the same and XLA can reuse the buffers
    # of one loop for the other.
    def rescue():
        state = levenberg_marquardt_rescue(
            problem, plain.best, plain.progress, max_iters
        )
        return state.ys, state.stages, state.best, state.progress, state.damping

    def no_rescue():
        no_damping = jnp.zeros((), plain.step_fraction.dtype)
        return plain.ys, plain.stages, plain.best, plain.progress, no_damping

    progress = plain.progress
    needs_rescue = (
        (progress.num_iters < max_iters)
        & ~progress.converged
        & progress.last_step_non_finite
    )
    return jax.lax.cond(needs_rescue, rescue, no_rescue)
