"""privacy.randomness: the one source of every DP draw, its distribution, and that DP code never touches a global RNG.

The Gaussian sampler is checked against independent implementations (scipy's normal CDF and NumPy's own
ziggurat sampler), the Poisson inclusion rate against the binomial, and the hospital's real round (the lean,
Opacus hooks and patient-level paths) against torch's and NumPy's global RNG: their states must be untouched
and a draw without a generator raises inside the round.
"""

import hashlib
import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from privacy.dp import session_randomness
from privacy.ledger import DP_ROUND, PrivacyLedger
from privacy.randomness import _CHUNK, REPRODUCIBLE, SECURE, DPRandomness, PoissonLoader
from secure_fedkim.hospital.client_app import hospital_dp
from secure_fedkim.config import parse_config
from secure_fedkim.hospital.local_training import local_round, new_client_model
from secure_fedkim.plan import build_plan

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


# ---------------------------------------------------------------- the Gaussian sampler
@pytest.fixture(scope="module", params=[torch.float64, torch.float32])
def draws(request):
    """400,000 draws at each precision the sampler has (float32 gradients get float32 Box-Muller draws)."""
    r = DPRandomness.reproducible(11, "distribution", str(request.param))
    noise = torch.cat([r.gaussian(1.0, torch.zeros(100_000, dtype=request.param)) for _ in range(4)])
    assert noise.dtype == request.param
    return noise.double().numpy()


def test_gaussian_moments(draws):
    n = len(draws)
    assert abs(draws.mean()) < 5 / math.sqrt(n)  # standard error 1/sqrt(n)
    assert abs(draws.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(draws)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(draws)) < 5 * math.sqrt(24 / n)  # excess kurtosis 0


def test_gaussian_matches_the_normal_cdf_and_numpy_sampler(draws):
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    independent = np.random.default_rng(5).standard_normal(len(draws))  # NumPy's ziggurat: another algorithm
    assert stats.ks_2samp(draws, independent).pvalue > 1e-3


@pytest.mark.parametrize("k", [2.0, 3.0, 4.0])
def test_gaussian_tails(draws, k):
    n, p = len(draws), 2 * stats.norm.sf(k)
    hits = int((np.abs(draws) > k).sum())
    lo, hi = stats.binom.ppf([1e-4, 1 - 1e-4], n, p)
    assert lo <= hits <= hi


def test_gaussian_scale_dtype_and_shape():
    like = torch.zeros(3, 4, 5, dtype=torch.float32)
    noise = DPRandomness.secure().gaussian(2.5, like)
    assert noise.shape == like.shape and noise.dtype == torch.float32
    big = DPRandomness.secure().gaussian(2.5, torch.zeros(200_000, dtype=torch.float64))
    assert big.std().item() == pytest.approx(2.5, rel=0.01)
    with pytest.raises(ValueError, match="std must be a finite number"):
        DPRandomness.secure().gaussian(float("nan"), like)


def _reference_noise(key: bytes, sizes: tuple, std: float, bits: int) -> list:
    """The sampler's construction written out independently, in float64 from the raw ChaCha20 keystream of the
    noise stream, for draws of ``sizes`` coordinates one after the other. Per chunk of c coordinates of a draw,
    4c words (32-bit for 24-bit uniforms, 64-bit for 53-bit ones), the top ``bits`` bits of each a uniform
    u = k / 2**bits; pair j = r (cos t + sin t) with r = sqrt(-2 log(1 - u_j)) and t = 2 pi u_(2c + j);
    coordinate i = std (pair i + pair c + i) / 2."""
    word = np.uint32 if bits == 24 else np.uint64
    size = np.dtype(word).itemsize
    stream = Cipher(algorithms.ChaCha20(key, bytes(15) + b"\x01"), mode=None).encryptor()
    draws = []
    for count in sizes:
        out = []
        for start in range(0, count, _CHUNK):
            c = min(_CHUNK, count - start)
            k = np.frombuffer(stream.update(bytes(4 * c * size)), dtype=word) >> np.uint64(8 * size - bits)
            u = k.astype(np.float64) / 2.0**bits
            r, t = np.sqrt(-2 * np.log1p(-u[: 2 * c])), 2 * np.pi * u[2 * c :]
            pair = r * np.cos(t) + r * np.sin(t)
            out.append(std * (pair[:c] + pair[c:]) / 2)
        draws.append(np.concatenate(out))
    return draws


@pytest.mark.parametrize("dtype,bits,tol", [(torch.float32, 24, 1e-5), (torch.float64, 53, 1e-13)])
def test_gaussian_is_the_sum_of_four_box_muller_draws_at_the_gradients_precision(dtype, bits, tol):
    """Each coordinate is std/2 times two Box-Muller pairs (r cos t + r sin t), on 24-bit uniforms computed in
    float32 for float32 gradients and 53-bit ones in float64 for float64 gradients, from the noise stream in order:
    the sampler against an independent float64 implementation, over several chunks and three draws."""
    key = bytes(range(32))
    r = DPRandomness(key, REPRODUCIBLE)
    sizes = (2 * _CHUNK + 77, 5, 1)
    drawn = [r.gaussian(1.5, torch.zeros(n, dtype=dtype)) for n in sizes]
    for got, expected in zip(drawn, _reference_noise(key, sizes, 1.5, bits)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=tol * 1.5)


