"""Patient-level ("user-level") DP-SGD: Poisson sampling of patients and one clipped sum per patient.

With several records per patient, a record-level epsilon says nothing tight about a patient. Here the
privacy unit is the patient, as in Chua et al. 2024 ("Mind the privacy unit!") and jax_privacy's
user-level training:

* :class:`PatientPoissonLoader` samples each patient independently with probability ``q`` at every step
  (``q = 1/ceil(n_patients/patients_per_batch)``, as Opacus's loader does for records), and takes at most
  ``k`` of a sampled patient's records (all of them if it has at most ``k``; else ``k`` drawn uniformly
  without replacement), every draw from the session's :class:`~privacy.randomness.DPRandomness`. It yields ``(xb, yb)`` batches whose rows are grouped
  by patient and keeps, for the last batch, which patient slot each row belongs to (:attr:`row_groups`).
* :func:`group_per_sample_grads` sums each patient's rows of every ``p.grad_sample`` (and of the factored
  per-sample gradients of ``privacy.fast_dp``) so that the optimizer's per-sample clipping clips each
  patient's summed gradient to ``C`` (clip the sum, not each record). ``FusedDPOptimizer`` (``"lean"``) and
  :class:`PatientDPOptimizer` (Opacus's ``"hooks"`` path) call it before clipping.

Adding or removing one patient then changes the noised sum by at most ``C``, whatever ``k``: the
accountant is the record-level one with ``q`` the patient sampling rate, and the epsilon is per patient.
The noised sum is divided by the expected number of sampled patients ``int(q * n_patients)`` (Opacus's
``expected_batch_size`` formula with patients as units).

This module imports nothing from ``secure_fedkim`` or ``attacks``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch.utils.data._utils.collate import default_collate

from . import randomness as randomness_module
from .randomness import DPRandomness, SourcedNoise, fetch

__all__ = ["PatientPoissonLoader", "PatientDPOptimizer", "group_per_sample_grads"]


class PatientPoissonLoader:
    """Poisson sampling of patients, at most ``max_records`` records per sampled patient and step.

    Args:
        dataset: the records (a ``TensorDataset`` is indexed directly; others item by item through
            ``collate_fn``).
        groups: one patient id per record of ``dataset`` (any hashable numpy-compatible values).
        patients_per_batch: expected number of sampled patients per step; ``sample_rate`` is
            ``1/ceil(n_patients/patients_per_batch)`` and one pass over the loader is
            ``ceil(n_patients/patients_per_batch)`` steps.
        max_records: ``k``, the most records one patient contributes to one step.
        randomness: the session's :class:`~privacy.randomness.DPRandomness`, which draws the patient
            sample and the record subsets.

    Batches are built in the calling process (no worker processes), so :attr:`row_groups` always
    describes the batch yielded last; an empty draw yields zero-length tensors (a step without data).

    Attributes:
        sample_rate: ``q``, each patient's inclusion probability per step.
        n_patients: distinct patients in ``groups``.
        expected_batch_size: ``int(n_patients * q)``, the divisor of the noised sum for a mean loss.
        records, row_groups, n_groups: for the last yielded batch, the dataset index of each row, the
            patient slot (0..n_groups-1) of each row, and the number of sampled patients.
    """

    def __init__(self, dataset, groups, patients_per_batch: int, max_records: int, randomness: DPRandomness, *,
                 collate_fn: Optional[Callable] = None):
        ids = np.asarray(groups)
        if ids.ndim != 1 or len(ids) != len(dataset):
            raise ValueError(
                f"groups must hold one patient id per record of the data loader's dataset: got shape "
                f"{ids.shape} for {len(dataset)} records"
            )
        if len(ids) == 0:
            raise ValueError("groups is empty: there is no patient to sample")
        for name, v in (("patients_per_batch", patients_per_batch), ("max_records", max_records)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        _, patient = np.unique(ids, return_inverse=True)
        patient = torch.as_tensor(patient.reshape(-1), dtype=torch.long)
        self.dataset, self.collate_fn = dataset, collate_fn or default_collate
        self.max_records = int(max_records)
        self._order = torch.argsort(patient, stable=True)  # records grouped by patient
        self._counts = torch.bincount(patient)
        self._offsets = torch.cumsum(self._counts, 0) - self._counts
        self.n_patients = len(self._counts)
        self._steps = math.ceil(self.n_patients / min(int(patients_per_batch), self.n_patients))
        self.sample_rate = 1.0 / self._steps
        self.expected_batch_size = int(self.n_patients * self.sample_rate)
        if not isinstance(randomness, DPRandomness):
            raise TypeError(f"randomness must be a privacy.randomness.DPRandomness, got {type(randomness).__name__}")
        self.randomness = randomness
        self.records = self.row_groups = torch.zeros(0, dtype=torch.long)
        self.n_groups = 0

    def __len__(self) -> int:
        return self._steps

    def __iter__(self):
        for _ in range(self._steps):
            self.records, self.row_groups, self.n_groups = self.sample()
            yield fetch(self.dataset, self.records, self.collate_fn)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One step's draw: (record indices, patient slot per row, number of sampled patients)."""
        chosen = self.randomness.poisson(self.n_patients, self.sample_rate)
        if randomness_module.OBSERVER is not None:  # an audit watching the run (attacks/runlevel.py)
            randomness_module.OBSERVER.sample(self.randomness, self.n_patients, self.sample_rate, chosen)
        counts = self._counts[chosen]
        m = len(chosen)
        slot = torch.repeat_interleave(torch.arange(m), counts)
        within = torch.arange(len(slot)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        records = self._order[self._offsets[chosen][slot] + within]
        if bool((counts > self.max_records).any()):
            # a uniform random order within each patient (slots stay contiguous), then its first k records
            key = slot.to(torch.float64) + self.randomness.uniform(len(slot))
            perm = torch.argsort(key)
            keep = within < self.max_records  # rank within the patient after the shuffle is `within` again
            records, slot = records[perm][keep], slot[keep]
        return records, slot, m


def group_per_sample_grads(params: list, loader: PatientPoissonLoader) -> None:
    """Replace each parameter's per-sample gradients ``[B, ...]`` by per-patient sums ``[n_groups, ...]``.

    ``loader.row_groups`` must describe the batch the gradients come from (one slot per row). Dense
    ``p.grad_sample`` rows are summed with ``index_add``; factored Linear weights (``p._lean_factors = (A, B)``,
    ``G_n = B_n^T A_n``) become ``(A', B')`` with each patient's rows' positions concatenated (zero-padded
    to the largest patient), so ``B'_j^T A'_j = sum over the patient's rows of G_n`` exactly. Idempotent
    for one backward pass: grouped tensors are marked and left alone.
    """
    seg, m = loader.row_groups, loader.n_groups
    pos = kmax = None
    for p in params:
        gs, factors = getattr(p, "grad_sample", None), getattr(p, "_lean_factors", None)
        if isinstance(gs, torch.Tensor):
            if getattr(gs, "_patient_grouped", False):
                continue
            _check_rows(gs.shape[0], seg)
            grouped = gs.new_zeros((m, *gs.shape[1:])).index_add_(0, seg.to(gs.device), gs)
            grouped._patient_grouped = True
            p.grad_sample = grouped
        elif gs is not None:
            raise ValueError("patient-level DP-SGD needs one backward pass per step (no gradient accumulation)")
        elif factors is not None and not getattr(factors[0], "_patient_grouped", False):
            a, b = factors
            _check_rows(a.shape[0], seg)
            if pos is None:
                pos, kmax = _positions(seg, m)
            ga = a.new_zeros((m, kmax, *a.shape[1:]))
            gb = b.new_zeros((m, kmax, *b.shape[1:]))
            ga[seg, pos], gb[seg, pos] = a, b
            ga, gb = ga.reshape(m, -1, a.shape[-1]), gb.reshape(m, -1, b.shape[-1])
            ga._patient_grouped = True
            p._lean_factors = (ga, gb)


def _check_rows(rows: int, seg: torch.Tensor) -> None:
    if rows != len(seg):
        raise ValueError(
            f"per-sample gradients have {rows} rows but the patient loader's last batch has {len(seg)}: "
            f"step the optimizer on the batch the loader yielded last"
        )


def _positions(seg: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
    """Each row's rank among its patient's rows, and the largest number of rows of one patient."""
    counts = torch.bincount(seg, minlength=m)
    order = torch.argsort(seg, stable=True)
    pos = torch.empty_like(seg)
    pos[order] = torch.arange(len(seg)) - (torch.cumsum(counts, 0) - counts)[seg[order]]
    return pos, int(counts.max()) if m else 0


class PatientDPOptimizer(SourcedNoise, DPOptimizer):
    """Opacus's ``DPOptimizer`` (``"hooks"`` path) clipping per patient: before Opacus's own clipping,
    noise and scaling, each ``p.grad_sample`` is summed per patient of the loader's last batch."""

    patient_batches: Optional[PatientPoissonLoader] = None

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        if self.patient_batches is None:
            raise RuntimeError("PatientDPOptimizer has no patient loader (set patient_batches)")
        group_per_sample_grads(self.params, self.patient_batches)
        return super().pre_step(closure)
