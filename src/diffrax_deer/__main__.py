"""Command line: `python -m diffrax_deer` (or `diffrax-deer`)."""

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffrax-deer",
        description=(
            "Solve a NeuralODE-style problem with DeerSolver (DEER: Newton over the "
            "whole time grid with a parallel scan) and with diffrax's Tsit5, and "
            "compare error and speed."
        ),
    )
    subcommands = parser.add_subparsers(dest="command")
    demo = subcommands.add_parser(
        "demo", help="compare DeerSolver with Tsit5 on an MLP vector field (default)"
    )
    for sub in (parser, demo):
        sub.add_argument(
            "--num-steps",
            type=_positive_int,
            default=10_000,
            help="intervals in DeerSolver's window and Tsit5 fixed steps "
            "(default: 10000)",
        )
        sub.add_argument(
            "--float32",
            action="store_true",
            help="solve in float32 (default: float64)",
        )
        sub.add_argument(
            "--repeats",
            type=_positive_int,
            default=5,
            help="timed runs after compilation; the median is shown (default: 5)",
        )
    options = parser.parse_args(argv)

    from ._demo import run_demo  # imports JAX: keep `--help` fast

    agrees = run_demo(
        num_steps=options.num_steps,
        float64=not options.float32,
        repeats=options.repeats,
    )
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
