"""Privacy accounting for DP-SGD with Poisson subsampling.

Everything here is a thin, checked layer over two independent, well-kept libraries:

* Opacus (``opacus.accountants``): the accountants the training itself uses (``prv``, Gopi et al. 2021,
  and ``rdp``, Mironov 2017). :func:`epsilon` is the number a hospital is held to.
* Google's ``dp_accounting``: an independent implementation (PLD or RDP) used by
  :func:`independent_epsilon` to cross-check and to report an independent recomputation.

A run's privacy history is a list of :class:`Step` blocks, each a homogeneous stretch of DP-SGD steps
(same noise multiplier, same sample rate). Composition is order independent for these accountants, so
blocks with equal ``(noise_multiplier, sample_rate)`` are merged before accounting (faster, same result).

Calibration (:func:`calibrate_noise`, the one path used by every hospital's DP plan, ``secure-fedkim budget``
and ``budget --config``). Which accountant is primary:

* The accountant a hospital is **held to** stays the Opacus one it configured (PRV by default): the run's
  ledger, its budget enforcement and the report's headline epsilon are :func:`epsilon`.
* The accountant the calibration **searches with** is dp_accounting's PLD with a pessimistic
  discretisation (interval ``SEARCH_DISCRETIZATION``): it is an upper bound by construction, one
  evaluation costs about 0.1 s on the demo's heterogeneous schedule against about 1.5 s for Opacus's PRV
  (whose safe-domain RDP search and FFTs over a fine mesh are redone at every sigma), and its PLDs compose
  incrementally. For ``accountant="rdp"`` the search uses Opacus's RDP itself (cheap).
* The sigma the search finds is then **verified** with exactly the accountants the report recomputes a
  hospital's spend with: Opacus's (``epsilon(..., accountant)``, the binding one: PRV's upper bound
  sits about ``eps_error = 0.01`` above PLD) and dp_accounting's (``independent_epsilon`` with ``"pld"``
  for PRV, ``"rdp"`` for RDP, at the report's own discretisation). If either is above the target, the
  search is repeated against the target less the measured gap and verified again; only a verified sigma
  is ever returned. Today's path, a bisection evaluated by the Opacus accountant alone, stays callable as
  ``calibrate_noise(..., method="prv-bisect")`` for benches and comparisons.

Per-round epsilons (:class:`RoundComposer`) compose one more round onto the previous rounds' composition
instead of recomposing the whole prefix: with RDP by adding one round's RDP curve (Opacus's own curve,
so the values are Opacus's), otherwise with dp_accounting PLD at the report's discretisation (Opacus's
PRV cannot compose incrementally: its domain and mesh depend on the whole history).

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

__all__ = [
    "Step",
    "ACCOUNTANTS",
    "epsilon",
    "independent_epsilon",
    "gdp_mu",
    "calibrate_noise",
    "calibrate",
    "Calibration",
    "RoundComposer",
    "epsilon_after_rounds",
    "group_privacy_epsilon",
    "default_delta",
    "resolve_delta",
    "merge_history",
    "poisson_schedule",
]

#: Opacus accountants supported by :func:`epsilon` (and therefore by budgets and calibration).
ACCOUNTANTS = ("prv", "rdp")

#: Largest noise multiplier :func:`calibrate_noise` tries before declaring a target unreachable.
MAX_NOISE_MULTIPLIER = 1e4


@dataclass(frozen=True)
class Step:
    """One homogeneous block of DP-SGD steps.

    Attributes:
        noise_multiplier: sigma, the Gaussian noise std divided by the clipping norm (0 means no noise,
            which is not DP: its epsilon is infinite).
        sample_rate: q, the Poisson sampling probability of each record per step (0 < q <= 1).
        num_steps: number of optimizer steps taken with these parameters (>= 0).
    """

    noise_multiplier: float
    sample_rate: float
    num_steps: int

    def __post_init__(self) -> None:
        sigma, q, n = self.noise_multiplier, self.sample_rate, self.num_steps
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"Step.noise_multiplier must be a finite number >= 0, got {sigma!r}")
        if not (isinstance(q, (int, float)) and 0 < q <= 1):
            raise ValueError(f"Step.sample_rate must be in (0, 1], got {q!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"Step.num_steps must be an integer >= 0, got {n!r}")

    def as_opacus(self) -> tuple[float, float, int]:
        """The ``(noise_multiplier, sample_rate, num_steps)`` tuple of an Opacus 1.6 accountant history."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.num_steps))


