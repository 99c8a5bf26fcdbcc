"""Work-precision of DeerSolver's methods, and their cost per Newton iteration.

Everything in float64, one DeerSolver window of N uniform intervals, `throw=False`.
Max error = largest absolute error over 101 save times (`SaveAt(ts=linspace(t0, t1,
101))`, values between nodes from the method's dense output) against a tight
reference; "err at t1" is the error at the last node alone (no interpolation).

1. Work-precision. For each target max error and method, the smallest N on a
   geometric ladder (N = 2^2, ..., 2^17 by default) whose solve succeeds (Newton
   converged) with max error <= target, refined by a few geometric bisection steps
   between the last failing and first passing rung. Reported: N, run time (median
   after compilation), Newton iterations. Compared with adaptive diffrax at the
   loosest rtol = atol in 1e-3, ..., 1e-13 that reaches the target.

   - `mlp`: the NeuralODE-style `MLPVectorField` (state 2, width 64, depth 2),
     y0 = (1, -1), t in [0, 10]; Trapezoid, GaussLegendre(2), GaussLegendre(3),
     RadauIIA(3) and the Tsit5 one-step map, against Tsit5 + PIDController.
     Reference: Tsit5 at rtol = atol = 1e-12.
   - `vdp`: stiff Van der Pol, mu = 1000, y0 = (2, 0), t in [0, 500] (the slow
     branch, before the first relaxation jump); BackwardEuler, Trapezoid,
     RadauIIA(3) and GaussLegendre(3), against Kvaerno5 + PIDController.
     Reference: Kvaerno5 at rtol = atol = 1e-12.

   Each reference is checked against the same solver at 1e-11.

2. Cost per Newton iteration at N = 1e4 on the MLP field: `DeerSolver(num_steps=N,
   method=m, max_iters=k, rtol=1e-30, atol=1e-30, predictor_steps=0)` for k = 2 and
   k = 6 (unreachable tolerances, so exactly k iterations run; checked), timed
   alternately; per iteration = (t6 - t2) / 4.

3. The floor: N that GaussLegendre(3) needs for max error 1e-8 on the MLP field
   against the N that Trapezoid needs.

    python benchmarks/work_precision.py --quick
    python benchmarks/work_precision.py --markdown /tmp/bench_work_precision.md \\
        --json /tmp/bench_work_precision.json
"""

import math
import os
import time
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffrax_deer import (  # noqa: E402
    BackwardEuler,
    DeerSolver,
    GaussLegendre,
    RadauIIA,
    Trapezoid,
    __version__ as diffrax_deer_version,
)
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.problems import Problem, get_problem  # noqa: E402
from diffrax_deer._bench.solves import (  # noqa: E402
    Instance,
    scan_tolerances,
    solve_adaptive,
    solve_deer,
    succeeded,
)


NUM_SAVES = 101
PID_TOLERANCES = tuple(10.0**-k for k in range(3, 14))
REFERENCE_TOLERANCE = 1e-12
CHECK_TOLERANCE = 1e-11
PID_MAX_STEPS = 1_000_000

# label -> (method, stages per interval: f and Jacobian evaluations per interval
# per Newton iteration, beyond the nodes for the theta methods)
METHODS: dict[str, tuple[Any, int]] = {
    "Trapezoid": (Trapezoid(), 1),
    "BackwardEuler": (BackwardEuler(), 1),
    "GaussLegendre(2)": (GaussLegendre(stages=2), 2),
    "GaussLegendre(3)": (GaussLegendre(stages=3), 3),
    "RadauIIA(3)": (RadauIIA(stages=3), 3),
    # Tsit5: 7 stages (FSAL), all evaluated afresh on every interval.
    "Tsit5 map": (diffrax.Tsit5(), 7),
}
COST_METHODS = tuple(METHODS)

