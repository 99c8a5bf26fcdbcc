"""Measures the errors behind `validate` and the demo's verdict (`MEASURED_ERRORS`).

For each validation problem and method: the calibration grid N0, DeerSolver's max
error E0 there (at up to 101 grid nodes, against the problem's reference), and the
observed order between N0 / 2 and N0 (2 N0 when N0 = 10), which should be about
the method's: the check that E0 (N0 / N)^order predicts other grids. N0 is the
coarsest grid of 10 * 2^k intervals whose error is at most 1e-6 max|y|; where none
up to 2560 is, the coarsest from 2560 on whose error is at most 1e-3 max|y| (the
first-order methods on the nonlinear problems), at most 163840. Everything is
float64 and deterministic on a CPU (no timing). Prints the table as Markdown on
stdout and, with `--python`, the `_MEASURED` table for
`src/diffrax_deer/_cli/options.py`.

    python benchmarks/validation_errors.py --python
    python benchmarks/validation_errors.py --problems linear --methods tsit5
"""

import math

import jax


jax.config.update("jax_enable_x64", True)

from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._cli.options import METHODS, PROBLEMS  # noqa: E402
from diffrax_deer._cli.validate import measure_case  # noqa: E402


TARGET, COARSE_TARGET = 1e-6, 1e-3
SMALLEST, USUAL_LARGEST, LARGEST = 10, 2560, 10 * 2**14
# The first rung tried, by order, near where each order's errors cross the target.
FIRST = {1: 2560, 2: 640, 3: 160, 4: 40}


def calibrate(name: str, method: str, references) -> dict:
    order = METHODS[method][1]
    rows = {}

    def measure(num_steps):
        if num_steps not in rows:
            rows[num_steps] = measure_case(name, method, num_steps, references)
            row = rows[num_steps]
            timing.progress(
                f"[{name} / {method}] N={num_steps}: {row['max_error']:.2e} "
                f"(scale {row['scale']:.3g}), {row['newton_iters']} iters"
            )
        return rows[num_steps]

    def reaches(num_steps, target=TARGET):
        row = measure(num_steps)
        return row["converged"] and row["max_error"] <= target * row["scale"]

    num_steps = FIRST.get(order, SMALLEST)
    while not reaches(num_steps) and num_steps < USUAL_LARGEST:
        num_steps *= 2
    while num_steps > SMALLEST and reaches(num_steps // 2):
        num_steps //= 2
    while not reaches(num_steps, COARSE_TARGET) and num_steps < LARGEST:
        num_steps *= 2
    other = num_steps // 2 if num_steps > SMALLEST else 2 * num_steps
    coarse, fine = sorted([num_steps, other])
    observed = math.log2(measure(coarse)["max_error"] / measure(fine)["max_error"])
    return dict(
        problem=name,
        method=method,
        order=order,
        N0=num_steps,
        E0=rows[num_steps]["max_error"],
        relative=rows[num_steps]["max_error"] / rows[num_steps]["scale"],
        converged=rows[num_steps]["converged"],
        observed_order=observed,
        order_pair=(coarse, fine),
    )


def to_python(results) -> str:
    """The `_MEASURED` table of `_cli/options.py`: a row per method, N0 and E0 for
    each problem in the order of `PROBLEMS`."""
    cells = {
        (r["problem"], r["method"]): f"{r['N0']:>6} {r['E0']:.2e}" for r in results
    }
    problems = [name for name in PROBLEMS if any(k[0] == name for k in cells)]
    lines = []
    for method in dict.fromkeys(r["method"] for r in results):
        row = "  ".join(cells.get((name, method), " " * 15) for name in problems)
        lines.append(f"{method:<17}{row}".rstrip())
    return '_MEASURED = """\n' + "\n".join(lines) + '\n"""'


def main() -> None:
    parser = timing.script_parser(__doc__)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--python", action="store_true", help="also print the table of _cli/options.py"
    )
    timing.add_output_options(parser)
    args = parser.parse_args()
    references = {}
    results = [
        calibrate(name, method, references)
        for name in timing.parse_list(args.problems, str)
        for method in timing.parse_list(args.methods, str)
    ]
    table = timing.markdown_table(
        ["problem", "method", "order", "N0", "E0", "E0 / max|y|", "observed order"],
        [
            [
                r["problem"],
                r["method"],
                str(r["order"]),
                str(r["N0"]) + ("" if r["converged"] else " (not converged)"),
                f"{r['E0']:.2e}",
                f"{r['relative']:.1e}",
                f"{r['observed_order']:.2f} (N = {r['order_pair'][0]}, "
                f"{r['order_pair'][1]})",
            ]
            for r in results
        ],
    )
    text = table + ("\n\n" + to_python(results) if args.python else "")
    timing.emit(text, results, args)


if __name__ == "__main__":
    main()
