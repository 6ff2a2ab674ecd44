"""The Networks screen over a real core: two guests on a segment, their live links on screen,
and a profile edited in the console that the switch applies at once, without a guest restart."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from pathlib import Path

from textual.widgets import Input

from infrasim_tui.app import InfraSimApp
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.lock import DataDirLock
from infrasim_tui.core.model import NetworkMode, NetworkSpec, QosProfileSpec
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.paths import DataDir
from infrasim_tui.rpc.connect import connect_core
from infrasim_tui.screens.networks import NetworksScreen
from infrasim_tui.screens.qos_form import QosForm
from infrasim_tui.session import Session
from infrasim_tui.tui import open_session
from infrasim_tui.widgets.link_table import LinkTable

from .conftest import BANNER, guest_spec, run_in_guest
from .test_console_journey import until


async def test_networks_screen_shows_live_links_and_edits_a_profile_live(
        orch: Orchestrator, cloud_kit: GuestKit) -> None:
    await orch.create_network("lab", NetworkSpec(mode=NetworkMode.SEGMENT, cidr="10.88.0.0/24"))
    await orch.create_qos_profile("slow", QosProfileSpec(delay_ms=10, direction="ingress"))
    a = await orch.create_vm("na", guest_spec(cloud_kit, network_ids=["lab"]))
    b = await orch.create_vm("nb", guest_spec(cloud_kit, network_ids=["lab"],
                                              nic_qos={"lab": "slow"}))
    await asyncio.gather(orch.start_vm(a.meta.id), orch.start_vm(b.meta.id))
    await asyncio.gather(*(orch.console(v.meta.id).wait_for(BANNER, 60) for v in (a, b)))
    ip_b = (await orch.get_vm(b.meta.id)).status.addresses["lab"][0].split("/")[0]
    pids = {v: (await orch.get_vm(v)).status.pid for v in (a.meta.id, b.meta.id)}

    session = Session(orch, mode="embedded", data_dir=str(orch.data.root))
    await session.start()
    app = InfraSimApp(session)
    try:
        async with app.run_test(size=(170, 50)) as pilot:
            await pilot.press("N")
            await until(pilot, lambda: isinstance(app.screen, NetworksScreen), "the screen")
            screen = app.screen
            assert isinstance(screen, NetworksScreen)
            out = ""
            for _ in range(40):  # DHCP runs in the background: wait for the lease
                out = await run_in_guest(orch, a.meta.id, f"ping -c 3 -i 0.2 -W 1 {ip_b}")
                if "3 packets received" in out:
                    break
                await asyncio.sleep(0.5)
            rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
            assert len(rtts) == 3 and min(rtts) >= 10, out
            # the links arrive with the 2 Hz network.stats events
            await until(pilot, lambda: any(
                s.vm == "nb" and s.direction == "ingress" and s.frames >= 3
                and s.profile == "slow" for s in screen.links.values()), "nb's ingress link")

            key = next(k for k, s in screen.links.items()
                       if s.vm == "nb" and s.direction == "ingress")
            screen.query_one("#links", LinkTable).move_to(key)
            await pilot.pause()
            await pilot.press("e")
            await until(pilot, lambda: isinstance(app.screen, QosForm), "the form")
            form = app.screen
            form.query_one("#delay_ms", Input).value = "60ms"
            await pilot.pause()
            await pilot.press("enter")
            await until(pilot, lambda: app.screen is screen, "the form to close")
            assert (await orch.get_qos_profile("slow")).spec.delay_ms == 60.0

            out = await run_in_guest(orch, a.meta.id, f"ping -c 3 -i 0.2 -W 2 {ip_b}")
            rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
            assert len(rtts) == 3 and min(rtts) >= 60, out
            await until(pilot, lambda: screen.links[key].delay_p50_ms >= 59, "p50 on screen")
    finally:
        await session.close()
    assert {v: (await orch.get_vm(v)).status.pid for v in pids} == pids  # never restarted


async def test_quitting_the_console_hands_the_switch_to_a_daemon(
        data_dir: Path, cloud_kit: GuestKit) -> None:
    """The embedded console owned the switch; when it quits, a daemon takes over so the
    guests on a segment keep talking."""
    args = argparse.Namespace(address="", attach=False, config=None, data_dir=str(data_dir),
                              no_autostart=False)
    session, close = await open_session(args)
    core = session.core
    assert isinstance(core, Orchestrator)
    await core.create_network("lab", NetworkSpec(mode=NetworkMode.SEGMENT, cidr=""))
    vm = await core.create_vm("h", guest_spec(cloud_kit, network_ids=["lab"]), start=True)
    sw = Path(core.files(vm).qmp_socket).parent / "net1.sw"
    assert sw.exists()
    await close()
    owner = DataDirLock.owner_pid(DataDir(data_dir))
    assert owner and owner != os.getpid()  # a daemon, not this process
    assert sw.exists()  # rebound by the daemon's switch
    remote = await connect_core(data_dir=data_dir, autostart=False)
    try:
        assert [s.vm for s in await remote.link_stats("lab")] == ["h", "h"]
        assert (await remote.get_vm("h")).status.pid == vm.status.pid
    finally:
        await remote.stop_vm("h", force=True)
        await remote.close()
