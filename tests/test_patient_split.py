"""The privacy unit of every task: the registry names it, every built-in task sets it as `TaskData.group`, and
no group straddles the public split, the test split and the hospitals' shards (the plan the demo builds)."""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from secure_fedkim.hospital.local_training import n_patients  # noqa: E402
from secure_fedkim.config import parse_config  # noqa: E402
from secure_fedkim.data import TASKS, load_task, partition_task  # noqa: E402
from secure_fedkim.data.tasks import PERSONS, USER_UNIT_PATIENT, USER_UNIT_RECORD, persons_kind  # noqa: E402
from secure_fedkim.plan import build_plan  # noqa: E402

ROOT = Path(__file__).parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
CLIENTS = DEMO["federation"]["clients"]
SMALL = {"mortality": 3000, "mortality_visits": 3000}  # max_records where the full task is large


def _config(train: list[dict], unseen: list) -> dict:
    raw = copy.deepcopy(DEMO)
    raw["tasks"]["train"], raw["tasks"]["unseen"] = train, unseen
    return raw


def _demo_plans():
    """The demo's plan with every built-in task: its train tasks (+ mortality_visits) and unseen tasks; then
    the demo's unseen tasks as train tasks and its timeseries and text train tasks as unseen ones (an unseen
    task needs a train task of its modality, so tabular, signal and image stay train tasks there)."""
    train = [{**t, **({"max_records": SMALL[t["name"]]} if t["name"] in SMALL else {})} for t in DEMO["tasks"]["train"]]
    train.append({"name": "mortality_visits", "partition": "dirichlet", "alpha": 1.0, "max_records": SMALL["mortality_visits"]})
    unseen = list(DEMO["tasks"]["unseen"])
    demo = build_plan(parse_config(_config(train, unseen), source="demo.yaml"))
    stay = [t for t in train if TASKS[t["name"]].modality in ("tabular", "signal", "image")]
    swapped = build_plan(parse_config(_config(stay + [{"name": n, "partition": "iid"} for n in unseen],
                                              [t["name"] for t in train if t not in stay]), source="swapped.yaml"))
    return demo, swapped


@pytest.fixture(scope="module")
def plans():
    return _demo_plans()


def test_every_registry_task_names_its_privacy_unit():
    for name, task in TASKS.items():
        assert task.privacy_unit and task.persons in PERSONS and task.persons_note, name
        if task.persons != "many":  # say plainly that no patient-level guarantee can be given
            assert "no patient-level guarantee" in task.persons_note, name
    assert TASKS["ecg_irregular"].persons == "one" and TASKS["cross_sectional"].persons == "few"


def test_every_built_in_task_is_split_by_group_and_sets_groups(plans):
    demo, swapped = plans
    assert set(demo) | set(swapped) == set(TASKS)
    seen_train, seen_unseen = set(), set()
    for plan in list(demo.values()) + list(swapped.values()):
        d = plan.data
        assert d.group is not None, f"{plan.name}: no privacy unit (group)"
        if plan.task.role == "unseen":
            seen_unseen.add(plan.name)
            assert len(plan.test()) == len(plan.split.test) and plan.test().group is not None
            continue
        seen_train.add(plan.name)
        parts = {"public": plan.public(), "test": plan.test(), **{c: plan.shard(c) for c in CLIENTS}}
        owner: dict[str, str] = {}
        for where, part in parts.items():
            assert part.group is not None
            for g in set(part.group.tolist()):
                assert owner.setdefault(g, where) == where, f"{plan.name}: group {g} in {owner[g]} and {where}"
        assert sum(len(p) for p in parts.values()) <= len(d)  # max_test_records caps the test split
    assert seen_train == set(TASKS)
    assert seen_unseen == {"report_cardiomegaly", "cardiovascular_event", "mortality", "mortality_visits", "report_abnormal"}


def test_registry_persons_match_the_data(plans):
    demo, swapped = plans
    for plan in list(demo.values()) + list(swapped.values()):
        full = load_task(plan.name)
        n = len(set(full.persons.tolist()))
        assert persons_kind(n) == plan.task.persons == TASKS[plan.name].persons, (plan.name, n)
    assert len(set(load_task("ecg_irregular").persons)) == 1
    assert len(set(load_task("cross_sectional").persons)) == 12


