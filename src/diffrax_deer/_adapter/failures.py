"""DeerSolver's own messages when a window fails under `throw=True`.

diffrax raises with the message of the `RESULTS` member, and a solver must return
diffrax's own `RESULTS` (its loop combines them with `RESULTS.where`, which takes no
subclass). For `nonlinear_max_steps_reached` that message says to increase
`max_steps`, which for DeerSolver counts windows, not Newton iterations. So a window
that fails raises first, from inside the solve, with what it measured and the remedies
that apply. Only under `throw=True`: with `throw=False` the result is returned in
`sol.result`, as diffrax does.
"""

import equinox.internal as eqxi
import jax
import jax.lax as lax
import numpy as np
from jaxtyping import Array, Bool, Int, Real


class NewtonFailure(RuntimeError):
    """A DeerSolver window whose Newton iteration did not converge, or diverged."""


_REMEDIES = (
    "Remedies, in order of likelihood: shorter windows (a smaller `dt0`, or more "
    "times in `stepsize_controller=diffrax.StepTo(ts)`); `DeerSolver(damping=True)` "
    "(Levenberg-Marquardt steps once a Newton step overflows); a larger "
    "`DeerSolver(max_iters=...)`; a finer grid (`num_steps`). diffrax's `max_steps` "
    "counts windows, not Newton iterations: raising it does not help. With "
    "`throw=False` the solve returns `sol.result` instead, and "
    "`SaveAt(solver_state=True)` gives the Newton statistics."
)


def failure_message(
    diverged: bool,
    num_iters: int,
    max_iters: int,
    residual_norm: float,
    update_norm: float,
    t0: float,
    t1: float,
) -> str:
    """The text raised for one failed window."""
    window = f"window [{t0:.6g}, {t1:.6g}]"
    iterations = f"{num_iters} iteration{'' if num_iters == 1 else 's'}"
    if diverged:
        what = (
            f"DeerSolver: Newton's method diverged in the {window} after {iterations} "
            f"(max_iters={max_iters}): the vector field, its Jacobian or "
            "the update became non-finite. The best finite iterate has residual "
            f"{residual_norm:.3e}. Check that the solution does not blow up from "
            "`y0`. "
        )
    else:
        what = (
            f"DeerSolver: Newton's method did not converge in the {window}: after "
            f"{iterations} (max_iters={max_iters}) the residual is "
            f"{residual_norm:.3e} and the last scaled update {update_norm:.3e} "
            "(converged at <= 1). "
        )
    return what + _REMEDIES


def raise_if_failed(
    failed: Bool[Array, ""],
    diverged: Bool[Array, ""],
    num_iters: Int[Array, ""],
    residual_norm: Real[Array, ""],
    update_norm: Real[Array, ""],
    t0: Real[Array, ""],
    t1: Real[Array, ""],
    *,
    max_iters: int,
) -> None:
    """Raises `NewtonFailure` at run time (inside `jit`, `vmap`, loops) where
    `failed`, with the window's figures in the message."""

    def raise_now(failed, diverged, num_iters, residual_norm, update_norm, t0, t1):
        failed = np.asarray(failed)
        if not np.any(failed):
            return
        # Under `vmap` the figures are batched: report the first failed element.
        i = np.flatnonzero(failed.reshape(-1))[0]

        def pick(x):
            x = np.asarray(x)
            return x.reshape(-1)[i] if x.size > 1 else x.reshape(-1)[0]

        raise NewtonFailure(
            failure_message(
                bool(pick(diverged)),
                int(pick(num_iters)),
                max_iters,
                float(pick(residual_norm)),
                float(pick(update_norm)),
                float(pick(t0)),
                float(pick(t1)),
            )
        )

    figures = (failed, diverged, num_iters, residual_norm, update_norm, t0, t1)
    # (Unbatched under `vmap`, so that the callback runs only when some element failed.)
    lax.cond(
        eqxi.unvmap_any(failed),
        lambda: jax.debug.callback(raise_now, *figures),
        lambda: None,
    )