PROBLEMS: dict[str, dict[str, Any]] = {
    "mlp": dict(
        title="MLP field (state 2, width 64, depth 2), y0 = (1, -1), t in [0, 10]",
        problem=lambda: get_problem("mlp"),
        methods=(
            "Trapezoid",
            "GaussLegendre(2)",
            "GaussLegendre(3)",
            "RadauIIA(3)",
            "Tsit5 map",
        ),
        baseline=("Tsit5", diffrax.Tsit5()),
    ),
    "vdp": dict(
        title=(
            "stiff Van der Pol, mu = 1000, y0 = (2, 0), t in [0, 500] (slow branch)"
        ),
        problem=lambda: get_problem("van-der-pol-stiff").over(500.0),
        methods=("BackwardEuler", "Trapezoid", "RadauIIA(3)", "GaussLegendre(3)"),
        baseline=("Kvaerno5", diffrax.Kvaerno5()),
        note=(
            "y0 = (2, 0) is off the slow manifold (there y' ~ -2/(3 mu)): the "
            "solution starts with a fast layer of width ~1/(3 mu) ~ 3e-4 that no "
            "uniform grid here resolves (h >= 500/2^17 ~ 4e-3). The error columns "
            "are the largest over both components, y and y'."
        ),
    ),
}


def errors(sol, reference: np.ndarray) -> tuple[float, float]:
    """(max error over the save times, error at t1), inf if not finite."""
    ys = np.asarray(sol.ys, dtype=np.float64)
    if not np.all(np.isfinite(ys)):
        return float("inf"), float("inf")
    difference = np.abs(ys - reference)
    return float(np.max(difference)), float(np.max(difference[-1]))


def reference_solution(name: str, problem: Problem, ts) -> dict[str, Any]:
    """The registry's tight reference (the baseline solver at 1e-12), checked
    against the same solver at 1e-11."""
    solutions = {
        tolerance: problem.reference_solve(ts, tolerance=tolerance)
        for tolerance in (REFERENCE_TOLERANCE, CHECK_TOLERANCE)
    }
    reference = np.asarray(solutions[REFERENCE_TOLERANCE].ys)
    check = float(np.max(np.abs(np.asarray(solutions[CHECK_TOLERANCE].ys) - reference)))
    solver_name = PROBLEMS[name]["baseline"][0]
    num_steps = int(solutions[REFERENCE_TOLERANCE].stats["num_steps"])
    timing.progress(
        f"[{name}] reference {solver_name} rtol = atol = {REFERENCE_TOLERANCE:.0e}: "
        f"{num_steps} steps; max difference from {CHECK_TOLERANCE:.0e}: {check:.1e}"
    )
    return dict(
        ys=reference,
        solver=solver_name,
        tolerance=REFERENCE_TOLERANCE,
        check_tolerance=CHECK_TOLERANCE,
        check_difference=check,
        num_steps=num_steps,
    )


class DeerRuns:
    """DeerSolver solves of one problem, cached by (method, N)."""

    def __init__(self, name: str, problem: Instance, reference: np.ndarray):
        self.name = name
        self.problem = problem
        self.reference = reference
        self.cache: dict[tuple[str, int], dict[str, Any]] = {}

    def solver(self, label: str, num_steps: int) -> DeerSolver:
        return DeerSolver(num_steps=num_steps, method=METHODS[label][0])

    def evaluate(self, label: str, num_steps: int) -> dict[str, Any]:
        key = (label, num_steps)
        if key in self.cache:
            return self.cache[key]
        solver = self.solver(label, num_steps)
        timed = timing.time_call(lambda: solve_deer(solver, self.problem), repeats=0)
        sol, first = timed.output, timed.compile_s
        max_error, end_error = errors(sol, self.reference)
        ys = np.asarray(sol.ys, dtype=np.float64)
        by_component = np.max(np.abs(ys - self.reference), axis=0)
        run = dict(
            N=num_steps,
            max_error=max_error,
            end_error=end_error,
            max_error_by_component=[
                float(e) if np.isfinite(e) else float("inf") for e in by_component
            ],
            newton_iters=int(sol.solver_state.num_iters),
            update_norm=float(sol.solver_state.update_norm),
            result=timing.result_name(sol.result),
            successful=succeeded(sol),
            compile_s=first,
            run_s=None,
        )
        timing.progress(
            f"[{self.name}] {label} N={num_steps}: err {timing.fmt_error(max_error)} "
            f"(t1 {timing.fmt_error(end_error)}), {run['newton_iters']} Newton iters, "
            f"{run['result']}, first call {timing.fmt_seconds(first)}"
        )
        self.cache[key] = run
        return run

    def timed(self, label: str, num_steps: int, repeats: int) -> dict[str, Any]:
        run = self.evaluate(label, num_steps)
        if run["run_s"] is None:
            solver = self.solver(label, num_steps)
            timed = timing.time_call(
                lambda: solve_deer(solver, self.problem), repeats=repeats
            )
            run["run_s"] = timed.run_s
        return run


