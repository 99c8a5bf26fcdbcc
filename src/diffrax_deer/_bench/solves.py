"""The solves every benchmark compares: DeerSolver in one window, a solver on a fixed
grid, an adaptive solver; and the errors against a reference.

Each takes an `Instance` (a problem in one dtype, from
`diffrax_deer._bench.problems.Problem.instance`) and returns diffrax's `Solution`
with `throw=False`, so a failed solve is reported by its `result`, not raised. The
`solve_*` versions are `eqx.filter_jit`-ed (the solvers and step counts static).
"""

from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


class Instance(eqx.Module):
    """One problem in one dtype, ready for `diffrax.diffeqsolve`."""

    term: diffrax.ODETerm
    y0: Array
    t0: Array
    t1: Array
    save_ts: Array
    args: Any = None


# Tolerances of the adaptive comparisons: rtol = atol = 1e-3, ..., 1e-12.
ADAPTIVE_TOLERANCES = tuple(10.0**-k for k in range(3, 13))
ADAPTIVE_MAX_STEPS = 200_000


def _solve(
    solver,
    case: Instance,
    dt0,
    controller: diffrax.AbstractStepSizeController,
    *,
    save_state: bool = False,
    adjoint: diffrax.AbstractAdjoint | None = None,
    max_steps: int | None = 4096,
) -> diffrax.Solution:
    return diffrax.diffeqsolve(
        case.term,
        solver,
        t0=case.t0,
        t1=case.t1,
        dt0=dt0,
        y0=case.y0,
        args=case.args,
        saveat=diffrax.SaveAt(ts=case.save_ts, solver_state=save_state),
        stepsize_controller=controller,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        max_steps=max_steps,
        throw=False,
    )


def deer_solve(
    solver,
    case: Instance,
    *,
    save_state: bool = True,
    adjoint: diffrax.AbstractAdjoint | None = None,
    window_by_step_to: bool = False,
) -> diffrax.Solution:
    """`solver` (a DeerSolver) over [t0, t1] in one window, saved at `save_ts`.

    The window is dt0 = t1 - t0, or, with `window_by_step_to`, `StepTo([t0, t1])`
    with dt0=None (what `DeerAdjoint`'s fast path wants). `save_state` also saves
    the solver state (Newton iterations, update norm).
    """
    if window_by_step_to:
        window = diffrax.StepTo(ts=jnp.stack([case.t0, case.t1]))
        return _solve(
            solver, case, None, window, save_state=save_state, adjoint=adjoint
        )
    controller = diffrax.ConstantStepSize()
    dt0 = case.t1 - case.t0
    return _solve(solver, case, dt0, controller, save_state=save_state, adjoint=adjoint)


def fixed_grid_solve(solver, num_steps: int, case: Instance) -> diffrax.Solution:
    """`solver` on the N + 1 = `num_steps` + 1 uniform nodes of [t0, t1] (`StepTo`),
    one step after another."""
    grid = jnp.linspace(case.t0, case.t1, num_steps + 1, dtype=case.y0.dtype)
    return _solve(solver, case, None, diffrax.StepTo(ts=grid), max_steps=num_steps)


def adaptive_solve(
    solver,
    tolerance,
    case: Instance,
    max_steps: int = ADAPTIVE_MAX_STEPS,
    atol=None,
) -> diffrax.Solution:
    """`solver` with a PID controller at rtol = atol = `tolerance` (or rtol =
    `tolerance` and `atol`). Pass tolerances as arrays: they are traced, so one
    compilation serves every value."""
    atol = tolerance if atol is None else atol
    controller = diffrax.PIDController(rtol=tolerance, atol=atol)
    return _solve(solver, case, None, controller, max_steps=max_steps)


solve_deer = eqx.filter_jit(deer_solve)
solve_fixed_grid = eqx.filter_jit(fixed_grid_solve)
solve_adaptive = eqx.filter_jit(adaptive_solve)

# `solve_reference`: the registry's references (`Problem.reference_solve`),
# compiled at XLA's default optimisation level (3) whatever XLA_FLAGS ask for (the
# tests ask for level 0, which compiles faster). Below level 1, XLA does not
# contract `a * b + c` into a fused multiply-add, and Robertson's tight reference
# (atol 1e-20) depends on that last bit: late in the run, y2's derivative is two
# terms of 4e-9 cancelling to 2e-23, and rounded the other way Kvaerno5's steps
# stall near t = 2e10 and it runs out of steps (measured: 66,300 steps at levels 1
# and 3, over 10^6 at level 0 with the elemental emitters).
solve_reference = eqx.filter_jit(
    adaptive_solve, compiler_options={"xla_backend_optimization_level": 3}
)


def succeeded(sol: diffrax.Solution) -> bool:
    return bool(sol.result == diffrax.RESULTS.successful)


def max_error(ys, reference: np.ndarray) -> float:
    """The largest absolute error of `ys` against `reference`; inf if not finite."""
    ys = np.asarray(ys, dtype=np.float64)
    if not np.all(np.isfinite(ys)):
        return float("inf")
    return float(np.max(np.abs(ys - reference)))


def scan_tolerances(
    solve_at: Callable[[float], diffrax.Solution],
    reference: np.ndarray,
    targets: Sequence[float],
    tolerances: Sequence[float] = ADAPTIVE_TOLERANCES,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[float, dict[str, Any]]]:
    """Adaptive solves from the loosest tolerance on, until every target max error
    is reached or a solve fails (a tighter one would fail too: the dtype's floor).

    `solve_at(tolerance)` solves at one tolerance. Returns every row scanned
    (tolerance, max error, error at the last save time, steps in all, accepted
    and rejected, result, first-call seconds, the solution) and, for each target
    reached, the row of the loosest tolerance reaching it.
    """
    from .timing import first_call, result_name

    rows, chosen = [], {}
    for tolerance in tolerances:
        timing = first_call(lambda tolerance=tolerance: solve_at(tolerance))
        sol = timing.output
        ys = np.asarray(sol.ys, np.float64)
        finite = bool(np.all(np.isfinite(ys)))
        row = dict(
            tolerance=tolerance,
            max_error=max_error(ys, reference),
            end_error=(
                float(np.max(np.abs(ys[-1] - reference[-1])))
                if finite
                else float("inf")
            ),
            num_steps=int(sol.stats["num_steps"]),
            num_accepted=int(sol.stats["num_accepted_steps"]),
            num_rejected=int(sol.stats["num_rejected_steps"]),
            result=result_name(sol.result),
            successful=succeeded(sol),
            first_call_s=timing.compile_s,
            solution=sol,
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if not row["successful"]:
            break
        for target in targets:
            if target not in chosen and row["max_error"] <= target:
                chosen[target] = row
        if len(chosen) == len(targets):
            break
    return rows, chosen
