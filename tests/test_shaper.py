"""The shaper pipeline on a virtual clock, and the switch over real unix sockets.

The shaper only needs ``time()`` and ``call_at()``; :class:`VirtualLoop` provides them from a
heap that the test advances, so rates, delays and airtimes are checked to the microsecond and
every run is the same. Statistical checks use fixed seeds and binomial (or stated) bounds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import statistics
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from infrasim_tui.core import lora
from infrasim_tui.core.dhcp import DISCOVER, OFFER, build_dhcp, parse_dhcp
from infrasim_tui.core.events import Event
from infrasim_tui.core.frames import BROADCAST, build_udp_ipv4, mac_bytes, parse_ipv4_udp
from infrasim_tui.core.model import DELAY_BUCKETS_MS, LoraSpec, QosProfileSpec
from infrasim_tui.core.shaper import DirectionStats, Shaper, binomial_bounds, default_burst
from infrasim_tui.core.switch import Port, Switch

from .netfakes import FakeQemu, command, frame_to, port_config, segment_config, traffic

# --- a virtual clock -------------------------------------------------------------------------


class VirtualLoop:
    """``time()``/``call_at()`` over a heap; callbacks run in time order (FIFO for equal
    times) only when the test advances the clock."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), callback, args))

    @property
    def pending(self) -> int:
        return len(self._heap)

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            when, _, cb, args = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            cb(*args)
        self.now = max(self.now, t)

    def run(self) -> None:
        """Until nothing is scheduled."""
        while self._heap:
            self.run_until(self._heap[0][0])


@dataclass
class Rig:
    """One shaper on a virtual clock, recording what it delivers and when."""

    loop: VirtualLoop
    shaper: Shaper
    stats: DirectionStats
    out: list[tuple[float, bytes]] = field(default_factory=list)
    pushed: dict[bytes, float] = field(default_factory=dict)

    def push(self, frame: bytes) -> None:
        self.pushed.setdefault(frame, self.loop.now)
        self.shaper.push(frame)

    def push_at(self, t: float, frame: bytes) -> None:
        self.loop.run_until(t)
        self.push(frame)

    def sojourns_ms(self) -> list[float]:
        return [(t - self.pushed[f]) * 1000 for t, f in self.out]

    def ids(self) -> list[int]:
        return [int.from_bytes(f[:4], "big") for _, f in self.out]


def rig(spec: QosProfileSpec | None, *, air: lora.Air | None = None, loop: VirtualLoop | None =
        None, fallback_seed: int = 0) -> Rig:
    loop = loop or VirtualLoop()
    stats = DirectionStats()
    out: list[tuple[float, bytes]] = []
    shaper = Shaper(loop, lambda f: out.append((loop.now, f)), stats, spec, air=air,
                    fallback_seed=fallback_seed)
    return Rig(loop, shaper, stats, out)


def frame(i: int, size: int = 100) -> bytes:
    """Frame number ``i`` (its first 4 bytes), ``size`` bytes long."""
    return i.to_bytes(4, "big") + b"\xab" * (size - 4)


# --- token bucket ------------------------------------------------------------------------------


def achieved_bps(out: list[tuple[float, bytes]], after: float) -> tuple[float, int]:
    """Bits/s delivered between the first delivery at or after ``after`` and the last one
    (the first frame's bytes belong to the time before the window)."""
    window = [(t, len(f)) for t, f in out if t >= after]
    t0, t1 = window[0][0], window[-1][0]
    return sum(n for _, n in window[1:]) * 8 / (t1 - t0), len(window)


@pytest.mark.parametrize("rate", [1_000_000, 8_000_000, 50_000_000])
@pytest.mark.parametrize("sizes", [(64,), (512,), (1514,), (64, 1514)], ids=str)
def test_long_run_rate_exact(rate: int, sizes: tuple[int, ...]) -> None:
    r = rig(QosProfileSpec(rate_bps=rate, queue_bytes=1 << 20))
    rng = random.Random(5)
    mean = (sizes[0] + sizes[-1]) / 2
    n = 12_000
    t = 0.0
    for i in range(n):  # offered load: 1.5 x the rate, sizes uniform in the range
        size = sizes[0] if len(sizes) == 1 else rng.randint(sizes[0], sizes[1])
        r.push_at(t, frame(i, size))
        t += mean * 8 / (rate * 1.5)
    r.loop.run()
    got, frames = achieved_bps(r.out, 2 * default_burst(rate) / (rate / 8))  # burst spent
    print(f"{rate / 1e6:g} Mbit/s, sizes {sizes}: {got / 1e6:.5f} Mbit/s over {frames} frames")
    assert frames > 2000
    assert abs(got / rate - 1) <= 0.005
    assert r.ids() == sorted(r.ids())  # the bucket never reorders


