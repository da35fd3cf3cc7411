"""The secure DP randomness against torch's Mersenne Twister, on the demo's own client models, in one run.

    python bench/bench_randomness.py [--config configs/demo.yaml] [--hospital cleveland] [--repeats 5]

For every training task of the config, the same encoder + head trains one local DP-SGD epoch (lean path,
as a hospital does) on the same hospital's shard twice, alternating: once with every draw from
``privacy.randomness.DPRandomness.secure()`` (ChaCha20 keyed from the OS, Gaussian as a sum of four
Box-Muller draws, SHA-256 fingerprints of noise and samples), once with the draws of the code before #24:
torch's generator (Mersenne Twister) with ``torch.normal`` for the noise and ``torch.rand`` for the
Poisson sample, no fingerprints. Prints the median seconds per step and the ratio per task and for the
whole local round (target <= 1.1x, DESIGN.md), then the samplers' throughput in Gaussians per second.

Each figure is given twice: in CPU seconds of this process (``time.process_time``: the work done; torch runs
one thread here) and in wall seconds (``time.perf_counter``). On a machine shared with other processes the
wall time also counts the time this one waited for a core, which neither generator controls; the two agree
on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger
from privacy.randomness import DPRandomness
from secure_fedkim.config import load_config
from secure_fedkim.hospital.local_training import dp_round_schedule, hospital_records, new_client_model
from secure_fedkim.plan import build_plan
from secure_fedkim.hospital.training import train_task


class TorchGeneratorRandomness(DPRandomness):
    """The draws DP-SGD made before #24 (Opacus without secure_mode): torch's Mersenne Twister. Bench only."""

    def __init__(self, seed: int):
        super().__init__(bytes(32), "reproducible")
        self._gen = torch.Generator().manual_seed(seed)

    def uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self._gen, dtype=torch.float64)

    def gaussian(self, std: float, like: torch.Tensor) -> torch.Tensor:
        return torch.normal(0.0, std, size=like.shape, dtype=like.dtype, generator=self._gen)

    def poisson(self, n: int, sample_rate: float) -> torch.Tensor:
        return (torch.rand(n, generator=self._gen) < sample_rate).nonzero().squeeze(1)


def gaussians_per_second(draw, size: int = 100_000, seconds: float = 1.0, clock=time.process_time) -> float:
    draw(size)
    n, start = 0, clock()
    while clock() - start < seconds:
        draw(size)
        n += size
    return n / (clock() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--hospital", default="cleveland")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in the simulation's ClientApps
    cfg, _ = load_config(args.config)
    plans = build_plan(cfg)
    c = cfg.client
    per_step: dict[str, dict[str, list[float]]] = {}  # CPU seconds per step
    epoch: dict[str, dict[str, list[float]]] = {}  # CPU seconds per local epoch of the task
    wall: dict[str, dict[str, list[float]]] = {}  # wall seconds per local epoch of the task
    with tempfile.TemporaryDirectory() as d:
        dp = HospitalDP(
            PrivacyProfile(target_epsilon=1e6, accountant="rdp"), PrivacyLedger(f"{d}/ledger.jsonl"), "bench",
            dp_round_schedule(plans, args.hospital, cfg), 4 * args.repeats + 2, n_records=hospital_records(plans, args.hospital),
            noise_multiplier=1.0,
        )
        for rep in range(args.repeats + 1):  # the first repeat warms up and is dropped
            for name, plan in plans.items():
                if plan.task.role != "train":
                    continue
                shard = plan.shard(args.hospital)
                for kind in (("secure", "torch") if rep % 2 else ("torch", "secure")):  # alternate who goes first
                    randomness = DPRandomness.secure() if kind == "secure" else TorchGeneratorRandomness(rep)
                    model = new_client_model(cfg, plans)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    stats = train_task(
                        model.task_model(name), shard.x, shard.y, epochs=1, batch_size=c.batch_size, lr=c.lr,
                        max_grad_norm=c.max_grad_norm, seed=rep, privatizer=dp, randomness=randomness,
                    )
                    cpu, elapsed = time.process_time() - cpu_start, time.perf_counter() - start
                    dp.record_round(rep, name, stats["steps"], stats["sample_rate"])
                    if rep:
                        per_step.setdefault(name, {}).setdefault(kind, []).append(cpu / max(stats["steps"], 1))
                        epoch.setdefault(name, {}).setdefault(kind, []).append(cpu)
                        wall.setdefault(name, {}).setdefault(kind, []).append(elapsed)
    params = {name: sum(p.numel() for p in new_client_model(cfg, plans).task_model(name).parameters() if p.requires_grad)
              for name in per_step}
    print(f"\nhospital {args.hospital}, batch {c.batch_size}, lean DP-SGD, 1 local epoch per task, median of {args.repeats}"
          f" (CPU time; wall time in the last column)")
    print(f"{'task':<18}{'params':>8}{'torch ms/step':>15}{'secure ms/step':>16}{'secure/torch':>14}{'wall ratio':>12}")
    totals = {"cpu": [0.0, 0.0], "wall": [0.0, 0.0]}
    for name, t in per_step.items():
        a, b = statistics.median(t["torch"]), statistics.median(t["secure"])
        wall_ratio = statistics.median(wall[name]["secure"]) / statistics.median(wall[name]["torch"])
        for clock, runs in (("cpu", epoch), ("wall", wall)):
            totals[clock][0] += statistics.median(runs[name]["torch"])
            totals[clock][1] += statistics.median(runs[name]["secure"])
        print(f"{name:<18}{params[name]:>8}{a * 1e3:>15.2f}{b * 1e3:>16.2f}{b / a:>14.2f}{wall_ratio:>12.2f}")
    (cpu_torch, cpu_secure), (wall_torch, wall_secure) = totals["cpu"], totals["wall"]
    print(f"{'whole local epoch':<18}{'':>8}{cpu_torch * 1e3:>13.0f}ms{cpu_secure * 1e3:>14.0f}ms{cpu_secure / cpu_torch:>14.2f}"
          f"{wall_secure / wall_torch:>12.2f}   (target <= 1.1)")
    print(f"{'  in wall time':<18}{'':>8}{wall_torch * 1e3:>13.0f}ms{wall_secure * 1e3:>14.0f}ms")
    secure = DPRandomness.secure()
    gen = torch.Generator().manual_seed(0)
    like = {}
    s = gaussians_per_second(lambda n: secure.gaussian(1.0, like.setdefault(n, torch.zeros(n))))
    t = gaussians_per_second(lambda n: torch.normal(0.0, 1.0, size=(n,), generator=gen))
    print(f"\nGaussians per CPU second (float32 vectors of 100,000, one thread): secure {s / 1e6:.1f} M/s "
          f"(each the sum of 4 Box-Muller draws), torch.normal {t / 1e6:.1f} M/s; torch/secure {t / s:.1f}x")


if __name__ == "__main__":
    main()