def merge_history(history: Iterable[Step]) -> list[Step]:
    """Drop zero-step blocks and merge blocks with the same (noise_multiplier, sample_rate).

    Valid because composition of these mechanisms does not depend on their order.
    """
    totals: dict[tuple[float, float], int] = {}
    for s in history:
        if not isinstance(s, Step):
            raise TypeError(f"history items must be Step, got {type(s).__name__}")
        if s.num_steps == 0:
            continue
        key = (float(s.noise_multiplier), float(s.sample_rate))
        totals[key] = totals.get(key, 0) + s.num_steps
    return [Step(sigma, q, n) for (sigma, q), n in totals.items()]


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def epsilon(history: Sequence[Step], delta: float, accountant: str = "prv", *, cache: bool = True) -> float:
    """Epsilon spent by ``history`` at ``delta``, computed by an Opacus accountant.

    Builds ``opacus.accountants.create_accountant(accountant)`` and sets its ``history`` (Opacus 1.6
    keeps a list of ``(noise_multiplier, sample_rate, num_steps)`` tuples) from the steps.

    Args:
        history: the DP-SGD blocks to compose.
        delta: target delta, in (0, 1).
        accountant: ``"prv"`` (Opacus default; returns PRV's upper bound with ``eps_error=0.01``)
            or ``"rdp"``.

    Returns:
        epsilon; ``0.0`` for an empty history (or only zero-step blocks); ``math.inf`` when any block
        has noise multiplier 0 (clipping without noise is not DP).

    The last ``EPSILON_CACHE_SIZE`` results are kept (the function is pure): a calibration's verification
    and the plan's own epsilon of the same history, or the budget's table and its comparison, cost one
    accountant call. ``cache=False`` always calls the accountant, without the memo of Opacus's RDP terms
    (:func:`_memoise_opacus_rdp`) unless an earlier cached call installed it (the previous path, for benches).

    Raises:
        ValueError: unknown accountant, bad delta, or the accountant failed (e.g. Opacus's PRV cannot
            handle some very large epsilons: use ``"rdp"`` there).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    _check_delta(delta)
    blocks = merge_history(history)
    if not blocks:
        return 0.0
    if any(b.noise_multiplier == 0 for b in blocks):
        return math.inf
    key = tuple(b.as_opacus() for b in blocks)
    if cache:
        return _cached_epsilon(key, float(delta), accountant)
    return _opacus_epsilon(key, float(delta), accountant, memo=False)


#: how many :func:`epsilon` results are kept
EPSILON_CACHE_SIZE = 256


@lru_cache(maxsize=EPSILON_CACHE_SIZE)
def _cached_epsilon(history: tuple, delta: float, accountant: str) -> float:
    return _opacus_epsilon(history, delta, accountant)


def _memoise_opacus_rdp() -> None:
    """Keep the values of Opacus's ``_compute_rdp(q, sigma, alpha)`` (a pure function of its arguments).

    Opacus's PRV accountant sizes its domain with RDP at about 60 orders for every block, twice (the whole
    history, then each block alone), and for a sample rate like 0.5 its fractional orders run a series to
    1000 terms: a third of one PRV evaluation on the demo's schedule. Kept values make the second pass and
    every later evaluation at the same (q, sigma) (the plan's own epsilon, the report's per-round
    recomputations) skip it. Same numbers: the function is only memoised, never changed."""
    from opacus.accountants.analysis import rdp

    if not hasattr(rdp._compute_rdp, "cache_info"):
        rdp._compute_rdp = lru_cache(maxsize=1 << 16)(rdp._compute_rdp)


def _opacus_epsilon(history: tuple, delta: float, accountant: str, memo: bool = True) -> float:
    """Opacus's epsilon for a merged history of ``(noise_multiplier, sample_rate, num_steps)`` tuples."""
    from opacus.accountants import create_accountant

    if memo:
        _memoise_opacus_rdp()

    blocks = [Step(*b) for b in history]
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    try:
        with warnings.catch_warnings():
            # numpy log(0) inside PRV for q=1 and Opacus's "optimal order is the smallest alpha" are benign here
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps = float(acc.get_epsilon(delta=delta))
    except Exception as exc:  # Opacus raises assorted errors (e.g. issue #591) for extreme inputs
        raise ValueError(
            f"Opacus {accountant!r} accountant could not compute epsilon for history "
            f"{[b.as_opacus() for b in blocks]} at delta={delta}: {exc}"
        ) from exc
    if math.isnan(eps):
        raise ValueError(f"Opacus {accountant!r} accountant returned NaN for history {blocks}")
    return eps


def _dp_event(blocks: Sequence[Step]):
    import dp_accounting

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                b.sample_rate, dp_accounting.GaussianDpEvent(b.noise_multiplier)
            ),
            b.num_steps,
        )
        for b in blocks
    ]
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def independent_epsilon(history: Sequence[Step], delta: float, method: str = "pld") -> float:
    """Epsilon of ``history`` recomputed with Google's ``dp_accounting`` (independent of Opacus).

    Each block is ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``;
    blocks are composed. Neighbouring relation: add-or-remove one record (the same as Opacus).

    Args:
        method: ``"pld"`` (privacy loss distributions, ``value_discretization_interval=1e-4``; comparable
            to Opacus's PRV) or ``"rdp"`` (comparable to Opacus's RDP).

    Returns:
        epsilon (0.0 for an empty history, ``math.inf`` if a block has no noise).
    """
    if method not in ("pld", "rdp"):
        raise ValueError(f"method must be 'pld' or 'rdp', got {method!r}")
    _check_delta(delta)
    blocks = merge_history(history)
    if not blocks:
        return 0.0
    if any(b.noise_multiplier == 0 for b in blocks):
        return math.inf
    return _dp_accounting_epsilon(blocks, delta, method, PLD_DISCRETIZATION)


