r"""`deer_scan`: `jax.lax.scan` evaluated in parallel over the sequence by DEER.

A recurrence $h_{i+1} = \mathrm{cell}(h_i, x_i)$ is an explicit map, so its Newton
system needs no per-step solve: the same Newton loop, parallel scans and implicit
derivative as the ODE window solve, with the inputs $x_i$ in place of the grid.
"""

import typing
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Inexact, PyTree

from .discretisation import JacobianMode
from .explicit_map import AbstractExplicitMap
from .newton import NewtonStats
from .window import solve_window


_JACOBIAN_MODES = typing.get_args(JacobianMode)

# Newton's stopping tolerances by dtype when none are given: well above the
# round-off floor of the update, and far below what a cell's output resolves
# (the converged sequence then equals `lax.scan`'s to round-off).
_DEFAULT_TOLERANCES = {
    jnp.dtype(jnp.float64): (1e-10, 1e-10),
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.float16): (1e-2, 1e-2),
    jnp.dtype(jnp.bfloat16): (1e-2, 1e-2),
}


class Recurrence(AbstractExplicitMap):
    r"""The residual $r_i = h_{i+1} - \mathrm{cell}(h_i, x_i)$ of a recurrence.

    Here `ts` holds the inputs $x_i$ (any PyTree, leading axis `N`) and the
    `vector_field` is the cell, called as `cell(x_i, h_i, args)` on flat carries.
    """

    def order(self) -> int:
        raise ValueError("A recurrence is exact: it has no order of convergence.")

    def step_inputs(self, ts: PyTree[Array]) -> PyTree[Array]:
        return ts

    def one_step(self, vector_field, step_input, y, args):
        return vector_field(step_input, y, args)


class DeerScanStats(eqx.Module):
    """What [`diffrax_deer.deer_scan`][] reports with `return_stats=True`.

    **Arguments:**

    - `newton`: the [`diffrax_deer.NewtonStats`][] of the solve (`num_iters`,
        `converged`, `diverged`, `residual_norm`, ...).
    - `carries`: the carry after every step, stacked along a leading axis in the
        order of `xs` (also with `reverse=True`), not differentiated. Pass it back
        as `guess=` to warm-start a later solve (e.g. the next training step).
    """

    newton: NewtonStats
    carries: PyTree[Array]


def _check_options(jacobian, damping, max_iters, rtol, atol, return_stats, throw):
    if jacobian not in _JACOBIAN_MODES:
        raise ValueError(
            '`jacobian` must be "full" (DEER) or "diagonal" (quasi-DEER, for large '
            f"carries); got {jacobian!r}."
        )
    flags = (("damping", damping), ("return_stats", return_stats), ("throw", throw))
    for name, value in flags:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False; got {value!r}.")
    if not (isinstance(max_iters, int) and not isinstance(max_iters, bool)) or (
        max_iters < 1
    ):
        raise ValueError(f"`max_iters` must be an integer >= 1; got {max_iters!r}.")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(
                f"`{name}` must be a positive float or None; got {value!r}."
            )
    if not throw and not return_stats:
        raise ValueError(
            "`deer_scan(..., throw=False)` needs `return_stats=True`: without the "
            "statistics, a sequence that did not converge would go unnoticed."
        )


def _sequence_length(xs: PyTree, length: int | None) -> int:
    lengths = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in jtu.tree_leaves(xs)}
    if -1 in lengths:
        raise ValueError("`deer_scan`: every leaf of `xs` needs a leading axis.")
    if len(lengths) > 1:
        raise ValueError(
            "`deer_scan` got `xs` whose leaves have different leading axis sizes: "
            f"{sorted(lengths)}."
        )
    if length is not None:
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"`length` must be an integer >= 0; got {length!r}.")
        if lengths and lengths != {length}:
            raise ValueError(
                f"`deer_scan` got `length={length}` but `xs` of leading axis size "
                f"{lengths.pop()}."
            )
        return length
    if not lengths:
        raise ValueError("`deer_scan` needs `xs` with a leading axis, or `length`.")
    return lengths.pop()


