"""Update inversion: reconstruct a training input from one client's gradient update.

DLG (Zhu et al. 2019) / Inverting Gradients (Geiping et al. 2020) style: optimise a dummy input x' so
that the gradient it induces (with the record's label, assumed known, as the label is easy to infer from
the head's gradient sign) matches the observed gradient, by cosine distance (Inverting Gradients) or
squared L2 distance (DLG), with Adam or L-BFGS, from a start at the population mean (what the attacker
knows anyway). The reconstruction is scored against the true record:

* ``mse`` and ``relative_mse`` = ||x' - x||^2 / ||x - mean||^2 (1.0: no better than guessing the
  population mean; 0: exact);
* ``cosine`` of x' and x, and ``cosine_centered`` of x' - mean and x - mean (recovery beyond the prior).

Three views of the same record's update are compared: ``plain`` (the exact single-record gradient, the
worst case: a client that sends one record's gradient), ``dp`` (the same gradient clipped to C and
Gaussian-noised with std sigma * C, as one DP-SGD step on that record releases), and what the aggregator
holds under ``he`` / ``secagg`` aggregation: no per-client update at all, only the sum of at least
``min_clients`` contributions, so there is nothing per client to invert.

A real client update is many steps over many records; a single-record gradient upper-bounds what
inversion can do against it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

__all__ = [
    "record_gradient",
    "privatize_gradient",
    "invert_gradient",
    "reconstruction_error",
    "inversion_audit",
    "aggregated_only_row",
]

_LOSS = nn.BCEWithLogitsLoss(reduction="sum")


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def record_gradient(model: nn.Module, x: np.ndarray, y: int) -> list[torch.Tensor]:
    """The gradient of the BCE loss of ONE record (x without batch axis, label y) w.r.t. the parameters."""
    model.eval()
    xt = torch.as_tensor(np.asarray(x)[None]).float()
    loss = _LOSS(model(xt), torch.tensor([float(y)]))
    return [g.detach() for g in torch.autograd.grad(loss, _params(model))]


def privatize_gradient(grad: list[torch.Tensor], max_grad_norm: float, noise_multiplier: float, seed: int = 0) -> list[torch.Tensor]:
    """Clip the whole gradient to L2 norm C, then add N(0, (sigma C)^2) per coordinate (one DP-SGD step, batch 1)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad)).item()
    scale = min(1.0, max_grad_norm / (norm + 1e-12))
    gen = torch.Generator().manual_seed(seed)
    return [g * scale + noise_multiplier * max_grad_norm * torch.randn(g.shape, generator=gen) for g in grad]


def _match(a: list[torch.Tensor], b: list[torch.Tensor], loss: str) -> torch.Tensor:
    if loss == "cosine":
        dot = sum((u * v).sum() for u, v in zip(a, b))
        na = torch.sqrt(sum((u * u).sum() for u in a))
        nb = torch.sqrt(sum((v * v).sum() for v in b))
        return 1.0 - dot / (na * nb + 1e-12)
    if loss == "l2":
        return sum(((u - v) ** 2).sum() for u, v in zip(a, b))
    raise ValueError(f"gradient matching loss must be 'cosine' or 'l2', got {loss!r}")


def invert_gradient(
    model: nn.Module,
    grad: list[torch.Tensor],
    y: int,
    x_init: np.ndarray,
    *,
    loss: str = "cosine",
    optimizer: str = "adam",
    steps: int = 300,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Optimise a dummy input to reproduce ``grad``; returns (reconstruction, final matching loss)."""
    model.eval()
    params = _params(model)
    target = [g.detach() for g in grad]
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(np.asarray(x_init)[None]).float()
    dummy = (x0 + 1e-3 * torch.randn(x0.shape, generator=gen)).requires_grad_(True)
    label = torch.tensor([float(y)])

    def objective():
        g = torch.autograd.grad(_LOSS(model(dummy), label), params, create_graph=True)
        return _match(list(g), target, loss)

    if optimizer == "adam":
        opt = torch.optim.Adam([dummy], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * f) for f in (0.375, 0.625, 0.875)], gamma=0.1)
        for _ in range(steps):
            opt.zero_grad()
            obj = objective()
            obj.backward()
            opt.step()
            sched.step()
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS([dummy], lr=lr, max_iter=steps, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            obj = objective()
            obj.backward()
            return obj

        opt.step(closure)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    with torch.enable_grad():
        final = float(objective().item())
    for p in params:
        p.grad = None
    return dummy.detach()[0].numpy(), final


def reconstruction_error(x_hat: np.ndarray, x: np.ndarray, mean: np.ndarray) -> dict:
    """MSE, relative MSE vs the population mean, cosine, and centered cosine (module docstring)."""
    a = np.asarray(x_hat, dtype=np.float64).reshape(-1)
    b = np.asarray(x, dtype=np.float64).reshape(-1)
    m = np.asarray(mean, dtype=np.float64).reshape(-1)

    def cos(u, v):
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return float(u @ v / (nu * nv)) if nu > 0 and nv > 0 else 0.0

    base = float(((b - m) ** 2).sum())
    return {
        "mse": float(((a - b) ** 2).mean()),
        "relative_mse": float(((a - b) ** 2).sum() / base) if base > 0 else math.inf,
        "cosine": cos(a, b),
        "cosine_centered": cos(a - m, b - m),
    }


def aggregated_only_row(mode: str, held: str, min_clients: int | None = None) -> dict:
    """The row for a transport whose aggregator never holds a per-client update (it holds `held` instead)."""
    return {
        "update": mode,
        "visible": False,  # and no inversion figures: there is no single update to invert
        "note": (
            f"no per-client update visible: under {mode!r} the aggregator holds {held}; only the aggregate of "
            f"at least {min_clients or 'min_clients'} hospitals is ever in the clear, so there is no single "
            f"client's gradient to invert"
        ),
    }


def inversion_audit(
    model: nn.Module,
    x: np.ndarray,
    y: int,
    population_mean: np.ndarray,
    *,
    max_grad_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    loss: str = "cosine",
    optimizer: str = "adam",
    steps: int = 300,
    lr: float = 0.1,
    seed: int = 0,
    aggregation: str = "plain",
    min_clients: int | None = None,
) -> list[dict]:
    """Invert one record's plain and DP single-record updates of ``model`` (x -> logit); one row each.

    ``aggregation``: a transport whose aggregator never holds one hospital's update (``he``, ``secagg``) adds the
    row saying the aggregator sees no per-client update
    (the plain and DP rows then describe what the client itself computes, not what the server sees).
    Rows never contain the record or its reconstruction, only error figures.
    """
    from secure_fedkim.federation.transports import TRANSPORTS

    held = TRANSPORTS[aggregation].update_held_as
    rows = []
    grad = record_gradient(model, x, y)
    for name, g in (
        ("plain", grad),
        ("dp", privatize_gradient(grad, max_grad_norm, noise_multiplier, seed=seed)),
    ):
        t0 = time.perf_counter()
        x_hat, final = invert_gradient(
            model, g, y, population_mean, loss=loss, optimizer=optimizer, steps=steps, lr=lr, seed=seed
        )
        row = {"update": name, "visible": held is None, "matching_loss": final, "loss": loss, "optimizer": optimizer,
               "steps": steps, "seconds": time.perf_counter() - t0, **reconstruction_error(x_hat, x, population_mean)}
        if name == "dp":
            row.update(max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier)
        rows.append(row)
    if held is not None:
        rows.append(aggregated_only_row(aggregation, held, min_clients))
    return rows
