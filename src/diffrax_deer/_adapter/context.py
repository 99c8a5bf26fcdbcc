"""What `diffrax.diffeqsolve` was called with, as seen from inside DeerSolver.

diffrax gives a solver's `init` and `step` the terms, times, state and `args`, and
nothing about `event=`, `adjoint=`, `throw=` or `stepsize_controller=`. DeerSolver needs
three of them: an event under diffrax's own loop would be checked only at window ends
(so it is refused), and `throw` decides whether a failed window raises DeerSolver's own
message, unless an adaptive controller is there to reject it and retry it shorter.
They are read, at trace time, from the innermost `diffeqsolve` call on the Python
stack: the frame of the function in `diffrax/_integrate.py` (diffrax is pinned to
0.7.x, and tests/test_events.py and tests/test_errors.py fail if this stops finding
them).
"""

import sys
from typing import Any

import diffrax
import diffrax._integrate as diffrax_integrate
import equinox as eqx


class SolveContext(eqx.Module):
    """The arguments of the enclosing `diffeqsolve` that a solver cannot see.

    **Arguments:**

    - `event`: its `event=` (after diffrax's own conversion of
        `discrete_terminating_event`), or `None`.
    - `adjoint`: its `adjoint=`.
    - `throw`: its `throw=`.
    - `saveat`, `max_steps`: its `saveat=` and `max_steps=` (dense output reserves
        `max_steps` windows).
    - `adaptive`: whether its `stepsize_controller=` is adaptive (it then rejects
        a failed window rather than failing the solve).
    """

    event: Any
    adjoint: Any
    throw: bool
    saveat: Any = None
    max_steps: int | None = None
    adaptive: bool = False

    @property
    def deer_adjoint(self) -> bool:
        """Whether [`diffrax_deer.DeerAdjoint`][] runs the windows (it then checks
        events and reports failed windows itself)."""
        from .adjoint import DeerAdjoint

        return isinstance(self.adjoint, DeerAdjoint)


def enclosing_diffeqsolve() -> SolveContext | None:
    """The innermost `diffrax.diffeqsolve` being traced, or `None` if the caller is
    not inside one (e.g. a solver's `step` called directly)."""
    filename = diffrax_integrate.__file__
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "diffeqsolve" and code.co_filename == filename:
            names = frame.f_locals
            return SolveContext(
                event=names.get("event"),
                adjoint=names.get("adjoint"),
                throw=bool(names.get("throw", True)),
                saveat=names.get("saveat"),
                max_steps=names.get("max_steps"),
                adaptive=isinstance(
                    names.get("stepsize_controller"),
                    diffrax.AbstractAdaptiveStepSizeController,
                ),
            )
        frame = frame.f_back
    return None


def check_event_support(context: SolveContext | None) -> None:
    """Refuses an event under any loop but [`diffrax_deer.DeerAdjoint`][]'s."""
    if context is not None and context.event is not None and not context.deer_adjoint:
        raise NotImplementedError(
            "DeerSolver with `event=` needs `adjoint=diffrax_deer.DeerAdjoint()`. "
            f"With `adjoint={type(context.adjoint).__name__}()` diffrax's own loop "
            "checks the event only at the end of each window (one DeerSolver step), "
            "so a crossing inside a window would be missed or placed at the window's "
            "end. DeerAdjoint checks the condition at every node and locates the "
            "event in the window's dense output."
            + (
                " It takes fixed windows: replace the adaptive step-size controller "
                "by `dt0` (one window: `dt0 = t1 - t0`) or "
                "`stepsize_controller=diffrax.StepTo(ts)`."
                if context.adaptive
                else ""
            )
        )
