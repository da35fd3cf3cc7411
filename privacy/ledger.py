"""Append-only, hash-chained privacy ledger (one JSONL file per hospital).

Every privacy-relevant event (a DP round, a round skipped for budget, a refusal, a resume after a crash,
a dataset commitment, the run's DP plan) is one JSON line::

    {"seq": 3, "prev_hash": "<hash of seq 2>", "time": "2026-11-27T10:00:00.123456Z",
     "event": "dp_round", "run_id": "...", "round": 2, ..., "hash": "<sha256>"}

``hash`` is the SHA-256 (hex) of the canonical JSON of the entry without ``hash`` (sorted keys, no
whitespace, UTF-8). ``prev_hash`` of the first entry is :data:`GENESIS_HASH`. Appends are flushed and
fsynced before :meth:`PrivacyLedger.append` returns, so a spend that was acknowledged survives a crash.

What reading detects (:class:`LedgerTampered`, naming the first bad line and seq):
  an edited entry, entries reordered, an entry deleted or inserted in the middle, a partial (torn)
  last line.

Limitations (say them in reports):
  * A chain of plain hashes is not a signature. Someone who can rewrite the file can recompute every
    hash after an edit, or drop entries at the end, and the file alone still verifies. Truncation at
    the end and wholesale rewrites are only detected against a head recorded elsewhere (a signed
    report, the server, a second copy): use :meth:`PrivacyLedger.verify` with ``expected_head``.
  * A crash in the middle of a write leaves a partial last line; the ledger then refuses to verify
    (and to grow) until an operator inspects it. The entry being written had not been acknowledged,
    so its caller never released the update it was recording.
  * One writer per file: appends take an exclusive ``flock`` so two local processes do not interleave,
    which does not protect network filesystems.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from .accounting import Step
from .plan import DPPlan, this_run_id

__all__ = ["PrivacyLedger", "LedgerTampered", "GENESIS_HASH", "canonical_json", "entry_hash", "DPPlan", "this_run_id",
           "DP_PLAN", "DP_ROUND", "SKIPPED_BUDGET", "REFUSED", "RESUME", "DATASET_COMMITMENT", "HE_DECRYPT",
           "LIFETIME_CHECK"]

# The events of a hospital's ledger (``entry["event"]``), and of the CKKS key holder's (HE_DECRYPT).
DP_PLAN = "dp_plan"  #: the run's DP plan, written once (privacy.plan.DPPlan)
DP_ROUND = "dp_round"  #: one round's DP-SGD steps on one task: what the accountant composes
SKIPPED_BUDGET = "skipped_budget"  #: a round the hospital did not train because its budget would be exceeded
REFUSED = "refused"  #: a request the hospital refused (its policy, or a plan that contradicts the recorded one)
RESUME = "resume"  #: a restart that restored the spend from this ledger
DATASET_COMMITMENT = "dataset_commitment"  #: sha256 of each training shard, committed before training
HE_DECRYPT = "he_decrypt"  #: one aggregate the key holder decrypted and released (its own ledger)
#: a node's lifetime-budget check that accepted a run: the earlier runs it counted (privacy.lifetime)
LIFETIME_CHECK = "lifetime_check"

#: ``prev_hash`` of the first entry and :meth:`PrivacyLedger.head` of an empty ledger.
GENESIS_HASH = "0" * 64

_RESERVED = ("seq", "prev_hash", "time", "event", "hash")


class LedgerTampered(ValueError):
    """The ledger does not verify. ``line`` (1-based) and ``seq`` locate the first bad entry."""

    def __init__(self, message: str, *, line: int | None = None, seq: int | None = None, reason: str = ""):
        super().__init__(message)
        self.line = line
        self.seq = seq
        self.reason = reason or message


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 kept, NaN/Infinity refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(entry: dict) -> str:
    """SHA-256 hex of the canonical JSON of ``entry`` without its ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"ledger field {where!r} is {obj}; JSON has no NaN/Infinity (store null and say why)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


