"""Forward solves: DeerSolver against diffrax's Tsit5 on a NeuralODE-style field.

For each grid size N and dtype, on `MLPVectorField` (state 2, width 64, depth 2),
y0 = (1, -1), t in [0, 10], everything in one process:

- DeerSolver(num_steps=N), one window (dt0 = t1 - t0);
- Tsit5 with `StepTo` on the same N + 1 nodes (sequential, N steps);
- Tsit5 with a `PIDController` at the loosest rtol = atol in 1e-3, ..., 1e-12 whose
  max error is at most DeerSolver's.

Max error is the largest absolute error over 101 save times against Tsit5 with
rtol = atol = 1e-12 in float64 (float32 runs are compared to the float64 reference).
Times are of jitted solves: compile = the first call (trace + compile + one run);
run = the median of `--repeats` further calls, each ending in
`jax.block_until_ready`.

    python benchmarks/forward.py --quick
    python benchmarks/forward.py --markdown /tmp/bench_forward.md --json /tmp/f.json
"""

import argparse
import sys
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import (  # noqa: E402
    fmt_error,
    fmt_ratio,
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


T0, T1 = 0.0, 10.0
Y0 = (1.0, -1.0)
NUM_SAVES = 101
PID_TOLERANCES = tuple(10.0**-k for k in range(3, 13))
REFERENCE_TOLERANCE = 1e-12
PID_MAX_STEPS = 200_000
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def make_field(dtype, weights_dtype=None) -> MLPVectorField:
    """The MLP field in `dtype`, with the float64 weights rounded to `weights_dtype`.

    The weights are drawn once in float64 and cast: `jax.random` draws different
    numbers for different dtypes, so `MLPVectorField(dtype=jnp.float32)` would be a
    different field from the float64 one and no reference would fit both.
    """
    field = MLPVectorField(
        state_size=2, width=64, depth=2, key=jax.random.key(0), dtype=jnp.float64
    )

    def cast(x):
        if not eqx.is_inexact_array(x):
            return x
        if weights_dtype is not None:
            x = x.astype(weights_dtype)
        return x.astype(dtype)

    return jax.tree_util.tree_map(cast, field)


def make_problem(dtype, weights_dtype=None) -> dict[str, Any]:
    field = make_field(dtype, weights_dtype)
    t0 = jnp.array(T0, dtype)
    t1 = jnp.array(T1, dtype)
    return dict(
        term=diffrax.ODETerm(field),
        y0=jnp.array(Y0, dtype),
        t0=t0,
        t1=t1,
        save_ts=jnp.linspace(t0, t1, NUM_SAVES, dtype=dtype),
    )


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
def solve_step_to(num_steps, term, y0, t0, t1, save_ts):
    grid = jnp.linspace(t0, t1, num_steps + 1, dtype=y0.dtype)
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=num_steps,
        throw=False,
    )


@eqx.filter_jit
def solve_pid(tolerance, term, y0, t0, t1, save_ts):
    # `tolerance` is a traced array: one compilation serves every tolerance.
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=PID_MAX_STEPS,
        throw=False,
    )


def succeeded(sol) -> bool:
    return bool(sol.result == diffrax.RESULTS.successful)


def max_error(sol, reference: np.ndarray) -> float:
    ys = np.asarray(sol.ys, dtype=np.float64)
    if not np.all(np.isfinite(ys)):
        return float("inf")
    return float(np.max(np.abs(ys - reference)))


def reference_solution(dtype_name: str) -> np.ndarray:
    """Tsit5 at rtol = atol = 1e-12 in float64, with the weights of the `dtype_name`
    problem (float32 weights are rounded to float32, then solved in float64)."""
    problem = make_problem(jnp.float64, weights_dtype=DTYPES[dtype_name])
    sol = solve_pid(jnp.array(REFERENCE_TOLERANCE), **problem)
    if not succeeded(sol):
        raise RuntimeError(f"reference solve failed: {result_name(sol.result)}")
    return np.asarray(sol.ys)


