"""`audit_run` on a real (tiny, DP) run made by the CLI: files, table rows, accountant column, config checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from attacks.audit import (
    AUDIT_KINDS,
    THREAT_MODELS,
    AuditConfig,
    AuditConfigError,
    audit_run,
    format_audit_table,
    ledger_epsilon,
    load_audit_config,
    parse_audit_config,
)
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger
from secure_fedkim.rundir.artifacts import load_run
from secure_fedkim.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]

TINY = """
run: {name: tiny-audit, seed: 1, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3}
tasks:
  max_test_records: 120
  train:
    - {name: heart_disease, partition: natural, local_epochs: 3}
    - {name: mortality, partition: iid, max_records: 200}
client: {local_epochs: 2, batch_size: 32, token_dim: 16, num_tokens: 2}
privacy: {dp: true, profile: {target_epsilon: 8.0}, hospitals: {switzerland: {target_epsilon: 1.0}}}
injection: {enabled: false}
baseline: {single_hospital: false}
"""

SMALL = {
    "tasks": ["heart_disease"],  # mortality is trained (it spends budget) but not audited
    "fprs": [0.1, 0.01, 0.001],
    "mia": {"reference_models": 2, "bootstrap": 20, "min_records": 10},
    "canary": {"canaries": 20},
    "game": {"min_models": 4, "max_models": 4},
    "inversion": {"steps": 30},
}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One real Flower simulation (about 20-40 s) and one audit of it, shared by the tests here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("audit")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    run_dir = tmp / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--quiet"]) == 0
    audit = audit_run(run_dir, parse_audit_config(SMALL), progress=True)
    yield run_dir, audit
    torch.set_num_threads(before)


def test_audit_writes_json_and_roc_plots(audited):
    run_dir, audit = audited
    out = run_dir / "audit"
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk == audit
    assert audit["schema"] == "secure-fedkim-audit/1" and audit["auditor_knowledge"]
    pngs = {p.name for p in out.glob("*.png")}
    assert {e["roc_png"] for e in audit["mia"] if e["target_kind"] != "game"} <= pngs and "roc_global_heart_disease.png" in pngs
    for p in pngs:
        assert (out / p).read_bytes()[:4] == b"\x89PNG"
    loss = [e for e in audit["mia"] if e["attack"] == "loss"]
    for e in loss:
        assert e["n_members"] == e["n_nonmembers"] >= 10  # balanced, matched on site and label
        assert e["matched_on"] == "site and label"
        assert set(e["tpr_at_fpr"]) == {"0.1", "0.01", "0.001"}
        assert e["tpr_at_fpr"]["0.001"] is None and "at least 1000 needed" in e["tpr_at_fpr_note"]["0.001"]
        for t in e["top_exposed"]:  # opaque ids only
            assert set(t) == {"hospital", "shard_index", "score"}
        assert sum(e["per_record_exposure"]["member_counts"]) == e["n_members"]


def test_audit_table_has_a_row_per_target_and_attack(audited):
    run_dir, audit = audited
    table = format_audit_table(audit)
    lines = table.splitlines()
    assert lines[0] == f"Leakage audit of {run_dir}"
    assert lines[1].startswith("Summary per target")  # the short summary comes above the full table
    header = next(line for line in lines if line.startswith("target "))
    assert header.split() == ["target", "task", "attack", "n", "AUC", "TPR@1%", "TPR@0.1%", "eps", "lower",
                                "bound", "accountant", "eps"]
    audited_targets = {e["target"] for e in audit["mia"] if e["target_kind"] != "game"}  # game rows: own label
    skipped = {s["what"] for s in audit["skipped"]}
    for c in CLIENTS:  # a hospital too small for a matched MIA is skipped, and the table says why
        assert c in audited_targets or f"mia {c}/heart_disease" in skipped
        assert any(line.startswith(f"{c} (training)") and "canaries (one-run, 20 ood)" in line for line in lines)
    assert "global" in audited_targets
    for target in audited_targets:
        label = "global" if target == "global" else f"{target} (local)"
        for attack in ("loss", "lira_online", "lira_offline", "rmia", "rmia_offline"):
            assert sum(1 for line in lines if line.startswith(label + " ") and f" {attack} " in line) == 1
    assert "n/a (<1000 non-m.)" in table  # 0.1% FPR cannot be measured on this run, and it says so
    assert "Update inversion" in table


def test_accountant_column_reads_each_hospitals_ledger(audited):
    run_dir, audit = audited
    run = load_run(run_dir)
    for c in CLIENTS:
        ledger = PrivacyLedger(run.ledger_path(c))
        plan = ledger.events("dp_plan")[-1]
        expected = epsilon(ledger.dp_history(plan["run_id"]), plan["delta"], plan["accountant"])
        assert audit["accountant"][c]["epsilon"] == pytest.approx(expected)
    assert audit["accountant"]["switzerland"]["epsilon"] <= 1.0 + 1e-9
    table = format_audit_table(audit)
    row = next(line for line in table.splitlines() if line.startswith("cleveland (local)"))
    assert row.endswith(f"{audit['accountant']['cleveland']['epsilon']:.3f}")
    assert next(line for line in table.splitlines() if line.startswith("global ")).endswith(
        f"max {max(a['epsilon'] for a in audit['accountant'].values()):.3f}"
    )
    for d in audit["dp_audit"]:  # honest DP: no lower bound above the accountant
        assert d["consistent_with_accountant"] is True and d["eps_lb"] <= d["eps_accountant"]


def test_non_private_and_tampered_ledgers(audited, tmp_path):
    run_dir, audit = audited
    run = load_run(run_dir)

    class NoLedger:
        def ledger_path(self, client):
            return tmp_path / "missing" / "ledger.jsonl"

    assert ledger_epsilon(NoLedger(), "cleveland") is None
    plain = dict(audit, accountant={c: None for c in CLIENTS}, dp_audit=[])
    rows = [line for line in format_audit_table(plain).splitlines() if "(local)" in line or line.startswith("global ")]
    assert rows and all(line.endswith("n/a (non-private)") for line in rows)

    copy = tmp_path / "ledger.jsonl"
    shutil.copy(run.ledger_path("cleveland"), copy)
    copy.write_text(copy.read_text().replace('"steps":', '"steps":9', 1))  # an edited spend

    class Tampered:
        def ledger_path(self, client):
            return copy

    assert "ledger does not verify" in ledger_epsilon(Tampered(), "cleveland")["error"]


def test_audit_config_file_and_validation(tmp_path):
    assert load_audit_config(ROOT / "configs" / "audit.yaml") == AuditConfig()
    bad = tmp_path / "a.yaml"
    bad.write_text("mia: {reference_modles: 4}\n")
    with pytest.raises(AuditConfigError, match=r"^.*a\.yaml: mia\.reference_modles: unknown key \(allowed: enabled, attacks"):
        load_audit_config(bad)
    with pytest.raises(AuditConfigError, match=r"<audit config>: mia\.reference_models: online reference models need an even"):
        parse_audit_config({"mia": {"reference_models": 3}})
    assert parse_audit_config({"mia": {"reference_models": 1, "reference_mode": "offline"}}).mia.reference_models == 1


def test_audit_refuses_tasks_the_run_does_not_have(audited):
    run_dir, _ = audited
    with pytest.raises(AuditConfigError, match=r"tasks: \['ecg_irregular'\] are not training tasks of this run"):
        audit_run(run_dir, parse_audit_config({"tasks": ["ecg_irregular"]}), progress=False)


def _without_timings(node):
    """The audit with what differs between two identical audits removed: wall and CPU seconds, the timestamp."""
    if isinstance(node, dict):
        return {k: _without_timings(v) for k, v in node.items()
                if k not in ("seconds", "generated_at", "cpu_seconds_by_part", "workers", "config")}
    if isinstance(node, list):
        return [_without_timings(v) for v in node]
    return node


def test_the_audit_is_the_same_in_one_process_and_in_two(audited):
    """Jobs (one per task, one for the white-box audits) run in worker processes; each seeds its own RNG, so
    the reference models' Poisson sampling and noise, and every number, do not depend on where a job ran."""
    run_dir, _ = audited
    small = {**SMALL, "tasks": ["heart_disease", "mortality"], "game": {"enabled": False},
             "inversion": {"enabled": False}, "mia": {**SMALL["mia"], "attacks": ["loss", "lira_online"]},
             "whitebox": {"canaries": 200, "mechanism_trials": 2000},
             # the run-level audit re-executes the run with the production randomness: its statistics differ from one
             # audit to the next by design (nothing seeds the noise); its rows are tested in test_runlevel_audit.py
             "runlevel": {"enabled": False}}
    one = audit_run(run_dir, parse_audit_config({**small, "workers": 1}), progress=False)
    two = audit_run(run_dir, parse_audit_config({**small, "workers": 2}), progress=False)
    assert (one["workers"], two["workers"]) == (1, 2)
    assert {e["task"] for e in two["mia"]} == {"heart_disease", "mortality"} and two["whitebox"] and two["dp_audit"]
    assert _without_timings(one) == _without_timings(two)
    assert set(two["cpu_seconds_by_part"]) >= {"mia local", "canary", "whitebox"}


