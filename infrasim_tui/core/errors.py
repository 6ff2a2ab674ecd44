"""The core's error hierarchy.

Every error a frontend can show an operator derives from :class:`InfraSimError` and carries a
stable ``code`` (mapped to CLI exit codes here and to gRPC status codes by the API layer) and a
message that says what to do.
"""

from __future__ import annotations


class InfraSimError(Exception):
    """Base of all errors the core raises on purpose."""

    code = "internal"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(InfraSimError):
    """A spec or a config value is invalid; ``field`` names it (dotted path)."""

    code = "invalid_argument"
    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class NotFound(InfraSimError):
    code = "not_found"
    exit_code = 3

    def __init__(self, kind: str, ref: str) -> None:
        super().__init__(f"{kind} {ref!r} not found")
        self.kind = kind
        self.ref = ref


class WrongState(InfraSimError):
    """The operation is not allowed in the resource's current state."""

    code = "failed_precondition"
    exit_code = 4


class AlreadyExists(InfraSimError):
    code = "already_exists"
    exit_code = 5

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists; pick another name or delete it first")
        self.kind = kind
        self.name = name


class Conflict(InfraSimError):
    """Optimistic concurrency: the resource changed since it was read."""

    code = "aborted"
    exit_code = 6


class Unavailable(InfraSimError):
    """Something outside the project is missing or busy (QEMU binary, a host port, the lock)."""

    code = "unavailable"
    exit_code = 7


class QemuError(InfraSimError):
    """QEMU refused or failed an operation; the message carries QEMU's own words."""

    code = "internal"
    exit_code = 8


class IntegrityError(InfraSimError):
    """Content or signature check failed: digest mismatch, bad signature, untrusted key."""

    code = "failed_precondition"
    exit_code = 9


class KeyStoreError(InfraSimError):
    """The host key is missing, unreadable or locked (passphrase needed or wrong)."""

    code = "failed_precondition"
    exit_code = 10


class PermissionDenied(InfraSimError):
    """The session's role (``--read-only``, an SSH key's role) does not allow the action."""

    code = "permission_denied"
    exit_code = 11


class DataDirLocked(Unavailable):
    def __init__(self, data_dir: str, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(
            f"data dir {data_dir} is owned by {who}; stop it, or use --data-dir for a "
            "separate world"
        )
        self.pid = pid


class HostPortInUse(Unavailable):
    def __init__(self, field: str, port: int) -> None:
        super().__init__(
            f"{field}: host port {port} is already in use on this machine; choose a free port"
        )
        self.field = field
        self.port = port
