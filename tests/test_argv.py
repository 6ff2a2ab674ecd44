"""The spec -> QEMU argv builder: golden command lines, injection safety, and real QEMU starts.

Regenerate the golden files with ``INFRASIM_UPDATE_GOLDEN=1 pytest tests/test_argv.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from infrasim_tui.core.argv import (
    EXTRA_ARGS,
    DiskPlan,
    LaunchPlan,
    NicPlan,
    build_argv,
    kernel_cmdline,
    mac_for,
    qemu_escape,
    validate_extra_args,
)
from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.host import aarch64_probe_image
from infrasim_tui.core.model import Accelerator, Machine, NetworkMode, PortForward, VMSpec

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("INFRASIM_UPDATE_GOLDEN") == "1"
GOLDEN_ROOT = "/run/infrasim/vm"


# --- the cases ------------------------------------------------------------------------------


def case_plan(case: str, root: str, binaries: dict[str, str] | None = None) -> LaunchPlan:
    """One plan per golden case; ``root`` holds every file it names (fixed for goldens, a temp
    dir for real starts)."""
    bins = binaries or {"aarch64": "qemu-system-aarch64", "x86_64": "qemu-system-x86_64"}
    vm_id = "0123456789abcdef"

    def plan(spec: VMSpec, accel: Accelerator, **kw: object) -> LaunchPlan:
        return LaunchPlan(
            vm_id=vm_id, name=f"demo-{case}", spec=spec, accel=accel,
            qemu_binary=bins[spec.arch], qmp_socket=f"{root}/qmp.sock",
            serial_socket=f"{root}/serial.sock", serial_log=f"{root}/serial.log",
            pidfile=f"{root}/qemu.pid", **kw,  # type: ignore[arg-type]
        )

    def kernel(spec: VMSpec) -> VMSpec:
        return replace(spec, kernel=f"{root}/Image", initrd=f"{root}/initrd.gz", cmdline="quiet")

    nic = NicPlan("net0", NetworkMode.USER, mac_for(vm_id, 0))
    boot = DiskPlan("disk0", f"{root}/boot.qcow2", "qcow2", read_only=False, boot=True)
    if case == "virt_hvf":
        spec = kernel(VMSpec(cpu_cores=4, memory_mb=1024))
        return plan(spec, Accelerator.HVF, disks=(boot,), nics=(nic,))
    if case == "virt_kvm":
        spec = kernel(VMSpec(cpu_cores=2, memory_mb=512, enable_tpm=True))
        return plan(spec, Accelerator.KVM, disks=(boot,), nics=(nic,),
                    tpm_socket=f"{root}/swtpm.sock")
    if case == "virt_tcg":
        fwd = (PortForward(2222, 22), PortForward(8080, 80, "udp", "0.0.0.0"))
        weights = DiskPlan("disk1", f"{root}/weights.raw", "raw", read_only=True, boot=False)
        spec = kernel(VMSpec(cpu_cores=2, memory_mb=256, port_forwards=list(fwd)))
        return plan(spec, Accelerator.TCG, disks=(boot, weights),
                    nics=(replace(nic, forwards=fwd),))
    if case == "virt_tcg_extra":
        spec = kernel(VMSpec(cpu_cores=1, memory_mb=128, extra_args={
            "cpu.model": "max", "tcg.tb_size": "16", "tcg.thread": "single",
            "machine.gic_version": "3", "rtc.base": "localtime", "nic.model": "e1000"}))
        return plan(spec, Accelerator.TCG, nics=(nic,))
    if case == "raspi3b":
        spec = kernel(VMSpec(machine=Machine.RASPI3B, cpu_cores=4, memory_mb=1024,
                             dtb=f"{root}/bcm2837-rpi-3-b.dtb"))
        return plan(spec, Accelerator.TCG)
    if case == "compat":
        spec = kernel(VMSpec(cpu_cores=2, memory_mb=256, compatibility_mode=True))
        return plan(spec, Accelerator.TCG, disks=(boot,), nics=(nic,))
    if case == "x86_64":
        spec = VMSpec(arch="x86_64", cpu_cores=2, memory_mb=256)
        return plan(spec, Accelerator.TCG, disks=(boot,),
                    nics=(replace(nic, forwards=(PortForward(2200, 22),)),))
    if case == "x86_64_compat_kvm":
        spec = VMSpec(arch="x86_64", cpu_cores=1, memory_mb=256, compatibility_mode=True)
        return plan(spec, Accelerator.KVM, disks=(boot,), nics=(nic,))
    raise AssertionError(case)


CASES = ["virt_hvf", "virt_kvm", "virt_tcg", "virt_tcg_extra", "raspi3b", "compat", "x86_64",
         "x86_64_compat_kvm"]
TCG_CASES = [c for c in CASES if case_plan(c, GOLDEN_ROOT).accel is Accelerator.TCG]


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    argv = build_argv(case_plan(case, GOLDEN_ROOT))
    path = GOLDEN / f"{case}.argv"
    text = "\n".join(argv) + "\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with INFRASIM_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"argv changed for {case}; review, then regenerate"


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_always_present() -> None:
    for case in CASES:
        argv = build_argv(case_plan(case, GOLDEN_ROOT))
        assert argv[1] == "-S"
        for flag in ("-nodefaults", "-no-user-config"):
            assert flag in argv
        assert _opt(argv, "-display") == ["none"]
        assert _opt(argv, "-qmp") == [f"unix:{GOLDEN_ROOT}/qmp.sock,server=on,wait=off"]
        assert _opt(argv, "-pidfile") == [f"{GOLDEN_ROOT}/qemu.pid"]
        assert "-serial" in argv and "chardev:ser0" in _opt(argv, "-serial")


def test_accelerator_choices() -> None:
    hvf = build_argv(case_plan("virt_hvf", GOLDEN_ROOT))
    assert _opt(hvf, "-accel") == ["hvf"] and _opt(hvf, "-cpu") == ["host"]
    assert _opt(hvf, "-M") == ["virt,gic-version=3"]
    kvm = build_argv(case_plan("virt_kvm", GOLDEN_ROOT))
    assert _opt(kvm, "-accel") == ["kvm"] and _opt(kvm, "-cpu") == ["host"]
    tcg = build_argv(case_plan("virt_tcg", GOLDEN_ROOT))
    assert _opt(tcg, "-accel") == ["tcg"] and _opt(tcg, "-cpu") == ["cortex-a76"]
    assert _opt(tcg, "-M") == ["virt"]
    many = case_plan("virt_tcg", GOLDEN_ROOT)
    many = replace(many, spec=replace(many.spec, cpu_cores=12))
    assert _opt(build_argv(many), "-M") == ["virt,gic-version=3"]


def test_raspi3b_rules() -> None:
    argv = build_argv(case_plan("raspi3b", GOLDEN_ROOT))
    assert "-cpu" not in argv
    assert _opt(argv, "-accel") == ["tcg,thread=single"]
    assert _opt(argv, "-serial") == ["null", "chardev:ser0"]
    assert _opt(argv, "-m") == ["1024"] and _opt(argv, "-smp") == ["4"]
    assert _opt(argv, "-append") == ["console=ttyS1 quiet"]
    assert "-netdev" not in argv
    plan = case_plan("raspi3b", GOLDEN_ROOT)
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, spec=replace(plan.spec, dtb="")))
    assert e.value.field == "dtb"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, nics=(NicPlan("n0", NetworkMode.USER, mac_for("x", 0)),)))
    assert e.value.field == "network_ids"


def test_compat_mode() -> None:
    argv = build_argv(case_plan("compat", GOLDEN_ROOT))
    assert _opt(argv, "-cpu") == ["cortex-a57"] and _opt(argv, "-M") == ["virt,gic-version=2"]
    plan = case_plan("compat", GOLDEN_ROOT)
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, spec=replace(plan.spec, cpu_cores=9)))
    assert e.value.field == "cpu_cores"
    x86 = build_argv(case_plan("x86_64_compat_kvm", GOLDEN_ROOT))
    assert _opt(x86, "-M") == ["pc"] and _opt(x86, "-cpu") == ["qemu64"]


def test_disks_and_nics() -> None:
    argv = build_argv(case_plan("virt_tcg", GOLDEN_ROOT))
    assert _opt(argv, "-blockdev") == [
        f"driver=file,filename={GOLDEN_ROOT}/boot.qcow2,node-name=disk0-file,read-only=off",
        "driver=qcow2,file=disk0-file,node-name=disk0,read-only=off",
        f"driver=file,filename={GOLDEN_ROOT}/weights.raw,node-name=disk1-file,read-only=on",
        "driver=raw,file=disk1-file,node-name=disk1,read-only=on",
    ]
    assert _opt(argv, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:0.0.0.0:8080-:80"]
    devices = _opt(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in devices
    assert "virtio-blk-pci,drive=disk1" in devices
    assert f"virtio-net-pci,netdev=net0,mac={mac_for('0123456789abcdef', 0)}" in devices


def test_mac_for() -> None:
    mac = mac_for("abc", 0)
    assert mac == mac_for("abc", 0) and mac.startswith("52:54:00:")
    assert len(mac.split(":")) == 6 and mac == mac.lower()
    assert mac != mac_for("abc", 1) and mac != mac_for("abd", 0)


# --- escaping and injection ----------------------------------------------------------------


def test_comma_escaping() -> None:
    root = "/tmp/a,b=c,,d"
    plan = case_plan("virt_tcg", root)
    plan = replace(plan, name="x,process=evil")
    argv = build_argv(plan)
    esc = "/tmp/a,,b=c,,,,d"
    assert _opt(argv, "-qmp") == [f"unix:{esc}/qmp.sock,server=on,wait=off"]
    assert _opt(argv, "-name") == ["guest=x,,process=evil"]
    assert _opt(argv, "-chardev")[0] == (f"socket,id=ser0,path={esc}/serial.sock,server=on,"
                                          f"wait=off,logfile={esc}/serial.log,logappend=on")
    assert _opt(argv, "-blockdev")[0].startswith(f"driver=file,filename={esc}/boot.qcow2,node")
    # arguments QEMU takes verbatim are not escaped
    assert _opt(argv, "-kernel") == [f"{root}/Image"]
    assert _opt(argv, "-pidfile") == [f"{root}/qemu.pid"]
    assert qemu_escape("a,b") == "a,,b"


def test_injection_through_spec_values_refused() -> None:
    plan = case_plan("virt_tcg", GOLDEN_ROOT)
    bad_fwd = replace(plan.nics[0], forwards=(PortForward(22, 22, "tcp", "127.0.0.1,smb=/"),))
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, nics=(bad_fwd,)))
    assert e.value.field == "port_forwards[0].host_addr"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, nics=(replace(plan.nics[0], forwards=(
            PortForward(22, 22, "tcp,x=y"),)),)))
    assert e.value.field == "port_forwards[0].protocol"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, nics=(replace(plan.nics[0], mac="52:54:00:00:00:01,x=y"),)))
    assert e.value.field == "nics[0].mac"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, disks=(replace(plan.disks[0], node_name="d,x=y"),)))
    assert e.value.field == "disks[0].node_name"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, disks=(replace(plan.disks[0], format="qcow2,x=y"),)))
    assert e.value.field == "disks[0].format"


def test_extra_args_allow_list() -> None:
    validate_extra_args({})
    validate_extra_args({"cpu.model": "cortex-a72", "tcg.tb_size": "64", "rtc.base": "utc"})
    with pytest.raises(InvalidSpec) as e:
        validate_extra_args({"smp": "2"})
    assert e.value.field == "extra_args.smp"
    for key in EXTRA_ARGS:
        assert key in e.value.message  # the refusal lists what is allowed
    for key, value in [
        ("cpu.model", "cortex-a76,foo=bar"),
        ("cpu.model", "-drive"),
        ("cpu.model", "max -drive file=/etc/passwd"),
        ("cpu.model", "'max'"),
        ("cpu.model", "nonexistent"),
        ("tcg.tb_size", "0"),
        ("tcg.tb_size", "99999"),
        ("tcg.tb_size", "16,thread=multi"),
        ("tcg.thread", "multi=1"),
        ("machine.gic_version", "4"),
        ("rtc.base", "utc,clock=vm"),
        ("nic.model", "e1000 -netdev"),
        ("nic.model", ""),
    ]:
        with pytest.raises(InvalidSpec) as e:
            validate_extra_args({key: value})
        assert e.value.field == f"extra_args.{key}", value


def test_extra_args_in_context() -> None:
    def spec_with(case: str, **extra: str) -> LaunchPlan:
        plan = case_plan(case, GOLDEN_ROOT)
        return replace(plan, spec=replace(plan.spec, extra_args=dict(extra)))

    argv = build_argv(case_plan("virt_tcg_extra", GOLDEN_ROOT))
    assert _opt(argv, "-cpu") == ["max,pauth-impdef=on"]
    assert _opt(argv, "-accel") == ["tcg,thread=single,tb-size=16"]
    assert _opt(argv, "-rtc") == ["base=localtime"]
    assert _opt(argv, "-M") == ["virt,gic-version=3"]
    refused = [
        ("virt_kvm", {"tcg.tb_size": "16"}, "extra_args.tcg.tb_size"),
        ("virt_kvm", {"cpu.model": "cortex-a76"}, "extra_args.cpu.model"),
        ("virt_tcg", {"cpu.model": "host"}, "extra_args.cpu.model"),
        ("virt_tcg", {"cpu.model": "qemu64"}, "extra_args.cpu.model"),
        ("raspi3b", {"cpu.model": "cortex-a53"}, "extra_args.cpu.model"),
        ("x86_64", {"machine.gic_version": "3"}, "extra_args.machine.gic_version"),
        ("virt_tcg", {"machine.gic_version": "host"}, "extra_args.machine.gic_version"),
    ]
    for case, extra, field in refused:
        with pytest.raises(InvalidSpec) as e:
            build_argv(spec_with(case, **extra))
        assert e.value.field == field, (case, extra)
    assert _opt(build_argv(spec_with("virt_kvm", **{"cpu.model": "max"})), "-cpu") == ["max"]
    assert _opt(build_argv(spec_with("raspi3b", **{"tcg.thread": "multi"})),
                "-accel") == ["tcg,thread=multi"]


def test_plan_checks() -> None:
    plan = case_plan("virt_tcg", GOLDEN_ROOT)
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, accel=Accelerator.AUTO))
    assert e.value.field == "accelerator"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, spec=replace(plan.spec, kernel="")))
    assert e.value.field == "initrd"  # an initrd without a kernel
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, spec=replace(plan.spec, arch="riscv64")))
    assert e.value.field == "arch"
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, nics=(replace(plan.nics[0], mode=NetworkMode.SEGMENT),)))
    assert e.value.field == "nics[0].local_path"  # a segment NIC needs its datagram sockets
    seg = replace(plan.nics[0], mode=NetworkMode.SEGMENT, local_path="/s/net0.vm",
                  remote_path="/s/net0.sw", forwards=())
    argv = build_argv(replace(plan, nics=(seg,)))
    assert ("dgram,id=net0,local.type=unix,local.path=/s/net0.vm,remote.type=unix,"
            "remote.path=/s/net0.sw") in argv
    bridged = replace(plan.nics[0], mode=NetworkMode.VMNET_BRIDGED, forwards=())
    with pytest.raises(InvalidSpec) as e:
        build_argv(replace(plan, nics=(bridged,)))
    assert e.value.field == "nics[0].ifname"
    argv = build_argv(replace(plan, nics=(replace(bridged, ifname="en0"),)))
    assert "vmnet-bridged,id=net0,ifname=en0" in argv


# --- kernel command line -------------------------------------------------------------------


def test_kernel_cmdline_rules() -> None:
    assert kernel_cmdline(VMSpec()) == "console=ttyAMA0"
    assert (kernel_cmdline(VMSpec(cmdline="  quiet ip=10.0.2.15 "))
            == "console=ttyAMA0 quiet ip=10.0.2.15")
    assert kernel_cmdline(VMSpec(cmdline="console=tty0 quiet")) == "console=tty0 quiet"
    assert kernel_cmdline(VMSpec(cmdline="quiet console=hvc0")) == "quiet console=hvc0"
    # "netconsole=" is not a console= token
    assert kernel_cmdline(VMSpec(cmdline="netconsole=@/,@10.0.2.2/")).startswith("console=ttyAMA0 ")
    assert kernel_cmdline(VMSpec(machine=Machine.RASPI3B)) == "console=ttyS1"
    assert kernel_cmdline(VMSpec(arch="x86_64", cmdline="rw")) == "console=ttyS0 rw"


# --- real QEMU starts ----------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[str]:
    """Unix socket paths must stay under ~104 bytes: pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="isa-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _binaries() -> dict[str, str]:
    return {a: shutil.which(f"qemu-system-{a}") or "" for a in ("aarch64", "x86_64")}


