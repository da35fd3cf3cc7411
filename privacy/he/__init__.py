"""CKKS (TenSEAL) aggregation of federated updates with separated roles.

Modules: ``params`` (CKKS parameters and shared constants), ``errors``, ``wire`` (SEAL object I/O, payload
framing and signing), ``client`` (:func:`encrypt_update`), ``aggregator`` (:class:`Aggregator`) and
``keyholder`` (:class:`KeyHolder`).

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

from privacy.he.aggregator import Aggregator
from privacy.he.client import _encrypt_values, encrypt_update  # noqa: F401 (_encrypt_values: bench_he)
from privacy.he.errors import (
    DecryptionRefused,
    ForeignPayloadError,
    HEPayloadError,
    InsufficientContributionsError,
    MalformedPayloadError,
    ReplayedPayloadError,
    TamperedPayloadError,
    TruncatedPayloadError,
    UnknownClientError,
)
from privacy.he.keyholder import KeyHolder, _decrypt_sum  # noqa: F401 (_decrypt_sum: test_he)
from privacy.he.params import DEFAULT_FLOODING_SIGMA, HE_SECRET_INFO, MAX_SUMMANDS, SECURITY_TABLE_128, CKKSParams
from privacy.he.wire import (  # noqa: F401 (_public_context: bench_he)
    Contribution,
    EncryptedAggregate,
    EncryptedUpdate,
    _public_context,
    context_fingerprint,
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
