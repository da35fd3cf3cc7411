"""The comparison study (#27): its paired intervals, its resume, its config errors, and one real tiny study."""

import json
import math
import shutil
import uuid

import numpy as np
import pytest
from scipy import stats

from secure_fedkim.config import ConfigError, parse_config
from secure_fedkim.rundir.layout import StudyDir
from secure_fedkim.drivers.study import (
    format_study,
    paired_interval,
    paired_rows,
    run_study,
    study_runs,
)

TINY = {
    "run": {"name": "tiny", "rounds": 1},
    "federation": {"clients": ["a", "b"], "min_clients": 2},
    "tasks": {"max_test_records": 40, "train": [{"name": "report_abnormal", "partition": "iid", "max_records": 200}],
              "unseen": ["report_cardiomegaly"]},
    "client": {"local_epochs": 1, "batch_size": 32, "token_dim": 8, "num_tokens": 2},
    "injection": {"enabled": True, "max_public_per_task": 24, "num_experts": 2},
}
DP = {"dp": True, "profile": {"target_epsilon": 8.0, "accountant": "rdp"}}


def study_data(dp: bool = True, **study) -> dict:
    """The tiny federation with a study of two variants and two seeds, with and without DP; ``study``
    changes its study section (a None value removes a key)."""
    section = {"variants": ["fedkim", "fedplug"], "seeds": [0, 1], "privacy": ["dp", "plain"], **study}
    section = {k: v for k, v in section.items() if v is not None}
    return {**TINY, "study": section} | ({"privacy": DP} if dp else {})


def fake_runner(cfg, config_text, run_dir):
    """A stand-in for a federation (run in the study's worker processes): AUROCs set by variant, seed and DP, and
    a fresh id per call, so a test can tell a run that ran again from one that did not."""
    shift = {"fedkim": 0.10, "fedplug": 0.0, "fedkim_pub": 0.02}[cfg.injection.method]
    noise = 0.03 * math.sin(7 * cfg.run.seed + len(cfg.injection.method)) - (0.05 if cfg.privacy.dp else 0.0)
    cell = lambda role, auroc: {"role": role, "auroc": auroc, "accuracy": auroc - 0.1}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_text)
    (run_dir / "summary.json").write_text(json.dumps({
        "id": uuid.uuid4().hex,
        "fm_test": {"report_abnormal": cell("train", 0.6 + shift + noise), "report_cardiomegaly": cell("unseen", 0.55 + noise)},
        "fm_test_round0": {"report_abnormal": cell("train", 0.5 + noise / 2), "report_cardiomegaly": cell("unseen", 0.5)},
    }))


def ids(study: StudyDir, keys) -> dict[str, str]:
    return {k.label: json.loads((study.run(k.variant, k.seed, k.privacy) / "summary.json").read_text())["id"] for k in keys}