def _dp_accounting_epsilon(history: Sequence[Step], delta: float, method: str, interval: float) -> float:
    """dp_accounting's epsilon (PLD at discretisation ``interval``, pessimistic; or RDP) of a noisy history."""
    blocks = merge_history(history)
    if method == "pld":
        return float(_pld_of(blocks, interval).get_epsilon_for_delta(delta))
    import logging

    from dp_accounting import rdp

    absl = logging.getLogger("absl")  # dp_accounting logs every fractional order it drops; the result stays a bound
    level = absl.level
    absl.setLevel(max(level, logging.ERROR))
    try:
        acc = rdp.RdpAccountant()
        acc.compose(_dp_event(blocks))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


@lru_cache(maxsize=64)
def _gaussian_pld(noise_multiplier: float, sample_rate: float, interval: float):
    """One Poisson-subsampled Gaussian step's PLD, exactly as ``dp_accounting.pld.PLDAccountant`` builds it
    (pessimistic, add-or-remove-one). Kept: the verification, the per-round table and the next sigma's
    neighbours reuse it (building it is most of a PLD evaluation's cost; PLDs are never mutated)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(standard_deviation=noise_multiplier, value_discretization_interval=interval,
                                       sampling_prob=sample_rate)


def _pld_of(blocks: Sequence[Step], interval: float):
    """The PLD of noisy ``blocks``, composed in the order and the way ``PLDAccountant.compose`` of
    :func:`_dp_event` does (so :func:`independent_epsilon` is that accountant's number)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    total = pld.identity(value_discretization_interval=interval)
    for b in blocks:
        total = total.compose(_gaussian_pld(float(b.noise_multiplier), float(b.sample_rate), interval)
                              .self_compose(b.num_steps))
    return total


def gdp_mu(history: Sequence[Step]) -> float:
    """Gaussian-DP ``mu`` of ``history`` by the central-limit-theorem (CLT) approximation.

    Bu, Dong, Long and Su (2020), "Deep learning with Gaussian differential privacy": T steps of
    Poisson-subsampled Gaussian with rate q and noise sigma are asymptotically
    ``mu = q * sqrt(T * (exp(1/sigma^2) - 1))``-GDP. Independent blocks compose in quadrature:
    ``mu = sqrt(sum_b q_b^2 * T_b * (exp(1/sigma_b^2) - 1))``.

    This is the CLT *approximation*, not a bound: it is accurate when T is large and q small, and it can
    underestimate privacy loss otherwise (Dong, Roth, Su 2022). Report it next to, not instead of, the
    accountant's (epsilon, delta).

    Returns:
        mu (0.0 for an empty history, ``math.inf`` if a block has no noise or ``1/sigma^2`` overflows).
    """
    total = 0.0
    for b in merge_history(history):
        if b.noise_multiplier == 0:
            return math.inf
        try:
            total += b.sample_rate**2 * b.num_steps * math.expm1(1.0 / b.noise_multiplier**2)
        except OverflowError:
            return math.inf
    return math.sqrt(total)


class RoundComposer:
    """Epsilon after round 1, 2, ... of a repeated round schedule, composing only the rounds added since the
    last question (never the whole prefix again).

    ``method="rdp"`` adds one round's RDP curve per round (Opacus's own ``compute_rdp`` and
    ``get_privacy_spent`` at its default orders, so the values are Opacus's RDP accountant's); ``"pld"``
    composes one round's privacy loss distribution (dp_accounting, pessimistic, discretisation
    ``PLD_DISCRETIZATION``, the same PLDs :func:`independent_epsilon` builds) onto the previous rounds'.
    Either equals a full recomposition of the same prefix up to floating-point rounding.

    ``after(r)`` for increasing ``r``; ``then(schedule)`` composes a last, different schedule (e.g. the
    single-hospital baseline's steps) after the rounds composed so far and returns the total.
    """

    def __init__(self, noise_multiplier: float, round_schedule: Sequence[tuple[float, int]], delta: float,
                 method: str = "pld", interval: float | None = None):
        if method not in ("pld", "rdp"):
            raise ValueError(f"method must be 'pld' or 'rdp', got {method!r}")
        _check_delta(delta)
        self.noise_multiplier = float(noise_multiplier)
        self.blocks = merge_history([Step(self.noise_multiplier, q, int(n)) for q, n in round_schedule])
        if not self.blocks:
            raise ValueError("a round must take at least one step")
        self.delta = float(delta)
        self.method = method
        self.interval = PLD_DISCRETIZATION if interval is None else float(interval)
        self.rounds = 0
        self._noiseless = self.noise_multiplier == 0
        self._total = None  # PLD, or RDP vector, of the rounds composed so far
        self._step_cache: dict[int, object] = {}
        self._round = None if self._noiseless else self._compose_blocks(self.blocks)

    # one schedule's PLD or RDP curve
    def _compose_blocks(self, blocks: Sequence[Step]):
        if self.method == "rdp":
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis.rdp import compute_rdp

            orders = RDPAccountant.DEFAULT_ALPHAS
            return sum(compute_rdp(q=b.sample_rate, noise_multiplier=b.noise_multiplier, steps=b.num_steps,
                                   orders=orders) for b in blocks)
        total = None
        for b in blocks:
            one = _gaussian_pld(float(b.noise_multiplier), float(b.sample_rate), self.interval).self_compose(b.num_steps)
            total = one if total is None else total.compose(one)
        return total

    def _add(self, part) -> None:
        if self._total is None:
            self._total = part
        elif self.method == "rdp":
            self._total = self._total + part
        else:
            self._total = self._total.compose(part)

    def _epsilon(self, total) -> float:
        if self.method == "rdp":
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis.rdp import get_privacy_spent

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.filterwarnings("ignore", message="Optimal order is the")
                eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=self.delta)
            return float(eps)
        return float(total.get_epsilon_for_delta(self.delta))

    def after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds (>= the rounds already composed): composes only the new ones."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < self.rounds or rounds < 1:
            raise ValueError(f"rounds must be an integer >= {max(self.rounds, 1)}, got {rounds!r}")
        if self._noiseless:
            self.rounds = rounds
            return math.inf
        k = rounds - self.rounds
        if k:
            if self.method == "rdp":
                step = self._round * k
            else:  # one PLD per distinct gap between asked rounds (evenly spaced tables reuse it)
                if k not in self._step_cache:
                    self._step_cache[k] = self._round if k == 1 else self._round.self_compose(k)
                step = self._step_cache[k]
            self._add(step)
            self.rounds = rounds
        return self._epsilon(self._total)

    def then(self, schedule: Sequence[tuple[float, int]]) -> float:
        """Epsilon of the rounds composed so far followed by ``schedule`` (same noise), e.g. the baseline's."""
        blocks = merge_history([Step(self.noise_multiplier, q, int(n)) for q, n in schedule])
        if self._noiseless:
            return math.inf
        if not blocks:
            return self._epsilon(self._total) if self._total is not None else 0.0
        part = self._compose_blocks(blocks)
        if self._total is None:
            return self._epsilon(part)
        if self.method == "rdp":
            return self._epsilon(self._total + part)
        return self._epsilon(self._total.compose(part))


