r"""Events for [`diffrax_deer.DeerAdjoint`][]: checked at every node of a window.

diffrax checks an event's condition at the end of each step, and a DeerSolver step is a
whole window: crossings inside it would be missed, or placed at its end. Here the
condition is evaluated at all $N$ nodes of a converged window at once, and the first
node at which it triggers plays the part of the end of diffrax's step: the solve ends
there, and with a root finder the event time is located between that node and the one
before, in the window's dense output.
"""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from diffrax import RESULTS, Event, SubSaveAt
from diffrax._integrate import SaveState
from jaxtyping import Array, Bool, Int, PyTree, Real

from .interpolation import DeerInterpolation


class WindowEvent(eqx.Module):
    """The first node of a window at which an event's condition triggers.

    **Arguments:**

    - `happened`: whether any condition triggered in the window.
    - `node`: the index of that node (the last node, `N`, when none did).
    - `t_before`, `t`: the times of nodes `node - 1` and `node`.
    - `y`: the solution at node `node`.
    - `values`: every condition's value at node `node`.
    - `mask`: which condition triggered there (only the first, in PyTree order, as
        diffrax).
    """

    happened: Bool[Array, ""]
    node: Int[Array, ""]
    t_before: Real[Array, ""]
    t: Real[Array, ""]
    y: PyTree[Array]
    values: PyTree[Array]
    mask: PyTree[Bool[Array, ""]]


def _is_callable(x: Any) -> bool:
    return callable(x)


def _triggered(old, new, direction) -> Bool[Array, "..."]:
    """diffrax's rule: a sign change of a real condition (in `direction`, if given),
    or a boolean condition that is true."""
    if jnp.issubdtype(new.dtype, jnp.bool_):
        return new
    if direction is None:
        return jnp.sign(old) != jnp.sign(new)
    if direction:
        return (jnp.sign(old) <= 0) & (jnp.sign(new) > 0)
    return (jnp.sign(old) > 0) & (jnp.sign(new) <= 0)


def first_leaf_only(mask: PyTree[Bool[Array, ""]]) -> PyTree[Bool[Array, ""]]:
    """Keeps only the first true leaf, in PyTree order (diffrax's convention when
    several conditions trigger on one step)."""
    leaves, structure = jtu.tree_flatten(mask)
    seen = jnp.array(False)
    kept = []
    for leaf in leaves:
        kept.append(leaf & ~seen)
        seen = seen | leaf
    return jtu.tree_unflatten(structure, kept)


def check_window(
    event: Event,
    interpolation: DeerInterpolation,
    values_before: PyTree[Array],
    args: PyTree,
    cond_kwargs: dict[str, Any],
) -> WindowEvent:
    """Evaluates every condition at every node of a window (vectorised) and finds the
    first node at which one triggers.

    **Arguments:**

    - `event`: the `diffrax.Event`.
    - `interpolation`: the converged window's dense output (its nodes are used).
    - `values_before`: each condition's value at the window's start, where the last
        window (or the initial value) left it.
    - `args`: the solve's `args`.
    - `cond_kwargs`: the keyword arguments diffrax passes to conditions (`terms`,
        `solver`, `t0`, `t1`, `dt0`, `saveat`, `stepsize_controller`, `max_steps`).
    """
    ts, ys = interpolation.nodes()
    num_intervals = ts.shape[0] - 1
    after_start = jtu.tree_map(lambda y: y[1:], ys)

    def evaluate(cond_fn, old, direction):
        def at_node(t, y):
            return cond_fn(t, y, args, **cond_kwargs)

        new = jax.vmap(at_node)(ts[1:], after_start)
        previous = jnp.concatenate([jnp.asarray(old, new.dtype)[None], new[:-1]])
        return new, _triggered(previous, new, direction)

    pairs = jtu.tree_map(
        evaluate, event.cond_fn, values_before, event.direction, is_leaf=_is_callable
    )
    structure = jtu.tree_structure(event.cond_fn, is_leaf=_is_callable)
    values, masks = jtu.tree_transpose(structure, jtu.tree_structure((0, 0)), pairs)
    # Per condition the first triggering interval (`num_intervals` if none); overall
    # the earliest of them.
    firsts = [
        jnp.where(jnp.any(m), jnp.argmax(m), num_intervals)
        for m in jtu.tree_leaves(masks)
    ]
    interval = jnp.min(jnp.stack(firsts))
    happened = interval < num_intervals
    interval = jnp.minimum(interval, num_intervals - 1)
    mask = first_leaf_only(jtu.tree_map(lambda m: m[interval] & happened, masks))
    node = interval + 1
    return WindowEvent(
        happened=happened,
        node=node,
        t_before=ts[node - 1],
        t=ts[node],
        y=jtu.tree_map(lambda y: y[node], ys),
        values=jtu.tree_map(lambda v: v[interval], values),
        mask=mask,
    )


