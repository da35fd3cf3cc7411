"""The CKKS key holder as its own process, so that the process that aggregates never holds the secret key.

The server process (the aggregator) starts it, receives only the public context, and asks it to decrypt
one aggregate per round; the key holder applies its own policy (privacy.he.KeyHolder: at least
min_clients signed contributions, once per round, noise flooding) and records every decryption in its
own ledger. In a deployment the key holder would run on another machine; the message flow is the same.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np

from secure_fedkim.rundir.layout import RunDir


def _serve(conn, min_clients: int, flooding_sigma: float, verify_keys: dict, run_id: str, ledger_path: str) -> None:
    from privacy.he import KeyHolder
    from privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(ledger_path)
    try:
        holder = KeyHolder(
            min_clients=min_clients, flooding_sigma=flooding_sigma, ledger_append=ledger.append,
            client_verify_keys=verify_keys, run_id=run_id,
        )
        conn.send(("ready", holder.public_context(), holder.describe()))
    except Exception as e:  # pragma: no cover - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}", None))
        return
    while True:
        request = conn.recv()
        if request is None:
            return
        try:
            conn.send(("ok", holder.decrypt_aggregate(request), None))
        except Exception as e:  # the policy's refusal is the answer, not a crash
            conn.send(("error", f"{type(e).__name__}: {e}", None))


class KeyHolderError(RuntimeError):
    """The key holder refused or failed; its message says why."""


class KeyHolderProcess:
    def __init__(self, run_dir: Path, verify_keys: dict[str, bytes], run_id: str, min_clients: int, flooding_sigma: float):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        ledger = RunDir(run_dir).keyholder_ledger
        self.process = ctx.Process(
            target=_serve, args=(child, min_clients, flooding_sigma, verify_keys, run_id, str(ledger)),
            name="ckks-key-holder", daemon=True,
        )
        self.process.start()
        status, self.public_context, self.parameters = self._conn.recv()
        if status != "ready":
            raise KeyHolderError(f"the key holder did not start: {self.public_context}")

    def decrypt(self, aggregate: bytes) -> np.ndarray:
        """The noise-flooded weighted mean of the aggregate's contributions."""
        self._conn.send(aggregate)
        status, value, _ = self._conn.recv()
        if status != "ok":
            raise KeyHolderError(f"key holder refused to decrypt: {value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            self._conn.send(None)
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
