"""The LoRa radio model (time on air, link budget, collisions, duty cycle) and the
``infrasim lora airtime`` calculator, checked against Semtech's published vectors and against
values derived by hand from AN1200.13 (derivations in the comments)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import sys

import pytest

from infrasim_tui.cli_lora import add_lora_commands
from infrasim_tui.core.errors import InfraSimError, InvalidSpec
from infrasim_tui.core.lora import (
    SNR_FLOOR_DB,
    Air,
    DutyCycle,
    airtime_for,
    airtime_s,
    low_data_rate_optimize,
    mean_path_loss_db,
    noise_floor_dbm,
    payload_symbols,
    receive,
    sensitivity_dbm,
    symbol_time_s,
    validate_lora_spec,
)
from infrasim_tui.core.model import LoraSpec

US = 1e-6

# --- time on air --------------------------------------------------------------------------

# Semtech's table: BW 125 kHz, CR 4/5, preamble 8, explicit header, CRC on (milliseconds).
TOA_TABLE_MS = {
    13: {7: 46.336, 8: 82.432, 9: 164.864, 10: 288.768, 11: 577.536, 12: 1155.072},
    20: {7: 56.576, 8: 102.912, 9: 185.344, 10: 370.688, 11: 741.376, 12: 1318.912},
    51: {7: 102.656, 8: 184.832, 9: 328.704, 10: 616.448, 11: 1314.816, 12: 2465.792},
}


@pytest.mark.parametrize(("payload", "sf"),
                         [(p, sf) for p, row in TOA_TABLE_MS.items() for sf in row])
def test_toa_table(payload: int, sf: int) -> None:
    got = airtime_s(payload, sf, 125)
    assert abs(got - TOA_TABLE_MS[payload][sf] / 1000) < US, got


@pytest.mark.parametrize(
    ("kwargs", "want_ms"),
    [
        # SF7 BW250 20 B: T_sym 0.512 ms; (160-28+28+16)=176, /28 -> 7 blocks * 5 = 35,
        # n_pay 43; (12.25 + 43) * 0.512
        ({"payload_bytes": 20, "sf": 7, "bw_khz": 250}, 28.288),
        # SF9 BW500 CR4/8 51 B: T_sym 1.024 ms; (408-36+44)=416, /36 -> 12 * 8 = 96, n_pay 104;
        # (12.25 + 104) * 1.024
        ({"payload_bytes": 51, "sf": 9, "bw_khz": 500, "coding_rate": 8}, 119.04),
        # SF7 13 B implicit header: (104-28+44-20)=100, /28 -> 4 * 5 = 20, n_pay 28
        ({"payload_bytes": 13, "sf": 7, "bw_khz": 125, "implicit_header": True}, 41.216),
        # SF7 20 B no CRC: (160-28+28)=160, /28 -> 6 * 5 = 30, n_pay 38
        ({"payload_bytes": 20, "sf": 7, "bw_khz": 125, "crc": False}, 51.456),
        # SF6 10 B implicit: T_sym 0.512 ms; (80-24+44-20)=80, /24 -> 4 * 5 = 20, n_pay 28
        ({"payload_bytes": 10, "sf": 6, "bw_khz": 125, "implicit_header": True}, 20.608),
        # SF12 BW250 (DE on automatically): T_sym 16.384 ms; (104-48+44)=100, /40 -> 3 * 5 = 15
        ({"payload_bytes": 13, "sf": 12, "bw_khz": 250}, 577.536),
        # empty payload: 16/28 -> 1 * 5 = 5, n_pay 13; (12.25 + 13) * 1.024
        ({"payload_bytes": 0, "sf": 7, "bw_khz": 125}, 25.856),
        # empty, implicit, no CRC: ceil(-20/28) = 0 -> n_pay 8 only
        ({"payload_bytes": 0, "sf": 7, "bw_khz": 125, "implicit_header": True, "crc": False},
         20.736),
        # preamble 16: (20.25 + 33) * 1.024
        ({"payload_bytes": 13, "sf": 7, "bw_khz": 125, "preamble": 16}, 54.528),
        # DE forced on at SF7: 120/20 -> 6 * 5 = 30, n_pay 38
        ({"payload_bytes": 13, "sf": 7, "bw_khz": 125, "low_dr_opt": True}, 51.456),
        # DE forced off at SF12/125, 51 B: 404/48 -> 9 * 5 = 45, n_pay 53; 65.25 * 32.768
        ({"payload_bytes": 51, "sf": 12, "bw_khz": 125, "low_dr_opt": False}, 2138.112),
    ],
)
def test_toa_hand_vectors(kwargs: dict[str, object], want_ms: float) -> None:
    got = airtime_s(**kwargs)  # type: ignore[arg-type]
    assert abs(got - want_ms / 1000) < US, (got, want_ms)


def test_payload_symbols_and_symbol_time() -> None:
    assert payload_symbols(13, 7, 125) == 33
    assert payload_symbols(51, 12, 125) == 63
    assert symbol_time_s(7, 125) == pytest.approx(1.024e-3, abs=1e-12)
    assert symbol_time_s(12, 500) == pytest.approx(8.192e-3, abs=1e-12)
    # Nominal 7.8 kHz is 7812.5 Hz on the chip: SF7 symbol = 128 / 7812.5 = 16.384 ms exactly.
    assert symbol_time_s(7, 7.8) == pytest.approx(16.384e-3, abs=1e-12)


def test_airtime_for_uses_the_spec() -> None:
    spec = LoraSpec(spreading_factor=9, bandwidth_khz=500, coding_rate=8)
    assert abs(airtime_for(spec, 51) - 0.11904) < US
    spec = dataclasses.replace(spec, preamble=16)  # 8 more symbols of 1.024 ms
    assert abs(airtime_for(spec, 51) - (0.11904 + 8 * 1.024e-3)) < US


def test_airtime_grows_with_payload() -> None:
    times = [airtime_s(n, 9, 125) for n in range(0, 256)]
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert times[-1] > times[0]


def test_negative_payload_rejected() -> None:
    with pytest.raises(ValueError):
        airtime_s(-1, 7, 125)


@pytest.mark.parametrize(
    ("sf", "bw", "on"),
    [(10, 125, False), (11, 125, True), (12, 125, True), (11, 250, False), (12, 250, True),
     (12, 500, False), (7, 125, False)],
)
def test_low_data_rate_rule(sf: int, bw: int, on: bool) -> None:
    assert low_data_rate_optimize(sf, bw) is on


# --- link budget --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sf", "want"),
    [(7, -124.5), (8, -127.0), (9, -129.5), (10, -132.0), (11, -134.5), (12, -137.0)],
)
def test_sensitivity_125k(sf: int, want: float) -> None:
    assert abs(sensitivity_dbm(sf, 125) - want) < 0.05


def test_sensitivity_follows_bandwidth_and_nf() -> None:
    # doubling the bandwidth doubles the noise: +3.01 dB
    assert sensitivity_dbm(7, 250) - sensitivity_dbm(7, 125) == pytest.approx(3.0103, abs=1e-3)
    assert sensitivity_dbm(7, 125, 9.0) - sensitivity_dbm(7, 125) == pytest.approx(3.0)
    assert noise_floor_dbm(125) == pytest.approx(-174 + 50.969 + 6, abs=1e-3)
    assert SNR_FLOOR_DB[6] == -5.0 and SNR_FLOOR_DB[12] == -20.0


def test_mean_path_loss() -> None:
    spec = LoraSpec(distance_m=40.0)
    assert mean_path_loss_db(spec) == pytest.approx(127.41)
    # ten times d0: + 10 * 2.08 dB
    spec = LoraSpec(distance_m=400.0)
    assert mean_path_loss_db(spec) == pytest.approx(127.41 + 20.8)
    spec = LoraSpec(distance_m=1.0, d0_m=1.0, path_loss_d0_db=7.7, path_loss_exponent=3.76)
    assert mean_path_loss_db(spec) == pytest.approx(7.7)


def test_receive_without_shadowing_is_deterministic() -> None:
    spec = LoraSpec(distance_m=50.0, shadowing_sigma_db=0.0)
    a = receive(spec, random.Random(1))
    b = receive(spec, random.Random(999))
    assert a == b
    # 14 dBm - (127.41 + 20.8 log10(1.25)) = -115.426 dBm
    assert a.rssi_dbm == pytest.approx(14 - 127.41 - 20.8 * math.log10(1.25))
    assert a.snr_db == pytest.approx(a.rssi_dbm - noise_floor_dbm(125))
    assert a.sensitivity_dbm == pytest.approx(sensitivity_dbm(7, 125))
    assert a.received
    rng = random.Random(5)
    state = rng.getstate()
    receive(spec, rng)
    assert rng.getstate() == state  # sigma 0 draws nothing


def test_receive_seeded_repeats_and_varies() -> None:
    spec = LoraSpec(distance_m=100.0)  # sigma 3.57 dB by default
    first = [receive(spec, random.Random(42)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    r1, r2 = random.Random(7), random.Random(7)
    seq1 = [receive(spec, r1).rssi_dbm for _ in range(50)]
    seq2 = [receive(spec, r2).rssi_dbm for _ in range(50)]
    assert seq1 == seq2
    assert len(set(seq1)) == 50  # every frame gets a fresh draw
    other = [receive(spec, random.Random(8)).rssi_dbm for _ in range(1)]
    assert other[0] != seq1[0]


def test_shadowing_statistics() -> None:
    # Put the mean RSSI exactly at SF7's sensitivity: about half the frames get through, and the
    # RSSI spread matches sigma.
    target_pl = 14 - sensitivity_dbm(7, 125)
    d = 40.0 * 10 ** ((target_pl - 127.41) / 20.8)
    spec = LoraSpec(distance_m=d, shadowing_sigma_db=3.57)
    rng = random.Random(2024)
    rx = [receive(spec, rng) for _ in range(20000)]
    frac = sum(r.received for r in rx) / len(rx)
    assert 0.48 < frac < 0.52
    mean = sum(r.rssi_dbm for r in rx) / len(rx)
    sd = math.sqrt(sum((r.rssi_dbm - mean) ** 2 for r in rx) / len(rx))
    assert mean == pytest.approx(sensitivity_dbm(7, 125), abs=0.1)
    assert sd == pytest.approx(3.57, rel=0.03)


def test_far_frames_lost_near_frames_received() -> None:
    rng = random.Random(0)
    far = LoraSpec(spreading_factor=7, distance_m=20_000.0)
    assert not any(receive(far, rng).received for _ in range(200))
    near = LoraSpec(spreading_factor=7, distance_m=50.0, shadowing_sigma_db=0.0)
    assert receive(near, rng).received
    # 400 m: mean RSSI 14 - 148.21 = -134.2 dBm: below SF7 (-124.5) but above SF12 (-137.0)
    mid7 = LoraSpec(spreading_factor=7, distance_m=400.0, shadowing_sigma_db=0.0)
    mid12 = dataclasses.replace(mid7, spreading_factor=12)
    assert not receive(mid7, rng).received
    assert receive(mid12, rng).received


# --- collisions ---------------------------------------------------------------------------


def test_overlap_same_sf_collides_both() -> None:
    air = Air()
    a = air.begin(0.0, 1.0, 868.1, 7, -100.0)
    b = air.begin(0.5, 1.5, 868.1, 7, -102.0)
    assert a.collided and b.collided


def test_other_sf_or_frequency_do_not_collide() -> None:
    air = Air()
    a = air.begin(0.0, 1.0, 868.1, 7, -100.0)
    b = air.begin(0.2, 1.2, 868.1, 8, -100.0)
    c = air.begin(0.3, 1.3, 868.3, 7, -100.0)
    assert not (a.collided or b.collided or c.collided)


def test_capture_stronger_survives() -> None:
    air = Air()
    weak = air.begin(0.0, 1.0, 868.1, 9, -110.0)
    strong = air.begin(0.5, 1.5, 868.1, 9, -104.0, capture_db=6.0)  # exactly 6 dB stronger
    assert weak.collided and not strong.collided
    # the other way round: an earlier strong frame survives a later weak one
    air = Air()
    strong = air.begin(0.0, 1.0, 868.1, 9, -90.0)
    weak = air.begin(0.9, 1.9, 868.1, 9, -99.0)
    assert weak.collided and not strong.collided
    # 5.9 dB is not enough
    air = Air()
    x = air.begin(0.0, 1.0, 868.1, 9, -110.0)
    y = air.begin(0.5, 1.5, 868.1, 9, -104.1)
    assert x.collided and y.collided


def test_collided_frame_still_interferes() -> None:
    air = Air()
    a = air.begin(0.0, 2.0, 868.1, 7, -100.0)
    b = air.begin(0.1, 0.5, 868.1, 7, -100.0)
    c = air.begin(1.0, 1.5, 868.1, 7, -100.0)  # overlaps only a, which is already lost
    assert a.collided and b.collided and c.collided


def test_back_to_back_do_not_collide() -> None:
    air = Air()
    a = air.begin(0.0, 1.0, 868.1, 7, -100.0)
    b = air.begin(1.0, 2.0, 868.1, 7, -100.0)
    c = air.begin(2.5, 3.0, 868.1, 7, -100.0)
    assert not (a.collided or b.collided or c.collided)


def test_prune_forgets_ended() -> None:
    air = Air()
    air.begin(0.0, 1.0, 868.1, 7, -100.0)
    air.begin(0.5, 3.0, 868.1, 8, -100.0)
    assert len(air) == 2
    air.prune(2.0)
    assert len(air) == 1
    late = air.begin(2.5, 3.5, 868.1, 8, -100.0)
    assert late.collided  # the SF8 frame still in flight was kept
    air.prune(10.0)
    assert len(air) == 0


# --- duty cycle ---------------------------------------------------------------------------


def test_duty_cycle_one_percent() -> None:
    dc = DutyCycle(1.0)
    assert dc.allows(0.0)
    dc.record(5.0, 0.1)
    assert dc.next_allowed == pytest.approx(5.1 + 9.9)
    assert not dc.allows(5.1)
    assert not dc.allows(14.99)
    assert dc.allows(15.0 + 1e-9)


def test_duty_cycle_unlimited_and_full() -> None:
    dc = DutyCycle(0.0)
    dc.record(0.0, 1.0)
    assert dc.allows(0.0)
    dc = DutyCycle(100.0)
    dc.record(0.0, 1.0)
    assert dc.next_allowed == pytest.approx(1.0)
    with pytest.raises(ValueError):
        DutyCycle(101.0)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"spreading_factor": 13}, "spreading_factor"),
        ({"spreading_factor": 5}, "spreading_factor"),
        ({"spreading_factor": 6}, "implicit_header"),
        ({"bandwidth_khz": 200}, "bandwidth_khz"),
        ({"coding_rate": 9}, "coding_rate"),
        ({"coding_rate": 4}, "coding_rate"),
        ({"preamble": 5}, "preamble"),
        ({"preamble": 70000}, "preamble"),
        ({"distance_m": 0.0}, "distance_m"),
        ({"distance_m": float("nan")}, "distance_m"),
        ({"d0_m": -1.0}, "d0_m"),
        ({"frequency_mhz": 0.0}, "frequency_mhz"),
        ({"path_loss_exponent": 0.0}, "path_loss_exponent"),
        ({"shadowing_sigma_db": -0.1}, "shadowing_sigma_db"),
        ({"noise_figure_db": -1.0}, "noise_figure_db"),
        ({"capture_db": -1.0}, "capture_db"),
        ({"duty_cycle_pct": 100.5}, "duty_cycle_pct"),
        ({"duty_cycle_pct": -1.0}, "duty_cycle_pct"),
        ({"tx_power_dbm": 40.0}, "tx_power_dbm"),
    ],
)
def test_validate_names_field(change: dict[str, object], field: str) -> None:
    spec = dataclasses.replace(LoraSpec(), **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec) as exc:
        validate_lora_spec(spec, "qos.lora")
    assert exc.value.field == f"qos.lora.{field}"


def test_validate_accepts_good_specs() -> None:
    validate_lora_spec(LoraSpec())
    validate_lora_spec(LoraSpec(spreading_factor=6, implicit_header=True, bandwidth_khz=500,
                                coding_rate=8, duty_cycle_pct=1.0, shadowing_sigma_db=0.0))


# --- the CLI ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", "-o", choices=["table", "json"], default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="infrasim")
    add_lora_commands(p.add_subparsers(dest="command", required=True), common)
    return p


async def _run(*argv: str) -> int:
    """Parse and run like ``cli.main`` does: InfraSimError -> message on stderr + exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(await args.func(args))
    except InfraSimError as exc:
        print(f"infrasim: error: {exc.message}", file=sys.stderr)
        return exc.exit_code


