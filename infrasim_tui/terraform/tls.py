"""The provider's TLS server certificate for go-plugin: self-signed for ``localhost``.

terraform pins the certificate printed in the handshake line and checks the name
``localhost``, so any self-signed certificate with that SAN will do. Making one costs a
process start (the ``openssl`` CLI; the Python ``cryptography`` package is not a
dependency), so it is made once and cached, key and certificate in one 0600 file, replaced
atomically so providers started in parallel never read half of one. (os.path, not pathlib:
this runs before the handshake line, where every millisecond of import counts.)
"""

from __future__ import annotations

import os
import time

CERT_NAME = "tls.pem"
VALID_DAYS = 3650
RENEW_AFTER_DAYS = 3000  # replace the cached certificate well before it expires
_KEY_BEGIN = b"-----BEGIN PRIVATE KEY-----"
_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_CERT_END = b"-----END CERTIFICATE-----"


def cache_dir() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "infrasim", "terraform-provider")


def split_pem(data: bytes) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) from the cached file; ValueError when either is missing."""
    k, c = data.find(_KEY_BEGIN), data.find(_CERT_BEGIN)
    end = data.find(_CERT_END, c)
    if k < 0 or c < 0 or end < 0:
        raise ValueError("not a key and a certificate")
    key = data[k:c] if k < c else data[k:]
    return key.strip() + b"\n", data[c:end + len(_CERT_END)] + b"\n"


def handshake_cert(cert_pem: bytes) -> str:
    """The certificate as go-plugin's handshake wants it: the DER in standard base64 without
    ``=`` padding (the PEM body is that DER in padded base64 already)."""
    start = cert_pem.index(_CERT_BEGIN) + len(_CERT_BEGIN)
    body = cert_pem[start:cert_pem.index(_CERT_END)]
    return b"".join(body.split()).rstrip(b"=").decode()


def generate(directory: str) -> bytes:
    """Make a key and certificate with ``openssl``; returns key PEM + certificate PEM."""
    import subprocess
    import tempfile

    os.makedirs(directory, mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".gen-") as tmp:
        key, cert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
        try:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec",
                 "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", str(VALID_DAYS), "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost",
                 "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                 "-addext", "extendedKeyUsage=serverAuth",
                 "-keyout", key, "-out", cert],
                check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30,
            )
        except FileNotFoundError:
            raise RuntimeError("terraform-provider-infrasim needs the openssl command to make "
                               "its TLS certificate; install openssl") from None
        except subprocess.CalledProcessError as exc:
            raise RuntimeError("openssl failed to make the provider's TLS certificate: "
                               + exc.stderr.decode(errors="replace").strip()) from None
        with open(key, "rb") as k, open(cert, "rb") as c:
            return k.read().strip() + b"\n" + c.read()


def server_certificate(directory: str | None = None) -> tuple[bytes, bytes, str]:
    """(key PEM, certificate PEM, handshake form), from the cache or freshly made."""
    directory = directory or cache_dir()
    path = os.path.join(directory, CERT_NAME)
    try:
        with open(path, "rb") as f:
            fresh = time.time() - os.fstat(f.fileno()).st_mtime < RENEW_AFTER_DAYS * 86400
            data = f.read()
        if fresh:
            key, cert = split_pem(data)
            return key, cert, handshake_cert(cert)
    except (OSError, ValueError):
        pass
    import tempfile

    data = generate(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tls-")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    key, cert = split_pem(data)
    return key, cert, handshake_cert(cert)


__all__ = ["cache_dir", "generate", "handshake_cert", "server_certificate", "split_pem"]
