"""Work-precision of DeerSolver() with adaptive windows against diffrax's adaptive
solvers: Tsit5 and Dopri8 (non-stiff), Kvaerno5 (stiff), all with PIDController.

Float64. For every problem of the registry's suite and every tolerance rtol = atol
in 1e-3, ..., 1e-10, each solver runs `diffeqsolve(..., dt0=None,
stepsize_controller=PIDController(rtol=tol, atol=tol))`, saved at 101 uniform
times; the achieved error is the largest absolute error there against the
registry's reference (closed form, published value or tight diffrax). Reported:
achieved error, run time (median of interleaved rounds after compilation), windows
or steps (accepted + rejected), for DeerSolver also its Newton iterations (window
solves + error-estimate solves), re-solves on an adapted mesh, and the ratio of its
largest per-window error estimate to the achieved error.

Floors checked (issue 14):

- every problem at 1e-6: DeerSolver succeeds with an achieved error at most 10x
  that of Tsit5 (Kvaerno5 for the stiff set);
- speed at equal achieved accuracy: each solver's time is interpolated (log-log)
  at DeerSolver's achieved errors; the table gives the ratio.

    python benchmarks/adaptive.py --quick
    python benchmarks/adaptive.py --markdown adaptive.md --json adaptive.json \\
        --plot docs/images/adaptive-work-precision.png
"""

import math
import os
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffrax_deer import DeerSolver  # noqa: E402
from diffrax_deer._bench.problems import (  # noqa: E402
    ADAPTIVE_NONSTIFF,
    ADAPTIVE_STIFF,
    get_problem,
)
from diffrax_deer._bench.solves import max_error, succeeded  # noqa: E402
from diffrax_deer._bench.timing import (  # noqa: E402
    add_common_options,
    emit,
    first_call,
    fmt_error,
    fmt_ratio,
    fmt_seconds,
    machine_header,
    machine_info,
    markdown_table,
    progress,
    result_name,
    script_command,
    script_parser,
    time_rounds,
)


NONSTIFF, STIFF = ADAPTIVE_NONSTIFF, ADAPTIVE_STIFF
TOLERANCES = tuple(10.0**-k for k in range(3, 11))
FLOOR_TOLERANCE = 1e-6
MAX_STEPS = 100_000


def solvers_for(name: str) -> dict[str, Any]:
    baselines = (
        {"Kvaerno5": diffrax.Kvaerno5()}
        if name in STIFF
        else {"Tsit5": diffrax.Tsit5(), "Dopri8": diffrax.Dopri8()}
    )
    return {"DeerSolver()": DeerSolver(), **baselines}


def _adaptive(solver, tolerance, case, save_state):
    return diffrax.diffeqsolve(
        case.term,
        solver,
        t0=case.t0,
        t1=case.t1,
        dt0=None,
        y0=case.y0,
        args=case.args,
        saveat=diffrax.SaveAt(ts=case.save_ts, solver_state=save_state),
        stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=MAX_STEPS,
        throw=False,
    )


# Tolerances are traced arrays: one compilation per solver and problem.
solve = eqx.filter_jit(_adaptive)


def _deer_figures(sol) -> dict[str, Any]:
    state = sol.solver_state
    return dict(
        newton_iters=int(state.total_num_iters),
        estimate_iters=int(state.total_estimate_iters),
        remeshes=int(state.total_remeshes),
        max_error_estimate=float(state.max_error_estimate),
        max_scaled_error=float(state.max_scaled_error),
    )


def run_problem(name: str, tolerances, repeats: int) -> dict[str, Any]:
    problem = get_problem(name)
    case = problem.instance(jnp.float64)
    reference = problem.reference(case.save_ts)
    rows = []
    for label, solver in solvers_for(name).items():
        is_deer = isinstance(solver, DeerSolver)
        calls, timings = {}, {}
        for tolerance in tolerances:
            tol = jnp.asarray(tolerance, jnp.float64)

            def call(solver=solver, tol=tol, is_deer=is_deer):
                return solve(solver, tol, case, is_deer)

            calls[tolerance] = call
            timings[tolerance] = first_call(call)
        time_rounds(calls, timings, repeats)
        for tolerance in tolerances:
            sol = timings[tolerance].output
            row = dict(
                problem=name,
                solver=label,
                tolerance=tolerance,
                result=result_name(sol.result),
                successful=succeeded(sol),
                error=max_error(sol.ys, reference),
                accepted=int(sol.stats["num_accepted_steps"]),
                rejected=int(sol.stats["num_rejected_steps"]),
                compile_s=timings[tolerance].compile_s,
                run_s=timings[tolerance].run_s,
            )
            if is_deer:
                row.update(_deer_figures(sol))
                row["estimate_over_error"] = (
                    row["max_error_estimate"] / row["error"]
                    if row["error"] > 0
                    else None
                )
            rows.append(row)
            progress(
                f"[{name}] {label} tol={tolerance:.0e}: {row['result']}, err "
                f"{fmt_error(row['error'])}, {row['accepted']}+{row['rejected']} "
                f"steps, run {fmt_seconds(row['run_s'])}"
            )
    return dict(problem=name, description=problem.description, rows=rows)


