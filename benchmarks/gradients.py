"""Gradients: loss-and-gradient time of a NeuralODE fit, DeerAdjoint against the rest.

The loss is the mean squared error of the solution at M observation times
(`linspace(t0, t1, M)`) against fixed data, differentiated with respect to the
parameters of `MLPVectorField` (state 2, width 64, depth 2; the field of
`forward.py`), y0 = (1, -1), t in [0, 10], with `eqx.filter_value_and_grad`. The
data are the field's own trajectory (Tsit5, rtol = atol = 1e-12, float64) plus
0.1 sin(3 t), so the gradient is not zero. For each M and dtype, in one process:

1. DeerSolver(num_steps=N) + `DeerAdjoint()`, one window via
   `StepTo([t0, t1])`, dt0=None (its fast path);
2. DeerSolver(num_steps=N) + diffrax's default adjoint, dt0 = t1 - t0;
3. Tsit5 + `PIDController` at the loosest rtol = atol in 1e-3, ..., 1e-12 whose max
   error at the observation times is at most DeerSolver's (as `forward.py`);
4. Tsit5 + `StepTo` on the same N + 1 nodes;

and the loss alone (no gradient) of (1), the forward solve, so gradient / forward is
visible. Max error: largest absolute error of the solution at the observation times
against Tsit5 at rtol = atol = 1e-12 in float64 with the same weights.

Times are of jitted calls: compile = the first call (trace + compile + one run);
run = the median of `--repeats` rounds, each round calling every method once in
turn (interleaved, so a change in load hits all alike), each call ending in
`jax.block_until_ready`.

    python benchmarks/gradients.py --quick
    python benchmarks/gradients.py --markdown /tmp/bench_gradients.md --json /tmp/g.json
"""

from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffrax_deer import DeerAdjoint, DeerSolver  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.forward import DTYPES  # noqa: E402
from diffrax_deer._bench.problems import get_problem  # noqa: E402
from diffrax_deer._bench.solves import (  # noqa: E402
    Instance,
    adaptive_solve,
    deer_solve,
    fixed_grid_solve,
    max_error,
    scan_tolerances,
)


PID_MAX_STEPS = 4096
# name, label; "grad_deer_adjoint" is what the ratios are taken against.
METHODS = (
    ("forward_deer_adjoint", "Deer+DeerAdjoint forward"),
    ("grad_deer_adjoint", "Deer+DeerAdjoint grad"),
    ("grad_deer_default", "Deer+default adjoint grad"),
    ("grad_pid", "Tsit5 PID grad"),
    ("grad_step_to", "Tsit5 StepTo grad"),
)


# --- solves: each takes the field (differentiated) and returns the Solution -------


def solve(
    kind: str, field, case: Instance, num_steps: int, tolerance
) -> diffrax.Solution:
    """The forward solve `kind` of the observation problem `case` with `field`."""
    case = eqx.tree_at(lambda c: c.term, case, diffrax.ODETerm(field))
    if kind == "deer_adjoint":
        return deer_solve(
            DeerSolver(num_steps=num_steps),
            case,
            save_state=False,
            adjoint=DeerAdjoint(),
            window_by_step_to=True,
        )
    if kind == "deer_default":
        return deer_solve(DeerSolver(num_steps=num_steps), case, save_state=False)
    if kind == "pid":
        return adaptive_solve(diffrax.Tsit5(), tolerance, case, PID_MAX_STEPS)
    return fixed_grid_solve(diffrax.Tsit5(), num_steps, case)


def loss(field, kind, case, num_steps, tolerance, data):
    """Mean squared error of the solution at the observation times."""
    return jnp.mean((solve(kind, field, case, num_steps, tolerance).ys - data) ** 2)


solve_jit = eqx.filter_jit(solve)
loss_jit = eqx.filter_jit(loss)
loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))


def grad_norm(grads) -> float:
    leaves = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in leaves)))


def grad_rel_diff(grads, base) -> float:
    a = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    b = jax.tree_util.tree_leaves(eqx.filter(base, eqx.is_inexact_array))
    diff = sum(
        np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
        for x, y in zip(a, b, strict=True)
    )
    return float(np.sqrt(diff)) / grad_norm(base)


