"""SSH keys and roles: parsing OpenSSH public keys, the key file, and `infrasim ssh-key`."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from infrasim_tui.core.access import Role
from infrasim_tui.core.errors import AlreadyExists, InvalidSpec, NotFound
from infrasim_tui.ssh.keys import KeyFile, parse_line, parse_public_key

from .conftest import infrasim


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub")


def openssh_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], check=True, capture_output=True,
                         text=True).stdout
    return out.split()[1]


def test_fingerprints_match_openssh(tmp_path: Path) -> None:
    for kind in ("ed25519", "ecdsa", "rsa"):
        pub = keygen(tmp_path / f"id_{kind}", kind)
        key = parse_public_key(pub.read_text(), Role.OPERATOR)
        assert key.fingerprint == openssh_fingerprint(pub)
        assert key.comment == f"id_{kind}"
        assert parse_line(key.line()) == key


def test_bad_keys_and_roles_are_refused_with_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="not an OpenSSH public key"):
        parse_public_key("hello world", Role.VIEWER)
    with pytest.raises(InvalidSpec, match="base64"):
        parse_public_key("ssh-ed25519 !!!notbase64", Role.VIEWER)
    with pytest.raises(InvalidSpec, match="not a ssh-rsa key"):
        pub = keygen(tmp_path / "k").read_text().split()
        parse_public_key(f"ssh-rsa {pub[1]}", Role.VIEWER)
    with pytest.raises(InvalidSpec, match="unknown role"):
        parse_line("root ssh-ed25519 AAAA")
    assert parse_line("# a comment") is None and parse_line("   ") is None


def test_key_file_add_find_remove(tmp_path: Path) -> None:
    kf = KeyFile(tmp_path / "ssh" / "authorized_keys")
    a = kf.add(parse_public_key(keygen(tmp_path / "alice").read_text(), Role.ADMIN))
    b = kf.add(parse_public_key(keygen(tmp_path / "bob").read_text(), Role.VIEWER))
    assert stat.S_IMODE(kf.path.stat().st_mode) == 0o600
    assert kf.find(b.key_type, b.blob) == b and kf.find("ssh-ed25519", b"x") is None
    with pytest.raises(AlreadyExists):
        kf.add(a)
    assert kf.remove("bob") == b
    with pytest.raises(NotFound):
        kf.remove("bob")
    assert kf.remove(a.fingerprint[7:20]) == a and kf.load() == []


def test_cli_manages_keys(tmp_path: Path, data_dir: Path) -> None:
    pub = keygen(tmp_path / "carol")
    r = infrasim(data_dir, "ssh-key", "add", str(pub), "--role", "operator", "-o", "json")
    assert r.returncode == 0, r.stderr
    fp = json.loads(r.stdout)["fingerprint"]
    assert fp == openssh_fingerprint(pub)
    rows = json.loads(infrasim(data_dir, "ssh-key", "list", "-o", "json").stdout)
    assert rows == [{"fingerprint": fp, "role": "operator", "type": "ssh-ed25519",
                     "comment": "carol"}]
    again = infrasim(data_dir, "ssh-key", "add", str(pub), "--role", "admin")
    assert again.returncode == 5 and "already exists" in again.stderr
    bad = infrasim(data_dir, "ssh-key", "add", str(tmp_path / "missing.pub"), "--role", "admin")
    assert bad.returncode == 2 and "pubkey_file" in bad.stderr
    assert infrasim(data_dir, "ssh-key", "remove", "carol").returncode == 0
    assert json.loads(infrasim(data_dir, "ssh-key", "list", "-o", "json").stdout) == []
