"""Sequential depth of one DeerSolver solve, its tangent and its gradient, N = 1e3-1e6.

DEER's promise is a depth of O(log N): every loop whose trip count grows with N
is a sequential start the parallel scan cannot hide. For each N, one window of
`DeerSolver(num_steps=N)` (trapezoid, its defaults) on the registry's
Lotka-Volterra problem, float64:

- the static loops of the traced computation (`diffrax_deer._bench.depth`, which
  walks the jaxpr): scans with their trip counts (binary searches of about
  log2 N steps, e.g. `jnp.interp`, left out), and `while` loops, whose trips are
  Newton iterations, known only at run time;
- the same for the tangent (`jax.jvp` in y0) and the gradient (`jax.grad` of
  sum(y(t1)) in y0, `DeerAdjoint`, the window given by `StepTo([t0, t1])`);
- the predictor: its base grid (one sequential loop of that many steps), its DEER
  levels (sizes) and each level's Newton iterations (`predict_trajectory` run with
  DeerSolver's settings), the finest grid's Newton iterations and the error
  estimate's (a Newton solve on N / 2 intervals);
- scan levels: `2 ceil(log2 M) - 1` batched levels of `jax.lax.associative_scan`
  per Newton iteration on M intervals (no loop: unrolled), and the critical
  path, base steps + the sum over Newton solves of iterations x scan levels;
- run times (median of `--repeats` interleaved rounds after the first call) of the
  solve, its tangent and its gradient.

    python benchmarks/depth.py --quick
    python benchmarks/depth.py --markdown depth.md --json depth.json
"""

import collections
import math
import sys

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from diffrax_deer import DeerAdjoint, DeerSolver, Trapezoid  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.depth import scan_levels, sequential_loops  # noqa: E402
from diffrax_deer._bench.problems import get_problem  # noqa: E402
from diffrax_deer._bench.solves import Instance, deer_solve  # noqa: E402
from diffrax_deer._core.predictor import (  # noqa: E402
    COARSENING,
    default_predictor_steps,
    level_sizes,
    predict_trajectory,
)


PROBLEM = "lotka-volterra"
# DeerSolver(num_steps=N)'s Newton settings in float64.
RTOL, MAX_ITERS = 1e-10, 50
MODES = ("forward", "tangent", "gradient")


def solves(num_steps: int):
    """Jitted `y0 -> ...` for each mode: the solve (y(t1) and its Newton
    iterations, fine and error estimate's), its tangent, its gradient."""
    base = get_problem(PROBLEM).instance(jnp.float64)
    solver = DeerSolver(num_steps=num_steps, max_iters=MAX_ITERS)

    def solve(y0):
        case = Instance(base.term, y0, base.t0, base.t1, base.t1[None])
        return deer_solve(solver, case, adjoint=DeerAdjoint(), window_by_step_to=True)

    def forward(y0):
        sol = solve(y0)
        state = sol.solver_state
        return sol.ys[-1], state.num_iters, state.total_estimate_iters

    def end_sum(y0):
        return jnp.sum(solve(y0).ys[-1])

    def tangent(y0):
        return jax.jvp(end_sum, (y0,), (jnp.ones_like(y0),))

    return {"forward": forward, "tangent": tangent, "gradient": jax.grad(end_sum)}


def static_loops(function, y0, num_steps: int) -> tuple[dict[int, int], int]:
    """The scans longer than a binary search over the grid, {trip count: how
    many}, and the number of `while` loops."""
    search = math.ceil(math.log2(num_steps + 1)) + 1
    loops = sequential_loops(function, y0)
    scans = collections.Counter(
        loop.length for loop in loops if loop.kind == "scan" and loop.length > search
    )
    return dict(sorted(scans.items())), sum(loop.kind == "while" for loop in loops)


