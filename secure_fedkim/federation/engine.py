"""One federation engine for Flower's simulation and its deployment engine.

`run_fedkim` runs FEDKIM's server side over whatever Grid Flower hands the ServerApp: the run's transport
(set up and closed here), the strategy, and the rounds, resumable from a checkpoint (offset 0 in a
simulation). The rounds are the transport's, or, for FEDKIM_pub (`public_only`), rounds in which no hospital
takes part and the server trains on its public split alone (`PublicRounds`). `make_server_app` wraps it as
the simulation's ServerApp; `secure_fedkim.drivers.deploy_app` calls it from the deployment's ServerApp with node
waiting, a checkpoint per round and resume. Both drivers write the run's summary with `write_run_summary`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.logger import update_console_handler

from secure_fedkim.config import RunConfig, config_sha256
from secure_fedkim.federation.checkpoint import restore_injector
from secure_fedkim.federation.strategy import FedKIM
from secure_fedkim.federation.transports import transport_for
from secure_fedkim.fm.injection import Injector
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.plan import TaskPlan, build_plan
from secure_fedkim.rundir.layout import RunDir


@dataclass
class FederationResult:
    arrays: ArrayRecord  # the final global client model
    history: list[dict]  # one record per evaluated round (round 0 = the initial model, unless resumed)
    aggregation: dict  # the transport's facts for summary.json


def public_only(cfg: RunConfig) -> bool:
    """FEDKIM_pub: no hospital takes part; the server trains encoders and M3OE on its public split alone."""
    return cfg.injection.enabled and cfg.injection.method == "fedkim_pub"


class PublicRounds:
    """The rounds of a federation without hospital updates (FEDKIM_pub), in place of the transport's: nothing
    to set up and nothing sent; each round the server injects from its public split into its own copy of the
    global model (`FedKIM.public_round`). The summary's facts are the transport's."""

    def __init__(self, transport, cfg: RunConfig, plans: dict[str, TaskPlan]):
        self.transport = transport
        # Built before the injector and the run's first evaluation, as FEDKIM_pub always built it: loading each
        # round's arrays into it draws nothing from torch's RNG, which the injection's LoRA dropout draws from.
        self.model = new_client_model(cfg, plans)

    def open(self, run_dir: Path, keys_dir: Path | None) -> dict:
        return {}

    def close(self) -> None:
        pass

    def facts(self) -> dict:
        return self.transport.facts()

    def run_rounds(self, strategy: FedKIM, grid: Grid, context: Context, initial: ArrayRecord, train_config: dict,
                   num_rounds: int, round_timeout: float) -> ArrayRecord:
        arrays = initial
        for r in range(strategy.offset + 1, strategy.offset + num_rounds + 1):
            self.model.load_state_dict(arrays.to_torch_state_dict())
            arrays = strategy.public_round(r, self.model)
        return arrays


def run_fedkim(
    grid: Grid, context: Context, cfg: RunConfig, run_dir: Path, *, on_round=None, keys_dir: Path | None = None,
    resume: tuple[int, ArrayRecord, dict] | None = None, round_timeout: float = 3600.0, join_timeout: float = 0.0,
    after_round: Callable[[FedKIM, int, ArrayRecord], None] | None = None, extra_train_config: dict | None = None,
) -> FederationResult:
    """FEDKIM's rounds from the start, or after `resume` = (completed rounds, global arrays, checkpoint meta)."""
    run_dir = Path(run_dir)
    plans = build_plan(cfg)
    transport = transport_for(cfg)
    rounds = PublicRounds(transport, cfg, plans) if public_only(cfg) else transport
    train_config = {"run-config": cfg.model_dump_json(), "run-dir": str(run_dir.resolve()), "run-id": run_dir.name}
    train_config.update(extra_train_config or {})
    try:
        train_config.update(rounds.open(run_dir, keys_dir))
        injector = Injector(cfg, plans) if cfg.injection.enabled else None
        strategy = FedKIM(cfg, plans, run_dir, transport, on_round=on_round, injector=injector, join_timeout=join_timeout)
        if after_round is not None:
            strategy.after_round = lambda r, arrays: after_round(strategy, r, arrays)
        arrays = ArrayRecord(new_client_model(cfg, plans).state_dict())
        if resume is not None:
            strategy.offset, arrays, meta = resume
            if injector is not None:
                restore_injector(run_dir, injector, meta)
        else:
            strategy.evaluate(0, arrays)
        arrays = rounds.run_rounds(
            strategy, grid, context, arrays, train_config, cfg.run.rounds - strategy.offset, round_timeout
        )
        return FederationResult(arrays, strategy.history, rounds.facts())
    finally:
        rounds.close()


@dataclass
class ServerOutcome:
    """What a simulation's ServerApp leaves behind: its result, or the error Flower would only log."""

    result: FederationResult | None = None
    error: BaseException | None = field(default=None)


def make_server_app(cfg: RunConfig, run_dir: Path, on_round=None, quiet_flower: bool = True) -> tuple[ServerApp, ServerOutcome]:
    """A ServerApp bound to one run, and the outcome it fills in."""
    app, outcome = ServerApp(), ServerOutcome()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if quiet_flower:
            update_console_handler(level=logging.WARNING)  # our own per-round table replaces Flower's log
            logging.getLogger("flwr").propagate = False  # not again through a root handler (Opacus adds one)
        try:
            outcome.result = run_fedkim(grid, context, cfg, run_dir, on_round=on_round)
        except Exception as e:  # noqa: BLE001 - surfaced by the caller: Flower's simulation would only log it
            outcome.error = e

    return app, outcome


def write_run_summary(
    run_dir: Path, config_text: str, started: float, result: FederationResult, *, engine: dict | None = None,
    plans: dict[str, TaskPlan] | None = None, evaluation: dict | None = None,
) -> dict:
    """Build and write the run's summary.json, for the simulation and the deployment alike: the config that
    ran, the `engine` that ran it (where it is not Flower's simulation), seconds since `started`, the tasks
    (`plans`, where this process loaded every task's data), the transport's facts, the final global model's test
    metrics, the foundation model's after the last round and at round 0 (when the run injected), and the run's
    `evaluation` (baselines and comparisons, in the order given)."""
    history = result.history
    summary = {"run_dir": str(run_dir), "config_sha256": config_sha256(config_text), **(engine or {}),
               "seconds": round(time.time() - started, 1)}
    if plans is not None:
        summary["tasks"] = {n: {"role": p.task.role, "modality": p.task.modality, "records": len(p.data)}
                            for n, p in plans.items()}
    summary["aggregation"] = result.aggregation
    first, last = (history[0], history[-1]) if history else ({}, {})
    summary["federated_test"] = last.get("client_model_test")
    if "fm_test" in last:
        summary["fm_test"] = last["fm_test"]
    if "fm_test" in first and first["round"] == 0:  # a resumed server's history starts after round 0
        summary["fm_test_round0"] = first["fm_test"]
    summary.update(evaluation or {})
    RunDir(run_dir).write_summary(summary)
    return summary
