"""The hospital stays in control: its node verifies its own signed policy and refuses what it does not allow."""

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from privacy.keys import generate_signing_key
from privacy.ledger import PrivacyLedger
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.hospital.client_app import app as client_app
from secure_fedkim.config import parse_config
from secure_fedkim.deploy.identity import ensure_signing_key, load_signing_key
from secure_fedkim.plan import build_plan
from secure_fedkim.deploy.policy import (
    PolicyError,
    PolicyRefusal,
    PolicySignatureError,
    code_sha256,
    dataset_commitment,
    enforce_policy,
    load_policy,
    write_policy,
)

CLIENTS = ["north", "south", "east"]
CFG = {
    "run": {"rounds": 2, "seed": 3},
    "federation": {"clients": CLIENTS, "min_clients": 2, "aggregation": "secagg"},
    "tasks": {"train": [{"name": "heart_disease", "partition": "iid"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2, "batch_size": 32},
    "privacy": {"dp": True, "profile": {"target_epsilon": 4.0}},
}


def policy_dict(**over):
    p = {
        "version": 1,
        "hospital": "south",
        "privacy": {"require_dp": True, "max_target_epsilon": 4.0, "max_delta": 1e-5},
        "aggregation": {"allowed_modes": ["he", "secagg"], "min_clients": 2},
        "max_rounds": 10,
        "approved_code": [{"sha256": code_sha256(), "note": "reviewed"}],
    }
    p.update(over)
    return p


def cfg_with(**changes):
    data = json.loads(json.dumps(CFG))
    for path, value in changes.items():
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return parse_config(data)


@pytest.fixture
def hospital(tmp_path):
    """South's state dir with its signing key and a signed policy."""
    home = tmp_path / "south"
    ensure_signing_key(home)
    path = write_policy(home / "policy.yaml", policy_dict(), load_signing_key(home))
    return home, path


def test_code_hash_is_deterministic_and_sees_every_source_file(tmp_path, monkeypatch):
    assert code_sha256() == code_sha256()
    assert len(code_sha256()) == 64
    # a package's bytes, not file times or caches: a copy elsewhere hashes alike, an edit does not
    import shutil
    import sys

    for name in ("secure_fedkim", "privacy"):
        import importlib

        shutil.copytree(importlib.import_module(name).__path__[0], tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    import subprocess

    probe = "from secure_fedkim.deploy.policy import code_sha256; print(code_sha256())"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == code_sha256()
    (tmp_path / "privacy" / "dp.py").write_text((tmp_path / "privacy" / "dp.py").read_text() + "\n# changed\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() != code_sha256()


def test_signed_policy_loads_and_a_tampered_one_is_refused(hospital):
    home, path = hospital
    key = load_signing_key(home).public_key()
    policy = load_policy(path, key)
    assert policy.hospital == "south" and policy.privacy.max_target_epsilon == 4.0
    assert len(policy.file_sha256) == 64

    # raise the hospital's own cap after signing: the signature no longer verifies
    path.write_text(path.read_text().replace("max_target_epsilon: 4.0", "max_target_epsilon: 40.0"))
    with pytest.raises(PolicySignatureError, match="changed after it was signed"):
        load_policy(path, key)
    # signed by someone else
    write_policy(path, policy_dict(), generate_signing_key())
    with pytest.raises(PolicySignatureError, match="does not verify"):
        load_policy(path, key)
    # not signed at all
    path.with_name(path.name + ".sig").unlink()
    with pytest.raises(PolicySignatureError, match="not signed"):
        load_policy(path, key)


def test_policy_file_errors_name_the_key(tmp_path):
    key = generate_signing_key()
    with pytest.raises(PolicyError, match=r"privacy\.max_epsilon: unknown key"):
        write_policy(tmp_path / "p.yaml", policy_dict(privacy={"max_epsilon": 3.0}), key)
    # JSON works as well as YAML
    path = write_policy(tmp_path / "p.json", policy_dict(), key)
    assert load_policy(path, key.public_key()).hospital == "south"


def test_enforce_refuses_what_the_policy_does_not_allow(hospital):
    home, path = hospital
    policy = load_policy(path, load_signing_key(home).public_key())
    enforce_policy(policy, cfg_with(), "south", n_records=200)  # within the policy: no refusal

    cases = {
        "target_epsilon 8.0 asked for this hospital exceeds the policy's max_target_epsilon 4.0":
            cfg_with(**{"privacy.profile.target_epsilon": 8.0}),
        "aggregation mode 'plain' is not allowed":
            cfg_with(**{"federation.aggregation": "plain"}),
        "trains without differential privacy":
            cfg_with(privacy={"dp": False}),
        "min_clients 1 is below the policy's 2":
            cfg_with(**{"federation.min_clients": 1}),
        "delta 0.0001 asked for this hospital exceeds the policy's max_delta 1e-05":
            cfg_with(**{"privacy.profile.delta": 1e-4}),
    }
    for reason, cfg in cases.items():
        with pytest.raises(PolicyRefusal) as e:
            enforce_policy(policy, cfg, "south", n_records=20000)
        assert reason in e.value.reason, e.value.reason
    # a per-hospital override is the effective profile: another hospital's larger budget does not matter
    other = cfg_with(privacy={"dp": True, "profile": {"target_epsilon": 4.0}, "hospitals": {"north": {"target_epsilon": 9.0}}})
    enforce_policy(policy, other, "south", n_records=200)
    mine = cfg_with(privacy={"dp": True, "profile": {"target_epsilon": 2.0}, "hospitals": {"south": {"target_epsilon": 9.0}}})
    with pytest.raises(PolicyRefusal, match="target_epsilon 9.0"):
        enforce_policy(policy, mine, "south", n_records=200)
    with pytest.raises(PolicyRefusal, match="server runs code sha256 " + "0" * 64):
        enforce_policy(policy, cfg_with(), "south", n_records=200, requested_code="0" * 64)
    with pytest.raises(PolicyRefusal, match="installed on this node"):
        enforce_policy(policy, cfg_with(), "south", n_records=200, local_code="f" * 64)
    with pytest.raises(PolicyRefusal, match="hospital 'south''s, not this node's"):
        enforce_policy(policy.model_copy(update={"hospital": "south"}), cfg_with(), "north")


def train_message(cfg, server_round, **extra):
    config = ConfigRecord({
        "run-config": cfg.model_dump_json(), "server-round": server_round, "run-dir": "/nonexistent/server/run-p1",
        "run-id": "run-p1", **extra,
    })
    arrays = ArrayRecord(new_client_model(cfg, build_plan(cfg)).state_dict())
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")


def node_context(home, path):
    node_config = {"hospital": "south", "state-dir": str(home), "policy": str(path)}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_node_refuses_a_higher_epsilon_and_unapproved_code_and_records_why(flower_identity, hospital):
    home, path = hospital
    ledger = PrivacyLedger(home / "ledger.jsonl")
    greedy = cfg_with(**{"privacy.profile.target_epsilon": 8.0, "federation.aggregation": "he"})
    with pytest.raises(PolicyRefusal, match="max_target_epsilon 4.0"):
        client_app(train_message(greedy, 1), node_context(home, path))
    with pytest.raises(PolicyRefusal, match="does not approve"):
        client_app(train_message(cfg_with(**{"federation.aggregation": "he"}), 1, **{"code-sha256": "a" * 64}), node_context(home, path))
    refused = ledger.events("refused", "run-p1")
    assert [e["round"] for e in refused] == [1, 1]
    assert "target_epsilon 8.0" in refused[0]["reason"] and "a" * 64 in refused[1]["reason"]
    assert refused[0]["client"] == "south" and refused[0]["policy_sha256"] == load_policy(path, load_signing_key(home).public_key()).file_sha256
    # nothing was planned, spent or kept: the refusal came before any DP plan or training
    assert ledger.events("dp_plan") == [] and ledger.events("dp_round") == []
    assert not (home / "local_model.safetensors").exists()
    ledger.verify()


def test_tampered_policy_stops_the_node_with_a_clear_error(flower_identity, hospital):
    home, path = hospital
    path.write_text(path.read_text().replace("- he\n", "- he\n  - plain\n"))
    with pytest.raises(PolicySignatureError, match="changed after it was signed"):
        client_app(train_message(cfg_with(**{"federation.aggregation": "he"}), 1), node_context(home, path))
    [entry] = PrivacyLedger(home / "ledger.jsonl").events("refused")
    assert entry["reason"].startswith("invalid policy:")
    assert not (home / "local_model.safetensors").exists()


def test_approved_run_trains_and_commits_to_the_dataset_once(flower_identity, hospital):
    home, path = hospital
    cfg = cfg_with(**{"federation.aggregation": "he"})  # plain weights would need `plain` in the policy
    from secure_fedkim.hospital.client_app import hospital_round

    state = new_client_model(cfg, build_plan(cfg)).state_dict()
    for r in (1, 2):
        config = {"run-config": cfg.model_dump_json(), "server-round": r, "run-dir": "/x/run-p2", "run-id": "run-p2",
                  "code-sha256": code_sha256()}
        result = hospital_round(cfg, node_context(home, path), config, state)
        assert result.model is not None and result.metrics["epsilon-spent"] > 0
    ledger = PrivacyLedger(home / "ledger.jsonl")
    [commit] = ledger.events("dataset_commitment", "run-p2")  # once per run, not per round
    assert commit["tasks"] == dataset_commitment(cfg, build_plan(cfg), "south")
    assert commit["tasks"]["heart_disease"]["records"] > 0
    assert ledger.events("refused") == []
    events = [e["event"] for e in ledger.entries()]
    assert events.index("dataset_commitment") < events.index("dp_plan")  # committed before anything was spent
