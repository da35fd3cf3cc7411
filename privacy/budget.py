"""Budget planning for DP-SGD runs (used by ``secure-fedkim budget``). No printing here.

A forecast uses the Poisson loaders' own rule, as a run does (:func:`privacy.accounting.poisson_schedule`, the
one rule for Opacus's ``DPDataLoader`` and ``privacy.patient``): each record is sampled per step with
probability ``q = 1/ceil(n/batch)``, for ``ceil(n/batch)`` steps per local epoch; so the forecast's noise is
the noise a run with the same inputs calibrates (``privacy.accounting.calibrate_noise``, the one calibration
for ``budget``, ``budget --config`` and every hospital's DP plan; see ``privacy.accounting`` for its method).

Epsilon by round is composed incrementally (:class:`privacy.accounting.RoundComposer`: one more round onto
the rounds before, never the whole prefix again): with Opacus's RDP for ``accountant="rdp"``, else with
dp_accounting's PLD at the report's discretisation, because Opacus's PRV cannot compose incrementally (its
mesh depends on the whole history). The end of the run is also given by the accountant the run enforces.

With ``unit="patient"`` (patient-level DP-SGD, ``privacy.patient``) the same holds with patients in place
of records: ``batch_size`` counts patients, ``n`` is ``n_patients``, delta defaults on ``n_patients``, and
every epsilon is per patient.

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .accounting import (
    ACCOUNTANTS,
    RoundComposer,
    Step,
    calibrate,
    epsilon,
    gdp_mu,
    independent_epsilon,
    poisson_schedule,
    resolve_delta,
)

__all__ = ["BudgetForecast", "forecast", "epsilon_by_round", "compare_accountants", "format_table", "MIN_NOISE_MULTIPLIER",
           "MAX_TABLE_ROUNDS", "table_rounds", "noise_dominates", "round_accountant", "signal_to_noise",
           "epsilon_by_round_schedule"]

# Below this noise multiplier the PRV and PLD accountants' grids grow without bound (sigma 0.2 already
# takes ~1 GB and 15 s for one run of a few hundred steps; epsilon 1e6 was killed at 22 GB), and the
# guarantee is weak anyway (epsilon above ~10 for a typical run). A target that this noise already meets
# is answered at this noise, never by searching below it.
MIN_NOISE_MULTIPLIER = 0.5
# The epsilon-by-round table lists at most this many rounds (evenly spaced, always the last one): each
# row is one accountant call, so a run of 10,000 rounds would otherwise take hours.
MAX_TABLE_ROUNDS = 20


@dataclass(frozen=True)
class BudgetForecast:
    """The noise a hospital needs for a whole run, and what it spends round by round.

    Attributes:
        noise_multiplier: calibrated sigma (smallest that meets ``target_epsilon`` at the end of the run).
        sample_rate: ``1/ceil(n/batch_size)`` (Poisson sampling; n: records, or patients for unit "patient").
        steps_per_round: ``local_epochs * ceil(n / batch_size)``.
        epsilon: epsilon at the end of the planned run by ``accountant`` (<= target).
        epsilon_by_round: epsilon after each round of ``table_rounds``, composed round by round by
            ``round_accountant`` (see :func:`round_accountant`).
        gdp_mu: Gaussian-DP mu at the end (CLT approximation).
        at_noise_floor: the target is met already at ``MIN_NOISE_MULTIPLIER``; less noise was not searched.
        unit: the privacy unit every epsilon is about, ``"record"`` or ``"patient"``.
        n_patients: patients at the hospital (unit "patient"; ``batch_size`` then counts patients).
    """

    target_epsilon: float
    delta: float
    n_records: int
    batch_size: int
    local_epochs: int
    rounds: int
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    total_steps: int
    epsilon: float
    epsilon_by_round: list[float] = field(default_factory=list)
    gdp_mu: float = 0.0
    at_noise_floor: bool = False
    table_rounds: list[int] = field(default_factory=list)  # the rounds that epsilon_by_round lists
    unit: str = "record"
    n_patients: int | None = None
    round_accountant: str = ""  # the accountant of epsilon_by_round (round_accountant(accountant))
    checks: dict = field(default_factory=dict)  # the whole run at the calibrated noise, by each report accountant

    @property
    def n_units(self) -> int:
        """The number of privacy units: patients for unit "patient", else records."""
        return self.n_patients if self.unit == "patient" else self.n_records

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def forecast(
    target_epsilon: float,
    delta: float | None,
    n_records: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    accountant: str = "prv",
    *,
    unit: str = "record",
    n_patients: int | None = None,
) -> BudgetForecast:
    """Calibrate the noise for a whole run and list epsilon by round.

    Args:
        target_epsilon: budget for the whole run, per privacy unit.
        delta: target delta, or ``None`` for ``min(1e-5, 1/(10 n))``; a delta >= 1/n is refused
            (n: records, or patients for unit "patient").
        n_records: training records at the hospital.
        batch_size: expected (Poisson) batch size, in records; in patients for unit "patient".
        local_epochs: local epochs per round.
        rounds: planned rounds.
        accountant: ``"prv"`` or ``"rdp"`` (Opacus).
        unit: ``"record"`` (default) or ``"patient"`` (patient-level DP-SGD; needs ``n_patients``).
        n_patients: patients at the hospital (unit "patient").
    """
    _positive_int("n_records", n_records)
    if unit not in ("record", "patient"):
        raise ValueError(f"unit (the privacy unit) must be 'record' or 'patient', got {unit!r}")
    if unit == "patient":
        if n_patients is None:
            raise ValueError("unit 'patient' needs n_patients, the number of patients at the hospital")
        _positive_int("n_patients", n_patients)
        if n_patients > n_records:
            raise ValueError(f"n_patients {n_patients} exceeds n_records {n_records} (a patient has >= 1 record)")
    n, what = (n_patients, "n_patients") if unit == "patient" else (n_records, "n_records")
    _positive_int("batch_size", batch_size)
    _positive_int("local_epochs", local_epochs)
    _positive_int("rounds", rounds)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds {what} {n}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = resolve_delta(delta, n)
    q, steps_per_round = poisson_schedule(n, batch_size, local_epochs)  # the loaders' own rule, as in a run
    cal = calibrate(target_epsilon, delta, [(q, steps_per_round * rounds)], accountant=accountant,
                    floor=MIN_NOISE_MULTIPLIER)
    sigma, at_floor = cal.noise_multiplier, cal.at_floor
    listed = table_rounds(rounds)
    by_round = epsilon_by_round(sigma, q, steps_per_round, rounds, delta, accountant)
    return BudgetForecast(
        target_epsilon=float(target_epsilon),
        delta=delta,
        n_records=n_records,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        accountant=accountant,
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps_per_round,
        total_steps=steps_per_round * rounds,
        epsilon=cal.epsilon,
        epsilon_by_round=by_round,
        gdp_mu=gdp_mu([Step(sigma, q, steps_per_round * rounds)]),
        at_noise_floor=at_floor,
        table_rounds=listed,
        unit=unit,
        n_patients=n_patients if unit == "patient" else None,
        round_accountant=round_accountant(accountant),
        checks=dict(cal.checks),
    )


def table_rounds(rounds: int) -> list[int]:
    """The rounds an epsilon-by-round table lists: all of them up to MAX_TABLE_ROUNDS, else evenly spaced
    ones ending at the last round."""
    _positive_int("rounds", rounds)
    if rounds <= MAX_TABLE_ROUNDS:
        return list(range(1, rounds + 1))
    return sorted({max(1, round(rounds * i / MAX_TABLE_ROUNDS)) for i in range(1, MAX_TABLE_ROUNDS + 1)})


def noise_dominates(noise_multiplier: float, batch_size: float) -> bool:
    """True when the noise on each step's mean gradient (std sigma*C/B per coordinate) exceeds the clipping
    norm C itself: every step is then mostly noise and a model typically stays near its untrained AUROC."""
    return noise_multiplier / batch_size > 1.0


def round_accountant(accountant: str) -> str:
    """The accountant that composes epsilon round by round for a budget held to ``accountant``: Opacus RDP
    for ``"rdp"`` (its values are Opacus's), dp_accounting PLD otherwise (Opacus's PRV has no incremental
    composition; PLD is the report's cross-check of PRV, and about ``eps_error`` = 0.01 below it)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return "opacus rdp" if accountant == "rdp" else "dp_accounting pld"


def epsilon_by_round(
    noise_multiplier: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    accountant: str = "prv",
) -> list[float]:
    """Epsilon after each round of :func:`table_rounds` (the cumulative spend, not a per-round figure):
    every round up to MAX_TABLE_ROUNDS rounds, else MAX_TABLE_ROUNDS evenly spaced ones ending at the last.

    Incremental: each listed round composes only the rounds since the previous one onto them, with
    :func:`round_accountant` ``(accountant)``; equal to a full recomposition up to rounding."""
    _positive_int("steps_per_round", steps_per_round)
    return epsilon_by_round_schedule(noise_multiplier, [(sample_rate, steps_per_round)], rounds, delta, accountant)


def epsilon_by_round_schedule(
    noise_multiplier: float,
    round_schedule: list[tuple[float, int]],
    rounds: int,
    delta: float,
    accountant: str = "prv",
    listed: list[int] | None = None,
) -> list[float]:
    """:func:`epsilon_by_round` for a heterogeneous round (``(sample_rate, steps)`` per task), at ``listed``
    rounds (default :func:`table_rounds`)."""
    method = "rdp" if round_accountant(accountant) == "opacus rdp" else "pld"
    composer = RoundComposer(noise_multiplier, round_schedule, delta, method)
    return [composer.after(r) for r in (listed if listed is not None else table_rounds(rounds))]


def signal_to_noise(noise_multiplier: float, expected_batch: float) -> float:
    """Predicted signal-to-noise of one DP-SGD step: ``expected_batch / noise_multiplier``.

    Assumes a typical clipped per-unit gradient has norm about the clipping norm C (early in training most
    per-sample gradients are clipped) and that they point broadly the same way, so the mean gradient's norm
    is about C; the noise on the mean gradient has std ``sigma * C / expected_batch`` per coordinate. The
    ratio of the two is independent of C. Below 1 the noise per coordinate exceeds the whole signal
    (:func:`noise_dominates`); a model typically stays near its untrained AUROC. It is an optimistic figure:
    disagreeing gradients or many coordinates make the signal per coordinate smaller."""
    if noise_multiplier == 0:
        return math.inf
    return expected_batch / noise_multiplier


def compare_accountants(
    noise_multiplier: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
) -> dict[str, float]:
    """Epsilon of the whole run by four accountants from two libraries.

    Keys: ``opacus_prv``, ``opacus_rdp``, ``dp_accounting_pld``, ``dp_accounting_rdp``. PRV and PLD are
    tight numerical accountants and should agree within about 1%; the two RDP values agree with each
    other and are larger (RDP-to-(eps, delta) conversion is looser).
    """
    history = [Step(noise_multiplier, sample_rate, steps_per_round * rounds)]
    return {
        "opacus_prv": epsilon(history, delta, "prv"),
        "opacus_rdp": epsilon(history, delta, "rdp"),
        "dp_accounting_pld": independent_epsilon(history, delta, "pld"),
        "dp_accounting_rdp": independent_epsilon(history, delta, "rdp"),
    }


def format_table(budget: BudgetForecast, comparison: dict[str, float] | None = None) -> str:
    """A plain-text summary of ``budget`` (and optionally of :func:`compare_accountants`)."""
    b = budget
    per = f"per {b.unit}"
    units = (f"patients           {b.n_patients} ({b.n_records} records)  batch {b.batch_size} patients  "
             f"sample rate {b.sample_rate:.6g} per patient (Poisson)") if b.unit == "patient" else \
        f"records            {b.n_records}  batch {b.batch_size}  sample rate {b.sample_rate:.6g} (Poisson)"
    lines = [
        f"target epsilon     {b.target_epsilon:g} {per}  (delta {b.delta:.3g}, accountant {b.accountant})",
        units,
        f"steps              {b.steps_per_round} per round ({b.local_epochs} local epoch(s)) x {b.rounds} rounds = {b.total_steps}",
        (f"noise multiplier   {b.noise_multiplier:.6g}  (noise multiplier below {MIN_NOISE_MULTIPLIER:g} is not needed: "
         f"this noise already keeps the whole run within the target; less is not searched)")
        if b.at_noise_floor else f"noise multiplier   {b.noise_multiplier:.6g}  (calibrated for the whole run)",
        f"final epsilon      {b.epsilon:.4f} {per} ({b.accountant}, the accountant the run enforces)  "
        f"GDP mu {b.gdp_mu:.4f} (CLT approximation)",
        "",
        f"{'round':>5}  {'epsilon':>10}  {'remaining':>10}  (epsilon {per}; {b.round_accountant or b.accountant}, "
        f"composed round by round)",
        f"{'-' * 5}  {'-' * 10}  {'-' * 10}",
    ]
    snr = signal_to_noise(b.noise_multiplier, b.sample_rate * b.n_units)
    lines.insert(5, f"signal/noise       {snr:.3g} per step (expected batch {b.sample_rate * b.n_units:.4g} / noise multiplier; "
                    f"assumes a typical clipped gradient of norm C; under 1 the noise outweighs the signal)")
    for r, eps in zip(b.table_rounds or range(1, b.rounds + 1), b.epsilon_by_round):
        lines.append(f"{r:>5}  {eps:>10.4f}  {b.target_epsilon - eps:>10.4f}")
    if comparison:
        lines += ["", f"{'accountant':<20}  {'epsilon':>10}  (epsilon {per})", f"{'-' * 20}  {'-' * 10}"]
        for name, eps in comparison.items():
            lines.append(f"{name:<20}  {eps:>10.4f}")
    if noise_dominates(b.noise_multiplier, b.batch_size):
        lines += ["", f"warning: noise multiplier {b.noise_multiplier:.4g} over batch {b.batch_size} means each step's mean "
                      f"gradient is mostly noise; at this budget a model typically stays at its untrained AUROC"]
    return "\n".join(lines) + "\n"
