"""The report shows a hospital's lifetime spend beside the run's (#29), verify recomputes it, and a run that took a
hospital past its lifetime cap fails budget_respected; a partner report shows the partner's own lifetime only."""

import json
import os
import shutil
from pathlib import Path

import pytest

from privacy.accounting import Step, epsilon
from privacy.ledger import PrivacyLedger
from secure_fedkim.cli import main
from secure_fedkim.report import verify_report, write_report
from secure_fedkim.report.sign import KEY_ENV, public_key_path

from test_report import CFG as REPORT_CFG  # noqa: E402 (tests/ is on the path: the report tests' DP + HE federation)

CFG = REPORT_CFG.replace("name: reportfix", "name: lifetimefix")
EARLIER = [Step(1.2, 0.1, 30), Step(1.2, 0.1, 30)]


pytestmark = pytest.mark.usefixtures("issuer_key")  # tests/conftest.py: the issuer's key, set for this module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("lifetime-run")
    (base / "fix.yaml").write_text(CFG)
    out = base / "run"
    assert main(["run", str(base / "fix.yaml"), "--out", str(out), "--quiet"]) == 0
    return out


def with_earlier_run(run_dir: Path, dest: Path, hospital: str, cap: float | None) -> Path:
    """A copy of the run whose hospital's ledger first holds an earlier run on the same records (no commitment:
    it counts) and, when `cap` is given, the node's lifetime_check that accepted this run."""
    shutil.copytree(run_dir, dest)
    path = dest / "clients" / hospital / "ledger.jsonl"
    entries = PrivacyLedger(path).entries()
    path.unlink()
    ledger = PrivacyLedger(path)
    plan = next(e for e in entries if e["event"] == "dp_plan")
    ledger.append("dp_plan", run_id="study-0", noise_multiplier=1.2, delta=plan["delta"], accountant="prv",
                  max_grad_norm=1.0, target_epsilon=8.0, round_schedule=[[0.1, 30]], rounds=2)
    for r in (1, 2):
        ledger.append("dp_round", run_id="study-0", round=r, noise_multiplier=1.2, sample_rate=0.1, steps=30)
    if cap is not None:
        ledger.append("lifetime_check", run_id=plan["run_id"], cap=cap, delta=plan["delta"], accountant="prv",
                      scope="data", runs=[], other_data=[])
    for e in entries:
        ledger.append(e["event"], **{k: v for k, v in e.items() if k not in ("seq", "prev_hash", "time", "hash", "event")})
    return dest


def verify(path):
    return verify_report(path, public_key=public_key_path(Path(os.environ[KEY_ENV])))


def test_report_shows_lifetime_beside_the_run_and_verify_recomputes_it(run_dir, tmp_path):
    d = with_earlier_run(run_dir, tmp_path / "run", "hungary", cap=100.0)
    out = write_report(d)
    report = json.loads((d / "report.json").read_text())
    h = next(x for x in report["hospitals"] if x["hospital"] == "hungary")
    a = h["accounting"]
    lt = a["lifetime"]
    entries = PrivacyLedger(d / "clients" / "hungary" / "ledger.jsonl").entries()
    mine = [Step(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries
            if e["event"] == "dp_round" and e["run_id"] != "study-0"]
    delta = a["delta"]
    assert lt["runs"] == [{"run_id": "study-0", "epsilon": epsilon(EARLIER, delta), "data": "none", "baseline": "none",
                           "counted": True}]
    assert lt["epsilon_earlier"] == epsilon(EARLIER, delta)
    assert lt["epsilon_run"] == epsilon(mine, delta) == a["epsilon_total"]
    assert lt["epsilon"] == epsilon(EARLIER + mine, delta) and lt["cap"] == 100.0
    assert a["epsilon_total"] < lt["epsilon"]
    # the other hospitals' ledgers hold one run: no lifetime figure
    assert all(x["accounting"].get("lifetime") is None for x in report["hospitals"] if x["hospital"] != "hungary")
    assert next(c for c in report["checks"] if c["name"] == "budget_respected")["status"] == "pass"
    assert verify(d / "report.json") == []
    assert "Lifetime spend per hospital" in (d / "report.html").read_text()
    # a partner report shows the partner's own lifetime only
    write_report(d, partner="hungary")
    write_report(d, partner="cleveland")
    mine_view = json.loads((d / "report_hungary.json").read_text())
    assert [x["accounting"]["lifetime"]["epsilon"] for x in mine_view["hospitals"]] == [lt["epsilon"]]
    other_view = (d / "report_cleveland.json").read_text()
    assert "study-0" not in other_view and "lifetime_check" not in other_view
    assert verify(d / "report_hungary.json") == [] and verify(d / "report_cleveland.json") == []
    assert out is not None


def test_a_run_that_passed_the_lifetime_cap_fails_budget_respected(run_dir, tmp_path):
    d = with_earlier_run(run_dir, tmp_path / "run", "hungary", cap=1.0)  # the earlier run alone is above 1
    write_report(d)
    report = json.loads((d / "report.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "budget_respected")
    assert check["status"] == "fail" and "lifetime budget 1" in check["reason"]
    assert verify(d / "report.json") == []


def test_verify_recomputes_the_lifetime_by_its_own_code_path(run_dir, tmp_path):
    from secure_fedkim.report.recompute import check_report

    d = with_earlier_run(run_dir, tmp_path / "run", "hungary", cap=100.0)
    write_report(d)
    report = json.loads((d / "report.json").read_text())
    clients = [h["hospital"] for h in report["hospitals"]]
    assert check_report(report, d, clients, False) == []
    h = next(x for x in report["hospitals"] if x["hospital"] == "hungary")
    h["accounting"]["lifetime"]["epsilon"] -= 1.0  # a lifetime under-stated
    [msg] = check_report(report, d, clients, False)
    assert msg.startswith("hospitals[hungary].accounting.lifetime.epsilon: the report says")
    h["accounting"]["lifetime"] = None  # a lifetime left out
    [msg] = check_report(report, d, clients, False)
    assert "holds runs before this one (study-0)" in msg
