"""One federated run, end to end: run directory, Flower simulation, final model, baselines, summary."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from privacy.budget import noise_dominates
from secure_fedkim.rundir.artifacts import save_model
from secure_fedkim.hospital.baseline import (
    planned_noise,
    privacy_spend,
    single_hospital_baseline,
)
from secure_fedkim.config import RunConfig
from secure_fedkim.data.formats import DataWarning
from secure_fedkim.deploy.identity import ensure_signing_key
from secure_fedkim.hospital.local_training import load_plans, new_client_model, train_plans
from secure_fedkim.metrics import bootstrap_aurocs, interval, verdict
from secure_fedkim.plan import TaskPlan
from secure_fedkim.rundir.layout import RunDir
from secure_fedkim.hospital.training import predict_task

if TYPE_CHECKING:
    from secure_fedkim.federation.engine import FederationResult


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    final_test: dict[str, dict]
    single_hospital: dict[str, dict[str, dict]] = field(default_factory=dict)
    # per training task: AUROC with its 95% bootstrap interval for the federated model, each hospital alone
    # and their mean, and the verdict from the interval of the paired difference (see compare_aurocs)
    comparison: dict[str, dict] = field(default_factory=dict)
    # per DP hospital: epsilon of the federation, of the baseline and both composed (baseline.privacy_spend)
    privacy_spend: dict[str, dict] = field(default_factory=dict)
    # per task: the FM before any injection and after the last round, with intervals (compare_injection)
    fm_comparison: dict[str, dict] = field(default_factory=dict)


BOOTSTRAP_RESAMPLES = 1000


def run_dir_path(cfg: RunConfig, out_dir: str | Path | None) -> Path:
    """The run directory a run will write (refused if it exists and is not empty); creates nothing."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out_dir) if out_dir is not None else Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
    if base.exists() and any(base.iterdir()):
        raise FileExistsError(f"run directory {base} already exists and is not empty; choose another --out")
    return base


def make_run_dir(cfg: RunConfig, out_dir: str | Path | None) -> Path:
    base = run_dir_path(cfg, out_dir)
    base.mkdir(parents=True, exist_ok=True)
    return base


def warn_about_data(cfg: RunConfig, plans: dict[str, TaskPlan]) -> None:
    """One line each for federations and shards that run but cannot mean what a user would expect."""
    if any(cfg.dp_profile(c) is not None and not cfg.dp_profile(c).secure_mode for c in cfg.federation.clients):
        warnings.warn("privacy.profile.secure_mode: false: the DP noise and samples come from a generator "
                      "reproducible from the run seed, which is not fit for a release (the report fails it)",
                      DataWarning, stacklevel=2)
    if len(cfg.federation.clients) == 1:
        warnings.warn(f"a one-hospital federation ({cfg.federation.clients[0]}): nothing is aggregated across "
                      f"hospitals, so the federated model is that hospital's own model", DataWarning, stacklevel=2)
    for name, p in plans.items():
        if p.task.role != "train":
            continue
        for client in cfg.federation.clients:
            y = p.shard(client).y
            if len(y) and not y.any():
                warnings.warn(f"task {name!r}: hospital {client!r} has no positive record in its {len(y)}-record "
                              f"shard; it can only learn to answer no", DataWarning, stacklevel=2)


# Opacus's PRV accountant answers with eps_error 0.01: below that it cannot resolve epsilon
PRV_RESOLUTION = 0.01


def _spent(eps: float, prv: bool) -> str:
    return f"<={PRV_RESOLUTION:g} (PRV resolution)" if prv and eps <= PRV_RESOLUTION * 1.05 else format(eps, ".3f")


