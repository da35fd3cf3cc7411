"""The Flower ClientApp: one hospital's node.

It receives the global client model and the run config, trains on its own persistent shards, and replies
with its updated weights and per-task training statistics. The same app runs in Flower's simulation and
on a SuperNode of the deployment engine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secure_fedkim.aggregation import flatten_state
from secure_fedkim.artifacts import client_dir, save_model
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.he import encrypt_update
from privacy.ledger import PrivacyLedger
from secure_fedkim.client import dp_round_schedule, hospital_records, local_round, new_client_model
from secure_fedkim.config import RunConfig
from secure_fedkim.identity import load_signing_key
from secure_fedkim.plan import build_plan

app = ClientApp()


def client_name(context: Context, cfg: RunConfig) -> str:
    """A deployed node names its hospital in its node config; a simulated node has a partition id."""
    node = context.node_config
    if "hospital" in node:
        name = str(node["hospital"])
        if name not in cfg.federation.clients:
            raise ValueError(f"node hospital {name!r} is not a client of this federation {cfg.federation.clients}")
        return name
    return cfg.federation.clients[int(node["partition-id"])]


def state_dir(context: Context, msg: Message, client: str) -> Path:
    """Where this hospital keeps its own state: its node's `state-dir`, or the run directory in a simulation."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    return client_dir(str(msg.content["config"]["run-dir"]), client)


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = RunConfig.model_validate_json(str(msg.content["config"]["run-config"]))
    server_round = int(msg.content["config"]["server-round"])
    client = client_name(context, cfg)
    plans = build_plan(cfg)
    home = state_dir(context, msg, client)
    metrics = {"client-index": cfg.federation.clients.index(client)}
    dp = hospital_dp(cfg, plans, client, home, str(msg.content["config"]["run-id"]))
    if dp is not None and not dp.can_train():
        dp.record_skip(round=server_round)
        metrics.update({"skipped-budget": 1, "epsilon-spent": dp.spent_epsilon(), "num-examples": 0})
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    model = new_client_model(cfg, plans)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    stats = local_round(model, plans, client, cfg, server_round, dp=dp)
    save_model(model, home / "local_model.safetensors")
    metrics["num-examples"] = sum(s["n"] for s in stats.values())
    for task, s in stats.items():
        metrics[f"{task}.n"] = int(s["n"])
        metrics[f"{task}.steps"] = int(s["steps"])
        if dp is None:  # a training loss on private data is itself unprotected: not sent under DP
            metrics[f"{task}.loss"] = float(s["loss"])
    if dp is not None:
        metrics["epsilon-spent"] = dp.spent_epsilon()
        metrics["noise-multiplier"] = dp.noise_multiplier
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if cfg.federation.aggregation == "he":  # only ciphertext leaves the hospital
        update = encrypt_update(
            flatten_state(model.state_dict()), metrics["num-examples"], bytes(msg.content["config"]["he-public-context"]),
            load_signing_key(home), run_id=str(msg.content["config"]["run-id"]), round=server_round, client=client,
        )
        content["he"] = ConfigRecord({"update": update.to_bytes()})
    else:
        content["arrays"] = ArrayRecord(model.state_dict())
    return Message(content, reply_to=msg)


def hospital_dp(cfg: RunConfig, plans, client: str, home: Path, run_id: str) -> HospitalDP | None:
    """This hospital's DP state for the run, rebuilt from its own ledger (None when DP is off)."""
    profile = cfg.dp_profile(client)
    if profile is None:
        return None
    return HospitalDP(
        PrivacyProfile(**profile.model_dump(), on_exhaustion=cfg.privacy.on_exhaustion),
        PrivacyLedger(home / "ledger.jsonl"),
        run_id,
        dp_round_schedule(plans, client, cfg),
        cfg.run.rounds,
        n_records=hospital_records(plans, client),
    )
