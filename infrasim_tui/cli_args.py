"""Parsing of repeated ``KEY=VALUE`` options, shared by every command that takes them."""

from __future__ import annotations

from collections.abc import Sequence

from .core.errors import InvalidSpec


def parse_pairs(items: Sequence[str] | None, field: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` → ``{"a": "1", "b": "2"}``; anything without ``=`` names ``field``."""
    out: dict[str, str] = {}
    for text in items or []:
        key, sep, value = text.partition("=")
        if not sep:
            raise InvalidSpec(field, f"{text!r}: expected KEY=VALUE")
        out[key] = value
    return out
