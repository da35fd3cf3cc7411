"""One hospital's node: its round (`hospital_round`) and the ClientApp of the Message-API transports (`message_app`).

A hospital receives the global client model and the run config, checks them against its own policy, trains on
its own persistent shards (with DP-SGD when its profile says so) and keeps its spend and local model. What leaves
it is the transport's business: `message_app(transport)` replies with the records `transport.reply` makes
(weights for `plain`, a signed CKKS ciphertext for `he`); SecAgg+ has its own ClientApp
(`transports.secagg.secagg_app`), which calls the same `hospital_round`. Both run unchanged in Flower's
simulation or on a SuperNode.

Below the transports: this module imports none of them (they import it for their hospital's side).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privacy.accounting import group_privacy_epsilon
from privacy.dp import HospitalDP
from privacy.ledger import PrivacyLedger
from secure_fedkim.rundir.artifacts import save_model
from secure_fedkim.config import RunConfig
from secure_fedkim.deploy.policy import check_node
from secure_fedkim.hospital.local_training import dp_plan_inputs, local_round, new_client_model
from secure_fedkim.hospital.models import ClientModel
from secure_fedkim.plan import build_plan
from secure_fedkim.rundir.layout import HospitalDir, RunDir

if TYPE_CHECKING:
    from secure_fedkim.federation.transports.base import Transport


@dataclass
class RoundResult:
    client: str
    model: ClientModel | None  # None when the hospital skipped the round for its budget
    metrics: dict = field(default_factory=dict)


def client_name(context: Context, cfg: RunConfig) -> str:
    """A deployed node names its hospital in its node config; a simulated node has a partition id."""
    node = context.node_config
    if "hospital" in node:
        name = str(node["hospital"])
        if name not in cfg.federation.clients:
            raise ValueError(f"node hospital {name!r} is not a client of this federation {cfg.federation.clients}")
        return name
    return cfg.federation.clients[int(node["partition-id"])]


def state_dir(context: Context, run_dir: str, client: str) -> Path:
    """Where this hospital keeps its own state: its node's `state-dir`, or the run directory in a simulation."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    return RunDir(run_dir).client(client).path


def hospital_dp(
    cfg: RunConfig, plans, client: str, home: Path, run_id: str, noise_multiplier: float | None = None
) -> HospitalDP | None:
    """This hospital's DP state for the run, rebuilt from its own ledger (None when DP is off).

    The federation's plan is calibrated on `dp_plan_inputs`, which reserves the single-hospital baseline's
    steps when the run has one. `noise_multiplier`: reuse that noise instead (the baseline itself, which
    trains the same schedule and reserves nothing)."""
    profile = cfg.dp_profile(client)
    if profile is None:
        return None
    inputs = dp_plan_inputs(cfg, plans, client)
    if noise_multiplier is not None:
        inputs.update(reserved=[], reserved_for=None)
    return HospitalDP(
        profile,
        PrivacyLedger(HospitalDir(home).ledger),
        run_id,
        rounds=cfg.run.rounds,
        noise_multiplier=noise_multiplier,
        **inputs,
    )


def with_target(cfg: RunConfig, client: str, target: float) -> RunConfig:
    """`cfg` with `client`'s DP target epsilon set to `target` (a run its policy calibrated to the lifetime remainder)."""
    p = cfg.privacy
    budget = p.hospitals.get(client, p.profile).model_copy(update={"target_epsilon": float(target)})
    return cfg.model_copy(update={"privacy": p.model_copy(update={"hospitals": {**p.hospitals, client: budget}})})


