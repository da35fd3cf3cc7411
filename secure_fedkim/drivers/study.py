"""A comparison study: the same federation once per privacy mode (DP as configured, and without DP), injection
variant and seed, compared with paired statistics over the seeds.

Every run is a real federation (``run_federation``) in a fresh worker process ("spawn", one run per process,
so each run has its own Flower simulation and its own Ray instance). The study directory (``StudyDir``) is
resumable: run again with the same federation config, a study runs only the runs without a summary.json
(an unfinished run directory is removed and run again). Seeds are shared across variants, so per task the
difference reference (FEDKIM) minus each other variant is paired by seed, and so is each run's injected FM
against its own round 0; each gets its mean and a 95% paired t interval over the seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import stats
from tqdm import tqdm

from secure_fedkim.config import (
    STUDY_VARIANTS,
    ConfigError,
    PrivacySection,
    RunConfig,
    config_sha256,
)
from secure_fedkim.rundir.layout import RunDir, StudyDir
from secure_fedkim.variants import METHODS, VARIANTS

LEVEL = 0.95
INTERVAL = "95% paired t interval over seeds (scipy.stats.t, n-1 degrees of freedom)"


@dataclass(frozen=True)
class RunKey:
    seed: int
    privacy: str
    variant: str

    @property
    def label(self) -> str:
        return f"{self.privacy}/{self.variant}-seed{self.seed}"


def short_name(variant: str) -> str:
    """FEDKIM, FedPlug, FedPlug_L, FEDKIM_pub, w/o T, w/o M: the variant's description up to its gloss."""
    return VARIANTS[variant].description.split(" (")[0].split(":")[0]


def privacy_modes(cfg: RunConfig) -> list[str]:
    return list(cfg.study.privacy or ["dp" if cfg.privacy.dp else "plain"])


def study_runs(cfg: RunConfig) -> list[RunKey]:
    """Every run, seed by seed: a study stopped early has complete pairs for its first seeds."""
    return [RunKey(s, p, v) for s in cfg.study.seeds for p in privacy_modes(cfg) for v in cfg.study.variants]


def variant_config(cfg: RunConfig, variant: str, seed: int, privacy: str | None = None) -> RunConfig:
    """One run of the study: ``privacy`` "plain" drops DP, "dp" or None keeps the config's privacy section."""
    name = f"{cfg.run.name}-{variant}-s{seed}" if privacy is None else f"{cfg.run.name}-{privacy}-{variant}-s{seed}"
    update = {
        "run": cfg.run.model_copy(update={"seed": seed, "name": name}),
        "injection": cfg.injection.model_copy(update=STUDY_VARIANTS[variant]),
        "baseline": cfg.baseline.model_copy(update={"single_hospital": False}),
        "study": None,
    }
    if privacy == "plain":
        update["privacy"] = PrivacySection()
    return cfg.model_copy(update=update)


def run_config_text(cfg: RunConfig) -> str:
    """A run's own config.yaml: the validated variant config, so `secure-fedkim run` on it repeats the run."""
    head = f"# one run of a study ({cfg.run.name}), as validated; `secure-fedkim run` on this file repeats it\n"
    return head + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# -- running


def federation_runner(cfg: RunConfig, config_text: str, run_dir: Path) -> None:
    from secure_fedkim.drivers.run import run_federation  # torch: only in the worker

    run_federation(cfg, config_text, run_dir, progress=False)


def _run_in_worker(runner: Callable, cfg: RunConfig, run_dir: str, log: str, threads: int) -> float:
    """One run in this fresh worker process, its output to its log; returns its wall seconds. The run's own
    process computes with ``threads`` torch threads, its share of the cores (two parallel runs of two threads
    each on two cores oversubscribe them)."""
    import torch

    torch.set_num_threads(threads)
    os.environ["RAY_ADDRESS"] = "local"  # its own Ray instance, never one that another process started
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    started = time.perf_counter()
    runner(cfg, run_config_text(cfg), Path(run_dir))
    return time.perf_counter() - started