def format_round_table(server_round: int, record: dict, prv_clients: set[str] = frozenset(), unit: str = "record") -> str:
    test = record["client_model_test"]
    lines = [f"round {server_round}: global client model on held-out test sets"]
    clients = record.get("clients", {})
    private = any("epsilon-spent" in s for s in clients.values())
    lines.append(f"  {'task':<22}{'acc':>7}{'f1':>7}{'auroc':>7}" + ("" if private else "   client train loss"))
    for task, m in test.items():
        losses = "" if private else "   " + " ".join(f"{c}={s.get(task + '.loss', float('nan')):.3f}" for c, s in clients.items())
        lines.append(f"  {task:<22}{m['accuracy']:>7.3f}{m['f1']:>7.3f}{m.get('auroc', float('nan')):>7.3f}{losses}")
    if private:
        spent = ", ".join(
            f"{c}={'skipped (budget)' if s.get('skipped-budget') else _spent(s['epsilon-spent'], c in prv_clients)}"
            for c, s in sorted(clients.items())
        )
        lines.append(f"  epsilon spent (accountant, whole run so far, per {unit}): {spent}")
        if any("epsilon-patient" in s for s in clients.values()):
            patient = ", ".join(
                f"{c}=({s['epsilon-patient']:.2f}, {s['delta-patient']:.1e})" for c, s in sorted(clients.items()) if "epsilon-patient" in s
            )
            lines.append(f"  per patient (group privacy, loose): {patient}")
    if "fm_test" in record:
        inj = record.get("injection", {})
        lines.append(f"  foundation model after injection (loss {inj.get('loss', float('nan')):.3f}), test sets:")
        for task, m in record["fm_test"].items():
            lines.append(f"  {task:<22}{m['accuracy']:>7.3f}{m['f1']:>7.3f}{m.get('auroc', float('nan')):>7.3f}   {m['role']}")
    return "\n".join(lines)


def _simulate(cfg: RunConfig, run_dir: Path, on_round) -> FederationResult:
    from flwr.simulation import run_simulation

    from secure_fedkim.hospital.client_app import app as client_app
    from secure_fedkim.federation.engine import make_server_app, public_only
    from secure_fedkim.federation.transports import transport_for

    if transport_for(cfg).signs_updates and not public_only(cfg):  # FEDKIM_pub: no hospital sends an update
        register_hospitals(cfg, run_dir)
    server_app, outcome = make_server_app(cfg, run_dir, on_round=on_round)
    n = len(cfg.federation.clients)
    cpus = max(1, min(os.cpu_count() or 1, n))
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error", "log_to_driver": False},
        },
    )
    if outcome.error is not None:
        raise outcome.error
    if outcome.result is None:
        raise RuntimeError("the Flower simulation ended without a result; see its log above")
    return outcome.result


def register_hospitals(cfg: RunConfig, run_dir: Path) -> None:
    """Onboarding, as each hospital would do it: make its signing key in its own state dir and hand the
    federation only the public key."""
    files = RunDir(run_dir)
    files.keys_dir.mkdir(exist_ok=True)
    for client in cfg.federation.clients:
        files.public_key(client).write_bytes(ensure_signing_key(files.client(client).path))


def warn_about_noise(cfg: RunConfig, run_dir: Path) -> None:
    """A budget so small that every step is mostly noise: the model will stay near its untrained AUROC."""
    for client in cfg.federation.clients:
        noise = planned_noise(run_dir, client)
        if noise is not None and noise_dominates(noise, cfg.client.batch_size):
            profile = cfg.dp_profile(client)
            warnings.warn(f"{client}: noise multiplier {noise:.3g} for a batch of {cfg.client.batch_size} at epsilon "
                          f"{profile.target_epsilon:g} per {profile.unit}: each step's mean gradient is mostly "
                          f"noise, so the model will likely stay near its untrained AUROC", DataWarning, stacklevel=2)