def test_initial_burst_passes_then_rate() -> None:
    r = rig(QosProfileSpec(rate_bps=1_000_000, burst_bytes=20_000))
    for i in range(30):
        r.push(frame(i, 1000))
    assert len(r.out) == 20 and all(t == 0.0 for t, _ in r.out)  # a full bucket at start
    r.loop.run()
    times = [t for t, _ in r.out[20:]]
    assert times == pytest.approx([0.008 * k for k in range(1, 11)], abs=1e-9)  # 1000 B/8 ms
    assert r.stats.frames == 30 and r.stats.bytes == 30_000 and not r.stats.drops


def test_queue_limit_drops_with_cause_bucket() -> None:
    r = rig(QosProfileSpec(rate_bps=1_000_000, burst_bytes=1514, queue_bytes=10_000))
    for i in range(30):
        r.push(frame(i, 1000))
    assert len(r.out) == 1  # 1514 bytes of tokens: one 1000-byte frame
    assert r.shaper.queue_bytes == 10_000 and r.shaper.queue_frames == 10
    assert r.stats.drops == {"bucket": 19}
    r.loop.run()
    assert r.ids() == list(range(11)) and r.shaper.queue_bytes == 0


def test_frame_larger_than_burst_is_dropped_not_stuck() -> None:
    """tbf drops what can never fit the bucket; a frame bigger than the burst must not block
    the queue forever (a jumbo frame from a guest with a large MTU)."""
    r = rig(QosProfileSpec(rate_bps=1_000_000, burst_bytes=2000))
    r.push(frame(0, 1500))
    r.push(frame(1, 4000))
    r.push(frame(2, 1500))
    r.loop.run_until(1.0)
    assert r.ids() == [0, 2]
    assert r.stats.drops == {"bucket": 1} and r.shaper.queue_frames == 0


def test_live_update_caps_budget_keeps_queue() -> None:
    spec = QosProfileSpec(rate_bps=1_000_000, burst_bytes=100_000)
    r = rig(spec)
    for i in range(50):
        r.push(frame(i, 1000))
    assert len(r.out) == 50  # 50 000 of 100 000 tokens used
    r.shaper.apply(replace(spec, burst_bytes=20_000))  # budget capped at the new size
    for i in range(50, 80):
        r.push(frame(i, 1000))
    assert len(r.out) == 70 and r.shaper.queue_frames == 10
    r.loop.run_until(0.020)  # 1000 B per 8 ms at 1 Mbit/s
    assert len(r.out) == 72
    r.shaper.apply(replace(spec, rate_bps=2_000_000, burst_bytes=20_000))  # queue kept
    assert r.shaper.queue_frames == 8
    r.loop.run()
    assert r.ids() == list(range(80)) and not r.stats.drops
    # 500 bytes earned at 1 Mbit/s since the last frame (t=16 ms), the rest at 2 Mbit/s:
    # the next frame at 22 ms, then one per 4 ms
    tail = [t for t, _ in r.out[72:]]
    assert tail == pytest.approx([0.022 + 0.004 * k for k in range(8)], abs=1e-9)


def test_live_update_credits_elapsed_time_at_the_old_rate() -> None:
    """The budget at the update is what the old rate earned; it must not be credited at the
    new rate (an update to a fast rate would otherwise hand out a full burst at once)."""
    r = rig(QosProfileSpec(rate_bps=1_000_000, burst_bytes=50_000))
    for i in range(50):
        r.push(frame(i, 1000))  # bucket empty at t=0
    r.loop.run_until(0.010)  # earns 1250 bytes at 1 Mbit/s
    r.shaper.apply(QosProfileSpec(rate_bps=100_000_000, burst_bytes=50_000))
    for i in range(50, 60):
        r.push(frame(i, 1000))
    assert len(r.out) == 51  # one frame's worth of budget, the rest waits for tokens
    r.loop.run()
    assert r.out[-1][0] == pytest.approx(0.010 + (10_000 - 1250) / 12_500_000, abs=1e-9)


