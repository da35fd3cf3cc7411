"""Every random draw a DP guarantee depends on, from one source: :class:`DPRandomness`.

DP-SGD's guarantee rests on three draws: the Gaussian noise added to each step's clipped sum, the Poisson
sample of records (or of patients) at each step, and, at patient level, which ``k`` of a patient's records
are used. All of them come from a :class:`DPRandomness` made for one training session (one task in one
round at one hospital); nothing in a DP path draws from torch's or NumPy's global RNG, which every other
piece of code in the process shares and may reseed (before ea4bf7b a reseed to the run seed made every
round draw the same noise).

Generator: the ChaCha20 keystream of ``cryptography`` (OpenSSL), a cryptographically secure generator.
:meth:`DPRandomness.secure` keys it with 256 bits from ``os.urandom`` for each session, so hospitals,
rounds, tasks and the single-hospital baseline never share a stream and the stream cannot be predicted
from what was released (a Mersenne Twister's state can be recovered from 624 outputs).
:meth:`DPRandomness.reproducible` keys the same cipher from a seed and a stream name: for tests, audit
replays and benches only. Every ledger entry of a DP round says which kind drew its noise, and the
compliance report fails a release whose noise came from a reproducible one.

Uniforms: 53-bit dyadic rationals ``k / 2**53`` from 64-bit keystream words for sampling, so a Poisson
inclusion ``u < q`` has probability ``q`` to within ``2**-53``.

Gaussian sampler: Box-Muller at the gradient's precision (float32 uniforms ``k / 2**24`` from 32-bit words for
float32 gradients, as the demo's models have; float64 on 53-bit uniforms for float64 ones), and each returned
coordinate is the sum of four independent N(0, std^2) draws divided by 2: the defence of Holohan and
Braghin 2021 (section 5.1) that Opacus's ``secure_mode`` uses, also on float32 draws. The floating-point
attacks on Gaussian samplers (Jin et al. 2022) recover the noise by inverting one sampler output; for a sum
of four the search grows to 2^(3p) candidates (p = 24 bits: 2^72; float64: 2^159). A discrete Gaussian
(Canonne, Kamath and Steinke 2020) would remove floating point from the noise altogether, but costs a
rejection loop per coordinate in Python. Drawing float64 values for float32 gradients cost 2.5x the float32
draws here, which put a DP step of the demo's 38k-parameter model at 1.75x a Mersenne Twister step
(``bench/bench_randomness.py`` prints the ratios). The noise of the largest draws is bounded by the
uniforms' resolution (|r| <= 5.8 for 24 bits, 8.6 for 53): the sum of four cannot pass ~11.5 sigma, a tail of
probability below 1e-28 per coordinate.

Evidence for auditors: each session keeps a SHA-256 of every noise vector it drew (``noise_fingerprint``)
and of every Poisson sample (``sampling_fingerprint``); the hospital writes both to its ledger with the
round. Two sessions that share a fingerprint drew the same randomness, which an honest run does with
probability ~0 (the noise has thousands of bits of entropy per step). A fingerprint reveals nothing usable:
inverting SHA-256 on a vector of that entropy is infeasible, and it is only ever compared for equality.

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from typing import Callable, Optional

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch.utils.data import TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["DPRandomness", "PoissonLoader", "SourcedNoise", "fetch", "observed", "SECURE", "REPRODUCIBLE", "RANDOMNESS_KINDS", "GENERATOR", "GAUSSIAN"]

#: The kinds of generator a DP round can record in its ledger entry.
SECURE = "secure"
REPRODUCIBLE = "reproducible"
RANDOMNESS_KINDS = (SECURE, REPRODUCIBLE)
#: What the ledger and the report say about the generator and the sampler.
GENERATOR = "ChaCha20 keystream (cryptography / OpenSSL)"
GAUSSIAN = "Box-Muller in float64 on 53-bit uniforms, sum of 4 draws / 2 (Holohan and Braghin 2021)"

_KEY_BYTES = 32
_TWO_PI = 2.0 * math.pi
_MASK53 = (1 << 53) - 1
_MASK24 = (1 << 24) - 1


#: AUDITING ONLY (``attacks/runlevel.py``): while set by :func:`observed`, an object whose ``noise(randomness,
#: noise, std)`` sees each DP step's noise as applied (the released sum minus the clipped sum, every coordinate)
#: and whose ``sample(randomness, n, sample_rate, chosen)`` sees each Poisson sample. None in production: inert.
OBSERVER = None


@contextlib.contextmanager
def observed(observer):
    """AUDITING ONLY: let ``observer`` see every DP step's applied noise and Poisson sample in this process."""
    global OBSERVER
    previous, OBSERVER = OBSERVER, observer
    try:
        yield observer
    finally:
        OBSERVER = previous


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    """``n`` zero bytes (the plaintext whose ChaCha20 encryption is the keystream), kept for the sizes in use."""
    return bytes(n)


