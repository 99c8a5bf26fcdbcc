"""One window solved by DEER, with derivatives by the implicit function theorem."""

import equinox as eqx
import jax
import jax.custom_derivatives
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Bool, Inexact, PyTree, Real

from .discretisation import (
    AbstractDiscretisation,
    JacobianMode,
    VectorField,
    closure_convert_field,
)
from .newton import NewtonStats, newton_solve
from .newton.norms import residual_norm
from .node_blocks import NodeBlocks
from .predictor import COARSENING, constant_guess, predict_trajectory
from .sharded_scan import check_time_mesh


class _WindowConfig(eqx.Module):
    discretisation: AbstractDiscretisation = eqx.field(static=True)
    max_iters: int = eqx.field(static=True)
    predictor_steps: int = eqx.field(static=True)
    predictor_coarsening: int | None = eqx.field(static=True)
    jacobian: JacobianMode = eqx.field(static=True)
    damping: bool = eqx.field(static=True)
    # With a mesh, Newton and the tangent run on the padded window split over its
    # "time" axis (`NodeBlocks`); the predictor runs on the whole window.
    mesh: Mesh | None = eqx.field(static=True, default=None)


def _node_blocks(config: _WindowConfig, ts: Array) -> NodeBlocks:
    return NodeBlocks(config.discretisation, config.mesh, ts.shape[0] - 1)


def _is_none(x) -> bool:
    return x is None


def _residual_size(vector_field, discretisation, ts, ys, args, stages=None) -> Array:
    r"""$\max_i \mathrm{RMS}(r_i)$ of a trajectory (infinite if not finite), with its
    stage unknowns at their starting values (given, or from the nodes): one
    vectorised residual evaluation."""
    if stages is None:
        stages = discretisation.init_stages(vector_field, ts, ys, args)
    return residual_norm(discretisation.residual(vector_field, ts, ys, stages, args))


def _stored_if_better(
    vector_field,
    discretisation,
    ts,
    args,
    stored,
    stored_stages,
    use_stored,
    predicted,
    predicted_size,
):
    """The stored trajectory where `use_stored` and its residual is no larger than
    the predicted one's (of residual `predicted_size`), else the predicted one; and
    whether it is the stored one. The stored residual is evaluated only where
    `use_stored` (otherwise the stored trajectory may be a placeholder)."""
    stored_size = jax.lax.cond(
        use_stored,
        lambda: _residual_size(
            vector_field, discretisation, ts, stored, args, stored_stages
        ),
        lambda: jnp.asarray(jnp.inf, predicted_size.dtype),
    )
    use_predicted = (predicted_size < stored_size) | ~jnp.isfinite(stored_size)
    return jnp.where(use_predicted, predicted, stored), ~use_predicted


# How many times the constant guess's residual the predictor's may be before the
# constant guess is used instead.
_FAR_WORSE = 10.0
# The constant guess's residual is first evaluated on this many intervals at each
# end of the window and in its middle: a lower bound on the whole window's.
_BOUND_INTERVALS = 2


def _constant_residual_bound(vector_field, discretisation, ts, y0, args) -> Array:
    r"""A lower bound on the constant guess's $\max_i \mathrm{RMS}(r_i)$: the same
    maximum over a few contiguous runs of intervals (each interval's residual
    depends on that interval alone). For windows of more than
    `3 * _BOUND_INTERVALS` intervals (`_bound_decides`)."""
    num_steps = ts.shape[0] - 1
    width = _BOUND_INTERVALS
    middle = (num_steps - width) // 2
    sizes = [
        _residual_size(
            vector_field,
            discretisation,
            ts[start : start + width + 1],
            constant_guess(ts[start : start + width + 1], y0),
            args,
        )
        for start in (0, middle, num_steps - width)
    ]
    return jnp.max(jnp.stack(sizes))


def _bound_decides(ts, config: _WindowConfig) -> bool:
    # On a short window the bound would be the whole residual. On a time mesh its
    # slices of the grid would move values between devices, by an amount that
    # depends on where they fall in the blocks.
    return ts.shape[0] - 1 > 3 * _BOUND_INTERVALS and config.mesh is None


