"""One direction of one switch port: the frames' path through a QoS profile.

Stages, in order (each may drop, hold or duplicate a frame):

1. **LoRa air** (when the profile has ``lora``): the radio sends one frame at a time, each for its
   time on air; a frame waits for the radio, may be refused by the duty cycle, collides with
   overlapping frames on the same frequency and SF, and arrives only above the SF's floor.
2. **Loss**: random, or Gilbert-Elliott (two states, each with its own loss probability).
3. **Duplication**.
4. **Token bucket** (tc tbf): ``rate`` refills a bucket of ``burst`` bytes; a frame leaves when
   the bucket holds its length, else waits in a byte-limited queue (full queue: dropped).
5. **Delay and jitter** with a distribution. Unlike netem, jitter keeps frames in order (a frame
   never leaves before the one ahead of it); reordering is explicit: ``reorder_pct`` of frames
   skip the delay stage and overtake the frames still in it.

All randomness comes from one ``random.Random`` seeded from the profile, so a seed gives the same
decisions frame by frame. Time comes from the event loop (``loop.time()``/``call_at``), so the
same code runs on a virtual clock in unit tests.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from . import lora
from .model import DELAY_BUCKETS_MS, LoraLinkStats, QosProfileSpec

Deliver = Callable[[bytes], None]
SOJOURN_SAMPLES = 2048
DEFAULT_MIN_QUEUE = 64 * 1024
PARETO_ALPHA = 3.0
LORA_MAX_WAITING = 32  # frames queued for the radio before new ones are dropped (overflow)
# Tokens short by less than this still pay for a frame: ``now - stamp`` loses bits to float
# rounding, and a drain timer due "now + 1e-17 s" would otherwise never make progress.
TOKEN_SLACK = 1e-6


class Loop(Protocol):
    """The part of an asyncio loop the shaper uses (a virtual clock in unit tests)."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any: ...


class DirectionStats:
    """Counters of one direction; the switch turns them into ``LinkStats``."""

    __slots__ = ("bytes", "delay_hist", "drops", "frames", "lora", "sojourns")

    def __init__(self) -> None:
        self.bytes = 0
        self.frames = 0
        self.drops: dict[str, int] = {}
        self.delay_hist = [0] * (len(DELAY_BUCKETS_MS) + 1)
        self.sojourns: deque[float] = deque(maxlen=SOJOURN_SAMPLES)  # seconds, newest last
        self.lora: LoraLinkStats | None = None

    def drop(self, cause: str, frames: int = 1) -> None:
        self.drops[cause] = self.drops.get(cause, 0) + frames

    def delivered(self, size: int, sojourn: float) -> None:
        self.bytes += size
        self.frames += 1
        self.sojourns.append(sojourn)
        self.delay_hist[bisect.bisect_left(DELAY_BUCKETS_MS, sojourn * 1000.0)] += 1

    def percentile_ms(self, q: float) -> float:
        return self.percentiles_ms(q)[0]

    def percentiles_ms(self, *qs: float) -> list[float]:
        """Several delay percentiles from one sort of the recent sojourns."""
        if not self.sojourns:
            return [0.0] * len(qs)
        ordered = sorted(self.sojourns)
        n = len(ordered)
        return [ordered[min(n - 1, int(q * n))] * 1000.0 for q in qs]


