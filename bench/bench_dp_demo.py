"""DP-SGD local epoch / non-private local epoch on the demo's own client models and shards, one run.

    python bench/bench_dp_demo.py [--config configs/demo.yaml] [--hospital cleveland] [--repeats 5] [--mode lean|hooks|ghost]

For every training task of the config, the same encoder + head trains one local epoch on the same
hospital's shard, once plain (shuffled batches, global clipping) and once with DP-SGD (Opacus's Poisson
sampling, per-sample clipping, noise and accountant hook; per-sample gradients by ``--mode``: ``lean``,
HospitalDP's default, see privacy/fast_dp.py, or Opacus's ``hooks`` / ``ghost``), alternating plain/DP
to share the machine's load fairly.
Prints the median seconds and the ratio per task and for the whole local round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from privacy.dp import GRAD_SAMPLE_MODES, HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger
from secure_fedkim.hospital.local_training import dp_round_schedule, hospital_records, new_client_model
from secure_fedkim.config import load_config
from secure_fedkim.plan import build_plan
from secure_fedkim.hospital.training import train_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--hospital", default="cleveland")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--mode", choices=GRAD_SAMPLE_MODES, default="lean", help="per-sample gradient mode (HospitalDP's default: lean)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in the simulation's ClientApps
    cfg, _ = load_config(args.config)
    if args.batch:
        cfg = cfg.model_copy(update={"client": cfg.client.model_copy(update={"batch_size": args.batch})})
    plans = build_plan(cfg)
    c = cfg.client
    times: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        dp = HospitalDP(
            PrivacyProfile(target_epsilon=1e6, accountant="rdp"), PrivacyLedger(f"{d}/ledger.jsonl"), "bench",
            dp_round_schedule(plans, args.hospital, cfg), 4 * args.repeats, n_records=hospital_records(plans, args.hospital),
            noise_multiplier=1.0, grad_sample_mode=args.mode,
        )
        for rep in range(args.repeats):
            for name, plan in plans.items():
                if plan.task.role != "train":
                    continue
                shard = plan.shard(args.hospital)
                for mode in ("plain", "dp"):
                    model = new_client_model(cfg, plans)
                    start = time.perf_counter()
                    stats = train_task(
                        model.task_model(name), shard.x, shard.y, epochs=1, batch_size=c.batch_size, lr=c.lr,
                        max_grad_norm=c.max_grad_norm, seed=rep, privatizer=dp if mode == "dp" else None,
                    )
                    times.setdefault(name, {}).setdefault(mode, []).append(time.perf_counter() - start)
                    if mode == "dp":
                        dp.record_round(rep, name, stats["steps"], stats["sample_rate"])
    print(f"\nhospital {args.hospital}, batch {c.batch_size}, Opacus {args.mode}, 1 local epoch, median of {args.repeats} (plain/DP alternating)")
    print(f"{'task':<20}{'records':>8}{'plain s':>9}{'DP s':>9}{'DP/plain':>10}")
    tot_p = tot_d = 0.0
    for name, t in times.items():
        p, q = statistics.median(t["plain"]), statistics.median(t["dp"])
        tot_p, tot_d = tot_p + p, tot_d + q
        print(f"{name:<20}{len(plans[name].shard(args.hospital)):>8}{p:>9.3f}{q:>9.3f}{q / p:>10.2f}")
    print(f"{'whole local round':<20}{'':>8}{tot_p:>9.3f}{tot_d:>9.3f}{tot_d / tot_p:>10.2f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
