"""The content-addressed image store on a real file system."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from infrasim_tui.core.errors import IntegrityError, InvalidSpec, NotFound
from infrasim_tui.core.images import ImageStore

MiB = 1024 * 1024


def b3sum(path: Path) -> str:
    return subprocess.run(["b3sum", "--no-names", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src.img"
    path.write_bytes(os.urandom(3 * MiB + 5))
    return path


async def test_import_stores_read_only_copy_by_digest(store: ImageStore, src: Path) -> None:
    image = await store.import_file(src)
    assert image.digest == b3sum(src)
    assert image.path == store.root / "blake3" / image.digest[:2] / image.digest
    assert image.size == src.stat().st_size
    assert image.path.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(image.path.stat().st_mode) == 0o444
    assert store.has(image.digest)
    assert list(store.tmp_dir().iterdir()) == []
    src.write_bytes(b"changed")  # the store owns its copy
    assert b3sum(image.path) == image.digest


async def test_same_content_stored_once(store: ImageStore, src: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin.img"
    twin.write_bytes(src.read_bytes())
    first = await store.import_file(src)
    second = await store.import_file(twin)
    together = await asyncio.gather(store.import_file(src), store.import_file(twin))
    assert {first, second, *together} == {first}
    assert store.list() == [first]
    assert list(store.tmp_dir().iterdir()) == []


async def test_expected_digest_mismatch_leaves_nothing(store: ImageStore, src: Path) -> None:
    wrong = "ab" * 32
    with pytest.raises(IntegrityError) as err:
        await store.import_file(src, expected_digest=wrong)
    actual = b3sum(src)
    assert actual[:16] in err.value.message and wrong[:16] in err.value.message
    assert err.value.exit_code == 9
    assert list(store.tmp_dir().iterdir()) == []
    assert store.list() == [] and not store.has(actual)
    good = await store.import_file(src, expected_digest=actual)
    assert good.digest == actual


async def test_import_progress_covers_copy_and_hash(store: ImageStore, src: Path) -> None:
    seen: list[tuple[int, int]] = []
    await store.import_file(src, progress=lambda d, t: seen.append((d, t)))
    total = 2 * src.stat().st_size
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    done = [d for d, _ in seen]
    assert done == sorted(done) and {t for _, t in seen} == {total}


async def test_sparse_source_stays_sparse(store: ImageStore, tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
        f.seek(100 * MiB)
        f.write(os.urandom(MiB))
    image = await store.import_file(path)
    assert image.digest == b3sum(path) and image.size == 256 * MiB
    assert image.path.stat().st_blocks * 512 < 8 * MiB


async def test_adopt_a_download(store: ImageStore, tmp_path: Path) -> None:
    download = store.tmp_dir() / "download.part"
    download.write_bytes(os.urandom(MiB))
    digest = b3sum(download)
    image = await store.adopt(download, expected_digest=digest)
    assert image.digest == digest and not download.exists()
    assert stat.S_IMODE(image.path.stat().st_mode) == 0o444

    bad = store.tmp_dir() / "bad.part"
    bad.write_bytes(b"evil")
    with pytest.raises(IntegrityError, match=digest[:16]):
        await store.adopt(bad, expected_digest=digest)
    assert list(store.tmp_dir().iterdir()) == []

    outside = tmp_path / "elsewhere.img"
    outside.write_bytes(b"x")
    with pytest.raises(InvalidSpec, match="tmp_file"):
        await store.adopt(outside)
    assert outside.exists()


async def test_list_and_remove(store: ImageStore, tmp_path: Path) -> None:
    images = []
    for i in range(3):
        path = tmp_path / f"{i}.img"
        path.write_bytes(os.urandom(MiB))
        images.append(await store.import_file(path))
    assert store.list() == sorted(images, key=lambda i: i.digest)
    victim = images[1]
    freed = store.remove(victim.digest)
    assert freed >= MiB
    assert not store.has(victim.digest) and not victim.path.exists()
    assert store.list() == sorted([images[0], images[2]], key=lambda i: i.digest)
    with pytest.raises(NotFound, match=victim.digest):
        store.remove(victim.digest)


async def test_missing_source(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await store.import_file(tmp_path / "nope.img")
    assert list(store.tmp_dir().iterdir()) == []


def test_digest_validated(store: ImageStore) -> None:
    for bad in ("AB" * 32, "ab" * 31, "../../etc/passwd", ""):
        with pytest.raises(InvalidSpec) as err:
            store.path_for(bad)
        assert err.value.field == "digest"
    with pytest.raises(InvalidSpec):
        store.has("zz")
    assert not store.has("ab" * 32)
