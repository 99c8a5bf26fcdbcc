"""Newton at scale: full DEER against quasi-DEER (diagonal), with and without damping.

A NeuralODE-style field (softplus MLP, width 64, depth 2) with state size n = 4, 16,
64, 256, one window of N trapezoid intervals on [0, 1], float32. For each
configuration:

- XLA's compiled memory (`compiled.memory_analysis()`: temporaries + outputs), as a
  multiple of the trajectory itself (N x n values). This needs compilation only.
- Newton iterations, outcome and run time (median of `--repeats` jitted calls after
  the first), for the configurations whose time is affordable on this machine
  (`--max-full-size`: full DEER costs O(N n^3) per iteration).

    python benchmarks/newton_scaling.py --markdown /tmp/bench_newton_scaling.md
"""

import argparse
import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from _timing import (
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
from diffrax_deer import DeerSolver
from diffrax_deer._bench.problems import MLPVectorField


def field_of_size(size: int) -> MLPVectorField:
    field = MLPVectorField(state_size=size, width=64, depth=2, key=jax.random.key(0))
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, field
    )


def make_solve(field, num_steps, jacobian, damping, predictor_steps):
    solver = DeerSolver(
        num_steps=num_steps,
        jacobian=jacobian,
        damping=damping,
        max_iters=100,
        predictor_steps=predictor_steps,
    )

    @jax.jit
    def solve(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            jnp.float32(0),
            jnp.float32(1),
            jnp.float32(1),
            y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            throw=False,
        )
        return sol.ys, sol.result, sol.solver_state.num_iters

    return solve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--predictor-steps",
        type=int,
        default=None,
        help="DeerSolver's predictor_steps (default: its default; 0: constant guess)",
    )
    parser.add_argument(
        "--dampings",
        default="off,on",
        help="comma-separated subset of off,on",
    )
    parser.add_argument(
        "--max-full-size",
        type=int,
        default=64,
        help="largest n at which full DEER is run (larger: memory only)",
    )
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    info = machine_info()
    rows, records = [], []
    for size in args.sizes:
        field = field_of_size(size)
        y0 = jax.random.normal(jax.random.key(1), (size,), jnp.float32)
        trajectory_bytes = (args.num_steps + 1) * size * 4
        for jacobian in ("full", "diagonal"):
            for damping in [d == "on" for d in args.dampings.split(",")]:
                progress(f"n={size} {jacobian} damping={damping}")
                solve = make_solve(
                    field, args.num_steps, jacobian, damping, args.predictor_steps
                )
                analysis = solve.lower(y0).compile().memory_analysis()
                memory = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
                record = dict(
                    size=size,
                    jacobian=jacobian,
                    damping=damping,
                    memory_bytes=int(memory),
                    memory_over_trajectory=memory / trajectory_bytes,
                )
                run = jacobian == "diagonal" or size <= args.max_full_size
                if run:
                    (_, result, iters), first, median = time_call(
                        solve, y0, repeats=args.repeats
                    )
                    record.update(
                        iterations=int(iters),
                        outcome=result_name(result),
                        first_call_s=first,
                        median_s=median,
                    )
                records.append(record)
                rows.append(
                    [
                        str(size),
                        jacobian,
                        "on" if damping else "off",
                        f"{memory / 2**20:.1f} MiB",
                        f"{record['memory_over_trajectory']:.1f}x",
                        str(record.get("iterations", "not run")),
                        record.get("outcome", ""),
                        fmt_seconds(record.get("median_s")),
                        fmt_seconds(record.get("first_call_s")),
                    ]
                )
    headers = [
        "n",
        "jacobian",
        "damping",
        "compiled memory",
        "/ trajectory",
        "Newton iters",
        "outcome",
        "run (median)",
        "first call (after the AOT compile)",
    ]
    text = (
        f"{machine_header(info)}\n\nN = {args.num_steps}, float32, softplus MLP width "
        f"64, t in [0, 1], one window, predictor_steps={args.predictor_steps} "
        "(None: the default RK4 predictor).\n\n" + markdown_table(headers, rows)
    )
    print(text)
    if args.markdown:
        write_text(args.markdown, text)
    if args.json:
        write_json(args.json, dict(machine=info, records=records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