def epsilon_after_rounds(noise_multiplier: float, round_schedule: Sequence[tuple[float, int]],
                         rounds: Sequence[int], delta: float, method: str = "pld") -> list[float]:
    """:class:`RoundComposer`'s epsilon after each of ``rounds`` (increasing)."""
    composer = RoundComposer(noise_multiplier, round_schedule, delta, method)
    return [composer.after(r) for r in rounds]


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found, and how.

    Attributes:
        noise_multiplier: the calibrated sigma; every value in ``checks`` is ``<= target_epsilon``.
        checks: epsilon of the whole schedule at ``noise_multiplier`` by each accountant the report
            recomputes with, e.g. ``{"opacus prv": 3.996, "dp_accounting pld": 3.986}``.
        at_floor: the target is met already at the ``floor`` sigma; less noise was not searched.
        searches: evaluations of the search accountant (cheap).
        verifications: rounds of exact verification (each one evaluation of every accountant in ``checks``).
        seconds: wall time of the calibration.
        method: ``"fast"`` or ``"prv-bisect"``.
    """

    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    checks: dict
    at_floor: bool = False
    searches: int = 0
    verifications: int = 0
    seconds: float = 0.0
    method: str = "fast"

    @property
    def epsilon(self) -> float:
        """The enforcing (Opacus) accountant's epsilon at the calibrated noise."""
        return self.checks[f"opacus {self.accountant}"]


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    schedule: Sequence[tuple[float, int]],
    accountant: str = "prv",
    tol: float = 0.01,
    *,
    method: str = "fast",
    floor: float | None = None,
) -> float:
    """Smallest noise multiplier whose whole planned run stays within ``target_epsilon``.

    ``schedule`` is the WHOLE planned run as ``(sample_rate, num_steps)`` pairs (all rounds x all tasks'
    local epochs, and whatever else spends the same budget), so the target is met at the end of the run,
    not midway. This is :func:`calibrate`'s ``noise_multiplier``; see there (and the module docstring) for
    the method.

    Guarantee (``method="fast"``, the default): the returned sigma was itself evaluated and both
    ``epsilon(history, delta, accountant)`` (Opacus, what the run enforces) and
    ``independent_epsilon(history, delta, "pld" or "rdp")`` (dp_accounting, the report's recomputation)
    are ``<= target_epsilon`` there. Tightness: the Opacus epsilon is within ``tol * target_epsilon`` of
    the target (``tol`` is relative) unless a 1e-4 relative change of sigma crosses it.

    ``method="prv-bisect"`` is the previous path (a bisection evaluated by the Opacus accountant alone, about
    3 s per PRV evaluation on the demo's schedule), kept for benches; it guarantees only the Opacus check.

    ``floor``: never search below this sigma; a target that it already meets is answered with it.

    Raises:
        ValueError: target not positive/finite, empty schedule, or the target is unreachable even at
            sigma = ``MAX_NOISE_MULTIPLIER``.
    """
    return calibrate(target_epsilon, delta, schedule, accountant, tol, method=method, floor=floor).noise_multiplier


