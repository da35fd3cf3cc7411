"""A deployment's directory layout, the COMMANDS.sh a hospital runs, and the one-machine `run_local`."""

from __future__ import annotations

from pathlib import Path

from secure_fedkim.deploy.app import write_app
from secure_fedkim.deploy.credentials import make_node_keys, make_tls
from secure_fedkim.deploy.federation import Deployment
from secure_fedkim.deploy.hospital import default_policy, prepare_hospital
from secure_fedkim.deploy.processes import DeployError
from secure_fedkim.rundir.layout import HospitalDir, RunDir


def commands(base: str | Path, hospitals: list[str], port: int = 9093, host: str = "127.0.0.1") -> str:
    """The shell commands for a deployment laid out by `secure-fedkim deploy init` under `base` (one
    hospital per machine in production: run each block on its own machine, with its own files)."""
    b = Path(base).resolve()
    a = f"{host}:{port}"
    lines = [
        "# 1. federation operator (the SuperLink's machine): TLS on every API, node authentication on",
        f"flower-superlink --ssl-ca-certfile {b}/tls/ca.pem --ssl-certfile {b}/tls/server.pem "
        f"--ssl-keyfile {b}/tls/server.key --enable-supernode-auth --host {host} --port {port} "
        f"--database {b}/superlink/state.db --disable-runtime-dependency-installation",
        "",
        "# 2. operator: accept each hospital's node key (FLWR_HOME holds the CLI's connection config)",
        f"export FLWR_HOME={b}/cli",
    ]
    lines += [f"flwr supernode register {b}/node_keys/{h}_auth.pub fedkim --name {h}" for h in hospitals]
    lines += ["", "# 3. each hospital, on its own machine: its node, its keys, its state dir and its signed policy"]
    for i, h in enumerate(hospitals):
        home = HospitalDir(b / "hospitals" / h)
        lines.append(
            f"flower-supernode --superlink {a} --root-certificates {b}/tls/ca.pem "
            f"--auth-supernode-private-key {b}/node_keys/{h}_auth "
            f"--node-config 'hospital=\"{h}\" state-dir=\"{home.path}\" policy=\"{home.policy}\"' "
            f"--host 127.0.0.1 --port {9094 + i}"
        )
    lines += [
        "", "# 4. operator: submit the run (paths are on the SuperLink's machine)",
        f"flwr run {b}/app fedkim --run-config "
        f"'config=\"{b}/federation.yaml\" run-dir=\"{b}/runs/r1\" keys-dir=\"{b}/server_keys\"' --stream",
    ]
    return "\n".join(lines) + "\n"


def init_layout(base: str | Path, hospitals: list[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                port: int = 9093, policy: dict | None = None) -> Path:
    """Everything a deployment needs, under `base`: TLS (`tls/`), node keys (`node_keys/`), each hospital's
    state dir with its signing key and signed policy (`hospitals/<name>/`), the public keys the aggregator
    verifies (`server_keys/`), and the `flwr` CLI's connection (`cli/config.toml`). In production each
    hospital runs `secure-fedkim deploy hospital` on its own machine instead and sends only its public keys."""
    base = Path(base).resolve()
    tls = make_tls(base / "tls", hosts)
    for h in hospitals:
        make_node_keys(base / "node_keys", h)
        prepare_hospital(h, base / "hospitals" / h, base / "server_keys", default_policy(h, **(policy or {})))
    cli = base / "cli"
    cli.mkdir(parents=True, exist_ok=True)
    (cli / "config.toml").write_text(
        f'[superlink]\ndefault = "fedkim"\n\n[superlink.fedkim]\naddress = "{hosts[0]}:{port}"\n'
        f'root-certificates = "{tls.ca_cert}"\n'
    )
    write_app(base / "app")
    (base / "COMMANDS.sh").write_text(commands(base, hospitals, port, hosts[0]))
    return base


def run_local(config: str | Path, base: str | Path, timeout: float = 3600.0, log=print) -> Path:
    """The whole federation on this machine: TLS, one SuperNode per hospital of `config` (each with its own
    keys, state dir and signed default policy), one run to the end, every process stopped. Returns the
    run directory."""
    from secure_fedkim.config import load_config

    cfg, _ = load_config(config)
    base = Path(base).resolve()
    hospitals = list(cfg.federation.clients)
    tls = make_tls(base / "tls")
    with Deployment(base / "fed", tls) as d:
        d.start_superlink()
        log(f"SuperLink on https://{d.address} (TLS, node authentication)")
        for h in hospitals:
            policy = prepare_hospital(h, base / "hospitals" / h, base / "server_keys", default_policy(h))
            node = d.add_hospital(h, base / "hospitals" / h, policy)
            d.register(node)
            d.start_supernode(node)
        d.wait_connected(len(hospitals))
        log(f"{len(hospitals)} SuperNodes online: {', '.join(hospitals)}")
        run_dir = base / "runs" / cfg.run.name
        run_id = d.submit(Path(config), run_dir, **{"keys-dir": str(base / "server_keys")})
        log(f"run {run_id} submitted; logs in {d.base / 'logs'}")
        status = d.wait_run(run_id, timeout=timeout)
        if status != "finished:completed":
            raise DeployError(f"run {run_id} ended {status}; see {RunDir(run_dir).status} and {d.base / 'logs'}")
    return run_dir
