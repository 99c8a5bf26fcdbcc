"""The sizes Newton measures: residuals, updates, and whether everything is finite."""

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Inexact, PyTree, Real

from ..discretisation import Residual


def all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    leaves = jtu.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def max_rms(x: Inexact[Array, "... n"]) -> Real[Array, ""]:
    """$\\max_i \\mathrm{RMS}(x_i)$: the RMS over the state, the max over nodes."""
    return jnp.max(jnp.sqrt(jnp.mean(jnp.abs(x) ** 2, axis=-1)))


def residual_norm(residual: Residual) -> Real[Array, ""]:
    """$\\max_i \\mathrm{RMS}(r_i)$ over the node and stage residuals."""
    return jnp.max(jnp.stack([max_rms(x) for x in jtu.tree_leaves(residual)]))


def sum_squares(tree: PyTree[Array]) -> Real[Array, ""]:
    return sum(jnp.sum(jnp.abs(x) ** 2) for x in jtu.tree_leaves(tree))


def scaled_update_norm(
    step: Inexact[Array, "nodes n"],
    ys: Inexact[Array, "nodes n"],
    trial_ys: Inexact[Array, "nodes n"],
    rtol: float,
    atol: float,
) -> Real[Array, ""]:
    """$\\max_i \\mathrm{RMS}(\\delta_i / (\\text{atol} + \\text{rtol}
    \\max(|y_i|, |y_i + \\delta_i|)))$ for the step $\\delta$ from `ys` to
    `trial_ys`: at most 1 when the step is within tolerance."""
    scale = atol + rtol * jnp.maximum(jnp.abs(ys), jnp.abs(trial_ys))
    return max_rms(step / scale)
