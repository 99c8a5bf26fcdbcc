"""The sizes Newton measures: residuals, updates, and whether everything is finite."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Inexact, PyTree, Real

from ..discretisation import Residual


def all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    leaves = jtu.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _mean_squares_and_any(
    x: Inexact[Array, "... n"], flags: Bool[Array, "... n"]
) -> tuple[Real[Array, "..."], Bool[Array, "..."]]:
    """Per row (the last axis): the mean of $|x|^2$, and whether any flag is set.

    One reduction with two outputs, not two reductions, for memory: XLA's CPU
    backend hands a one-output reduction over a large array to YNNPACK, whose
    fusion cannot read slices in place, so every slice in the reduced expression
    (a residual's `y[1:]`, `y[:-1]`, `f[1:]`, `f[:-1]`) became a trajectory-sized
    buffer of its own: 3 of the 10 trajectories a diagonal solve held. XLA's own
    fusion, which takes the two-output reduction, reads them in place.
    """

    def add_and_or(a, b):
        return a[0] + b[0], a[1] | b[1]

    zero = jnp.zeros((), jnp.finfo(x.dtype).dtype)
    squares, any_flag = jax.lax.reduce(
        (jnp.abs(x) ** 2, flags), (zero, jnp.array(False)), add_and_or, (x.ndim - 1,)
    )
    return squares / x.shape[-1], any_flag


def max_rms_or_inf(x: Inexact[Array, "... n"]) -> Real[Array, ""]:
    """$\\max_i \\mathrm{RMS}(x_i)$ (the RMS over the state, the max over nodes),
    or infinity where any value is not finite."""
    mean_squares, non_finite = _mean_squares_and_any(x, ~jnp.isfinite(x))
    return jnp.where(jnp.any(non_finite), jnp.inf, jnp.max(jnp.sqrt(mean_squares)))


def residual_norm(residual: Residual) -> Real[Array, ""]:
    """$\\max_i \\mathrm{RMS}(r_i)$ over the node and stage residuals; infinite
    where any residual is not finite (so it never looks smaller than a finite
    one)."""
    leaves = jtu.tree_leaves(residual)
    return jnp.max(jnp.stack([max_rms_or_inf(x) for x in leaves]))


def sum_squares(tree: PyTree[Array]) -> Real[Array, ""]:
    return sum(jnp.sum(jnp.abs(x) ** 2) for x in jtu.tree_leaves(tree))


# With the default `atol`, no component's absolute tolerance is below this many
# machine epsilons of the largest component: the round-off level of the whole state,
# which a component that stays at zero (in exact arithmetic) still picks up.
ROUNDOFF_FLOOR = 10


def tolerance_scale(
    ys: Inexact[Array, "nodes n"],
    trial_ys: Inexact[Array, "nodes n"],
    rtol: float,
    atol: float | None,
) -> Real[Array, "nodes n"]:
    r"""$\text{atol}_k + \text{rtol} \max(|y_{ik}|, |\tilde y_{ik}|)$ per node $i$ and
    component $k$, over the iterate $y$ and the trial point $\tilde y$.

    With `atol=None` the absolute tolerance scales with the trajectory:
    $\text{atol}_k = \max(\text{rtol}\, Y_k, 10 \varepsilon \max_j Y_j)$ with
    $Y_k = \max_i \max(|y_{ik}|, |\tilde y_{ik}|)$, the component's largest
    magnitude on the window, so that rescaling the state rescales the tolerance with
    it; the floor of 10 machine epsilons of the largest component keeps a component
    that stays at zero from demanding more than round-off.
    """
    magnitude = jnp.maximum(jnp.abs(ys), jnp.abs(trial_ys))
    if atol is None:
        largest = jnp.max(magnitude, axis=0, initial=0)
        eps = jnp.finfo(magnitude.dtype).eps
        floor = ROUNDOFF_FLOOR * eps * jnp.max(largest, initial=0)
        atol = jnp.maximum(rtol * largest, floor)[None]
    return atol + rtol * magnitude


def scaled_update_norm(
    step: Inexact[Array, "nodes n"],
    ys: Inexact[Array, "nodes n"],
    trial_ys: Inexact[Array, "nodes n"],
    rtol: float,
    atol: float | None,
) -> tuple[Real[Array, ""], Bool[Array, ""]]:
    """$\\max_i \\mathrm{RMS}(\\delta_i / s_i)$ for the step $\\delta$ from `ys` to
    `trial_ys`, with $s$ from `tolerance_scale`: at most 1 when the step is
    within tolerance; and whether that value overflowed.

    A zero scale (`rtol=0` or `atol=0` allows it) takes a zero step as 0 and any
    other as infinitely large; an infinite size from that is not an overflow.
    """
    scale = tolerance_scale(ys, trial_ys, rtol, atol)
    positive = scale > 0
    mean_squares, outside = _mean_squares_and_any(
        step / jnp.where(positive, scale, 1), ~positive & (step != 0)
    )
    norm = jnp.max(jnp.sqrt(mean_squares))
    return jnp.where(jnp.any(outside), jnp.inf, norm), ~jnp.isfinite(norm)


def error_estimate(
    update_norm: Real[Array, ""], previous_update_norm: Real[Array, ""]
) -> Real[Array, ""]:
    r"""The error left in the iterate after a Newton update, in the scaled norm.

    With $\theta = u_k / u_{k-1}$ the contraction of the last two update sizes (as
    in Hairer and Wanner's RADAU5), the remaining updates sum to at most
    $\theta / (1 - \theta)\, u_k$ if Newton keeps contracting at that rate, and
    less when it converges quadratically. Without contraction ($\theta \geq 1$)
    there is no estimate (infinite). After a first update
    (`previous_update_norm = inf`: none, or the one before was damped, halved or
    rejected) it is the update $u_k$ itself.
    """
    rate = update_norm / jnp.where(previous_update_norm > 0, previous_update_norm, 1)
    factor = jnp.where(rate < 1, rate / jnp.where(rate < 1, 1 - rate, 1), jnp.inf)
    contracted = jnp.where(update_norm == 0, 0, update_norm * factor)
    return jnp.where(jnp.isfinite(previous_update_norm), contracted, update_norm)
