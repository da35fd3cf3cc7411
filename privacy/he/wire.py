"""Wire format: SEAL ciphertexts through a private tmpfs directory (sealapi saves only to paths),
public contexts and their fingerprints, and the signed, framed update and aggregate payloads."""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Sequence

import tenseal as ts
import tenseal.sealapi as sealapi

from privacy.he.errors import HEPayloadError, MalformedPayloadError, TruncatedPayloadError
from privacy.keys import (
    canonical_message,
)

_UPDATE_MAGIC = b"SFKHEU1\n"
_AGG_MAGIC = b"SFKHEA1\n"
_SIGN_DOMAIN = "secure-fedkim/he-update/v1"



_io_lock = threading.Lock()
_io_dirs: dict[int, str] = {}
_io_counter = itertools.count()


def _io_path() -> str:
    """A fresh file name in this process's private tmpfs directory (sealapi only saves to paths)."""
    pid = os.getpid()
    with _io_lock:
        d = _io_dirs.get(pid)
        if d is None or not os.path.isdir(d):
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            d = tempfile.mkdtemp(prefix="sfk-he-", dir=base)  # mode 0700
            _io_dirs[pid] = d
            atexit.register(_cleanup_io_dir, pid, d)
        n = next(_io_counter)
    return os.path.join(d, f"{threading.get_ident()}-{n}")


def _cleanup_io_dir(pid: int, d: str) -> None:
    if os.getpid() == pid:
        shutil.rmtree(d, ignore_errors=True)


def _save_ciphertexts(cts: Iterable[Any]) -> list[bytes]:
    path = _io_path()
    out = []
    try:
        for ct in cts:
            ct.save(path)
            with open(path, "rb") as f:
                out.append(f.read())
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return out


class _ChunkError(Exception):
    def __init__(self, index: int, reason: str):
        self.index, self.reason = index, reason
        super().__init__(f"ciphertext chunk {index}: {reason}")


def _load_ciphertexts(seal_ctx: Any, blobs: Sequence[bytes], scale: float) -> list[Any]:
    """Load and validate ciphertexts: SEAL's own validity check plus level, size, NTT form and scale."""
    path = _io_path()
    first = seal_ctx.first_parms_id()
    out = []
    try:
        for i, blob in enumerate(blobs):
            with open(path, "wb") as f:
                f.write(blob)
            ct = sealapi.Ciphertext()
            try:
                ct.load(seal_ctx, path)
            except Exception as exc:  # SEAL raises logic_error / invalid_argument / runtime_error
                raise _ChunkError(i, f"does not parse under this CKKS context ({exc})") from None
            if ct.parms_id() != first or ct.size() != 2 or not ct.is_ntt_form():
                raise _ChunkError(i, "is not a fresh 2-component ciphertext at the context's data level")
            if ct.scale != scale:
                raise _ChunkError(i, f"has scale {ct.scale!r}, the context uses {scale!r}")
            out.append(ct)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return out


def _serialize_public(ctx: ts.Context) -> bytes:
    return ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def context_fingerprint(ctx: ts.Context | bytes) -> str:
    """sha256 (hex) of the public part of a CKKS context: the same for the key holder, clients, aggregator."""
    if isinstance(ctx, (bytes, bytearray)):
        ctx = ts.context_from(bytes(ctx))
    return hashlib.sha256(b"sfk-he-context/v1|" + _serialize_public(ctx)).hexdigest()


_ctx_cache_lock = threading.Lock()
_ctx_cache: dict[bytes, tuple[ts.Context, str]] = {}


def _public_context(public_context: bytes | ts.Context) -> tuple[ts.Context, str]:
    """Load (cached) a client-side context; refuse one that carries the secret key."""
    if isinstance(public_context, ts.Context):
        ctx = public_context
        fp = context_fingerprint(ctx)
    else:
        key = hashlib.sha256(bytes(public_context)).digest()
        with _ctx_cache_lock:
            hit = _ctx_cache.get(key)
        if hit is not None:
            return hit
        ctx = ts.context_from(bytes(public_context))
        _require_public(ctx)
        fp = context_fingerprint(ctx)
        with _ctx_cache_lock:
            if len(_ctx_cache) >= 8:
                _ctx_cache.clear()
            _ctx_cache[key] = (ctx, fp)
        return ctx, fp
    _require_public(ctx)
    return ctx, fp


