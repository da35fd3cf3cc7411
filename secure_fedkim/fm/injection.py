"""Knowledge injection on the server: the aggregated encoders become the foundation model's modality
tokenizers, and M3OE (or a baseline) is trained on the server's labelled public split.

Each round: load the aggregated encoders, train encoders + projection + experts + gate on every training
task's public split (mixed or task by task), evaluate the FM on every task's test split (unseen tasks
zero-shot: their data is never trained on), and hand the updated encoders back for the next round.
"""

from __future__ import annotations

import numpy as np
import torch

from secure_fedkim.config import InjectionSection, RunConfig
from secure_fedkim.fm.model import FMConfig, FoundationModel
from secure_fedkim.fm.m3oe import M3OEConfig
from secure_fedkim.metrics import binary_metrics
from secure_fedkim.hospital.models import ClientModel
from secure_fedkim.plan import TaskPlan
from secure_fedkim.hospital.training import as_tensors
from secure_fedkim.variants import METHODS  # injection.method -> number of experts (secure_fedkim.variants)


def fm_config(inj: InjectionSection, enc_dim: int) -> FMConfig:
    experts = METHODS[inj.method].experts
    if experts is None:
        experts = inj.num_experts
    m3oe = None
    if experts:
        m3oe = M3OEConfig(
            num_experts=experts, r=inj.r, lora_alpha=inj.lora_alpha, lora_dropout=inj.lora_dropout,
            target_modules=list(inj.target_modules), apply_scaling=inj.apply_scaling, gating=inj.gating,
            top_k=inj.top_k, gate_inputs=inj.gate_inputs,
        )
    return FMConfig(path=inj.fm_path, kind=inj.fm_kind, m3oe=m3oe, trainable=inj.trainable, enc_dim=enc_dim)


def initial_fm(config: FMConfig, seed: int) -> FoundationModel:
    """The FM before any injection: its experts, gate and projection initialised from the run's seed (so the
    study can rebuild a run's round-0 gate from the config its adapter saved)."""
    torch.manual_seed(seed)
    return FoundationModel(config)


class Injector:
    """The server's foundation model and its training state across rounds."""

    def __init__(self, cfg: RunConfig, plans: dict[str, TaskPlan]):
        self.cfg, self.inj, self.plans = cfg, cfg.injection, plans
        self.fm = initial_fm(fm_config(self.inj, cfg.client.token_dim), cfg.run.seed)
        self._rng = np.random.default_rng(cfg.run.seed + 7)
        self.trained_examples = 0

    def _batches(self, task_names: list[str]):
        """(task, index array) batches over the public splits, mixed across tasks or task by task."""
        bs = self.inj.batch_size
        per_task = []
        for name in task_names:
            n = len(self.plans[name].split.public)
            order = self._rng.permutation(n)[: self.inj.max_public_per_task]
            per_task.append([(name, order[i : i + bs]) for i in range(0, len(order), bs)])
        if self.inj.order == "task_by_task":
            return [b for batches in per_task for b in batches]
        mixed = [b for batches in per_task for b in batches]
        return [mixed[i] for i in self._rng.permutation(len(mixed))]

    def _inputs(self, plan: TaskPlan, data, idx):
        x, y = as_tensors(data.x[idx], data.y[idx]).tensors
        n = len(idx)
        t = plan.task
        return x, y.long(), [t.question] * n, [t.modality_description] * n, [t.task_description] * n

    def inject(self, model: ClientModel) -> dict:
        """Train encoders (in place), projection, experts and gate on the public splits; returns stats."""
        train_tasks = [n for n, p in self.plans.items() if p.task.role == "train"]
        params = self.fm.trainable_parameters() + list(model.encoders.parameters())
        optimizer = torch.optim.Adam(params, lr=self.inj.lr)
        self.fm.train()
        model.train()
        losses = []
        for _ in range(self.inj.epochs_per_round):
            for name, idx in self._batches(train_tasks):
                plan = self.plans[name]
                x, y, q, m, t = self._inputs(plan, plan.public(), idx)
                tokens = model.encoders[plan.task.modality](x)
                out = self.fm(tokens, q, m, t, labels=y)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                losses.append(out["loss"].item())
                self.trained_examples += len(idx)
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": len(losses)}

    def sampler_state(self) -> dict:
        """What a checkpoint must keep to resume injection exactly: the public-batch sampler and its count."""
        return {"rng": self._rng.bit_generator.state, "trained_examples": self.trained_examples}

    def restore_sampler_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.trained_examples = int(state["trained_examples"])

    @torch.no_grad()
    def evaluate(self, model: ClientModel, scores: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
        """The FM's answers on every task's test split; unseen tasks are answered zero-shot. `scores`, when
        given, receives each task's test probabilities (for paired bootstrap intervals)."""
        model.eval()
        out = {}
        for name, plan in self.plans.items():
            test = plan.test()
            if len(test) == 0:
                continue
            preds, probs = [], []
            for s in range(0, len(test), 128):
                idx = np.arange(s, min(s + 128, len(test)))
                x, _, q, m, t = self._inputs(plan, test, idx)
                p, pr = self.fm.predict(model.encoders[plan.task.modality](x), q, m, t)
                preds.append(p)
                probs.append(pr)
            out[name] = {"role": plan.task.role, **binary_metrics(test.y, np.concatenate(preds), np.concatenate(probs))}
            if scores is not None:
                scores[name] = np.concatenate(probs)
        return out
