"""Dense output of a `DeerAdjoint` solve: buffers for the windows that can occur."""

import warnings

import equinox as eqx
import jax.tree_util as jtu
from diffrax import StepTo
from diffrax._integrate import State


# Dense output reserved past this, for windows that may never occur, is warned of.
DENSE_WARNING_BYTES = 2**28  # 256 MiB


def fit_dense_buffers(
    state: State, stepsize_controller, max_steps: int | None
) -> State:
    r"""Shortens the dense-output buffers to the windows that can occur.

    diffrax reserves `SaveAt(dense=True)`'s buffers for `max_steps` windows (4096 by
    default), and each window holds DeerSolver's $N + 1$ nodes and what its
    interpolation needs: $O(\text{max\_steps}\,N n)$ values, 0.64 GB at $N = 5000$,
    $n = 2$. With `diffrax.StepTo(ts)` the number of windows, `len(ts) - 1`, is
    known when JAX traces the solve, and the buffers are cut to it. With `dt0` it
    is not (the times are traced), so a reservation above 256 MiB is warned of,
    naming the remedy.

    **Arguments:**

    - `state`: diffrax's loop state, with the dense buffers diffrax allocated.
    - `stepsize_controller`: the solve's step-size controller.
    - `max_steps`: the solve's `max_steps`.
    """
    reserved_windows = state.dense_ts.shape[0] - 1
    if isinstance(stepsize_controller, StepTo):
        num_windows = len(stepsize_controller.ts) - 1
        if max_steps is not None:
            num_windows = min(num_windows, max_steps)
        if num_windows < reserved_windows:
            dense_ts = state.dense_ts[: num_windows + 1]
            dense_infos = jtu.tree_map(lambda x: x[:num_windows], state.dense_infos)
            state = eqx.tree_at(
                lambda s: (s.dense_ts, s.dense_infos), state, (dense_ts, dense_infos)
            )
        return state
    reserved = _nbytes(state.dense_infos)
    warn_if_reserved_is_large(
        reserved,
        reserved_windows,
        "or give the windows as `stepsize_controller=diffrax.StepTo(ts)` (with "
        "`dt0=None`), which reserves only those",
    )
    return state


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(tree))


def warn_if_reserved_is_large(reserved: int, max_steps: int, remedy: str) -> None:
    """Warns when dense output reserves more than 256 MiB for `max_steps` windows.

    **Arguments:**

    - `reserved`: the bytes reserved.
    - `max_steps`: the windows they are reserved for.
    - `remedy`: how else to size them, after "Pass `max_steps` = the number of
        windows".
    """
    if reserved > DENSE_WARNING_BYTES:
        warnings.warn(
            f"`SaveAt(dense=True)` reserves {reserved / 2**30:.2f} GiB of dense "
            f"output: diffrax keeps `max_steps={max_steps}` windows of "
            "DeerSolver's nodes. Pass `max_steps` = the number of windows "
            f"(`ceil((t1 - t0) / dt0)`), {remedy}.",
            stacklevel=3,
        )


def warn_if_dense_buffers_are_large(dense_info, max_steps: int | None) -> None:
    """The same warning under diffrax's own loop, which DeerSolver cannot resize: from
    one window's dense output and the enclosing solve's `max_steps`."""
    if max_steps is not None:
        warn_if_reserved_is_large(
            max_steps * _nbytes(dense_info),
            max_steps,
            "or use `adjoint=diffrax_deer.DeerAdjoint()` with "
            "`stepsize_controller=diffrax.StepTo(ts)`, which reserves only those",
        )
