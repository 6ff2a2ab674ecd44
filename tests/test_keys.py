"""Host key, passphrase protection, trust store and the volume integrity check."""

from __future__ import annotations

import json
import re
import stat
import threading
from pathlib import Path

import pytest

from infrasim_tui.core.digest import blake3_bytes
from infrasim_tui.core.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidSpec,
    KeyStoreError,
    NotFound,
    WrongState,
)
from infrasim_tui.core.keys import (
    PASSPHRASE_ENV,
    KeyRing,
    check_integrity,
    fingerprint,
    verify_signature,
    volume_message,
)


@pytest.fixture(autouse=True)
def no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "keys")


@pytest.fixture
def peer(tmp_path: Path) -> KeyRing:
    """Another host's key ring: its signatures are not trusted by ``ring`` until added."""
    return KeyRing(tmp_path / "peer-keys")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def flip_hex(value: str, index: int = 0) -> str:
    return value[:index] + ("1" if value[index] != "1" else "2") + value[index + 1:]


DIGEST = blake3_bytes(b"a disk image")


def test_host_key_created_once_private_and_stable(ring: KeyRing, tmp_path: Path) -> None:
    pub = ring.host_public_key()
    assert re.fullmatch(r"[0-9a-f]{64}", pub)
    assert mode(ring.key_file) == 0o600 and mode(ring.keys_dir) == 0o700
    assert ring.pub_file.read_text().strip() == pub
    content = ring.key_file.read_bytes()
    again = KeyRing(tmp_path / "keys")
    assert again.host_public_key() == pub
    assert again.ensure_host_key().public_key == pub
    assert ring.key_file.read_bytes() == content  # not re-created
    [host] = ring.trusted()
    assert host.host and host.name == "host" and host.public_key == pub
    assert host.fingerprint == fingerprint(pub)
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", host.fingerprint)
    assert mode(ring.trust_file) == 0o600


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    rings = [KeyRing(tmp_path / "keys") for _ in range(4)]
    pubs: list[str] = []
    threads = [threading.Thread(target=lambda r=r: pubs.append(r.host_public_key()))
               for r in rings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(pubs)) == 1 and len(pubs) == 4
    assert [k.public_key for k in rings[0].trusted()] == pubs[:1]


def test_sign_verify_round_trip_and_tampering(ring: KeyRing, peer: KeyRing) -> None:
    message = b"hello"
    sig = ring.sign(message)
    pub = ring.host_public_key()
    assert re.fullmatch(r"[0-9a-f]{128}", sig)
    assert verify_signature(pub, message, sig)
    assert verify_signature(pub.upper(), message, sig.upper())  # hex in either case
    assert not verify_signature(pub, b"hellO", sig)
    assert not verify_signature(pub, message, flip_hex(sig, 10))
    assert not verify_signature(peer.host_public_key(), message, sig)
    assert not verify_signature(pub, message, sig[:-2])
    assert not verify_signature("zz" * 32, message, sig)


def test_volume_signatures_are_domain_separated(ring: KeyRing) -> None:
    pub = ring.host_public_key()
    assert volume_message(DIGEST) == b"infrasim-volume-v1\n" + DIGEST.encode()
    bare = ring.sign(DIGEST.encode())
    assert not verify_signature(pub, volume_message(DIGEST), bare)
    with pytest.raises(InvalidSpec):
        volume_message("not-a-digest")


