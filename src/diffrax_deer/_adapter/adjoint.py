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

from .._core.while_loop import BufferWrite, apply_write, while_loop
from .deer_solver import DeerSolver, DeerState, direction
from .dense import fit_dense_buffers
from .events import check_window, locate_event, unsave_after
from .failures import raise_if_failed


# The Newton figures of the final `DeerState` that land in `sol.stats`.
_NEWTON_STATS = (
    "num_iters",
    "total_num_iters",
    "max_num_iters",
    "update_norm",
    "residual_norm",
    "error_estimate",
    "max_error_estimate",
    "dense_error_estimate",
    "max_dense_error_estimate",
    "scaled_error",
    "max_scaled_error",
    "total_estimate_iters",
)


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, SubSaveAt)


def _is_none(x: Any) -> bool:
    return x is None


def _dense_buffers(state: State) -> list:
    # Only the dense output is a write-once buffer of the loop over `dt0` windows: it
    # is `max_steps` windows long, too big to copy into every checkpoint. The `SaveAt`
    # arrays are small and stay ordinary loop state, so they can be written with
    # masked scatters (whose out-of-window entries are dropped, never written).
    return [state.dense_ts, state.dense_infos]


def _save_window(
    subsaveat: SubSaveAt,
    save_state: SaveState,
    *,
    interpolation,
    state: State,
    window_end: Array,
    t: Array,
    y: PyTree[Array],
    num_steps: Array,
    active: Bool[Array, ""],
    args: PyTree,
) -> SaveState:
    """Saves what one window owes to one `SubSaveAt`, in diffrax's order: the
    requested times up to `window_end`, and `(t, y)` for `steps`."""
    ts_buffer, ys_buffer = save_state.ts, save_state.ys
    save_index, ts_index = save_state.save_index, save_state.saveat_ts_index
    if subsaveat.ts is not None:
        # diffrax saves, in order, every requested time not yet saved that lies at or
        # before this window's end. Here all of them at once: evaluate every time,
        # scatter those inside the window to their place, drop the others.
        save_ts = subsaveat.ts
        positions = jnp.arange(len(save_ts))
        inside = active & (positions >= ts_index) & (save_ts <= window_end)
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


class _Step(eqx.Module):
    """One window as diffrax's loop takes it: the solve and the controller's verdict."""

    y: PyTree[Array]
    tprev: Array
    tnext: Array
    made_jump: Array
    dense_info: dict
    solver_state: Any
    controller_state: Any
    result: RESULTS


def _take_step(
    state: State, *, solver, terms, args, stepsize_controller, t1, t1_clip_floor
) -> _Step:
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
    return _Step(
        y=y,
        tprev=tprev,
        tnext=_clip_to_end(tprev, tnext, t1, t1_clip_floor, True),
        made_jump=made_jump,
        dense_info=dense_info,
        solver_state=solver_state,
        controller_state=controller_state,
        result=RESULTS.where(
            is_successful(solver_result), controller_result, solver_result
        ),
    )


def _is_newton_failure(result: RESULTS):
    return (result == RESULTS.nonlinear_max_steps_reached) | (
        result == RESULTS.nonlinear_divergence
    )


def _window(state: State, **kwargs) -> State:
    """One diffrax step, i.e. one DEER window, as diffrax's `loop` takes it."""
    state, writes = _window_and_dense_writes(state, **kwargs)
    if writes:
        state = eqx.tree_at(
            lambda s: (s.dense_ts, s.dense_infos),
            state,
            (
                apply_write(state.dense_ts, writes[0]),
                apply_write(state.dense_infos, writes[1]),
            ),
        )
    return state


