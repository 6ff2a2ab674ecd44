"""``infrasim volume|image|key|snapshot``: storage commands, thin adapters over the core.

Kept apart from ``cli.py`` (VMs and the console) so each file stays about one thing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .cli_args import parse_pairs
from .core.errors import InvalidSpec
from .core.model import Snapshot, Volume, VolumeKind, VolumeRequest, to_dict
from .core.snapshot_tree import short_name
from .core.units import format_size, parse_size
from .rpc.client import RemoteCore

Runner = Callable[[argparse.Namespace, Callable[[RemoteCore], Awaitable[int]]], Awaitable[int]]
Emit = Callable[[argparse.Namespace, Any, Callable[[], str]], None]
Table = Callable[[list[str], list[list[str]]], str]


class ProgressBar:
    """A one-line progress bar on stderr, only when stderr is a terminal and work is long."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        t = time.monotonic()
        if not self.tty or t - self.t0 < 0.5 or (t - self.last < 0.1 and done < total):
            return
        self.last = t
        self.shown = True
        rate = done / max(t - self.t0, 1e-6)
        if total:
            frac = min(1.0, done / total)
            bar = "█" * int(frac * 30) + "·" * (30 - int(frac * 30))
            text = f"{self.label} {bar} {frac * 100:5.1f}% {format_size(done)}/" \
                   f"{format_size(total)} {format_size(int(rate))}/s"
        else:
            text = f"{self.label} {format_size(done)} {format_size(int(rate))}/s"
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _vol_row(v: Volume) -> list[str]:
    integ = v.status.verified or ("signed" if v.spec.integrity else "-")
    return [v.meta.name, v.spec.kind.value.lower(), v.spec.format,
            format_size(v.status.virtual_size), format_size(v.status.actual_size),
            "ro" if v.spec.read_only else "rw", integ,
            (v.status.image_digest[:12] or "-")]


VOL_HEADERS = ["NAME", "KIND", "FORMAT", "SIZE", "ON DISK", "MODE", "INTEGRITY", "IMAGE"]


def _vol_detail(v: Volume) -> str:
    i = v.spec.integrity
    lines = [
        f"Name:        {v.meta.name}",
        f"ID:          {v.meta.id}",
        f"Kind:        {v.spec.kind.value.lower()}  ({'read-only' if v.spec.read_only else 'rw'})",
        f"Format:      {v.spec.format}",
        f"Size:        {format_size(v.status.virtual_size)} virtual, "
        f"{format_size(v.status.actual_size)} on disk",
        f"Path:        {v.status.path}",
        f"Source:      {v.spec.source or '-'}",
        f"Base:        {v.spec.base_volume_id or '-'}",
        f"Image:       {v.status.image_digest or '-'}",
        f"Integrity:   {'signed by ' + i.public_key[:16] + '…' if i else 'none'}",
        f"Verified:    {v.status.verified or 'never checked'}"
        + (f"  ({v.status.verify_error})" if v.status.verify_error else ""),
    ]
    return "\n".join(lines)


