"""Who may log in over SSH, and as what: ``<data dir>/ssh/authorized_keys``.

One key per line, ``ROLE KEYTYPE BASE64 [COMMENT]`` (e.g. ``operator ssh-ed25519 AAAA… alice``).
The key decides the role; the SSH user name is free and only recorded. The file is re-read on
every login, so adding or removing a key takes effect at once without a restart. Parsing is
pure and needs no SSH library, so the CLI can manage keys without importing asyncssh.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core.access import Role
from ..core.errors import AlreadyExists, InvalidSpec, NotFound

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
             "ssh-rsa", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")


@dataclass(frozen=True)
class AuthorizedKey:
    role: Role
    key_type: str
    blob: bytes  # the key as SSH wire bytes (what base64 in the file decodes to)
    comment: str = ""

    @property
    def fingerprint(self) -> str:
        """OpenSSH's ``SHA256:…`` form, so operators can compare with ``ssh-keygen -l``."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")
        return f"SHA256:{digest}"

    def line(self) -> str:
        text = f"{self.role.name.lower()} {self.key_type} {base64.b64encode(self.blob).decode()}"
        return f"{text} {self.comment}".rstrip()


def parse_public_key(text: str, role: Role) -> AuthorizedKey:
    """Pure: an OpenSSH public key line (``KEYTYPE BASE64 [COMMENT]``) with a role."""
    parts = text.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise InvalidSpec("public_key", "not an OpenSSH public key (expected e.g. "
                          "'ssh-ed25519 AAAA… comment', as in ~/.ssh/id_ed25519.pub)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSpec("public_key", "the key's base64 is damaged") from None
    (n,) = struct.unpack(">I", blob[:4]) if len(blob) >= 4 else (0,)
    if blob[4:4 + n].decode(errors="replace") != parts[0]:
        raise InvalidSpec("public_key", f"the key data is not a {parts[0]} key")
    return AuthorizedKey(role, parts[0], blob, parts[2].strip() if len(parts) > 2 else "")


def parse_line(line: str) -> AuthorizedKey | None:
    """Pure: one line of our authorized_keys (None for blanks and comments)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    role_text, _, rest = line.partition(" ")
    try:
        role = Role.parse(role_text)
    except ValueError as err:
        raise InvalidSpec("role", str(err)) from None
    return parse_public_key(rest, role)


class KeyFile:
    """The authorized_keys file of a data dir (0600, written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, data_root: Path) -> KeyFile:
        return cls(data_root / "ssh" / "authorized_keys")

    def load(self) -> list[AuthorizedKey]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        keys = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                key = parse_line(line)
            except InvalidSpec as err:
                raise InvalidSpec(f"{self.path}:{n}", err.reason) from None
            if key is not None:
                keys.append(key)
        return keys

    def find(self, key_type: str, blob: bytes) -> AuthorizedKey | None:
        return next((k for k in self.load() if k.key_type == key_type and k.blob == blob), None)

    def _save(self, keys: list[AuthorizedKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# ROLE KEYTYPE BASE64 [COMMENT] — managed by `infrasim ssh-key`\n")
            f.writelines(k.line() + "\n" for k in keys)
        os.replace(tmp, self.path)

    def add(self, key: AuthorizedKey) -> AuthorizedKey:
        keys = self.load()
        if any(k.blob == key.blob for k in keys):
            raise AlreadyExists("ssh key", key.fingerprint)
        self._save([*keys, key])
        return key

    def remove(self, ref: str) -> AuthorizedKey:
        """Remove by fingerprint (or a unique prefix of it) or by comment."""
        keys = self.load()
        hits = [k for k in keys if ref in (k.comment, k.fingerprint)
                or (len(ref) >= 8 and k.fingerprint.removeprefix("SHA256:").startswith(
                    ref.removeprefix("SHA256:")))]
        if len(hits) != 1:
            raise NotFound("ssh key", ref) if not hits else InvalidSpec(
                "key", f"{ref!r} matches {len(hits)} keys; give the full fingerprint")
        self._save([k for k in keys if k is not hits[0]])
        return hits[0]


__all__ = ["AuthorizedKey", "KeyFile", "parse_line", "parse_public_key"]
