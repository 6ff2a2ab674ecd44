"""Durable state: resources (meta + spec + status as JSON) and an append-only event log.

SQLite in WAL mode through aiosqlite, so the event loop never waits on disk. Two connections:
all writes go through one writer, serialized by an asyncio.Lock so coroutines never interleave
inside another's transaction; reads from outside a transaction use a second connection, which
sees only committed data and never waits for a writer.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite

from infrasim_tui.core.errors import (
    AlreadyExists,
    Conflict,
    InfraSimError,
    NotFound,
    WrongState,
)
from infrasim_tui.core.model import ResourceMeta, from_dict, to_dict

BUSY_TIMEOUT_MS = 5000

# Schema migrations, in order: MIGRATIONS[i] takes the database from user_version i to i+1.
# Append only; never edit a released entry (databases in the field already ran it).
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE resources (
        kind TEXT NOT NULL,
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        version INTEGER NOT NULL,
        spec TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL DEFAULT '{}',
        UNIQUE (kind, name)
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_resource_id ON events (resource_id, seq);
    """,
)


class StoreError(InfraSimError):
    """The database can't be opened or migrated; the message names the file."""


class SchemaTooNew(StoreError, WrongState):
    """The database was written by a newer InfraSim: refusing beats silently losing data."""


class _Resource(Protocol):
    kind: str
    meta: ResourceMeta

    @property
    def spec(self) -> Any: ...

    @property
    def status(self) -> Any: ...


R = TypeVar("R", bound=_Resource)
T = TypeVar("T")


@dataclass(frozen=True)
class EventRecord:
    seq: int
    ts: float
    kind: str
    resource_id: str
    name: str
    type: str
    message: str
    data: dict[str, Any]


_COLUMNS = "kind, id, name, labels, created_at, updated_at, version, spec, status"


def _json(value: Any) -> str:
    return json.dumps(to_dict(value), sort_keys=True, separators=(",", ":"))


def _row_to_resource(cls: type[R], row: sqlite3.Row | tuple[Any, ...]) -> R:
    _kind, id_, name, labels, created_at, updated_at, version, spec, status = row
    return from_dict(
        cls,
        {
            "meta": {
                "id": id_,
                "name": name,
                "labels": json.loads(labels),
                "created_at": created_at,
                "updated_at": updated_at,
                "version": version,
            },
            "spec": json.loads(spec),
            "status": json.loads(status),
        },
    )


class _Tx:
    """Marks the coroutines (and tasks they spawn) running inside one open transaction."""

    def __init__(self) -> None:
        self.active = True
        self.savepoints = 0