def _check_carry(f, init, first_x) -> None:
    """Trace-time checks that the carry is a floating PyTree that `f` keeps."""
    for leaf in jtu.tree_leaves(init):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                "`deer_scan` solves for the carries by Newton's method, so every "
                f"leaf of `init` must be a real floating array; got dtype {dtype}. "
                "(Integer state, such as a step counter, can travel in `xs`.)"
            )
    new_carry, _ = jax.eval_shape(f, init, first_x)

    def describe(tree):
        leaves, structure = jtu.tree_flatten(tree)
        return structure, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]

    if describe(new_carry) != describe(init):
        raise TypeError(
            "`deer_scan`: `f(carry, x)` must return a new carry of the same "
            "structure, shapes and dtypes as `init` (as for `jax.lax.scan`); "
            f"`init` is {describe(init)}, `f` returned {describe(new_carry)}."
        )


def _flat_guess(guess, init, init_flat, num_steps, reverse):
    """The starting sequence, shape `(N + 1, n)`: `init` then the carries of `guess`
    (a warm start), or `init` at every step."""
    if guess is None:
        return jnp.broadcast_to(init_flat, (num_steps + 1,) + init_flat.shape)
    guess_leaves, guess_structure = jtu.tree_flatten(guess)
    init_leaves, init_structure = jtu.tree_flatten(init)
    shapes_match = [jnp.shape(g) for g in guess_leaves] == [
        (num_steps,) + jnp.shape(x) for x in init_leaves
    ]
    if guess_structure != init_structure or not shapes_match:
        raise ValueError(
            "`deer_scan(..., guess=...)` takes a sequence of carries: the structure "
            f"of `init` with a leading axis of length {num_steps} on every leaf "
            "(e.g. `stats.carries` of an earlier `return_stats=True` call)."
        )
    if reverse:
        guess = _flip(guess)
    flat = jax.vmap(lambda carry: ravel_pytree(carry)[0])(guess)
    return jnp.concatenate([init_flat[None], flat.astype(init_flat.dtype)])


def _converged_stats(dtype) -> NewtonStats:
    # Nothing to solve for (no steps, or a carry with no values).
    zero, real_zero = jnp.array(0, jnp.int32), jnp.zeros((), jnp.finfo(dtype).dtype)
    return NewtonStats(
        num_iters=zero,
        num_rejected=zero,
        update_norm=real_zero,
        residual_norm=real_zero,
        damping=real_zero,
        converged=jnp.array(True),
        diverged=jnp.array(False),
    )


def _raise_unless_converged(outputs, stats, jacobian, damping, max_iters):
    remedies = [f"raise `max_iters` (now {max_iters})"]
    if jacobian == "diagonal":
        remedies.append('use `jacobian="full"` (quasi-DEER converges only linearly)')
    if not damping:
        remedies.append("pass `damping=True`")
    remedies.append("or warm-start it from nearby carries with `guess=`")
    status = (
        " Pass `throw=False, return_stats=True` to get the status "
        "(`stats.newton.converged`) instead of this error."
    )
    options = f"(jacobian={jacobian!r}, damping={damping}, max_iters={max_iters})"
    messages = (
        f"deer_scan: Newton's method did not converge within {max_iters} "
        f"iterations {options}. To converge, {', '.join(remedies)}.{status}",
        f"deer_scan: Newton's method diverged {options}: a step became non-finite "
        "(the cell, its Jacobian or the update overflowed). "
        + ("Pass `damping=True`, or warm-start" if not damping else "Warm-start")
        + " it from nearby carries with `guess=`; check that the cell is finite "
        f"along the sequence.{status}",
    )
    index = jnp.where(stats.diverged, 1, 0)
    return eqx.branched_error_if(outputs, ~stats.converged, index, messages)