def _require_public(ctx: ts.Context) -> None:
    if ctx.has_secret_key() or ctx.is_private():
        raise ValueError(
            "the context given to a client or the aggregator holds the CKKS secret key; they must get "
            "KeyHolder.public_context() (public key only)"
        )
    if not ctx.has_public_key():
        raise ValueError("the context has no public key, so it cannot encrypt")


def _data_bits(ctx: ts.Context) -> int:
    cd = ctx.seal_context().data.first_context_data()
    return sum(m.bit_count() for m in cd.parms().coeff_modulus())


# ------------------------------------------------------------------------------------------ payloads
def _chunks_sha256(chunks: Sequence[bytes]) -> bytes:
    h = hashlib.sha256(b"sfk-he-chunks/v1")
    h.update(struct.pack(">Q", len(chunks)))
    for c in chunks:
        h.update(struct.pack(">Q", len(c)))
        h.update(c)
    return h.digest()


def _signed_message(
    run_id: str, round: int, client: str, ct_sha256: bytes, n_values: int, weight: float, context_id: str
) -> bytes:
    return canonical_message(
        _SIGN_DOMAIN, run_id, int(round), client, ct_sha256, int(n_values), float(weight), context_id
    )


def _frame(magic: bytes, header: dict, chunks: Sequence[bytes]) -> bytes:
    header = dict(header, chunk_lengths=[len(c) for c in chunks])
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([magic, struct.pack(">I", len(hb)), hb, *chunks])


def _unframe(magic: bytes, data: bytes, kind: str) -> tuple[dict, list[bytes]]:
    """Split a framed payload; raises HEPayloadError subclasses (client named once the header is read)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{kind} must be bytes")
    data = memoryview(data)
    if len(data) < len(magic) + 4:
        if bytes(data) == magic[: len(data)]:
            raise TruncatedPayloadError(None, f"{kind} cut off inside its magic/length ({len(data)} bytes)")
        raise MalformedPayloadError(None, f"not an {kind} (bad magic)")
    if bytes(data[: len(magic)]) != magic:
        raise MalformedPayloadError(None, f"not an {kind} (bad magic)")
    (hlen,) = struct.unpack(">I", data[len(magic) : len(magic) + 4])
    start = len(magic) + 4
    if len(data) < start + hlen:
        raise TruncatedPayloadError(None, f"{kind} cut off inside its header ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[start : start + hlen]))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except ValueError as exc:
        raise MalformedPayloadError(None, f"{kind} header is not valid JSON ({exc})") from None
    client = header.get("client") if isinstance(header.get("client"), str) else None
    lengths = header.get("chunk_lengths")
    if not isinstance(lengths, list) or not all(isinstance(x, int) and x >= 0 for x in lengths):
        raise MalformedPayloadError(client, f"{kind} header has no valid chunk_lengths")
    pos = start + hlen
    expected = pos + sum(lengths)
    if len(data) < expected:
        raise TruncatedPayloadError(
            client, f"{kind} is truncated: {len(data)} bytes, its framing declares {expected}"
        )
    if len(data) > expected:
        raise MalformedPayloadError(client, f"{kind} has {len(data) - expected} trailing bytes")
    chunks = []
    for n in lengths:
        chunks.append(bytes(data[pos : pos + n]))
        pos += n
    return header, chunks


def _get(header: dict, key: str, typ: type | tuple, client: str | None, kind: str) -> Any:
    v = header.get(key)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise MalformedPayloadError(client, f"{kind} header field {key!r} is missing or has a wrong type")
    return v


@dataclass(frozen=True)
class EncryptedUpdate:
    """One client's signed, CKKS-encrypted ``weight * update``.

    The weight (sample count) travels in clear but signed: see the module docstring for why.
    """

    run_id: str
    round: int
    client: str
    weight: float
    n_values: int
    context_id: str
    chunks: tuple[bytes, ...]
    signature: bytes

    @cached_property
    def ciphertext_sha256(self) -> bytes:
        return _chunks_sha256(self.chunks)

    def signed_message(self) -> bytes:
        return _signed_message(
            self.run_id, self.round, self.client, self.ciphertext_sha256, self.n_values, self.weight,
            self.context_id,
        )

    @property
    def ciphertext_nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def to_bytes(self) -> bytes:
        header = {
            "run_id": self.run_id,
            "round": self.round,
            "client": self.client,
            "weight": float(self.weight).hex(),
            "n_values": self.n_values,
            "context_id": self.context_id,
            "signature": self.signature.hex(),
        }
        return _frame(_UPDATE_MAGIC, header, self.chunks)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptedUpdate":
        header, chunks = _unframe(_UPDATE_MAGIC, data, "encrypted update")
        client = header.get("client") if isinstance(header.get("client"), str) else None
        k = "encrypted update"
        if client is None:
            raise MalformedPayloadError(None, "encrypted update header names no client")
        try:
            weight = float.fromhex(_get(header, "weight", str, client, k))
            signature = bytes.fromhex(_get(header, "signature", str, client, k))
        except ValueError as exc:
            if isinstance(exc, HEPayloadError):
                raise
            raise MalformedPayloadError(client, f"bad weight or signature encoding ({exc})") from None
        return cls(
            run_id=_get(header, "run_id", str, client, k),
            round=_get(header, "round", int, client, k),
            client=client,
            weight=weight,
            n_values=_get(header, "n_values", int, client, k),
            context_id=_get(header, "context_id", str, client, k),
            chunks=tuple(chunks),
            signature=signature,
        )


@dataclass(frozen=True)
class Contribution:
    """What the key holder needs to re-verify one summed contribution's signature."""

    client: str
    weight: float
    ciphertext_sha256: bytes
    signature: bytes


