"""The server strategy: FedAvg over Flower messages equals a hand-computed weighted mean; too few replies stop."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from secure_fedkim.federation.aggregation import flatten_state
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.config import parse_config
from secure_fedkim.plan import build_plan
from secure_fedkim.federation.strategy import FedKIM, RoundFailed

CFG = {
    "run": {"rounds": 1, "seed": 3},
    "federation": {"clients": ["a", "b", "c"], "min_clients": 2},
    "tasks": {"train": [{"name": "heart_disease", "partition": "iid"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2},
}



def reply(model, index, n):
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n, "client-index": index})}
    )
    return Message(content, dst_node_id=index + 1, message_type="train")


def test_fedkim_aggregate_is_the_sample_weighted_mean(flower_identity, tmp_path):
    cfg = parse_config(CFG)
    plans = build_plan(cfg)
    strategy = FedKIM(cfg, plans, tmp_path)
    models, ns = [], [10, 30, 60]
    for i in range(3):
        m = new_client_model(cfg, plans)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * (i + 1))
        models.append(m)
    arrays, metrics = strategy.aggregate_train(1, [reply(m, i, n) for i, (m, n) in enumerate(zip(models, ns))])
    got = flatten_state(arrays.to_torch_state_dict())
    vecs = [flatten_state(m.state_dict()).astype(np.float64) for m in models]
    expected = (10 * vecs[0] + 30 * vecs[1] + 60 * vecs[2]) / 100
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert metrics["num-examples"] == 100 and metrics["num-clients"] == 3

    record = strategy.evaluate(1, arrays)
    assert (tmp_path / "metrics" / "round_001.json").exists()
    assert 0.0 <= record["heart_disease.accuracy"] <= 1.0


def test_too_few_replies_stop_the_run(flower_identity, tmp_path):
    cfg = parse_config(CFG)
    plans = build_plan(cfg)
    strategy = FedKIM(cfg, plans, tmp_path)
    with pytest.raises(RoundFailed, match="1 clients contributed .* fewer than min_clients=2"):
        strategy.aggregate_train(1, [reply(new_client_model(cfg, plans), 0, 5)])
