"""`diffrax-deer bench`: the forward-solve benchmark, shipped with the package.

The same measurement as `benchmarks/forward.py` in a source checkout (which is not
installed with the package), on the demo's MLP field: for each grid size N and
dtype,

- DeerSolver(num_steps=N, method), one window;
- Tsit5 with `StepTo` on the same N + 1 nodes (sequential);
- Tsit5 with a `PIDController` at the loosest rtol = atol in 1e-3 ... 1e-12 whose
  max error is at most DeerSolver's.

Max error: largest absolute error at 101 save times against Tsit5 at 1e-12 in
float64, with the same (rounded) weights. Compile = first call (trace, compile and
one run); run = median of `repeats` later calls, each ending in
`jax.block_until_ready`.
"""

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._adapter.deer_solver import DeerSolver
from .demo import NUM_SAVES, T0, T1, Y0, mlp_field
from .options import make_method


PID_TOLERANCES = tuple(10.0**-k for k in range(3, 13))
REFERENCE_TOLERANCE = 1e-12
PID_MAX_STEPS = 200_000
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_call(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float | None]:
    """The first call's seconds (compile + run), and the median of `repeats` more."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, first, (statistics.median(times) if times else None)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return dict(
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=eqx.__version__,
        backend=jax.default_backend(),
        device=f"{device.platform}: {device.device_kind}",
    )


def _problem(dtype):
    return dict(
        term=diffrax.ODETerm(mlp_field(dtype, weights_dtype=dtype)),
        y0=jnp.array(Y0, dtype),
        save_ts=jnp.linspace(T0, T1, NUM_SAVES, dtype=dtype),
    )


@eqx.filter_jit
def _solve_deer(solver, term, y0, save_ts):
    t0, t1 = save_ts[0], save_ts[-1]
    return diffrax.diffeqsolve(
        term,
        solver,
        t0,
        t1,
        t1 - t0,
        y0,
        saveat=diffrax.SaveAt(ts=save_ts, solver_state=True),
        throw=False,
    )


@eqx.filter_jit
def _solve_step_to(num_steps, term, y0, save_ts):
    t0, t1 = save_ts[0], save_ts[-1]
    grid = jnp.linspace(t0, t1, num_steps + 1, dtype=y0.dtype)
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        t0,
        t1,
        None,
        y0,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=num_steps,
        throw=False,
    )


@eqx.filter_jit
def _solve_pid(tolerance, term, y0, save_ts):
    # `tolerance` is traced: one compilation serves every tolerance.
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        save_ts[0],
        save_ts[-1],
        None,
        y0,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=PID_MAX_STEPS,
        throw=False,
    )


def _ok(sol) -> bool:
    return bool(sol.result == diffrax.RESULTS.successful)


def _max_error(sol, reference: np.ndarray) -> float:
    ys = np.asarray(sol.ys, np.float64)
    if not np.all(np.isfinite(ys)):
        return float("inf")
    return float(np.max(np.abs(ys - reference)))


def _reference(dtype_name: str) -> np.ndarray:
    problem = dict(_problem(jnp.float64))
    problem["term"] = diffrax.ODETerm(
        mlp_field(jnp.float64, weights_dtype=DTYPES[dtype_name])
    )
    sol = _solve_pid(jnp.array(REFERENCE_TOLERANCE), **problem)
    if not _ok(sol):
        raise RuntimeError("the Tsit5 reference solve failed")
    return np.asarray(sol.ys)


def run_case(
    num_steps: int,
    dtype_name: str,
    method: str,
    repeats: int,
    reference: np.ndarray,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    """One row: DeerSolver, Tsit5 on the same grid, and Tsit5 at matched accuracy."""
    problem = _problem(DTYPES[dtype_name])
    tag = f"[{dtype_name} N={num_steps}]"
    jax.clear_caches()  # every first call compiles, as in a fresh process
    case: dict[str, Any] = dict(N=num_steps, dtype=dtype_name, method=method)

    solver = DeerSolver(num_steps=num_steps, method=make_method(method))
    sol, first, run = time_call(lambda: _solve_deer(solver, **problem), repeats)
    deer_error = _max_error(sol, reference)
    case["deer"] = dict(
        compile_s=first,
        run_s=run,
        max_error=deer_error,
        newton_iters=int(sol.solver_state.num_iters),
        successful=_ok(sol),
    )
    progress(
        f"{tag} DeerSolver({method}): compile {first:.2f} s, run {run:.4f} s, "
        f"error {deer_error:.1e}, {case['deer']['newton_iters']} Newton iters"
    )

    sol, first, run = time_call(lambda: _solve_step_to(num_steps, **problem), repeats)
    case["step_to"] = dict(
        compile_s=first, run_s=run, max_error=_max_error(sol, reference)
    )
    progress(
        f"{tag} Tsit5 StepTo: compile {first:.2f} s, run {run:.4f} s, "
        f"error {case['step_to']['max_error']:.1e}"
    )

    case["pid"] = dict(reached=False)
    for tolerance in PID_TOLERANCES:
        tol = jnp.array(tolerance, DTYPES[dtype_name])
        sol, first, _ = time_call(lambda tol=tol: _solve_pid(tol, **problem), 0)
        case["pid"].setdefault("compile_s", first)
        error = _max_error(sol, reference)
        if not _ok(sol):
            break  # tighter tolerances will not succeed either
        if error <= deer_error:
            sol, _, run = time_call(lambda tol=tol: _solve_pid(tol, **problem), repeats)
            case["pid"].update(
                reached=True,
                tolerance=tolerance,
                run_s=run,
                max_error=error,
                num_steps=int(sol.stats["num_steps"]),
            )
            break
    if case["pid"]["reached"]:
        progress(
            f"{tag} Tsit5 PID tol={case['pid']['tolerance']:.0e}: run "
            f"{case['pid']['run_s']:.4f} s, {case['pid']['num_steps']} steps"
        )
    else:
        progress(f"{tag} Tsit5 PID: no tolerance reaches DeerSolver's error")
    deer_run = case["deer"]["run_s"]
    case["step_to_over_deer"] = case["step_to"]["run_s"] / deer_run
    case["pid_over_deer"] = (
        case["pid"]["run_s"] / deer_run if case["pid"]["reached"] else None
    )
    return case


def run_bench(
    sizes: Sequence[int],
    dtypes: Sequence[str],
    method: str = "trapezoid",
    repeats: int = 5,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    """Every size and dtype; returns the machine and the rows (JSON-ready)."""
    jax.config.update("jax_enable_x64", True)
    info = machine_info()
    progress(machine_header(info))
    references = {}
    for dtype_name in dtypes:
        progress(f"reference for {dtype_name}: Tsit5, rtol = atol = 1e-12, float64")
        references[dtype_name] = _reference(dtype_name)
    cases = [
        run_case(size, dtype_name, method, repeats, references[dtype_name], progress)
        for dtype_name in dtypes
        for size in sizes
    ]
    return dict(machine=info, method=method, repeats=repeats, cases=cases)


def machine_header(info: dict[str, Any]) -> str:
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores; JAX {info['jax']} "
        f"(backend `{info['backend']}`, device `{info['device']}`), diffrax "
        f"{info['diffrax']}, equinox {info['equinox']}, Python {info['python']}."
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def to_markdown(results: dict[str, Any], command: str) -> str:
    """The results as a Markdown section: the machine, the setup and one table."""
    headers = [
        "dtype",
        "N",
        "Deer compile",
        "Deer run",
        "Deer max err",
        "Newton iters",
        "StepTo run",
        "StepTo max err",
        "PID tol",
        "PID steps",
        "PID run",
        "StepTo / Deer",
        "PID / Deer",
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for case in results["cases"]:
        deer, step_to, pid = case["deer"], case["step_to"], case["pid"]
        iterations = str(deer["newton_iters"])
        if not deer["successful"]:
            iterations += " (not converged)"
        reached = pid["reached"]
        row = [
            case["dtype"],
            str(case["N"]),
            _seconds(deer["compile_s"]),
            _seconds(deer["run_s"]),
            f"{deer['max_error']:.1e}",
            iterations,
            _seconds(step_to["run_s"]),
            f"{step_to['max_error']:.1e}",
            f"{pid['tolerance']:.0e}" if reached else "not reached",
            str(pid["num_steps"]) if reached else "-",
            _seconds(pid.get("run_s")),
            _ratio(case["step_to_over_deer"]),
            _ratio(case["pid_over_deer"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    intro = (
        f"# Forward solve: DeerSolver({results['method']}) vs Tsit5\n\n"
        f"{machine_header(results['machine'])}\n\n"
        "MLP field 2-64-64-2 (softplus), y0 = (1, -1), t in [0, 10], one DeerSolver "
        f"window of N intervals. Max error: at {NUM_SAVES} save times against Tsit5 "
        "at rtol = atol = 1e-12 in float64. Compile = first call; run = median of "
        f"{results['repeats']} later calls. StepTo: Tsit5 on the same N + 1 nodes; "
        "PID: Tsit5 at the loosest rtol = atol in 1e-3 ... 1e-12 whose max error is "
        "at most DeerSolver's. Ratios > 1 mean DeerSolver is faster.\n\n"
        f"Command: `{command}`\n\n"
    )
    return intro + "\n".join(lines) + "\n"


def main(options, command: str) -> int:
    """Runs `bench` from parsed command-line options; returns the exit status."""
    sizes, repeats = options.sizes, options.repeats
    if options.quick:
        sizes, repeats = [1000], min(repeats, 3)
    results = run_bench(sizes, options.dtypes, options.method, repeats)
    markdown = to_markdown(results, command)
    if options.markdown:
        with open(options.markdown, "w") as f:
            f.write(markdown)
        _progress(f"wrote {options.markdown}")
    print(json.dumps(results, indent=2) if options.json else markdown)
    return 0