def _predict(vector_field, ts, y0, args, tolerances, config: _WindowConfig):
    """The predictor's guess (the constant one where that is far better), and its
    residual size (XLA drops it where it is not used)."""
    discretisation = config.discretisation
    constant = constant_guess(ts, y0)

    def constant_size():
        return _residual_size(vector_field, discretisation, ts, constant, args)

    if config.predictor_steps == 0:
        return constant, constant_size()
    predicted = predict_trajectory(
        vector_field,
        discretisation,
        ts,
        y0,
        args,
        base_steps=config.predictor_steps,
        coarsening=config.predictor_coarsening,
        rtol=tolerances[0],
        atol=tolerances[1],
        max_iters=config.max_iters,
        jacobian=config.jacobian,
    ).guess
    predicted_size = _residual_size(vector_field, discretisation, ts, predicted, args)

    # On a stiff field a coarse solve interpolated onto the grid (through the
    # field's large values off the slow manifold) can be far worse than y0 at every
    # node: Radau IIA on Van der Pol mu = 1000 diverged from a guess with 3500x the
    # constant's residual, and converges from y0. Only such a gap counts: a
    # residual is a rough proxy (explicit Euler's better guess can have 1.3x the
    # constant's).
    def far_worse_than_constant():
        size = constant_size()
        return ~(predicted_size <= _FAR_WORSE * size) & jnp.isfinite(size), size

    if _bound_decides(ts, config):
        # Within the bound's gap the whole constant residual (one more evaluation
        # of the field over the grid) cannot change the decision: it is evaluated
        # only outside it.
        bound = _constant_residual_bound(vector_field, discretisation, ts, y0, args)
        use_constant, size = jax.lax.cond(
            predicted_size <= _FAR_WORSE * bound,
            lambda: (jnp.array(False), predicted_size),
            far_worse_than_constant,
        )
    else:
        use_constant, size = far_worse_than_constant()
    return (
        jnp.where(use_constant, constant, predicted),
        jnp.where(use_constant, size, predicted_size),
    )


@eqx.filter_custom_jvp
def _solve_window(
    vector_field,
    ts,
    y0,
    args,
    guess,
    use_guess,
    guess_stages,
    tolerances,
    config: _WindowConfig,
):
    def predict():
        return _predict(vector_field, ts, y0, args, tolerances, config)

    discretisation = config.discretisation
    if guess is None:
        guess, _ = predict()
        used_guess = jnp.array(False)
    elif use_guess is not None:
        # A stored trajectory can be far worse than the predictor (the parameters
        # moved a lot since it was stored): keep the better of the two. The
        # predictor runs either way, so it is traced once, outside the `cond`
        # (inside, both branches compiled their own copy of it).
        predicted, predicted_size = predict()
        guess, used_guess = _stored_if_better(
            vector_field,
            discretisation,
            ts,
            args,
            guess.at[0].set(y0),
            guess_stages,
            use_guess,
            predicted,
            predicted_size,
        )
    else:
        used_guess = jnp.array(True)
    guess = guess.at[0].set(y0)
    rtol, atol = tolerances
    newton_options = dict(
        rtol=rtol,
        atol=atol,
        max_iters=config.max_iters,
        jacobian=config.jacobian,
        damping=config.damping,
    )
    if config.mesh is not None:
        return _newton_on_blocks(
            vector_field,
            ts,
            guess,
            guess_stages,
            used_guess,
            args,
            config,
            newton_options,
        )
    stages = discretisation.init_stages(vector_field, ts, guess, args)
    if guess_stages is not None:
        stages = jtu.tree_map(
            lambda given, made: jnp.where(used_guess, given, made), guess_stages, stages
        )
    return newton_solve(
        vector_field, discretisation, ts, guess, stages, args, **newton_options
    )


@eqx.filter_custom_jvp
def _newton_on_blocks(
    vector_field, ts, guess, guess_stages, used_guess, args, config, newton_options
):
    """Newton on the padded window, split over the mesh's `"time"` axis: the
    stage unknowns, residuals and linearisations of each device's block of nodes
    computed there, the recurrences by the sharded scans; the padding cut off.

    Its own derivative is zero (`_no_tangents`): the window's is the implicit
    one of `_solve_window_jvp`. Without that wall, transforming that rule (as
    equinox's checkpointed loops do to find what is perturbed) traced a JVP of
    Newton's loop through `shard_map`, whose symbolic-zero tangents the JVP of
    the norms' two-output `lax.reduce` cannot take."""
    blocks = _node_blocks(config, ts)
    padded_ts, padded_guess = blocks.pad_times(ts), blocks.pad_nodes(guess)
    stages = blocks.init_stages(vector_field, padded_ts, padded_guess, args)
    if guess_stages is not None:
        stages = jtu.tree_map(
            lambda given, made: jnp.where(used_guess, given, made),
            blocks.pad_intervals(guess_stages),
            stages,
        )
    ys, stages, stats = newton_solve(
        vector_field, blocks, padded_ts, padded_guess, stages, args, **newton_options
    )
    return blocks.unpad_nodes(ys), blocks.unpad_intervals(stages), stats


