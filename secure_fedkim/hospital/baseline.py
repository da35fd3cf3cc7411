"""The single-hospital baseline: each hospital alone, trained exactly as in the federation.

Each hospital trains the same model, from the same seed, for the same epochs (rounds x local epochs) on
its own shards only. With DP on it reuses the noise its federation plan was calibrated with and spends
from a ledger of its own under ``baseline/<hospital>/``. Its results are released and it trains the same
records, so its spend composes with the federation's: the federation's plan reserved the baseline's steps
(``client_app.hospital_dp``), so both together stay within the hospital's budget, and a baseline that would
exceed it is not trained. Hospitals are independent, so they train in parallel processes, one per core.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from privacy.accounting import epsilon
from privacy.ledger import DPPlan, PrivacyLedger
from secure_fedkim.hospital.local_training import local_round, new_client_model, train_plans
from secure_fedkim.config import RunConfig
from secure_fedkim.data.formats import DataWarning
from secure_fedkim.metrics import binary_metrics
from secure_fedkim.plan import build_plan
from secure_fedkim.rundir.layout import RunDir
from secure_fedkim.hospital.training import predict_task


def federation_plan(run_dir: Path, client: str) -> DPPlan | None:
    """The DP plan of the run in ``run_dir`` (whose id is the directory's name) in a hospital's federation ledger."""
    ledger = PrivacyLedger(RunDir(run_dir).ledger(client))
    return ledger.plan(run_dir.name) if ledger.path.exists() else None


def planned_noise(run_dir: Path, client: str) -> float | None:
    """The noise multiplier a hospital calibrated for the federation (from its ledger), if it uses DP."""
    plan = federation_plan(run_dir, client)
    return plan.noise_multiplier if plan else None


def fits_the_budget(run_dir: Path, client: str) -> bool:
    """Whether the baseline's whole planned run, composed with what the federation spent on the same records,
    stays within the hospital's budget (the federation's plan gives the noise, schedule, delta and budget)."""
    p = federation_plan(run_dir, client)
    if p is None or not p.dp:
        return True
    spent = PrivacyLedger(RunDir(run_dir).ledger(client)).dp_history(run_dir.name)
    composed = epsilon(spent + p.planned_steps(), p.delta, p.accountant)
    return composed <= p.target_epsilon * (1 + 1e-9)


def privacy_spend(cfg: RunConfig, run_dir: Path) -> dict[str, dict]:
    """Each DP hospital's epsilon from its ledgers: the federation's, the baseline's and both composed (the
    hospital's epsilon for the run: the same records, both results released), with the unit and budget."""
    out = {}
    files = RunDir(run_dir)
    for client in cfg.federation.clients:
        plan = federation_plan(run_dir, client)
        if plan is None or not plan.dp:
            continue
        alone = files.baseline_ledger(client)
        fed_h = PrivacyLedger(files.ledger(client)).dp_history(run_dir.name)
        base_h = PrivacyLedger(alone).dp_history(f"baseline-{client}") if alone.exists() else []
        eps = lambda h: epsilon(h, plan.delta, plan.accountant) if h else 0.0  # noqa: E731
        out[client] = {"unit": plan.privacy_unit, "budget": plan.target_epsilon,
                       "delta": plan.delta, "federation": eps(fed_h), "baseline": eps(base_h),
                       "composed": eps(fed_h + base_h)}
    return out


def format_spend(spend: dict[str, dict]) -> str:
    if not spend:
        return ""
    unit = {s["unit"] for s in spend.values()}
    lines = [f"Privacy spent per hospital (epsilon per {' / '.join(sorted(unit))}, from the ledgers; the federation and "
             f"the single-hospital baseline train the same records, so their spends compose)"]
    for c, s in spend.items():
        lines.append(f"  {c:<22} federation {s['federation']:.3f} + baseline {s['baseline']:.3f} -> {s['composed']:.3f} "
                     f"of budget {s['budget']:g} (delta {s['delta']:.1e})")
    return "\n".join(lines)


def train_alone(cfg_json: str, run_dir: str, client: str) -> tuple[dict[str, dict], dict[str, np.ndarray]] | None:
    """One hospital alone: its test metrics and test probabilities per training task; None when its budget,
    composed with the federation's spend, cannot cover the baseline (nothing is trained or spent)."""
    from secure_fedkim.hospital.client_app import hospital_dp

    cfg = RunConfig.model_validate_json(cfg_json)
    if not fits_the_budget(Path(run_dir), client):
        return None
    plans = build_plan(cfg)
    model = new_client_model(cfg, plans)
    noise = planned_noise(Path(run_dir), client)  # the same schedule and budget: the same calibration
    dp = hospital_dp(cfg, plans, client, RunDir(run_dir).baseline(client).path, f"baseline-{client}", noise)
    for r in range(1, cfg.run.rounds + 1):
        local_round(model, plans, client, cfg, r, dp=dp)
    metrics, probs = {}, {}
    for name, p in train_plans(plans):
        probs[name] = predict_task(model.task_model(name), p.test().x)
        metrics[name] = binary_metrics(p.test().y, probs[name] >= 0.5, probs[name])
    return metrics, probs


def single_hospital_baseline(
    cfg: RunConfig, run_dir: Path, scores: dict | None = None, progress: bool = False, workers: int | None = None
) -> dict[str, dict[str, dict]]:
    """Every hospital alone (see the module docstring): metrics[client][task]. `scores`, when given, receives
    each hospital model's test probabilities: scores[client][task]. `workers`: processes (default: one per
    core, at most one per hospital; 1 trains in this process)."""
    clients = list(cfg.federation.clients)
    workers = workers or max(1, min(os.cpu_count() or 1, len(clients)))
    bar = tqdm(total=len(clients), desc="single-hospital baseline", unit="hospital", disable=not progress)
    results: dict[str, tuple] = {}
    if workers == 1:
        for client in clients:
            results[client] = train_alone(cfg.model_dump_json(), str(run_dir), client)
            bar.update(1)
    else:
        # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), torch.set_num_threads, (1,)) as pool:
            futures = {pool.submit(train_alone, cfg.model_dump_json(), str(run_dir), c): c for c in clients}
            for done in as_completed(futures):
                results[futures[done]] = done.result()
                bar.update(1)
    bar.close()
    for client in [c for c in clients if results[c] is None]:
        warnings.warn(f"{client}: no single-hospital baseline: composed with what the federation spent on the same "
                      f"records it would exceed the hospital's budget", DataWarning, stacklevel=2)
    trained = [c for c in clients if results[c] is not None]
    if scores is not None:
        for client in trained:
            scores[client] = results[client][1]
    return {client: results[client][0] for client in trained}
