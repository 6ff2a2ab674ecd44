"""LoRa radio model: time on air, link budget, collisions and duty cycle.

Pure functions and small state holders, no I/O: the switch's shaper calls them per frame, and the
``infrasim lora airtime`` calculator uses the same code so both always agree. Formulas follow
Semtech AN1200.13 and the SX1276 datasheet (section 4.1.1); the default link budget is the
log-distance fit used by FLoRa ("Do LoRa LPWANs scale?").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import InvalidSpec
from .model import LoraSpec

# Demodulator SNR floor in dB by spreading factor (SX1276 datasheet).
SNR_FLOOR_DB: dict[int, float] = {
    6: -5.0,
    7: -7.5,
    8: -10.0,
    9: -12.5,
    10: -15.0,
    11: -17.5,
    12: -20.0,
}

BANDWIDTHS_KHZ = (125, 250, 500)
LOW_DR_SYMBOL_MS = 16.0  # low-data-rate optimisation is mandatory above this symbol time

# The narrow SX1276 bandwidths are named by rounded values; the chip derives them from a 32 MHz
# crystal, so the exact value is what the time on air depends on.
_EXACT_BW_HZ: dict[float, float] = {
    7.8: 7812.5,
    10.4: 125_000 / 12,
    15.6: 15625.0,
    20.8: 125_000 / 6,
    31.25: 31250.0,
    41.7: 125_000 / 3,
    62.5: 62500.0,
}


def _bw_hz(bw_khz: float) -> float:
    if bw_khz <= 0:
        raise ValueError(f"bandwidth must be positive, got {bw_khz} kHz")
    return _EXACT_BW_HZ.get(bw_khz, bw_khz * 1000.0)


def symbol_time_s(sf: int, bw_khz: float) -> float:
    """``T_sym = 2^SF / BW``."""
    return float(2**sf) / _bw_hz(bw_khz)


def low_data_rate_optimize(sf: int, bw_khz: float) -> bool:
    """The automatic rule: on when a symbol lasts more than 16 ms (SF11/12 at 125 kHz, SF12 at
    250 kHz), as the SX1276 requires."""
    return symbol_time_s(sf, bw_khz) * 1000.0 > LOW_DR_SYMBOL_MS


def payload_symbols(payload_bytes: int, sf: int, bw_khz: float, coding_rate: int = 5,
                    implicit_header: bool = False, crc: bool = True,
                    low_dr_opt: bool | None = None) -> int:
    """Symbols after the preamble (header included), AN1200.13:
    ``8 + max(ceil((8PL - 4SF + 28 + 16CRC - 20IH) / (4(SF - 2DE))) * (CR + 4), 0)``."""
    if payload_bytes < 0:
        raise ValueError(f"payload must be >= 0 bytes, got {payload_bytes}")
    de = low_data_rate_optimize(sf, bw_khz) if low_dr_opt is None else low_dr_opt
    num = 8 * payload_bytes - 4 * sf + 28 + 16 * int(crc) - 20 * int(implicit_header)
    den = 4 * (sf - 2 * int(de))
    blocks = -(-num // den)  # integer ceil: exact, no float rounding at block boundaries
    return 8 + max(blocks * coding_rate, 0)  # coding_rate is N of 4/N, i.e. CR + 4


def airtime_s(payload_bytes: int, sf: int, bw_khz: float, coding_rate: int = 5,
              preamble: int = 8, implicit_header: bool = False, crc: bool = True,
              low_dr_opt: bool | None = None) -> float:
    """Time on air of one frame: ``(n_preamble + 4.25 + n_pay) * T_sym``; ``low_dr_opt`` None
    applies the automatic rule."""
    n_pay = payload_symbols(payload_bytes, sf, bw_khz, coding_rate, implicit_header, crc,
                            low_dr_opt)
    return (preamble + 4.25 + n_pay) * symbol_time_s(sf, bw_khz)


def airtime_for(spec: LoraSpec, payload_bytes: int) -> float:
    """Time on air of a ``payload_bytes`` frame sent with ``spec``'s modulation."""
    return airtime_s(payload_bytes, spec.spreading_factor, spec.bandwidth_khz, spec.coding_rate,
                     spec.preamble, spec.implicit_header, spec.crc)


