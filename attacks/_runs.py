"""What every audit reads from a finished run the same way: which DP plan is this run's, and fresh task models."""

from __future__ import annotations

from pathlib import Path

import torch

from privacy.ledger import DP_PLAN, DPPlan, PrivacyLedger, this_run_id


def recorded_name(run) -> str | None:
    """The name of the run directory recorded in the run's summary.json (None: none recorded or unreadable)."""
    try:
        return Path(str(run.summary().get("run_dir", ""))).name or None
    except (OSError, ValueError, AttributeError):
        return None


def run_id_of(run, plans: list[DPPlan] | list[dict]) -> str | None:
    """This run's id among ``plans`` (DPPlans or ``dp_plan`` entries) of a ledger that may hold several runs:
    :func:`privacy.ledger.this_run_id` with the run directory's name and the name recorded in summary.json."""
    ids = [p.run_id if isinstance(p, DPPlan) else p.get("run_id") for p in plans]
    return this_run_id(ids, Path(run.run_dir).name, recorded_name(run))


def run_plan(run, ledger: PrivacyLedger) -> DPPlan | None:
    """This run's DP plan in ``ledger`` (the first plan of this run's id, :func:`run_id_of`); None when the ledger
    has no plan, or plans of other runs only. Raises ``LedgerTampered`` when the ledger does not verify."""
    run_id = run_id_of(run, ledger.events(DP_PLAN))
    return ledger.plan(run_id) if run_id is not None else None


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
