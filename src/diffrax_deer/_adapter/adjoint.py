"""`DeerAdjoint`: diffrax's solve loop for DeerSolver, with vectorised saving."""

import functools
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import (
    RESULTS,
    AbstractAdaptiveStepSizeController,
    AbstractAdjoint,
    ConstantStepSize,
    StepTo,
    SubSaveAt,
)

# diffrax internals, pinned by `diffrax>=0.7.2,<0.8` in pyproject.toml: the adjoint
# hook must return diffrax's private loop `State`, and these are the helpers diffrax's
# own loop saves, clips and tests results with, so that both loops agree to round-off.
from diffrax._integrate import SaveState, State, _clip_to_end, _save
from diffrax._misc import linear_rescale
from diffrax._solution import is_successful
from jaxtyping import Array, Bool, PyTree

from .deer_solver import DeerSolver, DeerState


# The Newton figures of the final `DeerState` that land in `sol.stats`.
_NEWTON_STATS = (
    "num_iters",
    "total_num_iters",
    "max_num_iters",
    "update_norm",
    "residual_norm",
)


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, SubSaveAt)


def _is_none(x: Any) -> bool:
    return x is None


def _dense_buffers(state: State) -> list:
    # Only the dense output is a write-once buffer of the checkpointed loop: it is
    # `max_steps` windows long, too big to copy into every checkpoint. The `SaveAt`
    # arrays are small and stay ordinary loop state, so they can be written with
    # masked scatters (whose out-of-window entries are dropped, never written).
    return [state.dense_ts, state.dense_infos]


def _save_window(
    subsaveat: SubSaveAt,
    save_state: SaveState,
    *,
    interpolation,
    state: State,
    t: Array,
    y: PyTree[Array],
    num_steps: Array,
    active: Bool[Array, ""],
    args: PyTree,
) -> SaveState:
    """Saves what one window owes to one `SubSaveAt`, in diffrax's order."""
    ts_buffer, ys_buffer = save_state.ts, save_state.ys
    save_index, ts_index = save_state.save_index, save_state.saveat_ts_index
    if subsaveat.ts is not None:
        # diffrax saves, in order, every requested time not yet saved that lies at or
        # before this window's end. Here all of them at once: evaluate every time,
        # scatter those inside the window to their place, drop the others.
        save_ts = subsaveat.ts
        positions = jnp.arange(len(save_ts))
        inside = active & (positions >= ts_index) & (save_ts <= state.tnext)
        # Times outside the window are evaluated at a time inside it: finite values
        # (and cotangents) that the scatter then drops.
        t_eval = jnp.where(inside, save_ts, jnp.clip(save_ts, state.tprev, state.tnext))

        def evaluate(_t):
            return subsaveat.fn(_t, interpolation.evaluate(_t), args)

        values = jax.vmap(evaluate)(t_eval)
        index = jnp.where(inside, save_index + positions - ts_index, len(ts_buffer))
        ts_buffer = ts_buffer.at[index].set(save_ts, mode="drop")
        ys_buffer = jtu.tree_map(
            lambda b, v: b.at[index].set(v, mode="drop"), ys_buffer, values
        )
        # (Summed in the index's own dtype: a loop carry keeps its type.)
        count = jnp.sum(inside, dtype=jnp.asarray(save_index).dtype)
        save_index = save_index + count
        ts_index = ts_index + count
    if subsaveat.steps != 0:
        should_save = active & (num_steps % subsaveat.steps == 0)
        ts_buffer = eqxi.buffer_at_set(ts_buffer, save_index, t, pred=should_save)
        ys_buffer = jtu.tree_map(
            lambda b, v: eqxi.buffer_at_set(b, save_index, v, pred=should_save),
            ys_buffer,
            subsaveat.fn(t, y, args),
        )
        save_index = save_index + jnp.where(should_save, 1, 0)
    return SaveState(
        saveat_ts_index=ts_index, ts=ts_buffer, ys=ys_buffer, save_index=save_index
    )


