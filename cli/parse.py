"""Parsers of command-line values: sizes ("500MB", "2GiB", "50x") and lists."""

from __future__ import annotations

import re

from lorazip.errors import OptionError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, original_bytes: int | None = None, what: str = "budget") -> int:
    """Bytes from ``"500MB"``, ``"1.5GiB"``, ``"123456"`` or a ratio ``"50x"`` of ``original_bytes``
    (``what`` names the quantity in error messages)."""
    t = text.strip().upper().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)X", t)
    if m:
        if not original_bytes:
            raise OptionError(f"{what} {text!r} is a ratio but the original size is unknown")
        ratio = float(m.group(1))
        if ratio <= 0:
            raise OptionError(f"{what} ratio must be positive, got {text!r}")
        return int(original_bytes / ratio)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]I?B|B)?", t)
    if not m:
        raise OptionError(
            f"cannot read {what} {text!r}: use bytes like 500MB / 2GiB" + (", or a ratio like 50x" if original_bytes else "")
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
