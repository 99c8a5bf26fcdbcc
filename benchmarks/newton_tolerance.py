"""Newton's tolerance against the accuracy it buys: iterations and final error.

For the cold-start problems of `cold_start.py` (all but Lorenz over [0, 20], which
one window cannot solve), with the trapezoid and Gauss-Legendre(3), N intervals in
one window and the default RK4 predictor: Newton iterations and the max error at
101 save times against the registry's reference (Tsit5 with rtol = atol = 1e-12,
float64, the field's weights rounded to the run's dtype), for each `rtol` asked for
(`default` = DeerSolver's own; `atol` stays `None`, scaled with the trajectory),
and for Newton run to round-off (12 iterations; the error the discretisation
alone gives). Both are deterministic (nothing is timed), so the figures are valid
under load.

    python benchmarks/newton_tolerance.py --quick  # N = 1e3, trapezoid, 2 problems
    python benchmarks/newton_tolerance.py --rtols default,1e-9,1e-8 \
        --markdown /tmp/newton_tolerance.md
"""

from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffrax_deer import DeerSolver, GaussLegendre, Trapezoid  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.problems import Problem, get_problem  # noqa: E402
from diffrax_deer._bench.solves import Instance, max_error, solve_deer  # noqa: E402


NUM_SAVES = 101
MAX_ITERS = 50
METHODS = {"trapezoid": Trapezoid(), "gl3": GaussLegendre(stages=3)}
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
# Newton run to round-off: a tolerance it cannot reach, and enough iterations to
# get there from the predictor on every problem here (the best iterate is kept).
ROUND_OFF = {"float64": 1e-15, "float32": 1e-9}
ROUND_OFF_ITERS = 12
# `--quick`: every solve compiles (rtol and max_iters are static; XLA takes some
# 10-15 s for each on 2 CPU cores), so a quick run takes two of the problems.
QUICK_PROBLEMS = "lorenz,mlp"


def problems() -> dict[str, Problem]:
    """Table label -> the registry's problem: `cold_start.py`'s, less Lorenz over
    [0, 20] (one window of N = 1e4 does not converge there)."""
    return {
        "Lotka-Volterra [0, 10]": get_problem("lotka-volterra"),
        "Van der Pol mu=1 [0, 20]": get_problem("van-der-pol"),
        "FitzHugh-Nagumo [0, 50]": get_problem("fitzhugh-nagumo"),
        "Lorenz [0, 5]": get_problem("lorenz"),
        "MLP [0, 10]": get_problem("mlp"),
    }


def solve(case: Instance, method, num_steps: int, rtol: float | None, max_iters: int):
    solver = DeerSolver(
        num_steps=num_steps, method=method, rtol=rtol, max_iters=max_iters
    )
    return solve_deer(solver, case)


def run_case(
    name: str,
    case: Instance,
    reference: np.ndarray,
    method_name: str,
    num_steps: int,
    dtype: str,
    rtols: list[str],
) -> dict[str, Any]:
    method = METHODS[method_name]
    converged = solve(case, method, num_steps, ROUND_OFF[dtype], ROUND_OFF_ITERS)
    converged_ys = np.asarray(converged.ys, np.float64)
    floor = max_error(converged_ys, reference)
    row = dict(problem=name, method=method_name, N=num_steps, dtype=dtype, floor=floor)
    for label in rtols:
        rtol = None if label == "default" else float(label)
        sol = solve(case, method, num_steps, rtol, MAX_ITERS)
        error = max_error(sol.ys, reference)
        row[label] = dict(
            iters=int(sol.solver_state.num_iters),
            outcome=timing.result_name(sol.result),
            error=error,
            change=error / floor - 1,
            newton_error=max_error(sol.ys, converged_ys),
        )
    timing.progress(
        f"[{name} {method_name} N={num_steps} {dtype}] floor "
        f"{timing.fmt_error(floor)}: "
        + ", ".join(
            f"{label} {row[label]['iters']} its {row[label]['change']:+.1%}"
            for label in rtols
        )
    )
    return row


