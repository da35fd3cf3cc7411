"""SecAgg+ mode: Flower's SecAgg+ protocol, which hands the server only the sum of masked updates.

In flwr 1.42 SecAgg+ lives in the legacy workflow (`DefaultWorkflow` with `SecAggPlusWorkflow` and a
`LegacyContext`), whose strategies speak `Parameters`. `SecAggFedKIM` is the thin adapter: it receives
the already-unmasked weighted mean from the workflow and hands it to the same FedKIM strategy code
(`collect`, `finish_round`, `evaluate`) that the plain and he transports use.

Precision: each hospital multiplies its weights by num_examples / max_weight, clips them to
[-clipping_range, clipping_range] and quantizes them to quantization_range levels, so one value carries
an error of about 2 * clipping_range / quantization_range / (sum of num_examples / max_weight).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from secure_fedkim.strategy import FedKIM, RoundFailed


class SecAggFedKIM(LegacyFedAvg):
    def __init__(self, fedkim: FedKIM, initial: ArrayRecord, fit_config: dict):
        n = len(fedkim.cfg.federation.clients)
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(initial.to_numpy_ndarrays()),
            on_fit_config_fn=lambda server_round: {**fit_config, "server-round": server_round},
        )
        self.fedkim = fedkim
        self.final: ArrayRecord = initial
        self.completed: list[int] = []

    def aggregate_fit(self, server_round, results, failures):
        failed = [str(f[1] if isinstance(f, tuple) else f) for f in failures]
        contributions = self.fedkim.collect(server_round, [fit.metrics for _, fit in results], failed)
        # every FitRes carries the same unmasked aggregate: the workflow's weighted mean
        mean = np.concatenate([a.ravel() for a in parameters_to_ndarrays(results[0][1].parameters)]).astype(np.float32)
        arrays, metrics = self.fedkim.finish_round(server_round, mean, contributions)
        self.final = arrays
        self.completed.append(server_round)
        return ndarrays_to_parameters(arrays.to_numpy_ndarrays()), dict(metrics)

    def evaluate(self, server_round, parameters):
        if server_round not in self.completed:  # the workflow evaluates even after a failed round
            return None
        arrays = ArrayRecord(parameters_to_ndarrays(parameters))
        arrays = ArrayRecord(dict(zip(self.fedkim.template, arrays.to_torch_state_dict().values())))
        return 0.0, dict(self.fedkim.evaluate(server_round, arrays))


def run_secagg(grid, context: Context, fedkim: FedKIM, initial: ArrayRecord, fit_config: dict) -> ArrayRecord:
    s = fedkim.cfg.federation.secagg
    strategy = SecAggFedKIM(fedkim, initial, fit_config)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fedkim.cfg.run.rounds), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold, max_weight=s.max_weight,
            clipping_range=s.clipping_range, quantization_range=s.quantization_range, timeout=s.timeout,
        )
    )
    workflow(grid, legacy)
    missing = [r for r in range(1, fedkim.cfg.run.rounds + 1) if r not in strategy.completed]
    if missing:  # Flower's workflow logs a failed SecAgg+ round and moves on; a run must not pretend
        raise RoundFailed(f"SecAgg+ round(s) {missing} did not complete (too few hospitals answered; see the log above)")
    return strategy.final
