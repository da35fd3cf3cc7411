"""End to end: the CLI runs a real Flower simulation (ServerApp + ClientApps on the simulation engine)."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from secure_fedkim.rundir.artifacts import load_run
from secure_fedkim.cli import main
from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.config import load_config
from secure_fedkim.plan import build_plan

TINY = """
run: {name: tiny, seed: 1, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3}
tasks:
  max_test_records: 60
  train:
    - {name: heart_disease, partition: natural}
    - {name: report_abnormal, partition: iid, max_records: 300}
  unseen: [report_cardiomegaly]
client: {local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}
baseline: {single_hospital: true}
"""


def test_cli_run_writes_a_complete_run_directory(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    text = TINY + "injection: {enabled: true, max_public_per_task: 48}\n"
    cfg_path.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"run written to {out}"
    assert "Federated vs single-hospital" in printed

    assert (out / "config.yaml").read_text() == text
    rounds = sorted(p.name for p in (out / "metrics").iterdir())
    assert rounds == ["fm_test_scores.npz", "round_000.json", "round_001.json", "round_002.json"]
    last = json.loads((out / "metrics" / "round_002.json").read_text())
    assert set(last["clients"]) == {"cleveland", "hungary", "switzerland", "va_long_beach"}
    assert set(last["client_model_test"]) == {"heart_disease", "report_abnormal"}

    cfg, _ = load_config(cfg_path)
    model = new_client_model(cfg, build_plan(cfg))
    state = load_file(str(out / "model" / "client_model.safetensors"))
    model.load_state_dict(state)  # the saved weights are the global model's, complete
    assert not torch.equal(state["heads.heart_disease.linear.weight"], new_client_model(cfg, build_plan(cfg)).state_dict()["heads.heart_disease.linear.weight"])
    run = load_run(out)
    for client in run.clients:  # each hospital's last local model is kept in its own state dir
        assert not torch.equal(run.local_model(client).heads["heart_disease"].linear.weight, model.heads["heart_disease"].linear.weight)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["single_hospital_test"]) == {"cleveland", "hungary", "switzerland", "va_long_beach"}
    # every AUROC of the comparison carries its bootstrap interval, and the verdict is the interval's
    heart = summary["auroc_comparison"]["heart_disease"]
    for cell in [heart["federated"], heart["mean_alone"], *heart["alone"].values()]:
        assert cell["ci95"][0] <= cell["auroc"] <= cell["ci95"][1]
    assert heart["verdict"] in {"beats", "no clear difference", "worse"} and heart["verdict"] in printed
    features = json.loads((out / "features.json").read_text())  # what became the model input, per task
    assert features["heart_disease"]["x_columns"][0] == "age" and features["heart_disease"]["sample_shape"] == [35]
    # the injected FM as released after the last round: the audit's black box answers as the run measured it
    from attacks.audit import _fm_scorer

    assert (out / "fm" / "adapter.safetensors").is_file()
    test = run.plans["heart_disease"].test()
    logits = _fm_scorer(run, "heart_disease")(torch.from_numpy(test.x.astype(np.float32))).numpy()
    with np.load(out / "metrics" / "fm_test_scores.npz") as scores:
        np.testing.assert_allclose(1 / (1 + np.exp(-logits)), scores["round_002.heart_disease"], atol=1e-5)
        assert not np.allclose(scores["round_000.heart_disease"], scores["round_002.heart_disease"], atol=1e-4)


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("rounds: 2", "rounds: 2, epochs: 3"))
    assert main(["run", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"secure-fedkim: error: {bad}: run.epochs: unknown key (allowed: name, seed, rounds, out_dir)"
    assert not (tmp_path / "x").exists()


def test_a_task_can_set_its_own_local_epochs(tmp_path):
    import math

    import yaml

    from secure_fedkim.hospital.local_training import dp_round_schedule, local_round
    from secure_fedkim.config import RunConfig

    raw = yaml.safe_load(TINY)
    raw["tasks"]["train"][1]["local_epochs"] = 3  # report_abnormal; heart_disease keeps client.local_epochs (1)
    cfg = RunConfig.model_validate(raw)
    plans = build_plan(cfg)
    stats = local_round(new_client_model(cfg, plans), plans, "hungary", cfg, server_round=1)
    batches = {t: math.ceil(len(plans[t].shard("hungary")) / 32) for t in ("heart_disease", "report_abnormal")}
    assert stats["heart_disease"]["steps"] == batches["heart_disease"]
    assert stats["report_abnormal"]["steps"] == 3 * batches["report_abnormal"]
    # the DP plan counts the same steps: what the accountant is calibrated for is what the client runs
    assert [steps for _, steps in dp_round_schedule(plans, "hungary", cfg)] == [batches["heart_disease"], 3 * batches["report_abnormal"]]


def test_injection_table_compares_the_last_round_with_round_0_with_paired_intervals(tmp_path):
    """The FM before any injection and after the last round, on the same test records: each AUROC is
    scikit-learn's on the saved probabilities, with its bootstrap interval, and the verdict comes from the
    interval of the paired difference (an identical model is never called better)."""
    from pathlib import Path
    from types import SimpleNamespace

    from sklearn.metrics import roc_auc_score

    from secure_fedkim.rundir.artifacts import FM_SCORES
    from secure_fedkim.config import RunConfig
    from secure_fedkim.drivers.run import RunResult, compare_injection, format_injection

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    noise = rng.random(200)
    plans = {name: SimpleNamespace(task=SimpleNamespace(role=role), test=lambda: SimpleNamespace(y=y))
             for name, role in (("a", "train"), ("u", "unseen"))}
    (tmp_path / "metrics").mkdir()
    np.savez(tmp_path / "metrics" / FM_SCORES, **{"round_000.a": noise, "round_002.a": 0.6 * y + noise,
                                                  "round_000.u": noise, "round_002.u": noise})
    cfg = RunConfig.model_validate(yaml.safe_load(TINY))
    comparison = compare_injection(cfg, plans, tmp_path, last=2)
    a, u = comparison["a"], comparison["u"]
    assert a["injected"]["auroc"] == pytest.approx(roc_auc_score(y, 0.6 * y + noise))
    assert a["round_0"]["auroc"] == pytest.approx(roc_auc_score(y, noise))
    assert a["difference_ci95"][0] > 0 and a["verdict"] == "beats"
    assert u["difference_ci95"] == [0.0, 0.0] and u["verdict"] == "no clear difference" and u["role"] == "unseen"
    for c in (a, u):
        for cell in (c["round_0"], c["injected"]):
            assert cell["ci95"][0] <= cell["auroc"] <= cell["ci95"][1]
    history = [{"client_model_test": {}}] * 3
    lines = format_injection(RunResult(Path("."), history, {}, fm_comparison=comparison)).splitlines()
    assert lines[0].startswith("Foundation model: injected (round 2) vs without injection (round 0)")
    assert lines[2].split()[:2] == ["a", "train"] and "beats" in lines[2]
    assert "no clear difference" in lines[3]
    assert format_injection(RunResult(Path("."), history, {})) == ""
    assert compare_injection(cfg, plans, tmp_path / "elsewhere", last=2) == {}


def test_the_baseline_trains_hospitals_in_parallel_exactly_as_one_after_another(tmp_path):
    """Without DP a hospital's baseline is deterministic (seeded model and loaders): the parallel processes
    must give the same test probabilities (float rounding aside) as training the hospitals one after another in this process."""
    import yaml

    from secure_fedkim.hospital.baseline import single_hospital_baseline
    from secure_fedkim.config import RunConfig

    raw = yaml.safe_load(TINY)
    raw["federation"]["clients"] = ["cleveland", "hungary"]
    raw["federation"]["min_clients"] = 2
    raw["tasks"]["train"] = [{"name": "report_abnormal", "partition": "iid", "max_records": 200}]
    cfg = RunConfig.model_validate(raw)
    one, two = {}, {}
    seq = single_hospital_baseline(cfg, tmp_path, one, workers=1)
    par = single_hospital_baseline(cfg, tmp_path, two, workers=2)
    assert list(par) == ["cleveland", "hungary"]
    for c in one:  # the same up to float summation order (one torch thread per process there, two here)
        assert np.allclose(one[c]["report_abnormal"], two[c]["report_abnormal"], atol=1e-5)
        assert abs(par[c]["report_abnormal"]["auroc"] - seq[c]["report_abnormal"]["auroc"]) < 1e-3
    assert not (one["cleveland"]["report_abnormal"] == one["hungary"]["report_abnormal"]).all()
