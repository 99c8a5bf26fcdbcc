"""The main demo: a NeuralODE-style problem solved by DeerSolver and by Tsit5."""

import json
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .._adapter.deer_solver import DeerSolver
from .._bench.problems import REFERENCE_MAX_STEPS, Problem, get_problem
from .._bench.solves import (
    max_error,
    solve_adaptive,
    solve_deer,
    solve_fixed_grid,
    succeeded,
)
from .._bench.timing import Timing, result_name, time_interleaved
from .options import COARSE, METHODS, error_bound, expected_error, make_method


NUM_SAVES = 101


def _time_solvers(
    problem: Problem, num_steps: int, dtype, repeats: int, method: str
) -> tuple[dict[str, Timing], np.ndarray]:
    """DeerSolver, Tsit5 on the same grid and the tight Tsit5 reference (float64,
    the same weights), timed interleaved; also the save times (up to `NUM_SAVES`
    grid nodes, so that no interpolation enters the errors)."""
    save_ts = problem.node_times(num_steps, NUM_SAVES, dtype)
    case = problem.instance(dtype, weights_dtype=dtype, save_ts=save_ts)
    reference_case = problem.instance(
        jnp.float64, weights_dtype=dtype, save_ts=save_ts.astype(jnp.float64)
    )
    solver = DeerSolver(num_steps=num_steps, method=make_method(method))
    tolerance = jnp.asarray(problem.reference_tolerance, jnp.float64)
    calls = {
        f"DeerSolver(num_steps={num_steps}, {method})": lambda: solve_deer(
            solver, case
        ),
        f"Tsit5 + StepTo ({num_steps} steps)": lambda: solve_fixed_grid(
            diffrax.Tsit5(), num_steps, case
        ),
        "Tsit5 + PIDController (reference)": lambda: solve_adaptive(
            diffrax.Tsit5(), tolerance, reference_case, REFERENCE_MAX_STEPS
        ),
    }
    timings = time_interleaved(calls, repeats)
    if not succeeded(timings["Tsit5 + PIDController (reference)"].output):
        raise RuntimeError("the Tsit5 reference solve failed")
    return timings, np.asarray(save_ts, np.float64)


def demo_results(
    num_steps: int = 10_000,
    float64: bool = True,
    repeats: int = 5,
    method: str = "trapezoid",
) -> dict[str, Any]:
    """Solves the demo problem three ways and returns the comparison.

    **Arguments:**

    - `num_steps`: DeerSolver's intervals in its one window (and Tsit5's fixed steps).
    - `float64`: solve in float64 (else float32; the reference is always float64).
    - `repeats`: timed rounds after compilation; the median is reported.
    - `method`: a method name of the command line, e.g. `"trapezoid"`, `"tsit5"`.

    **Returns:**

    A JSON-ready dict: the problem, each solver's max error against the reference
    at up to 101 grid nodes, Newton iterations, compile and run seconds, the
    expected error and its bound (`None` when the grid is too coarse to check) and
    whether DeerSolver agrees (converged and within the bound). The trajectories
    are under the key `"arrays"` (NumPy arrays, dropped from the JSON output).
    """
    jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if float64 else jnp.float32
    problem = get_problem("mlp")
    timings, ts = _time_solvers(problem, num_steps, dtype, repeats, method)
    (deer_name, deer), (_, fixed), (_, reference) = timings.items()
    reference_ys = np.asarray(reference.output.ys, np.float64)
    solvers = [
        dict(
            name=name,
            max_error=max_error(timing.output.ys, reference_ys),
            newton_iters=(
                None
                if timing.output.solver_state is None
                else int(timing.output.solver_state.num_iters)
            ),
            compile_s=timing.compile_s,
            run_s=timing.run_s,
        )
        for name, timing in timings.items()
    ]
    scale = float(np.max(np.abs(reference_ys)))
    expected = expected_error("mlp", method, num_steps)
    bound = error_bound(expected, scale, jnp.dtype(dtype).name)
    converged = succeeded(deer.output)
    deer_error = solvers[0]["max_error"]
    return dict(
        problem=problem.description,
        method=method,
        order=METHODS[method][1],
        num_steps=num_steps,
        step=(problem.t1 - problem.t0) / num_steps,
        dtype=jnp.dtype(dtype).name,
        platform=jax.devices()[0].platform,
        repeats=repeats,
        solvers=solvers,
        speedup_vs_same_grid=fixed.run_s / deer.run_s,
        converged=converged,
        result=result_name(deer.output.result),
        max_error=deer_error,
        scale=scale,
        expected_error=expected,
        expected_bound=bound,
        agrees=converged and bound is not None and deer_error <= bound,
        arrays=dict(
            ts=ts,
            reference=reference_ys,
            deer=np.asarray(deer.output.ys, np.float64),
            fixed=np.asarray(fixed.output.ys, np.float64),
        ),
    )


