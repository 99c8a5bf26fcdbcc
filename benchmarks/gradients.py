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

import argparse
import statistics
import sys
import time
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
from diffrax_deer import DeerAdjoint, DeerSolver  # noqa: E402
from forward import (  # noqa: E402  (the same field, problem and helpers)
    DTYPES,
    PID_TOLERANCES,
    REFERENCE_TOLERANCE,
    T0,
    T1,
    Y0,
    make_field,
    parse_list,
    succeeded,
)


PID_MAX_STEPS = 4096
REFERENCE_MAX_STEPS = 200_000
# name, label; "grad_deer_adjoint" is what the ratios are taken against.
METHODS = (
    ("forward_deer_adjoint", "Deer+DeerAdjoint forward"),
    ("grad_deer_adjoint", "Deer+DeerAdjoint grad"),
    ("grad_deer_default", "Deer+default adjoint grad"),
    ("grad_pid", "Tsit5 PID grad"),
    ("grad_step_to", "Tsit5 StepTo grad"),
)


# --- solves: each takes the field (differentiated) and returns the saved ys -------


def solve_deer_adjoint(field, num_steps, y0, t0, t1, obs_ts):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        DeerSolver(num_steps=num_steps),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=obs_ts),
        stepsize_controller=diffrax.StepTo(ts=jnp.stack([t0, t1])),
        adjoint=DeerAdjoint(),
        throw=False,
    )


def solve_deer_default(field, num_steps, y0, t0, t1, obs_ts):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        DeerSolver(num_steps=num_steps),
        t0=t0,
        t1=t1,
        dt0=t1 - t0,
        y0=y0,
        saveat=diffrax.SaveAt(ts=obs_ts),
        throw=False,
    )


def solve_pid(field, tolerance, y0, t0, t1, obs_ts, max_steps=PID_MAX_STEPS):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=obs_ts),
        stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=max_steps,
        throw=False,
    )


def solve_step_to(field, num_steps, y0, t0, t1, obs_ts):
    grid = jnp.linspace(t0, t1, num_steps + 1, dtype=y0.dtype)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(ts=obs_ts),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=num_steps,
        throw=False,
    )


def mse(ys, data):
    return jnp.mean((ys - data) ** 2)


@eqx.filter_jit
def forward_deer_adjoint(field, num_steps, y0, t0, t1, obs_ts, data):
    return mse(solve_deer_adjoint(field, num_steps, y0, t0, t1, obs_ts).ys, data)


@eqx.filter_jit
@eqx.filter_value_and_grad
def grad_deer_adjoint(field, num_steps, y0, t0, t1, obs_ts, data):
    return mse(solve_deer_adjoint(field, num_steps, y0, t0, t1, obs_ts).ys, data)


@eqx.filter_jit
@eqx.filter_value_and_grad
def grad_deer_default(field, num_steps, y0, t0, t1, obs_ts, data):
    return mse(solve_deer_default(field, num_steps, y0, t0, t1, obs_ts).ys, data)


@eqx.filter_jit
@eqx.filter_value_and_grad
def grad_pid(field, tolerance, y0, t0, t1, obs_ts, data):
    return mse(solve_pid(field, tolerance, y0, t0, t1, obs_ts).ys, data)


@eqx.filter_jit
@eqx.filter_value_and_grad
def grad_step_to(field, num_steps, y0, t0, t1, obs_ts, data):
    return mse(solve_step_to(field, num_steps, y0, t0, t1, obs_ts).ys, data)


# Forward solves, for the errors (and the PID tolerance search).
values_deer_adjoint = eqx.filter_jit(solve_deer_adjoint)
values_deer_default = eqx.filter_jit(solve_deer_default)
values_pid = eqx.filter_jit(solve_pid)
values_step_to = eqx.filter_jit(solve_step_to)


def max_error(ys, reference: np.ndarray) -> float:
    ys = np.asarray(ys, dtype=np.float64)
    if not np.all(np.isfinite(ys)):
        return float("inf")
    return float(np.max(np.abs(ys - reference)))


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


