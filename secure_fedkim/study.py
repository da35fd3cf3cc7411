"""A comparison study: the same federation once per injection variant and seed, summarised in one table
(rows: variants; columns: tasks, seen and unseen; cells: mean and spread over seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from secure_fedkim.config import STUDY_VARIANTS, RunConfig
from secure_fedkim.run import make_run_dir, run_federation
from secure_fedkim.run_dir import RunDir, StudyDir


def variant_config(cfg: RunConfig, variant: str, seed: int) -> RunConfig:
    return cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"seed": seed, "name": f"{cfg.run.name}-{variant}-s{seed}"}),
        "injection": cfg.injection.model_copy(update=STUDY_VARIANTS[variant]),
        "baseline": cfg.baseline.model_copy(update={"single_hospital": False}),
        "study": None,
    })


def run_study(cfg: RunConfig, config_text: str, out_dir=None, progress: bool = True) -> tuple[Path, dict]:
    study_dir = make_run_dir(cfg, out_dir)
    study = StudyDir(study_dir)
    study.config_yaml.write_text(config_text)
    results: dict[str, dict[int, dict]] = {}
    round0: dict[int, dict] = {}  # the FM with the untrained projection and experts: FedPlug at round 0
    for seed in cfg.study.seeds:
        for variant in cfg.study.variants:
            run = run_federation(variant_config(cfg, variant, seed), config_text, study.run(variant, seed), progress)
            summary = RunDir(run.run_dir).read_summary()
            results.setdefault(variant, {})[seed] = summary["fm_test"]
            if variant == "fedplug":
                round0[seed] = summary["fm_test_round0"]
    if round0:
        results = {"no injection (FedPlug, round 0)": round0, **results}
    study.results.write_text(json.dumps(results, indent=2))
    return study_dir, results


def format_study(results: dict[str, dict[int, dict]], metric: str = "auroc") -> str:
    first = next(iter(next(iter(results.values())).values()))
    tasks = sorted(first, key=lambda t: (first[t]["role"] != "train", t))
    head = f"{'variant':<24}" + "".join(f"{t[:18] + (' *' if first[t]['role'] == 'unseen' else ''):>22}" for t in tasks)
    lines = [f"FM {metric} on the test sets, mean ± std over seeds (* = unseen task, zero-shot)", head]
    for variant, by_seed in results.items():
        cells = []
        for t in tasks:
            vals = np.array([r[t].get(metric, np.nan) for r in by_seed.values()], dtype=float)
            cells.append(f"{np.nanmean(vals):.3f} ± {np.nanstd(vals):.3f} (n={len(vals)})")
        lines.append(f"{variant:<24}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
