"""The test guest kit: pure helpers (modinfo, module order, cpio) and real builds and boots.

The real tests build the kits from the Debian archive into the default guest cache (so reruns
are quick) and boot them under QEMU TCG; they skip when apt/dpkg-deb or QEMU are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import lzma
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from infrasim_tui.core import guest as guest_mod
from infrasim_tui.core.guest import (
    FAST_BOOT_APPEND,
    READY_BANNER,
    CpioEntry,
    GuestBuildError,
    GuestKit,
    build_guest,
    cpio_newc,
    default_cache_dir,
    find_cached_guest,
    modinfo_depends,
    module_name,
    order_modules,
    pack_entries,
    pack_tree,
    parse_modinfo,
    unwrap_kernel_image,
)

QEMU = shutil.which("qemu-system-aarch64")
HAVE_APT = all(shutil.which(tool) for tool in ("apt-get", "apt-cache", "dpkg-deb"))

needs_apt = pytest.mark.skipif(not HAVE_APT, reason="needs apt-get, apt-cache and dpkg-deb")
needs_qemu = pytest.mark.skipif(
    QEMU is None or not HAVE_APT, reason="needs qemu-system-aarch64 and apt"
)


# --------------------------------------------------------------------------------------------
# helpers: a fabricated kernel module, a newc reader


def fake_ko(strings: Sequence[str], *, elf_class: int = 2, big_endian: bool = False) -> bytes:
    """A minimal ELF relocatable with a .modinfo section holding ``strings``, NUL-separated,
    preceded by a decoy section that also looks like modinfo."""
    end = ">" if big_endian else "<"
    modinfo = b"".join(s.encode() + b"\0" for s in strings)
    decoy = b"depends=decoy\0"
    shstrtab = b"\0.text\0.modinfo\0.shstrtab\0"
    names = {".text": 1, ".modinfo": 7, ".shstrtab": 16}
    ehsize = 64 if elf_class == 2 else 52
    shentsize = 64 if elf_class == 2 else 40
    body = decoy + modinfo + shstrtab
    offsets = {
        ".text": ehsize,
        ".modinfo": ehsize + len(decoy),
        ".shstrtab": ehsize + len(decoy) + len(modinfo),
    }
    sizes = {".text": len(decoy), ".modinfo": len(modinfo), ".shstrtab": len(shstrtab)}
    shoff = ehsize + len(body)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([elf_class, 2 if big_endian else 1, 1]) + b"\0" * 9
    if elf_class == 2:
        header = ident + struct.pack(
            end + "HHIQQQIHHHHHH", 1, 183, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 4, 3
        )
        fmt = end + "IIQQQQIIQQ"
    else:
        header = ident + struct.pack(
            end + "HHIIIIIHHHHHH", 1, 40, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 4, 3
        )
        fmt = end + "IIIIIIIIII"
    sections = [struct.pack(fmt, *([0] * 10))]
    for name in (".text", ".modinfo", ".shstrtab"):
        sh_type = 3 if name == ".shstrtab" else 1
        sections.append(
            struct.pack(fmt, names[name], sh_type, 0, 0, offsets[name], sizes[name], 0, 0, 1, 0)
        )
    data = header + body
    data += b"\0" * (shoff - len(data))
    return data + b"".join(sections)


def read_newc(raw: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, rdev) of each member of an uncompressed newc archive."""
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    off = 0
    while True:
        assert raw[off : off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(raw[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = raw[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        data = raw[off : off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            assert off == len(raw)
            return out
        out.append((name, fields[1], data, (fields[9], fields[10])))


# --------------------------------------------------------------------------------------------
# pure helpers


def test_module_name() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("/x/virtio_net.ko.xz") == "virtio_net"
    assert module_name(Path("a/b/net_failover.ko.zst")) == "net_failover"
    assert module_name("failover.ko.gz") == "failover"


@pytest.mark.parametrize(("elf_class", "big_endian"), [(2, False), (1, False), (2, True)])
def test_parse_modinfo_elf(elf_class: int, big_endian: bool) -> None:
    ko = fake_ko(
        [
            "alias=virtio:d00000001v*",
            "depends=virtio_ring,virtio,net_failover",
            "name=virtio_net",
            "alias=virtio:d00000002v*",
            "vermagic=6.1.0 SMP mod_unload aarch64",
        ],
        elf_class=elf_class,
        big_endian=big_endian,
    )
    info = parse_modinfo(ko)
    assert info["name"] == ["virtio_net"]
    assert info["alias"] == ["virtio:d00000001v*", "virtio:d00000002v*"]
    # the section is used, not the decoy string elsewhere in the file
    assert info["depends"] == ["virtio_ring,virtio,net_failover"]
    assert modinfo_depends(info) == ["virtio_ring", "virtio", "net_failover"]


def test_parse_modinfo_plain_strings_and_empty_depends() -> None:
    info = parse_modinfo(b"license=GPL\0depends=\0name=failover\0\0junk\0")
    assert info == {"license": ["GPL"], "depends": [""], "name": ["failover"]}
    assert modinfo_depends(info) == []
    assert modinfo_depends({"depends": ["virtio-pci-legacy-dev,,virtio"]}) == [
        "virtio_pci_legacy_dev",
        "virtio",
    ]
    assert modinfo_depends({}) == []


DEPS = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci_modern_dev": [],
    "virtio_pci_legacy_dev": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
    "failover": [],
    "net_failover": ["failover"],
    "virtio_net": ["virtio_ring", "virtio", "net_failover"],
    "virtio_blk": ["virtio", "virtio_ring"],
}


def test_order_modules_dependencies_first() -> None:
    order = order_modules(["virtio_net", "virtio_pci", "virtio_blk"], DEPS)
    assert sorted(order) == sorted(DEPS)
    assert len(order) == len(set(order))
    for name, deps in DEPS.items():
        for dep in deps:
            assert order.index(dep) < order.index(name), (dep, name)
    # deterministic: the same inputs give the same order
    assert order == order_modules(["virtio_net", "virtio_pci", "virtio_blk"], DEPS)
    assert order[:4] == ["virtio_ring", "virtio", "failover", "net_failover"]


def test_order_modules_builtin_and_errors() -> None:
    # virtio and virtio_ring built in (the generic kernel): nothing to load for them
    deps = {"virtio_blk": [], "virtio_net": ["net_failover"], "net_failover": ["failover"]}
    deps["failover"] = []
    assert order_modules(
        ["virtio", "virtio_net", "virtio_blk"], deps, builtin={"virtio", "virtio_ring"}
    ) == ["failover", "net_failover", "virtio_net", "virtio_blk"]
    with pytest.raises(GuestBuildError, match=r"net_failover.*neither"):
        order_modules(["virtio_net"], {"virtio_net": ["net_failover"]})
    with pytest.raises(GuestBuildError, match="cycle: a -> b -> a"):
        order_modules(["a"], {"a": ["b"], "b": ["a"]})
    # '-' and '_' are the same in module names
    assert order_modules(["virtio-blk"], {"virtio_blk": []}) == ["virtio_blk"]


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "etc" / "deep").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o750)
    (root / "etc" / "a.conf").write_text("x=1\n")
    (root / "etc" / "deep" / "odd").write_bytes(b"abc")  # length not a multiple of 4
    (root / "bin" / "link").symlink_to("tool")
    (root / "empty").mkdir()


def test_cpio_reproducible(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    extra = [CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))]
    first = pack_tree(tree, extra)
    time.sleep(0.01)
    # other timestamps and permission bits that are not "executable" change nothing
    os.utime(tree / "etc" / "a.conf", (1, 1))
    (tree / "etc" / "a.conf").chmod(0o600)
    (tree / "extra-dir").mkdir()
    (tree / "extra-dir").rmdir()
    assert pack_tree(tree, extra) == first
    # a copy made at another time, in another place, gives the same bytes
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    assert pack_tree(copy, extra) == first
    # the gzip header has no name and no timestamp
    assert first[:2] == b"\x1f\x8b" and first[4:8] == b"\0\0\0\0"
    (copy / "etc" / "a.conf").write_text("x=2\n")
    assert pack_tree(copy, extra) != first

    members = read_newc(gzip.decompress(first))
    names = [m[0] for m in members]
    assert names == sorted(names)
    by_name = {m[0]: m for m in members}
    assert by_name["bin/tool"][1] == stat.S_IFREG | 0o755
    assert by_name["bin/tool"][2] == b"#!/bin/sh\necho hi\n"
    assert by_name["etc/a.conf"][1] == stat.S_IFREG | 0o644
    assert by_name["bin/link"][1] == stat.S_IFLNK | 0o777 and by_name["bin/link"][2] == b"tool"
    assert by_name["empty"][1] == stat.S_IFDIR | 0o755
    assert by_name["dev/console"][1:] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    assert by_name["etc/deep/odd"][2] == b"abc"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_cpio_readable_by_gnu_cpio(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    archive = gzip.decompress(pack_tree(tree))
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == sorted(
        ["bin", "bin/link", "bin/tool", "empty", "etc", "etc/a.conf", "etc/deep", "etc/deep/odd"]
    )
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=archive, cwd=out, check=True, capture_output=True
    )
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(out / "bin" / "link") == "tool"
    assert (out / "etc" / "deep" / "odd").read_bytes() == b"abc"


def test_compressed_modules_and_kernel_images() -> None:
    ko = fake_ko(["depends=failover", "name=net_failover"])
    for suffix, packed in ((".ko.xz", lzma.compress(ko)), (".ko.gz", gzip.compress(ko))):
        assert guest_mod._decompress_module(f"a/net_failover{suffix}", packed) == ko
    assert guest_mod._decompress_module("a/net_failover.ko", ko) == ko
    with pytest.raises(GuestBuildError, match="cannot decompress"):
        guest_mod._decompress_module("a/x.ko.xz", b"not xz")

    image = b"\0" * 56 + b"ARM\x64" + b"kernel" * 100
    assert unwrap_kernel_image(image) == image
    assert unwrap_kernel_image(gzip.compress(image)) == image
    payload = gzip.compress(image)
    header = b"MZ\0\0zimg" + struct.pack("<II", 64, len(payload)) + b"\0" * 8 + b"gzip"
    zboot = header.ljust(64, b"\0") + payload + b"\0" * 16
    assert unwrap_kernel_image(zboot) == image
    with pytest.raises(GuestBuildError, match="not an arm64 Image"):
        unwrap_kernel_image(b"\x7fELF" + b"\0" * 100)


def test_cpio_rejects_bad_names() -> None:
    for bad in ("", "/", "a/../b", "./x"):
        with pytest.raises(ValueError):
            cpio_newc([CpioEntry(bad, stat.S_IFREG | 0o644)])


def test_kernel_package_from_meta_depends() -> None:
    spec = guest_mod._flavour("cloud")
    meta = {"Depends": "linux-image-6.1.0-56-cloud-arm64 (= 6.1.192-2)"}
    assert guest_mod._kernel_package(meta, spec) == "linux-image-6.1.0-56-cloud-arm64"
    spec = guest_mod._flavour("generic")
    meta = {"Depends": "linux-image-6.12.43+deb13-arm64 (= 6.12.43-1) | foo, bar"}
    assert guest_mod._kernel_package(meta, spec) == "linux-image-6.12.43+deb13-arm64"
    with pytest.raises(GuestBuildError, match="archive layout"):
        guest_mod._kernel_package({"Depends": "linux-image-arm64-unsigned"}, spec)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFRASIM_GUEST_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("INFRASIM_GUEST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "infrasim" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().parts[-2:] == ("infrasim", "guest")


def test_unknown_flavour_and_empty_offline_cache(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="unknown guest flavour"):
        build_guest("x86", tmp_path)
    with pytest.raises(GuestBuildError, match="no cached cloud guest kit"):
        build_guest("cloud", tmp_path, offline=True)
    assert find_cached_guest("generic", tmp_path) is None


def test_missing_apt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(GuestBuildError, match=r"Debian or Ubuntu host.*prebuilt kit"):
        build_guest("cloud", tmp_path / "cache")


def test_incomplete_kits_are_ignored(tmp_path: Path) -> None:
    kit = tmp_path / "kits" / "cloud-6.1.0-1-cloud-arm64-0123456789ab"
    kit.mkdir(parents=True)
    (kit / "vmlinuz").write_bytes(b"kernel")
    (kit / "initrd.img").write_bytes(b"initrd")
    assert find_cached_guest("cloud", tmp_path) is None  # no kit.json: a killed build
    (kit / "kit.json").write_text(
        '{"format": 1, "flavour": "cloud", "kernel_version": "6.1.0-1-cloud-arm64",'
        ' "cache_key": "0123456789abcdef", "kernel": "vmlinuz", "initrd": "initrd.img",'
        ' "dtb": null, "sizes": {"vmlinuz": 6, "initrd.img": 999}, "built_at_epoch": 1}'
    )
    assert find_cached_guest("cloud", tmp_path) is None  # truncated initrd
    (kit / "initrd.img").write_bytes(b"x" * 999)
    found = find_cached_guest("cloud", tmp_path)
    assert found is not None and found.kernel == kit / "vmlinuz" and found.dtb is None
    assert build_guest("cloud", tmp_path, offline=True) == found
    assert find_cached_guest("generic", tmp_path) is None


# --------------------------------------------------------------------------------------------
# real builds


@pytest.fixture(scope="module")
def kit_cloud() -> GuestKit:
    if not HAVE_APT:
        pytest.skip("needs apt-get, apt-cache and dpkg-deb")
    return build_guest("cloud")


@pytest.fixture(scope="module")
def kit_generic() -> GuestKit:
    if not HAVE_APT:
        pytest.skip("needs apt-get, apt-cache and dpkg-deb")
    return build_guest("generic")


def initrd_members(kit: GuestKit) -> dict[str, tuple[int, bytes]]:
    raw = gzip.decompress(kit.initrd.read_bytes())
    return {name: (mode, data) for name, mode, data, _ in read_newc(raw)}


@needs_apt
def test_cloud_kit_contents(kit_cloud: GuestKit) -> None:
    kit = kit_cloud
    assert kit.flavour == "cloud" and kit.dtb is None
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-arm64", kit.kernel_version), kit.kernel_version
    assert kit.kernel.read_bytes()[56:60] == b"ARMd"  # arm64 Image header magic
    members = initrd_members(kit)
    assert members["init"][0] == stat.S_IFREG | 0o755
    assert READY_BANNER.encode() in members["init"][1]
    moddir = f"lib/modules/{kit.kernel_version}"
    order = members[f"{moddir}/infrasim.order"][1].decode().split()
    for needed in ("virtio", "virtio_ring", "virtio_pci", "virtio_mmio", "virtio_net"):
        assert needed in order
    for needed in ("virtio_blk", "net_failover", "failover", "virtio_pci_modern_dev"):
        assert needed in order
    for name in order:  # every module after its dependencies
        deps = modinfo_depends(parse_modinfo(members[f"{moddir}/{name}.ko"][1]))
        assert all(order.index(dep) < order.index(name) for dep in deps), (name, deps)
    assert kit.to_json() == {
        "flavour": "cloud",
        "kernel": str(kit.kernel),
        "initrd": str(kit.initrd),
        "dtb": None,
        "kernel_version": kit.kernel_version,
        "cache_key": kit.cache_key,
    }


@needs_apt
def test_generic_kit_contents(kit_generic: GuestKit) -> None:
    kit = kit_generic
    assert kit.flavour == "generic"
    assert kit.dtb is not None and kit.dtb.name == "bcm2837-rpi-3-b.dtb"
    assert kit.dtb.read_bytes()[:4] == b"\xd0\x0d\xfe\xed"  # FDT magic
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-arm64", kit.kernel_version), kit.kernel_version
    order = initrd_members(kit)[f"lib/modules/{kit.kernel_version}/infrasim.order"][1].split()
    assert b"gpio_keys" in order and b"evdev" in order and b"virtio_net" in order


@needs_apt
def test_build_is_cached_and_idempotent(kit_cloud: GuestKit, tmp_path: Path) -> None:
    start = time.monotonic()
    again = build_guest("cloud")
    assert again == kit_cloud
    assert time.monotonic() - start < 5
    assert find_cached_guest("cloud") == kit_cloud
    assert build_guest("cloud", offline=True) == kit_cloud
    # a kit cache is relocatable: a copy works as a prebuilt kit path
    kit_dir = kit_cloud.kernel.parent
    copy = tmp_path / "prebuilt"
    shutil.copytree(kit_dir, copy / "kits" / kit_dir.name)
    moved = build_guest("cloud", copy, offline=True)
    assert moved.kernel == copy / "kits" / kit_dir.name / "vmlinuz"
    assert moved.cache_key == kit_cloud.cache_key


@needs_apt
def test_concurrent_builds_wait_for_the_lock(kit_cloud: GuestKit) -> None:
    cache = kit_cloud.kernel.parent.parent.parent
    messages: list[str] = []
    results: list[GuestKit] = []
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another "build" holds the lock
        worker = threading.Thread(
            target=lambda: results.append(build_guest("cloud", cache, progress=messages.append))
        )
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not results
        assert any("waiting for another guest build" in m for m in messages)
    finally:
        os.close(fd)
    worker.join(timeout=60)
    assert results == [kit_cloud]


# --------------------------------------------------------------------------------------------
# booting the kits under QEMU


class Guest:
    """A running QEMU guest: its console (unix socket) and QMP."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        qmp: object,
        workdir: Path,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.qmp = qmp
        self.workdir = workdir
        self.buf = b""
        self.pos = 0
        self.started = time.monotonic()

    async def expect(self, pattern: bytes, timeout: float) -> re.Match[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while True:
            match = regex.search(self.buf, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                break
            if not data:
                break
            self.buf += data
        tail = self.buf[-3000:].decode(errors="replace")
        raise AssertionError(f"no {pattern!r} on the console within {timeout} s:\n{tail}")

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()

    async def run(self, command: str, timeout: float = 10) -> str:
        """Run a shell command, return its output (the lines between two markers)."""
        tag = f"M{time.monotonic_ns()}"
        # The markers are printed by printf, so the echoed command line never matches them.
        await self.send(f"printf '%s\\n' {tag}-A; {command}; printf '%s\\n' {tag}-Z")
        await self.expect(rf"^{tag}-A\r?\n".encode(), timeout)
        match = await self.expect(rf"(?s)(.*?)^{tag}-Z\r?\n".encode(), timeout)
        return match.group(1).decode(errors="replace").replace("\r\n", "\n")


@contextlib.asynccontextmanager
async def booted(
    kit: GuestKit,
    *,
    raspi: bool = False,
    append: str = "",
    extra: Sequence[str] = (),
) -> AsyncIterator[Guest]:
    from qemu.qmp import ConnectError, QMPClient

    assert QEMU is not None
    workdir = Path(tempfile.mkdtemp(prefix="igt-", dir="/tmp"))  # short socket paths
    qmp_path, serial_path = workdir / "qmp.sock", workdir / "serial.sock"
    if raspi:
        assert kit.dtb is not None
        machine = ["-M", "raspi3b", "-m", "1024", "-smp", "4", "-accel", "tcg,thread=single"]
        machine += ["-dtb", str(kit.dtb), "-serial", "null", "-serial", "chardev:ser0"]
        console = "ttyS1"
    else:
        machine = ["-M", "virt", "-cpu", "cortex-a76", "-accel", "tcg", "-m", "256", "-smp", "1"]
        machine += ["-serial", "chardev:ser0"]
        console = "ttyAMA0"
    cmd = [
        QEMU,
        *machine,
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-kernel",
        str(kit.kernel),
        "-initrd",
        str(kit.initrd),
        "-append",
        f"console={console} {FAST_BOOT_APPEND} {append}".strip(),
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-chardev",
        f"socket,id=ser0,path={serial_path},server=on,wait=off,logfile={workdir}/serial.log",
        *extra,
    ]
    log = (workdir / "qemu.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    qmp = QMPClient("test-guest")
    writer: asyncio.StreamWriter | None = None
    try:
        # The socket files appear at bind(), a moment before QEMU listens: retry.
        deadline = time.monotonic() + 10
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(serial_path))
                await qmp.connect(str(qmp_path))
                break
            except (FileNotFoundError, ConnectionRefusedError, ConnectError):
                if writer is not None:
                    writer.close()
                    writer = None
                if proc.returncode is not None or time.monotonic() > deadline:
                    log.flush()
                    output = (workdir / "qemu.log").read_text(errors="replace")
                    raise AssertionError(f"QEMU did not start: {output}") from None
                await asyncio.sleep(0.02)
        guest = Guest(proc, reader, writer, qmp, workdir)
        await qmp.execute("cont")
        guest.started = time.monotonic()
        yield guest
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), 2)
        if writer is not None:
            writer.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def wait_banner(guest: Guest, timeout: float = 20) -> tuple[float, str]:
    match = await guest.expect(
        rb"^" + READY_BANNER.encode() + rb"\r?\n(kernel=\S+ hostname=\S+)\r?\n", timeout
    )
    return time.monotonic() - guest.started, match.group(1).decode()


@needs_qemu
@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_boot_cloud_virt(kit_cloud: GuestKit) -> None:
    async with booted(kit_cloud) as guest:
        seconds, info = await wait_banner(guest)
        print(f"cloud kit on virt: banner after {seconds:.2f} s")
        assert info == f"kernel={kit_cloud.kernel_version} hostname=guest"
        await guest.send("echo $((6*7))")
        await guest.expect(rb"^42\r?\n", 10)
        await guest.expect(rb"guest:/# ", 5)
        mounts = await guest.run("cat /proc/mounts")
        assert re.search(r"^tmpfs /tmp tmpfs", mounts, re.MULTILINE), mounts
        assert re.search(r"^devtmpfs /dev devtmpfs", mounts, re.MULTILINE), mounts
        loaded = await guest.run("cut -d' ' -f1 /proc/modules")
        assert {"virtio_pci", "virtio_net", "virtio_blk", "virtio_mmio"} <= set(loaded.split())
        # the console shell is respawned when it exits (what is typed before the new shell
        # prints its prompt is lost)
        await guest.send("exit")
        await guest.expect(rb"built-in shell \(ash\)", 10)
        await guest.expect(rb"guest:/# ", 10)
        assert (await guest.run("echo again")).strip() == "again"
        # poweroff inside the guest (busybox init) ends QEMU
        await guest.send("poweroff")
        await asyncio.wait_for(guest.proc.wait(), 15)


@needs_qemu
@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_boot_cloud_network_disk_hostname(kit_cloud: GuestKit, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"INFRASIM-DISK-MAGIC\n".ljust(1 << 20, b"\0"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    extra = [
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-10.0.2.20:8080",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-drive",
        f"file={disk},if=none,format=raw,id=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
    ]
    append = "infrasim.hostname=alpha infrasim.net=static:10.0.2.20/24,10.0.2.2"
    async with booted(kit_cloud, append=append, extra=extra) as guest:
        _, info = await wait_banner(guest)
        assert info.endswith("hostname=alpha")
        assert (await guest.run("hostname")).strip() == "alpha"
        assert "inet 10.0.2.20/24" in await guest.run("ip -4 addr show dev eth0")
        assert "default via 10.0.2.2" in await guest.run("ip route")
        assert (await guest.run("head -n 1 /dev/vda")).strip() == "INFRASIM-DISK-MAGIC"
        await guest.run(
            "mkdir -p /tmp/www && echo hello-from-guest >/tmp/www/index.html"
            " && httpd -p 8080 -h /tmp/www"
        )

        def fetch() -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                body: bytes = resp.read()
                return body

        assert (await asyncio.to_thread(fetch)).strip() == b"hello-from-guest"


@needs_qemu
@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_boot_cloud_default_network(kit_cloud: GuestKit) -> None:
    extra = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    async with booted(kit_cloud, extra=extra) as guest:
        await wait_banner(guest)
        assert "inet 10.0.2.15/24" in await guest.run("ip -4 addr show dev eth0")
        assert "nameserver 10.0.2.3" in await guest.run("cat /etc/resolv.conf")
        # user-mode networking answers pings to its gateway
        assert " 0% packet loss" in await guest.run("ping -c 1 -W 5 10.0.2.2", timeout=15)


@needs_qemu
@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_boot_cloud_dhcp(kit_cloud: GuestKit) -> None:
    extra = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    async with booted(kit_cloud, append="infrasim.net=dhcp", extra=extra) as guest:
        await wait_banner(guest)
        # udhcpc runs in the background: the lease may come a moment after the banner
        address = await guest.run(
            "for i in 1 2 3 4 5 6 7 8 9 10; do ip -4 addr show dev eth0 | grep -q inet && break;"
            " sleep 0.5; done; ip -4 addr show dev eth0; ip route",
            timeout=15,
        )
        assert "inet 10.0.2.15/24" in address and "default via 10.0.2.2" in address, address


@needs_qemu
@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_boot_generic_virt_powerdown(kit_generic: GuestKit) -> None:
    async with booted(kit_generic) as guest:
        seconds, info = await wait_banner(guest)
        print(f"generic kit on virt: banner after {seconds:.2f} s")
        assert info == f"kernel={kit_generic.kernel_version} hostname=guest"
        await guest.send("echo $((6*7))")
        await guest.expect(rb"^42\r?\n", 10)
        assert "acpid" in await guest.run("ps")
        from qemu.qmp import QMPClient

        assert isinstance(guest.qmp, QMPClient)
        start = time.monotonic()
        await guest.qmp.execute("system_powerdown")
        await asyncio.wait_for(guest.proc.wait(), 10)
        print(f"generic kit: system_powerdown -> QEMU exit in {time.monotonic() - start:.2f} s")
        assert guest.proc.returncode == 0
        events = [event["event"] for event in guest.qmp.events.clear()]
        assert "POWERDOWN" in events and "SHUTDOWN" in events, events


@needs_qemu
@pytest.mark.qemu
@pytest.mark.timeout(90)
async def test_boot_generic_raspi3b(kit_generic: GuestKit) -> None:
    async with booted(kit_generic, raspi=True) as guest:
        seconds, info = await wait_banner(guest, timeout=25)
        print(f"generic kit on raspi3b: banner after {seconds:.2f} s")
        assert info == f"kernel={kit_generic.kernel_version} hostname=guest"
        await guest.send("echo $((6*7))")
        await guest.expect(rb"^42\r?\n", 10)
        assert "Raspberry Pi 3 Model B" in await guest.run("cat /proc/device-tree/model; echo")


def test_initramfs_entries_reproducible() -> None:
    """The real initramfs assembly (fixed inputs) is byte-identical run to run."""
    kwargs = {
        "busybox": b"\x7fELF fake busybox",
        "kernel_version": "6.1.0-1-cloud-arm64",
        "modules": [("virtio_ring", b"ko1"), ("virtio", b"ko2")],
        "info": "flavour=cloud\n",
    }
    first = pack_entries(guest_mod._initramfs_entries(**kwargs))  # type: ignore[arg-type]
    second = pack_entries(guest_mod._initramfs_entries(**kwargs))  # type: ignore[arg-type]
    assert first == second
    members = {m[0]: m for m in read_newc(gzip.decompress(first))}
    assert members["lib/modules/6.1.0-1-cloud-arm64/infrasim.order"][2] == b"virtio_ring\nvirtio\n"
    assert members["dev/console"][3] == (5, 1)
    assert members["init"][2].startswith(b"#!/bin/busybox sh\n")
