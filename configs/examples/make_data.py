"""Writes the tiny made-up data sets that the example configs in this folder read (configs/examples/data/).

    python configs/examples/make_data.py [OUT_DIR]

Every file is synthetic (no person's data) and deterministic; the label depends on the inputs, so a model
can learn it. The files are small enough to keep in the repository; tests regenerate them in a temporary
folder and run every example config on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def write_table(out: Path, rng: np.random.Generator) -> None:
    """hospital.csv and hospital.parquet: one row per admission, two sites, some patients twice."""
    n = 240
    patient = rng.integers(0, 180, n)
    age = rng.integers(30, 90, n)
    chol = rng.normal(210, 40, n).round()
    income = rng.integers(20, 400, n) * 1000
    risk = (age - 60) / 15 + (chol - 210) / 40 + rng.normal(0, 0.7, n)
    df = pd.DataFrame({
        "patient_id": [f"p{p:03d}" for p in patient],
        "site": np.where(patient % 2 == 0, "north", "south"),
        "age": age,
        "chol": chol.astype(object),
        "income": [f"{v:,}" for v in income],  # quoted with thousands separators, as spreadsheets export them
        "sex": rng.integers(0, 2, n),
        "ward": rng.choice(["cardiology", "internal", "surgery"], n),  # text: left out, and named in a warning
        "outcome": (risk > 0.3).astype(int),
    })
    df.loc[rng.random(n) < 0.1, "chol"] = None  # NA cells: value 0 plus the 'chol missing' flag
    df.to_csv(out / "hospital.csv", index=False)
    df.assign(income=income, chol=df["chol"].astype(float)).to_parquet(out / "hospital.parquet", index=False)


def write_npz(out: Path, rng: np.random.Generator) -> None:
    """signals.npz: `x` [N, 750] single-lead signals at 250 Hz (3 s), `y` [N] labels (fast rhythm = 1)."""
    n, fs = 120, 250
    t = np.arange(750) / fs
    y = rng.integers(0, 2, n)
    rate = np.where(y == 1, 2.5, 1.0) + rng.normal(0, 0.1, n)  # beats per second
    x = np.sin(2 * np.pi * rate[:, None] * t) ** 15 + rng.normal(0, 0.05, (n, len(t)))
    np.savez(out / "signals.npz", x=x.astype(np.float32), y=y)


def write_images(out: Path, rng: np.random.Generator) -> None:
    """images/*.png and images_labels.csv (file,label): a bright square somewhere = 1."""
    from PIL import Image

    folder = out / "images"
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(80):
        label = i % 2
        a = rng.normal(80, 20, (40, 40))
        if label:
            r, c = rng.integers(4, 24, 2)
            a[r : r + 12, c : c + 12] += 120
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
        rows.append({"file": f"img{i:03d}.png", "label": label, "group": f"patient{i // 2:02d}"})
    pd.DataFrame(rows).to_csv(out / "images_labels.csv", index=False)


def write_wfdb(out: Path, rng: np.random.Generator) -> None:
    """ecg/rec01..rec16 (WFDB, 10 s at 250 Hz, mV) and ecg_labels.csv (record,label): fast rhythm = 1."""
    import wfdb

    folder = out / "ecg"
    folder.mkdir(exist_ok=True)
    fs, rows = 250, []
    t = np.arange(10 * fs) / fs
    for i in range(16):
        label = i % 2
        rate = (2.5 if label else 1.0) + rng.normal(0, 0.1)
        sig = np.sin(2 * np.pi * rate * t) ** 15 + rng.normal(0, 0.05, len(t))
        name = f"rec{i + 1:02d}"
        wfdb.wrsamp(name, fs=fs, units=["mV"], sig_name=["MLII"], p_signal=sig[:, None], fmt=["16"], write_dir=str(folder))
        rows.append({"record": name, "label": label})
    pd.DataFrame(rows).to_csv(out / "ecg_labels.csv", index=False)


def write_jsonl(out: Path, rng: np.random.Generator) -> None:
    """notes.jsonl: one JSON object per line with `text`, `label` and `site`."""
    normal = ["no acute findings", "heart size normal", "lungs are clear", "no effusion"]
    abnormal = ["enlarged cardiac silhouette", "pleural effusion on the left", "patchy opacity at the base"]
    with open(out / "notes.jsonl", "w") as f:
        for i in range(160):
            label = int(rng.random() < 0.5)
            words = rng.choice(abnormal if label else normal, 2).tolist() + rng.choice(normal, 1).tolist()
            f.write(json.dumps({"text": ". ".join(words), "label": label, "site": ["north", "south"][i % 2]}) + "\n")


def write_all(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for write in (write_table, write_npz, write_images, write_wfdb, write_jsonl):
        write(out, rng)
    return out


if __name__ == "__main__":
    print(f"example data written to {write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / 'data')}")