@dataclass(frozen=True)
class EncryptedAggregate:
    """The homomorphic sum of accepted updates, declared with the contributions it summed."""

    run_id: str
    round: int
    n_values: int
    context_id: str
    chunks: tuple[bytes, ...]
    contributions: tuple[Contribution, ...]

    @property
    def clients(self) -> list[str]:
        return [c.client for c in self.contributions]

    @property
    def total_weight(self) -> float:
        return math.fsum(c.weight for c in self.contributions)

    @property
    def ciphertext_nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def to_bytes(self) -> bytes:
        header = {
            "run_id": self.run_id,
            "round": self.round,
            "n_values": self.n_values,
            "context_id": self.context_id,
            "contributions": [
                {
                    "client": c.client,
                    "weight": float(c.weight).hex(),
                    "ciphertext_sha256": c.ciphertext_sha256.hex(),
                    "signature": c.signature.hex(),
                }
                for c in self.contributions
            ],
        }
        return _frame(_AGG_MAGIC, header, self.chunks)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptedAggregate":
        header, chunks = _unframe(_AGG_MAGIC, data, "encrypted aggregate")
        k = "encrypted aggregate"
        raw = _get(header, "contributions", list, None, k)
        try:
            contributions = tuple(
                Contribution(
                    client=str(c["client"]),
                    weight=float.fromhex(c["weight"]),
                    ciphertext_sha256=bytes.fromhex(c["ciphertext_sha256"]),
                    signature=bytes.fromhex(c["signature"]),
                )
                for c in raw
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedPayloadError(None, f"bad contribution list ({exc})") from None
        return cls(
            run_id=_get(header, "run_id", str, None, k),
            round=_get(header, "round", int, None, k),
            n_values=_get(header, "n_values", int, None, k),
            context_id=_get(header, "context_id", str, None, k),
            chunks=tuple(chunks),
            contributions=contributions,
        )
