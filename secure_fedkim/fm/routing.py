"""How an M3OE gate routes each task: what a study reads to tell whether FEDKIM's experts specialise.

The gate's expert weights (alpha) depend only on a task's modality and task descriptions, never on a record,
so one gate call per task gives the routing of every one of its records. Per task: alpha, its normalised
entropy (1 = every expert weighted alike, 0 = one expert) and its top expert; between tasks, the mean total
variation distance between their alphas (0 = every task gets the same mixture, which is one LoRA adapter
whatever the number of experts; 1 = tasks use disjoint experts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from secure_fedkim.data.tasks import Task
from secure_fedkim.fm.injection import initial_fm
from secure_fedkim.fm.model import ADAPTER_CONFIG, FMConfig, FoundationModel


@torch.no_grad()
def task_routing(fm: FoundationModel, tasks: list[Task]) -> dict | None:
    """The gate's routing of each task, and how far apart tasks are routed; None when the FM has no gate."""
    alpha = fm.gate_alpha([t.modality_description for t in tasks], [t.task_description for t in tasks])
    if alpha is None:
        return None
    return routing_of({t.name: a for t, a in zip(tasks, alpha.double().cpu().numpy(), strict=True)})


def routing_of(alphas: dict[str, np.ndarray]) -> dict:
    """Entropy and top expert per task, and the mean pairwise total variation distance, from each task's alpha."""
    names = list(alphas)
    experts = len(next(iter(alphas.values())))
    out = {"experts": experts, "tasks": {}}
    probs = {}
    for name, a in alphas.items():
        p = np.clip(np.asarray(a, dtype=np.float64), 0.0, None)
        p = probs[name] = p / p.sum()
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum() / math.log(experts)) if experts > 1 else 0.0
        out["tasks"][name] = {"alpha": p.round(6).tolist(), "entropy": entropy, "top_expert": int(p.argmax()),
                              "top_weight": float(p.max())}
    tv = [0.5 * float(np.abs(probs[a] - probs[b]).sum()) for i, a in enumerate(names) for b in names[i + 1:]]
    out["mean_pairwise_tv"] = float(np.mean(tv)) if tv else 0.0
    return out


def saved_fm(fm_dir: Path, seed: int | None = None) -> FoundationModel:
    """The FM a run saved in ``fm_dir`` (its adapter config and weights); with ``seed`` and no weights loaded,
    the FM as the run's injector built it before any injection."""
    config = FMConfig(**json.loads((Path(fm_dir) / ADAPTER_CONFIG).read_text()))
    if seed is not None:
        return initial_fm(config, seed)
    fm = FoundationModel(config)
    fm.load_adapter(fm_dir)
    return fm
