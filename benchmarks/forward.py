"""Forward solves: DeerSolver against diffrax's Tsit5 on a NeuralODE-style field.

For each grid size N and dtype, on the MLP field (state 2, width 64, depth 2),
y0 = (1, -1), t in [0, 10], everything in one process: DeerSolver(num_steps=N) in
one window; Tsit5 with `StepTo` on the same N + 1 nodes; Tsit5 with a
`PIDController` at the loosest rtol = atol in 1e-3, ..., 1e-12 whose max error is at
most DeerSolver's. The measurement is `diffrax_deer._bench.forward` (also behind
`python -m diffrax_deer bench`); its docstring says what is timed and how.

    python benchmarks/forward.py --quick
    python benchmarks/forward.py --markdown /tmp/bench_forward.md --json /tmp/f.json
"""

import argparse

from diffrax_deer import Trapezoid
from diffrax_deer._bench import timing
from diffrax_deer._bench.forward import DTYPES, run_forward, to_markdown


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
        "--repeats", type=int, default=5, help="timed rounds after compilation"
    )
    parser.add_argument("--quick", action="store_true", help="N = 1e3 only, 3 repeats")
    timing.add_output_options(parser)
    args = parser.parse_args()

    sizes = timing.parse_list(args.sizes, timing.parse_count)
    repeats = args.repeats
    if args.quick:
        sizes, repeats = [1000], 3
    dtypes = timing.parse_list(args.dtypes, str)
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    if not sizes or not dtypes:
        parser.error("nothing to run: give at least one size and one dtype")

    results = run_forward(sizes, dtypes, Trapezoid(), "trapezoid", repeats)
    timing.emit(
        to_markdown(results, timing.script_command("forward.py")), results, args
    )


if __name__ == "__main__":
    main()
