"""Budget planning before and after issue #28's calibration, in one run on the demo config.

    python bench/bench_budget.py [--config configs/demo.yaml] [--epsilon 4] [--skip-before]

Prints:
1. ``secure-fedkim budget --config CONFIG --epsilon E`` as a subprocess: wall time, CPU time and peak resident
   memory (``wait4``'s ru_maxrss of that process; the largest sum of resident memory over it and its
   children sampled every 0.05 s, which counts a page that forked workers share once per process; and the
   largest sum of their proportional set sizes, which counts it once: the memory the command occupies), after (the command as shipped) and before (today's path, replayed by this
   file's ``--before`` mode: the same config and data loading as the old command (through
   ``secure_fedkim.hospital.local_training.load_plans``), then per hospital the old noise-floor check by PRV, the PRV bisection
   (``calibrate_noise(method="prv-bisect")``), PRV recomposed for every round prefix, and PRV of the whole
   run; Opacus's RDP terms not memoised, no result cache).
2. Per hospital: the calibrated noise multiplier before and after, their relative difference (target <= 1%),
   and epsilon at the new noise by Opacus PRV and by dp_accounting PLD (the two accountants the report
   recomputes with; both must be <= the target).
3. Per hospital: the calibration a run does when its first round starts (``HospitalDP._make_plan``'s call:
   the demo profile's own target, the federation and the reserved baseline, no floor), timed in this process
   with every cache cleared first, as a fresh worker would: wall seconds, CPU seconds, searches and
   verifications (target <= 2 s).
4. With ``--first-round``: the demo's first round (the federation's ``round_001.json`` finished_at less
   ``round_000.json``'s: every hospital's DP plan is calibrated when its first fit message arrives) with the
   run's calibration as shipped and with today's path (every process of the run calibrates with
   ``method="prv-bisect"``, through a ``sitecustomize`` on its PYTHONPATH), the run stopped once round 1 is
   written. Minutes each; the two runs are otherwise identical (same config, seeds and data cache).
The machine's load average is printed beside the timings: on a shared machine wall time is inflated, CPU
time much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def timed_subprocess(argv: list[str]) -> dict:
    """Run ``argv``; its wall time, CPU time, ru_maxrss, the peak summed RSS of its process tree, its stdout."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, text=True)
    peak = [0, 0]  # summed RSS, summed PSS
    done = threading.Event()

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [p, *p.children(recursive=True)]
                    peak[0] = max(peak[0], sum(q.memory_info().rss for q in tree))
                    peak[1] = max(peak[1], sum(q.memory_full_info().pss for q in tree))
                except psutil.Error:
                    pass
                time.sleep(0.05)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{out}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_gb": usage.ru_maxrss / 1e6,
            "tree_peak_gb": peak[0] / 1e9, "tree_pss_gb": peak[1] / 1e9, "stdout": out}


def hospital_inputs(config: str) -> tuple[object, dict]:
    from secure_fedkim.config import load_config
    from secure_fedkim.hospital.local_training import dp_plan_inputs
    from secure_fedkim.hospital.local_training import load_plans

    cfg, _ = load_config(config)
    plans = load_plans(cfg, config)
    return cfg, {c: dp_plan_inputs(cfg, plans, c) for c in cfg.federation.clients}


def before(config: str, target: float) -> None:
    """Today's ``budget --config`` path (the code before issue #28), for the bench: prints its table, then one
    JSON line with each hospital's noise and calibration seconds."""
    import logging

    from privacy.accounting import Step, calibrate_noise, epsilon, resolve_delta
    from privacy.budget import MIN_NOISE_MULTIPLIER

    logging.getLogger("opacus").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg, inputs = hospital_inputs(config)
    rounds, result = cfg.run.rounds, {}
    for client, i in inputs.items():
        delta = resolve_delta(None, i["n_patients"] or i["n_records"])
        schedule, full = i["round_schedule"], i["round_schedule"] * rounds + i["reserved"]
        t0 = time.perf_counter()
        sigma = calibrate_noise(target, delta, full, method="prv-bisect", floor=MIN_NOISE_MULTIPLIER)
        seconds = time.perf_counter() - t0
        eps = [epsilon([Step(sigma, q, k) for q, k in schedule * r], delta, "prv", cache=False) for r in range(1, rounds + 1)]
        both = epsilon([Step(sigma, q, k) for q, k in full], delta, "prv", cache=False)
        print(f"{client:<16}{sigma:>9.4f}  " + " ".join(f"{e:.3f}" for e in eps) + f"  + baseline -> {both:.3f}", flush=True)
        result[client] = {"sigma": sigma, "seconds": seconds}
    print("JSON " + json.dumps(result))


