"""The test guest kit: a tiny, real aarch64 Linux guest built from the Debian archive.

Two flavours, each a kernel + a busybox initramfs (and, for ``generic``, a Raspberry Pi 3B
device tree):

``cloud``
    ``linux-image-<abi>-cloud-arm64``: small, boots fastest, has the TPM TIS driver, but no
    GPIO power key (``system_powerdown`` is ignored when booted with a device tree).
``generic``
    ``linux-image-<abi>-arm64``: has the GPIO power key (busybox ``acpid`` turns QMP
    ``system_powerdown`` into a power-off) and the Raspberry Pi support; ships
    ``bcm2837-rpi-3-b.dtb`` for ``-M raspi3b``.

Packages are fetched with ``apt-get download`` against a *private* arm64 package index kept
inside the cache (``-o APT::Architecture=arm64 -o Dir::State::Lists=...``), so the host's dpkg
architectures and package lists are never touched. The host's apt sources are used, unless
``$INFRASIM_GUEST_APT_SOURCES`` names another sources file (``.list``, or deb822 ``.sources``).
Only the standard library is imported.

Cache layout (``default_cache_dir()``)::

    .lock                      flock held while a build runs
    apt/                       private apt.conf, arm64 lists (~19 MB), pkgcache (~36 MB)
    debs/                      downloaded .deb files still referenced by a kit
    kits/<flavour>-<kernel_version>-<key12>/
        kit.json               written last; a kit without it (or with wrong sizes) is ignored
        vmlinuz  initrd.img  [bcm2837-rpi-3-b.dtb]
    tmp/                       builds in progress (renamed into kits/ when complete)

The initramfs ``/init`` understands these kernel parameters:

``infrasim.net=static:IP/PREFIX[,GW[,DNS]]`` | ``dhcp`` | ``none``
    eth0 configuration; default when eth0 exists: ``static:10.0.2.15/24,10.0.2.2,10.0.2.3``
    (QEMU user-mode networking's defaults).
``infrasim.netN=dhcp`` | ``static:IP/PREFIX[,GW[,DNS]]`` | ``none`` (N >= 1)
    ethN (a segment network's NIC); default ``dhcp``: the switch answers. Each ethN is set
    up in numeric order; DHCP runs ``udhcpc -b`` in the background (the boot never waits;
    it keeps renewing; its output goes to ``/tmp/udhcpc.ethN.log``). A lease or static
    config replaces eth0's default route only when it carries a router/gateway.
``infrasim.hostname=NAME``
    the guest's hostname (default ``guest``).
``infrasim.debug``
    trace /init (``set -x``).

It loads the virtio modules, mounts devtmpfs, proc, sysfs, devpts and tmpfs (/tmp, /run),
starts ``acpid`` when there is an input device (the generic kernel's power key on ``virt``),
prints an empty line, ``INFRASIM-GUEST-READY`` and ``kernel=<uname -r> hostname=<name>`` on
the console, then hands over to busybox ``init``, which respawns ``cttyhack sh -l`` on the
console forever (prompt ``guest:<cwd># ``; input typed while a new shell starts is lost);
``poweroff``/``reboot`` inside the guest work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import Unavailable
from .fsutil import fsync_dir

__all__ = [
    "FAST_BOOT_APPEND",
    "FLAVOURS",
    "READY_BANNER",
    "CpioEntry",
    "GuestBuildError",
    "GuestKit",
    "build_guest",
    "cpio_newc",
    "default_cache_dir",
    "find_cached_guest",
    "gzip_reproducible",
    "modinfo_depends",
    "module_name",
    "order_modules",
    "pack_entries",
    "pack_tree",
    "parse_modinfo",
    "unwrap_kernel_image",
]

READY_BANNER = "INFRASIM-GUEST-READY"
# Suggested extra kernel arguments: ``cryptomgr.notests`` skips the crypto self-tests, which take
# about 0.5-0.9 s of a ~2 s boot under TCG; ``quiet`` keeps the console for the guest's output.
FAST_BOOT_APPEND = "quiet cryptomgr.notests"
FLAVOURS = ("cloud", "generic")

# Bump when the layout of a kit or of the initramfs changes in a way the inputs below miss.
KIT_FORMAT = 1
KIT_META = "kit.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
RASPI3B_DTB = "bcm2837-rpi-3-b.dtb"
BUSYBOX_PACKAGE = "busybox-static"
ARCH = "arm64"
# apt-get update is skipped when the private lists are younger than this.
LISTS_MAX_AGE = 6 * 3600.0
# Kits kept per flavour (the newest ones); older kits and their .debs are deleted.
KEEP_KITS = 2
# Fixed mtime of every initramfs entry (reproducible output).
CPIO_MTIME = 0

# virtio drivers loaded by /init (in dependency order); the optional ones may be missing.
_VIRTIO_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
)
_OPTIONAL_MODULES = frozenset({"virtio_console", "virtio_rng"})
# Modules that the wanted ones are known to depend on: kept during the first pass over the
# kernel package so that a second pass is only needed when a future kernel adds a dependency.
_KNOWN_DEPENDENCIES = frozenset(
    {"virtio_pci_modern_dev", "virtio_pci_legacy_dev", "net_failover", "failover"}
)


@dataclass(frozen=True)
class _Flavour:
    name: str
    meta_package: str  # its Depends names the current linux-image-<abi>-... package
    kernel_suffix: str  # "-cloud-arm64": the kernel package is linux-image-<abi><suffix>
    modules: tuple[str, ...]
    dtb: str | None  # basename of a device tree shipped by the kernel package


_FLAVOURS = {
    "cloud": _Flavour(
        name="cloud",
        meta_package="linux-image-cloud-arm64",
        kernel_suffix="-cloud-arm64",
        modules=_VIRTIO_MODULES,
        dtb=None,
    ),
    "generic": _Flavour(
        name="generic",
        meta_package="linux-image-arm64",
        kernel_suffix="-arm64",
        # evdev + gpio_keys: QEMU virt's GPIO power key -> /dev/input/event0 -> acpid.
        modules=(*_VIRTIO_MODULES, "evdev", "gpio_keys"),
        dtb=RASPI3B_DTB,
    ),
}


class GuestBuildError(Unavailable):
    """The guest kit could not be built or found; the message says what to do."""


@dataclass(frozen=True)
class GuestKit:
    """A built guest: boot it with ``-kernel kernel -initrd initrd [-dtb dtb]``."""

    flavour: str
    kernel: Path
    initrd: Path
    dtb: Path | None
    kernel_version: str
    cache_key: str

    def to_json(self) -> dict[str, str | None]:
        return {
            "flavour": self.flavour,
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "dtb": None if self.dtb is None else str(self.dtb),
            "kernel_version": self.kernel_version,
            "cache_key": self.cache_key,
        }


# --------------------------------------------------------------------------------------------
# Cache location


def default_cache_dir() -> Path:
    """``$INFRASIM_GUEST_CACHE``, else ``$XDG_CACHE_HOME/infrasim/guest``, else the platform's
    user cache dir (``~/Library/Caches`` on macOS, ``~/.cache`` elsewhere) + ``infrasim/guest``.
    """
    explicit = os.environ.get("INFRASIM_GUEST_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(os.path.expanduser(xdg)):
        return Path(xdg).expanduser() / "infrasim" / "guest"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "infrasim" / "guest"
    return Path.home() / ".cache" / "infrasim" / "guest"


def _resolve_cache_dir(cache_dir: Path | str | None) -> Path:
    path = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return Path(os.path.abspath(path))


def _flavour(flavour: str) -> _Flavour:
    try:
        return _FLAVOURS[flavour]
    except KeyError:
        raise GuestBuildError(
            f"unknown guest flavour {flavour!r}; choose one of: {', '.join(FLAVOURS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Kernel modules: .modinfo parsing and dependency order (pure functions)

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_MODINFO_KEY = re.compile(rb"[A-Za-z_][A-Za-z0-9_.]*")


def module_name(path: str | Path) -> str:
    """``.../virtio-rng.ko.xz`` -> ``virtio_rng`` (the kernel treats ``-`` and ``_`` alike)."""
    base = os.path.basename(str(path))
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of section ``wanted`` of an ELF file, or None (not ELF / no such section)."""
    if len(data) < 0x40 or data[:4] != b"\x7fELF":
        return None
    elf_class, elf_data = data[4], data[5]
    if elf_data not in (1, 2) or elf_class not in (1, 2):
        return None
    end = "<" if elf_data == 1 else ">"
    try:
        if elf_class == 2:
            (shoff,) = struct.unpack_from(end + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
            header = end + "IIQQQQ"  # name, type, flags, addr, offset, size
        else:
            (shoff,) = struct.unpack_from(end + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
            header = end + "IIIIII"
        if shoff == 0 or shnum == 0 or shstrndx >= shnum:
            return None

        def section(index: int) -> tuple[int, int, int]:
            name, _type, _flags, _addr, offset, size = struct.unpack_from(
                header, data, shoff + index * shentsize
            )
            return name, offset, size

        _, str_off, str_size = section(shstrndx)
        strtab = data[str_off : str_off + str_size]
        target = wanted.encode()
        for index in range(shnum):
            name_off, offset, size = section(index)
            end_name = strtab.find(b"\0", name_off)
            if end_name < 0:
                continue
            if strtab[name_off:end_name] == target:
                if offset + size > len(data):
                    return None
                return data[offset : offset + size]
    except struct.error:
        return None
    return None


def parse_modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a kernel module's ``.modinfo`` section.

    ``data`` is a whole (uncompressed) ``.ko`` ELF file, or else just the NUL-separated
    ``key=value`` strings. Keys may repeat (``alias``, ``parm``...): values are kept in order.
    """
    section = _elf_section(data, ".modinfo")
    blob = data if section is None else section
    info: dict[str, list[str]] = {}
    for raw in blob.split(b"\0"):
        key, sep, value = raw.partition(b"=")
        if not sep or not _MODINFO_KEY.fullmatch(key):
            continue
        info.setdefault(key.decode("ascii"), []).append(value.decode("utf-8", "replace"))
    return info


def modinfo_depends(info: Mapping[str, Sequence[str]]) -> list[str]:
    """Module names from ``depends=`` (comma-separated; empty when the module needs none)."""
    out: list[str] = []
    for value in info.get("depends", ()):
        for dep in value.split(","):
            dep = dep.strip().replace("-", "_")
            if dep and dep not in out:
                out.append(dep)
    return out


def order_modules(
    wanted: Iterable[str],
    depends: Mapping[str, Sequence[str]],
    builtin: Collection[str] = (),
) -> list[str]:
    """The modules to load for ``wanted``, each after the modules it depends on.

    ``depends`` maps every available module to its dependencies; names in ``builtin`` are
    compiled into the kernel and need no loading. The order is deterministic (depth-first,
    following ``wanted`` and each ``depends`` list in order). Raises :class:`GuestBuildError`
    for a module that is neither available nor built in, and for dependency cycles.
    """
    order: list[str] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in active:
            cycle = " -> ".join([*active[active.index(name) :], name])
            raise GuestBuildError(f"kernel module dependency cycle: {cycle}")
        if name not in depends:
            if name in builtin:
                done.add(name)
                return
            chain = " -> ".join([*active, name])
            raise GuestBuildError(
                f"kernel module {name!r} ({chain}) is neither a module of this kernel "
                "nor built into it"
            )
        active.append(name)
        for dep in depends[name]:
            visit(dep)
        active.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


# --------------------------------------------------------------------------------------------
# Reproducible cpio (newc) + gzip


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o644``);
    ``data`` is a file's contents or a symlink's target; ``rdev`` (major, minor) for devices."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _cpio_header(ino: int, entry: CpioEntry, name: bytes, size: int, nlink: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        CPIO_MTIME,
        size,
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,  # check
    )
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed ``cpio -H newc`` archive of ``entries``.

    Reproducible: entries are sorted by name (so parents precede children), owned by root,
    dated :data:`CPIO_MTIME`, with inode numbers assigned in that order.
    """
    out = io.BytesIO()
    by_name: dict[str, CpioEntry] = {}
    for entry in entries:
        name = entry.name.strip("/")
        if not name or name in (".", "..") or any(p in ("", ".", "..") for p in name.split("/")):
            raise ValueError(f"bad cpio member name {entry.name!r}")
        by_name[name] = dataclasses.replace(entry, name=name)
    for ino, name in enumerate(sorted(by_name), start=1):
        entry = by_name[name]
        raw_name = name.encode()
        data = entry.data if stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode) else b""
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        header = _cpio_header(ino, entry, raw_name, len(data), nlink)
        out.write(header + raw_name + b"\0")
        out.write(_pad4(len(header) + len(raw_name) + 1))
        out.write(data)
        out.write(_pad4(len(data)))
    trailer = CpioEntry("TRAILER!!!", 0)
    raw_trailer = trailer.name.encode()
    header = _cpio_header(0, trailer, raw_trailer, 0, 1)
    out.write(header + raw_trailer + b"\0")
    out.write(_pad4(len(header) + len(raw_trailer) + 1))
    return out.getvalue()


def gzip_reproducible(data: bytes) -> bytes:
    """gzip without a name or a timestamp in the header (like ``gzip -n``)."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def pack_entries(entries: Iterable[CpioEntry]) -> bytes:
    """A reproducible gzipped newc archive of ``entries``."""
    return gzip_reproducible(cpio_newc(entries))


def pack_tree(root: Path, extra: Iterable[CpioEntry] = ()) -> bytes:
    """A reproducible gzipped newc archive of the tree under ``root`` (plus ``extra`` entries,
    which win over files of the same name).

    Only the tree's shape, contents, symlink targets and executable bits matter: owners,
    timestamps and other permission bits are normalised (dirs and executables 0755, other
    files 0644).
    """
    entries: dict[str, CpioEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(path))
                entries[rel] = CpioEntry(rel, stat.S_IFLNK | 0o777, target)
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = CpioEntry(rel, stat.S_IFDIR | 0o755)
            elif stat.S_ISREG(st.st_mode):
                perm = 0o755 if st.st_mode & 0o111 else 0o644
                entries[rel] = CpioEntry(rel, stat.S_IFREG | perm, path.read_bytes())
    for entry in extra:
        entries[entry.name.strip("/")] = entry
    return pack_entries(entries.values())


# --------------------------------------------------------------------------------------------
# The initramfs contents

_INIT_SCRIPT = r"""#!/bin/busybox sh
# /init of the InfraSim test guest (written by infrasim_tui.core.guest).
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run

read -r cmdline </proc/cmdline
# arg NAME: print the value of NAME=VALUE on the kernel command line (status 1 if absent)
arg() {
    set -f
    for word in $cmdline; do
        case "$word" in "$1"=*) echo "${word#*=}"; return 0 ;; esac
    done
    return 1
}
case " $cmdline " in *" infrasim.debug "*) set -x ;; esac

