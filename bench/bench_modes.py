"""The demo under each transport (plain, he, secagg), measured in one run on this machine.

    python bench/bench_modes.py [--config configs/demo_plain.yaml] [--rounds 3]

Prints one table of final per-task metrics of the global model for the three modes (they must agree
within the documented precision: he adds N(0, 1e-5^2) per value, secagg quantizes to ~1e-5) and the mean
round time of each mode against plain. Injection and the single-hospital baseline are switched off so
that the round time measures the transport, not the foundation model's training.
"""

from __future__ import annotations

import argparse
import tempfile

import yaml
from safetensors.torch import load_file

from bench_rounds import round_seconds
from secure_fedkim.config import parse_config
from secure_fedkim.drivers.run import run_federation


def run_mode(base: dict, mode: str, rounds: int):
    data = yaml.safe_load(yaml.safe_dump(base))
    data["run"]["rounds"] = rounds
    data["federation"]["aggregation"] = mode
    data.pop("injection", None)
    data["baseline"] = {"single_hospital": False}
    cfg = parse_config(data)
    with tempfile.TemporaryDirectory() as d:
        result = run_federation(cfg, yaml.safe_dump(data), out_dir=f"{d}/run", progress=False)
        weights = load_file(f"{d}/run/model/client_model.safetensors")
        per_round = round_seconds(f"{d}/run", rounds)
    return result.final_test, per_round, weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo_plain.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = yaml.safe_load(open(args.config))
    results = {m: run_mode(base, m, args.rounds) for m in ("plain", "he", "secagg")}
    plain_test, plain_s, plain_w = results["plain"]
    print(f"\nfinal global model on the test sets (AUROC / accuracy), {args.rounds} rounds, same seed")
    print(f"{'task':<22}" + "".join(f"{m:>18}" for m in results))
    for task in plain_test:
        print(f"{task:<22}" + "".join(f"{r[0][task]['auroc']:>9.4f} / {r[0][task]['accuracy']:.3f}" for r in results.values()))
    print(f"\n{'mode':<8}{'s/round':>9}{'x plain':>9}{'max |w - w_plain|':>20}")
    for m, (_, s, w) in results.items():
        diff = max(float((w[k] - plain_w[k]).abs().max()) for k in w)
        print(f"{m:<8}{s:>9.2f}{s / plain_s:>9.2f}{diff:>20.2e}")
    print("round time = mean over rounds 2..N, from the end of round 1 (which also starts the workers); injection off")


if __name__ == "__main__":
    main()
