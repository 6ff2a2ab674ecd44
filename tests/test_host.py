"""Host facts: parsing, the accelerator rules, the hand-assembled probe guests (run for real
under TCG, and under KVM where /dev/kvm exists), detection and its cache."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from infrasim_tui.core import host
from infrasim_tui.core.errors import InvalidSpec, Unavailable
from infrasim_tui.core.host import (
    PROBE_EXIT_CODES,
    HostFacts,
    aarch64_probe_image,
    detect_host,
    judge_probe,
    normalise_arch,
    parse_accel_help,
    parse_machine_help,
    parse_qemu_version,
    probe_argv,
    qemu_binary_for,
    resolve_accelerator,
    run_probe,
    x86_64_probe_image,
)
from infrasim_tui.core.model import Accelerator

AARCH64 = shutil.which("qemu-system-aarch64")
X86_64 = shutil.which("qemu-system-x86_64")
HOST_ARCH = normalise_arch(platform.machine())


def facts(os_name: str, arch: str, **kw: object) -> HostFacts:
    base: dict[str, object] = dict(
        os=os_name, arch=arch,
        qemu_binaries={"aarch64": "/q/qemu-system-aarch64", "x86_64": "/q/qemu-system-x86_64"},
        qemu_version="7.2.22", qemu_img="/q/qemu-img",
        accelerators={"aarch64": "tcg", "x86_64": "tcg"},
        accel_reasons={"aarch64": "tcg: why a", "x86_64": "tcg: why x"},
        machines={"aarch64": ["virt"], "x86_64": ["q35"]},
    )
    base.update(kw)
    return HostFacts(**base)  # type: ignore[arg-type]


# --- parsing -------------------------------------------------------------------------------


def test_parsers() -> None:
    assert normalise_arch("arm64") == "aarch64" and normalise_arch("AMD64") == "x86_64"
    assert parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n") == "7.2.22"
    assert parse_qemu_version("QEMU emulator version 9.0.0\n") == "9.0.0"
    assert parse_qemu_version("garbage") == ""
    text = ("Supported machines are:\n"
            "raspi3b              Raspberry Pi 3B (revision 1.2)\n"
            "virt                 QEMU 7.2 ARM Virtual Machine (alias of virt-7.2)\n"
            "virt-7.2             QEMU 7.2 ARM Virtual Machine\n")
    assert parse_machine_help(text) == ["raspi3b", "virt", "virt-7.2"]
    assert parse_accel_help("Accelerators supported in QEMU binary:\ntcg\nkvm\n") == ["tcg", "kvm"]


# --- resolve_accelerator / qemu_binary_for -------------------------------------------------


def test_resolve_auto_takes_the_verdict() -> None:
    mac = facts("darwin", "aarch64", accelerators={"aarch64": "hvf", "x86_64": "tcg"},
                accel_reasons={"aarch64": "hvf: kern.hv_support=1", "x86_64": "tcg: x"})
    assert resolve_accelerator(Accelerator.AUTO, "aarch64", mac) == (
        Accelerator.HVF, "hvf: kern.hv_support=1")
    assert resolve_accelerator(Accelerator.AUTO, "x86_64", mac)[0] is Accelerator.TCG
    linux = facts("linux", "x86_64")
    assert resolve_accelerator(Accelerator.AUTO, "aarch64", linux) == (
        Accelerator.TCG, "tcg: why a")


def test_resolve_explicit_requests() -> None:
    linux = facts("linux", "x86_64")
    accel, why = resolve_accelerator(Accelerator.KVM, "x86_64", linux)
    assert accel is Accelerator.KVM and "forced" in why and "why x" in why
    assert resolve_accelerator(Accelerator.TCG, "aarch64", linux)[0] is Accelerator.TCG
    for req, arch, f in [
        (Accelerator.KVM, "aarch64", linux),  # arch mismatch
        (Accelerator.HVF, "x86_64", linux),  # hvf off macOS
        (Accelerator.KVM, "aarch64", facts("darwin", "aarch64")),  # kvm off Linux
        (Accelerator.HVF, "x86_64", facts("darwin", "aarch64")),  # hvf arch mismatch
    ]:
        with pytest.raises(InvalidSpec) as e:
            resolve_accelerator(req, arch, f)
        assert e.value.field == "accelerator"
    with pytest.raises(InvalidSpec) as e:
        resolve_accelerator(Accelerator.AUTO, "riscv64", linux)
    assert e.value.field == "arch"


def test_qemu_binary_for() -> None:
    f = facts("linux", "x86_64")
    assert qemu_binary_for("aarch64", f) == "/q/qemu-system-aarch64"
    with pytest.raises(Unavailable, match=r"apt-get install qemu-system-arm"):
        qemu_binary_for("aarch64", facts("linux", "x86_64", qemu_binaries={}))
    with pytest.raises(Unavailable, match=r"apt-get install qemu-system-x86"):
        qemu_binary_for("x86_64", facts("linux", "x86_64", qemu_binaries={}))
    with pytest.raises(Unavailable, match=r"brew install qemu"):
        qemu_binary_for("aarch64", facts("darwin", "aarch64", qemu_binaries={}))


# --- probe images --------------------------------------------------------------------------


def test_aarch64_probe_encoding() -> None:
    img = aarch64_probe_image(4_000_000)
    words = list(struct.unpack(f"<{len(img) // 4}I", img))
    # Reference encodings (as an assembler emits them).
    assert words == [
        0xD2A12001,  # movz x1, #0x900, lsl #16
        0x52800A62,  # movz w2, #0x53 ('S')
        0x39000022,  # strb w2, [x1]
        0xD2812004,  # movz x4, #0x0900
        0xF2A007A4,  # movk x4, #0x3d, lsl #16   (0x3d0900 = 4,000,000)
        0xF1000484,  # subs x4, x4, #1
        0x54FFFFE1,  # b.ne .-4
        0x52800962,  # movz w2, #0x4b ('K')
        0x39000022,  # strb w2, [x1]
        0xD2800100,  # movz x0, #0x8
        0xF2B08000,  # movk x0, #0x8400, lsl #16
        0xD4000002,  # hvc #0
        0x14000000,  # b .
    ]
    lo, hi = (aarch64_probe_image(0x12345678)[12:20][i:i + 4] for i in (0, 4))

    def imm(w: bytes) -> int:
        return int((struct.unpack("<I", w)[0] >> 5) & 0xFFFF)

    assert imm(lo) | imm(hi) << 16 == 0x12345678
    with pytest.raises(ValueError):
        aarch64_probe_image(0)


def test_x86_probe_layout() -> None:
    img = x86_64_probe_image(1000)
    assert len(img) == 0x10000
    assert img[0xFFF0:0xFFF5] == b"\xEA\x00\x00\x00\xF0"  # jmp far F000:0000
    assert img[0x07:0x09] == b"\x66\xB9" and struct.unpack("<I", img[0x09:0x0D])[0] == 1000
    assert img[0x16:0x18] == b"\xE6\xF4"  # out 0xF4, al
    argv = probe_argv("x86_64", "qemu", "/i", "kvm")
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in argv and "host" in argv


def test_judge_probe() -> None:
    ok = judge_probe("aarch64", b"SK", 0, 0.004, 0.1)
    assert ok.ok and "probe boot ok" in ok.reason
    assert judge_probe("x86_64", b"SK", 33, 0.004, 0.1).ok
    assert not judge_probe("x86_64", b"SK", 1, 0.004, 0.1).ok
    slow = judge_probe("x86_64", b"S", None, None, 0.6)
    assert not slow.ok and "emulated" in slow.reason
    assert not judge_probe("aarch64", b"SK", 0, 0.9, 1.0).ok
    died = judge_probe("x86_64", b"", 1, None, 0.05, "qemu: failed to set MSR 0x10a\n")
    assert not died.ok and "MSR 0x10a" in died.reason
    assert "no guest output" in judge_probe("aarch64", b"", None, None, 3.0).reason


@pytest.mark.qemu
@pytest.mark.skipif(not AARCH64, reason="qemu-system-aarch64 not installed")
async def test_aarch64_probe_runs_under_tcg() -> None:
    """The image really prints both markers and powers off via PSCI (exit 0)."""
    assert AARCH64
    r = await run_probe("aarch64", AARCH64, "tcg")
    assert r.ok, r.reason
    assert r.output == b"SK" and r.returncode == PROBE_EXIT_CODES["aarch64"] == 0


@pytest.mark.qemu
@pytest.mark.skipif(not X86_64, reason="qemu-system-x86_64 not installed")
async def test_x86_probe_runs_under_tcg() -> None:
    assert X86_64
    r = await run_probe("x86_64", X86_64, "tcg")
    assert r.ok, r.reason
    assert r.output == b"SK" and r.returncode == 33


KVM_RW = os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.mark.qemu
@pytest.mark.skipif(not X86_64 or HOST_ARCH != "x86_64" or not KVM_RW,
                    reason="needs qemu-system-x86_64 and a usable /dev/kvm on x86_64")
async def test_x86_kvm_probe_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever KVM this host has, the probe decides quickly and says why."""
    assert X86_64
    t0 = time.monotonic()
    r = await run_probe("x86_64", X86_64, "kvm")
    took = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nx86_64 kvm probe: ok={r.ok} in {took:.2f} s: {r.reason}")
    assert took < host.PROBE_DEADLINE_S + 1.0
    assert r.reason
    if r.ok:
        assert r.loop_seconds is not None and r.loop_seconds <= host.PROBE_LOOP_BUDGET_S


