"""Store: real SQLite files, every resource kind, concurrency, migrations, and kill -9."""

from __future__ import annotations

import asyncio
import copy
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from infrasim_tui.core import store as store_mod
from infrasim_tui.core.errors import AlreadyExists, Conflict, NotFound, WrongState
from infrasim_tui.core.model import (
    RESOURCE_TYPES,
    VM,
    Accelerator,
    BenchmarkRun,
    BenchmarkRunSpec,
    BenchmarkRunStatus,
    Console,
    ConsoleSpec,
    ConsoleStatus,
    IntegrityConfig,
    Machine,
    Network,
    NetworkMode,
    NetworkSpec,
    NetworkStatus,
    PortForward,
    QosProfile,
    QosProfileSpec,
    QosProfileStatus,
    ResourceMeta,
    Snapshot,
    SnapshotSpec,
    SnapshotStatus,
    VMSpec,
    VMState,
    VMStatus,
    Volume,
    VolumeKind,
    VolumeSpec,
    VolumeStatus,
)
from infrasim_tui.core.store import SchemaTooNew, Store, StoreError


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "infrasim.db")
    yield s
    await s.close()


def meta(name: str, **labels: str) -> ResourceMeta:
    return ResourceMeta(name=name, labels=dict(labels))


def samples() -> list[Any]:
    """One resource of every kind, with every non-default shape the model has."""
    return [
        VM(
            meta("web", tier="front", **{"a.b/c": 'q"uote'}),
            VMSpec(
                machine=Machine.RASPI3B,
                cpu_cores=4,
                memory_mb=1024,
                volume_ids=["v1", "v2"],
                extra_args={"smp": "2"},
                enable_tpm=True,
                port_forwards=[PortForward(2222, 22), PortForward(5353, 53, "udp", "0.0.0.0")],
                accelerator=Accelerator.TCG,
                cmdline="console=ttyAMA0 ünïcode",
            ),
            VMStatus(
                state=VMState.RUNNING,
                pid=4242,
                started_at=1.5,
                last_serial_lines=["login:", ""],
                argv=["qemu-system-aarch64", "-M", "virt"],
                addresses={"default": ["10.0.2.15", "fe80::1"]},
            ),
        ),
        Network(
            meta("lan"),
            NetworkSpec(mode=NetworkMode.SEGMENT, cidr="192.168.7.0/24", dhcp=False),
            NetworkStatus(active=True, attached_vm_ids=["x", "y"]),
        ),
        Volume(
            meta("weights"),
            VolumeSpec(
                kind=VolumeKind.WEIGHTS,
                size_bytes=2**40,
                format="raw",
                read_only=True,
                integrity=IntegrityConfig(public_key="pk", signature="sig", expected_digest="d"),
            ),
            VolumeStatus(path="/x/y.raw", digest="d", verified="verified", verified_at=3.25),
        ),
        Volume(meta("plain"), VolumeSpec(integrity=None)),
        Snapshot(
            meta("snap"),
            SnapshotSpec(vm_id="abc", description="before upgrade", include_memory=False),
            SnapshotStatus(state="ready", size_bytes=12345, vm_state="PAUSED"),
        ),
        Console(meta("con"), ConsoleSpec(vm_id="abc"), ConsoleStatus(path="/s", readers=2)),
        QosProfile(
            meta("lossy"),
            QosProfileSpec(rate_bps=10**6, delay_ms=12.5, jitter_ms=0.25, loss_pct=1.0, seed=7),
            QosProfileStatus(attached_vm_ids=["abc"]),
        ),
        BenchmarkRun(
            meta("bench"),
            BenchmarkRunSpec(vm_id="abc", benchmark="iperf", params={"t": "10"}),
            BenchmarkRunStatus(state="succeeded", results={"mbps": 941.5, "loss": 0.0}),
        ),
    ]


def test_samples_cover_every_resource_type() -> None:
    assert {type(r).kind for r in samples()} == set(RESOURCE_TYPES)


