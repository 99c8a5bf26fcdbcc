"""Helpers shared by the benchmark scripts: timing, machine description, output."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    print(message, file=sys.stderr, flush=True)


def time_call(
    fn: Callable[..., Any], *args: Any, repeats: int
) -> tuple[Any, float, float | None]:
    """Times a jitted callable: the first call, then the median of `repeats` more.

    The first call includes tracing and compilation (and one run). Every call is
    followed by `jax.block_until_ready`, so asynchronous dispatch is not mistaken for
    speed. Returns `(output of the first call, first-call seconds, median seconds)`;
    the median is `None` when `repeats` is 0.
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, first, (statistics.median(times) if times else None)


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
        "platform_processor": platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "diffrax": diffrax.__version__,
        "equinox": eqx.__version__,
        "backend": jax.default_backend(),
        "device": f"{device.platform}: {device.device_kind}",
        "num_devices": jax.device_count(),
    }


def machine_header(info: dict[str, Any]) -> str:
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
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
