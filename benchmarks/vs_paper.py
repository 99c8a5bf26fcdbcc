"""DeerSolver against the DEER paper's own `solve_ivp`, on the same problems and grids.

The paper's package (Lim et al., ICLR 2024; `deer.solve_ivp`, its exponential
trapezoid with the Jacobian averaged over each interval) is imported only when it
is on the path (`PYTHONPATH=../shared/peers`); without it the script still runs
DeerSolver and Tsit5 and says so. On each problem (the registry's `mlp` field,
`lotka-volterra`, `van-der-pol` with mu = 1), for each N, float64, timed
interleaved in one process (`diffrax_deer._bench.timing`):

- `DeerSolver`: `DeerSolver(num_steps=N)` as a user gets it (trapezoid, Newton's
  default rtol = 1e-10 with `atol=None`, the error estimate on), one window;
- `DeerSolver matched`: `DeerSolver(num_steps=N, rtol=TOL, error_estimate=False)`:
  Newton stops once its estimated error is within TOL times each component's
  largest magnitude, and nothing else is solved (`solve_ivp` estimates no error);
- `our guess`: the nested predictor alone (`predict_trajectory` with DeerSolver's
  settings and rtol = TOL), the guess handed to the paper;
- `paper, our guess`: `solve_ivp` from that guess (the guess's time not included:
  the table adds it in `paper + guess`);
- `paper, cold`: `solve_ivp` from its own default guess (y0 at every node);
- `Tsit5 StepTo`: diffrax's Tsit5 on the same N + 1 nodes, one step after another.

The paper's solves stop at its rule, every |update| <= atol + rtol |y|, with
atol = rtol = TOL, and at most `MAX_ITERS` iterations (DeerSolver's default;
the paper's own 10000 would spend minutes on the cold starts it cannot solve).

Reported: run time (median of `--repeats` interleaved rounds after the first
call), Newton iterations (DeerSolver's finest grid; the paper's found by
bisecting on its `max_iter`, as it does not report them), the max error
at 101 grid nodes against the registry's reference (Tsit5 at rtol = atol =
1e-12), and the cost of one Newton iteration of each DEER: both run exactly K and
2K iterations from our guess (DeerSolver: rtol = 0, atol = 1e-100; the paper:
atol = -1, as its loop stops early once an update is exactly zero, which zero
tolerances reach at N = 1e3), (T(2K) - T(K)) / K, with T the
fastest call (as `benchmarks/gru.py`) and with T the median.

    python benchmarks/vs_paper.py --quick
    PYTHONPATH=../shared/peers python benchmarks/vs_paper.py --markdown vs_paper.md
"""

import sys
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffrax_deer import DeerSolver, Trapezoid, newton_solve  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.problems import get_problem  # noqa: E402
from diffrax_deer._bench.solves import (  # noqa: E402
    max_error,
    solve_deer,
    solve_fixed_grid,
)
from diffrax_deer._core.predictor import (  # noqa: E402
    COARSENING,
    default_predictor_steps,
    predict_trajectory,
)


try:
    from deer import solve_ivp
    from deer.fsolve_ivp import DEER
except ImportError:
    solve_ivp = None


PROBLEMS = ("mlp", "lotka-volterra", "van-der-pol")
# The common stopping tolerance (see the docstring).
TOL = 1e-8
MAX_ITERS = 50
NUM_SAVES = 101
METHOD = Trapezoid()


