"""CKKS mode inside the federation: real ClientApps encrypt, the strategy sums ciphertexts holding only the
public context, and a separate key-holder process releases the (noise-flooded) weighted mean."""

import os

import numpy as np
import pytest
import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from secure_fedkim.federation.aggregation import flatten_state
from secure_fedkim.rundir.artifacts import client_dir, load_run
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.hospital.client_app import app as client_app
from secure_fedkim.config import parse_config
from secure_fedkim.federation.keyholder import KeyHolderError, KeyHolderProcess
from secure_fedkim.federation.strategy import FedKIM, RoundFailed
from secure_fedkim.federation.transports.he import CKKSTransport, registered_keys
from secure_fedkim.plan import build_plan
from secure_fedkim.drivers.run import register_hospitals

CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
CFG = {
    "run": {"rounds": 1, "seed": 4},
    "federation": {"clients": CLIENTS, "min_clients": 2, "aggregation": "he"},
    "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2},
}


@pytest.fixture(scope="module")
def keyholder(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("he") / "run-he"
    run_dir.mkdir()
    cfg = parse_config(CFG)
    (run_dir / "resolved_config.json").write_text(cfg.model_dump_json())
    register_hospitals(cfg, run_dir)
    holder = KeyHolderProcess(run_dir, registered_keys(run_dir, CLIENTS), run_dir.name, 2, 1e-5)
    yield cfg, run_dir, holder
    holder.close()


def client_reply(cfg, run_dir, holder, index, server_round=1):
    config = ConfigRecord({
        "run-config": cfg.model_dump_json(), "server-round": server_round, "run-dir": str(run_dir),
        "run-id": run_dir.name, "he-public-context": holder.public_context,
    })
    arrays = ArrayRecord(new_client_model(cfg, build_plan(cfg)).state_dict())
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": index}, state=RecordDict(), run_config={})
    return client_app(msg, context)


def local_vector(run_dir, client):
    return flatten_state(load_run(run_dir).local_model(client).state_dict()).astype(np.float64)


def test_aggregate_of_ciphertexts_is_the_weighted_mean_and_no_plaintext_leaves(flower_identity, keyholder):
    cfg, run_dir, holder = keyholder
    replies = [client_reply(cfg, run_dir, holder, i) for i in range(4)]
    for r, c in zip(replies, CLIENTS):
        assert "arrays" not in r.content.array_records  # no plaintext weights in the reply
        payload = bytes(r.content.config_records["he"]["update"])
        plain = load_run(run_dir).local_model(c).state_dict()
        for name in ("heads.heart_disease.linear.weight", "encoders.tabular.mlp.0.bias"):
            assert plain[name].numpy().tobytes() not in payload  # inspect the serialized bytes
        secret = (client_dir(run_dir, c) / "signing_key.pem").read_bytes()
        assert secret not in payload

    server_ctx = ts.context_from(holder.public_context)
    assert not server_ctx.has_secret_key() and not server_ctx.is_private()
    assert holder.process.pid != os.getpid()  # the secret key lives in another process

    strategy = FedKIM(cfg, build_plan(cfg), run_dir, CKKSTransport(cfg, holder, registered_keys(run_dir, CLIENTS)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = flatten_state(arrays.to_torch_state_dict()).astype(np.float64)
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    expected = sum(w * local_vector(run_dir, c) for w, c in zip(weights, CLIENTS)) / sum(weights)
    err = got - expected
    assert np.abs(err).max() < 1e-4  # flooding sigma 1e-5 (plus float32 rounding)
    assert 0.5e-5 < err.std() < 2e-5  # the released mean carries the stated flooding noise
    assert metrics["num-examples"] == sum(weights)


def test_tampered_update_is_rejected_and_the_round_goes_on_without_it(flower_identity, keyholder):
    cfg, run_dir, holder = keyholder
    replies = [client_reply(cfg, run_dir, holder, i, server_round=2) for i in range(3)]  # va_long_beach dropped
    payload = bytearray(replies[1].content.config_records["he"]["update"])
    payload[-100] ^= 0xFF
    replies[1].content.config_records["he"]["update"] = bytes(payload)
    strategy = FedKIM(cfg, build_plan(cfg), run_dir, CKKSTransport(cfg, holder, registered_keys(run_dir, CLIENTS)))
    arrays, metrics = strategy.aggregate_train(2, replies)
    rejected = strategy.round_stats["rejected"]
    assert list(rejected) == ["hungary"] and "hungary" in rejected["hungary"]
    got = flatten_state(arrays.to_torch_state_dict()).astype(np.float64)
    w = [replies[i].content["metrics"]["num-examples"] for i in (0, 2)]
    expected = (w[0] * local_vector(run_dir, "cleveland") + w[1] * local_vector(run_dir, "switzerland")) / sum(w)
    assert np.abs(got - expected).max() < 1e-4
    assert metrics["num-clients"] == 3  # replies received; the aggregate holds the 2 that verified

    # the key holder decrypts at most once per round: the same round again is refused
    with pytest.raises(KeyHolderError, match="round 2 was already decrypted once"):
        strategy.aggregate_train(2, [client_reply(cfg, run_dir, holder, i, server_round=2) for i in (0, 2)])


def test_too_few_valid_contributions_are_never_decrypted(flower_identity, keyholder):
    cfg, run_dir, holder = keyholder
    replies = [client_reply(cfg, run_dir, holder, i, server_round=3) for i in (0, 1)]
    payload = bytearray(replies[0].content.config_records["he"]["update"])
    replies[0].content.config_records["he"]["update"] = bytes(payload[: len(payload) // 2])  # truncated
    strategy = FedKIM(cfg, build_plan(cfg), run_dir, CKKSTransport(cfg, holder, registered_keys(run_dir, CLIENTS)))
    with pytest.raises(RoundFailed, match="cleveland"):
        strategy.aggregate_train(3, replies)
    ledger = (run_dir / "keyholder" / "ledger.jsonl").read_text()
    assert '"round":3' not in ledger  # nothing was decrypted for round 3
