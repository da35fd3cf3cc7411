"""A hospital's lifetime budget (#29): every run its ledger records on the same data, composed, enforced by its node."""

import json

import pytest

from privacy.accounting import Step, epsilon, independent_epsilon
from privacy.ledger import LedgerTampered, PrivacyLedger, canonical_json, entry_hash
from privacy.lifetime import LifetimeIntegrityError, lifetime
from secure_fedkim.cli import main
from secure_fedkim.deploy.identity import ensure_signing_key, load_signing_key
from secure_fedkim.deploy.policy import PolicyRefusal, write_policy
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.plan import build_plan

from test_policy import cfg_with, node_context, policy_dict

DELTA = 1e-5
SHARD = {"heart_disease": {"records": 100, "x_sha256": "a" * 64, "y_sha256": "b" * 64}}
OTHER = {"heart_disease": {"records": 100, "x_sha256": "c" * 64, "y_sha256": "d" * 64}}


def write_run(ledger, run_id, sigma, rounds, schedule, *, tasks=SHARD, reserved=()):
    """A finished run as a node writes it: commitment, plan, one dp_round per (round, task)."""
    if tasks is not None:
        ledger.append("dataset_commitment", run_id=run_id, client="south", tasks=tasks, dp=True)
    ledger.append("dp_plan", run_id=run_id, noise_multiplier=sigma, delta=DELTA, accountant="prv", max_grad_norm=1.0,
                  target_epsilon=8.0, round_schedule=[list(x) for x in schedule], rounds=rounds,
                  reserved_schedule=[list(x) for x in reserved], reserved_for="baseline" if reserved else None)
    steps = []
    for r in range(1, rounds + 1):
        for q, n in schedule:
            ledger.append("dp_round", run_id=run_id, round=r, noise_multiplier=sigma, sample_rate=q, steps=n)
            steps.append(Step(sigma, q, n))
    return steps


