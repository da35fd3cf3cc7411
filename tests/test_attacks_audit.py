"""`audit_run` on a real (tiny, DP) run made by the CLI: files, table rows, accountant column, config checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from attacks.audit import (
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
from secure_fedkim.artifacts import load_run
from secure_fedkim.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]

TINY = """
run: {name: tiny-audit, seed: 1, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3}
tasks:
  max_test_records: 120
  train:
    - {name: heart_disease, partition: natural}
client: {local_epochs: 2, batch_size: 32, token_dim: 16, num_tokens: 2}
privacy: {dp: true, profile: {target_epsilon: 8.0}, hospitals: {switzerland: {target_epsilon: 1.0}}}
injection: {enabled: false}
baseline: {single_hospital: false}
"""

SMALL = {
    "fprs": [0.1, 0.01, 0.001],
    "mia": {"reference_models": 2, "bootstrap": 20, "min_records": 10},
    "canary": {"canaries": 20},
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
    assert {e["roc_png"] for e in audit["mia"]} <= pngs and "roc_global_heart_disease.png" in pngs
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
    assert lines[1].split() == ["target", "task", "attack", "n", "AUC", "TPR@1%", "TPR@0.1%", "eps", "lower",
                                "bound", "accountant", "eps"]
    audited_targets = {e["target"] for e in audit["mia"]}
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
    with pytest.raises(AuditConfigError, match=r"tasks: \['mortality'\] are not training tasks of this run"):
        audit_run(run_dir, parse_audit_config({"tasks": ["mortality"]}), progress=False)