def compare_aurocs(cfg: RunConfig, plans: dict[str, TaskPlan], federated: dict, alone: dict) -> dict[str, dict]:
    """Per training task: each model's test AUROC with its 95% bootstrap interval (the same resamples of the
    test records for every model, seeded by the run seed), and the verdict on federated - mean alone."""
    out = {}
    clients = list(alone)
    for i, (name, p) in enumerate(train_plans(plans)):
        y = p.test().y
        if len(set(y.tolist())) < 2:
            continue  # no AUROC on a test set with one class
        boots = bootstrap_aurocs(y, [federated[name]] + [alone[c][name] for c in clients],
                                 n_boot=BOOTSTRAP_RESAMPLES, seed=cfg.run.seed * 1009 + i)
        point = [roc_auc_score(y, federated[name])] + [roc_auc_score(y, alone[c][name]) for c in clients]
        mean_boot = boots[:, 1:].mean(axis=1)
        cell = lambda a, b: {"auroc": float(a), "ci95": list(interval(b))}
        out[name] = {
            "federated": cell(point[0], boots[:, 0]),
            "alone": {c: cell(point[j + 1], boots[:, j + 1]) for j, c in enumerate(clients)},
            "mean_alone": cell(np.mean(point[1:]), mean_boot),
            "difference_ci95": list(interval(boots[:, 0] - mean_boot)),
        }
        out[name]["verdict"] = verdict(tuple(out[name]["difference_ci95"]))
    return out


def run_federation(
    cfg: RunConfig, config_text: str, out_dir=None, progress: bool = True, config_path: str | Path | None = None
) -> RunResult:
    from secure_fedkim.federation.engine import write_run_summary

    # At most 2 threads, fewer where the caller set fewer (a study's worker: its share of the cores).
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    # Everything that can be wrong with the config's data is found before anything is written.
    target = run_dir_path(cfg, out_dir)
    plans = load_plans(cfg, config_path, progress)
    warn_about_data(cfg, plans)
    run_dir = make_run_dir(cfg, target)
    files = RunDir(run_dir)
    files.config_yaml.write_text(config_text)
    files.resolved_config.write_text(cfg.model_dump_json(indent=2))
    files.features.write_text(json.dumps(features_record(plans), indent=2))
    started = time.time()

    bar = tqdm(total=cfg.run.rounds, desc="rounds", unit="round", disable=not progress)
    prv = {c for c in cfg.federation.clients if cfg.dp_profile(c) is not None and cfg.dp_profile(c).accountant == "prv"}

    def on_round(server_round: int, record: dict) -> None:
        tqdm.write(format_round_table(server_round, record, prv_clients=prv, unit=cfg.privacy.unit))
        if server_round == 1 and cfg.privacy.dp:
            warn_about_noise(cfg, run_dir)
        if server_round:
            bar.update(1)

    result = _simulate(cfg, run_dir, on_round)
    bar.close()
    model = new_client_model(cfg, plans)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    save_model(model, files.global_model)

    alone_scores: dict = {}
    single = single_hospital_baseline(cfg, run_dir, alone_scores, progress) if cfg.baseline.single_hospital else {}
    comparison = {}
    if single:
        federated = {name: predict_task(model.task_model(name), p.test().x) for name, p in train_plans(plans)}
        comparison = compare_aurocs(cfg, plans, federated, alone_scores)
    history = result.history
    evaluation = {
        "single_hospital_test": single,
        "auroc_comparison": comparison,
        "privacy_spend": privacy_spend(cfg, run_dir),
        "fm_comparison": compare_injection(cfg, plans, run_dir, len(history) - 1),
    }
    write_run_summary(run_dir, config_text, started, result, plans=plans, evaluation=evaluation)
    return RunResult(run_dir, history, history[-1]["client_model_test"], single, comparison,
                     evaluation["privacy_spend"], evaluation["fm_comparison"])


def features_record(plans: dict[str, TaskPlan]) -> dict[str, dict]:
    """What became each task's model input: columns or arrays used, those left out, and the sample shape."""
    return {
        name: {"modality": p.task.modality, "source": p.task.source, "sample_shape": list(p.data.x.shape[1:]),
               "records": len(p.data), **(p.data.inputs or _registry_inputs(name, p.task.modality))}
        for name, p in plans.items()
    }


