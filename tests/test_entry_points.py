"""One ClientApp and one summary writer for the simulation and the deployment, and FEDKIM_pub through the
engine (issue #26, item 4)."""

import json

import pytest
from flwr.app import ArrayRecord

from secure_fedkim.config import config_sha256, parse_config
from secure_fedkim.federation.engine import (
    FederationResult,
    PublicRounds,
    run_fedkim,
    write_run_summary,
)
from secure_fedkim.federation.strategy import FedKIM
from secure_fedkim.fm.injection import Injector
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.plan import build_plan
from secure_fedkim.drivers.run import run_federation


def config(**injection):
    return parse_config({
        "run": {"name": "entry", "rounds": 2, "seed": 3},
        "federation": {"clients": ["cleveland", "hungary", "switzerland", "va_long_beach"], "aggregation": "plain"},
        "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}], "max_test_records": 60},
        "client": {"token_dim": 16, "num_tokens": 2},
        "baseline": {"single_hospital": False},
        "injection": {"enabled": True, "num_experts": 2, "max_public_per_task": 16, **injection},
    })


def test_the_simulation_and_the_deployment_run_the_same_client_app(monkeypatch, tmp_path):
    import flwr.simulation

    from secure_fedkim.hospital.client_app import HospitalClientApp, app
    from secure_fedkim.drivers.deploy_app import client

    assert client is app and isinstance(app, HospitalClientApp)
    handed = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: handed.update(kw))
    with pytest.raises(RuntimeError, match="ended without a result"):  # nothing ran: the stub returns at once
        run_federation(config(enabled=False), "", out_dir=tmp_path / "run", progress=False)
    assert handed["client_app"] is app


def test_fedkim_pub_through_the_engine_equals_the_server_training_alone(tmp_path):
    """No hospital, no Grid: the engine's public-only rounds give what the server's own loop over its public
    split gives (the release before the engine ran FEDKIM_pub), array for array."""
    cfg = config(method="fedkim_pub")
    result = run_fedkim(None, None, cfg, tmp_path / "engine")
    assert [r["round"] for r in result.history] == [0, 1, 2] and result.aggregation == {"mode": "plain"}
    assert all(r["clients"] == {} and r["injection"]["steps"] > 0 for r in result.history[1:])

    plans = build_plan(cfg)
    strategy = FedKIM(cfg, plans, tmp_path / "alone", injector=Injector(cfg, plans))
    model = new_client_model(cfg, plans)
    strategy.evaluate(0, ArrayRecord(model.state_dict()))
    for r in (1, 2):
        arrays = strategy.public_round(r, model)
    expected, got = arrays.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert [h["fm_test"] for h in strategy.history] == [h["fm_test"] for h in result.history]


def test_public_rounds_send_nothing_and_resume_after_a_checkpoint(tmp_path):
    cfg = config(method="fedkim_pub")
    plans = build_plan(cfg)
    rounds = PublicRounds(None, cfg, plans)
    assert rounds.open(tmp_path, None) == {}
    strategy = FedKIM(cfg, plans, tmp_path, injector=Injector(cfg, plans), offset=1)
    start = ArrayRecord(new_client_model(cfg, plans).state_dict())
    rounds.run_rounds(strategy, None, None, start, {}, 1, 0.0)  # grid and context: never used
    assert [r["round"] for r in strategy.history] == [2]


def history(rounds, fm=True):
    test = {"heart_disease": {"auroc": 0.5}}
    return [{"round": r, "client_model_test": test, **({"fm_test": {"heart_disease": {"auroc": r}}} if fm else {})}
            for r in rounds]


def test_one_summary_writer_for_the_simulation_and_the_deployment(tmp_path):
    result = FederationResult(ArrayRecord(), history([0, 1, 2]), {"mode": "plain"})
    plans = build_plan(config())
    sim = write_run_summary(tmp_path, "run: {}", 0.0, result, plans=plans, evaluation={"single_hospital_test": {}})
    assert json.loads((tmp_path / "summary.json").read_text()) == sim
    assert list(sim) == ["run_dir", "config_sha256", "seconds", "tasks", "aggregation", "federated_test", "fm_test",
                         "fm_test_round0", "single_hospital_test"]
    assert sim["fm_test"]["heart_disease"]["auroc"] == 2 and sim["fm_test_round0"]["heart_disease"]["auroc"] == 0
    assert sim["tasks"]["heart_disease"]["role"] == "train" and sim["seconds"] > 0

    engine = {"engine": "flower deployment", "flower_run_id": 5, "resumed_from_round": 1, "code_sha256": "c" * 64}
    resumed = FederationResult(ArrayRecord(), history([2], fm=False), {"mode": "he"})
    dep = write_run_summary(tmp_path, "run: {}", 0.0, resumed, engine=engine)
    assert list(dep) == ["run_dir", "config_sha256", *engine, "seconds", "aggregation", "federated_test"]
    assert dep["config_sha256"] == sim["config_sha256"] == config_sha256("run: {}")
    # a resumed server's history starts after round 0: it has no round-0 foundation model to report
    dep = write_run_summary(tmp_path, "run: {}", 0.0, FederationResult(ArrayRecord(), history([2]), {}), engine=engine)
    assert "fm_test" in dep and "fm_test_round0" not in dep
    nothing = write_run_summary(tmp_path, "run: {}", 0.0, FederationResult(ArrayRecord(), [], {}), engine=engine)
    assert nothing["federated_test"] is None