def _flip(tree: PyTree) -> PyTree:
    return jtu.tree_map(lambda x: jnp.flip(x, axis=0), tree)


def _stack_outputs(f, carries, xs):
    # The outputs y_i = f(h_i, x_i)[1], all at once, from the solved carries.
    starts = jtu.tree_map(lambda c: c[:-1], carries)
    _, ys = jax.vmap(f)(starts, xs)
    return ys


def _trivial_scan(f, init, xs, num_steps):
    """No Newton solve: no steps, or a carry with no values (independent steps)."""
    if num_steps == 0:
        x_shape = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
        _, y_shape = jax.eval_shape(f, init, x_shape)
        ys = jtu.tree_map(lambda y: jnp.zeros((0,) + y.shape, y.dtype), y_shape)
    else:
        carries = jtu.tree_map(
            lambda c: jnp.broadcast_to(c, (num_steps + 1,) + c.shape), init
        )
        ys = _stack_outputs(f, carries, xs)
    carries = jtu.tree_map(lambda c: jnp.zeros((num_steps,) + c.shape, c.dtype), init)
    return init, ys, carries


def _newton_scan(f, init, xs, guess, options):
    """Solves for the carries by DEER (the window solve), then evaluates the outputs
    at all steps at once. Returns the final carry, the outputs, the carries after
    every step and the Newton statistics."""
    init_flat, unravel = ravel_pytree(init)

    def cell(x, carry_flat, args):
        del args
        new_carry, _ = f(unravel(carry_flat), x)
        return ravel_pytree(new_carry)[0]

    carries_flat, _, stats = solve_window(
        cell, Recurrence(), xs, init_flat, guess=guess, predictor_steps=0, **options
    )
    carries = jax.vmap(unravel)(carries_flat)
    ys = _stack_outputs(f, carries, xs)
    final = jtu.tree_map(lambda c: c[-1], carries)
    return final, ys, jtu.tree_map(lambda c: c[1:], carries), stats