def _window(
    state: State,
    *,
    solver,
    terms,
    args,
    stepsize_controller,
    saveat,
    t0,
    t1,
    t1_clip_floor,
    progress_meter,
) -> State:
    """One diffrax step, i.e. one DEER window, as diffrax's `loop` takes it."""
    # A failed window ends the solve (diffrax's loop stops there). Under `lax.scan`
    # the later windows still run, and change nothing.
    active = is_successful(state.result)
    y, _, dense_info, solver_state, solver_result = solver.step(
        terms,
        state.tprev,
        state.tnext,
        state.y,
        args,
        state.solver_state,
        state.made_jump,
    )
    (
        keep_step,
        tprev,
        tnext,
        made_jump,
        controller_state,
        controller_result,
    ) = stepsize_controller.adapt_step_size(
        state.tprev,
        state.tnext,
        state.y,
        y,
        args,
        None,
        solver.error_order(terms),
        state.controller_state,
    )
    # Only ConstantStepSize and StepTo get here: they accept every step.
    assert keep_step is True
    tprev = jnp.minimum(tprev, t1)
    tnext = _clip_to_end(tprev, tnext, t1, t1_clip_floor, True)
    result = RESULTS.where(
        is_successful(solver_result), controller_result, solver_result
    )
    num_steps = state.num_steps + 1

    interpolation = solver.interpolation_cls(
        t0=state.tprev, t1=state.tnext, **dense_info
    )
    save_state = jtu.tree_map(
        functools.partial(
            _save_window,
            interpolation=interpolation,
            state=state,
            t=tprev,
            y=y,
            num_steps=num_steps,
            active=active,
            args=args,
        ),
        saveat.subs,
        state.save_state,
        is_leaf=_is_subsaveat,
    )
    dense_ts, dense_infos = state.dense_ts, state.dense_infos
    dense_save_index = state.dense_save_index
    if saveat.dense:
        dense_ts = eqxi.buffer_at_set(
            dense_ts, dense_save_index + 1, tprev, pred=active
        )
        dense_infos = jtu.tree_map(
            lambda i, b: eqxi.buffer_at_set(b, dense_save_index, i, pred=active),
            dense_info,
            dense_infos,
        )
        dense_save_index = dense_save_index + jnp.where(active, 1, 0)

    def keep(new, old):
        return jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, old)

    return eqx.tree_at(
        lambda s: (
            s.y,
            s.tprev,
            s.tnext,
            s.made_jump,
            s.solver_state,
            s.controller_state,
            s.result,
            s.num_steps,
            s.num_accepted_steps,
            s.progress_meter_state,
            s.save_state,
            s.dense_ts,
            s.dense_infos,
            s.dense_save_index,
        ),
        state,
        (
            keep(y, state.y),
            keep(tprev, state.tprev),
            keep(tnext, state.tnext),
            keep(made_jump, state.made_jump),
            keep(solver_state, state.solver_state),
            keep(controller_state, state.controller_state),
            RESULTS.where(active, result, state.result),
            keep(num_steps, state.num_steps),
            keep(num_steps, state.num_accepted_steps),
            progress_meter.step(
                state.progress_meter_state, linear_rescale(t0, tprev, t1)
            ),
            save_state,
            dense_ts,
            dense_infos,
            dense_save_index,
        ),
        is_leaf=_is_none,
    )


