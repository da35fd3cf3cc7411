"""`secure-fedkim audit RUN_DIR`: run the configured leakage audits against what a run released.

Targets, per training task: each hospital's final local model (what it sent last) and the global
aggregated model. Audits:

* membership inference (:mod:`attacks.mia`): loss, LiRA online/offline, RMIA online/offline, with K
  reference models the auditor trains like the target;
* a canary DP audit per hospital (:mod:`attacks.dp_audit`): the hospital's training on its shard,
  replayed with canaries and the hospital's DP parameters (from its ledger's plan), giving an empirical
  epsilon lower bound beside the accountant's epsilon for that training;
* update inversion (:mod:`attacks.inversion`) of one record's single-record update of the global model,
  plain and DP, and what the aggregator holds under ``he`` / ``secagg``.

Members and non-members are matched: the same number of each per label, and per site as well when the
task is partitioned by its real sites (``natural``), so that an attack measures membership, not the
difference between one hospital's patients and the pooled test split.

Outputs go to ``RUN_DIR/audit/``: ``audit.json`` and one log-log ROC PNG per (target, task).
:func:`format_audit_table` prints the table (rows: target x attack; columns: AUC, TPR@1%, TPR@0.1%,
empirical epsilon lower bound, accountant epsilon).

What the auditor may see (written into ``audit.json``): the released models (black-box logits for the
MIA); the candidate records (the target's training records and as many held-out test records); the
server's public split and the other part of the test split as population data; the run's config
(architecture, hyperparameters, DP plans in the ledgers). It never uses another hospital's shard to
attack a hospital's local model.

Reading runs goes only through ``secure_fedkim.artifacts.load_run`` (and the ledger files it names).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attacks._training import DPSettings
from attacks.dp_audit import canary_audit
from attacks.inversion import inversion_audit
from attacks.metrics import fpr_key, plot_roc
from attacks.mia import ATTACKS, Records, ReferenceTraining, membership_inference
from privacy.accounting import epsilon
from privacy.ledger import LedgerTampered, PrivacyLedger
from secure_fedkim.artifacts import Run, load_run
from secure_fedkim.config import ConfigError

__all__ = [
    "AuditConfig",
    "AuditConfigError",
    "load_audit_config",
    "audit_run",
    "format_audit_table",
    "ledger_epsilon",
    "AUDITOR_KNOWLEDGE",
]

SCHEMA = "secure-fedkim-audit/1"

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
    attacks: list[Literal["loss", "lira_online", "lira_offline", "rmia", "rmia_offline"]] = Field(
        default_factory=lambda: list(ATTACKS), min_length=1
    )
    reference_models: int = Field(8, ge=1)
    reference_mode: Literal["online", "offline"] = "online"
    reference_epochs: int | None = Field(None, ge=1)  # None: the run's rounds x local_epochs
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
        needs_refs = any(a != "loss" for a in self.attacks)
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
    epochs: int | None = Field(None, ge=1)  # None: the run's rounds x local_epochs
    tasks: list[str] | None = None  # None: every audited task


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

    targets: list[Literal["local", "global"]] = Field(default_factory=lambda: ["local", "global"], min_length=1)
    clients: list[str] | None = None  # None: every hospital of the run
    tasks: list[str] | None = None  # None: every training task of the run
    fprs: list[float] = Field(default_factory=lambda: [0.1, 0.01, 0.001], min_length=1)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    mia: MIASection = MIASection()
    canary: CanarySection = CanarySection()
    inversion: InversionSection = InversionSection()

    @model_validator(mode="after")
    def _check(self):
        bad = [f for f in self.fprs if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"fprs: each target false positive rate must be in (0, 1), got {bad}")
        return self


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_audit_config(data: Any, source: str = "<audit config>") -> AuditConfig:
    """Validate a mapping; one :class:`AuditConfigError` naming ``source`` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AuditConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return AuditConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = _location(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
        head, sep, rest = msg.partition(": ")
        if where and sep and re.fullmatch(r"[a-z_]+", head):  # a section's validator naming its own key
            where, msg = f"{where}.{head}", rest
        raise AuditConfigError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}") from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = AuditConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


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
    """The accountant's epsilon for ``client`` from its ledger (None: no ledger or no DP plan: non-private).

    Uses the last ``dp_plan`` in the ledger (its run id, delta, accountant) and the ``dp_round`` history of
    that run (``PrivacyLedger.dp_history`` + ``privacy.accounting.epsilon``). A ledger that does not
    verify gives ``{"error": ...}`` instead of a number.
    """
    path = run.ledger_path(client)
    if not path.is_file():
        return None
    ledger = PrivacyLedger(path)
    try:
        plans = ledger.events("dp_plan")
        if not plans:
            return None
        plan = plans[-1]
        history = ledger.dp_history(plan["run_id"])
    except LedgerTampered as exc:
        return {"error": f"ledger does not verify: {exc}"}
    eps = epsilon(history, float(plan["delta"]), plan["accountant"])
    return {
        "epsilon": eps if math.isfinite(eps) else None,
        "dp": bool(plan.get("dp", True)),
        "delta": float(plan["delta"]),
        "accountant": plan["accountant"],
        "noise_multiplier": float(plan["noise_multiplier"]),
        "max_grad_norm": float(plan["max_grad_norm"]),
        "target_epsilon": plan.get("target_epsilon"),
        "rounds_recorded": len(history),
        "steps_recorded": sum(s.num_steps for s in history),
        "ledger_run_id": plan["run_id"],
    }