class Store:
    """Resources and events of one data dir. Open with :meth:`open`, then ``await close()``."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._w = writer
        self._r = reader
        self._write_lock = asyncio.Lock()
        self._tx: contextvars.ContextVar[_Tx | None] = contextvars.ContextVar(
            f"infrasim_store_tx_{id(self)}", default=None
        )
        self._closed = False

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating if missing) and migrate the database at ``path``."""
        writer = await _connect(path)
        try:
            await _migrate(writer, path)
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            await self._r.close()
            await self._w.close()

    async def schema_version(self) -> int:
        return await _user_version(self._w)

    # -- transactions -----------------------------------------------------------------------

    def _current_tx(self) -> _Tx | None:
        tx = self._tx.get()
        return tx if tx is not None and tx.active else None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back if the block raises (or is cancelled).

        Store calls inside the block (and in tasks it spawns) join it. A nested
        ``transaction()`` becomes a savepoint: its failure undoes only its own writes.
        A cancellation that lands during COMMIT is re-raised after the commit completed.
        """
        tx = self._current_tx()
        if tx is not None:
            tx.savepoints += 1
            name = f"sp{tx.savepoints}"
            await _settle(self._sql(f"SAVEPOINT {name}"))
            try:
                yield
            except BaseException:
                await _settle(self._sql(f"ROLLBACK TO {name}"))
                await _settle(self._sql(f"RELEASE {name}"))
                raise
            await _settle(self._sql(f"RELEASE {name}"))
            return
        async with self._write_lock:
            # Every BEGIN/COMMIT/ROLLBACK is _settle()d: the writer's transaction state is
            # final before the lock passes on, whatever cancellation hits us meanwhile.
            try:
                await _settle(self._sql("BEGIN IMMEDIATE"))
            except asyncio.CancelledError:
                await _settle(self._rollback())
                raise
            tx = _Tx()
            token = self._tx.set(tx)
            try:
                yield
            except BaseException:
                tx.active = False
                await _settle(self._rollback())
                raise
            finally:
                tx.active = False
                self._tx.reset(token)
            try:
                await _settle(self._sql("COMMIT"))
            except sqlite3.Error:
                await _settle(self._rollback())
                raise

    async def _sql(self, sql: str) -> None:
        await self._w.execute_fetchall(sql)

    async def _rollback(self) -> None:
        # Unconditional: the writer runs its queue in order, so this follows any statement
        # still in flight; "no transaction is active" just means there was nothing to undo.
        with contextlib.suppress(sqlite3.OperationalError):
            await self._w.execute_fetchall("ROLLBACK")

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One write: joins the caller's transaction, else runs as its own transaction."""
        if self._current_tx() is not None:
            yield
            return
        async with self.transaction():
            yield

    def _read_conn(self) -> aiosqlite.Connection:
        # Inside a transaction, read through the writer to see our own uncommitted writes.
        return self._w if self._current_tx() is not None else self._r

    # -- resources --------------------------------------------------------------------------

    async def create(self, res: R) -> R:
        """Insert ``res`` with version 1; returns the stored copy (``res`` is not modified)."""
        kind = type(res).kind
        ts = time.time()
        meta = res.meta
        async with self._write():
            try:
                rows = await self._w.execute_fetchall(
                    f"INSERT INTO resources ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)"
                    f" RETURNING {_COLUMNS}",
                    (kind, meta.id, meta.name, _json(meta.labels), meta.created_at, ts,
                     _json(res.spec), _json(res.status)),
                )
            except sqlite3.IntegrityError as exc:
                raise await self._integrity_error(kind, meta, exc) from None
        return _row_to_resource(type(res), next(iter(rows)))

    async def _integrity_error(
        self, kind: str, meta: ResourceMeta, exc: sqlite3.IntegrityError
    ) -> InfraSimError:
        if "resources.id" in str(exc):
            rows = list(await self._w.execute_fetchall(
                "SELECT kind, name FROM resources WHERE id = ?", (meta.id,)
            ))
            owner = f"{rows[0][0]} {rows[0][1]!r}" if rows else "another resource"
            return Conflict(
                f"{kind} id {meta.id} is already used by {owner}; create it with a new id"
            )
        return AlreadyExists(kind, meta.name)

    async def get(self, cls: type[R], ref: str) -> R:
        """By id or, failing that, by name; NotFound otherwise."""
        res = await self.find(cls, ref)
        if res is None:
            raise NotFound(cls.kind, ref)
        return res

    async def find(self, cls: type[R], ref: str) -> R | None:
        rows = list(await self._read_conn().execute_fetchall(
            f"SELECT {_COLUMNS} FROM resources WHERE kind = ? AND (id = ? OR name = ?)"
            " ORDER BY id = ? DESC LIMIT 1",
            (cls.kind, ref, ref, ref),
        ))
        return _row_to_resource(cls, rows[0]) if rows else None

    async def list(self, cls: type[R], labels: Mapping[str, str] | None = None) -> builtins.list[R]:
        """All resources of ``cls``'s kind carrying every given label, ordered by name."""
        sql = f"SELECT {_COLUMNS} FROM resources WHERE kind = ?"
        params: list[Any] = [cls.kind]
        for key, value in (labels or {}).items():
            # json_each rather than json_extract: label keys may contain '.', '"', '$'.
            sql += (" AND EXISTS (SELECT 1 FROM json_each(resources.labels)"
                    " WHERE json_each.key = ? AND json_each.value = ?)")
            params += [key, value]
        rows = await self._read_conn().execute_fetchall(sql + " ORDER BY name, id", params)
        return [_row_to_resource(cls, row) for row in rows]

    async def update(self, res: R, expected_version: int | None = None) -> R:
        """Write name, labels, spec and status if the stored version is ``expected_version``
        (default ``res.meta.version``); bumps the version. Returns the stored copy.
        """
        kind = type(res).kind
        meta = res.meta
        expected = meta.version if expected_version is None else expected_version
        async with self._write():
            try:
                rows = list(await self._w.execute_fetchall(
                    "UPDATE resources SET name = ?, labels = ?, spec = ?, status = ?,"
                    " version = version + 1, updated_at = ?"
                    f" WHERE kind = ? AND id = ? AND version = ? RETURNING {_COLUMNS}",
                    (meta.name, _json(meta.labels), _json(res.spec), _json(res.status),
                     time.time(), kind, meta.id, expected),
                ))
            except sqlite3.IntegrityError as exc:
                raise await self._integrity_error(kind, meta, exc) from None
            if not rows:
                current = list(await self._w.execute_fetchall(
                    "SELECT version FROM resources WHERE kind = ? AND id = ?", (kind, meta.id)
                ))
                if not current:
                    raise NotFound(kind, meta.id)
                raise Conflict(
                    f"{kind} {meta.name} changed since it was read (version {expected}, "
                    f"now {current[0][0]}); re-read and retry"
                )
        return _row_to_resource(type(res), rows[0])

    async def update_status(self, res: R) -> R:
        """Write only the status. No version bump and no conflict check: the supervisor's
        observations must not spoil an operator's read-modify-write of the spec.
        """
        kind = type(res).kind
        async with self._write():
            rows = await self._w.execute_fetchall(
                "UPDATE resources SET status = ? WHERE kind = ? AND id = ? RETURNING id",
                (_json(res.status), kind, res.meta.id),
            )
            if not rows:
                raise NotFound(kind, res.meta.id)
        return res

    async def delete(self, cls: type[R], res_id: str) -> None:
        async with self._write():
            rows = await self._w.execute_fetchall(
                "DELETE FROM resources WHERE kind = ? AND id = ? RETURNING id", (cls.kind, res_id)
            )
            if not rows:
                raise NotFound(cls.kind, res_id)

    # -- events -----------------------------------------------------------------------------

    async def append_event(
        self,
        kind: str,
        resource_id: str,
        name: str,
        type: str,
        message: str,
        data: Mapping[str, Any] | None = None,
    ) -> int:
        """Append to the event log; returns its seq (committed seqs only ever increase)."""
        async with self._write():
            rows = list(await self._w.execute_fetchall(
                "INSERT INTO events (ts, kind, resource_id, name, type, message, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (time.time(), kind, resource_id, name, type, message, _json(dict(data or {}))),
            ))
        return int(rows[0][0])

    async def last_event_seq(self) -> int:
        rows = list(await self._read_conn().execute_fetchall("SELECT MAX(seq) FROM events"))
        return int(rows[0][0] or 0)

    async def events(
        self, resource_id: str | None = None, since_seq: int = 0, limit: int = 200
    ) -> builtins.list[EventRecord]:
        """Events with seq > ``since_seq``, oldest first, at most ``limit``."""
        sql = "SELECT seq, ts, kind, resource_id, name, type, message, data FROM events"
        sql += " WHERE seq > ?"
        params: list[Any] = [since_seq]
        if resource_id is not None:
            sql += " AND resource_id = ?"
            params.append(resource_id)
        sql += " ORDER BY seq LIMIT ?"
        params.append(max(0, limit))
        rows = await self._read_conn().execute_fetchall(sql, params)
        return [
            EventRecord(int(s), float(ts), k, rid, n, t, m, json.loads(d))
            for s, ts, k, rid, n, t, m, d in rows
        ]


