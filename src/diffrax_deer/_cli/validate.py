"""`diffrax-deer validate`: every method on named problems, against trusted answers."""

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .._adapter.deer_solver import DeerSolver
from .demo import MLP_RATE, mlp_field
from .options import (
    METHODS,
    PROBLEMS,
    QUICK_CASES,
    expected_error_bound,
    make_method,
)


NUM_SAVES = 21
REFERENCE_TOLERANCE = 1e-12
# Relative error no method is asked to beat: Newton's default tolerance (1e-10),
# round-off over the grid and the Tsit5 reference's own error (~1e-11).
FLOOR = 1e-9


@dataclasses.dataclass(frozen=True)
class ValidationProblem:
    """One validation problem: y' = f(t, y), y(0) = y0 on [0, t1].

    `rate` is the solution's largest rate of change (an eigenvalue modulus or a
    frequency), the $\\lambda$ of the expected error bound; `num_steps` and
    `quick_num_steps` are DeerSolver's grid in the full and `--quick` runs.
    """

    name: str
    vector_field: Callable
    y0: tuple[float, ...]
    t1: float
    rate: float
    num_steps: int
    quick_num_steps: int
    exact: Callable | None = None  # ts -> ys, when a closed form exists


def _linear_matrix() -> np.ndarray:
    size = 10
    m = np.array(jax.random.normal(jax.random.key(1), (size, size), jnp.float64))
    m /= np.sqrt(size)
    return (m - m.T) - 0.3 * np.eye(size)


def _make_problems() -> dict[str, ValidationProblem]:
    matrix = _linear_matrix()
    a = jnp.asarray(matrix)
    y0 = tuple(np.full(matrix.shape[0], 1.0 / np.sqrt(matrix.shape[0])))

    def linear(t, y, args):
        return a @ y

    def linear_exact(ts):
        expms = jax.vmap(lambda t: jax.scipy.linalg.expm(a * t))(ts)
        return expms @ jnp.asarray(y0)

    def lotka_volterra(t, y, args):
        prey, predator = y[0], y[1]
        return jnp.stack(
            [1.5 * prey - prey * predator, -3.0 * predator + prey * predator]
        )

    def van_der_pol(t, y, args):
        x, v = y[0], y[1]
        return jnp.stack([v, (1.0 - x**2) * v - x])

    spectral_radius = float(np.max(np.abs(np.linalg.eigvals(matrix))))
    problems = [
        ValidationProblem(
            "linear", linear, y0, 5.0, spectral_radius, 1000, 200, linear_exact
        ),
        ValidationProblem(
            "lotka-volterra", lotka_volterra, (1.0, 1.0), 10.0, 3.0, 2000, 400
        ),
        ValidationProblem("van-der-pol", van_der_pol, (2.0, 0.0), 20.0, 2.0, 2000, 400),
        ValidationProblem(
            "mlp", mlp_field(jnp.float64), (1.0, -1.0), 10.0, MLP_RATE, 1000, 200
        ),
    ]
    assert [p.name for p in problems] == list(PROBLEMS)
    return {p.name: p for p in problems}


def reference_solution(problem: ValidationProblem, ts: jax.Array) -> np.ndarray:
    """The closed form where there is one, else Tsit5 at rtol = atol = 1e-12."""
    if problem.exact is not None:
        return np.asarray(jax.jit(problem.exact)(ts))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(problem.vector_field),
        diffrax.Tsit5(),
        ts[0],
        ts[-1],
        None,
        jnp.asarray(problem.y0),
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(
            rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE
        ),
        max_steps=1_000_000,
    )
    return np.asarray(sol.ys)


