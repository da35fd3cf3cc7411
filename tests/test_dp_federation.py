"""DP inside the federation: the real ClientApp spends from its hospital's ledger and stops when the budget is gone."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.hospital.client_app import app as client_app
from secure_fedkim.config import parse_config
from secure_fedkim.plan import build_plan

CFG = {
    "run": {"rounds": 2, "seed": 2},
    "federation": {"clients": ["cleveland", "hungary", "switzerland", "va_long_beach"], "min_clients": 2},
    "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2, "batch_size": 32},
    "privacy": {"dp": True, "profile": {"target_epsilon": 3.0}, "hospitals": {"switzerland": {"target_epsilon": 1.0}},
                "max_records_per_patient": 2},
    "baseline": {"single_hospital": False},  # the federation alone spends the budget (no steps reserved)
}



def train_message(cfg, arrays, server_round, run_dir):
    config = ConfigRecord(
        {"run-config": cfg.model_dump_json(), "server-round": server_round, "run-dir": str(run_dir), "run-id": "r1"}
    )
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")


def test_hospital_spends_its_own_budget_and_stops_when_it_is_gone(flower_identity, tmp_path):
    cfg = parse_config(CFG)
    arrays = ArrayRecord(new_client_model(cfg, build_plan(cfg)).state_dict())
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    ledger = PrivacyLedger(tmp_path / "clients" / "switzerland" / "ledger.jsonl")

    spent = []
    for r in (1, 2):
        reply = client_app(train_message(cfg, arrays, r, tmp_path), context)
        metrics = reply.content["metrics"]
        assert "heart_disease.loss" not in metrics  # an unprotected training loss never leaves under DP
        spent.append(metrics["epsilon-spent"])
        # patient level: group privacy for 2 records per patient, from the same accountant epsilon
        assert metrics["epsilon-patient"] == pytest.approx(2 * metrics["epsilon-spent"])
    plan = ledger.events("dp_plan")[0]
    assert plan["target_epsilon"] == 1.0  # the hospital's own budget, not the federation default
    # the reported spend is the accountant's over exactly the ledger's history, and meets the target at the end
    assert spent[1] == pytest.approx(epsilon(ledger.dp_history("r1"), plan["delta"], "prv"), rel=1e-9)
    assert spent[0] < spent[1] <= 1.0 + 1e-9 and spent[1] > 0.97

    # a third round would exceed the budget: the hospital does not train, says why, and sends no weights
    before = len(ledger.entries())
    reply = client_app(train_message(cfg, arrays, 3, tmp_path), context)
    assert reply.content["metrics"]["skipped-budget"] == 1
    assert "arrays" not in reply.content.array_records
    entries = ledger.entries()
    assert [e["event"] for e in entries[before:]] == ["skipped_budget"]
    assert len(ledger.dp_history("r1")) == 2  # nothing more was spent


def test_each_round_draws_fresh_noise_and_batches(flower_identity, tmp_path, monkeypatch):
    """The same global model sent twice to a hospital: its two DP-SGD updates must differ. The model is built from
    the run seed (which resets torch's global RNG, where Opacus draws noise and Poisson batches without
    secure_mode); if the noise were drawn from there each round would add the same noise, which cancels in the
    difference of two rounds' updates. Planted: removing the fresh seed in local_round makes this fail."""
    import privacy.fast_dp as fast_dp

    cfg = parse_config(CFG)
    arrays = ArrayRecord(new_client_model(cfg, build_plan(cfg)).state_dict())
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    first_draws, draw = [], fast_dp.FusedDPOptimizer._draw_noise

    def recorded(self, std, like):
        noise = draw(self, std, like)
        first_draws.append(noise.flatten()[:8].clone())
        return noise

    monkeypatch.setattr(fast_dp.FusedDPOptimizer, "_draw_noise", recorded)
    updates = []
    for r in (1, 2):
        first_draws.clear()
        reply = client_app(train_message(cfg, arrays, r, tmp_path), context)
        updates.append((first_draws[0], reply.content["arrays"].to_torch_state_dict()))
    (noise1, w1), (noise2, w2) = updates
    assert not noise1.equal(noise2)
    assert any(not w1[k].equal(w2[k]) for k in w1)