def reaches(run: dict[str, Any], target: float) -> bool:
    return run["successful"] and run["max_error"] <= target


def search_method(
    runs: DeerRuns,
    label: str,
    targets: list[float],
    ladder: list[int],
    bisect_steps: int,
) -> dict[float, dict[str, Any]]:
    """The smallest N reaching each target: the ladder, then geometric bisection."""
    found: dict[float, tuple[int | None, int]] = {}  # target -> (lo fails, hi ok)
    previous = None
    for num_steps in ladder:
        run = runs.evaluate(label, num_steps)
        for target in targets:
            if target not in found and reaches(run, target):
                found[target] = (previous, num_steps)
        if len(found) == len(targets):
            break
        previous = num_steps
    out = {}
    for target in sorted(targets, reverse=True):
        if target not in found:
            out[target] = dict(reached=False)
            continue
        lo, hi = found[target]
        for _ in range(bisect_steps if lo is not None else 0):
            mid = int(round(math.sqrt(lo * hi)))
            if mid <= lo or mid >= hi:
                break
            if reaches(runs.evaluate(label, mid), target):
                hi = mid
            else:
                lo = mid
        out[target] = dict(reached=True, N=hi, last_failing_N=lo)
    return out


def search_baseline(
    name: str,
    problem: Instance,
    reference: np.ndarray,
    targets: list[float],
    repeats: int,
) -> dict[str, Any]:
    """Adaptive diffrax at the loosest tolerance reaching each target."""
    solver_name, solver = PROBLEMS[name]["baseline"]

    def solve_at(tolerance):
        return solve_adaptive(solver, jnp.array(tolerance), problem, PID_MAX_STEPS)

    def report(row):
        timing.progress(
            f"[{name}] {solver_name} PID tol={row['tolerance']:.0e}: err "
            f"{timing.fmt_error(row['max_error'])}, {row['num_accepted']} steps "
            f"(+{row['num_rejected']} rejected), {row['result']}"
        )

    rows, chosen = scan_tolerances(
        solve_at, reference, targets, PID_TOLERANCES, on_row=report
    )
    scanned = [{k: v for k, v in row.items() if k != "solution"} for row in rows]
    out = {}
    for target in targets:
        if target not in chosen:
            out[target] = dict(reached=False, solver=solver_name)
            continue
        row = {k: v for k, v in chosen[target].items() if k != "solution"}
        timed = timing.time_call(solve_at, row["tolerance"], repeats=repeats)
        out[target] = dict(reached=True, solver=solver_name, run_s=timed.run_s, **row)
    return dict(chosen=out, scanned=scanned)


def run_problem(
    name: str,
    targets: list[float],
    ladder: list[int],
    bisect_steps: int,
    repeats: int,
) -> dict[str, Any]:
    definition = PROBLEMS[name]["problem"]()
    problem = definition.instance(jnp.float64, NUM_SAVES)
    jax.clear_caches()
    reference = reference_solution(name, definition, problem.save_ts)
    runs = DeerRuns(name, problem, reference["ys"])
    baseline = search_baseline(name, problem, reference["ys"], targets, repeats)
    methods = {}
    for label in PROBLEMS[name]["methods"]:
        found = search_method(runs, label, targets, ladder, bisect_steps)
        for target, entry in found.items():
            if entry["reached"]:
                run = runs.timed(label, entry["N"], repeats)
                entry.update(
                    {k: v for k, v in run.items() if k != "N"},
                    stages=METHODS[label][1],
                )
                timing.progress(
                    f"[{name}] {label} target {target:.0e}: N={entry['N']}, run "
                    f"{timing.fmt_seconds(run['run_s'])}, "
                    f"{run['newton_iters']} Newton iters"
                )
            else:
                timing.progress(f"[{name}] {label} target {target:.0e}: not reached")
        methods[label] = found
    ladder_runs = [dict(method=label, **run) for (label, _), run in runs.cache.items()]
    del reference["ys"]
    return dict(
        problem=name,
        title=PROBLEMS[name]["title"],
        reference=reference,
        targets=targets,
        methods=methods,
        baseline=baseline,
        runs=ladder_runs,
    )