def _window_and_dense_writes(
    state: State,
    *,
    solver,
    terms,
    args,
    stepsize_controller,
    saveat,
    event,
    cond_kwargs,
    t0,
    t1,
    t1_clip_floor,
    progress_meter,
    throw,
) -> tuple[State, list[BufferWrite]]:
    """One window, with the writes into the dense output's buffers returned, not
    done (the loop over `dt0` windows does them). With an event, the window ends at
    the first node where it triggers."""
    # A failed window (or an event) ends the solve (diffrax's loop stops there). Under
    # `lax.scan` the later windows still run, and change nothing.
    active = is_successful(state.result)
    step = _take_step(
        state,
        solver=solver,
        terms=terms,
        args=args,
        stepsize_controller=stepsize_controller,
        t1=t1,
        t1_clip_floor=t1_clip_floor,
    )
    if throw:
        # DeerSolver's message for a failed window, for the windows kept (a window
        # after the end of the solve may fail without consequence).
        solver_state = step.solver_state
        raise_if_failed(
            active & _is_newton_failure(step.result),
            step.result == RESULTS.nonlinear_divergence,
            solver_state.num_iters,
            solver_state.residual_norm,
            solver_state.update_norm,
            state.tprev * direction(terms, state.tprev),
            state.tnext * direction(terms, state.tprev),
            max_iters=solver.max_iters,
        )
    num_steps = state.num_steps + 1
    interpolation = solver.interpolation_cls(
        t0=state.tprev, t1=state.tnext, **step.dense_info
    )
    # Without an event the window ends at its end; with one, at the node where it
    # triggered: saving, `sol.ts` and the next state stop there.
    end, save_end, y, result = step.tprev, state.tnext, step.y, step.result
    event_fields = {}
    if event is not None:
        found = check_window(
            event, interpolation, state.event_values, args, cond_kwargs
        )
        # Only a converged window is searched: an event must not hide a failure.
        happened = found.happened & is_successful(step.result)
        end = jnp.where(happened, found.t, end)
        save_end = jnp.where(happened, found.t, save_end)
        y = jtu.tree_map(lambda a, b: jnp.where(happened, a, b), found.y, y)
        result = RESULTS.where(happened, RESULTS.event_occurred, result)
        event_fields = dict(
            event_tprev=found.t_before,
            event_tnext=found.t,
            event_dense_info=dict(step.dense_info, t0=state.tprev, t1=state.tnext),
            event_values=found.values,
            event_mask=jtu.tree_map(lambda m: m & happened, found.mask),
        )
    save_state = jtu.tree_map(
        functools.partial(
            _save_window,
            interpolation=interpolation,
            state=state,
            window_end=save_end,
            t=end,
            y=y,
            num_steps=num_steps,
            active=active,
            args=args,
        ),
        saveat.subs,
        state.save_state,
        is_leaf=_is_subsaveat,
    )
    dense_index, dense_writes = _dense_writes(state, saveat, step, active)

    def keep(new, old):
        return jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, old)

    updates = dict(
        y=keep(y, state.y),
        tprev=keep(end, state.tprev),
        tnext=keep(step.tnext, state.tnext),
        made_jump=keep(step.made_jump, state.made_jump),
        solver_state=keep(step.solver_state, state.solver_state),
        controller_state=keep(step.controller_state, state.controller_state),
        result=RESULTS.where(active, result, state.result),
        num_steps=keep(num_steps, state.num_steps),
        num_accepted_steps=keep(num_steps, state.num_accepted_steps),
        progress_meter_state=progress_meter.step(
            state.progress_meter_state, linear_rescale(t0, end, t1)
        ),
        save_state=save_state,
        **dense_index,
        **{k: keep(v, getattr(state, k)) for k, v in event_fields.items()},
    )
    return _replace(state, updates), dense_writes


def _replace(state: State, updates: dict) -> State:
    names = tuple(updates)
    return eqx.tree_at(
        lambda s: tuple(getattr(s, name) for name in names),
        state,
        tuple(updates[name] for name in names),
        is_leaf=_is_none,
    )


def _dense_writes(
    state: State, saveat, step: _Step, active
) -> tuple[dict, list[BufferWrite]]:
    """The window's dense output for diffrax's buffers (over the whole window, also
    after an event: the interpolation needs the window's own end)."""
    if not saveat.dense:
        return {}, []
    index = state.dense_save_index
    writes = [
        BufferWrite(index=index + 1, value=step.tprev, pred=active),
        BufferWrite(index=index, value=step.dense_info, pred=active),
    ]
    return dict(dense_save_index=index + jnp.where(active, 1, 0)), writes


