"""What every audit reads from a finished run the same way: which DP plan is this run's, and fresh task models."""

from __future__ import annotations

from pathlib import Path

import torch


def run_id_of(run, plans: list[dict]) -> str | None:
    """This run's id in a ledger that may hold several runs: the run directory's name (what ``secure-fedkim
    run`` and the deployment ServerApp record as the run id), else the name recorded in summary.json (a
    moved run directory), else the ledger's only run id. None when none of these picks one."""
    ids = list(dict.fromkeys(p["run_id"] for p in plans))
    candidates = [Path(run.run_dir).name]
    try:
        candidates.append(Path(str(run.summary().get("run_dir", ""))).name)
    except (OSError, ValueError, AttributeError):
        pass
    for candidate in candidates:
        if candidate in ids:
            return candidate
    return ids[0] if len(ids) == 1 else None


def task_model_factory(run, task: str):
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
