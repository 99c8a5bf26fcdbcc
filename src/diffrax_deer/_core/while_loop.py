"""A while loop with a bounded step count that JAX can differentiate in both modes."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.interpreters.ad as ad
import jax.interpreters.batching as batching
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree


class _LoopConfig(eqx.Module):
    max_steps: int = eqx.field(static=True)


def _stop_gradient(x: Any) -> Any:
    return lax.stop_gradient(x) if eqx.is_array(x) else x


def _run(kind: str, cond, body, init_val, config: _LoopConfig):
    # The carry is (the rest, the buffers); `body` returns the rest and the writes.
    def loop_body(carry):
        rest, nodes = carry
        rest, writes = body(rest)
        return rest, [apply_write(n, w) for n, w in zip(nodes, writes, strict=True)]

    return eqxi.while_loop(
        lambda carry: cond(carry[0]),
        loop_body,
        init_val,
        kind=kind,
        max_steps=config.max_steps,
        buffers=_buffer_part,
    )


def _buffer_part(carry):
    return carry[1]


@eqx.filter_custom_jvp
def _loop(body, init_val, *, cond, config: _LoopConfig):
    # Not differentiated: a plain while loop.
    return _run("lax", cond, body, init_val, config)


@_loop.def_jvp
def _loop_jvp(primals, tangents, *, cond, config: _LoopConfig):
    r"""The primal by the checkpointed loop, the tangent by a linear primitive.

    Forward mode evaluates the primitive: the tangent of a plain while loop. Reverse
    mode transposes it: the checkpointed loop's backward pass, from the checkpoints its
    forward pass stored here. So reverse mode costs what the checkpointed loop costs
    alone, and forward mode one more forward pass.
    """
    # (As arrays, concrete scalar primals are differentiated like the others.)
    body, init_val = jtu.tree_map(_as_array, primals)
    t_body, t_init_val = tangents

    def checkpointed(_body, _init_val):
        return _run("checkpointed", cond, _body, _init_val, config)

    out, vjp_fn = eqx.filter_vjp(checkpointed, body, init_val)
    num_linear = len(jtu.tree_leaves((t_body, t_init_val)))
    t_out = eqxi.filter_primitive_bind(
        _tangent_p, vjp_fn, body, init_val, cond, config, t_body, t_init_val, num_linear
    )
    return out, t_out


def _zeros_if_none(primal, tangent):
    if tangent is None and eqx.is_inexact_array(primal):
        return jnp.zeros(primal.shape, primal.dtype)
    return tangent


def _tangent_impl(vjp_fn, body, init_val, cond, config, t_body, t_init_val, _):
    del vjp_fn
    t_body = jtu.tree_map(_zeros_if_none, body, t_body, is_leaf=_is_none)
    t_init_val = jtu.tree_map(_zeros_if_none, init_val, t_init_val, is_leaf=_is_none)

    def plain(_body, _init_val):
        return _run("lax", cond, _body, _init_val, config)

    out, t_out = eqx.filter_jvp(plain, (body, init_val), (t_body, t_init_val))
    return _inexact_tangents(out, t_out)


def _inexact_tangents(out, t_out):
    # Arrays for exactly the floating-point leaves of the loop's carry, as the abstract
    # evaluation says.
    return jtu.tree_map(
        lambda o, t: _zeros_if_none(o, t) if eqx.is_inexact_array(o) else None,
        out,
        t_out,
        is_leaf=_is_none,
    )


def _is_none(x: Any) -> bool:
    return x is None


def _is_inexact(x: Any) -> bool:
    # An inexact array, or (in abstract evaluation) the abstract value of one.
    return isinstance(x, (jax.Array, jax.core.ShapedArray)) and jnp.issubdtype(
        x.dtype, jnp.inexact
    )


def _tangent_abstract_eval(vjp_fn, body, init_val, cond, config, t_body, t_init_val, _):
    # The loop keeps its carry's structure, shapes and dtypes.
    return jtu.tree_map(
        lambda x: jax.core.ShapedArray(x.shape, x.dtype) if _is_inexact(x) else None,
        init_val,
    )


def _tangent_jvp(primals, tangents):
    raise NotImplementedError(
        "Second derivatives through a `DeerAdjoint` solve with several `dt0` windows "
        "are not supported: give the windows with "
        "`stepsize_controller=diffrax.StepTo(ts)` instead."
    )


def _is_leaf(x: Any) -> bool:
    return x is None or isinstance(x, ad.UndefinedPrimal)


def _keep_undefined(primal, cotangent):
    return cotangent if isinstance(primal, ad.UndefinedPrimal) else None


def _tangent_transpose(inputs, cts_out):
    vjp_fn, body, init_val, cond, config, t_body, t_init_val, _ = inputs
    # Only the tangents are linear inputs; the primals are known.
    assert not any(
        isinstance(x, ad.UndefinedPrimal)
        for x in jtu.tree_leaves((vjp_fn, body, init_val), is_leaf=_is_leaf)
    )
    out_struct = _tangent_abstract_eval(None, None, init_val, None, None, None, None, 0)
    cts_out = jtu.tree_map(
        lambda s, c: (
            None if s is None else (jnp.zeros(s.shape, s.dtype) if c is None else c)
        ),
        out_struct,
        cts_out,
        is_leaf=_is_none,
    )
    ct_body, ct_init_val = vjp_fn(cts_out)
    ct_body = jtu.tree_map(_keep_undefined, t_body, ct_body, is_leaf=_is_leaf)
    ct_init_val = jtu.tree_map(
        _keep_undefined, t_init_val, ct_init_val, is_leaf=_is_leaf
    )
    known = jtu.tree_map(lambda _: None, (vjp_fn, body, init_val, cond, config))
    return (*known, ct_body, ct_init_val, None)


_filtered_transpose = eqxi.filter_primitive_transpose(_tangent_transpose)


def _raw_transpose(cts_out, *inputs, **params):
    # JAX hands known scalar inputs to a transpose rule as Python literals; as arrays
    # they keep the positions equinox's filtering expects.
    inputs = [
        x if isinstance(x, ad.UndefinedPrimal) else jnp.asarray(x) for x in inputs
    ]
    return _filtered_transpose(cts_out, *inputs, **params)


_tangent_p = eqxi.create_vprim(
    "deer_while_loop_tangent",
    eqxi.filter_primitive_def(_tangent_impl),
    eqxi.filter_primitive_def(_tangent_abstract_eval),
    eqxi.filter_primitive_jvp(_tangent_jvp),
    _raw_transpose,
)

_vprim_batch_rule = batching.fancy_primitive_batchers[_tangent_p]


def _batch_rule(axis_data, inputs, batch_axes, **params):
    # A tangent input shared by the batch gets a cotangent summed over it. Equinox's
    # batched primitive does not sum, so broadcast such tangents: the broadcast's
    # transpose then sums. (The linear inputs are the last ones; their number is the
    # last static argument.)
    num_linear = params["static"][-1]
    if any(b is not None for b in batch_axes) and num_linear > 0:
        inputs, batch_axes = list(inputs), list(batch_axes)
        for i in range(len(inputs) - num_linear, len(inputs)):
            if batch_axes[i] is None:
                x = jnp.asarray(inputs[i])
                inputs[i] = jnp.broadcast_to(x, (axis_data.size,) + x.shape)
                batch_axes[i] = 0
    return _vprim_batch_rule(axis_data, tuple(inputs), tuple(batch_axes), **params)


batching.fancy_primitive_batchers[_tangent_p] = _batch_rule


class BufferWrite(eqx.Module):
    """One write into a buffer of `while_loop`:
    `buffer[index] = value` where `pred`.

    **Arguments:**

    - `index`: the position along the buffer's leading axis.
    - `value`: a PyTree like one entry of the buffer.
    - `pred`: whether to write.
    """

    index: Array
    value: PyTree[Array]
    pred: Array


def apply_write(buffer: PyTree, write: BufferWrite) -> PyTree:
    """Does one `BufferWrite` (to a buffer inside the loop, or to an array)."""
    # Mapped over the values: inside the loop each buffer leaf is a buffer object,
    # itself a PyTree.
    return jtu.tree_map(
        lambda v, b: eqxi.buffer_at_set(b, write.index, v, pred=write.pred),
        write.value,
        buffer,
    )


def _as_array(x: Any) -> Any:
    # (JAX may pass concrete values as Python or NumPy scalars.)
    if isinstance(x, (bool, int, float, np.ndarray, np.generic)):
        return jnp.asarray(x)
    return x


def while_loop(
    cond_fun: Callable[[PyTree], Any],
    body_fun: Callable[[PyTree], Any],
    init_val: PyTree,
    *,
    max_steps: int,
    buffers: Callable[[PyTree], list] | None = None,
) -> PyTree:
    r"""`lax.while_loop` with at most `max_steps` steps, differentiable in both modes.

    Reverse mode uses equinox's checkpointed while loop: memory for a bounded number of
    checkpoints of the carry, each step recomputed about once in the backward pass.
    Forward mode (`jax.jvp`, `jax.jacfwd`), which that loop does not support, runs the
    tangent of a plain while loop. JAX derives reverse mode from forward mode, so the
    tangent is a primitive whose transpose is the checkpointed backward pass.

    **Arguments:**

    - `cond_fun`, `body_fun`, `init_val`: as `lax.while_loop`. The carry keeps its
        structure, shapes and dtypes. `cond_fun` is not differentiated.
    - `max_steps`: the most steps taken.
    - `buffers`: parts of the carry that are only written to, at distinct indices,
        which checkpoints then need not copy: `buffers(carry)` returns a list of
        them. `cond_fun` and `body_fun` then see the carry with these parts replaced
        by `None`, and `body_fun` returns `(new_carry, writes)`: one
        `BufferWrite` per buffer.

    **Returns:**

    The final carry.
    """
    init_val = jtu.tree_map(_as_array, init_val)
    if buffers is None:
        rest, nodes = init_val, []

        def body_with_writes(carry):
            return body_fun(carry), []

    else:
        nodes = buffers(init_val)
        rest = eqx.tree_at(buffers, init_val, [None] * len(nodes), is_leaf=_is_none)
        body_with_writes = body_fun
    # Closed-over arrays (the solve's arguments, a network's weights) become explicit
    # inputs, which the custom derivative then sees.
    body = eqx.filter_closure_convert(body_with_writes, rest)
    cond = eqx.filter_closure_convert(cond_fun, rest)
    cond = jtu.tree_map(_stop_gradient, cond)
    config = _LoopConfig(max_steps=max_steps)
    rest, nodes = _loop(body, (rest, nodes), cond=cond, config=config)
    if buffers is None:
        return rest
    return eqx.tree_at(buffers, rest, nodes, is_leaf=_is_none)
