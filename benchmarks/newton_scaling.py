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

import sys

import jax


# The field's weights are drawn in float64 (as everywhere in the registry) and
# rounded to float32; the solves are float32.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from diffrax_deer import DeerSolver  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.problems import Problem, mlp_problem  # noqa: E402
from diffrax_deer._bench.solves import Instance, deer_solve  # noqa: E402


def make_solve(problem: Problem, num_steps, jacobian, damping, predictor_steps):
    """A jitted float32 solve `y0 -> (y(t1), result, Newton iterations)`; the field's
    weights are constants of the computation, not arguments."""
    solver = DeerSolver(
        num_steps=num_steps,
        jacobian=jacobian,
        damping=damping,
        max_iters=100,
        predictor_steps=predictor_steps,
    )
    base = problem.instance(jnp.float32)

    @jax.jit
    def solve(y0):
        case = Instance(base.term, y0, base.t0, base.t1, base.t1[None])
        sol = deer_solve(solver, case)
        return sol.ys, sol.result, sol.solver_state.num_iters

    return solve


def main(argv=None) -> int:
    parser = timing.script_parser(__doc__)
    parser.add_argument("--num-steps", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 256])
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
    timing.add_common_options(parser, repeats=5)
    args = parser.parse_args(argv)

    info = timing.machine_info()
    rows, records = [], []
    for size in args.sizes:
        problem = mlp_problem(size)
        y0 = problem.y0_array(jnp.float32)
        trajectory_bytes = (args.num_steps + 1) * size * 4
        for jacobian in ("full", "diagonal"):
            for damping in [d == "on" for d in args.dampings.split(",")]:
                timing.progress(f"n={size} {jacobian} damping={damping}")
                solve = make_solve(
                    problem, args.num_steps, jacobian, damping, args.predictor_steps
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
                    timed = timing.time_call(solve, y0, repeats=args.repeats)
                    _, result, iters = timed.output
                    record.update(
                        iterations=int(iters),
                        outcome=timing.result_name(result),
                        first_call_s=timed.compile_s,
                        median_s=timed.run_s,
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
                        timing.fmt_seconds(record.get("median_s")),
                        timing.fmt_seconds(record.get("first_call_s")),
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
        f"{timing.machine_header(info)}\n\nN = {args.num_steps}, float32, softplus "
        f"MLP width 64, t in [0, 1], one window, "
        f"predictor_steps={args.predictor_steps} "
        "(None: the default RK4 predictor).\n\n" + timing.markdown_table(headers, rows)
    )
    timing.emit(text, dict(machine=info, records=records), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
