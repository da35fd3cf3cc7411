"""Membership-inference audit: wall time vs number of reference models, and RMIA vs LiRA power at equal cost.

Setting (the same as tests/test_attacks_mia.py's): a target trained on 150 heart_disease records for 100
epochs (the run's tabular encoder + head, token_dim 16, 2 tokens, batch 32, lr 5e-3, no DP), 150 held-out
non-members, the remaining ~620 records as the auditor's population. For K = 1, 4, 16 reference models
(K = 1 can only be offline: references trained on population data; K >= 2 online: each candidate IN
for K/2), the bench times one target's MIA (reference training + scoring) and reports each attack's TPR
at 1% FPR (150 non-members: measurable) and AUC, as means over ``--splits`` random member/non-member
splits. Equal cost = equal K: every attack at a given K reads the same reference models, and scoring
is milliseconds next to training.

Run: ``python bench/bench_audit.py`` (``--quick``: K = 1, 4 on one split with 50 epochs;
``--threads``, ``--splits``, ``--ks``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from attacks.metrics import roc_auc, tpr_at_fpr
from attacks.mia import ATTACKS, Records, ReferenceTraining, membership_inference
from secure_fedkim.data import load_task
from secure_fedkim.hospital.models import ClientModel

warnings.filterwarnings("ignore", message="Secure RNG turned off")


def make(seed: int):
    torch.manual_seed(seed)
    return ClientModel({"heart_disease": "tabular"}, {"tabular": (35,)}, 16, 2).task_model("heart_disease")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K = 1, 4; one split; 50 epochs")
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of reference models (default 1 4 16)")
    ap.add_argument("--splits", type=int, default=None, help="member/non-member splits to average (default 3)")
    ap.add_argument("--members", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = args.ks or ([1, 4] if args.quick else [1, 4, 16])
    splits = args.splits or (1 if args.quick else 3)
    epochs = 50 if args.quick else 100
    n = args.members

    data = load_task("heart_disease")
    rows = {}
    for k in ks:
        mode = "offline" if k == 1 else "online"
        per = {"train_s": [], "score_s": [], **{a: [] for a in ATTACKS}, **{f"{a}_auc": [] for a in ATTACKS}}
        for s in range(splits):
            perm = np.random.default_rng(100 + s).permutation(len(data))
            rec = lambda idx: Records(data.x[idx], data.y[idx])  # noqa: E731
            members, nonmembers, population = rec(perm[:n]), rec(perm[n : 2 * n]), rec(perm[2 * n :])
            training = ReferenceTraining(make, n, epochs=epochs, batch_size=32, lr=5e-3)
            target = training.train(members.x, members.y, seed=500 + s)
            t0 = time.perf_counter()
            res = membership_inference(target, members, nonmembers, population, training, num_references=k,
                                       reference_mode=mode, seed=s)
            wall = time.perf_counter() - t0
            per["train_s"].append(res.details["reference_train_seconds"])
            per["score_s"].append(wall - res.details["reference_train_seconds"])
            for a in ATTACKS:
                if a in res.scores:
                    per[a].append(tpr_at_fpr(res.scores[a], res.labels, 0.01)[0])
                    per[f"{a}_auc"].append(roc_auc(res.scores[a], res.labels))
        rows[k] = (mode, {key: (statistics.mean(v) if v else None) for key, v in per.items()})
        print(f"  K={k:<3d} {mode:7s} done: {rows[k][1]['train_s']:.1f} s of reference training per target", flush=True)

    base = rows[ks[0]][1]["train_s"] + rows[ks[0]][1]["score_s"]
    print()
    print(f"MIA on one target ({n} members, {n} non-members, {epochs} epochs; mean of {splits} split(s); "
          f"{args.threads} thread(s))")
    cols = ["loss", "lira_online", "lira_offline", "rmia", "rmia_offline"]
    print(f"{'K':>3} {'mode':8s} {'wall s':>7} {'x K=' + str(ks[0]):>7} {'score s':>8}   TPR@1%FPR: "
          + " ".join(f"{c:>12s}" for c in cols))
    for k in ks:
        mode, r = rows[k]
        wall = r["train_s"] + r["score_s"]
        cells = " ".join(f"{r[c]:12.3f}" if r[c] is not None else f"{'-':>12s}" for c in cols)
        print(f"{k:>3} {mode:8s} {wall:7.1f} {wall / base:7.1f} {r['score_s']:8.2f}   {'':10s} {cells}")
    print(f"{'':>3} {'':8s} {'':>7} {'':>7} {'':>8}   AUC:       "
          + " ".join(f"{c:>12s}" for c in cols))
    for k in ks:
        mode, r = rows[k]
        cells = " ".join(f"{r[c + '_auc']:12.3f}" if r[c + "_auc"] is not None else f"{'-':>12s}" for c in cols)
        print(f"{k:>3} {mode:8s} {'':>7} {'':>7} {'':>8}   {'':10s} {cells}")
    print()
    print("RMIA vs LiRA at equal cost (same K, same reference models), TPR at 1% FPR:")
    for k in ks:
        mode, r = rows[k]
        pairs = [("rmia_offline", "lira_offline")] if mode == "offline" else [("rmia", "lira_online"), ("rmia_offline", "lira_offline")]
        text = "; ".join(
            f"{a} {r[a]:.3f} vs {b} {r[b]:.3f} ({'RMIA' if r[a] > r[b] else 'LiRA' if r[b] > r[a] else 'tie'} ahead)"
            for a, b in pairs
        )
        print(f"  K={k}: {text}")


if __name__ == "__main__":
    main()