def _dp_settings(acc: dict | None) -> DPSettings | None:
    if not acc or "error" in acc:
        return None
    return DPSettings(acc["noise_multiplier"], acc["max_grad_norm"], None, acc["accountant"])


# ---------------------------------------------------------------------------------------------- helpers


def _model_factory(run: Run, task: str):
    """Fresh task paths of the run's architecture, each initialised from its own seed."""

    def make(seed: int):
        with torch.random.fork_rng(devices=[]):
            model = run.new_model()
            torch.manual_seed(seed)
            for m in model.modules():
                if m is not model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return model.task_model(task)

    return make


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


# ---------------------------------------------------------------------------------------------- main


def audit_run(run_dir: str | Path, config: AuditConfig | None = None, *, progress: bool = True) -> dict:
    """Run the configured audits on a finished run; write ``RUN_DIR/audit/audit.json`` and ROC PNGs.

    Returns the audit as a dict (the content of audit.json). Raises :class:`AuditConfigError` when the
    config names tasks or hospitals the run does not have.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    config = config or AuditConfig()
    run = load_run(run_dir)
    train_tasks = [n for n, p in run.plans.items() if p.task.role == "train"]
    tasks = list(config.tasks) if config.tasks is not None else train_tasks
    unknown = [t for t in tasks if t not in train_tasks]
    if unknown:
        raise AuditConfigError(f"tasks: {unknown} are not training tasks of this run {train_tasks}")
    clients = list(config.clients) if config.clients is not None else run.clients
    unknown = [c for c in clients if c not in run.clients]
    if unknown:
        raise AuditConfigError(f"clients: {unknown} are not hospitals of this run {run.clients}")
    canary_tasks = list(config.canary.tasks) if config.canary.tasks is not None else tasks
    unknown = [t for t in canary_tasks if t not in train_tasks]
    if unknown:
        raise AuditConfigError(f"canary.tasks: {unknown} are not training tasks of this run {train_tasks}")
    out_dir = run.run_dir / "audit"
    out_dir.mkdir(parents=True, exist_ok=True)

    c = run.cfg.client
    total_epochs = run.cfg.run.rounds * c.local_epochs
    accountant = {h: ledger_epsilon(run, h) for h in run.clients}
    aggregation = run.cfg.federation.aggregation
    audit: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "run_dir": str(run.run_dir),
        "run_name": run.cfg.run.name,
        "aggregation": aggregation,
        "config": config.model_dump(),
        "auditor_knowledge": AUDITOR_KNOWLEDGE,
        "accountant": accountant,
        "mia": [],
        "dp_audit": [],
        "reconstruction": [],
        "skipped": [],
    }

    targets: list[tuple[str, str, list[str]]] = []  # (name, kind, hospitals whose records are members)
    if "local" in config.targets:
        targets += [(h, "local", [h]) for h in clients]
    if "global" in config.targets:
        targets.append(("global", "global", run.clients))

    inv_tasks = [t for t in tasks if run.plans[t].task.modality in config.inversion.modalities]
    total = (len(tasks) * len(targets) if config.mia.enabled else 0) + (
        len([t for t in tasks if t in canary_tasks]) * len(clients) if config.canary.enabled else 0
    ) + (len(inv_tasks) * len(clients) if config.inversion.enabled else 0)
    bar = tqdm(total=total, desc="audit", disable=not progress)
    models: dict[str, Any] = {}

    def model_of(name: str, kind: str):
        if name not in models:
            models[name] = run.global_model() if kind == "global" else run.local_model(name)
        return models[name]

    hospital_index = {h: i for i, h in enumerate(run.clients)}
    for ti, task in enumerate(tasks):
        plan = run.plans[task]
        make = _model_factory(run, task)
        nonmembers, population = _auditor_data(run, task, config.mia.nonmember_fraction, config.seed + ti)
        where = _where(run, task)
        if config.mia.enabled:
            for name, kind, holders in targets:
                bar.set_description(f"MIA {name}/{task}")
                pool = _members(run, task, holders)
                members, nonmem, strata = _matched(run, task, pool, nonmembers, config.mia.max_records,
                                                   config.seed + 7 * ti)
                if len(members) < config.mia.min_records:
                    audit["skipped"].append({
                        "what": f"mia {name}/{task}",
                        "why": f"too few candidates: {len(pool)} training records and {len(nonmembers)} held-out "
                               f"records give {len(members)} matched pairs (same {strata}); at least "
                               f"{config.mia.min_records} needed",
                    })
                    bar.update()
                    continue
                try:
                    target = model_of(name, kind)
                except FileNotFoundError as exc:
                    audit["skipped"].append({"what": f"mia {name}/{task}", "why": str(exc)})
                    bar.update()
                    continue
                dps = [_dp_settings(accountant[h]) for h in holders]
                dp = min((d for d in dps if d is not None), key=lambda d: d.noise_multiplier, default=None)
                training = ReferenceTraining(
                    make, train_size=len(pool), epochs=config.mia.reference_epochs or total_epochs,
                    batch_size=c.batch_size, lr=c.lr, max_grad_norm=c.max_grad_norm, dp=dp,
                )
                res = membership_inference(
                    target.task_model(task), members, nonmem, population, training,
                    attacks=config.mia.attacks, num_references=config.mia.reference_models,
                    reference_mode=config.mia.reference_mode, rmia_gamma=config.mia.rmia_gamma,
                    rmia_offline_a=config.mia.rmia_offline_a,
                    per_record_variance_min=config.mia.per_record_variance_min,
                    max_records=config.mia.max_records, seed=config.seed + 1000 * ti, progress=progress,
                    desc=f"reference models {name}/{task}",
                )
                metrics = res.metrics(config.fprs, config.mia.top_k, n_boot=config.mia.bootstrap, seed=config.seed)
                png = out_dir / f"roc_{_safe(name)}_{_safe(task)}.png"
                plot_roc({a: (s, res.labels) for a, s in res.scores.items()}, png,
                         f"{'global model' if kind == 'global' else name + ' local model'} / {task}: "
                         f"{res.details['n_members']} members, "
                         f"{res.details['n_nonmembers']} non-members")
                for attack, m in metrics.items():
                    entry = m.as_dict()
                    entry["top_exposed"] = [
                        {"hospital": where[t["id"]][0], "shard_index": where[t["id"]][1], "score": t["score"]}
                        for t in entry["top_exposed"]
                    ]
                    entry.update(
                        target=name, target_kind=kind,
                        target_artifact="hospital's final local model (encoders + heads)" if kind == "local"
                        else "global aggregated model (encoders + heads)",
                        task=task, modality=plan.task.modality, access="black-box (logits)",
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
                    audit["skipped"].append({"what": f"mia {attack} on {name}/{task}", "why": why})
                bar.update()
        if config.canary.enabled and task in canary_tasks:
            for h in clients:
                bar.set_description(f"canaries {h}/{task}")
                shard = _members(run, task, [h])
                if len(shard) < 2:
                    audit["skipped"].append({"what": f"canary audit {h}/{task}", "why": f"{len(shard)} training records"})
                    bar.update()
                    continue
                acc = accountant[h]
                res = canary_audit(
                    shard, make, epochs=config.canary.epochs or total_epochs, batch_size=c.batch_size, lr=c.lr,
                    dp=_dp_settings(acc), max_grad_norm=c.max_grad_norm, canaries=config.canary.canaries,
                    kind=config.canary.kind, trials=config.canary.trials, pool=population,
                    confidence=config.confidence, seed=config.seed + 17 * ti + 1009 * hospital_index[h],
                    progress=progress,
                    desc=f"canary trainings {h}/{task}",
                )
                res.update(hospital=h, task=task, ledger_epsilon=None if not acc else acc.get("epsilon"))
                audit["dp_audit"].append(res)
                bar.update()
        if config.inversion.enabled and task in inv_tasks:
            try:
                global_model = model_of("global", "global")
            except FileNotFoundError as exc:
                audit["skipped"].append({"what": f"inversion {task}", "why": str(exc)})
                bar.update(len(clients))
                continue
            mean = population.x.mean(axis=0) if len(population) else nonmembers.x.mean(axis=0)
            for h in clients:
                bar.set_description(f"inversion {h}/{task}")
                shard = _members(run, task, [h])
                rng = np.random.default_rng(config.seed + 31 * ti)
                dp = _dp_settings(accountant[h])
                for pos in rng.choice(len(shard), size=min(config.inversion.records, len(shard)), replace=False):
                    rows = inversion_audit(
                        global_model.task_model(task), shard.x[pos], int(shard.y[pos]), mean,
                        max_grad_norm=dp.max_grad_norm if dp else config.inversion.max_grad_norm,
                        noise_multiplier=dp.noise_multiplier if dp else config.inversion.noise_multiplier,
                        loss=config.inversion.loss, optimizer=config.inversion.optimizer,
                        steps=config.inversion.steps, lr=config.inversion.lr, seed=config.seed + int(pos),
                        aggregation=aggregation, min_clients=run.cfg.federation.min_clients,
                    )
                    for r in rows:
                        r.update(hospital=h, task=task, shard_index=int(pos), model="global model (what each client trains from)")
                        if r["update"] == "dp":
                            r["dp_source"] = "the hospital's DP plan" if dp else "illustrative (the hospital trained without DP)"
                    audit["reconstruction"].extend(rows)
                bar.update()
    bar.close()
    audit["seconds"] = time.perf_counter() - t_start
    audit = _jsonable(audit)
    (out_dir / "audit.json").write_text(json.dumps(audit, indent=2, allow_nan=False))
    return audit


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


def format_audit_table(audit: dict) -> str:
    """The audit as a text table: rows target x attack; n, AUC, TPR@1%, TPR@0.1%, eps lower bound, accountant eps."""
    accountant = audit.get("accountant", {})
    rows = []
    for e in audit.get("mia", []):
        if e["target_kind"] == "local":
            acc = _acc_cell(accountant.get(e["target"]))
        else:
            cells = [accountant.get(h) for h in accountant]
            if not cells or any(a is None for a in cells):
                acc = "n/a (non-private)"
            elif any("error" in a for a in cells):
                acc = "ledger does not verify"
            else:
                eps = [a["epsilon"] for a in cells]
                acc = "inf (no noise)" if any(x is None for x in eps) else f"max {max(eps):.3f}"
        rows.append([
            e["target"] if e["target_kind"] == "global" else f"{e['target']} (local)", e["task"], e["attack"],
            str(e["n_members"]), _fmt(e["auc"]), _tpr_cell(e, 0.01), _tpr_cell(e, 0.001), "-", acc,
        ])
    for d in audit.get("dp_audit", []):
        attack = f"canaries ({d['mode'].replace('_', '-')}, {d['canaries']} {d['kind']})"
        lb = max(d["eps_lb"], d.get("eps_lb_one_run") or 0.0)
        lb_cell = f"{lb:.3f}" + ("  DP BUG" if d.get("consistent_with_accountant") is False else "")
        if not d["dp"]:
            acc = "n/a (non-private)"
        else:
            acc = "inf (no noise)" if d["eps_accountant"] is None else f"{d['eps_accountant']:.3f} *"
        rows.append([f"{d['hospital']} (training)", d["task"], attack, str(d["canaries"] * d["trials"]),
                     _fmt(d["canary_auc"]), "-", "-", lb_cell, acc])
    header = ["target", "task", "attack", "n", "AUC", "TPR@1%", "TPR@0.1%", "eps lower bound", "accountant eps"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [f"Leakage audit of {audit.get('run_dir', '?')}", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    notes = []
    if audit.get("dp_audit"):
        notes.append(
            "* canary rows: the accountant's epsilon for the audit's own replay of that hospital's training "
            "(its noise, clip, sample rate and steps); the lower bound is the larger of the Clopper-Pearson "
            f"and one-run bounds at {audit['dp_audit'][0]['confidence']:.0%} confidence."
        )
    notes.append("n: members (= matched non-members) per MIA row; canaries (x trials) per canary row.")
    if any(r[5].startswith("n/a") or r[6].startswith("n/a") for r in rows):
        notes.append("n/a (<N non-m.): too few non-members to measure that FPR; the audit says so instead of a number.")
    notes.append("accountant eps of a local model: the hospital's whole-run spend from its ledger; global: the max over hospitals.")
    recon = [r for r in audit.get("reconstruction", []) if r.get("update") in ("plain", "dp")]
    if recon:
        out.append("")
        out.append("Update inversion (one record's single-record update of the global model; relative MSE 1.0 = prior only)")
        for r in recon:
            seen = "" if r.get("visible", True) else " (not visible to the aggregator)"
            out.append(
                f"  {r['hospital']}/{r['task']} {r['update']:5s} relative MSE {r['relative_mse']:.3f}  "
                f"centered cosine {r['cosine_centered']:.3f}{seen}"
            )
        for r in audit.get("reconstruction", []):
            if r.get("update") in ("he", "secagg"):
                out.append(f"  {r['hospital']}/{r['task']} {r['update']}: {r['note']}")
                break
    for s in audit.get("skipped", []):
        notes.append(f"skipped {s['what']}: {s['why']}")
    return "\n".join(out + [""] + notes)
