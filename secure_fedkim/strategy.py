"""FEDKIM's server strategy: Flower's FedAvg round loop with our aggregation and evaluation.

Flower runs the rounds (sampling, messaging, timeouts); this class decides what a round's replies become:
the sample-weighted mean of the client models (FedProx differs only on the client side), a record of
each client's training statistics, and the global model's metrics on every task's held-out test split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from privacy.he import Aggregator, HEPayloadError, InsufficientContributionsError
from secure_fedkim.aggregation import flatten_state, unflatten_state, weighted_mean
from secure_fedkim.client import new_client_model
from secure_fedkim.config import RunConfig
from secure_fedkim.plan import TaskPlan
from secure_fedkim.training import evaluate_task

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """Too few clients answered a round; the run stops with what it has recorded so far."""


class BudgetExhausted(RuntimeError):
    """A hospital's privacy budget cannot pay for another round and the config says to stop the run."""


class FedKIM(FedAvg):
    def __init__(
        self, cfg: RunConfig, plans: dict[str, TaskPlan], run_dir: Path, on_round=None, keyholder=None,
        verify_keys=None, injector=None,
    ):
        n = len(cfg.federation.clients)
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
        )
        self.cfg, self.plans, self.run_dir = cfg, plans, Path(run_dir)
        self.on_round = on_round  # callback(round, record) for progress display
        self.keyholder, self.verify_keys = keyholder, verify_keys  # he mode: a KeyHolderProcess, never a secret key
        self.injector = injector  # knowledge injection into the foundation model, or None
        self.template = new_client_model(cfg, plans).state_dict()
        self.history: list[dict] = []
        self._client_stats: dict[str, dict] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        failed = [m.error.reason for m in replies if m.has_error()]
        contributions = self.collect(server_round, [m.content["metrics"] for m in valid], failed)
        by_client = {self.client_of(m.content["metrics"]): m.content for m in valid}
        if self.keyholder is None:
            mean = weighted_mean(
                [flatten_state(by_client[c].array_records["arrays"].to_torch_state_dict()) for c, _ in contributions],
                [w for _, w in contributions],
            )
        else:
            mean = self._he_mean(server_round, [(c, by_client[c]) for c, _ in contributions])
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
        self._client_stats = {"clients": stats, "failed": failed, "skipped_budget": skipped}
        if skipped and self.cfg.privacy.on_exhaustion == "stop_run":
            self._write_round(server_round, {"round": server_round, **self._client_stats, "stopped": "budget"})
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
            self._client_stats["injection"] = self.injector.inject(model)
            if self.cfg.injection.sync_back:
                state = model.state_dict()
        arrays = ArrayRecord(state)
        total = int(sum(w for _, w in contributions))
        return arrays, MetricRecord({"num-clients": len(contributions), "num-examples": total})

    def _he_mean(self, server_round: int, contributions) -> "np.ndarray":
        """Sum the ciphertexts here (public context only); the key holder decrypts the mean, once."""
        aggregator = Aggregator(
            self.keyholder.public_context, self.verify_keys, self.run_dir.name, server_round, self.cfg.federation.min_clients
        )
        rejected = {}
        for client, content in contributions:
            try:
                aggregator.add(bytes(content.config_records["he"]["update"]))
            except HEPayloadError as e:  # the round goes on with the others if min_clients still holds
                rejected[client] = str(e)
        self._client_stats["rejected"] = rejected
        try:
            encrypted = aggregator.aggregate()
        except InsufficientContributionsError as e:
            raise RoundFailed(f"round {server_round}: {e}; rejected: {rejected}") from None
        return self.keyholder.decrypt(encrypted.to_bytes()).astype(np.float32)

    def _write_round(self, server_round: int, record: dict) -> None:
        out = self.run_dir / "metrics"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"round_{server_round:03d}.json").write_text(json.dumps(record, indent=2))

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global lightweight model on every training task's test split."""
        model = new_client_model(self.cfg, self.plans)
        model.load_state_dict(arrays.to_torch_state_dict())
        test = {}
        for name, plan in self.plans.items():
            if plan.task.role == "train":
                t = plan.test()
                test[name] = evaluate_task(model.task_model(name), t.x, t.y)
        record = {"round": server_round, "finished_at": time.time(), "client_model_test": test, **(self._client_stats if server_round else {})}
        if self.injector is not None:
            record["fm_test"] = self.injector.evaluate(model)
        self.history.append(record)
        self._write_round(server_round, record)
        if self.on_round:
            self.on_round(server_round, record)
        return MetricRecord({f"{k}.{m}": float(v) for k, r in test.items() for m, v in r.items()})