def default_burst(rate_bps: int) -> int:
    return max(rate_bps // 8 // 100, 2 * 1514)  # 10 ms at rate, at least two full frames


def default_queue(rate_bps: int) -> int:
    return max(DEFAULT_MIN_QUEUE, rate_bps // 8 // 4)  # 250 ms at rate


def jitter_draw(rng: random.Random, distribution: str, jitter: float) -> float:
    """A signed offset (seconds) around the configured delay."""
    if not jitter:
        return 0.0
    if distribution == "normal":
        return rng.gauss(0.0, jitter)
    if distribution == "pareto":
        # heavy right tail with mean 0: Pareto(alpha=3, xm=1) has mean 1.5
        return jitter * (rng.paretovariate(PARETO_ALPHA) - PARETO_ALPHA / (PARETO_ALPHA - 1))
    return rng.uniform(-jitter, jitter)


class Shaper:
    """Shapes one direction of one port and hands surviving frames to ``deliver``."""

    def __init__(self, loop: Loop, deliver: Deliver, stats: DirectionStats,
                 spec: QosProfileSpec | None = None, *, air: lora.Air | None = None,
                 fallback_seed: int = 0) -> None:
        self._loop = loop
        self._deliver = deliver
        self.stats = stats
        self._air = air
        self._fallback_seed = fallback_seed
        self.spec: QosProfileSpec | None = None
        self._rng = random.Random(fallback_seed)
        # token bucket
        self._tokens = 0.0
        self._stamp = loop.time()
        self._queue: deque[tuple[bytes, float]] = deque()
        self.queue_bytes = 0
        self._drain_at: float | None = None
        self._drain_gen = 0  # only the newest drain timer acts; older ones are stale
        # delay stage: delivery times never go backwards (except reordered frames)
        self._last_due = 0.0
        # LoRa radio
        self._radio_free = 0.0
        self._radio_waiting = 0
        self._duty: lora.DutyCycle | None = None
        self._ge_bad = False
        self.apply(spec, initial=True)

    # -- configuration ------------------------------------------------------------------------

    def apply(self, spec: QosProfileSpec | None, *, initial: bool = False) -> None:
        """Take a (new) profile live. The bucket keeps its current budget, capped at the new
        size (as Firecracker's rate limiter does); queued frames stay queued; the random draws
        restart from the seed, so a run after an update is reproducible too."""
        old = self.spec
        if old is not None and old.rate_bps and not initial:
            self._refill(self._loop.time())  # the budget so far, earned at the old rate
        self.spec = spec
        self.stats.sojourns.clear()  # delay percentiles describe the profile in force
        self._fast = spec is None or _is_noop(spec)
        seed = spec.seed if spec is not None and spec.seed else self._fallback_seed
        self._rng = random.Random(seed)
        self._ge_bad = False
        if spec is None:
            self._rate = 0.0
        else:
            self._rate = spec.rate_bps / 8.0
            self._burst = float(spec.burst_bytes or default_burst(spec.rate_bps))
            self._limit = spec.queue_bytes or default_queue(spec.rate_bps)
            self._delay = spec.delay_ms / 1000.0
            self._jitter = spec.jitter_ms / 1000.0
            now = self._loop.time()
            if initial or old is None or not old.rate_bps:
                self._tokens = self._burst  # a new bucket starts full, as tbf's does
            else:
                self._tokens = min(self._tokens, self._burst)
            self._stamp = now
            self._duty = (lora.DutyCycle(spec.lora.duty_cycle_pct)
                          if spec.lora is not None and spec.lora.duty_cycle_pct else None)
            if spec.lora is not None and self.stats.lora is None:
                self.stats.lora = LoraLinkStats(spreading_factor=spec.lora.spreading_factor)
            elif spec.lora is not None and self.stats.lora is not None:
                self.stats.lora.spreading_factor = spec.lora.spreading_factor
        if spec is None or spec.lora is None:
            self.stats.lora = None
        if self._queue and not self._rate:
            self._flush_queue()
        elif self._queue:
            self._schedule_drain(self._loop.time())

    @property
    def queue_frames(self) -> int:
        return len(self._queue) + self._radio_waiting

    # -- the path -----------------------------------------------------------------------------

    def push(self, frame: bytes) -> None:
        now = self._loop.time()
        if self._fast:
            self.stats.delivered(len(frame), 0.0)
            self._deliver(frame)
            return
        spec = self.spec
        assert spec is not None
        if spec.lora is not None:
            self._radio(frame, now, spec)
        else:
            self._impair(frame, now, now)

    def _radio(self, frame: bytes, now: float, spec: QosProfileSpec) -> None:
        radio = spec.lora
        assert radio is not None
        if self._radio_waiting >= LORA_MAX_WAITING:
            self.stats.drop("overflow")
            return
        start = max(now, self._radio_free)
        if self._duty is not None and not self._duty.allows(start):
            self.stats.drop("duty_cycle")
            self._lora_lost()
            return
        toa = lora.airtime_for(radio, len(frame))
        end = start + toa
        self._radio_free = end
        if self._duty is not None:
            self._duty.record(start, toa)
        rx = lora.receive(radio, self._rng)
        tx = None
        if self._air is not None:
            self._air.prune(now)
            tx = self._air.begin(start, end, radio.frequency_mhz, radio.spreading_factor,
                                 rx.rssi_dbm, radio.capture_db, frame=id(frame))
        self._radio_waiting += 1
        self._loop.call_at(end, self._on_air_done, frame, now, rx, tx, toa)

    def _on_air_done(self, frame: bytes, arrived: float, rx: lora.Reception,
                     tx: lora.Transmission | None, toa: float) -> None:
        self._radio_waiting -= 1
        st = self.stats.lora
        if st is not None:
            st.rssi_dbm, st.snr_db, st.airtime_ms = rx.rssi_dbm, rx.snr_db, toa * 1000.0
        if tx is not None and tx.collided:
            self.stats.drop("collision")
            self._lora_lost()
        elif not rx.received:
            self.stats.drop("lora_sensitivity")
            self._lora_lost()
        else:
            if st is not None:
                st.delivered += 1
            self._impair(frame, arrived, self._loop.time())

    def _lora_lost(self) -> None:
        if self.stats.lora is not None:
            self.stats.lora.lost += 1

    def _impair(self, frame: bytes, arrived: float, now: float) -> None:
        spec = self.spec
        assert spec is not None
        rng = self._rng
        if spec.ge_p_pct:
            # Gilbert-Elliott: move between states, then lose with the state's probability
            if self._ge_bad:
                if rng.random() * 100.0 < spec.ge_r_pct:
                    self._ge_bad = False
            elif rng.random() * 100.0 < spec.ge_p_pct:
                self._ge_bad = True
            p = spec.ge_bad_loss_pct if self._ge_bad else spec.ge_good_loss_pct
            if p and rng.random() * 100.0 < p:
                self.stats.drop("loss")
                return
        elif spec.loss_pct and rng.random() * 100.0 < spec.loss_pct:
            self.stats.drop("loss")
            return
        copies = 2 if spec.duplicate_pct and rng.random() * 100.0 < spec.duplicate_pct else 1
        for _ in range(copies):
            if self._rate:
                self._bucket(frame, arrived, now)
            else:
                self._delay_stage(frame, arrived, now)

    # token bucket ---------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _bucket(self, frame: bytes, arrived: float, now: float) -> None:
        size = len(frame)
        if size > self._burst:
            self.stats.drop("bucket")  # it could never leave (tbf drops it too)
            return
        if not self._queue:
            self._refill(now)
            if self._tokens + TOKEN_SLACK >= size:
                self._tokens -= size
                self._delay_stage(frame, arrived, now)
                return
        if self.queue_bytes + size > self._limit:
            self.stats.drop("bucket")
            return
        self._queue.append((frame, arrived))
        self.queue_bytes += size
        if self._drain_at is None:
            self._schedule_drain(now)

    def _schedule_drain(self, now: float) -> None:
        head = len(self._queue[0][0])
        self._refill(now)
        wait = max(0.0, (head - self._tokens) / self._rate)
        self._drain_at = now + wait
        self._drain_gen += 1
        self._loop.call_at(self._drain_at, self._drain, self._drain_gen)

    def _drain(self, gen: int) -> None:
        if gen != self._drain_gen:
            return  # superseded by a reschedule (a live update)
        self._drain_at = None
        if not self._rate:
            self._flush_queue()
            return
        now = self._loop.time()
        self._refill(now)
        q = self._queue
        while q and self._tokens + TOKEN_SLACK >= len(q[0][0]):
            frame, arrived = q.popleft()
            self.queue_bytes -= len(frame)
            self._tokens -= len(frame)
            self._delay_stage(frame, arrived, now)
        if q:
            self._schedule_drain(now)

    def _flush_queue(self) -> None:
        now = self._loop.time()
        while self._queue:
            frame, arrived = self._queue.popleft()
            self.queue_bytes -= len(frame)
            self._delay_stage(frame, arrived, now)

    # delay ----------------------------------------------------------------------------------

    def _delay_stage(self, frame: bytes, arrived: float, now: float) -> None:
        spec = self.spec
        if spec is None or not (self._delay or self._jitter):
            self._out(frame, arrived, now)
            return
        if spec.reorder_pct and self._rng.random() * 100.0 < spec.reorder_pct:
            self._out(frame, arrived, now)  # overtakes the frames still delayed
            return
        due = now + max(0.0, self._delay + jitter_draw(self._rng, spec.distribution,
                                                       self._jitter))
        due = max(due, self._last_due)
        self._last_due = due
        self._loop.call_at(due, self._out_later, frame, arrived)

    def _out_later(self, frame: bytes, arrived: float) -> None:
        self._out(frame, arrived, self._loop.time())

    def _out(self, frame: bytes, arrived: float, now: float) -> None:
        self.stats.delivered(len(frame), now - arrived)
        self._deliver(frame)


def _is_noop(spec: QosProfileSpec) -> bool:
    return not (spec.rate_bps or spec.delay_ms or spec.jitter_ms or spec.loss_pct
                or spec.ge_p_pct or spec.duplicate_pct or spec.reorder_pct
                or spec.lora is not None)


def binomial_bounds(n: int, p: float, z: float = 3.29) -> tuple[float, float]:
    """Counts of successes out of ``n`` outside which a fair ``p`` is implausible (normal
    approximation; z = 3.29 is two-sided 99.9 %)."""
    mean = n * p
    sd = math.sqrt(n * p * (1 - p))
    return mean - z * sd, mean + z * sd
