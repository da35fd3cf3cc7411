"""CKKS (TenSEAL) aggregation of federated updates with separated roles.

Roles
-----
* :class:`KeyHolder` creates the CKKS keys and is the **only** party with the secret key. It hands out
  :meth:`KeyHolder.public_context` (public key only: no secret key, no relinearization or Galois keys,
  which a sum does not need), exports the secret key only sealed to another holder's X25519 key
  (:meth:`KeyHolder.export_secret_for`), and decrypts only aggregates that pass its policy
  (:meth:`KeyHolder.decrypt_aggregate`).
* Clients call :func:`encrypt_update`: they encrypt ``weight * update`` densely packed into CKKS slots and
  sign the result (Ed25519) over ``(run, round, client, sha256(ciphertext bytes), n_values, weight,
  context id)``.
* :class:`Aggregator` (the server process that sums) holds only the public context and the clients'
  Ed25519 verify keys. It rejects tampered, replayed, truncated, foreign or malformed payloads, each with
  its own :class:`HEPayloadError` subclass naming the client, and sums the rest homomorphically.

What each party learns (threat model in short; honest-but-curious parties, no aggregator/key-holder
collusion): the aggregator sees ciphertexts, clients' names, sample-count weights and sizes; it cannot
decrypt (its context has no secret key; tested). The key holder sees only the decrypted *sum* of at least
``min_clients`` signed contributions, noise-flooded before release. Not protected: a *malicious*
aggregator can hand the key holder one client's ciphertext together with other clients' valid signatures
(signatures bind each contribution, not the sum), and the key holder cannot tell; ``secagg`` mode (Flower
SecAgg+) is the answer to that threat. HE is not differential privacy; epsilon comes from DP-SGD only.

Parameters (default :class:`CKKSParams`)
---------------------------------------
Ring dimension ``N = 4096``, coefficient modulus ``[60, 40]`` = **100 bits** total, below the 109 bits the
Homomorphic Encryption Standard (Albrecht et al. 2018, Table 1, ternary secret) allows for 128-bit classical
security at N = 4096. A sum of ciphertexts has multiplicative depth 0, so the ciphertexts live at a single
60-bit data prime; the 40-bit prime is only the key-level "special" prime that TenSEAL insists on (it
generates key-switching keys) and that SEAL uses to encrypt at a higher level and mod-switch down, which
removes almost all fresh-encryption noise. The example chain ``[60, 40, 40, 60]`` at N = 8192 would carry
three data primes (3x the bytes and NTT work) for two multiplications a sum never does.

Scale ``2**36``: the decrypted sum ``sum_i w_i u_i`` must stay below ``2**(60-1-36) = 2**23 ~ 8.4e6`` in
absolute value (``describe()['max_abs_weighted_sum']``); :func:`encrypt_update` refuses a client whose
``max |w u|`` exceeds 1/64 of that, so sums of up to :data:`MAX_SUMMANDS` = 64 clients cannot wrap. The
CKKS error of a decrypted sum is about 1e-7 absolute per contributing client at this scale (measured:
max abs ~1e-7 for 1M values), i.e. about 1e-7 / W on the weighted mean (W = total weight).

Packing: CKKS slots are complex, so two real values go into one slot (real and imaginary part); one
ciphertext holds N = 4096 values in 2 x 4096 x 8 bytes: **4x** the float32 bytes (plus ~0.2% headers).
TenSEAL's ``CKKSVector`` only uses the real part (8x here, ~20x with the example parameters), so packing
and encryption go through ``tenseal.sealapi`` (TenSEAL's SEAL binding) with the keys of the TenSEAL context.

Weights: carried **in clear**, inside the signed metadata. The weight is a sample count, which plain
FedAvg (Flower's ``num_examples``) already reveals to the server; it is low-sensitivity metadata next to
the update itself. In clear, the key holder computes the total weight from the contributions' *signed*
weights, so an aggregator cannot inflate or swap weights without breaking a signature, and no slot or extra
ciphertext is spent on it.

Noise flooding: a raw CKKS decryption next to its ciphertext gives away the secret key (Li and Micciancio,
EUROCRYPT 2021). Every value the key holder releases carries fresh Gaussian noise of standard deviation
``flooding_sigma`` drawn from the OS CSPRNG. The default :data:`DEFAULT_FLOODING_SIGMA` = 1e-5 (absolute,
on the weighted-mean update) is >= 100x the CKKS error of the mean even in the worst case (two clients
with weight 1; with sample-count weights W >= 100 it is >= 1e4x), about 1e-4 of a typical parameter
magnitude (~0.1), and far below the DP-SGD noise already in each update (per-coordinate std of order
noise_multiplier * clip / batch * lr * steps, >= 1e-3 in any useful DP configuration). It adds an error of
1e-5 to each released value, which is the precision users should expect of ``he`` mode.

Ciphertext (de)serialization: ``tenseal.sealapi`` can save and load SEAL objects only through file paths,
so ciphertexts pass through a private (0700) directory on tmpfs (``/dev/shm`` when present). Only
ciphertexts go there; the secret key never touches a file (it is serialized in memory by TenSEAL).
"""

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
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from privacy.keys import (
    canonical_message,
    load_signing_public_key,
    open_sealed,
    seal_for,
    sign,
    verify,
)

