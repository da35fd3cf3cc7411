"""Reading a finished run back: its config, data plan and released models.

This is the public loading API that audits and reports use (attacks/ reads runs only through it).

Run directory layout:
    config.yaml, resolved_config.json     the config as given, and as validated (absolute paths)
    metrics/round_NNN.json                per-round metrics (round 0 = before training)
    metrics/fm_test_scores.npz            the FM's test probabilities at round 0 and after the latest round
    model/client_model.safetensors        the final global lightweight model (encoders + heads)
    clients/<hospital>/local_model.safetensors   each hospital's last local model (what it sent last)
    clients/<hospital>/ledger.jsonl       each hospital's privacy ledger (when DP is on)
    summary.json                          final metrics and baselines
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from secure_fedkim.client import new_client_model
from pydantic import ValidationError

from secure_fedkim.config import ConfigError, RunConfig
from secure_fedkim.models import ClientModel
from secure_fedkim.plan import TaskPlan, build_plan


FM_SCORES = "fm_test_scores.npz"


def client_dir(run_dir: str | Path, client: str) -> Path:
    return Path(run_dir) / "clients" / client


def save_model(model: ClientModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)  # never leave a half-written model behind


@dataclass
class Run:
    run_dir: Path
    cfg: RunConfig
    plans: dict[str, TaskPlan]

    @property
    def clients(self) -> list[str]:
        return list(self.cfg.federation.clients)

    def new_model(self) -> ClientModel:
        return new_client_model(self.cfg, self.plans)

    def _load(self, path: Path) -> ClientModel:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model in this run")
        model = self.new_model()
        model.load_state_dict(load_file(str(path)))
        return model.eval()

    def global_model(self) -> ClientModel:
        return self._load(self.run_dir / "model" / "client_model.safetensors")

    def local_model(self, client: str) -> ClientModel:
        return self._load(client_dir(self.run_dir, client) / "local_model.safetensors")

    def ledger_path(self, client: str) -> Path:
        return client_dir(self.run_dir, client) / "ledger.jsonl"

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    cfg_file = run_dir / "resolved_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a secure-fedkim run directory (no resolved_config.json)")
    try:
        cfg = RunConfig.model_validate_json(cfg_file.read_text())
    except ValidationError as e:
        raise ConfigError(
            f"{cfg_file}: this run's config does not validate with this version of secure-fedkim "
            f"({e.errors()[0]['loc']}: {e.errors()[0]['msg']})"
        ) from None
    return Run(run_dir, cfg, build_plan(cfg))