def test_live_updates_do_not_multiply_drain_timers() -> None:
    """Each update with a backlog reschedules the drain; the old timer must not keep a second
    drain chain alive (a profile edited 100 times would run 100 chains under load)."""
    spec = QosProfileSpec(rate_bps=1_000_000, burst_bytes=1514, queue_bytes=1 << 20)
    r = rig(spec)
    for i in range(500):
        r.push(frame(i, 1000))
    for k in range(100):
        r.loop.run_until(0.001 * (k + 1))
        r.shaper.apply(replace(spec, rate_bps=1_000_000 + k))
    r.loop.run_until(0.2)
    assert r.loop.pending <= 2
    r.loop.run()
    assert r.ids() == list(range(500))


@pytest.mark.parametrize("removed", ["no rate", "no profile"])
def test_removing_the_rate_flushes_the_queue(removed: str) -> None:
    r = rig(QosProfileSpec(rate_bps=1_000_000, burst_bytes=2000))
    for i in range(20):
        r.push(frame(i, 1000))
    r.loop.run_until(0.005)
    assert len(r.out) == 2 and r.shaper.queue_frames == 18
    r.shaper.apply(QosProfileSpec(loss_pct=0.0) if removed == "no rate" else None)
    assert r.ids() == list(range(20)) and r.shaper.queue_bytes == 0
    assert all(t == 0.005 for t, _ in r.out[2:])
    r.loop.run()
    assert len(r.out) == 20


# --- delay, jitter, reordering ------------------------------------------------------------------


def delayed(spec: QosProfileSpec, n: int, gap: float) -> Rig:
    r = rig(spec)
    for i in range(n):
        r.push_at(i * gap, frame(i))
    r.loop.run()
    assert len(r.out) == n
    return r


def test_delay_without_jitter_is_exact() -> None:
    r = delayed(QosProfileSpec(delay_ms=20), 200, 0.0013)
    assert r.sojourns_ms() == pytest.approx([20.0] * 200, abs=1e-9)
    assert r.ids() == list(range(200))


def uniform_counts(values: list[float], lo: float, hi: float, bins: int) -> list[int]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    return counts


def test_uniform_jitter_within_bounds_and_flat() -> None:
    n = 5000
    r = delayed(QosProfileSpec(delay_ms=50, jitter_ms=10, seed=11), n, 0.1)  # gaps > 2 j
    d = r.sojourns_ms()
    assert min(d) >= 40.0 and max(d) <= 60.0
    assert min(d) < 40.2 and max(d) > 59.8  # reaches both ends
    lo, hi = binomial_bounds(n, 0.1)
    counts = uniform_counts(d, 40.0, 60.0, 10)
    assert all(lo <= c <= hi for c in counts), counts
    assert statistics.mean(d) == pytest.approx(50.0, abs=0.3)


def test_normal_jitter_stdev() -> None:
    n = 5000
    d = delayed(QosProfileSpec(delay_ms=100, jitter_ms=10, distribution="normal", seed=3), n,
                1.0).sojourns_ms()
    assert statistics.mean(d) == pytest.approx(100.0, abs=0.5)
    assert statistics.stdev(d) == pytest.approx(10.0, rel=0.05)
    beyond = sum(abs(x - 100) > 20 for x in d)  # 2 sigma: 4.55 %
    lo, hi = binomial_bounds(n, 0.0455)
    assert lo <= beyond <= hi


def test_pareto_jitter_heavy_right_tail() -> None:
    n = 5000
    j = 10.0
    d = delayed(QosProfileSpec(delay_ms=100, jitter_ms=j, distribution="pareto", seed=8), n,
                1.0).sojourns_ms()
    # Pareto(alpha 3, xm 1) shifted to mean 0: offsets >= -0.5 j, median -0.24 j, and
    # P(offset > 2 j) = 3.5^-3 = 2.33 % (a uniform or normal jitter gives 0 or 2.3 % / 2 sides)
    assert min(d) >= 100 - 0.5 * j - 1e-9
    assert statistics.median(d) == pytest.approx(100 + j * (2 ** (1 / 3) - 1.5), abs=0.3)
    lo, hi = binomial_bounds(n, 3.5**-3)
    assert lo <= sum(x > 100 + 2 * j for x in d) <= hi
    assert max(d) > 100 + 5 * j  # P(> 5 j) per frame 0.16 %: ~8 expected in 5000
    assert statistics.mean(d) == pytest.approx(100.0, abs=0.5)


