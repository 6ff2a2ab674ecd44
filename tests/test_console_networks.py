"""The console's Networks screen: link rows and sparklines from pushed ``network.stats``, the
focused link's plotext graph, the LoRa table, and editing QoS profiles live (tests/console_fakes
StaticCore: fixed segments, profiles and 60 s of link samples)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Label

from infrasim_tui.app import InfraSimApp
from infrasim_tui.cli_units import parse_rate
from infrasim_tui.core.access import Role
from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.events import Event
from infrasim_tui.core.model import (
    LinkStats,
    LoraLinkStats,
    LoraSpec,
    QosProfileSpec,
)
from infrasim_tui.screens.confirm import ConfirmScreen
from infrasim_tui.screens.networks import NetworksScreen, network_line, row_key
from infrasim_tui.screens.qos_form import (
    QosForm,
    build_spec,
    field_of,
    form_values,
    rate_text,
    size_text,
)
from infrasim_tui.session import LINK_HISTORY, LinkPoint, Session, link_key
from infrasim_tui.widgets.key_bar import KeyBar
from infrasim_tui.widgets.link_graph import LinkGraph, delay_range, graph_text, rate_unit
from infrasim_tui.widgets.link_table import (
    LinkTable,
    drops_text,
    format_bps,
    link_cells,
    lora_cells,
    profile_cells,
    resample,
    sparkline,
)

from .console_fakes import (
    FIXED_NOW,
    LINK_SAMPLES,
    NET_LORA,
    NET_SHOP,
    QOS_LORA,
    QOS_LOSSY,
    QOS_WAN,
    VM_WEB1,
    StaticCore,
    fixed_clock,
    fleet_link_stats,
    fleet_networks,
    fleet_qos_profiles,
    link_sample,
    static_session,
)

SIZE = (130, 38)


# -- pure helpers ----------------------------------------------------------------------------


def test_sparkline_scales_pads_and_resamples() -> None:
    assert sparkline([], 5) == ""
    assert sparkline([0, 50, 100], 3) == "▁▅█"
    assert sparkline([0, 50, 100], 5) == "  ▁▅█"  # right-aligned: the newest at the edge
    assert sparkline([0.0, 0.0], 2) == "▁▁"  # idle but sampled
    assert sparkline([-5, math.nan, 10], 3) == "▁▁█"
    assert sparkline([1, 2], 2, top=8) == "▂▃"  # a fixed scale instead of the largest value
    assert sparkline([1e-9, 1.0], 2) == "▂█"  # any traffic shows above idle
    # 120 samples into 20 cells: each is the mean of 6, the newest run last
    values = [float(i // 6) for i in range(120)]
    assert resample(values, 20) == [float(i) for i in range(20)]
    assert resample([1, 2, 3, 4, 5], 2) == [1.5, 4.0]  # the oldest run is the short one
    assert resample([1.0, 2.0], 4) == [1.0, 2.0]
    assert len(sparkline(values, 20)) == 20
    assert sparkline(values, 20)[0] == "▁" and sparkline(values, 20)[-1] == "█"


def test_cells_of_links_lora_and_profiles() -> None:
    assert format_bps(0) == "0" and format_bps(950_000) == "950kbit"
    assert format_bps(8_000_000) == "8.0Mbit" and format_bps(12_500_000_000) == "12Gbit"
    assert drops_text({}) == "-" and drops_text({"loss": 0}) == "-"
    assert drops_text({"overflow": 2, "loss": 12, "bucket": 3}) == "bkt 3 loss 12 ovf 2"
    assert drops_text({"collision": 12_345}) == "coll 12.3k"
    st = LinkStats(vm="web-1", nic="net1", direction="egress", profile="wan-8m", frames=4321,
                   throughput_bps=7_900_000, drops={"bucket": 5}, delay_p50_ms=40.4,
                   delay_p99_ms=1234.0, queue_bytes=3028)
    cells = link_cells(st, [0, 8e6], indent="└ ")
    assert cells == ("└ web-1", "net1", "egress", "wan-8m", "7.9Mbit", " " * 18 + "▁█",
                     "4321", "bkt 5", "40ms", "1.2s", "3.0K")
    assert link_cells(LinkStats(vm="x"), [])[3] == "-"  # unshaped
    lo = LinkStats(vm="db-1", nic="net1", direction="ingress",
                   lora=LoraLinkStats(spreading_factor=9, rssi_dbm=-121.74, snr_db=-7.9,
                                      airtime_ms=185.344, delivered=97, lost=3))
    assert lora_cells(lo) == ("db-1/net1", "in", "SF9", "-121.7", "-7.9", "185.3ms", "97",
                              "3 3%")
    profs = {p.meta.id: p for p in fleet_qos_profiles()}
    assert profile_cells(profs[QOS_WAN]) == ("wan-8m", "8.0Mbit", "32K", "40±5ms norm",
                                             "0.5%", "-", "-", "both", "-", "42", "2")
    assert profile_cells(profs[QOS_LORA])[8] == "SF9 125k 4/5 2km"
    assert profile_cells(profs[QOS_LOSSY])[3:7] == ("20ms", "GE 1%/30%", "0.1%", "1%")
    seg = next(n for n in fleet_networks() if n.meta.id == NET_SHOP)
    assert network_line(seg, ["web-1", "web-2"], 4).split() == [
        "shop-seg", "segment", "10.10.0.0/24", "web-1,", "web-2", "·", "4", "links"]
    assert network_line(seg, [], 0).endswith("· no live ports")


def test_graph_text_two_panels_sized_to_the_pane() -> None:
    points = [LinkPoint(FIXED_NOW - (59 - i), 2e6 + 1e5 * (i % 7), 40.0 + i % 5, 55.0, 0)
              for i in range(60)]
    text = graph_text(points, 60, 14)
    lines = text.splitlines()
    assert len(lines) == 14
    assert text.count("┌") == 2  # throughput above, delay below
    from rich.text import Text

    plain = Text.from_ansi(text).plain.splitlines()
    assert all(len(line) == 60 for line in plain)
    assert "-60" in plain[-1] and plain[-1].rstrip().endswith("0")
    assert graph_text(points, 60, 14) == text  # no figure state leaks between builds
    assert graph_text([], 60, 14) == "" and graph_text(points, 10, 14) == ""
    assert rate_unit([2.5e6]) == (1e6, "Mbit/s") and rate_unit([]) == (1.0, "bit/s")
    lo, hi = delay_range(points)
    assert lo < 40.0 and hi > 55.0 and lo >= 0


def test_form_round_trip_and_errors_name_the_field() -> None:
    for prof in fleet_qos_profiles():  # what the form shows is what it saves back
        spec = prof.spec
        assert build_spec(form_values(spec), spec.lora is not None, spec) == spec
    for bps in (0, 1, 999, 8_000_000, 1_500_000, 12_345_678, 10**9):
        assert parse_rate(rate_text(bps)) == bps
    assert size_text(32 * 1024) == "32kb" and size_text(1514) == "1514"
    base = QosProfileSpec()
    values = form_values(base)
    spec = build_spec({**values, "rate_bps": "12mbit", "delay_ms": "25", "loss_pct": "2",
                       "jitter_ms": "1.5s"}, False, base)
    assert (spec.rate_bps, spec.delay_ms, spec.loss_pct, spec.jitter_ms) == (
        12_000_000, 25.0, 2.0, 1500.0)
    ge = build_spec({**values, "loss_pct": "gemodel:1%,30%"}, False, base)
    assert (ge.ge_p_pct, ge.ge_r_pct, ge.loss_pct) == (1.0, 30.0, 0.0)
    lora = build_spec({**values, "lora-spreading_factor": "6", "lora-distance_m": "2km"},
                      True, base)
    assert lora.lora is not None and lora.lora.distance_m == 2000.0
    assert lora.lora.implicit_header  # SF6 only works that way

    def error(changes: dict[str, str], with_lora: bool = False) -> str:
        with pytest.raises(InvalidSpec) as info:
            build_spec({**values, **changes}, with_lora, base)
        return info.value.field

    assert error({"rate_bps": "fast"}) == "rate_bps"
    assert error({"rate_bps": "8mbit", "burst_bytes": "100"}) == "burst_bytes"  # core check
    assert error({"delay_ms": "-3ms"}) == "delay_ms"
    assert error({"loss_pct": "150"}) == "loss_pct"
    assert error({"loss_pct": "gemodel:1%,0%"}) == "loss_pct"
    assert error({"seed": "1.5"}) == "seed"
    assert error({"lora-spreading_factor": "13"}, True) == "lora-spreading_factor"
    assert error({"lora-tx_power_dbm": "90dBm"}, True) == "lora-tx_power_dbm"
    # LoRa off: its fields are not read
    assert build_spec({**values, "lora-spreading_factor": "13"}, False, base).lora is None
    assert field_of("lora.duty_cycle_pct") == "lora-duty_cycle_pct"
    assert field_of("ge_r_pct") == "loss_pct" and field_of("loss_pct (R)") == "loss_pct"
    # fields the form does not show are kept from the profile being edited
    kept = build_spec(values, True, dataclasses.replace(
        base, queue_bytes=9000, lora=LoraSpec(preamble=12, path_loss_exponent=3.76)))
    assert kept.queue_bytes == 9000 and kept.lora is not None
    assert (kept.lora.preamble, kept.lora.path_loss_exponent) == (12, 3.76)


# -- the session's link history --------------------------------------------------------------


def test_session_keeps_link_history_and_forgets_gone_links() -> None:
    session = Session(StaticCore(), mode="static", data_dir="")
    for ev in fleet_link_stats():
        session.inject(ev)
    shop = session.link_stats(NET_SHOP)
    assert len(shop) == 4 and len(session.link_stats()) == 8
    assert not session.recent  # samples are not history
    web1_out = next(st for st in shop if st.vm == "web-1" and st.direction == "egress")
    history = session.link_history(link_key(web1_out))
    assert len(history) == LINK_HISTORY == LINK_SAMPLES
    assert history[-1].ts == FIXED_NOW and history[-1].throughput_bps == \
        web1_out.throughput_bps
    # the next sample has no web-2: its history goes, web-1's grows (the ring stays bounded)
    links = [st for st in link_sample(0)[NET_SHOP] if st.vm == "web-1"]
    session.inject(Event(type="network.stats", kind="network", resource_id=NET_SHOP,
                         name="shop-seg", message="", ts=FIXED_NOW + 0.5,
                         data={"links": [dataclasses.asdict(st) for st in links]}))
    assert {st.vm for st in session.link_stats(NET_SHOP)} == {"web-1"}
    web2 = next(st for st in shop if st.vm == "web-2")
    assert not session.link_history(link_key(web2))
    assert len(session.link_history(link_key(web1_out))) == LINK_HISTORY
    # a stopped VM's ports are gone at once; a malformed sample is ignored
    session.inject(Event(type="vm.state", kind="vm", resource_id=VM_WEB1, name="web-1",
                         message="", data={"old": "RUNNING", "new": "STOPPED"}, seq=1))
    assert session.link_stats(NET_SHOP) == [] and len(session.link_stats(NET_LORA)) == 4
    before = session.link_samples
    session.inject(Event(type="network.stats", kind="network", resource_id=NET_LORA,
                         name="lora-mesh", message="", data={"links": [{"drops": 5}]}))
    session.inject(Event(type="network.stats", kind="network", resource_id=NET_LORA,
                         name="lora-mesh", message="", data={"links": "web-2"}))
    assert session.link_samples == before and len(session.link_stats(NET_LORA)) == 4


# -- the screen ------------------------------------------------------------------------------


class NetApp(InfraSimApp):
    """The real app over the static core, recording notifications."""

    def __init__(self, core: StaticCore | None = None, **kw: Any) -> None:
        self.static_core = core or StaticCore()
        super().__init__(static_session(self.static_core), clock=fixed_clock, **kw)
        self.notes: list[str] = []

    def notify(self, message: str, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        self.notes.append(str(message))
        super().notify(message, *args, **kw)


async def until(pilot: Pilot[Any], pred: Callable[[], bool], what: str,
                timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def open_networks(pilot: Pilot[Any]) -> NetworksScreen:
    await pilot.pause(0.1)
    await pilot.press("N")
    await until(pilot, lambda: isinstance(pilot.app.screen, NetworksScreen)
                and pilot.app.screen.loaded, "the Networks screen")
    screen = pilot.app.screen
    assert isinstance(screen, NetworksScreen)
    return screen


def cells(screen: NetworksScreen, table: str = "#links") -> dict[str, tuple[str, ...]]:
    return {r.key: r.cells for r in screen.query_one(table, LinkTable).rows}


def web1_egress_key() -> str:
    st = next(s for s in link_sample(0)[NET_SHOP] if s.vm == "web-1" and
              s.direction == "egress")
    return row_key(st)


async def test_lists_links_and_follows_network_stats() -> None:
    app = NetApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_networks(pilot)
        rows = screen.query_one("#links", LinkTable).rows
        groups = [r.cells[0].split()[0] for r in rows if r.group]
        assert groups == ["lab-net", "lora-mesh", "shop-seg"]
        assert len([r for r in rows if not r.group]) == 8
        key = web1_egress_key()
        row = cells(screen)[key]
        last = link_sample(LINK_SAMPLES - 1)[NET_SHOP][0]
        assert row[4] == format_bps(last.throughput_bps) and row[5].strip()
        assert "drops" in next(r for r in rows if r.key == key).warn
        assert len(cells(screen, "#lora")) == 4 and len(cells(screen, "#profiles")) == 3
        assert screen.query_one("#lora", LinkTable).display

        # the core publishes a new sample: the row (and only what changed) follows
        links = link_sample(LINK_SAMPLES - 1)[NET_SHOP]
        links[0] = dataclasses.replace(links[0], throughput_bps=9_500_000.0,
                                       drops={"loss": 999}, delay_p99_ms=321.0)
        table = screen.query_one("#links", LinkTable)
        rendered = table.strips_rendered
        app.static_core.publish_link_stats(NET_SHOP, links)
        await until(pilot, lambda: cells(screen)[key][4] == "9.5Mbit", "the new rate")
        assert cells(screen)[key][7] == "loss 999" and cells(screen)[key][9] == "321ms"
        assert cells(screen)[key][5] != row[5]  # the sparkline moved on
        await pilot.pause(0.6)
        assert table.strips_rendered - rendered <= 4  # the segment's 4 rows; not lora-mesh's

        # the segment loses its ports: the rows go and the network says so
        app.static_core.publish_link_stats(NET_SHOP, [])
        await until(pilot, lambda: key not in cells(screen), "the links to go")
        assert cells(screen)[f"net/{NET_SHOP}"][0].endswith("no live ports")


async def test_graph_follows_the_cursor_and_draws_only_when_shown() -> None:
    app = NetApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_networks(pilot)
        graph = screen.query_one("#graph", LinkGraph)
        await until(pilot, lambda: graph.draws >= 1, "the first graph")
        first = str(graph.border_title)
        assert "db-1 net1 egress" in first  # the cursor starts on the first link
        key = web1_egress_key()
        screen.query_one("#links", LinkTable).move_to(key)
        await until(pilot, lambda: "web-1 net1 egress · wan-8m" in str(graph.border_title),
                    "the graph to follow the cursor")
        draws = graph.draws
        await until(pilot, lambda: graph.draws > draws, "a redraw")
        await pilot.pause(1.1)  # no new samples: nothing to redraw
        idle = graph.draws
        await pilot.pause(0.6)
        assert graph.draws == idle
        # new samples at ~20 Hz: the plot still follows at most at 2 Hz
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(20):
            links = link_sample(i)[NET_SHOP]
            app.static_core.publish_link_stats(NET_SHOP, links)
            await pilot.pause(0.05)
        elapsed = loop.time() - start
        assert 1 <= graph.draws - idle <= int(elapsed * 2) + 1, elapsed
        # hidden behind the form: samples keep coming, no plot is built
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, QosForm), "the form")
        hidden = graph.draws
        for i in range(6):
            app.static_core.publish_link_stats(NET_SHOP, link_sample(i)[NET_SHOP])
            await pilot.pause(0.2)
        assert graph.draws == hidden
        await pilot.press("escape")
        await until(pilot, lambda: graph.draws > hidden, "a redraw once shown again")


async def test_edit_profile_from_a_link_updates_it_live() -> None:
    app = NetApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_networks(pilot)
        screen.query_one("#links", LinkTable).move_to(web1_egress_key())
        await pilot.pause()
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, QosForm), "the form")
        form = app.screen
        assert isinstance(form, QosForm) and form.profile is not None
        assert form.profile.meta.name == "wan-8m"
        rate = form.query_one("#rate_bps", Input)
        assert rate.value == "8mbit" and rate.has_focus
        rate.value = "12mbit"
        form.query_one("#delay_ms", Input).value = "25ms"
        await pilot.pause()
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is screen, "the form to close")
        spec = app.static_core.qos[QOS_WAN].spec
        assert (spec.rate_bps, spec.delay_ms) == (12_000_000, 25.0)
        # everything else as it was
        before = next(p for p in fleet_qos_profiles() if p.meta.id == QOS_WAN).spec
        assert dataclasses.replace(spec, rate_bps=before.rate_bps, delay_ms=before.delay_ms) \
            == before
        assert ("update_qos_profile", "wan-8m") in app.static_core.calls
        assert any("wan-8m saved" in n for n in app.notes)
        await until(pilot, lambda: cells(screen, "#profiles")[f"prof/{QOS_WAN}"][1:4] ==
                    ("12Mbit", "32K", "25±5ms norm"), "the profile row")


async def test_bad_input_is_named_under_its_field_and_nothing_is_sent() -> None:
    app = NetApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_networks(pilot)
        await pilot.press("p", "end")  # the profiles table, last row: wan-8m
        assert screen.selected_profile() is not None
        assert screen.selected_profile().meta.name == "wan-8m"  # type: ignore[union-attr]
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, QosForm), "the form")
        form = app.screen
        assert isinstance(form, QosForm)
        form.query_one("#rate_bps", Input).value = "fast"
        await pilot.press("enter")
        await until(pilot, lambda: form.error is not None, "the error")
        label = form.query_one("#rate_bps-error", Label)
        assert form.error is not None and form.error[0] == "rate_bps"
        assert "'fast' is not a number" in str(label.render())
        assert not label.has_class("-empty")
        assert form.query_one("#rate_bps", Input).has_class("-invalid")
        # a value only the core's validation refuses: a burst smaller than a frame
        form.query_one("#rate_bps", Input).value = "8mbit"
        form.query_one("#burst_bytes", Input).value = "100"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: form.error is not None and form.error[0] == "burst_bytes",
                    "the burst error")
        assert form.query_one("#burst_bytes", Input).has_focus
        assert "full frame" in str(form.query_one("#burst_bytes-error", Label).render())
        assert not form.query_one("#rate_bps-error", Label).display or \
            form.query_one("#rate_bps-error", Label).has_class("-empty")
        assert ("update_qos_profile", "wan-8m") not in app.static_core.calls
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen, "cancel")
        assert app.static_core.qos[QOS_WAN].spec.burst_bytes == 32 * 1024


async def test_new_profile_and_the_cores_refusal_in_the_form() -> None:
    app = NetApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_networks(pilot)
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, QosForm), "the form")
        form = app.screen
        assert isinstance(form, QosForm) and form.profile is None
        form.query_one("#name", Input).value = "wan-8m"  # taken: the core refuses
        form.query_one("#rate_bps", Input).value = "2mbit"
        await pilot.press("enter")
        await until(pilot, lambda: form.error is not None, "the refusal")
        assert "already exists" in str(form.query_one("#qos-error", Label).render())
        assert app.screen is form
        form.query_one("#name", Input).value = "slow-link"
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is screen, "the form to close")
        made = next(p for p in app.static_core.qos.values() if p.meta.name == "slow-link")
        assert made.spec.rate_bps == 2_000_000 and made.spec.lora is None
        await until(pilot, lambda: len(cells(screen, "#profiles")) == 4, "the new row")

        # delete it again from the profiles table (a profile in use would be refused)
        await pilot.press("p")
        screen.query_one("#profiles", LinkTable).move_to(f"prof/{made.meta.id}")
        await pilot.pause()
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
        await pilot.press("y")
        await until(pilot, lambda: made.meta.id not in app.static_core.qos, "the delete")
        await until(pilot, lambda: len(cells(screen, "#profiles")) == 3, "the row to go")


async def test_read_only_hides_editing() -> None:
    app = NetApp(role=Role.VIEWER)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_networks(pilot)
        screen.query_one("#links", LinkTable).move_to(web1_egress_key())
        await pilot.pause(0.1)
        keys = app.screen.active_bindings
        assert "e" not in keys and "a" not in keys and "d" not in keys
        bar = str(screen.query_one(KeyBar).render())
        assert "Edit profile" not in bar and "New profile" not in bar
        await pilot.press("e", "a")
        await pilot.pause(0.2)
        assert app.screen is screen
        assert cells(screen)[web1_egress_key()][3] == "wan-8m"  # still sees everything
    app = NetApp(role=Role.OPERATOR)
    async with app.run_test(size=SIZE) as pilot:
        await open_networks(pilot)
        keys = app.screen.active_bindings
        assert "e" in keys and "a" in keys


async def test_command_line_and_palette_open_networks() -> None:
    app = NetApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        app.run_command("networks")
        await until(pilot, lambda: isinstance(app.screen, NetworksScreen)
                    and app.screen.loaded, ":networks")
        app.action_go_back()
        await until(pilot, lambda: not isinstance(app.screen, NetworksScreen), "back")
        app.run_command(":net")
        await until(pilot, lambda: isinstance(app.screen, NetworksScreen), ":net")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Networks" in titles