def _registry_inputs(name: str, modality: str) -> dict:
    from secure_fedkim.data.formats import TS_VARIABLES
    from secure_fedkim.data.loaders import heart_feature_names

    if name == "heart_disease":
        return {"x_columns": heart_feature_names()}
    if modality == "timeseries":
        return {"channels": list(TS_VARIABLES) + [f"{v} missing" for v in TS_VARIABLES]}
    return {}


def format_comparison(result: RunResult) -> str:
    """Federated model vs each hospital alone, per training task: test AUROC [95% bootstrap interval], and
    the verdict from the interval of federated - mean alone on the same resampled records."""
    clients = list(result.single_hospital)
    width = 22
    head = f"{'task':<22}{'federated':>{width}}" + "".join(f"{c[:20]:>{width}}" for c in clients) + f"{'mean alone':>{width}}"
    lines = ["Federated vs single-hospital models: test AUROC [95% bootstrap interval over test records]",
             head + "  federated vs mean alone"]
    cell = lambda m: f"{m['auroc']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
    for task, c in result.comparison.items():
        lines.append(f"{task:<22}{cell(c['federated']):>{width}}" + "".join(f"{cell(c['alone'][h]):>{width}}" for h in clients)
                     + f"{cell(c['mean_alone']):>{width}}  {c['verdict']} "
                     + f"(difference [{c['difference_ci95'][0]:+.2f}, {c['difference_ci95'][1]:+.2f}])")
    skipped = [t for t in result.final_test if t not in result.comparison]
    if skipped:
        lines.append(f"(no AUROC for {skipped}: their test sets hold one class only)")
    return "\n".join(lines)


def compare_injection(cfg: RunConfig, plans: dict[str, TaskPlan], run_dir: Path, last: int) -> dict[str, dict]:
    """Per task: the FM's test AUROC before any injection (round 0) and after round `last`, each with its 95%
    bootstrap interval, and the verdict from the interval of (after - before) on the same resampled records."""
    path = RunDir(run_dir).fm_scores
    if last < 1 or not path.exists():
        return {}
    out = {}
    with np.load(path) as scores:
        for i, (name, p) in enumerate(plans.items()):
            keys = (f"round_000.{name}", f"round_{last:03d}.{name}")
            y = p.test().y
            if not all(k in scores.files for k in keys) or len(set(y.tolist())) < 2:
                continue  # no AUROC on a test set with one class
            before, after = scores[keys[0]], scores[keys[1]]
            boots = bootstrap_aurocs(y, [before, after], n_boot=BOOTSTRAP_RESAMPLES, seed=cfg.run.seed * 1013 + i)
            cell = lambda s, b, y=y: {"auroc": float(roc_auc_score(y, s)), "ci95": list(interval(b))}
            out[name] = {"role": p.task.role, "round_0": cell(before, boots[:, 0]), "injected": cell(after, boots[:, 1]),
                         "difference_ci95": list(interval(boots[:, 1] - boots[:, 0]))}
            out[name]["verdict"] = verdict(tuple(out[name]["difference_ci95"]))
    return out


def format_injection(result: RunResult) -> str:
    """The foundation model after the last round's injection vs the same FM before any injection (round 0:
    FedPlug's starting point, projection untrained), per task: test AUROC [95% bootstrap interval], and the
    verdict from the interval of the paired difference on the same resampled test records."""
    if not result.fm_comparison:
        return ""
    last = len(result.history) - 1
    width = 22
    lines = [f"Foundation model: injected (round {last}) vs without injection (round 0), test AUROC [95% bootstrap interval]",
             f"{'task':<22}{'role':>8}{'round 0':>{width}}{f'round {last}':>{width}}  injected vs round 0"]
    cell = lambda m: f"{m['auroc']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
    for task, c in result.fm_comparison.items():
        d = c["difference_ci95"]
        lines.append(f"{task:<22}{c['role']:>8}{cell(c['round_0']):>{width}}{cell(c['injected']):>{width}}  "
                     f"{c['verdict']} (difference [{d[0]:+.2f}, {d[1]:+.2f}])")
    return "\n".join(lines)