def test_jitter_keeps_order() -> None:
    r = delayed(QosProfileSpec(delay_ms=20, jitter_ms=5, seed=2), 3000, 0.001)
    assert r.ids() == list(range(3000))
    d = r.sojourns_ms()
    assert min(d) >= 15.0 - 1e-9
    times = [t for t, _ in r.out]
    assert times == sorted(times)


def test_reorder_ratio_and_overtaking() -> None:
    n = 4000
    r = delayed(QosProfileSpec(delay_ms=50, reorder_pct=25, seed=4), n, 0.001)
    soj = dict(zip(r.ids(), r.sojourns_ms(), strict=True))
    sent_now = [i for i in range(n) if soj[i] == 0.0]
    lo, hi = binomial_bounds(n, 0.25)
    assert lo <= len(sent_now) <= hi
    position = {fid: k for k, fid in enumerate(r.ids())}
    # every undelayed frame after the first 50 ms overtakes the frame sent just before it
    # unless that one was undelayed too
    for i in sent_now:
        if i > 50 and i - 1 not in sent_now:
            assert position[i] < position[i - 1]
    delayed_ids = [i for i in r.ids() if soj[i] > 0]
    assert delayed_ids == sorted(delayed_ids)  # the rest keeps its order


# --- loss and duplication ------------------------------------------------------------------------


def run_frames(spec: QosProfileSpec, n: int, gap: float = 0.001, *,
               fallback_seed: int = 0) -> Rig:
    r = rig(spec, fallback_seed=fallback_seed)
    for i in range(n):
        r.push_at(i * gap, frame(i))
    r.loop.run()
    return r


def test_random_loss_ratio() -> None:
    n = 20_000
    r = run_frames(QosProfileSpec(loss_pct=10, seed=21), n)
    lost = n - len(r.out)
    lo, hi = binomial_bounds(n, 0.10)
    assert lo <= lost <= hi
    assert r.stats.drops == {"loss": lost}


def test_gilbert_elliott_bursts_and_ratio() -> None:
    n = 50_000
    p, r_ = 2.0, 20.0
    run = run_frames(QosProfileSpec(ge_p_pct=p, ge_r_pct=r_, ge_bad_loss_pct=100, seed=5), n)
    got = set(run.ids())
    lost = [i not in got for i in range(n)]
    bursts = [len(list(g)) for k, g in itertools.groupby(lost) if k]
    ratio = sum(lost) / n
    print(f"GE: loss {ratio:.4f} (expected {p / (p + r_):.4f}), {len(bursts)} bursts of mean "
          f"{statistics.mean(bursts):.2f} (expected {100 / r_:.2f})")
    assert ratio == pytest.approx(p / (p + r_), abs=0.015)  # 3.3 sd of a correlated chain
    assert statistics.mean(bursts) == pytest.approx(100 / r_, rel=0.1)
    # random loss at the same ratio would give mean bursts of 1 / (1 - 0.09) = 1.1
    assert run.stats.drops == {"loss": sum(lost)}


def test_gilbert_elliott_good_state_loss() -> None:
    n = 40_000
    # rarely bad (and then only half lost), 5 % lost while good
    spec = QosProfileSpec(ge_p_pct=1, ge_r_pct=50, ge_bad_loss_pct=50, ge_good_loss_pct=5,
                          seed=9)
    lost = n - len(run_frames(spec, n).out)
    pi_bad = 1 / 51
    expected = pi_bad * 0.5 + (1 - pi_bad) * 0.05
    assert lost / n == pytest.approx(expected, abs=0.006)


def test_seed_reproduces_the_decisions() -> None:
    spec = QosProfileSpec(loss_pct=30, duplicate_pct=10, delay_ms=10, jitter_ms=4,
                          reorder_pct=10, seed=77)
    a = run_frames(spec, 3000)
    b = run_frames(spec, 3000)
    c = run_frames(replace(spec, seed=78), 3000)
    assert a.out == b.out
    assert a.ids() != c.ids()
    # seed 0: the port's own seed decides, so two ports differ but each is reproducible
    free = replace(spec, seed=0)
    assert run_frames(free, 3000, fallback_seed=1).out == run_frames(free, 3000,
                                                                     fallback_seed=1).out
    assert run_frames(free, 3000, fallback_seed=1).ids() != run_frames(
        free, 3000, fallback_seed=2).ids()


