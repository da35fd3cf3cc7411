"""Compliance reports: built from one real DP + CKKS run (Flower simulation), then copied and broken on purpose.

Each status rule of REPORTING.md §2.3 is triggered by a run edited to break it; every epsilon in a report is
recomputed from the ledgers here; verify names what changed; a partner report never names another partner.
"""

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from statistics import NormalDist

import jsonschema
import pytest

from privacy import accounting
from privacy.accounting import Step, epsilon, gdp_mu, independent_epsilon
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger
from secure_fedkim.cli import main
from secure_fedkim.report import SCHEMA_VERSION, build_report, load_schema, status_of, verify_report, write_report
from secure_fedkim.report.sign import KEY_ENV, fingerprint, load_public_key, manifest, new_issuer_key, public_key_path
from secure_fedkim.report.text import g, tpr_at_fpr

CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
CFG = """
run: {name: reportfix, seed: 3, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3, aggregation: he}
tasks:
  max_test_records: 60
  train:
    - {name: heart_disease, partition: natural}
client: {local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}
baseline: {single_hospital: false}
privacy: {dp: true, profile: {target_epsilon: 8.0}}
"""


pytestmark = pytest.mark.usefixtures("issuer_key")  # tests/conftest.py: the issuer's key, set for this module


def verify(path, **kw):
    """verify_report with the issuer's published public key, as a partner would call it."""
    return verify_report(path, public_key=public_key_path(Path(os.environ[KEY_ENV])), **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("report-run")
    cfg = base / "fix.yaml"
    cfg.write_text(CFG)
    out = base / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def copy_run(run_dir, tmp_path):
    def make(name: str = "run") -> Path:
        d = tmp_path / name
        shutil.copytree(run_dir, d)
        return d

    return make


@pytest.fixture(scope="module")
def written(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("report-written") / "run"
    shutil.copytree(run_dir, d)
    return d, write_report(d), write_report(d, partner="hungary")


def ledger_path(run: Path, hospital: str) -> Path:
    return run / "clients" / hospital / "ledger.jsonl"


def rewrite_ledger(path: Path, edit, recompute: bool = True) -> None:
    """Re-write a ledger through PrivacyLedger (a valid chain) with ``edit(event, body) -> body`` applied; the
    recorded epsilons are recomputed for the edited entries, as the real mechanism would have written them."""
    entries = PrivacyLedger(path).entries()
    path.unlink()
    ledger = PrivacyLedger(path)
    history = []
    for e in entries:
        body = {k: v for k, v in e.items() if k not in ("seq", "prev_hash", "time", "hash", "event")}
        body = edit(e["event"], body)
        if recompute and e["event"] == "dp_plan" and body.get("planned_epsilon") is not None:
            full = [Step(body["noise_multiplier"], q, n) for q, n in body["round_schedule"]] * body["rounds"]
            planned = epsilon(full, body["delta"], body["accountant"])
            body["planned_epsilon"] = planned if math.isfinite(planned) else None
        if recompute and e["event"] == "dp_round":
            history.append(Step(body["noise_multiplier"], body["sample_rate"], body["steps"]))
            eps = epsilon(history, body["delta"], body["accountant"])
            body["epsilon"] = eps if math.isfinite(eps) else None
        ledger.append(e["event"], **body)


def sync_metrics(run: Path, hospital: str) -> None:
    """Make metrics/round_NNN.json report the (rewritten) ledger's spend, as the hospital would have."""
    entries = PrivacyLedger(ledger_path(run, hospital)).entries()
    plan = next(e for e in entries if e["event"] == "dp_plan")
    for p in sorted((run / "metrics").glob("round_*.json")):
        rec = json.loads(p.read_text())
        r = rec["round"]
        if hospital in rec.get("clients", {}):
            steps = [Step(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries
                     if e["event"] == "dp_round" and e["round"] <= r]
            rec["clients"][hospital]["epsilon-spent"] = epsilon(steps, plan["delta"], plan["accountant"])
            p.write_text(json.dumps(rec, indent=2))


@pytest.fixture(scope="module")
def roc_png(tmp_path_factory) -> Path:
    """A real ROC PNG, drawn by attacks.metrics.plot_roc as the audit draws them."""
    import numpy as np

    from attacks.metrics import plot_roc

    rng = np.random.default_rng(0)
    return plot_roc({"loss": (rng.normal(size=200), np.r_[np.ones(100), np.zeros(100)])},
                    tmp_path_factory.mktemp("roc") / "roc.png")


def all_text(report: dict) -> str:
    return json.dumps(report, ensure_ascii=False)


# ------------------------------------------------------------------------------------------ schema
def test_report_json_validates_against_the_shipped_versioned_schema(written):
    d, paths, partner = written
    schema = load_schema()
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for p in (paths.json, partner.json):
        report = json.loads(p.read_text())
        assert report["schema_version"] == SCHEMA_VERSION
        validator.validate(report)
    report = json.loads(paths.json.read_text())
    broken = copy.deepcopy(report)
    broken["checks"][0]["status"] = "fine"
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(report)
    del broken["guarantee_statement"]
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(report)
    broken["aggregation"]["is_differential_privacy"] = True  # HE / SecAgg+ are never DP
    assert not validator.is_valid(broken)


# ------------------------------------------------------------------------------------------ numbers
def test_every_epsilon_in_the_report_is_the_accountants_recomputation_from_the_ledger(written):
    d, paths, _ = written
    memo = {}

    def epsilon(history, delta, accountant, _real=accounting.epsilon):  # privacy.accounting's, memoised here only
        key = (tuple(history), delta, accountant)
        if key not in memo:
            memo[key] = _real(history, delta, accountant)
        return memo[key]

    report = json.loads(paths.json.read_text())
    produced = set()
    for h in report["hospitals"]:
        entries = PrivacyLedger(ledger_path(d, h["hospital"])).entries()
        plan = next(e for e in entries if e["event"] == "dp_plan")
        rounds = [e for e in entries if e["event"] == "dp_round"]
        hist = [Step(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rounds]
        a, m = h["accounting"], h["mechanism"]
        eps = epsilon(hist, plan["delta"], plan["accountant"])
        assert a["epsilon_spent"] == pytest.approx(eps, rel=1e-12)
        assert a["epsilon_spent"] == pytest.approx(rounds[-1]["epsilon"], rel=1e-9)  # what the ledger recorded
        assert a["delta"] == plan["delta"] and a["epsilon_budget"] == plan["target_epsilon"]
        assert a["epsilon_remaining"] == pytest.approx(plan["target_epsilon"] - eps, rel=1e-12)
        assert a["gdp_mu"] == pytest.approx(gdp_mu(hist), rel=1e-12)
        ind = independent_epsilon(hist, plan["delta"], "pld")
        assert a["independent_recomputation"]["epsilon"] == pytest.approx(ind, rel=1e-12)
        assert a["independent_recomputation"]["relative_difference"] == pytest.approx((ind - eps) / eps, rel=1e-9)
        assert m["noise_multiplier"] == plan["noise_multiplier"] and m["n_records"] == plan["n_records"]
        assert m["steps_total"] == sum(e["steps"] for e in rounds)
        assert a["delta_lt_1_over_n"] is True and a["one_over_n"] == pytest.approx(1 / plan["n_records"])
        full = [Step(plan["noise_multiplier"], q, n) for q, n in plan["round_schedule"]] * plan["rounds"]
        assert a["planned_epsilon"] == pytest.approx(epsilon(full, plan["delta"], plan["accountant"]), rel=1e-12)
        for x in a["epsilon_by_round"]:
            prefix = [Step(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rounds if e["round"] <= x["round"]]
            assert x["epsilon"] == pytest.approx(epsilon(prefix, plan["delta"], plan["accountant"]), rel=1e-12)
            rec = json.loads((d / "metrics" / f"round_{x['round']:03d}.json").read_text())
            assert x["epsilon"] == pytest.approx(rec["clients"][h["hospital"]]["epsilon-spent"], rel=1e-9)
            produced.add(x["epsilon"])
        produced |= {a["epsilon_spent"], a["planned_epsilon"], ind}
        p = a.get("patient_level")
        if p:  # group privacy of the accountant's epsilon, for a patient with k records
            want = accounting.group_privacy_epsilon(eps, plan["delta"], p["max_records_per_patient"])
            assert (p["epsilon"], p["delta"]) == pytest.approx(want, rel=1e-12)
            produced.add(p["epsilon"])
    # no epsilon anywhere in the report that the accountants did not produce
    found = []

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k if k not in ("min", "median", "max") else key)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, float) and key in ("epsilon", "epsilon_spent", "planned_epsilon", "projected_epsilon"):
            found.append(node)

    walk({k: v for k, v in report.items() if k != "glossary"})
    assert found and all(any(math.isclose(x, p, rel_tol=1e-12) for p in produced) for x in found)
    # utility figures are the summary's
    summary = json.loads((d / "summary.json").read_text())
    for t in report["utility"]["tasks"]:
        if t["client_model"]:
            for k, v in t["client_model"].items():
                assert v == summary["federated_test"][t["task"]][k]
        for c, m in (t["single_hospital"] or {}).items():
            assert m["auroc"] == summary["single_hospital_test"][c][t["task"]]["auroc"]


def test_a_clean_run_passes_its_integrity_rules_and_says_what_is_not_covered(written):
    d, paths, _ = written
    report = json.loads(paths.json.read_text())
    for name in ("ledger_verified", "budget_respected", "delta_below_1_over_n", "server_secret_key", "dp_label_has_accountant",
                 "epsilon_recomputed", "epsilon_tier", "sampling_assumption", "config_hash", "secure_aggregation", "he_parameters"):
        assert status_of(report, name)["status"] == "pass", status_of(report, name)
    assert report["aggregation"]["server_has_secret_key"] is False
    assert report["aggregation"]["ckks"]["security_level"].startswith("128")
    # no audit: attention, said in words
    audit = status_of(report, "audit_run")
    assert audit["status"] == "attention" and "audit not run" in audit["reason"]
    assert report["status"]["overall"] == "attention"
    text = report["guarantee_statement"]["text"]
    assert "public split" in text and "does not cover" in text
    assert re.search(r"confidentiality, not differential privacy", text)
    assert "does not certify" in report["summary"]["plain_language"]
    assert set(report["provenance"]["ledger_heads"]) == set(CLIENTS)
    for c in CLIENTS:
        assert report["provenance"]["ledger_heads"][c] == PrivacyLedger(ledger_path(d, c)).head()


# ------------------------------------------------------------------------------------------ status rules
def test_delta_at_least_one_over_n_fails(copy_run):
    run = copy_run()
    rewrite_ledger(ledger_path(run, "switzerland"), lambda ev, b: {**b, "delta": 0.05} if "delta" in b else b)
    sync_metrics(run, "switzerland")
    report = build_report(run)
    check = status_of(report, "delta_below_1_over_n")
    assert check["status"] == "fail" and "switzerland" in check["reason"] and "1/n" in check["reason"]
    assert status_of(report, "epsilon_recomputed")["status"] == "pass"
    assert report["status"]["overall"] == "fail"
    swiss = next(h for h in report["hospitals"] if h["hospital"] == "switzerland")
    assert swiss["accounting"]["delta_lt_1_over_n"] is False


def test_an_edited_ledger_line_fails_and_no_epsilon_is_printed_for_it(copy_run):
    run = copy_run()
    p = ledger_path(run, "hungary")
    lines = p.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["steps"] = 1  # understate the spend, leave the hash
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")
    report = build_report(run)
    check = status_of(report, "ledger_verified")
    assert check["status"] == "fail"
    assert "clients/hungary/ledger.jsonl" in check["reason"] and "line 2 (seq 1)" in check["reason"]
    hungary = next(h for h in report["hospitals"] if h["hospital"] == "hungary")
    assert hungary["accounting"] is None and hungary["ledger"]["verified"] is False
    assert "no epsilon can be stated" in report["guarantee_statement"]["text"]


def test_a_rechained_ledger_with_a_changed_epsilon_fails_the_recomputation(copy_run):
    run = copy_run()
    p = ledger_path(run, "cleveland")
    entries = PrivacyLedger(p).entries()
    p.unlink()
    ledger = PrivacyLedger(p)
    for e in entries:  # a valid chain, but the last round's recorded epsilon is not the accountant's
        body = {k: v for k, v in e.items() if k not in ("seq", "prev_hash", "time", "hash", "event")}
        if e is entries[-1]:
            body["epsilon"] = body["epsilon"] / 2
        ledger.append(e["event"], **body)
    check = status_of(build_report(run), "epsilon_recomputed")
    assert check["status"] == "fail" and "clients/cleveland/ledger.jsonl" in check["reason"]
    assert f"seq {len(entries) - 1}" in check["reason"]


def test_a_spend_over_the_budget_fails(copy_run):
    run = copy_run()
    rewrite_ledger(ledger_path(run, "va_long_beach"), lambda ev, b: {**b, "target_epsilon": 5.0} if "target_epsilon" in b else b)
    check = status_of(build_report(run), "budget_respected")
    assert check["status"] == "fail" and "va_long_beach" in check["reason"] and "budget 5" in check["reason"]


def test_epsilon_above_ten_needs_attention(copy_run):
    """A hospital planned for a budget of 12 through the real mechanism (HospitalDP, RDP accountant)."""
    run = copy_run()
    p = ledger_path(run, "cleveland")
    old = PrivacyLedger(p).entries()
    plan = next(e for e in old if e["event"] == "dp_plan")
    p.unlink()
    dp = HospitalDP(PrivacyProfile(target_epsilon=12.0, accountant="rdp"), PrivacyLedger(p), plan["run_id"],
                    plan["round_schedule"], plan["rounds"], n_records=plan["n_records"])
    for e in old:
        if e["event"] == "dp_round":
            dp.record_round(e["round"], e["task"], e["steps"], e["sample_rate"])
    sync_metrics(run, "cleveland")
    report = build_report(run)
    check = status_of(report, "epsilon_tier")
    assert check["status"] == "attention" and "cleveland" in check["reason"]
    a = next(h for h in report["hospitals"] if h["hospital"] == "cleveland")["accounting"]
    assert 10 < a["epsilon_spent"] <= 12 and a["accountant"] == "rdp"
    assert a["independent_recomputation"]["method"] == "rdp"
    assert status_of(report, "budget_respected")["status"] == "pass"
    assert status_of(report, "epsilon_recomputed")["status"] == "pass"


#: the fields every canary row of audit.json has (secure_fedkim.audit_schema.DP_AUDIT_ROW) that a test does not set
CANARY_ROW = {"kind": "ood", "mode": "one_run", "trials": 1, "dp": True, "canary_auc": 0.5, "confidence": 0.95,
              "eps_accountant": None}


def test_audit_lower_bound_above_the_accountant_fails_and_mia_at_low_fpr_needs_attention(copy_run, roc_png):
    run = copy_run()
    (run / "audit").mkdir()
    hist = {"percentile_among_nonmembers_bins": [0.0, 0.5, 1.0], "member_counts": [400, 600]}
    audit = {  # the layout attacks.audit.audit_run writes
        "schema": "secure-fedkim-audit/1",
        "accountant": {c: {"epsilon": 7.9, "delta": 1e-5} for c in CLIENTS},
        "mia": [
            {"attack": "loss", "target": "hungary", "target_kind": "local", "task": "heart_disease", "auc": 0.61,
             "auc_ci95": [0.55, 0.67], "tpr_at_fpr": {"0.01": 0.05, "0.001": 0.012}, "n_members": 1000,
             "n_nonmembers": 1000, "top_exposed": [{"hospital": "hungary", "shard_index": 17, "score": 3.2}],
             "per_record_exposure": hist, "roc_png": "roc_hungary_heart_disease.png"},
            {"attack": "rmia", "target": "global", "target_kind": "global", "task": "heart_disease", "auc": 0.52,
             "auc_ci95": [0.48, 0.56], "tpr_at_fpr": {"0.001": 0.001}, "n_members": 1000, "n_nonmembers": 1000,
             "roc_png": "roc_global_heart_disease.png"},
            {"attack": "loss", "target": "switzerland", "target_kind": "local", "task": "heart_disease", "auc": 0.57,
             "auc_ci95": [0.5, 0.64], "tpr_at_fpr": {"0.001": 0.0}, "n_members": 200, "n_nonmembers": 200,
             "roc_png": "roc_switzerland_heart_disease.png"},
        ],
        "dp_audit": [
            {**CANARY_ROW, "hospital": "hungary", "task": "heart_disease", "canaries": 100, "eps_lb": 9.5,
             "eps_lb_one_run": 2.0, "eps_accountant": 7.9, "consistent_with_accountant": False},
            {**CANARY_ROW, "hospital": "cleveland", "task": "heart_disease", "canaries": 100, "eps_lb": 0.4,
             "eps_accountant": 7.9, "consistent_with_accountant": True},
        ],
        "reconstruction": [{"update": "plain", "visible": False, "relative_mse": 0.01, "cosine": 0.99, "hospital": "hungary",
                            "task": "heart_disease", "shard_index": 4}],
        "skipped": [{"what": "mia lira_online on switzerland/heart_disease", "why": "too few candidates"}],
    }
    for png in ("roc_hungary_heart_disease.png", "roc_global_heart_disease.png", "roc_switzerland_heart_disease.png"):
        shutil.copy(roc_png, run / "audit" / png)
    (run / "audit" / "audit.json").write_text(json.dumps(audit))
    report = build_report(run)
    assert status_of(report, "audit_run")["status"] == "pass"
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "fail" and "hungary" in check["reason"] and "9.5" in check["reason"]
    mia = status_of(report, "mia_low_fpr")
    assert mia["status"] == "attention" and "hungary" in mia["reason"] and "rmia" not in mia["reason"]
    rows = {(m["hospital"], m["attack"]): m for m in report["audit"]["mia"]}
    assert rows[("hungary", "loss")]["auc"] == 0.61 and rows[("hungary", "loss")]["tpr_at_fpr"]["0.001"] == 0.012
    assert rows[("hungary", "loss")]["per_record_exposure"] == hist
    assert rows[(None, "rmia")]["target"] == "global"
    assert {r["path"]: r["hospital"] for r in report["audit"]["roc_images"]}["audit/roc_switzerland_heart_disease.png"] == "switzerland"
    text = all_text(report)
    assert "top_exposed" not in text and "shard_index" not in text  # no record ids leave the audit
    # the partner report of cleveland keeps hungary's audit in aggregate only
    part = build_report(run, partner="cleveland")
    assert "hungary" not in all_text(part) and "switzerland" not in all_text(part)
    assert [r["path"] for r in part["audit"]["roc_images"]] == ["audit/roc_global_heart_disease.png"]
    assert part["audit"]["other_hospitals"]["dp_audits"] == 1 and part["audit"]["skipped"] == []
    assert status_of(part, "audit_consistent_with_accountant")["status"] == "fail"  # still flagged, unnamed
    # a consistent audit passes
    audit["dp_audit"][0].update(eps_lb=1.0, consistent_with_accountant=True)
    audit["mia"][0]["tpr_at_fpr"]["0.001"] = 0.002
    (run / "audit" / "audit.json").write_text(json.dumps(audit))
    report = build_report(run)
    assert status_of(report, "audit_consistent_with_accountant")["status"] == "pass"
    assert status_of(report, "mia_low_fpr")["status"] == "pass"


def test_key_custody_rules(copy_run):
    run = copy_run()
    kh = run / "keyholder" / "ledger.jsonl"
    lines = kh.read_text().splitlines()
    kh.write_text("\n".join(lines[:-1]) + "\n")  # still a valid chain, but round 2 has no key-holder decryption
    report = build_report(run)
    check = status_of(report, "server_secret_key")
    assert check["status"] == "fail" and "round(s) [2]" in check["reason"]
    assert report["aggregation"]["server_has_secret_key"] is None
    run2 = copy_run("run2")
    s = json.loads((run2 / "summary.json").read_text())
    s["aggregation"]["ckks"]["server_has_secret_key"] = True
    (run2 / "summary.json").write_text(json.dumps(s))
    report = build_report(run2)
    assert status_of(report, "server_secret_key")["status"] == "fail"
    assert report["aggregation"]["server_has_secret_key"] is True


def test_dp_label_without_an_accountant_fails(copy_run):
    run = copy_run()
    ledger_path(run, "switzerland").unlink()
    check = status_of(build_report(run), "dp_label_has_accountant")
    assert check["status"] == "fail" and "switzerland" in check["reason"]
    run2 = copy_run("run2")
    rewrite_ledger(ledger_path(run2, "hungary"), lambda ev, b: {**b, "noise_multiplier": 0.0, "dp": False}
                   if ev == "dp_plan" else b)
    check = status_of(build_report(run2), "dp_label_has_accountant")
    assert check["status"] == "fail" and "hungary" in check["reason"] and "clipping without noise" in check["reason"]


def test_poisson_assumed_but_not_used_needs_attention(copy_run):
    run = copy_run()
    rewrite_ledger(ledger_path(run, "hungary"), lambda ev, b: {**b, "sampling": "shuffle"} if "sampling" in b else b)
    report = build_report(run)
    check = status_of(report, "sampling_assumption")
    assert check["status"] == "attention" and "hungary" in check["reason"] and "shuffle" in check["reason"]
    a = next(h for h in report["hospitals"] if h["hospital"] == "hungary")["accounting"]
    assert a["assumptions"]["assumptions_hold"] is False


def test_record_level_unit_with_several_records_per_patient_needs_attention(copy_run):
    run = copy_run()
    cfg_path = run / "resolved_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert status_of(build_report(run), "privacy_unit")["status"] == "attention"  # unknown: no ids, no bound
    cfg["privacy"]["max_records_per_patient"] = 3
    cfg_path.write_text(json.dumps(cfg))
    report = build_report(run)
    check = status_of(report, "privacy_unit")
    assert check["status"] == "attention" and "up to 3 records" in check["reason"]
    a = report["hospitals"][0]["accounting"]
    assert a["patient_level"]["epsilon"] == pytest.approx(3 * a["epsilon_spent"])
    assert a["patient_level"]["delta"] == pytest.approx(min(1.0, 3 * math.exp(2 * a["epsilon_spent"]) * a["delta"]))
    cfg["privacy"]["max_records_per_patient"] = 1
    cfg_path.write_text(json.dumps(cfg))
    report = build_report(run)
    assert status_of(report, "privacy_unit")["status"] == "pass"
    assert "also a patient-level guarantee" in report["guarantee_statement"]["text"]


def test_secagg_dropout_at_the_threshold_and_plain_aggregation_need_attention(copy_run):
    run = copy_run()
    cfg = json.loads((run / "resolved_config.json").read_text())
    cfg["federation"]["aggregation"] = "secagg"
    cfg["federation"]["secagg"].update(num_shares=3, reconstruction_threshold=2)
    (run / "resolved_config.json").write_text(json.dumps(cfg))
    rec = json.loads((run / "metrics" / "round_002.json").read_text())
    del rec["clients"]["va_long_beach"]  # one hospital dropped out of round 2
    (run / "metrics" / "round_002.json").write_text(json.dumps(rec))
    report = build_report(run)
    check = status_of(report, "secagg_dropout_margin")
    assert check["status"] == "attention" and "lost 1" in check["reason"]
    assert report["aggregation"]["secagg"]["dropouts_tolerated"] == 1
    cfg["federation"]["aggregation"] = "plain"
    (run / "resolved_config.json").write_text(json.dumps(cfg))
    report = build_report(run)
    assert status_of(report, "secure_aggregation")["status"] == "attention"
    assert status_of(report, "server_secret_key")["status"] == "not_applicable"


def test_a_changed_config_fails(copy_run):
    run = copy_run()
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "# edited\n")
    check = status_of(build_report(run), "config_hash")
    assert check["status"] == "fail" and "config.yaml" in check["reason"]


def test_no_differential_privacy_is_said_and_no_epsilon_printed(copy_run):
    run = copy_run()
    cfg = json.loads((run / "resolved_config.json").read_text())
    cfg["privacy"].update(dp=False, profile=None, hospitals={})
    (run / "resolved_config.json").write_text(json.dumps(cfg))
    for c in CLIENTS:
        ledger_path(run, c).unlink()
    for p in (run / "metrics").glob("round_*.json"):
        rec = json.loads(p.read_text())
        for st in rec.get("clients", {}).values():
            st.pop("epsilon-spent", None)
            st.pop("noise-multiplier", None)
        p.write_text(json.dumps(rec))
    report = build_report(run)
    assert report["privacy_definition"]["dp"] is False
    assert report["privacy_definition"]["dp_setting"] == "no differential privacy"
    assert "no differential privacy" in report["guarantee_statement"]["text"].lower()
    lead = report["summary"]["plain_language"].split(". ")[0]  # the first line says it
    assert lead.startswith("Overall status: FAIL (do not release)") and "used no differential privacy" in lead
    assert report["status"]["overall"] == "fail" and report["summary"]["first_page"]["decision"] == "do not release"
    # every DP-dependent check and regulatory row fails; checks with nothing behind them are not applicable
    from secure_fedkim.report.checks import CHECKS
    from secure_fedkim.report.text import DP_ROWS

    for name in [c.name for c in CHECKS if c.needs_dp]:
        assert status_of(report, name)["status"] == "fail", status_of(report, name)
    assert {r["framework"] for r in report["regulatory_mapping"] if r["status"] == "fail"} >= DP_ROWS
    ehds = next(r for r in report["regulatory_mapping"] if r["framework"].startswith("EHDS"))
    assert "NOT differentially private" in ehds["note"] and "DP-trained aggregates" not in ehds["note"]
    assert not [r for r in report["regulatory_mapping"] if r["status"] == "pass" and not r["checks"]]
    ledger = status_of(report, "ledger_verified")  # the key holder's ledger is still behind it (he mode)
    assert ledger["status"] == "pass"
    assert all(h["accounting"] is None and h["mechanism"] is None for h in report["hospitals"])
    assert report["plots"]["epsilon_by_round"] is None
    assert report["aggregation"]["is_differential_privacy"] is False
    assert "it is not differential privacy" in report["guarantee_statement"]["text"]


# ------------------------------------------------------------------------------------------ partner
def test_partner_report_has_no_other_partners_figures(written):
    d, fed, part = written
    report = json.loads(part.json.read_text())
    html_text = part.html.read_text()
    federation = json.loads(fed.json.read_text())
    others = [c for c in CLIENTS if c != "hungary"]
    for text in (part.json.read_text(), html_text):
        for c in others:
            assert c not in text, f"{c} appears in the hungary partner report"
        assert "hungary" in text
    # and no other hospital's per-hospital figure shows up as a value, except as a min/median/max over them
    leaves = []

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        else:
            leaves.append(node)

    walk(report)
    mine = {h["hospital"]: h for h in federation["hospitals"]}
    aggregate = set()  # no aggregate over the others carries any of their values
    own = mine["hungary"]
    for c in others:
        assert mine[c]["ledger"]["head"] not in leaves
        for field, v in (("n_records", mine[c]["mechanism"]["n_records"]), ("epsilon_spent", mine[c]["accounting"]["epsilon_spent"]),
                         ("gdp_mu", mine[c]["accounting"]["gdp_mu"]),
                         ("independent", mine[c]["accounting"]["independent_recomputation"]["epsilon"]),
                         ("round 1", mine[c]["accounting"]["epsilon_by_round"][0]["epsilon"])):
            own_values = {own["mechanism"]["n_records"], own["accounting"]["epsilon_spent"], own["accounting"]["gdp_mu"],
                          own["accounting"]["independent_recomputation"]["epsilon"],
                          own["accounting"]["epsilon_by_round"][0]["epsilon"]}
            assert v not in leaves or v in aggregate or v in own_values, f"{c}'s {field} {v} is in the partner report"
    assert [h["hospital"] for h in report["hospitals"]] == ["hungary"]
    assert report["other_hospitals"]["count"] == 3 and report["other_hospitals"]["stats_shown"]
    eps = sorted(mine[c]["accounting"]["epsilon_total"] for c in others)  # a coarse band around exactly the others
    band = report["other_hospitals"]["epsilon_total"]
    assert band["low"] <= eps[0] and eps[2] <= band["high"] and band["low"] == math.floor(band["low"])
    assert report["plots"]["epsilon_by_round"]["others"] is None
    assert report["hospitals"][0]["accounting"] == mine["hungary"]["accounting"]
    pytest.importorskip("pypdf")
    from pypdf import PdfReader

    pdf_text = " ".join(page.extract_text() for page in PdfReader(str(part.pdf)).pages)
    assert "hungary" in pdf_text and not any(c in pdf_text for c in others)


def test_build_reads_only_and_write_refuses_a_report_that_does_not_fit_the_schema(copy_run, monkeypatch):
    run = copy_run()
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    report = build_report(run)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    from secure_fedkim.report import render

    broken = copy.deepcopy(report)
    broken["status"]["overall"] = "great"
    monkeypatch.setattr(render, "build_report", lambda *a, **k: copy.deepcopy(broken))
    with pytest.raises(jsonschema.ValidationError):
        write_report(run)
    assert not (run / "report.json").exists() and not (run / "report.sig").exists()


def test_unknown_partner_is_refused(run_dir):
    with pytest.raises(ValueError, match="not a hospital"):
        build_report(run_dir, partner="nowhere")


# ------------------------------------------------------------------------------------------ integrity
def test_signature_and_keys(written, issuer_key):
    d, fed, part = written
    assert issuer_key.stat().st_mode & 0o777 == 0o600 and not issuer_key.resolve().is_relative_to(d.resolve())
    assert not (d / "report_signing").exists()  # no report-signing key is made in the run directory
    from secure_fedkim.report.sign import fingerprint, load_public_key

    fp = fingerprint(load_public_key(public_key_path(issuer_key)))
    for p in (fed, part):
        assert verify(p.json) == []
        data = p.json.read_bytes()
        assert b"PRIVATE KEY" not in data
        assert len(p.sig.read_bytes()) == 64
        signer = json.loads(data)["provenance"]["signature"]["signer"]
        assert signer == {"name": "Ada Example", "organisation": "Test Federation Office", "public_key_sha256": fp}
        assert "Ada Example" in p.html.read_text()
    assert verify_report(fed.json)[0].startswith("report.json: no issuer public key given")
    if shutil.which("openssl"):
        res = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_key_path(issuer_key)), "-rawin",
                              "-in", "report.json", "-sigfile", "report.sig"], cwd=d, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def _fresh(written, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    return d


def test_verify_names_one_changed_byte_of_the_report(written, tmp_path):
    d = _fresh(written, tmp_path)
    p = d / "report.json"
    data = bytearray(p.read_bytes())
    i = data.index(b'"federation_name"') + len(b'"federation_name": "')
    data[i] ^= 0x01
    p.write_bytes(bytes(data))
    msgs = verify(p)
    assert msgs and msgs[0].startswith("report.json: the Ed25519 signature in report.sig does not verify")


def test_verify_names_one_changed_ledger_entry(written, tmp_path):
    d = _fresh(written, tmp_path)
    p = ledger_path(d, "switzerland")
    lines = p.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["sample_rate"] = entry["sample_rate"] / 2
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")
    msgs = verify(d / "report.json")
    assert any(m.startswith("clients/switzerland/ledger.jsonl: does not verify: line 3 (seq 2)") for m in msgs), msgs
    # the partner report of another hospital says a ledger it commits to changed, without naming it
    pm = verify(d / "report_hungary.json")
    assert any("other_hospitals_ledger_heads_sha256" in m for m in pm) and not any("switzerland" in m for m in pm)


def test_verify_names_a_ledger_rewritten_with_a_fresh_chain(written, tmp_path):
    d = _fresh(written, tmp_path)  # a valid chain on its own: only the report's recorded head shows the rewrite
    rewrite_ledger(ledger_path(d, "cleveland"), lambda ev, b: {**b, "steps": b["steps"] - 1} if ev == "dp_round" else b,
                   recompute=False)
    msgs = verify(d / "report.json")
    assert any(m.startswith("clients/cleveland/ledger.jsonl: chain head") and "provenance.ledger_heads.cleveland" in m
               for m in msgs), msgs


def test_verify_names_entries_appended_after_the_report(written, tmp_path):
    d = _fresh(written, tmp_path)
    n = len(PrivacyLedger(ledger_path(d, "hungary")).entries())
    PrivacyLedger(ledger_path(d, "hungary")).append("refused", run_id="later", round=9, reason="policy")
    msgs = verify(d / "report_hungary.json")
    assert msgs == [f"clients/hungary/ledger.jsonl: 1 entry appended after the report (seq {n} to {n}); head now "
                    f"{PrivacyLedger(ledger_path(d, 'hungary')).head()}, the report's provenance.ledger_heads.hungary is "
                    f"{json.loads((d / 'report_hungary.json').read_text())['provenance']['ledger_heads']['hungary']}"]


def test_verify_recomputes_epsilons_and_names_the_field(written, tmp_path, monkeypatch):
    """The report's own numbers are checked against the accountants, not only its hash."""
    d = _fresh(written, tmp_path)
    from secure_fedkim.report import collect

    real = collect.account
    monkeypatch.setattr(collect, "account", lambda h, delta, acc: real(h, delta, acc) * 1.01)  # a different accountant
    msgs = verify(d / "report.json")
    assert any(m.startswith("hospitals[cleveland].accounting.epsilon_spent: the report says") for m in msgs), msgs


def test_verify_names_one_changed_artifact(written, tmp_path):
    d = _fresh(written, tmp_path)
    p = d / "model" / "client_model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    msgs = verify(d / "report.json")
    assert msgs == [m for m in msgs if m.startswith("model/client_model.safetensors: sha256")] and len(msgs) == 1
    (d / "audit").mkdir()
    (d / "audit" / "audit.json").write_text("{}")
    assert any(m.startswith("audit/audit.json: present in the run but not in the report") for m in verify(d / "report.json"))


def test_verify_with_another_public_key_fails(written, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key()
    msgs = verify_report(written[1].json, public_key=other)
    assert any("does not verify under the given public key" in m for m in msgs)


# ------------------------------------------------------------------------------------------ rendering
def test_no_patient_values_or_ids_in_the_report(written):
    d, fed, part = written
    report = json.loads(fed.json.read_text())
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            keys.update(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(report)
    assert not keys & {"id", "ids", "member_ids", "top_exposed", "x", "records_values", "group"}
    for t in report["data_inventory"]["tasks"]:
        for h in t["hospitals"].values():
            for k in ("records", "positives"):
                assert h[k] in ("<10", "suppressed") or (isinstance(h[k], int) and h[k] >= 10)


def test_pdf_has_pages_that_render(written, tmp_path):
    pdf = written[1].pdf
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True, timeout=120)
        pages = sorted(tmp_path.glob("page-*.png"))
        assert len(pages) >= 5
        from PIL import Image, ImageStat

        assert max(ImageStat.Stat(Image.open(p).convert("L")).stddev[0] for p in pages) > 10  # not blank
    else:  # no renderer here: count the page objects fpdf2 wrote (uncompressed page dictionaries)
        assert len(re.findall(rb"/Type\s*/Page\b", data)) >= 5
        assert data.rstrip().endswith(b"%%EOF")


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no /usr/bin/chromium to render the HTML headless")
def test_html_renders_in_headless_chromium(written, tmp_path):
    page = written[1].html
    text = page.read_text()
    assert "<img" in text and "data:image/png;base64," in text and "http://" not in text and "https://" not in text
    shot = tmp_path / "report.png"
    subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file()
    from PIL import Image, ImageStat

    im = Image.open(shot).convert("L")
    assert im.size == (1200, 2400) and ImageStat.Stat(im).stddev[0] > 10


# ================================================================================= issue #16: reports to rely on
# Status rules that fail what should fail, every released DP spend composed, partner views that reveal no other
# hospital, signatures bound to the issuer's key and to the HTML/PDF people read, a first page with a decision.


def history(path: Path) -> tuple[list[Step], dict]:
    entries = PrivacyLedger(path).entries()
    plan = next(e for e in entries if e["event"] == "dp_plan")
    return [Step(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["event"] == "dp_round"], plan


def add_dp_baselines(run: Path) -> None:
    """What a run with `baseline: {single_hospital: true}` and DP leaves: each hospital's baseline trained on the
    same records under the same schedule, noise and budget (a ledger of its own), its test metrics released."""
    cfg = json.loads((run / "resolved_config.json").read_text())
    cfg["baseline"]["single_hospital"] = True
    (run / "resolved_config.json").write_text(json.dumps(cfg))
    summary = json.loads((run / "summary.json").read_text())
    summary["single_hospital_test"] = {}
    for c in CLIENTS:
        (run / "baseline" / c).mkdir(parents=True)
        shutil.copy(ledger_path(run, c), run / "baseline" / c / "ledger.jsonl")
        summary["single_hospital_test"][c] = {"heart_disease": {"accuracy": 0.7, "auroc": 0.75, "n": 60}}
    (run / "summary.json").write_text(json.dumps(summary))


def resign(path: Path, key_path: Path, report: dict) -> None:
    """Re-write a report's JSON and both signatures with ``key_path`` (what someone holding that key can do)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    data = (json.dumps(report, indent=2) + "\n").encode()
    path.write_bytes(data)
    path.with_suffix(".sig").write_bytes(key.sign(data))
    files = manifest({p.name: p.read_bytes() for p in (path, path.with_suffix(".html"), path.with_suffix(".pdf"))})
    path.with_suffix(".sha256").write_bytes(files)
    path.with_suffix(".sha256.sig").write_bytes(key.sign(files))


# ------------------------------------------------------------------------------------------ status rules
def write_audit(run: Path, audit: dict) -> None:
    """audit.json with ``audit``'s parts, under the schema id the audit writes (unless ``audit`` names one)."""
    (run / "audit").mkdir(exist_ok=True)
    (run / "audit" / "audit.json").write_text(json.dumps({"schema": "secure-fedkim-audit/1", **audit}))


MIA = {"attack": "loss", "target": "global", "target_kind": "global", "task": "heart_disease", "auc": 0.52,
       "auc_ci95": [0.45, 0.6], "tpr_at_fpr": {"0.01": 0.02}, "n_members": 100, "n_nonmembers": 100,
       "threat_model": "black-box final model"}


def test_measured_leakage_is_attention_or_fail_by_its_interval(copy_run):
    run = copy_run()
    write_audit(run, {"mia": [dict(MIA, p_value=0.3, p_adjusted=0.9, significant=False, auc_ci=[0.45, 0.6])]})
    report = build_report(run)
    assert status_of(report, "measured_leakage")["status"] == "pass"
    # significant (Holm-adjusted) with the interval's lower bound below report.mia_auc_fail (0.65): attention
    write_audit(run, {"mia": [dict(MIA, auc=0.61, p_value=0.001, p_adjusted=0.004, significant=True, auc_ci=[0.55, 0.67])]})
    check = status_of(build_report(run), "measured_leakage")
    assert check["status"] == "attention" and "0.55 to 0.67" in check["reason"]
    # the non-private demo's AUC 0.787 (0.66-0.90): fail; an old audit.json (no p-values) is judged by its interval
    write_audit(run, {"mia": [dict(MIA, auc=0.787, auc_ci95=[0.66, 0.90])]})
    report = build_report(run)
    check = status_of(report, "measured_leakage")
    assert check["status"] == "fail" and "0.787" in check["reason"] and report["status"]["overall"] == "fail"
    assert report["summary"]["first_page"]["worst_leakage"]["auc_ci"] == [0.66, 0.90]
    assert "0.66 to 0.9" in report["summary"]["first_page"]["worst_leakage_text"]
    # nothing behind the check: not applicable, never pass
    write_audit(run, {"mia": [], "skipped": [{"what": "mia", "why": "too few records"}]})
    assert status_of(build_report(run), "measured_leakage")["status"] == "not_applicable"


def test_a_hazard_with_no_check_behind_it_is_never_pass(written):
    _, paths, _ = written
    report = json.loads(paths.json.read_text())
    unchecked = [h for h in report["hazards"] if not h["checks"]]
    assert unchecked, "the hazard list has rows handled by construction"
    assert all(h["status"] == "not_applicable" and h["how_checked"].startswith("by construction") for h in unchecked)
    assert all(h["status"] != "pass" for h in report["hazards"] if not h["checks"])


def test_audit_verdicts_inconsistent_fails_and_inconclusive_is_never_pass(copy_run):
    run = copy_run()
    inconclusive = {**CANARY_ROW, "hospital": "cleveland", "task": "heart_disease", "canaries": 200, "eps_lb": 0.3,
                    "eps_lb_one_run": 0.3,
                    "status": "inconclusive", "max_certifiable_epsilon": 4.19, "accountant_epsilon": 7.9, "delta": 1e-5,
                    "ratio": 0.04, "threat_model": "black-box final model",
                    "reasons": ["the claimed epsilon 7.9 is above the largest epsilon 4.19 that 200 canaries can certify"]}
    write_audit(run, {"dp_audit": [inconclusive]})
    report = build_report(run)
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "inconclusive" and "4.19" in check["reason"] and "cleveland" in check["reason"]
    assert report["status"]["overall"] != "pass" and report["summary"]["first_page"]["decision"] != "release"
    whitebox = {"hospital": "hungary", "task": "heart_disease", "canaries": 1000, "eps_lb_one_run": 12.5,
                "gdp_mu_estimate": 9.0, "gdp_mu_interval": [7.5, 10.2], "accountant_gdp_mu": 1.6, "status": "inconsistent",
                "reasons": ["Gaussian-DP mu interval [7.5, 10.2] lies above the accountant's 1.6 (noise x0.25?)"],
                "checks": [{"name": "mu", "passed": False, "detail": "above"}], "threat_model": "white-box every step",
                "accountant_epsilon": 7.9, "accountant_epsilon_audited_steps": 1.25,
                "eps_lb_one_run_method": "f-DP one run, Gaussian trade-off (Mahloujifar, Melis and Chaudhuri 2025)"}
    mechanism = {"hospital": "switzerland", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "trials": 20000,
                 "mu_configured": 0.9, "mu_estimate": 0.91, "mu_interval": [0.85, 0.97], "status": "consistent",
                 "reasons": [], "threat_model": "white-box one step"}
    write_audit(run, {"dp_audit": [inconclusive], "whitebox": [whitebox], "mechanism": [mechanism]})
    report = build_report(run)
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "fail" and "hungary" in check["reason"] and "white-box" in check["reason"]
    assert "mu interval [7.5, 10.2]" in check["reason"]
    assert {e["kind"] for e in report["audit"]["consistency"]} == {"dp_audit", "whitebox", "mechanism"}
    wb = next(e for e in report["audit"]["consistency"] if e["kind"] == "whitebox")
    # checked against the replayed steps' epsilon, not the whole run's; the bound names its method
    assert (wb["eps_lb"], wb["claim_checked"], wb["accountant_epsilon"]) == (12.5, 1.25, 7.9)
    assert wb["lower_bound_method"].startswith("f-DP one run")
    bound = status_of(report, "dp_lower_bound")  # 12.5 > report.eps_lower_bound_attention (1.0)
    assert bound["status"] == "attention" and "12.5" in bound["reason"]
    # the partner report of switzerland says that an audit failed, without naming whom
    part = build_report(run, partner="switzerland")
    assert status_of(part, "audit_consistent_with_accountant")["status"] == "fail"
    assert "hungary" not in all_text(part) and "cleveland" not in all_text(part)


def test_a_check_with_many_findings_still_renders_to_pdf(copy_run):
    """The demo's audit: 20 canary replays, each inconclusive, make one check's reason over 5,000 characters;
    fpdf refuses a table row taller than a page, so the PDF cuts the cell and points to the full text."""
    from secure_fedkim.report import render

    run = copy_run()
    entry = {**CANARY_ROW, "hospital": "cleveland", "task": "heart_disease", "canaries": 200, "eps_lb": 0.0,
             "status": "inconclusive",
             "max_certifiable_epsilon": 4.08, "accountant_epsilon": 5.33, "threat_model": "black-box final model",
             "reasons": ["the claimed epsilon 5.33 is above the largest epsilon 4.08 that 200 canaries can certify, "
                         "so this audit could not have caught a violation"]}
    write_audit(run, {"dp_audit": [dict(entry, task=f"task_{i}") for i in range(30)]})
    report = build_report(run)
    reason = status_of(report, "audit_consistent_with_accountant")["reason"]
    assert len(reason) > 2 * render.PDF_CELL_MAX and "task_29" in reason  # the JSON keeps every finding
    pdf = render.render_pdf(report, run)
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    cut = render._fits_a_page(reason)
    assert len(cut) < render.PDF_CELL_MAX + 120 and cut.endswith("the full text is in the HTML and JSON report]")
    assert render._fits_a_page("short reason") == "short reason"


# ------------------------------------------------------------------------------------------ audit.json's schema
#: one row of each part as the previous release (commit 5ecdfde) wrote them: no threat models, statuses, p-values
OLD_RELEASE_AUDIT = {
    "schema": "secure-fedkim-audit/1", "run_name": "old", "aggregation": "he", "auditor_knowledge": "black-box",
    "accountant": {"cleveland": {"epsilon": 3.9, "dp": True, "delta": 1e-5}},
    "mia": [{"attack": "loss", "auc": 0.53, "auc_ci95": [0.47, 0.59], "balanced_accuracy": 0.52,
             "tpr_at_fpr": {"0.01": 0.02, "0.001": None}, "tpr_at_fpr_note": {"0.001": "too few non-members"},
             "n_members": 60, "n_nonmembers": 60, "auc_null_std": 0.05, "top_exposed": [], "target": "cleveland",
             "target_kind": "local", "target_artifact": "hospital's final local model (encoders + heads)",
             "task": "heart_disease", "modality": "tabular", "access": "black-box (logits)", "matched_on": "site and label",
             "training_records": 80, "reference_models": 0, "reference_mode": None, "reference_dp": None,
             "per_record_exposure": {"percentile_among_nonmembers_bins": [0.0, 1.0], "member_counts": [60]},
             "roc_png": "roc_cleveland_heart_disease.png"}],
    "dp_audit": [{"canaries": 20, "kind": "ood", "mode": "one_run", "trials": 1, "training_records": 80, "dp": True,
                  "noise_multiplier": 1.1, "max_grad_norm": 1.0, "accountant": "rdp", "epochs": 4, "batch_size": 32,
                  "steps_per_training": 12, "sample_rate": 0.3, "delta": 1e-5, "confidence": 0.95, "canary_auc": 0.55,
                  "eps_lb": 0.0, "threshold": 1.2, "direction": "higher", "tpr": 0.1, "fpr": 0.1, "n_included": 10,
                  "n_excluded": 10, "eps_lb_one_run": 0.0, "one_run_guesses": 2, "one_run_correct": 1,
                  "accountant_noise_multiplier": 1.1, "eps_accountant": 2.5, "consistent_with_accountant": True,
                  "seconds": 1.5, "hospital": "cleveland", "task": "heart_disease", "ledger_epsilon": 3.9}],
    "reconstruction": [
        {"update": "plain", "visible": False, "matching_loss": 0.01, "loss": "cosine", "optimizer": "adam", "steps": 30,
         "seconds": 0.2, "mse": 0.4, "relative_mse": 0.9, "cosine": 0.3, "cosine_centered": 0.1, "hospital": "cleveland",
         "task": "heart_disease", "shard_index": 3, "model": "global model (what each client trains from)"},
        {"update": "he", "visible": False, "note": "no per-client update visible", "hospital": "cleveland",
         "task": "heart_disease", "shard_index": 3, "model": "global model (what each client trains from)"},
    ],
    "skipped": [{"what": "mia global/heart_disease", "why": "too few candidates"}],
    "seconds": 12.0,
}


def test_an_audit_json_of_the_previous_release_reads_without_a_problem(copy_run):
    from secure_fedkim.audit_schema import read_audit_json

    assert read_audit_json(OLD_RELEASE_AUDIT).problems == []  # no whitebox or mechanism part: read as empty
    run = copy_run()
    write_audit(run, OLD_RELEASE_AUDIT)
    report = build_report(run)
    assert status_of(report, "audit_run")["status"] == "pass"
    audit = report["audit"]
    assert (len(audit["mia"]), len(audit["dp_audit"]), len(audit["reconstruction"]), len(audit["skipped"])) == (1, 1, 2, 1)
    assert "shard_index" not in all_text(report) and "top_exposed" not in all_text(report)


def test_a_malformed_audit_row_is_named_and_the_other_rows_are_still_read(copy_run):
    """A row that does not follow its row type is named (part, row, field) and left out; nothing else is lost."""
    run = copy_run()
    rows = [dict(MIA, attack=a) for a in ("loss", "rmia", "lira_online")]
    del rows[1]["auc"]
    canary = {**CANARY_ROW, "hospital": "cleveland", "task": "heart_disease", "canaries": 200, "eps_lb": 0.2}
    write_audit(run, {"mia": rows, "dp_audit": [dict(canary, eps_lb="x"), canary],
                      "skipped": [{"what": "mia fm/heart_disease"}, {"what": "inversion", "why": "no global model"}]})
    report = build_report(run)
    check = status_of(report, "audit_run")
    assert check["status"] == "attention"
    assert "audit/audit.json: mia[1] lacks field 'auc'" in check["reason"]
    assert "audit/audit.json: dp_audit[0].eps_lb is not a number: 'x'" in check["reason"]
    assert "audit/audit.json: skipped[0] lacks field 'why'" in check["reason"]
    assert [m["path"] for m in report["audit"]["mia"]] == ["mia/0", "mia/2"]  # the other rows, still counted
    assert [a["path"] for a in report["audit"]["dp_audit"]] == ["dp_audit/1"]
    assert report["audit"]["skipped"] == [{"what": "inversion", "why": "no global model"}]
    assert report["summary"]["first_page"]["decision"] != "release"
    # a wrong optional field is named; its row is still read
    write_audit(run, {"mia": [dict(MIA, significant="yes")]})
    report = build_report(run)
    assert "mia[0].significant is not true or false: 'yes'" in status_of(report, "audit_run")["reason"]
    assert len(report["audit"]["mia"]) == 1 and report["audit"]["mia"][0]["significant"] is None


def test_a_malformed_row_that_reports_a_dp_bug_fails(copy_run):
    """A left-out DP-consistency row that says 'inconsistent' cannot clear the bug it reports."""
    run = copy_run()
    bug = {"hospital": "hungary", "task": "heart_disease", "threat_model": "white-box every step", "canaries": 1000,
           "status": "inconsistent", "reasons": ["the GDP mu interval lies above the accountant's"]}  # no eps_lb_one_run
    write_audit(run, {"whitebox": [bug]})
    report = build_report(run)
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "fail" and "whitebox[0] lacks field 'eps_lb_one_run'" in check["reason"]
    assert report["audit"]["consistency"] == []


def test_an_unknown_audit_schema_id_is_named_and_the_rows_are_still_read(copy_run):
    run = copy_run()
    write_audit(run, {"schema": "secure-fedkim-audit/0", "mia": [MIA]})
    report = build_report(run)
    check = status_of(report, "audit_run")
    assert check["status"] == "attention"
    assert "audit/audit.json: schema is 'secure-fedkim-audit/0', not 'secure-fedkim-audit/1'" in check["reason"]
    assert len(report["audit"]["mia"]) == 1
    (run / "audit" / "audit.json").write_text(json.dumps({"mia": [MIA]}))
    check = status_of(build_report(run), "audit_run")
    assert check["status"] == "attention" and "audit/audit.json: lacks field 'schema'" in check["reason"]
    (run / "audit" / "audit.json").write_text(json.dumps([MIA]))
    check = status_of(build_report(run), "audit_run")
    assert check["status"] == "attention" and "the top level is not an object" in check["reason"]


# ------------------------------------------------------------------------------------------ every spend counted
def test_a_released_dp_baseline_is_composed_into_the_hospitals_epsilon(copy_run):
    run = copy_run()
    add_dp_baselines(run)
    report = build_report(run)
    for h in report["hospitals"]:
        hist, plan = history(ledger_path(run, h["hospital"]))
        a = h["accounting"]
        both = hist + hist  # the baseline ran the same schedule with the same noise on the same records
        assert a["epsilon_spent"] == pytest.approx(epsilon(hist, plan["delta"], plan["accountant"]), rel=1e-12)
        assert a["epsilon_total"] == pytest.approx(epsilon(both, plan["delta"], plan["accountant"]), rel=1e-9)
        assert a["epsilon_total_pld"] == pytest.approx(independent_epsilon(both, plan["delta"], "pld"), rel=1e-9)
        assert a["epsilon_total"] > 1.3 * a["epsilon_spent"]
        assert [x["source"] for x in a["released_spends"]] == [f"clients/{h['hospital']}/ledger.jsonl",
                                                              f"baseline/{h['hospital']}/ledger.jsonl"]
    assert status_of(report, "baseline_spend_composed")["status"] == "pass"
    check = status_of(report, "budget_respected")  # composed, the records carry more than the budget of 8
    assert check["status"] == "fail" and "single-hospital baseline" in check["reason"]
    access = next(x for x in report["privacy_definition"]["covered_accesses"] if "baseline" in x["access"])
    assert access["status"] == "covered" and "composed" in access["reason"]
    assert "trained without DP" not in json.dumps(report)
    first = report["summary"]["first_page"]["hospitals"][0]
    assert first["epsilon"] == report["hospitals"][0]["accounting"]["epsilon_total"]
    # baseline metrics released but its ledger gone: fail
    shutil.rmtree(run / "baseline" / "hungary")
    check = status_of(build_report(run), "baseline_spend_composed")
    assert check["status"] == "fail" and "baseline/hungary/ledger.jsonl is missing" in check["reason"]


def test_verify_reads_every_baseline_ledger(copy_run):
    run = copy_run()
    add_dp_baselines(run)
    paths = write_report(run)
    assert verify(paths.json) == []
    before = run.parent / "before"
    shutil.copytree(run, before)
    # halve the baseline's recorded epsilon in place: the chain breaks
    p = run / "baseline" / "cleveland" / "ledger.jsonl"
    lines = p.read_text().splitlines()
    i = max(k for k, line in enumerate(lines) if json.loads(line)["event"] == "dp_round")
    entry = json.loads(lines[i])
    entry["epsilon"] /= 2
    lines[i] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")
    msgs = verify(paths.json)
    assert any(m.startswith("baseline/cleveland/ledger.jsonl: does not verify") for m in msgs), msgs
    # halve it and re-chain (a valid chain on its own): the recorded head and the recomputation both show it
    shutil.copy(before / "baseline" / "cleveland" / "ledger.jsonl", p)
    rewrite_ledger(p, lambda ev, b: {**b, "epsilon": b["epsilon"] / 2} if ev == "dp_round" else b, recompute=False)
    msgs = verify(paths.json)
    assert any(m.startswith("baseline/cleveland/ledger.jsonl: chain head") for m in msgs), msgs
    # delete baseline/: verification fails
    shutil.rmtree(run / "baseline")
    msgs = verify(paths.json)
    assert any(m.startswith("baseline/cleveland/ledger.jsonl: missing") for m in msgs), msgs


# ------------------------------------------------------------------------------------------ partner views
def _forms(v) -> set[str]:
    if isinstance(v, float):
        return {repr(v), f"{v:.4g}", f"{v:.3g}", f"{v:.6g}"}
    return {str(v)}


def test_partner_outputs_hold_no_other_hospitals_values(written):
    pytest.importorskip("pypdf")
    from pypdf import PdfReader

    d, fed, part = written
    federation = json.loads(fed.json.read_text())
    texts = {"json": part.json.read_text(), "html": part.html.read_text(),
             "pdf": " ".join(p.extract_text() for p in PdfReader(str(part.pdf)).pages)}
    by = {h["hospital"]: h for h in federation["hospitals"]}

    def values(h):
        a, m = h["accounting"], h["mechanism"]
        out = [a["epsilon_spent"], a["epsilon_total"], a["epsilon_total_pld"], a["gdp_mu"], a["gdp_mu_total"], a["epsilon_remaining"],
               a["independent_recomputation"]["epsilon"], a["planned_epsilon"], m["noise_multiplier"], h["ledger"]["head"]]
        return out + [x["epsilon"] for x in a["epsilon_by_round"]]

    own = set().union(*(_forms(v) for v in values(by["hungary"])))
    checked = 0
    for c in CLIENTS:
        if c == "hungary":
            continue
        for v in values(by[c]):
            for form in _forms(v) - own:
                checked += 1
                exact = re.compile(rf"(?<![\w.]){re.escape(form)}(?![\w])")  # the number itself, not a prefix of another
                for kind, text in texts.items():
                    assert not exact.search(text), f"{c}'s value {form} is in the hungary partner {kind}"
    assert checked > 50
    o = json.loads(texts["json"])["other_hospitals"]
    assert o["stats_shown"] and set(o["epsilon_total"]) == {"low", "high", "step"}  # a coarse band only


def test_fewer_other_hospitals_than_configured_show_no_figure(copy_run):
    run = copy_run()
    cfg = json.loads((run / "resolved_config.json").read_text())
    cfg["report"] = {"min_other_hospitals": 4}
    (run / "resolved_config.json").write_text(json.dumps(cfg))
    o = build_report(run, partner="hungary")["other_hospitals"]
    assert o["count"] == 3 and not o["stats_shown"] and o["epsilon_total"] is None and o["gdp_mu"] is None
    assert "fewer than 4" in o["stats_note"]


def test_a_partner_verifies_its_report_with_its_own_files_only(written, tmp_path):
    d = tmp_path / "partner_copy"
    shutil.copytree(written[0], d)
    for c in CLIENTS:
        if c != "hungary":
            shutil.rmtree(d / "clients" / c)  # the other hospitals' ledgers and models are not the partner's
    assert verify(d / "report_hungary.json") == []
    # its own ledger changed: named; the federation report cannot be checked without the others' ledgers
    PrivacyLedger(ledger_path(d, "hungary")).append("refused", run_id="later", round=9, reason="policy")
    msgs = verify(d / "report_hungary.json")
    assert msgs and msgs[0].startswith("clients/hungary/ledger.jsonl: 1 entry appended")


def test_partner_mismatch_messages_print_no_other_hospitals_statistics(written, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    federation = json.loads((d / "report.json").read_text())
    rewrite_ledger(ledger_path(d, "switzerland"), lambda ev, b: {**b, "steps": b["steps"] * 3} if ev == "dp_round" else b)
    sync_metrics(d, "switzerland")
    msgs = verify(d / "report_hungary.json")
    assert msgs
    swiss = next(h for h in federation["hospitals"] if h["hospital"] == "switzerland")["accounting"]
    now = build_report(d)["hospitals"][2]["accounting"]
    text = "\n".join(msgs)
    assert "switzerland" not in text
    for v in (swiss["epsilon_spent"], now["epsilon_spent"], now["gdp_mu"]):
        assert not any(form in text for form in _forms(v)), text


# ------------------------------------------------------------------------------------------ signing
def test_the_signing_key_must_live_outside_the_run(copy_run, tmp_path, monkeypatch):
    run = copy_run()
    inside = new_issuer_key(run / "report_signing" / "report_signing_key.pem", "Mallory", "Copy holder")
    with pytest.raises(ValueError, match="inside the run directory"):
        write_report(run, key=inside)
    monkeypatch.setenv("SECURE_FEDKIM_REPORT_KEY", str(tmp_path / "none.pem"))
    with pytest.raises(FileNotFoundError, match="secure-fedkim report-key"):
        write_report(run)


def test_resigned_reports_fail_verification(written, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    path = d / "report.json"
    report = json.loads(path.read_text())
    assert report["status"]["overall"] != "pass"
    forged = copy.deepcopy(report)
    forged["status"]["overall"] = "pass"
    # 1. a key at the run's old key location (report_signing/ in the run directory)
    old = d / "report_signing" / "signing_key.pem"
    old.parent.mkdir()
    new_issuer_key(old, "Anyone", "Holder of a copy")
    resign(path, old, forged)
    msgs = verify(path)
    assert any("does not verify under the given public key" in m for m in msgs), msgs
    # 2. a new key whose fingerprint and signer are written into the report
    new = new_issuer_key(tmp_path / "keys" / "k.pem", "Eve", "Elsewhere")
    fp = fingerprint(load_public_key(public_key_path(new)))
    forged["provenance"]["signature"].update(public_key_sha256=fp, signer={"name": "Eve", "organisation": "Elsewhere",
                                                                           "public_key_sha256": fp})
    resign(path, new, forged)
    msgs = verify(path)
    assert any("does not verify under the given public key" in m for m in msgs), msgs
    assert any("is not the fingerprint of the given public key" in m for m in msgs)


def test_cli_report_key_and_verify_need_the_issuers_key(written, tmp_path, capsys):
    key = tmp_path / "store" / "issuer.pem"
    assert main(["report-key", "--name", "Ada Example", "--organisation", "Office", "--out", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600 and public_key_path(key).is_file()
    assert main(["report-key", "--name", "Ada Example", "--organisation", "Office", "--out", str(key)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["verify", str(written[1].json)]) == 2
    assert "give --public-key" in capsys.readouterr().err
    assert main(["verify", str(written[1].json), "--public-key", str(public_key_path(key))]) == 1  # another issuer
    assert main(["verify", str(written[1].json), "--public-key", str(public_key_path(Path(os.environ[KEY_ENV])))]) == 0


def test_verify_recomputes_status_and_summary(written, tmp_path, issuer_key):
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    path = d / "report.json"
    report = json.loads(path.read_text())
    forged = copy.deepcopy(report)
    forged["status"]["overall"] = "pass"  # signed by the issuer itself: the facts still disagree
    resign(path, issuer_key, forged)
    msgs = verify(path)
    assert any(m.startswith("report.json: status.overall says pass, its checks give attention") for m in msgs), msgs
    forged = copy.deepcopy(report)
    forged["summary"]["plain_language"] = forged["summary"]["plain_language"].replace("ATTENTION", "PASS")
    resign(path, issuer_key, forged)
    assert any("summary.plain_language is not the text its facts give" in m for m in verify(path))


def test_html_or_pdf_changed_to_pass_fails(written, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    page = d / "report.html"
    page.write_text(page.read_text().replace("ATTENTION", "PASS"))
    msgs = verify(d / "report.json")
    assert msgs == ["report.html: sha256 differs from the signed report.sha256: the file was changed after signing"]
    shutil.copy(written[0] / "report.html", page)
    pdf = d / "report.pdf"
    pdf.write_bytes(pdf.read_bytes() + b"\n% edited\n")
    assert verify(d / "report.json") == ["report.pdf: sha256 differs from the signed report.sha256: the file was changed "
                                         "after signing"]
    # an HTML of another report, re-listed and re-signed: it names another JSON's hash
    data = (d / "report.json").read_bytes()
    assert f'content="{hashlib.sha256(data).hexdigest()}"' in page.read_text()


def test_an_old_report_gets_a_clear_message(written, tmp_path, issuer_key):
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    path = d / "report.json"
    old = json.loads(path.read_text())
    old["schema_version"] = "1.0.0"
    resign(path, issuer_key, old)
    assert verify(path) == [f"report.json: schema version '1.0.0', this verifier reads {SCHEMA_VERSION}: regenerate the "
                            f"report with `secure-fedkim report` (an older report cannot be checked)"]


# ------------------------------------------------------------------------------------------ readable
def test_first_page_decision_and_plain_reading(written):
    pytest.importorskip("pypdf")
    from pypdf import PdfReader

    d, fed, part = written
    report = json.loads(fed.json.read_text())
    fp = report["summary"]["first_page"]
    assert fp["decision"] == "release with conditions"  # no audit was run: attention
    assert any(r.startswith("Leakage audit run: ") for r in fp["reasons"])
    n = NormalDist()
    for h, row in zip(report["hospitals"], fp["hospitals"]):
        mu = h["accounting"]["gdp_mu_total"]
        assert row["tpr_at_1pct_fpr"] == pytest.approx(n.cdf(n.inv_cdf(0.01) + mu), rel=1e-12)
        assert f"{row['tpr_at_1pct_fpr']:.0%}" in row["reading"]
    assert tpr_at_fpr(1.64) == pytest.approx(0.246, abs=0.002)  # the example: about 25%
    assert tpr_at_fpr(0.0) == pytest.approx(0.01)
    page1 = PdfReader(str(fed.pdf)).pages[0].extract_text()
    assert "Decision: RELEASE WITH CONDITIONS" in page1 and "worst measured leakage" in page1
    for h in report["hospitals"]:
        assert g(h["accounting"]["epsilon_total"], 4) in page1  # epsilon per hospital, on page 1, in one piece
    assert "Leakage audit run" in page1 and "audit_run" not in page1  # checks in words
    html = fed.html.read_text()
    assert html.index("Decision: RELEASE WITH CONDITIONS") < html.index('id="audit"')
    for section in ("Intended use, roles and data flow", "Data flow: what leaves which boundary"):
        assert section in html and section in " ".join(p.extract_text() for p in PdfReader(str(fed.pdf)).pages)


def test_pdf_text_is_at_least_8_points(written):
    pytest.importorskip("pypdf")
    from pypdf import PdfReader

    sizes = set()
    for page in PdfReader(str(written[1].pdf)).pages:
        sizes |= {float(x) for x in re.findall(rb"/F\d+\s+([\d.]+)\s+Tf", page.get_contents().get_data())}
    assert sizes and min(sizes) >= 8, sorted(sizes)


# ------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_a_real_run_with_budget_12_needs_attention(tmp_path):
    cfg = tmp_path / "e12.yaml"
    cfg.write_text(CFG.replace("target_epsilon: 8.0", "target_epsilon: 12.0").replace("single_hospital: true", "single_hospital: false"))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    paths = write_report(out)
    report = json.loads(paths.json.read_text())
    check = status_of(report, "epsilon_tier")
    assert check["status"] == "attention"
    assert all(10 < h["accounting"]["epsilon_spent"] <= 12 for h in report["hospitals"])
    assert verify(paths.json) == []


@pytest.mark.slow
def test_report_of_a_real_audit(written, tmp_path):
    """attacks.audit on the fixture run (small budgets), then the report reads its audit.json and ROC PNGs."""
    from attacks.audit import audit_run, parse_audit_config

    d = _fresh(written, tmp_path)
    audit_run(d, parse_audit_config({"tasks": ["heart_disease"], "mia": {"attacks": ["loss", "rmia"], "reference_models": 2,
                                                                         "bootstrap": 20},
                                     "canary": {"canaries": 40}, "inversion": {"steps": 50}}), progress=False)
    assert any(m.startswith("audit/audit.json: present in the run but not in the report") for m in verify(d / "report.json"))
    paths = write_report(d)
    report = json.loads(paths.json.read_text())
    assert report["audit"]["run"] and report["audit"]["mia"] and report["audit"]["dp_audit"]
    assert status_of(report, "audit_run")["status"] == "pass"
    # 40 black-box canaries cannot certify the run's claim: those replays are inconclusive, never pass; the
    # white-box audits of the real DP step (20,000 canaries) are consistent, so nothing fails
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "inconclusive", check
    verdicts = {c["status"] for c in report["audit"]["consistency"]}
    assert "inconsistent" not in verdicts and "consistent" in verdicts, verdicts
    pngs = sorted((d / "audit").glob("*.png"))
    assert pngs and [r["path"] for r in report["audit"]["roc_images"]] == [f"audit/{p.name}" for p in pngs]
    assert paths.html.read_text().count("data:image/png;base64,") >= len(pngs)
    audit = json.loads((d / "audit" / "audit.json").read_text())
    assert len(report["audit"]["mia"]) == len(audit["mia"]) and len(report["audit"]["skipped"]) == len(audit["skipped"])
    for mine, theirs in zip(report["audit"]["mia"], audit["mia"]):
        assert (mine["auc"], mine["tpr_at_fpr"], mine["n_members"]) == (theirs["auc"], theirs["tpr_at_fpr"], theirs["n_members"])
    assert "shard_index" not in paths.json.read_text() and "top_exposed" not in paths.json.read_text()
    assert verify(paths.json) == []
    part = write_report(d, partner="cleveland")
    text = part.json.read_text() + part.html.read_text()
    assert not any(c in text for c in CLIENTS if c != "cleveland")



def test_a_record_level_unit_with_an_infinite_spend_is_worded_not_crashed():
    """A hospital whose patients have several records and whose spend is not finite has no group-privacy figure;
    the privacy_unit wording says so (it used to index that missing figure and crash the report)."""
    from secure_fedkim.report.collect import _unit_wording

    class Hospital:
        name = "cleveland"

        def __init__(self):
            self.found = []

        def add(self, check, status, message, anonymous):
            self.found.append((check, status, message))

    class Facts:
        records_per_patient_at_least: dict = {}
        records_per_patient_where: dict = {}

    h = Hospital()
    _unit_wording(Facts(), h, {"privacy_unit": "record"}, 3, None)
    assert h.found == [("privacy_unit", "attention", "cleveland: record-level unit while a patient has up to 3 records "
                                                     "(no patient-level epsilon: the record-level spend is not finite)")]
    h = Hospital()
    _unit_wording(Facts(), h, {"privacy_unit": "record"}, 3, {"epsilon": 12.5})
    assert "patient-level epsilon 12.5 by group privacy" in h.found[0][2]


def test_a_run_level_finding_fails_the_report_naming_what_repeated(copy_run):
    """The run-level audit's row (attacks/runlevel.py) is a DP-consistency verdict: inconsistent fails the report with
    the repetition named; a partner report carries its own row only; verify recomputes the same status."""
    run = copy_run()
    (run / "audit").mkdir()
    repeat = "the noise of step 1 of round 2 at hungary (heart_disease) repeats step 1 of round 1 at hungary (heart_disease)"
    rows = [{"hospital": h, "threat_model": "the run as executed", "status": "consistent",
             "reasons": ["consistent: 6 sessions"], "sessions": 6, "steps_tapped": 30} for h in CLIENTS]
    rows[CLIENTS.index("hungary")].update(status="inconsistent", reasons=[repeat])
    audit = {"schema": "secure-fedkim-audit/1", "accountant": {}, "mia": [], "dp_audit": [], "whitebox": [],
             "mechanism": [], "runlevel": rows, "reconstruction": [], "skipped": []}
    (run / "audit" / "audit.json").write_text(json.dumps(audit))
    report = build_report(run)
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "fail" and "run-level audit" in check["reason"] and repeat in check["reason"]
    part = build_report(run, partner="cleveland")
    assert repeat not in all_text(part) and [e["hospital"] for e in part["audit"]["consistency"]] == ["cleveland"]
    assert status_of(part, "audit_consistent_with_accountant")["status"] == "fail"  # still flagged, unnamed
    paths = write_report(run)
    assert verify(paths.json) == []


def test_a_partner_sees_only_the_audit_parts_declared_shareable():
    """Deny by default (#26): a part of the audit section that PARTNER_VIEW does not declare (a new audit kind's rows,
    say) reaches the full report and never a partner's; declared row parts keep the partner's own rows only."""
    from secure_fedkim.report.build import PARTNER_VIEW, _audit_view

    audit = {"run": True, "source": "audit/audit.json", "note": None, "auditor_knowledge": None, "low_fpr_note": None,
             "mia": [], "dp_audit": [], "reconstruction": [], "roc_images": [], "skipped": [],
             "consistency": [{"hospital": "hungary", "path": "runlevel/0", "status": "consistent"},
                             {"hospital": "cleveland", "path": "runlevel/1", "status": "inconsistent"}],
             "toy_kind": [{"hospital": "cleveland", "score": 0.91}], "_clients": ["cleveland", "hungary"]}
    assert "toy_kind" not in PARTNER_VIEW
    full = _audit_view(audit, None)
    assert full["toy_kind"] == audit["toy_kind"] and len(full["consistency"]) == 2
    part = _audit_view(audit, "hungary")
    assert "toy_kind" not in part and "_clients" not in part
    assert [e["hospital"] for e in part["consistency"]] == ["hungary"]
    assert part["other_hospitals"]["hospitals"] == 1 and part["other_hospitals"]["consistency_statuses"]["inconsistent"] == 1