def iteration_cost(
    num_steps: int, iteration_counts: tuple[int, int], repeats: int
) -> dict[str, Any]:
    """Per-iteration cost of every method: all methods and both iteration counts
    are compiled first, then timed round-robin (so load from other processes is
    spread over all of them); per iteration from the medians and from the
    minima (contention only adds time, so the minimum is the steadier estimate)."""
    problem = get_problem("mlp").instance(jnp.float64, NUM_SAVES)
    jax.clear_caches()
    low, high = iteration_counts
    calls = {}
    for label in COST_METHODS:
        for k in (low, high):
            solver = DeerSolver(
                num_steps=num_steps,
                method=METHODS[label][0],
                max_iters=k,
                rtol=1e-30,
                atol=1e-30,
                predictor_steps=0,
            )
            calls[label, k] = lambda solver=solver: solve_deer(solver, problem)
    timing.progress(
        f"[cost N={num_steps}] compiling {len(calls)} solves, then timing "
        f"round-robin, {repeats} rounds"
    )
    timings = timing.time_interleaved(calls, repeats)
    rows = []
    for label in COST_METHODS:
        pair = [timings[label, low], timings[label, high]]
        iters = [int(t.output.solver_state.num_iters) for t in pair]
        results = [timing.result_name(t.output.result) for t in pair]
        series_low, series_high = (t.times_s for t in pair)
        t_low, t_high = (t.run_s for t in pair)
        min_low, min_high = (t.min_s for t in pair)
        row = dict(
            method=label,
            stages=METHODS[label][1],
            iters=iters,
            results=results,
            exact_iterations=iters == [low, high],
            compile_s=[t.compile_s for t in pair],
            t_low_s=t_low,
            t_high_s=t_high,
            t_low_min_s=min_low,
            t_high_min_s=min_high,
            per_iter_s=(t_high - t_low) / (high - low),
            per_iter_min_s=(min_high - min_low) / (high - low),
            times_low_s=series_low,
            times_high_s=series_high,
        )
        rows.append(row)
        timing.progress(
            f"[cost N={num_steps}] {label}: iters {iters} ({', '.join(results)}), "
            f"median t{low} {timing.fmt_seconds(t_low)}, "
            f"t{high} {timing.fmt_seconds(t_high)}; "
            f"per iteration {timing.fmt_seconds(row['per_iter_s'])} (median), "
            f"{timing.fmt_seconds(row['per_iter_min_s'])} (min)"
        )
        if not row["exact_iterations"]:
            timing.progress(
                f"[cost N={num_steps}] {label}: WARNING iterations not exact"
            )
    trapezoid = next(r for r in rows if r["method"] == "Trapezoid")
    for row in rows:
        row["over_trapezoid"] = row["per_iter_s"] / trapezoid["per_iter_s"]
        row["over_trapezoid_min"] = row["per_iter_min_s"] / trapezoid["per_iter_min_s"]
        row["over_stages_trapezoid"] = row["over_trapezoid"] / row["stages"]
        row["over_stages_trapezoid_min"] = row["over_trapezoid_min"] / row["stages"]
    return dict(N=num_steps, iteration_counts=[low, high], repeats=repeats, rows=rows)


def floor_summary(mlp: dict[str, Any], target: float) -> dict[str, Any] | None:
    methods = mlp["methods"]
    if "Trapezoid" not in methods or "GaussLegendre(3)" not in methods:
        return None
    if target not in mlp["targets"]:
        return None
    gl3 = methods["GaussLegendre(3)"][target]
    trap = methods["Trapezoid"][target]

    def ladder_min(label, key):
        # The smallest evaluated N (ladder and bisection points) reaching the target
        # by `key` (max error, or error at t1).
        ns = [
            r["N"]
            for r in mlp["runs"]
            if r["method"] == label and r["successful"] and r[key] <= target
        ]
        return min(ns) if ns else None

    out = dict(
        target=target,
        gl3_N=gl3.get("N"),
        trapezoid_N=trap.get("N"),
        gl3_end_N=ladder_min("GaussLegendre(3)", "end_error"),
        trapezoid_end_N=ladder_min("Trapezoid", "end_error"),
        smallest_N=min(r["N"] for r in mlp["runs"]),
    )
    if gl3["reached"] and trap["reached"]:
        out["ratio"] = gl3["N"] / trap["N"]
        out["stage_ratio"] = 3 * gl3["N"] / trap["N"]
        out["time_ratio"] = gl3["run_s"] / trap["run_s"]
    if out["gl3_end_N"] and out["trapezoid_end_N"]:
        out["end_ratio"] = out["gl3_end_N"] / out["trapezoid_end_N"]
    return out