# ------------------------------------------------------------------------------- issue 15: what the audit can decide


def test_canary_replay_uses_the_ledgers_steps_and_rate_for_that_task(audited):
    """heart_disease trains 3 local epochs per round (client default 2): the replay takes the ledger's steps
    and Poisson rate for that task, not rounds x client.local_epochs."""
    run_dir, audit = audited
    run = load_run(run_dir)
    assert audit["dp_audit"]
    for d in audit["dp_audit"]:
        rounds = [e for e in PrivacyLedger(run.ledger_path(d["hospital"])).events("dp_round") if e["task"] == "heart_disease"]
        assert d["replay_schedule_from"] == "ledger"
        assert d["steps_ledger"] == sum(e["steps"] for e in rounds) == d["steps_per_training"]
        assert d["sample_rate_ledger"] == rounds[0]["sample_rate"] == pytest.approx(d["sample_rate"])
        assert d["epochs"] == 2 * 3  # rounds x the task's own local epochs
        assert d["threat_model"] == "black-box final model"


def test_canary_replay_is_checked_against_the_ledgers_whole_run_epsilon(audited):
    """Two tasks spend each hospital's budget; the claim checked is the whole run's, not the one-task replay's."""
    _, audit = audited
    for d in audit["dp_audit"]:
        whole = audit["accountant"][d["hospital"]]["epsilon"]
        assert d["accountant_epsilon"] == d["eps_accountant"] == pytest.approx(whole)
        assert d["eps_accountant_replay"] < 0.95 * whole  # heart_disease alone spends visibly less
        assert d["ratio"] == pytest.approx(max(d["eps_lb"], d["eps_lb_one_run"]) / whole)
        assert d["delta"] == audit["accountant"][d["hospital"]]["delta"]


