"""Issue #30: a compliance report that agrees with itself and with its evidence.

One real DP + CKKS run with the single-hospital baseline (Flower simulation): every derived figure of its report is
recomputed here from the ledgers; each wrong number, planted into a built report (or into the builder), fails
`verify`; every audit row has one status in the JSON, the HTML and the partner report; the randomness checks read
the ledgers' dp_round entries (made by hand here where the run's ledgers do not carry them yet).
"""

import json
import math
import os
import re
import shutil
from pathlib import Path
from statistics import NormalDist

import pytest

from privacy.accounting import Step, epsilon, gdp_mu
from privacy.ledger import PrivacyLedger
from secure_fedkim.cli import main
from secure_fedkim.report import build_report, status_of, validate_report, verify_report, write_report
from secure_fedkim.report.sign import KEY_ENV, manifest, public_key_path

CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
CFG = """
run: {name: figures, seed: 5, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3, aggregation: he}
tasks:
  max_test_records: 60
  train:
    - {name: heart_disease, partition: natural}
client: {local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}
baseline: {single_hospital: true}
privacy: {dp: true, profile: {target_epsilon: 8.0}}
"""


pytestmark = pytest.mark.usefixtures("issuer_key")  # tests/conftest.py: the issuer's key, set for this module


def verify(path, **kw):
    return verify_report(path, public_key=public_key_path(Path(os.environ[KEY_ENV])), **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("figures-run")
    (base / "fix.yaml").write_text(CFG)
    out = base / "run"
    assert main(["run", str(base / "fix.yaml"), "--out", str(out), "--quiet"]) == 0
    assert all((out / "baseline" / c / "ledger.jsonl").is_file() for c in CLIENTS)  # a real baseline, with its ledger
    return out


@pytest.fixture
def copy_run(run_dir, tmp_path):
    def make(name: str = "run") -> Path:
        shutil.copytree(run_dir, tmp_path / name)
        return tmp_path / name

    return make


def dp_entries(path: Path):
    entries = PrivacyLedger(path).entries()
    plan = next(e for e in entries if e["event"] == "dp_plan")
    return plan, [e for e in entries if e["event"] == "dp_round"]


def hist(rounds):
    return [Step(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rounds]


def resign(path: Path, report: dict) -> None:
    """Re-write a report's JSON and both signatures with the issuer's key (a builder that wrote these numbers)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(os.environ[KEY_ENV]).read_bytes(), password=None)
    data = (json.dumps(report, indent=2) + "\n").encode()
    path.write_bytes(data)
    path.with_suffix(".sig").write_bytes(key.sign(data))
    files = manifest({p.name: p.read_bytes() for p in (path, path.with_suffix(".html"), path.with_suffix(".pdf"))})
    path.with_suffix(".sha256").write_bytes(files)
    path.with_suffix(".sha256.sig").write_bytes(key.sign(files))


def rewrite_ledger(path: Path, edit) -> None:
    """Re-write a ledger as a valid chain with ``edit(event, body) -> body`` applied (epsilons left as recorded)."""
    entries = PrivacyLedger(path).entries()
    path.unlink()
    ledger = PrivacyLedger(path)
    for e in entries:
        body = {k: v for k, v in e.items() if k not in ("seq", "prev_hash", "time", "hash", "event")}
        ledger.append(e["event"], **edit(e["event"], body))


# ------------------------------------------------------------------------------------------ 1. the numbers
def test_every_derived_figure_is_recomputed_from_the_ledgers(run_dir):
    report = build_report(run_dir)
    validate_report(report)
    k_of = report["privacy_definition"]["max_records_per_patient"]
    for h in report["hospitals"]:
        c, a = h["hospital"], h["accounting"]
        plan, rounds = dp_entries(run_dir / "clients" / c / "ledger.jsonl")
        _, base = dp_entries(run_dir / "baseline" / c / "ledger.jsonl")
        d, acc, budget = plan["delta"], plan["accountant"], plan["target_epsilon"]
        fed, both = hist(rounds), hist(rounds) + hist(base)
        eps_fed, eps_total = epsilon(fed, d, acc), epsilon(both, d, acc)
        assert a["epsilon_spent"] == pytest.approx(eps_fed, rel=1e-9)
        assert a["epsilon_total"] == pytest.approx(eps_total, rel=1e-9) and eps_total > eps_fed
        # the remaining budget is budget minus the COMPOSED spend (it was budget minus the federation's)
        assert a["epsilon_remaining"] == pytest.approx(budget - eps_total, rel=1e-9)
        assert "composed" in a["epsilon_remaining_of"]
        assert a["gdp_mu"] == pytest.approx(gdp_mu(fed), rel=1e-12)
        assert a["gdp_mu_total"] == pytest.approx(gdp_mu(both), rel=1e-12)
        assert "alone" in a["gdp_mu_covers"]["gdp_mu"] and "baseline" in a["gdp_mu_covers"]["gdp_mu_total"]
        k = k_of[c]
        p = a["patient_level"]
        if k is None:
            assert p is None
        else:  # group privacy of the composed spend, not of the federation's
            assert p["epsilon"] == pytest.approx(k * eps_total, rel=1e-9)
            assert p["delta"] == pytest.approx(min(1.0, k * math.exp((k - 1) * eps_total) * d), rel=1e-9)
        fp = next(x for x in report["summary"]["first_page"]["hospitals"] if x["hospital"] == c)
        assert fp["epsilon"] == pytest.approx(eps_total, rel=1e-9) and fp["gdp_mu"] == pytest.approx(gdp_mu(both), rel=1e-12)
        assert fp["epsilon_remaining"] == pytest.approx(budget - eps_total, rel=1e-9)
        assert fp["tpr_at_1pct_fpr"] == pytest.approx(NormalDist().cdf(NormalDist().inv_cdf(0.01) + gdp_mu(both)))
        assert report["dp_disclosure_card"]["epsilon"][c] == pytest.approx(eps_total, rel=1e-9)
        statement = next(s["text"] for s in report["guarantee_statement"]["per_hospital"] if s["hospital"] == c)
        assert "for the federation and the baseline composed" in statement and "for the federation alone" in statement
    eps = [h["accounting"]["epsilon_total"] for h in report["hospitals"]]
    assert report["summary"]["headline"]["epsilon_spent"] == {"min": min(eps), "max": max(eps)}
    part = build_report(run_dir, partner="hungary")
    a = part["hospitals"][0]["accounting"]
    assert part["summary"]["headline"]["epsilon_remaining"] == a["epsilon_remaining"]
    assert "federation and baseline composed" in part["summary"]["plain_language"]


@pytest.fixture(scope="module")
def written(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("figures-written") / "run"
    shutil.copytree(run_dir, d)
    return d, write_report(d), write_report(d, partner="hungary")


PLANTS = {  # a wrong number as the issue found it, and the field verify must name
    "remaining from the federation's spend alone": (
        lambda r: [h["accounting"].update(epsilon_remaining=h["accounting"]["epsilon_budget"] - h["accounting"]["epsilon_spent"])
                   for h in r["hospitals"]], "accounting.epsilon_remaining"),
    "patient level from the federation's spend alone": (
        lambda r: [h["accounting"]["patient_level"].update(epsilon=h["accounting"]["patient_level"]["max_records_per_patient"]
                                                           * h["accounting"]["epsilon_spent"])
                   for h in r["hospitals"] if h["accounting"]["patient_level"]], "patient_level.epsilon"),
    "the federation's mu where the composed one belongs": (
        lambda r: [h["accounting"].update(gdp_mu_total=h["accounting"]["gdp_mu"]) for h in r["hospitals"]],
        "accounting.gdp_mu_total"),
    "page 1 with the federation's epsilon": (
        lambda r: [x.update(epsilon=h["accounting"]["epsilon_spent"])
                   for x, h in zip(r["summary"]["first_page"]["hospitals"], r["hospitals"])], "first_page.hospitals"),
    "the disclosure card with the federation's epsilon": (
        lambda r: [r["dp_disclosure_card"]["epsilon"].update({h["hospital"]: h["accounting"]["epsilon_spent"]})
                   for h in r["hospitals"]], "dp_disclosure_card.epsilon"),
    "a composed epsilon halved": (
        lambda r: r["hospitals"][0]["accounting"].update(epsilon_total=r["hospitals"][0]["accounting"]["epsilon_total"] / 2),
        "accounting.epsilon_total"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_each_wrong_number_planted_into_a_built_report_fails_verify(written, tmp_path, plant):
    d, paths, _ = written
    run = tmp_path / "run"
    shutil.copytree(d, run)
    path = run / paths.json.name
    assert verify(path) == []
    report = json.loads(path.read_text())
    edit, field = PLANTS[plant]
    before = json.dumps(report)
    edit(report)
    assert json.dumps(report) != before
    resign(path, report)
    msgs = verify(path)
    assert any(field in m and "recomputed from" in m for m in msgs), (plant, msgs)


def test_a_builder_bug_fails_verification_through_verifys_own_code_path(written, tmp_path, monkeypatch):
    """The builder computes the remaining budget from the federation's spend (the bug of #30) and the patient level
    from it too; verify, whose builder shares the bug, still fails the report by its own recomputation."""
    from secure_fedkim.report import collect

    real = collect.derive

    def buggy(h):
        real(h)
        a = h.accounting
        if a is not None:
            a["epsilon_remaining"] = a["epsilon_budget"] - a["epsilon_spent"]

    monkeypatch.setattr(collect, "derive", buggy)
    run = tmp_path / "run"
    shutil.copytree(written[0], run)
    paths = write_report(run)
    msgs = verify(paths.json)  # the builder (still buggy) agrees with itself: only the recomputation can see it
    assert any(m.startswith("hospitals[cleveland].accounting.epsilon_remaining: the report says") and "recomputed from "
               "clients/cleveland/ledger.jsonl and baseline/cleveland/ledger.jsonl" in m for m in msgs), msgs


# ------------------------------------------------------------------------------------------ 2. one status per row
def write_audit(run: Path, audit: dict) -> None:
    (run / "audit").mkdir(exist_ok=True)
    (run / "audit" / "audit.json").write_text(json.dumps({"schema": "secure-fedkim-audit/1", **audit}))


def canary(hospital, claim=5.33, cap=4.19, lb=0.3):
    return {"hospital": hospital, "task": "heart_disease", "canaries": 200, "kind": "ood", "mode": "one_run", "trials": 1,
            "dp": True, "eps_lb": lb, "eps_lb_one_run": lb, "eps_accountant": claim, "canary_auc": 0.52,
            "confidence": 0.95, "status": "inconclusive", "consistent_with_accountant": True,
            "max_certifiable_epsilon": cap, "accountant_epsilon": claim, "threat_model": "black-box final model",
            "reasons": [f"the claimed epsilon {claim} is above the largest epsilon {cap} that 200 canaries can certify"]}


def whitebox(hospital, status="consistent"):
    return {"hospital": hospital, "task": "heart_disease", "threat_model": "white-box every step", "canaries": 1000,
            "eps_lb_one_run": 1.1, "status": status, "reasons": ["the bound 1.1 is below the claim 2.0"],
            "accountant_epsilon": 5.33, "accountant_epsilon_audited_steps": 2.0, "max_certifiable_epsilon": 7.8}


def mia(target, auc, ci, significant=False, tpr=0.01, n=1050, **kw):
    return {"attack": kw.pop("attack", "lira_offline"), "target": target, "target_kind": "local", "task": "heart_disease",
            "auc": auc, "auc_ci95": ci, "auc_ci": ci, "tpr_at_fpr": {"0.001": tpr, "0.01": 0.05}, "n_members": n,
            "n_nonmembers": n, "significant": significant, "p_value": 0.2, "p_adjusted": 0.4,
            "threat_model": "black-box final model", **kw}


AUDIT = {
    "mia": [mia("cleveland", 0.705, [0.537, 0.851]),  # interval above 0.5, not significant by the test: a signal
            mia("hungary", 0.461, [0.439, 0.486], significant=True, tpr=0.02, attack="lira_online"),  # below chance
            mia("switzerland", 0.52, [0.45, 0.6], tpr=0.0038),  # 4 hits in 1,050: no evidence above 2e-3
            mia("va_long_beach", 0.55, [0.48, 0.62], tpr=0.03, n=1000)],  # 30 in 1,000: above 2e-3 for sure
    "dp_audit": [canary(c) for c in CLIENTS],
    "whitebox": [whitebox(c) for c in CLIENTS if c != "va_long_beach"],
}


def _rows(report):
    au = report["audit"]
    return [("consistency", e) for e in au["consistency"]] + [("dp_audit", e) for e in au["dp_audit"]] + \
        [("mia", e) for e in au["mia"]]


def test_no_audit_row_has_two_statuses_in_json_html_or_partner_outputs(copy_run):
    run = copy_run()
    write_audit(run, AUDIT)
    paths = write_report(run)
    part_paths = write_report(run, partner="cleveland")
    seen: dict[str, set] = {}
    for p in (paths.json, part_paths.json):
        report = json.loads(p.read_text())
        for _, e in _rows(report):
            seen.setdefault(e["path"], set()).add(e["status"])
        text = p.read_text()
        assert "consistent_with_accountant\"" not in text.replace("audit_consistent_with_accountant", "")
    assert seen and all(len(v) == 1 for v in seen.values()), seen
    report = json.loads(paths.json.read_text())
    # the HTML tables show the same status for every row: the black-box rows and the canary table agree
    html = paths.html.read_text()
    for _, e in _rows(report):
        if e["path"].startswith("dp_audit"):
            assert e["status"] == "inconclusive" and e["underpowered"]
    cells = re.findall(r"<td[^>]*>(inconclusive \(underpowered\)|consistent|inconsistent|inconclusive)</td>", html)
    assert cells.count("inconclusive (underpowered)") == 2 * len(CLIENTS)  # consistency table + canary table
    assert "consistent: yes" not in html and ">yes</td>" not in html.split("Membership inference")[1].split("</table>")[0]
    # the partner view counts the others' rows by the very statuses the federation report gives them
    part = json.loads(part_paths.json.read_text())
    others = [e for e in report["audit"]["consistency"] if e["hospital"] != "cleveland"]
    want = {st: sum(e["status"] == st for e in others) for st in ("consistent", "inconsistent", "inconclusive")}
    assert part["audit"]["other_hospitals"]["consistency_statuses"] == want
    assert "all_consistent_with_accountant" not in part_paths.json.read_text()
    # a row's status, planted into the report, fails verify (recomputed from audit.json)
    assert verify(paths.json) == []
    report["audit"]["dp_audit"][0]["status"] = "consistent"
    resign(paths.json, report)
    assert any(m.startswith("audit.dp_audit[dp_audit/0].status: the report says 'consistent'") for m in verify(paths.json))


# ------------------------------------------------------------------------------------------ 3. rules that inform
def test_leakage_rules_say_what_they_test_and_below_chance_is_an_audit_fault(copy_run):
    run = copy_run()
    write_audit(run, AUDIT)
    report = build_report(run)
    st = {e["hospital"]: e["status"] for e in report["audit"]["mia"]}
    assert st == {"cleveland": "signal above chance", "hungary": "below chance (audit fault)",
                  "switzerland": "no signal shown", "va_long_beach": "no signal shown"}
    leak = status_of(report, "measured_leakage")  # the interval wholly above 0.5 is flagged, as the text says
    assert leak["status"] == "attention" and "cleveland" in leak["reason"] and "hungary" not in leak["reason"]
    below = status_of(report, "mia_below_chance")
    assert below["status"] == "attention" and "hungary" in below["reason"] and "audit fault" in below["reason"]
    low = status_of(report, "mia_low_fpr")  # from a Clopper-Pearson interval; the below-chance row is not counted
    assert low["status"] == "attention" and "va_long_beach" in low["reason"]
    assert "switzerland" not in low["reason"] and "hungary" not in low["reason"]
    # page 1's worst measured leakage and the summary's are one figure (0.705, the highest interval lower bound)
    w = report["audit"]["worst_leakage"]
    assert w["auc"] == 0.705 and report["summary"]["first_page"]["worst_leakage"]["auc"] == 0.705
    assert "AUC 0.705" in report["summary"]["plain_language"] and "highest AUC" not in report["summary"]["plain_language"]
    # underpowered black-box canaries do not hold the decision where the white-box audit of the same training decided;
    # va_long_beach has no white-box row, so its canaries stay inconclusive
    check = status_of(report, "audit_consistent_with_accountant")
    assert check["status"] == "inconclusive" and "va_long_beach" in check["reason"] and "underpowered" in check["reason"]
    assert "the federation's own whole-run epsilon" in check["reason"]  # the claim is named for what it is
    write_audit(run, {**AUDIT, "whitebox": [whitebox(c) for c in CLIENTS]})
    check = status_of(build_report(run), "audit_consistent_with_accountant")
    assert check["status"] == "pass" and "carries the decision" in check["reason"]
    # so does the run-level audit of the hospital, over every task, when its canaries could have refuted its claim
    def runlevel(c, cert):
        return {"hospital": c, "threat_model": "the run as executed", "status": "consistent", "reasons": ["consistent"],
                "eps_lb_one_run": 2.0, "accountant_epsilon": 8.0, "max_certifiable_epsilon": cert}
    write_audit(run, {**AUDIT, "runlevel": [runlevel(c, 12.1) for c in CLIENTS]})
    check = status_of(build_report(run), "audit_consistent_with_accountant")
    assert check["status"] == "pass" and "run-level audit of the whole run" in check["reason"], check["reason"]
    write_audit(run, {**AUDIT, "runlevel": [runlevel(c, 6.0) for c in CLIENTS]})  # could not have refuted 8
    assert status_of(build_report(run), "audit_consistent_with_accountant")["status"] == "inconclusive"
    write_audit(run, {**AUDIT, "whitebox": [whitebox(c, "inconsistent") for c in CLIENTS]})
    assert status_of(build_report(run), "audit_consistent_with_accountant")["status"] == "fail"


def test_the_patient_id_column_comes_from_the_task_registry():
    from types import SimpleNamespace

    import numpy as np

    from secure_fedkim.data.tasks import TASKS
    from secure_fedkim.report.collect import patient_ids_available

    def plan(name, group):
        return SimpleNamespace(task=TASKS[name], data=SimpleNamespace(persons=group, person=None))

    ids = np.array(["a", "b"])
    assert patient_ids_available(plan("heart_disease", ids))
    assert not patient_ids_available(plan("report_abnormal", ids))  # a report id (IU study uid) is not a patient id
    assert not patient_ids_available(plan("report_cardiomegaly", ids))


# ------------------------------------------------------------------------------------------ 4. the first page
def test_first_page_lists_conditions_as_actions_the_setting_and_the_patients(written):
    d, paths, part = written
    report = json.loads(paths.json.read_text())
    fp = report["summary"]["first_page"]
    assert fp["decision"] != "release" and fp["conditions"]
    assert all(c["action"][0].isupper() and c["check"] in {x["name"] for x in report["checks"]} for c in fp["conditions"])
    bad = {c["name"] for c in report["checks"] if c["status"] in ("fail", "attention", "inconclusive")}
    assert bad <= {c["check"] for c in fp["conditions"]}
    assert fp["setting"].startswith("simulation")
    assert fp["patient_exposure"]["text"] and len(fp["patient_exposure"]["hospitals"]) == len(CLIENTS)
    card = report["dp_disclosure_card"]
    for field in ("tier", "unit_of_privacy", "epsilon", "delta", "model", "accounting", "implementation", "trust_model",
                  "randomness_source", "floating_point_protection", "record_per_task"):
        assert card[field], field
    html = paths.html.read_text()
    assert "DP disclosure card" in html and "Conditions, as actions" in html and "simulation:" in html


# ------------------------------------------------------------------------------------------ 5. randomness
def with_randomness(run: Path, edit=lambda who, body: body) -> None:
    """Give every DP session of the run the fields privacy.randomness will write (secure, fresh fingerprints), then
    apply ``edit(("fed"|"base", hospital), body)`` to each dp_round body."""
    counter = iter(range(10 ** 6))
    for c in CLIENTS:
        for where, path in (("fed", run / "clients" / c / "ledger.jsonl"), ("base", run / "baseline" / c / "ledger.jsonl")):
            def ed(event, body, where=where, c=c):
                if event == "dp_plan":
                    return {**body, "randomness": "secure", "adjacency": "add/remove one record; the record count n is "
                            "treated as public"}
                if event == "dp_round":
                    n = next(counter)
                    body = {**body, "randomness": "secure", "noise_fingerprint": f"{n:064x}",
                            "sampling_fingerprint": f"{n + 500000:064x}", "units": 100}
                    return edit((where, c), body)
                return body

            rewrite_ledger(path, ed)


def test_randomness_checks_pass_fail_and_verify_recomputes_them(copy_run):
    run = copy_run()
    before = build_report(run)  # the run's own ledgers, whether or not they record randomness yet
    assert status_of(before, "noise_randomness")["status"] in ("pass", "attention")
    with_randomness(run)
    report = build_report(run)
    assert status_of(report, "noise_randomness")["status"] == "pass"
    assert status_of(report, "noise_fresh")["status"] == "pass"
    assert report["privacy_definition"]["adjacency_statement"].endswith("treated as public")
    assert report["dp_disclosure_card"]["randomness_source"].startswith("secure")
    paths = write_report(run)
    assert verify(paths.json) == []
    # a baseline session drew from the reproducible generator: fail, and verify recomputes it
    shutil.rmtree(run)
    run = copy_run("reproducible")
    with_randomness(run, lambda who, b: {**b, "randomness": "reproducible"} if who == ("base", "switzerland") else b)
    check = status_of(build_report(run), "noise_randomness")
    assert check["status"] == "fail" and "reproducible generator: not fit for release" in check["reason"]
    assert "the single-hospital baseline's round 1 at switzerland (task heart_disease)" in check["reason"]
    paths = write_report(run)
    report = json.loads(paths.json.read_text())
    next(c for c in report["checks"] if c["name"] == "noise_randomness")["status"] = "pass"
    resign(paths.json, report)
    assert any(m.startswith("checks[noise_randomness].status: the report says 'pass'") for m in verify(paths.json))


def test_repeated_noise_or_samples_fail_noise_fresh(copy_run):
    run = copy_run()

    def repeat(who, body):  # cleveland's round 2 draws round 1's noise again
        if who == ("fed", "cleveland") and body["round"] == 2:
            prev = [e for e in PrivacyLedger(run / "clients" / "cleveland" / "ledger.jsonl.keep").entries()
                    if e["event"] == "dp_round" and e["round"] == 1]
            return {**body, "noise_fingerprint": prev[0]["noise_fingerprint"]}
        return body

    with_randomness(run)
    shutil.copy(run / "clients" / "cleveland" / "ledger.jsonl", run / "clients" / "cleveland" / "ledger.jsonl.keep")
    rewrite_ledger(run / "clients" / "cleveland" / "ledger.jsonl",
                   lambda ev, b: repeat(("fed", "cleveland"), b) if ev == "dp_round" else b)
    (run / "clients" / "cleveland" / "ledger.jsonl.keep").unlink()
    check = status_of(build_report(run), "noise_fresh")
    assert check["status"] == "fail"
    assert "the noise of round 2 at cleveland (task heart_disease) repeats round 1's" in check["reason"]
    # a Poisson sample shared across hospitals: named, with what an honest run's collision probability is at most
    run2 = copy_run("sampling")
    shared = "ab" * 32
    with_randomness(run2, lambda who, b: {**b, "sampling_fingerprint": shared} if b["round"] == 1 and who[0] == "fed"
                    and who[1] in ("hungary", "va_long_beach") else b)
    report = build_report(run2)
    check = status_of(report, "noise_fresh")
    assert check["status"] == "fail" and "the Poisson samples of round 1 at va_long_beach" in check["reason"]
    assert "round 1 at hungary" in check["reason"] and "probability at most" in check["reason"]
    part = build_report(run2, partner="va_long_beach")  # the partner learns that it repeats someone, not whom
    assert status_of(part, "noise_fresh")["status"] == "fail" and "hungary" not in json.dumps(part)
    paths = write_report(run2)
    report = json.loads(paths.json.read_text())
    next(c for c in report["checks"] if c["name"] == "noise_fresh")["status"] = "pass"
    resign(paths.json, report)
    assert any(m.startswith("checks[noise_fresh].status: the report says 'pass'") for m in verify(paths.json))


# ------------------------------------------------------------------------------------------ 6. HE and the main body
def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader

    return " ".join(" ".join(p.extract_text().split()) for p in PdfReader(str(path)).pages)


def _reconstruction_rows() -> list[dict]:
    """The audit's update-inversion rows of an `he` run, as attacks.inversion writes them (its own note for the
    aggregated row: "only the aggregate of at least 3 hospitals is ever in the clear")."""
    from attacks.inversion import aggregated_only_row
    from secure_fedkim.federation.transports import TRANSPORTS

    rows = []
    for c in CLIENTS:
        where = {"hospital": c, "task": "heart_disease", "shard_index": 3, "model": "global model",
                 "threat_model": "one record's single-record update"}
        rows += [{"update": "plain", "visible": False, "relative_mse": 0.4, "cosine": 0.8, "steps": 50, **where},
                 {"update": "dp", "visible": False, "relative_mse": 1.3, "cosine": 0.1, "steps": 50,
                  "noise_multiplier": 1.0, "max_grad_norm": 1.0, **where},
                 {**aggregated_only_row("he", TRANSPORTS["he"].update_held_as, 3), **where,
                  "threat_model": "aggregate the server sees"}]
    return rows


def test_an_he_report_never_claims_both_a_malicious_aggregator_and_only_aggregates_in_the_clear(copy_run):
    """The key holder decrypts an 'aggregate' that lists at least min_clients signed contributions; it cannot check that
    the ciphertext is their sum (privacy.he.keyholder). So the threat model's "a malicious server can have one
    hospital's update decrypted" holds, and the audit's note "only the aggregate of at least 3 hospitals is ever in the
    clear" holds only for a server that follows the protocol: the report says the second in those terms, in the JSON,
    the HTML, the PDF and the partner report."""
    run = copy_run()
    write_audit(run, {**AUDIT, "reconstruction": _reconstruction_rows()})
    assert "is ever in the clear" in (run / "audit" / "audit.json").read_text()  # the audit's own note
    paths, part = write_report(run), write_report(run, partner="cleveland")
    for p in (paths, part):
        report = json.loads(p.json.read_text())
        threat = next(t for t in report["threat_model"] if t["asset"] == "one hospital's update"
                      and t["adversary"] == "curious aggregation server")
        assert "malicious server can have one hospital's update decrypted" in threat["not_protected"]
        notes = [r["note"] for r in report["audit"]["reconstruction"] if r.get("update") == "he"]
        assert notes and all("to a server that follows the protocol" in n and "not against a malicious server" in n
                             for n in notes)
        for text in (p.json.read_text(), p.html.read_text(), _pdf_text(p.pdf)):
            flat = " ".join(text.split())
            assert "ever in the clear" not in flat
            assert "decrypted only the sum" not in flat and "decrypts only sums" not in flat
            assert "malicious server can have one hospital" in flat
    assert verify(paths.json) == []


def _demo_sized_audit() -> dict:
    """An audit.json the size of the demo's: 150 membership-inference rows (4 hospitals x 5 tasks x 5 attacks, the
    global model, the FM, the auditor's game), 20 canary and 4 white-box rows, 12 update-inversion rows."""
    tasks = ["heart_disease", "mortality", "ecg_irregular", "report_abnormal", "cross_sectional"]
    attacks = ["loss", "lira_online", "lira_offline", "rmia", "rmia_offline"]
    rng = __import__("random").Random(0)
    rows = []
    for t in tasks:
        for target in CLIENTS + ["global"]:
            for a in attacks:
                auc = round(rng.uniform(0.42, 0.72), 3)
                rows.append(mia(target, auc, [round(auc - 0.07, 3), round(auc + 0.07, 3)], attack=a, task=t, n=200,
                                target_kind="global" if target == "global" else "local"))
        rows.append(mia("fm", 0.5, [0.44, 0.56], attack="loss", task=t, n=200, target_kind="fm"))
        for c in CLIENTS:
            rows.append(mia(c, 0.5, [0.48, 0.52], attack="lira_online", task=t, target_kind="game"))
    canaries = [{**canary(c), "task": t} for c in CLIENTS for t in tasks]
    return {"mia": rows, "dp_audit": canaries, "whitebox": [whitebox(c) for c in CLIENTS],
            "reconstruction": _reconstruction_rows()}


def test_the_main_body_of_a_report_with_a_demo_sized_audit_is_at_most_6_pdf_pages(copy_run):
    """Issue #30: the main body (summary and decision, guarantee and disclosure card, accounting, audits in counts) at
    most 6 PDF pages; every row, the bounds plot, ROC curves and hashes in the appendices, which start on a new page.
    Page 1 keeps the decision and its conditions. (The demo's report: 6 pages, appendix A on page 7; it was 7.)"""
    from pypdf import PdfReader

    run = copy_run()
    write_audit(run, _demo_sized_audit())
    paths = write_report(run)
    reader = PdfReader(str(paths.pdf))
    starts = {o.title: reader.get_destination_page_number(o) for o in reader.outline if not isinstance(o, list)}
    first_appendix = min(p for t, p in starts.items() if t.startswith("Appendix"))
    assert first_appendix <= 6, starts  # 0-based: appendix A on page 7 at the latest
    body = " ".join(" ".join(reader.pages[i].extract_text().split()) for i in range(first_appendix))
    assert "Every row is in appendix B" in body and "Update inversion: 12 rows" in body
    assert "relative MSE" not in body and "TPR@" not in body  # no per-row audit table in the main body
    page1 = " ".join(reader.pages[0].extract_text().split())
    assert "Decision: RELEASE WITH CONDITIONS" in page1 and "Conditions, as actions" in page1
    rest = " ".join(" ".join(reader.pages[i].extract_text().split()) for i in range(first_appendix, len(reader.pages)))
    assert "relative MSE" in rest and "TPR@" in rest  # the rows are in appendix B
