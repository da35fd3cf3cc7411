"""The hospital stays in control: its node enforces its own signed privacy policy.

Each hospital writes a policy file (YAML or JSON) and signs it with its Ed25519 key (a detached
`<policy>.sig`). Its node reads the policy before any training, for every round, and refuses a run
whose config asks for more than the hospital allowed:

    version: 1
    hospital: cleveland
    privacy:
      require_dp: true            # a run without DP-SGD is refused
      max_target_epsilon: 8.0     # per-record epsilon for the whole run, at most
      max_delta: 1.0e-5           # delta at most (the run's default delta min(1e-5, 1/(10 n)) counts)
      max_lifetime_epsilon: 16.0  # every run on the same data, composed with this run's plan, at most
      lifetime_delta: 1.0e-5      # the delta that lifetime is composed at (default: max_delta)
      lifetime_scope: data        # data: runs whose dataset commitment shares a hash; all: every run
      on_lifetime_exceeded: refuse  # or calibrate: run at the largest target epsilon that still fits
    aggregation:
      allowed_modes: [he, secagg] # plain sends weights in the clear: leave it out
      min_clients: 2              # the aggregate must combine at least this many hospitals
    max_rounds: 20
    approved_code:                # sha256 of the secure_fedkim + privacy sources (code_sha256())
      - {sha256: "3f5a...", note: "secure-fedkim 0.1.0, reviewed by the privacy office"}

What the node checks (`enforce_policy`): the run's mode is allowed; its min_clients and rounds are within
bounds; this hospital's effective DP profile (its override, or the default profile) does not ask for a
larger epsilon or delta than the policy caps; the code installed on this node and the code the server
says it runs both hash to an approved value. With `max_lifetime_epsilon`, the node also composes (same
accountant as a run) every earlier run its ledger records on the same data with this run's whole planned
schedule (`check_lifetime`), and refuses the run if the total would pass the cap; when it accepts, a
`lifetime_check` ledger entry names the runs it counted, so a later deletion of one of them is caught. A ledger
that does not verify, or an earlier run that is referenced but missing, is refused, never forgotten.
A refusal is appended to the hospital's own ledger with its
reason (`refused` event), and the node answers the round with an error, never with an update. A policy
file whose signature does not verify stops the node (`PolicySignatureError`).

Each deployed node also commits to its data once per run: a `dataset_commitment` ledger event with the
sha256 of each task's shard (and of the data file when the task reads one), so a report binds to the
data version without revealing it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from privacy.accounting import resolve_delta
from privacy.keys import canonical_message, load_signing_public_key, public_key_bytes, sign, verify
from privacy.ledger import DATASET_COMMITMENT, REFUSED, PrivacyLedger
from secure_fedkim.config_errors import validate_mapping
from secure_fedkim.federation.transport_specs import unknown_transport
from secure_fedkim.rundir.layout import HospitalDir

__all__ = [
    "CODE_PACKAGES",
    "HospitalPolicy",
    "PolicyError",
    "PolicyRefusal",
    "PolicySignatureError",
    "check_lifetime",
    "check_node",
    "code_sha256",
    "commit_dataset",
    "enforce_policy",
    "lifetime_of",
    "load_policy",
    "sign_policy",
    "write_policy",
]

CODE_PACKAGES = ("secure_fedkim", "privacy")
_CODE_SUFFIXES = (".py", ".json", ".yaml", ".yml")
_DOMAIN = "secure-fedkim/hospital-policy/v1"


class PolicyError(ValueError):
    """The policy file is missing, malformed or unsigned; the node must not run without a valid one."""


class PolicySignatureError(PolicyError):
    """The policy's signature does not verify under the hospital's key: the file was changed after signing."""


class PolicyRefusal(RuntimeError):
    """The run asks for something the hospital's policy does not allow; `reason` says what."""

    def __init__(self, client: str, reason: str):
        super().__init__(f"hospital {client!r} refuses this run: {reason}")
        self.client = client
        self.reason = reason


