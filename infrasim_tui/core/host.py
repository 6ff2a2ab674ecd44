"""Host facts: which QEMU binaries exist, their version and machines, and which accelerator
really works for each guest architecture.

The accelerator verdict is measured, not assumed: ``/dev/kvm`` can exist (and QMP ``query-kvm``
can say ``enabled``) while the backend only emulates guest code, which makes real guests crawl
for minutes and then die.  So KVM is chosen only when a tiny probe guest, built here byte by
byte, runs a compute loop at native speed and powers itself off before a deadline.  The whole
verdict is cached on disk, keyed by everything that could change it, so later starts skip the
probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from infrasim_tui.core.errors import InvalidSpec, Unavailable
from infrasim_tui.core.model import Accelerator

GUEST_ARCHES: tuple[str, ...] = ("aarch64", "x86_64")

# Bump when the probe or the facts' shape changes: old cache files are then ignored.
CACHE_SCHEMA = 1

# Where Homebrew installs QEMU (Apple Silicon, then Intel); searched after PATH on macOS because
# GUI-launched processes often lack Homebrew in PATH.
MACOS_EXTRA_DIRS: tuple[str, ...] = ("/opt/homebrew/bin", "/usr/local/bin")

_INSTALL_HINTS_DEBIAN = {"aarch64": "qemu-system-arm", "x86_64": "qemu-system-x86"}

# --- probe parameters ----------------------------------------------------------------------
# A real hardware-assisted KVM runs the loop at native speed (4M iterations ≈ 2-5 ms); TCG does
# it in ≈ 20-40 ms; a KVM that emulates guest instructions needs seconds (measured 0.6 µs per
# iteration on a nested software module, where SeaBIOS alone takes 2.3 s vs 0.13 s under TCG,
# yet a probe that only does port I/O passes: 15 µs per exit is also what a legitimately nested
# KVM shows).  The budget sits ~100x above native and ~5x below that emulated case.
PROBE_LOOP_ITERATIONS = 4_000_000
PROBE_LOOP_BUDGET_S = 0.5
PROBE_DEADLINE_S = 3.0
PROBE_START = b"S"  # printed before the compute loop
PROBE_END = b"K"  # printed after it
X86_DEBUG_EXIT_VALUE = 0x10
# isa-debug-exit makes QEMU exit with (value << 1) | 1: it can never exit 0.
PROBE_EXIT_CODES = {"aarch64": 0, "x86_64": (X86_DEBUG_EXIT_VALUE << 1) | 1}

_CMD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HostFacts:
    """What this host can run; computed once per start (or loaded from the cache)."""

    os: str  # "linux" | "darwin"
    arch: str  # normalised "x86_64" | "aarch64"
    qemu_binaries: dict[str, str]  # guest arch -> qemu-system-<arch> path
    qemu_version: str  # of the aarch64 binary, "" if missing
    qemu_img: str  # path or ""
    accelerators: dict[str, str]  # guest arch -> "hvf" | "kvm" | "tcg" that really works
    accel_reasons: dict[str, str]  # guest arch -> one line why
    machines: dict[str, list[str]]  # guest arch -> machine types the binary supports
    detected_at: float = 0.0  # when the verdict was measured (not when it was loaded)
    from_cache: bool = False  # True when loaded from the cache file without probing

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostFacts:
        return cls(
            os=str(data["os"]),
            arch=str(data["arch"]),
            qemu_binaries={str(k): str(v) for k, v in data["qemu_binaries"].items()},
            qemu_version=str(data["qemu_version"]),
            qemu_img=str(data["qemu_img"]),
            accelerators={str(k): str(v) for k, v in data["accelerators"].items()},
            accel_reasons={str(k): str(v) for k, v in data["accel_reasons"].items()},
            machines={str(k): [str(m) for m in v] for k, v in data["machines"].items()},
            detected_at=float(data.get("detected_at", 0.0)),
            from_cache=bool(data.get("from_cache", False)),
        )


# --- pure helpers --------------------------------------------------------------------------


def normalise_arch(machine: str) -> str:
    """``platform.machine()`` spells the same CPU differently per OS (arm64 on macOS)."""
    m = machine.lower()
    if m in ("arm64", "aarch64", "armv8", "armv8l"):
        return "aarch64"
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    return m


def parse_qemu_version(text: str) -> str:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> ``7.2.22``."""
    m = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else ""


