"""The aggregator: holds only the public context and the clients' verify keys, rejects bad payloads,
sums the rest homomorphically."""

from __future__ import annotations

import math
from typing import Any

import tenseal.sealapi as sealapi

from privacy.he.errors import (
    ForeignPayloadError,
    HEPayloadError,
    InsufficientContributionsError,
    MalformedPayloadError,
    ReplayedPayloadError,
    TamperedPayloadError,
    UnknownClientError,
)
from privacy.he.params import MAX_SUMMANDS
from privacy.he.wire import (
    Contribution,
    EncryptedAggregate,
    EncryptedUpdate,
    _ChunkError,
    _load_ciphertexts,
    _public_context,
    _save_ciphertexts,
)
from privacy.keys import (
    load_signing_public_key,
    verify,
)


class Aggregator:
    """Sums one round's encrypted updates. Holds only the public context: it cannot decrypt.

    :meth:`add` rejects a payload with a :class:`HEPayloadError` subclass naming the client and leaves the
    running sum untouched, so the round goes on with the others; ``rejected`` keeps the reasons.
    """

    def __init__(
        self,
        public_context: bytes,
        client_verify_keys: dict[str, bytes],
        run_id: str,
        round: int,
        min_clients: int,
    ):
        self.context, self.context_id = _public_context(public_context)
        if self.context.has_secret_key():  # _public_context already refuses; keep the invariant explicit
            raise ValueError("aggregator context must not hold the secret key")
        self._verify_keys = {c: load_signing_public_key(k) for c, k in client_verify_keys.items()}
        self.run_id = run_id
        self.round = int(round)
        if int(min_clients) < 2:
            raise ValueError("min_clients must be >= 2: a sum of one update is that update")
        self.min_clients = int(min_clients)
        self._seal_ctx = self.context.seal_context().data
        self._evaluator = sealapi.Evaluator(self._seal_ctx)
        self._scale = self.context.global_scale
        self._per_ct = sealapi.CKKSEncoder(self._seal_ctx).slot_count() * 2
        self._sum: list[Any] | None = None
        self._n_values: int | None = None
        self._accepted: dict[str, Contribution] = {}
        self.rejected: dict[str, str] = {}

    @property
    def accepted_clients(self) -> list[str]:
        return list(self._accepted)

    def add(self, payload: bytes) -> None:
        """Verify and sum one client's payload (bytes of :meth:`EncryptedUpdate.to_bytes`)."""
        try:
            self._add(payload)
        except HEPayloadError as exc:
            self.rejected[exc.client if exc.client is not None else f"<unknown #{len(self.rejected)}>"] = str(exc)
            raise

    def _add(self, payload: bytes) -> None:
        upd = EncryptedUpdate.from_bytes(payload)
        c = upd.client
        key = self._verify_keys.get(c)
        if key is None:
            raise UnknownClientError(c, "no verify key registered for this client in this round")
        if not verify(key, upd.signed_message(), upd.signature):
            raise TamperedPayloadError(
                c, "Ed25519 signature does not verify over (run, round, client, ciphertext sha256, "
                "n_values, weight, context): the bytes were altered or not signed by this client"
            )
        if upd.run_id != self.run_id:
            raise ForeignPayloadError(c, f"payload is for run {upd.run_id!r}, this is run {self.run_id!r}")
        if upd.context_id != self.context_id:
            raise ForeignPayloadError(
                c, "payload was encrypted under another CKKS context (public key fingerprint differs)"
            )
        if upd.round < self.round:
            raise ReplayedPayloadError(c, f"payload of earlier round {upd.round} replayed into round {self.round}")
        if upd.round > self.round:
            raise ForeignPayloadError(c, f"payload is for round {upd.round}, this aggregator sums round {self.round}")
        if c in self._accepted:
            raise ReplayedPayloadError(c, f"client already contributed to round {self.round}")
        if len(self._accepted) >= MAX_SUMMANDS:
            raise MalformedPayloadError(c, f"round already has {MAX_SUMMANDS} contributions (wrap-around bound)")
        if not math.isfinite(upd.weight) or upd.weight <= 0:
            raise MalformedPayloadError(c, f"weight {upd.weight!r} is not a finite positive sample count")
        if self._n_values is not None and upd.n_values != self._n_values:
            raise MalformedPayloadError(c, f"carries {upd.n_values} values, this round sums {self._n_values}")
        if upd.n_values <= 0 or len(upd.chunks) != -(-upd.n_values // self._per_ct):
            raise MalformedPayloadError(
                c, f"{len(upd.chunks)} ciphertexts cannot hold exactly {upd.n_values} values"
            )
        try:
            cts = _load_ciphertexts(self._seal_ctx, upd.chunks, self._scale)
        except _ChunkError as exc:
            raise MalformedPayloadError(c, str(exc)) from None
        if self._sum is None:
            self._sum = cts
            self._n_values = upd.n_values
        else:
            for acc, ct in zip(self._sum, cts):
                self._evaluator.add_inplace(acc, ct)
        self._accepted[c] = Contribution(c, upd.weight, upd.ciphertext_sha256, upd.signature)

    def aggregate(self) -> EncryptedAggregate:
        """The encrypted weighted sum of the accepted updates, with the contributions it summed."""
        if len(self._accepted) < self.min_clients or self._sum is None:
            raise InsufficientContributionsError(
                f"round {self.round}: {len(self._accepted)} contributions accepted "
                f"({sorted(self._accepted)}), at least {self.min_clients} required"
                + (f"; rejected: {sorted(self.rejected)}" if self.rejected else "")
            )
        return EncryptedAggregate(
            run_id=self.run_id,
            round=self.round,
            n_values=int(self._n_values),
            context_id=self.context_id,
            chunks=tuple(_save_ciphertexts(self._sum)),
            contributions=tuple(self._accepted.values()),
        )