def test_a_claim_above_what_the_canaries_can_certify_is_inconclusive(audited):
    """20 canaries certify at most about 1.5; epsilon 8 cannot be checked, and the audit says so."""
    _, audit = audited
    statuses = {}
    for d in audit["dp_audit"]:
        assert d["status"] in ("consistent", "inconclusive")
        above = d["accountant_epsilon"] > d["max_certifiable_epsilon"]
        assert (d["status"] == "inconclusive") == above, d
        if above:
            assert f"above the largest epsilon {d['max_certifiable_epsilon']:.3g} that 20 canaries can certify" in d["reasons"][0]
        statuses[d["hospital"]] = d["status"]
    assert statuses["cleveland"] == "inconclusive"  # epsilon 8
    assert "inconclusive (max" in format_audit_table(audit)


def test_mia_rows_say_what_they_can_measure_and_are_holm_corrected(audited):
    _, audit = audited
    rows = audit["mia"]
    p = sorted(e["p_value"] for e in rows)
    for e in rows:
        assert e["threat_model"] == "black-box final model"
        assert e["min_measurable_fpr"] == pytest.approx(1 / e["n_nonmembers"])
        for key, measurable in e["tpr_measurable"].items():
            assert measurable == (e["tpr_at_fpr"][key] is not None)  # a number only where it can be measured
        assert e["auc_ci"] == e["auc_ci95"]
        rank = p.index(e["p_value"])  # Holm: at least (m - rank) x p, never below a smaller p's adjustment
        assert e["p_adjusted"] >= min(1.0, (len(rows) - rank) * e["p_value"]) - 1e-12
        assert e["significant"] == (e["p_adjusted"] < 0.05)
    games = [e for e in rows if e["target_kind"] == "game"]
    assert {e["target"] for e in games} == set(CLIENTS) and all(e["game_models"] == 4 for e in games)
    targets = {r["target"] for r in audit["summary"]}
    assert "global model" in targets and "cleveland training recipe (auditor game)" in targets
    label = {"local": "{} local model", "game": "{} training recipe (auditor game)", "global": "global model"}
    for r in audit["summary"]:
        mine = [e for e in rows if label[e["target_kind"]].format(e["target"]) == r["target"]]
        assert r["rows"] == len(mine) and r["significant_rows"] == sum(e["significant"] for e in mine)
        assert r["worst"]["auc_ci"][0] == max(e["auc_ci"][0] for e in mine)
    # the white-box audits ran on every DP hospital's real DP step (one task by default), and an honest run
    # is never called inconsistent
    assert sorted(e["hospital"] for e in audit["whitebox"]) == sorted(CLIENTS)
    assert sorted(e["hospital"] for e in audit["mechanism"]) == sorted(CLIENTS)
    for e in audit["whitebox"] + audit["mechanism"]:
        assert e["threat_model"] in ("white-box every step", "white-box one step")
        assert e["status"] in ("consistent", "inconclusive"), e["reasons"]
    for e in audit["whitebox"]:
        assert e["task"] == "heart_disease" and e["steps_observed"] <= e["steps_ledger"]
        assert e["accountant_epsilon"] == pytest.approx(audit["accountant"][e["hospital"]]["epsilon"])
    assert any(s["what"] == "mia fm/heart_disease" and "no knowledge injection" in s["why"] for s in audit["skipped"])
    assert all(s["threat_model"] for s in audit["skipped"]) and all(r["threat_model"] for r in audit["reconstruction"])


