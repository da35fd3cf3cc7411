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
type, its config section, its threat model and its run function, and (a kind added with
:func:`register_audit_kind`) its report reader, partner view and terminal lines; :func:`audit_run` runs the registry.
audit.json's schema (id, one row type per part, the strict reader the report uses) is :mod:`secure_fedkim.audit_schema`;
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

Reading runs goes only through ``secure_fedkim.rundir.artifacts.load_run`` (and the ledger files it names). The
audit's config is :mod:`attacks.audit_config` and its terminal table :mod:`attacks.audit_table`; both are
importable from here.
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
from pydantic import BaseModel

from attacks._runs import run_id_of, run_plan, task_model_factory
from attacks.dp_audit import canary_audit, replay_batch_size
from attacks.inversion import inversion_audit
from attacks.metrics import fpr_key, holm_bonferroni, plot_roc
from attacks.mechanism import mechanism_for_run
from attacks.runlevel import THREAT_RUN, run_level_audit
from attacks.mia import MIA_ATTACKS, Records, ReferenceTraining, auditor_game, game_models_needed, membership_inference
from attacks.whitebox import WhiteboxSection, whitebox_for_run
from privacy.accounting import epsilon
from privacy.ledger import DP_ROUND, LedgerTampered, PrivacyLedger
from privacy.plan import DPPlan
from secure_fedkim.rundir.artifacts import Run, load_run
from secure_fedkim.audit_schema import (
    DP_AUDIT_ROW, MECHANISM_ROW, MIA_ROW, PARTS, RECONSTRUCTION_ROW, RUNLEVEL_ROW, SCHEMA, WHITEBOX_ROW, RowType,
    check_audit_json, parts, register_part, unregister_part,
)
from secure_fedkim.hospital.local_training import patients_of, task_local_epochs
from attacks.audit_config import (  # noqa: F401 (AuditConfigError, load/parse: the audit's import API)
    SIGNIFICANCE, AuditConfig, AuditConfigError, CanarySection, GameSection, InversionSection, MIASection,
    RunLevelSection, config_model, load_audit_config, parse_audit_config, register_section, unregister_section,
)
from attacks.audit_table import TABLE_LINES, format_audit_table, format_summary  # noqa: F401 (the CLI's import API)

__all__ = [
    "AuditConfig",
    "AuditConfigError",
    "load_audit_config",
    "parse_audit_config",
    "format_summary",
    "audit_run",
    "format_audit_table",
    "ledger_epsilon",
    "mia_summary",
    "AUDITOR_KNOWLEDGE",
    "THREAT_MODELS",
    "AUDIT_KINDS",
    "AuditKind",
    "register_audit_kind",
    "unregister_audit_kind",
]

# What the adversary of each figure sees (every entry of audit.json names one)
THREAT_BLACK_BOX = "black-box final model"
THREAT_EVERY_STEP = "white-box every step"
THREAT_ONE_STEP = "white-box one step"
THREAT_AGGREGATE = "aggregate the server sees"
THREAT_MODELS = (THREAT_BLACK_BOX, THREAT_EVERY_STEP, THREAT_ONE_STEP, THREAT_AGGREGATE, THREAT_RUN)

AUDITOR_KNOWLEDGE = (
    "Black-box (logit) access to each released model; the candidate records (the target's training "
    "records, and as many held-out test records as non-members); population data: the server's public "
    "split and the part of the test split not used as non-members; the run's config and the DP plans in "
    "the hospitals' ledgers. Another hospital's shard is never used against a hospital's local model. "
    "Inversion: white-box access to the global model and to one record's single-record update (worst case)."
)


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
    config = config or parse_audit_config({})
    if not isinstance(config, config_model()):  # an AuditConfig made before a kind was registered: its defaults
        config = parse_audit_config(config.model_dump())
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
        **{part: [] for part in parts()},
    }
    # the white-box job first: it is short, so the long task jobs then share the workers
    white_box = any(k.scope == "hospital" and k.enabled(config, run, None) for k in AUDIT_KINDS)
    whole_run = any(k.scope == "run" and k.enabled(config, run, None) for k in AUDIT_KINDS)
    # the run-level job first (the longest: the whole run re-executed), then the white-box job (short), so the long
    # task jobs then share the workers
    jobs = (([("run", -2, None)] if whole_run else []) + ([("hospital", -1, None)] if white_box else [])
            + [("task", ti, t) for ti, t in enumerate(tasks)])
    workers = min(len(jobs), config.workers or _default_workers())
    if any(k.name not in _BUILT_IN_KINDS for k in AUDIT_KINDS):
        workers = 1  # a registered kind lives in this process only (the pool's processes start without it)
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
        for part in parts():
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


