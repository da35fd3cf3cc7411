"""The user's path (issue #17): a hospital's own data, budget and evidence, without reading the source."""

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from secure_fedkim.cli import main
from secure_fedkim.config import ConfigError, load_config, parse_config
from secure_fedkim.data import DataError, load_user_data
from secure_fedkim.data.formats import DataWarning
from secure_fedkim.metrics import _weighted_auroc, bootstrap_aurocs, interval, verdict
from secure_fedkim.drivers.run import RunResult, format_comparison, format_round_table, warn_about_data
from secure_fedkim.hospital.local_training import load_plans

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "configs" / "examples"
EXAMPLE_CONFIGS = ["csv", "parquet", "npz", "png", "wfdb", "jsonl"]


def _example_data():
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(tmp_path, text: str) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


# ---- 1. no column disappears silently ------------------------------------------------------------

def test_thousands_separators_are_numbers_and_a_left_out_column_is_named(tmp_path):
    p = _table(tmp_path, 'age,income,ward,y\n50,"265,000",icu,1\n61,"1,234.5",ward,0\n70,,icu,1\n')
    with pytest.warns(DataWarning, match=r"left out of the features: \['ward'\]"):
        d = load_user_data({"format": "csv", "path": str(p), "label": "y"}, "tabular")
    assert d.inputs["features"] == ["age", "income"]  # income was dropped before: read as text
    assert d.inputs["x_columns"] == ["age", "income", "age missing", "income missing"]
    assert "encode categories" in d.inputs["left_out"]["ward"]
    v = np.sign(265000.0) * np.log1p(265000.0)
    assert d.x[0, 1] == pytest.approx(v, rel=1e-6) and d.x[2, 1] == 0 and d.x[2, 3] == 1  # NA: 0 + flag


def test_not_numeric_gives_advice_for_what_it_saw(tmp_path):
    p = _table(tmp_path, "lab,ward,y\n5.1,icu,1\n<0.5,ward,0\n4.2,icu,1\n3.3,ward,0\n")
    with pytest.raises(DataError, match=r"'lab': mostly numbers but 1 distinct non-numeric value\(s\) such as \[.<0.5.\]"):
        load_user_data({"format": "csv", "path": str(p), "label": "y", "features": ["lab"]}, "tabular")
    with pytest.raises(DataError, match="'ward': categories such as .*encode categories as numbers"):
        load_user_data({"format": "csv", "path": str(p), "label": "y", "features": ["ward"]}, "tabular")


@pytest.mark.parametrize("text", ["", "a,b,y\n"])
def test_an_empty_csv_says_no_rows(tmp_path, text):
    with pytest.raises(DataError, match="no rows"):
        load_user_data({"format": "csv", "path": str(_table(tmp_path, text)), "label": "y"}, "tabular")


# ---- 4. source keys and paths --------------------------------------------------------------------

def _user_task(source: dict) -> dict:
    return {"federation": {"clients": ["a", "b"]},
            "tasks": {"train": [{"name": "mine", "modality": "signal", "task_description": "t", "question": "q?",
                                 "source": source}]}}


def test_the_source_keys_of_formats_py_are_accepted_and_checked(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 400)), y=np.array([0, 1, 0, 1]))
    ok = {"format": "npy", "path": "s.npz", "label": "y", "key": "x", "fs": 250, "channel": 0, "task": "mine"}
    src = parse_config(_user_task(ok), source="c.yaml", base_dir=tmp_path).tasks.train[0].source
    assert (src.key, src.fs, src.channel, src.task) == ("x", 250.0, 0, "mine")
    bad = [({"fs": 0}, "source.fs: Input should be greater than 0"),
           ({"channel": -1}, "source.channel: an index must be >= 0"),
           ({"channel": "MLII"}, "source.channel: npy channels are indices"),
           ({"group": "pid"}, "source.site: npy arrays have no columns"),
           ({"format": "csv", "path": "s.npz"}, "source.key: only for format npy, not 'csv'"),
           ({"colour": 1}, "source.colour: unknown key (allowed: format, path")]
    for change, message in bad:
        with pytest.raises(ConfigError) as e:
            parse_config(_user_task({**ok, **change}), source="c.yaml", base_dir=tmp_path)
        assert str(e.value).startswith("c.yaml: tasks.train[0].source") and message in str(e.value), str(e.value)