def test_persons_of_finer_units_straddle_and_the_registry_says_so(plans):
    demo, _ = plans
    im = demo["cross_sectional"]
    assert set(im.test().person) & set(im.shard(CLIENTS[0]).person)  # one image in test and in training
    assert "no patient-level guarantee" in im.task.persons_note
    ecg = demo["ecg_irregular"]
    assert set(ecg.test().persons) == set(ecg.shard(CLIENTS[0]).persons) == {"mitdb-208"}


def test_patients_with_several_records_stay_whole(plans):
    demo, _ = plans
    v = demo["mortality_visits"]
    _, per = np.unique(v.data.group, return_counts=True)
    assert per.max() > 1 and len(v.data) <= SMALL["mortality_visits"]
    full = dict(zip(*np.unique(load_task("mortality_visits").group, return_counts=True)))
    assert all(full[g] == c for g, c in zip(*np.unique(v.data.group, return_counts=True)))  # max_records: whole patients


@pytest.mark.parametrize("name,scheme", [("mortality", "dirichlet"), ("ecg_irregular", "iid"),
                                         ("report_abnormal", "dirichlet"), ("cross_sectional", "iid")])
def test_groups_leave_the_older_splits_as_they_were(name, scheme):
    """Groups of one record each are sorted like the records: the split equals the split without groups."""
    d = load_task(name, max_records=SMALL.get(name))
    with_groups = partition_task(d, CLIENTS, scheme, alpha=1.0)
    without = partition_task(replace(d, group=None) if name != "cross_sectional" else d, CLIENTS, scheme, alpha=1.0)
    for a, b in [(with_groups.public, without.public), (with_groups.test, without.test)] + [
            (with_groups.clients[c], without.clients[c]) for c in CLIENTS]:
        np.testing.assert_array_equal(a, b)


def test_n_patients_counts_persons_per_task_and_sums(plans):
    demo, _ = plans
    for c in CLIENTS:  # persons, not the split's unit: all ECG windows are one person, crops share their image
        want = sum(len(set(p.shard(c).persons.tolist())) for p in demo.values() if p.task.role == "train")
        assert n_patients(demo, c) == want > 0
        assert len(set(demo["ecg_irregular"].shard(c).persons.tolist())) == 1
    visits = demo["mortality_visits"].shard(CLIENTS[0])
    assert len(set(visits.group)) < len(visits)  # there, patients are fewer than records


def _user_plan(tmp_path, group: bool):
    rng = np.random.default_rng(0)
    pids = np.repeat([f"p{i:03d}" for i in range(60)], rng.integers(1, 6, size=60))  # 1..5 records per patient
    y = np.repeat(rng.integers(0, 2, size=60), np.unique(pids, return_counts=True)[1])
    rows = [f"{p},{rng.normal():.3f},{rng.normal():.3f},{lab}"[0 if group else 5:] for p, lab in zip(pids, y)]
    (tmp_path / "mine.csv").write_text(("pid," if group else "") + "a,b,y\n" + "\n".join(rows) + "\n")
    source = {"format": "csv", "path": "mine.csv", "label": "y", **({"group": "pid"} if group else {})}
    raw = {"federation": {"clients": ["h1", "h2", "h3"]}, "tasks": {"train": [
        {"name": "mine", "modality": "tabular", "task_description": "t", "question": "q?", "source": source}], "unseen": []}}
    return build_plan(parse_config(raw, source="c.yaml", base_dir=tmp_path))["mine"], pids


def test_a_user_csv_with_group_is_split_by_patient(tmp_path):
    plan, pids = _user_plan(tmp_path, group=True)
    assert plan.task.privacy_unit == USER_UNIT_PATIENT == "patient" and plan.task.persons == "many"
    places = {"public": plan.split.public, "test": plan.split.test, **plan.split.clients}
    owner = {}
    for where, idx in places.items():
        for p in set(pids[idx].tolist()):
            assert owner.setdefault(p, where) == where, f"patient {p} in {owner[p]} and {where}"
    assert len(owner) == 60 and len(pids) > 60
    assert n_patients({"mine": plan}, "h1") == len(set(plan.shard("h1").group.tolist())) < len(plan.shard("h1"))


def test_a_user_csv_without_group_counts_each_record(tmp_path):
    plan, pids = _user_plan(tmp_path, group=False)
    assert plan.task.privacy_unit == USER_UNIT_RECORD and plan.data.group is None
    assert str(len(pids)) + " records counted as persons" in plan.task.persons_note
    assert n_patients({"mine": plan}, "h2") == len(plan.shard("h2"))