@pytest.mark.parametrize("res", samples(), ids=lambda r: f"{type(r).kind}-{r.meta.name}")
async def test_crud_round_trip(store: Store, res: Any) -> None:
    cls = type(res)
    original = copy.deepcopy(res)
    created = await store.create(res)
    assert res == original, "create must not modify its argument"
    assert created.meta.version == 1
    assert (created.meta.id, created.meta.name, created.meta.labels) == (
        res.meta.id, res.meta.name, res.meta.labels,
    )
    assert created.meta.created_at == res.meta.created_at
    assert created.spec == res.spec and created.status == res.status

    # A fresh connection proves it came from disk, not from a cache.
    await store.close()
    reopened = await Store.open(store.path)
    try:
        by_id = await reopened.get(cls, res.meta.id)
        by_name = await reopened.get(cls, res.meta.name)
        assert by_id == by_name == created
        assert await reopened.list(cls) == [created]

        by_id.meta.labels["new"] = "label"
        updated = await reopened.update(by_id)
        assert updated.meta.version == 2 and updated.meta.labels["new"] == "label"
        assert updated.spec == res.spec and updated.status == res.status
        assert await reopened.get(cls, res.meta.id) == updated

        await reopened.delete(cls, res.meta.id)
        assert await reopened.find(cls, res.meta.id) is None
        with pytest.raises(NotFound):
            await reopened.get(cls, res.meta.name)
    finally:
        await reopened.close()


async def test_duplicate_name_within_kind(store: Store) -> None:
    await store.create(VM(meta("a")))
    with pytest.raises(AlreadyExists) as err:
        await store.create(VM(meta("a")))
    assert err.value.kind == "vm" and "'a' already exists" in str(err.value)
    # Same name in another kind is fine.
    await store.create(Network(meta("a")))
    assert len(await store.list(VM)) == 1


async def test_duplicate_id_is_a_conflict_not_a_crash(store: Store) -> None:
    vm = await store.create(VM(meta("a")))
    with pytest.raises(Conflict, match=f"id {vm.meta.id} is already used by vm 'a'"):
        await store.create(Network(ResourceMeta(name="n", id=vm.meta.id)))


async def test_get_prefers_id_over_name_and_checks_kind(store: Store) -> None:
    first = await store.create(VM(meta("first")))
    # A VM whose *name* is the other VM's id: the id must win.
    await store.create(VM(meta(first.meta.id)))
    assert (await store.get(VM, first.meta.id)).meta.name == "first"
    with pytest.raises(NotFound) as err:
        await store.get(Network, first.meta.id)
    assert err.value.kind == "network" and err.value.ref == first.meta.id
    assert await store.find(VM, "nope") is None


async def test_list_orders_by_name_and_filters_labels(store: Store) -> None:
    for name, labels in [("c", {"env": "prod"}), ("a", {"env": "prod", "a.b": "x"}),
                         ("b", {"env": "dev"})]:
        await store.create(VM(meta(name, **labels)))
    await store.create(Network(meta("zz", env="prod")))
    assert [v.meta.name for v in await store.list(VM)] == ["a", "b", "c"]
    assert [v.meta.name for v in await store.list(VM, {"env": "prod"})] == ["a", "c"]
    assert [v.meta.name for v in await store.list(VM, {"env": "prod", "a.b": "x"})] == ["a"]
    assert await store.list(VM, {"env": "staging"}) == []


async def test_optimistic_concurrency(store: Store) -> None:
    await store.create(VM(meta("a")))
    one = await store.get(VM, "a")
    two = await store.get(VM, "a")
    one.spec.cpu_cores = 2
    stored = await store.update(one)
    assert stored.meta.version == 2 and stored.meta.updated_at >= one.meta.updated_at
    two.spec.cpu_cores = 3
    with pytest.raises(Conflict, match=r"vm a changed since it was read \(version 1, now 2\)"):
        await store.update(two)
    assert (await store.get(VM, "a")).spec.cpu_cores == 2
    # An explicit expected_version overrides the one in meta.
    two.spec.cpu_cores = 4
    assert (await store.update(two, expected_version=2)).meta.version == 3
    with pytest.raises(Conflict):
        await store.update(two, expected_version=2)


async def test_update_status_neither_bumps_nor_conflicts(store: Store) -> None:
    vm = await store.create(VM(meta("a")))
    operator_copy = await store.get(VM, "a")
    vm.status.state = VMState.RUNNING
    vm.status.pid = 99
    assert await store.update_status(vm) is vm
    vm.meta.version = 42  # a stale or bogus version never matters for status writes
    vm.spec.cpu_cores = 8  # nor is the spec written
    await store.update_status(vm)
    got = await store.get(VM, "a")
    assert got.meta.version == 1 and got.status.pid == 99 and got.spec.cpu_cores == 1
    # The operator's read-modify-write still succeeds after the status churn.
    operator_copy.meta.labels = {"x": "y"}
    operator_copy.status = got.status
    assert (await store.update(operator_copy)).meta.version == 2