def format_demo(results: dict[str, Any]) -> str:
    """The human-readable report of `demo_results`."""
    lines = [
        f"NeuralODE-style field: {results['problem']}, {results['dtype']}, "
        f"{results['platform'].upper()}",
        f"DeerSolver method: {results['method']} (order {results['order']}); "
        f"max error at up to {NUM_SAVES} grid nodes against the reference; "
        f"run = median of {results['repeats']} interleaved runs after compilation.",
        "",
    ]
    header = f"{'solver':<44} {'max error':>10} {'Newton its':>10} "
    header += f"{'compile s':>10} {'run ms':>10}"
    lines += [header, "-" * len(header)]
    for solver in results["solvers"]:
        iterations = solver["newton_iters"]
        lines.append(
            f"{solver['name']:<44} {solver['max_error']:>10.2e} "
            f"{'-' if iterations is None else iterations:>10} "
            f"{solver['compile_s']:>10.2f} {1e3 * solver['run_s']:>10.2f}"
        )
    speedup = results["speedup_vs_same_grid"]
    lines.append("")
    if speedup >= 1:
        comparison = f"{speedup:.1f}x faster than"
    else:
        comparison = f"{1 / speedup:.1f}x slower than"
    lines.append(f"DeerSolver is {comparison} Tsit5 on the same grid (run time).")
    lines.append(_verdict(results))
    return "\n".join(lines)


def _verdict(results: dict[str, Any]) -> str:
    order, step = results["order"], results["step"]
    if results["expected_bound"] is None:
        return (
            f"TOO COARSE: an order-{order} method at h = {step:g} is expected to "
            f"err by {results['expected_error']:.1e}, above {COARSE:.0%} of the "
            "solution "
            f"(max|y| = {results['scale']:.2g}): this grid cannot be checked; use "
            "more steps."
        )
    if results["agrees"]:
        return (
            f"AGREES: DeerSolver matches the Tsit5 reference to "
            f"{results['max_error']:.1e} (expected {results['expected_error']:.1e}, "
            f"at most {results['expected_bound']:.1e}, for an order-{order} method "
            f"at h = {step:g})."
        )
    return (
        f"DISAGREES: converged={results['converged']} ({results['result']}), "
        f"max error {results['max_error']:.1e}, expected "
        f"{results['expected_error']:.1e}, at most {results['expected_bound']:.1e}."
    )


def demo_json(results: dict[str, Any]) -> str:
    """`demo_results` as JSON, without the trajectories."""
    return json.dumps({k: v for k, v in results.items() if k != "arrays"}, indent=2)


def plot_demo(results: dict[str, Any], path: str) -> None:
    """Draws both trajectories and DeerSolver's error over time into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = results["arrays"]
    ts = arrays["ts"]
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(3, 2)
    )
    for k in range(arrays["reference"].shape[1]):
        top.plot(
            ts,
            arrays["reference"][:, k],
            color=f"C{k}",
            lw=3,
            alpha=0.35,
            label=f"Tsit5 reference, $y_{k}$",
        )
        top.plot(
            ts,
            arrays["deer"][:, k],
            color=f"C{k}",
            ls="--",
            lw=1.2,
            label=f"DeerSolver, $y_{k}$",
        )
    top.set_ylabel("$y(t)$")
    top.legend(ncol=2, fontsize="small")
    top.set_title(
        f"MLP field, DeerSolver({results['method']}, N = {results['num_steps']}) "
        f"vs Tsit5, {results['dtype']}"
    )
    for key, label in (("deer", "DeerSolver"), ("fixed", "Tsit5, same grid")):
        error = np.max(np.abs(arrays[key] - arrays["reference"]), axis=1)
        # t = 0 has no error to draw on a log scale; round-off may reach 0 too.
        bottom.semilogy(ts[1:], np.maximum(error[1:], 1e-17), label=label)
    if results["expected_bound"] is not None:
        bottom.axhline(
            results["expected_bound"], color="k", ls=":", lw=1, label="expected bound"
        )
    bottom.set_xlabel("$t$")
    bottom.set_ylabel("max |error| vs reference")
    bottom.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(
    num_steps: int = 10_000,
    float64: bool = True,
    repeats: int = 5,
    method: str = "trapezoid",
    json_output: bool = False,
    plot: str | None = None,
) -> bool:
    """Runs the demo, prints its report (or JSON) and returns whether it agrees."""
    results = demo_results(num_steps, float64, repeats, method)
    print(demo_json(results) if json_output else format_demo(results))
    if plot is not None:
        plot_demo(results, plot)
        if not json_output:
            print(f"Plot written to {plot}.")
    return results["agrees"]
