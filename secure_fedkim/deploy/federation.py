"""One SuperLink and one SuperNode per hospital, started, registered, run and stopped (`Deployment`)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from secure_fedkim.deploy.app import write_app
from secure_fedkim.deploy.credentials import NodeKeys, TLSFiles, make_node_keys
from secure_fedkim.deploy.processes import DeployError, Proc, _alive, _bin, _flower_env, _signal, free_port, tagged_pids


@dataclass
class HospitalNode:
    """One hospital's machine: its node config and credentials (everything stays under `home`)."""

    name: str
    home: Path  # state dir: signing key, ledger, local model
    auth: NodeKeys  # SuperNode authentication key pair
    policy: Path | None = None  # its signed policy (None: no policy check)
    port: int = 0  # the SuperNode's own Runtime API port (0: pick a free one)
    proc: Proc | None = None
    node_id: int | None = None

    def node_config(self) -> str:
        parts = [f'hospital="{self.name}"', f'state-dir="{self.home}"']
        if self.policy is not None:
            parts.append(f'policy="{self.policy}"')
        return " ".join(parts)


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on this machine, as processes; `close()` stops every one of them.

    Use as a context manager. Every process gets its own FLWR_HOME under `base`, logs to
    `base/logs/<name>.log`, and binds 127.0.0.1 only.
    """

    base: Path
    tls: TLSFiles
    port: int = 0
    connection: str = "fedkim"
    superlink: Proc | None = None
    nodes: dict[str, HospitalNode] = field(default_factory=dict)
    _procs: list[Proc] = field(default_factory=list)
    tag: str = ""
    env: dict = field(default_factory=dict)  # extra environment for every process (e.g. PYTHONPATH)

    def __post_init__(self):
        self.base = Path(self.base)
        (self.base / "logs").mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.tag = self.tag or os.urandom(8).hex()
        self.database = self.base / "superlink" / "state.db"
        self.write_cli_config()

    # -- context manager
    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path, env: dict | None = None) -> Proc:
        flwr_home.mkdir(parents=True, exist_ok=True)
        tag = f"{self.tag}/{name}"
        log_path = self.base / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")
        log_file.write(f"\n$ {shlex.join(cmd)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(self.base),
            env=_flower_env(flwr_home, tag, {**self.env, **(env or {})}), start_new_session=True,
        )
        log_file.close()
        proc = Proc(name, popen, log_path, tag)
        self._procs.append(proc)
        return proc

    # -- SuperLink
    def superlink_command(self) -> list[str]:
        return [
            _bin("flower-superlink"), *self.tls.superlink_args(), "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.database),
            "--disable-runtime-dependency-installation",
        ]

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        """Start the SuperLink (TLS on all APIs, node authentication on, state in a SQLite file so that
        registered nodes survive a restart) and wait until it answers over TLS."""
        self.database.parent.mkdir(parents=True, exist_ok=True)
        self.superlink = self._spawn("superlink", self.superlink_command(), self.base / "superlink" / "flwr_home")
        self._wait_https(self.superlink, timeout)
        return self.superlink

    def _wait_https(self, proc: Proc, timeout: float) -> None:
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not proc.alive():
                raise DeployError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            try:
                with urllib.request.urlopen(f"https://{self.address}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise DeployError(f"{proc.name} did not answer on https://{self.address}/health within {timeout}s:\n{proc.log_tail()}")

    def stop_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Stop the SuperLink and the ServerApp it runs (a crash, with SIGKILL)."""
        if self.superlink is not None:
            self.superlink.kill(sig)  # with its detached SuperExec / ServerApp processes
            self.superlink = None

    # -- the `flwr` CLI
    @property
    def cli_home(self) -> Path:
        return self.base / "cli"

    def write_cli_config(self) -> Path:
        """FLWR_HOME/config.toml for the `flwr` CLI: a SuperLink connection with the root certificate."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        path = self.cli_home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.tls.ca_cert}"\n'
        )
        return path

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this SuperLink (its own FLWR_HOME)."""
        cmd = [_bin("flwr"), *args]
        env = _flower_env(self.cli_home, self.tag, {**self.env, "COLUMNS": "200"})
        out = subprocess.run(cmd, env=env, cwd=str(self.base), capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise DeployError(f"{shlex.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    @staticmethod
    def _json(out: subprocess.CompletedProcess) -> dict:
        text = out.stdout
        start = text.find("{")
        if start < 0:
            raise DeployError(f"no JSON in the output of flwr:\n{text}\n{out.stderr}")
        return json.loads(text[start:])

    def register(self, node: HospitalNode) -> int:
        """`flwr supernode register <public key>`: the SuperLink will accept this key's node."""
        out = self.flwr("supernode", "register", str(node.auth.public_key), self.connection, "--name", node.name, "--format", "json")
        node.node_id = int(self._json(out)["node-id"])
        return node.node_id

    # -- SuperNodes
    def add_hospital(self, name: str, home: Path, policy: Path | None = None, auth: NodeKeys | None = None) -> HospitalNode:
        auth = auth or make_node_keys(self.base / "node_keys", name)
        node = HospitalNode(name, Path(home).resolve(), auth, Path(policy).resolve() if policy else None)
        self.nodes[name] = node
        return node

    def supernode_command(self, node: HospitalNode) -> list[str]:
        return [
            _bin("flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.tls.ca_cert),
            "--auth-supernode-private-key", str(node.auth.private_key), "--node-config", node.node_config(),
            "--host", "127.0.0.1", "--port", str(node.port), "--max-retries", "200", "--max-wait-time", "600",
        ]

    def start_supernode(self, node: HospitalNode, verify_policy: bool = True) -> Proc:
        """Start the hospital's SuperNode. With a policy, its signature is checked first: a tampered
        policy stops the node here (PolicySignatureError), before it ever connects."""
        if verify_policy and node.policy is not None:
            from secure_fedkim.deploy.identity import load_signing_key
            from secure_fedkim.deploy.policy import load_policy

            load_policy(node.policy, load_signing_key(node.home).public_key())
        node.port = node.port or free_port()
        node.proc = self._spawn(f"supernode-{node.name}", self.supernode_command(node), node.home.parent / f".flwr-{node.name}")
        return node.proc

    def stop_supernode(self, name: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[name]
        if node.proc is not None:
            node.proc.kill(sig)
            node.proc = None

    def wait_connected(self, count: int, timeout: float = 120.0, names: list[str] | None = None) -> list[dict]:
        """Wait until `count` SuperNodes are online (`flwr supernode list`); fails early if one of the
        nodes `names` (default: every node started) exits."""
        deadline = time.time() + timeout
        nodes: list[dict] = []
        watched = [self.nodes[n] for n in names] if names is not None else list(self.nodes.values())
        while time.time() < deadline:
            for n in watched:
                if n.proc is not None and not n.proc.alive():
                    raise DeployError(f"{n.proc.name} exited with {n.proc.popen.returncode}:\n{n.proc.log_tail()}")
            out = self.flwr("supernode", "list", self.connection, "--format", "json", check=False)
            if out.returncode == 0:
                nodes = [n for n in self._json(out).get("nodes", []) if str(n.get("status", "")).lower() == "online"]
                if len(nodes) >= count:
                    return nodes
            time.sleep(1.0)
        raise DeployError(f"only {len(nodes)} of {count} SuperNodes came online within {timeout}s")

    # -- runs
    def submit(self, config: Path, run_dir: Path, app: Path | None = None, **run_config) -> int:
        """`flwr run <app> <connection> --run-config 'config="..." run-dir="..."'`; returns Flower's run id."""
        app = app if app is not None else write_app(self.base / "app")
        pairs = {"config": str(Path(config).resolve()), "run-dir": str(Path(run_dir).resolve()), **run_config}
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items())
        out = self.flwr("run", str(app), self.connection, "--run-config", overrides, "--format", "json")
        return int(self._json(out)["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. 'running', 'finished:completed', 'finished:failed'."""
        out = self.flwr("list", self.connection, "--run-id", str(run_id), "--format", "json", check=False)
        if out.returncode != 0:
            return "unknown"
        runs = self._json(out).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def wait_run(self, run_id: int, timeout: float = 600.0, poll: float = 2.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            if self.superlink is None or not self.superlink.alive():
                raise DeployError("the SuperLink is not running")
            time.sleep(poll)
        raise DeployError(f"run {run_id} did not finish within {timeout}s (status {self.run_status(run_id)})")

    # -- cleanup
    def _sweep(self) -> None:
        leftovers = [p for p in tagged_pids(self.tag) if _alive(p)]
        if leftovers:
            _signal(leftovers, signal.SIGKILL)
            deadline = time.time() + 10
            while any(_alive(p) for p in leftovers) and time.time() < deadline:
                time.sleep(0.05)

    def close(self) -> None:
        """Stop every process this deployment started (nodes, SuperLink, their detached children)."""
        for proc in reversed(self._procs):
            if proc.alive():
                proc.kill(signal.SIGKILL)
            else:
                proc.popen.wait(timeout=1)
        self._sweep()
