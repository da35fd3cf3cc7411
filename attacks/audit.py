"""`secure-fedkim audit RUN_DIR`: run the configured leakage audits against what a run released.

Targets, per training task: each hospital's final local model (what it sent last), the global
aggregated model, and the injected foundation model (``fm``: the loss attack on its answer's
probability; skipped with the reason when the run did not save it under ``RUN_DIR/fm/``). Audits:

* membership inference (:mod:`attacks.mia`): loss, LiRA online/offline, RMIA online/offline, with K
  reference models the auditor trains like the target (rounds x the task's own local epochs); each row
  says what its sample can measure (``n_pairs``, ``min_measurable_fpr``, ``tpr_measurable``: a TPR at an
  FPR below 1/non-members is null, never a number) and carries a one-sided p-value for AUC > 0.5
  (Mann-Whitney) with its Holm-Bonferroni adjustment over all MIA rows of the audit (``p_adjusted``;
  ``significant``: adjusted p < 0.05);
* the auditor-controlled game per hospital (:func:`attacks.mia.auditor_game`): K models with the
  hospital's recipe on random halves of its shard, each played as the target against the others, so
  that TPR at 0.1% FPR gets a number and an interval on small shards (K grows until K x n / 2 >=
  ``game.min_nonmember_pairs``, up to ``game.max_models``);
* a black-box canary replay per hospital and task (:mod:`attacks.dp_audit`): the hospital's training of
  that task on its shard, replayed with canaries at the steps and Poisson rate its ledger records and its
  DP plan's noise, clip and delta; the lower bound is checked against the ledger's whole-run epsilon of
  the hospital, and a claim above the largest epsilon the canaries could certify reads ``inconclusive``
  (never a pass), with that maximum in ``reasons``;
* update inversion (:mod:`attacks.inversion`) of one record's single-record update of the global model,
  plain and DP, and what the aggregator holds under ``he`` / ``secagg``.

Members and non-members are matched: the same number of each per label, and per site as well when the
task is partitioned by its real sites (``natural``), so that an attack measures membership, not the
difference between one hospital's patients and the pooled test split.

Each kind of audit is a registered unit (:data:`AUDIT_KINDS`, :class:`AuditKind`): its audit.json part and row
type, its config section, its threat model and its run function; :func:`audit_run` runs the registry. audit.json's
schema (id, one row type per part, the strict reader the report uses) is :mod:`secure_fedkim.audit_schema`;
:func:`audit_run` checks every row against it and refuses to write a row it refuses.

Outputs go to ``RUN_DIR/audit/``: ``audit.json`` and one log-log ROC PNG per (target, task). Every entry
names its ``threat_model`` (:data:`THREAT_MODELS`); ``summary`` has one row per target (the worst row by
the lower end of its AUC interval, and how many rows are significant); ``whitebox`` and ``mechanism`` are
filled by the white-box audits (``attacks.whitebox``, ``attacks.mechanism``); ``cpu_seconds_by_part``
says where the time went. :func:`format_audit_table` prints the summary, then the table (rows: target x
attack; columns: n, AUC [95% interval], TPR@1%, TPR@0.1%, empirical epsilon lower bound and status,
accountant epsilon).

Cost (``cpu_seconds_by_part``): model trainings are most of it: reference models, the game's models and
the canary replays, trained with the hospitals' own DP-SGD step (the fused ``lean`` path). On the demo's
DP run (5 tasks, 4 hospitals, 5 rounds) 640 CPU-s in all: the game 303 (ECG and the image crops 118 and
105: small shards take the most models), local-model MIA 156, global-model MIA 57, canary replays 67,
white-box 24, inversion 10. The jobs (one per task, one for the white-box audits) run in ``workers``
processes (two where two cores are free).

What the auditor may see (written into ``audit.json``): the released models (black-box logits for the
MIA); the candidate records (the target's training records and as many held-out test records); the
server's public split and the other part of the test split as population data; the run's config
(architecture, hyperparameters, DP plans in the ledgers). It never uses another hospital's shard to
attack a hospital's local model.

Reading runs goes only through ``secure_fedkim.artifacts.load_run`` (and the ledger files it names).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import datetime as _dt
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attacks._runs import run_id_of, run_plan, task_model_factory
from attacks.dp_audit import canary_audit, replay_batch_size
from attacks.inversion import inversion_audit
from attacks.metrics import fpr_key, holm_bonferroni, plot_roc
from attacks.mechanism import mechanism_for_run
from attacks.mia import ATTACKS, MIA_ATTACKS, Records, ReferenceTraining, auditor_game, game_models_needed, membership_inference
from attacks.whitebox import WhiteboxSection, whitebox_for_run
from privacy.accounting import epsilon
from privacy.ledger import DP_ROUND, LedgerTampered, PrivacyLedger
from privacy.plan import DPPlan
from secure_fedkim.artifacts import Run, load_run
from secure_fedkim.audit_schema import (
    DP_AUDIT_ROW, MECHANISM_ROW, MIA_ROW, PARTS, RECONSTRUCTION_ROW, SCHEMA, WHITEBOX_ROW, RowType, check_audit_json,
)
from secure_fedkim.local_training import patients_of, task_local_epochs
from secure_fedkim.config import ConfigError
from secure_fedkim.config_errors import validate_mapping

__all__ = [
    "AuditConfig",
    "AuditConfigError",
    "load_audit_config",
    "audit_run",
    "format_audit_table",
    "ledger_epsilon",
    "mia_summary",
    "AUDITOR_KNOWLEDGE",
    "THREAT_MODELS",
    "AUDIT_KINDS",
    "AuditKind",
]

# What the adversary of each figure sees (every entry of audit.json names one)
THREAT_BLACK_BOX = "black-box final model"
THREAT_EVERY_STEP = "white-box every step"
THREAT_ONE_STEP = "white-box one step"
THREAT_AGGREGATE = "aggregate the server sees"
THREAT_MODELS = (THREAT_BLACK_BOX, THREAT_EVERY_STEP, THREAT_ONE_STEP, THREAT_AGGREGATE)
SIGNIFICANCE = 0.05  # family-wise error rate of the MIA rows (Holm-Bonferroni)

AUDITOR_KNOWLEDGE = (
    "Black-box (logit) access to each released model; the candidate records (the target's training "
    "records, and as many held-out test records as non-members); population data: the server's public "
    "split and the part of the test split not used as non-members; the run's config and the DP plans in "
    "the hospitals' ledgers. Another hospital's shard is never used against a hospital's local model. "
    "Inversion: white-box access to the global model and to one record's single-record update (worst case)."
)


class AuditConfigError(ConfigError):
    """A bad audit config; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MIASection(_Strict):
    enabled: bool = True
    attacks: list[Literal[ATTACKS]] = Field(  # attacks.mia.MIA_ATTACKS
        default_factory=lambda: list(ATTACKS), min_length=1
    )
    reference_models: int = Field(4, ge=1)  # 4: references are most of the audit's time (module docstring)
    reference_mode: Literal["online", "offline"] = "online"
    reference_epochs: int | None = Field(None, ge=1)  # None: the run's rounds x the task's local epochs
    nonmember_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # of the test split; the rest is population data
    max_records: int | None = Field(1000, ge=10)  # members (and as many non-members) per target
    min_records: int = Field(10, ge=2)  # a target with fewer candidates is skipped, with the reason
    rmia_gamma: float = Field(1.0, gt=0.0)
    rmia_offline_a: float = Field(0.3, ge=0.0, le=1.0)
    per_record_variance_min: int = Field(32, ge=2)
    top_k: int = Field(10, ge=0)
    bootstrap: int = Field(200, ge=10)

    @model_validator(mode="after")
    def _check(self):
        needs_refs = any(MIA_ATTACKS[a].needs_references for a in self.attacks)
        if needs_refs and self.reference_mode == "online" and (self.reference_models < 2 or self.reference_models % 2):
            raise ValueError(
                f"reference_models: online reference models need an even number >= 2 (each record IN for half "
                f"of them), got {self.reference_models}; use reference_mode: offline for one"
            )
        return self


