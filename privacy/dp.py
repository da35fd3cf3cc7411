"""Per-hospital DP-SGD with Opacus, a budget for the whole run, and the ledger as source of truth.

The calling contract for one round at one hospital (clients may be stateless between rounds, as Flower
ClientApps are; everything is rebuilt from the ledger)::

    dp = HospitalDP(profile, ledger, run_id, round_schedule=[(q, steps)], rounds=R, n_records=n)
    if not dp.can_train():                       # projected spend after this round > budget
        dp.record_skip(round=r)                  # and exclude the client or stop the run (profile.on_exhaustion)
    else:
        model, opt, loader = dp.make_private(model, opt, loader)
        ... train `steps` steps ...
        eps = dp.record_round(round=r, task="ecg", steps=steps, sample_rate=q)   # flushed + fsynced
        release(update)                          # ONLY after record_round returned

The spend is written to the ledger (flushed and fsynced) BEFORE the update leaves the client: a crash
after ``record_round`` and before sending over-counts (safe), never under-counts; a crash before
``record_round`` returns released nothing, so nothing was spent. With several tasks in one round, check
``can_train(whole_round_schedule)`` once, then ``make_private`` / train / ``record_round`` per task. Opacus's ``PrivacyEngine`` is
used per round for clipping, noise and Poisson sampling only; its internal accountant forgets across
rounds and is never used for the run total.

The privacy unit is the record by default. With ``PrivacyProfile(unit="patient")`` it is the patient
(user-level DP-SGD, :mod:`privacy.patient`): ``HospitalDP(..., n_patients=P)`` and
``make_private(..., groups=patient_id_per_record)``; patients are Poisson-sampled with
``q = 1/ceil(P_task/patients_per_batch)`` (:func:`poisson_schedule`), each contributes the clipped sum of at
most ``max_records_per_patient_step`` of its records' gradients, and every epsilon is per patient
(add/remove one patient with all their records).

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Sequence

from .accounting import Step, calibrate_noise, epsilon, gdp_mu, poisson_schedule
from .ledger import DP_PLAN, DP_ROUND, REFUSED, RESUME, SKIPPED_BUDGET, PrivacyLedger
from .plan import DPPlan
from .profile import PRIVACY_UNITS, PrivacyProfile
from .randomness import GAUSSIAN, GENERATOR, REPRODUCIBLE, SECURE, DPRandomness

__all__ = [
    "PrivacyProfile",
    "HospitalDP",
    "BudgetExceeded",
    "DPCompatibilityError",
    "assert_dp_compatible",
    "GRAD_SAMPLE_MODES",
    "PRIVACY_UNITS",
    "poisson_schedule",
    "adjacency_statement",
    "session_randomness",
]

#: Per-sample-gradient modes allowed by :meth:`HospitalDP.make_private`: Opacus's ``"hooks"`` and
#: ``"ghost"``, and ``"lean"`` (:mod:`privacy.fast_dp`: Opacus's per-layer rules, optimizer, Poisson loader
#: and accountant with less per-step Python; the default, falling back to ``"hooks"`` for layers without
#: an Opacus rule).
GRAD_SAMPLE_MODES = ("lean", "hooks", "ghost")
_BUDGET_SLACK = 1e-9


class BudgetExceeded(RuntimeError):
    """A recorded round took the hospital over its budget; the update must not be released."""


class DPCompatibilityError(ValueError):
    """The module has layers Opacus cannot train with DP (e.g. BatchNorm)."""


def assert_dp_compatible(module) -> None:
    """Raise :class:`DPCompatibilityError` unless Opacus can train ``module`` with DP.

    Uses ``opacus.validators.ModuleValidator.validate(module, strict=True)``. BatchNorm is the usual
    culprit (it mixes records within a batch): replace it with GroupNorm or LayerNorm
    (``ModuleValidator.fix`` does this). ``nn.MultiheadAttention`` must become
    ``opacus.layers.DPMultiheadAttention``.
    """
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import UnsupportedError

    try:
        ModuleValidator.validate(module, strict=True)
    except UnsupportedError as exc:
        errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else [exc]
        names = sorted({type(m).__name__ for _, m in module.named_modules() if "BatchNorm" in type(m).__name__})
        hint = (
            f"BatchNorm found ({', '.join(names)}): it is not DP-compatible; use GroupNorm or LayerNorm "
            f"(opacus.validators.ModuleValidator.fix replaces it). "
            if names
            else ""
        )
        details = "; ".join(str(e).split(". ")[0] for e in errors)
        raise DPCompatibilityError(
            f"{type(module).__name__} cannot be trained with DP-SGD by Opacus: {hint}Opacus says: {details}"
        ) from exc


def _schedule(pairs: Sequence[tuple[float, int]], what: str) -> list[tuple[float, int]]:
    out = []
    for item in pairs:
        try:
            q, n = item
        except (TypeError, ValueError):
            raise ValueError(f"{what}: each item must be (sample_rate, steps), got {item!r}") from None
        Step(1.0, float(q), int(n))  # validates
        if int(n) != n:
            raise ValueError(f"{what}: steps must be an integer, got {n!r}")
        out.append((float(q), int(n)))
    return out


def adjacency_statement(unit: str) -> str:
    """The neighbouring relation a run's epsilon is stated under, in words (ledger, report, README)."""
    who = "one patient with all their records" if unit == "patient" else "one record"
    units = "patients" if unit == "patient" else "records"
    return (
        f"add/remove {who}; the number of {units} n at each hospital is public (it sets the sample rate "
        f"q = 1/ceil(n/batch) and the normaliser of each step, and is sent with every round), so the "
        f"guarantee holds given the released count"
    )


