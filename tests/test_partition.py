"""Persistent public / test / client splits: sizes, disjointness, coverage, stratification, skew, groups."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from secure_fedkim.data import DataError, TaskData, TaskSplit, load_task, partition_task  # noqa: E402
from secure_fedkim.data.partition import DIRICHLET_MIN_RECORDS  # noqa: E402

SITES = ["cleveland", "hungary", "switzerland", "va_long_beach"]


def synthetic(n=1000, pos=0.3, groups=False, seed=0) -> TaskData:
    rng = np.random.default_rng(seed)
    if groups:  # patients with 1..8 records each, one label per patient
        sizes = rng.integers(1, 9, size=n // 4)
        group = np.repeat(np.arange(len(sizes)), sizes).astype(str)
        y = np.repeat((rng.random(len(sizes)) < pos).astype(np.int64), sizes)
    else:
        group, y = None, (rng.random(n) < pos).astype(np.int64)
    return TaskData("synthetic", np.zeros((len(y), 3), np.float32), y, None, group)


def check_cover(split: TaskSplit, n: int):
    parts = [split.public, split.test, *split.clients.values()]
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no repeats
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == n  # disjoint and covering every record
    assert set(allidx.tolist()) == set(range(n))


def place_of(split: TaskSplit, n: int) -> np.ndarray:
    where = np.empty(n, dtype=object)
    where[split.public], where[split.test] = "public", "test"
    for c, idx in split.clients.items():
        where[idx] = c
    return where


def test_iid_sizes_cover_and_stratification():
    d = synthetic()
    clients = [f"h{i}" for i in range(5)]
    s = partition_task(d, clients, scheme="iid", seed=0)
    check_cover(s, len(d))
    assert len(s.test) == 200 and len(s.public) == 100
    sizes = [len(v) for v in s.clients.values()]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 700
    for part in (s.public, s.test):
        assert abs(d.y[part].mean() - d.y.mean()) < 0.01  # stratified by label
    assert list(s.clients) == clients


def test_determinism_and_seed():
    d = synthetic()
    a, b, c = (partition_task(d, ["a", "b", "c"], scheme="dirichlet", alpha=0.3, seed=s) for s in (7, 7, 8))
    for x, y in ((a.public, b.public), (a.test, b.test), *zip(a.clients.values(), b.clients.values())):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.test, c.test) or not np.array_equal(a.clients["a"], c.clients["a"])


def test_natural_partition_is_the_four_hospitals():
    d = load_task("heart_disease")
    s = partition_task(d, list(reversed(SITES)), scheme="natural", seed=0)
    check_cover(s, len(d))
    assert set(s.clients) == set(SITES)
    for site, idx in s.clients.items():
        assert (d.site[idx] == site).all()
        share = len(idx) / (d.site == site).sum()
        assert 0.6 < share < 0.8  # about 70% of each hospital is left after public (10%) and test (20%)
    for part in (s.public, s.test):  # each hospital keeps its share of public and test
        for site in SITES:
            assert abs((d.site[part] == site).mean() - (d.site == site).mean()) < 0.03
        assert abs(d.y[part].mean() - d.y.mean()) < 0.03


def test_natural_errors():
    d = load_task("heart_disease")
    with pytest.raises(DataError) as e:
        partition_task(d, ["cleveland", "hungary"], scheme="natural")
    msg = str(e.value)
    assert "['cleveland', 'hungary']" in msg and str(SITES) in msg
    with pytest.raises(DataError, match="needs a site per record"):
        partition_task(synthetic(), ["a", "b"], scheme="natural")


def _mean_tv(d: TaskData, s: TaskSplit) -> float:
    dist = [np.bincount(d.y[idx], minlength=2) / max(len(idx), 1) for idx in s.clients.values()]
    return float(np.mean([0.5 * np.abs(p - q).sum() for p, q in itertools.combinations(dist, 2)]))


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    d = synthetic(n=3000, pos=0.4)
    clients = [f"h{i}" for i in range(6)]
    tv = {}
    for alpha in (100.0, 1.0, 0.1):
        tvs = []
        for seed in range(3):
            s = partition_task(d, clients, scheme="dirichlet", alpha=alpha, seed=seed)
            check_cover(s, len(d))
            assert min(len(v) for v in s.clients.values()) >= DIRICHLET_MIN_RECORDS
            tvs.append(_mean_tv(d, s))
        tv[alpha] = np.mean(tvs)
    assert tv[100.0] < 0.1 < tv[0.1], tv
    assert tv[100.0] < tv[1.0] < tv[0.1], tv


def test_dirichlet_minimum_size_with_tiny_alpha():
    d = synthetic(n=400)
    s = partition_task(d, [f"h{i}" for i in range(10)], scheme="dirichlet", alpha=0.01, seed=0)
    check_cover(s, len(d))
    assert min(len(v) for v in s.clients.values()) >= DIRICHLET_MIN_RECORDS


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_groups_never_straddle(scheme):
    d = synthetic(groups=True)
    s = partition_task(d, ["a", "b", "c", "d"], scheme=scheme, alpha=0.5, seed=1)
    check_cover(s, len(d))
    where = place_of(s, len(d))
    for g in np.unique(d.group):
        assert len(set(where[d.group == g])) == 1
    assert abs(len(s.test) / len(d) - 0.2) < 0.02 and abs(len(s.public) / len(d) - 0.1) < 0.02


def test_image_groups_and_test_has_both_labels():
    d = load_task("cross_sectional")
    s = partition_task(d, ["a", "b", "c"], scheme="iid", seed=0)
    check_cover(s, len(d))
    where = place_of(s, len(d))
    for g in np.unique(d.group):
        assert len(set(where[d.group == g])) == 1  # crops of one image stay together
    assert set(d.y[s.test]) == {0, 1}  # whole images of both kinds are held out
    assert d.y[np.concatenate(list(s.clients.values()))].sum() > 0  # and others trained on


def test_no_test_or_public():
    d = synthetic(n=50)
    s = partition_task(d, ["a", "b"], public_fraction=0.0, test_fraction=0.0)
    assert len(s.public) == len(s.test) == 0 and sum(len(v) for v in s.clients.values()) == 50


def test_bad_arguments():
    d = synthetic(n=30)
    with pytest.raises(DataError, match="unknown partition scheme 'random'"):
        partition_task(d, ["a"], scheme="random")
    with pytest.raises(DataError, match="distinct names"):
        partition_task(d, ["a", "a"])
    with pytest.raises(DataError, match="sum below 1"):
        partition_task(d, ["a"], public_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="alpha must be > 0"):
        partition_task(d, ["a"], scheme="dirichlet", alpha=0.0)
    with pytest.raises(DataError, match="cannot give 40 clients"):
        partition_task(d, [f"c{i}" for i in range(40)])
