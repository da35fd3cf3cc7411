"""The FEDKIM study (#27): FEDKIM against FedPlug, FedPlug_L and FEDKIM_pub on the demo's federation, under DP
and without, with paired 95% t intervals over seeds; prints the table and the wall time.

    python bench/bench_fedkim_study.py [--config configs/study.yaml] [--seeds N] [--out DIR] [--workers W]
                                       [--variants fedkim fedplug ...] [--privacy dp plain]

Every variant-seed run is a real federation, in parallel worker processes (one per core unless --workers).
The study directory (--out, default runs/<name>-study-<hash of the federation config>) is resumable: run the
same command again and only the missing runs run; a study with more seeds reuses the runs of one with fewer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from secure_fedkim.config import ConfigError, parse_config
from secure_fedkim.drivers.study import format_study, run_study, study_runs

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "study.yaml"


def study_config(path: Path, seeds: int | None, workers: int | None, variants, privacy):
    """The config at ``path`` with its study section changed by the options given; and the text the study
    directory keeps (the file, plus a comment naming the options)."""
    text = path.read_text()
    data = yaml.safe_load(text)
    study = dict(data.get("study") or {})
    options = {"seeds": list(range(seeds)) if seeds else None, "workers": workers, "variants": variants, "privacy": privacy}
    options = {k: v for k, v in options.items() if v is not None}
    if "seeds" in options:
        study.pop("seed_count", None)
    data["study"] = study | options
    cfg = parse_config(data, source=str(path), base_dir=path.parent)
    return cfg, text + (f"# bench_fedkim_study.py options: {options}\n" if options else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the config's")
    ap.add_argument("--workers", type=int, help="parallel runs (default: the config's, else one per core)")
    ap.add_argument("--variants", nargs="+", help="instead of the config's study.variants")
    ap.add_argument("--privacy", nargs="+", help="dp and/or plain, instead of the config's study.privacy")
    ap.add_argument("--out", type=Path, help="the study directory (default: named by the federation config)")
    args = ap.parse_args(argv)
    try:
        cfg, text = study_config(args.config, args.seeds, args.workers, args.variants, args.privacy)
    except ConfigError as e:
        print(f"bench_fedkim_study: error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    study_dir, record = run_study(cfg, text, args.out, progress=True)
    wall = time.perf_counter() - started
    print(format_study(record))
    runs = len(study_runs(cfg))
    print(f"\nwall time {wall / 60:.1f} min on {os.cpu_count()} cores for this invocation ({runs} runs in the study; "
          f"runs it found done were not run again); study written to {study_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