def calibrate(
    target_epsilon: float,
    delta: float,
    schedule: Sequence[tuple[float, int]],
    accountant: str = "prv",
    tol: float = 0.01,
    *,
    method: str = "fast",
    floor: float | None = None,
) -> Calibration:
    """:func:`calibrate_noise` with its evidence: the accountants' values at the result, and the work done.

    The fast method: (1) a start from the Gaussian-DP central-limit approximation (:func:`gdp_mu`, no
    accountant call); (2) a safeguarded secant search (log epsilon against log sigma) with the search
    accountant (dp_accounting PLD at ``SEARCH_DISCRETIZATION``, pessimistic; Opacus RDP for ``"rdp"``) for
    the target less the expected gap between it and the strictest report accountant (PRV's ``eps_error``);
    (3) verification of that sigma with every report accountant; if one is above the target (or all are
    more than ``tol`` below it) the search is repeated against the target less the measured gap. Only
    verified points are returned; after ``_MAX_VERIFICATIONS`` rounds without a tight one, the smallest
    verified sigma, else a geometric step-up from the last one until it verifies.
    """
    import time

    t0 = time.perf_counter()
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    pairs = _calibration_pairs(target_epsilon, delta, schedule, accountant, tol)
    if floor is not None and not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a finite number > 0, got {floor!r}")
    if method == "prv-bisect":
        sigma, at_floor = _calibrate_bisect(target_epsilon, delta, pairs, accountant, tol, floor)
        checks = {f"opacus {accountant}": epsilon([Step(sigma, q, n) for q, n in pairs], delta, accountant)}
        return Calibration(float(target_epsilon), float(delta), accountant, sigma, checks, at_floor,
                           seconds=time.perf_counter() - t0, method=method)
    blocks = merge_history([Step(1.0, q, n) for q, n in pairs])
    pairs = [(b.sample_rate, b.num_steps) for b in blocks]
    checks = _report_checks(pairs, delta, accountant)
    searches = 0

    def search_eps(sigma: float) -> float:
        nonlocal searches
        searches += 1
        try:
            return _search_epsilon(pairs, sigma, delta, accountant)
        except (ValueError, ArithmeticError, MemoryError):
            return math.inf

    lowest = floor if floor is not None else _MIN_SEARCH_NOISE
    gap = _EXPECTED_GAP[accountant]
    verified: list[tuple[float, dict]] = []
    sigma = None
    verifications = 0
    for _ in range(_MAX_VERIFICATIONS):
        aim = target_epsilon - gap
        if aim <= 0:
            break
        sigma, at_search = _search(search_eps, aim, _clt_noise(target_epsilon, delta, pairs) if sigma is None else sigma,
                                   lowest, pairs, target_epsilon, delta, accountant)
        values = _verify(checks, sigma)
        verifications += 1
        worst = max(values.values())
        if worst <= target_epsilon:
            verified.append((sigma, values))
            if worst >= target_epsilon * (1 - tol) or sigma <= lowest:
                break
        # the measured gap between the strictest report accountant and the search accountant at this sigma
        gap = max(0.0, worst - at_search) + 1e-4 * target_epsilon if math.isfinite(worst) else 2 * gap + 0.01
    if not verified:  # the search's gaps did not close: step up from the last sigma until it verifies
        if accountant == "prv" and target_epsilon <= PRV_EPS_ERROR:
            raise ValueError(f"target epsilon {target_epsilon} is unreachable with the 'prv' accountant: its upper "
                             f"bound is never below its eps_error {PRV_EPS_ERROR:g}; use 'rdp' or a larger target")
        sigma = sigma if sigma is not None else _clt_noise(target_epsilon, delta, pairs)
        step = 0.02
        while True:
            sigma *= 1 + step
            step *= 2
            if sigma > MAX_NOISE_MULTIPLIER:
                raise _unreachable(target_epsilon, delta, pairs, accountant)
            values = _verify(checks, sigma)
            verifications += 1
            if max(values.values()) <= target_epsilon:
                verified.append((sigma, values))
                break
    sigma, values = min(verified, key=lambda x: x[0])
    return Calibration(float(target_epsilon), float(delta), accountant, float(sigma), values,
                       at_floor=floor is not None and sigma <= floor, searches=searches,
                       verifications=verifications, seconds=time.perf_counter() - t0)


