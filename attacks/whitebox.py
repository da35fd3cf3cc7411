"""White-box gradient-canary audit of the real DP-SGD step, observed at every step (issue #15, item 1).

Threat model: ``"white-box every step"``: the auditor sees each step's noisy summed gradient (what a
server that received every step's update, or a hospital's own auditor, sees) and knows the model, the
DP plan and its own canaries. Procedure (Dirac gradient canaries: Nasr et al. 2023; one-run statistics:
Mahloujifar, Melis and Chaudhuri 2025, and Steinke, Nasr and Jagielski 2023):

1. Pick ``m`` coordinates of the model that the real gradients barely touch (the smallest squared batch
   gradients in a non-private pilot pass over the shard), one canary per coordinate. Canary k's
   per-sample gradient is ``canary_norm * C`` on its coordinate and 0 elsewhere; clipped, it adds C.
2. Include each canary in the dataset with probability 1/2. At every step each included canary joins the
   batch with the Poisson loader's own sample rate q, and its gradient enters the optimizer's clipping,
   sum and noise as a record's would (``privacy.fast_dp.add_canary_rows``: the lean fused step, or
   Opacus's ``p.grad_sample``). Training is :class:`privacy.dp.HospitalDP`'s ``make_private`` with the
   hospital's noise multiplier, clip norm and Poisson sampling.
3. Score canary k by the log-likelihood ratio of its coordinate's observed sums ``y_t`` under the
   claimed mechanism (Poisson-subsampled Gaussian, noise ``s = sigma C``):
   ``sum_t log(1 - q + q exp((C y_t - C^2/2) / s^2))``, the optimal test statistic for one canary.
4. Report (a) two one-run lower bounds on epsilon from the same guesses (:func:`one_run_audit`): two tests
   fixed before the scores are seen, the larger bound holding at ``confidence`` by the union bound: the
   planned test (:func:`plan_one_run`: the side, IN guesses for the k top scores only or also OUT for
   the k bottom ones, and the k that do best for the headline bound on simulated runs of the mechanism the
   ledger claims; error share :data:`PLAN_SHARE`), and the all-canaries test (top m/2 IN, bottom m/2 OUT:
   what a grossly broken mechanism shows). It replaced the best of a grid of k without correction (a max
   over 40 tests, each at 95%, is not a 95% bound). The headline, ``eps_lb_one_run``, is the f-DP one-run
   bound (Mahloujifar, Melis and Chaudhuri 2025, :func:`fdp_one_run_bound`): the largest epsilon whose
   Gaussian mechanism at (epsilon, delta) the guesses refute. It assumes a Gaussian-shaped trade-off curve,
   which DP-SGD over many steps has (the CLT); the Poisson-subsampled Gaussian whose accountant's epsilon is
   matched at a small delta is more private in the bulk of the curve than that Gaussian, so an honest run
   is not refuted. Beside it, ``eps_lb_one_run_steinke``: Steinke, Nasr and Jagielski's (epsilon,
   delta)-DP bound (Theorem 3), valid for any mechanism but looser (its 2 m delta term caps it: with every
   guess correct, at level 0.05 and delta 1e-5, 8.2 at 20,000 canaries where the f-DP bound reaches 17.2).
   ``max_certifiable_epsilon``: the larger f-DP bound of the two tests with every guess correct
   (``max_certifiable_epsilon_steinke``: Steinke's). Measured on the bench (heart disease, 20,000 canaries,
   70 steps, q 1/7) at claimed epsilon 4: see ``bench/bench_audit_power.py``. And (b) a Gaussian-DP fit (Nasr et al.
   2023): ``mu = (mean_in - mean_out) / sd_out`` of the scores with a normal-approximation interval,
   and the epsilon a mu-GDP mechanism has at delta. Beside them: the accountant's epsilon and CLT GDP mu
   for the audited steps as the ledger records them, the run's whole ledger epsilon, and
   ``claimed_score_mu``: the mu this score has in expectation if the mechanism is exactly what the ledger
   claims (sigma, its sample rate, its steps; numerical integration). The GDP interval is checked against
   that (within :data:`MU_TOLERANCE`, 10%) rather than by converting it to epsilon: the fit is a Gaussian
   approximation, and ``gdp_epsilon(mu)`` of an honest run's fit is within a few percent of the
   accountant's epsilon (at epsilon 1, sigma 4.7, q 1/7, 70 steps: 0.255 expected, CLT 0.254), so a plain
   epsilon comparison would flag honest runs about as often as its confidence level allows.
5. Checks only an every-step observer can make: steps observed <= steps the ledger records; the observed
   Poisson rate (records per step / n) not above the ledger's (more than 5 standard errors); the noise
   independent across steps (mean correlation of consecutive steps' sums over the canary coordinates
   <= 0.5: a reused noise draw gives about 1, independent draws about 0).

Status: ``inconsistent`` when the f-DP one-run bound exceeds the accountant's epsilon for the audited steps,
the GDP interval's lower end exceeds the claimed mechanism's mu by more than 10%, or a check fails;
``inconclusive`` when that epsilon is above ``max_certifiable_epsilon`` (f-DP) and nothing failed; else
``consistent``. Steinke et al.'s bound is reported, not decided on: on the same guesses it is below the f-DP
bound (in every case ``tests/test_attacks_whitebox.py`` checks), so it would flag nothing more.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader

from attacks._runs import run_plan, task_model_factory
from attacks.dp_audit import _one_run_p_value
from privacy.accounting import Step, epsilon, gdp_mu
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.fast_dp import add_canary_rows
from privacy.ledger import DP_ROUND, PrivacyLedger
from privacy.plan import DPPlan
from privacy.randomness import DPRandomness
from secure_fedkim.hospital.training import as_tensors

__all__ = [
    "THREAT_MODEL",
    "WhiteboxSection",
    "CanaryObservation",
    "pick_coordinates",
    "replay_with_canaries",
    "replay_randomness",
    "canary_scores",
    "step_llr",
    "plan_one_run",
    "one_run_audit",
    "fdp_one_run_bound",
    "fdp_one_run_mu",
    "gdp_fit",
    "claimed_score_mu",
    "gdp_epsilon",
    "whitebox_entry",
    "whitebox_for_run",
]

THREAT_MODEL = "white-box every step"
MU_CAP = 1e6  # stands for "unbounded" (scores perfectly separated with no spread) in JSON
CORRELATION_LIMIT = 0.5
MU_TOLERANCE = 0.10
RATE_Z_LIMIT = 5.0
PLAN_MAX_K = 4000  # the planned test's largest k (honest runs' best k is a few hundred; all m/2: the second test)
PLAN_SHARE = 0.8  # share of the one-run test's error probability given to the planned test (the rest: all canaries)
ONE_RUN_METHOD = "f-DP one run, Gaussian trade-off (Mahloujifar, Melis and Chaudhuri 2025)"


class WhiteboxSection(BaseModel):
    """Options of the white-box audits (``audit.yaml``'s ``whitebox:`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    canaries: int = Field(20_000, ge=100)  # gradient canaries per hospital and task (one per coordinate)
    canary_norm: float = Field(2.0, gt=0.0)  # canary gradient norm in units of C (clipping brings it to C)
    grad_sample_mode: Literal["lean", "hooks"] = "lean"  # the path audited: the fused lean step or Opacus's
    tasks: list[str] | None = None  # None: every audited task
    hospitals: list[str] | None = None  # None: every audited hospital
    mechanism: bool = True  # also the per-step mechanism audit (attacks.mechanism), once per hospital
    mechanism_trials: int = Field(50_000, ge=1000)


@dataclass
class CanaryObservation:
    """What the white-box auditor saw in one replayed training."""

    coords: np.ndarray  # [m] flat coordinate of each canary
    included: np.ndarray  # [m] bool: canary in the dataset
    updates: np.ndarray  # [T, m] noisy summed gradient at the canary coordinates, each optimizer step
    batch_sizes: np.ndarray  # [T] real records in each step's batch
    n_records: int
    sample_rate: float  # the Poisson loader's rate
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str


def _flat_grads(params: list[torch.Tensor], which: str = "grad") -> torch.Tensor:
    return torch.cat([getattr(p, which).reshape(-1) for p in params])


def pick_coordinates(model: nn.Module, x: np.ndarray, y: np.ndarray, m: int, *, batch_size: int, seed: int) -> np.ndarray:
    """The ``m`` flat coordinates (trainable parameters in order) with the smallest summed squared batch
    gradient over one non-private pass of (x, y) (ties in random order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if m > total:
        raise ValueError(f"canaries: {m} canaries need {m} coordinates; this model has {total} trainable parameters")
    energy = torch.zeros(total, dtype=torch.float64)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for xb, yb in DataLoader(as_tensors(x, y), batch_size=batch_size):
        model.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        energy += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double().square()
    model.zero_grad(set_to_none=True)
    tie = np.random.default_rng(seed).random(total)
    return np.lexsort((tie, energy.numpy()))[:m]


def replay_with_canaries(
    make_model: Callable[[int], nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    dp: HospitalDP,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    canaries: int,
    canary_norm: float = 2.0,
    grad_sample_mode: str = "lean",
    task: str | None = None,
    record: bool = True,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> CanaryObservation:
    """Train ``make_model(seed)`` on (x, y) through ``dp.make_private`` as ``secure_fedkim.hospital.training.train_task``
    does (Adam, BCE, Poisson batches), with gradient canaries, and observe every step's noisy sum.

    ``record``: write the steps to ``dp``'s ledger afterwards (``record_round``), as a hospital does.
    ``seed``: the model, the canary coordinates and draw, the Poisson batches and the noise (``randomness=`` of
    ``make_private``: :func:`replay_randomness`, reproducible and so never a release's) and torch's global RNG
    inside the replay (forked, so the caller's is untouched): the same seed gives the same observation.
    ``groups`` (one patient id per record; ``dp``'s unit ``"patient"``): patient-level DP-SGD as the hospital ran it
    (patients sampled, each patient's summed gradient clipped); each canary is then a patient of one record.
    """
    with torch.random.fork_rng(devices=[]):  # nothing below draws from (or disturbs) torch's global RNG state
        torch.manual_seed(seed)
        return _replay(make_model, x, y, dp, epochs=epochs, batch_size=batch_size, lr=lr, canaries=canaries,
                       canary_norm=canary_norm, grad_sample_mode=grad_sample_mode, task=task, record=record, seed=seed,
                       groups=groups)


def replay_randomness(seed: int, stream: int) -> DPRandomness:
    """The DP randomness of an audit replay (Poisson samples and noise), reproducible from the audit's ``seed``
    (``stream`` separates uses), so that the same seed gives the same noise and so the same audit numbers."""
    return DPRandomness.reproducible(seed, "audit replay", stream)


def _replay(make_model, x, y, dp, *, epochs, batch_size, lr, canaries, canary_norm, grad_sample_mode, task, record,
            seed, groups=None) -> CanaryObservation:
    rng = np.random.default_rng(seed)
    model = make_model(seed)
    coords = pick_coordinates(model, x, y, canaries, batch_size=min(batch_size, len(x)), seed=seed)
    included = rng.random(canaries) < 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    loader = DataLoader(as_tensors(x, y), batch_size=min(batch_size, len(x)), shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    loss_fn = nn.BCEWithLogitsLoss()
    patients = {} if groups is None else {"groups": groups}
    module, optimizer, loader = dp.make_private(model, optimizer, loader, criterion=loss_fn, grad_sample_mode=grad_sample_mode,
                                                randomness=replay_randomness(seed, 1), **patients)
    q = float(loader.sample_rate)
    index = torch.from_numpy(coords)
    value = canary_norm * dp.max_grad_norm
    scale = optimizer.expected_batch_size if optimizer.loss_reduction == "mean" else 1
    updates, sizes, steps = [], [], 0
    module.train()
    for _ in range(epochs):
        for xb, yb in loader:
            steps += 1
            if len(xb) == 0:  # as train_task: an empty Poisson batch takes no optimizer step
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_fn(module(xb), yb).backward()
            sampled = np.flatnonzero(included & (rng.random(canaries) < q))
            add_canary_rows(optimizer, index[sampled], torch.full((len(sampled),), value))
            optimizer.step()
            updates.append((_flat_grads(optimizer.params)[index] * scale).numpy().astype(np.float64))
            sizes.append(len(xb))
    if hasattr(module, "_close"):
        module._close()
    if record:
        dp.record_round(round=0, task=task, steps=steps, sample_rate=q)
    return CanaryObservation(
        coords=coords, included=included, updates=np.asarray(updates).reshape(len(updates), canaries),
        batch_sizes=np.asarray(sizes), n_records=len(x), sample_rate=q, noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm, grad_sample_mode=dp.last_grad_sample_mode,
    )


def step_llr(updates: np.ndarray, c: float, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Per-step log-likelihood ratios of ``updates`` ([T, m] or [m]) under the Poisson-subsampled Gaussian."""
    z = (updates * c - c * c / 2) / (noise_multiplier * c) ** 2
    q = min(sample_rate, 1.0)
    return z if q >= 1.0 else np.logaddexp(math.log1p(-q), math.log(q) + z)


def canary_scores(obs: CanaryObservation, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Per-canary log-likelihood ratio, summed over steps, of "included" vs "excluded" under the claimed
    Poisson-subsampled Gaussian (module docstring, step 3). Without noise: the plain sum of updates."""
    if noise_multiplier <= 0:
        return obs.updates.sum(axis=0)
    return step_llr(obs.updates, obs.max_grad_norm, noise_multiplier, sample_rate).sum(axis=0)


def _one_run_bound(m: int, r: int, v: int, delta: float, alpha: float, tol: float = 1e-9) -> float:
    """The largest eps at which ``v`` correct guesses of ``r`` (``m`` canaries) have a p-value below ``alpha``
    (Steinke, Nasr and Jagielski 2023, Theorem 3; ``attacks.dp_audit._one_run_p_value``); 0 if none.
    Holds for every (eps, delta)-DP mechanism, whatever the shape of its trade-off curve."""
    if r == 0 or _one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while _one_run_p_value(m, r, v, hi, delta) < alpha and hi < 64:
        lo, hi = hi, hi * 2
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _one_run_p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


_STD_NORMAL = NormalDist()


def _gaussian_rejected(m: int, r: int, v: int, mu: float, alpha: float) -> bool:
    """Whether ``v`` correct guesses of ``r`` (``m`` canaries, each in with probability 1/2) refute at level
    ``alpha`` that the mechanism is mu-GDP (trade-off curve ``G_mu(x) = Phi(Phi^-1(1 - x) - mu)``).

    Mahloujifar, Melis and Chaudhuri 2025 (arXiv 2410.22235), the guessing game's bound with the cap: suppose
    ``v`` or more guesses are correct with probability at least ``alpha``. Then the mass of "the guess on a canary is right"
    is at least ``alpha v / m`` and of "wrong" at least ``alpha (r - v) / m``. Going down one correct guess at a
    time (i = v-1, ..., 0), f-DP forces the wrong mass up to at least ``Phi(Phi^-1(right) - mu)`` (the least
    probability an event can have on the neighbouring input when it has probability ``right`` on this one, for
    ``G_mu``), and each unit added to the wrong mass adds ``i / (r - i)`` to the right mass (capped at 1). If the
    two masses end above ``r / m`` (the mass of all ``r`` guesses) the supposition is impossible: rejected.

    The walk stops when the wrong mass no longer grows (then neither mass changes again): in floating point
    that comes after some hundreds of steps, not ``v``. Both masses only grow along the walk, so stopping
    earlier could only fail to reject (conservative), never reject wrongly."""
    if r <= 0 or v <= 0:
        return False
    right, wrong = alpha * v / m, alpha * (r - v) / m
    scale = math.sqrt(0.5)
    for i in range(v - 1, -1, -1):
        floor = 1.0 if right >= 1.0 else 0.5 * math.erfc((mu - _STD_NORMAL.inv_cdf(right)) * scale)  # Phi(Phi^-1(right) - mu)
        if floor <= wrong:
            break
        right = min(right + i / (r - i) * (floor - wrong), 1.0)
        wrong = floor
    return right + wrong > r / m


def fdp_one_run_mu(m: int, r: int, v: int, delta: float, alpha: float, tol: float = 1e-9) -> float:
    """The largest Gaussian-DP ``mu`` that ``v`` correct guesses of ``r`` (``m`` canaries) refute at level
    ``alpha`` (:func:`_gaussian_rejected`; rejection is monotone: a larger mu is less private, so harder to
    refute), to ``tol``; 0 when not even the Gaussian with epsilon 0 at ``delta`` (``mu = 2 Phi^-1((1 + delta)/2)``)
    is refuted."""
    mu0 = 2.0 * _STD_NORMAL.inv_cdf((1.0 + delta) / 2.0)
    if not _gaussian_rejected(m, r, v, mu0, alpha):
        return 0.0
    lo, hi = mu0, max(1.0, 2.0 * mu0)
    while _gaussian_rejected(m, r, v, hi, alpha) and hi < 1e3:
        lo, hi = hi, hi * 2
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _gaussian_rejected(m, r, v, mid, alpha) else (lo, mid)
    return lo


def fdp_one_run_bound(m: int, r: int, v: int, delta: float, alpha: float, tol: float = 1e-9) -> float:
    """The f-DP one-run lower bound on epsilon (Mahloujifar, Melis and Chaudhuri 2025): the largest epsilon such
    that the Gaussian mechanism with that (epsilon, ``delta``) is refuted at level ``alpha`` by ``v`` correct
    guesses of ``r`` (``m`` canaries); 0 if none.

    Computed in mu: :func:`fdp_one_run_mu` is the largest refuted mu, and ``gdp_epsilon(mu, delta)`` (Dong, Roth
    and Su's exact (epsilon, delta) curve of mu-GDP, increasing in mu) its epsilon; this equals inverting
    :func:`gdp_epsilon` for each epsilon tried, without the inner root-finding.

    The Gaussian-DP assumption: this is a lower bound on epsilon only for mechanisms whose trade-off curve is
    Gaussian-shaped, i.e. at least that of the Gaussian with their (epsilon, delta) where the test looks (false
    positive rates around ``alpha``, the bulk of the curve). DP-SGD over many steps is close to Gaussian (the
    central limit theorem of Dong, Roth and Su), and the Gaussian matched to a Poisson-subsampled Gaussian's
    accountant epsilon at a small delta is less private in the bulk than the mechanism itself (bench, epsilon 4:
    the matched Gaussian has mu 0.92, the CLT mu of the 70 steps is 0.83), which is why an honest run is not
    refuted. A mechanism of another shape (say randomised response) may be refuted by this bound at an epsilon
    it meets; for a bound that holds for every (epsilon, delta)-DP mechanism see :func:`_one_run_bound`
    (Steinke et al.)."""
    mu = fdp_one_run_mu(m, r, v, delta, alpha, tol)
    return gdp_epsilon(mu, delta) if mu > 0 else 0.0


def _guesses(scores: np.ndarray, included: np.ndarray, side: str, k: int, seed: int) -> tuple[int, int]:
    """(guesses, correct) of guessing IN for the k highest scores (and, ``side == "both"``, OUT for the k lowest);
    ties ranked in random order, so a guess never depends on the canaries' input order."""
    m = len(scores)
    order = np.lexsort((np.random.default_rng(seed).random(m), -scores))
    v = int(included[order[:k]].sum())
    if side == "both":
        return 2 * k, v + int((~included[order[m - k:]]).sum())
    return k, v


def plan_one_run(history: list[Step], m: int, delta: float, confidence: float = 0.95, *, seed: int = 0,
                 budget: float = 3e7) -> dict:
    """The one-run test to run, chosen BEFORE looking at the canaries (module docstring, step 4): simulate the
    mechanism ``history`` claims (its noise multipliers, sample rates and steps) with ``m`` ideal Dirac canaries
    (each in with probability 1/2; clipped sum C at each step it is sampled, plus N(0, (sigma C)^2) noise),
    score them as :func:`canary_scores` does, and pick the guessing side (``"top"``: IN guesses for the k highest
    scores only; ``"both"``: also OUT for the k lowest) and k (geometric grid of 12 from 10 to min(m/2, :data:`PLAN_MAX_K`))
    with the largest median headline bound (f-DP, :func:`fdp_one_run_bound`) at level ``PLAN_SHARE * (1 - confidence)``
    over the simulated runs (at most 4; fewer when ``m`` x steps is above ``budget``); compared in mu to 1e-3 (a
    coarse tolerance: only the ranking matters here), ``median_bound`` is its epsilon. Depends only on the claim,
    ``m`` and ``seed``: one pre-registered test, so no multiple-testing correction is needed for the choice."""
    alpha = PLAN_SHARE * (1.0 - confidence)
    steps = sum(b.num_steps for b in history)
    ks = sorted({int(k) for k in np.geomspace(10, max(min(m // 2, PLAN_MAX_K), 10), 12)} & set(range(1, m // 2 + 1)))
    fallback = {"side": "both", "k": m // 2, "median_bound": None, "simulations": 0}
    if not ks or steps == 0 or any(b.noise_multiplier <= 0 for b in history):
        return fallback
    sims = int(max(1, min(4, budget // max(m * steps, 1))))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 15]))
    mus = {(side, k): [] for side in ("top", "both") for k in ks}
    for _ in range(sims):
        inc = rng.random(m) < 0.5
        score = np.zeros(m)
        for b in history:
            for _ in range(b.num_steps):
                y = b.noise_multiplier * rng.standard_normal(m) + (inc & (rng.random(m) < b.sample_rate))
                score += step_llr(y, 1.0, b.noise_multiplier, b.sample_rate)
        for side, k in mus:
            r, v = _guesses(score, inc, side, k, seed)
            mus[(side, k)].append(fdp_one_run_mu(m, r, v, delta, alpha, tol=1e-3))
    (side, k), got = max(mus.items(), key=lambda kv: (float(np.median(kv[1])), kv[0][0] == "top"))
    mu = float(np.median(got))
    return {"side": side, "k": int(k), "median_bound": gdp_epsilon(mu, delta) if mu > 0 else 0.0, "simulations": sims}


def one_run_audit(scores, included, history: list[Step], delta: float, confidence: float = 0.95, *,
                  seed: int = 0) -> dict:
    """The white-box one-run lower bounds (module docstring, step 4): the planned test (:func:`plan_one_run`) at
    level ``PLAN_SHARE * (1 - confidence)`` and the all-canaries test (IN for the top m/2, OUT for the bottom
    m/2: the most a grossly broken mechanism can show) at the rest; the larger bound holds with probability
    ``confidence`` (union bound). Both bounds on the same guesses at the same levels:

    * ``eps_lb`` (the headline): the f-DP bound (:func:`fdp_one_run_bound`, Mahloujifar et al. 2025), valid for
      Gaussian-shaped trade-off curves; ``mu_lb`` its Gaussian-DP mu; ``guesses``, ``correct``, ``test``: of the
      test that gave it;
    * ``eps_lb_steinke``: the (epsilon, delta)-DP bound (:func:`_one_run_bound`, Steinke et al. 2023), valid for
      every mechanism; ``test_steinke`` the test that gave it;
    * ``max_certifiable`` / ``max_certifiable_steinke``: the larger of the two tests' bound with every guess correct;
    * ``tests``: each test's side, k, level, guesses, correct, both bounds (``eps_lb_fdp`` with ``mu_lb_fdp``,
      ``eps_lb_steinke``) and both with every guess correct (``max_certifiable_fdp``, ``max_certifiable_steinke``)."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included).astype(bool)
    m = len(s)
    alpha = 1.0 - confidence
    plan = plan_one_run(history, m, delta, confidence, seed=seed)
    tests = []
    for name, side, k, a in [("planned", plan["side"], plan["k"], PLAN_SHARE * alpha),
                             ("all", "both", m // 2, (1 - PLAN_SHARE) * alpha)]:
        r, v = _guesses(s, b, side, k, seed)
        mu = fdp_one_run_mu(m, r, v, delta, a)
        tests.append({
            "test": name, "side": side, "k": int(k), "level": a, "guesses": r, "correct": v,
            "eps_lb_fdp": gdp_epsilon(mu, delta) if mu > 0 else 0.0, "mu_lb_fdp": mu,
            "eps_lb_steinke": _one_run_bound(m, r, v, delta, a),
            "max_certifiable_fdp": fdp_one_run_bound(m, r, r, delta, a),
            "max_certifiable_steinke": _one_run_bound(m, r, r, delta, a),
        })
    best = max(tests, key=lambda t: t["eps_lb_fdp"])  # ties: the planned test (first)
    steinke = max(tests, key=lambda t: t["eps_lb_steinke"])
    return {
        "eps_lb": best["eps_lb_fdp"], "mu_lb": best["mu_lb_fdp"], "guesses": best["guesses"], "correct": best["correct"],
        "test": best["test"], "eps_lb_steinke": steinke["eps_lb_steinke"], "test_steinke": steinke["test"],
        "plan": plan, "max_certifiable": max(t["max_certifiable_fdp"] for t in tests),
        "max_certifiable_steinke": max(t["max_certifiable_steinke"] for t in tests), "tests": tests,
    }


def gdp_fit(scores, included, confidence: float = 0.95) -> tuple[float, float, float]:
    """Gaussian-DP ``mu`` of the scores (Nasr et al. 2023): ``(mean_in - mean_out) / sd_out``, with a
    normal-approximation interval, ``Var(mu) ~ sd_in^2 / (sd_out^2 n_in) + 1/n_out + mu^2 / (2 n_out)``.
    Returns ``(mu, lo, hi)``, each capped at :data:`MU_CAP`."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included).astype(bool)
    s_in, s_out = s[b], s[~b]
    if len(s_in) < 2 or len(s_out) < 2:
        raise ValueError(f"need at least 2 included and 2 excluded canaries, got {len(s_in)} and {len(s_out)}")
    sd_out = float(s_out.std(ddof=1))
    diff = float(s_in.mean() - s_out.mean())
    if sd_out <= 1e-12 * max(abs(diff), 1.0):
        mu = MU_CAP if diff > 0 else 0.0
        return mu, mu, mu
    mu = diff / sd_out
    ratio = float(s_in.std(ddof=1)) / sd_out
    se = math.sqrt(ratio**2 / len(s_in) + 1.0 / len(s_out) + mu**2 / (2 * len(s_out)))
    z = float(norm.ppf(0.5 + confidence / 2))
    cap = lambda v: float(min(max(v, 0.0), MU_CAP))  # noqa: E731
    return cap(mu), cap(mu - z * se), cap(mu + z * se)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-GDP mechanism at ``delta`` (Dong, Roth and Su 2022, Corollary 2.13):
    the root of ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta`` (0 if mu-GDP already meets delta)."""
    if mu <= 0:
        return 0.0

    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0 and hi < 1e6:
        hi *= 2
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return hi


def claimed_score_mu(history: list[Step]) -> float:
    """The mu (``(E_in - E_out) / sd_out``) of the step-3 score when the mechanism is exactly ``history``:
    per step, the log-likelihood ratio ``L(u) = log(1 - q + q exp(u/sigma - 1/(2 sigma^2)))`` of the
    standardised sum u ~ N(0, 1) (out) or the mixture with N(1/sigma, 1) (in), integrated numerically;
    steps add means and variances."""
    gap, var = 0.0, 0.0
    for b in history:
        if b.noise_multiplier <= 0:
            return math.inf
        a, q = 1.0 / b.noise_multiplier, b.sample_rate
        u = np.linspace(-14.0, 14.0 + a, 40_001)
        llr = np.log(q) + a * u - a * a / 2 if q >= 1 else np.logaddexp(math.log1p(-q), math.log(q) + a * u - a * a / 2)
        out = norm.pdf(u)
        e_out = np.trapezoid(llr * out, u)
        gap += b.num_steps * q * (np.trapezoid(llr * norm.pdf(u - a), u) - e_out)
        var += b.num_steps * (np.trapezoid(llr * llr * out, u) - e_out**2)
    return float(gap / math.sqrt(var)) if var > 0 else 0.0


def _noise_correlation(updates: np.ndarray) -> float | None:
    """Mean over consecutive step pairs of the correlation (across canary coordinates) of their sums."""
    if len(updates) < 2:
        return None
    a, b = updates[:-1], updates[1:]
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)
    return float(r.mean())


def _checks(obs: CanaryObservation, steps_ledger: int, rate_ledger: float | None) -> list[dict]:
    steps = len(obs.updates)
    out = [{
        "name": "steps observed <= steps in the ledger",
        "passed": steps <= steps_ledger,
        "detail": f"{steps} noisy updates observed, the ledger records {steps_ledger} steps",
    }]
    seen = steps * obs.n_records
    rate = float(obs.batch_sizes.sum()) / seen if seen else 0.0
    if rate_ledger is None:
        out.append({"name": "observed sample rate <= the ledger's", "passed": False,
                    "detail": "the ledger records no sample rate for these steps"})
    else:
        se = math.sqrt(max(rate_ledger * (1 - rate_ledger), 1e-12) / max(seen, 1))
        z = (rate - rate_ledger) / se
        out.append({
            "name": "observed sample rate <= the ledger's",
            "passed": bool(z <= RATE_Z_LIMIT),
            "detail": f"{rate:.4f} of the {obs.n_records} records per step observed, the ledger says {rate_ledger:.4f} "
                      f"({z:+.1f} standard errors; fails above +{RATE_Z_LIMIT:g})",
        })
    corr = _noise_correlation(obs.updates)
    out.append({
        "name": "noise independent across steps",
        "passed": corr is None or corr <= CORRELATION_LIMIT,
        "detail": "one step: nothing to compare" if corr is None else
                  f"mean correlation of consecutive steps' sums on the {len(obs.coords)} canary coordinates "
                  f"{corr:.3f} (fresh noise each step gives about 0, one draw reused about 1; fails above {CORRELATION_LIMIT})",
    })
    return out


def whitebox_entry(
    obs: CanaryObservation,
    *,
    steps_ledger: int,
    history_ledger: list[Step],
    delta: float,
    accountant: str,
    accountant_epsilon: float | None,
    hospital: str | None = None,
    task: str | None = None,
    confidence: float = 0.95,
    seconds: float | None = None,
    seed: int = 0,
) -> dict:
    """The contract's ``whitebox`` entry for one observed training (module docstring, steps 3-5).

    ``history_ledger``: the ledger's ``Step`` blocks for the audited steps (their accountant epsilon is the
    claim checked, and the one-run test is planned on them: :func:`plan_one_run`); ``accountant_epsilon``:
    the ledger's whole-run epsilon of the hospital (reported). ``seed``: the plan's simulations and tie-breaks.
    """
    t0 = time.perf_counter()
    rate_ledger = max((s.sample_rate for s in history_ledger), default=None)
    scores = canary_scores(obs, obs.noise_multiplier, obs.sample_rate)
    one = one_run_audit(scores, obs.included, history_ledger, delta, confidence, seed=seed)
    mu, mu_lo, mu_hi = gdp_fit(scores, obs.included, confidence)
    eps_mu_lo = gdp_epsilon(mu_lo, delta)
    eps_claim = epsilon(history_ledger, delta, accountant) if history_ledger else math.inf
    claim = eps_claim if math.isfinite(eps_claim) else None
    checks = _checks(obs, steps_ledger, rate_ledger)
    mu_claim = claimed_score_mu(history_ledger) if history_ledger else math.inf
    reasons = _violations(checks, one, claim, mu_lo, mu_claim, eps_mu_lo, delta)
    status, reasons = _whitebox_status(reasons, one, claim, len(scores), mu_lo, mu_hi, mu_claim)
    return {
        "threat_model": THREAT_MODEL,
        "hospital": hospital,
        "task": task,
        **_observed_fields(obs, len(scores), steps_ledger, rate_ledger),
        **_one_run_fields(one),
        "gdp_mu_estimate": mu,
        "gdp_mu_interval": [mu_lo, mu_hi],
        "gdp_epsilon_lower": eps_mu_lo,
        "accountant_gdp_mu": gdp_mu(history_ledger) if history_ledger else None,
        "claimed_score_mu": mu_claim if math.isfinite(mu_claim) else None,
        "accountant_epsilon_audited_steps": claim,
        "accountant_epsilon": accountant_epsilon,
        "delta": delta,
        "confidence": confidence,
        "max_certifiable_epsilon": one["max_certifiable"],
        "max_certifiable_epsilon_steinke": one["max_certifiable_steinke"],
        "ratio": one["eps_lb"] / claim if claim else None,
        "ratio_steinke": one["eps_lb_steinke"] / claim if claim else None,
        "checks": checks,
        "status": status,
        "reasons": reasons,
        "seconds": (seconds or 0.0) + time.perf_counter() - t0,
    }


def _violations(checks: list[dict], one: dict, claim: float | None, mu_lo: float, mu_claim: float, eps_mu_lo: float,
                delta: float) -> list[str]:
    """Why the training is inconsistent with its claim, in words: failed checks and bounds above the claim."""
    reasons = [f"check failed: {c['name']}: {c['detail']}" for c in checks if not c["passed"]]
    if claim is not None and one["eps_lb"] > claim:
        reasons.append(f"the f-DP one-run lower bound {one['eps_lb']:.3f} (Gaussian trade-off; the (eps, delta)-DP bound "
                       f"of the same guesses: {one['eps_lb_steinke']:.3f}) exceeds the accountant's epsilon {claim:.3f} "
                       f"for these steps by {one['eps_lb'] - claim:.3f}")
    if claim is not None and mu_lo > mu_claim * (1 + MU_TOLERANCE):
        reasons.append(f"the Gaussian-DP interval's lower end mu {mu_lo:.3f} (epsilon {eps_mu_lo:.3f} at delta {delta:g}) "
                       f"exceeds the mu {mu_claim:.3f} the ledger's mechanism gives these canaries by "
                       f"{mu_lo / mu_claim - 1:.0%} (tolerance {MU_TOLERANCE:.0%}; accountant's epsilon {claim:.3f})")
    return reasons


def _whitebox_status(violations: list[str], one: dict, claim: float | None, canaries: int, mu_lo: float, mu_hi: float,
                     mu_claim: float) -> tuple[str, list[str]]:
    """``(status, reasons)``: inconsistent on any violation; else inconclusive or consistent (module docstring, 5)."""
    if claim is None:
        return ("inconsistent" if violations else "inconclusive",
                violations or ["no finite accountant epsilon for these steps: nothing to check"])
    if violations:
        return "inconsistent", violations
    cert = one["max_certifiable"]
    if claim > cert:
        return "inconclusive", [
            f"the claimed epsilon {claim:.3g} is above the largest epsilon {cert:.3g} that {canaries} "
            f"gradient canaries can certify (f-DP one-run bound, every guess correct); the GDP estimate and the "
            f"per-step audit still apply"]
    return "consistent", [
        f"the f-DP one-run lower bound {one['eps_lb']:.3f} (Steinke et al.'s: {one['eps_lb_steinke']:.3f}) "
        f"is within the accountant's epsilon {claim:.3f}, the GDP "
        f"interval [{mu_lo:.3f}, {mu_hi:.3f}] within the claimed mechanism's mu {mu_claim:.3f}; every check passed"]


def _observed_fields(obs: CanaryObservation, canaries: int, steps_ledger: int, rate_ledger: float | None) -> dict:
    """What the replay observed, beside the ledger's steps and sample rate."""
    steps = len(obs.updates)
    return {
        "grad_sample_mode": obs.grad_sample_mode,
        "canaries": canaries,
        "canaries_included": int(obs.included.sum()),
        "noise_multiplier": obs.noise_multiplier,
        "max_grad_norm": obs.max_grad_norm,
        "steps_observed": steps,
        "steps_ledger": int(steps_ledger),
        "sample_rate_observed": float(obs.batch_sizes.sum()) / (steps * obs.n_records) if steps else 0.0,
        "sample_rate_loader": obs.sample_rate,
        "sample_rate_ledger": rate_ledger,
    }


def _one_run_fields(one: dict) -> dict:
    """The one-run test's figures as the entry reports them."""
    return {
        "eps_lb_one_run": one["eps_lb"],  # the headline: f-DP, Gaussian trade-off
        "eps_lb_one_run_method": ONE_RUN_METHOD,
        "one_run_mu_lb": one["mu_lb"],
        "eps_lb_one_run_steinke": one["eps_lb_steinke"],  # (eps, delta)-DP, any mechanism, same guesses
        "one_run_guesses": one["guesses"],
        "one_run_correct": one["correct"],
        "one_run_test": one["test"],
        "one_run_test_steinke": one["test_steinke"],
        "one_run_tests": one["tests"],
        "one_run_plan": one["plan"],
    }


# ---------------------------------------------------------------------------------------------- runs


def _shard(run, task: str, hospital: str) -> tuple[np.ndarray, np.ndarray]:
    plan = run.plans[task]
    idx = np.asarray(plan.split.clients.get(hospital, np.zeros(0, np.int64)), dtype=np.int64)
    data = plan.data.subset(idx)
    return data.x, data.y


def ledger_plan(run, hospital: str) -> tuple[DPPlan, list[dict], float | None] | None:
    """(this run's DP plan, its dp_round entries, whole-run epsilon) from the hospital's ledger; None without DP.

    The plan is picked as :func:`attacks.audit.ledger_epsilon` picks it: the first ``dp_plan`` of this run's id
    (:func:`attacks._runs.run_plan`). Raises ``privacy.ledger.LedgerTampered`` when the ledger does not verify."""
    path = run.ledger_path(hospital)
    if not path.is_file():
        return None
    ledger = PrivacyLedger(path)
    plan = run_plan(run, ledger)
    if plan is None or not plan.dp:
        return None
    eps = epsilon(ledger.dp_history(plan.run_id), plan.delta, plan.accountant)
    return plan, ledger.events(DP_ROUND, plan.run_id), (eps if math.isfinite(eps) else None)


def whitebox_for_run(run, hospital: str, task: str, section: WhiteboxSection | None = None, *,
                     confidence: float = 0.95, seed: int = 0) -> dict | None:
    """Replay ``hospital``'s DP training on ``task`` of a finished run with gradient canaries; the
    ``whitebox`` entry, or None when the hospital trained without DP (nothing to check).

    ``run`` is ``secure_fedkim.rundir.artifacts.load_run(run_dir)``. The replay uses the ledger's plan (noise
    multiplier, C, accountant, delta), the hospital's shard (so the Poisson loader's sample rate), and the
    config's steps: ``ceil(n / batch)`` x the task's ``local_epochs`` (``tasks.train[].local_epochs``, else
    ``client.local_epochs``) per round the ledger shows the hospital trained on the task. The claim checked
    is the accountant's epsilon of the ledger's entries for this task; ``accountant_epsilon`` is the ledger's
    whole-run epsilon.
    """
    from secure_fedkim.hospital.local_training import patients_of, task_local_epochs

    t0 = time.perf_counter()
    section = section or WhiteboxSection()
    found = ledger_plan(run, hospital)
    if found is None:
        return None
    plan, rounds, eps_run = found
    rounds = [e for e in rounds if e.get("task") == task]
    x, y = _shard(run, task, hospital)
    if not rounds or len(x) < 2:
        return None
    c = run.cfg.client
    # the run's own unit: a patient-level run is replayed patient-level (patients sampled at the ledger's rate, each
    # patient's summed gradient clipped), else its steps and sample rate cannot match the ledger's
    patient = plan.privacy_unit == "patient"
    groups = patients_of(run.plans[task].shard(hospital)) if patient else None
    units = len(np.unique(groups)) if patient else len(x)
    batches = math.ceil(units / min(c.batch_size, units))
    unit_args = {"unit": "patient"} if patient else {}
    if patient and plan.max_records_per_patient_step:
        unit_args["max_records_per_patient_step"] = plan.max_records_per_patient_step
    with tempfile.TemporaryDirectory(prefix="whitebox-ledger-") as tmp:
        dp = HospitalDP(
            PrivacyProfile(target_epsilon=1e6, delta=plan.delta, max_grad_norm=plan.max_grad_norm, accountant=plan.accountant,
                           **unit_args),
            PrivacyLedger(Path(tmp) / "replay.jsonl"), "whitebox-replay", [(1.0 / batches, batches)], 1,
            n_records=len(x), n_patients=units if patient else None, noise_multiplier=plan.noise_multiplier,
        )
        obs = replay_with_canaries(
            task_model_factory(run, task), x, y, dp, epochs=len(rounds) * task_local_epochs(run.cfg, task),
            batch_size=c.batch_size, lr=c.lr, canaries=min(section.canaries, _trainable(run, task)),
            canary_norm=section.canary_norm, grad_sample_mode=section.grad_sample_mode, record=False, seed=seed,
            groups=groups,
        )
    history = [Step(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in rounds]
    return whitebox_entry(
        obs, steps_ledger=sum(int(e["steps"]) for e in rounds), history_ledger=history, delta=plan.delta,
        accountant=plan.accountant, accountant_epsilon=eps_run, hospital=hospital, task=task,
        confidence=confidence, seconds=time.perf_counter() - t0, seed=seed,
    )


def _trainable(run, task: str) -> int:
    return sum(p.numel() for p in task_model_factory(run, task)(0).parameters() if p.requires_grad)
