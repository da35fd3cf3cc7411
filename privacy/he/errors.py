"""Errors of the CKKS roles: each payload rejection names its sender and its cause."""

from __future__ import annotations


class HEPayloadError(ValueError):
    """A payload the aggregator (or key holder) refuses; ``client`` names its sender when known."""

    def __init__(self, client: str | None, reason: str):
        self.client = client
        who = f"client {client!r}" if client is not None else "unknown client (unreadable header)"
        super().__init__(f"{type(self).__name__}: rejected payload from {who}: {reason}")


class TruncatedPayloadError(HEPayloadError):
    """The payload is shorter than its framing declares."""


class TamperedPayloadError(HEPayloadError):
    """The Ed25519 signature does not verify over the payload's fields and ciphertext bytes."""


class ReplayedPayloadError(HEPayloadError):
    """A second payload from the same client in this round, or a payload of an earlier round."""


class ForeignPayloadError(HEPayloadError):
    """A validly signed payload for another run, another round ahead, or another CKKS context."""


class UnknownClientError(HEPayloadError):
    """The sender is not among the clients whose verify keys this round knows."""


class MalformedPayloadError(HEPayloadError):
    """Signed but unusable: bad framing, ciphertexts that do not parse under the context, wrong shape."""


class InsufficientContributionsError(ValueError):
    """Fewer than ``min_clients`` contributions were accepted."""


class DecryptionRefused(ValueError):
    """The key holder's policy refuses to decrypt this aggregate."""
