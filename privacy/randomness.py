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
uniforms' resolution (|r| <= 5.8 for 24 bits, 8.6 for 53): a pair's r cos t + r sin t is at most sqrt(2) r, so a
coordinate cannot pass 8.2 sigma (12.1 in float64), a tail of probability below 1e-15 per coordinate.

Implementation: a draw is computed in chunks of 16,384 coordinates. Each chunk's keystream (16 bytes a
coordinate in float32, 32 in float64) comes from one ``update_into`` into a buffer the session keeps, and the
arithmetic runs in place on that buffer, words turned into floats of the same size, with NumPy's ufuncs: their
SIMD float32 ``log1p``, ``cos`` and ``sin`` are within 1.5 ulp of the exact values over all 2^24 inputs the
sampler gives them (measured against float64; ``sqrt`` is correctly rounded), and ran about 2.5x faster here
than torch's CPU kernels. Both Box-Muller outputs of a pair are used (r cos t + r sin t), so a coordinate costs
four uniforms, two logarithms, two square roots, two cosines and two sines. The reproducible generator repeats
its draws on one machine; NumPy picks its SIMD kernels by CPU, so another CPU may differ in the last bit. Cost,
from ``bench/bench_randomness.py`` in CPU time on a shared 2-core machine: 79-89 M Gaussians a second
(torch.normal with a Mersenne Twister: 272-292 M; this sampler before the chunked NumPy version: 45-52 M),
about 11 ns a float32 coordinate, half of it the keystream (16 bytes, ~3 ns) and the SHA-256 fingerprint (~2.2
ns); a DP local epoch of the demo's models 1.08-1.10x the Mersenne Twister's over 30 repeats (before: 1.14x),
the 38k-parameter heart-disease step 1.18-1.26x (before: 1.42x).

Evidence for auditors: each session keeps a SHA-256 of every noise vector it drew (``noise_fingerprint``)
and of every Poisson sample (``sampling_fingerprint``); the hospital writes both to its ledger with the
round. Two sessions that share a fingerprint drew the same randomness, which an honest run does with
probability ~0 (the noise has thousands of bits of entropy per step). A fingerprint reveals nothing usable:
inverting SHA-256 on a vector of that entropy is infeasible, and it is only ever compared for equality.

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import contextlib
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
GAUSSIAN = (
    "Box-Muller at the gradient's precision (float32 on 24-bit uniforms, float64 on 53-bit), sum of 4 draws / 2 "
    "(Holohan and Braghin 2021)")

_KEY_BYTES = 32
_TWO_PI = 2.0 * math.pi


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


_ZERO_BYTES = b""


def _zeros(n: int) -> memoryview:
    """A view of ``n`` zero bytes (the plaintext whose ChaCha20 encryption is the keystream); one buffer, grown to
    the largest size asked."""
    global _ZERO_BYTES
    if len(_ZERO_BYTES) < n:
        _ZERO_BYTES = bytes(max(n, 2 * len(_ZERO_BYTES)))
    return memoryview(_ZERO_BYTES)[:n]


#: Coordinates of noise computed per pass of the sampler: its scratch (the keystream, computed on in place, and
#: the pairs' cosines: 24 bytes a float32 coordinate, 48 a float64 one) and the zero plaintext stay in the CPU's
#: cache whatever the draw's size.
_CHUNK = 1 << 14


class _Precision:
    """Box-Muller at one precision: the keystream word that makes one uniform, its bits, and the float type."""

    def __init__(self, word: type, bits: int, real: type):
        self.word, self.real = np.dtype(word), np.dtype(real)
        self.bits = bits
        self.shift = 8 * self.word.itemsize - bits  # keep the word's top ``bits`` bits
        self.signed = np.dtype(f"i{self.word.itemsize}")  # the same bits, for a fast int -> float conversion
        # k -> -u = -k / 2**bits (radii) and k -> t = 2 pi k / 2**bits (angles); both as (k / 2**bits) * c would be
        self.scales = np.array([[-(2.0**-bits)], [_TWO_PI * 2.0**-bits]], dtype=real)
        self.minus_two = self.real.type(-2.0)


