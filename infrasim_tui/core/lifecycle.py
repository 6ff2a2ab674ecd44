"""The VM state machine: which operation is allowed from which state.

A table rather than scattered ifs, so the CLI, the API and the console refuse the same things
with the same words.
"""

from __future__ import annotations

from .errors import WrongState
from .model import VM, VMState

S = VMState
ALLOWED: dict[str, frozenset[VMState]] = {
    "start": frozenset({S.STOPPED, S.ERROR}),
    "stop": frozenset({S.RUNNING, S.PAUSED, S.PENDING}),
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "restart": frozenset({S.RUNNING, S.PAUSED}),
    "delete": frozenset({S.STOPPED, S.ERROR}),
    # Snapshots: live through QMP jobs, stopped through qemu-img; never mid-start.
    "snapshot": frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.ERROR}),
}

HINTS: dict[str, str] = {
    "start": "it is already running; use restart",
    "stop": "it is not running",
    "pause": "only a RUNNING VM can be paused",
    "resume": "only a PAUSED VM can be resumed",
    "restart": "it is not running; use start",
    "delete": "stop it first, or delete with --force",
    "snapshot": "wait until it has started or stopped",
}


def allowed(op: str, state: VMState) -> bool:
    return state in ALLOWED[op]


def check_transition(op: str, vm: VM) -> None:
    state = vm.status.state
    if not allowed(op, state):
        raise WrongState(f"cannot {op} VM {vm.meta.name!r}: it is {state.value} ({HINTS[op]})")
