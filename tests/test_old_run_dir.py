"""A run directory written before the redesign (#14) still loads, audits and reports.

`tests/fixtures/run_5ecdfde/` is a real run written by the code at commit 5ecdfde (before the federation
engine, transports, patient-level DP and the baseline's budget share): 4 UCI hospitals, heart disease,
DP-SGD at epsilon 4 per record, CKKS, 2 rounds, a DP single-hospital baseline. Hospitals' private signing
keys were removed from the copy; nothing else was touched. That code let the baseline spend a budget of its
own, so composed with the federation each hospital spent more than its 4: today's report must say so.
"""

import json
import shutil
from pathlib import Path

import pytest

from privacy.ledger import PrivacyLedger
from secure_fedkim.rundir.artifacts import load_run

FIXTURE = Path(__file__).parent / "fixtures" / "run_5ecdfde"
CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run_5ecdfde"
    shutil.copytree(FIXTURE, run)
    return run


def test_an_old_run_directory_loads_with_todays_defaults(old_run):
    run = load_run(old_run)
    assert run.clients == CLIENTS and run.cfg.privacy.unit == "record"  # keys it never had take their defaults
    model = run.global_model()
    for c in CLIENTS:
        assert run.local_model(c).state_dict().keys() == model.state_dict().keys()
        (plan,) = PrivacyLedger(old_run / "clients" / c / "ledger.jsonl").plans()
        assert plan.run_id == "old_run" and plan.privacy_unit == "record"  # read as what it was
        assert not plan.reserved_schedule


def test_an_old_run_directory_reports_and_verifies_and_its_overspent_baseline_fails(old_run, tmp_path, monkeypatch):
    from secure_fedkim.report import status_of, verify_report, write_report
    from secure_fedkim.report.sign import KEY_ENV, new_issuer_key, public_key_path

    key = new_issuer_key(tmp_path / "issuer.pem", "test", "test")
    monkeypatch.setenv(KEY_ENV, str(key))
    paths = write_report(old_run)
    report = json.loads(paths.json.read_text())
    for check in ("ledger_verified", "epsilon_recomputed", "baseline_spend_composed", "server_secret_key"):
        assert status_of(report, check)["status"] == "pass", check
    budget = status_of(report, "budget_respected")
    assert budget["status"] == "fail" and "baseline" in budget["reason"]
    for h in report["hospitals"]:
        a = h["accounting"]
        assert a["epsilon_spent"] <= 4.0 * (1 + 1e-9) < a["epsilon_total"]  # the federation alone was within budget
    assert report["status"]["overall"] == "fail"
    assert verify_report(paths.json, public_key=public_key_path(key)) == []


def test_an_old_run_directory_is_audited(old_run):
    from attacks.audit import AuditConfig, audit_run

    config = AuditConfig.model_validate({
        "tasks": ["heart_disease"], "fprs": [0.1],
        "mia": {"attacks": ["loss"], "bootstrap": 20, "min_records": 10},
        "canary": {"canaries": 20}, "game": {"enabled": False}, "inversion": {"enabled": False},
        "whitebox": {"enabled": False},
    })
    audit = audit_run(old_run, config, progress=False)
    assert (old_run / "audit" / "audit.json").is_file()
    text = json.dumps(audit)
    assert "heart_disease" in text and "error" not in {k for k in audit}


def test_a_ledger_whose_unit_contradicts_the_config_fails_the_report(old_run, tmp_path, monkeypatch):
    """Planted: the config now claims patient-level DP while the ledgers were written per record."""
    from secure_fedkim.report import status_of, write_report
    from secure_fedkim.report.sign import KEY_ENV, new_issuer_key

    monkeypatch.setenv(KEY_ENV, str(new_issuer_key(tmp_path / "issuer.pem", "test", "test")))
    resolved = old_run / "resolved_config.json"
    cfg = json.loads(resolved.read_text())
    cfg["privacy"]["unit"] = "patient"
    resolved.write_text(json.dumps(cfg))
    report = json.loads(write_report(old_run).json.read_text())
    check = status_of(report, "privacy_unit")
    assert check["status"] == "fail" and "privacy unit is 'record', the run config's 'patient'" in check["reason"]
