"""Rates, sizes, times and percentages as ``tc`` users type them, for the QoS commands.

Pure: each parser returns the model's unit (bit/s, bytes, milliseconds, percent) or raises
InvalidSpec naming the command-line flag, so a typo is reported against what was typed. The
units follow tc(8): rates are SI (``kbit`` = 1000 bit/s) and ``bps`` is *bytes* per second;
sizes are binary (``kb`` = ``kib`` = 1024 bytes, as tc and qemu-img read them).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from .core.errors import InvalidSpec

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_VALUE_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-zA-Z/%]*)\s*$")

# tc(8) RATES: bit or a bare number is bit/s; bps is bytes/s; SI prefixes, IEC with "i".
_RATE_UNITS: dict[str, int] = {"bit": 1, "bps": 8}
for _i, _p in enumerate(("k", "m", "g", "t"), start=1):
    _RATE_UNITS[f"{_p}bit"] = 1000**_i
    _RATE_UNITS[f"{_p}ibit"] = 1024**_i
    _RATE_UNITS[f"{_p}bps"] = 8 * 1000**_i
    _RATE_UNITS[f"{_p}ibps"] = 8 * 1024**_i
RATE_HINT = ("use tc units: bit, kbit, mbit, gbit (bits/s, SI) or bps, kbps, mbps (BYTES/s), "
             "e.g. 8mbit; 0 for unlimited")

_SIZE_UNITS: dict[str, int] = {"b": 1}
for _i, _p in enumerate(("k", "m", "g"), start=1):
    for _suffix in ("", "b", "ib"):
        _SIZE_UNITS[f"{_p}{_suffix}"] = 1024**_i
SIZE_HINT = "use b, kb, mb, gb (binary: kb = kib = 1024 bytes), e.g. 32kb; 0 for the default"

_TIME_UNITS: dict[str, Decimal] = {
    "us": Decimal("0.001"), "usec": Decimal("0.001"),
    "ms": Decimal(1), "msec": Decimal(1),
    "s": Decimal(1000), "sec": Decimal(1000), "secs": Decimal(1000),
}
TIME_HINT = "use us, ms or s, e.g. 40ms"

_DISTANCE_UNITS: dict[str, Decimal] = {"m": Decimal(1), "km": Decimal(1000)}


def _split(text: str, flag: str, hint: str) -> tuple[Decimal, str]:
    m = _VALUE_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidSpec(flag, f"{text!r} is not a number with a unit; {hint}")
    try:
        return Decimal(m.group(1)), m.group(2).lower()
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise InvalidSpec(flag, f"{text!r} is not a number; {hint}") from None


def parse_rate(text: str, flag: str = "--rate") -> int:
    """Bits per second from ``"8mbit"``, ``"1.5gbit"``, ``"500kbit"``, ``"1mbps"`` (= 8 Mbit/s),
    ``"100000"`` (bit/s, as tc reads a bare number) or ``"0"`` (unlimited)."""
    value, unit = _split(text, flag, RATE_HINT)
    factor = _RATE_UNITS.get(unit or "bit")
    if factor is None:
        raise InvalidSpec(flag, f"{text!r}: unknown rate unit {unit!r}; {RATE_HINT}")
    bps = value * factor
    if bps != bps.to_integral_value():
        raise InvalidSpec(flag, f"{text!r} is not a whole number of bits per second")
    return int(bps)


def parse_size(text: str, flag: str) -> int:
    """Bytes from ``"32kb"``, ``"64KiB"``, ``"1.5mb"``, ``"1514"`` (bytes) or ``"0"``."""
    value, unit = _split(text, flag, SIZE_HINT)
    factor = _SIZE_UNITS.get(unit or "b")
    if factor is None:
        raise InvalidSpec(flag, f"{text!r}: unknown size unit {unit!r}; {SIZE_HINT}")
    n = value * factor
    if n != n.to_integral_value():
        raise InvalidSpec(flag, f"{text!r} is not a whole number of bytes")
    return int(n)


def parse_time_ms(text: str, flag: str) -> float:
    """Milliseconds from ``"40ms"``, ``"250us"``, ``"1.5s"`` or ``"0"``; other bare numbers are
    refused (tc would read them as microseconds, people as milliseconds)."""
    value, unit = _split(text, flag, TIME_HINT)
    if not unit:
        if value == 0:
            return 0.0
        raise InvalidSpec(flag, f"{text!r} has no unit; {TIME_HINT}")
    factor = _TIME_UNITS.get(unit)
    if factor is None:
        raise InvalidSpec(flag, f"{text!r}: unknown time unit {unit!r}; {TIME_HINT}")
    return float(value * factor)


def parse_pct(text: str, flag: str) -> float:
    """A percentage from ``"1%"`` or ``"0.1%"`` (0..100). The ``%`` is required: ``0.01``
    could mean 0.01 % or 1 %, and guessing wrong changes the loss a hundredfold."""
    value, unit = _split(text, flag, "e.g. 1% or 0.1%")
    if unit != "%":
        raise InvalidSpec(flag, f"{text!r}: give a percentage with %, e.g. 1% or 0.1%")
    if value > 100:
        raise InvalidSpec(flag, f"{text!r}: a percentage is at most 100%")
    return float(value)


def parse_loss(text: str, flag: str = "--loss") -> dict[str, float]:
    """The loss fields of a QoS spec from ``"1%"`` (random loss) or netem's Gilbert-Elliott
    model ``"gemodel:P,R[,1-H[,1-K]]"`` (each a percentage, e.g. ``gemodel:1%,30%``); the
    result sets every loss field, so switching between the two models leaves nothing behind."""
    text = text.strip()
    if not text.lower().startswith("gemodel"):
        return {"loss_pct": parse_pct(text, flag), "ge_p_pct": 0.0, "ge_r_pct": 100.0,
                "ge_bad_loss_pct": 100.0, "ge_good_loss_pct": 0.0}
    _, sep, rest = text.partition(":")
    parts = rest.split(",") if sep else []
    if not 2 <= len(parts) <= 4:
        raise InvalidSpec(flag, f"{text!r}: expected gemodel:P,R[,1-H[,1-K]] with percentages, "
                          "e.g. gemodel:1%,30% (P: good->bad, R: bad->good, 1-H: loss while "
                          "bad, default 100%, 1-K: loss while good, default 0%)")
    names = ("P", "R", "1-H", "1-K")
    values = [parse_pct(p, f"{flag} ({names[i]})") for i, p in enumerate(parts)]
    values += [100.0, 0.0][len(values) - 2:]
    p, r, bad, good = values
    if p <= 0:
        raise InvalidSpec(flag, f"{text!r}: P (good->bad) must be above 0% for the model to act")
    if r <= 0:
        raise InvalidSpec(flag, f"{text!r}: R (bad->good) must be above 0%, or the link never "
                          "recovers")
    return {"loss_pct": 0.0, "ge_p_pct": p, "ge_r_pct": r, "ge_bad_loss_pct": bad,
            "ge_good_loss_pct": good}


def parse_distance_m(text: str, flag: str = "--lora-distance") -> float:
    """Metres from ``"2km"``, ``"500m"`` or ``"750"`` (metres)."""
    value, unit = _split(text, flag, "e.g. 2km or 500m")
    factor = _DISTANCE_UNITS.get(unit or "m")
    if factor is None:
        raise InvalidSpec(flag, f"{text!r}: unknown distance unit {unit!r}; use m or km")
    return float(value * factor)


def parse_number(text: str, flag: str, unit: str = "", *, signed: bool = False) -> float:
    """A plain number, optionally followed by ``unit`` (``"14"``, ``"14dBm"``, ``"-3db"``)."""
    raw = text.strip()
    negative = signed and raw.startswith("-")
    value, got = _split(raw[1:] if negative else raw, flag,
                        f"e.g. 14{unit}" if unit else "a number")
    if got and got != unit.lower():
        raise InvalidSpec(flag, f"{text!r}: expected a number" + (f" in {unit}" if unit else ""))
    return float(-value if negative else value)


def parse_int(text: str, flag: str) -> int:
    value = parse_number(text, flag)
    if not value.is_integer():
        raise InvalidSpec(flag, f"{text!r} is not a whole number")
    return int(value)


def parse_coding_rate(text: str, flag: str = "--lora-cr") -> int:
    """N of the coding rate 4/N from ``"4/5"`` … ``"4/8"`` (or just ``"5"``)."""
    raw = text.strip()
    num, sep, den = raw.partition("/")
    if (sep and num.strip() != "4") or not (den if sep else num).strip().isdigit():
        raise InvalidSpec(flag, f"{text!r}: give the coding rate as 4/5, 4/6, 4/7 or 4/8")
    n = int(den if sep else num)
    if not 5 <= n <= 8:
        raise InvalidSpec(flag, f"{text!r}: the coding rate is 4/5, 4/6, 4/7 or 4/8")
    return n


def parse_int_unit(text: str, flag: str, unit: str) -> int:
    """A whole number, optionally followed by ``unit`` (``"125"``, ``"125kHz"``)."""
    value = parse_number(text, flag, unit)
    if not value.is_integer():
        raise InvalidSpec(flag, f"{text!r} is not a whole number")
    return int(value)


# --- formatting --------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)


def format_rate(bps: float) -> str:
    """``8000000`` → ``"8 Mbit/s"`` (SI, as tc and every link speed)."""
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if abs(bps) >= factor:
            return f"{_num(bps / factor)} {unit}"
    return f"{_num(bps)} bit/s"


def format_bytes(n: int) -> str:
    """``32768`` → ``"32 KiB"``; ``1514`` → ``"1.5 KiB"``; ``1000`` → ``"1000 B"``."""
    for factor, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= factor:
            return f"{_num(round(n / factor, 1))} {unit}"
    return f"{n} B"


def format_ms(ms: float) -> str:
    """``40.0`` → ``"40 ms"``; ``0.25`` → ``"250 us"``; ``1500`` → ``"1.5 s"``."""
    if ms and abs(ms) < 1:
        return f"{_num(ms * 1000)} us"
    if abs(ms) >= 1000:
        return f"{_num(ms / 1000)} s"
    return f"{_num(ms)} ms"


def format_pct(pct: float) -> str:
    return f"{_num(pct)}%"


def format_num(value: float) -> str:
    """``14.0`` → ``"14"``; ``2.08`` → ``"2.08"`` (at most 3 decimals)."""
    return _num(value)


def format_distance(m: float) -> str:
    """``2000`` → ``"2 km"``; ``40`` → ``"40 m"``."""
    return f"{_num(m / 1000)} km" if abs(m) >= 1000 else f"{_num(m)} m"
