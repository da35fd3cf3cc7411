"""Utility vs privacy on the demo: the same federation non-private, at epsilon 8 and at epsilon 1.

    python bench/bench_privacy_utility.py [--config configs/demo.yaml] [--epsilons 8 1]

Each run is the real demo (Flower simulation, DP-SGD at every hospital with its budget for the whole run,
knowledge injection). Prints each hospital's spent epsilon after every round (from its ledger, via the
accountant) and one table of test AUROC per task for the global client model and the injected FM.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger
from secure_fedkim.config import parse_config
from secure_fedkim.drivers.run import run_federation


def run(base: dict, eps: float | None, out: Path) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base))
    data["baseline"] = {"single_hospital": False}
    data["privacy"] = {"dp": True, "profile": {"target_epsilon": eps}} if eps else {"dp": False}
    cfg = parse_config(data)
    run_federation(cfg, yaml.safe_dump(data), out_dir=out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    spent = {}
    if eps:
        for c in cfg.federation.clients:
            ledger = PrivacyLedger(out / "clients" / c / "ledger.jsonl")
            delta = ledger.events("dp_plan")[0]["delta"]
            rounds = sorted({e["round"] for e in ledger.events("dp_round")})
            spent[c] = [
                epsilon([s for e, s in zip(ledger.events("dp_round"), ledger.dp_history()) if e["round"] <= r], delta)
                for r in rounds
            ]
    return {"client": summary["federated_test"], "fm": summary.get("fm_test", {}), "spent": spent}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    args = ap.parse_args()
    base = yaml.safe_load(open(args.config))
    with tempfile.TemporaryDirectory() as d:
        results = {"non-private": run(base, None, Path(d) / "np")}
        for e in args.epsilons:
            results[f"eps={e:g}"] = run(base, e, Path(d) / f"eps{e:g}")
    for name, r in results.items():
        for hospital, eps in r["spent"].items():
            print(f"{name:<12} {hospital:<15} epsilon after each round: " + " ".join(f"{x:.3f}" for x in eps))
    cols = list(results)
    print("\ntest AUROC (client model | injected FM); * = unseen task, FM only")
    print(f"{'task':<24}" + "".join(f"{c:>22}" for c in cols))
    tasks = list(results["non-private"]["fm"] or results["non-private"]["client"])
    for t in tasks:
        cells = []
        for c in cols:
            cm = results[c]["client"].get(t, {}).get("auroc")
            fm = results[c]["fm"].get(t, {}).get("auroc")
            cells.append(f"{'-' if cm is None else format(cm, '.3f')} | {'-' if fm is None else format(fm, '.3f')}")
        unseen = results["non-private"]["fm"].get(t, {}).get("role") == "unseen"
        print(f"{t + (' *' if unseen else ''):<24}" + "".join(f"{x:>22}" for x in cells))


if __name__ == "__main__":
    main()
