"""Running the federation on Flower's deployment engine: one SuperLink, one SuperNode per hospital.

What this module gives (all with `cryptography` and the `flwr` commands of flwr 1.42):

* TLS material: a private CA (`ca.pem`), and a SuperLink server certificate for the addresses the
  hospitals dial (`127.0.0.1`/`localhost` by default), signed by that CA (`make_tls`).
* Node authentication keys as Flower 1.42 expects them: one NIST P-384 EC key pair per hospital, the
  private key in OpenSSH format (`flower-supernode --auth-supernode-private-key`), the public key as an
  OpenSSH `ecdsa-sha2-nistp384 ...` line (`flwr supernode register <key.pub>`) (`make_node_keys`).
* Process helpers that start a SuperLink (`--enable-supernode-auth`, TLS on all its APIs), register
  the hospitals' public keys, start SuperNodes with their own keys and node config
  (`hospital=<name> state-dir=<dir> policy=<path>`), submit a run with `flwr run`, and stop every
  process they started (`Deployment`).

In flwr 1.42 the Fleet, Control and Runtime APIs are served over HTTPS on one port of the SuperLink
(`--host/--port`); a SuperNode authenticates every Fleet request by signing a timestamp with its EC
key, and the SuperLink accepts only public keys registered through the Control API.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
serverapp = "secure_fedkim.deploy_app:server"
clientapp = "secure_fedkim.deploy_app:client"

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
`secure_fedkim.deploy_app:server` / `:client` and the run config keys. It holds no code: every machine
runs its installed `secure_fedkim`. configs/deploy/app/pyproject.toml is a copy of it."""

APP_DIR = Path(__file__).resolve().parent.parent / "configs" / "deploy" / "app"


def write_app(directory: str | Path) -> Path:
    """Write the Flower App (its pyproject.toml) to `directory`, for `flwr run <directory> ...`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT)
    return directory


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and shows the process's last log lines."""


# ------------------------------------------------------------------------------------------ TLS


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path  # give to every SuperNode (--root-certificates) and to `flwr` (root-certificates)
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile (mode 0600)
    ca_key: Path  # keep offline; needed only to issue new server certificates

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert), "--ssl-keyfile", str(self.server_key)]


def make_tls(
    out_dir: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365, name: str = "secure-fedkim"
) -> TLSFiles:
    """A private CA and a SuperLink server certificate valid for `hosts` (IP addresses or DNS names).

    EC P-256 keys, SHA-256 signatures; the server certificate carries every host as a subjectAltName
    (what TLS clients check) and the serverAuth extended key usage.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(out / "ca.pem", out / "server.pem", out / "server.key", out / "ca.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(server_key))
    _write_private(files.ca_key, _pem_key(ca_key))
    return files


# ------------------------------------------------------------------------------ node authentication


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path  # flower-supernode --auth-supernode-private-key (OpenSSH format, mode 0600)
    public_key: Path  # flwr supernode register <public_key> (one OpenSSH line)


def make_node_keys(out_dir: str | Path, name: str) -> NodeKeys:
    """A SuperNode authentication key pair: NIST P-384 EC, in the OpenSSH formats flwr 1.42 reads.

    The private key stays on the hospital's machine; the public key is what the federation operator
    registers with the SuperLink (`flwr supernode register`).
    """
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out / f"{name}_auth", out / f"{name}_auth.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return keys


# ------------------------------------------------------------------------------------------ hospitals


def snapshot_code(dest: str | Path, packages: tuple[str, ...] = ("secure_fedkim", "privacy")) -> Path:
    """Copy the installed sources of `packages` to `dest` (no caches): with `dest` first on PYTHONPATH
    (`Deployment(env={"PYTHONPATH": ...})`), every process runs exactly this code, whatever happens to
    the installed copy meanwhile, and `policy.code_sha256(search_path=[dest])` is what hospitals approve."""
    import importlib.util
    import shutil

    dest = Path(dest)
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise DeployError(f"package {name!r} is not installed")
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=False)
    return dest


def default_policy(hospital: str, code: str | None = None, **overrides) -> dict:
    """A starting policy for `hospital`: DP required (epsilon <= 8, delta <= 1e-5), he or secagg only, at
    least 2 hospitals per aggregate, and the code installed here (or `code`, a code_sha256) approved.
    Review it before signing."""
    from secure_fedkim.policy import code_sha256

    policy = {
        "version": 1,
        "hospital": hospital,
        "privacy": {"require_dp": True, "max_target_epsilon": 8.0, "max_delta": 1e-5},
        "aggregation": {"allowed_modes": ["he", "secagg"], "min_clients": 2},
        "max_rounds": 50,
        "approved_code": [{"sha256": code or code_sha256(), "note": "secure-fedkim as installed when this policy was written"}],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


def prepare_hospital(name: str, home: str | Path, server_keys: str | Path | None = None, policy: dict | None = None) -> Path | None:
    """A hospital's onboarding on its own machine: its Ed25519 signing key in its state dir (created once),
    its public key handed to the federation (`server_keys/<name>.pub`, what the HE aggregator verifies),
    and, with `policy`, its policy written to `home/policy.yaml` and signed with its key. Returns the
    policy's path (None without a policy)."""
    from secure_fedkim.identity import ensure_signing_key, load_signing_key
    from secure_fedkim.policy import write_policy

    home = Path(home)
    public = ensure_signing_key(home)
    if server_keys is not None:
        Path(server_keys).mkdir(parents=True, exist_ok=True)
        (Path(server_keys) / f"{name}.pub").write_bytes(public)
    if policy is None:
        return None
    return write_policy(home / "policy.yaml", policy, load_signing_key(home))


