"""Newton's tolerance against the accuracy it buys: iterations and final error.

For the cold-start problems of `cold_start.py` (all but Lorenz over [0, 20], which
one window cannot solve), with the trapezoid and Gauss-Legendre(3), N intervals in
one window and the default RK4 predictor: Newton iterations and the max error at
101 save times against Tsit5 with rtol = atol = 1e-12, for each `rtol` asked for
(`default` = DeerSolver's own; `atol` stays `None`, scaled with the trajectory),
and for Newton run to round-off (12 iterations; the error the discretisation
alone gives). Both are deterministic, so the figures are valid under load.

    python benchmarks/newton_tolerance.py --markdown /tmp/newton_tolerance.md
    python benchmarks/newton_tolerance.py --quick
"""

import argparse
import sys
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from _timing import (
    fmt_error,
    machine_header,
    machine_info,
    markdown_table,
    progress,
    result_name,
    write_json,
    write_text,
)
from cold_start import NUM_SAVES, PROBLEMS, solve_deer, solve_reference
from diffrax_deer import DeerSolver, GaussLegendre, Trapezoid


METHODS = {"trapezoid": Trapezoid(), "gl3": GaussLegendre(stages=3)}
# Newton run to round-off: a tolerance it cannot reach, and enough iterations to
# get there from the predictor on every problem here (the best iterate is kept).
ROUND_OFF = {"float64": 1e-15, "float32": 1e-9}
ROUND_OFF_ITERS = 12


def solve(problem: dict, method, num_steps: int, rtol: float | None, max_iters: int):
    solver = DeerSolver(
        num_steps=num_steps, method=method, rtol=rtol, max_iters=max_iters
    )
    sol = solve_deer(solver, **problem)
    return sol, np.asarray(sol.ys, np.float64)


def run_case(name, method_name, num_steps, dtype, rtols, reference_cache):
    make_field, y0, t1 = PROBLEMS[name]
    field = make_field()
    if dtype == "float32":
        field = to_float32(field)
    problem = dict(
        term=diffrax.ODETerm(field),
        y0=jnp.array(y0, dtype),
        t0=jnp.array(0.0, dtype),
        t1=jnp.array(t1, dtype),
        save_ts=jnp.linspace(0.0, t1, NUM_SAVES).astype(dtype),
    )
    if name not in reference_cache:
        reference = solve_reference(
            diffrax.ODETerm(make_field()),
            jnp.array(y0, jnp.float64),
            jnp.array(0.0),
            jnp.array(t1),
            jnp.linspace(0.0, t1, NUM_SAVES),
        )
        reference_cache[name] = np.asarray(reference.ys)
    reference_ys = reference_cache[name]
    method = METHODS[method_name]
    _, converged_ys = solve(
        problem, method, num_steps, ROUND_OFF[dtype], ROUND_OFF_ITERS
    )
    floor = float(np.max(np.abs(converged_ys - reference_ys)))
    row = dict(problem=name, method=method_name, N=num_steps, dtype=dtype, floor=floor)
    for label in rtols:
        rtol = None if label == "default" else float(label)
        sol, ys = solve(problem, method, num_steps, rtol, 50)
        error = float(np.max(np.abs(ys - reference_ys)))
        row[label] = dict(
            iters=int(sol.solver_state.num_iters),
            outcome=result_name(sol.result),
            error=error,
            change=error / floor - 1,
            newton_error=float(np.max(np.abs(ys - converged_ys))),
        )
    progress(
        f"[{name} {method_name} N={num_steps} {dtype}] floor {fmt_error(floor)}: "
        + ", ".join(
            f"{k} {v['iters']} its {v['change']:+.1%}"
            for k, v in row.items()
            if isinstance(v, dict)
        )
    )
    return row


def to_float32(field):
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, field
    )


def cell(entry: dict[str, Any]) -> str:
    if entry["outcome"] != "successful":
        return f"{entry['iters']} ({entry['outcome']})"
    return f"{entry['iters']} / {entry['change']:+.1%}"


def to_markdown(info, rows, rtols) -> str:
    headers = ["problem", "method", "N", "dtype", "error at round-off"] + [
        f"rtol {label}: iters / error change" for label in rtols
    ]
    table = markdown_table(
        headers,
        [
            [
                r["problem"],
                r["method"],
                f"1e{round(np.log10(r['N']))}"
                if r["N"] in (1000, 10000)
                else str(r["N"]),
                r["dtype"],
                fmt_error(r["floor"]),
            ]
            + [cell(r[label]) for label in rtols]
            for r in rows
        ],
    )
    return (
        "# Newton's tolerance: iterations against accuracy\n\n"
        f"{machine_header(info)}\n\n"
        "One window, default RK4 predictor, `atol=None`. Error: max over "
        f"{NUM_SAVES} save times against Tsit5 at rtol = atol = 1e-12; 'error at "
        f"round-off' is that of Newton run for {ROUND_OFF_ITERS} iterations (the "
        "discretisation's own error); 'error change' is each solve's error "
        "relative to it.\n\n"
        f"Command: `python benchmarks/newton_tolerance.py {' '.join(sys.argv[1:])}`"
        f"\n\n{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtols", default="default", help="comma-separated")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--methods", default="trapezoid,gl3")
    parser.add_argument("--problems", default=None, help="substrings, comma-separated")
    parser.add_argument("--quick", action="store_true", help="N = 1e3, trapezoid")
    parser.add_argument("--markdown", metavar="PATH")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.methods = "1000", "trapezoid"
    names = [n for n in PROBLEMS if n != "Lorenz [0, 20]"]
    if args.problems:
        wanted = [w.lower() for w in args.problems.split(",")]
        names = [n for n in names if any(w in n.lower() for w in wanted)]
    rtols = args.rtols.split(",")
    info = machine_info()
    progress(machine_header(info))
    rows, references = [], {}
    for dtype in args.dtypes.split(","):
        for method_name in args.methods.split(","):
            for num_steps in map(int, args.sizes.split(",")):
                for name in names:
                    rows.append(
                        run_case(name, method_name, num_steps, dtype, rtols, references)
                    )
    markdown = to_markdown(info, rows, rtols)
    print(markdown)
    if args.markdown:
        write_text(args.markdown, markdown)
    if args.json:
        write_json(args.json, dict(machine=info, rows=rows))


if __name__ == "__main__":
    main()
