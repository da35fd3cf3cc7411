"""Ed25519 signing helpers and the X25519 + HKDF + AES-GCM sealed transport (privacy.keys)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import keys


def test_sign_verify_roundtrip_and_rejections():
    sk = keys.generate_signing_key()
    pk = keys.public_key_bytes(sk)
    assert len(pk) == 32
    msg = keys.canonical_message("test", "run", 3, b"\x00" * 32, 1.5)
    sig = keys.sign(sk, msg)
    assert keys.verify(pk, msg, sig)
    assert keys.verify(sk.public_key(), msg, sig)
    assert not keys.verify(pk, msg + b"x", sig)  # altered message
    assert not keys.verify(keys.public_key_bytes(keys.generate_signing_key()), msg, sig)  # other signer
    assert not keys.verify(pk, msg, sig[:-1])  # truncated signature
    assert not keys.verify(pk, msg, bytes(64))  # garbage signature
    with pytest.raises(ValueError):
        keys.verify(b"short", msg, sig)  # malformed key is a configuration error


def test_canonical_message_is_unambiguous():
    m = keys.canonical_message
    assert m("d", "ab", "c") != m("d", "a", "bc")
    assert m("d", "1") != m("d", 1)
    assert m("d", b"x") != m("d", "x")
    assert m("d", 1.0) != m("d", 1)
    assert m("d1", "x") != m("d2", "x")
    assert m("d", "x", 2) == m("d", "x", 2)
    with pytest.raises(TypeError):
        m("d", True)


def test_public_key_bytes_for_both_curves():
    x = keys.generate_transport_key()
    assert keys.public_key_bytes(x) == keys.public_key_bytes(x.public_key())
    assert len(keys.public_key_bytes(x)) == 32
    with pytest.raises(TypeError):
        keys.public_key_bytes(b"not a key")


def test_seal_open_roundtrip_hides_plaintext_and_is_randomized():
    recipient = keys.generate_transport_key()
    secret = os.urandom(4096)
    sealed = keys.seal_for(recipient.public_key(), secret, b"purpose")
    assert secret not in sealed
    assert secret[:32] not in sealed and secret[-32:] not in sealed
    assert keys.open_sealed(recipient, sealed, b"purpose") == secret
    # raw public key bytes are accepted too; a fresh ephemeral key makes every blob different
    sealed2 = keys.seal_for(keys.public_key_bytes(recipient), secret, b"purpose")
    assert sealed2 != sealed
    assert keys.open_sealed(recipient, sealed2, b"purpose") == secret


def test_open_with_wrong_key_or_info_fails_clearly():
    recipient = keys.generate_transport_key()
    sealed = keys.seal_for(recipient.public_key(), b"the secret", b"purpose")
    with pytest.raises(keys.SealedBoxError, match="different recipient key"):
        keys.open_sealed(X25519PrivateKey.generate(), sealed, b"purpose")
    with pytest.raises(keys.SealedBoxError, match="different info"):
        keys.open_sealed(recipient, sealed, b"another purpose")


def test_open_rejects_tampered_and_truncated_blobs():
    recipient = keys.generate_transport_key()
    sealed = bytearray(keys.seal_for(recipient.public_key(), b"the secret" * 10, b"p"))
    tampered = bytes(sealed[:-20]) + bytes([sealed[-20] ^ 1]) + bytes(sealed[-19:])
    with pytest.raises(keys.SealedBoxError, match="tampered"):
        keys.open_sealed(recipient, tampered, b"p")
    header_tampered = bytes(sealed[:10]) + bytes([sealed[10] ^ 1]) + bytes(sealed[11:])
    with pytest.raises(keys.SealedBoxError):
        keys.open_sealed(recipient, header_tampered, b"p")
    with pytest.raises(keys.SealedBoxError, match="truncated"):
        keys.open_sealed(recipient, bytes(sealed[:40]), b"p")
    with pytest.raises(keys.SealedBoxError, match="magic"):
        keys.open_sealed(recipient, b"X" * len(sealed), b"p")
