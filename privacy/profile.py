"""A hospital's DP policy for one run (:class:`PrivacyProfile`): what it promises, before anything is trained.

Kept apart from :mod:`privacy.dp` (DP-SGD, Opacus, torch) so that reading a run's config stays cheap: this module
imports only :mod:`privacy.accounting`'s constants, which import no accountant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .accounting import ACCOUNTANTS, resolve_delta

__all__ = ["PrivacyProfile", "PRIVACY_UNITS"]

#: What one epsilon protects: one record, or one patient with all their records.
PRIVACY_UNITS = ("record", "patient")
_ON_EXHAUSTION = ("exclude_client", "stop_run")


@dataclass
class PrivacyProfile:
    """A hospital's DP policy for one run (add/remove adjacency of one privacy unit).

    Attributes:
        target_epsilon: epsilon budget for the WHOLE run (all rounds, all tasks), per privacy unit.
        delta: target delta; ``None`` means the default ``min(1e-5, 1/(10*n))`` for n privacy units
            (records or patients; see :meth:`resolve_delta`).
        max_grad_norm: clipping norm C (of one record's gradient, or of one patient's summed gradient).
        accountant: Opacus accountant, ``"prv"`` (default) or ``"rdp"``.
        secure_mode: draw the noise and the Poisson samples from a secure generator
            (``DPRandomness.secure()``: ChaCha20 keyed from the OS; the default) rather than a reproducible
            one (tests, audits, benches; not fit for a release). Callers pick the session's
            :class:`~privacy.randomness.DPRandomness` from it (:func:`session_randomness`).
        on_exhaustion: what the federation does when a round would exceed the budget:
            ``"exclude_client"`` (the run goes on without this hospital) or ``"stop_run"``.
        unit: the privacy unit, ``"record"`` (default) or ``"patient"`` (patient-level DP-SGD).
        max_records_per_patient_step: with unit ``"patient"``, the most records of one patient used in one
            step (k; a patient with more gets k drawn uniformly without replacement). It bounds compute, not
            privacy: the patient's summed gradient is clipped to C whatever k.
    """

    target_epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    secure_mode: bool = True
    on_exhaustion: str = "exclude_client"
    unit: str = "record"
    max_records_per_patient_step: int = 4

    def __post_init__(self) -> None:
        e = self.target_epsilon
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise ValueError(f"target_epsilon must be a finite number > 0, got {e!r}")
        if self.delta is not None and not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1) or None, got {self.delta!r}")
        c = self.max_grad_norm
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {c!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.on_exhaustion not in _ON_EXHAUSTION:
            raise ValueError(f"on_exhaustion must be one of {_ON_EXHAUSTION}, got {self.on_exhaustion!r}")
        if self.unit not in PRIVACY_UNITS:
            raise ValueError(f"unit (the privacy unit) must be one of {PRIVACY_UNITS}, got {self.unit!r}")
        k = self.max_records_per_patient_step
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"max_records_per_patient_step must be an integer >= 1, got {k!r}")

    def resolve_delta(self, n_units: int) -> float:
        """The delta to use for a dataset of ``n_units`` privacy units (records, or patients).

        Default (``delta=None``): ``min(1e-5, 1/(10*n))``. A configured delta >= 1/n raises ValueError
        naming delta, n and 1/n.
        """
        return resolve_delta(self.delta, n_units)
