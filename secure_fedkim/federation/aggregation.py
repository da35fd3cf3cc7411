"""FedAvg: the sample-weighted mean of client models, on flat float32 vectors.

Every transport (plain, CKKS, SecAgg+) ends in the same place: a weighted mean of flat vectors that is
unflattened into the client model's state dict. Flat vectors are also what HE packs into ciphertext slots.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def flatten_state(state: dict[str, torch.Tensor]) -> np.ndarray:
    """Concatenate a state dict's tensors (in its key order) into one float32 vector."""
    return np.concatenate([t.detach().cpu().numpy().astype(np.float32, copy=False).ravel() for t in state.values()])


def unflatten_state(vector: np.ndarray, template: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of flatten_state, shaped like `template`; raises on a length mismatch."""
    expected = sum(t.numel() for t in template.values())
    if vector.ndim != 1 or vector.size != expected:
        raise ValueError(f"update has {vector.size} values, the model has {expected} parameters")
    if not np.all(np.isfinite(vector)):
        raise ValueError("update contains NaN or infinite values")
    out, offset = OrderedDict(), 0
    for name, t in template.items():
        out[name] = torch.from_numpy(np.array(vector[offset : offset + t.numel()], dtype=np.float32)).view_as(t).to(t.dtype)
        offset += t.numel()
    return out


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """FedAvg: sum_i w_i v_i / sum_i w_i. Weights are sample counts."""
    if not vectors:
        raise ValueError("no client updates to aggregate")
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} updates but {len(weights)} weights")
    sizes = {v.size for v in vectors}
    if len(sizes) != 1:
        raise ValueError(f"client updates differ in length: {sorted(sizes)}")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    acc = np.zeros(vectors[0].size, dtype=np.float64)
    for v, wi in zip(vectors, w):
        if not np.all(np.isfinite(v)):
            raise ValueError("a client update contains NaN or infinite values")
        acc += wi * v
    return (acc / w.sum()).astype(np.float32)
