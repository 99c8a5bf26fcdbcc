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

from diffrax_deer import Trapezoid
from diffrax_deer._bench import timing
from diffrax_deer._bench.forward import run_forward, to_markdown


def main() -> None:
    parser = timing.script_parser(__doc__)
    parser.add_argument(
        "--sizes",
        default="1e3,1e4,1e5",
        help="comma-separated grid sizes N (default 1e3,1e4,1e5)",
    )
    timing.add_common_options(
        parser, repeats=5, quick="N = 1e3 only, 3 repeats", dtypes="float32,float64"
    )
    args = parser.parse_args()

    sizes = timing.parse_list(args.sizes, timing.parse_count)
    repeats = args.repeats
    if args.quick:
        sizes, repeats = [1000], 3
    dtypes = timing.parse_dtypes(parser, args.dtypes)
    if not sizes:
        parser.error("nothing to run: give at least one size")

    results = run_forward(sizes, dtypes, Trapezoid(), "trapezoid", repeats)
    timing.emit(
        to_markdown(results, timing.script_command("forward.py")), results, args
    )


if __name__ == "__main__":
    main()
