"""Sizes as operators type them ("2G") and read them ("2.0 GiB"); binary units, as qemu-img.

Pure and light, so the CLI can parse sizes without loading the storage machinery.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .errors import InvalidSpec

_MAX_IMAGE_SIZE = (1 << 63) - 1  # qemu-img keeps sizes in int64

# --- sizes -------------------------------------------------------------------------------------

_UNITS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from ``"4096"``, ``"100K"``, ``"512M"``, ``"1.5G"``, ``"10GiB"``, ``"2 TB"``.

    Units are binary, as in qemu-img (``G``, ``GB`` and ``GiB`` all mean 2**30), so a size typed
    here means what it means to QEMU.
    """
    hint = "use bytes or a number with K, M, G or T (binary units), e.g. 10G or 512M"
    m = _SIZE_RE.match(text) if isinstance(text, str) else None
    unit = m.group(2).lower() if m else ""
    if unit[:1] in ("k", "m", "g", "t", "p", "e") and unit[1:] in ("b", "ib"):
        unit = unit[0]  # "GiB", "GB" → "g"
    if m is None or unit not in _UNITS:
        raise InvalidSpec("size", f"{text!r} is not a size; {hint}")
    try:
        value = Decimal(m.group(1)) * (1 << (10 * _UNITS[unit]))
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise InvalidSpec("size", f"{text!r} is not a size; {hint}") from None
    if value != value.to_integral_value():
        raise InvalidSpec("size", f"{text!r} is not a whole number of bytes")
    n = int(value)
    if n <= 0:
        raise InvalidSpec("size", f"{text!r}: a size must be greater than zero")
    if n > _MAX_IMAGE_SIZE:
        raise InvalidSpec("size", f"{text!r} is larger than QEMU supports (8 EiB)")
    return n


def format_size(n: int) -> str:
    """``2147483648`` → ``"2.0 GiB"``; below 1 KiB, ``"512 B"``."""
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} EiB"
