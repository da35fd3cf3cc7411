"""Seconds per federated round and peak memory vs number of simulated hospitals (Flower simulation).

    python bench/bench_rounds.py [--clients 4 16 64] [--rounds 3]

Each size is one real run (ServerApp + ClientApps on Flower's simulation engine, plain FedAvg, no
injection) on the same two tasks split IID; round 1 includes starting the simulation's workers, so the
per-round time is the mean of the later rounds. Peak memory is the largest sum of resident memory over
this process and all its children (the simulation's workers), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import psutil

from secure_fedkim.config import parse_config
from secure_fedkim.drivers.run import run_federation


def config(n: int, rounds: int, seed: int = 0) -> dict:
    return {
        "run": {"name": f"bench{n}", "seed": seed, "rounds": rounds},
        "federation": {"clients": [f"h{i:02d}" for i in range(n)], "min_clients": max(2, n // 2)},
        "tasks": {
            "train": [
                {"name": "heart_disease", "partition": "iid"},
                {"name": "mortality", "partition": "iid", "max_records": 4000},
            ],
            "max_test_records": 200,
        },
        "client": {"local_epochs": 1, "batch_size": 32},
        "baseline": {"single_hospital": False},
    }


class PeakMemory:
    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def round_seconds(run_dir: str, rounds: int) -> float:
    """Mean time between the end of consecutive rounds 1..N, from the run's own round records."""
    ends = [json.loads(open(f"{run_dir}/metrics/round_{r:03d}.json").read())["finished_at"] for r in range(1, rounds + 1)]
    return (ends[-1] - ends[0]) / (rounds - 1)


def measure(n: int, rounds: int) -> tuple[float, float, float]:
    cfg = parse_config(config(n, rounds))
    with tempfile.TemporaryDirectory() as d, PeakMemory() as mem:
        start = time.perf_counter()
        run_federation(cfg, "bench", out_dir=f"{d}/run", progress=False)
        total = time.perf_counter() - start
        per_round = round_seconds(f"{d}/run", rounds)
    return per_round, total, mem.peak / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = [(n, *measure(n, args.rounds)) for n in args.clients]
    base = rows[0]
    print(f"\n{'hospitals':>9}  {'s/round':>8}  {'x vs ' + str(base[0]):>8}  {'run s':>7}  {'peak GiB':>8}  {'x vs ' + str(base[0]):>8}")
    for n, per_round, total, peak in rows:
        print(f"{n:>9}  {per_round:>8.2f}  {per_round / base[1]:>8.2f}  {total:>7.1f}  {peak:>8.2f}  {peak / base[3]:>8.2f}")
    print(f"cpus: {os.cpu_count()}; mean over rounds 2..{args.rounds}, from the end of round 1 (which also starts the workers)")


if __name__ == "__main__":
    main()
