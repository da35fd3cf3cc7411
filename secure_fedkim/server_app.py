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


def registered_keys(run_dir: Path, clients: list[str]) -> dict[str, bytes]:
    """The hospitals' public signing keys, as registered when they joined (run_dir/keys/<hospital>.pub)."""
    keys = {}
    for c in clients:
        path = Path(run_dir) / "keys" / f"{c}.pub"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: hospital {c!r} has no registered signing key")
        keys[c] = path.read_bytes()
    return keys


def make_server_app(cfg: RunConfig, run_dir: Path, outcome: dict, on_round=None, quiet_flower: bool = True) -> ServerApp:
    """A ServerApp bound to one run; `outcome` receives the strategy and the final arrays."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if quiet_flower:
            update_console_handler(level=logging.WARNING)  # our own per-round table replaces Flower's log
        keyholder = None
        try:
            plans = build_plan(cfg)
            train_config = {"run-config": cfg.model_dump_json(), "run-dir": str(Path(run_dir).resolve()), "run-id": Path(run_dir).name}
            verify_keys = None
            if cfg.federation.aggregation == "he":
                verify_keys = registered_keys(run_dir, cfg.federation.clients)
                keyholder = KeyHolderProcess(
                    run_dir, verify_keys, Path(run_dir).name, cfg.federation.min_clients, cfg.federation.he.flooding_sigma
                )
                train_config["he-public-context"] = keyholder.public_context
                outcome["he"] = keyholder.parameters
            injector = Injector(cfg, plans) if cfg.injection.enabled else None
            strategy = FedKIM(
                cfg, plans, run_dir, on_round=on_round, keyholder=keyholder, verify_keys=verify_keys, injector=injector
            )
            outcome["strategy"] = strategy
            initial = ArrayRecord(new_client_model(cfg, plans).state_dict())
            if cfg.federation.aggregation == "secagg":
                strategy.evaluate(0, initial)
                outcome["arrays"] = run_secagg(grid, context, strategy, initial, train_config)
            else:
                result = strategy.start(
                    grid, initial, num_rounds=cfg.run.rounds, train_config=ConfigRecord(train_config),
                    evaluate_fn=strategy.evaluate,
                )
                outcome["arrays"] = result.arrays
        except Exception as e:  # surfaced by the caller: Flower's simulation would only log it
            outcome["error"] = e
        finally:
            if keyholder is not None:
                keyholder.close()

    return app