# ------------------------------------------------------------------------------------------ processes

_TAG_ENV = "SECURE_FEDKIM_DEPLOY_TAG"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tagged_pids(tag: str) -> list[int]:
    """Processes of this user whose environment carries `tag` or `tag/...` (inherited from a process we
    started): finds the ones Flower detached into their own sessions, even after their parent died."""
    exact, prefix = f"{_TAG_ENV}={tag}".encode(), f"{_TAG_ENV}={tag}/".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if any(v == exact or v.startswith(prefix) for v in env.split(b"\0")):
            out.append(int(entry))
    return out


def _signal(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Proc:
    """A process we started, with its own log file and a tag its descendants inherit."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    tag: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal the process and everything below it (collected before the signal, plus the processes
        it detached, found by their tag), then reap it."""
        tree = [self.pid] + descendants(self.pid)
        tree += [p for p in tagged_pids(self.tag) if p not in tree]
        _signal(tree, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(tree, signal.SIGKILL)
            self.popen.wait(timeout=timeout)
        deadline = time.time() + timeout
        while any(_alive(p) for p in tree[1:]) and time.time() < deadline:
            time.sleep(0.05)
        _signal([p for p in tree[1:] if _alive(p)], signal.SIGKILL)


def _flower_env(flwr_home: Path, tag: str, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # the venv's flower-* commands
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
        _TAG_ENV: tag,
    })
    env.update(extra or {})
    return env


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# ------------------------------------------------------------------------------------------ the federation


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
            from secure_fedkim.identity import load_signing_key
            from secure_fedkim.policy import load_policy

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


# ------------------------------------------------------------------------------------------ commands


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
        lines.append(
            f"flower-supernode --superlink {a} --root-certificates {b}/tls/ca.pem "
            f"--auth-supernode-private-key {b}/node_keys/{h}_auth "
            f"--node-config 'hospital=\"{h}\" state-dir=\"{b}/hospitals/{h}\" policy=\"{b}/hospitals/{h}/policy.yaml\"' "
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
            raise DeployError(f"run {run_id} ended {status}; see {run_dir / 'status.json'} and {d.base / 'logs'}")
    return run_dir


def add_deploy_parser(sub) -> None:
    """`secure-fedkim deploy ...` (for secure_fedkim.cli: `add_deploy_parser(sub)` next to the other commands)."""
    p = sub.add_parser("deploy", help="Flower deployment engine: TLS, node keys, hospital policies, local runs")
    dsub = p.add_subparsers(dest="deploy_command", required=True)

    t = dsub.add_parser("tls", help="a private CA and the SuperLink's server certificate")
    t.add_argument("out", type=Path)
    t.add_argument("--host", action="append", help="address the hospitals dial (repeat); default 127.0.0.1, localhost")
    t.add_argument("--days", type=int, default=365)
    t.set_defaults(func=_cmd_tls)

    k = dsub.add_parser("node-keys", help="a SuperNode authentication key pair (EC P-384, OpenSSH format)")
    k.add_argument("out", type=Path)
    k.add_argument("name")
    k.set_defaults(func=_cmd_node_keys)

    h = dsub.add_parser("hospital", help="onboard a hospital: signing key, public key for the federation, signed policy")
    h.add_argument("name")
    h.add_argument("--home", type=Path, required=True, help="the hospital's state dir (keys, ledger)")
    h.add_argument("--server-keys", type=Path, help="copy the public signing key here (what the aggregator verifies)")
    h.add_argument("--policy", type=Path, help="sign this policy file instead of writing the default one")
    h.add_argument("--max-epsilon", type=float, default=8.0)
    h.add_argument("--max-delta", type=float, default=1e-5)
    h.add_argument("--modes", default="he,secagg", help="allowed aggregation modes, comma-separated")
    h.set_defaults(func=_cmd_hospital)

    c = dsub.add_parser("check-policy", help="verify a hospital's signed policy and print it")
    c.add_argument("policy", type=Path)
    c.add_argument("--home", type=Path, required=True, help="the hospital's state dir (its key verifies the policy)")
    c.set_defaults(func=_cmd_check_policy)

    dsub.add_parser("code-hash", help="sha256 of the installed secure_fedkim + privacy sources").set_defaults(func=_cmd_code_hash)

    i = dsub.add_parser("init", help="lay out TLS, node keys, hospitals and the flwr connection; print the commands")
    i.add_argument("config", type=Path, help="the federation's YAML config (its clients are the hospitals)")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--port", type=int, default=9093)
    i.add_argument("--host", action="append")
    i.set_defaults(func=_cmd_init)

    r = dsub.add_parser("local", help="run a federation on this machine's deployment engine (SuperLink + SuperNodes)")
    r.add_argument("config", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--timeout", type=float, default=3600.0)
    r.set_defaults(func=_cmd_local)


def _cmd_tls(args) -> int:
    files = make_tls(args.out, tuple(args.host or ("127.0.0.1", "localhost")), days=args.days)
    print(f"CA {files.ca_cert} (give to every SuperNode and to flwr), server certificate {files.server_cert}")
    print(f"TLS files written to {args.out}")
    return 0


def _cmd_node_keys(args) -> int:
    keys = make_node_keys(args.out, args.name)
    print(f"register with: flwr supernode register {keys.public_key} <connection>")
    print(f"node keys written to {keys.private_key} (private, keep on the node) and {keys.public_key}")
    return 0


def _cmd_hospital(args) -> int:
    from secure_fedkim.identity import load_signing_key
    from secure_fedkim.policy import sign_policy

    if args.policy is not None:
        prepare_hospital(args.name, args.home, args.server_keys)
        sign_policy(args.policy, load_signing_key(args.home))
        path = args.policy
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        policy = default_policy(args.name, privacy={"max_target_epsilon": args.max_epsilon, "max_delta": args.max_delta},
                                aggregation={"allowed_modes": modes, "min_clients": 2})
        path = prepare_hospital(args.name, args.home, args.server_keys, policy)
    print(f"policy {path} signed with the key in {args.home}; review it, and re-sign after any edit")
    print(f"hospital {args.name} written to {args.home}")
    return 0


def _cmd_check_policy(args) -> int:
    from secure_fedkim.identity import load_signing_key
    from secure_fedkim.policy import code_sha256, load_policy

    policy = load_policy(args.policy, load_signing_key(args.home).public_key())
    print(json.dumps(policy.model_dump(), indent=2))
    here = code_sha256()
    print(f"the code installed here ({here[:16]}...) is {'approved' if policy.approves(here) else 'NOT approved'}")
    print(f"policy {args.policy} verified (nothing written)")
    return 0


def _cmd_code_hash(args) -> int:
    from secure_fedkim.policy import code_sha256

    print(code_sha256())
    return 0


def _cmd_init(args) -> int:
    from secure_fedkim.config import load_config

    cfg, text = load_config(args.config)
    base = init_layout(args.out, list(cfg.federation.clients), tuple(args.host or ("127.0.0.1", "localhost")), args.port)
    (base / "federation.yaml").write_text(text)
    print((base / "COMMANDS.sh").read_text(), end="")
    print(f"deployment laid out in {base} (commands in {base / 'COMMANDS.sh'})")
    return 0


def _cmd_local(args) -> int:
    run_dir = run_local(args.config, args.out, timeout=args.timeout)
    print(f"run written to {run_dir}")
    return 0