def fmt_target(target: float) -> str:
    return f"{target:.0e}"


def problem_markdown(result: dict[str, Any]) -> str:
    name = result["problem"]
    ref = result["reference"]
    solver_name = PROBLEMS[name]["baseline"][0]
    lines = [
        f"### {result['title']}\n",
        *([PROBLEMS[name]["note"] + "\n"] if "note" in PROBLEMS[name] else []),
        f"Reference: {ref['solver']} with rtol = atol = {ref['tolerance']:.0e} "
        f"({ref['num_steps']} steps); its max difference from rtol = atol = "
        f"{ref['check_tolerance']:.0e} is {ref['check_difference']:.1e}.\n",
    ]
    headers = [
        "target",
        "method",
        "N",
        "max err",
        "err at t1",
        "Newton iters",
        "run",
        f"run / {solver_name}",
    ]
    rows = []
    baseline = result["baseline"]["chosen"]
    for target in result["targets"]:
        base = baseline[target]
        for label, found in result["methods"].items():
            entry = found[target]
            if not entry["reached"]:
                rows.append([fmt_target(target), label, "not reached"] + ["-"] * 5)
                continue
            ratio = entry["run_s"] / base["run_s"] if base["reached"] else None
            rows.append(
                [
                    fmt_target(target),
                    label,
                    str(entry["N"])
                    + (" (smallest tried)" if entry["last_failing_N"] is None else ""),
                    timing.fmt_error(entry["max_error"]),
                    timing.fmt_error(entry["end_error"]),
                    str(entry["newton_iters"]),
                    timing.fmt_seconds(entry["run_s"]),
                    timing.fmt_ratio(ratio),
                ]
            )
        if base["reached"]:
            rows.append(
                [
                    fmt_target(target),
                    f"**{solver_name} + PID** (tol {base['tolerance']:.0e})",
                    f"{base['num_accepted']} steps (+{base['num_rejected']} rej.)",
                    timing.fmt_error(base["max_error"]),
                    timing.fmt_error(base["end_error"]),
                    "-",
                    timing.fmt_seconds(base["run_s"]),
                    "1x",
                ]
            )
        else:
            rows.append(
                [fmt_target(target), f"**{solver_name} + PID**", "not reached"]
                + ["-"] * 5
            )
    lines.append(timing.markdown_table(headers, rows) + "\n")

    # Every evaluated (method, N): the ladder and the bisection points.
    labels = list(result["methods"])
    by_key = {(r["method"], r["N"]): r for r in result["runs"]}
    sizes = sorted({r["N"] for r in result["runs"]})

    def cell(run):
        if run is None:
            return ""
        text = timing.fmt_error(run["max_error"])
        if not run["successful"]:
            short = {
                "nonlinear_max_steps_reached": "max iters",
                "nonlinear_divergence": "diverged",
            }.get(run["result"], run["result"])
            text += f" ({short}, {run['newton_iters']} it)"
        else:
            text += f" ({run['newton_iters']} it)"
        return text

    lines.append(
        "Max error (Newton iterations; outcome if not converged) at every N "
        "evaluated:\n"
    )
    lines.append(
        timing.markdown_table(
            ["N"] + labels,
            [[str(n)] + [cell(by_key.get((lab, n))) for lab in labels] for n in sizes],
        )
        + "\n"
    )
    scanned = result["baseline"]["scanned"]
    lines.append(f"{solver_name} + PIDController, by tolerance:\n")
    lines.append(
        timing.markdown_table(
            ["rtol = atol", "max err", "err at t1", "steps", "rejected", "result"],
            [
                [
                    f"{row['tolerance']:.0e}",
                    timing.fmt_error(row["max_error"]),
                    timing.fmt_error(row["end_error"]),
                    str(row["num_accepted"]),
                    str(row["num_rejected"]),
                    row["result"],
                ]
                for row in scanned
            ],
        )
        + "\n"
    )
    return "\n".join(lines)


