"""Snapshot trees as text: pure functions over snapshot records (no QEMU, no store).

Kept apart from ``snapshots`` so light clients (the CLI) can render a tree without loading the
snapshot machinery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .model import Snapshot


def record_name(vm_id: str, name: str) -> str:
    """Snapshot names are unique per VM; the store's names are unique per kind."""
    return f"{vm_id}/{name}"


def short_name(snap: Snapshot) -> str:
    return snap.meta.name.split("/", 1)[-1]


@dataclass(frozen=True)
class TreeLine:
    depth: int
    snapshot: Snapshot
    current: bool


def tree_lines(snaps: list[Snapshot], current_id: str) -> list[TreeLine]:
    """Depth-first, children oldest first; orphans (a missing parent) show as roots."""
    ids = {s.meta.id for s in snaps}
    children: dict[str, list[Snapshot]] = {}
    for s in sorted(snaps, key=lambda s: s.meta.created_at):
        parent = s.spec.parent_id if s.spec.parent_id in ids else ""
        children.setdefault(parent, []).append(s)
    out: list[TreeLine] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            out.append(TreeLine(depth, s, s.meta.id == current_id))
            walk(s.meta.id, depth + 1)

    walk("", 0)
    return out


def render_tree(vm_name: str, snaps: list[Snapshot], current_id: str) -> str:
    lines = [vm_name + ("" if snaps else "  (no snapshots)")]
    tl = tree_lines(snaps, current_id)
    for i, line in enumerate(tl):
        last = _closed(tl, i, line.depth)
        indent = "".join("    " if _closed(tl, i, d) else "│   " for d in range(line.depth))
        branch = "└── " if last else "├── "
        s = line.snapshot
        mem = "mem+disk" if s.status.with_memory else "disk"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.meta.created_at))
        mark = "  ◀ current" if line.current else ""
        desc = f" — {s.spec.description}" if s.spec.description else ""
        lines.append(f"{indent}{branch}{short_name(s)}  [{mem}, {when}]{desc}{mark}")
    if snaps and not current_id:
        lines.append("(current state is not derived from any snapshot)")
    return "\n".join(lines)


def _closed(tl: list[TreeLine], i: int, depth: int) -> bool:
    """True when the ancestor at ``depth`` of line i has no later sibling (no bar needed)."""
    for o in tl[i + 1:]:
        if o.depth < depth:
            return True
        if o.depth == depth:
            return False
    return True
