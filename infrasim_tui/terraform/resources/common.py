"""Helpers the resources share: durations, attribute paths from the core's field names, the
null-versus-empty rules that keep plans free of spurious diffs, and waits that never leave a
half-done operation behind.

Pure functions where possible (unit-tested without a daemon); domain modules are imported
lazily by the resources so the provider process starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar

from ..framework import (
    UNKNOWN,
    Attr,
    Cancelled,
    Context,
    Diagnostics,
    Path,
    Schema,
    is_unknown,
)

T = TypeVar("T")

#: How long an operation that must not be interrupted (a QEMU spawn, a snapshot job) may take to
#: finish after terraform asked to stop, before the provider gives up waiting on it.
SETTLE_S = 60.0
#: Seconds reserved, out of a stop budget, for the forced stop after the graceful one.
FORCE_RESERVE_S = 15.0
#: The daemon refuses graceful-stop windows above this (StopVM's timeout_s).
MAX_GRACE_S = 3600.0

_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- durations ------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds from a Go-style duration as terraform's ``timeouts`` blocks take them ("30s",
    "5m", "1h30m", "1.5h", "500ms"). Raises ValueError saying what is accepted."""
    hint = 'use a number with a unit (ms, s, m, h), e.g. "30s", "5m" or "1h30m"'
    if not isinstance(text, str) or not _DURATION_RE.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not a duration; {hint}")
    total = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text.strip()))
    if total <= 0:
        raise ValueError(f"{text!r}: a timeout must be longer than zero")
    return total


def grace_seconds(budget: float) -> float:
    """The graceful-stop window within a stop budget: most of it, leaving room for the forced
    stop that follows a guest that ignores its power button (so the whole stop fits)."""
    return min(MAX_GRACE_S, max(budget - FORCE_RESERVE_S, budget * 0.75))


def timeout_diags(timeouts: Any, keys: Iterable[str], at: Path = ("timeouts",)) -> Diagnostics:
    """Plan-time check of the durations in a ``timeouts`` block (or, with ``at=()``, of
    top-level attributes); unknown values skipped."""
    diags = Diagnostics()
    if not isinstance(timeouts, dict):
        return diags
    for key in keys:
        value = timeouts.get(key)
        if value is None or is_unknown(value):
            continue
        try:
            parse_duration(value)
        except ValueError as exc:
            diags.error("Invalid timeout", str(exc), (*at, key))
    return diags


def timeouts_of(state: Mapping[str, Any] | None, defaults: Mapping[str, float]) -> dict[str, float]:
    """Seconds per operation from a (validated) ``timeouts`` block, defaults where unset."""
    out = dict(defaults)
    block = (state or {}).get("timeouts")
    if isinstance(block, dict):
        for key in defaults:
            value = block.get(key)
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    out[key] = parse_duration(value)
    return out


# -- attribute paths ------------------------------------------------------------------------

_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?(?:\.(.+))?$")


def path_of(field: str, renames: Mapping[str, str] | None = None,
            maps: Iterable[str] = ("labels", "extra_args"),
            sets: Iterable[str] = ("volumes", "networks")) -> Path:
    """The terraform attribute path of a core field name ("memory_mb",
    "port_forwards[1].host_port", "labels.team", "extra_args.cpu.model").

    ``renames`` maps core names to attribute names; a map's key is kept whole (keys may hold
    dots); an index into a set of strings is dropped, since set elements have no position.
    """
    m = _FIELD_RE.match(field or "")
    if m is None:
        return ()
    name = (renames or {}).get(m.group(1), m.group(1))
    rest = m.group(3)
    if name in maps:
        return (name, rest) if rest else (name,)
    path: list[str | int] = [name]
    if m.group(2) is not None and name not in sets:
        path.append(int(m.group(2)))
    if rest:
        path.extend(p for p in rest.split(".") if p)
    return tuple(path)


def name_and_label_diags(diags: Diagnostics, config: Mapping[str, Any], what: str) -> None:
    """The core's name and label rules for any resource, each error on its own attribute
    (unknown values are skipped: they are checked again once known)."""
    from ...core.errors import InvalidSpec
    from ...core.validation import validate_labels, validate_name

    name = config.get("name")
    if isinstance(name, str):
        try:
            validate_name(name)
        except InvalidSpec as exc:
            diags.error(f"Invalid {what} name", exc.reason, ("name",))
    labels = config.get("labels")
    if isinstance(labels, dict):
        for key, value in labels.items():
            try:
                validate_labels({key: value if isinstance(value, str) else ""})
            except InvalidSpec as exc:
                diags.error("Invalid label", exc.reason, ("labels", key))


def add_error(diags: Diagnostics, summary: str, exc: BaseException,
              renames: Mapping[str, str] | None = None, path: Path = (),
              hint: str = "") -> Diagnostics:
    """An error diagnostic for a core error: an InvalidSpec points at its attribute."""
    from ...core.errors import InfraSimError, InvalidSpec

    detail = exc.message if isinstance(exc, InfraSimError) else (str(exc) or type(exc).__name__)
    if isinstance(exc, InvalidSpec):
        path = path_of(exc.field, renames) or path
        detail = exc.reason
    if hint:
        detail = f"{detail}\n\n{hint}"
    return diags.error(summary, detail, path)