def validate_case(
    problem: ValidationProblem,
    method: str,
    num_steps: int,
    ts: jax.Array,
    reference: np.ndarray,
) -> dict[str, Any]:
    """Solves `problem` with DeerSolver(`method`) on `num_steps` intervals and checks
    its max error at the save times against `expected_error_bound`."""
    solver = DeerSolver(num_steps=num_steps, method=make_method(method))

    @jax.jit
    def solve(y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vector_field),
            solver,
            ts[0],
            ts[-1],
            ts[-1] - ts[0],
            y0,
            saveat=diffrax.SaveAt(ts=ts, solver_state=True),
            throw=False,
        )

    start = time.perf_counter()
    sol = jax.block_until_ready(solve(jnp.asarray(problem.y0)))
    seconds = time.perf_counter() - start
    ys = np.asarray(sol.ys)
    finite = bool(np.all(np.isfinite(ys)))
    error = float(np.max(np.abs(ys - reference))) if finite else float("inf")
    order = METHODS[method][1]
    step = problem.t1 / num_steps
    scale = float(np.max(np.abs(reference)))
    bound = expected_error_bound(order, step, problem.t1, problem.rate, scale, FLOOR)
    converged = bool(sol.result == diffrax.RESULTS.successful)
    return dict(
        problem=problem.name,
        method=method,
        order=order,
        num_steps=num_steps,
        step=step,
        newton_iters=int(sol.solver_state.num_iters),
        converged=converged,
        max_error=error,
        bound=bound,
        passed=converged and error <= bound,
        seconds=seconds,
    )


def run_validation(
    cases: Sequence[tuple[str, str]],
    quick: bool = False,
    num_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs each `(problem, method)` of `cases`; one result row per case.

    The grid is the problem's own (`quick_num_steps` with `quick`) unless
    `num_steps` is given.
    """
    jax.config.update("jax_enable_x64", True)
    available = _make_problems()
    references = {}
    rows = []
    for name, method in cases:
        problem = available[name]
        grid = num_steps or (problem.quick_num_steps if quick else problem.num_steps)
        ts = jnp.linspace(0.0, problem.t1, NUM_SAVES)
        if name not in references:
            references[name] = reference_solution(problem, ts)
        row = validate_case(problem, method, grid, ts, references[name])
        rows.append(row)
        if progress is not None:
            progress(
                f"[{name} / {method}] N={grid}: max error {row['max_error']:.1e} "
                f"(bound {row['bound']:.1e}), {row['newton_iters']} Newton iters, "
                f"{'ok' if row['passed'] else 'FAIL'}, {row['seconds']:.1f} s"
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of validation rows and a closing verdict."""
    header = (
        f"{'problem':<15} {'method':<17} {'order':>5} {'N':>6} {'Newton':>6} "
        f"{'max error':>10} {'bound':>10}  {'verdict'}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        verdict = "ok"
        if not row["converged"]:
            verdict = "FAIL (Newton did not converge)"
        elif not row["passed"]:
            verdict = "FAIL (error above bound)"
        lines.append(
            f"{row['problem']:<15} {row['method']:<17} {row['order']:>5} "
            f"{row['num_steps']:>6} {row['newton_iters']:>6} "
            f"{row['max_error']:>10.2e} {row['bound']:>10.2e}  {verdict}"
        )
    failed = [row for row in rows if not row["passed"]]
    lines.append("")
    if failed:
        lines.append(f"FAILED: {len(failed)} of {len(rows)} out of tolerance.")
    else:
        lines.append(f"PASSED: all {len(rows)} within tolerance.")
    lines.append(
        "bound = (rate h)^order x rate T x max|y|, at least 1e-9 max|y|; error = max "
        f"abs error at {NUM_SAVES} save times vs expm (linear) or Tsit5 at 1e-12."
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
    rows = run_validation(
        cases,
        quick=options.quick,
        num_steps=options.num_steps,
        progress=progress,
    )
    if options.json:
        passed = all(row["passed"] for row in rows)
        print(json.dumps(dict(passed=passed, rows=rows), indent=2))
    else:
        print(format_table(rows))
    return 0 if all(row["passed"] for row in rows) else 1