_FLOAT32 = _Precision(np.uint32, 24, np.float32)
_FLOAT64 = _Precision(np.uint64, 53, np.float64)


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
        self._work: dict = {}  # the sampler's scratch, per precision (_scratch)
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
    def _keystream(stream, nbytes: int, buf: np.ndarray) -> np.ndarray:
        """The next ``nbytes`` of ``stream``, written into ``buf`` (at least ``nbytes + 64`` bytes: update_into
        wants room for a block beyond the data); returns ``buf[:nbytes]``."""
        written = stream.update_into(_zeros(nbytes), buf)
        if written != nbytes:
            raise RuntimeError(f"the ChaCha20 stream gave {written} bytes, {nbytes} asked")
        return buf[:nbytes]

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` uniforms in [0, 1) (float64 multiples of 2**-53: the top 53 bits of 64-bit keystream words),
        from the sampling stream."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        words = self._keystream(self._sample_stream, 8 * count, np.empty(8 * count + 64, np.uint8)).view(np.uint64)
        np.right_shift(words, 11, out=words)
        u = words.view(np.int64).astype(np.float64)
        np.multiply(u, 2.0**-53, out=u)
        return torch.from_numpy(u)

    def _scratch(self, p: _Precision, chunk: int) -> tuple:
        """This source's scratch for ``chunk`` coordinates at precision ``p`` (made once, grown if needed): the
        keystream's buffer (update_into wants room for a block beyond the data) and the pairs' cosines."""
        have = self._work.get(p.bits)
        if have is None or len(have[1]) < 2 * chunk:
            have = self._work[p.bits] = (np.empty(4 * chunk * p.word.itemsize + 64, np.uint8), np.empty(2 * chunk, p.real))
        return have

    def _sum_of_four_normals(self, count: int, p: _Precision, out: np.ndarray) -> np.ndarray:
        """Write into ``out`` ``count`` draws of N(0,1)+N(0,1)+N(0,1)+N(0,1) at precision ``p``, four independent
        Box-Muller values each: a pair (r cos t, r sin t) of independent normals from two uniforms, two pairs per
        coordinate. Per chunk of c coordinates, 4c keystream words: the first 2c give the radii, the last 2c the
        angles; pair j is (radius j, angle j), and coordinate i sums pairs i and c + i. The arithmetic runs in
        place in the keystream's buffer (a word and its float have the same size)."""
        chunk = max(1, min(count, _CHUNK))
        buf, cosines = self._scratch(p, chunk)
        for start in range(0, count, chunk):
            c = min(chunk, count - start)
            m = 2 * c
            words = self._keystream(self._noise_stream, 2 * m * p.word.itemsize, buf).view(p.word)
            np.right_shift(words, p.shift, out=words)  # k: the top p.bits bits, uniform on [0, 2**bits)
            real = words.view(p.real)
            np.copyto(real, words.view(p.signed), casting="unsafe")  # exact (k < 2**bits), element by element
            halves = real.reshape(2, m)
            np.multiply(halves, p.scales, out=halves)  # radii: -u in (-1, 0]; angles: t = 2 pi u
            radius, angle, cos = halves[0], halves[1], cosines[:m]
            np.log1p(radius, out=radius)  # log(1 - u), finite
            np.multiply(radius, p.minus_two, out=radius)
            np.sqrt(radius, out=radius)  # r = sqrt(-2 log(1 - u))
            np.cos(angle, out=cos)
            np.sin(angle, out=angle)
            np.add(cos, angle, out=cos)
            np.multiply(cos, radius, out=cos)  # r cos t + r sin t, per pair
            np.add(cos[:c], cos[c:], out=out[start : start + c])
        return out

    # ------------------------------------------------------------------ what DP-SGD uses
    def gaussian(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """``N(0, std^2)`` noise of ``like``'s shape, dtype and device: the sum of four draws, halved."""
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        p = _FLOAT32 if like.dtype in (torch.float32, torch.float16, torch.bfloat16) else _FLOAT64
        noise = self._sum_of_four_normals(like.numel(), p, np.empty(like.numel(), p.real))
        np.multiply(noise, p.real.type(0.5 * std), out=noise)
        drawn = torch.from_numpy(noise)
        if drawn.dtype != like.dtype:  # float16 / bfloat16 gradients
            drawn = drawn.to(dtype=like.dtype)
            noise = drawn.view(torch.uint8).numpy() if len(noise) else noise[:0]
        self._noise_hash.update(noise)  # the bytes of the noise as returned
        self.noise_draws += 1
        self.noise_values += like.numel()
        if drawn.device != like.device:
            drawn = drawn.to(device=like.device)
        return drawn if like.dim() == 1 else drawn.view(like.shape)

    def poisson(self, n: int, sample_rate: float) -> torch.Tensor:
        """Indices (ascending) of the units included in one Poisson sample: each of ``n`` independently with
        probability ``sample_rate``."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        words = self._keystream(self._sample_stream, 8 * n, np.empty(8 * n + 64, np.uint8)).view(np.uint64)
        if sample_rate < 1:  # u = (w >> 11) / 2**53 < q  <=>  w >> 11 < ceil(q 2**53)  <=>  w < ceil(q 2**53) 2**11
            chosen = np.flatnonzero(words < np.uint64(math.ceil(sample_rate * 2.0**53) << 11))
        else:
            chosen = np.arange(n)
        chosen = torch.from_numpy(chosen)
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