def noise_floor_dbm(bw_khz: float, noise_figure_db: float = 6.0) -> float:
    """Thermal noise in the channel: ``-174 + 10 log10(BW) + NF``."""
    return -174.0 + 10.0 * math.log10(_bw_hz(bw_khz)) + noise_figure_db


def sensitivity_dbm(sf: int, bw_khz: float, noise_figure_db: float = 6.0) -> float:
    """Weakest decodable signal: the noise floor plus the SF's SNR floor."""
    return noise_floor_dbm(bw_khz, noise_figure_db) + SNR_FLOOR_DB[sf]


def mean_path_loss_db(spec: LoraSpec) -> float:
    """Log-distance path loss ``PL(d0) + 10 gamma log10(d / d0)`` without the shadowing term."""
    return spec.path_loss_d0_db + 10.0 * spec.path_loss_exponent * math.log10(
        spec.distance_m / spec.d0_m)


@dataclass(frozen=True)
class Reception:
    """How one frame arrived; ``received`` needs RSSI >= sensitivity and SNR >= the SF floor."""

    rssi_dbm: float
    snr_db: float
    sensitivity_dbm: float
    received: bool


def receive(spec: LoraSpec, rng: random.Random) -> Reception:
    """One frame over the link: path loss with a fresh shadowing draw ``X_sigma ~ N(0, sigma)``.

    With sigma 0 nothing is drawn from ``rng``, so a shadowing-free link is fully deterministic
    and leaves the caller's random stream untouched.
    """
    sigma = spec.shadowing_sigma_db
    shadowing = rng.gauss(0.0, sigma) if sigma > 0 else 0.0
    rssi = spec.tx_power_dbm - (mean_path_loss_db(spec) + shadowing)
    snr = rssi - noise_floor_dbm(spec.bandwidth_khz, spec.noise_figure_db)
    sens = sensitivity_dbm(spec.spreading_factor, spec.bandwidth_khz, spec.noise_figure_db)
    ok = rssi >= sens and snr >= SNR_FLOOR_DB[spec.spreading_factor]
    return Reception(rssi_dbm=rssi, snr_db=snr, sensitivity_dbm=sens, received=ok)