@_newton_on_blocks.def_jvp
def _no_tangents(primals, tangents):
    del tangents
    out = _newton_on_blocks(*primals)
    return out, jax.custom_derivatives.zero_from_primal(out, symbolic_zeros=True)


@_solve_window.def_jvp
def _solve_window_jvp(primals, tangents):
    r"""Tangents by the implicit function theorem, one linear recurrence.

    At the solution, $R(y^*, \theta) = 0$ with $\theta$ = (vector field parameters,
    grid, args). So $\partial_y R \, \dot y = -\partial_\theta R \, \dot\theta$ with
    $\dot y_0$ given: the same recurrence as a Newton step, with the residual replaced
    by $c = \partial_\theta R\,\dot\theta$, evaluated once at $y^*$ (and any stage
    unknowns, eliminated per interval as in Newton). JAX transposes
    it (a reverse scan) for reverse mode; the Newton loop is never differentiated.
    """
    vector_field, ts, y0, args = primals[:4]
    config = primals[-1]
    t_vector_field, t_ts, t_y0, t_args = tangents[:4]
    ys, stages, stats = _solve_window(*primals)
    if config.mesh is None:
        discretisation = config.discretisation
        at_ys, at_stages = ys, stages

        def grid(_ts):
            return _ts
    else:
        # On the padded window split over the mesh, as Newton ran.
        discretisation = _node_blocks(config, ts)
        at_ys = discretisation.pad_nodes(ys)
        at_stages = discretisation.pad_intervals(stages)
        grid = discretisation.pad_times

    params = (vector_field, ts, args)
    t_params = (t_vector_field, t_ts, t_args)
    no_tangent = jtu.tree_map(_is_none, t_params, is_leaf=_is_none)
    nondiff, diff = eqx.partition(params, no_tangent, is_leaf=_is_none)

    def residual_at_solution(_diff):
        _vector_field, _ts, _args = eqx.combine(_diff, nondiff)
        return discretisation.residual(
            _vector_field, grid(_ts), at_ys, at_stages, _args
        )

    _, t_residual = jax.jvp(residual_at_solution, (diff,), (t_params,))
    if t_y0 is None:
        t_y0 = jnp.zeros_like(y0)
    rhs = jtu.tree_map(jnp.negative, t_residual)
    # Exact derivatives need the exact linearisation, also after a quasi-DEER
    # (diagonal) solve: the tangent pass holds N n x n blocks once. Its products
    # run at full precision: unlike a Newton direction, no later iteration corrects
    # them (on GPUs float32 products otherwise default to TensorFloat-32).
    with jax.default_matmul_precision("highest"):
        _, linearisation = discretisation.linearise(
            vector_field, grid(ts), at_ys, at_stages, args
        )
        t_ys, t_stages = linearisation.solve(rhs, t_y0)
    if config.mesh is not None:
        t_ys = discretisation.unpad_nodes(t_ys)
        t_stages = discretisation.unpad_intervals(t_stages)
    t_stats = jax.custom_derivatives.zero_from_primal(stats, symbolic_zeros=True)
    return (ys, stages, stats), (t_ys, t_stages, t_stats)


def _check_split_grid(ts, mesh: Mesh | None) -> None:
    if mesh is None:
        return
    check_time_mesh(mesh)
    if not eqx.is_array(ts):
        raise ValueError(
            "`solve_window(mesh=...)` splits a grid of times: `ts` must be an "
            "array of nodes (a recurrence's step inputs are not split; call it "
            "without `mesh`)."
        )


