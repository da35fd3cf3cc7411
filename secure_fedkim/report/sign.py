"""Ed25519 signatures of reports with the issuer's key (``cryptography``).

The signing key belongs to the party that issues reports and lives in its key store, outside any run
directory (whoever holds a copy of a run must not be able to re-sign it). Create it once::

    secure-fedkim report-key --name "Jane Roe" --organisation "Federation compliance office"

which writes, by default under ``~/.config/secure-fedkim/`` (or the path in ``$SECURE_FEDKIM_REPORT_KEY``):

    report_signing_key.pem      PKCS#8 private key, file mode 0600
    report_signing_key.pub.pem  SubjectPublicKeyInfo PEM: publish it; verifiers pass it to ``verify --public-key``
    report_signing_key.json     the signer's name and organisation, written into every report it signs

For each report ``<stem>``: ``<stem>.sig`` is the raw 64-byte Ed25519 signature of ``<stem>.json`` as written;
``<stem>.sha256`` lists the sha256 of the JSON, HTML and PDF (``sha256sum -c`` reads it) and ``<stem>.sha256.sig``
signs that list, so the files people read are covered too. OpenSSL checks either signature::

    openssl pkeyutl -verify -pubin -inkey ISSUER.pub.pem -rawin -in report.json -sigfile report.sig
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"
KEY_ENV = "SECURE_FEDKIM_REPORT_KEY"
KEY_NAME = "report_signing_key.pem"


def default_key_path() -> Path:
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "secure-fedkim" / KEY_NAME


def public_key_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name.removesuffix(".pem") + ".pub.pem")


def signer_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name.removesuffix(".pem") + ".json")


def new_issuer_key(key_path: str | os.PathLike | None, name: str, organisation: str) -> Path:
    """Create the issuer's signing key (mode 0600), its public key and signer file; refuse to overwrite one."""
    if not name.strip() or not organisation.strip():
        raise ValueError("report-key: give the signer's --name and --organisation (they are written into every report)")
    path = Path(key_path).expanduser() if key_path is not None else default_key_path()
    if path.exists():
        raise FileExistsError(f"{path}: a report-signing key already exists (not overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_key_path(path).write_bytes(public_pem(key.public_key()))
    signer_path(path).write_text(json.dumps({"name": name.strip(), "organisation": organisation.strip()}, indent=2) + "\n")
    return path


def load_issuer(key_path: str | os.PathLike | None, run_dir: str | os.PathLike) -> tuple[Ed25519PrivateKey, dict]:
    """The issuer's private key and signer ({name, organisation, public_key_sha256}).

    Raises FileNotFoundError (with the command that creates one) when there is no key, ValueError when the key
    lies inside the run directory or is not Ed25519, or when its signer file is missing."""
    path = Path(key_path).expanduser() if key_path is not None else default_key_path()
    if not path.is_file():
        raise FileNotFoundError(f"no report-signing key at {path}: create the issuer's key once with `secure-fedkim "
                                f"report-key --name NAME --organisation ORG` (or pass --key PATH / set ${KEY_ENV})")
    if path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise ValueError(f"{path}: the report-signing key lies inside the run directory; anyone with a copy of the run "
                         f"could re-sign it. Keep the issuer's key outside (see `secure-fedkim report-key`)")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    sp = signer_path(path)
    if not sp.is_file():
        raise ValueError(f"{sp}: missing: the signer's name and organisation (written by `secure-fedkim report-key`)")
    who = json.loads(sp.read_text())
    return key, {"name": str(who["name"]), "organisation": str(who["organisation"]),
                 "public_key_sha256": fingerprint(key.public_key())}


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


def manifest(files: dict[str, bytes]) -> bytes:
    """``sha256sum`` lines for the report's files (name -> bytes)."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()


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