def time_at_error(rows, error: float) -> float | None:
    """A solver's time at a given achieved error, interpolated log-log between its
    tolerances (None outside the range it reached)."""
    points = sorted(
        (r["error"], r["run_s"])
        for r in rows
        if r["successful"] and r["run_s"] and math.isfinite(r["error"]) and r["error"]
    )
    if not points or not points[0][0] <= error <= points[-1][0]:
        return None
    errors = np.log([p[0] for p in points])
    times = np.log([p[1] for p in points])
    order = np.argsort(errors)
    return float(np.exp(np.interp(np.log(error), errors[order], times[order])))


def floors(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    deer = [r for r in rows if r["solver"] == "DeerSolver()"]
    baseline = "Kvaerno5" if result["problem"] in STIFF else "Tsit5"
    base = [r for r in rows if r["solver"] == baseline]
    out = dict(problem=result["problem"], baseline=baseline)
    at_floor = [r for r in deer if r["tolerance"] == FLOOR_TOLERANCE]
    base_floor = [r for r in base if r["tolerance"] == FLOOR_TOLERANCE]
    if at_floor and base_floor:
        d, b = at_floor[0], base_floor[0]
        out["succeeds"] = d["successful"]
        out["error_ratio"] = d["error"] / b["error"] if b["error"] > 0 else None
    speedups = []
    for r in deer:
        if r["successful"] and r["run_s"]:
            other = time_at_error(base, r["error"])
            if other is not None:
                speedups.append((r["tolerance"], other / r["run_s"]))
    out["speedups"] = speedups
    return out


def problem_markdown(result: dict[str, Any]) -> str:
    headers = [
        "tol",
        "solver",
        "result",
        "error",
        "steps (acc + rej)",
        "Newton (window + estimate)",
        "re-meshed",
        "estimate / error",
        "run",
    ]
    table = []
    for r in result["rows"]:
        deer = r["solver"] == "DeerSolver()"
        table.append(
            [
                f"{r['tolerance']:.0e}",
                r["solver"],
                r["result"],
                fmt_error(r["error"]),
                f"{r['accepted']} + {r['rejected']}",
                f"{r['newton_iters']} + {r['estimate_iters']}" if deer else "-",
                str(r["remeshes"]) if deer else "-",
                fmt_ratio(r.get("estimate_over_error")) if deer else "-",
                fmt_seconds(r["run_s"]),
            ]
        )
    return f"### {result['description']}\n\n" + markdown_table(headers, table)


def floors_markdown(summaries) -> str:
    headers = ["problem", "vs", "succeeds at 1e-6", "error / baseline's", "speed-up"]
    table = []
    for s in summaries:
        speedups = ", ".join(f"{tol:.0e}: {fmt_ratio(x)}" for tol, x in s["speedups"])
        table.append(
            [
                s["problem"],
                s["baseline"],
                str(s.get("succeeds", "-")),
                fmt_ratio(s.get("error_ratio")),
                speedups or "-",
            ]
        )
    return "### Floors\n\n" + markdown_table(headers, table)


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(results) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows))
    for axis, result in zip(np.ravel(axes), results, strict=False):
        solvers = dict.fromkeys(r["solver"] for r in result["rows"])
        for label in solvers:
            points = [
                (r["error"], r["run_s"])
                for r in result["rows"]
                if r["solver"] == label and r["successful"] and r["run_s"]
            ]
            if points:
                errors, times = zip(*sorted(points), strict=True)
                axis.loglog(errors, times, "o-", label=label, markersize=3)
        axis.set_title(result["problem"], fontsize=9)
        axis.set_xlabel("achieved max error")
        axis.set_ylabel("run time (s)")
        axis.legend(fontsize=7)
    for axis in np.ravel(axes)[len(results) :]:
        axis.axis("off")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = script_parser(__doc__)
    add_common_options(
        parser, repeats=5, quick="two problems, two tolerances, one timed round"
    )
    parser.add_argument("--problems", help="comma-separated registry names")
    parser.add_argument("--plot", metavar="PATH", help="write the work-precision plot")
    parser.add_argument(
        "--tolerances", help="comma-separated rtol = atol values (default 1e-3..1e-10)"
    )
    options = parser.parse_args()
    if options.quick:
        names, tolerances, repeats = ("mlp", "van-der-pol-stiff"), (1e-3, 1e-6), 1
    else:
        names, tolerances, repeats = NONSTIFF + STIFF, TOLERANCES, options.repeats
    if options.problems:
        names = tuple(options.problems.split(","))
    if options.tolerances:
        tolerances = tuple(float(x) for x in options.tolerances.split(","))
    results = [run_problem(name, tolerances, repeats) for name in names]
    summaries = [floors(result) for result in results]
    info = machine_info()
    markdown = "\n\n".join(
        [
            f"# Adaptive windows: work-precision\n\n`{script_command('adaptive.py')}`",
            machine_header(info),
            *[problem_markdown(result) for result in results],
            floors_markdown(summaries),
        ]
    )
    if options.plot:
        plot(results, options.plot)
    emit(markdown, dict(machine=info, results=results, floors=summaries), options)


if __name__ == "__main__":
    main()
