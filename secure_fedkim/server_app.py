"""The Flower ServerApp: runs FEDKIM's rounds over whatever Grid Flower hands it (simulation or deployment)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.logger import update_console_handler

from secure_fedkim.client import new_client_model
from secure_fedkim.config import RunConfig
from secure_fedkim.injection import Injector
from secure_fedkim.keyholder import KeyHolderProcess
from secure_fedkim.secagg import run_secagg
from secure_fedkim.plan import build_plan
from secure_fedkim.strategy import FedKIM


def registered_keys(run_dir: Path, clients: list[str], direct: bool = False) -> dict[str, bytes]:
    """The hospitals' public signing keys, as registered when they joined (run_dir/keys/<hospital>.pub,
    or <run_dir>/<hospital>.pub with `direct`, for a keys directory kept elsewhere)."""
    keys = {}
    for c in clients:
        path = Path(run_dir) / ("" if direct else "keys") / f"{c}.pub"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: hospital {c!r} has no registered signing key")
        keys[c] = path.read_bytes()
    return keys


def default_rounds(strategy: FedKIM, grid: Grid, context: Context, initial: ArrayRecord, train_config: dict) -> ArrayRecord:
    """All the run's rounds from `initial`, in the run's transport; returns the final global arrays."""
    cfg = strategy.cfg
    if cfg.federation.aggregation == "secagg":
        strategy.evaluate(0, initial)
        return run_secagg(grid, context, strategy, initial, train_config)
    result = strategy.start(
        grid, initial, num_rounds=cfg.run.rounds, train_config=ConfigRecord(train_config), evaluate_fn=strategy.evaluate,
    )
    return result.arrays


def run_fedkim(
    grid: Grid, context: Context, cfg: RunConfig, run_dir: Path, outcome: dict, on_round=None, *,
    keys_dir: Path | None = None, strategy_cls=FedKIM, rounds=default_rounds, extra_train_config: dict | None = None,
) -> None:
    """FEDKIM's server side over any Grid: key holder (he), strategy, rounds. `outcome` receives the
    strategy, the CKKS parameters and the final arrays. The deployment ServerApp passes its own strategy
    class (checkpoints) and round runner (resume); the simulation uses the defaults."""
    keyholder = None
    try:
        plans = build_plan(cfg)
        train_config = {"run-config": cfg.model_dump_json(), "run-dir": str(Path(run_dir).resolve()), "run-id": Path(run_dir).name}
        train_config.update(extra_train_config or {})
        verify_keys = None
        if cfg.federation.aggregation == "he":
            verify_keys = registered_keys(keys_dir or Path(run_dir) / "keys", cfg.federation.clients, direct=True)
            keyholder = KeyHolderProcess(
                run_dir, verify_keys, Path(run_dir).name, cfg.federation.min_clients, cfg.federation.he.flooding_sigma
            )
            train_config["he-public-context"] = keyholder.public_context
            outcome["he"] = keyholder.parameters
        injector = Injector(cfg, plans) if cfg.injection.enabled else None
        strategy = strategy_cls(
            cfg, plans, run_dir, on_round=on_round, keyholder=keyholder, verify_keys=verify_keys, injector=injector
        )
        outcome["strategy"] = strategy
        initial = ArrayRecord(new_client_model(cfg, plans).state_dict())
        outcome["arrays"] = rounds(strategy, grid, context, initial, train_config)
    finally:
        if keyholder is not None:
            keyholder.close()


def make_server_app(cfg: RunConfig, run_dir: Path, outcome: dict, on_round=None, quiet_flower: bool = True) -> ServerApp:
    """A ServerApp bound to one run; `outcome` receives the strategy and the final arrays."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if quiet_flower:
            update_console_handler(level=logging.WARNING)  # our own per-round table replaces Flower's log
            logging.getLogger("flwr").propagate = False  # not again through a root handler (Opacus adds one)
        try:
            run_fedkim(grid, context, cfg, run_dir, outcome, on_round)
        except Exception as e:  # surfaced by the caller: Flower's simulation would only log it
            outcome["error"] = e

    return app