kver=$(uname -r)
while read -r mod; do
    insmod "/lib/modules/$kver/$mod.ko" >/dev/null 2>&1 || echo "infrasim: could not load $mod"
done <"/lib/modules/$kver/infrasim.order"

name=$(arg infrasim.hostname) || name=guest
hostname "$name"
echo "$name" >/etc/hostname
echo "127.0.0.1 localhost $name" >/etc/hosts

# net_static DEV IP/PREFIX[,GW[,DNS]]: a fixed address; a gateway becomes the default route
net_static() {
    dev=$1
    saved_ifs=$IFS
    IFS=,
    set -- $2
    IFS=$saved_ifs
    ip addr add "$1" dev "$dev" && ip link set "$dev" up
    [ -z "$2" ] || ip route replace default via "$2" dev "$dev"
    [ -z "$3" ] || echo "nameserver $3" >>/etc/resolv.conf
}

ip link set lo up
net=$(arg infrasim.net) || net=
if [ -e /sys/class/net/eth0 ] && [ "$net" != none ]; then
    [ -n "$net" ] || net=static:10.0.2.15/24,10.0.2.2,10.0.2.3
    case "$net" in
    dhcp)
        ip link set eth0 up
        udhcpc -i eth0 -s /etc/udhcpc.script -b -q -t 5 -T 1 >/dev/null 2>&1
        ;;
    static:*) net_static eth0 "${net#static:}" ;;
    *)
        echo "infrasim: ignoring infrasim.net=$net (use static:IP/PREFIX,GW[,DNS], dhcp or none)"
        ;;
    esac
