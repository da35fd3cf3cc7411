"""How the auditor trains a model the way a hospital does: plain, or DP-SGD through privacy.dp.HospitalDP.

The DP parameters are the hospital's own: its ledger's :class:`privacy.plan.DPPlan` (noise multiplier, clip,
delta, accountant, privacy unit), read as every other reader reads it (:func:`attacks._runs.run_plan`).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger
from privacy.plan import DPPlan
from privacy.randomness import DPRandomness
from secure_fedkim.hospital.training import train_task


class ShadowDP:
    """DP-SGD for the auditor's own reference models: the hospitals' own DP-SGD step (the fused ``lean`` path
    where the model supports it, else Opacus's hooks) with the target's noise, clip and Poisson sampling,
    without a ledger or accountant (nobody's privacy is spent on them; HospitalDP would compute a planned
    epsilon, about 0.5 s, for every reference model)."""

    def __init__(self, dp: DPPlan, grad_sample_mode: str = "lean"):
        self.dp = dp
        self.grad_sample_mode = grad_sample_mode

    def make_private(self, module, optimizer, data_loader, criterion=None, randomness=None):
        from privacy.fast_dp import LEAN_MODE, LeanPrivacyEngine, lean_supported

        mode = self.grad_sample_mode
        if mode == LEAN_MODE and not lean_supported(module):
            mode = "hooks"
        return LeanPrivacyEngine().make_private(
            module=module, optimizer=optimizer, data_loader=data_loader,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            noise_multiplier=self.dp.noise_multiplier, max_grad_norm=self.dp.max_grad_norm, poisson_sampling=True,
            grad_sample_mode=mode, randomness=randomness,
        )


def audit_randomness(seed: int) -> DPRandomness:
    """The DP draws of an auditor's model trained with ``seed``: reproducible (the same seed, the same model and
    so the same audit numbers), which is what an audit needs and what a release must never use."""
    return DPRandomness.reproducible(seed, "audit training")


def train_model(
    make_model: Callable[[int], nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float = 1.0,
    dp: DPPlan | None = None,
    seed: int = 0,
    ledger_dir: str | Path | None = None,
    accounted: bool = True,
    groups: np.ndarray | None = None,
) -> tuple[nn.Module, dict, float | None]:
    """Train a fresh ``make_model(seed)`` on (x, y); returns (model in eval mode, train stats, DP delta or None).

    With ``dp``, training goes through HospitalDP (Opacus: Poisson sampling, per-sample clipping at
    ``dp.max_grad_norm``, noise ``dp.noise_multiplier``) with a throwaway ledger in ``ledger_dir`` (a
    temporary directory by default). Noise multiplier 0 uses HospitalDP's testing flag (not DP).
    ``accounted=False`` trains with :class:`ShadowDP` instead (the plan's noise and clip on records sampled one by
    one, whatever the plan's unit: the auditor's reference models hold nobody's privacy; no ledger, delta None).
    Accounted, with ``dp.privacy_unit == "patient"``: patient-level DP-SGD with ``groups`` (one patient id per record; default: each
    record its own patient), ``batch_size`` patients per step (expected) and at most
    ``dp.max_records_per_patient_step`` records of a sampled patient per step; delta is then per patient.
    DP draws (Poisson samples, noise) come from :func:`audit_randomness` of ``seed``.
    """
    model = make_model(seed)
    patient = dp is not None and accounted and dp.privacy_unit == "patient"
    if patient:
        groups = np.arange(len(x)).astype(str) if groups is None else np.asarray(groups)
        if len(groups) != len(x):
            raise ValueError(f"groups must hold one patient id per record: got {len(groups)} for {len(x)} records")
    if dp is not None and not accounted:
        stats = train_task(
            model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, max_grad_norm=dp.max_grad_norm,
            seed=seed, privatizer=ShadowDP(dp), randomness=audit_randomness(seed),
        )
        return model.eval(), stats, None
    if dp is None:
        stats = train_task(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, max_grad_norm=max_grad_norm, seed=seed)
        return model.eval(), stats, None
    with tempfile.TemporaryDirectory(prefix="audit-ledger-") as tmp:
        where = Path(ledger_dir or tmp)
        k = {"max_records_per_patient_step": dp.max_records_per_patient_step} if dp.max_records_per_patient_step else {}
        profile = PrivacyProfile(target_epsilon=1e6, delta=dp.delta, max_grad_norm=dp.max_grad_norm, accountant=dp.accountant,
                                 unit=dp.privacy_unit if patient else "record", **k)
        units = len(np.unique(groups)) if patient else len(x)
        batches = math.ceil(units / min(batch_size, units))
        privatizer = HospitalDP(
            profile, PrivacyLedger(where / f"audit-{seed}.jsonl"), f"audit-{seed}",
            [(1.0 / batches, batches * epochs)], 1, n_records=len(x), n_patients=units if patient else None,
            noise_multiplier=dp.noise_multiplier, allow_no_noise=dp.noise_multiplier == 0,
        )
        stats = train_task(
            model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, max_grad_norm=dp.max_grad_norm,
            seed=seed, privatizer=privatizer, groups=groups if patient else None, randomness=audit_randomness(seed),
        )
    return model.eval(), stats, privatizer.delta
