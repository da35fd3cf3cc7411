"""Client side: encrypt ``weight * update`` densely packed into CKKS slots and sign it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from privacy.he.params import MAX_SUMMANDS
from privacy.he.wire import (
    EncryptedUpdate,
    _chunks_sha256,
    _data_bits,
    _public_context,
    _save_ciphertexts,
    _signed_message,
)
from privacy.keys import (
    sign,
)


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