# -- null versus empty ----------------------------------------------------------------------


def keep_empty(prior: Any, value: Any) -> Any:
    """``value``, except that an empty one ("", [], {}) reads back as the prior's form: null
    unless the configuration (hence the prior state) spelled it empty. The daemon cannot tell
    the two apart, and flipping between them would show a diff on every plan."""
    if value:
        return value
    if prior is not None and not is_unknown(prior) and not prior and type(prior) is type(value):
        return prior
    return None


def same(a: Any, b: Any, as_set: bool = False) -> bool:
    """Equality for plan comparisons; sets compare without order."""
    if is_unknown(a) or is_unknown(b):
        return False
    if as_set and isinstance(a, list) and isinstance(b, list):
        return _freeze(a) == _freeze(b)
    return bool(a == b)


def _freeze(items: list[Any]) -> frozenset[Any]:
    return frozenset(tuple(sorted(i.items())) if isinstance(i, dict) else i for i in items)


def opt(config: Mapping[str, Any], prior: Mapping[str, Any] | None, key: str,
        default: Any) -> Any:
    """An optional+computed attribute's planned value: the config's when set (even unknown),
    else the prior's (a change elsewhere never resets it), else the default on create."""
    value = config.get(key)
    if value is not None:
        return value
    if prior is not None and prior.get(key) is not None:
        return prior[key]
    return default


def replace_paths(schema: Schema, prior: Mapping[str, Any] | None,
                  planned: Mapping[str, Any]) -> list[Path]:
    """Paths of force_new attributes whose planned value differs from the prior (or is not
    known yet: it may differ)."""
    if prior is None:
        return []
    out: list[Path] = []
    for attr in schema.attrs:
        old, new = _empty_as_null(prior.get(attr.name)), _empty_as_null(planned.get(attr.name))
        if attr.force_new and not (old is None and new is None) \
                and not same(old, new, as_set=_is_set(attr)):
            out.append((attr.name,))
    return out


def _empty_as_null(value: Any) -> Any:
    """The daemon cannot tell null from empty: a change between them never replaces."""
    return None if isinstance(value, str | list | dict) and not value else value


def _is_set(attr: Attr) -> bool:
    return isinstance(attr.type, list) and attr.type[:1] == ["set"]


def settle(planned: Mapping[str, Any], observed: dict[str, Any],
           keys: Iterable[str]) -> dict[str, Any]:
    """Keep the planned value of computed ``keys`` that were planned known: the daemon may have
    moved on (a start verified a volume) between plan and apply, and a known planned value that
    differs after apply is a hard terraform error. The next refresh shows the news."""
    for key in keys:
        value = planned.get(key)
        if not is_unknown(value):
            observed[key] = value
    return observed


def unknown_all(planned: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        planned[key] = UNKNOWN


# -- objects this process plans to create ---------------------------------------------------

#: Names of volumes/networks/VMs planned for creation by this provider process. Terraform plans
#: a resource after those it references, in one provider process per walk, so a VM's plan can
#: tell a volume created by the same apply from a name that exists nowhere (a plan-time error).
_PLANNED: dict[str, dict[str, float]] = {}
#: How long a planned name counts (a process serves one command; reattach serves many).
PLANNED_TTL_S = 3600.0


def note_planned(kind: str, name: Any) -> None:
    import time

    if isinstance(name, str):
        _PLANNED.setdefault(kind, {})[name] = time.monotonic()


def is_planned(kind: str, name: str) -> bool:
    import time

    ts = _PLANNED.get(kind, {}).get(name)
    return ts is not None and time.monotonic() - ts < PLANNED_TTL_S


# -- waiting --------------------------------------------------------------------------------


async def guarded(ctx: Context, aw: Awaitable[T], timeout: float | None) -> T:
    """Await an operation that must not be interrupted half-way (a QEMU spawn cancelled in the
    daemon can leave a paused QEMU nobody owns): on StopProvider or timeout it is left to finish
    (up to :data:`SETTLE_S`) and :class:`Cancelled`/``TimeoutError`` is raised afterwards, so the
    caller reads the object's real state before reporting."""
    task = asyncio.ensure_future(aw)
    try:
        result: T = await ctx.wait(asyncio.shield(task), timeout)
        return result
    except (Cancelled, TimeoutError):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), SETTLE_S)
        raise


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (loop time), never below a small floor."""
    return max(0.5, deadline - asyncio.get_running_loop().time())


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


__all__ = ["SETTLE_S", "add_error", "grace_seconds", "guarded", "is_planned", "keep_empty",
           "note_planned", "opt",
           "parse_duration", "path_of", "replace_paths", "same", "settle", "timeout_diags",
           "timeouts_of", "unknown_all"]