def cost_markdown(cost: dict[str, Any]) -> str:
    low, high = cost["iteration_counts"]
    rows = [
        [
            r["method"],
            str(r["stages"]),
            f"{r['iters'][0]}, {r['iters'][1]}"
            + ("" if r["exact_iterations"] else " (NOT exact)"),
            timing.fmt_seconds(r["t_low_s"]),
            timing.fmt_seconds(r["t_high_s"]),
            timing.fmt_seconds(r["per_iter_s"]),
            timing.fmt_seconds(r["per_iter_min_s"]),
            f"{timing.fmt_ratio(r['over_trapezoid'])} / "
            f"{timing.fmt_ratio(r['over_trapezoid_min'])}",
            f"{timing.fmt_ratio(r['over_stages_trapezoid'])} / "
            f"{timing.fmt_ratio(r['over_stages_trapezoid_min'])}",
        ]
        for r in cost["rows"]
    ]
    return timing.markdown_table(
        [
            "method",
            "stages s",
            "iterations run",
            f"t (k={low}), median",
            f"t (k={high}), median",
            "per iteration (median)",
            "per iteration (min)",
            "/ Trapezoid (median / min)",
            "/ (s x Trapezoid) (median / min)",
        ],
        rows,
    )


def to_markdown(
    info: dict[str, Any],
    settings: dict[str, Any],
    problems: list[dict[str, Any]],
    cost: dict[str, Any] | None,
    floor: dict[str, Any] | None,
) -> str:
    repeats = settings["repeats"]
    parts = [
        "# Work-precision and cost per Newton iteration\n",
        f"{timing.machine_header(info)}\n",
        f"Load average (1 min) at start {settings['load_start']:.2f}, at end "
        f"{settings['load_end']:.2f}. Other processes (e.g. test suites) may have "
        "been running at the same time, so the timings are indicative: compare "
        "ratios within a table rather than absolute times.\n",
        f"Command: `{timing.script_command('work_precision.py')}`\n",
        "## 1. Work-precision\n",
        "float64, one DeerSolver window of N uniform intervals, default Newton "
        "settings (rtol = atol = 1e-10, `max_iters=50`, default RK4 predictor), "
        f"`throw=False`. Max err: largest absolute error at {NUM_SAVES} save times "
        "(`SaveAt(ts=linspace(t0, t1, 101))`) against the reference; between nodes "
        "the values come from Hermite interpolation: cubic for the trapezoid and "
        "backward Euler, quintic (sixth order) for the collocation methods, Tsit5's "
        "own for the Tsit5 map. Err at t1: the last node alone. N: the "
        "smallest N reaching the target with Newton converged, searched on the "
        f"ladder {settings['ladder_text']}"
        + (
            f" and then refined by {settings['bisect']} geometric bisection steps "
            "between the last failing and the first passing rung"
            if settings["bisect"]
            else " (no bisection)"
        )
        + f". Run: median of "
        f"{repeats} calls after the first (compilation). Adaptive diffrax: the "
        "loosest rtol = atol in 1e-3 ... 1e-13 reaching the target; steps = "
        "accepted steps. Run / diffrax > 1 means DeerSolver is slower.\n",
    ]
    for result in problems:
        parts.append(problem_markdown(result))
    if cost is not None:
        low, high = cost["iteration_counts"]
        parts += [
            "## 2. Cost per Newton iteration\n",
            f"MLP field, N = {cost['N']}, `DeerSolver(num_steps=N, method=m, "
            f"max_iters=k, rtol=1e-30, atol=1e-30, predictor_steps=0)`, k = {low} "
            f"and {high} (the tolerances cannot be met, so exactly k iterations run; "
            "the 'iterations run' column checks it). All methods and both k are "
            f"compiled first, then timed round-robin, {cost['repeats']} rounds, so "
            "load from other processes is spread over all of them; per iteration = "
            f"(t{high} - t{low}) / {high - low}, which cancels the fixed costs "
            "(setup, dense output), from the medians and from the minima (other "
            "processes only add time, so the minimum is the steadier estimate on a "
            "shared machine). Stages s: points per interval where f and its "
            "Jacobian are evaluated (Trapezoid and BackwardEuler: 1, shared nodes; "
            "the Tsit5 map: its 7 stages, FSAL included, as each interval is a fresh "
            "step, all differentiated by forward mode). "
            "/ (s x Trapezoid) <= 1 means the method costs at most s times the "
            "trapezoid per iteration.\n",
            cost_markdown(cost) + "\n",
        ]
    if floor is not None:
        parts.append("## 3. The floor: GaussLegendre(3) against Trapezoid\n")
        text = f"Max error {fmt_target(floor['target'])} on the MLP field: "
        if "ratio" in floor:
            text += (
                f"GaussLegendre(3) needs N = {floor['gl3_N']}, Trapezoid N = "
                f"{floor['trapezoid_N']}: node ratio {floor['ratio']:.3g} "
                f"(1/{1 / floor['ratio']:.0f}); counting GL3's 3 stage points per "
                f"interval, {floor['stage_ratio']:.3g} "
                f"(1/{1 / floor['stage_ratio']:.0f}); run-time ratio "
                f"{floor['time_ratio']:.3g}."
            )
        else:
            text += (
                f"not determined (GaussLegendre(3) N = {floor['gl3_N']}, "
                f"Trapezoid N = {floor['trapezoid_N']})."
            )
        if "end_ratio" in floor:
            text += (
                " By the error at t1 alone (a node, no interpolation; only the N "
                f"evaluated above): GaussLegendre(3) N = {floor['gl3_end_N']}"
                + (
                    " (the smallest N tried, so an upper bound)"
                    if floor["gl3_end_N"] == floor["smallest_N"]
                    else ""
                )
                + f", Trapezoid N = {floor['trapezoid_end_N']}, ratio "
                f"{floor['end_ratio']:.3g}."
            )
        parts.append(text + "\n")
    return "\n".join(parts)


