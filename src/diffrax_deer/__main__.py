"""Command line: `python -m diffrax_deer` (or `diffrax-deer`).

Sub-commands: `demo` (the default), `validate` and `bench`. Nothing here imports JAX
before the arguments are parsed, so `--help` and bad options answer at once.
"""

import argparse
import os
import shlex
import sys

from ._cli.options import METHODS, PROBLEMS, QUICK_CASES


SUBCOMMANDS = ("demo", "validate", "bench")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        number = float(text) if "e" in text.lower() else int(text)
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        value = int(number)
    except ValueError:  # "many", "1.5e0", "1e400" (inf)
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _choice_list(choices, what: str):
    def parse(text: str) -> list[str]:
        if text == "all":
            return list(choices)
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"choose from {', '.join(choices)} or all"
            )
        return names

    return parse


def _size_list(text: str) -> list[int]:
    sizes = [_positive_int(item.strip()) for item in text.split(",") if item.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected grid sizes, got {text!r}")
    return sizes


def _method_help() -> str:
    names = ", ".join(f"{name} ({order})" for name, (_, order) in METHODS.items())
    return (
        f"One of (order in brackets): {names}. The first five are diffrax-deer's "
        "implicit methods; the others use that diffrax explicit solver's step as "
        "DEER's one-step map."
    )


def _writable_path(text: str) -> str:
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    return text


_DEMO_HELP = "compare DeerSolver with Tsit5 on an MLP vector field (default)"
_DEMO = (
    "Solve a NeuralODE-style problem (MLP 2-64-64-2 field, t in [0, 10]) "
    "with DeerSolver (one window), with Tsit5 on the same grid and with "
    "a tight adaptive Tsit5 reference. Print max errors against the "
    "reference, Newton iterations, compile and run times, and whether "
    "DeerSolver agrees with the reference within 3x its method's expected "
    "error on this grid (the error measured by `validate`'s calibration, "
    "scaled by the step to the power of the order). Exit status 0 when it "
    "agrees, 1 when not (also when the grid is too coarse to check)."
)
_VALIDATE_HELP = "check every method on named problems against trusted answers"
_BENCH_HELP = "time DeerSolver against Tsit5 (forward solves), Markdown table"
_BENCH = (
    "Time DeerSolver (one window of N intervals) against Tsit5 on the same "
    "grid and against adaptive Tsit5 at matched accuracy, on the demo's MLP "
    "field: compile and run times, max errors, Newton iterations. Progress "
    "on stderr; a Markdown table on stdout. The same code as "
    "benchmarks/forward.py (the benchmarks/ folder of a source checkout "
    "holds the full suites). Default: N in 1e3, 1e4, 1e5, float32 and "
    "float64 (about 10 minutes on 2 CPU cores)."
)


_VALIDATE = (
    "Solve named problems with DeerSolver for every method and compare with "
    "a trusted answer: the matrix exponential for the linear problem, "
    "Tsit5 at rtol = atol = 1e-12 for the nonlinear ones. Each method must "
    "converge and keep its max error within 3x what a correct method "
    "makes on the grid: the error measured once on the case's "
    "calibration grid N0, times (N0/N)^order (at least 3e-10 max|y|). "
    "Print a table; "
    "exit status 1 when any is out of tolerance. Progress goes to stderr. "
    f"Problems: {'; '.join(f'{k}: {v}' for k, v in PROBLEMS.items())}."
)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (no JAX import)."""
    parser = _Parser(
        prog="diffrax-deer",
        description=(
            "DeerSolver (DEER: Newton over the whole time grid with a parallel "
            "scan) for diffrax. Without a sub-command, runs `demo`."
        ),
        epilog="Run `diffrax-deer SUBCOMMAND --help` for a sub-command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=__version__)
    subcommands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    _add_demo(subcommands)
    _add_validate(subcommands)
    _add_bench(subcommands)
    return parser


def _add_demo(subcommands) -> None:
    demo = subcommands.add_parser("demo", help=_DEMO_HELP, description=_DEMO)
    demo.add_argument(
        "--method",
        choices=list(METHODS),
        default="trapezoid",
        metavar="NAME",
        help=f"DeerSolver's discretisation (default: trapezoid). {_method_help()}",
    )
    demo.add_argument(
        "--num-steps",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="intervals in DeerSolver's window and Tsit5's fixed steps "
        "(default: 10000)",
    )
    demo.add_argument(
        "--float32",
        action="store_true",
        help="solve in float32 (default: float64; the reference is float64)",
    )
    demo.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="timed runs after compilation; the median is shown (default: 5)",
    )
    demo.add_argument(
        "--json", action="store_true", help="print the results as JSON instead"
    )
    demo.add_argument(
        "--plot",
        type=_writable_path,
        metavar="PATH",
        help="draw both trajectories and the error over time into PATH (a .png; "
        "needs matplotlib)",
    )


def _add_validate(subcommands) -> None:
    validate = subcommands.add_parser(
        "validate", help=_VALIDATE_HELP, description=_VALIDATE
    )
    validate.add_argument(
        "--quick",
        action="store_true",
        help="only the cases "
        + ", ".join(f"{p}/{m}" for p, m in QUICK_CASES)
        + " (unless --problems/--methods are given; about half a minute on 2 "
        "CPU cores)",
    )
    validate.add_argument(
        "--problems",
        type=_choice_list(tuple(PROBLEMS), "problem"),
        metavar="LIST",
        help=f"comma-separated problems (default: all): {', '.join(PROBLEMS)}",
    )
    validate.add_argument(
        "--methods",
        type=_choice_list(tuple(METHODS), "method"),
        metavar="LIST",
        help=f"comma-separated methods (default: all): {', '.join(METHODS)}",
    )
    validate.add_argument(
        "--num-steps",
        type=_positive_int,
        metavar="N",
        help="one grid for every case (default: each case's calibration grid, "
        "10 to 163840 intervals)",
    )
    validate.add_argument(
        "--json", action="store_true", help="print the results as JSON instead"
    )


def _add_bench(subcommands) -> None:
    bench = subcommands.add_parser("bench", help=_BENCH_HELP, description=_BENCH)
    bench.add_argument(
        "--quick",
        action="store_true",
        help="N = 1000 only, at most 3 repeats (under a minute on 2 CPU cores)",
    )
    bench.add_argument(
        "--sizes",
        type=_size_list,
        default=[1_000, 10_000, 100_000],
        metavar="LIST",
        help="comma-separated grid sizes N (default: 1e3,1e4,1e5)",
    )
    bench.add_argument(
        "--dtypes",
        type=_choice_list(("float32", "float64"), "dtype"),
        default=["float32", "float64"],
        metavar="LIST",
        help="comma-separated dtypes: float32, float64 (default: both)",
    )
    bench.add_argument(
        "--float64",
        dest="dtypes",
        action="store_const",
        const=["float64"],
        help="float64 only (same as --dtypes float64)",
    )
    bench.add_argument(
        "--method",
        choices=list(METHODS),
        default="trapezoid",
        metavar="NAME",
        help="DeerSolver's discretisation (default: trapezoid; names as in `demo`)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="timed runs after compilation; the median is shown (default: 5)",
    )
    bench.add_argument(
        "--markdown",
        type=_writable_path,
        metavar="PATH",
        help="also write the Markdown table to PATH",
    )
    bench.add_argument(
        "--json",
        action="store_true",
        help="print the raw results as JSON instead of the table",
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top_level = {"-h", "--help", "--version"}
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in top_level):
        argv = ["demo", *argv]
    parser = build_parser()
    options = parser.parse_args(argv)

    # JAX is imported only from here on: keep `--help` and bad options fast.
    try:
        if options.command == "demo":
            if options.plot is not None:
                try:
                    import matplotlib  # noqa: F401
                except ImportError:
                    parser.error("--plot needs matplotlib: pip install matplotlib")
            from ._cli.demo import run_demo

            agrees = run_demo(
                num_steps=options.num_steps,
                float64=not options.float32,
                repeats=options.repeats,
                method=options.method,
                json_output=options.json,
                plot=options.plot,
            )
            return 0 if agrees else 1
        if options.command == "validate":
            from ._cli import validate as _cli_validate

            return _cli_validate.main(options)
        from ._cli import bench as _cli_bench

        command = shlex.join(["diffrax-deer", *argv])
        return _cli_bench.main(options, command)
    except OSError as error:  # e.g. an output file that cannot be written
        print(f"diffrax-deer: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffrax-deer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