def run_case(
    num_steps: int, dtype_name: str, repeats: int, reference: np.ndarray
) -> dict[str, Any]:
    problem = make_problem(DTYPES[dtype_name], weights_dtype=DTYPES[dtype_name])
    dtype_of = np.dtype(DTYPES[dtype_name])
    case: dict[str, Any] = dict(N=num_steps, dtype=dtype_name)
    tag = f"[{dtype_name} N={num_steps}]"
    # Start every case from empty caches, so each first call compiles (the PID
    # solve, say, would otherwise reuse the reference's or the previous case's).
    jax.clear_caches()

    # (a) DeerSolver, one window.
    solver = DeerSolver(num_steps=num_steps)
    sol, first, run = time_call(lambda: solve_deer(solver, **problem), repeats=repeats)
    deer_error = max_error(sol, reference)
    assert np.asarray(sol.ys).dtype == dtype_of, np.asarray(sol.ys).dtype
    case["deer"] = dict(
        compile_s=first,
        run_s=run,
        max_error=deer_error,
        newton_iters=int(sol.solver_state.num_iters),
        update_norm=float(sol.solver_state.update_norm),
        result=result_name(sol.result),
        successful=succeeded(sol),
    )
    progress(
        f"{tag} DeerSolver: compile {fmt_seconds(first)}, run {fmt_seconds(run)}, "
        f"err {fmt_error(deer_error)}, {case['deer']['newton_iters']} Newton iters, "
        f"{case['deer']['result']}"
    )

    # (b) Tsit5 on the same grid.
    sol, first, run = time_call(
        lambda: solve_step_to(num_steps, **problem), repeats=repeats
    )
    case["step_to"] = dict(
        compile_s=first,
        run_s=run,
        max_error=max_error(sol, reference),
        num_steps=int(sol.stats["num_steps"]),
        result=result_name(sol.result),
        successful=succeeded(sol),
    )
    progress(
        f"{tag} Tsit5 StepTo: compile {fmt_seconds(first)}, run {fmt_seconds(run)}, "
        f"err {fmt_error(case['step_to']['max_error'])}, {case['step_to']['result']}"
    )

    # (c) Tsit5 + PID at the loosest tolerance matching DeerSolver's error.
    compile_s = None
    chosen = None
    for tolerance in PID_TOLERANCES:
        tol = jnp.array(tolerance, DTYPES[dtype_name])
        sol, first, run = time_call(
            lambda tol=tol: solve_pid(tol, **problem), repeats=0
        )
        if compile_s is None:
            compile_s = first
        error = max_error(sol, reference)
        ok = succeeded(sol)
        progress(
            f"{tag} Tsit5 PID tol={tolerance:.0e}: err {fmt_error(error)}, "
            f"{int(sol.stats['num_steps'])} steps, {result_name(sol.result)}"
        )
        if not ok:
            break  # tighter tolerances will not succeed either (float32 floor)
        if error <= deer_error:
            chosen = (tolerance, tol)
            break
    if chosen is None:
        case["pid"] = dict(compile_s=compile_s, reached=False)
        progress(f"{tag} Tsit5 PID: no tolerance reaches DeerSolver's error")
    else:
        tolerance, tol = chosen
        sol, _, run = time_call(lambda: solve_pid(tol, **problem), repeats=repeats)
        case["pid"] = dict(
            reached=True,
            tolerance=tolerance,
            compile_s=compile_s,
            run_s=run,
            max_error=max_error(sol, reference),
            num_steps=int(sol.stats["num_steps"]),
            result=result_name(sol.result),
        )
        progress(
            f"{tag} Tsit5 PID tol={tolerance:.0e}: run {fmt_seconds(run)}, "
            f"{case['pid']['num_steps']} steps"
        )

    deer_run = case["deer"]["run_s"]
    case["step_to_over_deer"] = case["step_to"]["run_s"] / deer_run
    case["pid_over_deer"] = (
        case["pid"]["run_s"] / deer_run if case["pid"]["reached"] else None
    )
    progress(
        f"{tag} ratios: StepTo/Deer {fmt_ratio(case['step_to_over_deer'])}, "
        f"PID/Deer {fmt_ratio(case['pid_over_deer'])}"
    )
    return case