#: how :func:`calibrate_noise` can search: the fast default, and the previous PRV bisection (for benches)
CALIBRATION_METHODS = ("fast", "prv-bisect")
#: dp_accounting PLD discretisation (``value_discretization_interval``) of :func:`independent_epsilon`
PLD_DISCRETIZATION = 1e-4
#: the coarser, still pessimistic, discretisation :func:`calibrate_noise` searches with (0.1 s per evaluation
#: on the demo's schedule against 0.5-0.8 s at ``PLD_DISCRETIZATION``; about 6e-4 above it at epsilon 8)
SEARCH_DISCRETIZATION = 1e-3
#: Opacus PRV's ``eps_error`` (its ``get_epsilon`` default): PRV's upper bound sits about this far above PLD
PRV_EPS_ERROR = 0.01
# The expected excess of the strictest report accountant over the search accountant: PRV ~ PLD + eps_error
# (+ a little for PRV's delta_error and the coarser search grid); RDP searches with max(Opacus, dp_accounting).
_EXPECTED_GAP = {"prv": PRV_EPS_ERROR + 0.002, "rdp": 0.0}
_MAX_VERIFICATIONS = 4
# Below this sigma the PLD grids grow without bound; the search then uses RDP (an upper bound too).
_PLD_SEARCH_MIN_NOISE = 0.3
_MIN_SEARCH_NOISE = 1e-3


def _verify(checks: dict, sigma: float) -> dict:
    """Every report accountant's epsilon at ``sigma``; the first (Opacus) in this thread, the others in worker
    threads meanwhile (both libraries spend most of their time in FFTs and NumPy, which release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    (first, fn), *others = checks.items()
    if not others:
        return {first: _safe(fn, sigma)}
    with ThreadPoolExecutor(max_workers=len(others)) as pool:
        futures = {name: pool.submit(_safe, other, sigma) for name, other in others}
        values = {first: _safe(fn, sigma)}
        values.update({name: f.result() for name, f in futures.items()})
    return values


def _safe(fn, sigma: float) -> float:
    try:
        return fn(sigma)
    except (ValueError, ArithmeticError, MemoryError):
        return math.inf


def _report_checks(pairs: list[tuple[float, int]], delta: float, accountant: str) -> dict:
    """The accountants the report recomputes a hospital's spend with, as functions of sigma."""
    other = "rdp" if accountant == "rdp" else "pld"

    def opacus(sigma: float) -> float:
        return epsilon([Step(sigma, q, n) for q, n in pairs], delta, accountant)

    def independent(sigma: float) -> float:
        return independent_epsilon([Step(sigma, q, n) for q, n in pairs], delta, other)

    return {f"opacus {accountant}": opacus, f"dp_accounting {other}": independent}


def _search_epsilon(pairs: list[tuple[float, int]], sigma: float, delta: float, accountant: str) -> float:
    """The search accountant's epsilon (see the module docstring)."""
    history = [Step(sigma, q, n) for q, n in pairs]
    if accountant == "rdp":
        return max(epsilon(history, delta, "rdp"), independent_epsilon(history, delta, "rdp"))
    if sigma < _PLD_SEARCH_MIN_NOISE:
        return independent_epsilon(history, delta, "rdp")
    return _dp_accounting_epsilon(history, delta, "pld", SEARCH_DISCRETIZATION)