fi

# Every further NIC (segment networks: eth1, eth2, ... in numeric order) asks the switch for
# its address by DHCP, in the background so that the boot never waits for it; udhcpc keeps
# running to renew the lease. infrasim.netN=static:IP/PREFIX[,GW[,DNS]] or none overrides.
for n in $(ls /sys/class/net | sed -n 's/^eth\([1-9][0-9]*\)$/\1/p' | sort -n); do
    dev=eth$n
    cfg=$(arg "infrasim.net$n") || cfg=dhcp
    case "$cfg" in
    none) ;;
    dhcp)
        ip link set "$dev" up
        udhcpc -i "$dev" -s /etc/udhcpc.script -b -t 5 -T 1 -A 3 -x "hostname:$name" \
            >"/tmp/udhcpc.$dev.log" 2>&1 &
        ;;
    static:*) net_static "$dev" "${cfg#static:}" ;;
    *)
        echo "infrasim: ignoring infrasim.net$n=$cfg (use static:IP/PREFIX,GW[,DNS], dhcp or none)"
        ;;
    esac
done

# A power key (QEMU virt's GPIO key with the generic kernel): let acpid power off on it.
keys=
for ev in /sys/class/input/event*; do
    [ -e "$ev" ] || continue
    keys=1
    n=0
    while [ ! -e "/dev/input/${ev##*/}" ] && [ $n -lt 100 ]; do
        usleep 10000
        n=$((n + 1))
    done
