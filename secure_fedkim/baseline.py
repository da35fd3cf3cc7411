"""The single-hospital baseline: each hospital alone, trained exactly as in the federation.

Each hospital trains the same model, from the same seed, for the same epochs (rounds x local epochs) on
its own shards only. With DP on it reuses the noise its federation plan was calibrated with and spends
from a ledger of its own under ``baseline/<hospital>/``; the report composes that spend with the
federation's. Hospitals are independent, so they train in parallel processes, one per core.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from privacy.ledger import PrivacyLedger
from secure_fedkim.artifacts import client_dir
from secure_fedkim.client import _train_plans as train_plans
from secure_fedkim.client import local_round, new_client_model
from secure_fedkim.config import RunConfig
from secure_fedkim.metrics import binary_metrics
from secure_fedkim.plan import build_plan
from secure_fedkim.training import predict_task


def planned_noise(run_dir: Path, client: str) -> float | None:
    """The noise multiplier a hospital calibrated for the federation (from its ledger), if it uses DP."""
    ledger = client_dir(run_dir, client) / "ledger.jsonl"
    plan = PrivacyLedger(ledger).events("dp_plan") if ledger.exists() else []
    return plan[0]["noise_multiplier"] if plan else None


def train_alone(cfg_json: str, run_dir: str, client: str) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """One hospital alone: its test metrics and test probabilities per training task."""
    from secure_fedkim.client_app import hospital_dp

    cfg = RunConfig.model_validate_json(cfg_json)
    plans = build_plan(cfg)
    model = new_client_model(cfg, plans)
    noise = planned_noise(Path(run_dir), client)  # the same schedule and budget: the same calibration
    dp = hospital_dp(cfg, plans, client, Path(run_dir) / "baseline" / client, f"baseline-{client}", noise)
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
    if scores is not None:
        for client in clients:
            scores[client] = results[client][1]
    return {client: results[client][0] for client in clients}
