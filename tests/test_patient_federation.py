"""Patient-level DP in the federation (#18) and the single-hospital baseline's share of the budget: the
config keys, the schedule the accountant sees, one calibration for a run and for `budget --config`, a
baseline that would overspend is not trained, and a patient-level run's ledger and report name the unit."""

import json

import numpy as np
import pytest
import yaml

from privacy.accounting import Step, calibrate_noise, epsilon, poisson_schedule, resolve_delta
from privacy.budget import forecast as budget_forecast
from privacy.ledger import PrivacyLedger
from secure_fedkim.rundir.artifacts import client_dir
from secure_fedkim.cli import main
from secure_fedkim.hospital.local_training import dp_plan_inputs, dp_round_schedule, n_patients, patients_of
from secure_fedkim.hospital.client_app import hospital_dp
from secure_fedkim.config import RunConfig, parse_config
from secure_fedkim.plan import build_plan

VISITS = """
run: {name: visits, seed: 2, rounds: 2}
federation: {clients: [north, south], min_clients: 2}
tasks:
  max_test_records: 150
  train:
    - {name: mortality_visits, partition: iid, max_records: 1500}
client: {local_epochs: 1, batch_size: 8, token_dim: 16, num_tokens: 2}
privacy:
  dp: true
  unit: patient
  max_records_per_patient_step: 3
  profile: {target_epsilon: 3.0}
baseline: {single_hospital: true}
"""


def visits_cfg(**privacy) -> RunConfig:
    raw = yaml.safe_load(VISITS)
    raw["privacy"].update(privacy)
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("privacy, words", [
    ({"dp": False, "profile": None}, "unit: patient-level privacy needs DP-SGD"),
    ({"max_records_per_patient": 4}, "max_records_per_patient: group privacy is for unit: record"),
    ({"unit": "record"}, "max_records_per_patient_step: only used with unit: patient"),
    ({"unit": "person"}, "privacy.unit"),
    ({"max_records_per_patient_step": 0}, "privacy.max_records_per_patient_step"),
])
def test_the_privacy_unit_keys_are_validated_with_one_clear_error(privacy, words):
    raw = yaml.safe_load(VISITS)
    raw["privacy"].update(privacy)
    raw["privacy"] = {k: v for k, v in raw["privacy"].items() if v is not None}
    with pytest.raises(ValueError) as e:
        parse_config(raw, "visits.yaml")
    assert words in str(e.value)


def test_the_accountant_samples_patients_at_a_patient_level_run():
    cfg = visits_cfg()
    plans = build_plan(cfg)
    shard = plans["mortality_visits"].shard("north")
    patients = len(np.unique(patients_of(shard)))
    assert 1 < patients < len(shard)  # several visits per patient
    assert dp_round_schedule(plans, "north", cfg) == [poisson_schedule(patients, 8, 1)]
    raw = yaml.safe_load(VISITS)
    raw["privacy"] = {"dp": True, "profile": {"target_epsilon": 3.0}}  # the default unit: record
    record = RunConfig.model_validate(raw)
    assert dp_round_schedule(plans, "north", record) == [poisson_schedule(len(shard), 8, 1)]
    assert n_patients(plans, "north") == patients


def test_the_federation_plan_reserves_the_baselines_steps_and_budget_config_agrees(tmp_path, capsys):
    cfg = visits_cfg()
    plans = build_plan(cfg)
    dp = hospital_dp(cfg, plans, "north", tmp_path / "north", "run-1")
    inputs = dp_plan_inputs(cfg, plans, "north")
    full = inputs["round_schedule"] * cfg.run.rounds
    delta = resolve_delta(None, inputs["n_patients"])
    assert dp.unit == "patient" and dp.delta == delta and dp.plan["n_patients"] == inputs["n_patients"]
    assert dp.plan["reserved_schedule"] == [list(x) for x in full] and "baseline" in dp.plan["reserved_for"]
    assert dp.noise_multiplier == calibrate_noise(3.0, delta, full + full)
    both = epsilon([Step(dp.noise_multiplier, q, k) for q, k in full + full], delta)
    assert both <= 3.0 < epsilon([Step(dp.noise_multiplier * 0.97, q, k) for q, k in full + full], delta)
    # the baseline reuses that noise and reserves nothing
    alone = hospital_dp(cfg, plans, "north", tmp_path / "alone", "baseline-north", dp.noise_multiplier)
    assert "reserved_schedule" not in alone.plan and alone.noise_multiplier == dp.noise_multiplier
    # without a baseline nothing is reserved and the noise is smaller
    solo = hospital_dp(cfg.model_copy(update={"baseline": cfg.baseline.model_copy(update={"single_hospital": False})}),
                       plans, "north", tmp_path / "solo", "run-2")
    assert solo.noise_multiplier < dp.noise_multiplier and "reserved_schedule" not in solo.plan
    # `budget --config` prints the same noise as the run's own plan
    path = tmp_path / "visits.yaml"
    path.write_text(VISITS)
    assert main(["budget", "--config", str(path), "--epsilon", "3"]) == 0
    out = capsys.readouterr().out
    north = next(line for line in out.splitlines() if line.startswith("north"))
    assert f"{dp.noise_multiplier:.4f}" in north and "epsilon per patient" in out and "+ baseline ->" in north


