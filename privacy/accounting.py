"""Privacy accounting for DP-SGD with Poisson subsampling.

Everything here is a thin, checked layer over two independent, well-kept libraries:

* Opacus (``opacus.accountants``): the accountants the training itself uses (``prv``, Gopi et al. 2021,
  and ``rdp``, Mironov 2017). :func:`epsilon` is the number a hospital is held to.
* Google's ``dp_accounting``: an independent implementation (PLD or RDP) used by
  :func:`independent_epsilon` to cross-check and to report an independent recomputation.

A run's privacy history is a list of :class:`Step` blocks, each a homogeneous stretch of DP-SGD steps
(same noise multiplier, same sample rate). Composition is order independent for these accountants, so
blocks with equal ``(noise_multiplier, sample_rate)`` are merged before accounting (faster, same result).

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "Step",
    "ACCOUNTANTS",
    "epsilon",
    "independent_epsilon",
    "gdp_mu",
    "calibrate_noise",
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


def epsilon(history: Sequence[Step], delta: float, accountant: str = "prv") -> float:
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

    Raises:
        ValueError: unknown accountant, bad delta, or the accountant failed (e.g. Opacus's PRV cannot
            handle some very large epsilons: use ``"rdp"`` there).
    """
    from opacus.accountants import create_accountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    _check_delta(delta)
    blocks = merge_history(history)
    if not blocks:
        return 0.0
    if any(b.noise_multiplier == 0 for b in blocks):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [b.as_opacus() for b in blocks]
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
    from dp_accounting import pld, rdp

    acc = pld.PLDAccountant() if method == "pld" else rdp.RdpAccountant()
    acc.compose(_dp_event(blocks))
    return float(acc.get_epsilon(delta))


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


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    schedule: Sequence[tuple[float, int]],
    accountant: str = "prv",
    tol: float = 0.01,
) -> float:
    """Smallest noise multiplier whose whole planned run stays within ``target_epsilon``.

    ``schedule`` is the WHOLE planned run as ``(sample_rate, num_steps)`` pairs (all rounds x all tasks'
    local epochs), so the target is met at the end of the run, not midway. Binary search over sigma
    with the same accountant that will enforce the budget (:func:`epsilon`).

    Guarantee: the returned sigma was itself evaluated and satisfies
    ``epsilon([Step(sigma, q, n) for q, n in schedule], delta, accountant) <= target_epsilon``
    (only verified points are ever returned; cf. Opacus issues #308/#346).
    Tightness: the search stops when that epsilon is within ``tol * target_epsilon`` of the target
    (``tol`` is *relative*), or when the bracket around sigma is narrower than 1e-4 relative, so a
    slightly smaller sigma (e.g. 2% smaller) exceeds the target. Points where the accountant fails are
    treated as exceeding the target (conservative).

    Raises:
        ValueError: target not positive/finite, empty schedule, or the target is unreachable even at
            sigma = ``MAX_NOISE_MULTIPLIER``.
    """
    pairs = _calibration_pairs(target_epsilon, delta, schedule, accountant, tol)

    def eps_at(sigma: float) -> float:
        try:
            return epsilon([Step(sigma, q, n) for q, n in pairs], delta, accountant)
        except ValueError:
            return math.inf

    # Bracket: eps(low) > target >= eps(high).
    high = 1.0
    eps_high = eps_at(high)
    if eps_high > target_epsilon:
        low, high, eps_high = _bracket_upwards(eps_at, target_epsilon, delta, pairs, accountant)
    else:
        low, high, eps_high = _bracket_downwards(eps_at, target_epsilon, high, eps_high)
        if low is None:  # absurdly weak target; sigma this small is already far below useful
            return high
    return _bisect_noise(eps_at, target_epsilon, tol, low, high, eps_high)


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
