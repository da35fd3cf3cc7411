"""What one hospital does in a round: train each of its tasks for the configured local epochs.

Shared by the Flower ClientApp and the single-hospital baseline, so both train exactly alike; `load_plans` is the
config's data checked against the client model, as every driver and `budget --config` load it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from privacy.accounting import poisson_schedule
from privacy.dp import HospitalDP, session_randomness
from secure_fedkim.config import ConfigError, RunConfig
from secure_fedkim.data import DataError, TaskData, load_task
from secure_fedkim.hospital.models import ClientModel
from secure_fedkim.plan import TaskPlan, build_plan, input_shapes
from secure_fedkim.hospital.training import train_task


def new_client_model(cfg: RunConfig, plans: dict[str, TaskPlan]) -> ClientModel:
    """The global model's architecture, initialised from the run seed (identical in every process)."""
    torch.manual_seed(cfg.run.seed)
    train = {name: p.task.modality for name, p in plans.items() if p.task.role == "train"}
    return ClientModel(train, input_shapes(plans), cfg.client.token_dim, cfg.client.num_tokens)


def train_plans(plans: dict[str, TaskPlan]) -> list[tuple[str, TaskPlan]]:
    return [(name, p) for name, p in plans.items() if p.task.role == "train"]


def task_local_epochs(cfg: RunConfig, task: str) -> int:
    """A task's local epochs per round: its own `local_epochs` in the config, else client.local_epochs.
    A few hundred records need more passes per round than thousands do."""
    entry = next((t for t in cfg.tasks.train if t.name == task), None)
    return entry.local_epochs if entry is not None and entry.local_epochs else cfg.client.local_epochs


def patients_of(shard: TaskData) -> np.ndarray:
    """Each record's patient: the person behind it (`TaskData.persons`: all ECG windows are one person, an
    image region's crops share their source image); a task without patient ids: each record its own patient."""
    return np.asarray(shard.persons).astype(str) if shard.persons is not None else np.arange(len(shard)).astype(str)


def _units(shard: TaskData, unit: str) -> int:
    return len(shard) if unit == "record" else len(np.unique(patients_of(shard)))


def dp_round_schedule(plans: dict[str, TaskPlan], client: str, cfg: RunConfig) -> list[tuple[float, int]]:
    """One round's DP-SGD blocks at this hospital: (Poisson sample rate, steps) per task it holds.

    Each privacy unit (record, or patient) is sampled with probability 1/ceil(n/batch), for ceil(n/batch)
    steps per epoch (Opacus's loader; `privacy.patient` for patients, where the batch counts patients).
    """
    schedule = []
    for name, plan in train_plans(plans):
        shard = plan.shard(client)
        if len(shard):
            schedule.append(poisson_schedule(_units(shard, cfg.privacy.unit), cfg.client.batch_size, task_local_epochs(cfg, name)))
    return schedule


def hospital_records(plans: dict[str, TaskPlan], client: str) -> int:
    return sum(len(p.split.clients.get(client, ())) for _, p in train_plans(plans))


def n_patients(plans: dict[str, TaskPlan], client: str) -> int:
    """Patients in the hospital's train shards (see `patients_of`): distinct per task, summed over tasks.

    Each task is its own dataset, protected and accounted on its own, so a patient is counted once per task
    that holds them: where two tasks share a cohort (mortality, mortality_visits: NAFLD; the IU report
    tasks) the sum is an upper bound on distinct persons.
    """
    return sum(_units(p.shard(client), "patient") for _, p in train_plans(plans))


#: what a run's federation plan reserves budget for (see dp_plan_inputs)
BASELINE_RESERVE = "single-hospital baseline (the same records, its results released)"


