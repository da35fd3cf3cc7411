"""SecAgg+ mode on Flower's simulation engine: masked updates reveal nothing alone, a hospital that drops
mid-round leaves a correct aggregate of the others, and the result matches the plaintext weighted mean."""

import json

import numpy as np
import pytest
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.simulation import run_simulation

from secure_fedkim.federation.aggregation import flatten_state
from secure_fedkim.rundir.artifacts import load_run
from secure_fedkim.hospital.client_app import client_name
from secure_fedkim.config import RunConfig, parse_config
from secure_fedkim.federation.engine import make_server_app
from secure_fedkim.federation.transports.secagg import SecAggHospital

CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
CFG = {
    "run": {"rounds": 2, "seed": 5},
    "federation": {"clients": CLIENTS, "min_clients": 3, "aggregation": "secagg",
                   "secagg": {"num_shares": 4, "reconstruction_threshold": 3}},
    "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2, "local_epochs": 2},
}
DROPS = ("switzerland", 2)  # this hospital fails after the key exchange of round 2


def make_probe_mod(out_dir):
    """Outermost mod: keeps what leaves each hospital in the masked-vector stage, and makes one drop out."""

    def probe(msg, context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs else None
        if stage == "collect_masked_vectors":
            cfg = RunConfig.model_validate_json(str(msg.content.config_records["fitins.config"]["run-config"]))
            hospital = client_name(context, cfg)
            server_round = int(msg.content.config_records["fitins.config"]["server-round"])
            if (hospital, server_round) == DROPS:
                raise RuntimeError(f"{hospital} drops out mid-round")
            reply = call_next(msg, context)
            masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            np.save(out_dir / f"masked_{hospital}_{server_round}.npy", np.concatenate([m.ravel() for m in masked]))
            return reply
        return call_next(msg, context)

    return probe


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg")
    run_dir = out / "run"
    run_dir.mkdir()
    cfg = parse_config(CFG)
    (run_dir / "resolved_config.json").write_text(cfg.model_dump_json())
    probe_app = ClientApp(client_fn=lambda c: SecAggHospital(c).to_client(), mods=[make_probe_mod(out), secaggplus_mod])
    server_app, outcome = make_server_app(cfg, run_dir)
    run_simulation(
        server_app=server_app, client_app=probe_app, num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )
    if outcome.error is not None:
        raise outcome.error
    return cfg, run_dir, out, outcome.result


def test_a_dropout_mid_round_leaves_the_weighted_mean_of_the_others(secagg_run):
    cfg, run_dir, _, outcome = secagg_run
    run = load_run(run_dir)
    record = json.loads((run_dir / "metrics" / "round_002.json").read_text())
    others = [c for c in CLIENTS if c != DROPS[0]]
    assert sorted(record["clients"]) == sorted(others)
    weights = [record["clients"][c]["num-examples"] for c in others]
    expected = sum(w * flatten_state(run.local_model(c).state_dict()).astype(np.float64) for w, c in zip(weights, others))
    expected /= sum(weights)
    got = flatten_state(outcome.arrays.to_torch_state_dict())
    # documented precision: 2 * clipping_range / quantization_range / (sum of weights / max_weight)
    s = cfg.federation.secagg
    step = 2 * s.clipping_range / s.quantization_range / (sum(weights) / s.max_weight)
    assert np.abs(got - expected).max() < 4 * step


def test_a_single_masked_update_is_unrelated_to_its_plaintext(secagg_run):
    _, run_dir, out, _ = secagg_run
    plain = flatten_state(load_run(run_dir).local_model("cleveland").state_dict()).astype(np.float64)
    masked = np.load(out / "masked_cleveland_2.npy").astype(np.float64)
    assert masked.size == plain.size + 1  # SecAgg+ prepends the (masked) weight factor
    masked = masked[1:]
    assert abs(np.corrcoef(masked, plain)[0, 1]) < 4 / np.sqrt(plain.size)  # no linear relation
    # the masks spread values over the whole modulus: roughly uniform, unlike the quantized weights
    counts, _ = np.histogram(masked, bins=8, range=(0, 2**32))
    assert counts.min() > 0.6 * counts.mean()
    other = np.load(out / "masked_hungary_2.npy").astype(np.float64)[1:]
    assert abs(np.corrcoef(masked, other)[0, 1]) < 4 / np.sqrt(plain.size)