def test_budget_plans_per_patient_from_the_command_line(capsys):
    assert main(["budget", "--epsilon", "4", "--records", "20000", "--patients", "2000", "--batch", "32", "--rounds", "5"]) == 0
    out = capsys.readouterr().out
    p = budget_forecast(4.0, None, 20000, 32, 2, 5, unit="patient", n_patients=2000)
    assert f"noise multiplier   {p.noise_multiplier:.6g}" in out and "per patient" in out
    assert p.sample_rate == 1 / 63  # 2000 patients, 32 per batch: 63 batches
    assert main(["budget", "--epsilon", "4", "--records", "200", "--patients", "2000", "--rounds", "5"]) == 2
    assert "--patients 2000 is more than --records 200" in capsys.readouterr().err


def test_a_baseline_that_would_exceed_the_budget_is_not_trained(tmp_path):
    """A federation planned without the baseline's share (here: spent to its full budget) leaves nothing for
    the baseline: composed, it would overspend, so it is refused before anything is spent."""
    from secure_fedkim.hospital.baseline import train_alone

    cfg = visits_cfg()
    plans = build_plan(cfg)
    run_dir = tmp_path / "run"
    fed_cfg = cfg.model_copy(update={"baseline": cfg.baseline.model_copy(update={"single_hospital": False})})
    fed = hospital_dp(fed_cfg, plans, "north", client_dir(run_dir, "north"), run_dir.name)
    for r, (q, k) in enumerate(fed.round_schedule * fed.rounds, start=1):
        fed.record_round(r, "mortality_visits", k, q)
    assert train_alone(cfg.model_dump_json(), str(run_dir), "north") is None
    assert not (run_dir / "baseline" / "north" / "ledger.jsonl").exists()  # nothing spent


@pytest.mark.slow
def test_a_patient_level_run_names_its_unit_in_the_ledger_the_output_and_the_report(tmp_path, capsys, monkeypatch):
    from secure_fedkim.report import write_report
    from secure_fedkim.report.sign import KEY_ENV, new_issuer_key

    path = tmp_path / "visits.yaml"
    path.write_text(VISITS)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "epsilon spent (accountant, whole run so far, per patient)" in printed
    assert "Privacy spent per hospital (epsilon per patient" in printed
    summary = json.loads((out / "summary.json").read_text())
    for c, spend in summary["privacy_spend"].items():
        assert spend["unit"] == "patient" and spend["composed"] <= 3.0 * (1 + 1e-9)
        assert spend["baseline"] > 0 and spend["composed"] > spend["federation"]
        plan = PrivacyLedger(client_dir(out, c) / "ledger.jsonl").events("dp_plan")[0]
        assert plan["privacy_unit"] == "patient" and plan["max_records_per_patient_step"] == 3
    monkeypatch.setenv(KEY_ENV, str(new_issuer_key(tmp_path / "issuer.pem", "t", "t")))
    report = json.loads(write_report(out).json.read_text())
    assert report["privacy_definition"]["privacy_unit"] == "patient"
    assert "one patient with all their records" in report["privacy_definition"]["adjacency"]
    for h in report["hospitals"]:
        assert h["accounting"]["privacy_unit"] == "patient" and h["accounting"]["patient_level"] is None
        assert h["accounting"]["epsilon_total"] <= 3.0 * (1 + 1e-9)
    assert all("per patient" in p["text"] for p in report["guarantee_statement"]["per_hospital"])
    assrt = {c["name"]: c["status"] for c in report["checks"]}
    assert assrt["budget_respected"] == "pass" and assrt["baseline_spend_composed"] == "pass"