class CanarySection(_Strict):
    enabled: bool = True
    canaries: int = Field(200, ge=2)
    kind: Literal["ood", "flip"] = "ood"
    trials: int = Field(1, ge=1)  # 1: one-run auditing; more: repeated trainings, pooled
    epochs: int | None = Field(None, ge=1)  # None: the hospital's steps of that task, from its ledger
    tasks: list[str] | None = None  # None: every audited task
    # patient-unit runs only: records of one canary patient (copies of one canary; attacks.dp_audit, step 8);
    # None: the run's max_records_per_patient_step (more than that adds nothing: a step takes at most k)
    records_per_canary_patient: int | None = Field(None, strict=True)

    @model_validator(mode="after")
    def _check(self):
        r = self.records_per_canary_patient
        if r is not None and r < 1:
            raise ValueError(
                f"records_per_canary_patient: must be an integer >= 1 (the records of one canary patient in a "
                f"patient-level run) or null (the run's max_records_per_patient_step), got {r!r}"
            )
        return self


class GameSection(_Strict):
    """The auditor-controlled membership game (attacks.mia.auditor_game), per hospital and task."""

    enabled: bool = True
    min_nonmember_pairs: int = Field(1000, ge=10)  # K x n / 2 non-member pairs wanted: 1000 measures TPR@0.1%
    min_models: int = Field(4, ge=4)
    max_models: int = Field(16, ge=4)  # cost cap: a shard too small for min_nonmember_pairs gets max_models
    epochs: int | None = Field(None, ge=1)  # None: the hospital's own (rounds x the task's local epochs)
    tasks: list[str] | None = None  # None: every audited task

    @model_validator(mode="after")
    def _check(self):
        if self.max_models < self.min_models:
            raise ValueError(f"max_models: must be >= min_models ({self.min_models}), got {self.max_models}")
        return self


class InversionSection(_Strict):
    enabled: bool = True
    records: int = Field(1, ge=1)  # per hospital and task
    modalities: list[Literal["tabular", "timeseries", "signal", "image"]] = ["tabular"]
    loss: Literal["cosine", "l2"] = "cosine"
    optimizer: Literal["adam", "lbfgs"] = "adam"
    steps: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0.0)
    noise_multiplier: float = Field(1.0, gt=0.0)  # for hospitals without DP: what DP-SGD at this noise would do
    max_grad_norm: float = Field(1.0, gt=0.0)


class AuditConfig(_Strict):
    """What `secure-fedkim audit` runs; defaults are configs/audit.yaml's."""

    targets: list[Literal["local", "global", "fm"]] = Field(default_factory=lambda: ["local", "global", "fm"], min_length=1)
    clients: list[str] | None = None  # None: every hospital of the run
    tasks: list[str] | None = None  # None: every training task of the run
    fprs: list[float] = Field(default_factory=lambda: [0.1, 0.01, 0.001], min_length=1)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    workers: int | None = Field(None, ge=1)  # processes, one job per task; None: 2 where 2 cores are free, else 1
    mia: MIASection = MIASection()
    canary: CanarySection = CanarySection()
    game: GameSection = GameSection()
    inversion: InversionSection = InversionSection()
    whitebox: WhiteboxSection = WhiteboxSection()

    @model_validator(mode="after")
    def _check(self):
        bad = [f for f in self.fprs if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"fprs: each target false positive rate must be in (0, 1), got {bad}")
        return self


def parse_audit_config(data: Any, source: str = "<audit config>") -> AuditConfig:
    """Validate a mapping; one :class:`AuditConfigError` naming ``source`` and the key."""
    return validate_mapping(AuditConfig, {} if data is None else data, source, AuditConfigError)


