"""`secagg`: Flower's SecAgg+ protocol, which hands the server only the sum of masked updates.

In flwr 1.42 SecAgg+ lives in the legacy workflow (`DefaultWorkflow` with `SecAggPlusWorkflow` and a
`LegacyContext`), whose strategies speak `Parameters`. `SecAggRounds` is the thin adapter: it receives the
already-unmasked weighted mean from the workflow and hands it to the same FedKIM strategy code (`collect`,
`finish_round`, `evaluate`, absolute round numbers after a resume) that the other transports use.
Hospitals run `secagg_app` (Flower's `secaggplus_mod` masks what `fit` returns).

Precision: each hospital multiplies its weights by num_examples / max_weight, clips them to
[-clipping_range, clipping_range] and quantizes them to quantization_range levels, so one value carries
an error of about 2 * clipping_range / quantization_range / (sum of num_examples / max_weight).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from secure_fedkim.federation.errors import RoundFailed
from secure_fedkim.federation.transport_specs import SecAggSpec
from secure_fedkim.federation.transports.base import Transport


class BudgetSkip(RuntimeError):
    """This hospital cannot afford the round within its privacy budget (recorded in its ledger)."""


# --- the hospital's side ------------------------------------------------------------------------------


class SecAggHospital(NumPyClient):
    """One hospital in the SecAgg+ workflow. The training code is imported only in `fit`: every SecAgg+
    protocol stage starts a fresh ClientApp process on a SuperNode, and only this stage trains."""

    def __init__(self, context: Context):
        self.context = context

    def fit(self, parameters, config):
        import torch

        from secure_fedkim.config import RunConfig
        from secure_fedkim.federation.node import hospital_round
        from secure_fedkim.hospital.local_training import new_client_model
        from secure_fedkim.plan import build_plan

        cfg = RunConfig.model_validate_json(str(config["run-config"]))
        template = new_client_model(cfg, build_plan(cfg)).state_dict()
        state = {k: torch.from_numpy(a.copy()) for k, a in zip(template, parameters)}
        result = hospital_round(cfg, self.context, config, state)
        if result.model is None:  # to SecAgg+ this is a dropout: its masks are recovered from the shares
            raise BudgetSkip(f"{result.client}: privacy budget exhausted, not training this round")
        arrays = [t.detach().numpy() for t in result.model.state_dict().values()]
        return arrays, int(result.metrics["num-examples"]), result.metrics


secagg_app = ClientApp(client_fn=lambda context: SecAggHospital(context).to_client(), mods=[secaggplus_mod])


def is_secagg_message(message) -> bool:
    """Whether a message belongs to the SecAgg+ (legacy) workflow rather than the Message API."""
    return any(k.startswith(("secaggplus", "fitins")) for k in message.content.keys())


# --- the server's side --------------------------------------------------------------------------------


class SecAggRounds(LegacyFedAvg):
    def __init__(self, fedkim, initial: ArrayRecord, fit_config: dict):
        n = len(fedkim.cfg.federation.clients)
        offset = fedkim.offset
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(initial.to_numpy_ndarrays()),
            on_fit_config_fn=lambda server_round: {**fit_config, "server-round": server_round + offset},
        )
        self.fedkim = fedkim
        self.final: ArrayRecord = initial
        self.completed: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        k = self.fedkim.sample_size(client_manager.num_available)
        self.min_fit_clients = self.min_available_clients = k
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        server_round += self.fedkim.offset
        failed = [str(f[1] if isinstance(f, tuple) else f) for f in failures]
        contributions = self.fedkim.collect(server_round, [fit.metrics for _, fit in results], failed)
        # every FitRes carries the same unmasked aggregate: the workflow's weighted mean
        mean = np.concatenate([a.ravel() for a in parameters_to_ndarrays(results[0][1].parameters)]).astype(np.float32)
        arrays, metrics = self.fedkim.finish_round(server_round, mean, contributions)
        self.final = arrays
        self.completed.append(server_round)
        return ndarrays_to_parameters(arrays.to_numpy_ndarrays()), dict(metrics)

    def evaluate(self, server_round, parameters):
        server_round += self.fedkim.offset
        if server_round not in self.completed:  # the workflow evaluates even after a failed round
            return None
        arrays = ArrayRecord(parameters_to_ndarrays(parameters))
        arrays = ArrayRecord(dict(zip(self.fedkim.template, arrays.to_torch_state_dict().values())))
        return 0.0, dict(self.fedkim.evaluate(server_round, arrays))


class SecAggTransport(Transport):
    spec = SecAggSpec
    server_sees = "only the sum of masked updates (SecAgg+)"
    update_held_as = "masked vectors whose masks cancel only in the sum"
    report_mode = "secagg+"
    title = "SecAgg+ secure aggregation"
    update_form = "SecAgg+-masked vector"
    report_checks = ("secagg_dropout_margin", "server_secret_key")
    report_section = "secagg"
    protects_one_update = "SecAgg+ masks that cancel only in the sum"
    exposes_one_update = "a server that also controls enough hospitals (at least the reconstruction threshold) could unmask one"
    summary_sentence = "Updates reached the server SecAgg+-masked: it learned only their sum (masking, not differential privacy)."
    not_covered = "a server controlling enough hospitals to unmask one (masking is confidentiality, not DP)"

    @classmethod
    def protocol_app(cls, message):
        return secagg_app if is_secagg_message(message) else None

    def run_rounds(self, strategy, grid, context, initial, train_config, num_rounds, round_timeout):
        s = self.cfg.federation.secagg
        rounds = SecAggRounds(strategy, initial, train_config)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=rounds)
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold, max_weight=s.max_weight,
                clipping_range=s.clipping_range, quantization_range=s.quantization_range, timeout=s.timeout,
            )
        )
        workflow(grid, legacy)
        expected = range(strategy.offset + 1, strategy.offset + num_rounds + 1)
        missing = [r for r in expected if r not in rounds.completed]
        if missing:  # Flower's workflow logs a failed SecAgg+ round and moves on; a run must not pretend
            raise RoundFailed(f"SecAgg+ round(s) {missing} did not complete (too few hospitals answered; see the log above)")
        return rounds.final

    def report_evidence(self, run, out, findings):
        """SecAgg+ tolerates num_shares - reconstruction_threshold dropouts: a round at that limit needs attention."""
        from secure_fedkim.report.collect import Finding  # the report's types, only when a report is built

        s = run.cfg.federation.secagg
        n = len(run.clients)
        tolerated = s.num_shares - s.reconstruction_threshold
        dropouts = []
        for r in range(1, run.rounds_run + 1):
            rec = run.record(r) or {}
            included = [c for c, st in (rec.get("clients") or {}).items() if not st.get("skipped-budget")]
            dropouts.append({"round": r, "dropouts": n - len(included)})
        worst_drop = max([d["dropouts"] for d in dropouts] or [0])
        if worst_drop >= tolerated:
            findings["secagg_dropout_margin"] = [Finding(
                "attention", f"a SecAgg+ round lost {worst_drop} hospital(s); {tolerated} tolerated "
                f"(num_shares {s.num_shares}, reconstruction_threshold {s.reconstruction_threshold})",
                None, "SecAgg+ dropouts at the tolerated limit")]
        out["secagg"] = {
            "protocol": "Flower SecAgg+ (SecAggPlusWorkflow / secaggplus_mod)",
            "num_shares": s.num_shares, "reconstruction_threshold": s.reconstruction_threshold,
            "dropouts_tolerated": tolerated, "dropouts_observed": dropouts,
            "clipping_range": s.clipping_range, "quantization_range": s.quantization_range,
            "max_weight": s.max_weight, "modulus": "Flower default",
        }
        out["server_has_secret_key"] = False
        out["authenticated_payloads"] = "SecAgg+ pairwise key agreement between hospitals (Flower)"
        out["description"] = ("Hospitals sent SecAgg+-masked updates; the server learned only their sum. "
                              "Masking is confidentiality, not differential privacy.")
