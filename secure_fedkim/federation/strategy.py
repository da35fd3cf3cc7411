"""FEDKIM's server strategy: Flower's FedAvg round loop with our transports, evaluation and injection.

Flower runs the rounds (sampling, messaging, timeouts); this class decides what a round's replies become:
each client's training statistics, the aggregate its transport computes (plain mean, CKKS sum decrypted by
the key holder, or SecAgg+'s unmasked sum), the knowledge injected into the foundation model, and the
global model's metrics on every task's held-out test split. The same class serves the simulation and the
deployment engine: rounds are numbered from `offset` (0 unless resumed from a checkpoint), a first round
may wait `join_timeout` seconds for every hospital, and `after_round` (e.g. a checkpoint) runs after each
evaluated round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from secure_fedkim.config import RunConfig
from secure_fedkim.federation.aggregation import unflatten_state
from secure_fedkim.federation.errors import BudgetExhausted, RoundFailed  # re-exported
from secure_fedkim.federation.transports import transport_for
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.plan import TaskPlan
from secure_fedkim.rundir.layout import RunDir
from secure_fedkim.hospital.training import evaluate_task

log = logging.getLogger(__name__)


def wait_for_nodes(count: Callable[[], int], n: int, min_clients: int, deadline: float, poll: float = 0.5) -> int:
    """Wait until `n` nodes are online or `deadline`; how many may be sampled (>= min_clients)."""
    while True:
        available = count()
        if available >= n or time.time() >= deadline:
            return max(min_clients, min(n, available))
        time.sleep(poll)


class FedKIM(FedAvg):
    def __init__(
        self, cfg: RunConfig, plans: dict[str, TaskPlan], run_dir: Path, transport=None, on_round=None,
        injector=None, *, offset: int = 0, join_timeout: float = 0.0,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
    ):
        n = len(cfg.federation.clients)
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        self.cfg, self.plans, self.run_dir = cfg, plans, Path(run_dir)
        self.transport = transport if transport is not None else transport_for(cfg)
        self.on_round = on_round  # callback(round, record) for progress display
        self.injector = injector  # knowledge injection into the foundation model, or None
        self.offset = offset  # rounds completed before this server started (resume)
        self.join_timeout = join_timeout  # seconds the first round waits for every hospital
        self.after_round = after_round  # e.g. a checkpoint, after each evaluated round
        self.template = new_client_model(cfg, plans).state_dict()
        self.history: list[dict] = []
        self.round_stats: dict = {}  # what this round's record says about the clients (set by `collect`)
        self._joined = False

    # --- sampling: absolute round numbers, and the first round waits for every hospital -------------
    def sample_size(self, count: Callable[[], int]) -> int:
        n, m = len(self.cfg.federation.clients), self.cfg.federation.min_clients
        wait = self.join_timeout if not self._joined else 0.0
        self._joined = True
        return wait_for_nodes(count, n, m, time.time() + wait)

    def configure_train(self, server_round, arrays, config, grid):
        k = self.sample_size(lambda: len(list(grid.get_node_ids())))
        self.min_available_nodes = self.min_train_nodes = k
        return super().configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        failed = [m.error.reason for m in replies if m.has_error()]
        contributions = self.collect(server_round, [m.content["metrics"] for m in valid], failed)
        by_client = {self.client_of(m.content["metrics"]): m.content for m in valid}
        mean = self.transport.aggregate(self, server_round, [(c, w, by_client[c]) for c, w in contributions])
        return self.finish_round(server_round, mean, contributions)

    def client_of(self, metrics) -> str:
        return self.cfg.federation.clients[int(metrics["client-index"])]

    def collect(self, server_round: int, replies_metrics: list, failed: list[str]) -> list[tuple[str, float]]:
        """Record each hospital's statistics; return (hospital, weight) of those whose update counts.

        Raises RoundFailed when fewer than min_clients can contribute, BudgetExhausted when a hospital is
        out of budget and the config says to stop the run.
        """
        contributions, stats, skipped = [], {}, []
        for metrics in replies_metrics:
            client = self.client_of(metrics)
            stats[client] = {k: v for k, v in metrics.items() if k != "client-index"}
            if metrics.get("skipped-budget"):
                skipped.append(client)
            else:
                contributions.append((client, float(metrics["num-examples"])))
        self.round_stats = {"clients": stats, "failed": failed, "skipped_budget": skipped}
        if skipped and self.cfg.privacy.on_exhaustion == "stop_run":
            self._write_round(server_round, {"round": server_round, **self.round_stats, "stopped": "budget"})
            raise BudgetExhausted(
                f"round {server_round}: {skipped} cannot afford another round within their privacy budget; "
                f"the run stops (privacy.on_exhaustion: stop_run)"
            )
        if len(contributions) < self.cfg.federation.min_clients:
            raise RoundFailed(
                f"round {server_round}: {len(contributions)} clients contributed ({skipped} skipped for budget, "
                f"{len(failed)} failed), fewer than min_clients={self.cfg.federation.min_clients}; errors: {failed}"
            )
        return contributions

    def finish_round(self, server_round: int, mean: np.ndarray, contributions) -> tuple[ArrayRecord, MetricRecord]:
        """What every transport's aggregate becomes: the next global model (after injection, if on)."""
        state = unflatten_state(mean, self.template)
        if self.injector is not None:
            model = new_client_model(self.cfg, self.plans)
            model.load_state_dict(state)
            self.round_stats["injection"] = self.injector.inject(model)
            if self.cfg.injection.sync_back:
                state = model.state_dict()
        arrays = ArrayRecord(state)
        total = int(sum(w for _, w in contributions))
        return arrays, MetricRecord({"num-clients": len(contributions), "num-examples": total})

    def public_round(self, server_round: int, model) -> ArrayRecord:
        """A round without hospitals (FEDKIM_pub, `engine.PublicRounds`): the server injects from its public
        split alone into the global model `model` (its encoders, in place, whatever `sync_back` says: there is
        no hospital update to keep instead), evaluates it and returns its arrays."""
        self.round_stats = {"clients": {}, "injection": self.injector.inject(model)}
        arrays = ArrayRecord(model.state_dict())
        self.evaluate(server_round, arrays)
        return arrays

    def _write_round(self, server_round: int, record: dict) -> None:
        path = RunDir(self.run_dir).round_metrics(server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))

    def _save_fm_scores(self, server_round: int, scores: dict) -> None:
        """The FM's test probabilities before any injection (round 0) and after the latest round, for the run's
        paired comparison of the two (metrics/fm_test_scores.npz; test splits only, never training records)."""
        path = RunDir(self.run_dir).fm_scores
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = {}
        if server_round > 0 and path.exists():
            with np.load(path) as old:
                kept = {k: old[k] for k in old.files if k.startswith("round_000.")}
        kept.update({f"round_{server_round:03d}.{task}": p for task, p in scores.items()})
        np.savez(path, **kept)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global lightweight model on every training task's test split.

        `server_round` is absolute (offset included); round 0 is the initial model."""
        model = new_client_model(self.cfg, self.plans)
        model.load_state_dict(arrays.to_torch_state_dict())
        test = {}
        for name, plan in self.plans.items():
            if plan.task.role == "train":
                t = plan.test()
                test[name] = evaluate_task(model.task_model(name), t.x, t.y)
        record = {"round": server_round, "finished_at": time.time(), "client_model_test": test,
                  **(self.round_stats if server_round else {})}
        if self.injector is not None:
            scores: dict = {}
            record["fm_test"] = self.injector.evaluate(model, scores)
            self._save_fm_scores(server_round, scores)
            if server_round > 0:  # the injected FM as released after the latest round (what the audit attacks)
                self.injector.fm.save_adapter(RunDir(self.run_dir).fm_dir)
        self.history.append(record)
        self._write_round(server_round, record)
        if self.on_round:
            self.on_round(server_round, record)
        if server_round > 0 and self.after_round is not None:
            self.after_round(server_round, arrays)
        return MetricRecord({f"{k}.{m}": float(v) for k, r in test.items() for m, v in r.items()})