def read_finished(run_dir: Path) -> dict | None:
    """A finished run's summary; None when the run has none (or a truncated one: killed while writing it)."""
    try:
        return RunDir(run_dir).read_summary()
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _federation_record(cfg: RunConfig) -> dict:
    """What a study's runs depend on: the config without its study section, run seed and output folder."""
    record = cfg.model_dump(mode="json", exclude={"study": True, "run": {"seed", "out_dir"}})
    return json.loads(json.dumps(record))


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def open_study(cfg: RunConfig, config_text: str, out_dir: str | Path | None) -> StudyDir:
    """The study directory: ``out_dir``, or one named by the federation config under run.out_dir (so running
    the same config again resumes it). A directory of another federation's study is refused."""
    federation = _federation_record(cfg)
    digest = hashlib.sha256(json.dumps(federation, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(out_dir) if out_dir is not None else Path(cfg.run.out_dir) / f"{cfg.run.name}-study-{digest}"
    study = StudyDir(path)
    if study.federation_config.is_file():
        differs = _differences(json.loads(study.federation_config.read_text()), federation)
        if differs:
            raise ConfigError(f"{path}: this study directory holds runs of another federation config (it differs in "
                              f"{', '.join(differs[:5])}); choose another --out")
    elif path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not a study directory; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    study.config_yaml.write_text(config_text)
    study.federation_config.write_text(json.dumps(federation, indent=2))
    return study


def _stored_timings(study: StudyDir) -> dict[str, float]:
    """Wall seconds of the runs an earlier invocation of this study finished (from its study.json)."""
    try:
        record = json.loads(study.results.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {f"{mode}/{variant}-seed{seed}": run["wall_seconds"]
            for mode, part in record.get("privacy", {}).items() for variant, by_seed in part["runs"].items()
            for seed, run in by_seed.items() if run.get("wall_seconds") is not None}


def _expected(seconds: list[float], runs: int, workers: int, source: str) -> str:
    total = np.mean(seconds) * runs / workers
    return (f"expected time for {runs} runs on {workers} workers: about {total / 60:.0f} min "
            f"({np.mean(seconds):.0f} s per run, {source})")


def run_study(cfg: RunConfig, config_text: str, out_dir=None, progress: bool = True, workers: int | None = None,
              runner: Callable = federation_runner) -> tuple[Path, dict]:
    """Run what is missing of the study, then write study.json (runs and paired statistics) and the plots.
    Returns the study directory and the study record (``format_study`` prints it)."""
    study = open_study(cfg, config_text, out_dir)
    keys = study_runs(cfg)
    timings = _stored_timings(study)
    todo = [k for k in keys if read_finished(_run_path(study, k)) is None]
    workers = max(1, min(workers or cfg.study.workers or os.cpu_count() or 1, len(todo) or 1))
    say = tqdm.write if progress else (lambda _line: None)
    say(f"study {study.root}: {len(keys)} runs, {len(keys) - len(todo)} already done, {len(todo)} to run")
    if todo:
        done_times = [t for k, t in timings.items() if k in {d.label for d in keys}]
        say(_expected(done_times, len(todo), workers, f"the mean of {len(done_times)} runs this study already did")
            if done_times else "expected time: printed when the first run finishes")
    failed = _execute(study, cfg, todo, workers, runner, timings, say, progress)
    _route(study, cfg, [k for k in keys if k not in failed], workers, say)
    record = write_record(cfg, study, timings)
    if failed:
        logs = ", ".join(str(study.log(k.variant, k.seed, k.privacy)) for k in failed)
        raise RuntimeError(f"{len(failed)} of {len(keys)} study runs failed (see {logs}); run the study again to "
                           f"redo them")
    for mode in record["privacy"]:
        plot_study(record, mode, study.plot(mode))
    return study.root, record


def _run_path(study: StudyDir, key: RunKey) -> Path:
    return study.run(key.variant, key.seed, key.privacy)


def _execute(study, cfg, todo, workers, runner, timings, say, progress) -> list[RunKey]:
    """The runs ``todo`` on ``workers`` processes; study.json is rewritten after each. Returns those that failed."""
    if not todo:
        return []
    for key in todo:
        if _run_path(study, key).exists():
            shutil.rmtree(_run_path(study, key))  # an unfinished run: started again from nothing
    failed: list[RunKey] = []
    finished = 0
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with (tqdm(total=len(todo), desc="study runs", unit="run", disable=not progress) as bar,
          ProcessPoolExecutor(workers, context, max_tasks_per_child=1) as pool):
        futures = {pool.submit(_run_in_worker, runner, variant_config(cfg, k.variant, k.seed, k.privacy),
                               str(_run_path(study, k)), str(study.log(k.variant, k.seed, k.privacy)), threads): k
                   for k in todo}
        try:
            for future in as_completed(futures):
                key = futures[future]
                try:
                    timings[key.label] = future.result()
                except Exception as e:  # noqa: BLE001 - the others go on; the study reports it at the end
                    failed.append(key)
                    say(f"{key.label} failed: {type(e).__name__}: {e}")
                else:
                    finished += 1
                    if finished == 1:
                        say(_expected([timings[key.label]], len(todo), workers, "measured: the first run's wall time"))
                bar.update(1)
                write_record(cfg, study, timings)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failed


# -- how the M3OE gate routes each task (do FEDKIM's experts specialise?)


def gated(cfg: RunConfig, variant: str) -> bool:
    """Whether the variant's FM has an M3OE gate: two or more experts."""
    experts = METHODS[VARIANTS[variant].method].experts
    return (cfg.injection.num_experts if experts is None else experts) >= 2


def _routing_in_worker(cfg: RunConfig, run_dir: str) -> None:
    """The gate's routing of every task before injection (rebuilt from the run's seed) and after the run (its
    saved adapter), written to the run's metrics/fm_routing.json."""
    import torch
    from transformers.utils import logging as transformers_logging

    from secure_fedkim.fm.routing import saved_fm, task_routing
    from secure_fedkim.plan import task_of

    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()  # the FM loads twice per run: no bar between the study's tables
    tasks = [task_of(e, "train") for e in cfg.tasks.train] + [task_of(e, "unseen") for e in cfg.tasks.unseen]
    run = RunDir(run_dir)
    routing = {"initial": task_routing(saved_fm(run.fm_dir, cfg.run.seed), tasks),
               "final": task_routing(saved_fm(run.fm_dir), tasks)}
    run.fm_routing.write_text(json.dumps(routing, indent=2))


def _route(study: StudyDir, cfg: RunConfig, keys: list[RunKey], workers: int, say) -> None:
    """Routing for every finished gated run that has none yet (a few seconds each: the FM loads twice)."""
    runs = {k: RunDir(_run_path(study, k)) for k in keys if gated(cfg, k.variant)}
    todo = [k for k, run in runs.items() if read_finished(run.root) is not None and run.fm_dir.is_dir()
            and not run.fm_routing.exists()]
    if not todo:
        return
    say(f"routing of the M3OE gate: {len(todo)} runs")
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(_routing_in_worker, variant_config(cfg, k.variant, k.seed, k.privacy),
                                  str(_run_path(study, k))) for k in todo}
        for key, future in futures.items():
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - a run's saved FM that cannot be read loses only its routing
                say(f"{key.label}: no routing: {type(e).__name__}: {e}")


def routing_rows(runs: dict[str, dict[str, dict]]) -> list[dict]:
    """Per gated variant and task, over seeds: the mean normalised entropy of its expert weights before
    injection and after the run (1 = every expert alike, 0 = one expert), and in how many runs its top expert
    is the run's most common top expert; per variant, the mean total variation between two tasks' weights."""
    rows = []
    for variant, by_seed in runs.items():
        routed = [r["routing"] for r in by_seed.values() if r.get("routing")]
        if not routed:
            continue
        tasks = list(routed[0]["final"]["tasks"])
        common = [max(set(tops := [t["top_expert"] for t in r["final"]["tasks"].values()]), key=tops.count)
                  for r in routed]
        for task in tasks:
            rows.append({
                "variant": short_name(variant), "task": task, "n": len(routed),
                "entropy_initial": float(np.mean([r["initial"]["tasks"][task]["entropy"] for r in routed])),
                "entropy_final": float(np.mean([r["final"]["tasks"][task]["entropy"] for r in routed])),
                "top_weight_final": float(np.mean([r["final"]["tasks"][task]["top_weight"] for r in routed])),
                "on_common_expert": sum(r["final"]["tasks"][task]["top_expert"] == c for r, c in zip(routed, common)),
            })
        rows.append({"variant": short_name(variant), "task": "(between tasks: mean total variation)", "n": len(routed),
                     "tv_initial": float(np.mean([r["initial"]["mean_pairwise_tv"] for r in routed])),
                     "tv_final": float(np.mean([r["final"]["mean_pairwise_tv"] for r in routed]))})
    return rows


# -- the record and its statistics


def paired_interval(differences, level: float = LEVEL) -> dict:
    """Mean of the paired differences and its t interval (n-1 degrees of freedom); pairs with a NaN drop out."""
    d = np.asarray([x for x in differences if x is not None and np.isfinite(x)], dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "ci95": [math.nan, math.nan]}
    half = stats.t.ppf((1 + level) / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def verdict(ci95, better: str, worse: str) -> str:
    low, high = ci95
    if not (np.isfinite(low) and np.isfinite(high)):
        return "too few seeds"
    return better if low > 0 else worse if high < 0 else "no difference shown"


def _value(result: dict, task: str, metric: str) -> float:
    cell = result.get(task) or {}
    value = cell.get(metric)
    return math.nan if value is None else float(value)


def ordered_tasks(runs: dict) -> list[tuple[str, str]]:
    """(task, role) of the runs' FM test sets, training tasks first."""
    roles = {t: m["role"] for by_seed in runs.values() for r in by_seed.values() for t, m in r["fm_test"].items()}
    return sorted(roles.items(), key=lambda tr: (tr[1] != "train", tr[0]))


def reference_variant(variants) -> str:
    return "fedkim" if "fedkim" in variants else next(iter(variants))


def paired_rows(runs: dict[str, dict[str, dict]], metric: str = "auroc") -> list[dict]:
    """Per task: the reference minus each other variant (paired by seed) and each variant injected minus its
    own round 0 (paired by run), with the mean, the interval and its verdict. ``runs``: variant -> seed -> run."""
    ref = reference_variant(runs)
    rows = []
    for task, role in ordered_tasks(runs):
        for other in (v for v in runs if v != ref):
            seeds = sorted(set(runs[ref]) & set(runs[other]), key=int)
            diffs = [_value(runs[ref][s]["fm_test"], task, metric) - _value(runs[other][s]["fm_test"], task, metric)
                     for s in seeds]
            stat = paired_interval(diffs)
            name = short_name(ref)
            rows.append({"task": task, "role": role, "comparison": f"{name} - {short_name(other)}", **stat,
                         "verdict": verdict(stat["ci95"], f"{name} better", f"{name} worse")})
        for variant, by_seed in runs.items():
            diffs = [_value(r["fm_test"], task, metric) - _value(r["fm_test_round0"], task, metric)
                     for r in by_seed.values()]
            stat = paired_interval(diffs)
            rows.append({"task": task, "role": role, "comparison": f"{short_name(variant)} injected - round 0",
                         **stat, "verdict": verdict(stat["ci95"], "injection better", "injection worse")})
    return rows


def _privacy_description(cfg: RunConfig, mode: str) -> str:
    if mode == "plain":
        return "without DP"
    p = cfg.privacy
    eps = f"epsilon {p.profile.target_epsilon:g} per {p.unit}" if p.profile else "per-hospital budgets"
    return f"DP-SGD at every hospital, {eps} for the whole run"


def _collect_runs(cfg: RunConfig, study: StudyDir, mode: str, timings: dict) -> dict:
    runs: dict[str, dict[str, dict]] = {}
    for key in (k for k in study_runs(cfg) if k.privacy == mode):
        summary = read_finished(_run_path(study, key))
        if summary is not None:
            runs.setdefault(key.variant, {})[str(key.seed)] = {
                "fm_test": summary["fm_test"], "fm_test_round0": summary["fm_test_round0"],
                "run_dir": _run_path(study, key).relative_to(study.root).as_posix(),
                "wall_seconds": timings.get(key.label),
            }
            routing = RunDir(_run_path(study, key)).fm_routing
            if routing.exists():
                runs[key.variant][str(key.seed)]["routing"] = json.loads(routing.read_text())
    return runs


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_record(cfg: RunConfig, study: StudyDir, timings: dict) -> dict:
    """study.json from the finished runs on disk (so a resumed study and an uninterrupted one write the same)."""
    record = {"reference": short_name(reference_variant(cfg.study.variants)), "metric": "auroc",
              "interval": INTERVAL, "config_sha256": config_sha256(study.config_yaml.read_text()),
              "seeds": list(cfg.study.seeds), "variants": list(cfg.study.variants), "privacy": {}}
    for mode in privacy_modes(cfg):
        runs = _collect_runs(cfg, study, mode, timings)
        record["privacy"][mode] = {"description": _privacy_description(cfg, mode), "runs": runs,
                                   "paired": paired_rows(runs) if runs else [], "routing": routing_rows(runs)}
    record = _json_safe(record)
    study.results.write_text(json.dumps(record, indent=2))
    return record


# -- the terminal table and the plot


def format_paired(rows: list[dict], metric: str) -> str:
    lines = [f"{'task':<22}{'role':<8}{'comparison':<32}{'n':>3}{'mean diff':>11}   {'95% interval':<18}  verdict"]
    last = None
    for r in rows:
        if last is not None and r["task"] != last:
            lines.append("")
        last = r["task"]
        lo, hi = (math.nan if v is None else v for v in r["ci95"])
        mean = math.nan if r["mean"] is None else r["mean"]
        lines.append(f"{r['task'][:21]:<22}{r['role']:<8}{r['comparison'][:31]:<32}{r['n']:>3}{mean:>+11.3f}   "
                     f"[{lo:+.3f}, {hi:+.3f}]  {r['verdict']}")
    return "\n".join(lines)


def format_record(record: dict, metric: str = "auroc") -> str:
    parts = []
    for mode, part in record["privacy"].items():
        runs = part["runs"]
        if not runs:
            continue
        ref = reference_variant(runs)
        means = {f"round 0 ({short_name(ref)} runs)": {s: r["fm_test_round0"] for s, r in runs[ref].items()},
                 **{short_name(v): {s: r["fm_test"] for s, r in by_seed.items()} for v, by_seed in runs.items()}}
        rows = part["paired"] if metric == record["metric"] else paired_rows(runs, metric)
        parts += [f"== {mode}: {part['description']} ==", format_study(means, metric), "",
                  f"Paired differences of the FM's test {metric} over seeds: mean and {record['interval']}",
                  format_paired(rows, metric), ""]
        if part.get("routing"):
            parts += ["How the M3OE gate routes each task, mean over seeds: normalised entropy of the expert weights "
                      "(1 = all experts alike, 0 = one expert) before injection -> after the run; top expert's weight; "
                      "runs where the task's top expert is the run's most common one", format_routing(part["routing"]), ""]
    return "\n".join(parts).rstrip()


def format_routing(rows: list[dict]) -> str:
    lines = [f"{'variant':<12}{'task':<40}{'entropy':>16}{'top weight':>12}{'on common':>11}"]
    for r in rows:
        if "tv_final" in r:
            lines.append(f"{r['variant']:<12}{r['task']:<40}{r['tv_initial']:>7.3f} -> {r['tv_final']:.3f}")
        else:
            lines.append(f"{r['variant']:<12}{r['task']:<40}{r['entropy_initial']:>7.3f} -> {r['entropy_final']:.3f}"
                         f"{r['top_weight_final']:>12.3f}{r['on_common_expert']:>7} of {r['n']}")
    return "\n".join(lines)


def format_study(results: dict, metric: str = "auroc") -> str:
    """A study record (``run_study``'s) as its tables; or ``{row: {seed: fm_test}}`` as one table of means."""
    if "privacy" in results and "interval" in results:
        return format_record(results, metric)
    first = next(iter(next(iter(results.values())).values()))
    tasks = sorted(first, key=lambda t: (first[t]["role"] != "train", t))
    head = f"{'variant':<24}" + "".join(f"{t[:18] + (' *' if first[t]['role'] == 'unseen' else ''):>22}" for t in tasks)
    lines = [f"FM {metric} on the test sets, mean ± std over seeds (* = unseen task, zero-shot)", head]
    for variant, by_seed in results.items():
        cells = []
        for t in tasks:
            vals = np.array([_value(r, t, metric) for r in by_seed.values()], dtype=float)
            cells.append(f"{np.nanmean(vals):.3f} ± {np.nanstd(vals):.3f} (n={len(vals)})")
        lines.append(f"{variant:<24}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def plot_study(record: dict, mode: str, path: Path) -> Path | None:
    """AUROC per variant (and round 0) and seed, one panel per task; a grey line joins one seed's runs."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    runs = record["privacy"][mode]["runs"]
    if not runs:
        return None
    ref = reference_variant(runs)
    columns = [(f"round 0 ({short_name(ref)})", ref, "fm_test_round0")] + [(short_name(v), v, "fm_test") for v in runs]
    seeds = sorted({s for by_seed in runs.values() for s in by_seed}, key=int)
    tasks = ordered_tasks(runs)
    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 3.0 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    x = np.arange(len(columns))
    for ax, (task, role) in zip(axes.flat, tasks):
        table = np.array([[_value(runs[v].get(s, {}).get(field, {}), task, "auroc") for _, v, field in columns]
                          for s in seeds], dtype=float)
        for row in table:
            ax.plot(x, row, color="0.7", marker="o", markersize=3, linewidth=0.8)
        ax.plot(x, np.nanmean(table, axis=0), linestyle="none", marker="_", markersize=16, mew=2.5, color="C3")
        ax.axhline(0.5, linestyle=":", color="0.5", linewidth=0.8)
        ax.set_title(f"{task} ({role})", fontsize=9)
        ax.set_xticks(x, [c[0] for c in columns], rotation=45, ha="right", fontsize=8)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("FM test AUROC")
    fig.suptitle(f"{mode}: {record['privacy'][mode]['description']}\none grey line per seed, red: the mean over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