__all__ = [
    "CKKSParams",
    "Contribution",
    "DEFAULT_FLOODING_SIGMA",
    "DecryptionRefused",
    "EncryptedAggregate",
    "EncryptedUpdate",
    "ForeignPayloadError",
    "HEPayloadError",
    "HE_SECRET_INFO",
    "InsufficientContributionsError",
    "KeyHolder",
    "MAX_SUMMANDS",
    "MalformedPayloadError",
    "ReplayedPayloadError",
    "SECURITY_TABLE_128",
    "TamperedPayloadError",
    "TruncatedPayloadError",
    "UnknownClientError",
    "Aggregator",
    "context_fingerprint",
    "encrypt_update",
]

#: Homomorphic Encryption Standard (2018), Table 1: largest total log2(q) (special prime included) for
#: 128-bit classical security with a uniform ternary secret, per ring dimension N.
SECURITY_TABLE_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Sums of up to this many worst-case contributions cannot wrap around the plaintext modulus.
MAX_SUMMANDS = 64

#: Default flooding noise (absolute std on the released weighted-mean values); see the module docstring.
DEFAULT_FLOODING_SIGMA = 1e-5

#: ``info`` label binding a sealed secret-key export to its purpose.
HE_SECRET_INFO = b"secure-fedkim/he-secret-context/v1"

_UPDATE_MAGIC = b"SFKHEU1\n"
_AGG_MAGIC = b"SFKHEA1\n"
_SIGN_DOMAIN = "secure-fedkim/he-update/v1"


# ------------------------------------------------------------------------------------------- errors
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


# ---------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters for a depth-0 (sum only) circuit, checked against the 128-bit HE standard table.

    ``coeff_mod_bit_sizes`` lists the data primes followed by the key-level special prime (TenSEAL needs
    one). Default: N = 4096, [60, 40] (100 bits <= 109), scale 2**36: see the module docstring.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    global_scale_bits: int = 36

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if n not in SECURITY_TABLE_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(SECURITY_TABLE_128)}, got {n}")
        _ = self.security_bits  # raises if the modulus is too large for 128-bit security
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError("coeff_mod_bit_sizes needs >= 2 primes: data prime(s) + the special prime")
        if any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError("each coefficient prime must have 20..60 bits (SEAL limit 60)")
        headroom = sum(self.data_prime_bits) - 1 - self.global_scale_bits
        if self.global_scale_bits < 20 or headroom < 8:
            raise ValueError(
                f"global_scale_bits={self.global_scale_bits} leaves {headroom} bits of value range in "
                f"the data primes {self.data_prime_bits}; need scale >= 20 bits and >= 8 bits of range"
            )

    @property
    def data_prime_bits(self) -> tuple[int, ...]:
        return self.coeff_mod_bit_sizes[:-1]

    @property
    def total_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def security_bits(self) -> int:
        """128, after checking total log q against the HE standard's 128-bit table; raises if exceeded."""
        limit = SECURITY_TABLE_128[self.poly_modulus_degree]
        if self.total_modulus_bits > limit:
            raise ValueError(
                f"total modulus {self.total_modulus_bits} bits exceeds {limit} bits, the HE standard's "
                f"128-bit classical security bound for N={self.poly_modulus_degree}"
            )
        return 128

    @property
    def global_scale(self) -> float:
        return float(2**self.global_scale_bits)

    @property
    def values_per_ciphertext(self) -> int:
        """Real values per ciphertext: N/2 complex slots x 2 (real and imaginary part)."""
        return self.poly_modulus_degree

    @property
    def max_abs_weighted_sum(self) -> float:
        """Largest |sum_i w_i u_i| a decrypted sum can represent without wrapping."""
        return float(2.0 ** (sum(self.data_prime_bits) - 1 - self.global_scale_bits))

    @property
    def ciphertext_expansion(self) -> float:
        """Ciphertext bytes / float32 bytes, SEAL headers excluded: 2 polys x N x 8 B x data primes / (N x 4 B)."""
        n = self.poly_modulus_degree
        return 2 * n * 8 * len(self.data_prime_bits) / (n * 4)

    def describe(self) -> dict[str, Any]:
        """Parameters for reports."""
        return {
            "scheme": "CKKS (TenSEAL/SEAL)",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "total_modulus_bits": self.total_modulus_bits,
            "max_total_modulus_bits_128": SECURITY_TABLE_128[self.poly_modulus_degree],
            "global_scale": self.global_scale,
            "global_scale_bits": self.global_scale_bits,
            "security_level": f"{self.security_bits}-bit classical (HE standard, ternary secret)",
            "multiplicative_depth": 0,
            "values_per_ciphertext": self.values_per_ciphertext,
            "ciphertext_expansion": self.ciphertext_expansion,
            "max_abs_weighted_sum": self.max_abs_weighted_sum,
            "max_summands": MAX_SUMMANDS,
        }


