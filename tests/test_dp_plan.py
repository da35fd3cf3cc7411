"""The typed DP plan (privacy.plan.DPPlan, PrivacyLedger.plan) and the one rule for which run is this run's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from privacy.accounting import Step, epsilon
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import DPPlan, PrivacyLedger, this_run_id

SCHEDULE = [(0.1, 10), (0.05, 4)]
RESERVED = [(0.1, 5)]
_WRITTEN_BY_LEDGER = ("seq", "prev_hash", "time", "event", "hash")


def hospital(ledger: PrivacyLedger, run_id: str = "run-a", **profile) -> HospitalDP:
    patient = profile.get("unit") == "patient"
    return HospitalDP(PrivacyProfile(target_epsilon=8.0, accountant="rdp", **profile), ledger, run_id, SCHEDULE, 3,
                      n_records=500, n_patients=50 if patient else None, reserved=RESERVED,
                      reserved_for="single-hospital baseline", noise_multiplier=1.0)


def plain_fields(plan: DPPlan) -> dict:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "entry"}


def test_a_record_plan_round_trips(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    dp = hospital(ledger)
    entry = dp.plan
    plan = DPPlan.from_entry(entry)
    assert plan.entry == entry
    for name, value in plain_fields(plan).items():
        if name in ("round_schedule", "reserved_schedule"):
            assert [list(x) for x in value] == entry[name]
        elif name in entry:
            assert value == entry[name], name
    assert plain_fields(plan) == {
        "run_id": "run-a", "noise_multiplier": 1.0, "delta": dp.delta, "accountant": "rdp", "max_grad_norm": 1.0,
        "dp": True, "target_epsilon": 8.0, "round_schedule": ((0.1, 10), (0.05, 4)), "rounds": 3, "n_records": 500,
        "privacy_unit": "record", "n_patients": None, "max_records_per_patient_step": None,
        "reserved_schedule": ((0.1, 5),), "reserved_for": "single-hospital baseline",
        "planned_epsilon": entry["planned_epsilon"], "seq": 0,
    }
    assert plan.n_units == 500
    assert plan.planned_steps() == [Step(1.0, 0.1, 10), Step(1.0, 0.05, 4)] * 3
    assert plan.with_reserved() == plan.planned_steps() + [Step(1.0, 0.1, 5)]
    assert epsilon(plan.planned_steps(), plan.delta, "rdp") == pytest.approx(entry["planned_epsilon"])
    assert epsilon(plan.with_reserved(), plan.delta, "rdp") == pytest.approx(entry["planned_epsilon_with_reserved"])
    assert ledger.plans() == [plan] and ledger.plan("run-a") == plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.delta = 0.5


def test_a_patient_plan_round_trips(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    dp = hospital(ledger, unit="patient", max_records_per_patient_step=3)
    plan = ledger.plan("run-a")
    assert plan.entry == dp.plan
    assert (plan.privacy_unit, plan.n_patients, plan.max_records_per_patient_step, plan.n_records) == ("patient", 50, 3, 500)
    assert plan.n_units == 50 and plan.delta == dp.delta == dp.plan["delta"]
    assert plan.reserved_schedule == ((0.1, 5),)


def test_an_old_plan_without_a_privacy_unit_reads_as_record(tmp_path):
    entry = hospital(PrivacyLedger(tmp_path / "new.jsonl")).plan
    old = {k: v for k, v in entry.items() if k not in _WRITTEN_BY_LEDGER + ("privacy_unit",)}
    ledger = PrivacyLedger(tmp_path / "old.jsonl")
    ledger.append("dp_plan", **old)
    plan = ledger.plan("run-a")
    assert plan.privacy_unit == "record" and plan.n_units == 500 and "privacy_unit" not in plan.entry
    assert hospital(ledger).plan == plan.entry  # a record-unit profile adopts it


def test_a_missing_or_invalid_field_is_named(tmp_path):
    entry = hospital(PrivacyLedger(tmp_path / "ledger.jsonl")).plan
    with pytest.raises(ValueError, match=r"dp_plan entry \(seq 0\) lacks field\(s\) \['delta'\]"):
        DPPlan.from_entry({k: v for k, v in entry.items() if k != "delta"})
    with pytest.raises(ValueError, match=r"field 'noise_multiplier' is not a valid float: 'lots'"):
        DPPlan.from_entry({**entry, "noise_multiplier": "lots"})
    with pytest.raises(ValueError, match=r"field 'round_schedule' is not a list of \(sample_rate, steps\)"):
        DPPlan.from_entry({**entry, "round_schedule": [[0.1]]})
    with pytest.raises(ValueError, match=r"lacks field \['rounds'\]"):
        DPPlan.from_entry({k: v for k, v in entry.items() if k != "rounds"}).planned_steps()


def test_a_resumed_run_keeps_its_first_plan(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    first = hospital(ledger).plan
    hospital(ledger, run_id="run-b")
    later = {k: v for k, v in first.items() if k not in _WRITTEN_BY_LEDGER}
    ledger.append("dp_plan", **{**later, "noise_multiplier": 2.0})  # a second plan of run-a, later in the ledger
    assert [(p.run_id, p.noise_multiplier) for p in ledger.plans()] == [("run-a", 1.0), ("run-b", 1.0), ("run-a", 2.0)]
    assert ledger.plan("run-a").seq == first["seq"] and ledger.plan("run-a").noise_multiplier == 1.0
    assert ledger.plan("run-b").seq == 1 and ledger.plan("run-c") is None
    assert hospital(ledger).plan == first  # HospitalDP adopts the same one
    assert PrivacyLedger(tmp_path / "none.jsonl").plan("run-a") is None and PrivacyLedger(tmp_path / "none.jsonl").plans() == []


def test_one_rule_for_this_runs_id(tmp_path):
    from attacks._runs import run_id_of, run_plan
    from secure_fedkim.report.collect import pick_run_id

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    hospital(ledger, run_id="run-a")
    hospital(ledger, run_id="run-b")
    ids = [p.run_id for p in ledger.plans()]
    assert this_run_id(ids, "run-b") == "run-b"  # this run's directory name
    assert this_run_id(ids, "run-a", "run-b") == "run-a"  # the directory's name first
    assert this_run_id(ids, "moved", "run-a") == "run-a"  # a moved run directory: the name in summary.json
    assert this_run_id(["run-a"], "other") == "run-a"  # the ledger's only run
    assert this_run_id(ids, "other") is None and this_run_id(ids, "other", "elsewhere") is None  # no guess
    assert this_run_id([None, "", "run-a", "run-a"], "other") == "run-a" and this_run_id([], "run-a") is None

    class Run:
        run_dir = tmp_path / "moved"
        recorded = "/runs/run-a"

        def ledger_path(self, client):
            return tmp_path / "ledger.jsonl"

        def summary(self):
            return {"run_dir": self.recorded}

    run = Run()
    assert run_id_of(run, ledger.plans()) == "run-a" == run_id_of(run, ledger.events("dp_plan"))
    assert run_plan(run, ledger) == ledger.plan("run-a")
    run.recorded = "/runs/run-c"
    assert run_id_of(run, ledger.plans()) is None and run_plan(run, ledger) is None
    run.run_dir = tmp_path / "run-b"
    assert run_plan(run, ledger).run_id == "run-b"

    # the report's wrapper: the same rule; a report must cover one run, so with only foreign runs the latest
    entries = ledger.events("dp_plan")
    assert pick_run_id(entries, Path("moved"), {"run_dir": "/runs/run-a"}) == "run-a"
    assert pick_run_id(entries, Path("run-b"), {}) == "run-b"
    assert pick_run_id(entries[:1], Path("other"), {}) == "run-a"
    assert pick_run_id(entries, Path("other"), {}) == "run-b"
    assert pick_run_id([], Path("other"), {}) is None