# --- validation ---------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _number(field: str, value: object, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> None:
    if not _is_num(value):
        raise InvalidSpec(field, f"must be a finite number, got {value!r}")
    assert isinstance(value, int | float)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidSpec(field, f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise InvalidSpec(field, f"must be <= {hi:g}, got {value:g}")


def validate_lora_spec(spec: LoraSpec, field: str = "lora") -> None:
    """Refuse a radio the model cannot simulate; the :class:`InvalidSpec` names the field as
    ``{field}.<name>`` so API and CLI errors point at the offending setting."""
    sf = spec.spreading_factor
    if not _is_int(sf) or sf not in SNR_FLOOR_DB:
        raise InvalidSpec(f"{field}.spreading_factor", f"must be 6..12, got {sf!r}")
    if spec.bandwidth_khz not in BANDWIDTHS_KHZ or isinstance(spec.bandwidth_khz, bool):
        raise InvalidSpec(f"{field}.bandwidth_khz",
                          f"must be 125, 250 or 500 kHz, got {spec.bandwidth_khz!r}")
    if not _is_int(spec.coding_rate) or not 5 <= spec.coding_rate <= 8:
        raise InvalidSpec(f"{field}.coding_rate",
                          f"is N of 4/N and must be 5..8, got {spec.coding_rate!r}")
    if not _is_int(spec.preamble) or not 6 <= spec.preamble <= 65535:
        raise InvalidSpec(f"{field}.preamble", f"must be 6..65535 symbols, got {spec.preamble!r}")
    for name in ("implicit_header", "crc"):
        if not isinstance(getattr(spec, name), bool):
            raise InvalidSpec(f"{field}.{name}", f"must be true or false, got "
                              f"{getattr(spec, name)!r}")
    if sf == 6 and not spec.implicit_header:
        raise InvalidSpec(f"{field}.implicit_header",
                          "SF6 only works with an implicit header; set implicit_header")
    _number(f"{field}.tx_power_dbm", spec.tx_power_dbm, -30.0, 30.0)
    _number(f"{field}.distance_m", spec.distance_m, 0.0, lo_open=True)
    _number(f"{field}.frequency_mhz", spec.frequency_mhz, 0.0, lo_open=True)
    _number(f"{field}.d0_m", spec.d0_m, 0.0, lo_open=True)
    _number(f"{field}.path_loss_d0_db", spec.path_loss_d0_db)
    _number(f"{field}.path_loss_exponent", spec.path_loss_exponent, 0.0, lo_open=True)
    _number(f"{field}.shadowing_sigma_db", spec.shadowing_sigma_db, 0.0)
    _number(f"{field}.noise_figure_db", spec.noise_figure_db, 0.0)
    _number(f"{field}.capture_db", spec.capture_db, 0.0)
    _number(f"{field}.duty_cycle_pct", spec.duty_cycle_pct, 0.0, 100.0)


# --- shared air and regional limits -------------------------------------------------------


@dataclass
class Transmission:
    """One frame on the air during ``[start, end)``; ``collided`` may be set by a later
    :meth:`Air.begin`, so read it once the frame has ended."""

    start: float
    end: float
    frequency_mhz: float
    sf: int
    rssi_dbm: float
    collided: bool = False
    frame: int = 0  # copies of one flooded frame (one transmission, several receivers)


def _channel(frequency_mhz: float, sf: int) -> tuple[float, int]:
    # Rounded to the hertz so 868.1 computed two ways still names one channel.
    return (round(frequency_mhz, 6), sf)


OVERLAP_EPS = 1e-6  # seconds: event-loop timers may fire a hair before a frame's end


class Air:
    """One collision domain (a segment): transmissions in flight per (frequency, SF).

    Different SFs are treated as orthogonal and different frequencies as separate channels, the
    usual simplification of FLoRa and ns-3's lorawan module.
    """

    def __init__(self) -> None:
        self._flying: dict[tuple[float, int], list[Transmission]] = {}

    def __len__(self) -> int:
        return sum(len(txs) for txs in self._flying.values())

    def begin(self, start: float, end: float, frequency_mhz: float, sf: int,
              rssi_dbm: float, capture_db: float = 6.0, frame: int = 0) -> Transmission:
        """Register a frame and settle its overlaps: a frame at least ``capture_db`` stronger
        than another survives it (capture effect) and only the weaker one is lost; closer
        powers lose both. A lost frame still interferes with later ones. Copies of one frame
        (the same non-zero ``frame``, e.g. a broadcast heard by several radios) never collide
        with each other."""
        tx = Transmission(start, end, frequency_mhz, sf, rssi_dbm, frame=frame)
        same = self._flying.setdefault(_channel(frequency_mhz, sf), [])
        for other in same:
            if not (other.start < end - OVERLAP_EPS and start < other.end - OVERLAP_EPS):
                continue  # back to back (within timer precision) is not an overlap
            if frame and other.frame == frame:
                continue
            if rssi_dbm - other.rssi_dbm >= capture_db:
                other.collided = True
            elif other.rssi_dbm - rssi_dbm >= capture_db:
                tx.collided = True
            else:
                other.collided = True
                tx.collided = True
        same.append(tx)
        return tx

    def prune(self, now: float) -> None:
        """Forget transmissions that ended before ``now``; they can no longer overlap."""
        for key in list(self._flying):
            kept = [tx for tx in self._flying[key] if tx.end >= now]
            if kept:
                self._flying[key] = kept
            else:
                del self._flying[key]


class DutyCycle:
    """Regional duty cycle of one sender: after a frame of airtime T the radio stays off for
    T * (100 / pct - 1)."""

    def __init__(self, pct: float) -> None:
        if not 0.0 <= pct <= 100.0:
            raise ValueError(f"duty cycle must be 0..100 %, got {pct}")
        self.pct = pct  # 0 = unlimited
        self.next_allowed = -math.inf

    def allows(self, now: float) -> bool:
        return self.pct == 0.0 or now >= self.next_allowed

    def record(self, start: float, airtime: float) -> None:
        """Account a frame sent at ``start``; the off time counts from the frame's end."""
        if self.pct == 0.0:
            return
        end = start + airtime
        self.next_allowed = max(self.next_allowed, end + airtime * (100.0 / self.pct - 1.0))
