"""Ed25519 signatures for images: this host's key, the keys it trusts, and the volume check.

Encoding, everywhere (files, API, CLI): public keys are 64 lowercase hex characters (32 bytes),
signatures 128 (64 bytes), like digests; input hex is accepted in either case. A key's
fingerprint is ``"ed25519:" + the first 16 hex of BLAKE3(public key bytes)``.

Files in ``keys_dir`` (0700): ``host.key`` (0600, JSON: the 32-byte seed, or it sealed with
``SecretBox`` under an Argon2id key from a passphrase), ``host.pub`` (the public key, hex),
``trusted.json`` (0600, the trust store). The host key is created on first use and trusted
automatically, so a host accepts what it signed itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from infrasim_tui.core.digest import blake3_bytes, check_digest, write_atomic
from infrasim_tui.core.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidSpec,
    KeyStoreError,
    NotFound,
    WrongState,
)
from infrasim_tui.core.model import TrustedKey

PASSPHRASE_ENV = "INFRASIM_KEY_PASSPHRASE"
KEY_FILE_VERSION = 1
TRUST_VERSION = 1
HOST_NAME = "host"

# Domain separation: what a volume signature covers can never be mistaken for anything else
# this project signs (each kind gets its own prefix and version).
VOLUME_DOMAIN = b"infrasim-volume-v1\n"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_HEX = re.compile(r"[0-9a-fA-F]*")


class KeyAlreadyTrusted(AlreadyExists):
    def __init__(self, existing: TrustedKey) -> None:
        super().__init__("trusted key", existing.name)
        self.message = (f"key {existing.fingerprint} is already trusted as {existing.name!r}; "
                        "remove that entry first to rename it")
        self.args = (self.message,)


def fingerprint(public_key: str) -> str:
    """``ed25519:<16 hex>`` of a public key (hex), short enough to read out and compare."""
    return "ed25519:" + blake3_bytes(_decode_hex(public_key, 32, "public_key"))[:16]


def verify_signature(public_key: str, message: bytes, signature: str) -> bool:
    """True if ``signature`` (hex) is ``public_key``'s (hex) signature of ``message``."""
    try:
        key = nacl.signing.VerifyKey(_decode_hex(public_key, 32, "public_key"))
        key.verify(message, _decode_hex(signature, 64, "signature"))
    except (InvalidSpec, nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError,
            ValueError, TypeError):
        return False
    return True


def volume_message(digest: str) -> bytes:
    """The bytes a volume signature signs: the domain prefix, then the content digest (hex)."""
    return VOLUME_DOMAIN + check_digest(digest).encode()


def check_integrity(*, name: str, digest: str, expected_digest: str, public_key: str,
                    signature: str, ring: KeyRing) -> TrustedKey:
    """Check a volume: its content ``digest`` is the signed ``expected_digest``, the signature
    verifies and the signer is trusted. Returns the trusted signer; raises IntegrityError."""
    if digest != expected_digest:
        raise IntegrityError(
            f"volume {name!r}: content digest {digest[:16]}… does not match the signed digest "
            f"{expected_digest[:16]}… (the image was modified)")
    try:
        fp = fingerprint(public_key)
    except InvalidSpec as exc:
        raise IntegrityError(f"volume {name!r}: signer {exc.reason}") from None
    if not signature:
        raise IntegrityError(f"volume {name!r}: has no signature (signer {fp}); sign it or "
                             "drop the signer")
    if not verify_signature(public_key, volume_message(expected_digest), signature):
        raise IntegrityError(f"volume {name!r}: signature does not verify with key {fp}")
    trusted = ring.is_trusted(public_key)
    if trusted is None:
        raise IntegrityError(f"volume {name!r}: signed by untrusted key {fp}; trust it with "
                             "`infrasim key add`")
    return trusted


