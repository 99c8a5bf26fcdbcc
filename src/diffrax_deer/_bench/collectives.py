"""The collective operations in a compiled XLA program, read from its HLO text.

`jax.jit(f).lower(*args).compile().as_text()` is the program after SPMD
partitioning: every transfer between devices is one of the collective instructions
below, and its result shape says how much data it delivers to each device.
"""

import collections
import dataclasses
import math
import re

import numpy as np


COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)

_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
# A computation's header starts in the first column and opens a brace.
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+)\b.*\{\s*$")
_INSTRUCTION = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLED = re.compile(
    r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)
_WHILE_BODY = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")


def _array_bytes(shape_text: str) -> int:
    # The last array of a result shape: for an async `-start` the result tuple holds
    # the operand first and the delivered array last.
    arrays = _ARRAY.findall(shape_text)
    if not arrays:
        return 0
    dtype, dims = arrays[-1]
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    return size * _BYTES[dtype]


@dataclasses.dataclass
class Traffic:
    """Collective instructions and the bytes their results deliver to one device,
    per kind of collective."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, other: "Traffic") -> None:
        self.counts.update(other.counts)
        self.bytes.update(other.bytes)

    @property
    def total_count(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line[:1].isspace():
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def _called(line: str) -> list[str]:
    names = []
    for single, many in _CALLED.findall(line):
        if single:
            names.append(single)
        else:
            names.extend(n.strip().lstrip("%") for n in many.split(",") if n.strip())
    return names


def collective_traffic(hlo_text: str) -> tuple[Traffic, list[Traffic]]:
    """The collectives of a compiled program: in total (each instruction counted
    once, wherever it is), and those of each outermost while loop's body
    (everything a single iteration runs, nested loops' bodies counted once).

    **Arguments:**

    - `hlo_text`: `compiled.as_text()` of a `jax.jit(...).lower(...).compile()`.

    **Returns:**

    The total [`Traffic`][], and one per outermost loop, in program order.
    """
    computations, entry = _computations(hlo_text)
    own = {}
    for name, lines in computations.items():
        traffic = Traffic()
        for line in lines:
            match = _INSTRUCTION.search(line)
            if match:
                kind = match.group(2)
                traffic.counts[kind] += 1
                traffic.bytes[kind] += _array_bytes(match.group(1))
        own[name] = traffic

    def reachable(name: str, seen: set[str]) -> Traffic:
        traffic = Traffic()
        if name in seen or name not in computations:
            return traffic
        seen.add(name)
        traffic.add(own[name])
        for line in computations[name]:
            for called in _called(line):
                traffic.add(reachable(called, seen))
        return traffic

    total = Traffic()
    for traffic in own.values():
        total.add(traffic)
    loops = []

    def outer_loops(name: str, seen: set[str]) -> None:
        if name in seen or name not in computations:
            return
        seen.add(name)
        for line in computations[name]:
            body = _WHILE_BODY.search(line)
            if body:
                loops.append(reachable(body.group(1), set()))
            else:
                for called in _called(line):
                    outer_loops(called, seen)

    if entry is not None:
        outer_loops(entry, set())
    return total, loops


def describe(traffic: Traffic) -> str:
    """`3 all-gather (1.2 kB), 1 collective-permute (24 B)`."""
    parts = []
    for kind in COLLECTIVES:
        if traffic.counts[kind]:
            parts.append(
                f"{traffic.counts[kind]} {kind} ({_format_bytes(traffic.bytes[kind])})"
            )
    return ", ".join(parts) or "none"


def _format_bytes(num: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if num >= scale:
            return f"{num / scale:.1f} {unit}"
    return f"{int(np.round(num))} B"
