"""FEDKIM's apps for Flower's deployment engine (SuperLink + one SuperNode per hospital).

* `server`: a module-level ServerApp. It reads its federation config path and run directory from the
  run config (`flwr run ... --run-config 'config="/abs/run.yaml" run-dir="/abs/runs/r1"'`) and runs the
  same rounds as the simulation (`secure_fedkim.server_app.run_fedkim`), plus what a long-lived
  deployment needs: it waits for every hospital before the first round and then goes on with whoever
  is online (at least `min_clients`), tells the hospitals the sha256 of the code it runs (their policy
  must approve it), and writes a checkpoint after every completed round. Started again on the same run
  directory, it resumes after the last checkpointed round: the run id (the run directory's name) is
  the same, so every hospital's `HospitalDP` rebuilds its spend from its own ledger and completed rounds
  are never trained (nor paid for) twice.
* `client`: one ClientApp for every mode: SecAgg+ protocol messages go to `client_app.secagg_app`
  (Flower's `secaggplus_mod`), all others to `client_app.app` (plain / he).

Checkpoint (run_dir): `checkpoint.safetensors` (the global client model after the round),
`checkpoint.json` ({"round", "run_id", "sha256" of the weights file}), and with injection enabled
`checkpoint_fm.safetensors` (the foundation model's trainable parameters) with its sampler state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

# Heavy modules (torch, the data stack) are imported where they are used: every SecAgg+ protocol stage
# starts a fresh ClientApp process on each SuperNode, and only the training stage needs them.

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_FM = "checkpoint_fm.safetensors"


# ------------------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, injector=None) -> None:
    """The global model after `server_round`; the metadata file is written last, so a crash mid-write
    leaves the previous checkpoint in force."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    _atomic_write(run_dir / CHECKPOINT, lambda p: save_file(state, str(p)))
    meta = {"round": server_round, "run_id": run_dir.name, "sha256": hashlib.sha256((run_dir / CHECKPOINT).read_bytes()).hexdigest()}
    if injector is not None:
        fm = {n: p.detach().contiguous() for n, p in injector.fm.named_parameters() if p.requires_grad}
        _atomic_write(run_dir / CHECKPOINT_FM, lambda p: save_file(fm, str(p)))
        meta["fm_sha256"] = hashlib.sha256((run_dir / CHECKPOINT_FM).read_bytes()).hexdigest()
        meta["fm_rng"] = injector._rng.bit_generator.state
        meta["fm_trained_examples"] = injector.trained_examples
    _atomic_write(run_dir / CHECKPOINT_META, lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_checkpoint(run_dir: Path, template: dict) -> tuple[int, ArrayRecord, dict] | None:
    """(round, global arrays in `template`'s order, metadata) of the last checkpoint, or None."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta_path = run_dir / CHECKPOINT_META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    data = (run_dir / CHECKPOINT).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise RuntimeError(f"{run_dir / CHECKPOINT}: does not match {CHECKPOINT_META} (sha256); not resuming from it")
    state = load_file(str(run_dir / CHECKPOINT))
    if set(state) != set(template):
        raise RuntimeError(f"{run_dir / CHECKPOINT}: its tensors do not match this config's model")
    ordered = OrderedDict((k, state[k]) for k in template)
    return int(meta["round"]), ArrayRecord(ordered), meta


def _restore_injector(run_dir: Path, injector, meta: dict) -> None:
    import torch
    from safetensors.torch import load_file

    path = Path(run_dir) / CHECKPOINT_FM
    if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("fm_sha256"):
        raise RuntimeError(f"{path}: does not match {CHECKPOINT_META}; not resuming from it")
    saved = load_file(str(path))
    with torch.no_grad():
        for n, p in injector.fm.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    injector._rng.bit_generator.state = meta["fm_rng"]
    injector.trained_examples = int(meta["fm_trained_examples"])


# ------------------------------------------------------------------------------------- the strategy


def _wait_for_nodes(count, n: int, min_clients: int, deadline: float, poll: float = 0.5) -> int:
    """Wait until `n` nodes are online or `deadline`; how many may be sampled (>= min_clients)."""
    while True:
        available = count()
        if available >= n or time.time() >= deadline:
            return max(min_clients, min(n, available))
        time.sleep(poll)


def _define_strategies() -> None:
    """Define DeployFedKIM and _DeploySecAgg (subclasses of torch-importing strategies) on first use."""
    from secure_fedkim.secagg import SecAggFedKIM
    from secure_fedkim.strategy import FedKIM

    class DeployFedKIM(FedKIM):
        """FedKIM with absolute round numbers after a resume, node waiting and a checkpoint per round."""

        offset = 0  # rounds completed before this ServerApp started
        join_timeout = 300.0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._joined = False

        def _sample_size(self, count) -> int:
            n, m = len(self.cfg.federation.clients), self.cfg.federation.min_clients
            wait = self.join_timeout if not self._joined else 0.0
            self._joined = True
            return _wait_for_nodes(count, n, m, time.time() + wait)

        def configure_train(self, server_round, arrays, config, grid):
            k = self._sample_size(lambda: len(list(grid.get_node_ids())))
            self.min_available_nodes = self.min_train_nodes = k
            return super().configure_train(server_round + self.offset, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round + self.offset, replies)

        crash_after = 0  # fault injection (tests, drills): die without cleanup after this round's checkpoint

        def evaluate(self, server_round: int, arrays: ArrayRecord):
            metrics = super().evaluate(server_round, arrays)
            if server_round > 0:
                save_checkpoint(self.run_dir, server_round, arrays, self.injector)
                if server_round == self.crash_after:
                    _status(self.run_dir, status="crashed", after_round=server_round, note="fault-crash-after-round")
                    os._exit(70)
            return metrics

    class _DeploySecAgg(SecAggFedKIM):
        """SecAggFedKIM with the same round offset and node waiting (legacy strategy API)."""

        def __init__(self, fedkim: DeployFedKIM, initial: ArrayRecord, fit_config: dict):
            super().__init__(fedkim, initial, fit_config)
            off = fedkim.offset
            self.on_fit_config_fn = lambda server_round: {**fit_config, "server-round": server_round + off}

        def configure_fit(self, server_round, parameters, client_manager):
            k = self.fedkim._sample_size(client_manager.num_available)
            self.min_fit_clients = self.min_available_clients = k
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            return super().aggregate_fit(server_round + self.fedkim.offset, results, failures)

        def evaluate(self, server_round, parameters):
            return super().evaluate(server_round + self.fedkim.offset, parameters)

    globals().update(DeployFedKIM=DeployFedKIM, _DeploySecAgg=_DeploySecAgg)


def __getattr__(name: str):
    if name in ("DeployFedKIM", "_DeploySecAgg"):
        _define_strategies()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _secagg_rounds(grid, context, fedkim: DeployFedKIM, initial: ArrayRecord, fit_config: dict, num_rounds: int) -> ArrayRecord:
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from secure_fedkim.strategy import RoundFailed

    s = fedkim.cfg.federation.secagg
    strategy = __getattr__("_DeploySecAgg")(fedkim, initial, fit_config)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold, max_weight=s.max_weight,
            clipping_range=s.clipping_range, quantization_range=s.quantization_range, timeout=s.timeout,
        )
    )
    workflow(grid, legacy)
    expected = range(fedkim.offset + 1, fedkim.offset + num_rounds + 1)
    missing = [r for r in expected if r not in strategy.completed]
    if missing:
        raise RoundFailed(f"SecAgg+ round(s) {missing} did not complete (too few hospitals answered; see the log above)")
    return strategy.final


def _resuming_rounds(checkpoint, round_timeout: float):
    """The round runner for run_fedkim: from the checkpoint (or round 0) to the config's last round."""

    def rounds(strategy: DeployFedKIM, grid, context, initial, train_config) -> ArrayRecord:
        cfg = strategy.cfg
        start, arrays = 0, initial
        if checkpoint is not None:
            start, arrays, meta = checkpoint
            if strategy.injector is not None:
                _restore_injector(strategy.run_dir, strategy.injector, meta)
        strategy.offset = start
        remaining = cfg.run.rounds - start
        if start == 0:
            strategy.evaluate(0, arrays)
        if cfg.federation.aggregation == "secagg":
            return _secagg_rounds(grid, context, strategy, arrays, train_config, remaining)
        result = strategy.start(
            grid, arrays, num_rounds=remaining, timeout=round_timeout, train_config=ConfigRecord(train_config),
            evaluate_fn=lambda r, a: strategy.evaluate(r + start, a) if r > 0 else None,
        )
        return result.arrays

    return rounds


# ------------------------------------------------------------------------------------- the ServerApp

server = ServerApp()


def _status(run_dir: Path, **fields) -> None:
    (run_dir / "status.json").write_text(json.dumps({"time": time.time(), **fields}, indent=2))


@server.main()
def main(grid: Grid, context: Context) -> None:
    import torch
    from flwr.supercore.logger import update_console_handler

    from secure_fedkim.artifacts import save_model
    from secure_fedkim.client import new_client_model
    from secure_fedkim.config import config_sha256, load_config
    from secure_fedkim.plan import build_plan
    from secure_fedkim.policy import code_sha256
    from secure_fedkim.run import format_round_table
    from secure_fedkim.server_app import run_fedkim

    update_console_handler(level=logging.WARNING)
    torch.set_num_threads(1)
    rc = context.run_config
    if not str(rc.get("config", "")) or not str(rc.get("run-dir", "")):
        raise ValueError("run config needs config=<federation YAML> and run-dir=<run directory> (flwr run --run-config)")
    cfg, text = load_config(str(rc["config"]))
    run_dir = Path(str(rc["run-dir"])).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.yaml").is_file() and (run_dir / "config.yaml").read_text() != text:
        raise ValueError(f"{run_dir} belongs to a run with another config; resume only with the same config")
    (run_dir / "config.yaml").write_text(text)
    (run_dir / "resolved_config.json").write_text(cfg.model_dump_json(indent=2))
    keys_dir = Path(str(rc["keys-dir"])) if str(rc.get("keys-dir", "")) else run_dir / "keys"
    plans = build_plan(cfg)
    template = new_client_model(cfg, plans).state_dict()
    checkpoint = load_checkpoint(run_dir, template)
    started = checkpoint[0] if checkpoint else 0
    if started >= cfg.run.rounds:
        _status(run_dir, status="completed", rounds_completed=started, resumed_from=started, note="nothing left to run")
        return
    join_timeout = float(rc.get("join-timeout", 300.0))
    crash_after = int(rc.get("fault-crash-after-round", 0))

    def strategy(*args, **kwargs):
        s = __getattr__("DeployFedKIM")(*args, **kwargs)
        s.join_timeout, s.crash_after = join_timeout, crash_after
        return s

    code = code_sha256()
    outcome: dict = {}
    _status(run_dir, status="running", resumed_from=started, flower_run_id=context.run_id, code_sha256=code)
    t0 = time.time()

    def on_round(server_round: int, record: dict) -> None:
        print(format_round_table(server_round, record), flush=True)

    try:
        run_fedkim(
            grid, context, cfg, run_dir, outcome, on_round, keys_dir=keys_dir, strategy_cls=strategy,
            rounds=_resuming_rounds(checkpoint, float(rc.get("round-timeout", 600.0))),
            extra_train_config={"code-sha256": code},
        )
    except Exception as e:
        _status(run_dir, status="failed", error=f"{type(e).__name__}: {e}", resumed_from=started)
        raise
    model = new_client_model(cfg, plans)
    model.load_state_dict(outcome["arrays"].to_torch_state_dict())
    save_model(model, run_dir / "model" / "client_model.safetensors")
    history = outcome["strategy"].history
    summary = {
        "run_dir": str(run_dir), "config_sha256": config_sha256(text), "engine": "flower deployment",
        "flower_run_id": context.run_id, "resumed_from_round": started, "code_sha256": code,
        "seconds": round(time.time() - t0, 1),
        "aggregation": {"mode": cfg.federation.aggregation, **({"ckks": outcome["he"]} if outcome.get("he") else {})},
        "federated_test": history[-1]["client_model_test"] if history else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _status(run_dir, status="completed", rounds_completed=cfg.run.rounds, resumed_from=started)


# ------------------------------------------------------------------------------------- the ClientApp


def _is_secagg(message: Message) -> bool:
    keys = list(message.content.keys())
    return any(k.startswith(("secaggplus", "fitins")) for k in keys)


def _secagg_client(context: Context):
    from secure_fedkim.client_app import SecAggHospital

    return SecAggHospital(context).to_client()


# client_app.secagg_app, except that the hospital's code is imported only for the stage that trains
_secagg_app = ClientApp(client_fn=_secagg_client, mods=[secaggplus_mod])


class HospitalClientApp(ClientApp):
    """Routes SecAgg+ (legacy workflow) messages to the SecAgg+ app and Message-API ones to `client_app.app`."""

    def __call__(self, message: Message, context: Context) -> Message:
        if _is_secagg(message):
            return _secagg_app(message, context)
        from secure_fedkim.client_app import app

        return app(message, context)


client = HospitalClientApp()