def test_an_audit_json_from_before_issue_15_still_formats(audited):
    """No summary, statuses, p-values or intervals: the table prints what there is, as before."""
    _, audit = audited
    new_keys = {"p_value", "p_adjusted", "significant", "auc_ci", "n_pairs", "min_measurable_fpr", "tpr_measurable",
                "threat_model", "status", "reasons", "max_certifiable_epsilon", "accountant_epsilon", "ratio"}
    strip = lambda e: {k: v for k, v in e.items() if k not in new_keys}  # noqa: E731
    old = {k: v for k, v in audit.items() if k not in ("summary", "whitebox", "mechanism")}
    old["mia"] = [strip(e) for e in audit["mia"] if e["target_kind"] != "game"]
    old["dp_audit"] = [strip(d) for d in audit["dp_audit"]]
    table = format_audit_table(old)
    assert "Summary per target" not in table and "Holm" not in table
    assert any(line.startswith("cleveland (training)") for line in table.splitlines())
    assert "inconclusive" not in table


def test_ledger_epsilon_takes_this_runs_plan_when_the_ledger_holds_several(tmp_path):
    """A ledger with this run and a later one (a re-run into the same hospital home): the later plan is not
    this run's; plans[-1] would pick it."""
    from privacy.accounting import Step

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for run_id, sigma in (("run-a", 1.2), ("run-b", 0.6)):
        ledger.append("dp_plan", run_id=run_id, dp=True, delta=1e-5, accountant="prv", noise_multiplier=sigma,
                      max_grad_norm=1.0, target_epsilon=8.0)
        for task in ("heart_disease", "mortality"):
            ledger.append("dp_round", run_id=run_id, round=1, task=task, steps=40, sample_rate=0.125,
                          noise_multiplier=sigma, epsilon=None)

    class FakeRun:
        run_dir = tmp_path / "run-a"

        def ledger_path(self, client):
            return tmp_path / "ledger.jsonl"

        def summary(self):
            return {}

    got = ledger_epsilon(FakeRun(), "cleveland")
    assert got["ledger_run_id"] == "run-a" and got["noise_multiplier"] == 1.2
    assert got["epsilon"] == pytest.approx(epsilon([Step(1.2, 0.125, 80)], 1e-5, "prv"))
    assert got["tasks"]["heart_disease"] == {"steps": 40, "sample_rate": 0.125, "rounds": 1}
    FakeRun.run_dir = tmp_path / "run-c"  # neither: no guess
    assert "none of them this run (run-c)" in ledger_epsilon(FakeRun(), "cleveland")["error"]


