"""Compliance reports: built from one real DP + CKKS run (Flower simulation), then copied and broken on purpose.

Each status rule of REPORTING.md §2.3 is triggered by a run edited to break it; every epsilon in a report is
recomputed from the ledgers here; verify names what changed; a partner report never names another partner.
"""

import copy
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from privacy import accounting
from privacy.accounting import Step, epsilon, gdp_mu, independent_epsilon
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger
from secure_fedkim.cli import main
from secure_fedkim.report import SCHEMA_VERSION, build_report, load_schema, status_of, verify_report, write_report

CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
CFG = """
run: {name: reportfix, seed: 3, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3, aggregation: he}
tasks:
  max_test_records: 60
  train:
    - {name: heart_disease, partition: natural}
client: {local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}
baseline: {single_hospital: true}
privacy: {dp: true, profile: {target_epsilon: 8.0}}
"""


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
             "tpr_at_fpr": {"0.001": 0.001}, "n_members": 1000, "n_nonmembers": 1000, "roc_png": "roc_global_heart_disease.png"},
            {"attack": "loss", "target": "switzerland", "target_kind": "local", "task": "heart_disease", "auc": 0.57,
             "tpr_at_fpr": {"0.001": 0.0}, "roc_png": "roc_switzerland_heart_disease.png"},
        ],
        "dp_audit": [
            {"hospital": "hungary", "task": "heart_disease", "canaries": 100, "eps_lb": 9.5, "eps_lb_one_run": 2.0,
             "eps_accountant": 7.9, "consistent_with_accountant": False},
            {"hospital": "cleveland", "task": "heart_disease", "canaries": 100, "eps_lb": 0.4, "eps_accountant": 7.9,
             "consistent_with_accountant": True},
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
    assert "used no differential privacy" in report["summary"]["plain_language"]
    assert status_of(report, "differential_privacy")["status"] == "attention"
    assert status_of(report, "budget_respected")["status"] == "not_applicable"
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
    aggregate = {v for s in report["other_hospitals"].values() if isinstance(s, dict) for v in s.values()}
    aggregate |= {v for band in report["plots"]["epsilon_by_round"]["others"] for v in band.values()}  # per-round min/median/max
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
    eps = sorted(mine[c]["accounting"]["epsilon_spent"] for c in others)  # the aggregate is over exactly the others
    assert report["other_hospitals"]["epsilon_spent"] == {"min": eps[0], "median": eps[1], "max": eps[2]}
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
def test_signature_and_keys(written):
    d, fed, part = written
    key = d / "report_signing" / "signing_key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (d / "report_signing" / "public_key.pem").is_file()
    for p in (fed, part):
        assert verify_report(p.json) == []
        data = p.json.read_bytes()
        assert b"PRIVATE KEY" not in data and b"signing_key.pem" not in data.replace(b"report_signing/", b"")
        assert len(p.sig.read_bytes()) == 64
    if shutil.which("openssl"):
        res = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "report_signing/public_key.pem", "-rawin",
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
    msgs = verify_report(p)
    assert msgs and msgs[0].startswith("report.json: the Ed25519 signature in report.sig does not verify")


def test_verify_names_one_changed_ledger_entry(written, tmp_path):
    d = _fresh(written, tmp_path)
    p = ledger_path(d, "switzerland")
    lines = p.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["sample_rate"] = entry["sample_rate"] / 2
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")
    msgs = verify_report(d / "report.json")
    assert any(m.startswith("clients/switzerland/ledger.jsonl: does not verify: line 3 (seq 2)") for m in msgs), msgs
    # the partner report of another hospital says a ledger it commits to changed, without naming it
    pm = verify_report(d / "report_hungary.json")
    assert any("other_hospitals_ledger_heads_sha256" in m for m in pm) and not any("switzerland" in m for m in pm)


def test_verify_names_a_ledger_rewritten_with_a_fresh_chain(written, tmp_path):
    d = _fresh(written, tmp_path)  # a valid chain on its own: only the report's recorded head shows the rewrite
    rewrite_ledger(ledger_path(d, "cleveland"), lambda ev, b: {**b, "steps": b["steps"] - 1} if ev == "dp_round" else b,
                   recompute=False)
    msgs = verify_report(d / "report.json")
    assert any(m.startswith("clients/cleveland/ledger.jsonl: chain head") and "provenance.ledger_heads.cleveland" in m
               for m in msgs), msgs


def test_verify_names_entries_appended_after_the_report(written, tmp_path):
    d = _fresh(written, tmp_path)
    n = len(PrivacyLedger(ledger_path(d, "hungary")).entries())
    PrivacyLedger(ledger_path(d, "hungary")).append("refused", run_id="later", round=9, reason="policy")
    msgs = verify_report(d / "report_hungary.json")
    assert msgs == [f"clients/hungary/ledger.jsonl: 1 entry appended after the report (seq {n} to {n}); head now "
                    f"{PrivacyLedger(ledger_path(d, 'hungary')).head()}, the report's provenance.ledger_heads.hungary is "
                    f"{json.loads((d / 'report_hungary.json').read_text())['provenance']['ledger_heads']['hungary']}"]


def test_verify_recomputes_epsilons_and_names_the_field(written, tmp_path, monkeypatch):
    """The report's own numbers are checked against the accountants, not only its hash."""
    d = _fresh(written, tmp_path)
    from secure_fedkim.report import collect

    real = collect.account
    monkeypatch.setattr(collect, "account", lambda h, delta, acc: real(h, delta, acc) * 1.01)  # a different accountant
    msgs = verify_report(d / "report.json")
    assert any(m.startswith("hospitals[cleveland].accounting.epsilon_spent: the report says") for m in msgs), msgs


def test_verify_names_one_changed_artifact(written, tmp_path):
    d = _fresh(written, tmp_path)
    p = d / "model" / "client_model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    msgs = verify_report(d / "report.json")
    assert msgs == [m for m in msgs if m.startswith("model/client_model.safetensors: sha256")] and len(msgs) == 1
    (d / "audit").mkdir()
    (d / "audit" / "audit.json").write_text("{}")
    assert any(m.startswith("audit/audit.json: present in the run but not in the report") for m in verify_report(d / "report.json"))


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
    assert verify_report(paths.json) == []


@pytest.mark.slow
def test_report_of_a_real_audit(written, tmp_path):
    """attacks.audit on the fixture run (small budgets), then the report reads its audit.json and ROC PNGs."""
    from attacks.audit import audit_run, parse_audit_config

    d = _fresh(written, tmp_path)
    audit_run(d, parse_audit_config({"tasks": ["heart_disease"], "mia": {"attacks": ["loss", "rmia"], "reference_models": 2,
                                                                         "bootstrap": 20},
                                     "canary": {"canaries": 40}, "inversion": {"steps": 50}}), progress=False)
    assert any(m.startswith("audit/audit.json: present in the run but not in the report") for m in verify_report(d / "report.json"))
    paths = write_report(d)
    report = json.loads(paths.json.read_text())
    assert report["audit"]["run"] and report["audit"]["mia"] and report["audit"]["dp_audit"]
    assert status_of(report, "audit_run")["status"] == "pass"
    assert status_of(report, "audit_consistent_with_accountant")["status"] == "pass"
    pngs = sorted((d / "audit").glob("*.png"))
    assert pngs and [r["path"] for r in report["audit"]["roc_images"]] == [f"audit/{p.name}" for p in pngs]
    assert paths.html.read_text().count("data:image/png;base64,") >= len(pngs)
    audit = json.loads((d / "audit" / "audit.json").read_text())
    assert len(report["audit"]["mia"]) == len(audit["mia"]) and len(report["audit"]["skipped"]) == len(audit["skipped"])
    for mine, theirs in zip(report["audit"]["mia"], audit["mia"]):
        assert (mine["auc"], mine["tpr_at_fpr"], mine["n_members"]) == (theirs["auc"], theirs["tpr_at_fpr"], theirs["n_members"])
    assert "shard_index" not in paths.json.read_text() and "top_exposed" not in paths.json.read_text()
    assert verify_report(paths.json) == []
    part = write_report(d, partner="cleveland")
    text = part.json.read_text() + part.html.read_text()
    assert not any(c in text for c in CLIENTS if c != "cleveland")