def main() -> None:
    parser = timing.script_parser(__doc__)
    parser.add_argument(
        "--targets", default="1e-4,1e-6,1e-8", help="comma-separated max errors"
    )
    parser.add_argument(
        "--problems", default="mlp,vdp", help="comma-separated: mlp, vdp"
    )
    for flag, default, text in (
        ("--ladder-min", 2, "smallest N = 2**this (default 2)"),
        ("--ladder-max", 17, "largest N = 2**this (default 17)"),
        ("--ladder-step", 1, "exponent step of the ladder (1: doubling, 2: x4)"),
        ("--bisect", 2, "geometric bisection steps per target"),
        ("--cost-n", 10_000, "N for the per-iteration cost"),
        ("--cost-repeats", 15, "timed rounds (cost)"),
    ):
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument(
        "--no-cost", action="store_true", help="skip the per-iteration cost"
    )
    timing.add_common_options(
        parser,
        repeats=5,
        quick="targets 1e-4,1e-8; ladder 2^2, 2^4, ..., 2^16; no bisection",
    )
    args = parser.parse_args()

    targets = timing.parse_list(args.targets, float)
    ladder_min, ladder_max, ladder_step = (
        args.ladder_min,
        args.ladder_max,
        args.ladder_step,
    )
    bisect_steps, cost_repeats = args.bisect, args.cost_repeats
    if args.quick:
        targets = [1e-4, 1e-8]
        ladder_min, ladder_max, ladder_step = 2, 16, 2
        bisect_steps, cost_repeats = 0, 5
    if ladder_step < 1 or ladder_min < 0 or ladder_max < ladder_min:
        parser.error("bad ladder")
    ladder = [2**k for k in range(ladder_min, ladder_max + 1, ladder_step)]
    names = timing.parse_list(args.problems, str)
    for name in names:
        if name not in PROBLEMS:
            parser.error(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}")
    if args.repeats < 5:
        timing.progress("note: fewer than 5 timed repeats")

    info = timing.machine_info()
    timing.progress(timing.machine_header(info))
    load_start = os.getloadavg()[0]
    started = time.perf_counter()

    problems = [
        run_problem(name, targets, ladder, bisect_steps, args.repeats) for name in names
    ]
    cost = None if args.no_cost else iteration_cost(args.cost_n, (2, 6), cost_repeats)
    mlp = next((p for p in problems if p["problem"] == "mlp"), None)
    floor = floor_summary(mlp, 1e-8) if mlp is not None else None

    settings = dict(
        targets=targets,
        ladder=ladder,
        ladder_text=(
            f"N = 2^{ladder_min}, 2^{ladder_min + ladder_step}, ..., 2^{ladder_max}"
            if ladder_step > 1
            else f"N = 2^{ladder_min}, ..., 2^{ladder_max} (doubling)"
        ),
        bisect=bisect_steps,
        repeats=args.repeats,
        load_start=load_start,
        load_end=os.getloadavg()[0],
        wall_s=time.perf_counter() - started,
        diffrax_deer=diffrax_deer_version,
    )
    timing.progress(f"total {settings['wall_s']:.0f} s")
    markdown = to_markdown(info, settings, problems, cost, floor)
    data = dict(
        machine=info, settings=settings, problems=problems, cost=cost, floor=floor
    )
    timing.emit(markdown, data, args)


if __name__ == "__main__":
    main()