# ------------------------------------------------------------------------------- SEAL object transport
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


# -------------------------------------------------------------------------------------------- client
def _encrypt_values(ctx: ts.Context, values: np.ndarray) -> list[bytes]:
    """Encrypt float64 ``values`` two per complex slot (real, imaginary), N per ciphertext; serialized."""
    seal_ctx = ctx.seal_context().data
    encoder = sealapi.CKKSEncoder(seal_ctx)
    encryptor = ctx.encryptor().data
    scale = ctx.global_scale
    per_ct = encoder.slot_count() * 2
    n = int(values.size)
    n_ct = -(-n // per_ct)
    padded = np.zeros(n_ct * per_ct, dtype=np.float64)
    padded[:n] = values
    packed = (padded[0::2] + 1j * padded[1::2]).reshape(n_ct, per_ct // 2)
    cts = []
    for row in packed:
        pt = sealapi.Plaintext()
        encoder.encode(row.tolist(), scale, pt)
        ct = sealapi.Ciphertext()
        encryptor.encrypt(pt, ct)
        cts.append(ct)
    return _save_ciphertexts(cts)


def encrypt_update(
    update: np.ndarray,
    weight: float,
    public_context: bytes | ts.Context,
    signing_key: Any,
    *,
    run_id: str,
    round: int,
    client: str,
) -> EncryptedUpdate:
    """Encrypt ``weight * update`` (flattened, C order) densely into CKKS slots and sign it.

    Two real values per complex slot, N values per ciphertext. ``weight`` is the client's sample count
    (> 0, finite). Raises ``ValueError`` on non-finite values, on a context that holds the secret key, and
    when ``max |weight * update|`` exceeds ``max_abs_weighted_sum / MAX_SUMMANDS`` (the sum could wrap;
    express weights in larger units, e.g. thousands of samples).
    """
    ctx, context_id = _public_context(public_context)
    values = np.asarray(update)
    if values.dtype.kind not in "fiu":
        raise TypeError(f"update must be a real numeric array, got dtype {values.dtype}")
    values = values.astype(np.float64, copy=False).ravel()
    n = int(values.size)
    if n == 0:
        raise ValueError("update is empty")
    weight = float(weight)
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight must be a finite positive sample count, got {weight!r}")
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError("round must be a non-negative int")
    if not run_id or not client:
        raise ValueError("run_id and client must be non-empty")
    weighted = values * weight
    if not np.all(np.isfinite(weighted)):
        raise ValueError(f"client {client!r}: update has non-finite values")
    scale = ctx.global_scale
    bound = 2.0 ** (_data_bits(ctx) - 1) / scale / MAX_SUMMANDS
    peak = float(np.max(np.abs(weighted)))
    if peak > bound:
        raise ValueError(
            f"client {client!r}: max |weight * update| = {peak:.4g} exceeds {bound:.4g}, the per-client "
            f"bound that keeps a sum of {MAX_SUMMANDS} clients from wrapping at scale 2**"
            f"{int(math.log2(scale))}; express the weight in larger units"
        )

    chunks = tuple(_encrypt_values(ctx, weighted))
    message = _signed_message(run_id, round, client, _chunks_sha256(chunks), n, weight, context_id)
    return EncryptedUpdate(
        run_id=run_id, round=round, client=client, weight=weight, n_values=n, context_id=context_id,
        chunks=chunks, signature=sign(signing_key, message),
    )


# ---------------------------------------------------------------------------------------- aggregator
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


# ---------------------------------------------------------------------------------------- key holder
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
                    event="he_decrypt",
                    round=agg.round,
                    clients=agg.clients,
                    n_values=agg.n_values,
                    flooding_sigma=self.flooding_sigma,
                )
            return released