done
[ -z "$keys" ] || acpid

# The leading newline puts the banner on a line of its own even after a stray byte (opening
# the raspi3b mini-UART prints an "X" at the start of the line).
echo
echo INFRASIM-GUEST-READY
echo "kernel=$kver hostname=$name"
exec /bin/busybox init
"""

_INITTAB = """\
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
"""

_PROFILE = r"""export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root
export PS1='guest:\w# '
"""

_POWER_BUTTON = """\
#!/bin/sh
# busybox acpid runs this on the power key (QEMU system_powerdown)
sync
exec poweroff -f
"""

_UDHCPC_SCRIPT = """\
#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
        ip route del default 2>/dev/null
        set -- $router
        ip route add default via "$1" dev "$interface"
    fi
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >>/etc/resolv.conf; done
    fi
    ;;
esac
exit 0
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_GROUP = "root:x:0:\ntty:x:5:\n"

_DIRS = (
    "bin",
    "dev",
    "etc",
    "etc/acpi",
    "etc/acpi/PWRF",
    "lib",
    "lib/modules",
    "proc",
    "run",
    "sbin",
    "sys",
    "tmp",
    "usr",
    "usr/bin",
    "usr/sbin",
    "var",
    "var/log",
)


def _text_files() -> dict[str, tuple[int, str]]:
    return {
        "init": (0o755, _INIT_SCRIPT),
        "etc/inittab": (0o644, _INITTAB),
        "etc/profile": (0o644, _PROFILE),
        "etc/passwd": (0o644, _PASSWD),
        "etc/group": (0o644, _GROUP),
        "etc/acpi/PWRF/00000080": (0o755, _POWER_BUTTON),
        "etc/udhcpc.script": (0o755, _UDHCPC_SCRIPT),
    }


def _template_digest() -> str:
    digest = hashlib.sha256()
    for name, (mode, text) in sorted(_text_files().items()):
        digest.update(f"{name}\0{mode:o}\0{text}\0".encode())
    digest.update("\0".join(_DIRS).encode())
    return digest.hexdigest()


def _initramfs_entries(
    *,
    busybox: bytes,
    kernel_version: str,
    modules: Sequence[tuple[str, bytes]],
    info: str,
) -> list[CpioEntry]:
    entries = [CpioEntry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755)) for d in _DIRS]
    entries.append(CpioEntry("root", stat.S_IFDIR | 0o700))  # $HOME
    # Device nodes in the archive itself: the kernel opens /dev/console for /init before /init
    # mounts devtmpfs, so its early messages are not lost.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries.append(CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    for name, (mode, text) in _text_files().items():
        entries.append(CpioEntry(name, stat.S_IFREG | mode, text.encode()))
    entries.append(CpioEntry("etc/infrasim-guest", stat.S_IFREG | 0o644, info.encode()))
    moddir = f"lib/modules/{kernel_version}"
    entries.append(CpioEntry(moddir, stat.S_IFDIR | 0o755))
    for name, data in modules:
        entries.append(CpioEntry(f"{moddir}/{name}.ko", stat.S_IFREG | 0o644, data))
    order = "".join(f"{name}\n" for name, _ in modules)
    entries.append(CpioEntry(f"{moddir}/infrasim.order", stat.S_IFREG | 0o644, order.encode()))
    return entries


# --------------------------------------------------------------------------------------------
# apt with a private arm64 index


def _require_tools() -> None:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if not shutil.which(tool)]
    if missing:
        raise GuestBuildError(
            "building the guest kit needs a Debian or Ubuntu host (apt-get, apt-cache and "
            f"dpkg-deb; missing here: {', '.join(missing)}). Elsewhere, use a prebuilt kit: copy "
            "a guest cache built on a Debian host (e.g. ~/.cache/infrasim/guest), point "
            "INFRASIM_GUEST_CACHE at it and build with offline=True (--offline)."
        )


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