def test_a_group_key_reaches_the_loader(tmp_path):
    (tmp_path / "t.csv").write_text("pid,v,y\n" + "".join(f"p{i // 2},{i},{i % 2}\n" for i in range(40)))
    cfg = parse_config({**_user_task({"format": "csv", "path": "t.csv", "label": "y", "group": "pid"}),
                        "federation": {"clients": ["a", "b"]}} | {"tasks": {"train": [
                            {"name": "mine", "modality": "tabular", "task_description": "t", "question": "q?",
                             "source": {"format": "csv", "path": "t.csv", "label": "y", "group": "pid"}}]}},
                       source="c.yaml", base_dir=tmp_path)
    plan = load_plans(cfg)["mine"]
    assert plan.data.group[0] == "p0" and plan.data.inputs["features"] == ["v"]


def test_a_label_file_resolves_against_the_config_file_like_path(tmp_path, monkeypatch):
    d = tmp_path / "cfg"
    (d / "ecg").mkdir(parents=True)
    (d / "ecg_labels.csv").write_text("record,label\n")
    source = {"format": "wfdb", "path": "ecg", "label": "ecg_labels.csv"}
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's folder
    cfg = parse_config(_user_task(source), source="c.yaml", base_dir=d)
    assert cfg.tasks.train[0].source.label == str((d / "ecg_labels.csv").resolve())
    with pytest.raises(ConfigError, match=r"c.yaml: tasks.train\[0\].source.label: no such file .*: nowhere.csv"):
        parse_config(_user_task({**source, "label": "nowhere.csv"}), source="c.yaml", base_dir=d)


# ---- 3. no half-written run directory ------------------------------------------------------------

