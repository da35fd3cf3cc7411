"""Hospital identities: each hospital's Ed25519 signing key stays in its own state dir; the federation
knows only the public keys (what a hospital hands over when it joins)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from privacy.keys import generate_signing_key, public_key_bytes
from secure_fedkim.rundir.layout import HospitalDir


def ensure_signing_key(state_dir: Path) -> bytes:
    """Create the hospital's signing key if it has none (mode 0600); return its raw public key."""
    path = HospitalDir(state_dir).signing_key
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = generate_signing_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return public_key_bytes(load_signing_key(state_dir))


def load_signing_key(state_dir: Path):
    path = HospitalDir(state_dir).signing_key
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this hospital has no signing key (run its key setup first)")
    return serialization.load_pem_private_key(path.read_bytes(), password=None)
