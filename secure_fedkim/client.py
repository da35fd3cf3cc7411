"""What one hospital does in a round: train each of its tasks for the configured local epochs.

Shared by the Flower ClientApp and the single-hospital baseline, so both train exactly alike.
"""

from __future__ import annotations

import torch

from secure_fedkim.config import RunConfig
from secure_fedkim.models import ClientModel
from secure_fedkim.plan import TaskPlan, input_shapes
from secure_fedkim.training import Privatizer, train_task


def new_client_model(cfg: RunConfig, plans: dict[str, TaskPlan]) -> ClientModel:
    """The global model's architecture, initialised from the run seed (identical in every process)."""
    torch.manual_seed(cfg.run.seed)
    train = {name: p.task.modality for name, p in plans.items() if p.task.role == "train"}
    return ClientModel(train, input_shapes(plans), cfg.client.token_dim, cfg.client.num_tokens)


def local_round(
    model: ClientModel,
    plans: dict[str, TaskPlan],
    client: str,
    cfg: RunConfig,
    server_round: int,
    privatizer_for=None,
) -> dict[str, dict]:
    """Train every training task on this client's shard, one after another; returns per-task stats.

    `privatizer_for(task_name, n_records)` returns a DP privatizer for that task's training, or None.
    """
    c = cfg.client
    proximal_mu = cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0
    stats = {}
    for i, (name, plan) in enumerate(p for p in plans.items() if p[1].task.role == "train"):
        shard = plan.shard(client)
        privatizer = privatizer_for(name, len(shard)) if privatizer_for and len(shard) else None
        stats[name] = train_task(
            model.task_model(name), shard.x, shard.y,
            epochs=c.local_epochs, batch_size=c.batch_size, lr=c.lr, max_grad_norm=c.max_grad_norm,
            seed=cfg.run.seed * 100_003 + server_round * 101 + i, proximal_mu=proximal_mu, privatizer=privatizer,
        )
    return stats
