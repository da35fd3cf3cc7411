"""One federation engine for Flower's simulation and its deployment engine.

`run_fedkim` runs FEDKIM's server side over whatever Grid Flower hands the ServerApp: the run's transport
(set up and closed here), the strategy, and the rounds, resumable from a checkpoint (offset 0 in a
simulation). `make_server_app` wraps it as the simulation's ServerApp; `secure_fedkim.deploy_app` calls
it from the deployment's ServerApp with node waiting, a checkpoint per round and resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.logger import update_console_handler

from secure_fedkim.local_training import new_client_model
from secure_fedkim.config import RunConfig
from secure_fedkim.federation.checkpoint import restore_injector
from secure_fedkim.federation.strategy import FedKIM
from secure_fedkim.federation.transports import transport_for
from secure_fedkim.fm.injection import Injector
from secure_fedkim.plan import build_plan


@dataclass
class FederationResult:
    arrays: ArrayRecord  # the final global client model
    history: list[dict]  # one record per evaluated round (round 0 = the initial model, unless resumed)
    aggregation: dict  # the transport's facts for summary.json


def run_fedkim(
    grid: Grid, context: Context, cfg: RunConfig, run_dir: Path, *, on_round=None, keys_dir: Path | None = None,
    resume: tuple[int, ArrayRecord, dict] | None = None, round_timeout: float = 3600.0, join_timeout: float = 0.0,
    after_round: Callable[[FedKIM, int, ArrayRecord], None] | None = None, extra_train_config: dict | None = None,
) -> FederationResult:
    """FEDKIM's rounds from the start, or after `resume` = (completed rounds, global arrays, checkpoint meta)."""
    run_dir = Path(run_dir)
    plans = build_plan(cfg)
    transport = transport_for(cfg)
    train_config = {"run-config": cfg.model_dump_json(), "run-dir": str(run_dir.resolve()), "run-id": run_dir.name}
    train_config.update(extra_train_config or {})
    try:
        train_config.update(transport.open(run_dir, keys_dir))
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
        arrays = transport.run_rounds(
            strategy, grid, context, arrays, train_config, cfg.run.rounds - strategy.offset, round_timeout
        )
        return FederationResult(arrays, strategy.history, transport.facts())
    finally:
        transport.close()


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
        except Exception as e:  # surfaced by the caller: Flower's simulation would only log it
            outcome.error = e

    return app, outcome
