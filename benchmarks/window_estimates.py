"""Window by window: DeerSolver()'s error estimate against each window's true error.

Float64. For each problem of the work-precision suite (`adaptive.py`) and each
tolerance rtol = atol, DeerSolver() + PIDController solves the whole problem,
saving every accepted window's end. Each window [t_k, t_k+1] is then solved
again on its own from the y_k the adaptive solve reached there, as one window of
length t_k+1 - t_k (the controller accepts it: the same inputs as when it was
accepted), and its solver state gives that window's estimates: max_i RMS(e_i) at
its nodes (`error_estimate`), and the same at its intervals' midpoints for the
dense output (`dense_error_estimate`). The true error of the same window solve is
max_j RMS(y(s_j) - y_ref(s_j)) over the same points (9 of the nodes; every
midpoint), y_ref being diffrax (Kvaerno5 if stiff, else Tsit5) at rtol = atol =
1e-13 from the same (t_k, y_k): the window's own error, not the error carried in
from earlier windows.

Issue 14's floor: the estimate is within a factor of 10 of the true error wherever
that error is above round-off. Here that means above `ROUND_OFF` max(1, max|y|)
and above 10x the reference's own error, bounded by |y_ref - y_ref'| with y_ref'
at 1e-12: on stiff Van der Pol's
slow branch DeerSolver's window error (estimated 1e-17) sits below what Kvaerno5
at 1e-12 resolves over a window of length 100 (1e-10, falling to 1e-12 at 1e-14).
Reported per problem and tolerance: windows checked (at most
`--max-windows`, evenly spread over the solve), the median, smallest and largest
estimate / error, and the share within 10x.

    python benchmarks/window_estimates.py --quick
    python benchmarks/window_estimates.py --markdown window-estimates.md \\
        --json benchmarks/results-window-estimates-cpu.json
"""

import math
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
from diffrax_deer._bench.solves import Instance, succeeded  # noqa: E402
from diffrax_deer._bench.timing import (  # noqa: E402
    add_common_options,
    emit,
    fmt_ratio,
    machine_header,
    machine_info,
    markdown_table,
    progress,
    script_command,
    script_parser,
)


PROBLEMS = ADAPTIVE_NONSTIFF + ADAPTIVE_STIFF
TOLERANCES = (1e-4, 1e-6, 1e-8)
MAX_STEPS = 100_000
WITHIN = 10.0
# What a float64 solve of thousands of steps may carry from round-off alone,
# relative to max(1, max|y|).
ROUND_OFF = 1e-12


def _controller(tolerance):
    return diffrax.PIDController(rtol=tolerance, atol=tolerance)


@eqx.filter_jit
def window_ends(tolerance, case: Instance):
    """The adaptive solve, saved at every accepted window's end."""
    return diffrax.diffeqsolve(
        case.term,
        DeerSolver(),
        case.t0,
        case.t1,
        None,
        case.y0,
        args=case.args,
        saveat=diffrax.SaveAt(t0=True, steps=True),
        stepsize_controller=_controller(tolerance),
        max_steps=MAX_STEPS,
        throw=False,
    )


# Where each window is checked, as fractions of it, on DeerSolver()'s uniform
# 64-interval mesh: at 9 of its nodes, and at the midpoint of every interval (the
# dense output), the points each estimate covers. A few times spread over the
# window would miss an error that lives in a few intervals (Arenstorf's close
# approach to the moon: 250x "over-estimates" at 9 spread times, 1.8x at the
# midpoints). Windows whose mesh was adapted are left out, their nodes having moved.
AT_NODES = np.array([7, 14, 21, 28, 35, 42, 49, 56, 64]) / 64
BETWEEN_NODES = (np.arange(64) + 0.5) / 64
FRACTIONS = np.union1d(AT_NODES, BETWEEN_NODES)
CHECKS = {
    "at nodes": np.isin(FRACTIONS, AT_NODES),
    "between nodes": np.isin(FRACTIONS, BETWEEN_NODES),
}
# The estimate each set is checked against: the nodes' and the dense output's.
ESTIMATES = {"at nodes": "error_estimate", "between nodes": "dense_error_estimate"}


