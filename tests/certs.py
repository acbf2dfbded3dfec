"""Throwaway certificate authorities and leaf certificates for TLS tests, made with the openssl CLI.

The `cryptography` package is deliberately not a dependency, and /usr/bin/openssl is everywhere
the tests run. Keys are EC P-256: generating them is instant, unlike RSA.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Pair:
    """A PEM certificate and its unencrypted PEM private key, as files."""

    cert: Path
    key: Path


def _run(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True)


def _new_key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def make_ca(directory: Path, name: str) -> Pair:
    """A self-signed CA valid for two days, files `<name>.crt` and `<name>.key` in `directory`."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _new_key(pair.key)
    _run(
        "req", "-x509", "-new", "-key", pair.key, "-out", pair.cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return pair


def make_leaf(
    directory: Path,
    name: str,
    ca: Pair,
    sans: Sequence[str] = (),
    usage: str = "serverAuth",
) -> Pair:
    """A leaf certificate signed by `ca`, common name `name`.

    `sans` are openssl subjectAltName entries ("DNS:localhost", "IP:127.0.0.1", "URI:spiffe://x",
    "email:a@b"); `usage` is the extendedKeyUsage ("serverAuth", "clientAuth" or both, comma separated).
    """
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _new_key(pair.key)
    _run("req", "-new", "-key", pair.key, "-out", csr, "-subj", f"/CN={name}")
    _run(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", str(_serial()),
        "-days", "2", "-out", pair.cert, "-extfile", ext,
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    return pair


def _serial() -> int:
    # Random like a real CA's, so that certificates from one CA never share a serial.
    return secrets.randbits(63) | 1


def encrypt_key(pair: Pair, path: Path, passphrase: str) -> Path:
    """`pair`'s key, encrypted with `passphrase` (AES-256), written to `path`."""
    _run("pkey", "-in", pair.key, "-aes256", "-passout", f"pass:{passphrase}", "-out", path)
    return path
