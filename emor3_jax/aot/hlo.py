"""What XLA's compile errors say: the line worth showing, and the temporaries an
out-of-memory error names (the knob search extrapolates from them)."""
from __future__ import annotations

import re

from emor3_jax.aot.chips import GiB

_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40, "P": 1 << 50}


def error_line(e: Exception) -> str:
    """The line of a compile error that says what went wrong (out of memory first)."""
    text = str(e).strip()
    for line in text.splitlines():
        if "RESOURCE_EXHAUSTED" in line or "memory" in line.lower():
            return line.strip()[:400]
    return (text.splitlines() or [type(e).__name__])[0][:400]


def required_temp_bytes(error: str) -> float | None:
    """The bytes of HLO temporaries an out-of-memory error says it needed (None: not one)."""
    m = _REQUIRED.search(error)
    return None if m is None else float(m.group(1)) * _UNITS[m.group(2)]
