"""A report check added from this file alone (issue #26), touching no project file: one `ReportCheck` registered with
`register_check` gets its row in report.json with its title, fails when its condition is planted, is not applicable
with its own reason when there is nothing to judge, reads in a partner's report without naming the other hospitals,
and verifies; `register_check` refuses a taken name or an incomplete entry, naming what.

The toy check, ``toy_retention_declared``: once any hospital declares how long it keeps the run
(``clients/<hospital>/retention.txt``), every hospital must. It runs on the 5ecdfde fixture run (a real 4-hospital
DP + CKKS run; no audit), copied; it is unregistered after each test.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from secure_fedkim.report import build_report, status_of, verify_report, write_report
from secure_fedkim.report.checks import (
    CHECKS,
    ReportCheck,
    register_check,
    unregister_check,
)
from secure_fedkim.report.collect import Finding
from secure_fedkim.report.sign import KEY_ENV, public_key_path

FIXTURE = Path(__file__).parent / "fixtures" / "run_5ecdfde"
CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
NAME, TITLE = "toy_retention_declared", "Every hospital declared how long it keeps the run"
ACTION = "Have every hospital declare how long it keeps the run before release"

pytestmark = pytest.mark.usefixtures("issuer_key")  # tests/conftest.py: the issuer's key, set for this module


def _retention(facts: dict, hospital: str) -> Path:
    return facts["run"].run_dir / "clients" / hospital / "retention.txt"


def _declared(facts: dict) -> bool:
    return any(_retention(facts, h).is_file() for h in facts["run"].clients)


def _findings(facts: dict) -> list[Finding]:
    if not _declared(facts):
        return []  # nothing to judge: not applicable (applies)
    return [Finding("fail", f"{h} declared no retention period (no clients/{h}/retention.txt)", h,
                    "a hospital declared no retention period") for h in facts["run"].clients
            if not _retention(facts, h).is_file()]


def _toy(name: str = NAME, **changes) -> ReportCheck:
    fields = {
        "name": name, "section": "provenance", "title": TITLE,
        "rule": "fail for a hospital without clients/<hospital>/retention.txt once any hospital has one",
        "passed": "every hospital declared a retention period",
        "applies": _declared,
        "not_applicable": "no hospital declared a retention period", "findings": _findings, "actions": {"fail": ACTION}}
    return ReportCheck(**{**fields, **changes})


@pytest.fixture
def toy_check():
    check = register_check(_toy())
    yield check
    unregister_check(NAME)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def declare(run: Path, *hospitals: str) -> None:
    for h in hospitals:
        (run / "clients" / h / "retention.txt").write_text("6 months\n")


def test_the_toy_checks_row_is_in_report_json_with_its_title_and_verifies(toy_check, run_dir):
    declare(run_dir, *CLIENTS)
    paths = write_report(run_dir)
    report = json.loads(Path(paths.json).read_text())
    assert [c["name"] for c in report["checks"]][-1] == NAME  # after the built-in checks
    row = status_of(report, NAME)
    assert row == {"name": NAME, "status": "pass", "reason": "every hospital declared a retention period",
                   "section": "provenance"}
    titles = {c["name"]: c["title"] for c in report["summary"]["first_page"]["checks"]}
    assert titles[NAME] == TITLE
    assert TITLE in Path(paths.html).read_text()
    public = public_key_path(Path(os.environ[KEY_ENV]))
    assert verify_report(paths.json, public_key=public) == []


def test_a_planted_missing_declaration_fails_the_check_with_its_action(toy_check, run_dir):
    assert status_of(build_report(run_dir), NAME) == {
        "name": NAME, "status": "not_applicable", "reason": "no hospital declared a retention period",
        "section": "provenance"}
    declare(run_dir, "hungary", "switzerland", "va_long_beach")  # cleveland declares nothing
    report = build_report(run_dir)
    row = status_of(report, NAME)
    assert row["status"] == "fail" and row["reason"] == "cleveland declared no retention period (no clients/cleveland/retention.txt)"
    assert report["status"]["overall"] == "fail"
    assert {"action": ACTION, "check": NAME, "status": "fail"} in report["summary"]["first_page"]["conditions"]
    assert f"{TITLE}: {row['reason']}" in report["summary"]["first_page"]["reasons"]


def test_a_partner_reads_another_hospitals_failure_without_its_name(toy_check, run_dir):
    declare(run_dir, "hungary", "switzerland", "va_long_beach")
    row = status_of(build_report(run_dir, partner="hungary"), NAME)
    assert row["status"] == "fail"  # a partner learns that the check failed somewhere
    assert row["reason"] == "a hospital declared no retention period (1 other hospital)"
    assert not any(h in json.dumps(row) for h in CLIENTS)
    (run_dir / "clients" / "hungary" / "retention.txt").unlink()  # its own failure: in full
    row = status_of(build_report(run_dir, partner="hungary"), NAME)
    assert row["reason"] == ("hungary declared no retention period (no clients/hungary/retention.txt); "
                             "a hospital declared no retention period (1 other hospital)")


def test_a_check_can_say_how_it_reads_in_a_partner_report(run_dir):
    register_check(_toy(partner_reason=lambda found, partner: "withheld from partner reports"))
    try:
        declare(run_dir, "hungary")
        assert status_of(build_report(run_dir, partner="hungary"), NAME)["reason"] == "withheld from partner reports"
        assert "cleveland declared no retention period" in status_of(build_report(run_dir), NAME)["reason"]
    finally:
        unregister_check(NAME)


def test_register_check_refuses_a_taken_name_and_an_incomplete_entry(toy_check):
    with pytest.raises(ValueError, match=f"a check named '{NAME}' is already registered"):
        register_check(_toy())
    with pytest.raises(ValueError, match="a check named 'config_hash' is already registered"):
        register_check(_toy("config_hash"))
    with pytest.raises(ValueError, match=r"report check 'toy_other': title must be a non-empty sentence; findings must "
                                         r"be a function findings\(facts\)"):
        register_check(_toy("toy_other", title="", findings=None))
    with pytest.raises(ValueError, match="needs not_applicable"):
        register_check(_toy("toy_other", not_applicable=None))
    with pytest.raises(ValueError, match="section must be one of"):
        register_check(_toy("toy_other", section="elsewhere"))
    with pytest.raises(ValueError, match="actions must map statuses"):
        register_check(_toy("toy_other", actions={"not_applicable": "nothing"}))
    with pytest.raises(TypeError, match="is not a ReportCheck"):
        register_check((NAME, "provenance", TITLE))
    assert [c.name for c in CHECKS].count(NAME) == 1 and "toy_other" not in [c.name for c in CHECKS]


def test_an_unregistered_check_leaves_no_row(toy_check, run_dir):
    unregister_check(NAME)
    assert NAME not in [c["name"] for c in build_report(run_dir)["checks"]]
    with pytest.raises(ValueError, match="built in"):
        unregister_check("config_hash")


def test_a_finding_with_an_unknown_status_is_refused_naming_the_check(run_dir):
    register_check(_toy(findings=lambda facts: [Finding("maybe", "unsure", None, "unsure")]))
    try:
        with pytest.raises(ValueError, match=f"report check '{NAME}': findings must be Findings with a status of"):
            build_report(run_dir)
    finally:
        unregister_check(NAME)
