"""What plain Newton and the Levenberg-Marquardt rescue share: the problem, the step,
the trial point, the best iterate so far and the progress counters."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Inexact, Int, PyTree, Real

from ..discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    JacobianMode,
    Residual,
    VectorField,
)
from .norms import all_finite, residual_norm, scaled_update_norm


class NewtonProblem(eqx.Module):
    """The residual Newton solves, and its stopping tolerances.

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays.
    - `discretisation`: the per-interval residual.
    - `ts`: the grid nodes.
    - `args`: passed to `vector_field`.
    - `rtol`, `atol`: the stopping tolerances; `atol=None` scales with the
        trajectory (see `tolerance_scale`).
    - `jacobian`: `"full"` or `"diagonal"`.
    """

    vector_field: VectorField
    discretisation: AbstractDiscretisation
    ts: Inexact[Array, " nodes"]
    args: PyTree
    # Not static: a step-size controller's tolerances are traced values.
    rtol: Real[ArrayLike, ""]
    atol: Real[ArrayLike, ""] | None
    jacobian: JacobianMode = eqx.field(static=True)

    def residual(
        self, ys: Inexact[Array, "nodes n"], stages: PyTree[Array] | None
    ) -> Residual:
        return self.discretisation.residual(
            self.vector_field, self.ts, ys, stages, self.args
        )

    def linearise(
        self, ys: Inexact[Array, "nodes n"], stages: PyTree[Array] | None
    ) -> tuple[Residual, AbstractLinearisation]:
        return self.discretisation.linearise(
            self.vector_field, self.ts, ys, stages, self.args, self.jacobian
        )


class BestIterate(eqx.Module):
    """The iterate with the smallest residual norm seen so far (returned when
    Newton does not converge)."""

    ys: Inexact[Array, "nodes n"]
    stages: PyTree[Array] | None
    residual_norm: Real[Array, ""]

    def update(
        self,
        ys: Inexact[Array, "nodes n"],
        stages: PyTree[Array] | None,
        residual: Residual,
    ) -> "BestIterate":
        # Judged at the current iterate, whose residual each loop has anyway. A
        # select, not a `lax.cond`: XLA writes it into the best iterate's own
        # buffer, where the branch returning `ys` was one more copy of the
        # trajectory per iteration (into the conditional's output).
        norm = residual_norm(residual)
        better = norm < self.residual_norm
        return select(better, BestIterate(ys, stages, norm), self)


class NewtonProgress(eqx.Module):
    """The counters and flags both loops keep, and hand from one to the other.

    **Arguments:**

    - `num_iters`: iterations taken (accepted or not).
    - `num_rejected`: iterations whose step was rejected.
    - `update_norm`: the scaled size of the last step if it was an accepted,
        whole, undamped Newton step, else infinite: what the next step's
        contraction rate is measured against.
    - `error_estimate`: the error left after the last accepted step, estimated
        from its size and contraction rate (see `error_estimate`).
    - `last_step_non_finite`: whether the last step was non-finite.
    - `converged`: whether the last step showed convergence.
    - `terminate`: whether the loop stops (converged, or stuck).
    """

    num_iters: Int[Array, ""]
    num_rejected: Int[Array, ""]
    update_norm: Real[Array, ""]
    error_estimate: Real[Array, ""]
    last_step_non_finite: Bool[Array, ""]
    converged: Bool[Array, ""]
    terminate: Bool[Array, ""]

    @staticmethod
    def start(dtype) -> "NewtonProgress":
        zero, false = jnp.array(0, jnp.int32), jnp.array(False)
        inf = jnp.array(jnp.inf, dtype)
        return NewtonProgress(zero, zero, inf, inf, false, false, false)

    def after_step(
        self,
        *,
        accepted: Bool[Array, ""],
        newton_step: Bool[Array, ""],
        update_norm: Real[Array, ""],
        error_estimate: Real[Array, ""],
        non_finite: Bool[Array, ""],
        converged: Bool[Array, ""],
        stuck: Bool[Array, ""],
    ) -> "NewtonProgress":
        # Only consecutive whole undamped steps give a contraction rate.
        rate_base = accepted & newton_step
        return NewtonProgress(
            num_iters=self.num_iters + 1,
            num_rejected=self.num_rejected + (~accepted).astype(jnp.int32),
            update_norm=jnp.where(rate_base, update_norm, jnp.inf),
            error_estimate=jnp.where(accepted, error_estimate, self.error_estimate),
            last_step_non_finite=non_finite,
            converged=converged,
            terminate=converged | stuck,
        )


def newton_direction(
    linearisation: AbstractLinearisation,
    negative_residual: Residual,
    offsets: Inexact[Array, "steps n"],
    damping: Real[Array, ""] | None = None,
) -> tuple[Inexact[Array, "nodes n"], PyTree[Array] | None]:
    r"""The node and stage update: the Newton step $\delta_{i+1} = A_i \delta_i +
    b_i$, $\delta_0 = 0$ (by a parallel scan), or with a `damping` $\lambda > 0$ the
    Levenberg-Marquardt step (a parallel Kalman smoother)."""
    zero_update = jnp.zeros(offsets.shape[1:], offsets.dtype)

    # The linearisation's own solvers: split over devices for a window split so.
    def plain():
        return linearisation.recurrence(offsets, zero_update)

    def levenberg_marquardt():
        return linearisation.damped_recurrence(offsets, damping)

    if damping is None:
        delta_ys = plain()
    else:
        delta_ys = jax.lax.cond(damping > 0, levenberg_marquardt, plain)
    return delta_ys, linearisation.stage_update(negative_residual, delta_ys)


class TrialPoint(eqx.Module):
    """The iterate after a step, the step's scaled size, and whether both are
    finite (the size may be infinite without overflow: a non-zero step where the
    tolerance is zero)."""

    ys: Inexact[Array, "nodes n"]
    stages: PyTree[Array] | None
    update_norm: Real[Array, ""]
    finite: Bool[Array, ""]


def trial_point(
    problem: NewtonProblem,
    ys: Inexact[Array, "nodes n"],
    stages: PyTree[Array] | None,
    step_fraction: Real[Array, ""],
    delta_ys: Inexact[Array, "nodes n"],
    delta_stages: PyTree[Array] | None,
) -> TrialPoint:
    """`ys + step_fraction * delta_ys` (and the stages likewise), the step's
    scaled size (at most 1: within tolerance) and whether all of it is finite."""
    step = step_fraction * delta_ys
    trial_ys = ys + step
    trial_stages = jtu.tree_map(
        lambda z, dz: z + step_fraction * dz, stages, delta_stages
    )
    update_norm, overflow = scaled_update_norm(
        step, ys, trial_ys, problem.rtol, problem.atol
    )
    finite = ~overflow & all_finite((trial_ys, trial_stages))
    return TrialPoint(trial_ys, trial_stages, update_norm, finite)


def select(
    flag: Bool[Array, ""], if_true: PyTree[Array], if_false: PyTree[Array]
) -> PyTree[Array]:
    """`if_true` where `flag`, else `if_false`, leaf by leaf."""
    return jtu.tree_map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)