def test_reapplying_a_profile_restarts_the_draws() -> None:
    spec = QosProfileSpec(loss_pct=50, seed=1234)
    r = rig(spec)
    for i in range(200):
        r.push(frame(i))
    first = r.ids()
    r.out.clear()
    r.shaper.apply(spec)
    for i in range(200):
        r.push(frame(i))
    assert r.ids() == first and 60 < len(first) < 140


def test_duplicate_ratio() -> None:
    n = 20_000
    r = run_frames(QosProfileSpec(duplicate_pct=10, seed=6), n)
    extra = len(r.out) - n
    lo, hi = binomial_bounds(n, 0.10)
    assert lo <= extra <= hi
    ids = r.ids()
    assert sorted(set(ids)) == list(range(n))
    dups = [i for i, j in itertools.pairwise(ids) if i == j]
    assert len(dups) == extra  # a copy follows its original


# --- LoRa ----------------------------------------------------------------------------------------


def radio(**kw: Any) -> LoraSpec:
    return LoraSpec(**({"shadowing_sigma_db": 0.0} | kw))


def test_lora_frames_leave_serially_after_their_airtime() -> None:
    spec = radio(spreading_factor=9, distance_m=50)
    r = rig(QosProfileSpec(lora=spec))
    sizes = [20, 51, 13]
    for i, size in enumerate(sizes):
        r.push(frame(i, size))
    assert not r.out and r.shaper.queue_frames == 3
    r.loop.run()
    toas = [lora.airtime_for(spec, s) for s in sizes]
    assert toas[0] == pytest.approx(0.185344)  # the Semtech table: 20 B at SF9
    assert [t for t, _ in r.out] == pytest.approx(list(itertools.accumulate(toas)), abs=1e-12)
    st = r.stats.lora
    assert st is not None and st.spreading_factor == 9 and st.delivered == 3 and st.lost == 0
    assert st.airtime_ms == pytest.approx(toas[-1] * 1000)
    rssi = 14.0 - (127.41 + 10 * 2.08 * math.log10(50 / 40))
    assert st.rssi_dbm == pytest.approx(rssi)
    assert st.snr_db == pytest.approx(rssi - lora.noise_floor_dbm(125))


def test_lora_below_sensitivity_drops() -> None:
    r = rig(QosProfileSpec(lora=radio(spreading_factor=7, distance_m=5000)))
    for i in range(3):
        r.push(frame(i, 20))
    r.loop.run()
    assert not r.out
    assert r.stats.drops == {"lora_sensitivity": 3}
    st = r.stats.lora
    assert st is not None and st.lost == 3 and st.delivered == 0
    assert st.rssi_dbm < lora.sensitivity_dbm(7, 125)
    # SF12 reaches further: 450 m is heard at SF12 (-135.3 dBm) but not at SF7
    far = radio(distance_m=450)
    at12 = rig(QosProfileSpec(lora=replace(far, spreading_factor=12)))
    at7 = rig(QosProfileSpec(lora=replace(far, spreading_factor=7)))
    for x in (at12, at7):
        x.push(frame(0, 20))
        x.loop.run()
    assert len(at12.out) == 1 and at7.stats.drops == {"lora_sensitivity": 1}


def two_radios(a: LoraSpec, b: LoraSpec, size: int = 20) -> tuple[Rig, Rig]:
    """Two ports on one segment (one Air) sending overlapping frames: B starts when A is half
    way through its airtime."""
    loop = VirtualLoop()
    air = lora.Air()
    ra = rig(QosProfileSpec(lora=a), air=air, loop=loop)
    rb = rig(QosProfileSpec(lora=b), air=air, loop=loop)
    ra.push(frame(1, size))
    loop.run_until(lora.airtime_for(a, size) / 2)
    rb.push(frame(2, size))
    loop.run()
    return ra, rb


def test_lora_same_sf_overlap_collides_both() -> None:
    ra, rb = two_radios(radio(distance_m=100), radio(distance_m=100))
    assert ra.stats.drops == {"collision": 1} and rb.stats.drops == {"collision": 1}
    assert not ra.out and not rb.out
    assert ra.stats.lora is not None and ra.stats.lora.lost == 1