# ------------------------------------------------------------------------------------- the file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacyCaps(_Strict):
    require_dp: bool = True
    max_target_epsilon: float | None = Field(None, gt=0.0)
    max_delta: float | None = Field(None, gt=0.0, lt=1.0)
    # The patients' total loss over every run this node's ledger records on the same data (privacy.lifetime):
    # a run whose plan, composed with them, would pass it is refused before anything is planned or trained.
    max_lifetime_epsilon: float | None = Field(None, gt=0.0)
    lifetime_delta: float | None = Field(None, gt=0.0, lt=1.0)  # default: max_delta, else 1e-5
    lifetime_scope: Literal["data", "all"] = "data"  # "all": every run of the ledger counts, whatever its data
    # refuse: a run that would pass the lifetime cap is refused; calibrate: it runs at the largest target epsilon
    # (at most the one asked) whose plan, composed with the earlier runs, stays within the cap (more noise)
    on_lifetime_exceeded: Literal["refuse", "calibrate"] = "refuse"

    def resolved_lifetime_delta(self) -> float:
        if self.lifetime_delta is not None:
            return float(self.lifetime_delta)
        return float(self.max_delta) if self.max_delta is not None else 1e-5


class AggregationCaps(_Strict):
    allowed_modes: list[str] = ["he", "secagg"]  # registered transports (secure_fedkim.federation.transport_specs)
    min_clients: int = Field(2, ge=1)

    @field_validator("allowed_modes")
    @classmethod
    def _registered(cls, modes: list[str]) -> list[str]:
        for mode in modes:
            problem = unknown_transport(mode)
            if problem:
                raise ValueError(problem)
        return modes


