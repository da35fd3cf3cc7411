"""Reading a finished run back: its config, data plan and released models.

This is the public loading API that audits and reports use (attacks/ reads runs only through it). Where
each file lies is `secure_fedkim.rundir.layout` (its docstring is the run directory's layout); `RunDir` is
re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from secure_fedkim.hospital.local_training import new_client_model
from pydantic import ValidationError

from secure_fedkim.config import ConfigError, RunConfig
from secure_fedkim.config_errors import describe_validation_error
from secure_fedkim.hospital.models import ClientModel
from secure_fedkim.plan import TaskPlan, build_plan
from secure_fedkim.rundir.layout import FM_SCORES, HospitalDir, RunDir, StudyDir

__all__ = ["FM_SCORES", "HospitalDir", "Run", "RunDir", "StudyDir", "client_dir", "load_run", "save_model"]


def client_dir(run_dir: str | Path, client: str) -> Path:
    """A hospital's own state directory in a run (clients/<hospital>/)."""
    return RunDir(run_dir).client(client).path


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
    def files(self) -> RunDir:
        """Where each of this run's files lies."""
        return RunDir(self.run_dir)

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
        return self._load(self.files.global_model)

    def local_model(self, client: str) -> ClientModel:
        return self._load(self.files.local_model(client))

    def ledger_path(self, client: str) -> Path:
        return self.files.ledger(client)

    def summary(self) -> dict:
        return self.files.read_summary()


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    cfg_file = RunDir(run_dir).resolved_config
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a secure-fedkim run directory (no {cfg_file.name})")
    try:
        cfg = RunConfig.model_validate_json(cfg_file.read_text())
    except ValidationError as e:
        raise ConfigError("this run's config does not validate with this version of secure-fedkim: "
                          + describe_validation_error(e, RunConfig, str(cfg_file))) from None
    return Run(run_dir, cfg, build_plan(cfg))