def register(sub: Any, common: argparse.ArgumentParser, run: Runner, emit: Emit,
             table: Table) -> None:
    """Add the storage commands to the top-level subparsers."""

    # -- volume -----------------------------------------------------------------------------
    vol = sub.add_parser("volume", help="disks and data volumes").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    c = vol.add_parser("create", parents=[common], help="create, import or overlay a volume")
    c.add_argument("name")
    c.add_argument("--size", help="e.g. 2G (blank volumes; grows imports and overlays)")
    c.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    c.add_argument("--from", dest="source", metavar="PATH|URL", help="import an image")
    c.add_argument("--digest", default="", help="expected BLAKE3 of --from (refused otherwise)")
    c.add_argument("--base", help="make a copy-on-write overlay on this volume")
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--kind", choices=["disk", "weights"], default="disk")
    c.add_argument("--signature", default="", help="publisher's signature of the image")
    c.add_argument("--public-key", default="", help="publisher's Ed25519 public key")
    c.add_argument("--label", action="append", metavar="KEY=VALUE")

    async def create(args: argparse.Namespace) -> int:
        size = parse_size(args.size) if args.size else 0
        labels = parse_pairs(args.label, "labels")
        source = args.source or ""
        if source and "://" not in source:
            source = str(Path(source).expanduser().absolute())
        req = VolumeRequest(name=args.name, size_bytes=size, format=args.format, source=source,
                            source_digest=args.digest, base=args.base or "",
                            read_only=args.read_only, kind=VolumeKind(args.kind.upper()),
                            labels=labels, signature=args.signature, public_key=args.public_key)

        async def go(orch: RemoteCore) -> int:
            bar = ProgressBar(f"{args.name}:")
            try:
                v = await orch.create_volume(req, bar)
            finally:
                bar.close()
            emit(args, to_dict(v), lambda: _vol_detail(v))
            return 0

        return await run(args, go)

    c.set_defaults(func=create)

    ls = vol.add_parser("list", parents=[common], help="list volumes")

    async def vlist(args: argparse.Namespace) -> int:
        async def go(orch: RemoteCore) -> int:
            vols = await orch.list_volumes()
            emit(args, [to_dict(v) for v in vols],
                 lambda: table(VOL_HEADERS, [_vol_row(v) for v in vols]))
            return 0

        return await run(args, go)

    ls.set_defaults(func=vlist)

    def one(verb: str, helptext: str, action: Callable[[RemoteCore, argparse.Namespace],
                                                       Awaitable[Volume | None]]) -> None:
        p = vol.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("name")
        if verb == "resize":
            p.add_argument("size", help="new size, e.g. 4G (grow only)")

        async def cmd(args: argparse.Namespace) -> int:
            async def go(orch: RemoteCore) -> int:
                v = await action(orch, args)
                if v is None:
                    emit(args, {"deleted": args.name}, lambda: f"deleted {args.name}")
                else:
                    emit(args, to_dict(v), lambda: _vol_detail(v))
                return 0

            return await run(args, go)

        p.set_defaults(func=cmd)

    async def _get(o: RemoteCore, a: argparse.Namespace) -> Volume:
        return await o.get_volume(a.name)

    async def _resize(o: RemoteCore, a: argparse.Namespace) -> Volume:
        return await o.resize_volume(a.name, parse_size(a.size))

    async def _delete(o: RemoteCore, a: argparse.Namespace) -> None:
        await o.delete_volume(a.name)

    async def _sign(o: RemoteCore, a: argparse.Namespace) -> Volume:
        bar = ProgressBar(f"hashing {a.name}:")
        try:
            return await o.sign_volume(a.name, bar)
        finally:
            bar.close()

    async def _verify(o: RemoteCore, a: argparse.Namespace) -> Volume:
        bar = ProgressBar(f"hashing {a.name}:")
        try:
            return await o.verify_volume(a.name, bar)
        finally:
            bar.close()

    one("get", "show one volume", _get)
    one("resize", "grow a volume", _resize)
    one("delete", "delete a volume (refused while used)", _delete)
    one("sign", "sign a read-only volume with the host key", _sign)
    one("verify", "re-check a volume's digest and signature", _verify)

    # -- image ------------------------------------------------------------------------------
    img = sub.add_parser("image", help="the content-addressed image store").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    il = img.add_parser("list", parents=[common], help="stored images and who uses them")

    async def ilist(args: argparse.Namespace) -> int:
        async def go(orch: RemoteCore) -> int:
            images = await orch.list_images()
            rows = [[d[:16], format_size(size), str(len(u)), ", ".join(u) or "-"]
                    for d, size, u in images]
            emit(args, [{"digest": d, "size": size, "volumes": u} for d, size, u in images],
                 lambda: table(["DIGEST", "SIZE", "REFS", "VOLUMES"], rows))
            return 0

        return await run(args, go)

    il.set_defaults(func=ilist)
    gc = img.add_parser("gc", parents=[common], help="remove images no volume uses")

    async def igc(args: argparse.Namespace) -> int:
        async def go(orch: RemoteCore) -> int:
            removed, freed = await orch.image_gc()
            emit(args, {"removed": removed, "freed_bytes": freed},
                 lambda: f"removed {len(removed)} unreferenced image(s), freed "
                         f"{format_size(freed)}")
            return 0

        return await run(args, go)

    gc.set_defaults(func=igc)

    # -- key --------------------------------------------------------------------------------
    key = sub.add_parser("key", help="signing keys and the trust store").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    kl = key.add_parser("list", parents=[common], help="trusted public keys")

    async def klist(args: argparse.Namespace) -> int:
        async def go(orch: RemoteCore) -> int:
            keys = await orch.trusted_keys()
            emit(args, [k.__dict__ for k in keys],
                 lambda: table(["NAME", "FINGERPRINT", "HOST", "PUBLIC KEY"],
                               [[k.name, k.fingerprint, "yes" if k.host else "",
                                 k.public_key] for k in keys]))
            return 0

        return await run(args, go)

    kl.set_defaults(func=klist)
    ka = key.add_parser("add", parents=[common], help="trust a publisher's public key")
    ka.add_argument("name")
    ka.add_argument("public_key")

    async def kadd(args: argparse.Namespace) -> int:
        async def go(orch: RemoteCore) -> int:
            k = await orch.add_key(args.name, args.public_key)
            emit(args, k.__dict__, lambda: f"trusted {k.name} ({k.fingerprint})")
            return 0

        return await run(args, go)

    ka.set_defaults(func=kadd)
    kr = key.add_parser("remove", parents=[common], help="stop trusting a key")
    kr.add_argument("name")

    async def krm(args: argparse.Namespace) -> int:
        async def go(orch: RemoteCore) -> int:
            await orch.remove_key(args.name)
            emit(args, {"removed": args.name}, lambda: f"removed {args.name}")
            return 0

        return await run(args, go)

    kr.set_defaults(func=krm)
    kp = key.add_parser("protect", parents=[common],
                        help="encrypt the host signing key with a passphrase")

    async def kprotect(args: argparse.Namespace) -> int:
        import getpass
        import os

        phrase = os.environ.get("INFRASIM_KEY_PASSPHRASE") or ""
        if not phrase:
            if not sys.stdin.isatty():
                raise InvalidSpec("passphrase", "set INFRASIM_KEY_PASSPHRASE or run this in a "
                                  "terminal to type it")
            phrase = getpass.getpass("New passphrase for the host key: ")
            if phrase != getpass.getpass("Again: "):
                raise InvalidSpec("passphrase", "the two entries differ")
        if len(phrase) < 8:
            raise InvalidSpec("passphrase", "use at least 8 characters")

        # A file operation on this host's key, not an API call: the key never leaves the host.
        from .core.config import load_config
        from .core.keys import KeyRing
        from .core.paths import DataDir

        cfg = load_config(Path(args.config) if args.config else None,
                          Path(args.data_dir) if args.data_dir else None)
        k = KeyRing(DataDir(cfg.daemon.data_dir).keys_dir).ensure_host_key(phrase)
        emit(args, k.__dict__, lambda: f"host key {k.fingerprint} is now encrypted; signing "
             "needs the passphrase (INFRASIM_KEY_PASSPHRASE in the daemon's environment)")
        return 0

    kp.set_defaults(func=kprotect)

    # -- snapshot ---------------------------------------------------------------------------
    snap = sub.add_parser("snapshot", help="snapshot trees of a VM").add_subparsers(
        dest="verb", required=True, metavar="VERB")

    def snap_cmd(verb: str, helptext: str, with_name: bool,
                 action: Callable[[RemoteCore, argparse.Namespace], Awaitable[int]],
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
        p = snap.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("vm")
        if with_name:
            p.add_argument("name")
        if extra:
            extra(p)

        async def cmd(args: argparse.Namespace) -> int:
            async def go(orch: RemoteCore) -> int:
                return await action(orch, args)

            return await run(args, go)

        p.set_defaults(func=cmd)

    def snap_row(s: Snapshot, current: str, names: dict[str, str]) -> list[str]:
        return [short_name(s) + (" *" if s.meta.id == current else ""),
                "mem+disk" if s.status.with_memory else "disk",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.meta.created_at)),
                names.get(s.spec.parent_id, "-"), s.spec.description or "-"]

    async def s_create(o: RemoteCore, a: argparse.Namespace) -> int:
        s = await o.create_snapshot(a.vm, a.name, a.description or "")
        emit(a, to_dict(s), lambda: f"{a.vm}: snapshot {a.name} created")
        return 0

    async def s_restore(o: RemoteCore, a: argparse.Namespace) -> int:
        s = await o.restore_snapshot(a.vm, a.name, keep_current=a.keep_current)
        emit(a, to_dict(s), lambda: f"{a.vm}: restored {short_name(s)}")
        return 0

    async def s_delete(o: RemoteCore, a: argparse.Namespace) -> int:
        await o.delete_snapshot(a.vm, a.name)
        emit(a, {"deleted": a.name}, lambda: f"{a.vm}: snapshot {a.name} deleted")
        return 0

    async def s_list(o: RemoteCore, a: argparse.Namespace) -> int:
        snaps = await o.list_snapshots(a.vm)
        current = (await o.get_vm(a.vm)).status.current_snapshot_id
        names = {s.meta.id: short_name(s) for s in snaps}
        emit(a, [to_dict(s) for s in snaps],
             lambda: table(["NAME", "CONTENT", "CREATED", "PARENT", "DESCRIPTION"],
                           [snap_row(s, current, names) for s in snaps]))
        return 0

    async def s_get(o: RemoteCore, a: argparse.Namespace) -> int:
        s = await o.get_snapshot(a.vm, a.name)
        emit(a, to_dict(s), lambda: "\n".join(f"{k}: {v}" for k, v in {
            "name": short_name(s), "id": s.meta.id, "parent": s.spec.parent_id or "-",
            "memory": s.status.with_memory, "tag": s.status.tag,
            "chain": s.status.chain_hash, "description": s.spec.description or "-"}.items()))
        return 0

    async def s_tree(o: RemoteCore, a: argparse.Namespace) -> int:
        text = await o.snapshot_tree(a.vm)
        snaps = await o.list_snapshots(a.vm)
        emit(a, [to_dict(s) for s in snaps], lambda: text)
        return 0

    async def s_verify(o: RemoteCore, a: argparse.Namespace) -> int:
        lines = await o.verify_snapshots(a.vm)
        emit(a, {"ok": True, "snapshots": lines},
             lambda: "\n".join([*lines, f"{a.vm}: snapshot tree verified"]))
        return 0

    def desc(p: argparse.ArgumentParser) -> None:
        p.add_argument("--description", default="")

    def keep(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keep-current", action="store_true",
                       help="first take a safety snapshot of the current state")

    snap_cmd("create", "snapshot a VM (running: with memory)", True, s_create, desc)
    snap_cmd("restore", "go back to a snapshot", True, s_restore, keep)
    snap_cmd("delete", "delete a snapshot (its children move up)", True, s_delete)
    snap_cmd("get", "show one snapshot", True, s_get)
    snap_cmd("list", "list a VM's snapshots", False, s_list)
    snap_cmd("tree", "show a VM's snapshot tree", False, s_tree)
    snap_cmd("verify", "check the tree's hash chain and signatures", False, s_verify)


__all__ = ["InvalidSpec", "register"]