class KeyRing:
    """This host's signing key and its trust store, both in ``keys_dir``.

    ``passphrase`` (else ``$INFRASIM_KEY_PASSPHRASE``) unlocks an encrypted host key, and
    encrypts one created on first use. Not for concurrent writers: one core owns a data dir.
    """

    def __init__(self, keys_dir: Path, passphrase: str | None = None) -> None:
        self.keys_dir = Path(keys_dir)
        if passphrase is None:
            passphrase = os.environ.get(PASSPHRASE_ENV) or None
        self._passphrase = passphrase
        self._signing_key: nacl.signing.SigningKey | None = None

    @property
    def key_file(self) -> Path:
        return self.keys_dir / "host.key"

    @property
    def pub_file(self) -> Path:
        return self.keys_dir / "host.pub"

    @property
    def trust_file(self) -> Path:
        return self.keys_dir / "trusted.json"

    # --- host key ---------------------------------------------------------------------------

    def host_public_key(self) -> str:
        """This host's public key (hex); creates the host key on first use.

        Reads ``host.pub``, so it needs no passphrase once the key exists.
        """
        if self._signing_key is not None:
            return bytes(self._signing_key.verify_key).hex()
        if self.key_file.exists():
            pub = self._read_pub()
            if pub is not None:
                return pub
        return self.ensure_host_key().public_key

    def sign(self, message: bytes) -> str:
        """Signature (hex) of ``message`` by the host key; creates the key on first use."""
        if self._signing_key is None:
            self.ensure_host_key()
        if self._signing_key is None:  # exists, encrypted, no passphrase given: says so
            self._signing_key = self._load(self._passphrase)
        return bytes(self._signing_key.sign(message).signature).hex()

    def _read_pub(self) -> str | None:
        """host.pub's key, or None when it is missing or damaged (then derive it again)."""
        try:
            pub = self.pub_file.read_text().strip().lower()
            fingerprint(pub)
        except (OSError, UnicodeError, InvalidSpec):
            return None
        return pub

    def ensure_host_key(self, passphrase: str | None = None) -> TrustedKey:
        """Create the host key if missing and make sure the trust store has it, host=True.

        An existing key is unlocked (a wrong passphrase is reported here) when a passphrase is
        known; an encrypted one without a passphrase is left locked, its public half read from
        host.pub. With a passphrase, a new key is encrypted with it, and an existing unencrypted
        key is re-written encrypted (same key, so existing signatures stay valid).
        """
        if passphrase is not None:
            self._passphrase = passphrase
        self._private_dir()
        if self._signing_key is None and not self.key_file.exists():
            key = nacl.signing.SigningKey.generate()
            if self._write_key_file(key, self._passphrase, replace_existing=False):
                self._signing_key = key
            # else another process created it first: use theirs, as below
        if self._signing_key is None:
            encrypted = bool(_read_key_file(self.key_file).get("encrypted"))
            pub = self._read_pub()
            if encrypted and not self._passphrase and pub is not None:
                return self._trust_host(pub)  # stays locked until something needs to sign
            self._signing_key = self._load(self._passphrase)
        if passphrase and not _read_key_file(self.key_file).get("encrypted"):
            self._write_key_file(self._signing_key, passphrase, replace_existing=True)
        pub = bytes(self._signing_key.verify_key).hex()
        if self._read_pub() != pub:
            write_atomic(self.pub_file, (pub + "\n").encode(), 0o644)
        return self._trust_host(pub)

    def _private_dir(self) -> None:
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)

    def _write_key_file(self, key: nacl.signing.SigningKey, passphrase: str | None, *,
                        replace_existing: bool) -> bool:
        """Write host.key (0600); without ``replace_existing`` never clobber (False if taken)."""
        seed = bytes(key)
        doc: dict[str, Any] = {"version": KEY_FILE_VERSION, "type": "ed25519"}
        if passphrase:
            salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
            ops = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
            mem = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
            box = nacl.secret.SecretBox(_derive(passphrase, salt, ops, mem))
            doc |= {"encrypted": True, "kdf": "argon2id", "salt": salt.hex(), "opslimit": ops,
                    "memlimit": mem, "sealed_seed": bytes(box.encrypt(seed)).hex()}
        else:
            doc |= {"encrypted": False, "seed": seed.hex()}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        if replace_existing:
            write_atomic(self.key_file, data, 0o600)
            return True
        fd, tmp = tempfile.mkstemp(dir=self.keys_dir, prefix=".host.key.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp makes it 0600
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.key_file)  # atomic, and fails if the name is taken
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _load(self, passphrase: str | None) -> nacl.signing.SigningKey:
        path = self.key_file
        doc = _read_key_file(path)
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # a secret: tighten it even if someone loosened it
        try:
            if doc.get("encrypted"):
                if not passphrase:
                    raise KeyStoreError(
                        f"host key {path} is encrypted: give its passphrase (set "
                        f"{PASSPHRASE_ENV}, or pass it to the command)")
                box = nacl.secret.SecretBox(_derive(passphrase, bytes.fromhex(doc["salt"]),
                                                    int(doc["opslimit"]), int(doc["memlimit"])))
                try:
                    seed = box.decrypt(bytes.fromhex(doc["sealed_seed"]))
                except nacl.exceptions.CryptoError:
                    raise KeyStoreError(f"wrong passphrase for host key {path}") from None
            else:
                seed = bytes.fromhex(doc["seed"])
            key = nacl.signing.SigningKey(seed)
        except (KeyError, ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
            raise KeyStoreError(_damaged(path, exc)) from None
        with contextlib.suppress(OSError):
            pub = self.pub_file.read_text().strip().lower()
            if pub and pub != bytes(key.verify_key).hex():
                raise KeyStoreError(
                    f"{self.pub_file} does not belong to {path}; delete {self.pub_file} and "
                    "it is re-created from the private key")
        return key

    # --- trust store ------------------------------------------------------------------------

    def trusted(self) -> list[TrustedKey]:
        """The trusted keys, oldest first (the host key once it exists)."""
        path = self.trust_file
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"trust store {path} is unreadable ({exc}); restore it from a "
                                "backup or move it away and re-add the keys you trust") from None
        try:
            if doc["version"] != TRUST_VERSION:
                raise ValueError(f"version {doc['version']!r}, expected {TRUST_VERSION}")
            return [TrustedKey(name=str(k["name"]), public_key=str(k["public_key"]),
                               fingerprint=str(k["fingerprint"]), added_at=float(k["added_at"]),
                               host=bool(k["host"])) for k in doc["keys"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyStoreError(f"trust store {path} is damaged ({exc}); restore it from a "
                                "backup or move it away and re-add the keys you trust") from None

    def _save(self, keys: list[TrustedKey]) -> None:
        self._private_dir()
        doc = {"version": TRUST_VERSION, "keys": [asdict(k) for k in keys]}
        write_atomic(self.trust_file, (json.dumps(doc, indent=1) + "\n").encode(), 0o600)

    def add(self, name: str, public_key: str) -> TrustedKey:
        """Trust ``public_key`` (hex) under ``name``; refuses a name or key already there."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidSpec("name", f"{name!r} is not a valid key name: 1-64 letters, digits "
                              "or ._@+-, starting with a letter or digit")
        pub = _parse_public_key(public_key)
        keys = self.trusted()
        for existing in keys:
            if existing.public_key == pub:
                raise KeyAlreadyTrusted(existing)
            if existing.name == name:
                raise AlreadyExists("trusted key", name)
        key = TrustedKey(name=name, public_key=pub, fingerprint=fingerprint(pub),
                         added_at=time.time(), host=False)
        self._save([*keys, key])
        return key

    def remove(self, ref: str, *, force: bool = False) -> TrustedKey:
        """Stop trusting the key named ``ref`` (or with fingerprint ``ref``); returns it.

        The host key is refused without ``force``: this host's own signatures would no longer
        pass here.
        """
        keys = self.trusted()
        match = next((k for k in keys if ref in (k.name, k.fingerprint)), None)
        if match is None:
            raise NotFound("trusted key", ref)
        if match.host and not force:
            raise WrongState(f"{match.name!r} ({match.fingerprint}) is this host's own key; "
                             "volumes it signed would stop passing integrity checks here. "
                             "Use --force to remove it anyway")
        self._save([k for k in keys if k is not match])
        return match

    def is_trusted(self, public_key: str) -> TrustedKey | None:
        try:
            pub = _decode_hex(public_key, 32, "public_key").hex()
        except InvalidSpec:
            return None
        return next((k for k in self.trusted() if k.public_key == pub), None)

    def _trust_host(self, pub: str) -> TrustedKey:
        """Mark ``pub`` as the host key in the trust store, adding it if needed.

        A previous host key (the key was re-created) stays trusted, demoted to host=False:
        volumes it signed still pass until the operator removes it.
        """
        keys = self.trusted()
        current = next((k for k in keys if k.public_key == pub), None)
        if current is not None and current.host and all(
                not k.host for k in keys if k is not current):
            return current
        fp = fingerprint(pub)
        updated: list[TrustedKey] = []
        for k in keys:
            if k.public_key == pub:
                k = replace(k, host=True)
                current = k
            elif k.host:
                k = replace(k, host=False, name=f"{k.name}-retired-{k.fingerprint[8:16]}")
            updated.append(k)
        if current is None:
            taken = {k.name for k in updated}
            name = HOST_NAME if HOST_NAME not in taken else f"{HOST_NAME}-{fp[8:16]}"
            current = TrustedKey(name=name, public_key=pub, fingerprint=fp,
                                 added_at=time.time(), host=True)
            updated.append(current)
        self._save(updated)
        return current


def _decode_hex(value: str, size: int, field: str) -> bytes:
    what = {32: "a 32-byte Ed25519 public key", 64: "a 64-byte Ed25519 signature"}[size]
    if not isinstance(value, str):
        raise InvalidSpec(field, f"must be a string of {2 * size} hex characters ({what})")
    value = value.strip()
    if len(value) != 2 * size or not _HEX.fullmatch(value):
        shown = value if len(value) <= 20 else value[:20] + "…"
        raise InvalidSpec(field, f"{shown!r} is not {2 * size} hex characters ({what})")
    return bytes.fromhex(value)


def _parse_public_key(public_key: str) -> str:
    raw = _decode_hex(public_key, 32, "public_key")
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(raw):
        raise InvalidSpec("public_key", "is 32 bytes but not a valid Ed25519 public key "
                          "(not a curve point, or a weak one); copy it again from `infrasim "
                          "key show` on the signing host")
    return raw.hex()


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return bytes(nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(),
                                          salt, opslimit=opslimit, memlimit=memlimit))


def _read_key_file(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyStoreError(f"host key {path} is missing") from None
    except PermissionError:
        raise KeyStoreError(f"cannot read host key {path}: permission denied; run as the "
                            "user who owns the data dir") from None
    except (OSError, ValueError) as exc:
        raise KeyStoreError(_damaged(path, exc)) from None
    if not isinstance(doc, dict) or doc.get("version") != KEY_FILE_VERSION:
        raise KeyStoreError(_damaged(path, ValueError("unknown format")))
    return doc


def _damaged(path: Path, exc: Exception) -> str:
    return (f"host key {path} is damaged ({exc}); restore it from a backup, or move it away to "
            "create a new key (then trust the new key wherever the old one was trusted)")
