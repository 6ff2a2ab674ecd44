"""Textual key events to the bytes a serial guest expects (an xterm-compatible terminal).

Pure functions, so the mapping is testable without an App. Textual names keys after its
xterm parser (``ctrl+a``, ``shift+tab``, ``ctrl+right_square_bracket``); a key press driven
by Pilot carries no character for control keys, so control bytes are derived from the name.
"""

from __future__ import annotations

DETACH_KEY = "ctrl+right_square_bracket"
"""Ctrl+] as Textual 8 names it (what its xterm parser makes of byte 0x1d), as in virsh."""

ESC = "\x1b"
CSI = "\x1b["
SS3 = "\x1bO"

# Cursor keys: the final byte of CSI/SS3 sequences; SS3 in application-cursor mode (DECCKM).
_CURSOR = {"up": "A", "down": "B", "right": "C", "left": "D", "home": "H", "end": "F"}
# Editing keys: CSI <n> ~ (xterm's "vt220-style" keypad).
_TILDE = {"insert": 2, "delete": 3, "pageup": 5, "pagedown": 6,
          "f5": 15, "f6": 17, "f7": 18, "f8": 19, "f9": 20, "f10": 21, "f11": 23, "f12": 24}
# F1-F4 are SS3 P..S unmodified and CSI 1;<m> P..S with modifiers.
_PF = {"f1": "P", "f2": "Q", "f3": "R", "f4": "S"}
# Plain keys whose byte is not their character (or which may arrive without one).
_PLAIN = {"enter": "\r", "tab": "\t", "escape": ESC, "backspace": "\x7f",
          "space": " ", "shift+tab": CSI + "Z", "shift+space": " "}
# Ctrl + punctuation, named the way Textual names them.
_CTRL_PUNCT = {"@": 0x00, "space": 0x00, "at": 0x00, "left_square_bracket": 0x1B,
               "backslash": 0x1C, "right_square_bracket": 0x1D,
               "circumflex_accent": 0x1E, "underscore": 0x1F, "question_mark": 0x7F}
_MOD_BITS = {"shift": 1, "alt": 2, "meta": 2, "ctrl": 4}


def detach_key(key: str) -> bool:
    """Whether ``key`` (a Textual key name) is the detach key, Ctrl+]."""
    return key == DETACH_KEY


def _split(key: str) -> tuple[set[str], str]:
    """``"ctrl+shift+up"`` -> ({"ctrl", "shift"}, "up"); a bare ``"+"`` stays a key."""
    parts = key.split("+")
    if len(parts) == 1 or parts[-1] == "":
        return set(), key
    mods = set(parts[:-1])
    if not mods <= _MOD_BITS.keys():
        return set(), key
    return mods, parts[-1]


def key_to_bytes(key: str, character: str | None = None, *,
                 application_cursor: bool = False) -> bytes | None:
    """The bytes to send for one key press, or None when the key means nothing to a guest.

    ``application_cursor`` is the guest's DECCKM mode (``ESC [ ? 1 h``): full-screen programs
    such as vi and less ask for ``ESC O A`` instead of ``ESC [ A`` for the unmodified arrows.
    """
    text = _key_to_text(key, character, application_cursor)
    return None if text is None else text.encode("utf-8", "surrogateescape")


def _key_to_text(key: str, character: str | None, app_cursor: bool) -> str | None:
    if key in _PLAIN:
        return _PLAIN[key]
    mods, base = _split(key)
    # Alt+x: ESC prefix (xterm's metaSendsEscape), whatever x would have sent.
    if mods and mods <= {"alt", "meta"} and base not in _CURSOR and base not in _TILDE \
            and base not in _PF:
        inner = _key_to_text(base, character, app_cursor)
        return None if inner is None else ESC + inner
    modifier = 1 + sum(_MOD_BITS[m] for m in {m if m != "meta" else "alt" for m in mods})
    if base in _CURSOR:
        final = _CURSOR[base]
        if modifier > 1:
            return f"{CSI}1;{modifier}{final}"
        return (SS3 if app_cursor else CSI) + final
    if base in _TILDE:
        n = _TILDE[base]
        return f"{CSI}{n};{modifier}~" if modifier > 1 else f"{CSI}{n}~"
    if base in _PF:
        return f"{CSI}1;{modifier}{_PF[base]}" if modifier > 1 else SS3 + _PF[base]
    if mods == {"ctrl"}:
        if len(base) == 1 and base.isascii() and base.isalpha():
            return chr(ord(base.lower()) & 0x1F)
        if base in _CTRL_PUNCT:
            return chr(_CTRL_PUNCT[base])
    if mods == {"ctrl", "shift"} and len(base) == 1 and base.isascii() and base.isalpha():
        return chr(ord(base.lower()) & 0x1F)  # terminals send the same byte for Ctrl+Shift+C
    if character:
        if character.isprintable():
            return character
        if len(character) == 1 and (ord(character) < 0x20 or ord(character) == 0x7F):
            return character  # a control byte the parser already resolved
    if character is None and not mods and len(key) == 1 and key.isprintable():
        return key
    return None


__all__ = ["DETACH_KEY", "detach_key", "key_to_bytes"]