def _clt_noise(target_epsilon: float, delta: float, pairs: list[tuple[float, int]]) -> float:
    """A first guess at sigma: the Gaussian-DP CLT approximation (:func:`gdp_mu`) solved for the target.

    mu-GDP is (eps, delta)-DP with delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su);
    the mu meeting the target is found by bisection, then sigma from mu^2 = sum q^2 T (e^{1/sigma^2} - 1)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def gdp_delta(mu: float) -> float:
        e = target_epsilon
        try:
            return phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)
        except OverflowError:
            return 1.0

    lo, hi = 1e-6, 1e3
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if gdp_delta(mid) > delta:
            hi = mid
        else:
            lo = mid
    s = sum(q * q * n for q, n in pairs)
    sigma = 1.0 / math.sqrt(math.log1p(lo * lo / s))
    return min(max(sigma, 0.3), MAX_NOISE_MULTIPLIER / 2)


def _search(eps_at, aim: float, start: float, lowest: float, pairs, target_epsilon: float, delta: float,
            accountant: str) -> tuple[float, float]:
    """Smallest sigma >= ``lowest`` with ``eps_at(sigma) <= aim`` (to 1e-3 relative in epsilon or 1e-5 in
    sigma): ``(sigma, eps_at(sigma))``. Brackets from ``start`` by steps sized as if epsilon ~ 1/sigma, then
    a secant in log-log space, safeguarded by bisection."""
    start = max(start, lowest)
    v = eps_at(start)
    lo = hi = None  # (sigma, eps): eps(lo) > aim >= eps(hi)
    s = start
    while True:  # bracket
        if v <= aim:
            hi = (s, v)
            if lo is not None:
                break
            if s <= lowest:
                return s, v
            step = min(0.9, (v / aim) ** 1.1) if v > 0 else 0.5
            s = max(lowest, s * step)
        else:
            lo = (s, v)
            if hi is not None:
                break
            step = max(1.1, (v / aim) ** 1.1) if math.isfinite(v) else 2.0
            s = s * min(step, 4.0)
            if s > MAX_NOISE_MULTIPLIER:
                if eps_at(MAX_NOISE_MULTIPLIER) > aim:
                    raise _unreachable(target_epsilon, delta, pairs, accountant)
                s = MAX_NOISE_MULTIPLIER
        v = eps_at(s)
    use_secant = True
    while hi[1] < aim * (1 - 1e-3) and (hi[0] - lo[0]) > 1e-5 * hi[0]:
        if use_secant and math.isfinite(lo[1]) and lo[1] > 0 and hi[1] > 0:
            x0, x1 = math.log(lo[0]), math.log(hi[0])
            y0, y1 = math.log(lo[1]), math.log(hi[1])
            goal = math.log(aim * (1 - 2.5e-4))  # a hair under the aim, so the new point tends to land on the hi side
            x = x0 + (goal - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else 0.5 * (x0 + x1)
            s = math.exp(x)
            width = hi[0] - lo[0]
            s = min(max(s, lo[0] + 0.02 * width), hi[0] - 0.02 * width)
        else:
            s = math.sqrt(lo[0] * hi[0])
        v = eps_at(s)
        if v <= aim:
            shrink = (hi[0] - s) / (hi[0] - lo[0])
            hi = (s, v)
        else:
            shrink = (s - lo[0]) / (hi[0] - lo[0])
            lo = (s, v)
        use_secant = shrink > 0.1 or not use_secant  # a secant step that barely moved: bisect once
    return hi


def _unreachable(target_epsilon, delta, pairs, accountant) -> ValueError:
    return ValueError(
        f"target epsilon {target_epsilon} at delta {delta} is unreachable for this schedule "
        f"({sum(n for _, n in pairs)} steps, sample rates {sorted({q for q, _ in pairs})}) "
        f"with the {accountant!r} accountant even at noise multiplier {MAX_NOISE_MULTIPLIER:g}: "
        f"raise epsilon, or plan fewer steps or a smaller sample rate"
    )


def _calibrate_bisect(target_epsilon: float, delta: float, pairs: list[tuple[float, int]], accountant: str,
                      tol: float, floor: float | None) -> tuple[float, bool]:
    """The previous calibration (``method="prv-bisect"``): the floor checked first (as ``secure-fedkim budget``
    did), then a doubling/halving bracket from sigma 1 and a bisection, every point evaluated by the Opacus
    accountant alone."""
    def eps_at(sigma: float) -> float:
        try:
            return epsilon([Step(sigma, q, n) for q, n in pairs], delta, accountant, cache=False)
        except ValueError:
            return math.inf

    if floor is not None and eps_at(floor) <= target_epsilon:
        return float(floor), True
    # Bracket: eps(low) > target >= eps(high).
    high = 1.0
    eps_high = eps_at(high)
    if eps_high > target_epsilon:
        low, high, eps_high = _bracket_upwards(eps_at, target_epsilon, delta, pairs, accountant)
    else:
        low, high, eps_high = _bracket_downwards(eps_at, target_epsilon, high, eps_high)
        if low is None:  # absurdly weak target; sigma this small is already far below useful
            return high, False
    return _bisect_noise(eps_at, target_epsilon, tol, low, high, eps_high), False


def _calibration_pairs(target_epsilon, delta: float, schedule: Sequence[tuple[float, int]], accountant: str,
                       tol: float) -> list[tuple[float, int]]:
    """:func:`calibrate_noise`'s arguments checked; the schedule as ``(sample_rate, num_steps)`` pairs."""
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not (0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    pairs = [(float(q), int(n)) for q, n in schedule]
    for q, n in pairs:
        Step(1.0, q, n)  # validates q and n
    if sum(n for _, n in pairs) == 0:
        raise ValueError("calibrate_noise: the schedule has no steps; there is nothing to calibrate")
    return pairs


def _bracket_upwards(eps_at, target_epsilon: float, delta: float, pairs: list[tuple[float, int]],
                     accountant: str) -> tuple[float, float, float]:
    """``(low, high, eps(high))`` from sigma 1, which exceeds the target: double sigma until it meets it."""
    low = 1.0
    while True:
        high = low * 2.0
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target epsilon {target_epsilon} at delta {delta} is unreachable for this schedule "
                f"({sum(n for _, n in pairs)} steps, sample rates {sorted({q for q, _ in pairs})}) "
                f"with the {accountant!r} accountant even at noise multiplier {MAX_NOISE_MULTIPLIER:g}: "
                f"raise epsilon, or plan fewer steps or a smaller sample rate"
            )
        eps_high = eps_at(high)
        if eps_high <= target_epsilon:
            return low, high, eps_high
        low = high


