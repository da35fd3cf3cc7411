"""FEDKIM's apps for Flower's deployment engine (SuperLink + one SuperNode per hospital).

* `server`: a module-level ServerApp. It reads its federation config path and run directory from the
  run config (`flwr run ... --run-config 'config="/abs/run.yaml" run-dir="/abs/runs/r1"'`) and runs the
  same engine as the simulation (`secure_fedkim.federation.engine.run_fedkim`), plus what a long-lived
  deployment needs: it waits for every hospital before the first round and then goes on with whoever
  is online (at least `min_clients`), tells the hospitals the sha256 of the code it runs (their policy
  must approve it), and writes a checkpoint after every completed round. Started again on the same run
  directory, it resumes after the last checkpointed round: the run id (the run directory's name) is
  the same, so every hospital's `HospitalDP` rebuilds its spend from its own ledger and completed rounds
  are never trained (nor paid for) twice.
* `client`: the hospital's one ClientApp, the simulation's too (`secure_fedkim.hospital.client_app.app`): a message of a
  transport's own protocol goes to that transport's ClientApp (SecAgg+'s to Flower's `secaggplus_mod`), all
  others to the Message-API round.

Checkpoints: `secure_fedkim.federation.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from secure_fedkim.hospital.client_app import app as client
from secure_fedkim.rundir.layout import RunDir

# Heavy modules (torch, the data stack) are imported where they are used: every SecAgg+ protocol stage
# starts a fresh ClientApp process on each SuperNode, and only the training stage needs them.

__all__ = ["client", "server"]

# ------------------------------------------------------------------------------------- the ServerApp

server = ServerApp()


def _status(run_dir: Path, **fields) -> None:
    RunDir(run_dir).status.write_text(json.dumps({"time": time.time(), **fields}, indent=2))


@server.main()
def main(grid: Grid, context: Context) -> None:
    import torch
    from flwr.supercore.logger import update_console_handler

    from secure_fedkim.rundir.artifacts import save_model
    from secure_fedkim.config import load_config
    from secure_fedkim.deploy.policy import code_sha256
    from secure_fedkim.federation.checkpoint import load_checkpoint, save_checkpoint
    from secure_fedkim.federation.engine import run_fedkim, write_run_summary
    from secure_fedkim.hospital.local_training import new_client_model
    from secure_fedkim.plan import build_plan
    from secure_fedkim.drivers.run import format_round_table

    update_console_handler(level=logging.WARNING)
    torch.set_num_threads(1)
    rc = context.run_config
    if not str(rc.get("config", "")) or not str(rc.get("run-dir", "")):
        raise ValueError("run config needs config=<federation YAML> and run-dir=<run directory> (flwr run --run-config)")
    cfg, text = load_config(str(rc["config"]))
    # No process of a deployment holds every hospital's data, so there is no single-hospital baseline and no
    # hospital reserves budget for one (secure_fedkim.hospital.client_app.hospital_dp).
    cfg = cfg.model_copy(update={"baseline": cfg.baseline.model_copy(update={"single_hospital": False})})
    run_dir = Path(str(rc["run-dir"])).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunDir(run_dir)
    if files.config_yaml.is_file() and files.config_yaml.read_text() != text:
        raise ValueError(f"{run_dir} belongs to a run with another config; resume only with the same config")
    files.config_yaml.write_text(text)
    files.resolved_config.write_text(cfg.model_dump_json(indent=2))
    keys_dir = Path(str(rc["keys-dir"])) if str(rc.get("keys-dir", "")) else files.keys_dir
    plans = build_plan(cfg)
    template = new_client_model(cfg, plans).state_dict()
    checkpoint = load_checkpoint(run_dir, template)
    started = checkpoint[0] if checkpoint else 0
    if started >= cfg.run.rounds:
        _status(run_dir, status="completed", rounds_completed=started, resumed_from=started, note="nothing left to run")
        return
    crash_after = int(rc.get("fault-crash-after-round", 0))  # fault injection (tests, drills)

    def after_round(strategy, server_round: int, arrays) -> None:
        save_checkpoint(run_dir, server_round, arrays, strategy.injector)
        if server_round == crash_after:  # die without cleanup after this round's checkpoint
            _status(run_dir, status="crashed", after_round=server_round, note="fault-crash-after-round")
            os._exit(70)

    code = code_sha256()
    _status(run_dir, status="running", resumed_from=started, flower_run_id=context.run_id, code_sha256=code)
    t0 = time.time()

    def on_round(server_round: int, record: dict) -> None:
        print(format_round_table(server_round, record, unit=cfg.privacy.unit), flush=True)

    try:
        result = run_fedkim(
            grid, context, cfg, run_dir, on_round=on_round, keys_dir=keys_dir, resume=checkpoint,
            round_timeout=float(rc.get("round-timeout", 600.0)), join_timeout=float(rc.get("join-timeout", 300.0)),
            after_round=after_round, extra_train_config={"code-sha256": code},
        )
    except Exception as e:
        _status(run_dir, status="failed", error=f"{type(e).__name__}: {e}", resumed_from=started)
        raise
    model = new_client_model(cfg, plans)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    save_model(model, files.global_model)
    engine = {"engine": "flower deployment", "flower_run_id": context.run_id, "resumed_from_round": started,
              "code_sha256": code}
    write_run_summary(run_dir, text, t0, result, engine=engine)
    _status(run_dir, status="completed", rounds_completed=cfg.run.rounds, resumed_from=started)