def test_gaussian_coordinates_chunks_and_draws_are_uncorrelated():
    r = DPRandomness.reproducible(5, "independence")
    n = 4 * _CHUNK + 123
    a = r.gaussian(1.0, torch.zeros(n)).double().numpy()
    b = r.gaussian(1.0, torch.zeros(n)).double().numpy()
    for lag in (1, 2, _CHUNK // 2, _CHUNK, _CHUNK + 1, 2 * _CHUNK):  # within and across the sampler's chunks
        assert abs(np.corrcoef(a[:-lag], a[lag:])[0, 1]) < 5 / math.sqrt(n - lag)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)  # two draws: no reused keystream or scratch
    assert abs(np.corrcoef(a[:_CHUNK], a[_CHUNK : 2 * _CHUNK])[0, 1]) < 5 / math.sqrt(_CHUNK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_noise_fingerprint_hashes_the_noise_as_returned(dtype):
    r = DPRandomness.secure()
    drawn = [r.gaussian(0.7, torch.zeros(shape, dtype=dtype)) for shape in ((3, 4), (_CHUNK + 9,), (0,))]
    h = hashlib.sha256(b"secure-fedkim noise v1")
    for d in drawn:
        h.update(d.contiguous().view(torch.uint8).numpy().tobytes() if d.numel() else b"")
    assert r.noise_fingerprint() == h.hexdigest() and r.noise_draws == 3
    assert [tuple(d.shape) for d in drawn] == [(3, 4), (_CHUNK + 9,), (0,)] and all(d.dtype == dtype for d in drawn)


# ---------------------------------------------------------------- sampling
def test_poisson_inclusion_rate_and_uniforms():
    r = DPRandomness.reproducible(3, "poisson")
    n, q, steps = 1000, 0.03, 400
    counts = [len(r.poisson(n, q)) for _ in range(steps)]
    total = sum(counts)
    lo, hi = stats.binom.ppf([1e-4, 1 - 1e-4], n * steps, q)
    assert lo <= total <= hi
    sample = r.poisson(n, 0.5)
    assert bool((sample[1:] > sample[:-1]).all())  # ascending, no repeats
    u = r.uniform(50_000).numpy()
    assert u.min() >= 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    assert len(r.poisson(n, 1.0)) == n


@pytest.mark.parametrize("q", [1e-9, 0.03, 1 / 3, 0.5, 1 - 2**-53, 1.0])
def test_poisson_includes_exactly_the_units_whose_uniform_is_below_the_rate(q):
    """poisson compares the keystream words with an integer threshold: the same units as uniform(n) < q."""
    a, b = DPRandomness.reproducible(9, "threshold"), DPRandomness.reproducible(9, "threshold")
    for n in (1, 1000, 4097):
        assert a.poisson(n, q).equal((b.uniform(n) < q).nonzero().squeeze(1))
    edge = DPRandomness(bytes(32), REPRODUCIBLE)  # a uniform exactly at the rate is out, one ulp below is in
    u = edge.uniform(64)
    again = DPRandomness(bytes(32), REPRODUCIBLE)
    assert again.poisson(64, float(u[7])).equal((u < u[7]).nonzero().squeeze(1))


def test_poisson_loader_yields_its_steps_from_the_source():
    ds = torch.utils.data.TensorDataset(torch.arange(40.0).view(-1, 1), torch.zeros(40))
    loader = PoissonLoader(ds, 0.25, 4, DPRandomness.reproducible(1, "loader"))
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and loader.sample_rate == 0.25
    again = list(PoissonLoader(ds, 0.25, 4, DPRandomness.reproducible(1, "loader")))
    assert all(a[0].equal(b[0]) for a, b in zip(batches, again))  # reproducible: same seed, same batches
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonLoader(ds, 0.0, 4, DPRandomness.secure())


# ---------------------------------------------------------------- keys and fingerprints
def test_secure_sources_differ_and_reproducible_ones_repeat_per_stream():
    like = torch.zeros(64)
    assert not DPRandomness.secure().gaussian(1.0, like).equal(DPRandomness.secure().gaussian(1.0, like))
    a, b = DPRandomness.reproducible(0, "h", 1), DPRandomness.reproducible(0, "h", 1)
    assert a.gaussian(1.0, like).equal(b.gaussian(1.0, like)) and a.noise_fingerprint() == b.noise_fingerprint()
    c = DPRandomness.reproducible(0, "h", 2)
    c.gaussian(1.0, like)
    assert c.noise_fingerprint() != a.noise_fingerprint()
    assert (DPRandomness.secure().kind, a.kind) == (SECURE, REPRODUCIBLE)


def test_fingerprints_say_nothing_when_nothing_random_was_drawn():
    r = DPRandomness.secure()
    assert r.noise_fingerprint() is None and r.sampling_fingerprint() is None
    r.poisson(10, 1.0)  # every unit, every time: nothing random
    assert r.sampling_fingerprint() is None
    r.poisson(10, 0.5)
    assert r.sampling_fingerprint() is not None


def test_session_randomness_follows_the_profile():
    from privacy.dp import PrivacyProfile

    assert session_randomness(PrivacyProfile(target_epsilon=1.0), 0, "r", "h", 1, "t").kind == SECURE
    off = PrivacyProfile(target_epsilon=1.0, secure_mode=False)
    x, y = (session_randomness(off, 0, "r", "h", 1, "t").gaussian(1.0, torch.zeros(8)) for _ in range(2))
    assert x.equal(y)


# ---------------------------------------------------------------- a hospital's DP round touches no global RNG
CFG = {
    "run": {"rounds": 2, "seed": 2},
    "federation": {"clients": ["cleveland", "hungary", "switzerland", "va_long_beach"], "min_clients": 2},
    "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2, "batch_size": 32, "local_epochs": 1},
    "privacy": {"dp": True, "profile": {"target_epsilon": 3.0}},
    "baseline": {"single_hospital": False},
}
_DRAWS = ("normal", "rand", "randn", "randint", "randperm", "bernoulli", "multinomial", "rand_like", "randn_like")


def _refuse_global_draws(monkeypatch):
    """torch's sampling functions raise when called without a generator (they would use the global RNG)."""
    for name in _DRAWS:
        original = getattr(torch, name)

        def guarded(*args, _original=original, _name=name, **kwargs):
            if kwargs.get("generator") is None:
                raise AssertionError(f"torch.{_name} drew from torch's global RNG inside DP code")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, guarded)


