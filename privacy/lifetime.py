"""A hospital's lifetime privacy loss: every run its ledger records on the same data, composed.

A hospital does not take part in one run: a study, its rerun and the next study on the same records all
release something about the same patients, and their losses compose. :func:`lifetime` reads a hospital's
verified ledger entries (and, where the hospital has them, the ledgers of the single-hospital baseline of
the same runs) and composes, with the same Opacus accountant a run is held to (:func:`privacy.accounting.epsilon`,
PRV by default), the ``dp_round`` histories of every earlier run on the same data and, when a run is being
planned, that run's whole planned schedule (``DPPlan.with_reserved()``). Composition is of the concatenated
steps (heterogeneous composition), never a sum of epsilons.

Which runs count:
  * a run whose ``dataset_commitment`` shares a shard or a data file hash with this run's data (``scope
    "data"``, the default), or every run of the ledger (``scope "all"``: a node whose data grows or is
    re-partitioned, so that equal hashes do not say "same patients");
  * a run with no dataset commitment (a simulation's ledger, or an older node) counts: nothing says it is
    other data;
  * a run's baseline: its ``dp_round`` entries in the baseline ledger given, else, when the run trained and
    its plan reserved baseline steps, the reserved steps (the node cannot show they were not spent).

A run whose commitment says it trained without DP (``"dp": false``) on the same data has no finite epsilon: the
lifetime is then infinite (its patients' records were released without a DP guarantee).

Units: a patient-level step also protects each record of the patient, so the composition of all steps is a
per-record figure; it is per patient only when every counted run was patient-level (``unit``).

What is caught rather than forgotten (:class:`LifetimeIntegrityError`): a run referenced by an earlier
``lifetime_check`` whose rounds are no longer in the ledger (deleted and the chain rebuilt), and a run that
committed its data for DP training but has neither a plan nor a refusal in the ledger. A ledger whose chain
does not verify raises :class:`~privacy.ledger.LedgerTampered` when it is read. What a file alone cannot
show (a wholesale rewrite that also drops the later checks) is caught only against a head recorded elsewhere
(a signed report: ``PrivacyLedger.verify(expected_head=...)``).

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .accounting import Step, epsilon
from .ledger import DATASET_COMMITMENT, DP_PLAN, DP_ROUND, LIFETIME_CHECK, REFUSED
from .plan import DPPlan

__all__ = ["LifetimeIntegrityError", "RunSpend", "Lifetime", "compose", "data_fingerprints", "lifetime",
           "check_integrity", "fmt_eps"]

SCOPES = ("data", "all")


class LifetimeIntegrityError(ValueError):
    """The ledger verifies as a chain but an earlier run it refers to is missing: refused, not forgotten."""


def compose(histories: Iterable[Sequence[Step]], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the concatenation of ``histories`` (heterogeneous composition), by the run's accountant."""
    steps = [s for h in histories for s in h]
    return epsilon(steps, delta, accountant)


def data_fingerprints(tasks: dict | None) -> frozenset[str]:
    """The hashes a ``dataset_commitment``'s ``tasks`` names: each shard's records and each data file."""
    out: set[str] = set()
    for entry in (tasks or {}).values():
        if not isinstance(entry, dict):
            continue
        if entry.get("x_sha256"):
            out.add(str(entry["x_sha256"]))
        out.update(str(v) for v in (entry.get("files_sha256") or {}).values())
    return frozenset(out)