def test_lora_capture_saves_the_stronger_frame() -> None:
    # 30 m vs 100 m: 10.9 dB apart, above the 6 dB capture threshold
    ra, rb = two_radios(radio(distance_m=30), radio(distance_m=100))
    assert len(ra.out) == 1 and not ra.stats.drops
    assert rb.stats.drops == {"collision": 1}
    # the stronger one arriving second captures too
    ra, rb = two_radios(radio(distance_m=100), radio(distance_m=30))
    assert ra.stats.drops == {"collision": 1} and len(rb.out) == 1
    # 4.2 dB apart (60 m vs 100 m) is not enough
    ra, rb = two_radios(radio(distance_m=60), radio(distance_m=100))
    assert ra.stats.drops == rb.stats.drops == {"collision": 1}


def test_lora_different_sf_or_frequency_do_not_collide() -> None:
    ra, rb = two_radios(radio(distance_m=100, spreading_factor=7),
                        radio(distance_m=100, spreading_factor=8))
    assert len(ra.out) == 1 and len(rb.out) == 1
    ra, rb = two_radios(radio(distance_m=100), radio(distance_m=100, frequency_mhz=868.3))
    assert len(ra.out) == 1 and len(rb.out) == 1


def test_lora_frames_not_overlapping_do_not_collide() -> None:
    loop = VirtualLoop()
    air = lora.Air()
    a = radio(distance_m=100)
    ra = rig(QosProfileSpec(lora=a), air=air, loop=loop)
    rb = rig(QosProfileSpec(lora=a), air=air, loop=loop)
    ra.push(frame(1, 20))
    loop.run_until(lora.airtime_for(a, 20) + 0.001)
    rb.push(frame(2, 20))
    loop.run()
    assert len(ra.out) == 1 and len(rb.out) == 1


def test_lora_duty_cycle() -> None:
    spec = radio(distance_m=50, duty_cycle_pct=1.0)
    toa = lora.airtime_for(spec, 20)
    r = rig(QosProfileSpec(lora=spec))
    r.push(frame(0, 20))
    r.push_at(toa + 0.001, frame(1, 20))  # the radio is free, but off for 99 x ToA
    r.push_at(toa * 100 - 0.001, frame(2, 20))
    r.push_at(toa * 100 + 0.001, frame(3, 20))
    r.loop.run()
    assert r.ids() == [0, 3]
    assert r.stats.drops == {"duty_cycle": 2}
    assert r.stats.lora is not None and r.stats.lora.lost == 2 and r.stats.lora.delivered == 2


def test_lora_then_rate_and_delay() -> None:
    """The later stages see the frame when it has left the air; sojourn counts from the push."""
    spec = radio(distance_m=50)
    r = rig(QosProfileSpec(lora=spec, delay_ms=100))
    r.push(frame(0, 20))
    r.loop.run()
    toa = lora.airtime_for(spec, 20)
    assert r.out[0][0] == pytest.approx(toa + 0.1)
    assert r.stats.percentile_ms(0.5) == pytest.approx((toa + 0.1) * 1000)


# --- stats ---------------------------------------------------------------------------------------


def test_delay_histogram_and_percentiles() -> None:
    n = 1500
    r = delayed(QosProfileSpec(delay_ms=20, jitter_ms=18, seed=12), n, 0.1)  # 2..38 ms
    d = r.sojourns_ms()
    bounds = [0.0, *DELAY_BUCKETS_MS, math.inf]
    expected = [sum(lo < x <= hi for x in d) for lo, hi in itertools.pairwise(bounds)]
    assert r.stats.delay_hist == expected
    assert sum(1 for c in expected if c) >= 4  # the check spans several buckets
    ordered = sorted(d)
    assert r.stats.percentile_ms(0.5) == pytest.approx(statistics.median(d), abs=0.1)
    assert ordered[int(0.985 * n)] <= r.stats.percentile_ms(0.99) <= ordered[int(0.995 * n)]
    assert r.stats.frames == n and r.stats.bytes == 100 * n


# --- the switch over real sockets -----------------------------------------------------------------


