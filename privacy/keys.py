"""Keys for the HE roles: Ed25519 signatures and sealed key transport.

Everything here is a thin, explicit layer over ``cryptography``; no primitive is written by hand.

* **Signing** (Ed25519): clients sign their encrypted updates, the aggregator and the key holder verify.
  :func:`canonical_message` gives one unambiguous byte encoding of a tuple of fields (length-prefixed,
  domain-separated), so two different field tuples can never produce the same signed bytes.
* **Sealed transport** (:func:`seal_for` / :func:`open_sealed`): an ECIES-style "sealed box".
  A fresh ephemeral X25519 key agrees a shared secret with the recipient's X25519 public key, HKDF-SHA256
  derives a one-time AES-256-GCM key from it (salt = ephemeral public || recipient public, info = the
  caller's context label), and AES-GCM encrypts the plaintext with the sealed header as associated data.
  Only the holder of the recipient's X25519 private key can open it, and only with the same ``info``.
  This is how the CKKS secret key travels to a second key holder: never in the clear.

Wire format of a sealed blob (all lengths fixed)::

    b"SFKSEAL1" (8) | ephemeral X25519 public key (32) | nonce (12) | AES-GCM ciphertext || tag (16)
"""

from __future__ import annotations

import os
import struct
from typing import Union

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "SealedBoxError",
    "canonical_message",
    "generate_signing_key",
    "generate_transport_key",
    "load_signing_public_key",
    "load_transport_public_key",
    "open_sealed",
    "public_key_bytes",
    "seal_for",
    "sign",
    "verify",
]

_SEAL_MAGIC = b"SFKSEAL1"
_X25519_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_SEAL_HEADER_LEN = len(_SEAL_MAGIC) + _X25519_LEN + _NONCE_LEN


class SealedBoxError(ValueError):
    """A sealed blob could not be opened (wrong recipient key, wrong ``info``, truncated or tampered)."""


# --------------------------------------------------------------------------------------------- signing
def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (one per client / per signer)."""
    return Ed25519PrivateKey.generate()


def generate_transport_key() -> X25519PrivateKey:
    """A fresh X25519 key pair for receiving sealed blobs (e.g. a replica key holder's)."""
    return X25519PrivateKey.generate()


_AnyKey = Union[Ed25519PrivateKey, Ed25519PublicKey, X25519PrivateKey, X25519PublicKey]


def public_key_bytes(key: _AnyKey) -> bytes:
    """The raw 32-byte public key of an Ed25519 or X25519 key (private or public)."""
    if isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        key = key.public_key()
    if not isinstance(key, (Ed25519PublicKey, X25519PublicKey)):
        raise TypeError(f"expected an Ed25519 or X25519 key, got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signing_public_key(key: bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes (or passed through)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError("an Ed25519 public key is 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(bytes(key))


def load_transport_public_key(key: bytes | X25519PublicKey) -> X25519PublicKey:
    """An X25519 public key from its 32 raw bytes (or passed through)."""
    if isinstance(key, X25519PublicKey):
        return key
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError("an X25519 public key is 32 raw bytes")
    return X25519PublicKey.from_public_bytes(bytes(key))


def canonical_message(domain: str, *fields: str | bytes | int | float) -> bytes:
    """One unambiguous byte string for ``fields`` under a domain-separation label.

    Each field is tagged with its type and length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` (or the
    string ``"1"`` and the integer ``1``) never encode alike. Floats are encoded as IEEE-754 binary64, so
    the signed value is exactly the value used. ``bool`` is rejected (it is an ``int`` in Python and too
    easy to confuse with one).
    """
    out = [b"SFKMSG1", struct.pack(">I", len(domain.encode())), domain.encode()]
    for field in fields:
        if isinstance(field, bool):
            raise TypeError("bool fields are ambiguous; encode them explicitly")
        if isinstance(field, (bytes, bytearray)):
            tag, body = b"b", bytes(field)
        elif isinstance(field, str):
            tag, body = b"s", field.encode("utf-8")
        elif isinstance(field, int):
            if not -(2**63) <= field < 2**63:
                raise ValueError("integer field out of int64 range")
            tag, body = b"i", struct.pack(">q", field)
        elif isinstance(field, float):
            tag, body = b"f", struct.pack(">d", field)
        else:
            raise TypeError(f"cannot encode a field of type {type(field).__name__}")
        out += [tag, struct.pack(">Q", len(body)), body]
    return b"".join(out)


def sign(signing_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) over ``message``."""
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise TypeError("signing_key must be an Ed25519PrivateKey")
    return signing_key.sign(message)


def verify(public_key: bytes | Ed25519PublicKey, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``.

    A wrong, truncated or garbage signature returns False (never raises); a malformed public key raises
    ``ValueError`` because that is a configuration error, not an attack on one message.
    """
    key = load_signing_public_key(public_key)
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
        return False
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        return False
    return True


# ----------------------------------------------------------------------------------- sealed transport
def _derive_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes, info: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_public + recipient_public,
        info=b"secure-fedkim/seal/v1|" + info,
    ).derive(shared)


def seal_for(recipient_public: X25519PublicKey | bytes, plaintext: bytes, info: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``recipient_public``'s private key can read it.

    Ephemeral X25519 key agreement + HKDF-SHA256 + AES-256-GCM. ``info`` labels the purpose (e.g.
    ``b"he-secret-key|run-7"``) and must be given again to open the blob, so a blob sealed for one purpose
    cannot be replayed into another.
    """
    if not isinstance(info, (bytes, bytearray)):
        raise TypeError("info must be bytes")
    recipient = load_transport_public_key(recipient_public)
    recipient_raw = public_key_bytes(recipient)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = public_key_bytes(ephemeral)
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise ValueError("recipient X25519 public key is invalid (low-order point)") from exc
    key = _derive_key(shared, ephemeral_raw, recipient_raw, bytes(info))
    nonce = os.urandom(_NONCE_LEN)
    header = _SEAL_MAGIC + ephemeral_raw + nonce
    return header + AESGCM(key).encrypt(nonce, bytes(plaintext), header)


def open_sealed(recipient_private: X25519PrivateKey, sealed: bytes, info: bytes) -> bytes:
    """Open a blob made by :func:`seal_for`; raises :class:`SealedBoxError` with a clear reason."""
    if not isinstance(recipient_private, X25519PrivateKey):
        raise TypeError("recipient_private must be an X25519PrivateKey")
    if not isinstance(sealed, (bytes, bytearray)) or len(sealed) < _SEAL_HEADER_LEN + _TAG_LEN:
        raise SealedBoxError("sealed blob is truncated (shorter than header + tag)")
    sealed = bytes(sealed)
    if not sealed.startswith(_SEAL_MAGIC):
        raise SealedBoxError("not a sealed blob (bad magic)")
    ephemeral_raw = sealed[len(_SEAL_MAGIC) : len(_SEAL_MAGIC) + _X25519_LEN]
    nonce = sealed[len(_SEAL_MAGIC) + _X25519_LEN : _SEAL_HEADER_LEN]
    header = sealed[:_SEAL_HEADER_LEN]
    try:
        shared = recipient_private.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
    except ValueError as exc:
        raise SealedBoxError("sealed blob carries an invalid ephemeral key") from exc
    key = _derive_key(shared, ephemeral_raw, public_key_bytes(recipient_private), bytes(info))
    try:
        return AESGCM(key).decrypt(nonce, sealed[_SEAL_HEADER_LEN:], header)
    except InvalidTag as exc:
        raise SealedBoxError(
            "cannot open sealed blob: it was sealed for a different recipient key or a different "
            "info label, or it was tampered with"
        ) from exc
