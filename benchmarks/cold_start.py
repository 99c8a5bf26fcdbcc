"""Cold start: how DeerSolver's Newton iteration depends on its initial guess.

One window of N = 1e4 trapezoid intervals in float64, `max_iters=50`,
`throw=False`, with the guess from the nested predictor on a base grid of
`predictor_steps` sequential steps (RK4, or ROS2 where RK4 is not finite; each
coarser DEER level interpolated onto the next) or, for `predictor_steps=0`, the
constant y0 at every node. For each problem and predictor: Newton iterations, the
outcome (converged, max iters = `max_iters` reached, diverged = something became
non-finite), the max error at 101 save times against Tsit5 with rtol = atol =
1e-12, and the run time (median of `--repeats` jitted calls after the first).

    python benchmarks/cold_start.py --markdown /tmp/bench_cold_start.md
"""

from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from diffrax_deer import DeerSolver  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.problems import Problem, get_problem  # noqa: E402
from diffrax_deer._bench.solves import max_error, solve_deer  # noqa: E402
from diffrax_deer._core.predictor import default_predictor_steps  # noqa: E402


NUM_STEPS = 10_000
MAX_ITERS = 50
NUM_SAVES = 101
PREDICTORS = ("0", "16", "64", "256", "default")
OUTCOMES = {
    "successful": "converged",
    "nonlinear_max_steps_reached": "max iters",
    "nonlinear_divergence": "diverged",
}


def problems() -> dict[str, Problem]:
    """Table label -> the registry's problem (Lorenz over two horizons)."""
    return {
        "Lotka-Volterra [0, 10]": get_problem("lotka-volterra"),
        "Van der Pol mu=1 [0, 20]": get_problem("van-der-pol"),
        "FitzHugh-Nagumo [0, 50]": get_problem("fitzhugh-nagumo"),
        "Lorenz [0, 5]": get_problem("lorenz"),
        "Lorenz [0, 20]": get_problem("lorenz").over(20.0),
        "MLP [0, 10]": get_problem("mlp"),
    }


def predictor_steps(label: str) -> int | None:
    return None if label == "default" else int(label)


def predictor_label(label: str, num_steps: int) -> str:
    if label == "0":
        return "0 (constant y0)"
    if label == "default":
        return f"default ({default_predictor_steps(num_steps)})"
    return label


def run_problem(
    name: str, num_steps: int, predictors: list[str], repeats: int
) -> list[dict[str, Any]]:
    problem = problems()[name]
    case = problem.instance(jnp.float64, NUM_SAVES)
    reference = problem.reference(case.save_ts)

    rows = []
    for label in predictors:
        jax.clear_caches()  # every first call compiles
        solver = DeerSolver(
            num_steps=num_steps,
            max_iters=MAX_ITERS,
            predictor_steps=predictor_steps(label),
        )
        timed = timing.time_call(
            lambda solver=solver: solve_deer(solver, case), repeats=repeats
        )
        sol = timed.output
        error = max_error(sol.ys, reference)
        result = timing.result_name(sol.result)
        row = dict(
            problem=name,
            predictor=predictor_label(label, num_steps),
            predictor_steps=predictor_steps(label),
            newton_iters=int(sol.solver_state.num_iters),
            outcome=OUTCOMES.get(result, result),
            update_norm=float(sol.solver_state.update_norm),
            max_error=error,
            compile_s=timed.compile_s,
            run_s=timed.run_s,
        )
        timing.progress(
            f"[{name}] predictor {row['predictor']}: {row['newton_iters']} iters, "
            f"{row['outcome']}, err {timing.fmt_error(error)}, compile "
            f"{timing.fmt_seconds(row['compile_s'])}, "
            f"run {timing.fmt_seconds(row['run_s'])}"
        )
        rows.append(row)
    return rows


def to_markdown(
    info: dict[str, Any], rows: list[dict[str, Any]], num_steps: int, repeats: int
) -> str:
    predictors = list(dict.fromkeys(r["predictor"] for r in rows))
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    by_key = {(r["problem"], r["predictor"]): r for r in rows}

    def cell(row):
        if row["outcome"] == "converged":
            return f"{row['newton_iters']}"
        return f"{row['newton_iters']} ({row['outcome']})"

    summary = timing.markdown_table(
        ["problem"] + [f"predictor {p}" for p in predictors],
        [
            [problem] + [cell(by_key[problem, p]) for p in predictors]
            for problem in problems
        ],
    )
    detail = timing.markdown_table(
        [
            "problem",
            "predictor steps",
            "Newton iters",
            "outcome",
            "max err",
            "compile",
            "run",
        ],
        [
            [
                r["problem"],
                r["predictor"],
                str(r["newton_iters"]),
                r["outcome"],
                timing.fmt_error(r["max_error"]),
                timing.fmt_seconds(r["compile_s"]),
                timing.fmt_seconds(r["run_s"]),
            ]
            for r in rows
        ],
    )
    return (
        "# Cold start: Newton iterations against the predictor\n\n"
        f"{timing.machine_header(info)}\n\n"
        f"DeerSolver(num_steps={num_steps}, max_iters={MAX_ITERS}), one window, "
        "float64, `throw=False`. The guess is the nested predictor on a base grid "
        "of `predictor_steps` sequential steps (`0` = the constant y0 at every "
        "node; a non-finite coarse solve falls back to it). Outcome: converged, max "
        f"iters ({MAX_ITERS} reached), or diverged (non-finite iterate). Max err: "
        f"largest absolute error at {NUM_SAVES} save times against Tsit5 with "
        "rtol = atol = 1e-12 (the trapezoid's own discretisation error when "
        "converged). Compile = first call (trace + compile + one run); run = "
        f"median of {repeats} calls after it.\n\n"
        f"Command: `{timing.script_command('cold_start.py')}`\n\n"
        "Newton iterations (outcome if not converged):\n\n"
        f"{summary}\n\n"
        f"{detail}\n"
    )


def main() -> None:
    parser = timing.script_parser(__doc__)
    parser.add_argument(
        "--num-steps", type=int, default=NUM_STEPS, help="intervals N (default 1e4)"
    )
    parser.add_argument(
        "--predictors",
        default=",".join(PREDICTORS),
        help="comma-separated predictor_steps values; 'default' = DeerSolver's",
    )
    parser.add_argument(
        "--problems",
        default=None,
        help="comma-separated substrings selecting problems (default: all)",
    )
    timing.add_common_options(parser, repeats=3)
    args = parser.parse_args()

    predictors = [p for p in args.predictors.split(",") if p]
    for p in predictors:
        if p != "default" and not (p.isdigit()):
            parser.error(f"bad predictor {p!r}: a non-negative integer or 'default'")
    names = list(problems())
    if args.problems:
        wanted = [w.lower() for w in args.problems.split(",") if w]
        names = [n for n in names if any(w in n.lower() for w in wanted)]
        if not names:
            parser.error(f"no problem matches {args.problems!r}")

    info = timing.machine_info()
    timing.progress(timing.machine_header(info))
    rows = []
    for name in names:
        rows += run_problem(name, args.num_steps, predictors, args.repeats)

    markdown = to_markdown(info, rows, args.num_steps, args.repeats)
    timing.emit(markdown, dict(machine=info, repeats=args.repeats, rows=rows), args)


if __name__ == "__main__":
    main()
