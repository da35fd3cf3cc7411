"""Processes the deployment starts: free ports, process trees tagged so every descendant can be stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and shows the process's last log lines."""




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