def solve_window(
    vector_field: VectorField,
    discretisation: AbstractDiscretisation,
    ts: Inexact[Array, " nodes"] | PyTree[Array],
    y0: Inexact[Array, " n"],
    args: PyTree = None,
    guess: Inexact[Array, "nodes n"] | None = None,
    use_guess: Bool[Array, ""] | None = None,
    guess_stages: PyTree[Array] | None = None,
    *,
    rtol: Real[ArrayLike, ""],
    atol: Real[ArrayLike, ""] | None,
    max_iters: int,
    predictor_steps: int,
    predictor_coarsening: int | None = COARSENING,
    jacobian: JacobianMode = "full",
    damping: bool = False,
    mesh: Mesh | None = None,
) -> tuple[Inexact[Array, "nodes n"], PyTree[Array] | None, NewtonStats]:
    r"""Solves $y' = f(t, y)$, $y(t_0) = y_0$ on every node of `ts` at once.

    Discretises with `discretisation`, takes the initial guess from `guess` or from
    a coarse predictor, and runs [`diffrax_deer.newton_solve`][]. Derivatives with
    respect to `y0`, `args`, `ts` and any array the vector field closes over are
    given by the implicit function theorem at the converged trajectory: one extra
    linear recurrence, solved by the same parallel scan (`jax.jvp`), or by its
    transpose, a reverse scan (`jax.grad`).

    **Arguments:**

    - `vector_field`: `f(t, y, args)` on flat arrays of shape `(n,)`.
    - `discretisation`: e.g. [`diffrax_deer.Trapezoid`][].
    - `ts`: the `N + 1` grid nodes (uniform, if the predictor is used). For a
        discrete map whose steps take other inputs (the recurrence of
        [`diffrax_deer.deer_scan`][]), a PyTree of those inputs instead, each leaf
        with a leading axis of length `N`, and `guess` is then required.
    - `y0`: the initial value, shape `(n,)`.
    - `args`: passed to `vector_field`.
    - `guess`: optional starting trajectory, shape `(N + 1, n)`; not differentiated.
    - `use_guess`: optional boolean scalar: when given, `guess` is used only where
        it is true and the predictor runs otherwise (a warm start decided at run
        time).
    - `guess_stages`: optional starting stage unknowns to go with `guess` (e.g.
        from [`diffrax_deer.AbstractDiscretisation.transfer_stages`][]), used
        wherever `guess` is; not differentiated. By default they come from
        `discretisation.init_stages`.
    - `rtol`, `atol`, `max_iters`: Newton's stopping rule (`atol=None` scales
        with the trajectory: see [`diffrax_deer.newton_solve`][]); the tolerances
        may be traced values, e.g. from a step-size controller, and are not
        differentiated.
    - `predictor_steps`: sequential steps of the predictor's base solve (used when
        `guess` is `None`: nested iteration down to this many sequential steps, see
        `predict_trajectory`); `0` starts from $y_0$ at every node.
    - `predictor_coarsening`: the ratio between the predictor's nested grids;
        `None` interpolates the base solve onto `ts` directly.
    - `jacobian`: `"full"` (DEER) or `"diagonal"` (quasi-DEER): see
        [`diffrax_deer.newton_solve`][]. Derivatives are exact either way: the
        tangent recurrence uses the full Jacobians at the converged trajectory, so
        differentiating a `"diagonal"` solve holds `N` $n \times n$ blocks once.
    - `damping`: Levenberg-Marquardt damping once a plain Newton step overflows.
    - `mesh`: optional `jax.sharding.Mesh` with an axis named `"time"`: the nodes
        are padded to a multiple of that axis's $P$ devices and split into one
        block per device, which computes its own stage unknowns, residuals and
        linearisations; every recurrence (each Newton step's, damped or not, the
        tangent's for `jax.jvp` and its transpose for `jax.grad`) is solved across
        the devices by the sharded scans of
        [`diffrax_deer.solve_affine_recurrence`][] and
        [`diffrax_deer.solve_damped_recurrence`][], so $O(P n^2)$ values move
        per Newton iteration, whatever $N$. The predictor runs on the whole
        window on every device (`predictor_steps=0` skips it). `ts` must then be
        a grid of times. `None`: one device.

    **Returns:**

    The node values, shape `(N + 1, n)`, the stage unknowns of the discretisation
    (or `None`), and [`diffrax_deer.NewtonStats`][].
    """
    if guess is None and not eqx.is_array(ts):
        raise ValueError(
            "`solve_window` needs a `guess` when `ts` is not a grid of times: the "
            "predictor integrates an ODE."
        )
    _check_split_grid(ts, mesh)
    first_point = jtu.tree_map(lambda t: t[0], ts)
    # Closed-over arrays (e.g. a network's weights) become explicit inputs, so that
    # the custom derivative sees, and differentiates, them.
    vector_field, args = closure_convert_field(vector_field, first_point, y0, args)
    if guess is not None:
        guess = jax.lax.stop_gradient(guess)
    if use_guess is not None:
        use_guess = jax.lax.stop_gradient(jnp.asarray(use_guess))
    if guess_stages is not None:
        if guess is None:
            raise ValueError("`guess_stages` goes with a `guess`.")
        guess_stages = jax.lax.stop_gradient(guess_stages)
    real_dtype = jnp.finfo(y0.dtype).dtype
    # `atol=None` stays None: Newton then scales it with the trajectory.
    tolerances = jax.lax.stop_gradient(
        (
            jnp.asarray(rtol, real_dtype),
            None if atol is None else jnp.asarray(atol, real_dtype),
        )
    )
    config = _WindowConfig(
        discretisation=discretisation,
        max_iters=max_iters,
        predictor_steps=predictor_steps,
        predictor_coarsening=predictor_coarsening,
        jacobian=jacobian,
        damping=damping,
        mesh=mesh,
    )
    return _solve_window(
        vector_field, ts, y0, args, guess, use_guess, guess_stages, tolerances, config
    )
