"""BLAKE3 file digests against the real b3sum, and the verdict cache's invalidation rules."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from infrasim_tui.core import digest as digest_mod
from infrasim_tui.core.digest import (
    FileStamp,
    VerdictCache,
    blake3_bytes,
    blake3_file,
    blake3_file_async,
    check_digest,
)
from infrasim_tui.core.errors import InvalidSpec, NotFound

MiB = 1024 * 1024


def b3sum(path: Path) -> str:
    out = subprocess.run(["b3sum", "--no-names", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return out.strip()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("size", [0, 1, 3 * MiB + 17])
def test_matches_b3sum(tmp_path: Path, size: int) -> None:
    path = write(tmp_path / "f", os.urandom(size))
    assert blake3_file(path) == b3sum(path)
    check_digest(blake3_file(path))


def test_sparse_gib_matches_b3sum(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    subprocess.run(["truncate", "-s", "1G", str(path)], check=True)
    with open(path, "r+b") as f:  # a little data in the middle of the holes
        f.seek(300 * MiB)
        f.write(os.urandom(4096))
    assert os.stat(path).st_blocks * 512 < 1 * MiB  # really sparse
    assert blake3_file(path) == b3sum(path)


def test_bytes_matches_b3sum_stdin() -> None:
    data = os.urandom(5000)
    out = subprocess.run(["b3sum", "--no-names"], input=data, check=True,
                         capture_output=True).stdout.decode().strip()
    assert blake3_bytes(data) == out


async def test_progress_monotonic_and_complete(tmp_path: Path) -> None:
    path = write(tmp_path / "f", os.urandom(5 * MiB + 3))
    seen: list[tuple[int, int]] = []
    got = await blake3_file_async(path, lambda d, t: seen.append((d, t)), slice_bytes=MiB)
    assert got == b3sum(path)
    size = 5 * MiB + 3
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert len(seen) == 7  # 0, then six slices (the last one 3 bytes)
    done = [d for d, _ in seen]
    assert done == sorted(done) and all(t == size for _, t in seen)


def test_progress_on_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "empty", b"")
    seen: list[tuple[int, int]] = []
    assert blake3_file(path, lambda d, t: seen.append((d, t))) == b3sum(path)
    assert seen == [(0, 0)]


def test_refuses_missing_and_directories(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        blake3_file(tmp_path / "nope")
    with pytest.raises(InvalidSpec, match="not a regular file"):
        blake3_file(tmp_path)


def test_check_digest() -> None:
    good = blake3_bytes(b"x")
    assert check_digest(good) == good
    for bad in (good.upper(), good[:-1], good + "0", "g" * 64, ""):
        with pytest.raises(InvalidSpec, match="not a BLAKE3 digest"):
            check_digest(bad)


# --- VerdictCache ---------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write(tmp_path / "disk.img", os.urandom(2 * MiB))


@pytest.fixture
def cache(tmp_path: Path) -> VerdictCache:
    # No racy window, so a file written a moment ago can be cached; test_racy_* covers it.
    return VerdictCache(tmp_path / "verdicts.json", racy_window_s=0)


async def test_hit_on_unchanged_file_and_persisted(tmp_path: Path, image: Path,
                                                   cache: VerdictCache) -> None:
    first = await cache.digest(image)
    assert first == (b3sum(image), False)
    assert await cache.digest(image) == (first[0], True)
    assert cache.get(image) == first[0]
    st = os.stat(tmp_path / "verdicts.json")
    assert stat.S_IMODE(st.st_mode) == 0o600
    reloaded = VerdictCache(tmp_path / "verdicts.json", racy_window_s=0)
    assert await reloaded.digest(image) == (first[0], True)


async def test_miss_after_one_byte_flip_same_size(image: Path, cache: VerdictCache) -> None:
    before_digest, _ = await cache.digest(image)
    before = FileStamp.of(image)
    with open(image, "r+b") as f:
        f.seek(MiB)
        byte = f.read(1)
        f.seek(MiB)
        f.write(bytes([byte[0] ^ 0xFF]))
    after = FileStamp.of(image)
    assert (after.inode, after.size) == (before.inode, before.size)
    assert cache.get(image) is None
    got, from_cache = await cache.digest(image)
    assert not from_cache and got != before_digest and got == b3sum(image)


async def test_miss_after_utime_restore(image: Path, cache: VerdictCache) -> None:
    """Restoring the old mtime hides a write from mtime, not from ctime."""
    await cache.digest(image)
    st = os.stat(image)
    with open(image, "r+b") as f:
        f.write(b"\0")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = FileStamp.of(image)
    assert now.mtime_ns == st.st_mtime_ns and now.size == st.st_size
    assert now.ctime_ns != st.st_ctime_ns
    got, from_cache = await cache.digest(image)
    assert not from_cache and got == b3sum(image)


async def test_miss_after_replace_by_rename(tmp_path: Path, image: Path,
                                            cache: VerdictCache) -> None:
    await cache.digest(image)
    st = os.stat(image)
    other = write(tmp_path / "other.img", os.urandom(st.st_size))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, image)
    assert FileStamp.of(image).inode != st.st_ino
    got, from_cache = await cache.digest(image)
    assert not from_cache and got == b3sum(image)


async def test_modified_while_hashing_is_not_cached(image: Path, cache: VerdictCache) -> None:
    def tamper(done: int, total: int) -> None:
        if done == total:  # hashed everything, stamp not yet re-checked
            with open(image, "r+b") as f:
                f.write(b"tampered")

    got, from_cache = await cache.digest(image, tamper)
    assert not from_cache
    assert cache.get(image) is None
    assert not cache.path.exists()  # nothing was ever stored
    again, from_cache = await cache.digest(image)  # hashed again, now cached
    assert not from_cache and again == b3sum(image) and again != got
    assert await cache.digest(image) == (again, True)


async def test_racy_fresh_file_not_cached_until_settled(tmp_path: Path) -> None:
    """A file changed within the racy window could change again with the same timestamps."""
    cache = VerdictCache(tmp_path / "v.json", racy_window_s=0.3)
    path = write(tmp_path / "fresh.img", os.urandom(4096))
    assert (await cache.digest(path))[1] is False
    assert cache.get(path) is None
    time.sleep(0.35)
    assert (await cache.digest(path))[1] is False
    assert await cache.digest(path) == (b3sum(path), True)


async def test_default_window_is_used(tmp_path: Path) -> None:
    cache = VerdictCache(tmp_path / "v.json")
    assert cache.racy_window_ns == int(digest_mod.RACY_WINDOW_S * 1e9) > 0
    path = write(tmp_path / "fresh.img", b"x")
    await cache.digest(path)
    assert cache.get(path) is None


async def test_damaged_cache_file_is_ignored(tmp_path: Path, image: Path) -> None:
    path = write(tmp_path / "v.json", b"{not json")
    cache = VerdictCache(path, racy_window_s=0)
    assert await cache.digest(image) == (b3sum(image), False)
    assert await VerdictCache(path, racy_window_s=0).digest(image) == (b3sum(image), True)