def test_the_injected_fm_is_skipped_with_the_reason_when_the_run_did_not_save_it(tmp_path):
    import yaml

    from attacks.audit import _fm_scorer
    from secure_fedkim.config import RunConfig

    data = yaml.safe_load(TINY)
    data["injection"] = {"enabled": True}
    (tmp_path / "resolved_config.json").write_text(RunConfig.model_validate(data).model_dump_json())
    with pytest.raises(FileNotFoundError, match=r"did not save the injected foundation model \(.*fm/adapter\.safetensors is missing"):
        _fm_scorer(load_run(tmp_path), "heart_disease")


# ---------------------------------------------------------------------------------------------- registry and schema


def test_every_audit_kind_has_its_part_row_type_section_and_a_reader_in_the_report():
    """Each registered kind names a part of audit.json with a row type (secure_fedkim.audit_schema) that the
    report reads (PART_READERS), a section of AuditConfig and a threat model; a kind without one fails here."""
    import attacks.audit as audit_mod
    from secure_fedkim.audit_schema import PARTS, ROW_TYPES
    from secure_fedkim.report.build import PART_READERS

    for kind in AUDIT_KINDS:
        assert kind.part in ROW_TYPES and kind.row is ROW_TYPES[kind.part], kind.name
        assert kind.part in PART_READERS, f"{kind.name}: the report has no reader for part {kind.part!r}"
        assert AuditConfig.model_fields[kind.config_key].annotation is kind.section, kind.name
        threats = (kind.threat_model,) if isinstance(kind.threat_model, str) else kind.threat_model
        assert threats and set(threats) <= set(THREAT_MODELS), kind.name
        assert kind.scope in ("task", "hospital", "run") and callable(kind.run) and callable(kind.enabled), kind.name
    assert len({k.name for k in AUDIT_KINDS}) == len(AUDIT_KINDS)
    assert set(ROW_TYPES) == set(PART_READERS) == {k.part for k in AUDIT_KINDS} | {"skipped"}
    assert audit_mod._PARTS == PARTS


def test_the_writer_refuses_a_row_its_row_type_refuses(tmp_path, monkeypatch):
    """A kind whose row lost a required field fails audit_run before audit.json is written, naming part, row, field."""
    import attacks.audit as audit_mod
    from secure_fedkim.audit_schema import DP_AUDIT_ROW, AuditSchemaError

    run_dir = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_5ecdfde", run_dir)

    def careless(ctx, job, h):  # a canary replay's row without its lower bound
        ctx.audit["dp_audit"].append({"hospital": h, "task": job.task, "canaries": 20, "kind": "ood", "mode": "one_run",
                                      "trials": 1, "dp": True, "eps_accountant": None, "canary_auc": 0.5,
                                      "confidence": 0.95})

    kind = audit_mod.AuditKind("careless", "dp_audit", DP_AUDIT_ROW, audit_mod.CanarySection, "canary",
                               audit_mod.THREAT_BLACK_BOX, "task", enabled=lambda c, run, task: True, run=careless,
                               units=lambda c, run, clients: clients[:1], cpu_part=lambda h: "canary")
    monkeypatch.setattr(audit_mod, "AUDIT_KINDS", (kind,))
    with pytest.raises(AuditSchemaError, match=r"audit\.json: dp_audit\[0\] lacks field 'eps_lb'"):
        audit_run(run_dir, parse_audit_config({"tasks": ["heart_disease"], "workers": 1}), progress=False)
    assert not (run_dir / "audit" / "audit.json").exists()


# ------------------------------------------------------------------------------- issue 25: the run as executed


def test_the_run_level_audit_re_executes_the_real_run_and_finds_it_honest(audited):
    """The Flower simulation's run, re-executed through the hospitals' own code: every DP hospital has a row, the
    rerun's ledgers hold the same rounds, tasks and steps as the run's own (else a reason says they differ), and
    nothing repeats or correlates."""
    run_dir, audit = audited
    run = load_run(run_dir)
    dp = [h for h in run.clients if run.cfg.dp_profile(h) is not None]
    assert dp and [r["hospital"] for r in audit["runlevel"]] == dp
    for r in audit["runlevel"]:
        assert r["status"] == "consistent", r["reasons"]
        assert r["steps_tapped"] > 0 and r["threat_model"].startswith("the run as executed")
    assert "Run-level audit" in format_audit_table(audit)