class ApprovedCode(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    note: str = ""


class HospitalPolicy(_Strict):
    version: Literal[1] = 1
    hospital: str
    privacy: PrivacyCaps = PrivacyCaps()
    aggregation: AggregationCaps = AggregationCaps()
    max_rounds: int | None = Field(None, ge=1)
    approved_code: list[ApprovedCode] = Field(min_length=1)
    # Set by load_policy: the sha256 of the signed file, recorded with every refusal.
    file_sha256: str = ""

    def approves(self, code_hash: str) -> bool:
        return any(a.sha256 == code_hash for a in self.approved_code)


def _sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def _signed_bytes(raw: bytes) -> bytes:
    return canonical_message(_DOMAIN, raw)


def sign_policy(path: str | Path, signing_key) -> Path:
    """Sign the policy file's exact bytes with the hospital's Ed25519 key; writes `<path>.sig` (base64)."""
    path = Path(path)
    signature = sign(signing_key, _signed_bytes(path.read_bytes()))
    sig = _sig_path(path)
    sig.write_text(base64.b64encode(signature).decode() + "\n")
    return sig


def write_policy(path: str | Path, policy: dict, signing_key) -> Path:
    """Write `policy` as YAML (or JSON for a .json path), validate it, and sign it."""
    path = Path(path)
    _validate(policy, str(path))
    text = json.dumps(policy, indent=2) if path.suffix == ".json" else yaml.safe_dump(policy, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    sign_policy(path, signing_key)
    return path


def _validate(data, source: str) -> HospitalPolicy:
    return validate_mapping(HospitalPolicy, data, source, PolicyError)


def _public_key(public_key) -> bytes:
    """Raw 32 bytes from raw bytes, a hex string, a PEM public/private key, a key object or a key file."""
    if isinstance(public_key, (str, Path)) and Path(public_key).is_file():
        public_key = Path(public_key).read_bytes()
    if isinstance(public_key, str):
        public_key = bytes.fromhex(public_key.strip())
    if isinstance(public_key, (bytes, bytearray)):
        data = bytes(public_key)
        if len(data) == 32:
            return data
        if len(data) == 64 and all(c in b"0123456789abcdef" for c in data.lower()):
            return bytes.fromhex(data.decode())
        from cryptography.hazmat.primitives import serialization

        if b"PRIVATE KEY" in data:
            return public_key_bytes(serialization.load_pem_private_key(data, password=None))
        return public_key_bytes(serialization.load_pem_public_key(data))
    return public_key_bytes(public_key)


def load_policy(path: str | Path, public_key) -> HospitalPolicy:
    """Read, verify and validate a hospital's policy.

    `public_key`: the hospital's Ed25519 verification key (raw 32 bytes, hex, PEM, a key object, or a
    path to one of those). Raises PolicySignatureError when the detached signature is missing or does not
    verify (the file was changed after it was signed, or signed by someone else), PolicyError when the file
    is missing or malformed (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: policy file not found")
    raw = path.read_bytes()
    sig = _sig_path(path)
    if not sig.is_file():
        raise PolicySignatureError(f"{path}: the policy is not signed (no {sig.name}); the node will not run on it")
    try:
        signature = base64.b64decode(sig.read_text().strip(), validate=True)
    except ValueError:
        raise PolicySignatureError(f"{sig}: not a base64 Ed25519 signature") from None
    key = load_signing_public_key(_public_key(public_key))
    if not verify(key, _signed_bytes(raw), signature):
        raise PolicySignatureError(
            f"{path}: the policy's signature does not verify under the hospital's key "
            f"{public_key_bytes(key).hex()[:16]}...: the file was changed after it was signed (or signed "
            f"with another key); the node refuses to run until the privacy office re-signs it"
        )
    try:
        data = yaml.safe_load(raw.decode("utf-8"))  # YAML is a superset of JSON
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise PolicyError(f"{path}: not valid YAML or JSON: {e}") from None
    policy = _validate(data, str(path))
    return policy.model_copy(update={"file_sha256": hashlib.sha256(raw).hexdigest()})


# ------------------------------------------------------------------------------------- the code


def code_sha256(packages: tuple[str, ...] = CODE_PACKAGES, search_path: list[str | Path] | None = None) -> str:
    """The sha256 of the installed sources of `packages`, computed the same way on every machine.

    Every .py/.json/.yaml file under each package's directory (not __pycache__), in sorted order of its
    path relative to the package's parent, hashed as (path, length, bytes) with length prefixes, so a
    renamed, added, removed or edited file changes the hash. Compiled caches and file times do not count.
    `search_path`: hash the packages found in these directories instead of the imported ones.
    """
    h = hashlib.sha256(b"secure-fedkim/code/v1\0")
    for name in packages:
        if search_path is None:
            spec = importlib.util.find_spec(name)
        else:
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(name, [str(p) for p in search_path])
        if spec is None or not spec.submodule_search_locations:
            raise PolicyError(f"package {name!r} is not installed: cannot hash the code this node runs")
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and p.suffix in _CODE_SUFFIXES and "__pycache__" not in p.parts
        )
        for p in files:
            rel = f"{name}/{p.relative_to(root).as_posix()}".encode()
            data = p.read_bytes()
            h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- enforcement


def enforce_policy(policy: HospitalPolicy, cfg, client: str, *, n_records: int | None = None,
                   local_code: str | None = None, requested_code: str | None = None) -> None:
    """Raise PolicyRefusal (with the first reason found) unless `cfg` is within `policy` for `client`.

    `n_records`: the hospital's number of training records (for the default delta min(1e-5, 1/(10 n)));
    `local_code`: the hash of the code installed on this node (default: computed now);
    `requested_code`: the hash of the code the server says it runs, if it says one.
    """
    def refuse(reason: str):
        raise PolicyRefusal(client, reason)

    if policy.hospital != client:
        refuse(f"the policy is hospital {policy.hospital!r}'s, not this node's ({client!r})")
    fed = cfg.federation
    if fed.aggregation not in policy.aggregation.allowed_modes:
        refuse(f"aggregation mode {fed.aggregation!r} is not allowed (allowed: {policy.aggregation.allowed_modes})")
    if fed.min_clients < policy.aggregation.min_clients:
        refuse(f"min_clients {fed.min_clients} is below the policy's {policy.aggregation.min_clients}")
    if policy.max_rounds is not None and cfg.run.rounds > policy.max_rounds:
        refuse(f"{cfg.run.rounds} rounds asked, the policy allows at most {policy.max_rounds}")
    profile = cfg.dp_profile(client)
    caps = policy.privacy
    if profile is None:
        if caps.require_dp:
            refuse("the run trains without differential privacy; the policy requires DP-SGD")
    else:
        if caps.max_target_epsilon is not None and profile.target_epsilon > caps.max_target_epsilon * (1 + 1e-12):
            refuse(
                f"target_epsilon {profile.target_epsilon} asked for this hospital exceeds the policy's "
                f"max_target_epsilon {caps.max_target_epsilon}"
            )
        if caps.max_delta is not None:
            if profile.delta is not None:
                delta = profile.delta
            elif n_records:
                delta = resolve_delta(None, n_records)
            else:
                delta = 1e-5
            if delta > caps.max_delta * (1 + 1e-12):
                refuse(f"delta {delta:g} asked for this hospital exceeds the policy's max_delta {caps.max_delta:g}")
    local = code_sha256() if local_code is None else local_code
    if not policy.approves(local):
        refuse(f"the code installed on this node (sha256 {local}) is not approved by the policy")
    if requested_code is not None and not policy.approves(requested_code):
        refuse(f"the server runs code sha256 {requested_code}, which the policy does not approve")


def record_refusal(home: Path, run_id: str, server_round: int, client: str, reason: str, policy_sha256: str | None) -> dict:
    """Append a `refused` event to the hospital's own ledger (before the node answers with an error)."""
    return PrivacyLedger(HospitalDir(home).ledger).append(
        REFUSED, run_id=run_id, round=server_round, client=client, reason=reason, policy_sha256=policy_sha256,
    )


# ------------------------------------------------------------------------------------- dataset commitment


def _array_sha256(a) -> str:
    import numpy as np

    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> dict:
    if path.is_file():
        files = [path]
        base = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        base = path
    out = {}
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[p.relative_to(base).as_posix()] = h.hexdigest()
    return out


def dataset_commitment(cfg, plans, client: str) -> dict:
    """sha256 of each training task's shard at `client` (records, labels) and of its data files, if the
    task reads user data from files (`tasks.train[].source.path`); installed datasets are committed to
    by their shard arrays alone."""
    sources = {t.name: t.source for t in cfg.tasks.train if t.source is not None}
    tasks = {}
    for name, plan in plans.items():
        if plan.task.role != "train":
            continue
        shard = plan.shard(client)
        entry = {"records": int(len(shard)), "x_sha256": _array_sha256(shard.x), "y_sha256": _array_sha256(shard.y)}
        if name in sources:
            entry["files_sha256"] = _file_sha256(Path(sources[name].path))
        tasks[name] = entry
    return tasks


def commit_dataset(home: Path, run_id: str, cfg, plans, client: str, *, tasks: dict | None = None,
                   dp: bool | None = None) -> dict | None:
    """Append one `dataset_commitment` event per run to the hospital's ledger (None if already there).

    `tasks`: the commitment already computed (dataset_commitment); `dp`: whether the run trains this hospital with
    DP (recorded, so a DP run whose plan and rounds later vanish from the ledger is caught by privacy.lifetime)."""
    ledger = PrivacyLedger(HospitalDir(home).ledger)
    if ledger.events(DATASET_COMMITMENT, run_id):
        return None
    extra = {} if dp is None else {"dp": bool(dp)}
    return ledger.append(DATASET_COMMITMENT, run_id=run_id, client=client,
                         tasks=tasks if tasks is not None else dataset_commitment(cfg, plans, client), **extra)


# ------------------------------------------------------------------------------------- the node's check


def _verification_key(node_config, home: Path):
    """The policy's verification key: node config `policy-key` (a file), else the hospital's own signing key."""
    if "policy-key" in node_config:
        return Path(str(node_config["policy-key"]))
    from secure_fedkim.deploy.identity import load_signing_key

    return load_signing_key(home).public_key()


def _lifetime_ledgers(home: Path) -> list[Path]:
    """The baseline ledgers a hospital's state directory holds next to its own (a simulated run's clients/<h>)."""
    home = Path(home)
    if home.parent.name == "clients":
        base = HospitalDir(home.parent.parent / "baseline" / home.name).ledger
        if base.is_file():
            return [base]
    return []


def lifetime_of(home: Path, delta: float, *, cap: float | None = None, current: str | None = None, planned=None,
                planned_unit: str = "record", tasks: dict | None = None, scope: str = "data", cumulative: bool = False):
    """The lifetime spend of the hospital whose state directory is `home` (privacy.lifetime.lifetime on its ledger
    and the baseline ledgers beside it). Raises LedgerTampered or LifetimeIntegrityError."""
    from privacy.lifetime import data_fingerprints, lifetime

    entries = PrivacyLedger(HospitalDir(home).ledger).entries()
    baselines = [PrivacyLedger(p).entries() for p in _lifetime_ledgers(home)]
    return lifetime(entries, delta, cap=cap, current=current, planned=planned, planned_unit=planned_unit,
                    fingerprints=data_fingerprints(tasks) if tasks is not None else None,
                    baseline_entries=baselines, scope=scope, cumulative=cumulative)


#: calibrating a run to the lifetime remainder: targets below this are refused, and the search stops within this
#: relative width (each probe is one noise calibration)
LIFETIME_MIN_TARGET = 0.05
LIFETIME_SEARCH_RTOL = 0.02


def check_lifetime(policy: HospitalPolicy, home: Path, run_id: str, client: str, tasks: dict, planned,
                   asked: float | None = None) -> float | None:
    """Refuse (PolicyRefusal) a run whose whole plan, composed with every earlier run on the same data, passes the
    policy's `max_lifetime_epsilon`; on acceptance append one `lifetime_check` entry per run.

    `planned(target=None)`: a callable returning (this run's whole planned steps with what it reserves, its privacy
    unit), at the run's own target or at `target`; called only once the ledger verified (it may calibrate the
    noise). A ledger that does not verify, or an earlier run it refers to that is missing, is a refusal too: the
    lifetime cannot be known, so the run is not accepted. With `on_lifetime_exceeded: calibrate`, a run that would
    pass the cap is instead given the largest target epsilon (at most `asked`) that fits, found by bisection.

    Returns the target epsilon this run must train at when it was calibrated to the remainder (now or when it was
    accepted), else None.
    """
    from privacy.ledger import LIFETIME_CHECK, LedgerTampered
    from privacy.lifetime import LifetimeIntegrityError, check_entry

    caps = policy.privacy
    delta = caps.resolved_lifetime_delta()
    ledger = PrivacyLedger(HospitalDir(home).ledger)

    def at(target: float | None):
        steps, unit = planned() if target is None else planned(target)
        return lifetime_of(home, delta, cap=caps.max_lifetime_epsilon, current=run_id, planned=steps,
                           planned_unit=unit, tasks=tasks, scope=caps.lifetime_scope)

    try:
        ledger.entries()
        accepted = ledger.events(LIFETIME_CHECK, run_id)
        target = accepted[0].get("calibrated_target_epsilon") if accepted else None
        lt = at(target)
        if lt.exceeds and target is None and caps.on_lifetime_exceeded == "calibrate" and asked:
            target, lt = _calibrate_to_remainder(at, lt, float(asked), float(caps.max_lifetime_epsilon))
    except LedgerTampered as e:
        raise PolicyRefusal(client, f"lifetime budget {caps.max_lifetime_epsilon:g}: the ledger does not verify, so the "
                                    f"earlier runs' spend is unknown: {e}") from None
    except LifetimeIntegrityError as e:
        raise PolicyRefusal(client, f"lifetime budget {caps.max_lifetime_epsilon:g}: {e}") from None
    if lt.exceeds:
        raise PolicyRefusal(client, lt.refusal())
    if not accepted:
        extra = {} if target is None else {"calibrated_target_epsilon": target, "asked_target_epsilon": asked}
        ledger.append(LIFETIME_CHECK, client=client, policy_sha256=policy.file_sha256, scope=caps.lifetime_scope,
                      **check_entry(lt), **extra)
    return None if target is None else float(target)


def _calibrate_to_remainder(at, refused, asked: float, cap: float):
    """The largest target in [LIFETIME_MIN_TARGET, min(asked, cap)] whose lifetime fits the cap (bisection, to
    LIFETIME_SEARCH_RTOL), with its lifetime; (None, the refused lifetime) when not even the smallest fits."""
    best = None
    lo, hi = LIFETIME_MIN_TARGET, min(asked, cap)

    def fits(t: float):
        try:
            lt = at(t)
        except ValueError:  # a target the calibration cannot reach (below the accountant's resolution)
            return None
        return None if lt.exceeds else lt

    if lo < hi < asked and (lt := fits(hi)) is not None:
        return hi, lt
    first = fits(lo)
    if first is None:
        return None, refused
    best = (lo, first)
    while hi - lo > LIFETIME_SEARCH_RTOL * hi:
        mid = (lo + hi) / 2
        lt = fits(mid)
        if lt is None:
            hi = mid
        else:
            lo, best = mid, (mid, lt)
    return best


def check_node(cfg, node_config, config, client: str, home: Path, plans, *, planned=None) -> float | None:
    """What a deployed hospital's node does before training in a round (called by hospital_round).

    With node config `policy=<path>`: verify the signed policy (a bad signature raises
    PolicySignatureError, recorded in the ledger) and enforce it (a refusal is recorded in the ledger and
    raised as PolicyRefusal: the node answers with an error, not an update), its lifetime budget included
    (`check_lifetime`; `planned` is the callable that says what this run plans). Every deployed node (node
    config `hospital=...`) also commits to its dataset once per run.

    Returns the target epsilon the run must train at at this hospital when its policy calibrated it to the lifetime
    remainder (`on_lifetime_exceeded: calibrate`), else None.
    """
    run_id, server_round = str(config["run-id"]), int(config["server-round"])
    tasks = None
    target = None
    if "policy" in node_config:
        try:
            policy = load_policy(Path(str(node_config["policy"])), _verification_key(node_config, home))
        except PolicyError as e:
            record_refusal(home, run_id, server_round, client, f"invalid policy: {e}", None)
            raise
        from secure_fedkim.hospital.local_training import hospital_records

        requested = str(config["code-sha256"]) if "code-sha256" in config else None
        try:
            enforce_policy(policy, cfg, client, n_records=hospital_records(plans, client), requested_code=requested)
        except PolicyRefusal as e:
            record_refusal(home, run_id, server_round, client, e.reason, policy.file_sha256)
            raise
        if policy.privacy.max_lifetime_epsilon is not None and cfg.dp_profile(client) is None:
            reason = (f"lifetime budget {policy.privacy.max_lifetime_epsilon:g}: the run trains this hospital without "
                      f"differential privacy, which has no finite epsilon")
            record_refusal(home, run_id, server_round, client, reason, policy.file_sha256)
            raise PolicyRefusal(client, reason)
        if policy.privacy.max_lifetime_epsilon is not None and cfg.dp_profile(client) is not None:
            if planned is None:
                raise PolicyError("the policy has a lifetime budget but the node was not told what this run plans")
            tasks = dataset_commitment(cfg, plans, client)
            try:
                target = check_lifetime(policy, home, run_id, client, tasks, planned,
                                        asked=cfg.dp_profile(client).target_epsilon)
            except PolicyRefusal as e:
                from privacy.ledger import LedgerTampered

                try:
                    record_refusal(home, run_id, server_round, client, e.reason, policy.file_sha256)
                except LedgerTampered:
                    pass  # a ledger that does not verify refuses every append: the node still refuses the run
                raise
    if "hospital" in node_config or "policy" in node_config:
        commit_dataset(home, run_id, cfg, plans, client, tasks=tasks, dp=cfg.dp_profile(client) is not None)
    return target

