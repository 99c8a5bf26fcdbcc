"""`diffrax-deer validate`: every method on named problems, against trusted answers.

Each case solves a registry problem (`diffrax_deer._bench.problems`) with
DeerSolver(method) on a grid of N intervals and compares the solution at up to 101
grid nodes with the problem's trusted answer (the matrix exponential, or Tsit5 at
rtol = atol = 1e-12). It passes when Newton converged and the max error is within
`options.error_bound`: three times what a correct method makes on that grid (the
error measured once on the calibration grid N0, scaled by (N0 / N)^order).
"""

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._adapter.deer_solver import DeerSolver
from .._bench.problems import get_problem
from .._bench.solves import max_error, solve_deer, succeeded
from .._bench.timing import first_call
from .options import (
    MEASURED_ERRORS,
    METHODS,
    PROBLEMS,
    QUICK_CASES,
    error_bound,
    expected_error,
    make_method,
)


NUM_SAVES = 101


def measure_case(
    name: str,
    method: str,
    num_steps: int,
    references: dict[tuple[str, int], np.ndarray],
) -> dict[str, Any]:
    """Solves problem `name` with DeerSolver(`method`) on `num_steps` intervals;
    returns its max error at up to `NUM_SAVES` nodes, the solution's scale
    (max|y|), Newton iterations, convergence and seconds (compile included).

    `references` caches each (problem, grid)'s reference at those nodes.
    """
    problem = get_problem(name)
    save_ts = problem.node_times(num_steps, NUM_SAVES)
    if (name, num_steps) not in references:
        references[name, num_steps] = problem.reference(save_ts)
    reference = references[name, num_steps]
    case = problem.instance(jnp.float64, save_ts=save_ts)
    # The method's error is checked, not its estimate (benchmarks/window_estimates.py
    # checks that): without the estimate's coarse solve each case compiles sooner.
    solver = DeerSolver(
        num_steps=num_steps, method=make_method(method), error_estimate=False
    )
    timing = first_call(lambda: solve_deer(solver, case))
    sol = timing.output
    return dict(
        max_error=max_error(sol.ys, reference),
        scale=float(np.max(np.abs(reference))),
        newton_iters=int(sol.solver_state.num_iters),
        converged=succeeded(sol),
        seconds=timing.compile_s,
    )


def validate_case(
    name: str,
    method: str,
    num_steps: int | None = None,
    references: dict[tuple[str, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """One result row: `measure_case` on the calibration grid (or `num_steps`),
    the expected error, the bound and whether the case passed."""
    if num_steps is None:
        num_steps = MEASURED_ERRORS[name][method][0]
    row = measure_case(
        name, method, num_steps, {} if references is None else references
    )
    expected = expected_error(name, method, num_steps)
    bound = error_bound(expected, row["scale"], "float64")
    row.update(
        problem=name,
        method=method,
        order=METHODS[method][1],
        num_steps=num_steps,
        step=(get_problem(name).t1 - get_problem(name).t0) / num_steps,
        expected_error=expected,
        bound=bound,
        passed=row["converged"] and bound is not None and row["max_error"] <= bound,
    )
    return row


def run_validation(
    cases: Sequence[tuple[str, str]],
    num_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs each `(problem, method)` of `cases`; one result row per case.

    The grid is the case's calibration grid unless `num_steps` is given.
    """
    jax.config.update("jax_enable_x64", True)
    references: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for name, method in cases:
        row = validate_case(name, method, num_steps, references)
        rows.append(row)
        if progress is not None:
            progress(
                f"[{name} / {method}] N={row['num_steps']}: max error "
                f"{row['max_error']:.1e} (bound {_bound_text(row['bound'])}), "
                f"{row['newton_iters']} Newton iters, {_verdict(row)}, "
                f"{row['seconds']:.1f} s"
            )
    return rows


def _bound_text(bound: float | None) -> str:
    return "none: grid too coarse" if bound is None else f"{bound:.2e}"


def _verdict(row: dict[str, Any]) -> str:
    if not row["converged"]:
        return "FAIL (Newton did not converge)"
    if row["bound"] is None:
        return "FAIL (grid too coarse to check)"
    if not row["passed"]:
        return "FAIL (error above bound)"
    return "ok"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of validation rows and a closing verdict."""
    header = (
        f"{'problem':<15} {'method':<17} {'order':>5} {'N':>6} {'Newton':>6} "
        f"{'max error':>10} {'expected':>10} {'bound':>10}  {'verdict'}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        bound = "-" if row["bound"] is None else f"{row['bound']:.2e}"
        lines.append(
            f"{row['problem']:<15} {row['method']:<17} {row['order']:>5} "
            f"{row['num_steps']:>6} {row['newton_iters']:>6} "
            f"{row['max_error']:>10.2e} {row['expected_error']:>10.2e} "
            f"{bound:>10}  {_verdict(row)}"
        )
    failed = [row for row in rows if not row["passed"]]
    lines.append("")
    if failed:
        lines.append(f"FAILED: {len(failed)} of {len(rows)} out of tolerance.")
    else:
        lines.append(f"PASSED: all {len(rows)} within tolerance.")
    lines.append(
        "expected = the error measured on the calibration grid N0, times "
        "(N0/N)^order; bound = 3 x expected, at least 3e-10 max|y|; error = max abs "
        f"error at up to {NUM_SAVES} grid nodes vs expm (linear) or Tsit5 at 1e-12."
    )
    return "\n".join(lines)


def main(options) -> int:
    """Runs `validate` from parsed command-line options; returns the exit status."""

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if options.quick and options.problems is None and options.methods is None:
        cases = list(QUICK_CASES)
    else:
        problems = options.problems or list(PROBLEMS)
        methods = options.methods or list(METHODS)
        cases = [(problem, method) for problem in problems for method in methods]
    rows = run_validation(cases, num_steps=options.num_steps, progress=progress)
    passed = all(row["passed"] for row in rows)
    if options.json:
        print(json.dumps(dict(passed=passed, rows=rows), indent=2))
    else:
        print(format_table(rows))
    return 0 if passed else 1
