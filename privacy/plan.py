"""A run's DP plan, typed, and the one rule for which run of a ledger is "this run".

:class:`privacy.dp.HospitalDP` writes one ``dp_plan`` ledger entry on the first construction of a run; every
reader (the client on a restart, the baseline, the audits, the report) reads it as a :class:`DPPlan`
(:meth:`privacy.ledger.PrivacyLedger.plan`). A resumed run keeps its FIRST plan.

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .accounting import Step

__all__ = ["DPPlan", "this_run_id"]

_REQUIRED = ("run_id", "noise_multiplier", "delta", "accountant", "max_grad_norm")


@dataclass(frozen=True)
class DPPlan:
    """One ``dp_plan`` ledger entry (see ``HospitalDP._make_plan``); ``entry`` is the raw entry for anything else.

    ``round_schedule`` is ONE round's ``((sample_rate, steps), ...)``, planned ``rounds`` times;
    ``reserved_schedule`` is what the same records also take under another ledger (``reserved_for``, e.g. the
    single-hospital baseline). A plan written before the privacy unit was recorded reads as unit ``"record"``.
    """

    run_id: str
    noise_multiplier: float
    delta: float
    accountant: str
    max_grad_norm: float
    dp: bool = True
    target_epsilon: float | None = None
    round_schedule: tuple[tuple[float, int], ...] = ()
    rounds: int | None = None
    n_records: int | None = None
    privacy_unit: str = "record"
    n_patients: int | None = None
    max_records_per_patient_step: int | None = None
    reserved_schedule: tuple[tuple[float, int], ...] = ()
    reserved_for: str | None = None
    planned_epsilon: float | None = None
    seq: int | None = None
    entry: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_entry(cls, entry: dict) -> "DPPlan":
        """The plan of a ``dp_plan`` entry. Raises ValueError naming a missing or invalid field (and the seq)."""
        where = f"dp_plan entry (seq {entry.get('seq')})"
        missing = [k for k in _REQUIRED if entry.get(k) is None]
        if missing:
            raise ValueError(f"{where} lacks field(s) {missing}")

        def conv(name: str, kind, default=None):
            value = entry.get(name)
            if value is None:
                return default
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: field {name!r} is not a valid {kind.__name__}: {value!r}") from None

        def schedule(name: str) -> tuple[tuple[float, int], ...]:
            try:
                return tuple((float(q), int(n)) for q, n in entry.get(name) or ())
            except (TypeError, ValueError):
                raise ValueError(f"{where}: field {name!r} is not a list of (sample_rate, steps): "
                                 f"{entry.get(name)!r}") from None

        return cls(
            run_id=str(entry["run_id"]),
            noise_multiplier=conv("noise_multiplier", float),
            delta=conv("delta", float),
            accountant=str(entry["accountant"]),
            max_grad_norm=conv("max_grad_norm", float),
            dp=bool(entry.get("dp", True)),
            target_epsilon=conv("target_epsilon", float),
            round_schedule=schedule("round_schedule"),
            rounds=conv("rounds", int),
            n_records=conv("n_records", int),
            privacy_unit=str(entry.get("privacy_unit") or "record"),
            n_patients=conv("n_patients", int),
            max_records_per_patient_step=conv("max_records_per_patient_step", int),
            reserved_schedule=schedule("reserved_schedule"),
            reserved_for=entry.get("reserved_for"),
            planned_epsilon=conv("planned_epsilon", float),
            seq=conv("seq", int),
            entry=dict(entry),
        )

    @property
    def n_units(self) -> int | None:
        """The number of privacy units delta was resolved on: patients (unit ``"patient"``) or records."""
        return self.n_patients if self.privacy_unit == "patient" else self.n_records

    def planned_steps(self) -> list[Step]:
        """The whole planned run: ``round_schedule`` x ``rounds`` at the plan's noise multiplier."""
        if self.round_schedule and self.rounds is None:
            raise ValueError(f"dp_plan entry (seq {self.seq}) lacks field ['rounds']")
        return [Step(self.noise_multiplier, q, n) for q, n in self.round_schedule] * (self.rounds or 0)

    def with_reserved(self) -> list[Step]:
        """:meth:`planned_steps` followed by the reserved steps (what the plan's noise was calibrated on)."""
        return self.planned_steps() + [Step(self.noise_multiplier, q, n) for q, n in self.reserved_schedule]


def this_run_id(ids: Iterable[str | None], run_dir_name: str, recorded_name: str | None = None) -> str | None:
    """Which of a ledger's run ids (``ids``, e.g. of its plans, in ledger order) is this run's.

    The run directory's name (what ``secure-fedkim run`` and the deployment ServerApp record as the run id),
    else ``recorded_name`` (the name of the run directory recorded in summary.json: a moved run directory),
    else the ledger's only run id. None when none of these picks one (no id, or several ids none of which
    is this run's: no guess). Empty ids are ignored.
    """
    ids = list(dict.fromkeys(i for i in ids if i))
    for candidate in (run_dir_name, recorded_name):
        if candidate and candidate in ids:
            return candidate
    return ids[0] if len(ids) == 1 else None