def parse_machine_help(text: str) -> list[str]:
    """Machine names from ``-machine help`` (aliases such as ``virt`` are listed as names too)."""
    names: set[str] = set()
    for line in text.splitlines():
        if not line.strip() or line.startswith("Supported machines"):
            continue
        names.add(line.split()[0])
    return sorted(names)


def parse_accel_help(text: str) -> list[str]:
    """Accelerators compiled into the binary, from ``-accel help``."""
    return [
        line.strip() for line in text.splitlines() if line.strip() and not line.endswith(":")
    ]


def resolve_accelerator(
    requested: Accelerator, guest_arch: str, facts: HostFacts
) -> tuple[Accelerator, str]:
    """Turn the spec's accelerator into the one to launch with, and say why.

    AUTO takes the measured verdict.  An explicit request is honoured even when the probe
    disagreed (forcing is the user's right), but requests that can never work are refused.
    """
    if guest_arch not in GUEST_ARCHES:
        raise InvalidSpec("arch", f"unsupported guest arch {guest_arch!r}; use one of "
                          f"{', '.join(GUEST_ARCHES)}")
    verdict = facts.accelerators.get(guest_arch, "tcg")
    why = facts.accel_reasons.get(guest_arch, "")
    if requested is Accelerator.AUTO:
        return Accelerator(verdict), why or f"{verdict}: host verdict"
    if requested is Accelerator.TCG:
        return Accelerator.TCG, "tcg: requested"
    if requested is Accelerator.KVM:
        if facts.os != "linux":
            raise InvalidSpec("accelerator", f"kvm needs a Linux host; this host is {facts.os} "
                              "(use auto, hvf or tcg)")
        if facts.arch != guest_arch:
            raise InvalidSpec("accelerator", f"kvm cannot run a {guest_arch} guest on a "
                              f"{facts.arch} host (use auto or tcg)")
    if requested is Accelerator.HVF:
        if facts.os != "darwin":
            raise InvalidSpec("accelerator", f"hvf exists only on macOS; this host is "
                              f"{facts.os} (use auto, kvm or tcg)")
        if facts.arch != guest_arch:
            raise InvalidSpec("accelerator", f"hvf cannot run a {guest_arch} guest on a "
                              f"{facts.arch} host (use auto or tcg)")
    name = requested.value
    if verdict == name:
        return requested, f"{name}: requested"
    return requested, f"{name}: requested (forced; host verdict was {verdict}: {why})"


def qemu_binary_for(arch: str, facts: HostFacts) -> str:
    """The qemu-system binary for a guest arch, or an error that says how to install it."""
    path = facts.qemu_binaries.get(arch, "")
    if path:
        return path
    if arch not in GUEST_ARCHES:
        raise InvalidSpec("arch", f"unsupported guest arch {arch!r}; use one of "
                          f"{', '.join(GUEST_ARCHES)}")
    if facts.os == "darwin":
        hint = "brew install qemu"
    else:
        hint = f"on Debian/Ubuntu: apt-get install {_INSTALL_HINTS_DEBIAN[arch]}"
    raise Unavailable(f"qemu-system-{arch} not found (looked in PATH"
                      f"{' and ' + ', '.join(MACOS_EXTRA_DIRS) if facts.os == 'darwin' else ''}); "
                      f"install it ({hint}) or set qemu_path")


# --- the probe guests, assembled by hand ---------------------------------------------------
# Each probe prints PROBE_START on the serial port, spins PROBE_LOOP_ITERATIONS times in a loop
# that causes no VM exits, prints PROBE_END and powers the machine off.  Only under a KVM that
# really runs guest code natively does the loop finish within PROBE_LOOP_BUDGET_S.