def forward_errors(field, case, num_steps, ref, tag) -> dict[str, Any]:
    """Accuracy of each forward solve at the observation times, and the loosest
    PID tolerance whose error is at most DeerSolver's (else the tightest that
    succeeded)."""
    sol = solve_jit("deer_adjoint", field, case, num_steps, None)
    deer_error = max_error(sol.ys, ref)
    out = dict(
        deer_error=deer_error,
        deer_newton_iters=int(sol.stats["num_iters"]),
        deer_result=timing.result_name(sol.result),
        deer_default_error=max_error(
            solve_jit("deer_default", field, case, num_steps, None).ys, ref
        ),
        step_to_error=max_error(
            solve_jit("step_to", field, case, num_steps, None).ys, ref
        ),
    )
    dtype = case.y0.dtype
    scanned, chosen = scan_tolerances(
        lambda tol: solve_jit("pid", field, case, num_steps, jnp.asarray(tol, dtype)),
        ref,
        [deer_error],
    )
    successful = [row for row in scanned if row["successful"]]
    if not successful:
        raise RuntimeError(f"{tag} no PID tolerance succeeded")
    row = chosen.get(deer_error, successful[-1])
    out.update(
        pid_tolerance=row["tolerance"],
        pid_error=row["max_error"],
        pid_steps=row["num_steps"],
        pid_reached=deer_error in chosen,
    )
    timing.progress(
        f"{tag} max err: Deer {timing.fmt_error(deer_error)} "
        f"({out['deer_newton_iters']} Newton iters, {out['deer_result']}), "
        f"StepTo {timing.fmt_error(out['step_to_error'])}, "
        f"PID tol={row['tolerance']:.0e} "
        f"{timing.fmt_error(row['max_error'])} ({row['num_steps']} steps)"
    )
    return out