async def test_rename_respects_uniqueness(store: Store) -> None:
    await store.create(VM(meta("a")))
    b = await store.create(VM(meta("b")))
    b.meta.name = "a"
    with pytest.raises(AlreadyExists):
        await store.update(b)
    b.meta.name = "c"
    await store.update(b)
    assert (await store.get(VM, "c")).meta.id == b.meta.id
    assert await store.find(VM, "b") is None


async def test_missing_resources_raise_not_found(store: Store) -> None:
    ghost = VM(meta("ghost"))
    with pytest.raises(NotFound):
        await store.update(ghost)
    with pytest.raises(NotFound):
        await store.update_status(ghost)
    with pytest.raises(NotFound):
        await store.delete(VM, ghost.meta.id)
    vm = await store.create(VM(meta("real")))
    with pytest.raises(NotFound):  # right id, wrong kind
        await store.delete(Network, vm.meta.id)


async def test_events(store: Store) -> None:
    s1 = await store.append_event("vm", "id1", "a", "vm.created", "a created")
    s2 = await store.append_event("vm", "id2", "b", "vm.created", "b created", {"n": 1})
    s3 = await store.append_event("vm", "id1", "a", "vm.state", "a started",
                                  {"old": VMState.STOPPED, "new": "RUNNING", "l": [1, 2]})
    assert s1 < s2 < s3
    everything = await store.events()
    assert [e.seq for e in everything] == [s1, s2, s3]
    e3 = everything[2]
    assert (e3.kind, e3.resource_id, e3.name, e3.type, e3.message) == (
        "vm", "id1", "a", "vm.state", "a started")
    assert e3.data == {"old": "STOPPED", "new": "RUNNING", "l": [1, 2]}
    assert e3.ts == pytest.approx(time.time(), abs=60)
    assert [e.seq for e in await store.events("id1")] == [s1, s3]
    assert [e.seq for e in await store.events(since_seq=s1)] == [s2, s3]
    assert [e.seq for e in await store.events(limit=2)] == [s1, s2]
    assert [e.seq for e in await store.events("id1", since_seq=s1)] == [s3]


# --- transactions ---------------------------------------------------------------------------


async def test_transaction_commits_together(store: Store) -> None:
    async with store.transaction():
        await store.create(VM(meta("a")))
        await store.create(Network(meta("n")))
        # Inside, reads see the transaction's own writes.
        assert (await store.get(VM, "a")).meta.version == 1
    assert len(await store.list(VM)) == 1 and len(await store.list(Network)) == 1


async def test_transaction_rolls_back_on_exception(store: Store) -> None:
    keep = await store.create(VM(meta("keep")))
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction():
            await store.create(VM(meta("a")))
            keep.spec.cpu_cores = 9
            await store.update(keep)
            await store.append_event("vm", "x", "a", "t", "m")
            raise RuntimeError("boom")
    assert [v.meta.name for v in await store.list(VM)] == ["keep"]
    assert (await store.get(VM, "keep")).meta.version == 1
    assert await store.events() == []
    await store.create(VM(meta("after")))  # the store is usable again


async def test_failed_write_inside_transaction_rolls_back_everything(store: Store) -> None:
    await store.create(VM(meta("dup")))
    with pytest.raises(AlreadyExists):
        async with store.transaction():
            await store.create(VM(meta("fresh")))
            await store.create(VM(meta("dup")))
    assert await store.find(VM, "fresh") is None


async def test_nested_transaction_is_a_savepoint(store: Store) -> None:
    async with store.transaction():
        await store.create(VM(meta("outer")))
        with pytest.raises(ValueError):
            async with store.transaction():
                await store.create(VM(meta("inner")))
                raise ValueError
        async with store.transaction():
            await store.create(VM(meta("inner2")))
    assert [v.meta.name for v in await store.list(VM)] == ["inner2", "outer"]


async def test_tasks_spawned_inside_a_transaction_join_it(store: Store) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await asyncio.gather(*(store.create(VM(meta(f"t{i}"))) for i in range(5)))
            assert len(await store.list(VM)) == 5
            raise RuntimeError
    assert await store.list(VM) == []