def session_randomness(profile: PrivacyProfile, seed: int, *stream: object) -> DPRandomness:
    """The DPRandomness for one training session: secure (keyed from the OS) unless the profile turned
    ``secure_mode`` off, then reproducible from ``seed`` and ``stream`` (name the session: run, hospital,
    round, task), which the ledger records as not fit for a release."""
    return DPRandomness.secure(label=stream) if profile.secure_mode else DPRandomness.reproducible(seed, *stream)


class HospitalDP:
    """One hospital's DP state for one run, rebuilt from its ledger each time it is constructed.

    On the first construction for ``run_id`` it resolves delta, calibrates the noise multiplier once for
    the whole planned run (``round_schedule`` repeated ``rounds`` times) and writes a ``dp_plan`` entry.
    Later constructions (next round, restart after a crash) reuse that entry's noise multiplier and
    delta, so they never change mid-run, and recompute the spend from the ledger's ``dp_round`` entries.

    Args:
        profile: the hospital's :class:`PrivacyProfile`.
        ledger: the hospital's :class:`~privacy.ledger.PrivacyLedger`.
        run_id: identifies the run; spend is accounted per run.
        round_schedule: ``[(sample_rate, steps), ...]`` planned for ONE round (one pair per task or
            local-training block).
        rounds: number of planned rounds.
        n_records: number of records in the hospital's training data (for delta with unit ``"record"``).
        n_patients: number of patients in it; required with unit ``"patient"`` (delta is then resolved on it).
        reserved, reserved_for: ``[(sample_rate, steps), ...]`` that the same records will also take at the
            same noise under another ledger, and what for (e.g. a single-hospital baseline whose results are
            released). The noise is calibrated so that this run and the reserved steps, composed, stay within
            the target; the plan records both (first construction only).
        noise_multiplier: use this sigma instead of calibrating (first construction only). 0 is refused
            unless ``allow_no_noise=True``.
        allow_no_noise: TESTING ONLY: permit sigma = 0 (clipping without noise), e.g. for a non-private
            reference run. That is NOT differential privacy: ledger entries say ``"dp": false`` and
            ``epsilon`` null (infinite); no budget is enforced (:meth:`can_train` is True and
            :meth:`record_round` returns ``inf`` without raising), because no DP guarantee is claimed.
        grad_sample_mode: default mode for :meth:`make_private`: ``"lean"`` (default), ``"hooks"`` or ``"ghost"``.

    Raises:
        ValueError: bad schedule, delta >= 1/n, unreachable target, sigma = 0 without the testing flag,
            unit ``"patient"`` without ``n_patients``, or a profile that contradicts the run's recorded plan
            (delta, accountant, privacy unit, a higher target).
    """

    def __init__(
        self,
        profile: PrivacyProfile,
        ledger: PrivacyLedger,
        run_id: str,
        round_schedule: Sequence[tuple[float, int]],
        rounds: int,
        *,
        n_records: int,
        n_patients: int | None = None,
        reserved: Sequence[tuple[float, int]] = (),
        reserved_for: str | None = None,
        noise_multiplier: float | None = None,
        allow_no_noise: bool = False,
        grad_sample_mode: str = "lean",
    ):
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        self.profile = profile
        self.ledger = ledger
        self.run_id = run_id
        self.round_schedule = _schedule(round_schedule, "round_schedule")
        if not self.round_schedule or sum(n for _, n in self.round_schedule) == 0:
            raise ValueError("round_schedule must plan at least one step")
        self.rounds = rounds
        self.n_records = n_records
        self.reserved = _schedule(reserved, "reserved")
        if self.reserved and not reserved_for:
            raise ValueError("reserved steps need reserved_for: what else will spend this budget on the same records")
        self.reserved_for = reserved_for
        self.unit = profile.unit
        if self.unit == "patient":
            if isinstance(n_patients, bool) or not isinstance(n_patients, int) or n_patients < 1:
                raise ValueError(
                    f"privacy unit 'patient' needs n_patients, the number of patients in the hospital's "
                    f"training data (an integer >= 1), got {n_patients!r}"
                )
            if isinstance(n_records, int) and n_patients > n_records:
                raise ValueError(f"n_patients {n_patients} exceeds n_records {n_records} (a patient has >= 1 record)")
        self.n_patients = n_patients
        self.grad_sample_mode = grad_sample_mode
        self._pending: dict[str, Any] | None = None  # the current make_private session's observed steps

        plan = ledger.plan(run_id)  # the run's first plan: a resumed run keeps it
        if plan is not None:
            self._adopt_plan(plan, noise_multiplier)
        else:
            plan = DPPlan.from_entry(self._make_plan(noise_multiplier, allow_no_noise))
        self.plan: dict = plan.entry  # the ledger entry as written
        self.noise_multiplier: float = plan.noise_multiplier
        self.delta: float = plan.delta
        self.target_epsilon: float = min(plan.target_epsilon, float(profile.target_epsilon))
        self.accountant: str = plan.accountant
        self.max_grad_norm: float = float(profile.max_grad_norm)
        self.is_dp: bool = plan.dp
        if self.noise_multiplier == 0 and not allow_no_noise:
            raise ValueError(
                f"run {run_id!r} was planned with noise_multiplier 0 (not DP); pass allow_no_noise=True "
                f"(testing only) to continue it"
            )

    # ------------------------------------------------------------------ plan
    def _full_schedule(self) -> list[tuple[float, int]]:
        return self.round_schedule * self.rounds

    def _make_plan(self, noise_multiplier: float | None, allow_no_noise: bool) -> dict:
        p = self.profile
        delta = p.resolve_delta(self.n_patients if self.unit == "patient" else self.n_records)
        full = self._full_schedule()
        if noise_multiplier is None:  # the run and what is reserved, composed, within the target
            sigma = calibrate_noise(p.target_epsilon, delta, full + self.reserved, accountant=p.accountant)
            source = "calibrated"
        else:
            sigma = float(noise_multiplier)
            if not math.isfinite(sigma) or sigma < 0:
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
            source = "configured"
        if sigma == 0 and not allow_no_noise:
            raise ValueError(
                "noise_multiplier 0 means clipping without noise, which is not differential privacy; "
                "refused (pass allow_no_noise=True only in tests, and the ledger will say dp: false)"
            )
        history = [Step(sigma, q, n) for q, n in full]
        planned = epsilon(history, delta, p.accountant) if sigma > 0 else math.inf
        import opacus

        fields = dict(
            run_id=self.run_id,
            dp=sigma > 0,
            target_epsilon=float(p.target_epsilon),
            delta=delta,
            delta_default=p.delta is None,
            n_records=self.n_records,
            noise_multiplier=sigma,
            noise_source=source,
            max_grad_norm=float(p.max_grad_norm),
            accountant=p.accountant,
            accountant_library=f"opacus {opacus.__version__}",
            sampling="poisson",
            secure_mode=bool(p.secure_mode),
            randomness=SECURE if p.secure_mode else REPRODUCIBLE,
            randomness_generator=GENERATOR,
            gaussian_sampler=GAUSSIAN,
            on_exhaustion=p.on_exhaustion,
            round_schedule=[list(x) for x in self.round_schedule],
            rounds=self.rounds,
            planned_epsilon=planned if math.isfinite(planned) else None,
            planned_gdp_mu=gdp_mu(history) if sigma > 0 else None,
            privacy_unit=self.unit,
            adjacency=adjacency_statement(self.unit),
        )
        if self.reserved:
            with_reserved = epsilon(history + [Step(sigma, q, n) for q, n in self.reserved], delta, p.accountant)
            fields.update(reserved_schedule=[list(x) for x in self.reserved], reserved_for=self.reserved_for,
                          planned_epsilon_with_reserved=with_reserved if math.isfinite(with_reserved) else None)
        if self.unit == "patient":
            fields.update(n_patients=self.n_patients, max_records_per_patient_step=p.max_records_per_patient_step,
                          clipping="per-patient sum")
        return self.ledger.append(DP_PLAN, **fields)

    def _adopt_plan(self, plan: DPPlan, noise_multiplier: float | None) -> None:
        p = self.profile
        problems = []
        if p.unit != plan.privacy_unit:
            problems.append(f"privacy unit {p.unit!r} != planned {plan.privacy_unit!r}")
        if p.accountant != plan.accountant:
            problems.append(f"accountant {p.accountant!r} != planned {plan.accountant!r}")
        if p.delta is not None and float(p.delta) != plan.delta:
            problems.append(f"delta {p.delta} != planned {plan.delta}")
        if float(p.target_epsilon) > plan.target_epsilon:
            problems.append(
                f"target_epsilon {p.target_epsilon} > planned {plan.target_epsilon} (a budget cannot be raised mid-run)"
            )
        if noise_multiplier is not None and float(noise_multiplier) != plan.noise_multiplier:
            problems.append(f"noise_multiplier {noise_multiplier} != planned {plan.noise_multiplier}")
        if problems:
            raise ValueError(
                f"run {self.run_id!r}: the profile contradicts the DP plan recorded in {self.ledger.path} "
                f"(seq {plan.seq}): " + "; ".join(problems)
            )

    # ------------------------------------------------------------------ accounting
    def history(self) -> list[Step]:
        """This run's accountant history, from the ledger."""
        return self.ledger.dp_history(self.run_id)

    def _eps(self, history: list[Step]) -> float:
        return epsilon(history, self.delta, self.accountant)

    def spent_epsilon(self) -> float:
        """Epsilon spent so far in this run (the ledger's history, the plan's accountant and delta)."""
        return self._eps(self.history())

    def projected_epsilon(self, round_schedule: Sequence[tuple[float, int]] | None = None) -> float:
        """Epsilon after one more round with ``round_schedule`` (default: the planned round)."""
        sched = self.round_schedule if round_schedule is None else _schedule(round_schedule, "round_schedule")
        return self._eps(self.history() + [Step(self.noise_multiplier, q, n) for q, n in sched])

    def remaining_epsilon(self) -> float:
        """``target_epsilon - spent_epsilon()`` (may be negative only if the ledger shows an overspend)."""
        return self.target_epsilon - self.spent_epsilon()

    def can_train(self, round_schedule: Sequence[tuple[float, int]] | None = None) -> bool:
        """Whether the projected spend after this round stays within the budget (target * (1 + 1e-9)).

        Always True for an ``allow_no_noise`` (non-DP) run, which claims no guarantee."""
        if not self.is_dp:  # allow_no_noise testing runs: nothing is claimed, nothing enforced
            return True
        return self.projected_epsilon(round_schedule) <= self.target_epsilon * (1 + _BUDGET_SLACK)

    # ------------------------------------------------------------------ training
    def make_private(
        self,
        module,
        optimizer,
        data_loader,
        *,
        criterion=None,
        groups=None,
        patients_per_batch: int | None = None,
        grad_sample_mode: str | None = None,
        randomness: DPRandomness | None = None,
    ):
        """Wrap model, optimizer and loader with Opacus for one round of DP-SGD.

        Uses ``privacy.fast_dp.LeanPrivacyEngine(accountant=...).make_private``
        (an ``opacus.PrivacyEngine``) with the run's calibrated noise multiplier, ``max_grad_norm``, Poisson
        sampling and ``grad_sample_mode``: ``"lean"`` (default; the same per-sample gradients, clipping,
        noise, Poisson loader and accountant as ``"hooks"`` with less per-step overhead, used when every
        trainable layer has an Opacus per-sample rule, otherwise ``"hooks"``), ``"hooks"``, or ``"ghost"``
        for fast gradient clipping. The mode used is kept in ``self.last_grad_sample_mode``. The optimizer's steps are
        counted so :meth:`record_round` can refuse an understated step count.

        With privacy unit ``"patient"``, ``groups`` (one patient id per record of ``data_loader.dataset``,
        any hashable values, e.g. a numpy array of strings) is required; it is ignored for unit
        ``"record"``. The returned loader (:class:`~privacy.patient.PatientPoissonLoader`) samples each
        patient with ``q = 1/ceil(n/patients_per_batch)`` (n: distinct patients in ``groups``;
        ``patients_per_batch`` defaults to ``data_loader.batch_size``, so the batch size counts patients as
        in :func:`poisson_schedule`), yields ``(xb, yb)`` of at most ``max_records_per_patient_step``
        records per sampled patient, and has ``.sample_rate = q`` (record that in :meth:`record_round`);
        the optimizer clips each patient's summed gradient. ``"ghost"`` cannot clip per patient and is
        refused.

        Every random draw of the session (the Poisson sample of records or patients, the records kept per
        patient, the noise) comes from ``randomness`` (:mod:`privacy.randomness`; default
        ``DPRandomness.secure()``), never from torch's or NumPy's global RNG; :meth:`record_round` writes
        which kind it was and the fingerprints of its noise and samples to the ledger.

        Returns:
            ``(module, optimizer, data_loader)`` for ``"lean"`` and ``"hooks"``; ``(module, optimizer, criterion,
            data_loader)`` for ``"ghost"`` (as Opacus does: compute the loss with the returned criterion).

        Raises:
            DPCompatibilityError: the module has e.g. BatchNorm.
            RuntimeError: a previous make_private session's steps were never recorded.
            ValueError: unit ``"patient"`` with ``groups`` missing, of the wrong length, naming more patients
                than ``n_patients``, or with ``grad_sample_mode="ghost"``.
        """
        from .fast_dp import LEAN_MODE, lean_supported

        mode = self._requested_mode(grad_sample_mode)
        self._check_recorded()
        patient = self._patient_args(data_loader, groups, patients_per_batch, mode)
        randomness = randomness if randomness is not None else DPRandomness.secure()
        assert_dp_compatible(module)
        if mode == LEAN_MODE and not lean_supported(module):
            mode = "hooks"
        self.last_grad_sample_mode = mode
        engine, out = self._opacus_make_private(module, optimizer, data_loader, criterion, mode, randomness, patient)
        self._pending = self._counted_session(out[1], out[-1], randomness)
        self.engine = engine  # kept for inspection; its accountant covers this session only
        return out

    def _requested_mode(self, grad_sample_mode: str | None) -> str:
        mode = grad_sample_mode or self.grad_sample_mode
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
        return mode

    def _check_recorded(self) -> None:
        """Refuse a new session while the previous one's steps are not in the ledger."""
        if self._pending is not None and self._pending["steps"] > 0:
            raise RuntimeError(
                f"{self._pending['steps']} DP-SGD steps from the previous make_private() were never recorded; "
                f"call record_round() before starting another training session"
            )

    def _opacus_make_private(self, module, optimizer, data_loader, criterion, mode: str, randomness, patient: dict):
        """``(engine, LeanPrivacyEngine.make_private(...))`` with the run's noise, clipping and Poisson sampling."""
        import torch.nn as nn

        from .fast_dp import LeanPrivacyEngine

        engine = LeanPrivacyEngine(accountant=self.accountant)
        out = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            data_loader=data_loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            randomness=randomness,
            **patient,
        )
        return engine, out

    def _counted_session(self, dp_optimizer, dp_loader, randomness: DPRandomness) -> dict:
        """The session :meth:`record_round` checks: the optimizer's steps counted by a step hook, which also refuses
        a noise multiplier changed mid-run."""
        session = {"steps": 0, "sample_rate": float(dp_loader.sample_rate), "optimizer": dp_optimizer,
                   "randomness": randomness, "units": len(dp_loader.dataset) if self.unit == "record" else dp_loader.n_patients}
        previous_hook = dp_optimizer.step_hook

        def count_step(optim) -> None:
            if previous_hook is not None:
                previous_hook(optim)
            session["steps"] += 1
            if float(optim.noise_multiplier) != self.noise_multiplier:
                raise RuntimeError(
                    f"the optimizer's noise multiplier changed to {optim.noise_multiplier} mid-run "
                    f"(planned {self.noise_multiplier}); the accounting would be wrong"
                )

        dp_optimizer.attach_step_hook(count_step)
        return session

    def _patient_args(self, data_loader, groups, patients_per_batch, mode: str) -> dict:
        """The patient-level arguments of ``LeanPrivacyEngine.make_private`` (none for unit ``"record"``)."""
        if self.unit != "patient":
            return {}
        if groups is None:
            raise ValueError(
                "privacy unit 'patient' needs groups: one patient id per record of the data loader's dataset"
            )
        import numpy as np

        ids = np.asarray(groups)
        n = len(data_loader.dataset)
        if ids.ndim != 1 or len(ids) != n:
            raise ValueError(f"groups must hold one patient id per record: got shape {ids.shape} for {n} records")
        if len(np.unique(ids)) > self.n_patients:
            raise ValueError(
                f"groups names {len(np.unique(ids))} patients but n_patients is {self.n_patients}; "
                f"n_patients (which sets delta) must count every patient"
            )
        if mode == "ghost":
            raise ValueError("grad_sample_mode 'ghost' cannot clip per patient; use 'lean' or 'hooks'")
        return dict(groups=ids, patients_per_batch=patients_per_batch,
                    max_records_per_patient=self.profile.max_records_per_patient_step)

    def record_round(self, round: int, task: str | None, steps: int, sample_rate: float) -> float:
        """Append this round's ``dp_round`` entry (fsynced) and return epsilon after it.

        CALLING CONTRACT: call this after training and BEFORE releasing the update; release only if it
        returns. The epsilon is computed over the full history of the run from the ledger.

        If :meth:`make_private` was used, ``steps`` must be >= the optimizer steps actually taken and
        ``sample_rate`` >= the Poisson loader's rate (no understated spend; Opacus's loader uses
        ``1/len(loader)``, at most ``batch_size/n``). With privacy unit ``"patient"``, ``sample_rate`` is
        the patients' rate (the patient loader's ``sample_rate``).

        Raises:
            ValueError: bad or understated arguments (nothing is written).
            BudgetExceeded: the entry was written (the spend is real) but epsilon now exceeds the target;
                do not release the update. Call :meth:`can_train` first to avoid this.
        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        step = Step(self.noise_multiplier, float(sample_rate), steps)
        observed = self._pending
        if observed is not None:
            if steps < observed["steps"]:
                raise ValueError(
                    f"record_round(steps={steps}) understates the {observed['steps']} DP-SGD steps the "
                    f"optimizer took since make_private()"
                )
            if float(sample_rate) < observed["sample_rate"] * (1 - 1e-12):
                raise ValueError(
                    f"record_round(sample_rate={sample_rate}) understates the Poisson sample rate "
                    f"{observed['sample_rate']} of the private data loader"
                )
        eps_after = self._eps(self.history() + [step])
        over = self.is_dp and eps_after > self.target_epsilon * (1 + _BUDGET_SLACK)
        self.ledger.append(
            DP_ROUND,
            run_id=self.run_id,
            round=round,
            task=task,
            steps=steps,
            sample_rate=float(sample_rate),
            steps_observed=None if observed is None else observed["steps"],
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            epsilon=eps_after if math.isfinite(eps_after) else None,
            delta=self.delta,
            target_epsilon=self.target_epsilon,
            dp=self.is_dp,
            sampling="poisson",
            privacy_unit=self.unit,
            **({"max_records_per_patient_step": self.profile.max_records_per_patient_step} if self.unit == "patient" else {}),
            **self._randomness_evidence(observed),
            over_budget=over,
        )
        self._pending = None
        if over:
            raise BudgetExceeded(
                f"run {self.run_id!r} round {round}: epsilon {eps_after:.4f} exceeds the budget "
                f"{self.target_epsilon}; the spend is recorded, the update must not be released"
            )
        return eps_after

    @staticmethod
    def _randomness_evidence(session: dict | None) -> dict:
        """What the ledger says of the session's randomness: the generator's kind, and SHA-256 fingerprints of
        the noise and the Poisson samples it drew (compared across rounds, tasks and hospitals by the report;
        equal fingerprints mean repeated randomness). Unknown (None) when no make_private session was used."""
        if session is None:
            return {"randomness": None, "noise_fingerprint": None, "sampling_fingerprint": None, "units": None}
        r: DPRandomness = session["randomness"]
        return {"randomness": r.kind, "noise_fingerprint": r.noise_fingerprint(),
                "sampling_fingerprint": r.sampling_fingerprint(), "units": int(session["units"])}

    # ------------------------------------------------------------------ other events
    def record_skip(self, round: int, task: str | None = None, reason: str = "budget") -> dict:
        """Append a ``skipped_budget`` entry (the hospital does not train this round)."""
        projected = self.projected_epsilon()
        return self.ledger.append(
            SKIPPED_BUDGET,
            run_id=self.run_id,
            round=round,
            task=task,
            reason=reason,
            epsilon_spent=self.spent_epsilon(),
            projected_epsilon=projected if math.isfinite(projected) else None,
            target_epsilon=self.target_epsilon,
            on_exhaustion=self.profile.on_exhaustion,
        )

    def record_refusal(self, round: int, reason: str, **fields: Any) -> dict:
        """Append a ``refused`` entry (e.g. a request that contradicts the hospital's policy)."""
        return self.ledger.append(REFUSED, run_id=self.run_id, round=round, reason=reason, **fields)

    def note_resume(self, **fields: Any) -> dict:
        """Append a ``resume`` entry with the spend restored from the ledger (call after a restart)."""
        history = self.history()
        spent = self._eps(history)
        return self.ledger.append(
            RESUME,
            run_id=self.run_id,
            rounds_recorded=len(history),
            steps_recorded=sum(s.num_steps for s in history),
            epsilon_restored=spent if math.isfinite(spent) else None,
            noise_multiplier=self.noise_multiplier,
            **fields,
        )

    def summary(self) -> dict:
        """Plain dict for reports: plan, spend, remaining, GDP mu (CLT approximation)."""
        history = self.history()
        spent = self._eps(history)
        return {
            "run_id": self.run_id,
            "dp": self.is_dp,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon_budget": self.target_epsilon,
            "epsilon_spent": spent,
            "epsilon_remaining": self.target_epsilon - spent,
            "gdp_mu": gdp_mu(history),
            "rounds_recorded": len(history),
            "privacy_unit": self.unit,
            "profile": asdict(self.profile),
        }
