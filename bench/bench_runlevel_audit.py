"""Power of the run-level audit (attacks/runlevel.py): does it flag the plumbing bugs, and never the honest run?

One row per case and claimed epsilon: the honest run (``--seeds`` audits, each a fresh re-execution with the
production randomness and the audit's own coordinate seed) and each bug of ``attacks.planted_bugs.PLUMBING_BUGS``
(the randomness of a session keyed without the round as shipped before ea4bf7b, hospitals alike, the baseline
replaying the federation, a resumed round repeating the last, Poisson batches repeated, a round not recorded),
on a small version of the demo's federation: the four heart-disease hospitals, heart disease and mortality,
3 rounds, DP at the claimed epsilon, the single-hospital baseline on. Prints the hospitals flagged, the largest
noise-correlation and batch-overlap z against their thresholds, the noise scale, the whole-run canary lower bound
on epsilon (largest over hospitals; 5,000 canaries per hospital) against the ledger's whole-run epsilon, and which
test flagged. Two mechanism bugs (``half_noise``, ``no_clipping`` of ``attacks.planted_bugs.BUGS``) follow the
plumbing ones: the noise-scale check sees the first, only the canaries' bound the second.

    python bench/bench_runlevel_audit.py [--seeds 10] [--epsilons 4 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from attacks.planted_bugs import PLUMBING_BUGS, plant  # noqa: E402
from attacks.runlevel import run_level_audit  # noqa: E402
from secure_fedkim.config import parse_config  # noqa: E402


def config(epsilon: float) -> dict:
    return {
        "run": {"rounds": 3, "seed": 0, "name": "rl"},
        "federation": {"clients": ["cleveland", "hungary", "switzerland", "va_long_beach"], "min_clients": 3},
        "tasks": {"train": [{"name": "heart_disease", "partition": "natural"},
                            {"name": "mortality", "partition": "dirichlet", "alpha": 1.0, "max_records": 2000}],
                  "max_test_records": 100},
        "client": {"token_dim": 32, "num_tokens": 2, "batch_size": 32, "local_epochs": 1},
        "privacy": {"dp": True, "profile": {"target_epsilon": epsilon}},
        "baseline": {"single_hospital": True},
    }


def flagged_by(reasons: list[str]) -> set[str]:
    tests = {"repeats": "repeat", "correlated": "correlation", "Poisson batches": "batches", "ledger records": "steps",
             "less than planned": "scale", "differs from its re-execution": "ledger",
             "canary lower bound": "canary bound"}
    return {name for key, name in tests.items() if any(key in r for r in reasons)}


def one(case: str, epsilon: float, seed: int, root: Path) -> dict:
    run = root / f"{case}-{epsilon}-{seed}" / "rl"
    run.mkdir(parents=True)
    (run / "resolved_config.json").write_text(parse_config(config(epsilon)).model_dump_json())
    start = time.perf_counter()
    with plant(case):
        rows = run_level_audit(run, run.parent / "work", seed=seed)
    bad = [r for r in rows if r["status"] != "consistent"]
    return {
        "seconds": time.perf_counter() - start, "flagged": len(bad), "hospitals": len(rows),
        "z_noise": max(r["max_abs_noise_z"] or 0 for r in rows), "t_noise": rows[0]["noise_z_threshold"],
        "z_batch": max(r["max_batch_overlap_z"] or 0 for r in rows), "t_batch": rows[0]["batch_z_threshold"],
        "scale": (min(r["noise_scale_ratio"] for r in rows), max(r["noise_scale_ratio"] for r in rows)),
        "lb": max(r.get("eps_lb_one_run") or 0 for r in rows), "claim": min(r.get("accountant_epsilon") or 0 for r in rows),
        "by": set().union(*(flagged_by(r["reasons"]) for r in bad)) if bad else set(),
        "example": bad[0]["reasons"][0] if bad else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10, help="honest audits per epsilon")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[4.0, 8.0])
    args = ap.parse_args()
    print(f"{'case':<28}{'eps':>5}{'flagged':>10}{'max|z| noise':>14}{'max z batch':>13}{'noise/sigmaC':>15}"
          f"{'lower bound/ledger':>20}  flagged by")
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.epsilons:
            honest = [one("honest", eps, s, Path(tmp)) for s in range(args.seeds)]
            flags = sum(h["flagged"] > 0 for h in honest)
            print(f"{'honest x ' + str(args.seeds) + ' seeds':<28}{eps:>5g}{flags:>7}/{len(honest):<2}"
                  f"{max(h['z_noise'] for h in honest):>9.1f} <{honest[0]['t_noise']:.1f}"
                  f"{max(h['z_batch'] for h in honest):>8.1f} <{honest[0]['t_batch']:.1f}"
                  f"{min(h['scale'][0] for h in honest):>9.3f}-{max(h['scale'][1] for h in honest):.3f}"
                  f"{max(h['lb'] for h in honest):>13.2f} / {honest[0]['claim']:.2f}  "
                  f"{', '.join(sorted(set().union(*(h['by'] for h in honest)))) or '-'}  "
                  f"({sum(h['seconds'] for h in honest) / len(honest):.0f} s per audit)")
            for case in [*PLUMBING_BUGS, "half_noise", "no_clipping"]:
                r = one(case, eps, 0, Path(tmp))
                print(f"{case:<28}{eps:>5g}{r['flagged']:>7}/{r['hospitals']:<2}{r['z_noise']:>9.1f} <{r['t_noise']:.1f}"
                      f"{r['z_batch']:>8.1f} <{r['t_batch']:.1f}{r['scale'][0]:>9.3f}-{r['scale'][1]:.3f}"
                      f"{r['lb']:>13.2f} / {r['claim']:.2f}  "
                      f"{', '.join(sorted(r['by'])) or '-'}")
                print(f"{'':<28}  e.g. {r['example'][:150]}")


if __name__ == "__main__":
    main()
