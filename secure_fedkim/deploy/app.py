"""The Flower App that `flwr run` submits to a SuperLink (it carries no code)."""

from __future__ import annotations

from pathlib import Path

APP_PYPROJECT = """# The Flower App that `flwr run` submits to a SuperLink. It carries no code: the ServerApp and every
# hospital's ClientApp come from the `secure-fedkim` installed on each machine (the hospital's policy
# approves that code by hash). Only this file goes into the FAB.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "secure-fedkim-deploy"
version = "0.1.0"
description = "FEDKIM on Flower's deployment engine (ServerApp + per-hospital ClientApp from secure_fedkim)"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "secure-fedkim"

[tool.flwr.app.components]
serverapp = "secure_fedkim.drivers.deploy_app:server"
clientapp = "secure_fedkim.drivers.deploy_app:client"

# Run config (override with `flwr run ... --run-config 'config="/abs/run.yaml" run-dir="/abs/runs/r1"'`).
# Paths are on the SuperLink's machine, where the ServerApp runs.
[tool.flwr.app.config]
config = ""          # the federation's YAML config (secure_fedkim.config)
run-dir = ""         # the run directory; its name is the run id the hospitals' ledgers account under
keys-dir = ""        # the hospitals' registered signing keys (<hospital>.pub); default: <run-dir>/keys
join-timeout = 300.0 # seconds to wait for every hospital before round 1 (then go on with min_clients)
round-timeout = 600.0 # seconds to wait for one round's replies
fault-crash-after-round = 0 # fault injection for tests and drills: the ServerApp dies after this round's checkpoint
"""
"""The Flower App that `flwr run` builds into a FAB: a pyproject.toml naming
`secure_fedkim.drivers.deploy_app:server` / `:client` and the run config keys. It holds no code: every machine
runs its installed `secure_fedkim`. configs/deploy/app/pyproject.toml is a copy of it."""

APP_DIR = Path(__file__).resolve().parents[2] / "configs" / "deploy" / "app"


def write_app(directory: str | Path) -> Path:
    """Write the Flower App (its pyproject.toml) to `directory`, for `flwr run <directory> ...`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT)
    return directory