def test_a_data_error_names_config_key_and_file_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("v,y\n1,yes\n2,no\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("federation: {clients: [a, b]}\ntasks: {train: [{name: mine, modality: tabular, task_description: t, "
                   "question: q, source: {format: csv, path: t.csv, label: y}}]}\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{cfg}: tasks.train[0].source.path: {tmp_path / 't.csv'}: label 'y' is not binary" in err
    assert not out.exists()  # the rerun after fixing the data is not refused


def test_bad_yaml_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("federation: {clients: [a, b]}\ntasks: {train: [{name: x, question: q?, }]}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not valid YAML" in err and not (tmp_path / "run").exists()


def test_a_config_error_found_while_building_the_model_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("federation: {clients: [a, b]}\ntasks: {train: [{name: cross_sectional, max_records: 200}]}\n"
                   "client: {num_tokens: 2}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "num_tokens must be a square" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ---- 6. warnings ----------------------------------------------------------------------------------

def test_a_shard_without_positives_and_a_one_hospital_federation_are_warned(tmp_path):
    rows = [f"{s},{v},{int(s == 'north' and v % 2)}\n" for v in range(60) for s in ("north", "south")]
    (tmp_path / "t.csv").write_text("site,v,y\n" + "".join(rows))
    task = {"name": "mine", "modality": "tabular", "task_description": "t", "question": "q?", "partition": "natural",
            "source": {"format": "csv", "path": "t.csv", "label": "y", "site": "site"}}
    cfg = parse_config({"federation": {"clients": ["north", "south"]}, "tasks": {"train": [task]}}, base_dir=tmp_path)
    with pytest.warns(DataWarning, match="task 'mine': hospital 'south' has no positive record") as record:
        warn_about_data(cfg, load_plans(cfg))
    assert len(record) == 1
    one = parse_config({"federation": {"clients": ["north"], "min_clients": 1},
                        "tasks": {"train": [{**task, "partition": "iid"}]}}, base_dir=tmp_path)
    with pytest.warns(DataWarning, match="a one-hospital federation"):
        warn_about_data(one, load_plans(one))


def test_an_epsilon_below_the_prv_resolution_is_not_printed_as_the_budget():
    record = {"client_model_test": {}, "clients": {"a": {"epsilon-spent": 0.00999}, "b": {"epsilon-spent": 0.0099}}}
    table = format_round_table(1, record, prv_clients={"a"})
    assert "a=<=0.01 (PRV resolution)" in table and "b=0.010" in table and "per record" in table


# ---- 9. intervals and verdicts --------------------------------------------------------------------

@pytest.mark.parametrize("difference, expected", [
    ((0.01, 0.2), "beats"), ((-0.05, 0.1), "no clear difference"), ((0.0, 0.1), "no clear difference"),
    ((-0.3, -0.02), "worse"),
])
def test_the_verdict_follows_the_interval_of_the_difference(difference, expected):
    assert verdict(difference) == expected


def test_bootstrap_auroc_is_sklearn_on_the_resampled_records_and_deterministic():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.4 * y, 1)  # ties
    counts = np.stack([np.bincount(rng.integers(0, 200, 200), minlength=200) for _ in range(4)]).astype(float)
    assert _weighted_auroc(y, s, counts) == pytest.approx([roc_auc_score(np.repeat(y, c.astype(int)), np.repeat(s, c.astype(int))) for c in counts])
    a, b = bootstrap_aurocs(y, [s, -s], seed=3), bootstrap_aurocs(y, [s, -s], seed=3)
    assert np.array_equal(a, b) and np.allclose(a[:, 0], 1 - a[:, 1])
    lo, hi = interval(a[:, 0])
    assert lo < roc_auc_score(y, s) < hi and hi - lo < 0.2
    assert not np.array_equal(a, bootstrap_aurocs(y, [s, -s], seed=4))


def test_the_comparison_table_shows_every_interval_and_the_verdict():
    cell = lambda a, lo, hi: {"auroc": a, "ci95": [lo, hi]}
    comparison = {"heart": {"federated": cell(0.81, 0.75, 0.86), "alone": {"north": cell(0.7, 0.6, 0.8), "south": cell(0.6, 0.5, 0.7)},
                            "mean_alone": cell(0.65, 0.57, 0.73), "difference_ci95": [0.05, 0.25], "verdict": "beats"}}
    result = RunResult(Path("."), [], {"heart": {}, "ecg": {}}, {"north": {}, "south": {}}, comparison)
    table = format_comparison(result)
    for text in ("0.810 [0.75, 0.86]", "0.700 [0.60, 0.80]", "0.650 [0.57, 0.73]", "beats (difference [+0.05, +0.25])",
                 "no AUROC for ['ecg']"):
        assert text in table


# ---- 5. bring your own data: the example configs --------------------------------------------------

@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The example configs beside freshly generated tiny data, as a user would lay them out."""
    d = tmp_path_factory.mktemp("examples")
    _example_data().write_all(d / "data")
    for name in EXAMPLE_CONFIGS:
        shutil.copy(EXAMPLES / f"{name}.yaml", d / f"{name}.yaml")
    return d


def test_every_example_config_is_in_the_readme_as_written():
    readme = (ROOT / "README.md").read_text()
    for name in EXAMPLE_CONFIGS:
        assert (EXAMPLES / f"{name}.yaml").read_text() in readme, name


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_every_example_config_loads_its_data(examples, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        cfg, _ = load_config(examples / f"{name}.yaml")
        plans = load_plans(cfg, examples / f"{name}.yaml")
    (plan,) = plans.values()
    assert len(plan.data) >= 80 and plan.data.inputs and all(len(v) for v in plan.split.clients.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_every_example_config_runs_as_written(examples, name, capsys, monkeypatch):
    monkeypatch.chdir(examples)
    out = examples / f"run-{name}"
    assert main(["run", f"{name}.yaml", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run written to {out}"
    features = json.loads((out / "features.json").read_text())
    assert len(features) == 1 and next(iter(features.values()))["records"] >= 80