_PARTS = PARTS  # secure_fedkim.audit_schema: the built-in parts of audit.json, in their order (all: parts())


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
    out: dict[str, Any] = {part: [] for part in parts()}
    if kind == "hospital":
        return _hospital_job(run, config, tasks, clients, accountant, out, progress)
    if kind == "run":
        return _run_job(run, config, clients, accountant, out, progress)
    return _task_job(run, config, clients, accountant, out, ti, task, progress)


def _run_job(run: Run, config: AuditConfig, clients: list[str], accountant: dict, out: dict,
             progress: bool) -> tuple[dict, dict]:
    """The run-level job: each run-scope kind once, over the whole run."""
    from tqdm.auto import tqdm

    ctx = _Context(run, config, out, accountant, progress, tqdm(disable=True))
    for k in [k for k in AUDIT_KINDS if k.scope == "run" and k.enabled(config, run, None)]:
        with ctx.timed(k.part, "all"):
            k.run(ctx, clients)
    return out, ctx.cpu_seconds


def _runlevel(ctx, clients: list[str]) -> None:
    """The run re-executed through the hospitals' own code, its randomness tapped (attacks.runlevel): a row per
    audited DP hospital."""
    section = ctx.config.runlevel
    rows = run_level_audit(ctx.run.run_dir, coordinates=section.coordinates, seed=ctx.config.seed,
                           false_alarm=section.false_alarm, canaries=section.canaries,
                           confidence=ctx.config.confidence, progress=ctx.progress)
    ctx.audit["runlevel"].extend(r for r in rows if r["hospital"] in clients)


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

    What a kind brings beyond the audit itself (a kind added with :func:`register_audit_kind`; the built-in kinds'
    are declared in their modules: ``audit_schema.ROW_TYPES``, ``report.build.PART_READERS`` and ``PARTNER_VIEW``,
    ``audit_table``): ``partner_view``, how its part reaches a partner's report (None, the default: never;
    ``"rows"``: the partner's own rows and those naming no hospital, by each report row's ``hospital``; ``"run"``: as
    is, for a part naming no hospital); ``report_reader(section, row, [part, index], row context)``, how the report
    reads a row into the audit section (rows under a key named like the part, each naming its ``hospital``; None: the
    row as written, less its record ids, under the part's own key of the report's audit section, with its
    ``path`` and the ``hospital`` it names); ``table_lines(audit) -> list[str]``, its lines in the terminal's
    audit table (None: none)."""

    name: str
    part: str
    row: RowType
    section: type[BaseModel]
    config_key: str
    threat_model: str | tuple[str, ...]
    scope: Literal["task", "hospital", "run"]
    enabled: Callable[[AuditConfig, Run, str | None], bool]
    run: Callable[..., None]
    units: Callable[[AuditConfig, Run, list[str]], list] = lambda config, run, clients: []
    cpu_part: Callable[[Any], str] = lambda unit: ""
    steps: Callable[[Any], int] = lambda unit: 1
    partner_view: Literal["rows", "run"] | None = None
    report_reader: Callable[[dict, dict, list[str], dict], None] | None = None
    table_lines: Callable[[dict], list[str]] | None = None


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


AUDIT_KINDS: list[AuditKind] = [  # task-scope kinds run in this order in each task's job
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
    AuditKind("runlevel", "runlevel", RUNLEVEL_ROW, RunLevelSection, "runlevel", THREAT_RUN, "run",
              enabled=lambda c, run, task: c.runlevel.enabled and any(run.cfg.dp_profile(h) is not None for h in run.clients),
              run=_runlevel),
]
_BUILT_IN_KINDS = frozenset(k.name for k in AUDIT_KINDS)


def register_audit_kind(kind: AuditKind) -> AuditKind:
    """Add ``kind`` to :data:`AUDIT_KINDS` with everything it owns: its config section (accepted under
    ``config_key`` by :func:`parse_audit_config`, its defaults when absent), its part and row type (written to
    audit.json and checked there, read by the report: ``secure_fedkim.audit_schema.register_part``), its report
    reader and partner view, and its terminal table lines. Refuses, naming what, a kind that is incomplete or
    whose name, part or config key is taken (by a built-in kind or a registered one). A registered kind runs in
    the auditing process itself (``workers`` 1). Returns ``kind``."""
    if not isinstance(kind, AuditKind):
        raise TypeError(f"register_audit_kind: {kind!r} is not an AuditKind")
    name = kind.name
    problems = []
    if not (isinstance(name, str) and name.isidentifier()):
        problems.append(f"name {name!r} is not an identifier")
    if any(k.name == name for k in AUDIT_KINDS):
        problems.append(f"an audit kind named {name!r} is already registered")
    if not isinstance(kind.row, RowType) or kind.row.part != kind.part:
        problems.append(f"row must be a RowType of part {kind.part!r}, not {kind.row!r}")
    if kind.part in parts():
        problems.append(f"audit.json part {kind.part!r} is already written by another kind")
    if not (isinstance(kind.section, type) and issubclass(kind.section, BaseModel)):
        problems.append(f"section must be a pydantic model class, not {kind.section!r}")
    threats = (kind.threat_model,) if isinstance(kind.threat_model, str) else kind.threat_model
    if not threats or not all(isinstance(t, str) and t for t in threats):
        problems.append(f"threat_model must name what its adversary sees, not {kind.threat_model!r}")
    if kind.scope not in ("task", "hospital", "run"):
        problems.append(f"scope must be 'task', 'hospital' or 'run', not {kind.scope!r}")
    for field in ("enabled", "run", "units", "cpu_part", "steps"):
        if not callable(getattr(kind, field)):
            problems.append(f"{field} is not callable")
    if kind.scope == "task" and kind.units is AuditKind.__dataclass_fields__["units"].default:
        problems.append("a task-scope kind needs units(config, run, clients): the units its run is called with")
    if kind.partner_view not in (None, "rows", "run"):
        problems.append(f"partner_view must be None (never), 'rows' or 'run', not {kind.partner_view!r}")
    for field in ("report_reader", "table_lines"):
        if getattr(kind, field) is not None and not callable(getattr(kind, field)):
            problems.append(f"{field} must be callable or None")
    if not problems:
        try:
            register_section(kind.config_key, kind.section)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"audit kind {name!r}: " + "; ".join(problems))
    try:
        register_part(kind.row, kind.partner_view, kind.report_reader)
    except (TypeError, ValueError) as e:
        if not any(k.config_key == kind.config_key for k in AUDIT_KINDS):
            unregister_section(kind.config_key)
        raise ValueError(f"audit kind {name!r}: {e}") from None
    if kind.table_lines is not None:
        TABLE_LINES[name] = kind.table_lines
    AUDIT_KINDS.append(kind)
    return kind


def unregister_audit_kind(name: str) -> None:
    """Forget a kind added with :func:`register_audit_kind` (its part, section and table lines too); a built-in kind
    stays."""
    if name in _BUILT_IN_KINDS:
        raise ValueError(f"audit kind {name!r} is built in")
    kind = next((k for k in AUDIT_KINDS if k.name == name), None)
    if kind is None:
        return
    AUDIT_KINDS.remove(kind)
    TABLE_LINES.pop(name, None)
    unregister_part(kind.part)
    if not any(k.config_key == kind.config_key for k in AUDIT_KINDS):
        unregister_section(kind.config_key)