def test_paired_interval_is_scipys_paired_t_interval():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.7, 0.05, 10), rng.normal(0.65, 0.05, 10)
    got = paired_interval(a - b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got["n"] == 10 and got["mean"] == pytest.approx(np.mean(a - b))
    assert got["ci95"] == pytest.approx([ci.low, ci.high])
    # by hand for 3 seeds: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653
    assert paired_interval([0.01, 0.02, 0.03])["ci95"] == pytest.approx([0.02 - 4.302653 * 0.01 / 3 ** 0.5,
                                                                          0.02 + 4.302653 * 0.01 / 3 ** 0.5])
    assert paired_interval([0.1, math.nan, 0.2])["n"] == 2  # a pair with a NaN AUROC (one-class test set) drops out
    assert math.isnan(paired_interval([0.1])["ci95"][0])


def test_paired_rows_pair_by_seed_and_give_the_verdict_of_the_interval():
    run = lambda k, r0=0.5: {"fm_test": {"t": {"role": "train", "auroc": k}}, "fm_test_round0": {"t": {"role": "train", "auroc": r0}}}
    runs = {"fedplug": {"0": run(0.60), "1": run(0.70), "2": run(0.65)},
            "fedkim": {"0": run(0.62), "1": run(0.725), "2": run(0.665)}}  # +0.02, +0.025, +0.015: above 0
    rows = {r["comparison"]: r for r in paired_rows(runs)}
    assert rows["FEDKIM - FedPlug"]["verdict"] == "FEDKIM better" and rows["FEDKIM - FedPlug"]["n"] == 3
    assert rows["FEDKIM - FedPlug"]["mean"] == pytest.approx(0.02)
    assert rows["FedPlug injected - round 0"]["verdict"] == "injection better"
    runs["fedkim"]["2"] = run(0.50)
    assert {r["comparison"]: r for r in paired_rows(runs)}["FEDKIM - FedPlug"]["verdict"] == "no difference shown"


def test_config_seed_count_privacy_and_one_message_per_error():
    cfg = parse_config(study_data(seed_count=4, seeds=None), "study.yaml")
    assert cfg.study.seeds == [0, 1, 2, 3] and len(study_runs(cfg)) == 4 * 2 * 2
    bad = [({"variants": ["fedkim", "fedfoo"]}, "study.yaml: study.variants[1]: Input should be 'fedkim'"),
           ({"seeds": []}, "study.yaml: study.seeds: List should have at least 1 item"),
           ({"seeds": [1, 1]}, "study.yaml: study.seeds: listed twice: [1]"),
           ({"seed_count": 3}, "study.yaml: study.seed_count: give seeds or seed_count, not both"),
           ({"privacy": ["dp"]}, "study.yaml: study: privacy lists 'dp' but the config's privacy section has no DP")]
    for study, message in bad:
        with pytest.raises(ConfigError) as e:
            parse_config(study_data(dp=False, **study), "study.yaml")
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_resumed_study_runs_only_what_is_missing_and_ends_with_the_same_table(tmp_path):
    cfg = parse_config(study_data(), "study.yaml")
    _, whole = run_study(cfg, "study", tmp_path / "whole", progress=False, runner=fake_runner)

    # the same study killed after 5 of its 8 runs: 2 never started, 1 killed half-way (no summary.json)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    study = StudyDir(tmp_path / "resumed")
    keys = study_runs(cfg)
    for k in keys[5:]:
        shutil.rmtree(study.run(k.variant, k.seed, k.privacy))
    half = study.run(keys[5].variant, keys[5].seed, keys[5].privacy)
    half.mkdir()
    (half / "config.yaml").write_text("partial")
    done = ids(study, keys[:5])
    _, resumed = run_study(cfg, "study", study.root, progress=False, runner=fake_runner)
    assert {k: v for k, v in ids(study, keys).items() if k in done} == done  # not run again
    assert json.loads((half / "summary.json").read_text())["fm_test"]  # redone from nothing

    untimed = lambda rec: {m: {v: {s: {k: x for k, x in run.items() if k != "wall_seconds"} for s, run in by_seed.items()}
                               for v, by_seed in part["runs"].items()} for m, part in rec["privacy"].items()}
    assert untimed(resumed) == untimed(whole)  # the same runs ...
    assert [p["paired"] for p in resumed["privacy"].values()] == [p["paired"] for p in whole["privacy"].values()]
    assert format_study(resumed) == format_study(whole)  # ... and the same table
    assert json.loads(study.results.read_text())["privacy"] == resumed["privacy"]
    assert study.plot("dp").is_file() and study.plot("plain").is_file()
    table = format_study(resumed)
    assert "== dp: DP-SGD at every hospital, epsilon 8 per record" in table and "== plain: without DP ==" in table
    assert "FEDKIM - FedPlug" in table and "FEDKIM better" in table and "paired t interval" in table


def test_a_study_directory_of_another_federation_is_refused(tmp_path):
    run_study(parse_config(study_data(seeds=[0], variants=["fedkim"]), "s.yaml"), "x", tmp_path / "s",
              progress=False, runner=fake_runner)
    other = study_data(seeds=[0], variants=["fedkim"])
    other["tasks"] = {**other["tasks"], "max_test_records": 50}
    with pytest.raises(ConfigError, match="another federation config .*tasks.max_test_records"):
        run_study(parse_config(other, "s.yaml"), "x", tmp_path / "s", progress=False, runner=fake_runner)


@pytest.mark.slow
def test_a_real_tiny_study_resumes_with_the_same_table(tmp_path):
    """Four real federations (2 variants x 2 seeds, no DP: a run repeats exactly), two at a time; one run's
    summary is removed as if it had been killed, and the study run again redoes that one only."""
    cfg = parse_config({**TINY, "study": {"variants": ["fedkim", "fedplug"], "seeds": [0, 1], "workers": 2}}, "s.yaml")
    study = StudyDir(tmp_path / "study")
    _, first = run_study(cfg, "tiny study", study.root, progress=False)
    before = {k.label: study.run(k.variant, k.seed, k.privacy).stat().st_mtime_ns for k in study_runs(cfg)}
    (study.run("fedplug", 1, "plain") / "summary.json").unlink()
    _, again = run_study(cfg, "tiny study", study.root, progress=False)
    after = {k.label: study.run(k.variant, k.seed, k.privacy).stat().st_mtime_ns for k in study_runs(cfg)}
    assert {k for k in before if before[k] != after[k]} == {"plain/fedplug-seed1"}
    assert format_study(again) == format_study(first)
    # the gate's routing, computed once per gated run from its saved adapter and its seed
    routing = json.loads((study.run("fedkim", 0, "plain") / "metrics" / "fm_routing.json").read_text())
    assert set(routing["final"]["tasks"]) == {"report_abnormal", "report_cardiomegaly"}
    assert routing["initial"] != routing["final"]  # injection trained the gate
    assert not (study.run("fedplug", 0, "plain") / "metrics" / "fm_routing.json").exists()  # no gate
    rows = first["privacy"]["plain"]["routing"]
    assert {r["variant"] for r in rows} == {"FEDKIM"} and rows[0]["n"] == 2
    assert "How the M3OE gate routes each task" in format_study(first)


def test_routing_entropy_and_separation_against_hand_computed_values():
    from secure_fedkim.fm.routing import routing_of

    uniform = routing_of({"a": np.full(4, 0.25), "b": np.full(4, 0.25)})
    assert uniform["tasks"]["a"]["entropy"] == pytest.approx(1.0) and uniform["mean_pairwise_tv"] == pytest.approx(0.0)
    disjoint = routing_of({"a": np.eye(4)[0], "b": np.eye(4)[1], "c": np.eye(4)[1]})
    assert disjoint["tasks"]["a"]["entropy"] == 0.0 and disjoint["tasks"]["b"]["top_expert"] == 1
    assert disjoint["mean_pairwise_tv"] == pytest.approx((1 + 1 + 0) / 3)
    half = routing_of({"a": np.array([0.5, 0.5, 0.0, 0.0])})["tasks"]["a"]
    assert half["entropy"] == pytest.approx(math.log(2) / math.log(4)) and half["top_weight"] == 0.5


def thread_runner(cfg, config_text, run_dir):
    """A stand-in federation that records the torch threads its worker process computes with."""
    import torch

    fake_runner(cfg, config_text, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary | {"threads": torch.get_num_threads()}))


