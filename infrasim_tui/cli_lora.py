"""``infrasim lora airtime``: the LoRa time-on-air calculator.

Runs locally (no daemon) on the same :mod:`infrasim_tui.core.lora` code the switch's shaper uses,
so an operator can check what a QoS profile's radio settings will cost per frame.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from .core.errors import InvalidSpec
from .core.lora import (
    airtime_for,
    low_data_rate_optimize,
    payload_symbols,
    symbol_time_s,
    validate_lora_spec,
)
from .core.model import LoraSpec

LORA_PHY_MAX_PAYLOAD = 255

# LoraSpec field -> the flag an operator typed, so errors name what they can fix.
_FLAGS = {
    "spreading_factor": "--sf",
    "bandwidth_khz": "--bw",
    "coding_rate": "--cr",
    "preamble": "--preamble",
    "implicit_header": "--implicit-header",
    "crc": "--no-crc",
}


def _coding_rate(text: str) -> int:
    """``4/5`` .. ``4/8`` (a bare ``5`` .. ``8`` is accepted too) → N."""
    m = re.fullmatch(r"\s*(?:4\s*/\s*)?(\d+)\s*", text)
    if not m or not 5 <= int(m.group(1)) <= 8:
        raise InvalidSpec("--cr", f"{text!r}: expected a coding rate 4/5, 4/6, 4/7 or 4/8")
    return int(m.group(1))


def _bandwidth(value: float) -> int:
    if value not in (125, 250, 500):
        raise InvalidSpec("--bw", f"{value:g}: expected 125, 250 or 500 (kHz)")
    return int(value)


def _spec(args: argparse.Namespace) -> LoraSpec:
    spec = LoraSpec(spreading_factor=args.sf, bandwidth_khz=_bandwidth(args.bw),
                    coding_rate=_coding_rate(args.cr), preamble=args.preamble,
                    implicit_header=args.implicit_header, crc=not args.no_crc)
    try:
        validate_lora_spec(spec, "lora")
    except InvalidSpec as exc:
        name = exc.field.removeprefix("lora.")
        raise InvalidSpec(_FLAGS.get(name, name), exc.reason) from None
    return spec


async def cmd_lora_airtime(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.payload < 0:
        raise InvalidSpec("--payload", f"{args.payload}: must be >= 0 bytes")
    airtime = airtime_for(spec, args.payload)
    t_sym = symbol_time_s(spec.spreading_factor, spec.bandwidth_khz)
    de = low_data_rate_optimize(spec.spreading_factor, spec.bandwidth_khz)
    n_pay = payload_symbols(args.payload, spec.spreading_factor, spec.bandwidth_khz,
                            spec.coding_rate, spec.implicit_header, spec.crc)
    data: dict[str, Any] = {
        "airtime_ms": round(airtime * 1000, 6),
        "symbol_time_ms": round(t_sym * 1000, 6),
        "preamble_ms": round((spec.preamble + 4.25) * t_sym * 1000, 6),
        "payload_symbols": n_pay,
        "low_data_rate_optimize": de,
        "spreading_factor": spec.spreading_factor,
        "bandwidth_khz": spec.bandwidth_khz,
        "coding_rate": f"4/{spec.coding_rate}",
        "preamble": spec.preamble,
        "implicit_header": spec.implicit_header,
        "crc": spec.crc,
        "payload_bytes": args.payload,
    }
    if getattr(args, "output", "table") == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"{airtime * 1000:.3f} ms")
    print(f"symbol time {t_sym * 1000:.3f} ms, preamble {spec.preamble} + 4.25 symbols, "
          f"payload {n_pay} symbols, low data rate optimisation {'on' if de else 'off'}")
    if args.payload > LORA_PHY_MAX_PAYLOAD:
        print(f"note: {args.payload} bytes is above the {LORA_PHY_MAX_PAYLOAD}-byte LoRa PHY "
              "maximum")
    return 0


def add_lora_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      common: argparse.ArgumentParser) -> None:
    """Add ``lora airtime`` to the ``infrasim`` parser."""
    lora = sub.add_parser("lora", help="LoRa radio calculators").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    at = lora.add_parser("airtime", parents=[common],
                         help="time on air of one LoRa frame (Semtech AN1200.13)")
    at.add_argument("--sf", type=int, required=True, help="spreading factor 6..12")
    at.add_argument("--bw", type=float, default=125.0, help="bandwidth in kHz: 125, 250, 500")
    at.add_argument("--cr", default="4/5", help="coding rate 4/5..4/8")
    at.add_argument("--payload", type=int, required=True, help="payload bytes")
    at.add_argument("--preamble", type=int, default=8, help="preamble symbols (default 8)")
    at.add_argument("--implicit-header", action="store_true",
                    help="no PHY header (required for SF6)")
    at.add_argument("--no-crc", action="store_true", help="no payload CRC")
    at.set_defaults(func=cmd_lora_airtime)