def _parse_control(text: str) -> list[dict[str, str]]:
    """RFC 822-style paragraphs (``apt-cache show`` output)."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, ""
        elif line[0] in " \t":
            if last:
                current[last] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            last = key.strip()
            current[last] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


@dataclass(frozen=True)
class _Package:
    name: str
    version: str
    sha256: str
    size: int

    @property
    def deb_name(self) -> str:
        version = re.sub(r"[^A-Za-z0-9.+~-]", "_", self.version)
        return f"{self.name}_{version}_{ARCH}.deb"


class _Apt:
    """apt-get/apt-cache on a private arm64 index under ``root``; the system's sources."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "apt.conf"
        self.lists = root / "lists"
        self.stamp = root / "lists-updated"

    def prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "state", "sourceparts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        status = self.root / "state" / "status"
        if not status.exists():
            status.write_bytes(b"")
        root = str(self.root)
        lines = [
            "#clear APT::Architectures;",
            f'APT::Architecture "{ARCH}";',
            f'APT::Architectures {{ "{ARCH}"; }};',
            f'Dir::State "{root}/state/";',
            f'Dir::State::Lists "{root}/lists/";',
            f'Dir::State::status "{root}/state/status";',
            f'Dir::Cache "{root}/cache/";',
            f'Dir::Cache::archives "{root}/cache/archives/";',
            f'Dir::Cache::pkgcache "{root}/cache/pkgcache.bin";',
            'Dir::Cache::srcpkgcache "";',  # the binary cache alone is enough (36 MB)
            'Acquire::Languages "none";',
            # Only the Packages indices: no AppStream metadata, no Contents files.
            *(
                f'Acquire::IndexTargets::deb::{target}::DefaultEnabled "false";'
                for target in (
                    "DEP-11",
                    "DEP-11-icons",
                    "DEP-11-icons-small",
                    "DEP-11-icons-large",
                    "DEP-11-icons-hidpi",
                    "DEP-11-icons-large-hidpi",
                    "Contents-deb",
                    "Contents-udeb",
                    "Contents-deb-legacy",
                )
            ),
            # The host's update hooks (PackageKit, AppStream) concern the host's own lists.
            "#clear APT::Update::Pre-Invoke;",
            "#clear APT::Update::Post-Invoke;",
            "#clear APT::Update::Post-Invoke-Success;",
        ]
        if os.geteuid() == 0:
            # As root apt drops to _apt for downloads, which cannot write to a private cache.
            lines.append('APT::Sandbox::User "root";')
        sources = os.environ.get("INFRASIM_GUEST_APT_SOURCES")
        if sources:
            path = os.path.abspath(os.path.expanduser(sources))
            lines.append(f'Dir::Etc::SourceList "{path}";')
            lines.append(f'Dir::Etc::SourceParts "{root}/sourceparts/";')
        text = "\n".join(lines) + "\n"
        if not self.conf.exists() or self.conf.read_text() != text:
            _write_atomic(self.conf, text.encode())

    def run(
        self, tool: str, args: Sequence[str], *, cwd: Path | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        cmd = [tool, "-q", "-c", str(self.conf), *args]
        try:
            return subprocess.run(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GuestBuildError(
                f"{tool} {' '.join(args)} took more than {timeout:.0f} s; check the network "
                "path to the Debian archive (apt proxy settings)"
            ) from None

    def lists_age(self) -> float | None:
        try:
            age = time.time() - self.stamp.stat().st_mtime
        except FileNotFoundError:
            return None
        return age if any(self.lists.glob("*Packages*")) else None

    def update(self) -> str | None:
        """Refresh the private lists; None on success, else apt's complaint."""
        proc = self.run("apt-get", ["update"], timeout=600)
        usable = any(self.lists.glob("*Packages*"))
        if usable:
            self.stamp.touch()
        if proc.returncode == 0 and usable:
            return None
        return _tail(proc.stderr or proc.stdout) or f"apt-get update exited {proc.returncode}"

    def show(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        proc = self.run("apt-cache", ["show", "--no-all-versions", *names], timeout=120)
        found = {p["Package"]: p for p in _parse_control(proc.stdout) if "Package" in p}
        missing = [name for name in names if name not in found]
        if missing:
            raise GuestBuildError(
                f"package(s) {', '.join(missing)} not found in the arm64 package lists "
                f"({_tail(proc.stderr, 3) or 'no error from apt-cache'}). The host's apt "
                "sources must include a Debian archive with arm64 (e.g. deb.debian.org "
                "bookworm main); on other hosts set INFRASIM_GUEST_APT_SOURCES to a sources "
                "file that does."
            )
        return found

    def package(self, fields: Mapping[str, str]) -> _Package:
        try:
            return _Package(
                fields["Package"],
                fields["Version"],
                fields.get("SHA256", ""),
                int(fields.get("Size", "0")),
            )
        except (KeyError, ValueError) as exc:
            raise GuestBuildError(f"unexpected apt-cache output: {exc}") from None

    def download(self, pkg: _Package, dest: Path, scratch: Path) -> None:
        """``apt-get download pkg=version``, checked against the index, moved to ``dest``."""
        work = Path(tempfile.mkdtemp(prefix="download-", dir=scratch))
        try:
            proc = self.run(
                "apt-get", ["download", f"{pkg.name}={pkg.version}"], cwd=work, timeout=1800
            )
            debs = list(work.glob("*.deb"))
            if proc.returncode != 0 or len(debs) != 1:
                raise GuestBuildError(
                    f"apt-get download {pkg.name}={pkg.version} failed:\n"
                    f"{_tail(proc.stderr or proc.stdout)}"
                )
            if pkg.sha256 and _sha256_file(debs[0]) != pkg.sha256:
                raise GuestBuildError(f"{debs[0].name}: SHA256 does not match the package index")
            _fsync_file(debs[0])
            os.replace(debs[0], dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _kernel_package(meta: Mapping[str, str], flavour: _Flavour) -> str:
    """The ``linux-image-<abi><suffix>`` package the meta-package depends on."""
    for alternatives in meta.get("Depends", "").split(","):
        for alternative in alternatives.split("|"):
            name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
            if (
                name.startswith("linux-image-")
                and name.endswith(flavour.kernel_suffix)
                and name != flavour.meta_package
                and name.removeprefix("linux-image-")[:1].isdigit()
            ):
                return name
    raise GuestBuildError(
        f"{flavour.meta_package} does not depend on a linux-image-<abi>{flavour.kernel_suffix} "
        f"package (Depends: {meta.get('Depends', '')!r}); the archive layout changed"
    )


# --------------------------------------------------------------------------------------------
# Reading the .deb files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _iter_deb(deb: Path) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]:
    """Stream the members of a .deb's data tarball: (normalised path, member, tar)."""
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    completed = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                yield member.name.removeprefix("./").lstrip("/"), member, tar
        completed = True
    except tarfile.TarError as exc:
        proc.kill()
        err = _tail(proc.stderr.read().decode(errors="replace"))
        raise GuestBuildError(f"{deb.name}: unreadable data archive ({exc}) {err}") from None
    finally:
        if not completed:  # an error, or the caller stopped early
            proc.kill()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise GuestBuildError(f"dpkg-deb --fsys-tarfile {deb.name} failed: {_tail(err)}")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise GuestBuildError(f"cannot read {member.name} from the package")
    with handle:
        return handle.read()


def _zstd_decompress(data: bytes) -> bytes:
    try:  # Python >= 3.14
        module = importlib.import_module("compression.zstd")
        result = module.decompress(data)
        assert isinstance(result, bytes)
        return result
    except ImportError:
        pass
    tool = shutil.which("zstd")
    if tool is None:
        raise GuestBuildError(
            "this kernel's modules are zstd-compressed: install zstd (apt-get install zstd)"
        )
    proc = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"zstd -dc failed: {_tail(proc.stderr.decode(errors='replace'))}")
    return proc.stdout


def _decompress_module(path: str, data: bytes) -> bytes:
    try:
        if path.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.endswith(".ko.gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise GuestBuildError(f"{path}: cannot decompress module ({exc})") from None
    if path.endswith(".ko.zst"):
        return _zstd_decompress(data)
    return data


_ARM64_IMAGE_MAGIC = b"ARM\x64"


def unwrap_kernel_image(data: bytes) -> bytes:
    """A plain arm64 ``Image`` from a kernel package's ``vmlinuz``.

    Debian's bookworm kernels ship a plain Image; others wrap it in gzip or in an EFI "zboot"
    image (``MZ`` + ``zimg`` header + compressed payload), which QEMU 7.2 cannot boot directly.
    Raises :class:`GuestBuildError` when the result is not an arm64 Image.
    """
    image = _unwrap(data)
    if image[56:60] != _ARM64_IMAGE_MAGIC:
        raise GuestBuildError("the kernel package's vmlinuz is not an arm64 Image")
    return image


def _unwrap(data: bytes) -> bytes:
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:2] == b"MZ" and data[4:8] == b"zimg":
            offset, size = struct.unpack_from("<II", data, 8)
            method = data[24:32].rstrip(b"\0").decode("ascii", "replace")
            payload = data[offset : offset + size]
            if method.startswith("gzip"):
                return gzip.decompress(payload)
            if method.startswith("zstd"):
                return _zstd_decompress(payload)
            if method.startswith(("lzma", "xz")):
                return lzma.decompress(payload)
            raise GuestBuildError(f"EFI zboot kernel compressed with {method!r}: unsupported")
    except (OSError, EOFError, lzma.LZMAError, struct.error) as exc:
        raise GuestBuildError(f"cannot unpack the kernel image: {exc}") from None
    return data


@dataclass
class _KernelScan:
    kernel_version: str = ""
    kernel_found: bool = False
    dtb: bytes | None = None
    builtin: set[str] = dataclasses.field(default_factory=set)
    available: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> member path
    modules: dict[str, bytes] = dataclasses.field(default_factory=dict)  # name -> .ko bytes


def _is_module(path: str) -> bool:
    return path.startswith(("lib/modules/", "usr/lib/modules/")) and path.endswith(_MODULE_SUFFIXES)


def _scan_kernel_deb(
    deb: Path, expected_version: str, keep: Collection[str], dtb_name: str | None, kernel_out: Path
) -> _KernelScan:
    """One pass over the kernel package: the image (written to ``kernel_out``), the DTB, the
    built-in module list, every module's path, and the bytes of the modules in ``keep``."""
    scan = _KernelScan()
    images: list[str] = []
    for path, member, tar in _iter_deb(deb):
        base = os.path.basename(path)
        if not member.isfile():
            continue
        if path.startswith("boot/vmlinuz-") or path.startswith("boot/vmlinux-"):
            images.append(path)
            version = base.split("-", 1)[1]
            if version == expected_version or not scan.kernel_found:
                _write_file(kernel_out, unwrap_kernel_image(_read_member(tar, member)))
                scan.kernel_found = True
                scan.kernel_version = version
        elif base == "modules.builtin" and "/modules/" in path:
            text = _read_member(tar, member).decode(errors="replace")
            scan.builtin |= {module_name(line) for line in text.split() if line}
        elif _is_module(path):
            name = module_name(path)
            scan.available.setdefault(name, path)
            if name in keep and name not in scan.modules:
                scan.modules[name] = _decompress_module(path, _read_member(tar, member))
        elif dtb_name is not None and base == dtb_name and scan.dtb is None:
            scan.dtb = _read_member(tar, member)
    if not scan.kernel_found:
        raise GuestBuildError(f"{deb.name} contains no boot/vmlinuz-* kernel image")
    if len(images) > 1 and scan.kernel_version != expected_version:
        raise GuestBuildError(f"{deb.name}: several kernel images, none for {expected_version}")
    return scan


def _fetch_modules(deb: Path, scan: _KernelScan, names: Collection[str]) -> None:
    """A further pass over the kernel package for modules the first pass did not keep."""
    wanted = {scan.available[name]: name for name in names if name in scan.available}
    for path, member, tar in _iter_deb(deb):
        if path in wanted and member.isfile():
            scan.modules[wanted[path]] = _decompress_module(path, _read_member(tar, member))


def _resolve_modules(deb: Path, scan: _KernelScan, flavour: _Flavour) -> list[tuple[str, bytes]]:
    """The flavour's modules plus their dependencies, in load order, with their bytes."""
    wanted = []
    for name in flavour.modules:
        if name in scan.available or name in scan.builtin:
            wanted.append(name)
        elif name not in _OPTIONAL_MODULES:
            raise GuestBuildError(
                f"kernel {scan.kernel_version} has no {name} driver (neither a module nor "
                "built in); the guest kit cannot support this kernel"
            )
    for _ in range(8):
        depends = {
            name: modinfo_depends(parse_modinfo(data)) for name, data in scan.modules.items()
        }
        # Walk the dependency graph; modules whose bytes the scan did not keep are fetched in
        # one more pass over the package, then the walk starts again.
        unfetched: set[str] = set()
        stack = list(wanted)
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name in scan.builtin:
                continue
            seen.add(name)
            if name in scan.modules:
                stack.extend(depends[name])
            elif name in scan.available:
                unfetched.add(name)
        if not unfetched:
            order = order_modules(wanted, depends, scan.builtin)
            return [(name, scan.modules[name]) for name in order]
        _fetch_modules(deb, scan, unfetched)
    raise GuestBuildError("kernel module dependencies did not settle after 8 passes")


def _extract_busybox(deb: Path) -> bytes:
    for path, member, tar in _iter_deb(deb):
        if path == "bin/busybox" and member.isfile():
            return _read_member(tar, member)
    raise GuestBuildError(f"{deb.name} contains no bin/busybox")


# --------------------------------------------------------------------------------------------
# Files, locks, kits


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _build_lock(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    import fcntl  # POSIX only; imported here so the module itself imports everywhere

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another guest build to finish (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load_kit(kit_dir: Path) -> tuple[GuestKit, dict[str, object]] | None:
    """The kit in ``kit_dir`` if it is complete (kit.json present, files of recorded sizes)."""
    try:
        meta = json.loads((kit_dir / KIT_META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != KIT_FORMAT:
        return None
    try:
        sizes = meta["sizes"]
        files: dict[str, Path | None] = {}
        for field in ("kernel", "initrd", "dtb"):
            name = meta.get(field)
            if name is None:
                files[field] = None
                continue
            if not isinstance(name, str) or "/" in name:
                return None
            path = kit_dir / name
            if path.stat().st_size != sizes[name]:
                return None
            files[field] = path
        kernel, initrd = files["kernel"], files["initrd"]
        if kernel is None or initrd is None:
            return None
        kit = GuestKit(
            flavour=str(meta["flavour"]),
            kernel=kernel,
            initrd=initrd,
            dtb=files["dtb"],
            kernel_version=str(meta["kernel_version"]),
            cache_key=str(meta["cache_key"]),
        )
    except (OSError, KeyError, TypeError):
        return None
    return kit, meta


def _kits(cache: Path, flavour: str) -> list[tuple[float, Path, GuestKit, dict[str, object]]]:
    """Valid kits of ``flavour``, newest first."""
    found = []
    kits_dir = cache / "kits"
    if not kits_dir.is_dir():
        return []
    for kit_dir in kits_dir.iterdir():
        if not kit_dir.name.startswith(f"{flavour}-"):
            continue
        loaded = _load_kit(kit_dir)
        if loaded is None or loaded[0].flavour != flavour:
            continue
        built = loaded[1].get("built_at_epoch")
        when = float(built) if isinstance(built, int | float) else 0.0
        found.append((when, kit_dir, loaded[0], loaded[1]))
    found.sort(key=lambda item: (item[0], item[1].name), reverse=True)
    return found


def find_cached_guest(flavour: str = "cloud", cache_dir: Path | None = None) -> GuestKit | None:
    """The newest complete kit of ``flavour`` in the cache, without touching apt or network."""
    _flavour(flavour)
    kits = _kits(_resolve_cache_dir(cache_dir), flavour)
    return kits[0][2] if kits else None


def _prune(cache: Path, flavour: str, say: Callable[[str], None]) -> None:
    for _, kit_dir, _kit, _meta in _kits(cache, flavour)[KEEP_KITS:]:
        say(f"removing old kit {kit_dir.name}")
        shutil.rmtree(kit_dir, ignore_errors=True)
    referenced: set[str] = set()
    for name in FLAVOURS:
        for _, _dir, _kit, meta in _kits(cache, name):
            debs = meta.get("debs")
            if isinstance(debs, list):
                referenced |= {str(d) for d in debs}
    debs_dir = cache / "debs"
    if debs_dir.is_dir():
        for deb in debs_dir.glob("*.deb"):
            if deb.name not in referenced:
                with contextlib.suppress(OSError):
                    deb.unlink()


def _cache_key(flavour: _Flavour, kernel: _Package, busybox: _Package) -> str:
    material = {
        "format": KIT_FORMAT,
        "flavour": flavour.name,
        "kernel": [kernel.name, kernel.version, kernel.sha256],
        "busybox": [busybox.name, busybox.version, busybox.sha256],
        "modules": list(flavour.modules),
        "dtb": flavour.dtb,
        "templates": _template_digest(),
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _ensure_deb(
    apt: _Apt, pkg: _Package, debs_dir: Path, scratch: Path, say: Callable[[str], None]
) -> Path:
    dest = debs_dir / pkg.deb_name
    if dest.exists():
        if not pkg.sha256 or _sha256_file(dest) == pkg.sha256:
            return dest
        dest.unlink()
    say(f"downloading {pkg.name} {pkg.version} ({pkg.size / 1e6:.1f} MB)")
    apt.download(pkg, dest, scratch)
    return dest


# --------------------------------------------------------------------------------------------
# The build


def build_guest(
    flavour: str = "cloud",
    cache_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    offline: bool = False,
) -> GuestKit:
    """Build (or return the cached) guest kit of ``flavour`` from the Debian archive.

    Idempotent: when a kit for the current package versions exists it is returned at once
    (the private package lists are refreshed at most every 6 hours). ``offline=True`` returns
    the newest cached kit without running apt. Builds are atomic (a build dir renamed into
    place) and serialised by a file lock, so concurrent callers get the same kit.
    """
    spec = _flavour(flavour)
    cache = _resolve_cache_dir(cache_dir)

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    if offline:
        kit = find_cached_guest(flavour, cache)
        if kit is None:
            raise GuestBuildError(
                f"no cached {flavour} guest kit in {cache}: build one without offline mode "
                "(needs a Debian/Ubuntu host that reaches the Debian archive), or point "
                "INFRASIM_GUEST_CACHE at a prebuilt kit cache"
            )
        return kit

    _require_tools()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _build_lock(cache / ".lock", say):
            return _build_locked(spec, cache, say)
    except OSError as exc:
        raise GuestBuildError(
            f"guest kit build in {cache} failed: {exc} (a read-only prebuilt kit cache "
            "needs offline=True)"
        ) from exc


def _build_locked(spec: _Flavour, cache: Path, say: Callable[[str], None]) -> GuestKit:
    tmp_root = cache / "tmp"
    if tmp_root.is_dir():  # leftovers of killed builds (we hold the lock)
        for leftover in tmp_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
    tmp_root.mkdir(parents=True, exist_ok=True)

    apt = _Apt(cache / "apt")
    apt.prepare()
    updated = False
    age = apt.lists_age()
    if age is None or age > LISTS_MAX_AGE:
        say("apt-get update (private arm64 package lists)")
        problem = apt.update()
        updated = True
        if problem is not None:
            if apt.lists_age() is None:
                cached = find_cached_guest(spec.name, cache)
                if cached is not None:
                    say(f"warning: apt-get update failed, using the cached kit: {problem}")
                    return cached
                raise GuestBuildError(f"apt-get update failed (arm64 lists):\n{problem}")
            say(f"warning: apt-get update had errors, using the lists it got: {problem}")

    while True:
        try:
            found = apt.show([spec.meta_package, BUSYBOX_PACKAGE])
            kernel_name = _kernel_package(found[spec.meta_package], spec)
            kernel = apt.package(apt.show([kernel_name])[kernel_name])
            busybox = apt.package(found[BUSYBOX_PACKAGE])
            key = _cache_key(spec, kernel, busybox)
            kernel_version = kernel_name.removeprefix("linux-image-")
            kit_dir = cache / "kits" / f"{spec.name}-{kernel_version}-{key[:12]}"
            loaded = _load_kit(kit_dir)
            if loaded is not None:
                return loaded[0]
            debs_dir = cache / "debs"
            debs_dir.mkdir(parents=True, exist_ok=True)
            kernel_deb = _ensure_deb(apt, kernel, debs_dir, tmp_root, say)
            busybox_deb = _ensure_deb(apt, busybox, debs_dir, tmp_root, say)
            break
        except GuestBuildError:
            # Lists younger than LISTS_MAX_AGE may name packages the archive has dropped
            # since (security updates replace kernels): refresh once and retry.
            if updated:
                raise
            say("package lists may be outdated: apt-get update")
            problem = apt.update()
            updated = True
            if problem is not None:
                say(f"warning: apt-get update had errors: {problem}")

    work = Path(tempfile.mkdtemp(prefix=f"build-{spec.name}-", dir=tmp_root))
    try:
        kit_tmp = work / "kit"
        kit_tmp.mkdir()
        meta = _assemble_kit(spec, kit_tmp, kernel, kernel_deb, busybox, busybox_deb, key, say)
        _write_file(kit_tmp / KIT_META, (json.dumps(meta, indent=2) + "\n").encode())
        (cache / "kits").mkdir(parents=True, exist_ok=True)
        if kit_dir.exists():  # an incomplete or damaged kit under the same name
            shutil.rmtree(kit_dir)
        os.rename(kit_tmp, kit_dir)
        fsync_dir(kit_dir.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loaded = _load_kit(kit_dir)
    if loaded is None:
        raise GuestBuildError(f"the kit just built in {kit_dir} does not validate")
    say(f"guest kit ready: {kit_dir}")
    _prune(cache, spec.name, say)
    return loaded[0]


def _assemble_kit(
    spec: _Flavour,
    kit_tmp: Path,
    kernel: _Package,
    kernel_deb: Path,
    busybox: _Package,
    busybox_deb: Path,
    key: str,
    say: Callable[[str], None],
) -> dict[str, object]:
    """Write the kernel, initramfs and DTB into ``kit_tmp``; return the kit.json contents."""
    kernel_version = kernel.name.removeprefix("linux-image-")
    say(f"extracting {kernel.name}")
    keep = set(spec.modules) | _KNOWN_DEPENDENCIES
    scan = _scan_kernel_deb(kernel_deb, kernel_version, keep, spec.dtb, kit_tmp / KERNEL_FILE)
    if scan.kernel_version != kernel_version:
        say(f"note: {kernel.name} ships kernel {scan.kernel_version}")
        kernel_version = scan.kernel_version
    if spec.dtb is not None and scan.dtb is None:
        raise GuestBuildError(f"{kernel.name} does not ship {spec.dtb}")
    modules = _resolve_modules(kernel_deb, scan, spec)
    busybox_bin = _extract_busybox(busybox_deb)
    say(f"packing initramfs ({len(modules)} modules: {' '.join(n for n, _ in modules)})")
    info = (
        f"flavour={spec.name}\nkernel={kernel_version}\n"
        f"kernel_package={kernel.name}={kernel.version}\n"
        f"busybox={busybox.version}\ncache_key={key}\n"
    )
    initrd = pack_entries(
        _initramfs_entries(
            busybox=busybox_bin, kernel_version=kernel_version, modules=modules, info=info
        )
    )
    _write_file(kit_tmp / INITRD_FILE, initrd)
    _fsync_file(kit_tmp / KERNEL_FILE)
    files = [KERNEL_FILE, INITRD_FILE]
    if spec.dtb is not None and scan.dtb is not None:
        _write_file(kit_tmp / spec.dtb, scan.dtb)
        files.append(spec.dtb)
    now = time.time()
    return {
        "format": KIT_FORMAT,
        "flavour": spec.name,
        "kernel_version": kernel_version,
        "cache_key": key,
        "kernel": KERNEL_FILE,
        "initrd": INITRD_FILE,
        "dtb": spec.dtb,
        "sizes": {name: (kit_tmp / name).stat().st_size for name in files},
        "sha256": {name: _sha256_file(kit_tmp / name) for name in files},
        "packages": {kernel.name: kernel.version, busybox.name: busybox.version},
        "debs": [kernel_deb.name, busybox_deb.name],
        "modules": [name for name, _ in modules],
        "built_at": _dt.datetime.fromtimestamp(now, _dt.UTC).isoformat(timespec="seconds"),
        "built_at_epoch": now,
    }


def _build_all_main(argv: Sequence[str]) -> int:  # pragma: no cover - manual helper
    """``python -m infrasim_tui.core.guest [--offline] [cloud|generic ...]``: print the kits."""
    offline = "--offline" in argv
    flavours = [a for a in argv if not a.startswith("-")] or list(FLAVOURS)
    for name in flavours:
        start = time.monotonic()
        try:
            kit = build_guest(
                name, progress=lambda m: print(f"  {m}", file=sys.stderr), offline=offline
            )
        except GuestBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({**kit.to_json(), "seconds": round(time.monotonic() - start, 2)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_build_all_main(sys.argv[1:]))