# --- detection and the cache ---------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.skipif(not AARCH64, reason="qemu-system-aarch64 not installed")
async def test_detect_host_real_and_cached(tmp_path: Path) -> None:
    assert AARCH64
    cache = tmp_path / "state" / "host-facts.json"
    f = await detect_host(cache_file=cache)
    assert not f.from_cache
    assert f.os == platform.system().lower() and f.arch == HOST_ARCH
    assert f.qemu_binaries["aarch64"] == AARCH64
    out = subprocess.run([AARCH64, "--version"], capture_output=True, text=True).stdout
    assert f.qemu_version and f.qemu_version in out
    assert "virt" in f.machines["aarch64"] and "raspi3b" in f.machines["aarch64"]
    assert f.qemu_img == (shutil.which("qemu-img") or "")
    if HOST_ARCH == "x86_64":
        assert f.accelerators["aarch64"] == "tcg"
        assert "kvm impossible" in f.accel_reasons["aarch64"]
    assert set(f.accelerators) == {"aarch64", "x86_64"}
    assert all(f.accel_reasons.values())
    assert json.loads(cache.read_text())["facts"]["accelerators"] == f.accelerators

    t0 = time.monotonic()
    again = await detect_host(cache_file=cache)
    took = time.monotonic() - t0
    assert again.from_cache and took < 0.1, took
    assert again.to_json() | {"from_cache": False} == f.to_json()

    fresh = await detect_host(cache_file=cache, refresh=True)
    assert not fresh.from_cache and fresh.detected_at > f.detected_at


