"""Every invalid spec field is refused before anything starts, with the field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infrasim_tui.core.errors import AlreadyExists, InvalidSpec
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.lifecycle import ALLOWED, allowed
from infrasim_tui.core.model import Accelerator, Machine, PortForward, VMState
from infrasim_tui.core.orchestrator import Orchestrator

from .conftest import guest_spec, qemu_pids


def _cases(kit_dir: str) -> list[tuple[str, dict[str, Any], str]]:
    missing = f"{kit_dir}/does-not-exist"
    return [
        ("arch", {"arch": "riscv64"}, "not supported"),
        ("cpu_cores", {"cpu_cores": 0}, "out of range"),
        ("cpu_cores", {"cpu_cores": 1000}, "out of range"),
        ("memory_mb", {"memory_mb": 8}, "out of range"),
        ("memory_mb", {"memory_mb": 10**9}, "out of range"),
        ("memory_mb", {"machine": Machine.RASPI3B, "cpu_cores": 4, "memory_mb": 512},
         "exactly 1024"),
        ("cpu_cores", {"machine": Machine.RASPI3B, "cpu_cores": 2, "memory_mb": 1024},
         "exactly 4"),
        ("dtb", {"machine": Machine.RASPI3B, "cpu_cores": 4, "memory_mb": 1024}, "device tree"),
        ("kernel", {"kernel": missing}, "does not exist"),
        ("kernel", {"kernel": "relative/vmlinuz"}, "absolute"),
        ("kernel", {"kernel": "", "initrd": ""}, "needs a kernel"),
        ("initrd", {"initrd": missing}, "does not exist"),
        ("cmdline", {"cmdline": "a\nb"}, "single line"),
        ("extra_args.nope", {"extra_args": {"nope": "1"}}, ""),
        ("extra_args.cpu.model", {"extra_args": {"cpu.model": "cortex-a76,pmu=off"}}, ""),
        ("extra_args.cpu.model", {"extra_args": {"cpu.model": "max -drive file=/etc/passwd"}},
         ""),
        ("extra_args.cpu.model", {"extra_args": {"cpu.model": "host"}}, "needs kvm or hvf"),
        ("extra_args.cpu.model", {"extra_args": {"cpu.model": "Haswell"}}, "not a aarch64 CPU"),
        ("port_forwards[0].host_port", {"port_forwards": [PortForward(0, 80)]}, "not a port"),
        ("port_forwards[0].guest_port", {"port_forwards": [PortForward(8080, 70000)]},
         "not a port"),
        ("port_forwards[0].host_addr",
         {"port_forwards": [PortForward(8080, 80, host_addr="127.0.0.1,hostfwd=tcp::22-:22")]},
         "not an IP"),
        ("port_forwards[0].protocol", {"port_forwards": [PortForward(8080, 80, "sctp")]},
         "tcp or udp"),
        ("port_forwards[1].host_port",
         {"port_forwards": [PortForward(8080, 80), PortForward(8080, 81)]}, "twice"),
        ("volume_ids[0]", {"volume_ids": ["nope"]}, "no such"),
        ("boot_disk_id", {"boot_disk_id": "disk0"}, "volume_ids"),
        ("network_ids[0]", {"network_ids": ["lan"]}, "no such"),
        ("qos_profile_id", {"qos_profile_id": "slow"}, "no QoS profile"),
        ("accelerator", {"accelerator": Accelerator.HVF}, "macOS"),
        ("accelerator", {"accelerator": Accelerator.KVM}, ""),
        ("enable_tpm", {"enable_tpm": True}, ""),
    ]


@pytest.mark.parametrize("case", range(len(_cases(""))))
async def test_invalid_field_is_refused_and_nothing_happens(
        orch: Orchestrator, cloud_kit: GuestKit, case: int) -> None:
    field, changes, words = _cases(str(cloud_kit.kernel.parent))[case]
    spec = guest_spec(cloud_kit, **changes)
    with pytest.raises(InvalidSpec) as err:
        await orch.create_vm("bad", spec, start=True)
    assert err.value.field == field, str(err.value)
    assert field in str(err.value) and words in str(err.value)
    assert await orch.list_vms() == []
    assert qemu_pids(orch.data.root) == []


@pytest.mark.parametrize("name", ["", "Web", "-x", "x-", "a_b", "a" * 64, "x;rm -rf /"])
async def test_bad_names(orch: Orchestrator, cloud_kit: GuestKit, name: str) -> None:
    with pytest.raises(InvalidSpec, match=r"^name: "):
        await orch.create_vm(name, guest_spec(cloud_kit))
    assert await orch.list_vms() == []


async def test_bad_labels(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    with pytest.raises(InvalidSpec, match=r"labels\.env"):
        await orch.create_vm("x", guest_spec(cloud_kit), {"env": "a b"})


async def test_unique_names(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    await orch.create_vm("dup", guest_spec(cloud_kit))
    with pytest.raises(AlreadyExists, match="'dup' already exists"):
        await orch.create_vm("dup", guest_spec(cloud_kit))
    assert len(await orch.list_vms()) == 1


async def test_file_that_vanished_is_refused_at_start(orch: Orchestrator, cloud_kit: GuestKit,
                                                      tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(cloud_kit.kernel.read_bytes()[:4096])
    await orch.create_vm("v", guest_spec(cloud_kit, kernel=str(kernel)))
    kernel.unlink()
    with pytest.raises(InvalidSpec, match=r"^kernel: .*does not exist"):
        await orch.start_vm("v")
    assert (await orch.get_vm("v")).status.state == VMState.STOPPED
    assert qemu_pids(orch.data.root) == []


def test_state_machine_table() -> None:
    assert allowed("start", VMState.STOPPED) and allowed("start", VMState.ERROR)
    assert not allowed("start", VMState.RUNNING)
    assert not allowed("pause", VMState.PAUSED) and allowed("resume", VMState.PAUSED)
    assert not allowed("delete", VMState.RUNNING)
    assert set(ALLOWED) == {"start", "stop", "pause", "resume", "restart", "delete",
                            "snapshot"}
