"""The main demo: a NeuralODE-style problem solved by DeerSolver and by Tsit5."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._adapter.deer_solver import DeerSolver
from .._bench.problems import MLPVectorField
from .options import METHODS, expected_error_bound, make_method


T0, T1 = 0.0, 10.0
Y0 = (1.0, -1.0)
NUM_SAVES = 101
# The rate in the expected error bound: the largest modulus of an eigenvalue of the
# field's Jacobian along the reference trajectory is 0.17, rounded up.
MLP_RATE = 0.2
REFERENCE_TOLERANCE = 1e-12


@dataclass
class Timed:
    value: object
    compile_seconds: float
    run_seconds: float


def time_jitted(fn: Callable, *args, repeats: int = 5) -> Timed:
    """Compile time of the first call, median time of `repeats` later calls."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    value = jax.block_until_ready(jitted(*args))
    compile_seconds = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        runs.append(time.perf_counter() - start)
    runs.sort()
    run_seconds = runs[len(runs) // 2] if runs else float("nan")
    return Timed(value, compile_seconds, run_seconds)


def mlp_field(dtype, weights_dtype=None) -> MLPVectorField:
    """The demo's MLP field in `dtype`, its float64 weights rounded to `weights_dtype`.

    The weights are drawn once in float64 and cast: `jax.random` draws different
    numbers for different dtypes, so a float32 field built directly would be a
    different problem from the float64 one.
    """
    field = MLPVectorField(key=jax.random.key(0), dtype=jnp.float64)

    def cast(x):
        if not eqx.is_inexact_array(x):
            return x
        if weights_dtype is not None:
            x = x.astype(weights_dtype)
        return x.astype(dtype)

    return jax.tree_util.tree_map(cast, field)


def _solve(term, solver, y0, save_ts, **kwargs):
    t0, t1 = save_ts[0], save_ts[-1]
    return diffrax.diffeqsolve(
        term, solver, t0, t1, y0=y0, saveat=diffrax.SaveAt(ts=save_ts), **kwargs
    )


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
    - `repeats`: timed runs after compilation; the median is reported.
    - `method`: a method name of the command line, e.g. `"trapezoid"`, `"tsit5"`.

    **Returns:**

    A JSON-ready dict: the problem, each solver's max error against the reference,
    Newton iterations, compile and run seconds, the expected error bound and whether
    DeerSolver agrees (converged and within the bound). The trajectories are under
    the key `"arrays"` (NumPy arrays, dropped from the JSON output).
    """
    jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if float64 else jnp.float32
    dtype_name = jnp.dtype(dtype).name
    term = diffrax.ODETerm(mlp_field(dtype, weights_dtype=dtype))
    reference_term = diffrax.ODETerm(mlp_field(jnp.float64, weights_dtype=dtype))
    save_ts = jnp.linspace(T0, T1, NUM_SAVES, dtype=dtype)
    y0 = jnp.array(Y0, dtype)
    grid = jnp.linspace(T0, T1, num_steps + 1, dtype=dtype)
    order = METHODS[method][1]
    solver = DeerSolver(num_steps=num_steps, method=make_method(method))

    def deer(y0):
        return diffrax.diffeqsolve(
            term,
            solver,
            save_ts[0],
            save_ts[-1],
            save_ts[-1] - save_ts[0],
            y0,
            saveat=diffrax.SaveAt(ts=save_ts, solver_state=True),
            throw=False,
        )

    def tsit5_fixed(y0):
        return _solve(
            term,
            diffrax.Tsit5(),
            y0,
            save_ts,
            dt0=None,
            stepsize_controller=diffrax.StepTo(grid),
            max_steps=num_steps,
            throw=False,
        )

    def tsit5_reference(y0):
        return _solve(
            reference_term,
            diffrax.Tsit5(),
            y0,
            save_ts.astype(jnp.float64),
            dt0=None,
            stepsize_controller=diffrax.PIDController(
                rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE
            ),
            max_steps=100_000,
        )

    deer_name = f"DeerSolver(num_steps={num_steps}, {method})"
    fixed_name = f"Tsit5 + StepTo ({num_steps} steps)"
    reference_name = "Tsit5 + PIDController (reference)"
    timings = {
        deer_name: time_jitted(deer, y0, repeats=repeats),
        fixed_name: time_jitted(tsit5_fixed, y0, repeats=repeats),
        reference_name: time_jitted(
            tsit5_reference, y0.astype(jnp.float64), repeats=repeats
        ),
    }
    reference = np.asarray(timings[reference_name].value.ys, np.float64)

    solvers = []
    for name, timed in timings.items():
        ys = np.asarray(timed.value.ys, np.float64)
        finite = bool(np.all(np.isfinite(ys)))
        error = float(np.max(np.abs(ys - reference))) if finite else float("inf")
        state = timed.value.solver_state
        solvers.append(
            dict(
                name=name,
                max_error=error,
                newton_iters=None if state is None else int(state.num_iters),
                compile_s=timed.compile_seconds,
                run_s=timed.run_seconds,
            )
        )
    deer_solution = timings[deer_name].value
    deer_error = solvers[0]["max_error"]
    step = (T1 - T0) / num_steps
    scale = float(np.max(np.abs(reference)))
    floor = 1e-9 if float64 else 1e-4
    bound = expected_error_bound(order, step, T1 - T0, MLP_RATE, scale, floor)
    converged = bool(deer_solution.result == diffrax.RESULTS.successful)
    return dict(
        problem="MLP 2-64-64-2 (softplus), y0 = (1, -1), t in [0, 10]",
        method=method,
        order=order,
        num_steps=num_steps,
        dtype=dtype_name,
        platform=jax.devices()[0].platform,
        repeats=repeats,
        solvers=solvers,
        speedup_vs_same_grid=timings[fixed_name].run_seconds
        / timings[deer_name].run_seconds,
        converged=converged,
        result=_result_name(deer_solution.result),
        max_error=deer_error,
        expected_bound=bound,
        agrees=converged and deer_error <= bound,
        arrays=dict(
            ts=np.asarray(save_ts, np.float64),
            reference=reference,
            deer=np.asarray(deer_solution.ys, np.float64),
            fixed=np.asarray(timings[fixed_name].value.ys, np.float64),
        ),
    )


def _result_name(result) -> str:
    for name in ("successful", "nonlinear_max_steps_reached", "nonlinear_divergence"):
        if bool(result == getattr(diffrax.RESULTS, name)):
            return name
    return "failed"


def format_demo(results: dict[str, Any]) -> str:
    """The human-readable report of `demo_results`."""
    lines = [
        f"NeuralODE-style field: {results['problem']}, {results['dtype']}, "
        f"{results['platform'].upper()}",
        f"DeerSolver method: {results['method']} (order {results['order']}); "
        f"max error over {NUM_SAVES} save times against the reference; "
        f"run = median of {results['repeats']} runs after compilation.",
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
    step = (T1 - T0) / results["num_steps"]
    if results["agrees"]:
        lines.append(
            f"AGREES: DeerSolver matches the Tsit5 reference to "
            f"{results['max_error']:.1e} (expected at most "
            f"{results['expected_bound']:.1e} for an order-{results['order']} method "
            f"at h = {step:g})."
        )
    else:
        lines.append(
            f"DISAGREES: converged={results['converged']} ({results['result']}), "
            f"max error {results['max_error']:.1e}, expected at most "
            f"{results['expected_bound']:.1e}."
        )
    return "\n".join(lines)


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