def predictor_iterations(num_steps: int, y0) -> list[int]:
    """Newton iterations of each DEER level of the predictor, coarsest first."""
    problem = get_problem(PROBLEM)
    field = problem.field(jnp.float64)
    ts = problem.node_times(num_steps, num_steps + 1)

    @jax.jit
    def levels(ts, y0):
        prediction = predict_trajectory(
            field, Trapezoid(), ts, y0, None,
            base_steps=default_predictor_steps(num_steps), coarsening=COARSENING,
            rtol=RTOL, atol=None, max_iters=MAX_ITERS,
        )  # fmt: skip
        return [level.stats.num_iters for level in prediction.levels[1:]]

    return [int(count) for count in levels(ts, y0)]


def measure(num_steps: int, repeats: int) -> dict:
    y0 = get_problem(PROBLEM).y0_array()
    functions = solves(num_steps)
    record = dict(N=num_steps)
    for mode, function in functions.items():
        scans, whiles = static_loops(function, y0, num_steps)
        record[mode] = dict(scans=scans, while_loops=whiles)
    jitted = {mode: jax.jit(function) for mode, function in functions.items()}
    timed = timing.time_interleaved(
        {mode: (lambda fn=fn: fn(y0)) for mode, fn in jitted.items()}, repeats
    )
    for mode in MODES:
        record[mode].update(run_s=timed[mode].run_s, compile_s=timed[mode].compile_s)
    _, fine, estimate = timed["forward"].output
    base = default_predictor_steps(num_steps)
    sizes = level_sizes(num_steps, base, COARSENING)
    newton = list(zip(sizes, predictor_iterations(num_steps, y0), strict=True))
    newton += [(num_steps, int(fine)), (-(-num_steps // 2), int(estimate))]
    record.update(
        base_steps=base,
        levels=list(sizes),
        level_iterations=[count for _, count in newton[:-2]],
        fine_iterations=int(fine),
        estimate_iterations=int(estimate),
        scan_levels=scan_levels(num_steps),
        critical_path=base + sum(count * scan_levels(size) for size, count in newton),
    )
    return record


def loops_text(entry: dict) -> str:
    scans = ", ".join(f"{length} x{count}" for length, count in entry["scans"].items())
    return f"scans {scans or 'none'}; {entry['while_loops']} while"


def table_rows(records: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    depth, loops = [], []
    for record in records:
        count = timing.fmt_count(record["N"])
        depth.append(
            [
                count,
                str(record["base_steps"]),
                ", ".join(str(size) for size in record["levels"]) or "-",
                ", ".join(str(n) for n in record["level_iterations"]) or "-",
                str(record["fine_iterations"]),
                str(record["estimate_iterations"]),
                str(record["scan_levels"]),
                str(record["critical_path"]),
            ]
            + [timing.fmt_seconds(record[mode]["run_s"]) for mode in MODES]
        )
        loops.append([count] + [loops_text(record[mode]) for mode in MODES])
    return depth, loops


def main() -> int:
    parser = timing.script_parser(__doc__)
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6", help="grid sizes N")
    timing.add_common_options(parser, repeats=5, quick="N = 1e3, 1e4 only")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "1e3,1e4", 3
    info = timing.machine_info()
    timing.progress(timing.machine_header(info))
    records = []
    for num_steps in timing.parse_list(args.sizes, timing.parse_count):
        timing.progress(f"N={num_steps}")
        records.append(measure(num_steps, args.repeats))
        timing.progress(timing.to_json(records[-1]))
    depth, loops = table_rows(records)
    depth_headers = [
        "N",
        "base steps",
        "levels (intervals)",
        "level Newton iters",
        "fine Newton iters",
        "estimate Newton iters",
        "scan levels",
        "critical path",
    ] + [f"{mode} run" for mode in MODES]
    markdown = "\n\n".join(
        [
            timing.machine_header(info),
            f"Command: `{timing.script_command('depth.py')}`; {PROBLEM}, trapezoid, "
            f"float64, `DeerSolver(num_steps=N)` (rtol {RTOL:g}); run = median of "
            f"{args.repeats} interleaved rounds after the first call.",
            timing.markdown_table(depth_headers, depth),
            "Static loops of the traced computation (scans: trip count x how many):",
            timing.markdown_table(["N", *MODES], loops),
        ]
    )
    timing.emit(markdown, dict(machine=info, records=records), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
