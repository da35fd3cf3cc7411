"""Ed25519 signatures over a report's exact bytes (``cryptography``).

The report-signing key of a run is created at first use in ``RUN_DIR/report_signing/``:

    report_signing/signing_key.pem   PKCS#8 private key, file mode 0600 (never copied into a report)
    report_signing/public_key.pem    SubjectPublicKeyInfo PEM, for anyone who verifies

``report.sig`` is the raw 64-byte Ed25519 signature of ``report.json`` as written (no canonicalisation:
one changed byte, even whitespace, breaks it). OpenSSL checks it without this package::

    openssl pkeyutl -verify -pubin -inkey report_signing/public_key.pem -rawin -in report.json -sigfile report.sig

Deployment: the signing key belongs to the party that issues the report (e.g. the federation operator's
compliance office, or a hospital signing its own partner report), kept in its key store, not in the run
directory; verifiers get its public key out of band and pass it to ``verify_report(..., public_key=...)``.
The key made here beside the run proves only that nothing changed since signing, to whoever trusts the
run directory's public key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_DIR = "report_signing"
PRIVATE_KEY = "signing_key.pem"
PUBLIC_KEY = "public_key.pem"
ALGORITHM = "Ed25519"


def key_paths(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(run_dir) / SIGNING_DIR
    return d / PRIVATE_KEY, d / PUBLIC_KEY


def ensure_report_key(run_dir: str | os.PathLike) -> Ed25519PrivateKey:
    """The run's report-signing key, created on first use (private key mode 0600, public key beside)."""
    priv, pub = key_paths(run_dir)
    if not priv.exists():
        priv.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(priv.parent, 0o755)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{priv}: not an Ed25519 private key")
    pub_pem = public_pem(key.public_key())
    if not pub.exists() or pub.read_bytes() != pub_pem:
        pub.write_bytes(pub_pem)
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key."""
    return hashlib.sha256(raw_public(key)).hexdigest()


def load_public_key(source: bytes | str | os.PathLike | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key from an Ed25519PublicKey, 32 raw bytes, PEM bytes, or a path to a PEM / raw file."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).read_bytes()
    data = bytes(source)
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def sign_bytes(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify_bytes(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    if len(signature) != 64:
        return False
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