def _a64_movz(rd: int, imm16: int, shift: int = 0, *, sf: int = 1) -> int:
    """MOVZ Xd|Wd, #imm16, LSL #shift: sf|10|100101|hw|imm16|Rd."""
    return (sf << 31) | 0x52800000 | ((shift // 16) << 21) | ((imm16 & 0xFFFF) << 5) | rd


def _a64_movk(rd: int, imm16: int, shift: int) -> int:
    """MOVK Xd, #imm16, LSL #shift (keep other bits): 1|11|100101|hw|imm16|Rd."""
    return 0xF2800000 | ((shift // 16) << 21) | ((imm16 & 0xFFFF) << 5) | rd


def _a64_strb(rt: int, rn: int, offset: int = 0) -> int:
    """STRB Wt, [Xn, #offset] (unsigned offset): 00|111|0|01|00|imm12|Rn|Rt."""
    return 0x39000000 | ((offset & 0xFFF) << 10) | (rn << 5) | rt


def _a64_subs_imm(rd: int, rn: int, imm12: int) -> int:
    """SUBS Xd, Xn, #imm12 (sets flags): 1|1|1|100010|0|imm12|Rn|Rd."""
    return 0xF1000000 | ((imm12 & 0xFFF) << 10) | (rn << 5) | rd


def _a64_b_cond(cond: int, offset_insns: int) -> int:
    """B.cond to PC + 4*offset: 0101010|0|imm19|0|cond (NE is 0b0001)."""
    return 0x54000000 | ((offset_insns & 0x7FFFF) << 5) | cond


def _a64_hvc(imm16: int) -> int:
    """HVC #imm16: 11010100|000|imm16|000|10 — traps to the hypervisor (PSCI conduit)."""
    return 0xD4000002 | ((imm16 & 0xFFFF) << 5)


def _a64_b(offset_insns: int) -> int:
    """B to PC + 4*offset: 000101|imm26."""
    return 0x14000000 | (offset_insns & 0x3FFFFFF)


AARCH64_UART_BASE = 0x0900_0000  # PL011 UARTDR on -M virt
PSCI_SYSTEM_OFF = 0x8400_0008  # PSCI 0.2 SYSTEM_OFF function id (SMC32 calling convention)
_A64_COND_NE = 0b0001


def aarch64_probe_image(iterations: int = PROBE_LOOP_ITERATIONS) -> bytes:
    """A raw image for ``-M virt -kernel``: QEMU's boot stub jumps to its first byte at EL1.

    The loop (``subs``/``b.ne``) touches no device, so it costs no VM exits: under a real KVM it
    runs at native speed.  PSCI SYSTEM_OFF through ``hvc`` makes QEMU exit 0 under KVM (handled
    in the kernel) and under TCG (QEMU's PSCI emulation, conduit HVC on ``virt`` without EL2).
    """
    if not 1 <= iterations <= 0xFFFF_FFFF:
        raise ValueError("iterations must fit 32 bits and be at least 1")
    words = [
        _a64_movz(1, AARCH64_UART_BASE >> 16, 16),  # movz x1, #0x0900, lsl #16 : x1 = UART
        _a64_movz(2, PROBE_START[0], sf=0),  # movz w2, #'S'
        _a64_strb(2, 1),  # strb w2, [x1]           : start marker
        _a64_movz(4, iterations & 0xFFFF),  # movz x4, #lo16
        _a64_movk(4, iterations >> 16, 16),  # movk x4, #hi16, lsl #16 : x4 = iterations
        _a64_subs_imm(4, 4, 1),  # loop: subs x4, x4, #1
        _a64_b_cond(_A64_COND_NE, -1),  # b.ne loop
        _a64_movz(2, PROBE_END[0], sf=0),  # movz w2, #'K'
        _a64_strb(2, 1),  # strb w2, [x1]           : end marker
        _a64_movz(0, PSCI_SYSTEM_OFF & 0xFFFF),  # movz x0, #0x0008
        _a64_movk(0, PSCI_SYSTEM_OFF >> 16, 16),  # movk x0, #0x8400, lsl #16
        _a64_hvc(0),  # hvc #0                   : PSCI SYSTEM_OFF
        _a64_b(0),  # b .                      : spin if PSCI ever returns
    ]
    return b"".join(struct.pack("<I", w) for w in words)


X86_COM1 = 0x3F8
X86_DEBUG_EXIT_PORT = 0xF4
X86_BIOS_SIZE = 0x10000
X86_RESET_OFFSET = 0xFFF0


def x86_64_probe_image(iterations: int = PROBE_LOOP_ITERATIONS) -> bytes:
    """A 64 KiB ``-bios`` image, real-mode code (every x86 guest starts here, in its firmware).

    Needs ``-device isa-debug-exit,iobase=0xf4,iosize=0x04``; QEMU then exits with code
    ``(0x10 << 1) | 1`` = 33.  The rest of the image is ``hlt``.
    """
    if not 1 <= iterations <= 0xFFFF_FFFF:
        raise ValueError("iterations must fit 32 bits and be at least 1")
    code = b"".join([
        b"\xFA",  # 0000 cli                  : no interrupt handlers exist
        b"\xBA" + struct.pack("<H", X86_COM1),  # 0001 mov dx, 0x3F8 : COM1 THR
        b"\xB0" + PROBE_START,  # 0004 mov al, 'S'
        b"\xEE",  # 0006 out dx, al           : start marker
        b"\x66\xB9" + struct.pack("<I", iterations),  # 0007 mov ecx, iterations
        b"\x66\x49",  # 000D loop: dec ecx    : no exits: native speed under KVM
        b"\x75\xFC",  # 000F jnz loop (-4)
        b"\xB0" + PROBE_END,  # 0011 mov al, 'K'
        b"\xEE",  # 0013 out dx, al           : end marker
        b"\xB0" + bytes([X86_DEBUG_EXIT_VALUE]),  # 0014 mov al, 0x10
        b"\xE6" + bytes([X86_DEBUG_EXIT_PORT]),  # 0016 out 0xF4, al : isa-debug-exit
        b"\xF4",  # 0018 hlt
        b"\xEB\xFD",  # 0019 jmp 0x0018 (-3)
    ])
    img = bytearray(b"\xF4" * X86_BIOS_SIZE)
    img[: len(code)] = code
    # Reset vector (CPU starts at F000:FFF0): a far jump to F000:0000 loads a real-mode CS
    # (base 0xF0000, the BIOS alias below 1 MiB) as every real BIOS does.
    img[X86_RESET_OFFSET : X86_RESET_OFFSET + 5] = b"\xEA\x00\x00\x00\xF0"
    return bytes(img)


def probe_image(guest_arch: str, iterations: int = PROBE_LOOP_ITERATIONS) -> bytes:
    if guest_arch == "aarch64":
        return aarch64_probe_image(iterations)
    if guest_arch == "x86_64":
        return x86_64_probe_image(iterations)
    raise ValueError(f"no probe for guest arch {guest_arch!r}")


def probe_argv(guest_arch: str, binary: str, image: str, accel: str = "kvm") -> list[str]:
    """The probe's command line; mirrors the launch argv (machine, ``-cpu host`` for kvm/hvf)."""
    common = ["-nodefaults", "-no-user-config", "-display", "none", "-smp", "1"]
    if guest_arch == "aarch64":
        machine = "virt,gic-version=max" if accel in ("kvm", "hvf") else "virt"
        cpu = "host" if accel in ("kvm", "hvf") else "cortex-a76"
        return [binary, *common, "-M", machine, "-accel", accel, "-cpu", cpu, "-m", "64",
                "-kernel", image, "-serial", "stdio"]
    if guest_arch == "x86_64":
        cpu = "host" if accel in ("kvm", "hvf") else "qemu64"
        return [binary, *common, "-M", "q35", "-accel", accel, "-cpu", cpu, "-m", "16",
                "-bios", image, "-serial", "stdio",
                "-device", f"isa-debug-exit,iobase={X86_DEBUG_EXIT_PORT:#x},iosize=0x04"]
    raise ValueError(f"no probe for guest arch {guest_arch!r}")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    seconds: float  # spawn to exit (or kill)
    loop_seconds: float | None  # start marker to end marker, None if the loop never finished
    output: bytes = b""
    returncode: int | None = None


def judge_probe(
    guest_arch: str,
    output: bytes,
    returncode: int | None,
    loop_seconds: float | None,
    seconds: float,
    stderr: str = "",
    *,
    loop_budget: float = PROBE_LOOP_BUDGET_S,
    deadline: float = PROBE_DEADLINE_S,
) -> ProbeResult:
    """Decide from what a probe run produced; success needs all of: both markers, the loop
    within budget, QEMU's expected exit code, everything before the deadline."""
    err = stderr.strip().splitlines()[0][:200] if stderr.strip() else ""

    def fail(why: str) -> ProbeResult:
        return ProbeResult(False, why + (f" (qemu: {err})" if err else ""), seconds,
                           loop_seconds, output, returncode)

    if PROBE_START not in output:
        if returncode is None:
            return fail(f"no guest output within {deadline:.1f} s")
        return fail(f"qemu exited {returncode} before the guest printed anything")
    if loop_seconds is None:
        return fail(f"a {PROBE_LOOP_ITERATIONS:,}-iteration compute loop did not finish within "
                    f"{loop_budget:.2f} s: guest code is emulated, not run natively")
    if loop_seconds > loop_budget:
        return fail(f"the compute loop took {loop_seconds:.2f} s (budget {loop_budget:.2f} s): "
                    "guest code is emulated, not run natively")
    if returncode is None:
        return fail(f"the guest did not power off within {deadline:.1f} s")
    expected = PROBE_EXIT_CODES[guest_arch]
    if returncode != expected:
        return fail(f"qemu exited {returncode}, expected {expected}")
    ok = f"probe boot ok in {seconds:.2f} s (loop {loop_seconds * 1000:.0f} ms)"
    return ProbeResult(True, ok, seconds, loop_seconds, output, returncode)


async def run_probe(
    guest_arch: str,
    binary: str,
    accel: str = "kvm",
    *,
    iterations: int = PROBE_LOOP_ITERATIONS,
    loop_budget: float = PROBE_LOOP_BUDGET_S,
    deadline: float = PROBE_DEADLINE_S,
) -> ProbeResult:
    """Boot the probe guest for real; QEMU is killed as soon as the verdict is known."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="infrasim-probe-") as tmp:
        image = Path(tmp) / ("probe.bin" if guest_arch == "aarch64" else "bios.bin")
        image.write_bytes(probe_image(guest_arch, iterations))
        argv = probe_argv(guest_arch, binary, str(image), accel)
        t0 = loop.time()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=tmp, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            return ProbeResult(False, f"cannot run {binary}: {exc}", 0.0, None)
        assert proc.stdout is not None and proc.stderr is not None
        out = b""
        t_start: float | None = None
        loop_seconds: float | None = None
        try:
            while PROBE_END not in out:
                limit = t0 + deadline
                if t_start is not None:
                    limit = min(limit, t_start + loop_budget)
                remaining = limit - loop.time()
                if remaining <= 0:
                    break
                try:
                    chunk = await asyncio.wait_for(proc.stdout.read(256), remaining)
                except TimeoutError:
                    break
                if not chunk:
                    break  # EOF: QEMU exited
                out += chunk
                if t_start is None and PROBE_START in out:
                    t_start = loop.time()
            if PROBE_END in out and t_start is not None:
                loop_seconds = loop.time() - t_start
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), max(0.0, t0 + deadline - loop.time()))
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        elapsed = loop.time() - t0
        stderr = (await proc.stderr.read()).decode(errors="replace")
        # A kill is not an exit code the guest chose.
        rc = proc.returncode if proc.returncode is not None and proc.returncode >= 0 else None
        return judge_probe(guest_arch, out, rc, loop_seconds, elapsed, stderr,
                           loop_budget=loop_budget, deadline=deadline)


# --- detection -----------------------------------------------------------------------------


async def _run(argv: list[str], timeout: float = _CMD_TIMEOUT_S) -> tuple[int | None, str]:
    """Run a short command; (returncode or None on timeout/failure to start, stdout+stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        return None, str(exc)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, f"timed out after {timeout:.0f} s"
    return proc.returncode, out.decode(errors="replace")


def _host_os() -> str:
    return platform.system().lower()


async def _host_arch(os_name: str) -> str:
    """The machine's real arch: a Python running under Rosetta reports x86_64 on Apple
    Silicon, which would wrongly rule out HVF for aarch64 guests."""
    arch = normalise_arch(platform.machine())
    if os_name == "darwin" and arch == "x86_64":
        rc, out = await _run(["sysctl", "-n", "hw.optional.arm64"])
        if rc == 0 and out.strip() == "1":
            return "aarch64"
    return arch


def _search_dirs(qemu_path: str, os_name: str) -> list[str]:
    dirs: list[str] = []
    if qemu_path:
        dirs.append(os.path.dirname(os.path.abspath(qemu_path)))
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    if os_name == "darwin":
        dirs += list(MACOS_EXTRA_DIRS)
    return list(dict.fromkeys(dirs))


def _find(name: str, dirs: list[str]) -> str:
    found = shutil.which(name, path=os.pathsep.join(dirs))
    return os.path.abspath(found) if found else ""


def find_binaries(qemu_path: str, os_name: str) -> tuple[dict[str, str], str]:
    """(guest arch -> qemu-system path, qemu-img path); ``qemu_path`` wins for aarch64 and its
    directory is searched first for the others."""
    if qemu_path and not (os.path.isfile(qemu_path) and os.access(qemu_path, os.X_OK)):
        raise InvalidSpec("qemu_path", f"{qemu_path} is not an executable file; fix the setting "
                          "or leave it empty to search PATH")
    dirs = _search_dirs(qemu_path, os_name)
    binaries: dict[str, str] = {}
    for arch in GUEST_ARCHES:
        path = os.path.abspath(qemu_path) if arch == "aarch64" and qemu_path else ""
        path = path or _find(f"qemu-system-{arch}", dirs)
        if path:
            binaries[arch] = path
    return binaries, _find("qemu-img", dirs)


def _kvm_state() -> str:
    if not os.path.exists("/dev/kvm"):
        return "absent"
    return "rw" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "no-access"


def _identity(path: str) -> list[Any]:
    """What changes when a binary is upgraded (Homebrew swaps the symlink target, apt the file),
    so its version needs no subprocess to be known unchanged."""
    if not path:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return [path]
    return [path, os.path.realpath(path), st.st_mtime_ns, st.st_size]


def cache_key(qemu_path: str, os_name: str, arch: str, binaries: dict[str, str],
              qemu_img: str) -> dict[str, Any]:
    return {
        "schema": CACHE_SCHEMA,
        "os": os_name,
        "arch": arch,
        "kernel": os.uname().release,
        "kvm": _kvm_state(),
        "qemu_path": qemu_path,
        "binaries": {a: _identity(p) for a, p in sorted(binaries.items())},
        "qemu_img": _identity(qemu_img),
    }


def _load_cache(cache_file: Path, key: dict[str, Any]) -> HostFacts | None:
    try:
        data = json.loads(cache_file.read_text())
        if data.get("key") != key:
            return None
        return replace(HostFacts.from_json(data["facts"]), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, stale or corrupt: measure again


def _store_cache(cache_file: Path, key: dict[str, Any], facts: HostFacts) -> None:
    """Atomic replace, so a concurrent reader sees the old or the new verdict, never half."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "facts": facts.to_json()}, indent=2, sort_keys=True))
    os.replace(tmp, cache_file)


@dataclass
class _BinaryInfo:
    version: str = ""
    machines: list[str] = field(default_factory=list)
    accels: list[str] = field(default_factory=list)


async def _binary_info(path: str) -> _BinaryInfo:
    (_, ver), (_, mach), (_, acc) = await asyncio.gather(
        _run([path, "--version"]), _run([path, "-machine", "help"]), _run([path, "-accel", "help"])
    )
    return _BinaryInfo(parse_qemu_version(ver), parse_machine_help(mach), parse_accel_help(acc))


async def _hv_support() -> bool:
    rc, out = await _run(["sysctl", "-n", "kern.hv_support"])
    return rc == 0 and out.strip() == "1"


async def _verdict(guest_arch: str, os_name: str, arch: str, binary: str,
                   accels: list[str]) -> tuple[str, str]:
    """(accelerator, one-line reason) for one guest arch."""
    if not binary:
        return "tcg", f"tcg: qemu-system-{guest_arch} not installed"
    if os_name == "darwin":
        if arch != guest_arch:
            return "tcg", f"host is {arch}, guest {guest_arch}: hvf impossible; using tcg"
        if "hvf" not in accels:
            return "tcg", f"hvf: not compiled into {binary}; using tcg"
        if not await _hv_support():
            return "tcg", "hvf: kern.hv_support is not 1 (no Hypervisor.framework); using tcg"
        return "hvf", "hvf: kern.hv_support=1"
    if os_name != "linux":
        return "tcg", f"host os {os_name} has no supported accelerator; using tcg"
    if arch != guest_arch:
        return "tcg", f"host is {arch}, guest {guest_arch}: kvm impossible; using tcg"
    kvm = _kvm_state()
    if kvm == "absent":
        return "tcg", "kvm: /dev/kvm missing; using tcg"
    if kvm == "no-access":
        return "tcg", (f"kvm: /dev/kvm not readable/writable by uid {os.getuid()} "
                       "(join the kvm group); using tcg")
    if "kvm" not in accels:
        return "tcg", f"kvm: not compiled into {binary}; using tcg"
    result = await run_probe(guest_arch, binary, "kvm")
    if result.ok:
        return "kvm", f"kvm: {result.reason}"
    return "tcg", f"kvm: /dev/kvm present but probe boot failed: {result.reason}; using tcg"


async def detect_host(
    qemu_path: str = "", cache_file: Path | None = None, *, refresh: bool = False
) -> HostFacts:
    """Measure (or load from ``cache_file``) what this host can run; ``refresh`` re-probes."""
    os_name = _host_os()
    arch = await _host_arch(os_name)
    binaries, qemu_img = find_binaries(qemu_path, os_name)
    key = cache_key(qemu_path, os_name, arch, binaries, qemu_img)
    if cache_file is not None and not refresh:
        cached = _load_cache(cache_file, key)
        if cached is not None:
            return cached

    arches = sorted(binaries)
    infos = dict(zip(arches, await asyncio.gather(*(_binary_info(binaries[a]) for a in arches)),
                     strict=True))
    verdicts = await asyncio.gather(*(
        _verdict(g, os_name, arch, binaries.get(g, ""),
                 infos[g].accels if g in infos else []) for g in GUEST_ARCHES
    ))
    facts = HostFacts(
        os=os_name,
        arch=arch,
        qemu_binaries=dict(binaries),
        qemu_version=infos["aarch64"].version if "aarch64" in infos else "",
        qemu_img=qemu_img,
        accelerators={g: v[0] for g, v in zip(GUEST_ARCHES, verdicts, strict=True)},
        accel_reasons={g: v[1] for g, v in zip(GUEST_ARCHES, verdicts, strict=True)},
        machines={a: infos[a].machines for a in arches},
        detected_at=time.time(),
    )
    if cache_file is not None:
        with contextlib.suppress(OSError):  # the cache only saves time; never fail a start
            _store_cache(cache_file, key, facts)
    return facts
