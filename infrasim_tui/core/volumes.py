"""Volumes: disks and data volumes built on ``qemu-img``, the content-addressed image store and
signed integrity.

Layout: an imported image lives once in the image store under its BLAKE3 digest (read-only).
A writable volume made from it is a qcow2 overlay on that image, so many volumes share one
copy; a read-only volume *is* the stored image. ``--base`` makes an overlay on another volume.
A base never changes under its overlays: bases are read-only, and a volume with overlays is
never attached writable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .digest import VerdictCache, blake3_bytes
from .download import download
from .errors import IntegrityError, InvalidSpec, WrongState
from .images import ImageStore
from .keys import KeyRing, check_integrity, volume_message
from .model import (
    VM,
    IntegrityConfig,
    ResourceMeta,
    VMState,
    Volume,
    VolumeKind,
    VolumeRequest,
    VolumeSpec,
    now,
)
from .qemu_img import QemuImg
from .store import Store
from .validation import validate_labels, validate_name

Progress = Callable[[int, int], None]
Emit = Callable[[Volume, str, str], Awaitable[None]]
FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class Disk:
    """One volume as a VM sees it at start: the file to open and how."""

    volume: Volume
    path: str
    format: str
    read_only: bool
    boot: bool


class VolumeService:
    def __init__(self, store: Store, volumes_dir: Path, images: ImageStore, keys: KeyRing,
                 verdicts: VerdictCache, emit: Emit, qemu_img: QemuImg | None = None) -> None:
        self.store = store
        self.dir = volumes_dir
        self.images = images
        self.keys = keys
        self.verdicts = verdicts
        self.qemu_img = qemu_img or QemuImg()
        self._emit = emit

    # -- queries ----------------------------------------------------------------------------

    async def get(self, ref: str) -> Volume:
        return await self.store.get(Volume, ref)

    async def all(self) -> list[Volume]:
        return await self.store.list(Volume)

    async def users(self, vol: Volume) -> tuple[list[str], list[str]]:
        """Names of the VMs attaching ``vol`` and of the volumes layered on it."""
        return _users(vol, await self.store.list(VM), await self.store.list(Volume))

    # -- create -----------------------------------------------------------------------------

    async def create(self, req: VolumeRequest, progress: Progress | None = None) -> Volume:
        """Validate everything first; then build the file; only then write the record."""
        validate_name(req.name)
        validate_labels(req.labels or {})
        if req.format not in FORMATS:
            raise InvalidSpec("format", f"{req.format!r}: use qcow2 or raw")
        if await self.store.find(Volume, req.name) is not None:
            from .errors import AlreadyExists

            raise AlreadyExists("volume", req.name)
        sources = sum(bool(x) for x in (req.source, req.base))
        if sources > 1:
            raise InvalidSpec("base", "use either --from or --base, not both")
        read_only = req.read_only or req.kind == VolumeKind.WEIGHTS
        if req.kind == VolumeKind.WEIGHTS and not req.source:
            raise InvalidSpec("source", "a weights volume is imported from a file (--from)")
        if not sources and req.size_bytes <= 0:
            raise InvalidSpec("size_bytes", "a blank volume needs a size (e.g. --size 2G)")
        if not sources and read_only:
            raise InvalidSpec("read_only", "a blank read-only volume could never hold data")
        if (req.signature or req.public_key) and not (req.signature and req.public_key):
            raise InvalidSpec("integrity", "give both the signature and the public key")
        if req.signature and not req.source:
            raise InvalidSpec("integrity", "a publisher's signature covers an imported image")

        vol = Volume(meta=ResourceMeta(name=req.name, labels=dict(req.labels or {})),
                     spec=VolumeSpec(kind=req.kind, size_bytes=req.size_bytes,
                                     format=req.format, source=req.source,
                                     source_digest=req.source_digest, read_only=read_only))
        self.dir.mkdir(parents=True, exist_ok=True)
        if req.base:
            await self._create_overlay(vol, req)
        elif req.source:
            await self._create_imported(vol, req, progress)
        else:
            path = self.dir / f"{vol.meta.id}.{req.format}"
            await self.qemu_img.create(str(path), size=req.size_bytes, fmt=req.format)
            vol.status.path = str(path)
            vol.status.virtual_size = req.size_bytes
        await self._refresh_sizes(vol, known_virtual=bool(vol.status.virtual_size))
        try:
            vol = await self.store.create(vol)
        except BaseException:
            if vol.status.path.startswith(str(self.dir)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(vol.status.path)
            raise
        await self._emit(vol, "volume.created", f"{vol.meta.name} created")
        return vol

    async def _create_overlay(self, vol: Volume, req: VolumeRequest) -> None:
        base = await self.store.get(Volume, req.base)
        if not base.spec.read_only:
            vms, _ = await self.users(base)
            if vms:
                raise InvalidSpec("base", f"volume {base.meta.name!r} is attached writable to "
                                  f"{', '.join(vms)}; a base must not change under its overlays")
        vol.spec.base_volume_id = base.meta.id
        vol.spec.format = "qcow2"
        vol.spec.read_only = req.read_only
        vol.status.image_digest = base.status.image_digest
        path = self.dir / f"{vol.meta.id}.qcow2"
        size = max(req.size_bytes, base.status.virtual_size) or None
        await self.qemu_img.create(str(path), size=size, fmt="qcow2", backing=base.status.path,
                                   backing_fmt=base.spec.format)
        vol.status.path = str(path)
        vol.status.virtual_size = size or 0

    async def _create_imported(self, vol: Volume, req: VolumeRequest,
                               progress: Progress | None) -> None:
        src = req.source
        if src.startswith(("http://", "https://")):
            # Named by the URL, so running the same command again resumes the download.
            tmp = self.images.tmp_dir() / f"download-{blake3_bytes(src.encode())[:24]}.part"
            await download(src, tmp, progress=_adapt(progress))
            stored = await self.images.adopt(tmp, expected_digest=req.source_digest,
                                             progress=progress)
        else:
            path = Path(src).expanduser()
            if not path.is_absolute():
                raise InvalidSpec("source", f"{src!r} must be an absolute path or a URL")
            if not path.is_file() or not os.access(path, os.R_OK):
                raise InvalidSpec("source", f"{src} does not exist or is not readable")
            stored = await self.images.import_file(path, expected_digest=req.source_digest,
                                                   progress=progress)
        info = await self.qemu_img.info(str(stored.path))  # probing is safe: read-only image
        if info.backing_file:
            raise InvalidSpec("source", "the image has a backing file; import a standalone "
                              "image (qemu-img convert it first)")
        image_fmt = info.format if info.format in FORMATS else "raw"
        vol.status.image_digest = stored.digest
        if req.signature:
            vol.spec.integrity = IntegrityConfig(public_key=req.public_key,
                                                 signature=req.signature,
                                                 expected_digest=stored.digest)
        if vol.spec.read_only:
            vol.spec.format = image_fmt
            vol.status.path = str(stored.path)
            vol.status.digest = stored.digest
            vol.status.virtual_size = info.virtual_size
            return
        path = self.dir / f"{vol.meta.id}.qcow2"
        size = max(req.size_bytes, info.virtual_size)
        await self.qemu_img.create(str(path), size=size, fmt="qcow2", backing=str(stored.path),
                                   backing_fmt=image_fmt)
        vol.status.virtual_size = size
        vol.spec.format = "qcow2"
        vol.status.path = str(path)

    async def _refresh_sizes(self, vol: Volume, known_virtual: bool = False) -> None:
        """Sizes for display; skips a qemu-img run when we just set the virtual size."""
        if known_virtual:
            vol.status.actual_size = os.stat(vol.status.path).st_blocks * 512
        else:
            info = await self.qemu_img.info(vol.status.path, fmt=vol.spec.format,
                                            force_share=True)
            vol.status.virtual_size = info.virtual_size
            vol.status.actual_size = info.actual_size
        if not vol.spec.size_bytes:
            vol.spec.size_bytes = vol.status.virtual_size

    # -- change -----------------------------------------------------------------------------

    async def resize(self, ref: str, size: int) -> Volume:
        vol = await self.store.get(Volume, ref)
        if vol.spec.read_only:
            raise WrongState(f"volume {vol.meta.name!r} is read-only")
        _, overlays = await self.users(vol)
        if overlays:
            raise WrongState(f"volume {vol.meta.name!r} is the base of {', '.join(overlays)}; "
                             "resizing it would change what they see")
        await self._refuse_if_running(vol, "resize")
        if size < vol.status.virtual_size:
            raise InvalidSpec("size_bytes", f"shrinking loses data (now "
                              f"{vol.status.virtual_size} bytes); only growing is supported")
        await self.qemu_img.resize(vol.status.path, size, fmt=vol.spec.format)
        vol.spec.size_bytes = size
        await self._refresh_sizes(vol)
        vol = await self.store.update(vol)
        await self._emit(vol, "volume.resized", f"{vol.meta.name} resized to {size} bytes")
        return vol

    async def _refuse_if_running(self, vol: Volume, what: str) -> None:
        for vm in await self.store.list(VM):
            if vol.meta.id in vm.spec.volume_ids and vm.status.state not in IDLE:
                raise WrongState(f"cannot {what} volume {vol.meta.name!r}: VM "
                                 f"{vm.meta.name!r} is {vm.status.state.value}")

    async def delete(self, ref: str) -> None:
        vol = await self.store.get(Volume, ref)
        vms, overlays = await self.users(vol)
        if vms or overlays:
            who = [*(f"VM {n}" for n in vms), *(f"overlay {n}" for n in overlays)]
            raise WrongState(f"volume {vol.meta.name!r} is in use by {', '.join(who)}")
        await self.store.delete(Volume, vol.meta.id)
        if vol.status.path.startswith(str(self.dir)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vol.status.path)
        await self._emit(vol, "volume.deleted", f"{vol.meta.name} deleted")

    # -- integrity --------------------------------------------------------------------------

    async def sign(self, ref: str, progress: Progress | None = None) -> Volume:
        """Sign the volume's content digest with the host key.

        Only content that cannot change is signable: a read-only volume (or a stored image).
        """
        vol = await self.store.get(Volume, ref)
        if not vol.spec.read_only:
            raise WrongState(f"volume {vol.meta.name!r} is writable, so its content changes as "
                             "the guest runs; sign a read-only volume (e.g. the base of its "
                             "overlay)")
        digest, _ = await self.verdicts.digest(Path(vol.status.path), progress)
        signature = self.keys.sign(volume_message(digest))
        vol.spec.integrity = IntegrityConfig(public_key=self.keys.host_public_key(),
                                             signature=signature, expected_digest=digest)
        vol.status.digest = digest
        vol = await self.store.update(vol)
        await self._emit(vol, "volume.signed", f"{vol.meta.name} signed ({digest[:16]}…)")
        return await self.verify(vol.meta.id)

    async def verify(self, ref: str, progress: Progress | None = None) -> Volume:
        """Check one volume (and everything under it); record the verdict; raise on failure."""
        vol = await self.store.get(Volume, ref)
        try:
            await self._verify_chain(vol, progress)
        except IntegrityError as exc:
            await self._record(vol, _verdict_word(exc.message), exc.message)
            raise
        return await self._record(vol, "verified" if vol.spec.integrity else "", "")

    async def _record(self, vol: Volume, verdict: str, error: str) -> Volume:
        vol = await self.store.get(Volume, vol.meta.id)
        vol.status = replace(vol.status, verified=verdict, verified_at=now(),
                             verify_error=error)
        await self.store.update_status(vol)
        if error:
            await self._emit(vol, "volume.integrity_failed", error)
        return vol

    async def _verify_chain(self, vol: Volume, progress: Progress | None) -> None:
        """The volume's own signature, the content-addressed image under it, and its bases."""
        seen: set[str] = set()
        current: Volume | None = vol
        while current is not None and current.meta.id not in seen:
            seen.add(current.meta.id)
            try:
                await self._verify_one(current, progress)
            except IntegrityError as exc:
                if current is not vol:  # the base failed: its own record says so too
                    await self._record(current, _verdict_word(exc.message), exc.message)
                raise
            current = (await self.store.get(Volume, current.spec.base_volume_id)
                       if current.spec.base_volume_id else None)
        digest = vol.status.image_digest
        if digest:  # content addressing: the name is the expected digest
            path = self.images.path_for(digest)
            actual, _ = await self.verdicts.digest(path, progress)
            if actual != digest:
                raise IntegrityError(f"volume {vol.meta.name!r}: stored image {digest[:16]}… "
                                     f"now hashes to {actual[:16]}… (the image was modified)")

    async def _verify_one(self, vol: Volume, progress: Progress | None) -> None:
        integ = vol.spec.integrity
        if integ is None:
            if vol.spec.kind == VolumeKind.WEIGHTS:
                raise IntegrityError(f"volume {vol.meta.name!r} holds weights and is not "
                                     f"signed; sign it (`infrasim volume sign "
                                     f"{vol.meta.name}`) before attaching it")
            return
        target = Path(vol.status.path) if vol.spec.read_only else \
            self.images.path_for(vol.status.image_digest)
        digest, _ = await self.verdicts.digest(target, progress)
        check_integrity(name=vol.meta.name, digest=digest,
                        expected_digest=integ.expected_digest, public_key=integ.public_key,
                        signature=integ.signature, ring=self.keys)

    # -- attaching --------------------------------------------------------------------------

    async def resolve_refs(self, refs: list[str], field: str = "volume_ids") -> list[str]:
        """Names or ids → ids (VMs keep ids, so renames never break them)."""
        ids = []
        for i, ref in enumerate(refs):
            vol = await self.store.find(Volume, ref)
            if vol is None:
                raise InvalidSpec(f"{field}[{i}]", f"no volume {ref!r}")
            ids.append(vol.meta.id)
        return ids

    async def check_attachable(self, vm_name: str, volume_ids: list[str], boot_disk_id: str,
                               ) -> None:
        """Refuse before anything starts: missing volumes, bases attached writable.

        Runs on every create and start, so the VMs and volumes are read once, not per disk.
        """
        vms = await self.store.list(VM)
        volumes = await self.store.list(Volume)
        by_id = {v.meta.id: v for v in volumes}
        for i, vid in enumerate(volume_ids):
            vol = by_id.get(vid)
            if vol is None:
                raise InvalidSpec(f"volume_ids[{i}]", f"volume {vid!r} no longer exists")
            _, overlays = _users(vol, vms, volumes)
            if overlays and not vol.spec.read_only:
                raise InvalidSpec(f"volume_ids[{i}]", f"volume {vol.meta.name!r} is the base "
                                  f"of {', '.join(overlays)}; attaching it writable would "
                                  "corrupt them (make an overlay for this VM instead)")
            for vm in vms:
                if vm.meta.name != vm_name and vid in vm.spec.volume_ids \
                        and not vol.spec.read_only and vm.status.state not in IDLE:
                    raise InvalidSpec(f"volume_ids[{i}]", f"volume {vol.meta.name!r} is "
                                      f"attached writable to running VM {vm.meta.name!r}")
        if boot_disk_id and boot_disk_id not in volume_ids:
            raise InvalidSpec("boot_disk_id", "must be one of the VM's volumes")

    async def disks_for(self, vm: VM, progress: Progress | None = None) -> list[Disk]:
        """Verify every attached volume and say how to open it. Raises IntegrityError."""
        disks = []
        for vid in vm.spec.volume_ids:
            vol = await self.store.get(Volume, vid)
            await self.verify(vol.meta.id, progress)
            disks.append(Disk(volume=vol, path=vol.status.path, format=vol.spec.format,
                              read_only=vol.spec.read_only, boot=vid == vm.spec.boot_disk_id))
        return disks

    # -- image store ------------------------------------------------------------------------

    async def gc(self) -> tuple[list[str], int]:
        """Remove stored images no volume refers to; returns (digests removed, bytes freed)."""
        used = {v.status.image_digest for v in await self.store.list(Volume)}
        removed, freed = [], 0
        for img in self.images.list():
            if img.digest not in used:
                freed += self.images.remove(img.digest)
                removed.append(img.digest)
        return removed, freed

    async def image_refs(self) -> dict[str, list[str]]:
        refs: dict[str, list[str]] = {img.digest: [] for img in self.images.list()}
        for v in await self.store.list(Volume):
            if v.status.image_digest:
                refs.setdefault(v.status.image_digest, []).append(v.meta.name)
        return refs


IDLE = (VMState.STOPPED, VMState.ERROR)  # no QEMU holds the VM's disks


def _users(vol: Volume, vms: list[VM], volumes: list[Volume]) -> tuple[list[str], list[str]]:
    """Pure: the VMs attaching ``vol`` and the volumes layered on it, by name."""
    return ([vm.meta.name for vm in vms if vol.meta.id in vm.spec.volume_ids],
            [v.meta.name for v in volumes if v.spec.base_volume_id == vol.meta.id])


def _adapt(progress: Progress | None) -> Callable[[int, int | None], None] | None:
    if progress is None:
        return None

    def inner(done: int, total: int | None) -> None:
        progress(done, total or 0)

    return inner


def _verdict_word(message: str) -> str:
    if "untrusted" in message:
        return "untrusted"
    if "signature" in message:
        return "bad-signature"
    if "not signed" in message:
        return "unsigned"
    return "mismatch"