@eqx.filter_jit
def solve_window(solver, tolerance, term, t0, t1, y0, args, dt0):
    """[t0, t1] from y0 with `solver`, saved at the check times `FRACTIONS`; the
    solver state too for DeerSolver, which replays the window as one (dt0 = its
    length), where the reference (dt0=None) takes its own steps."""
    deer = isinstance(solver, DeerSolver)
    fractions = jnp.asarray(FRACTIONS, t0.dtype)
    ts = (t0 + (t1 - t0) * fractions).at[-1].set(t1)
    return diffrax.diffeqsolve(
        term,
        solver,
        t0,
        t1,
        dt0,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts, solver_state=deer),
        stepsize_controller=_controller(tolerance),
        max_steps=16 if deer else MAX_STEPS,
        throw=False,
    )


@eqx.filter_jit
def converged_window(term, t0, t1, y0, args):
    """The same window on the same grid (DeerSolver()'s 64 uniform intervals, its
    method) with Newton run to rtol = 1e-14: the grid's discrete solution, which
    the adaptive solve's Newton, stopped at 1e-2 of its tolerance, only nears."""
    fractions = jnp.asarray(FRACTIONS, t0.dtype)
    ts = (t0 + (t1 - t0) * fractions).at[-1].set(t1)
    solver = DeerSolver(
        num_steps=DeerSolver().intervals,
        method=DeerSolver().method,
        rtol=1e-14,
        atol=None,
        error_estimate=False,
    )
    return diffrax.diffeqsolve(
        term,
        solver,
        t0,
        t1,
        t1 - t0,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        max_steps=1,
        throw=False,
    )


def _rms(values: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(values**2, axis=-1))


def _chosen(count: int, max_windows: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, count - 1, max_windows)).astype(int))


def window_ratios(problem, case, tol, t0, t1, y0) -> dict[str, tuple[str, float, bool]]:
    """One window's estimate / true error for each set of `CHECKS`, or why it has
    none ("not replayed", "re-meshed", "below the reference's error"), and
    whether Newton's stopping error there exceeds the grid's own."""
    inputs = (case.term, t0, t1, y0, case.args)
    replay = solve_window(DeerSolver(), tol, *inputs, t1 - t0)
    solver = diffrax.Kvaerno5() if problem.stiff else diffrax.Tsit5()
    tight, loose = jnp.asarray(1e-13), jnp.asarray(1e-12)
    want, rough = (solve_window(solver, rtol, *inputs, None) for rtol in (tight, loose))
    one_window = int(replay.stats["num_accepted_steps"]) == 1
    if not (one_window and succeeded(replay) and succeeded(want)):
        return dict.fromkeys(CHECKS, ("not replayed", math.nan, False))
    state = replay.solver_state
    discrete = converged_window(*inputs)
    got, want, rough, discrete = (
        np.asarray(sol.ys) for sol in (replay, want, rough, discrete)
    )
    outcomes = {}
    for name, at in CHECKS.items():
        if int(state.total_remeshes) > 0:
            outcomes[name] = ("re-meshed", math.nan, False)
            continue
        error = float(np.max(_rms(got[at] - want[at])))
        reference_error = float(np.max(_rms(rough[at] - want[at])))
        floor = ROUND_OFF * max(1.0, float(np.max(np.abs(want[at]))))
        if error <= max(10 * reference_error, floor):
            outcomes[name] = ("below the reference's error", math.nan, False)
        else:
            estimate = float(getattr(state, ESTIMATES[name]))
            # The estimate is of the grid's discrete solution; the returned iterate
            # is Newton's, this far from it.
            newton_error = float(np.max(_rms(got[at] - discrete[at])))
            grid_error = float(np.max(_rms(discrete[at] - want[at])))
            outcomes[name] = ("checked", estimate / error, newton_error > grid_error)
    return outcomes


