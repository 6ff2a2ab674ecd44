"""Who may do what: roles enforced at the core API, whatever frontend asks.

The console's ``--read-only`` mode and (later) each SSH key's role wrap the core in a
:class:`GuardedCore`. Hiding a key in the UI is a courtesy; the guard is the rule, so a forced
call (a palette command, a script) is refused the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from .errors import PermissionDenied


class Role(enum.IntEnum):
    VIEWER = 1  # sees everything, changes nothing
    OPERATOR = 2  # lifecycle, snapshots, console input, creating things
    ADMIN = 3  # also deletes, keys, networks

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}; use viewer, operator or admin") from None


#: The role each mutating core method needs; anything not listed is read-only.
REQUIRED: dict[str, Role] = {
    **dict.fromkeys(
        ("create_vm", "update_vm", "start_vm", "stop_vm", "pause_vm", "resume_vm", "restart_vm",
         "create_volume", "resize_volume", "sign_volume", "verify_volume",
         "create_snapshot", "restore_snapshot", "create_console", "console_input",
         "create_qos_profile", "update_qos_profile", "delete_qos_profile"),
        Role.OPERATOR),
    **dict.fromkeys(
        ("delete_vm", "delete_volume", "delete_snapshot", "delete_console", "image_gc",
         "add_key", "remove_key", "create_network", "delete_network"),
        Role.ADMIN),
}


def allowed(role: Role, action: str) -> bool:
    """Pure: may ``role`` call the core method (or pseudo-action) ``action``?"""
    return role >= REQUIRED.get(action, Role.VIEWER)


#: ``audit(action, target, allowed)``: told of every mutating call and every refusal.
Audit = Callable[[str, str, bool], None]


def _target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A short, log-safe summary of a call's target (usually a VM/volume ref)."""
    first = args[0] if args else next(iter(kwargs.values()), "")
    return (first if isinstance(first, str) else type(first).__name__)[:120]


class GuardedCore:
    """A proxy over the Orchestrator or RemoteCore that refuses what ``role`` may not do.

    ``audit`` (optional) hears each mutating call, allowed or not, so an SSH session can log
    who did what; it must not raise.
    """

    def __init__(self, core: Any, role: Role, audit: Audit | None = None) -> None:
        self._core = core
        self.role = role
        self.audit = audit

    @property
    def inner(self) -> Any:
        return self._core

    def _refusal(self, action: str) -> PermissionDenied:
        need = REQUIRED[action].name.lower()
        return PermissionDenied(
            f"{action.replace('_', ' ')} needs the {need} role; this session is "
            f"{self.role.name.lower()}" + (" (read-only)" if self.role == Role.VIEWER else ""))

    def check(self, action: str, target: str = "") -> None:
        if not allowed(self.role, action):
            if self.audit is not None:
                self.audit(action, target, False)
            raise self._refusal(action)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._core, name)
        if name in REQUIRED and callable(attr):
            def guarded(*args: Any, **kwargs: Any) -> Any:
                self.check(name, _target(args, kwargs))
                if self.audit is not None:
                    self.audit(name, _target(args, kwargs), True)
                return attr(*args, **kwargs)
            return guarded
        return attr