def _check(solver, stepsize_controller, event) -> None:
    if not isinstance(solver, DeerSolver):
        raise ValueError(
            "`DeerAdjoint` runs the windows of `DeerSolver` only; got solver "
            f"`{type(solver).__name__}`. Use diffrax's default "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` with other solvers."
        )
    if event is not None:
        raise NotImplementedError(
            "`DeerAdjoint` does not support `event=`. Solve up to a fixed `t1`, or use "
            "the default `adjoint=diffrax.RecursiveCheckpointAdjoint()`, which "
            "supports events with DeerSolver."
        )
    if isinstance(stepsize_controller, AbstractAdaptiveStepSizeController):
        raise ValueError(
            "DeerSolver takes fixed windows: it has no error estimate for an adaptive "
            f"`{type(stepsize_controller).__name__}`. Pass `dt0` (one window: "
            "`dt0 = t1 - t0`) or `stepsize_controller=diffrax.StepTo(ts)`."
        )
    if not isinstance(stepsize_controller, (ConstantStepSize, StepTo)):
        raise NotImplementedError(
            "`DeerAdjoint` supports `diffrax.ConstantStepSize` (pass `dt0`) and "
            "`diffrax.StepTo(ts)`; got "
            f"`{type(stepsize_controller).__name__}`."
        )


class DeerAdjoint(AbstractAdjoint):
    r"""Differentiates a [`diffrax_deer.DeerSolver`][] solve window by window, with
    every save point evaluated at once.

    Use it in place of diffrax's default adjoint:

    ```python
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), DeerSolver(num_steps=10_000), t0, t1, dt0=None, y0=y0,
        args=args, saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.StepTo(jnp.array([t0, t1])),
        adjoint=DeerAdjoint())
    ```

    DeerSolver already differentiates a window by the implicit function theorem: at
    the converged nodes $Y^\star$ of a window, $R(Y^\star, \theta) = 0$, so
    $\partial_Y R\,\dot Y = -\partial_\theta R\,\dot\theta$, one linear recurrence
    (a parallel scan; in reverse mode its transpose). What is left is the saving.
    diffrax's loop saves `SaveAt(ts=...)` one time after another in a while loop, and
    in reverse mode each of the $M$ saves carries a cotangent of the whole window,
    $O(M N n)$ work for $N$ nodes of size $n$. Here the $M$ values
    $y(\tau_j) = p(\tau_j; Y^\star)$ of the window's interpolant $p$ are one `vmap`,
    whose transpose scatters $M$ local cotangents into the window's nodes: the
    gradient costs one window solve, one reverse scan and $O(M n)$.

    Saving follows diffrax exactly (`t0`, `t1`, `ts`, `steps`, `fn`, `subs`,
    `dense`, `solver_state`, `controller_state`, `made_jump`); values and gradients
    equal those of the default adjoint to round-off. `sol.stats` holds diffrax's
    counts (`num_steps` is the number of windows) and the Newton figures of the final
    [`diffrax_deer.DeerState`][]: `num_iters`, `total_num_iters`, `max_num_iters`,
    `update_norm`, `residual_norm`. A window that fails sets `sol.result` (and
    raises, with `throw=True`), and the solve stops there.

    **The fast path.** How the windows are looped over depends on what is known when
    JAX traces the solve:

    - `stepsize_controller=diffrax.StepTo(ts)` (and `dt0=None`): `len(ts) - 1`
        windows, a static count. They run in a `lax.scan` (`StepTo([t0, t1])`: one
        window): reverse mode stores what each window's derivative needs and never
        re-solves, and forward mode (`jax.jvp`, `jax.jacfwd`) works. Use this.
    - `dt0`: the window count is a traced value. A single window
        (`dt0 >= t1 - t0`) is still solved once and differentiated without re-solving
        (a `lax.cond` picks it at run time). Several windows run in a checkpointed
        while loop, as diffrax's default adjoint does: reverse mode re-solves each
        window once, and forward mode is not available (use `StepTo`, or
        `diffrax.ForwardMode()`).

    Refused: solvers other than DeerSolver, `event=`, adaptive step-size controllers
    (DeerSolver has no error estimate) and controllers other than
    `diffrax.ConstantStepSize` and `diffrax.StepTo`.

    **Arguments:** None.
    """

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ) -> tuple[State, dict[str, Any]]:
        del dt0, throw, passed_solver_state, passed_controller_state
        _check(solver, stepsize_controller, event)
        # As diffrax: the last window ends exactly at t1 once within 100 ULPs of it.
        t1_clip_floor = t1
        for _ in range(100):
            t1_clip_floor = eqxi.prevbefore(t1_clip_floor)

        def save_t0(subsaveat: SubSaveAt, save_state: SaveState) -> SaveState:
            if subsaveat.t0:
                save_state = _save(
                    t0, init_state.y, args, subsaveat.fn, save_state, repeat=1
                )
            return save_state

        state = eqx.tree_at(
            lambda s: s.save_state,
            init_state,
            jtu.tree_map(
                save_t0, saveat.subs, init_state.save_state, is_leaf=_is_subsaveat
            ),
            is_leaf=_is_none,
        )
        if saveat.dense:
            state = eqx.tree_at(
                lambda s: s.dense_ts, state, state.dense_ts.at[0].set(t0)
            )
        # Loop state must be arrays of fixed types (the init has Python scalars).
        state = jtu.tree_map(
            lambda x: jnp.asarray(x) if isinstance(x, (bool, int, float)) else x,
            state,
        )
        window = functools.partial(
            _window,
            solver=solver,
            terms=terms,
            args=args,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
            t0=t0,
            t1=t1,
            t1_clip_floor=t1_clip_floor,
            progress_meter=progress_meter,
        )

        if isinstance(stepsize_controller, StepTo):
            num_windows = len(stepsize_controller.ts) - 1

            def unfinished(s):
                return s.num_steps < num_windows

            length = num_windows if max_steps is None else min(num_windows, max_steps)
            state, _ = lax.scan(lambda s, _: (window(s), None), state, length=length)
        else:

            def unfinished(s):
                return s.tprev < t1

            def cond_fun(s):
                return unfinished(s) & is_successful(s.result)

            if max_steps is None:
                kind = "lax"  # no bound: not reverse-differentiable, as in diffrax
            else:
                kind = "checkpointed"
            while_loop = functools.partial(
                eqxi.while_loop,
                cond_fun,
                window,
                kind=kind,
                max_steps=max_steps,
                buffers=_dense_buffers,
            )
            # One window (the usual `dt0 = t1 - t0`): solve it directly, so reverse
            # mode does not re-solve it as the checkpointed loop would.
            single = (state.tnext >= t1) & (t0 < t1)
            state = lax.cond(single, window, while_loop, state)
            if max_steps is None:
                state = eqxi.nondifferentiable_backward(
                    state,
                    msg="Reverse mode with `DeerAdjoint` and `dt0` needs an integer "
                    "`max_steps` (or `stepsize_controller=diffrax.StepTo(ts)`).",
                    symbolic=True,
                )

        state = _finish(state, saveat, t0, t1, args)
        result = RESULTS.where(
            unfinished(state) & is_successful(state.result),
            RESULTS.max_steps_reached,
            state.result,
        )
        state = eqx.tree_at(lambda s: s.result, state, result)
        stats = {}
        if isinstance(state.solver_state, DeerState):
            for name in _NEWTON_STATS:
                if hasattr(state.solver_state, name):
                    stats[name] = getattr(state.solver_state, name)
        return state, stats


def _finish(state: State, saveat, t0, t1, args) -> State:
    """diffrax's saving after the loop: `t0 == t1`, then `SaveAt(t1=True)`."""
    tfinal, yfinal = state.tprev, state.y

    def save_if_t0_equals_t1(subsaveat: SubSaveAt, save_state: SaveState):
        # No window ran: every requested time is t0.
        if subsaveat.ts is not None:
            save_state = _save(
                t0, yfinal, args, subsaveat.fn, save_state, repeat=len(subsaveat.ts)
            )
        return save_state

    def save_t1(subsaveat: SubSaveAt, save_state: SaveState):
        if subsaveat.steps == 0:
            pred = subsaveat.t1
        elif subsaveat.steps == 1:
            pred = False  # the last window's end is saved already
        else:
            pred = subsaveat.t1 & (state.num_accepted_steps % subsaveat.steps != 0)
        if pred is not False:
            save_state = _save(
                tfinal, yfinal, args, subsaveat.fn, save_state, repeat=1, pred=pred
            )
        return save_state

    save_state = lax.cond(
        t0 == t1,
        lambda s: jtu.tree_map(
            save_if_t0_equals_t1, saveat.subs, s, is_leaf=_is_subsaveat
        ),
        lambda s: s,
        state.save_state,
    )
    save_state = jtu.tree_map(save_t1, saveat.subs, save_state, is_leaf=_is_subsaveat)
    return eqx.tree_at(lambda s: s.save_state, state, save_state, is_leaf=_is_none)
