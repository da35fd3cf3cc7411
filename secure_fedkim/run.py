"""One federated run, end to end: run directory, Flower simulation, final model, baselines, summary."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from flwr.app import ArrayRecord

from privacy.ledger import PrivacyLedger
from secure_fedkim.artifacts import client_dir, save_model
from secure_fedkim.client import local_round, new_client_model
from secure_fedkim.config import RunConfig, config_sha256
from secure_fedkim.identity import ensure_signing_key
from secure_fedkim.plan import build_plan
from secure_fedkim.training import evaluate_task


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    final_test: dict[str, dict]
    single_hospital: dict[str, dict[str, dict]] = field(default_factory=dict)


def make_run_dir(cfg: RunConfig, out_dir: str | Path | None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out_dir) if out_dir is not None else Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
    if base.exists() and any(base.iterdir()):
        raise FileExistsError(f"run directory {base} already exists and is not empty; choose another --out")
    base.mkdir(parents=True, exist_ok=True)
    return base


def format_round_table(server_round: int, record: dict) -> str:
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
            f"{c}={'skipped (budget)' if s.get('skipped-budget') else format(s['epsilon-spent'], '.3f')}"
            for c, s in sorted(clients.items())
        )
        lines.append(f"  epsilon spent (accountant, whole run so far, per record): {spent}")
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


def _simulate(cfg: RunConfig, run_dir: Path, on_round) -> tuple[dict, list[dict], dict]:
    from flwr.simulation import run_simulation

    from secure_fedkim.federation.engine import make_server_app
    from secure_fedkim.federation.transports import transport_for

    transport = transport_for(cfg)
    if transport.signs_updates:
        register_hospitals(cfg, run_dir)
    server_app, outcome = make_server_app(cfg, run_dir, on_round=on_round)
    n = len(cfg.federation.clients)
    cpus = max(1, min(os.cpu_count() or 1, n))
    run_simulation(
        server_app=server_app,
        client_app=transport.client_app(),
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
    result = outcome.result
    return result.arrays.to_torch_state_dict(), result.history, result.aggregation


def register_hospitals(cfg: RunConfig, run_dir: Path) -> None:
    """Onboarding, as each hospital would do it: make its signing key in its own state dir and hand the
    federation only the public key."""
    keys = run_dir / "keys"
    keys.mkdir(exist_ok=True)
    for client in cfg.federation.clients:
        (keys / f"{client}.pub").write_bytes(ensure_signing_key(client_dir(run_dir, client)))


def _public_only(cfg: RunConfig, run_dir: Path, on_round) -> tuple[dict, list[dict], dict]:
    """FEDKIM_pub: no hospital takes part; the server trains encoders and M3OE on its public split alone."""
    from secure_fedkim.federation.strategy import FedKIM
    from secure_fedkim.fm.injection import Injector

    plans = build_plan(cfg)
    strategy = FedKIM(cfg, plans, run_dir, on_round=on_round, injector=Injector(cfg, plans))
    model = new_client_model(cfg, plans)
    strategy.evaluate(0, ArrayRecord(model.state_dict()))
    for r in range(1, cfg.run.rounds + 1):
        strategy.public_only_round(r, model)
    return model.state_dict(), strategy.history, strategy.transport.facts()


def single_hospital_baseline(cfg: RunConfig, run_dir: Path) -> dict[str, dict[str, dict]]:
    """Each hospital alone: the same model, seed, epochs (rounds x local epochs) and privacy budget, on its
    own shards only (with DP on, it spends its budget from a ledger of its own under baseline/)."""
    from secure_fedkim.client_app import hospital_dp

    plans = build_plan(cfg)
    out: dict[str, dict[str, dict]] = {}
    for client in cfg.federation.clients:
        model = new_client_model(cfg, plans)
        federation_ledger = client_dir(run_dir, client) / "ledger.jsonl"
        plan = PrivacyLedger(federation_ledger).events("dp_plan") if federation_ledger.exists() else []
        noise = plan[0]["noise_multiplier"] if plan else None  # same schedule and budget: same calibration
        dp = hospital_dp(cfg, plans, client, run_dir / "baseline" / client, f"baseline-{client}", noise)
        for r in range(1, cfg.run.rounds + 1):
            local_round(model, plans, client, cfg, r, dp=dp)
        out[client] = {
            name: evaluate_task(model.task_model(name), p.test().x, p.test().y)
            for name, p in plans.items()
            if p.task.role == "train"
        }
    return out


def run_federation(cfg: RunConfig, config_text: str, out_dir=None, progress: bool = True) -> RunResult:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    run_dir = make_run_dir(cfg, out_dir)
    (run_dir / "config.yaml").write_text(config_text)
    (run_dir / "resolved_config.json").write_text(cfg.model_dump_json(indent=2))
    started = time.time()
    plans = build_plan(cfg)  # fail fast on data problems, before any process starts

    bar = tqdm(total=cfg.run.rounds, desc="rounds", unit="round", disable=not progress)

    def on_round(server_round: int, record: dict) -> None:
        tqdm.write(format_round_table(server_round, record))
        if server_round:
            bar.update(1)

    if cfg.injection.enabled and cfg.injection.method == "fedkim_pub":
        state, history, aggregation = _public_only(cfg, run_dir, on_round)
    else:
        state, history, aggregation = _simulate(cfg, run_dir, on_round)
    bar.close()
    model = new_client_model(cfg, plans)
    model.load_state_dict(state)
    save_model(model, run_dir / "model" / "client_model.safetensors")

    final_test = history[-1]["client_model_test"]
    single = single_hospital_baseline(cfg, run_dir) if cfg.baseline.single_hospital else {}
    summary = {
        "run_dir": str(run_dir),
        "config_sha256": config_sha256(config_text),
        "seconds": round(time.time() - started, 1),
        "tasks": {n: {"role": p.task.role, "modality": p.task.modality, "records": len(p.data)} for n, p in plans.items()},
        "aggregation": aggregation,
        "federated_test": final_test,
        **({"fm_test": history[-1]["fm_test"], "fm_test_round0": history[0]["fm_test"]} if "fm_test" in history[-1] else {}),
        "single_hospital_test": single,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(run_dir, history, final_test, single)


def format_comparison(result: RunResult) -> str:
    """Federated model vs each hospital alone, per training task (accuracy / AUROC on the same test set)."""
    clients = list(result.single_hospital)
    head = f"{'task':<22}{'federated':>16}" + "".join(f"{c[:14]:>16}" for c in clients) + f"{'mean alone':>16}  federated AUROC"
    lines = ["Federated vs single-hospital models on held-out test sets (accuracy / AUROC)", head]
    nan = float("nan")
    for task, m in result.final_test.items():
        cell = lambda r: f"{r['accuracy']:.3f} / {r.get('auroc', nan):.3f}"
        alone = [result.single_hospital[c][task] for c in clients]
        mean = {k: sum(a.get(k, nan) for a in alone) / len(alone) for k in ("accuracy", "auroc")}
        best = max(a.get("auroc", nan) for a in alone)
        fed = m.get("auroc", nan)
        verdict = "beats every hospital" if fed > best else ("beats the mean" if fed > mean["auroc"] else "does NOT beat the mean")
        lines.append(
            f"{task:<22}{cell(m):>16}" + "".join(f"{cell(a):>16}" for a in alone) + f"{cell(mean):>16}  {verdict}"
        )
    return "\n".join(lines)


def format_injection(result: RunResult) -> str:
    """The foundation model after the last round's injection vs the same FM before any injection (round 0:
    FedPlug's starting point, projection untrained), per task, AUROC on the same test sets."""
    if len(result.history) < 2 or "fm_test" not in result.history[-1]:
        return ""
    before, after = result.history[0]["fm_test"], result.history[-1]["fm_test"]
    last = len(result.history) - 1
    lines = [f"Foundation model: injected (round {last}) vs without injection (round 0), test AUROC",
             f"{'task':<22}{'role':>8}{'round 0':>10}{f'round {last}':>10}"]
    nan = float("nan")
    for task, m in after.items():
        a, b = before.get(task, {}).get("auroc", nan), m.get("auroc", nan)
        verdict = "better" if b > a else "NOT better"
        lines.append(f"{task:<22}{m.get('role', ''):>8}{a:>10.3f}{b:>10.3f}  {verdict}")
    return "\n".join(lines)