def cell(entry: dict[str, Any]) -> str:
    if entry["outcome"] != "successful":
        return f"{entry['iters']} ({entry['outcome']})"
    return f"{entry['iters']} / {entry['change']:+.1%}"


def to_markdown(info: dict[str, Any], rows: list[dict[str, Any]], rtols) -> str:
    headers = ["problem", "method", "N", "dtype", "error at round-off"] + [
        f"rtol {label}: iters / error change" for label in rtols
    ]
    table = timing.markdown_table(
        headers,
        [
            [
                r["problem"],
                r["method"],
                timing.fmt_count(r["N"]),
                r["dtype"],
                timing.fmt_error(r["floor"]),
            ]
            + [cell(r[label]) for label in rtols]
            for r in rows
        ],
    )
    return (
        "# Newton's tolerance: iterations against accuracy\n\n"
        f"{timing.machine_header(info)}\n\n"
        f"One window, default RK4 predictor, `max_iters={MAX_ITERS}`, `atol=None`. "
        f"Error: max over {NUM_SAVES} save times against Tsit5 at rtol = atol = "
        "1e-12 in float64 (the field's weights rounded to the run's dtype); 'error "
        f"at round-off' is that of Newton run for {ROUND_OFF_ITERS} iterations (the "
        "discretisation's own error); 'error change' is each solve's error "
        "relative to it.\n\n"
        f"Command: `{timing.script_command('newton_tolerance.py')}`\n\n{table}\n"
    )


def main() -> None:
    parser = timing.script_parser(__doc__)
    parser.add_argument(
        "--rtols",
        default="default",
        help="comma-separated rtol values; 'default' = DeerSolver's (default)",
    )
    parser.add_argument(
        "--sizes", default="1e3,1e4", help="comma-separated grid sizes N (1e3,1e4)"
    )
    parser.add_argument(
        "--dtypes", default="float64,float32", help="comma-separated dtypes"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods ({', '.join(METHODS)})",
    )
    parser.add_argument(
        "--problems",
        default=None,
        help="comma-separated substrings selecting problems (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N = 1e3, trapezoid, Lorenz and the MLP field (unless "
        "--problems says otherwise)",
    )
    timing.add_output_options(parser)
    args = parser.parse_args()

    if args.quick:
        args.sizes, args.methods = "1000", "trapezoid"
        args.problems = args.problems or QUICK_PROBLEMS
    sizes = timing.parse_list(args.sizes, timing.parse_count)
    dtypes = timing.parse_dtypes(parser, args.dtypes)
    methods = timing.parse_list(args.methods, str)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"bad methods {args.methods!r}; choose from {', '.join(METHODS)}")
    rtols = timing.parse_list(args.rtols, str)
    for label in rtols:
        if label != "default":
            try:
                float(label)
            except ValueError:
                parser.error(f"bad rtol {label!r}: a number or 'default'")
    if not sizes or not rtols:
        parser.error("nothing to run: give at least one size and one rtol")
    cases = problems()
    if args.problems:
        wanted = [w.lower() for w in timing.parse_list(args.problems, str)]
        cases = {n: p for n, p in cases.items() if any(w in n.lower() for w in wanted)}
        if not cases:
            parser.error(f"no problem matches {args.problems!r}")

    info = timing.machine_info()
    timing.progress(timing.machine_header(info))
    rows = []
    for dtype in dtypes:
        for name, problem in cases.items():
            # One instance and one reference per problem and dtype, for every method
            # and size.
            instance = problem.instance(DTYPES[dtype], NUM_SAVES, DTYPES[dtype])
            reference = problem.reference(instance.save_ts, DTYPES[dtype])
            for method_name in methods:
                for num_steps in sizes:
                    rows.append(
                        run_case(
                            name,
                            instance,
                            reference,
                            method_name,
                            num_steps,
                            dtype,
                            rtols,
                        )
                    )
    rows.sort(
        key=lambda r: (
            dtypes.index(r["dtype"]),
            methods.index(r["method"]),
            sizes.index(r["N"]),
            list(cases).index(r["problem"]),
        )
    )
    markdown = to_markdown(info, rows, rtols)
    timing.emit(markdown, dict(machine=info, rows=rows), args)


if __name__ == "__main__":
    main()