def deer_scan(
    f: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
    init: PyTree[Inexact[Array, "..."]],
    xs: PyTree[Array] | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    jacobian: JacobianMode = "full",
    damping: bool = False,
    guess: PyTree[Array] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_iters: int = 100,
    return_stats: bool = False,
    throw: bool = True,
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, DeerScanStats]:
    r"""`jax.lax.scan`, evaluated in parallel over the sequence by DEER.

    Computes the same as `jax.lax.scan(f, init, xs, length, reverse)`: the carries
    $h_{i+1} = f(h_i, x_i)[0]$ from $h_0$ = `init`, and the outputs
    $y_i = f(h_i, x_i)[1]$, returning `(final_carry, ys)`. Instead of stepping through
    the sequence, it solves for all carries at once by Newton's method on
    $r_i = h_{i+1} - f(h_i, x_i)[0]$ (DEER, Lim et al. 2024, "RNNs are
    parallelizable"): each iteration evaluates the cell and its Jacobian
    $A_i = \partial h_{i+1} / \partial h_i$ at every step at once and solves
    $\delta_{i+1} = A_i \delta_i - r_i$ by a parallel associative scan, in
    $O(\log N)$ depth. Then it evaluates all outputs $y_i$ at once. The result equals
    `lax.scan`'s to round-off.

    Derivatives (`grad`, `jvp`, `vmap` of either, with respect to `init`, `xs` and
    any array `f` closes over, such as a network's weights) come from the implicit
    function theorem at the solution: one more linear recurrence (a reverse scan
    for `grad`); the Newton loop is never differentiated.

    If Newton does not converge within `max_iters`, or diverges, `deer_scan` raises
    an `equinox.EquinoxRuntimeError` naming the remedies (through `jax.jit`: a
    runtime error with that message), unless `throw=False`.

    ```python
    cell = equinox.nn.GRUCell(input_size, hidden_size, key=key)

    def f(h, x):
        h = cell(x, h)
        return h, h

    final, hs = diffrax_deer.deer_scan(f, jnp.zeros(hidden_size), xs)
    ```

    **Arguments:**

    - `f`: the cell, `f(carry, x) -> (new_carry, y)`, as for `jax.lax.scan`. The
        carry may be any PyTree of real floating arrays (its values are flattened
        into one vector of size $n$); inputs and outputs any PyTrees.
    - `init`: the initial carry.
    - `xs`, `length`, `reverse`: as for `lax.scan`: the inputs, a PyTree whose
        leaves share a leading axis of length $N$ (or `None` with `length` = $N$);
        `reverse=True` runs the sequence from the end.
    - `unroll`: accepted for compatibility with `lax.scan`, ignored (no loop).
    - `jacobian`: `"full"` (DEER: exact Newton, quadratic convergence; memory
        $O(N n^2)$ and work $O(N n^3)$ per iteration) or `"diagonal"` (quasi-DEER:
        only the diagonal of $A_i$, memory and scan work $O(N n)$, more
        iterations, the same converged sequence; for large carries, $n \gtrsim 32$).
        Derivatives are exact either way.
    - `damping`: continue with Levenberg-Marquardt steps (a parallel Kalman
        smoother) from the best iterate once a plain Newton step overflows: for
        cells where plain DEER diverges, such as some trained networks. See
        [`diffrax_deer.newton_solve`][].
    - `guess`: a starting sequence of carries (a warm start): the structure of
        `init` with a leading axis of length $N$, the carry after each step in the
        order of `xs`, e.g. `stats.carries` of an earlier call. Not differentiated.
    - `rtol`, `atol`: Newton stops when the error it leaves (estimated from the
        last update and how fast the updates contract) is within `atol + rtol *
        |h|` (RMS over the carry) at every step; `None`: 1e-10 in float64, 1e-5 in
        float32.
    - `max_iters`: the most Newton iterations (DEER is exact after $N$ in exact
        arithmetic; contractive cells take a handful).
    - `return_stats`: also return a [`diffrax_deer.DeerScanStats`][]: the Newton
        statistics and the sequence of carries, for warm starts.
    - `throw`: raise if Newton did not converge (default). `throw=False` requires
        `return_stats=True`: then check `stats.newton.converged` yourself; the
        values returned are those of the iterate with the smallest residual.

    **Returns:**

    `(final_carry, ys)` as `jax.lax.scan`, or `(final_carry, ys, stats)` with
    `return_stats=True`.
    """
    _check_options(jacobian, damping, max_iters, rtol, atol, return_stats, throw)
    if not isinstance(reverse, bool):
        raise ValueError(f"`reverse` must be True or False; got {reverse!r}.")
    del unroll  # a hint for lax.scan's sequential loop; DEER has none
    num_steps = _sequence_length(xs, length)
    init = jtu.tree_map(jnp.asarray, init)
    if reverse:
        xs = _flip(xs)
    if num_steps > 0:
        _check_carry(f, init, jtu.tree_map(lambda x: x[0], xs))
    init_flat, _ = ravel_pytree(init)
    if num_steps == 0 or init_flat.size == 0:
        final, ys, carries = _trivial_scan(f, init, xs, num_steps)
        stats = _converged_stats(init_flat.dtype)
    else:
        guess = _flat_guess(guess, init, init_flat, num_steps, reverse)
        default_rtol, default_atol = _DEFAULT_TOLERANCES[init_flat.dtype]
        options = dict(max_iters=max_iters, jacobian=jacobian, damping=damping)
        options["rtol"] = default_rtol if rtol is None else rtol
        options["atol"] = default_atol if atol is None else atol
        final, ys, carries, stats = _newton_scan(f, init, xs, guess, options)
    if reverse:
        ys, carries = _flip(ys), _flip(carries)
    if throw:
        final, ys = _raise_unless_converged(
            (final, ys), stats, jacobian, damping, max_iters
        )
    if return_stats:
        return final, ys, DeerScanStats(stats, jax.lax.stop_gradient(carries))
    return final, ys
