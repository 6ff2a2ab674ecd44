"""``infrasim qos``, ``network stats`` and ``vm create --net/--qos``: the unit parsers, the flag
→ spec mapping, and the commands run as a user would (separate processes, a real daemon)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infrasim_tui import cli_units as u
from infrasim_tui.cli import _spec_from_args as vm_spec_from_args
from infrasim_tui.cli import build_parser, qos_spec_from_args, stats_table
from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import LinkStats, LoraLinkStats, LoraSpec, QosProfileSpec

from .conftest import infrasim, qemu_pids, wait_sync

# --- unit parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bps"), [
    ("8mbit", 8_000_000), ("1.5gbit", 1_500_000_000), ("500kbit", 500_000), ("64KBit", 64_000),
    ("1mbps", 8_000_000), ("100bps", 800), ("1kibit", 1024), ("2mibps", 16 * 1024 * 1024),
    ("100000", 100_000), ("100bit", 100), ("0", 0), (" 8 mbit ", 8_000_000),
])
def test_parse_rate(text: str, bps: int) -> None:
    assert u.parse_rate(text) == bps


@pytest.mark.parametrize(("text", "why"), [
    ("8M", "unknown rate unit"), ("8mb", "unknown rate unit"), ("fast", "not a number"),
    ("1.5bit", "whole number"), ("-1mbit", "not a number"), ("", "not a number"),
])
def test_parse_rate_errors_name_the_flag(text: str, why: str) -> None:
    with pytest.raises(InvalidSpec, match=why) as exc:
        u.parse_rate(text, "--rate")
    assert exc.value.field == "--rate"


@pytest.mark.parametrize(("text", "n"), [
    ("32kb", 32768), ("64KiB", 65536), ("1.5mb", 1572864), ("1514", 1514), ("1514b", 1514),
    ("2k", 2048), ("1g", 1 << 30), ("0", 0),
])
def test_parse_size(text: str, n: int) -> None:
    assert u.parse_size(text, "--burst") == n


@pytest.mark.parametrize("text", ["1.5b", "32kbit", "lots", "-1kb"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        u.parse_size(text, "--queue")
    assert exc.value.field == "--queue"


@pytest.mark.parametrize(("text", "ms"), [
    ("40ms", 40.0), ("250us", 0.25), ("1.5s", 1500.0), ("2sec", 2000.0), ("10msec", 10.0),
    ("0", 0.0), ("0.5ms", 0.5),
])
def test_parse_time(text: str, ms: float) -> None:
    assert u.parse_time_ms(text, "--delay") == ms


@pytest.mark.parametrize(("text", "why"), [("40", "no unit"), ("40min", "unknown time unit"),
                                           ("soon", "not a number")])
def test_parse_time_errors(text: str, why: str) -> None:
    with pytest.raises(InvalidSpec, match=why) as exc:
        u.parse_time_ms(text, "--jitter")
    assert exc.value.field == "--jitter"


def test_parse_pct_requires_the_percent_sign() -> None:
    assert u.parse_pct("1%", "--loss") == 1.0
    assert u.parse_pct("0.1%", "--duplicate") == 0.1
    assert u.parse_pct("100%", "--loss") == 100.0
    for text, why in [("0.01", "with %"), ("1", "with %"), ("101%", "at most 100%"),
                      ("-1%", "not a number")]:
        with pytest.raises(InvalidSpec, match=why) as exc:
            u.parse_pct(text, "--reorder")
        assert exc.value.field == "--reorder"


def test_parse_loss_random_and_gilbert_elliott() -> None:
    assert u.parse_loss("1%") == {"loss_pct": 1.0, "ge_p_pct": 0.0, "ge_r_pct": 100.0,
                                  "ge_bad_loss_pct": 100.0, "ge_good_loss_pct": 0.0}
    assert u.parse_loss("gemodel:1%,30%") == {"loss_pct": 0.0, "ge_p_pct": 1.0,
                                              "ge_r_pct": 30.0, "ge_bad_loss_pct": 100.0,
                                              "ge_good_loss_pct": 0.0}
    assert u.parse_loss("gemodel:1%,30%,70%")["ge_bad_loss_pct"] == 70.0
    full = u.parse_loss("GEMODEL:0.5%,10%,70%,0.1%")
    assert (full["ge_p_pct"], full["ge_r_pct"], full["ge_bad_loss_pct"],
            full["ge_good_loss_pct"]) == (0.5, 10.0, 70.0, 0.1)
    for text, why in [("gemodel:1%", "expected gemodel"), ("gemodel", "expected gemodel"),
                      ("gemodel:1%,2%,3%,4%,5%", "expected gemodel"),
                      ("gemodel:0%,30%", "P .* above 0"), ("gemodel:1%,0%", "R .* above 0"),
                      ("gemodel:1,30%", "with %"), ("0.01", "with %")]:
        with pytest.raises(InvalidSpec, match=why) as exc:
            u.parse_loss(text)
        assert exc.value.field.startswith("--loss"), exc.value.field


def test_parse_radio_values() -> None:
    assert u.parse_distance_m("2km") == 2000.0
    assert u.parse_distance_m("500m") == 500.0
    assert u.parse_distance_m("750") == 750.0
    with pytest.raises(InvalidSpec, match="unknown distance unit"):
        u.parse_distance_m("2mi")
    assert [u.parse_coding_rate(t) for t in ("4/5", "4/8", "6", " 4/7 ")] == [5, 8, 6, 7]
    for bad in ("4/9", "3/5", "4/", "x"):
        with pytest.raises(InvalidSpec) as exc:
            u.parse_coding_rate(bad)
        assert exc.value.field == "--lora-cr"
    assert u.parse_number("14", "--lora-tx-power", "dBm", signed=True) == 14.0
    assert u.parse_number("-3dBm", "--lora-tx-power", "dBm", signed=True) == -3.0
    assert u.parse_number("868.1MHz", "--lora-frequency", "MHz") == 868.1
    with pytest.raises(InvalidSpec):
        u.parse_number("-3", "--lora-capture", "dB")  # not signed
    with pytest.raises(InvalidSpec):
        u.parse_number("14w", "--lora-tx-power", "dBm", signed=True)
    assert u.parse_int_unit("125kHz", "--lora-bw", "kHz") == 125
    with pytest.raises(InvalidSpec, match="whole number"):
        u.parse_int_unit("12.5", "--lora-bw", "kHz")


def test_formatting() -> None:
    assert u.format_rate(8_000_000) == "8 Mbit/s"
    assert u.format_rate(1_500_000) == "1.5 Mbit/s"
    assert u.format_rate(250_000) == "250 kbit/s"
    assert u.format_rate(999) == "999 bit/s"
    assert u.format_bytes(32768) == "32 KiB" and u.format_bytes(1514) == "1.5 KiB"
    assert u.format_bytes(1000) == "1000 B"
    assert u.format_ms(0.25) == "250 us" and u.format_ms(40) == "40 ms"
    assert u.format_ms(1500) == "1.5 s"
    assert u.format_pct(0.1) == "0.1%" and u.format_distance(2000) == "2 km"


# --- flags → spec ----------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_create_flags_make_the_spec() -> None:
    args = _args("qos", "create", "wan", "--rate", "8mbit", "--burst", "32kb", "--queue", "64kb",
                 "--delay", "40ms", "--jitter", "5ms", "--distribution", "normal", "--loss",
                 "1%", "--duplicate", "0.1%", "--reorder", "1%", "--seed", "42", "--direction",
                 "egress")
    assert qos_spec_from_args(args) == QosProfileSpec(
        rate_bps=8_000_000, burst_bytes=32768, queue_bytes=65536, delay_ms=40.0, jitter_ms=5.0,
        distribution="normal", loss_pct=1.0, duplicate_pct=0.1, reorder_pct=1.0, seed=42,
        direction="egress")
    assert qos_spec_from_args(_args("qos", "create", "x")) == QosProfileSpec()


def test_any_lora_flag_makes_a_radio_link() -> None:
    args = _args("qos", "create", "r", "--lora-sf", "9", "--lora-bw", "250", "--lora-cr", "4/7",
                 "--lora-distance", "2km", "--lora-tx-power", "-2", "--lora-duty-cycle", "1%",
                 "--lora-frequency", "868.3", "--no-lora-crc", "--lora-preamble", "10",
                 "--lora-d0", "1m", "--lora-path-loss-d0", "7.7", "--lora-path-loss-exponent",
                 "3.76", "--lora-shadowing", "0", "--lora-noise-figure", "5dB",
                 "--lora-capture", "3")
    spec = qos_spec_from_args(args)
    assert spec.lora == LoraSpec(spreading_factor=9, bandwidth_khz=250, coding_rate=7,
                                 preamble=10, crc=False, tx_power_dbm=-2.0, distance_m=2000.0,
                                 frequency_mhz=868.3, d0_m=1.0, path_loss_d0_db=7.7,
                                 path_loss_exponent=3.76, shadowing_sigma_db=0.0,
                                 noise_figure_db=5.0, capture_db=3.0, duty_cycle_pct=1.0)
    only_sf = qos_spec_from_args(_args("qos", "create", "r", "--lora-sf", "12"))
    assert only_sf.lora == LoraSpec(spreading_factor=12)
    sf6 = qos_spec_from_args(_args("qos", "create", "r", "--lora-sf", "6",
                                   "--lora-implicit-header"))
    assert sf6.lora is not None and sf6.lora.implicit_header


def test_update_changes_only_the_flags_given() -> None:
    base = QosProfileSpec(rate_bps=8_000_000, delay_ms=40.0, ge_p_pct=1.0, ge_r_pct=30.0,
                          lora=LoraSpec(spreading_factor=9, distance_m=500.0))
    spec = qos_spec_from_args(_args("qos", "update", "wan", "--rate", "2mbit",
                                    "--lora-distance", "1km"), base)
    assert spec == QosProfileSpec(rate_bps=2_000_000, delay_ms=40.0, ge_p_pct=1.0,
                                  ge_r_pct=30.0,
                                  lora=LoraSpec(spreading_factor=9, distance_m=1000.0))
    assert base.rate_bps == 8_000_000 and base.lora is not None and base.lora.distance_m == 500
    # Random loss replaces the Gilbert-Elliott model entirely, and --no-lora drops the radio.
    spec = qos_spec_from_args(_args("qos", "update", "wan", "--loss", "2%",
                                    "--no-lora"), base)
    assert spec.loss_pct == 2.0 and spec.ge_p_pct == 0.0 and spec.ge_r_pct == 100.0
    assert spec.lora is None and spec.rate_bps == 8_000_000
    with pytest.raises(InvalidSpec) as exc:
        qos_spec_from_args(_args("qos", "update", "wan", "--no-lora",
                                 "--lora-sf", "9"), base)
    assert exc.value.field == "--no-lora"
    with pytest.raises(SystemExit):  # --no-lora only makes sense on update
        _args("qos", "create", "x", "--no-lora")


def test_flag_errors_name_the_flag() -> None:
    for flag, value in [("--rate", "8M"), ("--burst", "big"), ("--delay", "40"),
                        ("--loss", "0.01"), ("--seed", "x"), ("--lora-sf", "nine"),
                        ("--lora-cr", "4/9"), ("--lora-distance", "far")]:
        with pytest.raises(InvalidSpec) as exc:
            qos_spec_from_args(_args("qos", "create", "x", flag, value))
        assert exc.value.field.startswith(flag), (flag, exc.value.field)


def test_vm_create_net_and_qos_flags() -> None:
    base = ("vm", "create", "a", "--kernel", "/k", "--net", "seg", "--net", "lan")
    spec = vm_spec_from_args(_args(*base, "--qos", "wan", "--qos", "seg=edge"))
    assert spec.network_ids == ["seg", "lan"]
    assert spec.qos_profile_id == "wan" and spec.nic_qos == {"seg": "edge"}
    spec = vm_spec_from_args(_args(*base))
    assert spec.qos_profile_id == "" and spec.nic_qos == {}
    for extra, why in [(("--qos", "a", "--qos", "b"), "one VM-wide"),
                       (("--qos", "wan2=edge"), "not one of this VM's --net"),
                       (("--qos", "seg="), "expected PROFILE or NETWORK=PROFILE")]:
        with pytest.raises(InvalidSpec, match=why) as exc:
            vm_spec_from_args(_args(*base, *extra))
        assert exc.value.field == "--qos"


def test_stats_table() -> None:
    assert "no links" in stats_table([])
    links = [
        LinkStats(network="seg", vm="a", nic="net1", direction="egress", profile="wan",
                  bytes=3 << 20, frames=2200, throughput_bps=7_950_000.0, queue_bytes=3028,
                  queue_frames=2, drops={"bucket": 4, "loss": 0}, delay_p50_ms=40.2,
                  delay_p99_ms=45.1),
        LinkStats(network="seg", vm="a", nic="net1", direction="ingress"),
        LinkStats(network="seg", vm="b", nic="net1", direction="egress", profile="radio",
                  frames=3, lora=LoraLinkStats(spreading_factor=9, rssi_dbm=-118.25,
                                               snr_db=-4.5, airtime_ms=164.864, delivered=3,
                                               lost=1)),
    ]
    text = stats_table(links)
    rows = text.splitlines()
    assert rows[0].split()[:6] == ["NETWORK", "VM", "NIC", "DIR", "PROFILE", "THROUGHPUT"]
    egress = next(r for r in rows if " wan " in r)
    assert "7.95 Mbit/s" in egress and "3 MiB" in egress and "bucket 4" in egress
    assert "loss" not in egress and "40.2 ms" in egress and "3 KiB (2)" in egress
    assert re.search(r"ingress\s+-\s+0 bit/s", text)
    assert "LoRa" in text and "SF9" in text and "-118.2 dBm" in text and "164.864 ms" in text


# --- the commands against a real daemon ------------------------------------------------------


def _json(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.qemu
def test_qos_commands_round_trip(data_dir: Path) -> None:
    p = _json(infrasim(data_dir, "qos", "create", "wan", "--rate", "8mbit", "--burst", "32kb",
                       "--delay", "40ms", "--jitter", "5ms", "--distribution", "normal",
                       "--loss", "1%", "--seed", "7", "--label", "team=net", "-o", "json"))
    assert p["spec"]["rate_bps"] == 8_000_000 and p["spec"]["burst_bytes"] == 32768
    assert p["meta"]["labels"] == {"team": "net"} and p["spec"]["lora"] is None
    r = infrasim(data_dir, "qos", "get", "wan")
    assert r.returncode == 0, r.stderr
    assert "8 Mbit/s (burst 32 KiB, queue auto)" in r.stdout
    assert "40 ms ± 5 ms (normal)" in r.stdout and "Loss:         1%" in r.stdout
    r = infrasim(data_dir, "qos", "create", "radio", "--lora-sf", "9", "--lora-cr", "4/6",
                 "--lora-distance", "120m", "--lora-duty-cycle", "1%",
                 "--loss", "gemodel:1%,30%")
    assert r.returncode == 0, r.stderr
    assert "SF9, 125 kHz, CR 4/6" in r.stdout and "duty cycle 1%" in r.stdout
    assert "gemodel p=1% r=30%" in r.stdout
    r = infrasim(data_dir, "qos", "list")
    assert r.returncode == 0 and "radio" in r.stdout and "8 Mbit/s" in r.stdout
    assert [x["meta"]["name"] for x in _json(infrasim(data_dir, "qos", "list",
                                                      "-o", "json"))] == ["radio", "wan"]

    # Only the given flags change; the radio section can be removed.
    p = _json(infrasim(data_dir, "qos", "update", "wan", "--rate", "2mbit", "-o", "json"))
    assert p["spec"]["rate_bps"] == 2_000_000 and p["spec"]["delay_ms"] == 40.0
    assert p["spec"]["seed"] == 7 and p["meta"]["version"] == 2
    p = _json(infrasim(data_dir, "qos", "update", "radio", "--no-lora", "-o", "json"))
    assert p["spec"]["lora"] is None and p["spec"]["ge_p_pct"] == 1.0

    # Errors name the flag, parsed locally or refused by the core.
    for argv, flag in [(("--rate", "8M"), "--rate"), (("--rate", "1mbit", "--burst", "1kb"),
                                                      "--burst"),
                       (("--lora-sf", "13"), "--lora-sf"), (("--loss", "0.5"), "--loss")]:
        r = infrasim(data_dir, "qos", "create", "bad", *argv)
        assert r.returncode == 2 and f"error: {flag}" in r.stderr, (argv, r.stderr)
    assert infrasim(data_dir, "qos", "get", "bad").returncode == 3
    r = infrasim(data_dir, "qos", "update", "wan")
    assert r.returncode == 2 and "nothing to change" in r.stderr
    r = infrasim(data_dir, "qos", "create", "wan")
    assert r.returncode == 5
    assert infrasim(data_dir, "qos", "delete", "radio").returncode == 0
    r = infrasim(data_dir, "qos", "delete", "radio")
    assert r.returncode == 3 and "not found" in r.stderr


@pytest.mark.qemu
def test_segment_vm_qos_and_link_stats_through_the_cli(data_dir: Path,
                                                       cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "network", "create", "seg", "--mode", "segment", "--subnet",
                 "10.10.0.0/24")
    assert r.returncode == 0 and "(segment, 10.10.0.0/24)" in r.stdout, r.stderr
    for name, rate in (("wan", "8mbit"), ("edge", "1mbit")):
        assert infrasim(data_dir, "qos", "create", name, "--rate", rate).returncode == 0
    assert _json(infrasim(data_dir, "network", "stats", "-o", "json")) == []
    r = infrasim(data_dir, "network", "stats", "seg")
    assert r.returncode == 0 and "no links" in r.stdout
    r = infrasim(data_dir, "network", "stats", "nope")
    assert r.returncode == 3

    vm = _json(infrasim(data_dir, "vm", "create", "a", "--kernel", str(cloud_kit.kernel),
                        "--initrd", str(cloud_kit.initrd), "--net", "seg", "--qos", "edge",
                        "--qos", "seg=wan", "-o", "json"))
    net = _json(infrasim(data_dir, "network", "get", "seg", "-o", "json"))
    wan = _json(infrasim(data_dir, "qos", "get", "wan", "-o", "json"))
    assert vm["spec"]["network_ids"] == [net["meta"]["id"]]
    assert vm["spec"]["nic_qos"] == {net["meta"]["id"]: wan["meta"]["id"]}
    r = infrasim(data_dir, "vm", "get", "a")
    assert r.returncode == 0 and re.search(r"seg \(segment\).*qos wan", r.stdout), r.stdout
    r = infrasim(data_dir, "qos", "delete", "wan")
    assert r.returncode == 4 and "used by VM a" in r.stderr
    r = infrasim(data_dir, "qos", "get", "edge")
    assert "Attached VMs: a" in r.stdout, r.stdout

    assert infrasim(data_dir, "vm", "start", "a").returncode == 0
    try:
        links = _json(infrasim(data_dir, "network", "stats", "seg", "-o", "json"))
        assert sorted((x["vm"], x["direction"], x["profile"]) for x in links) == [
            ("a", "egress", "wan"), ("a", "ingress", "wan")]
        r = infrasim(data_dir, "vm", "get", "a")
        assert re.search(r"net1 seg \(segment\) 52:54:00:\S+: 10\.10\.0\.\d+/24  qos wan",
                         r.stdout), r.stdout
        r = infrasim(data_dir, "network", "stats", "seg", "--watch", "--count", "2", "-o",
                     "json", timeout=30)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        assert len(lines) == 3  # the current sample, then two live ones
        assert all({x["vm"] for x in line["links"]} == {"a"} for line in lines)
        assert lines[-1]["at"] > lines[0]["at"]
        r = infrasim(data_dir, "network", "stats", "--watch", "--count", "1", timeout=30)
        assert r.returncode == 0 and r.stdout.count("link statistics") == 2, r.stdout
        assert "wan" in r.stdout
    finally:
        infrasim(data_dir, "vm", "stop", "a", "--force")
    assert wait_sync(lambda: qemu_pids(data_dir) == [], 10)
    assert infrasim(data_dir, "vm", "delete", "a").returncode == 0
    assert infrasim(data_dir, "qos", "delete", "wan").returncode == 0
