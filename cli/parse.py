"""Parsers of command-line values: sizes ("500MB", "2GiB", "50x", "2%") and lists."""

from __future__ import annotations

import re

from lorazip.errors import OptionError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, original_bytes: int | None = None, what: str = "budget") -> int:
    """Bytes from ``"500MB"``, ``"1.5GiB"``, ``"123456"``, a ratio ``"50x"`` of ``original_bytes`` or a
    share ``"2%"`` of them (``what`` names the quantity in error messages)."""
    t = text.strip().upper().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(X|%)", t)
    if m:
        kind = "ratio" if m.group(2) == "X" else "percentage"
        if not original_bytes:
            raise OptionError(f"{what} {text!r} is a {kind} but the original size is unknown")
        value = float(m.group(1))
        if value <= 0:
            raise OptionError(f"{what} {kind} must be positive, got {text!r}")
        return int(original_bytes / value) if kind == "ratio" else int(original_bytes * value / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]I?B|B)?", t)
    if not m:
        raise OptionError(
            f"cannot read {what} {text!r}: use bytes like 500MB / 2GiB" + (", a ratio like 50x or a share like 2%" if original_bytes else "")
        )
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (CLI helper); one clear OptionError otherwise."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise OptionError(f"{what} must be a comma-separated list of positive whole numbers, got {text!r}")
    values = sorted({int(p) for p in parts})
    if values[0] < 1:
        raise OptionError(f"{what} must be positive whole numbers, got {text!r}")
    return values