@dataclass
class Net:
    """A switch with fake QEMU ends; events it published; sockets under ``tmp``."""

    sw: Switch
    tmp: Path
    events: list[Event] = field(default_factory=list)
    fakes: list[FakeQemu] = field(default_factory=list)

    def plug(self, i: int, **kw: Any) -> FakeQemu:
        """Port ``i`` on the segment, its fake QEMU bound first (as QEMU starts first)."""
        cfg = port_config(self.tmp, i, **kw)
        fake = FakeQemu(cfg)
        self.fakes.append(fake)
        self.sw.attach(segment_config(), cfg)
        return fake

    def plug_unbound(self, i: int) -> Port:
        """Port ``i`` whose QEMU has not bound its socket."""
        return self.sw.attach(segment_config(), port_config(self.tmp, i))


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    events: list[Event] = []
    n = Net(Switch(events.append), tmp_path, events)
    try:
        yield n
    finally:
        for f in n.fakes:
            f.close()
        await n.sw.close()


def payload(frame_: bytes) -> bytes:
    udp = parse_ipv4_udp(frame_)
    assert udp is not None
    return udp[4]


BCAST = "ff:ff:ff:ff:ff:ff"


async def test_switch_learns_macs_and_floods_unknown(net: Net) -> None:
    a, b, c = (net.plug(i) for i in (1, 2, 3))
    a.send(frame_to(b.mac, a.mac, b"1"))  # B unknown yet: flooded
    assert payload(await b.recv()) == b"1"
    assert payload(await c.recv()) == b"1"
    b.send(frame_to(a.mac, b.mac, b"2"))  # A learned from its frame
    assert payload(await a.recv()) == b"2"
    a.send(frame_to(b.mac, a.mac, b"3"))  # B learned now
    assert payload(await b.recv()) == b"3"
    assert await c.nothing() == []  # unicast to learned MACs never reached C
    assert await a.nothing(0.01) == []  # nothing echoed to the sender
    assert await b.nothing(0.01) == []


async def test_switch_floods_broadcast_and_multicast(net: Net) -> None:
    a, b, c = (net.plug(i) for i in (1, 2, 3))
    for dst in (BCAST, "01:00:5e:00:00:fb"):
        a.send(frame_to(dst, a.mac, b"all"))
        for x in (b, c):
            assert payload(await x.recv()) == b"all"
    assert await a.nothing() == []


async def test_switch_answers_dhcp_for_the_port_address(net: Net) -> None:
    a = net.plug(1, address="10.66.0.5/24")
    b = net.plug(2, address="10.66.0.6/24")
    body = build_dhcp(op=1, xid=0xBEEF, chaddr=mac_bytes(a.mac),
                      options=[(53, bytes((DISCOVER,)))])
    a.send(build_udp_ipv4(a.mac, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, body))
    udp = parse_ipv4_udp(await a.recv())
    assert udp is not None and udp[2:4] == (67, 68)
    msg = parse_dhcp(udp[4])
    assert msg is not None and msg.msg_type == OFFER and msg.xid == 0xBEEF
    assert msg.yiaddr == "10.66.0.5" and msg.ip_option(1) == "255.255.255.0"
    assert await b.nothing() == []  # answered by the switch, not flooded


async def test_detach_removes_socket_and_segment(net: Net) -> None:
    net.plug(1)
    net.plug(2)
    path = net.tmp / "1.sw"
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    net.sw.detach_vm("vm-1")
    assert not path.exists() and (net.tmp / "2.sw").exists()
    net.sw.detach_vm("vm-2")
    assert not (net.tmp / "2.sw").exists() and net.sw.segments == {}


async def test_port_without_qemu_counts_overflow(net: Net) -> None:
    a, b = net.plug(1), net.plug(2)
    port = net.plug_unbound(3)  # QEMU not running (yet): nothing bound at its path
    for i in range(3):
        a.send(frame_to(BCAST, a.mac, bytes([i])))
        await b.recv()
    assert port.ingress_stats.drops == {"overflow": 3}
    late = FakeQemu(port.cfg)  # QEMU binds later: frames flow
    net.fakes.append(late)
    a.send(frame_to(BCAST, a.mac, b"late"))
    assert payload(await late.recv()) == b"late"


async def test_switch_stats_and_events(net: Net) -> None:
    a = net.plug(1, spec=QosProfileSpec(delay_ms=5, direction="egress"))
    b = net.plug(2)
    for i in range(10):
        a.send(frame_to(b.mac, a.mac, bytes([i]), size=200))
    for _ in range(10):
        await b.recv()
    await asyncio.sleep(1.1)  # at least two publisher ticks
    stats = {(s.vm, s.direction): s for s in net.sw.stats("net-1")}
    out = stats[("vm1", "egress")]
    assert out.frames == 10 and out.bytes == 2000 and out.delay_p50_ms >= 5.0
    assert out.profile == "p" and stats[("vm1", "ingress")].profile == ""
    assert stats[("vm2", "ingress")].frames == 10
    ev = [e for e in net.events if e.type == "network.stats"]
    assert ev and ev[-1].resource_id == "net-1" and len(ev[-1].data["links"]) == 4