def dp_plan_inputs(cfg: RunConfig, plans: dict[str, TaskPlan], client: str) -> dict:
    """What a hospital's DP plan is calibrated on (`privacy.dp.HospitalDP`'s arguments), the same for a run and
    for `secure-fedkim budget --config`: one round's schedule, the records and patients, and the steps the
    single-hospital baseline will take on the same records (its results are released, so the federation's
    noise is calibrated for both together)."""
    schedule = dp_round_schedule(plans, client, cfg)
    reserve = cfg.baseline.single_hospital
    return {
        "round_schedule": schedule,
        "n_records": hospital_records(plans, client),
        "n_patients": n_patients(plans, client) if cfg.privacy.unit == "patient" else None,
        "reserved": schedule * cfg.run.rounds if reserve else [],
        "reserved_for": BASELINE_RESERVE if reserve else None,
    }


def dp_randomness(dp: HospitalDP, cfg: RunConfig, client: str, server_round: int, task: str):
    """The random source of one DP session (this task, this round, this hospital, this ledger's run): secure and
    keyed from the OS by default; reproducible from the run seed and the session's name only where the profile
    turned secure_mode off (tests, benches; the ledger and the report say it is not fit for release). Never
    torch's global RNG, which new_client_model resets to the run seed before every round."""
    return session_randomness(dp.profile, cfg.run.seed, dp.run_id, client, server_round, task)


def local_round(
    model: ClientModel,
    plans: dict[str, TaskPlan],
    client: str,
    cfg: RunConfig,
    server_round: int,
    dp: HospitalDP | None = None,
) -> dict[str, dict]:
    """Train every training task on this client's shard, one after another; returns per-task stats.

    With `dp`, each task trains with DP-SGD and its spend is written to the hospital's ledger (fsynced)
    as soon as that task's training ends, before anything leaves the hospital.
    """
    c = cfg.client
    proximal_mu = cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0
    stats = {}
    for i, (name, plan) in enumerate(train_plans(plans)):
        shard = plan.shard(client)
        stats[name] = train_task(
            model.task_model(name), shard.x, shard.y,
            epochs=task_local_epochs(cfg, name), batch_size=c.batch_size, lr=c.lr, max_grad_norm=c.max_grad_norm,
            seed=cfg.run.seed * 100_003 + server_round * 101 + i, proximal_mu=proximal_mu,
            privatizer=dp if len(shard) else None,
            groups=patients_of(shard) if cfg.privacy.unit == "patient" else None,
            randomness=dp_randomness(dp, cfg, client, server_round, name) if dp is not None else None,
        )
        if dp is not None and stats[name]["steps"]:
            stats[name]["epsilon"] = dp.record_round(server_round, name, stats[name]["steps"], stats[name]["sample_rate"])
    return stats


def load_plans(cfg: RunConfig, config_path: str | Path | None = None, progress: bool = False) -> dict[str, TaskPlan]:
    """Every task's data and split; a data error also names the config file and the task's key in it."""
    try:
        registry = [t for t in cfg.tasks.train + cfg.tasks.unseen if t.source is None]
        for t in tqdm(registry, desc="loading data", unit="task", disable=not progress or not registry):
            load_task(t.name, max_records=t.max_records, seed=cfg.run.seed)  # cached: build_plan reuses it
        plans = build_plan(cfg)
    except DataError as e:
        if config_path is None:
            raise
        raise DataError(f"{config_path}: {task_key(cfg, str(e))}: {e}") from None
    try:
        new_client_model(cfg, plans)  # every task of a modality gives one sample shape; encoders can be built
    except ValueError as e:
        raise ConfigError(f"{config_path or '<config>'}: {e}") from None
    return plans


def task_key(cfg: RunConfig, message: str) -> str:
    """The config key of the task a data error is about (its source path, label file or name in the message)."""
    for section, entries in (("train", cfg.tasks.train), ("unseen", cfg.tasks.unseen)):
        for i, t in enumerate(entries):
            if t.source is not None:
                for key in ("path", "label"):
                    if message.startswith(getattr(t.source, key)):
                        return f"tasks.{section}[{i}].source.{key}"
            if repr(t.name) in message:
                return f"tasks.{section}[{i}]"
    return "tasks"