def run_case(
    num_obs: int, num_steps: int, dtype_name: str, repeats: int
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    tag = f"[{dtype_name} M={num_obs}]"
    # Empty caches: every first call below compiles.
    jax.clear_caches()
    problem = get_problem("mlp")
    case = problem.instance(dtype, num_obs, weights_dtype=dtype)
    field = case.term.vector_field
    obs_ts = np.asarray(case.save_ts, np.float64)
    ref = problem.reference(obs_ts, weights_dtype=dtype)
    data = jnp.asarray(ref + 0.1 * np.sin(3.0 * obs_ts)[:, None], dtype)
    result: dict[str, Any] = dict(M=num_obs, N=num_steps, dtype=dtype_name)
    result.update(forward_errors(field, case, num_steps, ref, tag))
    tol = jnp.asarray(result["pid_tolerance"], dtype)

    def call(function, kind, tolerance=None):
        return lambda: function(field, kind, case, num_steps, tolerance, data)

    calls = {
        "forward_deer_adjoint": call(loss_jit, "deer_adjoint"),
        "grad_deer_adjoint": call(loss_and_grad, "deer_adjoint"),
        "grad_deer_default": call(loss_and_grad, "deer_default"),
        "grad_pid": call(loss_and_grad, "pid", tol),
        "grad_step_to": call(loss_and_grad, "step_to"),
    }
    # Compile every method, then time them in interleaved rounds.
    timings = timing.time_interleaved(calls, repeats)
    base_grads = timings["grad_deer_adjoint"].output[1]
    base_run = timings["grad_deer_adjoint"].run_s
    for name, label in METHODS:
        timed = timings[name]
        entry = dict(compile_s=timed.compile_s, run_s=timed.run_s)
        if name.startswith("grad_"):
            value, grads = timed.output
            entry["grad_rel_diff_vs_deer_adjoint"] = grad_rel_diff(grads, base_grads)
        else:
            value = timed.output
        entry["loss"] = float(value)
        entry["over_deer_adjoint_grad"] = (
            timed.run_s / base_run if timed.run_s is not None and base_run else None
        )
        result[name] = entry
        timing.progress(
            f"{tag} {label}: compile {timing.fmt_seconds(timed.compile_s)}, run "
            f"{timing.fmt_seconds(timed.run_s)}, "
            f"{timing.fmt_ratio(entry['over_deer_adjoint_grad'])} DeerAdjoint grad"
        )
    return result


def to_markdown(info: dict[str, Any], cases: list[dict[str, Any]], repeats) -> str:
    headers = [
        "dtype",
        "M",
        "method",
        "max err",
        "grad rel diff",
        "compile",
        "run",
        "/ DeerAdjoint grad",
    ]
    rows = []
    for c in cases:
        errors = {
            "forward_deer_adjoint": timing.fmt_error(c["deer_error"]),
            "grad_deer_adjoint": timing.fmt_error(c["deer_error"]),
            "grad_deer_default": timing.fmt_error(c["deer_default_error"]),
            "grad_pid": f"{timing.fmt_error(c['pid_error'])} "
            f"(tol {c['pid_tolerance']:.0e}, {c['pid_steps']} steps"
            f"{'' if c['pid_reached'] else ', DEER error not reached'})",
            "grad_step_to": timing.fmt_error(c["step_to_error"]),
        }
        for name, label in METHODS:
            entry = c[name]
            method = label
            if name == "grad_deer_adjoint":
                method += f" ({c['deer_newton_iters']} Newton iters)"
            rows.append(
                [
                    c["dtype"],
                    str(c["M"]),
                    method,
                    errors[name],
                    timing.fmt_error(entry.get("grad_rel_diff_vs_deer_adjoint")),
                    timing.fmt_seconds(entry["compile_s"]),
                    timing.fmt_seconds(entry["run_s"]),
                    timing.fmt_ratio(entry["over_deer_adjoint_grad"]),
                ]
            )
    num_steps = cases[0]["N"] if cases else None
    intro = (
        "# Gradients: loss and gradient of a NeuralODE fit\n\n"
        f"{timing.machine_header(info)}\n\n"
        "MSE of the solution at M observation times against fixed data, value and "
        "gradient (`eqx.filter_value_and_grad`) with respect to the weights of the "
        "MLP field (state 2, width 64, depth 2, softplus; float64 weights rounded "
        "to float32 for the float32 rows), y0 = (1, -1), t in [0, 10], "
        f"N = {num_steps} nodes. Deer+DeerAdjoint: one window via "
        "`StepTo([t0, t1])`, dt0=None; its forward row is the loss alone, no "
        "gradient. Deer+default adjoint: dt0 = t1 - t0. Tsit5 PID: loosest rtol = "
        "atol in 1e-3 ... 1e-12 whose max error is at most DeerSolver's; Tsit5 "
        "StepTo: the same N + 1 nodes. Max error: largest absolute error of the "
        "forward solution at the observation times against Tsit5 with rtol = atol "
        "= 1e-12 in float64. Grad rel diff: relative 2-norm distance of the "
        "gradient to DeerAdjoint's. Compile = first call (trace + compile + one run); "
        f"run = median of {repeats} interleaved rounds. The last column is run "
        "time over the DeerAdjoint gradient's (> 1: DeerAdjoint is faster).\n\n"
        f"Command: `{timing.script_command('gradients.py')}`\n\n"
    )
    return intro + timing.markdown_table(headers, rows) + "\n"


def main() -> None:
    parser = timing.script_parser(__doc__)
    parser.add_argument(
        "--obs",
        default="100,1000",
        help="comma-separated numbers M of observation times (default 100,1000)",
    )
    parser.add_argument(
        "--num-steps", default="1e4", help="nodes N of the DEER window and StepTo"
    )
    timing.add_common_options(
        parser,
        repeats=7,
        quick="M = 100, N = 1e3, float64, 3 repeats",
        dtypes="float64,float32",
    )
    args = parser.parse_args()

    obs = timing.parse_list(args.obs, timing.parse_count)
    num_steps = timing.parse_count(args.num_steps)
    dtypes = timing.parse_dtypes(parser, args.dtypes)
    repeats = args.repeats
    if args.quick:
        obs, num_steps, dtypes, repeats = [100], 1000, ["float64"], 3

    info = timing.machine_info()
    timing.progress(timing.machine_header(info))
    cases = []
    for dtype_name in dtypes:
        for num_obs in obs:
            cases.append(run_case(num_obs, num_steps, dtype_name, repeats))

    markdown = to_markdown(info, cases, repeats)
    data = dict(machine=info, repeats=repeats, num_steps=num_steps, cases=cases)
    timing.emit(markdown, data, args)


if __name__ == "__main__":
    main()