def fmt_eps(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


@dataclass(frozen=True)
class RunSpend:
    """One run of a hospital's ledger, as the lifetime sees it."""

    run_id: str
    steps: tuple[Step, ...]
    epsilon: float  #: this run alone (federation and baseline composed) at the lifetime delta
    rounds: int  #: dp_round entries of the federation
    baseline: str  #: "recorded" (its ledger's rounds), "reserved" (the plan's reservation), or "none"
    data: str  #: "same", "other" (not counted) or "none" (no commitment: counted)
    unit: str = "record"
    counted: bool = True
    last_hash: str | None = None  #: hash of its last dp_round entry (what a lifetime_check refers to)


@dataclass(frozen=True)
class Lifetime:
    """A hospital's lifetime spend: earlier runs on the same data, and this run's plan when one is checked."""

    delta: float
    accountant: str
    cap: float | None
    runs: tuple[RunSpend, ...]  #: every earlier run of the ledger, counted or not, ledger order
    spent: float  #: composition of the counted earlier runs
    current: str | None = None
    planned: float | None = None  #: this run alone (its whole planned schedule, reserved steps included)
    total: float | None = None  #: earlier runs and this run's plan, composed
    unit: str = "record"
    cumulative: tuple[float, ...] = field(default=())  #: lifetime after each counted run, in order

    @property
    def counted(self) -> tuple[RunSpend, ...]:
        return tuple(r for r in self.runs if r.counted)

    @property
    def remaining(self) -> float | None:
        """What the cap leaves after the earlier runs (an upper bound on what one more run can plan)."""
        return None if self.cap is None else self.cap - self.spent

    @property
    def exceeds(self) -> bool:
        """The composed total (or, without a plan, the spend) is above the cap."""
        if self.cap is None:
            return False
        value = self.total if self.total is not None else self.spent
        return value > self.cap * (1 + 1e-12)

    def refusal(self) -> str:
        """One line naming what is left: "lifetime budget 8: 6.2 spent in runs r1, r2; this run plans 3.1 ..."."""
        names = ", ".join(r.run_id for r in self.counted) or "no earlier run"
        left = max(self.remaining or 0.0, 0.0)
        return (f"lifetime budget {self.cap:g} (delta {self.delta:g}, per {self.unit}): {fmt_eps(self.spent)} spent "
                f"in runs {names}; this run plans {fmt_eps(self.planned)}, {fmt_eps(self.total)} composed with them, "
                f"above the cap; {fmt_eps(left)} left")


def _run_ids(entries: Sequence[dict]) -> list[str]:
    ids = [e.get("run_id") for e in entries if e.get("event") in (DP_PLAN, DP_ROUND, DATASET_COMMITMENT)]
    return list(dict.fromkeys(str(i) for i in ids if i))


def _round_steps(entries: Sequence[dict], run_id: str) -> list[Step]:
    out = []
    for e in entries:
        if e.get("event") == DP_ROUND and e.get("run_id") == run_id:
            try:
                out.append(Step(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise LifetimeIntegrityError(
                    f"dp_round entry seq {e.get('seq')} of run {run_id!r} has no valid noise/sample rate/steps: {exc}"
                ) from None
    return out


def check_integrity(entries: Sequence[dict], current: str | None = None) -> None:
    """Raise LifetimeIntegrityError when an earlier run the ledger refers to is missing (see the module doc)."""
    by_hash = {e.get("hash") for e in entries}
    rounds: dict[str, int] = {}
    for e in entries:
        if e.get("event") == DP_ROUND:
            rounds[str(e.get("run_id"))] = rounds.get(str(e.get("run_id")), 0) + 1
    for e in entries:
        if e.get("event") != LIFETIME_CHECK:
            continue
        for ref in e.get("runs") or ():
            rid, n, last = str(ref.get("run_id")), int(ref.get("rounds") or 0), ref.get("last_hash")
            if rounds.get(rid, 0) < n or (last and last not in by_hash):
                raise LifetimeIntegrityError(
                    f"run {rid!r}, counted by the lifetime check of run {e.get('run_id')!r} (seq {e.get('seq')}) with "
                    f"{n} DP round(s), has {rounds.get(rid, 0)} in the ledger now: an earlier run was deleted or edited"
                )
    planned = {str(e.get("run_id")) for e in entries if e.get("event") == DP_PLAN}
    refused = {str(e.get("run_id")) for e in entries if e.get("event") == REFUSED}
    for e in entries:
        rid = str(e.get("run_id"))
        if (e.get("event") == DATASET_COMMITMENT and e.get("dp") and rid != current
                and rid not in planned and rid not in refused):
            raise LifetimeIntegrityError(
                f"run {rid!r} committed its data for DP training (seq {e.get('seq')}) but the ledger holds no plan "
                f"and no refusal of it: its entries were deleted (or the node stopped between the commitment and the "
                f"plan; an operator must inspect the ledger before this node runs again)"
            )


def lifetime(
    entries: Sequence[dict],
    delta: float,
    *,
    accountant: str = "prv",
    cap: float | None = None,
    current: str | None = None,
    planned: Sequence[Step] | None = None,
    planned_unit: str = "record",
    fingerprints: frozenset[str] | None = None,
    baseline_entries: Sequence[Sequence[dict]] = (),
    scope: str = "data",
    cumulative: bool = False,
) -> Lifetime:
    """The lifetime spend of a ledger's runs (see the module doc).

    ``entries``: the hospital's verified ledger entries (``PrivacyLedger.entries()``); ``baseline_entries``:
    those of its baseline ledgers, if it has any. ``current``: the run being checked (left out of the earlier
    runs; its ``planned`` steps are composed on top). ``fingerprints``: this run's data
    (:func:`data_fingerprints` of its commitment); None: the latest committed run's data; empty (this run
    committed nothing): every run counts. ``cumulative``: also compose the lifetime after each counted run.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    check_integrity(entries, current)
    commitments: dict[str, frozenset[str]] = {}
    no_dp_runs: set[str] = set()
    for e in entries:
        if e.get("event") == DATASET_COMMITMENT and e.get("run_id"):
            commitments.setdefault(str(e["run_id"]), data_fingerprints(e.get("tasks")))
            if e.get("dp") is False:
                no_dp_runs.add(str(e["run_id"]))
    if fingerprints is None and commitments:
        fingerprints = list(commitments.values())[-1]
    plans: dict[str, DPPlan] = {}
    for e in entries:
        if e.get("event") == DP_PLAN and e.get("run_id") and str(e["run_id"]) not in plans:
            try:
                plans[str(e["run_id"])] = DPPlan.from_entry(e)
            except ValueError as exc:
                raise LifetimeIntegrityError(str(exc)) from None
    runs: list[RunSpend] = []
    for rid in _run_ids(entries):
        if rid == current:
            continue
        fed = _round_steps(entries, rid)
        last = next((e.get("hash") for e in reversed(entries) if e.get("event") == DP_ROUND and e.get("run_id") == rid), None)
        base = [s for b in baseline_entries for s in _round_steps(b, rid)]
        plan = plans.get(rid)
        how = "recorded" if base else "none"
        if not base and fed and plan is not None and plan.reserved_schedule:
            base = [Step(plan.noise_multiplier, q, n) for q, n in plan.reserved_schedule]
            how = "reserved"
        if rid not in commitments:
            data = "none"
        elif scope == "all" or not fingerprints or commitments[rid] & fingerprints:
            data = "same"
        else:
            data = "other"
        n_rounds = len(fed)
        if not fed and rid in no_dp_runs:  # trained on these records without DP (its commitment says so): no finite epsilon
            fed, how = [Step(0.0, 1.0, 1)], "none"
        steps = tuple(fed + base)
        unit = plan.privacy_unit if plan is not None else "record"
        runs.append(RunSpend(rid, steps, compose([steps], delta, accountant), n_rounds, how, data, unit,
                             counted=data != "other", last_hash=last))
    counted = [r for r in runs if r.counted]
    spent = compose([r.steps for r in counted], delta, accountant)
    units = {r.unit for r in counted if r.steps} | ({planned_unit} if planned else set())
    unit = "patient" if units == {"patient"} else "record"
    steps_so_far: list[Step] = []
    cum = []
    if cumulative:
        for r in counted:
            steps_so_far += r.steps
            cum.append(compose([steps_so_far], delta, accountant))
    mine = total = None
    if planned is not None:
        mine = compose([planned], delta, accountant)
        total = compose([r.steps for r in counted] + [planned], delta, accountant) if counted else mine
    return Lifetime(float(delta), accountant, cap, tuple(runs), spent, current, mine, total, unit, tuple(cum))


def check_entry(lt: Lifetime) -> dict:
    """The fields of the ``lifetime_check`` ledger entry a node writes when it accepts a run."""
    return dict(
        run_id=lt.current,
        cap=lt.cap,
        delta=lt.delta,
        accountant=lt.accountant,
        unit=lt.unit,
        spent=lt.spent if math.isfinite(lt.spent) else None,
        planned=lt.planned if lt.planned is not None and math.isfinite(lt.planned) else None,
        total=lt.total if lt.total is not None and math.isfinite(lt.total) else None,
        runs=[{"run_id": r.run_id, "rounds": r.rounds, "last_hash": r.last_hash, "epsilon": r.epsilon
               if math.isfinite(r.epsilon) else None} for r in lt.counted],
        other_data=[r.run_id for r in lt.runs if not r.counted],
    )
