"""Local training and evaluation of one task's path (encoder + head) of the client model.

FedProx's proximal term mu/2 ||w - w_global||^2 is applied as a decoupled proximal step after each
optimizer step (as AdamW decouples weight decay). Under DP-SGD Opacus replaces every gradient with the
privatised per-sample sum, so a proximal gradient added to the loss would be silently dropped; a step that
depends only on the weights is post-processing and keeps the DP guarantee intact.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secure_fedkim.metrics import binary_metrics

# Opacus's hooks fire on every first layer whose input needs no gradient: expected, not a problem.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


class Privatizer(Protocol):
    """What DP-SGD needs from the training loop (privacy.dp.HospitalDP provides it)."""

    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *, criterion=None, **extra):
        """(module, optimizer, data_loader), or (module, optimizer, criterion, data_loader) for ghost clipping.
        `extra`: `randomness=` (the session's DPRandomness); `groups=` (one patient id per record) under patient-level DP only."""


def as_tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    xt = torch.from_numpy(x) if x.dtype == np.int64 else torch.from_numpy(np.asarray(x, dtype=np.float32))
    return TensorDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.float32)))


def train_task(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    proximal_mu: float = 0.0,
    privatizer: Privatizer | None = None,
    groups: np.ndarray | None = None,
    randomness=None,
) -> dict:
    """Train `model` (x -> one logit) with BCE and Adam; returns loss, steps and the sample rate used.

    Without a privatizer: shuffled batches and global-norm gradient clipping. With one: Opacus's Poisson
    sampling, per-sample clipping and noise (the privatizer owns those settings); with `groups` (one patient id
    per record), patient-level DP-SGD: patients are sampled (`batch_size` of them per step, expected) and each
    patient's summed gradient is clipped (privacy.patient). `randomness` (a privacy.randomness.DPRandomness)
    draws the DP session's samples and noise (the privatizer's default, a secure one, if None).
    """
    if len(x) == 0:
        return {"loss": float("nan"), "steps": 0, "n": 0, "sample_rate": 0.0}
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(as_tensors(x, y), batch_size=min(batch_size, len(x)), shuffle=True, generator=g)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    module, sample_rate = model, loader.batch_size / len(x)
    loss_fn = nn.BCEWithLogitsLoss()
    if privatizer is not None:
        extra = {} if groups is None else {"groups": groups}  # patient-level DP: the patient of each record
        if randomness is not None:
            extra["randomness"] = randomness
        private = privatizer.make_private(model, optimizer, loader, criterion=loss_fn, **extra)
        if len(private) == 4:  # Opacus's ghost clipping wraps the loss too
            module, optimizer, loss_fn, loader = private
        else:
            module, optimizer, loader = private
        sample_rate = loader.sample_rate  # Poisson: 1 / ceil(n / batch), n records or patients
    module.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch; it still counts as a step
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(xb), yb)
            loss.backward()
            if privatizer is None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(model.parameters(), anchor):
                        p.sub_(lr * proximal_mu * (p - a))
            total += loss.item() * len(xb)
            count += len(xb)
            steps += 1
    if privatizer is not None and hasattr(module, "_close"):
        module._close()  # remove Opacus hooks from the shared encoder
    return {"loss": total / max(count, 1), "steps": steps, "n": len(x), "sample_rate": sample_rate}


@torch.no_grad()
def predict_task(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Probabilities of label 1."""
    model.eval()
    ds = as_tensors(x, np.zeros(len(x)))
    out = [torch.sigmoid(model(xb)) for xb, _ in DataLoader(ds, batch_size=batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def evaluate_task(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    p = predict_task(model, x)
    return binary_metrics(y, p >= 0.5, p)
