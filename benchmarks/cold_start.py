"""Cold start: how DeerSolver's Newton iteration depends on its initial guess.

One window of N = 1e4 trapezoid intervals in float64, `max_iters=50`,
`throw=False`, with the guess from `predictor_steps` sequential RK4 steps
(interpolated onto the grid) or, for `predictor_steps=0`, the constant y0 at every
node. For each problem and predictor: Newton iterations, the outcome (converged,
max iters = `max_iters` reached, diverged = something became non-finite), the max
error at 101 save times against Tsit5 with rtol = atol = 1e-12, and the run time
(median of `--repeats` jitted calls after the first).

    python benchmarks/cold_start.py --markdown /tmp/bench_cold_start.md
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import (  # noqa: E402
    fmt_error,
    fmt_seconds,
    machine_header,
    machine_info,
    markdown_table,
    progress,
    result_name,
    time_call,
    write_json,
    write_text,
)
from diffrax_deer import DeerSolver  # noqa: E402
from diffrax_deer._bench.problems import MLPVectorField  # noqa: E402
from diffrax_deer._core.predictor import default_predictor_steps  # noqa: E402


NUM_STEPS = 10_000
MAX_ITERS = 50
NUM_SAVES = 101
REFERENCE_TOLERANCE = 1e-12
PREDICTORS = ("0", "16", "64", "256", "default")
OUTCOMES = {
    "successful": "converged",
    "nonlinear_max_steps_reached": "max iters",
    "nonlinear_divergence": "diverged",
}


def lotka_volterra(t, y, args):
    # (alpha, beta, gamma, delta) = (1.5, 1, 3, 1)
    prey, predator = y
    return jnp.stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator])


def van_der_pol(t, y, args):
    # mu = 1
    x, v = y
    return jnp.stack([v, (1 - x**2) * v - x])


def fitzhugh_nagumo(t, y, args):
    v, w = y
    return jnp.stack([v - v**3 / 3 - w + 0.5, 0.08 * (v + 0.7 - 0.8 * w)])


def lorenz(t, y, args):
    # (sigma, rho, beta) = (10, 28, 8/3)
    x, y_, z = y
    return jnp.stack([10.0 * (y_ - x), x * (28.0 - z) - y_, x * y_ - 8.0 / 3.0 * z])


def mlp_field() -> MLPVectorField:
    return MLPVectorField(
        state_size=2, width=64, depth=2, key=jax.random.key(0), dtype=jnp.float64
    )


# name -> (vector field factory, y0, t1); t0 = 0 throughout.
PROBLEMS: dict[str, tuple[Callable[[], Any], tuple[float, ...], float]] = {
    "Lotka-Volterra [0, 10]": (lambda: lotka_volterra, (1.0, 1.0), 10.0),
    "Van der Pol mu=1 [0, 20]": (lambda: van_der_pol, (2.0, 0.0), 20.0),
    "FitzHugh-Nagumo [0, 50]": (lambda: fitzhugh_nagumo, (-1.0, 1.0), 50.0),
    "Lorenz [0, 5]": (lambda: lorenz, (1.0, 1.0, 1.0), 5.0),
    "Lorenz [0, 20]": (lambda: lorenz, (1.0, 1.0, 1.0), 20.0),
    "MLP [0, 10]": (mlp_field, (1.0, -1.0), 10.0),
}


@eqx.filter_jit
def solve_deer(solver, term, y0, t0, t1, save_ts):
    return diffrax.diffeqsolve(
        term,
        solver,
        t0=t0,
        t1=t1,
        dt0=t1 - t0,
        y0=y0,
        saveat=diffrax.SaveAt(ts=save_ts, solver_state=True),
        throw=False,
    )


@eqx.filter_jit
def solve_reference(term, y0, t0, t1, save_ts):
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.PIDController(
            rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE
        ),
        max_steps=1_000_000,
        throw=False,
    )


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
    make_field, y0, t1 = PROBLEMS[name]
    t0 = jnp.array(0.0)
    t1 = jnp.array(t1)
    problem = dict(
        term=diffrax.ODETerm(make_field()),
        y0=jnp.array(y0, jnp.float64),
        t0=t0,
        t1=t1,
        save_ts=jnp.linspace(t0, t1, NUM_SAVES),
    )
    reference = solve_reference(**problem)
    if result_name(reference.result) != "successful":
        raise RuntimeError(f"{name}: reference solve failed")
    reference_ys = np.asarray(reference.ys)

    rows = []
    for label in predictors:
        jax.clear_caches()  # every first call compiles
        solver = DeerSolver(
            num_steps=num_steps,
            max_iters=MAX_ITERS,
            predictor_steps=predictor_steps(label),
        )
        sol, first, run = time_call(
            lambda solver=solver: solve_deer(solver, **problem), repeats=repeats
        )
        ys = np.asarray(sol.ys)
        error = (
            float(np.max(np.abs(ys - reference_ys)))
            if np.all(np.isfinite(ys))
            else float("inf")
        )
        result = result_name(sol.result)
        row = dict(
            problem=name,
            predictor=predictor_label(label, num_steps),
            predictor_steps=predictor_steps(label),
            newton_iters=int(sol.solver_state.num_iters),
            outcome=OUTCOMES.get(result, result),
            update_norm=float(sol.solver_state.update_norm),
            max_error=error,
            compile_s=first,
            run_s=run,
        )
        progress(
            f"[{name}] predictor {row['predictor']}: {row['newton_iters']} iters, "
            f"{row['outcome']}, err {fmt_error(error)}, compile "
            f"{fmt_seconds(first)}, run {fmt_seconds(run)}"
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

    summary = markdown_table(
        ["problem"] + [f"predictor {p}" for p in predictors],
        [
            [problem] + [cell(by_key[problem, p]) for p in predictors]
            for problem in problems
        ],
    )
    detail = markdown_table(
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
                fmt_error(r["max_error"]),
                fmt_seconds(r["compile_s"]),
                fmt_seconds(r["run_s"]),
            ]
            for r in rows
        ],
    )
    return (
        "# Cold start: Newton iterations against the predictor\n\n"
        f"{machine_header(info)}\n\n"
        f"DeerSolver(num_steps={num_steps}, max_iters={MAX_ITERS}), one window, "
        "float64, `throw=False`. The guess is `predictor_steps` sequential RK4 "
        "steps interpolated onto the grid (`0` = the constant y0 at every node; "
        "a non-finite coarse solve falls back to it). Outcome: converged, max "
        f"iters ({MAX_ITERS} reached), or diverged (non-finite iterate). Max err: "
        f"largest absolute error at {NUM_SAVES} save times against Tsit5 with "
        "rtol = atol = 1e-12 (the trapezoid's own discretisation error when "
        "converged). Compile = first call (trace + compile + one run); run = "
        f"median of {repeats} calls after it.\n\n"
        f"Command: `python benchmarks/cold_start.py {' '.join(sys.argv[1:])}`\n\n"
        "Newton iterations (outcome if not converged):\n\n"
        f"{summary}\n\n"
        f"{detail}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs after compilation"
    )
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown table")
    parser.add_argument("--json", metavar="PATH", help="write the raw results")
    args = parser.parse_args()

    predictors = [p for p in args.predictors.split(",") if p]
    for p in predictors:
        if p != "default" and not (p.isdigit()):
            parser.error(f"bad predictor {p!r}: a non-negative integer or 'default'")
    names = list(PROBLEMS)
    if args.problems:
        wanted = [w.lower() for w in args.problems.split(",") if w]
        names = [n for n in names if any(w in n.lower() for w in wanted)]
        if not names:
            parser.error(f"no problem matches {args.problems!r}")

    info = machine_info()
    progress(machine_header(info))
    rows = []
    for name in names:
        rows += run_problem(name, args.num_steps, predictors, args.repeats)

    markdown = to_markdown(info, rows, args.num_steps, args.repeats)
    print(markdown)
    if args.markdown:
        write_text(args.markdown, markdown)
    if args.json:
        write_json(args.json, dict(machine=info, repeats=args.repeats, rows=rows))


if __name__ == "__main__":
    main()
