"""The federation's data plan: every task's data and its persistent split, derived from the config alone.

Server and clients each rebuild the plan from the same config and seed, so a client's shard, the
server's public split and the test split are the same records in every process and every round. In a
simulation every process can read every task; in a deployment a hospital reads only its own data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import pandas as pd

from secure_fedkim.config import RunConfig, TaskEntry
from secure_fedkim.data import TASKS, Task, TaskData, TaskSplit, load_task, load_user_data, partition_task
from secure_fedkim.data.tasks import USER_UNIT_PATIENT, USER_UNIT_RECORD, persons_kind


@dataclass(frozen=True)
class TaskPlan:
    task: Task
    data: TaskData
    split: TaskSplit  # unseen tasks: only `test` is filled; they are never trained on

    @property
    def name(self) -> str:
        return self.task.name

    def shard(self, client: str) -> TaskData:
        """The client's records; `.group` holds their privacy units (patients), set for every registry task."""
        return self.data.subset(self.split.clients.get(client, np.zeros(0, dtype=np.int64)))

    def public(self) -> TaskData:
        return self.data.subset(self.split.public)

    def test(self) -> TaskData:
        return self.data.subset(self.split.test)


def task_of(entry: TaskEntry, role: str, data: TaskData | None = None) -> Task:
    """The registry task, with the config's overrides, or a user task described wholly by the config.

    A user task's privacy unit is "patient" when its data names patients (`source.group`, or a `group`
    column in the label CSV of png/dicom/wfdb data), else every record counts as its own person; with
    `data`, `persons` is counted from it."""
    base = TASKS.get(entry.name)
    fields = {
        "name": entry.name,
        "modality": entry.modality or base.modality,
        "task_description": entry.task_description or base.task_description,
        "question": entry.question or base.question,
        "label_rule": base.label_rule if base else f"column {entry.source.label!r} of {entry.source.path}",
        "role": role,
        "source": base.source if base and entry.source is None else f"user data: {entry.source.path}",
        "label_honesty": base.label_honesty if base and entry.source is None else "as provided by the user",
    }
    if base and entry.source is None:
        fields.update(privacy_unit=base.privacy_unit, persons=base.persons, persons_note=base.persons_note)
    else:
        patient = _user_names_patients(entry)
        fields["privacy_unit"] = USER_UNIT_PATIENT if patient else USER_UNIT_RECORD
        if data is not None:
            units = data.group if data.group is not None else np.arange(len(data))  # wfdb: its records
            n = len(np.unique(np.asarray(units).astype(str)))
            fields["persons"] = persons_kind(n)
            fields["persons_note"] = f"{len(data)} records, {n} {'patients' if patient else 'records counted as persons'}"
    return Task(**fields)


def _user_names_patients(entry: TaskEntry) -> bool:
    src = entry.source
    if src.group is not None:
        return True
    if src.format in ("png", "dicom", "wfdb"):  # the label CSV's own `group` column, when it has one
        try:
            return "group" in pd.read_csv(src.label, nrows=0).columns
        except Exception:  # an unreadable label CSV fails later, when the data loads, with its own message
            return False
    return False


def _load(entry: TaskEntry, modality: str, seed: int) -> TaskData:
    if entry.source is not None:
        return load_user_data(entry.source.model_dump(exclude_none=True), modality)
    return load_task(entry.name, max_records=entry.max_records, seed=seed)


def _cap(idx: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or len(idx) <= cap:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=cap, replace=False))


def build_plan(cfg: RunConfig) -> dict[str, TaskPlan]:
    return _build_plan_cached(cfg.model_dump_json())


@lru_cache(maxsize=4)
def _build_plan_cached(cfg_json: str) -> dict[str, TaskPlan]:
    cfg = RunConfig.model_validate_json(cfg_json)
    seed, t = cfg.run.seed, cfg.tasks
    plans: dict[str, TaskPlan] = {}
    for entry in t.train:
        task = task_of(entry, "train")
        data = _load(entry, task.modality, seed)
        task = task_of(entry, "train", data)
        split = partition_task(
            data, list(cfg.federation.clients), scheme=entry.partition, alpha=entry.alpha,
            public_fraction=t.public_fraction, test_fraction=t.test_fraction, seed=seed,
        )
        split = replace(split, test=_cap(split.test, t.max_test_records, seed))
        plans[task.name] = TaskPlan(task, data, split)
    for entry in t.unseen:
        task = task_of(entry, "unseen")
        data = _load(entry, task.modality, seed)
        task = task_of(entry, "unseen", data)
        test = _cap(np.arange(len(data)), t.max_test_records, seed)
        plans[task.name] = TaskPlan(task, data, TaskSplit(task.name, np.zeros(0, np.int64), test, {}))
    return plans


def input_shapes(plans: dict[str, TaskPlan]) -> dict[str, tuple[int, ...]]:
    """One sample's shape per modality; every task of a modality must agree (one encoder serves them)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for p in plans.values():
        shape = tuple(p.data.x.shape[1:])
        known = shapes.setdefault(p.task.modality, shape)
        if known != shape:
            raise ValueError(
                f"task {p.name!r}: {p.task.modality} samples have shape {shape}, other tasks of that modality {known}"
            )
    return shapes