def locate_event(
    event: Event,
    *,
    interpolation: DeerInterpolation,
    mask: PyTree[Bool[Array, ""]],
    t_before: Real[Array, ""],
    t_after: Real[Array, ""],
    num_steps: Int[Array, ""],
    t_end: Real[Array, ""],
    y_end: PyTree[Array],
    result: RESULTS,
    args: PyTree,
    cond_kwargs: dict[str, Any],
) -> tuple[Real[Array, ""], PyTree[Array], RESULTS]:
    r"""The event time by `event.root_finder`, in `[t_before, t_after]`, as diffrax.

    As in diffrax's loop: only the triggered condition decides the root (the others
    are zero); a boolean condition puts it at `t_after`; no event at all puts it at
    `t_after` too, which is then the end of the solve. Derivatives of the event time
    come from the root finder's implicit function theorem, through the window's
    interpolation (whose nodes DeerSolver differentiates implicitly too).

    **Returns:**

    The final time, the solution there, and the result (the root finder's failure,
    promoted, if it failed).
    """
    happened = jnp.any(jnp.stack(jtu.tree_leaves(mask)))

    def find_root():
        def to_root_find(t, _):
            distance_from_end = t_after - t

            def value(mask_i, cond_fn_i):
                def triggered_value():
                    v = cond_fn_i(t, interpolation.evaluate(t), args, **cond_kwargs)
                    if jnp.issubdtype(jnp.result_type(v), jnp.bool_):
                        return distance_from_end
                    return jnp.asarray(v, t.dtype)

                v = lax.cond(mask_i, triggered_value, lambda: jnp.zeros_like(t))
                return jnp.where(happened, v, distance_from_end)

            return jtu.tree_map(value, mask, event.cond_fn, is_leaf=_is_callable)

        solution = optx.root_find(
            to_root_find,
            event.root_finder,
            y0=t_after,
            options={"lower": t_before, "upper": t_after},
            throw=False,
        )
        t_final = solution.value
        y_final = lax.cond(
            num_steps == 0, lambda: y_end, lambda: interpolation.evaluate(t_final)
        )
        found = solution.result == optx.RESULTS.successful
        return (
            t_final,
            y_final,
            RESULTS.where(found, result, RESULTS.promote(solution.result)),
        )

    # No event anywhere in the batch: no root find.
    return lax.cond(
        eqxi.unvmap_any(happened), find_root, lambda: (t_end, y_end, result)
    )


def unsave_after(save_state: SaveState, t_final: Real[Array, ""]) -> SaveState:
    """Removes what was saved after the event time (diffrax's `unsave`)."""
    ts = save_state.ts
    after = ts > t_final
    count = jnp.sum(
        after & (ts < jnp.inf), dtype=jnp.asarray(save_state.save_index).dtype
    )
    ys = jtu.tree_map(
        lambda y: jnp.where(after[(...,) + (None,) * (y.ndim - 1)], jnp.inf, y),
        save_state.ys,
    )
    return SaveState(
        saveat_ts_index=save_state.saveat_ts_index - count,
        ts=jnp.where(after, jnp.inf, ts),
        ys=ys,
        save_index=save_state.save_index - count,
    )


def is_subsaveat(x: Any) -> bool:
    return isinstance(x, SubSaveAt)