def test_encrypted_host_key_needs_its_passphrase(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    created = KeyRing(keys, passphrase="correct horse").ensure_host_key()
    doc = json.loads((keys / "host.key").read_text())
    assert doc["encrypted"] and doc["kdf"] == "argon2id" and "seed" not in doc
    assert mode(keys / "host.key") == 0o600

    locked = KeyRing(keys)
    assert locked.host_public_key() == created.public_key  # public part needs no passphrase
    assert locked.ensure_host_key() == created  # so does listing trust
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        KeyRing(keys).ensure_host_key(passphrase="nope")
    with pytest.raises(KeyStoreError, match="encrypted: give its passphrase"):
        locked.sign(b"x")
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        KeyRing(keys, passphrase="battery staple").sign(b"x")

    sig = KeyRing(keys, passphrase="correct horse").sign(b"x")
    assert verify_signature(created.public_key, b"x", sig)
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert verify_signature(created.public_key, b"y", KeyRing(keys).sign(b"y"))


def test_passphrase_encrypts_an_existing_plain_key(ring: KeyRing, tmp_path: Path) -> None:
    pub = ring.host_public_key()
    ring.ensure_host_key(passphrase="later")
    assert json.loads(ring.key_file.read_text())["encrypted"]
    with pytest.raises(KeyStoreError):
        KeyRing(tmp_path / "keys").sign(b"x")
    assert KeyRing(tmp_path / "keys", passphrase="later").ensure_host_key().public_key == pub


def test_check_integrity(ring: KeyRing, peer: KeyRing) -> None:
    pub = ring.host_public_key()
    sig = ring.sign(volume_message(DIGEST))
    ok = check_integrity(name="base", digest=DIGEST, expected_digest=DIGEST, public_key=pub,
                         signature=sig, ring=ring)
    assert ok.host and ok.public_key == pub

    modified = blake3_bytes(b"a modified disk image")
    with pytest.raises(IntegrityError) as err:
        check_integrity(name="base", digest=modified, expected_digest=DIGEST, public_key=pub,
                        signature=sig, ring=ring)
    assert err.value.message == (
        f"volume 'base': content digest {modified[:16]}… does not match the signed digest "
        f"{DIGEST[:16]}… (the image was modified)")

    with pytest.raises(IntegrityError) as err:
        check_integrity(name="base", digest=DIGEST, expected_digest=DIGEST, public_key=pub,
                        signature=flip_hex(sig, 3), ring=ring)
    assert err.value.message == (
        f"volume 'base': signature does not verify with key {fingerprint(pub)}")

    other = peer.host_public_key()
    peer_sig = peer.sign(volume_message(DIGEST))
    with pytest.raises(IntegrityError) as err:
        check_integrity(name="base", digest=DIGEST, expected_digest=DIGEST, public_key=other,
                        signature=peer_sig, ring=ring)
    assert err.value.message == (
        f"volume 'base': signed by untrusted key {fingerprint(other)}; trust it with "
        "`infrasim key add`")
    assert err.value.exit_code == 9 and err.value.code == "failed_precondition"

    ring.add("peer", other)
    assert check_integrity(name="base", digest=DIGEST, expected_digest=DIGEST,
                           public_key=other, signature=peer_sig, ring=ring).name == "peer"
    with pytest.raises(IntegrityError, match="not 64 hex"):
        check_integrity(name="base", digest=DIGEST, expected_digest=DIGEST,
                        public_key="abc", signature=peer_sig, ring=ring)


def test_trust_store_add_list_remove(ring: KeyRing, peer: KeyRing, tmp_path: Path) -> None:
    host = ring.ensure_host_key()
    other = peer.host_public_key()
    added = ring.add("alice", other.upper())
    assert added.public_key == other and not added.host
    assert added.fingerprint == fingerprint(other)
    assert [k.name for k in KeyRing(tmp_path / "keys").trusted()] == ["host", "alice"]
    assert ring.is_trusted(other) == added

    with pytest.raises(AlreadyExists, match="already trusted as 'alice'"):
        ring.add("bob", other)
    third = KeyRing(tmp_path / "third").host_public_key()
    with pytest.raises(AlreadyExists, match="'alice' already exists"):
        ring.add("alice", third)

    ring.remove(added.fingerprint)
    assert ring.is_trusted(other) is None
    ring.add("bob", other)
    ring.remove("bob")
    with pytest.raises(NotFound):
        ring.remove("bob")

    with pytest.raises(WrongState, match="this host's own key"):
        ring.remove("host")
    assert ring.is_trusted(host.public_key) is not None
    ring.remove("host", force=True)
    assert ring.trusted() == []


@pytest.mark.parametrize("bad", ["", "ab" * 31, "ab" * 33, "zz" * 32, "00" * 32,
                                 # 32 bytes but not a point on the curve
                                 "02" + "00" * 30 + "80"])
def test_invalid_public_keys_refused(ring: KeyRing, bad: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        ring.add("x", bad)
    assert err.value.field == "public_key"
    assert ring.trusted() == []


@pytest.mark.parametrize("bad", ["", "-lead", "a b", "x" * 65, "../x"])
def test_invalid_names_refused(ring: KeyRing, peer: KeyRing, bad: str) -> None:
    with pytest.raises(InvalidSpec, match="name"):
        ring.add(bad, peer.host_public_key())


def test_damaged_files_say_what_to_do(ring: KeyRing) -> None:
    ring.host_public_key()
    ring.trust_file.write_text("{")
    with pytest.raises(KeyStoreError, match=r"trust store .* unreadable"):
        ring.trusted()
    ring.key_file.write_text("garbage")
    with pytest.raises(KeyStoreError, match=r"host key .* is damaged"):
        KeyRing(ring.keys_dir).sign(b"x")