def reference(dtype_name: str, obs_ts: np.ndarray) -> np.ndarray:
    """Tsit5 at rtol = atol = 1e-12 in float64, weights rounded as `dtype_name`'s."""
    field = make_field(jnp.float64, weights_dtype=DTYPES[dtype_name])
    sol = values_pid(
        field,
        jnp.array(REFERENCE_TOLERANCE),
        jnp.array(Y0),
        jnp.array(T0),
        jnp.array(T1),
        jnp.asarray(obs_ts, jnp.float64),
        max_steps=REFERENCE_MAX_STEPS,
    )
    if not succeeded(sol):
        raise RuntimeError(f"reference solve failed: {result_name(sol.result)}")
    return np.asarray(sol.ys)


def run_case(
    num_obs: int, num_steps: int, dtype_name: str, repeats: int
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    tag = f"[{dtype_name} M={num_obs}]"
    # Empty caches: every first call below compiles.
    jax.clear_caches()
    field = make_field(dtype, weights_dtype=dtype)
    t0, t1 = jnp.array(T0, dtype), jnp.array(T1, dtype)
    y0 = jnp.array(Y0, dtype)
    obs_ts = jnp.linspace(t0, t1, num_obs, dtype=dtype)
    ref = reference(dtype_name, np.asarray(obs_ts, np.float64))
    data_np = ref + 0.1 * np.sin(3.0 * np.asarray(obs_ts, np.float64))[:, None]
    data = jnp.asarray(data_np, dtype)
    common = dict(y0=y0, t0=t0, t1=t1, obs_ts=obs_ts)
    case: dict[str, Any] = dict(M=num_obs, N=num_steps, dtype=dtype_name)

    # Accuracy of each forward solve at the observation times.
    sol = values_deer_adjoint(field, num_steps, **common)
    deer_error = max_error(sol.ys, ref)
    case["deer_newton_iters"] = int(sol.stats["num_iters"])
    case["deer_result"] = result_name(sol.result)
    case["deer_default_error"] = max_error(
        values_deer_default(field, num_steps, **common).ys, ref
    )
    case["step_to_error"] = max_error(
        values_step_to(field, num_steps, **common).ys, ref
    )
    case["deer_error"] = deer_error
    chosen = None
    for tolerance in PID_TOLERANCES:
        tol = jnp.array(tolerance, dtype)
        sol = values_pid(field, tol, **common)
        error = max_error(sol.ys, ref)
        if not succeeded(sol):
            break
        chosen = (tolerance, tol, error, int(sol.stats["num_steps"]))
        if error <= deer_error:
            break
    if chosen is None:
        raise RuntimeError(f"{tag} no PID tolerance succeeded")
    tolerance, tol, pid_error, pid_steps = chosen
    case.update(
        pid_tolerance=tolerance,
        pid_error=pid_error,
        pid_steps=pid_steps,
        pid_reached=pid_error <= deer_error,
    )
    progress(
        f"{tag} max err: Deer {fmt_error(deer_error)} "
        f"({case['deer_newton_iters']} Newton iters, {case['deer_result']}), "
        f"StepTo {fmt_error(case['step_to_error'])}, PID tol={tolerance:.0e} "
        f"{fmt_error(pid_error)} ({pid_steps} steps)"
    )

    calls = {
        "forward_deer_adjoint": lambda: forward_deer_adjoint(
            field, num_steps, data=data, **common
        ),
        "grad_deer_adjoint": lambda: grad_deer_adjoint(
            field, num_steps, data=data, **common
        ),
        "grad_deer_default": lambda: grad_deer_default(
            field, num_steps, data=data, **common
        ),
        "grad_pid": lambda: grad_pid(field, tol, data=data, **common),
        "grad_step_to": lambda: grad_step_to(field, num_steps, data=data, **common),
    }
    # Compile every method, then time them in interleaved rounds.
    outputs, compile_s = {}, {}
    for name, label in METHODS:
        outputs[name], compile_s[name], _ = time_call(calls[name], repeats=0)
        progress(f"{tag} {label}: compile {fmt_seconds(compile_s[name])}")
    times: dict[str, list[float]] = {name: [] for name, _ in METHODS}
    for _ in range(repeats):
        for name, _ in METHODS:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - start)
    base_grads = outputs["grad_deer_adjoint"][1]
    base_run = statistics.median(times["grad_deer_adjoint"]) if repeats else None
    for name, label in METHODS:
        run = statistics.median(times[name]) if repeats else None
        entry = dict(compile_s=compile_s[name], run_s=run)
        if name.startswith("grad_"):
            loss, grads = outputs[name]
            entry["loss"] = float(loss)
            entry["grad_rel_diff_vs_deer_adjoint"] = grad_rel_diff(grads, base_grads)
        else:
            entry["loss"] = float(outputs[name])
        entry["over_deer_adjoint_grad"] = (
            run / base_run if run is not None and base_run else None
        )
        case[name] = entry
        progress(
            f"{tag} {label}: run {fmt_seconds(run)}, "
            f"{fmt_ratio(entry['over_deer_adjoint_grad'])} DeerAdjoint grad"
        )
    return case


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
            "forward_deer_adjoint": fmt_error(c["deer_error"]),
            "grad_deer_adjoint": fmt_error(c["deer_error"]),
            "grad_deer_default": fmt_error(c["deer_default_error"]),
            "grad_pid": f"{fmt_error(c['pid_error'])} "
            f"(tol {c['pid_tolerance']:.0e}, {c['pid_steps']} steps"
            f"{'' if c['pid_reached'] else ', DEER error not reached'})",
            "grad_step_to": fmt_error(c["step_to_error"]),
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
                    fmt_error(entry.get("grad_rel_diff_vs_deer_adjoint")),
                    fmt_seconds(entry["compile_s"]),
                    fmt_seconds(entry["run_s"]),
                    fmt_ratio(entry["over_deer_adjoint_grad"]),
                ]
            )
    num_steps = cases[0]["N"] if cases else None
    intro = (
        "# Gradients: loss and gradient of a NeuralODE fit\n\n"
        f"{machine_header(info)}\n\n"
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
        f"Command: `python benchmarks/gradients.py {' '.join(sys.argv[1:])}`\n\n"
    )
    return intro + markdown_table(headers, rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--obs",
        default="100,1000",
        help="comma-separated numbers M of observation times (default 100,1000)",
    )
    parser.add_argument(
        "--num-steps", default="1e4", help="nodes N of the DEER window and StepTo"
    )
    parser.add_argument(
        "--dtypes", default="float64,float32", help="comma-separated dtypes"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed rounds after compilation"
    )
    parser.add_argument(
        "--quick", action="store_true", help="M = 100, N = 1e3, float64, 3 repeats"
    )
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown table")
    parser.add_argument("--json", metavar="PATH", help="write the raw results")
    args = parser.parse_args()

    obs = parse_list(args.obs, lambda s: int(float(s)))
    num_steps = int(float(args.num_steps))
    dtypes = parse_list(args.dtypes, str)
    repeats = args.repeats
    if args.quick:
        obs, num_steps, dtypes, repeats = [100], 1000, ["float64"], 3
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")

    info = machine_info()
    progress(machine_header(info))
    cases = []
    for dtype_name in dtypes:
        for num_obs in obs:
            cases.append(run_case(num_obs, num_steps, dtype_name, repeats))

    markdown = to_markdown(info, cases, repeats)
    print(markdown)
    if args.markdown:
        write_text(args.markdown, markdown)
    if args.json:
        write_json(
            args.json,
            dict(machine=info, repeats=repeats, num_steps=num_steps, cases=cases),
        )


if __name__ == "__main__":
    main()