def _bracket_downwards(eps_at, target_epsilon: float, high: float, eps_high: float) -> tuple[float | None, float, float]:
    """``(low, high, eps(high))`` from sigma ``high``, which meets the target: halve sigma until it does not.

    ``low`` is None when sigma fell below 1e-3 still meeting the target (``high`` is then the answer)."""
    while True:
        low = high / 2.0
        eps_low = eps_at(low)
        if eps_low > target_epsilon:
            return low, high, eps_high
        high, eps_high = low, eps_low
        if high < 1e-3:
            return None, high, eps_high


def _bisect_noise(eps_at, target_epsilon: float, tol: float, low: float, high: float, eps_high: float) -> float:
    """Bisect ``[low, high]`` (eps(low) > target >= eps(high)) until eps(high) is within ``tol`` of the target or
    the bracket is narrower than 1e-4 relative; returns ``high``, always a verified point."""
    while target_epsilon - eps_high > tol * target_epsilon and (high - low) > 1e-4 * high:
        mid = 0.5 * (low + high)
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    assert eps_high <= target_epsilon
    return high


def poisson_schedule(n_units: int, batch_size: int, epochs: int = 1) -> tuple[float, int]:
    """``(sample_rate, steps)`` of ``epochs`` passes of a Poisson loader over ``n_units`` privacy units.

    The same rule for records (Opacus's ``DPDataLoader``) and patients (``privacy.patient``): each unit is
    sampled with ``q = 1/ceil(n/b)`` per step (``b = min(batch_size, n)``, the expected number of sampled
    units), for ``ceil(n/b)`` steps per epoch. For patient-level DP-SGD pass the number of patients and
    the number of patients per batch.
    """
    for name, v in (("n_units", n_units), ("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    batches = math.ceil(n_units / min(batch_size, n_units))
    return 1.0 / batches, batches * epochs


def group_privacy_epsilon(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of ``k`` records, e.g. a patient with at most ``k`` records.

    Standard group privacy for approximate DP: an (eps, delta)-DP mechanism is
    ``(k*eps, k*exp((k-1)*eps)*delta)``-DP for groups of size k (Dwork and Roth 2014, Lemma 2.2 form).

    This is LOOSE: the delta term grows exponentially with k*eps, so it is often vacuous beyond small k.
    For a tighter patient-level figure, account at the patient level (user-level DP-SGD) instead.
    ``delta_k`` is capped at 1.0 (a delta of 1 means no guarantee).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (records per patient) must be an integer >= 1, got {k!r}")
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not (0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    eps_k = k * eps
    try:
        delta_k = min(1.0, k * math.exp((k - 1) * eps) * delta)
    except OverflowError:
        delta_k = 1.0 if delta > 0 else 0.0
    return eps_k, delta_k


def default_delta(n_records: int) -> float:
    """Default delta for a dataset of ``n_records`` records: ``min(1e-5, 1 / (10 * n_records))``."""
    if isinstance(n_records, bool) or not isinstance(n_records, int) or n_records < 1:
        raise ValueError(f"n_records must be an integer >= 1, got {n_records!r}")
    return min(1e-5, 1.0 / (10 * n_records))


def resolve_delta(delta: float | None, n_records: int) -> float:
    """``delta`` if given (checked to be ``< 1/n_records``), else :func:`default_delta`.

    A delta >= 1/n allows a mechanism that publishes one random record in the clear, so it is refused.
    """
    if delta is None:
        return default_delta(n_records)
    default_delta(n_records)  # validates n_records
    _check_delta(delta)
    if delta >= 1.0 / n_records:
        raise ValueError(
            f"delta={delta:g} is not below 1/n for n={n_records} records (1/n={1.0 / n_records:g}); "
            f"a delta >= 1/n permits releasing a record in the clear. Use delta << 1/n, "
            f"e.g. {default_delta(n_records):g}"
        )
    return float(delta)