async def test_other_coroutines_wait_and_see_only_committed_data(store: Store) -> None:
    inside = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with store.transaction():
            await store.create(VM(meta("tx")))
            inside.set()
            await release.wait()
            order.append("holder commits")

    async def writer() -> None:
        await store.create(VM(meta("other")))
        order.append("writer done")

    task = asyncio.create_task(holder())
    await inside.wait()
    # Reads outside the transaction neither block nor see uncommitted rows.
    assert await asyncio.wait_for(store.find(VM, "tx"), 2) is None
    w = asyncio.create_task(writer())
    await asyncio.sleep(0.05)
    assert not w.done(), "a write must wait for the open transaction"
    release.set()
    await asyncio.gather(task, w)
    assert order == ["holder commits", "writer done"]
    assert [v.meta.name for v in await store.list(VM)] == ["other", "tx"]


async def test_cancelled_transaction_rolls_back(store: Store) -> None:
    inside = asyncio.Event()

    async def body() -> None:
        async with store.transaction():
            await store.create(VM(meta("a")))
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.list(VM) == []
    await asyncio.wait_for(store.create(VM(meta("b"))), 2)  # lock was released


async def test_cancellation_storm_leaves_no_half_transactions(store: Store) -> None:
    """Cancel writers at arbitrary points (BEGIN, body, COMMIT): all-or-nothing, no stuck tx."""
    rng = random.Random()

    async def group(i: int) -> None:
        async with store.transaction():
            for j in range(3):
                await store.create(VM(meta(f"g{i}-{j}", group=str(i))))

    for _round in range(4):
        tasks = [asyncio.create_task(group(_round * 100 + i)) for i in range(40)]
        for task in tasks:
            await asyncio.sleep(rng.uniform(0, 0.002))
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    sizes: dict[str, int] = {}
    for vm in await store.list(VM):
        sizes[vm.meta.labels["group"]] = sizes.get(vm.meta.labels["group"], 0) + 1
    assert set(sizes.values()) <= {3}, sizes
    async with store.transaction():  # the writer is not stuck inside a dangling transaction
        await store.create(VM(meta("after")))


async def test_task_outliving_its_transaction_writes_on_its_own(store: Store) -> None:
    go = asyncio.Event()

    async def later() -> None:
        await go.wait()
        await store.create(VM(meta("late")))

    async with store.transaction():
        bg = asyncio.create_task(later())  # inherits the transaction's context
    go.set()
    await asyncio.wait_for(bg, 2)
    assert (await store.get(VM, "late")).meta.version == 1


async def test_pragmas(store: Store, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "infrasim.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store_mod.MIGRATIONS)
        idx = conn.execute("PRAGMA index_list(events)").fetchall()
        assert any("resource_id" in row[1] for row in idx)
    finally:
        conn.close()
    assert await store.schema_version() == len(store_mod.MIGRATIONS)


# --- migrations -----------------------------------------------------------------------------


def _hand_made_v1(path: Path) -> str:
    """A schema-1 database built without the Store, holding one VM row."""
    conn = sqlite3.connect(path)
    conn.executescript(store_mod.MIGRATIONS[0])
    conn.execute(
        "INSERT INTO resources VALUES ('vm', 'old1', 'legacy', '{\"k\":\"v\"}', 1.0, 2.0, 3,"
        " '{\"cpu_cores\": 2, \"port_forwards\": [{\"host_port\": 8080, \"guest_port\": 80}],"
        " \"removed_field\": 1}', '{\"state\": \"STOPPED\"}')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    return "old1"


async def test_old_database_is_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "old.db"
    _hand_made_v1(db)
    v2 = """
        ALTER TABLE resources ADD COLUMN note TEXT NOT NULL DEFAULT '';
        CREATE INDEX resources_updated ON resources (updated_at);
    """
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, v2))
    s = await Store.open(db)
    try:
        assert await s.schema_version() == 2
        vm = await s.get(VM, "legacy")
        assert vm.meta.version == 3 and vm.meta.labels == {"k": "v"}
        assert vm.spec.cpu_cores == 2 and vm.spec.port_forwards == [PortForward(8080, 80)]
        await s.create(VM(meta("new")))  # the migrated schema takes writes
    finally:
        await s.close()
    conn = sqlite3.connect(db)
    cols = [row[1] for row in conn.execute("PRAGMA table_info(resources)")]
    conn.close()
    assert "note" in cols


