"""qemu-img wrapper: pure argv builders and parsers, then the real qemu-img on real files."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infrasim_tui.core.errors import AlreadyExists, InvalidSpec, NotFound, Unavailable
from infrasim_tui.core.qemu_img import (
    QemuImg,
    QemuImgError,
    create_argv,
    image_opts,
    info_argv,
    parse_progress,
    rebase_argv,
    resize_argv,
    snapshot_argv,
    trim_stderr,
)
from infrasim_tui.core.units import format_size, parse_size

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def qi() -> QemuImg:
    return QemuImg()


def qemu_io(img: Path, command: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(img)],
                          capture_output=True, text=True, timeout=30)


# --- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("100K", 100 * 1024), ("512M", 512 * MiB), ("2G", 2 * GiB),
    ("10GiB", 10 * GiB), ("1.5G", 3 * GiB // 2), ("2 GB", 2 * GiB), ("1t", 1 << 40),
    (" 64 MiB ", 64 * MiB), ("0.5K", 512), ("1b", 1), ("3kb", 3072), ("1e", 1 << 60),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "G", "abc", "-1G", "0", "0G", "1.5", "1.2.3G", "10 XB", "1e3", "4096bb",
    "2GiBs", "0x100", "16E", "1_000",
])
def test_parse_size_rejects_junk(text: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        parse_size(text)
    assert exc.value.field == "size"


def test_format_size() -> None:
    assert format_size(2 * GiB) == "2.0 GiB"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(512 * MiB) == "512.0 MiB"
    assert format_size(3 << 40) == "3.0 TiB"


def test_create_argv() -> None:
    assert create_argv("qemu-img", "/d/a.qcow2", size=GiB) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "/d/a.qcow2", str(GiB)]
    assert create_argv("qemu-img", "/d/o.qcow2", size=None, backing="/d/b.raw",
                       backing_fmt="raw", preallocation="metadata") == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "/d/b.raw", "-F", "raw",
        "-o", "preallocation=metadata", "/d/o.qcow2"]
    # Relative paths can't be read as options or protocols.
    assert create_argv("q", "-rf", size=1, fmt="raw")[-2] == "./-rf"
    assert create_argv("q", "nbd:host:10809", size=1)[-2] == "./nbd:host:10809"


@pytest.mark.parametrize(("kw", "field"), [
    ({"size": None}, "size"),
    ({"size": 0}, "size"),
    ({"size": GiB, "backing": "base.qcow2", "backing_fmt": "qcow2"}, "backing"),
    ({"size": GiB, "backing": "/d/base.qcow2"}, "backing_fmt"),
    ({"size": GiB, "backing_fmt": "qcow2"}, "backing_fmt"),
    ({"size": GiB, "preallocation": "lots"}, "preallocation"),
    ({"size": GiB, "fmt": "qcow2,x=y"}, "fmt"),
])
def test_create_argv_refuses(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        create_argv("qemu-img", "/d/a.qcow2", **kw)  # type: ignore[arg-type]
    assert exc.value.field == field


def test_other_argvs() -> None:
    assert info_argv("qemu-img", "/a", fmt="qcow2", force_share=True, backing_chain=True) == [
        "qemu-img", "info", "--output=json", "-f", "qcow2", "-U", "--backing-chain", "/a"]
    assert info_argv("qemu-img", "/a") == ["qemu-img", "info", "--output=json", "/a"]
    assert resize_argv("qemu-img", "/a", GiB, fmt="raw", shrink=True) == [
        "qemu-img", "resize", "-q", "-f", "raw", "--shrink", "/a", str(GiB)]
    assert rebase_argv("qemu-img", "/o", "", "") == [
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", "/o"]
    assert rebase_argv("qemu-img", "/o", "/b", "raw", unsafe=True) == [
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-u", "-b", "/b", "-F", "raw", "/o"]
    assert image_opts("/x/we,ird.qcow2", "qcow2") == (
        "driver=qcow2,file.driver=file,file.filename=/x/we,,ird.qcow2")
    assert snapshot_argv("qemu-img", "apply", "/a", "before-upgrade") == [
        "qemu-img", "snapshot", "-q", "--image-opts", "-a", "before-upgrade",
        "driver=qcow2,file.driver=file,file.filename=/a"]


@pytest.mark.parametrize("tag", ["", " ", "1", "42"])
def test_snapshot_tags_qemu_img_would_misread(tag: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        snapshot_argv("qemu-img", "create", "/a", tag)
    assert exc.value.field == "tag"


def test_parse_progress_and_trim() -> None:
    out = b"    (0.00/100%)\r    (6.25/100%)\r    (100.00/100%)\r\n"
    assert parse_progress(out) == [0.0, 0.0625, 1.0]
    err = ("qemu-img: Could not open 'driver=qcow2,file.driver=file,file.filename=/a': "
           "Failed to get shared \"write\" lock\nIs another process using the image [/a]?\n")
    assert trim_stderr(err, display={image_opts("/a", "qcow2"): "/a"}) == (
        "Could not open '/a': Failed to get shared \"write\" lock; "
        "Is another process using the image [/a]?")
    assert trim_stderr("qemu-img: bad\nTry 'qemu-img --help' for more information\n") == "bad"


# --- real qemu-img ------------------------------------------------------------------------------


async def test_create_and_info(qi: QemuImg, tmp_path: Path) -> None:
    q, r = tmp_path / "a.qcow2", tmp_path / "b.raw"
    await qi.create(q, size=parse_size("2G"))
    await qi.create(r, size=parse_size("8M"), fmt="raw", preallocation="full")
    info = await qi.info(q)
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", 2 * GiB, "")
    assert info.path == str(q) and info.snapshots == ()
    assert 0 < info.actual_size < MiB and not info.dirty and not info.encrypted
    raw = await qi.info(r, fmt="raw")
    assert (raw.format, raw.virtual_size) == ("raw", 8 * MiB)
    assert raw.actual_size >= 8 * MiB  # preallocated


async def test_create_refuses_to_overwrite(qi: QemuImg, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    await qi.create(img, size=MiB)
    assert qemu_io(img, "write -P 0xaa 0 4k").returncode == 0
    with pytest.raises(AlreadyExists, match="already exists"):
        await qi.create(img, size=GiB)
    assert qemu_io(img, "read -P 0xaa 0 4k").returncode == 0
    assert (await qi.info(img)).virtual_size == MiB


async def test_create_failure_leaves_nothing(qi: QemuImg, tmp_path: Path) -> None:
    img = tmp_path / "o.qcow2"
    with pytest.raises(QemuImgError) as exc:
        await qi.create(img, size=None, backing=str(tmp_path / "missing.qcow2"),
                        backing_fmt="qcow2")
    assert "No such file or directory" in exc.value.message
    assert exc.value.message.startswith("qemu-img create failed: ")
    assert exc.value.argv[:2] == ("qemu-img", "create")
    assert not img.exists()


async def test_overlay_and_backing_chain(qi: QemuImg, tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    await qi.create(base, size=4 * MiB, fmt="raw")
    await qi.create(top, size=None, backing=str(base), backing_fmt="raw")
    info = await qi.info(top, fmt="qcow2")
    assert (info.backing_file, info.backing_format) == (str(base), "raw")
    assert info.virtual_size == 4 * MiB  # inherited from the backing file
    chain = await qi.chain(top, fmt="qcow2")
    assert [(i.path, i.format) for i in chain] == [(str(top), "qcow2"), (str(base), "raw")]
    with pytest.raises(InvalidSpec):
        await qi.create(tmp_path / "x.qcow2", size=None, backing="base.raw", backing_fmt="raw")


async def test_rebase(qi: QemuImg, tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    await qi.create(base, size=MiB)
    assert qemu_io(base, "write -P 0xaa 0 4k").returncode == 0
    await qi.create(top, size=None, backing=str(base), backing_fmt="qcow2")
    moved = tmp_path / "moved.qcow2"
    shutil.copy(base, moved)
    await qi.rebase(top, str(moved), "qcow2", unsafe=True)
    assert (await qi.info(top)).backing_file == str(moved)
    await qi.rebase(top, "", "")  # safe mode: pulls the data in, then detaches
    assert (await qi.info(top)).backing_file == ""
    moved.unlink()
    assert qemu_io(top, "read -P 0xaa 0 4k").returncode == 0


async def test_resize(qi: QemuImg, tmp_path: Path) -> None:
    img, raw = tmp_path / "a.qcow2", tmp_path / "b.raw"
    await qi.create(img, size=GiB)
    await qi.resize(img, 2 * GiB)
    assert (await qi.info(img)).virtual_size == 2 * GiB
    with pytest.raises(InvalidSpec) as exc:
        await qi.resize(img, GiB)
    assert exc.value.field == "size"
    assert "1.0 GiB is smaller than the image's 2.0 GiB" in exc.value.message
    assert "shrink" in exc.value.message
    assert (await qi.info(img)).virtual_size == 2 * GiB
    await qi.create(raw, size=8 * MiB, fmt="raw")
    await qi.resize(raw, 4 * MiB, fmt="raw", shrink=True)
    assert raw.stat().st_size == 4 * MiB


async def test_snapshots_on_a_stopped_image(qi: QemuImg, tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    await qi.create(img, size=16 * MiB)
    assert qemu_io(img, "write -P 0xaa 0 4k").returncode == 0
    await qi.snapshot_create(img, "clean")
    assert qemu_io(img, "write -P 0xbb 0 4k").returncode == 0
    await qi.snapshot_create(img, "dirty")
    snaps = await qi.snapshot_list(img)
    assert [(s.tag, s.id, s.vm_state_size) for s in snaps] == [("clean", "1", 0), ("dirty", "2", 0)]
    assert all(s.date_sec > 1_600_000_000 for s in snaps)

    with pytest.raises(AlreadyExists):
        await qi.snapshot_create(img, "clean")  # qemu-img itself would make a second "clean"
    await qi.snapshot_apply(img, "clean")
    assert qemu_io(img, "read -P 0xaa 0 4k").returncode == 0
    assert qemu_io(img, "read -P 0xbb 0 4k").returncode != 0
    await qi.snapshot_apply(img, "dirty")
    assert qemu_io(img, "read -P 0xbb 0 4k").returncode == 0

    await qi.snapshot_delete(img, "clean")
    assert [s.tag for s in await qi.snapshot_list(img)] == ["dirty"]
    with pytest.raises(NotFound, match="snapshot 'clean' not found"):
        await qi.snapshot_apply(img, "clean")
    with pytest.raises(NotFound):
        await qi.snapshot_delete(img, "clean")
    assert (await qi.check(img))["check-errors"] == 0


async def test_snapshot_on_raw_fails_with_qemu_img_words(qi: QemuImg, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    await qi.create(raw, size=MiB, fmt="raw")
    with pytest.raises(QemuImgError) as exc:
        await qi.snapshot_create(raw, "s1")  # opened as qcow2 (never probed)
    assert exc.value.message == (
        f"qemu-img snapshot failed: Could not open '{raw}': Image is not in qcow2 format")
    with pytest.raises(QemuImgError) as exc:
        await qi.snapshot_create(raw, "s1", fmt="raw")
    assert "Could not create snapshot 's1'" in exc.value.message
    assert "Operation not supported" in exc.value.message
    assert "driver=" not in exc.value.message  # the --image-opts string is shown as the path
    assert "Operation not supported" in exc.value.stderr
    with pytest.raises(QemuImgError, match="does not support checks"):
        await qi.check(raw, fmt="raw")


async def test_missing_file_and_missing_binary(qi: QemuImg, tmp_path: Path) -> None:
    gone = tmp_path / "nope.qcow2"
    with pytest.raises(QemuImgError) as exc:
        await qi.info(gone)
    assert exc.value.message == (
        f"qemu-img info failed: Could not open '{gone}': Could not open '{gone}': "
        "No such file or directory")
    assert exc.value.returncode == 1
    with pytest.raises(Unavailable, match=r"apt-get install qemu-utils.*brew install qemu"):
        await QemuImg(str(tmp_path / "no-qemu-img")).info(gone)


async def test_convert_with_progress(qi: QemuImg, tmp_path: Path) -> None:
    raw, q = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    await qi.create(raw, size=32 * MiB, fmt="raw")
    assert qemu_io(raw, "write -P 0xcd 1M 8M", fmt="raw").returncode == 0
    seen: list[float] = []
    await qi.convert(raw, q, src_fmt="raw", dst_fmt="qcow2", progress=seen.append)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert qemu_io(q, "read -P 0xcd 1M 8M").returncode == 0
    assert (await qi.info(q)).virtual_size == 32 * MiB
    with pytest.raises(AlreadyExists):
        await qi.convert(raw, q, src_fmt="raw", dst_fmt="qcow2")
    # A failed conversion leaves no half-written image behind.
    out = tmp_path / "out.qcow2"
    with pytest.raises(QemuImgError, match="Image is not in qcow2 format"):
        await qi.convert(raw, out, src_fmt="qcow2", dst_fmt="qcow2")
    assert not out.exists()


async def test_force_share_reads_an_image_qemu_holds_open(qi: QemuImg, tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    await qi.create(img, size=64 * MiB)
    await qi.snapshot_create(img, "s1")
    qemu = await asyncio.create_subprocess_exec(
        "qemu-system-aarch64", "-S", "-nodefaults", "-display", "none", "-M", "virt",
        "-blockdev", f"driver=file,filename={img},node-name=f",
        "-blockdev", "driver=qcow2,file=f,node-name=d",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        locked: QemuImgError | None = None
        for _ in range(200):  # QEMU takes the lock within ~50 ms of starting
            assert qemu.returncode is None, "QEMU exited early"
            try:
                await qi.info(img, fmt="qcow2")
            except QemuImgError as e:
                locked = e
                break
            await asyncio.sleep(0.025)
        assert locked is not None, "QEMU never locked the image"
        assert 'Failed to get shared "write" lock' in locked.message
        assert "a running VM has this image open" in locked.message

        info = await qi.info(img, fmt="qcow2", force_share=True)
        assert info.virtual_size == 64 * MiB
        assert [s.tag for s in await qi.snapshot_list(img, force_share=True)] == ["s1"]
        with pytest.raises(QemuImgError, match="lock"):
            await qi.snapshot_create(img, "s2")
    finally:
        qemu.kill()
        await qemu.wait()
    assert (await qi.info(img)).format == "qcow2"  # the lock went with QEMU


async def test_cancelled_convert_kills_qemu_img(qi: QemuImg, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    await qi.create(src, size=512 * MiB, fmt="raw")
    assert qemu_io(src, "write -P 0x11 0 256M", fmt="raw").returncode == 0
    started = asyncio.Event()
    task = asyncio.create_task(qi.convert(
        src, dst, src_fmt="raw", dst_fmt="qcow2", progress=lambda f: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dst.exists()
    assert not any("qemu-img" in p and str(dst) in p for p in _cmdlines())


def _cmdlines() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out