class DPRandomness:
    """One training session's random source for DP-SGD (noise, Poisson samples, records per patient).

    Make one with :meth:`secure` (a release) or :meth:`reproducible` (tests, audits, benches). Not
    thread-safe; one session, one process.

    Attributes:
        kind: ``"secure"`` or ``"reproducible"``.
        noise_draws, noise_values, samples: how many noise vectors, noise coordinates and Poisson samples
            this source has drawn.
    """

    def __init__(self, key: bytes, kind: str, label: tuple = ()):
        if kind not in RANDOMNESS_KINDS:
            raise ValueError(f"kind must be one of {RANDOMNESS_KINDS}, got {kind!r}")
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            raise ValueError(f"key must be {_KEY_BYTES} bytes")
        self.kind = kind
        self.label = tuple(label)  # what the session is (run, hospital, round, task): for audits, never key material
        # two streams of one key (cryptography's 16-byte nonce: 32-bit block counter, then a 96-bit nonce): the
        # noise's, and the samples'; so the noise of step i sits at the same place of its stream whatever was sampled
        self._noise_stream = Cipher(algorithms.ChaCha20(key, bytes(15) + b"\x01"), mode=None).encryptor()
        self._sample_stream = Cipher(algorithms.ChaCha20(key, bytes(15) + b"\x02"), mode=None).encryptor()
        self._noise_hash = hashlib.sha256(b"secure-fedkim noise v1")
        self._sample_hash = hashlib.sha256(b"secure-fedkim sampling v1")
        self.noise_draws = self.noise_values = self.samples = 0
        self._random_samples = 0

    @classmethod
    def secure(cls, label: tuple = ()) -> "DPRandomness":
        """A source keyed with 256 bits from the operating system: the only kind fit for a release. ``label``
        names the session for audits (it does not enter the key)."""
        return cls(os.urandom(_KEY_BYTES), SECURE, label)

    @classmethod
    def reproducible(cls, seed: int, *stream: object, label: tuple | None = None) -> "DPRandomness":
        """A source keyed from ``seed`` and a stream name (e.g. hospital, round, task): the same arguments
        give the same draws. NOT fit for a release: anyone who knows the seed knows the noise. ``label``
        (default: ``stream``) names the session for audits."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        name = "\x1f".join(str(s) for s in (int(seed), *stream))
        key = hashlib.sha256(b"secure-fedkim reproducible v1\x00" + name.encode()).digest()
        return cls(key, REPRODUCIBLE, stream if label is None else label)

    # ------------------------------------------------------------------ raw draws
    @staticmethod
    def _uniforms(stream, count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``count`` uniforms in [0, 1) from ``stream``: float64 multiples of 2**-53 (the top 53 bits of 64-bit
        words), or float32 multiples of 2**-24 (the top 24 bits of 32-bit words) for ``dtype=torch.float32``."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count == 0:
            return torch.zeros(0, dtype=dtype)
        wide = dtype == torch.float64
        size = 8 if wide else 4
        buf = bytearray(size * count + 64)  # update_into wants room for a block beyond the data
        written = stream.update_into(_zeros(size * count), buf)
        if wide:
            words = torch.frombuffer(buf, dtype=torch.int64, count=written // 8)
            return ((words >> 11) & _MASK53).to(torch.float64).mul_(2.0**-53)
        words = torch.frombuffer(buf, dtype=torch.int32, count=written // 4)
        return ((words >> 8) & _MASK24).to(torch.float32).mul_(2.0**-24)

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` uniforms in [0, 1) (float64 multiples of 2**-53), from the sampling stream."""
        return self._uniforms(self._sample_stream, count)

    def _sum_of_four_normals(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """``count`` draws of N(0,1)+N(0,1)+N(0,1)+N(0,1) at ``dtype``, four independent Box-Muller values each:
        a pair (r cos t, r sin t) of independent normals from two uniforms, two pairs per coordinate."""
        u = self._uniforms(self._noise_stream, 4 * count, dtype)
        radius, angle = u[: 2 * count], u[2 * count :]
        radius.neg_().log1p_().mul_(-2.0).sqrt_()  # sqrt(-2 log(1 - u)), 1 - u in (0, 1]: finite
        angle.mul_(_TWO_PI)
        pair_sums = torch.cos(angle).add_(torch.sin(angle)).mul_(radius)  # r cos t + r sin t, per pair
        return pair_sums[:count].add_(pair_sums[count:])

    # ------------------------------------------------------------------ what DP-SGD uses
    def gaussian(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """``N(0, std^2)`` noise of ``like``'s shape, dtype and device: the sum of four draws, halved."""
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        precision = torch.float32 if like.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
        noise = self._sum_of_four_normals(like.numel(), precision).mul_(0.5 * std).to(dtype=like.dtype)
        self._noise_hash.update(noise.numpy().tobytes())
        self.noise_draws += 1
        self.noise_values += like.numel()
        return noise.to(device=like.device).view(like.shape)

    def poisson(self, n: int, sample_rate: float) -> torch.Tensor:
        """Indices (ascending) of the units included in one Poisson sample: each of ``n`` independently with
        probability ``sample_rate``."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        chosen = (self.uniform(n) < sample_rate).nonzero().squeeze(1)
        self.record_sample(n, sample_rate, chosen)
        return chosen

    def record_sample(self, n: int, sample_rate: float, chosen: torch.Tensor) -> None:
        """Count a Poisson sample of ``n`` units and add it to the sampling fingerprint."""
        self._sample_hash.update(np.int64(n).tobytes() + chosen.numpy().astype(np.int64).tobytes() + b"|")
        self.samples += 1
        self._random_samples += sample_rate < 1

    # ------------------------------------------------------------------ evidence
    def noise_fingerprint(self) -> Optional[str]:
        """SHA-256 (hex) of every noise vector drawn so far, in order; None if none was drawn."""
        return self._noise_hash.hexdigest() if self.noise_draws else None

    def sampling_fingerprint(self) -> Optional[str]:
        """SHA-256 (hex) of every Poisson sample drawn so far; None if none was random (sample rate 1)."""
        return self._sample_hash.hexdigest() if self._random_samples else None


class PoissonLoader:
    """Record-level Poisson sampling (Opacus's ``DPDataLoader``, drawn from a :class:`DPRandomness`).

    Each of the dataset's ``n`` records is in a step's batch independently with probability
    ``sample_rate``; one pass is ``steps`` steps; an empty draw yields zero-length tensors (a step
    without data). Opacus's ``make_private`` reads ``len(loader)``, ``loader.dataset`` and
    ``loader.sample_rate`` from it as from its own loader.
    """

    def __init__(self, dataset, sample_rate: float, steps: int, randomness: DPRandomness, *,
                 collate_fn: Optional[Callable] = None):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: there is no record to sample")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.dataset, self.sample_rate, self._steps = dataset, float(sample_rate), steps
        self.randomness = randomness
        self.collate_fn = collate_fn or default_collate

    @classmethod
    def like(cls, data_loader, randomness: DPRandomness) -> "PoissonLoader":
        """The Poisson loader Opacus would make from ``data_loader``: rate ``1/len(data_loader)``, as many steps."""
        steps = len(data_loader)
        return cls(data_loader.dataset, 1.0 / steps, steps, randomness, collate_fn=data_loader.collate_fn)

    def __len__(self) -> int:
        return self._steps

    def __iter__(self):
        for _ in range(self._steps):
            chosen = self.randomness.poisson(len(self.dataset), self.sample_rate)
            if OBSERVER is not None:
                OBSERVER.sample(self.randomness, len(self.dataset), self.sample_rate, chosen)
            yield fetch(self.dataset, chosen, self.collate_fn)


def fetch(dataset, records: torch.Tensor, collate_fn: Callable):
    """The batch of ``dataset`` at ``records`` (zero-length tensors of the right shapes if none)."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[records] for t in dataset.tensors)
    if len(records):
        return collate_fn([dataset[int(i)] for i in records])
    return type(one := collate_fn([dataset[0]]))(t[:0] for t in one)


class SourcedNoise:
    """Mixin for Opacus optimizers: the Gaussian noise of every step comes from ``self.randomness`` (the
    session's :class:`DPRandomness`), never from a torch generator. ``privacy.fast_dp`` mixes it into
    each optimizer it makes (fused, Opacus's ``hooks`` and ghost, patient-level) and sets ``randomness``."""

    randomness: Optional[DPRandomness] = None

    def _draw_noise(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """One ``N(0, std^2)`` draw per coordinate of ``like``, from the session's DPRandomness."""
        if self.randomness is None:
            raise RuntimeError("this DP optimizer has no DPRandomness to draw its noise from (set .randomness)")
        return self.randomness.gaussian(std, like)

    def add_noise(self) -> None:
        """Opacus's per-parameter noise step (``DPOptimizer.add_noise``) with the session's noise."""
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self._draw_noise(std, p.summed_grad) if std > 0 else torch.zeros_like(p.summed_grad)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
        if OBSERVER is not None:
            OBSERVER.noise(self.randomness, torch.cat([(p.grad - p.summed_grad.view_as(p)).flatten() for p in self.params]), std)
