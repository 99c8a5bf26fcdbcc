"""The forward-solve benchmark: DeerSolver against diffrax's Tsit5 on the MLP field.

Behind both `benchmarks/forward.py` and the command line's `bench`. For each grid
size N and dtype, on the registry's `mlp` problem (MLP 2-64-64-2, softplus,
y0 = (1, -1), t in [0, 10]), everything in one process:

- DeerSolver(num_steps=N, method=...), one window (dt0 = t1 - t0);
- Tsit5 with `StepTo` on the same N + 1 nodes (sequential, N steps);
- Tsit5 with a `PIDController` at the loosest rtol = atol in 1e-3, ..., 1e-12 whose
  max error is at most DeerSolver's.

Max error: the largest absolute error over 101 save times against Tsit5 at
rtol = atol = 1e-12 in float64, with the same weights (float32 rows: the float64
weights rounded to float32). Compile = the first call (trace + compile + one run);
run = the median of `repeats` interleaved rounds (every contender once per round),
each call ending in `jax.block_until_ready`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .._adapter.deer_solver import DeerSolver
from .problems import get_problem
from .solves import (
    max_error,
    scan_tolerances,
    solve_adaptive,
    solve_deer,
    solve_fixed_grid,
    succeeded,
)
from .timing import (
    Timing,
    first_call,
    fmt_count,
    fmt_error,
    fmt_ratio,
    fmt_seconds,
    machine_header,
    machine_info,
    markdown_table,
    progress,
    result_name,
    time_rounds,
)


NUM_SAVES = 101
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _entry(timed: Timing, reference: np.ndarray) -> dict[str, Any]:
    sol = timed.output
    return dict(
        compile_s=timed.compile_s,
        run_s=timed.run_s,
        max_error=max_error(sol.ys, reference),
        result=result_name(sol.result),
        successful=succeeded(sol),
    )


def run_case(
    method,
    method_name: str,
    num_steps: int,
    dtype_name: str,
    repeats: int,
    reference: np.ndarray,
    report: Callable[[str], None] = progress,
) -> dict[str, Any]:
    """One row: DeerSolver, Tsit5 on the same grid, Tsit5 at matched accuracy."""
    dtype = DTYPES[dtype_name]
    case = get_problem("mlp").instance(dtype, NUM_SAVES, weights_dtype=dtype)
    tag = f"[{dtype_name} N={num_steps}]"
    # Empty caches: every first call compiles, as in a fresh process (the PID
    # solve, say, would otherwise reuse the reference's or the previous case's).
    jax.clear_caches()
    solver = DeerSolver(num_steps=num_steps, method=method)
    calls = {
        "deer": lambda: solve_deer(solver, case),
        "step_to": lambda: solve_fixed_grid(diffrax.Tsit5(), num_steps, case),
    }
    timings = {name: first_call(fn) for name, fn in calls.items()}
    deer_sol = timings["deer"].output
    assert np.asarray(deer_sol.ys).dtype == np.dtype(dtype), deer_sol.ys.dtype
    deer_error = max_error(deer_sol.ys, reference)

    def report_pid(row):
        report(
            f"{tag} Tsit5 PID tol={row['tolerance']:.0e}: err "
            f"{fmt_error(row['max_error'])}, {row['num_steps']} steps, {row['result']}"
        )

    scanned, chosen = scan_tolerances(
        lambda tol: solve_adaptive(diffrax.Tsit5(), jnp.asarray(tol, dtype), case),
        reference,
        [deer_error],
        on_row=report_pid,
    )
    pid = dict(reached=deer_error in chosen, compile_s=scanned[0]["first_call_s"])
    if pid["reached"]:
        row = chosen[deer_error]
        tol = jnp.asarray(row["tolerance"], dtype)
        calls["pid"] = lambda: solve_adaptive(diffrax.Tsit5(), tol, case)
        timings["pid"] = Timing(row["solution"], pid["compile_s"], [])
        pid.update(tolerance=row["tolerance"], num_steps=row["num_steps"])
    time_rounds(calls, timings, repeats)

    out: dict[str, Any] = dict(N=num_steps, dtype=dtype_name, method=method_name)
    out["deer"] = _entry(timings["deer"], reference)
    state = deer_sol.solver_state
    out["deer"].update(
        newton_iters=int(state.num_iters), update_norm=float(state.update_norm)
    )
    out["step_to"] = _entry(timings["step_to"], reference)
    if pid["reached"]:
        pid.update(_entry(timings["pid"], reference))
    out["pid"] = pid
    deer_run = out["deer"]["run_s"]
    out["step_to_over_deer"] = _ratio(out["step_to"]["run_s"], deer_run)
    out["pid_over_deer"] = _ratio(pid.get("run_s"), deer_run)
    report(
        f"{tag} DeerSolver({method_name}): compile "
        f"{fmt_seconds(out['deer']['compile_s'])}, run "
        f"{fmt_seconds(deer_run)}, err {fmt_error(deer_error)}, "
        f"{out['deer']['newton_iters']} Newton iters, {out['deer']['result']}; "
        f"StepTo/Deer {fmt_ratio(out['step_to_over_deer'])}, PID/Deer "
        f"{fmt_ratio(out['pid_over_deer'])}"
    )
    return out


def run_forward(
    sizes: Sequence[int],
    dtypes: Sequence[str],
    method,
    method_name: str,
    repeats: int = 5,
    report: Callable[[str], None] = progress,
) -> dict[str, Any]:
    """Every size and dtype; returns the machine and the rows (JSON-ready)."""
    jax.config.update("jax_enable_x64", True)
    info = machine_info()
    report(machine_header(info))
    problem = get_problem("mlp")
    save_ts = jnp.linspace(problem.t0, problem.t1, NUM_SAVES, dtype=jnp.float64)
    references = {}
    for dtype_name in dtypes:
        report(f"reference for {dtype_name}: Tsit5, rtol = atol = 1e-12, float64")
        references[dtype_name] = problem.reference(
            save_ts, weights_dtype=DTYPES[dtype_name]
        )
    cases = [
        run_case(method, method_name, size, name, repeats, references[name], report)
        for name in dtypes
        for size in sizes
    ]
    return dict(machine=info, method=method_name, repeats=repeats, cases=cases)


HEADERS = (
    "dtype",
    "N",
    "Deer compile",
    "Deer run",
    "Deer max err",
    "Newton iters",
    "StepTo compile",
    "StepTo run",
    "StepTo max err",
    "PID tol",
    "PID steps",
    "PID compile",
    "PID run",
    "PID max err",
    "StepTo / Deer",
    "PID / Deer",
)


def _row(case: dict[str, Any]) -> list[str]:
    deer, step_to, pid = case["deer"], case["step_to"], case["pid"]
    iters = str(deer["newton_iters"])
    if not deer["successful"]:
        iters += f" ({deer['result']})"
    reached = pid["reached"]
    return [
        case["dtype"],
        fmt_count(case["N"]),
        fmt_seconds(deer["compile_s"]),
        fmt_seconds(deer["run_s"]),
        fmt_error(deer["max_error"]),
        iters,
        fmt_seconds(step_to["compile_s"]),
        fmt_seconds(step_to["run_s"]),
        fmt_error(step_to["max_error"]),
        f"{pid['tolerance']:.0e}" if reached else "not reached",
        str(pid["num_steps"]) if reached else "-",
        fmt_seconds(pid["compile_s"]),
        fmt_seconds(pid.get("run_s")),
        fmt_error(pid.get("max_error")),
        fmt_ratio(case["step_to_over_deer"]),
        fmt_ratio(case["pid_over_deer"]),
    ]


def to_markdown(results: dict[str, Any], command: str) -> str:
    """The results as a Markdown section: the machine, the setup and one table."""
    intro = (
        f"# Forward solve: DeerSolver({results['method']}) vs Tsit5\n\n"
        f"{machine_header(results['machine'])}\n\n"
        "MLP vector field (state 2, width 64, depth 2, softplus; weights drawn in "
        "float64, rounded to float32 for the float32 rows), y0 = (1, -1), "
        "t in [0, 10], one DeerSolver window of N intervals. Max error: largest "
        f"absolute error at {NUM_SAVES} save times against Tsit5 with rtol = atol "
        "= 1e-12 in float64 (with the same weights). Compile = first call "
        "(trace + compile + one run); run = median of "
        f"{results['repeats']} interleaved rounds after it (each contender once "
        "per round). Tsit5 StepTo uses the same N + 1 nodes; Tsit5 PID uses the "
        "loosest rtol = atol in 1e-3 ... 1e-12 whose max error is at most "
        "DeerSolver's (its compile time is the first tolerance's, as the "
        "tolerance is a traced argument). Ratios > 1 mean DeerSolver is faster."
        f"\n\nCommand: `{command}`\n\n"
    )
    rows = [_row(case) for case in results["cases"]]
    return intro + markdown_table(HEADERS, rows) + "\n"