async def _settle(aw: Awaitable[T]) -> T:
    """Await ``aw`` to completion even if we are cancelled meanwhile, then re-raise that."""
    task = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])  # unlike a plain await, never cancels ``task``
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    return task.result()


# --- connection setup and migrations --------------------------------------------------------


async def _connect(path: Path) -> aiosqlite.Connection:
    # Checked up front: a failed aiosqlite.connect() leaves its worker thread to report to a
    # loop that may be gone by then (a traceback at exit instead of a clean error).
    if not path.parent.is_dir():
        raise StoreError(
            f"cannot open database {path}: directory {path.parent} does not exist"
        )
    try:
        # isolation_level=None: no implicit BEGINs; every transaction here is explicit.
        conn = await aiosqlite.connect(str(path), isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from None
    try:
        await conn.execute_fetchall(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        if not mode or str(mode[0][0]).lower() != "wal":
            raise StoreError(
                f"database {path}: cannot switch to WAL mode (got {mode}); is it on a "
                "filesystem without shared memory support (e.g. some network mounts)?"
            )
        await conn.execute_fetchall("PRAGMA synchronous = NORMAL")
        await conn.execute_fetchall("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        await conn.close()
        raise StoreError(
            f"database {path} is unreadable ({exc}); restore it from a backup or move it away"
        ) from None
    except BaseException:
        await conn.close()
        raise
    return conn


async def _user_version(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    """Apply pending MIGRATIONS, each in its own transaction together with its version bump."""
    migrations = list(MIGRATIONS)
    try:
        version = await _user_version(conn)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"database {path} is unreadable ({exc})") from None
    if version > len(migrations):
        raise SchemaTooNew(
            f"database {path} has schema version {version}, newer than this InfraSim "
            f"understands ({len(migrations)}); upgrade InfraSim, or use another --data-dir"
        )
    for target, script in enumerate(migrations[version:], start=version + 1):
        try:
            await conn.execute_fetchall("BEGIN IMMEDIATE")
            # Re-check under the write lock: another process may have migrated meanwhile.
            if await _user_version(conn) >= target:
                await conn.rollback()
                continue
            for statement in _statements(script):
                await conn.execute_fetchall(statement)
            await conn.execute_fetchall(f"PRAGMA user_version = {target}")
            await conn.commit()
        except sqlite3.Error as exc:
            if conn.in_transaction:
                await conn.rollback()
            raise StoreError(
                f"database {path}: migration to schema version {target} failed ({exc}); "
                f"it is unchanged at version {target - 1}"
            ) from None


def _statements(script: str) -> Iterable[str]:
    """Split a migration script into complete statements (sqlite3.complete_statement)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]}")