def _summary(outcomes) -> dict[str, Any]:
    checked = [(r, newton) for kind, r, newton in outcomes if kind == "checked"]
    counts = {kind: sum(k == kind for k, _, _ in outcomes) for kind, _, _ in outcomes}
    if not checked:
        return dict(
            counts=counts,
            median=None,
            smallest=None,
            largest=None,
            within=None,
            misses=0,
            newton_misses=0,
        )
    ratios = np.array([r for r, _ in checked])
    newton_limited = np.array([newton for _, newton in checked])
    within = np.abs(np.log10(ratios)) <= np.log10(WITHIN)
    return dict(
        counts=counts,
        median=float(np.median(ratios)),
        smallest=float(np.min(ratios)),
        largest=float(np.max(ratios)),
        within=float(np.mean(within)),
        misses=int(np.sum(~within)),
        # Misses where Newton's stopping error (the iterate's distance from the
        # discrete solution) exceeds the discrete solution's own error.
        newton_misses=int(np.sum(~within & newton_limited)),
    )


def check_windows(problem, case, tolerance, max_windows: int) -> dict[str, Any]:
    tol = jnp.asarray(tolerance, jnp.float64)
    sol = window_ends(tol, case)
    ts, ys = np.asarray(sol.ts), np.asarray(sol.ys)
    finite = np.isfinite(ts)
    ts, ys = ts[finite], ys[finite]
    outcomes = {name: [] for name in CHECKS}
    for k in _chosen(len(ts) - 1, max_windows):
        t0, t1, y0 = jnp.asarray(ts[k]), jnp.asarray(ts[k + 1]), jnp.asarray(ys[k])
        for name, outcome in window_ratios(problem, case, tol, t0, t1, y0).items():
            outcomes[name].append(outcome)
    return dict(
        problem=problem.name,
        tolerance=tolerance,
        successful=succeeded(sol),
        windows=len(ts) - 1,
        **{name: _summary(outcome) for name, outcome in outcomes.items()},
    )


def _cells(summary) -> list[str]:
    counts = summary["counts"]
    others = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "checked")
    within = summary["within"]
    return [
        f"{counts.get('checked', 0)}" + (f" ({others})" if others else ""),
        fmt_ratio(summary["median"]),
        f"{fmt_ratio(summary['smallest'])} .. {fmt_ratio(summary['largest'])}",
        "-" if within is None else f"{100 * within:.0f} %",
        f"{summary['newton_misses']} of {summary['misses']}",
    ]


def rows_markdown(rows) -> str:
    headers = ["problem", "tol", "windows"]
    for name in CHECKS:
        headers += [
            f"{name}: windows checked",
            "estimate / error: median",
            "range",
            f"within {WITHIN:g}x",
            "misses where Newton's error > the grid's",
        ]
    table = [
        [r["problem"], f"{r['tolerance']:.0e}", str(r["windows"])]
        + sum((_cells(r[name]) for name in CHECKS), [])
        for r in rows
    ]
    return markdown_table(headers, table)


def main() -> None:
    parser = script_parser(__doc__)
    add_common_options(parser, repeats=1, quick="two problems at 1e-6")
    parser.add_argument("--problems", help="comma-separated registry names")
    parser.add_argument("--tolerances", help="comma-separated rtol = atol values")
    parser.add_argument("--max-windows", type=int, default=40)
    options = parser.parse_args()
    names, tolerances = PROBLEMS, TOLERANCES
    if options.quick:
        names, tolerances = ("lotka-volterra", "van-der-pol-stiff"), (1e-6,)
    if options.problems:
        names = tuple(options.problems.split(","))
    if options.tolerances:
        tolerances = tuple(float(x) for x in options.tolerances.split(","))
    rows = []
    for name in names:
        problem = get_problem(name)
        case = problem.instance(jnp.float64)
        for tolerance in tolerances:
            row = check_windows(problem, case, tolerance, options.max_windows)
            rows.append(row)
            nodes = row["at nodes"]
            progress(
                f"[{name}] tol={tolerance:.0e}: at nodes, estimate / error "
                f"{fmt_ratio(nodes['smallest'])} .. {fmt_ratio(nodes['largest'])}"
            )
    info = machine_info()
    markdown = "\n\n".join(
        [
            f"# Window error estimates\n\n`{script_command('window_estimates.py')}`",
            machine_header(info),
            rows_markdown(rows),
        ]
    )
    emit(markdown, dict(machine=info, rows=rows), options)


if __name__ == "__main__":
    main()