async def test_switch_throughput_in_order(net: Net) -> None:
    """20 000 frames between two fake-QEMU processes through unshaped ports, offered at
    10 000 frames/s: they arrive intact and in order. A receiver that stalls for more than
    the switch's hold-back queue (OUT_QUEUE_FRAMES, ~0.1 s here) loses frames, as on a
    switch's full egress buffer: every one of them is counted, and a loaded CI host stalls
    the receiver rarely enough that nearly all arrive."""
    a_cfg, b_cfg = port_config(net.tmp, 1), port_config(net.tmp, 2)
    port_a = net.sw.attach(segment_config(), a_cfg)
    port_b = net.sw.attach(segment_config(), b_cfg)
    n, size = 20_000, 1000
    arrivals = await traffic(
        command("send", "--mode", "unix", "--dst", a_cfg.switch_path, "--bind",
                a_cfg.qemu_path, "--src-mac", a_cfg.mac, "--dst-mac", b_cfg.mac,
                "--rate-bps", str(10_000 * size * 8), "--frame-bytes", str(size),
                "--seconds", str(n / 10_000)),
        command("recv", "--mode", "unix", "--bind", b_cfg.qemu_path, "--idle", "1"))
    took = arrivals[-1].arrived - arrivals[0].arrived if arrivals else 0.0
    print(f"{len(arrivals)} of {n} frames in {took:.2f} s; egress {port_a.egress_stats.frames}"
          f" ingress {port_b.ingress_stats.frames} drops {port_b.ingress_stats.drops}")
    seqs = [x.seq for x in arrivals]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0  # in order, no duplicates
    assert all(x.size == size for x in arrivals)
    assert port_a.egress_stats.frames == port_b.ingress_stats.frames == n
    assert not port_a.egress_stats.drops
    overflow = port_b.ingress_stats.drops.pop("overflow", 0)
    assert not port_b.ingress_stats.drops
    assert len(arrivals) + overflow == n
    assert len(arrivals) >= 0.98 * n


@pytest.mark.parametrize("case", ["switch dhcp off", "no address for the MAC"])
async def test_dhcp_the_switch_does_not_answer_is_forwarded(net: Net, case: str) -> None:
    """The switch answers only for the addresses it assigned; any other DISCOVER must reach the
    segment, where a DHCP server in a guest can answer it."""
    if case == "switch dhcp off":
        net.sw.attach(replace(segment_config(), dhcp=False), port_config(net.tmp, 9))
    a = net.plug(1, address="" if case == "no address for the MAC" else "10.66.0.5/24")
    server = net.plug(2, address="10.66.0.6/24")
    body = build_dhcp(op=1, xid=7, chaddr=mac_bytes(a.mac), options=[(53, bytes((DISCOVER,)))])
    a.send(build_udp_ipv4(a.mac, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, body))
    msg = parse_dhcp(payload(await server.recv()))
    assert msg is not None and msg.msg_type == DISCOVER and msg.xid == 7
    assert await a.nothing() == []  # and no answer from the switch


async def test_frames_of_a_detached_port_do_not_relearn_its_mac(net: Net) -> None:
    """A frame still in a detached port's delay stage must not point the MAC table back at the
    dead port once the VM is plugged in again (its traffic would vanish until it sent)."""
    spec = QosProfileSpec(delay_ms=100, direction="egress")
    a = net.plug(1, spec=spec)
    b = net.plug(2)
    a.send(frame_to(b.mac, a.mac, b"old"))
    await asyncio.sleep(0.02)  # in the delay stage now
    net.sw.detach_vm("vm-1")
    a.close()
    net.fakes.remove(a)
    a2 = net.plug(1)  # the VM restarted: a new port, the same MAC
    await asyncio.sleep(0.15)  # the old frame's delay has passed
    await b.nothing(0.01)
    await a2.nothing(0.01)
    b.send(frame_to(a2.mac, b.mac, b"new"))
    assert payload(await a2.recv()) == b"new"
