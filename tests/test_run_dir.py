"""The run directory's one description (#14): `secure_fedkim.rundir.layout.RunDir` names every file of the layout its
docstring documents, summary.json has one writer, and a run directory written before the redesign resolves."""

import json
import re
from pathlib import Path

import pytest

import secure_fedkim.rundir.layout as run_dir_module
from secure_fedkim.rundir.layout import HospitalDir, RunDir, StudyDir, public_key_file

FIXTURE = Path(__file__).parent / "fixtures" / "run_5ecdfde"
PACKAGE = Path(run_dir_module.__file__).parents[1]  # secure_fedkim/

# every accessor, and the path (relative to the run directory) it must give
LAYOUT = {
    "config_yaml": "config.yaml",
    "resolved_config": "resolved_config.json",
    "features": "features.json",
    "summary": "summary.json",
    "status": "status.json",
    "metrics_dir": "metrics",
    "fm_scores": "metrics/fm_test_scores.npz",
    "model_dir": "model",
    "global_model": "model/client_model.safetensors",
    "clients_dir": "clients",
    "keys_dir": "keys",
    "keyholder_dir": "keyholder",
    "keyholder_ledger": "keyholder/ledger.jsonl",
    "baselines_dir": "baseline",
    "checkpoint": "checkpoint.safetensors",
    "checkpoint_meta": "checkpoint.json",
    "checkpoint_fm": "checkpoint_fm.safetensors",
    "audit_dir": "audit",
    "audit_json": "audit/audit.json",
    "fm_dir": "fm",
}
PER_HOSPITAL = {
    "local_model": "clients/{h}/local_model.safetensors",
    "ledger": "clients/{h}/ledger.jsonl",
    "public_key": "keys/{h}.pub",
    "baseline_ledger": "baseline/{h}/ledger.jsonl",
}


def _documented(rel: str) -> str:
    """The docstring's spelling of a path: <hospital> for a hospital's name, NNN for a round number."""
    return re.sub(r"round_\d{3}", "round_NNN", rel.replace("north", "<hospital>"))


def test_every_path_is_the_documented_layout(tmp_path):
    files = RunDir(tmp_path / "r1")
    doc = run_dir_module.__doc__
    for accessor, rel in LAYOUT.items():
        path = getattr(files, accessor)
        assert files.relative(path) == rel, accessor
        assert Path(rel).name in doc, f"{rel} is not in the layout docstring"
    for accessor, pattern in PER_HOSPITAL.items():
        rel = pattern.format(h="north")
        assert files.relative(getattr(files, accessor)("north")) == rel, accessor
        documented = _documented(rel)  # clients/<hospital>/ lists its files below it
        assert documented in doc or (documented.rsplit("/", 1)[0] + "/" in doc and Path(rel).name in doc), documented
    assert files.relative(files.round_metrics(3)) == "metrics/round_003.json"
    assert _documented("metrics/round_003.json") in doc
    assert files.client("north").path == files.root / "clients" / "north"
    assert files.baseline("north").path == files.root / "baseline" / "north"
    home = HospitalDir(tmp_path / "state")
    assert [p.name for p in (home.ledger, home.local_model, home.signing_key, home.policy)] == [
        "ledger.jsonl", "local_model.safetensors", "signing_key.pem", "policy.yaml"]
    assert all(name in doc for name in ("ledger.jsonl", "local_model.safetensors", "signing_key.pem", "policy.yaml"))
    assert public_key_file(tmp_path / "server_keys", "north") == tmp_path / "server_keys" / "north.pub"
    assert files.name == "r1"
    assert RunDir(str(tmp_path)).root == tmp_path


def test_report_files_and_study_dir(tmp_path):
    files = RunDir(tmp_path)
    assert files.report_file(None, ".json") == tmp_path / "report.json"
    assert files.report_file("north", ".sha256.sig") == tmp_path / "report_north.sha256.sig"
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            files.report_file(bad, ".json")
    study = StudyDir(tmp_path)
    assert (study.config_yaml.name, study.results.name) == ("config.yaml", "study.json")
    assert study.run("fedplug", 2) == tmp_path / "fedplug-seed2"


def test_summary_has_one_writer_and_round_trips(tmp_path):
    files = RunDir(tmp_path)
    summary = {"run_dir": str(tmp_path), "seconds": 1.5, "tasks": {"heart_disease": {"records": 920}},
               "federated_test": {"heart_disease": {"auroc": 0.8125}}, "privacy_spend": {}, "nan": None}
    assert files.write_summary(summary) == files.summary
    assert files.summary.read_text() == json.dumps(summary, indent=2)  # the format run.py always wrote
    assert files.read_summary() == summary
    # what the deployment's server writes may hold values JSON cannot encode: written as their str, as before
    files.write_summary({"aggregation": {"where": tmp_path}})
    assert files.read_summary() == {"aggregation": {"where": str(tmp_path)}}
    # nobody else writes summary.json
    writers = [p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")
               if re.search(r'summary\.json"\)?\.write_text|\.summary\.write_text', p.read_text())]
    assert writers == ["secure_fedkim/rundir/layout.py"]


def test_a_run_directory_from_before_the_redesign_resolves():
    files = RunDir(FIXTURE)
    cfg = json.loads(files.resolved_config.read_text())
    hospitals = cfg["federation"]["clients"]
    named = {files.config_yaml, files.resolved_config, files.summary, files.global_model, files.keyholder_ledger,
             *files.round_metrics_files()}
    for h in hospitals:
        named |= {files.local_model(h), files.ledger(h), files.public_key(h), files.baseline_ledger(h)}
    on_disk = {p for p in FIXTURE.rglob("*") if p.is_file()}
    assert on_disk == named  # every file the old run wrote is named by the layout, and each of those is there
    assert [files.relative(p) for p in files.round_metrics_files()] == [f"metrics/round_{r:03d}.json" for r in range(3)]
    assert files.round_metrics_files() == [files.round_metrics(r) for r in range(3)]
    assert files.read_summary()["config_sha256"]
    assert not files.features.exists() and not files.audit_json.exists()  # written by later code / later commands
