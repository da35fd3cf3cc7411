"""The key holder: the only party with the secret key; decrypts only aggregates its policy accepts,
noise-flooded before release."""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from privacy.he.errors import DecryptionRefused
from privacy.he.params import DEFAULT_FLOODING_SIGMA, HE_SECRET_INFO, CKKSParams
from privacy.he.wire import (
    EncryptedAggregate,
    _ChunkError,
    _load_ciphertexts,
    _serialize_public,
    _signed_message,
    context_fingerprint,
)
from privacy.keys import (
    load_signing_public_key,
    open_sealed,
    seal_for,
    verify,
)
from privacy.ledger import HE_DECRYPT


def _decrypt_sum(secret_ctx: ts.Context, agg: EncryptedAggregate) -> np.ndarray:
    """Raw (unflooded) decryption of an aggregate's weighted sum. Internal: never release its output."""
    seal_ctx = secret_ctx.seal_context().data
    cts = _load_ciphertexts(seal_ctx, agg.chunks, secret_ctx.global_scale)
    encoder = sealapi.CKKSEncoder(seal_ctx)
    decryptor = secret_ctx.decryptor().data
    parts = []
    for ct in cts:
        pt = sealapi.Plaintext()
        decryptor.decrypt(ct, pt)
        parts.append(np.asarray(encoder.decode_complex(pt), dtype=np.complex128))
    z = np.concatenate(parts)
    out = np.empty(2 * z.size, dtype=np.float64)
    out[0::2] = z.real
    out[1::2] = z.imag
    return out[: agg.n_values]


