"""Who connected over SSH, as what, and what they did: ``<data dir>/ssh/audit.log``.

JSON lines, 0600, opened O_APPEND so concurrent writers never interleave partial lines and
nothing rewrites history. When the core is embedded the same records are published as
``ssh.*`` events, so the console's Events screen and ``infrasim events`` show them too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..core.events import Event

log = logging.getLogger(__name__)


class AuditLog:
    """Append-only; a failing disk is logged, never raised into a session."""

    def __init__(self, path: Path, session: Any = None) -> None:
        self.path = path
        self.session = session  # a Session: publish events when its core is embedded
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(path, 0o600)

    @classmethod
    def of(cls, data_root: Path, session: Any = None) -> AuditLog:
        return cls(data_root / "ssh" / "audit.log", session)

    def record(self, type_: str, conn: str, message: str, **data: Any) -> None:
        """One audit record; ``type_`` like ``ssh.connect``, ``conn`` the connection's id."""
        rec = {"ts": round(time.time(), 3), "type": type_, "conn": conn, **data}
        try:
            os.write(self._fd, (json.dumps(rec, default=str) + "\n").encode())
        except OSError as err:
            log.error("cannot write the SSH audit log %s: %s", self.path, err)
        session = self.session
        if session is not None and session.mode == "embedded":
            try:
                session.core.bus.publish(Event(type=type_, kind="ssh", resource_id=conn,
                                               name=str(data.get("username", "")),
                                               message=message, data=dict(data)))
            except Exception:  # the audit file is the record; the event is a courtesy
                log.exception("cannot publish %s", type_)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Pure-ish helper for tests and tools: every record in the log, oldest first."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


__all__ = ["AuditLog", "read_audit"]