_OLD_CALIBRATION = """\
import functools
import privacy.accounting as accounting
accounting.calibrate_noise = functools.partial(accounting.calibrate_noise, method="prv-bisect")
"""


def first_round_seconds(config: str, old_calibration: bool) -> tuple[float, dict]:
    """Seconds from the end of round 0 to the end of round 1 of ``secure-fedkim run CONFIG`` (see 4.), and each
    hospital's calibrated noise multiplier from its ledger (which calibration ran)."""
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if old_calibration:
            (Path(tmp) / "sitecustomize.py").write_text(_OLD_CALIBRATION)
            env["PYTHONPATH"] = os.pathsep.join([tmp, str(ROOT), env.get("PYTHONPATH", "")])
        run = Path(tmp) / "run"
        proc = subprocess.Popen([sys.executable, "-m", "secure_fedkim.cli", "run", config, "--out", str(run), "--quiet"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while not (run / "metrics" / "round_001.json").exists():
                if proc.poll() is not None:
                    raise SystemExit(f"the run of {config} ended (exit {proc.returncode}) before its first round")
                time.sleep(0.5)
            time.sleep(0.5)  # written atomically or not, give the writer a moment
            r0, r1 = (json.loads((run / "metrics" / f"round_00{i}.json").read_text())["finished_at"] for i in (0, 1))
            noise = {}
            for ledger in sorted((run / "clients").glob("*/ledger.jsonl")):
                plan = json.loads(ledger.read_text().splitlines()[0])
                noise[ledger.parent.name] = plan.get("noise_multiplier")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return r1 - r0, noise


def clear_caches() -> None:
    from privacy import accounting

    accounting._cached_epsilon.cache_clear()
    accounting._gaussian_pld.cache_clear()
    from opacus.accountants.analysis import rdp

    if hasattr(rdp._compute_rdp, "cache_clear"):
        rdp._compute_rdp.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epsilon", type=float, default=4.0)
    ap.add_argument("--skip-before", action="store_true", help="skip today's path (about 3 minutes on a quiet machine)")
    ap.add_argument("--first-round", action="store_true",
                    help="also time the demo's first round with both calibrations (4.; minutes)")
    ap.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.before:
        return before(args.config, args.epsilon)
    if args.load_only:  # what budget --config costs before any accounting: its imports, the config, the data
        import privacy.accounting  # noqa: F401
        import secure_fedkim.cli  # noqa: F401
        from secure_fedkim.hospital.local_training import load_plans
        from secure_fedkim.config import load_config

        load_plans(load_config(args.config)[0], args.config)
        return None

    import logging

    logging.getLogger("opacus").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    print(f"bench_budget: {args.config}, --epsilon {args.epsilon:g}; {_load()}", flush=True)
    cli = [sys.executable, "-m", "secure_fedkim.cli", "budget", "--config", args.config, "--epsilon", f"{args.epsilon:g}"]
    after = timed_subprocess(cli)
    print(after["stdout"], end="")
    floor = timed_subprocess([sys.executable, str(Path(__file__).resolve()), "--load-only", "--config", args.config])
    old = None
    if not args.skip_before:
        old = timed_subprocess([sys.executable, str(Path(__file__).resolve()), "--before", "--config", args.config,
                                "--epsilon", f"{args.epsilon:g}"])
        print("before (today's path):\n" + "\n".join(x for x in old["stdout"].splitlines() if not x.startswith("JSON")))
    print(f"\n1. budget --config {args.config} --epsilon {args.epsilon:g}            wall s   CPU s  maxrss GB  tree RSS GB  tree PSS GB")
    for name, r in (("before", old), ("after", after), ("of which imports + config + data (no accounting)", floor)):
        if r is not None:
            print(f"   {name:<50}{r['wall']:>7.1f} {r['cpu']:>7.1f} {r['maxrss_gb']:>10.2f} {r['tree_peak_gb']:>12.2f} {r['tree_pss_gb']:>12.2f}")
    if old is not None:
        print(f"   after / before: wall {after['wall'] / old['wall']:.3f}x, CPU {after['cpu'] / old['cpu']:.3f}x "
              f"(targets: <= 10 s and <= 1 GB, the tree's PSS)")
    print(f"   ({_load()})")

    from privacy.accounting import Step, calibrate, epsilon, independent_epsilon, resolve_delta
    from privacy.budget import MIN_NOISE_MULTIPLIER

    cfg, inputs = hospital_inputs(args.config)
    old_sigmas = json.loads(next(x for x in old["stdout"].splitlines() if x.startswith("JSON"))[5:]) if old else {}
    print(f"\n2. noise multiplier per hospital at epsilon {args.epsilon:g} (budget --config's calibration)")
    print(f"   {'hospital':<16}{'before':>9}{'after':>9}{'rel diff':>10}{'PRV':>9}{'PLD':>9}  (epsilon at the new noise, <= {args.epsilon:g})")
    for client, i in inputs.items():
        delta = resolve_delta(None, i["n_patients"] or i["n_records"])
        full = i["round_schedule"] * cfg.run.rounds + i["reserved"]
        sigma = calibrate(args.epsilon, delta, full, floor=MIN_NOISE_MULTIPLIER).noise_multiplier
        history = [Step(sigma, q, k) for q, k in full]
        prv, pld = epsilon(history, delta, "prv"), independent_epsilon(history, delta, "pld")
        b = old_sigmas.get(client, {}).get("sigma")
        diff = f"{(sigma - b) / b:>+10.3%}" if b else f"{'-':>10}"
        ok = "ok" if max(prv, pld) <= args.epsilon else "OVER TARGET"
        print(f"   {client:<16}{b or float('nan'):>9.4f}{sigma:>9.4f}{diff}{prv:>9.4f}{pld:>9.4f}  {ok}")

    profile = cfg.dp_profile(cfg.federation.clients[0])
    print(f"\n3. calibration at the start of a run (HospitalDP._make_plan's call: the demo profile's epsilon "
          f"{profile.target_epsilon:g}, accountant {profile.accountant}, federation + baseline, no floor), caches cleared")
    print(f"   {'hospital':<16}{'noise':>9}{'wall s':>8}{'CPU s':>8}{'searches':>10}{'verif.':>8}"
          f"{'before s':>10}  (before: today's path's calibration at epsilon {args.epsilon:g}, from 1.)")
    for client, i in inputs.items():
        p = cfg.dp_profile(client)
        delta = p.resolve_delta(i["n_patients"] or i["n_records"])
        full = i["round_schedule"] * cfg.run.rounds
        clear_caches()
        t0, c0 = time.perf_counter(), time.process_time()
        cal = calibrate(p.target_epsilon, delta, full + i["reserved"], accountant=p.accountant)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        b = old_sigmas.get(client, {}).get("seconds")
        print(f"   {client:<16}{cal.noise_multiplier:>9.4f}{wall:>8.2f}{cpu:>8.2f}{cal.searches:>10}{cal.verifications:>8}"
              f"{b if b is not None else float('nan'):>10.1f}")
    print(f"   ({_load()}; target <= 2 s per hospital)")
    if args.first_round:
        print(f"\n4. the first round of `secure-fedkim run {args.config}` (round 1's end less round 0's)")
        for name, old_path in (("today's path (prv-bisect)", True), ("as shipped", False)):
            seconds, noise = first_round_seconds(args.config, old_path)
            sigmas = " ".join(f"{v:.4f}" for v in noise.values())
            print(f"   {name:<28}{seconds:>7.1f} s wall  noise {sigmas}  ({_load()})", flush=True)


if __name__ == "__main__":
    main()
