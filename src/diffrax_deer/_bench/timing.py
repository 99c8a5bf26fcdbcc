"""Timing, the machine description and the tables: one copy for every benchmark.

Every timed call ends in `jax.block_until_ready`, so asynchronous dispatch is not
mistaken for speed. The first call of a jitted function is its compile time (trace,
compile and one run); the run time is the median of later calls. Contenders are
timed *interleaved* in one process: after each one's first call, `repeats` rounds
call every contender once in turn, so a change in machine load hits them all
alike. (pytest-benchmark was considered and does not fit: it times one function
per test in consecutive rounds, so contenders cannot share rounds, and it needs
pytest, which the command line's `bench` cannot depend on. The standard library's
`statistics` does the rest.)
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Timing:
    """What timing one contender measured.

    - `output`: the first call's output.
    - `compile_s`: seconds of the first call (trace + compile + one run).
    - `times_s`: seconds of each later call.
    """

    output: Any
    compile_s: float
    times_s: list[float]

    @property
    def run_s(self) -> float | None:
        """The median of the later calls; `None` when there were none."""
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def min_s(self) -> float | None:
        """The fastest later call (load only ever adds time)."""
        return min(self.times_s) if self.times_s else None


def first_call(fn: Callable[[], Any]) -> Timing:
    """Times the first call of `fn` (its compile time); no later calls yet."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return Timing(out, time.perf_counter() - start, [])


def time_rounds(
    calls: Mapping[str, Callable[[], Any]],
    timings: Mapping[str, Timing],
    repeats: int,
) -> None:
    """`repeats` rounds, each calling every contender of `calls` once in turn,
    appending each call's seconds to that contender's `timings[name].times_s`."""
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            timings[name].times_s.append(time.perf_counter() - start)


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], repeats: int
) -> dict[str, Timing]:
    """Times several contenders in one process.

    Each contender's first call is timed on its own (its compile time); then
    `repeats` rounds call every contender once, in turn. Returns a `Timing` per name.
    """
    timings = {name: first_call(fn) for name, fn in calls.items()}
    time_rounds(calls, timings, repeats)
    return timings


def time_call(fn: Callable[..., Any], *args: Any, repeats: int) -> Timing:
    """Times one jitted callable: its first call, then `repeats` more."""
    return time_interleaved({"": lambda: fn(*args)}, repeats)[""]


_RESULT_NAMES = (
    "successful",
    "max_steps_reached",
    "nonlinear_max_steps_reached",
    "nonlinear_divergence",
    "dt_min_reached",
    "singular",
    "breakdown",
    "stagnation",
)


def result_name(result) -> str:
    """A short name for a `diffrax.RESULTS` item, e.g. `nonlinear_divergence`."""
    for name in _RESULT_NAMES:
        item = getattr(diffrax.RESULTS, name, None)
        if item is not None and bool(result == item):
            return name
    return diffrax.RESULTS[result] or "unknown"


def cpu_model() -> str:
    """The CPU's model name: `lscpu`, then /proc/cpuinfo, then `platform`."""
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        for line in text.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "diffrax": diffrax.__version__,
        "equinox": eqx.__version__,
        "backend": jax.default_backend(),
        "device": f"{device.platform}: {device.device_kind}",
        "num_devices": jax.device_count(),
    }


def machine_header(info: Mapping[str, Any]) -> str:
    """A Markdown paragraph naming the machine and the library versions."""
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores; "
        f"JAX {info['jax']} (backend `{info['backend']}`, device "
        f"`{info['device']}`), diffrax {info['diffrax']}, equinox "
        f"{info['equinox']}, Python {info['python']}."
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    progress(f"wrote {path}")


def write_json(path: str, data: Any) -> None:
    write_text(path, to_json(data) + "\n")


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_error(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio >= 1 else f"{ratio:.2g}x"


def fmt_count(count: int) -> str:
    """`1000` as `1e3` (powers of ten only; anything else as it is)."""
    text = f"{count:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if count >= 10 and float(text) == count else str(count)


# --------------------------------------------------------------------------------------
# The benchmark scripts' common command line: lists, output files, the command.
# --------------------------------------------------------------------------------------


def parse_list(text: str, kind: Callable[[str], Any]) -> list[Any]:
    """A comma-separated list, e.g. `"1e3,1e4"` with `kind=parse_count`."""
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_count(text: str) -> int:
    """An integer, also written as `1e4`."""
    return int(float(text)) if "e" in text.lower() else int(text)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown table")
    parser.add_argument("--json", metavar="PATH", help="write the raw results")


def emit(markdown: str, data: Any, options: argparse.Namespace) -> None:
    """Prints the Markdown on stdout and writes the files `--markdown`/`--json` ask
    for (`add_output_options`)."""
    print(markdown)
    if options.markdown:
        write_text(options.markdown, markdown)
    if options.json:
        write_json(options.json, data)


def script_command(script: str) -> str:
    """How this script was run, for the table's header."""
    return " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])