def _csprng_gaussian(n: int, sigma: float) -> np.ndarray:
    """``n`` i.i.d. N(0, sigma^2) samples from the OS CSPRNG (Box-Muller on 53-bit uniforms)."""
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m) >> np.uint64(11)
    u1 = (raw[0].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = raw[1].astype(np.float64) * 2.0**-53  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    g = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return sigma * g


class KeyHolder:
    """Creates the CKKS keys, holds the secret key, and decrypts only what its policy allows.

    Policy of :meth:`decrypt_aggregate`: the aggregate must be for this key holder's context (and run, if
    ``run_id`` is set), for a round later than any round already decrypted (so at most once per round),
    declare at least ``min_clients`` distinct contributions each carrying a valid Ed25519 signature of a
    registered client (``client_verify_keys``) over the aggregate's run, round, n_values and context. Each
    decryption is recorded through ``ledger_append`` before anything is released, and every released
    value is noise-flooded with N(0, ``flooding_sigma``^2).

    Replicas made with :meth:`from_sealed_secret` keep their own round state; policy state is not shared.
    """

    def __init__(
        self,
        params: CKKSParams | None = None,
        min_clients: int = 2,
        flooding_sigma: float = DEFAULT_FLOODING_SIGMA,
        ledger_append: Callable[..., Any] | None = None,
        *,
        client_verify_keys: dict[str, bytes] | None = None,
        run_id: str | None = None,
        _secret_context: bytes | None = None,
    ):
        self.params = params if params is not None else CKKSParams()
        if int(min_clients) < 2:
            raise ValueError("min_clients must be >= 2: decrypting a sum of one update releases that update")
        self.min_clients = int(min_clients)
        flooding_sigma = float(flooding_sigma)
        if not math.isfinite(flooding_sigma) or flooding_sigma <= 0:
            raise ValueError(
                "flooding_sigma must be > 0: raw CKKS decryptions leak the secret key (Li-Micciancio 2021)"
            )
        self.flooding_sigma = flooding_sigma
        self._ledger_append = ledger_append
        self.run_id = run_id
        self._verify_keys = (
            {c: load_signing_public_key(k) for c, k in client_verify_keys.items()}
            if client_verify_keys is not None
            else None
        )
        if _secret_context is None:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
            )
            ctx.global_scale = self.params.global_scale
        else:
            ctx = ts.context_from(_secret_context)
            if not ctx.has_secret_key():
                raise ValueError("sealed export does not contain a secret key")
            n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
            bits = [m.bit_count() for m in ctx.seal_context().data.key_context_data().parms().coeff_modulus()]
            if n != self.params.poly_modulus_degree or tuple(bits) != self.params.coeff_mod_bit_sizes:
                raise ValueError(f"sealed context has N={n}, primes {bits}; params say {self.params}")
        self._ctx = ctx
        self._public = _serialize_public(ctx)
        self.context_id = context_fingerprint(ctx)
        self._decrypted_rounds: list[int] = []
        self._lock = threading.Lock()

    # -- key distribution ------------------------------------------------------------------------
    def public_context(self) -> bytes:
        """Serialized context with the public key only (no secret, relinearization or Galois keys)."""
        return self._public

    def export_secret_for(self, recipient_public: Any) -> bytes:
        """The secret context (secret + public key), sealed to ``recipient_public`` (X25519)."""
        secret = self._ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        return seal_for(recipient_public, secret, HE_SECRET_INFO)

    @classmethod
    def from_sealed_secret(
        cls,
        sealed: bytes,
        recipient_private: Any,
        params: CKKSParams | None = None,
        min_clients: int = 2,
        flooding_sigma: float = DEFAULT_FLOODING_SIGMA,
        ledger_append: Callable[..., Any] | None = None,
        *,
        client_verify_keys: dict[str, bytes] | None = None,
        run_id: str | None = None,
    ) -> "KeyHolder":
        """A replica key holder from :meth:`export_secret_for`'s blob and the recipient's X25519 key."""
        secret = open_sealed(recipient_private, sealed, HE_SECRET_INFO)
        return cls(
            params, min_clients, flooding_sigma, ledger_append,
            client_verify_keys=client_verify_keys, run_id=run_id, _secret_context=secret,
        )

    def register_clients(self, client_verify_keys: dict[str, bytes]) -> None:
        """Set the Ed25519 verify keys the key holder checks contributions against."""
        self._verify_keys = {c: load_signing_public_key(k) for c, k in client_verify_keys.items()}

    def describe(self) -> dict[str, Any]:
        d = self.params.describe()
        d.update(min_clients=self.min_clients, flooding_sigma=self.flooding_sigma, context_id=self.context_id)
        return d

    # -- decryption --------------------------------------------------------------------------------
    def _check_policy(self, agg: EncryptedAggregate) -> None:
        if agg.context_id != self.context_id:
            raise DecryptionRefused("aggregate was computed under another CKKS context")
        if self.run_id is not None and agg.run_id != self.run_id:
            raise DecryptionRefused(f"aggregate is for run {agg.run_id!r}, this key holder serves {self.run_id!r}")
        if agg.round in self._decrypted_rounds:
            raise DecryptionRefused(f"round {agg.round} was already decrypted once; refusing a second decryption")
        if self._decrypted_rounds and agg.round < max(self._decrypted_rounds):
            raise DecryptionRefused(
                f"round {agg.round} is older than the last decrypted round {max(self._decrypted_rounds)}"
            )
        clients = agg.clients
        if len(set(clients)) != len(clients):
            raise DecryptionRefused(f"aggregate lists a client twice: {clients}")
        if len(clients) < self.min_clients:
            raise DecryptionRefused(
                f"aggregate declares {len(clients)} contributions ({clients}), policy requires >= {self.min_clients}"
            )
        if self._verify_keys is None:
            raise DecryptionRefused("no client verify keys registered: cannot check the contributions' signatures")
        per_ct = self.params.values_per_ciphertext
        if agg.n_values <= 0 or len(agg.chunks) != -(-agg.n_values // per_ct):
            raise DecryptionRefused(f"{len(agg.chunks)} ciphertexts cannot hold exactly {agg.n_values} values")
        for c in agg.contributions:
            key = self._verify_keys.get(c.client)
            if key is None:
                raise DecryptionRefused(f"contribution from unregistered client {c.client!r}")
            if not math.isfinite(c.weight) or c.weight <= 0:
                raise DecryptionRefused(f"contribution of {c.client!r} has invalid weight {c.weight!r}")
            msg = _signed_message(
                agg.run_id, agg.round, c.client, c.ciphertext_sha256, agg.n_values, c.weight, agg.context_id
            )
            if not verify(key, msg, c.signature):
                raise DecryptionRefused(
                    f"signature of {c.client!r} does not verify for run {agg.run_id!r} round {agg.round}"
                )

    def decrypt_aggregate(self, agg: EncryptedAggregate | bytes) -> np.ndarray:
        """The noise-flooded weighted FedAvg mean ``sum_i w_i u_i / sum_i w_i`` (float64, flat).

        Raises :class:`DecryptionRefused` if the policy does not hold. Once the policy holds the round is
        spent, even if decryption or the ledger write fails afterwards (fail closed).
        """
        if isinstance(agg, (bytes, bytearray, memoryview)):
            agg = EncryptedAggregate.from_bytes(bytes(agg))
        if not isinstance(agg, EncryptedAggregate):
            raise TypeError("decrypt_aggregate takes an EncryptedAggregate or its bytes")
        with self._lock:
            self._check_policy(agg)
            self._decrypted_rounds.append(agg.round)
            try:
                raw_sum = _decrypt_sum(self._ctx, agg)
            except _ChunkError as exc:
                raise DecryptionRefused(f"aggregate ciphertext unusable: {exc}") from None
            released = raw_sum / agg.total_weight
            del raw_sum
            released += _csprng_gaussian(released.size, self.flooding_sigma)
            if self._ledger_append is not None:
                self._ledger_append(
                    event=HE_DECRYPT,
                    round=agg.round,
                    clients=agg.clients,
                    n_values=agg.n_values,
                    flooding_sigma=self.flooding_sigma,
                )
            return released