class PrivacyLedger:
    """A hospital's append-only, hash-chained JSONL privacy ledger at ``path``.

    Example::

        ledger = PrivacyLedger("runs/r1/hospital_a/ledger.jsonl")
        ledger.append("dataset_commitment", run_id="r1", sha384={"ecg.parquet": "..."})
        head = ledger.head()          # record this elsewhere (report, server) to detect truncation
        ledger.verify(expected_head=head)
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    # ------------------------------------------------------------------ reading
    def _read_verified(self) -> list[dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        if not raw:
            return []
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        entries: list[dict] = []
        prev = GENESIS_HASH
        for i, line_bytes in enumerate(complete):
            lineno = i + 1
            expected_seq = i
            try:
                entry = json.loads(line_bytes.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LedgerTampered(
                    f"{self.path}: line {lineno} (expected seq {expected_seq}) is not valid JSON ({exc}); "
                    f"the ledger was edited or corrupted",
                    line=lineno, seq=expected_seq, reason="unparseable",
                ) from None
            entries.append(self._check_entry(entry, lineno, expected_seq, prev))
            prev = entry["hash"]
        if tail:
            lineno = len(complete) + 1
            raise LedgerTampered(
                f"{self.path}: line {lineno} (expected seq {len(complete)}) is a partial line without its "
                f"newline ({len(tail)} bytes): the ledger was truncated or a write was interrupted",
                line=lineno, seq=len(complete), reason="truncated",
            )
        return entries

    def _check_entry(self, entry: Any, lineno: int, expected_seq: int, prev: str) -> dict:
        where = f"{self.path}: line {lineno}"
        if not isinstance(entry, dict):
            raise LedgerTampered(f"{where} is not a JSON object", line=lineno, seq=expected_seq, reason="not an object")
        missing = [k for k in _RESERVED if k not in entry]
        if missing:
            raise LedgerTampered(
                f"{where} (seq {entry.get('seq', expected_seq)}) lacks field(s) {missing}",
                line=lineno, seq=expected_seq, reason="missing fields",
            )
        seq = entry["seq"]
        if seq != expected_seq:
            raise LedgerTampered(
                f"{where} has seq {seq!r} where seq {expected_seq} was expected: entries were deleted, "
                f"inserted or reordered before it",
                line=lineno, seq=expected_seq, reason="seq out of order",
            )
        if entry["hash"] != entry_hash(entry):
            raise LedgerTampered(
                f"{where} (seq {seq}): hash mismatch; the entry's content was altered after it was written",
                line=lineno, seq=seq, reason="hash mismatch",
            )
        if entry["prev_hash"] != prev:
            raise LedgerTampered(
                f"{where} (seq {seq}): prev_hash does not match the hash of the entry before it; an entry "
                f"was inserted, replaced, deleted or reordered before it",
                line=lineno, seq=seq, reason="broken chain",
            )
        return entry

    def entries(self) -> list[dict]:
        """All entries, in order, after verifying the whole chain.

        Raises:
            LedgerTampered: naming the first bad entry (line, seq) and why.
        """
        return self._read_verified()

    def head(self) -> str:
        """Hash of the last entry (after verifying), or :data:`GENESIS_HASH` for an empty ledger."""
        entries = self._read_verified()
        return entries[-1]["hash"] if entries else GENESIS_HASH

    def verify(self, expected_head: str | None = None) -> str:
        """Verify the chain; with ``expected_head``, also check no entry up to that head is missing.

        ``expected_head`` is a head recorded earlier outside this file (e.g. in a signed report). It must
        be the hash of some entry of this ledger (or :data:`GENESIS_HASH`); entries appended after it
        was recorded are allowed. This is the only way to detect entries dropped from the end, or a
        ledger rewritten with a fresh chain: the file alone cannot show what is no longer in it.

        Returns:
            the current head.
        Raises:
            LedgerTampered
        """
        entries = self._read_verified()
        head = entries[-1]["hash"] if entries else GENESIS_HASH
        if expected_head is None or expected_head == GENESIS_HASH:
            return head
        if any(e["hash"] == expected_head for e in entries):
            return head
        n = len(entries)
        raise LedgerTampered(
            f"{self.path}: expected head {expected_head} is not the hash of any entry. The ledger ends at "
            f"seq {n - 1} (line {n}, head {head}); entries from seq {n} (line {n + 1}) on are missing "
            f"(truncated), or the ledger was rewritten",
            line=n + 1, seq=n, reason="missing entries at the end",
        )

    # ------------------------------------------------------------------ writing
    def append(self, event: str, **fields: Any) -> dict:
        """Append one entry; it is written, flushed and fsynced before this returns.

        Refuses to extend a ledger that does not verify (raises :class:`LedgerTampered`).

        Args:
            event: e.g. ``"dp_plan"``, ``"dp_round"``, ``"skipped_budget"``, ``"refused"``, ``"resume"``,
                ``"dataset_commitment"``.
            **fields: JSON-serialisable payload (run_id, round, task, steps, sample_rate,
                noise_multiplier, max_grad_norm, accountant, epsilon, delta, ...). ``seq``, ``prev_hash``,
                ``time``, ``event`` and ``hash`` are reserved.

        Returns:
            the entry as written (with ``hash``).
        """
        if not isinstance(event, str) or not event:
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        clash = [k for k in fields if k in _RESERVED]
        if clash:
            raise ValueError(f"ledger fields {clash} are reserved ({list(_RESERVED)})")
        _check_finite(fields, "fields")
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read_verified()
            entry: dict[str, Any] = {
                "seq": len(entries),
                "prev_hash": entries[-1]["hash"] if entries else GENESIS_HASH,
                "time": _utc_now(),
                "event": event,
                **fields,
            }
            entry["hash"] = entry_hash(entry)  # TypeError on a non-JSON payload, before anything is written
            data = (canonical_json(entry) + "\n").encode("utf-8")
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock
        if created:
            self._fsync_dir()
        return entry

    def _fsync_dir(self) -> None:
        try:
            dfd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)

    # ------------------------------------------------------------------ views
    def events(self, event: str | None = None, run_id: str | None = None) -> list[dict]:
        """Verified entries, optionally filtered by ``event`` and ``run_id``."""
        return [
            e
            for e in self._read_verified()
            if (event is None or e["event"] == event) and (run_id is None or e.get("run_id") == run_id)
        ]

    def plans(self) -> list[DPPlan]:
        """Every ``dp_plan`` entry as a :class:`~privacy.plan.DPPlan`, in ledger order (ValueError: a malformed plan)."""
        return [DPPlan.from_entry(e) for e in self.events(DP_PLAN)]

    def plan(self, run_id: str) -> DPPlan | None:
        """The DP plan of run ``run_id``: its FIRST ``dp_plan`` entry (a resumed run keeps its first plan), or None."""
        return next((DPPlan.from_entry(e) for e in self.events(DP_PLAN, run_id)), None)

    def dp_history(self, run_id: str | None = None) -> list[Step]:
        """Accountant history rebuilt from the verified ``dp_round`` entries (optionally of one run).

        One :class:`~privacy.accounting.Step` per ``dp_round`` entry, in ledger order, from its
        ``noise_multiplier``, ``sample_rate`` and ``steps``. A restarted client resumes its accountant
        from this, so the ledger (not an in-memory accountant) is the source of truth.
        """
        out = []
        for e in self.events(DP_ROUND, run_id):
            try:
                out.append(Step(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise LedgerTampered(
                    f"{self.path}: dp_round entry seq {e['seq']} (line {e['seq'] + 1}) has no valid "
                    f"noise_multiplier/sample_rate/steps: {exc}",
                    line=e["seq"] + 1, seq=e["seq"], reason="invalid dp_round",
                ) from None
        return out

    def __len__(self) -> int:
        return len(self._read_verified())

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"