def test_parallel_runs_share_the_cores(tmp_path):
    import os

    cfg = parse_config(study_data(privacy=["plain"], seeds=[0], workers=2), "study.yaml")
    run_study(cfg, "study", tmp_path, progress=False, runner=thread_runner)
    threads = {json.loads((tmp_path / "plain" / f"{v}-seed0" / "summary.json").read_text())["threads"]
               for v in ("fedkim", "fedplug")}
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}


def test_the_study_config_and_the_study_process_load_neither_torch_nor_flower():
    """The study's own process only parses, schedules and summarises; torch and Flower load in its workers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = ("import sys; import secure_fedkim.drivers.study; from secure_fedkim.config import load_config; "
             "c, _ = load_config('configs/study.yaml'); print(len(c.study.seeds), c.study.privacy, "
             "sorted(m for m in ('torch', 'flwr', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "10 ['dp', 'plain'] []"


def test_a_run_whose_saved_fm_cannot_be_read_loses_only_its_routing(tmp_path, capsys):
    cfg = parse_config(study_data(privacy=["plain"], seeds=[0]), "study.yaml")
    run_study(cfg, "study", tmp_path, progress=False, runner=fake_runner)
    broken = tmp_path / "plain" / "fedkim-seed0"
    (broken / "fm").mkdir()
    (broken / "fm" / "adapter_config.json").write_text("{not json")
    _, record = run_study(cfg, "study", tmp_path, progress=True, runner=fake_runner)
    out = capsys.readouterr()
    assert "plain/fedkim-seed0: no routing: JSONDecodeError" in out.out + out.err
    assert record["privacy"]["plain"]["paired"] and not (broken / "metrics" / "fm_routing.json").exists()