async def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = await _run("lora", "airtime", "--sf", "7", "--bw", "125", "--cr", "4/5",
                    "--payload", "13")
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == "46.336 ms"
    assert "symbol time 1.024 ms" in out[1]
    assert "payload 33 symbols" in out[1]
    assert "optimisation off" in out[1]
    rc = await _run("lora", "airtime", "--sf", "12", "--bw", "125", "--cr", "4/5",
                    "--payload", "51")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2465.792 ms" and "optimisation on" in out[1]


async def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = await _run("lora", "airtime", "--sf", "9", "--bw", "500", "--cr", "4/8",
                    "--payload", "51", "--output", "json")
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["airtime_ms"] == pytest.approx(119.04, abs=1e-6)
    assert data["payload_symbols"] == 104
    assert data["symbol_time_ms"] == pytest.approx(1.024)
    assert data["low_data_rate_optimize"] is False
    assert data["coding_rate"] == "4/8"


async def test_cli_flags(capsys: pytest.CaptureFixture[str]) -> None:
    rc = await _run("lora", "airtime", "--sf", "6", "--bw", "125", "--cr", "4/5",
                    "--payload", "10", "--implicit-header", "-o", "json")
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["airtime_ms"] == pytest.approx(20.608, abs=1e-6)
    rc = await _run("lora", "airtime", "--sf", "7", "--bw", "125", "--cr", "4/5",
                    "--payload", "20", "--no-crc", "--preamble", "8")
    assert rc == 0 and capsys.readouterr().out.startswith("51.456 ms\n")
    rc = await _run("lora", "airtime", "--sf", "7", "--payload", "300")
    assert rc == 0 and "above the 255-byte" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--sf", "13", "--payload", "10"], "--sf"),
        (["--sf", "7", "--cr", "4/9", "--payload", "10"], "--cr"),
        (["--sf", "7", "--cr", "bogus", "--payload", "10"], "--cr"),
        (["--sf", "7", "--payload", "-1"], "--payload"),
        (["--sf", "6", "--payload", "10"], "--implicit-header"),
        (["--sf", "7", "--bw", "200", "--payload", "10"], "--bw"),
        (["--sf", "7", "--preamble", "2", "--payload", "10"], "--preamble"),
    ],
)
async def test_cli_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str],
                             flag: str) -> None:
    rc = await _run("lora", "airtime", *argv)
    cap = capsys.readouterr()
    assert rc == 2
    assert cap.out == ""
    assert cap.err.startswith(f"infrasim: error: {flag}:"), cap.err


def test_cli_wired_into_main(capsys: pytest.CaptureFixture[str]) -> None:
    from infrasim_tui import cli

    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    if "lora" not in sub.choices:
        pytest.skip("lora commands not wired into cli.build_parser yet")
    assert cli.main(["lora", "airtime", "--sf", "7", "--payload", "13", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["airtime_ms"] == pytest.approx(46.336)
    assert cli.main(["lora", "airtime", "--sf", "7", "--cr", "4/9", "--payload", "13"]) == 2
    assert "--cr" in capsys.readouterr().err