def _check(solver, stepsize_controller) -> None:
    if not isinstance(solver, DeerSolver):
        raise ValueError(
            "`DeerAdjoint` runs the windows of `DeerSolver` only; got solver "
            f"`{type(solver).__name__}`. Use diffrax's default "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` with other solvers."
        )
    if isinstance(stepsize_controller, AbstractAdaptiveStepSizeController):
        raise ValueError(
            "`DeerAdjoint` does not support adaptive step-size controllers (got "
            f"`{type(stepsize_controller).__name__}`). For adaptive windows use the "
            "default `adjoint=diffrax.RecursiveCheckpointAdjoint()`, with which "
            "DeerSolver's windows follow the controller; with `DeerAdjoint` give "
            "fixed windows: `dt0` (one window: `dt0 = t1 - t0`) or "
            "`stepsize_controller=diffrax.StepTo(ts)`."
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
    equal those of the default adjoint to round-off (with `StepTo`, the dense
    output's buffers hold only its windows, not `max_steps` of them). `sol.stats`
    holds diffrax's counts (`num_steps` is the number of windows) and the Newton
    figures and error estimates of the final [`diffrax_deer.DeerState`][]:
    `num_iters`, `total_num_iters`, `max_num_iters`, `update_norm`,
    `residual_norm`, `error_estimate`, `max_error_estimate`,
    `dense_error_estimate`, `max_dense_error_estimate`, `scaled_error`,
    `max_scaled_error`, `total_estimate_iters`. A window that fails sets
    `sol.result` (and raises, with `throw=True`), and the solve stops there.

    **Events.** `event=diffrax.Event(...)` works here, and only here (diffrax's own
    loop checks a condition only at step ends, and a DeerSolver step is a whole
    window: DeerSolver refuses events under other adjoints). After a window
    converges, every condition is evaluated at all its nodes at once; the first node
    at which one triggers (a sign change in the requested `direction`, or a boolean
    that is true) ends the solve, as the end of diffrax's step would. Without a root
    finder the event lands on that node (diffrax's convention: the end of the step
    that contains the crossing). With `root_finder=`, the time is located between
    that node and the one before, in the window's dense output, to the root finder's
    tolerance. `sol.ts`, `sol.ys`, `sol.event_mask`, every `SaveAt` mode and
    `sol.result` (`RESULTS.event_occurred`) are as diffrax gives them; a PyTree of
    conditions too (only the first to trigger, in PyTree order, is marked).
    Derivatives flow through the event time (the root finder's implicit function
    theorem on the dense output). Two crossings within one interval of the grid are
    not seen, as with any fixed-step solver; refine `num_steps` to resolve them.

    **How the windows are looped over** depends on what is known when JAX traces the
    solve. `jax.grad`, `jax.jvp` and `vmap` work with every spelling:

    - `stepsize_controller=diffrax.StepTo(ts)` (and `dt0=None`): `len(ts) - 1`
        windows, a static count. They run in a `lax.scan` (`StepTo([t0, t1])`: one
        window): reverse mode stores what each window's derivative needs and never
        re-solves. The fastest choice.
    - `dt0`: the window count is a traced value. A single window
        (`dt0 >= t1 - t0`, for the whole batch under `vmap`) is still solved once
        and differentiated without re-solving (a `lax.cond` picks it at run time).
        Several windows run in a checkpointed while loop, as diffrax's default
        adjoint does: reverse mode re-solves each window once; forward mode runs the
        tangent loop alongside, at the cost of one more forward solve. Reverse mode
        needs an integer `max_steps`.

    Refused: solvers other than DeerSolver, adaptive step-size controllers
    (use the default adjoint for those) and controllers other than
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
        del passed_solver_state, passed_controller_state
        _check(solver, stepsize_controller)
        # As diffrax: the last window ends exactly at t1 once within 100 ULPs of it.
        t1_clip_floor = t1
        for _ in range(100):
            t1_clip_floor = eqxi.prevbefore(t1_clip_floor)
        # What diffrax passes an event's condition besides (t, y, args).
        cond_kwargs = dict(
            terms=terms,
            solver=solver,
            t0=t0,
            t1=t1,
            dt0=dt0,
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            max_steps=max_steps,
        )
        state = _initial_state(init_state, saveat, event, t0, args)
        if saveat.dense:
            state = fit_dense_buffers(state, stepsize_controller, max_steps)
        window_kwargs = dict(
            solver=solver,
            terms=terms,
            args=args,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
            event=event,
            cond_kwargs=cond_kwargs,
            t0=t0,
            t1=t1,
            t1_clip_floor=t1_clip_floor,
            progress_meter=progress_meter,
            throw=throw,
        )
        window = functools.partial(_window, **window_kwargs)
        if isinstance(stepsize_controller, StepTo):
            num_windows = len(stepsize_controller.ts) - 1

            def unfinished(s):
                return s.num_steps < num_windows

            def scan_window(s, _):
                # Windows after the end of the solve (an event, a failure) are
                # skipped, unless some element of a batch still runs.
                running = eqxi.unvmap_any(is_successful(s.result))
                return lax.cond(running, window, lambda x: x, s), None

            length = num_windows if max_steps is None else min(num_windows, max_steps)
            state, _ = lax.scan(scan_window, state, length=length)
        else:

            def unfinished(s):
                return s.tprev < t1

            state = _dt0_windows(
                state, window_kwargs, unfinished, t0, t1, max_steps, saveat.dense
            )

        state = _finish(state, saveat, event, t0, t1, args, solver, cond_kwargs)
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


def _initial_state(init_state: State, saveat, event, t0, args) -> State:
    """diffrax's saving at `t0`, and the loop state as arrays of fixed types."""

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
        state = eqx.tree_at(lambda s: s.dense_ts, state, state.dense_ts.at[0].set(t0))
    if event is not None:
        # The event's window: its dense output and its bounds, for the root find.
        dense_info = dict(state.event_dense_info, t0=t0, t1=t0)
        state = eqx.tree_at(
            lambda s: s.event_dense_info, state, dense_info, is_leaf=_is_none
        )
    # Loop state must be arrays of fixed types (the init has Python scalars).
    return jtu.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (bool, int, float)) else x,
        state,
    )


def _dt0_windows(
    state: State, window_kwargs: dict, unfinished, t0, t1, max_steps, dense: bool
) -> State:
    """The windows of `dt0`: their number is known only at run time."""
    window = functools.partial(_window, **window_kwargs)
    window_and_dense_writes = functools.partial(
        _window_and_dense_writes, **window_kwargs
    )

    def cond_fun(s):
        return unfinished(s) & is_successful(s.result)

    if max_steps is None:
        # No bound: forward mode only, as diffrax's loop.
        state = eqxi.while_loop(cond_fun, window, state, kind="lax")
        return eqxi.nondifferentiable_backward(
            state,
            msg="Reverse mode with `DeerAdjoint` and `dt0` needs an integer "
            "`max_steps` (or `stepsize_controller=diffrax.StepTo(ts)`).",
            symbolic=True,
        )

    def several(s):
        if not dense:
            return while_loop(cond_fun, window, s, max_steps=max_steps)
        return while_loop(
            cond_fun,
            window_and_dense_writes,
            s,
            max_steps=max_steps,
            buffers=_dense_buffers,
        )

    # One window (the usual `dt0 = t1 - t0`): solve it directly, so reverse mode does
    # not re-solve it as the checkpointed loop would. Decided for the whole batch under
    # `vmap`: the loop handles single windows too, and a batched `lax.cond` would run
    # both branches.
    single = (state.tnext >= t1) & (t0 < t1)
    return lax.cond(eqxi.unvmap_all(single), window, several, state)


def _finish(state: State, saveat, event, t0, t1, args, solver, cond_kwargs) -> State:
    """diffrax's work after the loop: the event's root find (removing what was saved
    after it), saving when `t0 == t1`, then `SaveAt(t1=True)`."""
    tfinal, yfinal, result = state.tprev, state.y, state.result
    save_state = state.save_state
    root_find = event is not None and event.root_finder is not None
    if root_find:
        dense_info = dict(state.event_dense_info)
        interpolation = solver.interpolation_cls(
            t0=dense_info.pop("t0"), t1=dense_info.pop("t1"), **dense_info
        )
        tfinal, yfinal, result = locate_event(
            event,
            interpolation=interpolation,
            mask=state.event_mask,
            t_before=state.event_tprev,
            t_after=state.event_tnext,
            num_steps=state.num_steps,
            t_end=tfinal,
            y_end=yfinal,
            result=result,
            args=args,
            cond_kwargs=cond_kwargs,
        )
        save_state = jtu.tree_map(
            lambda _, s: unsave_after(s, tfinal),
            saveat.subs,
            save_state,
            is_leaf=_is_subsaveat,
        )

    def save_if_t0_equals_t1(subsaveat: SubSaveAt, save_state: SaveState):
        # No window ran: every requested time is t0.
        if subsaveat.ts is not None:
            save_state = _save(
                t0, yfinal, args, subsaveat.fn, save_state, repeat=len(subsaveat.ts)
            )
        return save_state

    def save_t1(subsaveat: SubSaveAt, save_state: SaveState):
        if subsaveat.steps == 0:
            saved_by_steps = False
        elif subsaveat.steps == 1:
            saved_by_steps = True  # the last window's end is saved already
        else:
            saved_by_steps = state.num_accepted_steps % subsaveat.steps == 0
        if root_find:
            # The last step's save lay after the event and was removed.
            pred = subsaveat.t1 | saved_by_steps
        elif saved_by_steps is True:
            pred = False
        else:
            pred = subsaveat.t1 & jnp.invert(saved_by_steps)
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
        save_state,
    )
    save_state = jtu.tree_map(save_t1, saveat.subs, save_state, is_leaf=_is_subsaveat)
    return eqx.tree_at(
        lambda s: (s.save_state, s.tprev, s.y, s.result),
        state,
        (save_state, tfinal, yfinal, result),
        is_leaf=_is_none,
    )