def planned_dp_steps(cfg: RunConfig, plans, client: str, home: Path, run_id: str, target: float | None = None):
    """This run's whole planned DP schedule at `client`, reserved steps included, and its privacy unit: the plan
    its ledger already holds, else the plan `hospital_dp` will make (the same calibration, run in a scratch
    ledger, so the lifetime check sees exactly the noise the run will use; nothing is written to `home`)."""
    import tempfile

    from privacy.plan import DPPlan

    recorded = PrivacyLedger(HospitalDir(home).ledger).plan(run_id)
    if recorded is not None:
        return recorded.with_reserved(), recorded.privacy_unit
    if target is not None:
        cfg = with_target(cfg, client, target)
    with tempfile.TemporaryDirectory(prefix="lifetime-probe-") as scratch:
        dp = hospital_dp(cfg, plans, client, Path(scratch), run_id)
        plan = DPPlan.from_entry(dp.plan)
    return plan.with_reserved(), plan.privacy_unit


def hospital_round(cfg: RunConfig, context: Context, config, state: dict) -> RoundResult:
    """One round at one hospital: budget check, (DP-)training, spend recorded, local model kept."""
    torch.set_num_threads(1)
    server_round = int(config["server-round"])
    client = client_name(context, cfg)
    plans = build_plan(cfg)
    home = state_dir(context, str(config["run-dir"]), client)
    metrics = {"client-index": cfg.federation.clients.index(client)}
    # A deployed hospital's own signed policy, before anything is planned or trained: a refusal is in its
    # ledger and the node answers with an error (PolicyRefusal), never with an update.
    # Its lifetime budget too: this run's whole plan composed with every earlier run on the same data.
    run_id = str(config["run-id"])
    target = check_node(cfg, context.node_config, config, client, home, plans,
                        planned=lambda t=None: planned_dp_steps(cfg, plans, client, home, run_id, t))
    if target is not None:  # its policy calibrated this run to what its lifetime budget leaves
        cfg = with_target(cfg, client, target)
    dp = hospital_dp(cfg, plans, client, home, str(config["run-id"]))
    if dp is not None and not dp.can_train():
        dp.record_skip(round=server_round)
        metrics.update({"skipped-budget": 1, "epsilon-spent": dp.spent_epsilon(), "num-examples": 0})
        return RoundResult(client, None, metrics)

    model = new_client_model(cfg, plans)
    model.load_state_dict(state)
    stats = local_round(model, plans, client, cfg, server_round, dp=dp)
    save_model(model, HospitalDir(home).local_model)
    metrics["num-examples"] = sum(s["n"] for s in stats.values())
    for task, s in stats.items():
        metrics[f"{task}.n"] = int(s["n"])
        metrics[f"{task}.steps"] = int(s["steps"])
        if dp is None:  # a training loss on private data is itself unprotected: not sent under DP
            metrics[f"{task}.loss"] = float(s["loss"])
    if dp is not None:
        recorded = [st["epsilon"] for st in stats.values() if "epsilon" in st]
        # the last record_round already returned the whole run's spend: no second accountant pass
        metrics["epsilon-spent"] = recorded[-1] if recorded else dp.spent_epsilon()
        metrics["noise-multiplier"] = dp.noise_multiplier
        k = cfg.privacy.max_records_per_patient
        if k:
            metrics["epsilon-patient"], metrics["delta-patient"] = group_privacy_epsilon(metrics["epsilon-spent"], dp.delta, k)
    return RoundResult(client, model, metrics)


@functools.cache
def message_app(transport_of: Callable[[RunConfig], Transport]) -> ClientApp:
    """The ClientApp of a Message-API transport: one round (`hospital_round`), then the reply's records made by
    `transport_of(cfg).reply` (`transport_of`: a transport class, or `transports.transport_for` to take the one
    each round's config names). One app per `transport_of`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        cfg = RunConfig.model_validate_json(str(config["run-config"]))
        result = hospital_round(cfg, context, config, msg.content["arrays"].to_torch_state_dict())
        content = RecordDict({"metrics": MetricRecord(result.metrics)})
        if result.model is not None:  # None: skipped for budget, only the metrics say so
            home = state_dir(context, str(config["run-dir"]), result.client)
            reply = transport_of(cfg).reply(
                result.model.state_dict(), result.metrics["num-examples"], config, home, result.client
            )
            for key, record in reply.items():
                content[key] = record
        return Message(content, reply_to=msg)

    return app