async def test_failed_migration_leaves_database_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "old.db"
    _hand_made_v1(db)
    broken = "CREATE TABLE extra (a); INSERT INTO nowhere VALUES (1);"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, broken))
    failed = r"migration to schema version 2 failed.*unchanged at version 1"
    with pytest.raises(StoreError, match=failed):
        await Store.open(db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "extra" not in tables


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(store_mod.MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(SchemaTooNew, match=r"newer than this InfraSim understands.*upgrade") as e:
        await Store.open(db)
    assert isinstance(e.value, WrongState) and str(db) in str(e.value)


async def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "junk.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        await Store.open(db)
    with pytest.raises(StoreError, match=r"cannot open database .*missing-dir does not exist"):
        await Store.open(tmp_path / "missing-dir" / "x.db")


# --- kill -9 --------------------------------------------------------------------------------

BATCH = 4
START = 1000

WRITER = textwrap.dedent(
    f"""
    import asyncio, random, sys
    from pathlib import Path
    from infrasim_tui.core.model import (
        VM, PortForward, QosProfile, QosProfileSpec, ResourceMeta, VMSpec, Volume)
    from infrasim_tui.core.store import Store

    async def main() -> None:
        store = await Store.open(Path(sys.argv[1]))
        async with store.transaction():
            if await store.find(QosProfile, "acct-a") is None:
                await store.create(QosProfile(ResourceMeta("acct-a"), QosProfileSpec(seed={START})))
                await store.create(QosProfile(ResourceMeta("acct-b"), QosProfileSpec(seed=0)))
        batches = [int(v.meta.labels["batch"]) for v in await store.list(VM)]
        batch = max(batches, default=-1) + 1
        print("ready", flush=True)
        rng = random.Random()
        while True:
            # One transaction of several rows: {BATCH} VMs, two account updates, an event.
            async with store.transaction():
                for j in range({BATCH}):
                    spec = VMSpec(cpu_cores=j + 1, port_forwards=[PortForward(2000 + j, 22)])
                    meta = ResourceMeta(f"b{{batch}}-{{j}}", labels={{"batch": str(batch)}})
                    await store.create(VM(meta, spec))
                a = await store.get(QosProfile, "acct-a")
                b = await store.get(QosProfile, "acct-b")
                amount = rng.randint(1, 5)
                a.spec.seed -= amount
                b.spec.seed += amount
                await store.update(a)
                await store.update(b)
                await store.append_event("batch", str(batch), f"b{{batch}}", "batch", "done")
            # Single writes, each its own transaction.
            vol = await store.create(Volume(ResourceMeta(f"single-{{batch}}")))
            vol.status.path = f"/p/{{batch}}"
            await store.update_status(vol)
            batch += 1

    asyncio.run(main())
    """
)


def _check_consistency(db: Path) -> int:
    """Assert the invariants the writer keeps; returns the number of complete batches."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        per_batch = dict(conn.execute(
            "SELECT json_extract(labels, '$.batch'), count(*) FROM resources"
            " WHERE kind = 'vm' GROUP BY 1"
        ).fetchall())
        assert all(n == BATCH for n in per_batch.values()), f"partial batch: {per_batch}"
        batches = {int(b) for b in per_batch}
        assert batches == set(range(len(batches))), "batches must be contiguous"
        events = {int(r[0]) for r in conn.execute("SELECT resource_id FROM events")}
        assert events == batches, "each batch has exactly its event"
        accounts = dict(conn.execute(
            "SELECT name, json_extract(spec, '$.seed') + 0 FROM resources"
            " WHERE kind = 'qos_profile'"
        ).fetchall())
        assert accounts["acct-a"] + accounts["acct-b"] == START, accounts
        versions = {r[0] for r in conn.execute(
            "SELECT version FROM resources WHERE kind = 'qos_profile'")}
        assert versions == {1 + len(batches)}, versions
        singles = {int(r[0].removeprefix("single-")) for r in conn.execute(
            "SELECT name FROM resources WHERE kind = 'volume'")}
        assert singles <= batches, "a single write never lands without its batch"
        return len(batches)
    finally:
        conn.close()


async def test_kill_9_leaves_a_consistent_database(tmp_path: Path) -> None:
    db = tmp_path / "infrasim.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random()
    delays: list[float] = []
    counts: list[int] = []
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout and proc.stderr
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line == "ready\n", proc.stderr.read()
            delays.append(rng.uniform(0.02, 0.25))
            await asyncio.sleep(delays[-1])
            assert proc.poll() is None, proc.stderr.read()
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        counts.append(_check_consistency(db))
        # The Store itself opens the crashed database and reads everything back.
        s = await Store.open(db)
        try:
            assert len(await s.list(VM)) == BATCH * counts[-1]
            assert all(len(v.spec.port_forwards) == 1 for v in await s.list(VM))
        finally:
            await s.close()
    assert counts == sorted(counts), f"committed batches were lost: {counts} (delays {delays})"
    assert counts[-1] > 6, f"the writer made too little progress to test anything: {counts}"