def test_lifetime_is_the_composition_of_the_concatenated_schedules(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    a = write_run(ledger, "r1", 1.1, 3, [(0.05, 40), (0.1, 20)])
    b = write_run(ledger, "r2", 0.9, 2, [(0.08, 30)], reserved=[(0.08, 60)])
    write_run(ledger, "r3", 0.7, 2, [(0.05, 50)], tasks=OTHER)  # other data: not counted
    plan = [Step(1.3, 0.05, 100)]
    lt = lifetime(ledger.entries(), DELTA, cap=20.0, current="r4", planned=plan, fingerprints=None or frozenset({"a" * 64}),
                  cumulative=True)
    b_all = b + [Step(0.9, 0.08, 60)]  # r2 trained, its baseline's reservation counts (no baseline ledger here)
    assert [r.run_id for r in lt.counted] == ["r1", "r2"] and [r.data for r in lt.runs] == ["same", "same", "other"]
    assert lt.runs[1].baseline == "reserved"
    # exactly Opacus PRV of the concatenation (the accountant a run is held to)
    assert lt.spent == epsilon(a + b_all, DELTA, "prv")
    assert lt.total == epsilon(a + b_all + plan, DELTA, "prv")
    assert lt.planned == epsilon(plan, DELTA, "prv")
    assert lt.cumulative == (epsilon(a, DELTA), epsilon(a + b_all, DELTA))
    # and an independent library, dp_accounting PLD, within the accountants' known gap (PRV's eps_error 0.01 above)
    pld = independent_epsilon(a + b_all + plan, DELTA, "pld")
    assert 0 <= lt.total - pld < 0.05, (lt.total, pld)
    # a composition, not a sum, and more than any run alone
    assert max(r.epsilon for r in lt.counted) < lt.spent < sum(r.epsilon for r in lt.counted)
    # scope "all" counts the run on other data too
    assert [r.run_id for r in lifetime(ledger.entries(), DELTA, scope="all", fingerprints=frozenset({"a" * 64})).counted] == ["r1", "r2", "r3"]


def test_a_recorded_baseline_counts_instead_of_the_reservation(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    fed = write_run(ledger, "r1", 1.0, 2, [(0.05, 40)], tasks=None, reserved=[(0.05, 80)])
    base = PrivacyLedger(tmp_path / "baseline.jsonl")
    base.append("dp_round", run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.05, steps=30)
    lt = lifetime(ledger.entries(), DELTA, baseline_entries=[base.entries()])
    assert lt.runs[0].baseline == "recorded" and lt.runs[0].data == "none"  # no commitment: counted
    assert lt.spent == epsilon(fed + [Step(1.0, 0.05, 30)], DELTA)


def test_a_deleted_earlier_run_is_caught_not_forgotten(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    write_run(ledger, "r1", 1.0, 2, [(0.05, 40)])
    from privacy.lifetime import check_entry

    lt = lifetime(ledger.entries(), DELTA, cap=10.0, current="r2", planned=[Step(1.0, 0.05, 40)])
    ledger.append("lifetime_check", **check_entry(lt))
    write_run(ledger, "r2", 1.0, 1, [(0.05, 40)])
    # an edited earlier round: the chain does not verify
    lines = path.read_text().splitlines()
    edited = [line.replace('"steps":40', '"steps":4', 1) if '"dp_round"' in line and '"r1"' in line else line for line in lines]
    path.write_text("\n".join(edited) + "\n")
    with pytest.raises(LedgerTampered):
        lifetime(ledger.entries(), DELTA)
    # r1's rounds deleted and the chain rebuilt: the lifetime_check that counted r1 still names them
    kept = [json.loads(line) for line in lines if not ('"dp_round"' in line and '"r1"' in line)]
    rechain(path, kept)
    PrivacyLedger(path).verify()
    with pytest.raises(LifetimeIntegrityError, match="run 'r1', counted by the lifetime check of run 'r2'"):
        lifetime(PrivacyLedger(path).entries(), DELTA)
    # r1's plan and rounds deleted, its commitment kept (no lifetime check yet): caught too
    kept = [json.loads(line) for line in lines[:1]]
    rechain(path, kept)
    with pytest.raises(LifetimeIntegrityError, match="committed its data for DP training"):
        lifetime(PrivacyLedger(path).entries(), DELTA)


def rechain(path, entries):
    prev = "0" * 64
    out = []
    for i, e in enumerate(entries):
        e = dict(e, seq=i, prev_hash=prev)
        e["hash"] = entry_hash(e)
        prev = e["hash"]
        out.append(canonical_json(e))
    path.write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------ the node enforces it


@pytest.fixture
def capped(tmp_path):
    """South's state dir with a policy whose lifetime budget is 5 (per-run cap 4)."""
    home = tmp_path / "south"
    ensure_signing_key(home)
    policy = policy_dict(privacy={"require_dp": True, "max_target_epsilon": 4.0, "max_delta": 1e-5,
                                  "max_lifetime_epsilon": 5.0})
    path = write_policy(home / "policy.yaml", policy, load_signing_key(home))
    return home, path


def round_config(cfg, run_id, r):
    from secure_fedkim.deploy.policy import code_sha256

    return {"run-config": cfg.model_dump_json(), "server-round": r, "run-dir": f"/x/{run_id}", "run-id": run_id,
            "code-sha256": code_sha256()}


def test_node_refuses_a_run_that_would_pass_its_lifetime_budget(flower_identity, capped, capsys):
    from secure_fedkim.hospital.client_app import hospital_round

    home, path = capped
    cfg = cfg_with(**{"federation.aggregation": "he", "run.rounds": 1})
    state = new_client_model(cfg, build_plan(cfg)).state_dict()
    first = hospital_round(cfg, node_context(home, path), round_config(cfg, "study-1", 1), state)
    assert first.model is not None
    ledger = PrivacyLedger(home / "ledger.jsonl")
    [check] = ledger.events("lifetime_check", "study-1")
    assert check["runs"] == [] and check["spent"] == 0.0 and 3.9 < check["total"] <= 4.0 and check["cap"] == 5.0
    with pytest.raises(PolicyRefusal) as refusal:
        hospital_round(cfg, node_context(home, path), round_config(cfg, "study-2", 1), state)
    reason = refusal.value.reason
    assert reason.startswith("lifetime budget 5 (delta 1e-05, per record): ") and "spent in runs study-1; this run plans 4.0" in reason
    assert "above the cap" in reason and reason.endswith("left")
    [refused] = ledger.events("refused", "study-2")
    assert refused["reason"] == reason and refused["round"] == 1
    assert ledger.events("dp_plan", "study-2") == [] and ledger.events("dp_round", "study-2") == []
    # a restarted node (a new process: nothing in memory) keeps the lifetime spend: it lives in the ledger
    with pytest.raises(PolicyRefusal, match="spent in runs study-1"):
        hospital_round(cfg, node_context(home, path), round_config(cfg, "study-2", 2), state)
    # the first run's later rounds are still accepted (its plan was accepted once, and is counted as planned)
    # budget --home prints the spend per run and what is left
    assert main(["budget", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "study-1" in out and "lifetime budget 5" in out and "spent in runs study-1" in out
    assert "refused: run study-2 round 1: lifetime budget 5" in out
    assert out.strip().endswith("budget printed to standard output (nothing written)")
    # budget --config --home plans a run against what is left: 4 would pass the cap, 1 fits
    import yaml

    from test_policy import CFG

    data = json.loads(json.dumps(CFG))
    data["federation"]["aggregation"], data["run"]["rounds"] = "he", 1
    (home.parent / "next.yaml").write_text(yaml.safe_dump(data))
    assert main(["budget", "--config", str(home.parent / "next.yaml"), "--epsilon", "4", "1", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "lifetime at south" in out and "cap 5:" in out
    assert "epsilon 4: 4.00 spent in study-1; this run 4.00; composed 5.26 -> over the cap: the node refuses this run" in out
    assert "epsilon 1: 4.00 spent in study-1; this run 1.00; composed" in out and out.count("-> within the cap") == 1


def test_node_refuses_when_its_ledger_does_not_verify(flower_identity, capped):
    from secure_fedkim.hospital.client_app import hospital_round

    home, path = capped
    ledger = PrivacyLedger(home / "ledger.jsonl")
    write_run(ledger, "old", 1.0, 1, [(0.05, 40)])
    text = (home / "ledger.jsonl").read_text().replace('"steps":40', '"steps":1')
    (home / "ledger.jsonl").write_text(text)
    cfg = cfg_with(**{"federation.aggregation": "he", "run.rounds": 1})
    state = new_client_model(cfg, build_plan(cfg)).state_dict()
    with pytest.raises(PolicyRefusal, match="the ledger does not verify"):
        hospital_round(cfg, node_context(home, path), round_config(cfg, "new", 1), state)
    assert not (home / "local_model.safetensors").exists()


def test_a_run_without_dp_on_the_same_data_has_no_finite_lifetime(tmp_path):
    import math

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append("dataset_commitment", run_id="plain", client="south", tasks=SHARD, dp=False)
    ledger.append("dataset_commitment", run_id="plain-elsewhere", client="south", tasks=OTHER, dp=False)
    lt = lifetime(ledger.entries(), DELTA, cap=8.0, current="next", planned=[Step(1.0, 0.05, 40)],
                  fingerprints=frozenset({"a" * 64}))
    assert [(r.run_id, r.counted, r.rounds) for r in lt.runs] == [("plain", True, 0), ("plain-elsewhere", False, 0)]
    assert math.isinf(lt.spent) and math.isinf(lt.total) and lt.exceeds
    assert "inf spent in runs plain;" in lt.refusal()


def test_node_with_a_lifetime_budget_refuses_a_run_without_dp(flower_identity, tmp_path):
    from secure_fedkim.hospital.client_app import hospital_round

    home = tmp_path / "south"
    ensure_signing_key(home)
    policy = policy_dict(privacy={"require_dp": False, "max_lifetime_epsilon": 8.0})
    path = write_policy(home / "policy.yaml", policy, load_signing_key(home))
    cfg = cfg_with(**{"federation.aggregation": "he", "privacy": {"dp": False}})
    state = new_client_model(cfg, build_plan(cfg)).state_dict()
    with pytest.raises(PolicyRefusal, match="without differential privacy, which has no finite epsilon"):
        hospital_round(cfg, node_context(home, path), round_config(cfg, "plain", 1), state)
    [refused] = PrivacyLedger(home / "ledger.jsonl").events("refused", "plain")
    assert refused["reason"].startswith("lifetime budget 8: ")


def test_policy_can_calibrate_a_run_to_the_lifetime_remainder(flower_identity, tmp_path, capsys):
    from secure_fedkim.hospital.client_app import hospital_round

    home = tmp_path / "south"
    ensure_signing_key(home)
    policy = policy_dict(privacy={"require_dp": True, "max_target_epsilon": 4.0, "max_delta": 1e-5,
                                  "max_lifetime_epsilon": 5.0, "on_lifetime_exceeded": "calibrate"})
    path = write_policy(home / "policy.yaml", policy, load_signing_key(home))
    cfg = cfg_with(**{"federation.aggregation": "he", "run.rounds": 2})
    state = new_client_model(cfg, build_plan(cfg)).state_dict()
    assert hospital_round(cfg, node_context(home, path), round_config(cfg, "study-1", 1), state).model is not None
    for r in (1, 2):  # the second run trains, at a lower target, in both its rounds
        result = hospital_round(cfg, node_context(home, path), round_config(cfg, "study-2", r), state)
        assert result.model is not None
    ledger = PrivacyLedger(home / "ledger.jsonl")
    [check] = ledger.events("lifetime_check", "study-2")
    [plan] = ledger.events("dp_plan", "study-2")
    target = check["calibrated_target_epsilon"]
    assert check["asked_target_epsilon"] == 4.0 and 0.05 < target < 4.0 and plan["target_epsilon"] == target
    assert check["total"] <= 5.0 and ledger.events("refused") == []
    # the run's whole plan, composed with study-1 as it was recorded, is within the cap (and close to it)
    lt = lifetime(ledger.entries(), 1e-5, current="study-2", planned=[
        Step(plan["noise_multiplier"], q, n) for q, n in plan["round_schedule"]] * plan["rounds"]
        + [Step(plan["noise_multiplier"], q, n) for q, n in plan.get("reserved_schedule") or []])
    assert 4.7 < lt.total <= 5.0, lt.total
    print(f"calibrated to target {target:.3f}: lifetime {lt.total:.3f} of 5")