@pytest.mark.qemu
@pytest.mark.skipif(not AARCH64, reason="qemu-system-aarch64 not installed")
async def test_cache_invalidation(tmp_path: Path) -> None:
    cache = tmp_path / "host-facts.json"
    await detect_host(cache_file=cache)
    data = json.loads(cache.read_text())
    data["key"]["kernel"] = "some-other-kernel"
    data["facts"]["accelerators"]["aarch64"] = "kvm"  # a stale verdict must not survive
    cache.write_text(json.dumps(data))
    f = await detect_host(cache_file=cache)
    assert not f.from_cache
    if HOST_ARCH == "x86_64":
        assert f.accelerators["aarch64"] == "tcg"
    cache.write_text("{not json")
    assert not (await detect_host(cache_file=cache)).from_cache
    assert (await detect_host(cache_file=cache)).from_cache


@pytest.mark.qemu
@pytest.mark.skipif(not AARCH64, reason="qemu-system-aarch64 not installed")
async def test_qemu_path_setting(tmp_path: Path) -> None:
    assert AARCH64
    link = tmp_path / "bin" / "qemu-system-aarch64"
    link.parent.mkdir()
    link.symlink_to(AARCH64)
    f = await detect_host(str(link))
    assert f.qemu_binaries["aarch64"] == str(link)
    assert f.qemu_version
    with pytest.raises(InvalidSpec) as e:
        await detect_host(str(tmp_path / "nope"))
    assert e.value.field == "qemu_path"


async def test_detect_does_not_block_the_loop(tmp_path: Path) -> None:
    """Probing runs as subprocesses: a ticker keeps ticking meanwhile."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    t0 = time.monotonic()
    await detect_host(cache_file=tmp_path / "c.json")
    took = time.monotonic() - t0
    task.cancel()
    assert ticks >= int(took / 0.01 * 0.5)