def parse_args(argv):
    parser = timing.script_parser(__doc__)
    parser.add_argument("--sizes", default="1e3,1e4,1e5", help="grid sizes N")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument(
        "--per-iteration-k", type=int, default=8, help="K (0: skip the timing)"
    )
    parser.add_argument("--no-paper", action="store_true", help="leave solve_ivp out")
    timing.add_common_options(parser, repeats=7, quick="N = 1e4 only, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "1e4", 3
    args.sizes = timing.parse_list(args.sizes, timing.parse_count)
    args.problems = timing.parse_list(args.problems, str)
    return args


ARGS = parse_args(sys.argv[1:])
PAPER = solve_ivp is not None and not ARGS.no_paper


def paper_solve(field, y0, max_iter, tol):
    """Jitted `(ts, guess) -> (nodes, converged)` by the paper's `solve_ivp`
    (`guess=None`: its own default); `max_iter` may be traced."""

    def func(y, x, params):
        del x, params
        return field(0.0, y, None)

    @jax.jit
    def solve(ts, guess, max_iter=max_iter):
        inputs = jnp.zeros((ts.shape[0], 0), ts.dtype)
        method = DEER(yinit_guess=guess, max_iter=max_iter, atol=tol, rtol=tol)
        result = solve_ivp(func, y0, inputs, None, ts, method)
        return result.value, jnp.all(result.success)

    return solve


def paper_iterations(solve, ts, guess) -> int | None:
    """The paper's Newton iterations I: its solve succeeds exactly when
    `max_iter` > I, so bisect on a traced `max_iter`. `None`: not within
    `MAX_ITERS`."""
    low, high = 0, MAX_ITERS + 1  # success at max_iter = high, not at low
    if not bool(solve(ts, guess, high)[1]):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if bool(solve(ts, guess, middle)[1]):
            high = middle
        else:
            low = middle
    return low


def our_newton(field, iterations: int):
    """Jitted `(ts, guess) -> (nodes, iterations)`: DeerSolver's Newton (the core's
    `newton_solve`, trapezoid) run exactly `iterations` times."""

    @jax.jit
    def solve(ts, guess):
        stages = METHOD.init_stages(field, ts, guess, None)
        ys, _, stats = newton_solve(
            field, METHOD, ts, guess, stages, None, rtol=0.0, atol=1e-100,
            max_iters=iterations,
        )  # fmt: skip
        return ys, stats.num_iters

    return solve


def per_iteration(field, y0, ts, guess, k: int) -> dict[str, dict[str, float]]:
    """Seconds per Newton iteration, (T(2K) - T(K)) / K, of each DEER, timed
    interleaved, with T the fastest call and the median one."""
    makers = {"DeerSolver": lambda count: our_newton(field, count)}
    if PAPER:
        # A negative tolerance: `|update| > tol` holds even for an exact zero.
        makers["paper"] = lambda count: paper_solve(field, y0, count, -1.0)
    solves = {
        (name, count): make(count)
        for count in (k, 2 * k)
        for name, make in makers.items()
    }
    calls = {key: (lambda fn=fn: fn(ts, guess)) for key, fn in solves.items()}
    timed = timing.time_interleaved(calls, ARGS.repeats)
    # Exactly K and 2K iterations: ours counts them; the paper's flag is false
    # only when it ran out of `max_iter`.
    for (name, count), result in timed.items():
        done = result.output[1]
        exact = int(done) == count if name == "DeerSolver" else not bool(done)
        assert exact, f"{name} did not run exactly {count} iterations"
    return {
        name: dict(
            min_s=(timed[name, 2 * k].min_s - timed[name, k].min_s) / k,
            median_s=(timed[name, 2 * k].run_s - timed[name, k].run_s) / k,
        )
        for name in makers
    }


def predictor(field, num_steps: int):
    """Jitted `(ts, y0) -> guess`: the nested predictor as DeerSolver runs it
    (its base steps, coarsening and `max_iters`), with rtol = TOL."""

    @jax.jit
    def predict(ts, y0):
        prediction = predict_trajectory(
            field, METHOD, ts, y0, None, base_steps=default_predictor_steps(num_steps),
            coarsening=COARSENING, rtol=TOL, atol=None, max_iters=MAX_ITERS,
        )  # fmt: skip
        return prediction.guess

    return predict


def contenders(field, num_steps: int, case, ts, guess, paper) -> dict[str, Any]:
    """The whole solves, each a call with no arguments."""
    default = DeerSolver(num_steps=num_steps, max_iters=MAX_ITERS)
    matched = DeerSolver(
        num_steps=num_steps, rtol=TOL, max_iters=MAX_ITERS, error_estimate=False
    )
    predict = predictor(field, num_steps)
    calls = {
        "DeerSolver": lambda: solve_deer(default, case),
        "DeerSolver matched": lambda: solve_deer(matched, case),
        "our guess": lambda: predict(ts, case.y0),
    }
    if paper is not None:
        cold = jnp.broadcast_to(case.y0, guess.shape)
        calls["paper, our guess"] = lambda: paper(ts, guess)
        calls["paper, cold"] = lambda: paper(ts, cold)
    calls["Tsit5 StepTo"] = lambda: solve_fixed_grid(diffrax.Tsit5(), num_steps, case)
    return calls


def measure(name: str, num_steps: int) -> dict[str, Any]:
    problem = get_problem(name)
    ts = problem.node_times(num_steps, num_steps + 1)
    saved = np.round(np.linspace(0, num_steps, NUM_SAVES)).astype(np.int64)
    case = problem.instance(jnp.float64, save_ts=ts[saved])
    reference = problem.reference(case.save_ts)
    field = problem.field(jnp.float64)
    guess = jax.block_until_ready(predictor(field, num_steps)(ts, case.y0))
    paper = paper_solve(field, case.y0, MAX_ITERS, TOL) if PAPER else None
    calls = contenders(field, num_steps, case, ts, guess, paper)
    timed = timing.time_interleaved(calls, ARGS.repeats)

    def nodes(label):
        output = timed[label].output
        if label.startswith("DeerSolver") or label == "Tsit5 StepTo":
            return output.ys
        return (output if label == "our guess" else output[0])[saved]

    record = dict(problem=name, N=num_steps)
    for label, result in timed.items():
        record[label] = dict(
            run_s=result.run_s,
            compile_s=result.compile_s,
            max_error=max_error(nodes(label), reference),
        )
    for label in ("DeerSolver", "DeerSolver matched"):
        record[label]["iterations"] = int(timed[label].output.solver_state.num_iters)
        record[label]["result"] = timing.result_name(timed[label].output.result)
    if paper is not None:
        cold = jnp.broadcast_to(case.y0, guess.shape)
        record["paper, our guess"]["iterations"] = paper_iterations(paper, ts, guess)
        record["paper, cold"]["iterations"] = paper_iterations(paper, ts, cold)
        record["paper + guess"] = dict(
            run_s=record["paper, our guess"]["run_s"] + record["our guess"]["run_s"]
        )
    if ARGS.per_iteration_k > 0:
        record["per_iteration"] = per_iteration(
            field, case.y0, ts, guess, ARGS.per_iteration_k
        )
    return record


SOLVES = (
    "DeerSolver",
    "DeerSolver matched",
    "our guess",
    "paper, our guess",
    "paper + guess",
    "paper, cold",
    "Tsit5 StepTo",
)


def solve_rows(record: dict) -> list[list[str]]:
    """One row per solve: iterations, run time, max error, and time over
    DeerSolver matched's."""
    matched = record["DeerSolver matched"]["run_s"]
    rows = []
    for label in SOLVES:
        entry = record.get(label)
        if entry is None:
            continue
        iterations = entry.get("iterations", "-")
        if label == "paper, cold" and iterations is None:
            iterations = f"not in {MAX_ITERS}"
        rows.append(
            [
                record["problem"],
                timing.fmt_count(record["N"]),
                label,
                "-" if iterations is None else str(iterations),
                timing.fmt_seconds(entry["run_s"]),
                timing.fmt_error(entry.get("max_error")),
                timing.fmt_ratio(entry["run_s"] / matched),
            ]
        )
    return rows


def iteration_row(record: dict) -> list[str]:
    costs = record["per_iteration"]
    ours, paper = costs["DeerSolver"], costs.get("paper")
    row = [record["problem"], timing.fmt_count(record["N"])]
    for stat in ("min_s", "median_s"):
        row += [timing.fmt_seconds(ours[stat])]
        if paper is not None:
            row += [
                timing.fmt_seconds(paper[stat]),
                timing.fmt_ratio(ours[stat] / paper[stat]),
            ]
    return row


def floor_rows(records: list[dict]) -> list[list[str]]:
    """The issue's whole-solve floors: speed-up of DeerSolver (matched, and as a
    user gets it) over the paper with our guess (its time included) and over
    Tsit5 on the grid."""
    rows = []
    for record in records:
        row = [record["problem"], timing.fmt_count(record["N"])]
        for label in ("DeerSolver matched", "DeerSolver"):
            ours = record[label]["run_s"]
            if PAPER:
                row.append(timing.fmt_ratio(record["paper + guess"]["run_s"] / ours))
            row.append(timing.fmt_ratio(record["Tsit5 StepTo"]["run_s"] / ours))
        rows.append(row)
    return rows


def to_markdown(info: dict, records: list[dict]) -> str:
    parts = [
        timing.machine_header(info),
        f"Command: `{timing.script_command('vs_paper.py')}`; float64, trapezoid, "
        f"TOL = {TOL:g}, at most {MAX_ITERS} Newton iterations; run = median of "
        f"{ARGS.repeats} interleaved rounds after the first call.",
    ]
    if not PAPER:
        parts.append(
            "The paper's package is not importable (`PYTHONPATH=../shared/peers`), "
            "or `--no-paper`: its solves are left out."
        )
    headers = ["problem", "N", "solve", "Newton iters", "run", "max err", "/ matched"]
    parts.append(
        timing.markdown_table(headers, [r for rec in records for r in solve_rows(rec)])
    )
    if records and "per_iteration" in records[0]:
        headers = ["problem", "N"]
        for stat in ("min", "median"):
            headers += [f"DeerSolver ({stat})"]
            headers += [f"paper ({stat})", "ratio"] if PAPER else []
        k = ARGS.per_iteration_k
        parts.append(f"One Newton iteration, (T({2 * k}) - T({k})) / {k}:")
        parts.append(
            timing.markdown_table(headers, [iteration_row(r) for r in records])
        )
    headers = ["problem", "N"]
    for label in ("matched", "default"):
        headers += [f"paper + guess / {label}"] if PAPER else []
        headers += [f"Tsit5 StepTo / {label}"]
    parts.append("Speed-up of DeerSolver (matched; as a user gets it):")
    parts.append(timing.markdown_table(headers, floor_rows(records)))
    return "\n\n".join(parts)


def main() -> int:
    info = timing.machine_info()
    timing.progress(timing.machine_header(info))
    if not PAPER:
        timing.progress("the paper's deer package is not importable: left out")
    records = []
    for num_steps in ARGS.sizes:
        for name in ARGS.problems:
            timing.progress(f"{name} N={num_steps}")
            records.append(measure(name, num_steps))
            timing.progress(timing.to_json(records[-1]))
    markdown = to_markdown(info, records)
    timing.emit(markdown, dict(machine=info, tol=TOL, records=records), ARGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