def _materialise(plan: LaunchPlan) -> None:
    """Create the files a plan names, so QEMU's machine init (which loads them) succeeds."""
    spec = plan.spec
    if spec.kernel:
        Path(spec.kernel).write_bytes(aarch64_probe_image(1))  # any raw image loads
    if spec.initrd:
        Path(spec.initrd).write_bytes(b"\0" * 512)
    if spec.dtb:
        # any valid device tree: the virt board's own, dumped by QEMU
        subprocess.run([plan.qemu_binary, "-M", f"virt,dumpdtb={spec.dtb}", "-display", "none"],
                       check=True, capture_output=True)
    for disk in plan.disks:
        if disk.format == "qcow2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk.path, "64M"],
                           check=True)
        else:
            with open(disk.path, "wb") as f:
                f.truncate(1 << 20)


async def _start_paused(plan: LaunchPlan) -> None:
    """Spawn the argv, check QEMU waits paused with QMP up, then quit it."""
    argv = build_argv(plan)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    qmp = QMPClient("test")
    try:
        for _ in range(100):
            if os.path.exists(plan.qmp_socket) or proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        if not os.path.exists(plan.qmp_socket):
            _, err = await asyncio.wait_for(proc.communicate(), 5)
            raise AssertionError(f"QEMU did not start: {err.decode()}")
        await qmp.connect(plan.qmp_socket)
        status = await qmp.execute("query-status")
        assert isinstance(status, dict)
        assert status["status"] == "prelaunch" and status["running"] is False
        assert os.path.exists(plan.serial_socket)
        assert Path(plan.pidfile).read_text().strip() == str(proc.pid)
        await qmp.execute("quit")
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.qemu
@pytest.mark.parametrize("case", TCG_CASES)
async def test_tcg_golden_argv_starts(case: str, short_dir: str) -> None:
    bins = _binaries()
    plan = case_plan(case, short_dir, bins)
    if not plan.qemu_binary:
        pytest.skip(f"qemu-system-{plan.spec.arch} not installed")
    _materialise(plan)
    await _start_paused(plan)


@pytest.mark.qemu
async def test_comma_paths_start(short_dir: str) -> None:
    root = os.path.join(short_dir, "a,b")
    os.mkdir(root)
    plan = replace(case_plan("virt_tcg", root, _binaries()), name="x,y")
    if not plan.qemu_binary:
        pytest.skip("qemu-system-aarch64 not installed")
    _materialise(plan)
    await _start_paused(plan)
    assert os.path.exists(plan.serial_log)