def load_audit_config(path: str | Path | None) -> AuditConfig:
    """Read and validate an audit YAML (``None``: the defaults, as in configs/audit.yaml)."""
    if path is None:
        return AuditConfig()
    path = Path(path)
    if not path.is_file():
        raise AuditConfigError(f"{path}: audit config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AuditConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_audit_config(data, str(path))


# ---------------------------------------------------------------------------------------------- ledger


def ledger_epsilon(run: Run, client: str) -> dict | None:
    """The accountant's whole-run epsilon for ``client`` from its ledger (None: no ledger or no DP plan).

    The run's DP plan is ``PrivacyLedger.plan`` of this run's id (see :func:`attacks._runs.run_id_of`; a resumed
    run keeps its first plan, as :class:`privacy.dp.HospitalDP` does), and the spend is that run's
    ``dp_round`` history (``PrivacyLedger.dp_history`` + ``privacy.accounting.epsilon``). ``tasks`` gives
    each task's recorded steps and Poisson sample rate (for the canary replay). A ledger that does not
    verify, or holds several runs none of which is this one, gives ``{"error": ...}`` instead of a number.
    """
    path = run.ledger_path(client)
    if not path.is_file():
        return None
    ledger = PrivacyLedger(path)
    try:
        plans = ledger.plans()
        if not plans:
            return None
        run_id = run_id_of(run, plans)
        if run_id is None:
            ids = sorted({p.run_id for p in plans})
            return {"error": f"the ledger holds DP plans of runs {ids}, none of them this run ({Path(run.run_dir).name})"}
        plan = ledger.plan(run_id)
        history = ledger.dp_history(run_id)
        rounds = ledger.events(DP_ROUND, run_id)
    except LedgerTampered as exc:
        return {"error": f"ledger does not verify: {exc}"}
    eps = epsilon(history, plan.delta, plan.accountant)
    tasks: dict[str, dict] = {}
    for e in rounds:
        t = tasks.setdefault(str(e.get("task")), {"steps": 0, "sample_rate": 0.0, "rounds": 0})
        t["steps"] += int(e["steps"])
        t["sample_rate"] = max(t["sample_rate"], float(e["sample_rate"]))
        t["rounds"] += 1
    return {
        "epsilon": eps if math.isfinite(eps) else None,
        "dp": plan.dp,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": plan.max_grad_norm,
        "target_epsilon": plan.target_epsilon,
        "rounds_recorded": len(history),
        "steps_recorded": sum(s.num_steps for s in history),
        "tasks": tasks,
        "ledger_run_id": run_id,
        "ledger_plan_seq": plan.seq,
        "privacy_unit": plan.privacy_unit,  # what the epsilon protects (a plan before #18: record)
        **({"n_patients": plan.n_patients, "max_records_per_patient_step": plan.max_records_per_patient_step}
           if plan.privacy_unit == "patient" else {}),
    }


def hospital_plan(run: Run, client: str) -> DPPlan | None:
    """This run's DP plan in ``client``'s ledger (:func:`attacks._runs.run_plan`, the plan :func:`ledger_epsilon`
    reads): what the auditor's replays train with. None without a ledger or a plan of this run, or when the
    ledger does not verify (``ledger_epsilon`` then records why)."""
    path = run.ledger_path(client)
    if not path.is_file():
        return None
    try:
        return run_plan(run, PrivacyLedger(path))
    except LedgerTampered:
        return None


# ---------------------------------------------------------------------------------------------- helpers




def _records(data, ids) -> Records:
    return Records(data.x, data.y, np.asarray(ids, dtype=np.int64))


def _auditor_data(run: Run, task: str, frac: float, seed: int) -> tuple[Records, Records]:
    """(non-members, population): the test split cut in two at random; population = public + the rest."""
    plan = run.plans[task]
    test_idx = np.asarray(plan.split.test, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(test_idx))
    cut = int(round(frac * len(test_idx)))
    non_idx, rest_idx = np.sort(test_idx[perm[:cut]]), np.sort(test_idx[perm[cut:]])
    pub_idx = np.asarray(plan.split.public, dtype=np.int64)
    pop_idx = np.r_[pub_idx, rest_idx]
    return _records(plan.data.subset(non_idx), non_idx), _records(plan.data.subset(pop_idx), pop_idx)


def _members(run: Run, task: str, clients: list[str]) -> Records:
    plan = run.plans[task]
    parts = []
    for c in clients:
        idx = np.asarray(plan.split.clients.get(c, np.zeros(0, np.int64)), dtype=np.int64)
        if len(idx):
            parts.append(_records(plan.data.subset(idx), idx))
    if not parts:
        return Records(plan.data.x[:0], plan.data.y[:0], np.zeros(0, np.int64))
    return Records.concat(parts)


def _matched(run: Run, task: str, members: Records, nonmembers: Records, max_records: int | None, seed: int):
    """Members and non-members with the same composition: per label, and per site too when the task is
    partitioned by its real sites (a hospital's records then differ from the pooled test split by site
    and label mix, and an attack would detect the site, not membership). Equal counts, at most
    ``max_records`` each; returns (members, non-members, the strata used)."""
    plan = run.plans[task]
    entry = next((t for t in run.cfg.tasks.train if t.name == task), None)
    by_site = entry is not None and entry.partition == "natural" and plan.data.site is not None

    def key(r: Records) -> np.ndarray:
        lab = r.y.astype(str)
        return np.char.add(np.char.add(plan.data.site[r.ids].astype(str), "|"), lab) if by_site else lab

    km, kn = key(members), key(nonmembers)
    rng = np.random.default_rng(seed)
    take_m, take_n = [], []
    for k in np.unique(km):
        im, inn = np.flatnonzero(km == k), np.flatnonzero(kn == k)
        n = min(len(im), len(inn))
        take_m.append(rng.choice(im, n, replace=False))
        take_n.append(rng.choice(inn, n, replace=False))
    im, inn = np.concatenate(take_m or [np.zeros(0, np.int64)]), np.concatenate(take_n or [np.zeros(0, np.int64)])
    if max_records is not None and len(im) > max_records:  # keep the composition: same positions in both
        keep = rng.choice(len(im), max_records, replace=False)
        im, inn = im[keep], inn[keep]
    return members.take(np.sort(im)), nonmembers.take(np.sort(inn)), ("site and label" if by_site else "label")


def _where(run: Run, task: str) -> dict[int, tuple[str, int]]:
    """Record index in the task's data -> (hospital, position in its shard)."""
    out = {}
    for c, idx in run.plans[task].split.clients.items():
        for pos, i in enumerate(np.asarray(idx).tolist()):
            out[int(i)] = (c, pos)
    return out


def _exposure_histogram(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Members' percentile among non-member scores (0: below all, 1: above all), as a histogram (no ids)."""
    non = np.sort(scores[labels == 0])
    mem = scores[labels == 1]
    pct = (np.searchsorted(non, mem, "left") + np.searchsorted(non, mem, "right")) / (2.0 * len(non))
    counts, edges = np.histogram(pct, bins=bins, range=(0.0, 1.0))
    return {"percentile_among_nonmembers_bins": edges.round(3).tolist(), "member_counts": counts.tolist()}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _task_epochs(run: Run, task: str) -> int:
    """Epochs a hospital trains ``task`` for over the whole run: rounds x the task's own local epochs."""
    return run.cfg.run.rounds * task_local_epochs(run.cfg, task)


def _hospital_schedule(run: Run, task: str, n_records: int, acc: dict | None) -> dict:
    """How ``task`` was trained at a hospital: the ledger's recorded steps and Poisson rate when it has them,
    else the config's (rounds x the task's local epochs, rate 1/ceil(n/batch))."""
    batch = run.cfg.client.batch_size
    rate = 1.0 / math.ceil(n_records / min(batch, n_records))
    epochs = _task_epochs(run, task)
    recorded = (acc or {}).get("tasks", {}).get(task)
    if recorded and recorded["steps"]:
        rate = recorded["sample_rate"]
        epochs = max(1, round(recorded["steps"] * rate))  # steps = epochs x 1/rate batches
        return {"epochs": epochs, "sample_rate": rate, "steps": recorded["steps"], "source": "ledger"}
    return {"epochs": epochs, "sample_rate": rate, "steps": epochs * round(1 / rate), "source": "config"}


def _fm_scorer(run: Run, task: str):
    """The injected foundation model as a black box for ``task``: records -> logit of its "Yes" answer.

    Needs the adapter the run saved under ``RUN_DIR/fm/`` (FoundationModel.save_adapter) and the global
    model's encoders; raises FileNotFoundError with the reason when the run did not save it."""
    from secure_fedkim.fm import ADAPTER_FILE, FoundationModel
    from secure_fedkim.fm.injection import fm_config

    fm_dir = run.files.fm_dir
    if not run.cfg.injection.enabled:
        raise FileNotFoundError("the run has no knowledge injection, so no injected foundation model")
    if not (fm_dir / ADAPTER_FILE).is_file():
        raise FileNotFoundError(
            f"the run did not save the injected foundation model ({fm_dir / ADAPTER_FILE} is missing; "
            f"`secure-fedkim run` saves it only when it calls FoundationModel.save_adapter)"
        )
    fm = FoundationModel(fm_config(run.cfg.injection, run.cfg.client.token_dim))
    fm.load_adapter(fm_dir)
    encoders = run.global_model().encoders
    spec = run.plans[task].task

    @torch.no_grad()
    def score(x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        _, p = fm.predict(encoders[spec.modality](x), [spec.question] * n, [spec.modality_description] * n,
                          [spec.task_description] * n)
        p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
        return torch.from_numpy(np.log(p) - np.log1p(-p))

    return score


def _skip(audit: dict, what: str, why: str, threat_model: str) -> None:
    audit["skipped"].append({"what": what, "why": why, "threat_model": threat_model})


def _adjust_mia_p_values(rows: list[dict]) -> None:
    """Holm-Bonferroni over every MIA row of the audit (one family): ``p_adjusted``, ``significant``."""
    if not rows:
        return
    adjusted = holm_bonferroni([r["p_value"] for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_adjusted"] = float(p)
        r["significant"] = bool(p < SIGNIFICANCE)


def _summary_target(e: dict) -> str:
    kind = e.get("target_kind")
    if kind == "local":
        return f"{e['target']} local model"
    if kind == "game":
        return f"{e['target']} training recipe (auditor game)"
    return {"global": "global model", "fm": "injected foundation model"}.get(kind, str(e.get("target")))


def _smallest_measured_tpr(e: dict) -> dict | None:
    measured = [(float(k), v) for k, v in (e.get("tpr_at_fpr") or {}).items() if v is not None]
    if not measured:
        return None
    fpr, tpr = min(measured)
    return {"fpr": fpr, "tpr": tpr, "tpr_ci": (e.get("tpr_ci") or {}).get(fpr_key(fpr))}


def mia_summary(rows: list[dict]) -> list[dict]:
    """One row per target: the worst MIA row (highest lower end of the AUC interval) and how many rows are
    significant after the Holm correction."""
    by_target: dict[str, list[dict]] = {}
    for e in rows:
        by_target.setdefault(_summary_target(e), []).append(e)
    out = []
    for target, es in by_target.items():
        ci = lambda e: (e.get("auc_ci") or e.get("auc_ci95") or [e["auc"], e["auc"]])  # noqa: E731
        worst = max(es, key=lambda e: ci(e)[0])
        out.append({
            "target": target,
            "threat_model": worst.get("threat_model", THREAT_BLACK_BOX),
            "worst": {"attack": worst["attack"], "task": worst["task"], "auc": worst["auc"], "auc_ci": list(ci(worst)),
                      "n_pairs": worst.get("n_pairs", worst.get("n_members")),
                      "tpr_at_smallest_measurable_fpr": _smallest_measured_tpr(worst)},
            "significant_rows": sum(1 for e in es if e.get("significant")),
            "rows": len(es),
        })
    return out


# ---------------------------------------------------------------------------------------------- main


def audit_run(run_dir: str | Path, config: AuditConfig | None = None, *, progress: bool = True) -> dict:
    """Run the configured audits on a finished run; write ``RUN_DIR/audit/audit.json`` and ROC PNGs.

    Returns the audit as a dict (the content of audit.json). Raises :class:`AuditConfigError` when the
    config names tasks or hospitals the run does not have. MIA p-values (one-sided, AUC > 0.5) are
    corrected with Holm-Bonferroni over every MIA row of the audit.

    The work is cut into independent jobs (one per task, and the white-box audits) that run in
    ``config.workers`` processes; each job seeds torch's and numpy's global generators from ``config.seed``
    and its own index (the reference models' Poisson sampling and noise draw from them), so the audit is
    the same whichever process runs a job and in whatever order.
    """
    t_start = time.perf_counter()
    config = config or AuditConfig()
    run = load_run(run_dir)
    train_tasks = [n for n, p in run.plans.items() if p.task.role == "train"]
    tasks = _known(config.tasks, train_tasks, train_tasks, "tasks", "training tasks")
    clients = _known(config.clients, run.clients, run.clients, "clients", "hospitals")
    _known(config.canary.tasks, tasks, train_tasks, "canary.tasks", "training tasks")
    _known(config.game.tasks, tasks, train_tasks, "game.tasks", "training tasks")
    if config.whitebox.enabled:
        _known(config.whitebox.tasks, tasks[:1], tasks, "whitebox.tasks", "audited tasks")
        _known(config.whitebox.hospitals, clients, clients, "whitebox.hospitals", "audited hospitals")
    run.files.audit_dir.mkdir(parents=True, exist_ok=True)

    accountant = {h: ledger_epsilon(run, h) for h in run.clients}
    audit: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "run_dir": str(run.run_dir),
        "run_name": run.cfg.run.name,
        "aggregation": run.cfg.federation.aggregation,
        "config": config.model_dump(),
        "auditor_knowledge": AUDITOR_KNOWLEDGE,
        "accountant": accountant,
        **{part: [] for part in _PARTS},
    }
    # the white-box job first: it is short, so the long task jobs then share the workers
    white_box = any(k.scope == "hospital" and k.enabled(config, run, None) for k in AUDIT_KINDS)
    jobs = ([("hospital", -1, None)] if white_box else []) + [("task", ti, t) for ti, t in enumerate(tasks)]
    workers = min(len(jobs), config.workers or _default_workers())
    args = [(run.run_dir, config, tasks, clients, accountant, kind, ti, task) for kind, ti, task in jobs]
    cpu: dict[str, dict[str, float]] = {}
    if workers <= 1:
        results = [_audit_job(*a, progress=progress) for a in args]
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from tqdm.auto import tqdm

        # spawn, as the baseline's pool (a forked child of a process that ran torch's OpenMP pool can hang); one
        # torch thread per worker: two processes x two threads on two cores made the small models' steps spin
        with ProcessPoolExecutor(workers, get_context("spawn"), torch.set_num_threads, (1,)) as pool:
            futures = [pool.submit(_audit_job, *a, progress=False) for a in args]
            results = []
            for f in tqdm(futures, desc=f"audit ({workers} processes, one job per task)", disable=not progress):
                results.append(f.result())
    for part_lists, part_cpu in results:  # job order, whatever process ran each job
        for part in _PARTS:
            audit[part].extend(part_lists[part])
        for part, by_task in part_cpu.items():
            merged = cpu.setdefault(part, {})
            for task, seconds in by_task.items():
                merged[task] = merged.get(task, 0.0) + seconds
    _adjust_mia_p_values(audit["mia"])
    audit["summary"] = mia_summary(audit["mia"])
    audit["seconds"] = time.perf_counter() - t_start
    audit["workers"] = workers
    audit["cpu_seconds_by_part"] = cpu
    audit = _jsonable(audit)
    check_audit_json(audit)  # a row its row type refuses is a bug here: fail before writing, naming part, row, field
    run.files.audit_json.write_text(json.dumps(audit, indent=2, allow_nan=False))
    return audit


_PARTS = PARTS  # secure_fedkim.audit_schema: every part of audit.json, in its order


def _default_workers() -> int:
    """Two processes where two cores are free to this process (a 2-core laptop or CI runner), else one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def _audit_job(run_dir: Path, config: AuditConfig, tasks: list[str], clients: list[str], accountant: dict,
               kind: str, ti: int, task: str | None, *, progress: bool) -> tuple[dict, dict]:
    """One job of :func:`audit_run` (its own process when ``workers`` > 1): the white-box job (``kind ==
    "hospital"``: every hospital-scope kind of :data:`AUDIT_KINDS`) or every task-scope kind on one task.
    Returns (entries by part, CPU seconds by part)."""
    torch.manual_seed(config.seed * 1000 + ti + 1)
    np.random.seed((config.seed * 1000 + ti + 1) % 2**32)
    run = load_run(run_dir)
    out: dict[str, Any] = {part: [] for part in _PARTS}
    if kind == "hospital":
        return _hospital_job(run, config, tasks, clients, accountant, out, progress)
    return _task_job(run, config, clients, accountant, out, ti, task, progress)


def _hospital_job(run: Run, config: AuditConfig, tasks: list[str], clients: list[str], accountant: dict, out: dict,
                  progress: bool) -> tuple[dict, dict]:
    """The white-box job: each hospital-scope kind, hospital by hospital (in registry order for each hospital)."""
    from tqdm.auto import tqdm

    kinds = [k for k in AUDIT_KINDS if k.scope == "hospital" and k.enabled(config, run, None)]
    ctx = _Context(run, config, out, accountant, progress, tqdm(disable=True))
    section = config.whitebox
    # by default one task per hospital: the DP-SGD step under test is the same code for every task, and each
    # hospital's replay takes tens of CPU-seconds at 20,000 canaries (list more tasks to check each one's steps)
    wb_tasks = _known(section.tasks, tasks[:1], tasks, "whitebox.tasks", "audited tasks")
    hospitals = _known(section.hospitals, clients, clients, "whitebox.hospitals", "audited hospitals")
    with ctx.timed("whitebox", "all"):
        for h in hospitals:
            for k in kinds:
                k.run(ctx, h, wb_tasks)
    return out, ctx.cpu_seconds


class _TaskJob(NamedTuple):
    """What every task-scope kind of one task's job shares: the task, its index, the audited hospitals and the
    auditor's data (held-out non-members, population)."""

    ti: int
    task: str
    clients: list[str]
    nonmembers: Records
    population: Records


def _task_job(run: Run, config: AuditConfig, clients: list[str], accountant: dict, out: dict, ti: int, task: str,
              progress: bool) -> tuple[dict, dict]:
    """Every enabled task-scope kind on ``task``: kind by kind in registry order, unit by unit."""
    from tqdm.auto import tqdm

    units = [(k, u) for k in AUDIT_KINDS if k.scope == "task" and k.enabled(config, run, task)
             for u in k.units(config, run, clients)]
    bar = tqdm(total=sum(k.steps(u) for k, u in units), desc=f"audit {task}", disable=not progress)
    ctx = _Context(run, config, out, accountant, progress, bar)
    job = _TaskJob(ti, task, clients, *_auditor_data(run, task, config.mia.nonmember_fraction, config.seed + ti))
    for k, unit in units:
        with ctx.timed(k.cpu_part(unit), task):
            k.run(ctx, job, unit)
    bar.close()
    return out, ctx.cpu_seconds


def _whitebox(ctx, h: str, wb_tasks: list[str]) -> None:
    """Gradient canaries through hospital ``h``'s real DP-SGD step on every chosen task (attacks.whitebox)."""
    section = ctx.config.whitebox
    for ti, task in enumerate(wb_tasks):
        seed = ctx.config.seed + 17 * ti + 1009 * ctx.hospital_index[h]
        try:
            entry = whitebox_for_run(ctx.run, h, task, section, confidence=ctx.config.confidence, seed=seed)
        except LedgerTampered as exc:
            ctx.audit["skipped"].append({"what": f"whitebox {h}/{task}", "why": str(exc), "threat_model": "white-box every step"})
            continue
        if entry is None:
            ctx.audit["skipped"].append({
                "what": f"whitebox {h}/{task}", "threat_model": "white-box every step",
                "why": "no DP plan in the hospital's ledger, no records, or no DP rounds on this task: nothing to check",
            })
        else:
            ctx.audit["whitebox"].append(entry)


def _mechanism(ctx, h: str, wb_tasks: list[str]) -> None:
    """The per-step mechanism audit of hospital ``h``'s DP plan, once, on the first white-box task (attacks.mechanism)."""
    section = ctx.config.whitebox
    if wb_tasks:
        entry = mechanism_for_run(ctx.run, h, wb_tasks[0], trials=section.mechanism_trials,
                                  grad_sample_mode=section.grad_sample_mode, confidence=ctx.config.confidence,
                                  seed=ctx.config.seed)
        if entry is not None:
            ctx.audit["mechanism"].append(entry)


def _known(asked: list[str] | None, default: list[str], allowed: list[str], key: str, what: str) -> list[str]:
    chosen = list(asked) if asked is not None else list(default)
    unknown = [x for x in chosen if x not in allowed]
    if unknown:
        raise AuditConfigError(f"{key}: {unknown} are not {what} of this run {allowed}")
    return chosen


class _Context:
    """What every audit step of one `audit_run` shares: the run, the config, the audit dict, the models."""

    def __init__(self, run: Run, config: AuditConfig, audit: dict, accountant: dict, progress: bool, bar):
        self.run, self.config, self.audit, self.accountant, self.progress, self.bar = run, config, audit, accountant, progress, bar
        self.models: dict[str, Any] = {}
        self.hospital_index = {h: i for i, h in enumerate(run.clients)}
        self.cpu_seconds: dict[str, dict[str, float]] = {}  # part -> task -> CPU seconds (where the time goes)
        self.plans = {h: hospital_plan(run, h) for h in run.clients}

    @contextlib.contextmanager
    def timed(self, part: str, task: str):
        t0 = time.process_time()
        try:
            yield
        finally:
            by_task = self.cpu_seconds.setdefault(part, {})
            by_task[task] = by_task.get(task, 0.0) + time.process_time() - t0

    def model_of(self, name: str, kind: str):
        if name not in self.models:
            self.models[name] = self.run.global_model() if kind == "global" else self.run.local_model(name)
        return self.models[name]

    def dp_of(self, holders: list[str]) -> DPPlan | None:
        """The least noisy DP plan among ``holders`` (what reference models of their target train with)."""
        plans = [self.plans[h] for h in holders]
        return min((p for p in plans if p is not None), key=lambda p: p.noise_multiplier, default=None)


_ARTIFACTS = {
    "local": "hospital's final local model (encoders + heads)",
    "global": "global aggregated model (encoders + heads)",
    "fm": "injected foundation model (its answer per task, through the global encoders)",
}


def _mia_target(ctx: _Context, ti: int, task: str, target: tuple, nonmembers: Records, population: Records) -> None:
    run, config, audit = ctx.run, ctx.config, ctx.audit
    name, kind, holders = target
    ctx.bar.set_description(f"MIA {name}/{task}")
    plan = run.plans[task]
    pool = _members(run, task, holders)
    members, nonmem, strata = _matched(run, task, pool, nonmembers, config.mia.max_records, config.seed + 7 * ti)
    if len(members) < config.mia.min_records:
        _skip(audit, f"mia {name}/{task}",
              f"too few candidates: {len(pool)} training records and {len(nonmembers)} held-out records give "
              f"{len(members)} matched pairs (same {strata}); at least {config.mia.min_records} needed", THREAT_BLACK_BOX)
        ctx.bar.update()
        return
    try:
        scorer = _fm_scorer(run, task) if kind == "fm" else ctx.model_of(name, kind).task_model(task)
    except FileNotFoundError as exc:
        _skip(audit, f"mia {name}/{task}", str(exc), THREAT_BLACK_BOX)
        ctx.bar.update()
        return
    c = run.cfg.client
    dp = ctx.dp_of(holders)
    attacks = config.mia.attacks if kind != "fm" else [a for a in config.mia.attacks if not MIA_ATTACKS[a].needs_references]
    if kind == "fm" and len(attacks) < len(config.mia.attacks):
        _skip(audit, f"mia reference attacks on fm/{task}",
              "reference models of the injected foundation model would each need a federation and an injection; "
              "only the loss attack (its answer's confidence) is run", THREAT_BLACK_BOX)
    if not attacks:
        ctx.bar.update()
        return
    training = ReferenceTraining(
        task_model_factory(run, task), train_size=len(pool), epochs=config.mia.reference_epochs or _task_epochs(run, task),
        batch_size=c.batch_size, lr=c.lr, max_grad_norm=c.max_grad_norm, dp=dp,
    )
    res = membership_inference(
        scorer, members, nonmem, population, training, attacks=attacks,
        num_references=config.mia.reference_models, reference_mode=config.mia.reference_mode,
        rmia_gamma=config.mia.rmia_gamma, rmia_offline_a=config.mia.rmia_offline_a,
        per_record_variance_min=config.mia.per_record_variance_min, max_records=config.mia.max_records,
        seed=config.seed + 1000 * ti, progress=ctx.progress, desc=f"reference models {name}/{task}",
    )
    metrics = res.metrics(config.fprs, config.mia.top_k, n_boot=config.mia.bootstrap, seed=config.seed)
    png = run.files.audit_dir / f"roc_{_safe(name)}_{_safe(task)}.png"
    label = {"global": "global model", "fm": "injected FM"}.get(kind, f"{name} local model")
    plot_roc({a: (s, res.labels) for a, s in res.scores.items()}, png,
             f"{label} / {task}: {res.details['n_members']} members, {res.details['n_nonmembers']} non-members")
    where = _where(run, task)
    for attack, m in metrics.items():
        entry = m.as_dict()
        entry["top_exposed"] = [
            {"hospital": where[t["id"]][0], "shard_index": where[t["id"]][1], "score": t["score"]}
            for t in entry["top_exposed"]
        ]
        entry.update(
            target=name, target_kind=kind, threat_model=THREAT_BLACK_BOX, target_artifact=_ARTIFACTS[kind],
            task=task, modality=plan.task.modality,
            access="black-box (the FM's answer probability)" if kind == "fm" else "black-box (logits)",
            matched_on=strata, training_records=len(pool),
            reference_models=res.details["num_references"] if attack != "loss" else 0,
            reference_mode=res.details["reference_mode"] if attack != "loss" else None,
            reference_dp=None if dp is None or attack == "loss" else {
                "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm},
            per_record_exposure=_exposure_histogram(res.scores[attack], res.labels),
            roc_png=png.name,
        )
        if f"{attack}_variance" in res.details:
            entry["lira_variance"] = res.details[f"{attack}_variance"]
        audit["mia"].append(entry)
    for attack, why in res.skipped.items():
        _skip(audit, f"mia {attack} on {name}/{task}", why, THREAT_BLACK_BOX)
    ctx.bar.update()


def _game(ctx: _Context, ti: int, task: str, h: str) -> None:
    """The auditor-controlled game on hospital ``h``'s shard with its training recipe (attacks.mia.auditor_game)."""
    run, config, audit = ctx.run, ctx.config, ctx.audit
    ctx.bar.set_description(f"auditor game {h}/{task}")
    shard = _members(run, task, [h])
    if len(shard) < config.mia.min_records:
        _skip(audit, f"auditor game {h}/{task}",
              f"{len(shard)} training records; at least {config.mia.min_records} needed", THREAT_BLACK_BOX)
        ctx.bar.update()
        return
    g = config.game
    k = game_models_needed(len(shard), g.min_nonmember_pairs, g.min_models, g.max_models)
    sched = _hospital_schedule(run, task, len(shard), ctx.accountant[h])
    half = max(1, len(shard) // 2)
    c = run.cfg.client
    dp = ctx.plans[h]
    training = ReferenceTraining(
        task_model_factory(run, task), train_size=half, epochs=g.epochs or sched["epochs"],
        batch_size=replay_batch_size(half, sched["sample_rate"]), lr=c.lr, max_grad_norm=c.max_grad_norm, dp=dp,
    )
    entry = auditor_game(shard, training, k, fprs=config.fprs, confidence=config.confidence,
                         per_record_variance_min=config.mia.per_record_variance_min, n_boot=config.mia.bootstrap,
                         seed=config.seed + 3 * ti + 101 * ctx.hospital_index[h], progress=ctx.progress,
                         desc=f"auditor game {h}/{task}")
    entry.update(
        target=h, target_kind="game", threat_model=THREAT_BLACK_BOX,
        target_artifact=f"{k} models the auditor trained with the hospital's recipe, each on a random half of its shard",
        task=task, modality=run.plans[task].task.modality, access="black-box (logits)", matched_on="auditor's coin",
        training_records=half, reference_models=k - 1, reference_mode="online (leave one model out)",
        reference_dp=None if dp is None else {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm},
        game_epochs=training.epochs, game_sample_rate=1.0 / math.ceil(half / training.batch_size),
    )
    audit["mia"].append(entry)
    ctx.bar.update()


def _canary(ctx: _Context, ti: int, task: str, h: str, population: Records) -> None:
    """Black-box canary replay of hospital ``h``'s training of ``task``, checked against its ledger."""
    run, config, audit = ctx.run, ctx.config, ctx.audit
    ctx.bar.set_description(f"canaries {h}/{task}")
    shard = _members(run, task, [h])
    if len(shard) < 2:
        _skip(audit, f"canary audit {h}/{task}", f"{len(shard)} training records", THREAT_BLACK_BOX)
        ctx.bar.update()
        return
    acc = ctx.accountant[h]
    dp, groups = ctx.plans[h], None
    if dp is not None and dp.privacy_unit == "patient":  # canary patients, a bound per patient
        groups = patients_of(run.plans[task].shard(h))  # the same records, in the same order, as `shard`
    sched = _hospital_schedule(run, task, len(shard) if groups is None else len(np.unique(groups)), acc)
    c = run.cfg.client
    res = canary_audit(
        shard, task_model_factory(run, task), epochs=config.canary.epochs or sched["epochs"], batch_size=c.batch_size,
        lr=c.lr, dp=dp, max_grad_norm=c.max_grad_norm, canaries=config.canary.canaries,
        kind=config.canary.kind, trials=config.canary.trials, pool=population, sample_rate=sched["sample_rate"],
        claimed_epsilon=None if not acc else acc.get("epsilon"), confidence=config.confidence,
        seed=config.seed + 17 * ti + 1009 * ctx.hospital_index[h], progress=ctx.progress,
        desc=f"canary trainings {h}/{task}", groups=groups, records_per_canary=config.canary.records_per_canary_patient,
    )
    res.update(hospital=h, task=task, ledger_epsilon=None if not acc else acc.get("epsilon"),
               steps_ledger=sched["steps"] if sched["source"] == "ledger" else None,
               sample_rate_ledger=sched["sample_rate"] if sched["source"] == "ledger" else None,
               replay_schedule_from=sched["source"])
    if acc and "error" in acc:
        res["status"], res["reasons"] = "inconclusive", [f"no accountant epsilon to check: {acc['error']}"]
    audit["dp_audit"].append(res)
    ctx.bar.update()


def _inversion(ctx: _Context, ti: int, task: str, clients: list[str], nonmembers: Records, population: Records) -> None:
    run, config, audit = ctx.run, ctx.config, ctx.audit
    try:
        global_model = ctx.model_of("global", "global")
    except FileNotFoundError as exc:
        _skip(audit, f"inversion {task}", str(exc), THREAT_ONE_STEP)
        ctx.bar.update(len(clients))
        return
    mean = population.x.mean(axis=0) if len(population) else nonmembers.x.mean(axis=0)
    for h in clients:
        ctx.bar.set_description(f"inversion {h}/{task}")
        shard = _members(run, task, [h])
        rng = np.random.default_rng(config.seed + 31 * ti)
        dp = ctx.plans[h]
        for pos in rng.choice(len(shard), size=min(config.inversion.records, len(shard)), replace=False):
            rows = inversion_audit(
                global_model.task_model(task), shard.x[pos], int(shard.y[pos]), mean,
                max_grad_norm=dp.max_grad_norm if dp else config.inversion.max_grad_norm,
                noise_multiplier=dp.noise_multiplier if dp else config.inversion.noise_multiplier,
                loss=config.inversion.loss, optimizer=config.inversion.optimizer,
                steps=config.inversion.steps, lr=config.inversion.lr, seed=config.seed + int(pos),
                aggregation=run.cfg.federation.aggregation, min_clients=run.cfg.federation.min_clients,
            )
            for r in rows:
                r.update(hospital=h, task=task, shard_index=int(pos), model="global model (what each client trains from)",
                         threat_model=THREAT_ONE_STEP if "relative_mse" in r else THREAT_AGGREGATE)
                if r["update"] == "dp":
                    r["dp_source"] = "the hospital's DP plan" if dp else "illustrative (the hospital trained without DP)"
            audit["reconstruction"].extend(rows)
        ctx.bar.update()


# ---------------------------------------------------------------------------------------------- audit kinds


@dataclasses.dataclass(frozen=True)
class AuditKind:
    """One kind of audit as a registered unit (:data:`AUDIT_KINDS`): the audit.json ``part`` its rows go to and
    their ``row`` type (:mod:`secure_fedkim.audit_schema`; :func:`audit_run` checks every row against it before
    writing), its config ``section`` (the class of :class:`AuditConfig`'s field ``config_key``), the
    ``threat_model`` of its figures and the function that runs it.

    ``scope="task"``: in each task's job, ``run(ctx, job, unit)`` once per unit of ``units(config, run, clients)``
    (a target, a hospital, or all hospitals at once), timed as ``cpu_part(unit)`` in ``cpu_seconds_by_part`` and
    counting ``steps(unit)`` on the progress bar. ``scope="hospital"``: in the white-box job, ``run(ctx, hospital,
    tasks)`` once per audited hospital (``whitebox.hospitals``) with the white-box tasks (``whitebox.tasks``).
    ``enabled(config, run, task)``: whether it runs (``task`` is None in the white-box job).

    A new kind is its run function and one line here (a new part also needs its row type in
    ``secure_fedkim.audit_schema.ROW_TYPES`` and its reading in ``secure_fedkim.report.build``)."""

    name: str
    part: str
    row: RowType
    section: type[BaseModel]
    config_key: str
    threat_model: str | tuple[str, ...]
    scope: Literal["task", "hospital"]
    enabled: Callable[[AuditConfig, Run, str | None], bool]
    run: Callable[..., None]
    units: Callable[[AuditConfig, Run, list[str]], list] = lambda config, run, clients: []
    cpu_part: Callable[[Any], str] = lambda unit: ""
    steps: Callable[[Any], int] = lambda unit: 1


def _mia_targets(config: AuditConfig, run: Run, clients: list[str]) -> list[tuple[str, str, list[str]]]:
    """The MIA's targets: (name, kind, hospitals whose records are members)."""
    targets: list[tuple[str, str, list[str]]] = []
    if "local" in config.targets:
        targets += [(h, "local", [h]) for h in clients]
    if "global" in config.targets:
        targets.append(("global", "global", run.clients))
    if "fm" in config.targets:
        targets.append(("fm", "fm", run.clients))
    return targets


def _per_hospital(config: AuditConfig, run: Run, clients: list[str]) -> list[str]:
    return list(clients)


def _chosen(tasks: list[str] | None, task: str | None) -> bool:
    return tasks is None or task in tasks  # None: every audited task


AUDIT_KINDS: tuple[AuditKind, ...] = (  # task-scope kinds run in this order in each task's job
    AuditKind("mia", "mia", MIA_ROW, MIASection, "mia", THREAT_BLACK_BOX, "task",
              enabled=lambda c, run, task: c.mia.enabled, units=_mia_targets, cpu_part=lambda target: f"mia {target[1]}",
              run=lambda ctx, j, target: _mia_target(ctx, j.ti, j.task, target, j.nonmembers, j.population)),
    AuditKind("game", "mia", MIA_ROW, GameSection, "game", THREAT_BLACK_BOX, "task",
              enabled=lambda c, run, task: c.game.enabled and _chosen(c.game.tasks, task), units=_per_hospital,
              cpu_part=lambda h: "game", run=lambda ctx, j, h: _game(ctx, j.ti, j.task, h)),
    AuditKind("canary", "dp_audit", DP_AUDIT_ROW, CanarySection, "canary", THREAT_BLACK_BOX, "task",
              enabled=lambda c, run, task: c.canary.enabled and _chosen(c.canary.tasks, task), units=_per_hospital,
              cpu_part=lambda h: "canary", run=lambda ctx, j, h: _canary(ctx, j.ti, j.task, h, j.population)),
    AuditKind("inversion", "reconstruction", RECONSTRUCTION_ROW, InversionSection, "inversion",
              (THREAT_ONE_STEP, THREAT_AGGREGATE), "task",
              enabled=lambda c, run, task: c.inversion.enabled and run.plans[task].task.modality in c.inversion.modalities,
              units=lambda c, run, clients: [list(clients)], cpu_part=lambda hs: "inversion", steps=len,
              run=lambda ctx, j, hs: _inversion(ctx, j.ti, j.task, hs, j.nonmembers, j.population)),
    AuditKind("whitebox", "whitebox", WHITEBOX_ROW, WhiteboxSection, "whitebox", THREAT_EVERY_STEP, "hospital",
              enabled=lambda c, run, task: c.whitebox.enabled, run=_whitebox),
    AuditKind("mechanism", "mechanism", MECHANISM_ROW, WhiteboxSection, "whitebox", THREAT_ONE_STEP, "hospital",
              enabled=lambda c, run, task: c.whitebox.enabled and c.whitebox.mechanism, run=_mechanism),
)


# ---------------------------------------------------------------------------------------------- table


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tpr_cell(entry: dict, fpr: float) -> str:
    key = fpr_key(fpr)
    v = entry.get("tpr_at_fpr", {}).get(key)
    if v is not None:
        return f"{v:.3f}"
    if key in entry.get("tpr_at_fpr_note", {}):
        return f"n/a (<{math.ceil(1 / fpr - 1e-9)} non-m.)"
    return "-"


def _acc_cell(acc: dict | None) -> str:
    if acc is None:
        return "n/a (non-private)"
    if "error" in acc:
        return "ledger does not verify"
    return "inf (no noise)" if acc.get("epsilon") is None else f"{acc['epsilon']:.3f}"


def _auc_cell(e: dict) -> str:
    ci = e.get("auc_ci") or e.get("auc_ci95")
    cell = _fmt(e["auc"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    return cell + (" *" if e.get("significant") else "")


def _target_cell(e: dict) -> str:
    kind = e.get("target_kind")
    if kind == "local":
        return f"{e['target']} (local)"
    if kind == "game":
        return f"{e['target']} (game)"
    return e["target"]


def _canary_lb_cell(d: dict) -> str:
    lb = max(d["eps_lb"], d.get("eps_lb_one_run") or 0.0)
    status = d.get("status")
    if status is None:  # an audit.json from before statuses
        return f"{lb:.3f}" + ("  DP BUG" if d.get("consistent_with_accountant") is False else "")
    if status == "inconsistent":
        return f"{lb:.3f}  DP BUG (inconsistent)"
    cap = d.get("max_certifiable_epsilon")
    return f"{lb:.3f}  {status}" + (f" (max {cap:.2f})" if cap is not None else "")


def format_summary(audit: dict) -> list[str]:
    """The per-target summary lines (audit.json ``summary``): worst row with its interval, significant rows."""
    rows = audit.get("summary")
    if rows is None:
        return []
    out = ["Summary per target (worst = highest lower end of the AUC's 95% interval; * = significant after Holm)"]
    for r in rows:
        w = r["worst"]
        tpr = w.get("tpr_at_smallest_measurable_fpr")
        tpr_txt = "no TPR measurable" if tpr is None else f"TPR@{tpr['fpr']:g} {tpr['tpr']:.3f}" + (
            f" [{tpr['tpr_ci'][0]:.3f}, {tpr['tpr_ci'][1]:.3f}]" if tpr.get("tpr_ci") else "")
        out.append(
            f"  {r['target']}: worst {w['attack']} on {w['task']}, AUC {w['auc']:.3f} "
            f"[{w['auc_ci'][0]:.3f}, {w['auc_ci'][1]:.3f}] (n={w['n_pairs']}), {tpr_txt}; "
            f"{r['significant_rows']} of {r['rows']} rows significant"
        )
    for d in audit.get("dp_audit", []):
        if d.get("status"):
            unit = f" ({d['epsilon_unit']})" if d.get("epsilon_unit") else ""
            out.append(f"  canary replay {d['hospital']}/{d['task']}{unit}: {d['status']}: {'; '.join(d.get('reasons', []))}")
    return out + [""]


def format_audit_table(audit: dict) -> str:
    """The audit as text: the per-target summary, then the table (rows target x attack; n, AUC with its
    95% interval, TPR@1%, TPR@0.1%, eps lower bound, accountant eps). Reads old audit.json files too."""
    rows = _mia_table_rows(audit) + _canary_table_rows(audit)
    out = [f"Leakage audit of {audit.get('run_dir', '?')}", *format_summary(audit), *_table_lines(rows),
           *_inversion_lines(audit)]
    return "\n".join(out + [""] + _table_notes(audit, rows))


_TABLE_HEADER = ["target", "task", "attack", "n", "AUC", "TPR@1%", "TPR@0.1%", "eps lower bound", "accountant eps"]


def _mia_accountant_cell(e: dict, accountant: dict) -> str:
    """A local model's (or game's) hospital's spend; for the global model and the FM, the max over hospitals."""
    if e["target_kind"] in ("local", "game"):
        return _acc_cell(accountant.get(e["target"]))
    cells = [accountant.get(h) for h in accountant]
    if not cells or any(a is None for a in cells):
        return "n/a (non-private)"
    if any("error" in a for a in cells):
        return "ledger does not verify"
    eps = [a["epsilon"] for a in cells]
    return "inf (no noise)" if any(x is None for x in eps) else f"max {max(eps):.3f}"


def _mia_table_rows(audit: dict) -> list[list[str]]:
    accountant = audit.get("accountant", {})
    return [[_target_cell(e), e["task"], e["attack"], str(e.get("n_pairs", e["n_members"])), _auc_cell(e),
             _tpr_cell(e, 0.01), _tpr_cell(e, 0.001), "-", _mia_accountant_cell(e, accountant)]
            for e in audit.get("mia", [])]


def _canary_table_rows(audit: dict) -> list[list[str]]:
    rows = []
    for d in audit.get("dp_audit", []):
        per = f" patients x{d['records_per_canary']}" if d.get("canary_unit") == "patient" else ""
        attack = f"canaries ({d['mode'].replace('_', '-')}, {d['canaries']} {d['kind']}{per})"
        if not d["dp"]:
            acc = "n/a (non-private)"
        else:
            acc = "inf (no noise)" if d["eps_accountant"] is None else f"{d['eps_accountant']:.3f} *"
        rows.append([f"{d['hospital']} (training)", d["task"], attack, str(d["canaries"] * d["trials"]),
                     _fmt(d["canary_auc"]), "-", "-", _canary_lb_cell(d), acc])
    return rows


def _table_lines(rows: list[list[str]]) -> list[str]:
    """The header, its rule and the rows, each column as wide as its widest cell."""
    widths = [max(len(str(r[i])) for r in rows + [_TABLE_HEADER]) for i in range(len(_TABLE_HEADER))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(_TABLE_HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _inversion_lines(audit: dict) -> list[str]:
    """The update inversions (plain and DP rows), then the transport's row when it has one."""
    recon = [r for r in audit.get("reconstruction", []) if r.get("update") in ("plain", "dp")]
    if not recon:
        return []
    out = ["", "Update inversion (one record's single-record update of the global model; relative MSE 1.0 = prior only)"]
    for r in recon:
        seen = "" if r.get("visible", True) else " (not visible to the aggregator)"
        out.append(
            f"  {r['hospital']}/{r['task']} {r['update']:5s} relative MSE {r['relative_mse']:.3f}  "
            f"centered cosine {r['cosine_centered']:.3f}{seen}"
        )
    for r in audit.get("reconstruction", []):
        if "relative_mse" not in r:  # the transport's row: no single update to invert
            out.append(f"  {r['hospital']}/{r['task']} {r['update']}: {r['note']}")
            break
    return out


def _canary_note(dp_rows: list[dict]) -> str:
    """What the canary rows' accountant epsilon and lower bound are (an audit.json before statuses: the replay's)."""
    new = "status" in dp_rows[0]
    units = sorted({d["epsilon_unit"] for d in dp_rows if d.get("epsilon_unit")})
    return (
        ("* canary rows: the hospital's whole-run epsilon from its ledger; the replay trains the task with "
         "the ledger's steps and sample rate. " if new else
         "* canary rows: the accountant's epsilon for the audit's own replay of that hospital's training "
         "(its noise, clip, sample rate and steps); ")
        + "the lower bound is the larger of the Clopper-Pearson "
        f"and one-run bounds at {dp_rows[0]['confidence']:.0%} confidence"
        + ("; inconclusive (max E): the claim is above the largest epsilon E these canaries can certify." if new else ".")
        + (f" Canary rows' epsilons are {' or '.join(units)}" + (
            "; 'patients xR': each canary is a patient of R records, included or excluded with all of them"
            if "epsilon per patient" in units else "") + "." if units else "")
    )


def _table_notes(audit: dict, rows: list[list[str]]) -> list[str]:
    """The notes under the table: what its columns mean for the rows it has, then what was skipped and why."""
    mia = audit.get("mia", [])
    notes = [_canary_note(audit["dp_audit"])] if audit.get("dp_audit") else []
    notes.append("n: matched member/non-member pairs per MIA row ((model, record) pairs per model in a game row); "
                 "canaries (x trials) per canary row. AUC [95% bootstrap interval].")
    if any(e.get("p_adjusted") is not None for e in mia):
        notes.append(
            f"*: significant after the Holm-Bonferroni correction over all {len(audit['mia'])} MIA rows "
            f"(one-sided Mann-Whitney p-value for AUC > 0.5, adjusted p < {SIGNIFICANCE})."
        )
    if any(e.get("target_kind") == "game" for e in mia):
        notes.append("(game): the auditor's own models trained with the hospital's recipe on random halves of its "
                     "shard, each played as the target against the others (LiRA's experiment).")
    if any(r[5].startswith("n/a") or r[6].startswith("n/a") for r in rows):
        notes.append("n/a (<N non-m.): too few non-members to measure that FPR; the audit says so instead of a number.")
    notes.append("accountant eps of a local model: the hospital's whole-run spend from its ledger; global: the max over hospitals.")
    return notes + [f"skipped {s['what']}: {s['why']}" for s in audit.get("skipped", [])]