def to_markdown(info: dict[str, Any], cases: list[dict[str, Any]], repeats) -> str:
    headers = [
        "dtype",
        "N",
        "Deer compile",
        "Deer run",
        "Deer max err",
        "Newton iters",
        "StepTo compile",
        "StepTo run",
        "StepTo max err",
        "PID tol",
        "PID steps",
        "PID compile",
        "PID run",
        "PID max err",
        "StepTo / Deer",
        "PID / Deer",
    ]
    rows = []
    for c in cases:
        deer, step_to, pid = c["deer"], c["step_to"], c["pid"]
        iters = str(deer["newton_iters"])
        if not deer["successful"]:
            iters += f" ({deer['result']})"
        reached = pid["reached"]
        rows.append(
            [
                c["dtype"],
                f"{c['N']:.0e}".replace("e+0", "e"),
                fmt_seconds(deer["compile_s"]),
                fmt_seconds(deer["run_s"]),
                fmt_error(deer["max_error"]),
                iters,
                fmt_seconds(step_to["compile_s"]),
                fmt_seconds(step_to["run_s"]),
                fmt_error(step_to["max_error"]),
                f"{pid['tolerance']:.0e}" if reached else "not reached",
                str(pid["num_steps"]) if reached else "-",
                fmt_seconds(pid["compile_s"]),
                fmt_seconds(pid.get("run_s")),
                fmt_error(pid.get("max_error")),
                fmt_ratio(c["step_to_over_deer"]),
                fmt_ratio(c["pid_over_deer"]),
            ]
        )
    intro = (
        "# Forward solve: DeerSolver vs Tsit5\n\n"
        f"{machine_header(info)}\n\n"
        "MLP vector field (state 2, width 64, depth 2, softplus; weights drawn in "
        "float64, rounded to float32 for the float32 rows), y0 = (1, -1), "
        "t in [0, 10], one DeerSolver window of N intervals. Max error: largest "
        f"absolute error at {NUM_SAVES} save times against Tsit5 with rtol = atol "
        "= 1e-12 in float64 (with the same weights). Compile = first call "
        "(trace + compile + one run); "
        f"run = median of {repeats} calls after it. Tsit5 StepTo uses the same "
        "N + 1 nodes; Tsit5 PID uses the loosest rtol = atol in 1e-3 ... 1e-12 "
        "whose max error is at most DeerSolver's (its compile time is the first "
        "tolerance's, as the tolerance is a traced argument). Ratios > 1 mean "
        "DeerSolver is faster.\n\n"
        f"Command: `python benchmarks/forward.py {' '.join(sys.argv[1:])}`\n\n"
    )
    return intro + markdown_table(headers, rows) + "\n"


def parse_list(text: str, kind):
    return [kind(item) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="1e3,1e4,1e5",
        help="comma-separated grid sizes N (default 1e3,1e4,1e5)",
    )
    parser.add_argument(
        "--dtypes", default="float32,float64", help="comma-separated dtypes"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs after compilation"
    )
    parser.add_argument("--quick", action="store_true", help="N = 1e3 only, 3 repeats")
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown table")
    parser.add_argument("--json", metavar="PATH", help="write the raw results")
    args = parser.parse_args()

    sizes = parse_list(args.sizes, lambda s: int(float(s)))
    repeats = args.repeats
    if args.quick:
        sizes, repeats = [1000], 3
    dtypes = parse_list(args.dtypes, str)
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")

    info = machine_info()
    progress(machine_header(info))
    references = {}
    for dtype_name in dtypes:
        progress(f"reference for {dtype_name}: Tsit5, PID rtol = atol = 1e-12, float64")
        references[dtype_name] = reference_solution(dtype_name)

    cases = []
    for dtype_name in dtypes:
        for num_steps in sizes:
            cases.append(
                run_case(num_steps, dtype_name, repeats, references[dtype_name])
            )

    markdown = to_markdown(info, cases, repeats)
    print(markdown)
    if args.markdown:
        write_text(args.markdown, markdown)
    if args.json:
        write_json(args.json, dict(machine=info, repeats=repeats, cases=cases))


if __name__ == "__main__":
    main()