@pytest.mark.parametrize("mode,unit", [("lean", "record"), ("hooks", "record"), ("lean", "patient"), ("hooks", "patient")])
def test_a_dp_round_draws_nothing_from_a_global_rng(tmp_path, monkeypatch, mode, unit):
    d = {**CFG, "privacy": {**CFG["privacy"], "unit": unit}}
    cfg = parse_config(d)
    plans = build_plan(cfg)
    model = new_client_model(cfg, plans)  # resets torch's global RNG to the run seed, as every round does
    dp = hospital_dp(cfg, plans, "cleveland", tmp_path, "r1")
    dp.grad_sample_mode = mode
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    _refuse_global_draws(monkeypatch)
    stats_ = local_round(model, plans, "cleveland", cfg, 1, dp=dp)
    monkeypatch.undo()
    assert stats_["heart_disease"]["steps"] > 0
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    entry = PrivacyLedger(tmp_path / "ledger.jsonl").events(DP_ROUND)[-1]
    assert entry["randomness"] == SECURE and len(entry["noise_fingerprint"]) == 64
    assert entry["units"] == (dp.n_patients if unit == "patient" else dp.n_records)
    assert dp.last_grad_sample_mode == mode


def test_rounds_tasks_and_hospitals_record_distinct_fingerprints(tmp_path):
    cfg = parse_config(CFG)
    plans = build_plan(cfg)
    prints = []
    for client in ("cleveland", "hungary"):
        for r in (1, 2):
            dp = hospital_dp(cfg, plans, client, tmp_path / client, "r1")
            local_round(new_client_model(cfg, plans), plans, client, cfg, r, dp=dp)
        prints += [(e["noise_fingerprint"], e["sampling_fingerprint"])
                   for e in PrivacyLedger(tmp_path / client / "ledger.jsonl").events(DP_ROUND)]
    assert len(prints) == 4
    assert len({n for n, _ in prints}) == 4 and len({s for _, s in prints}) == 4


def test_a_reproducible_run_is_recorded_as_such_and_repeats(tmp_path):
    d = {**CFG, "privacy": {**CFG["privacy"], "profile": {"target_epsilon": 3.0, "secure_mode": False}}}
    cfg = parse_config(d)
    plans = build_plan(cfg)
    prints = []
    for home in ("a", "b"):
        dp = hospital_dp(cfg, plans, "cleveland", tmp_path / home, "r1")
        local_round(new_client_model(cfg, plans), plans, "cleveland", cfg, 1, dp=dp)
        (entry,) = PrivacyLedger(tmp_path / home / "ledger.jsonl").events(DP_ROUND)
        prints.append(entry["noise_fingerprint"])
        assert entry["randomness"] == REPRODUCIBLE
    assert prints[0] == prints[1]  # same seed and session name: the same noise (so never for a release)
    plan = PrivacyLedger(tmp_path / "a" / "ledger.jsonl").events("dp_plan")[0]
    assert plan["randomness"] == REPRODUCIBLE and plan["adjacency"].startswith("add/remove one record")
