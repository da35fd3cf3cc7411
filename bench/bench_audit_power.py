"""Power of the white-box audits: can they tell a broken DP-SGD from a working one? (issue #15)

One row per case (the honest mechanism and the planted bugs of ``attacks.planted_bugs``) at claimed
epsilon 1, 4 and 8, on the demo's heart-disease task (one hospital's shard, the demo's client model,
batch 32, 2 local epochs x 5 rounds, the noise calibrated by ``privacy.dp.HospitalDP`` for the claim):

* the white-box every-step gradient-canary audit (``attacks.whitebox``): the one-run lower bounds on the same
  guesses, f-DP ("lb fDP", Mahloujifar et al. 2025, Gaussian trade-off: the headline, decides the status) and
  (eps, delta)-DP ("lb Stnk", Steinke et al. 2023, any mechanism); the Gaussian-DP mu estimate with its
  interval beside the mu the ledger's mechanism gives that score ("claim mu"); and its consistency checks;
* the per-step mechanism audit (``attacks.mechanism``): mu of one clip-and-noise step with its interval,
  against the configured 1/sigma.

``--seeds N`` runs the honest case over N seeds per epsilon and counts flags. Prints ratios
(each lower bound / accountant epsilon, per-step mu / configured mu), measured in this run.

    OMP_NUM_THREADS=1 python bench/bench_audit_power.py [--seeds 10] [--canaries 10000] [--mode lean]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Secure RNG turned off")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.mechanism import mechanism_audit  # noqa: E402
from attacks.planted_bugs import BUGS, plant  # noqa: E402
from attacks.whitebox import replay_with_canaries, whitebox_entry  # noqa: E402
from privacy.dp import HospitalDP, PrivacyProfile  # noqa: E402
from privacy.ledger import PrivacyLedger  # noqa: E402

DEMO_TASK = """
run: {name: audit-power, seed: 0, rounds: 5}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3}
tasks:
  train:
    - {name: heart_disease, partition: natural}
client: {local_epochs: 2, batch_size: 32}
injection: {enabled: false}
baseline: {single_hospital: false}
"""
CASES = ["honest", *BUGS]


def heart_disease(hospital: str = "cleveland"):
    """(model factory, x, y, config) of the demo's heart-disease task at one hospital."""
    import yaml

    from secure_fedkim.hospital.local_training import new_client_model
    from secure_fedkim.config import parse_config
    from secure_fedkim.plan import build_plan

    cfg = parse_config(yaml.safe_load(DEMO_TASK))
    plans = build_plan(cfg)
    plan = plans["heart_disease"]
    data = plan.data.subset(np.asarray(plan.split.clients[hospital], dtype=np.int64))

    def make(seed: int):
        with torch.random.fork_rng(devices=[]):
            model = new_client_model(cfg, plans)
            torch.manual_seed(seed)
            for m in model.modules():
                if m is not model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return model.task_model("heart_disease")

    return make, data.x, data.y, cfg


class Setting:
    """One hospital's planned run: the schedule, and the noise calibrated once per claimed epsilon."""

    def __init__(self, make, x, y, cfg, mode: str = "lean"):
        self.make, self.x, self.y, self.cfg, self.mode = make, x, y, cfg, mode
        self.batches = math.ceil(len(x) / min(cfg.client.batch_size, len(x)))
        self.epochs = cfg.client.local_epochs * cfg.run.rounds
        self.sigma: dict[float, float] = {}

    def hospital_dp(self, claimed: float, ledger_dir: Path) -> HospitalDP:
        dp = HospitalDP(
            PrivacyProfile(target_epsilon=claimed), PrivacyLedger(ledger_dir / f"eps{claimed}.jsonl"), f"eps{claimed}",
            [(1.0 / self.batches, self.batches * self.epochs)], 1, n_records=len(self.x),
            noise_multiplier=self.sigma.get(claimed),
        )
        self.sigma[claimed] = dp.noise_multiplier
        return dp


def audit_case(s: Setting, claimed: float, case: str, *, canaries: int, trials: int, seed: int) -> dict:
    """Both audits of one case; returns the whitebox and mechanism entries and the seconds each took."""
    with tempfile.TemporaryDirectory() as tmp:
        dp = s.hospital_dp(claimed, Path(tmp))
        t0 = time.perf_counter()
        with plant(case):
            obs = replay_with_canaries(
                s.make, s.x, s.y, dp, epochs=s.epochs, batch_size=s.cfg.client.batch_size, lr=s.cfg.client.lr,
                canaries=canaries, grad_sample_mode=s.mode, task="heart_disease", seed=seed,
            )
        history = dp.history()
        wb = whitebox_entry(
            obs, steps_ledger=sum(h.num_steps for h in history), history_ledger=history, delta=dp.delta,
            accountant=dp.accountant, accountant_epsilon=dp.spent_epsilon(), hospital="cleveland",
            task="heart_disease", seconds=time.perf_counter() - t0,
        )
    with plant(case):
        mech = mechanism_audit(
            s.make(seed), s.x, s.y, noise_multiplier=s.sigma[claimed], grad_sample_mode=s.mode, trials=trials,
            batch_size=s.cfg.client.batch_size, seed=seed,
        )
    return {"whitebox": wb, "mechanism": mech}


def flagged_by(res: dict) -> list[str]:
    out = []
    wb = res["whitebox"]
    if wb["status"] == "inconsistent":
        if wb["eps_lb_one_run"] > (wb["accountant_epsilon_audited_steps"] or math.inf):
            out.append("f-DP lower bound")
        if wb["gdp_mu_interval"][0] > (wb["claimed_score_mu"] or math.inf) * 1.1:
            out.append("GDP")
        out += [c["name"].split(" ")[0] + "-check" for c in wb["checks"] if not c["passed"]]
    if res["mechanism"]["status"] == "inconsistent":
        out.append("per-step mu")
    return out


def row(claimed: float, case: str, res: dict) -> str:
    wb, mech = res["whitebox"], res["mechanism"]
    lo, hi = wb["gdp_mu_interval"]
    mlo, mhi = mech["mu_interval"]
    flags = flagged_by(res)
    acc = wb["accountant_epsilon_audited_steps"]
    return (
        f"{claimed:>4g}  {case:<21s} {acc if acc is None else round(acc, 2)!s:>6}  {wb['eps_lb_one_run']:6.2f}  "
        f"{wb['eps_lb_one_run_steinke']:7.2f}  {wb['gdp_mu_estimate']:8.3g} [{lo:.3g}, {hi:.3g}]".ljust(81)
        + f"{wb['claimed_score_mu']:6.3f}  {mech['mu_estimate']:7.3g} [{mlo:.3g}, {mhi:.3g}] vs {mech['mu_configured']:.3f}".ljust(42)
        + f"{wb['status'][:12]:<13s}{'FLAGGED by ' + ', '.join(flags) if flags else 'not flagged':<40s}"
        f"{wb['seconds'] + mech['seconds']:6.1f}"
    )


HEADER = (
    f"{'eps':>4}  {'case':<21s} {'acc.eps':>6}  {'lb fDP':>6}  {'lb Stnk':>7}  {'GDP mu [interval]':<28s}".ljust(81)
    + f"{'claim mu':>6}  {'per-step mu [interval] vs 1/sigma':<34s}".ljust(42)
    + f"{'whitebox':<13s}{'flagged':<40s}{'sec':>6}"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--seeds", type=int, default=0, help="also run the honest case over this many seeds and count flags")
    ap.add_argument("--canaries", type=int, default=20_000)
    ap.add_argument("--trials", type=int, default=50_000)
    ap.add_argument("--mode", choices=["lean", "hooks"], default="lean")
    ap.add_argument("--hospital", default="cleveland")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = Setting(*heart_disease(args.hospital), mode=args.mode)
    print(f"heart_disease @ {args.hospital}: {len(s.x)} records, q = 1/{s.batches}, {s.batches * s.epochs} steps, "
          f"{args.canaries} gradient canaries, {args.trials} per-step trials, path {args.mode!r}")
    print(HEADER)
    results: dict[tuple[float, str], dict] = {}
    for eps in args.epsilons:
        for case in args.cases:
            res = audit_case(s, eps, case, canaries=args.canaries, trials=args.trials, seed=0)
            results[(eps, case)] = res
            print(row(eps, case, res), flush=True)
    summary = []
    if args.seeds:
        for eps in args.epsilons:
            flags, ratios, ratios_steinke = 0, [], []
            for seed in range(1, args.seeds + 1):
                res = audit_case(s, eps, "honest", canaries=args.canaries, trials=args.trials, seed=seed)
                flags += bool(flagged_by(res))
                ratios.append(res["whitebox"]["ratio"])
                ratios_steinke.append(res["whitebox"]["ratio_steinke"])
                print(row(eps, f"honest seed {seed}", res), flush=True)
            summary.append(f"honest over {args.seeds} seeds at eps {eps:g}: flagged {flags} times; lower bound / "
                           f"accountant eps median: f-DP {np.median(ratios):.2f} (min {min(ratios):.2f}), Steinke "
                           f"{np.median(ratios_steinke):.2f} (min {min(ratios_steinke):.2f})")
    print()
    for (eps, case), res in results.items():
        wb, mech = res["whitebox"], res["mechanism"]
        if case == "honest":
            lo, hi = mech["mu_interval"]
            summary.append(
                f"honest eps {eps:g}: lower bound / accountant eps = {wb['ratio']:.2f} f-DP, {wb['ratio_steinke']:.2f} "
                f"Steinke (max certifiable {wb['max_certifiable_epsilon']:.2f} / {wb['max_certifiable_epsilon_steinke']:.2f}); "
                f"per-step mu / configured = "
                f"{mech['mu_estimate'] / mech['mu_configured']:.3f} (interval {lo / mech['mu_configured']:.3f}-"
                f"{hi / mech['mu_configured']:.3f}); GDP mu / claimed mechanism's mu = "
                f"{wb['gdp_mu_estimate'] / wb['claimed_score_mu']:.2f} (CLT mu {wb['accountant_gdp_mu']:.3f})"
            )
    for eps in args.epsilons:
        missed = [c for c in args.cases if c != "honest" and (eps, c) in results and not flagged_by(results[(eps, c)])]
        summary.append(f"eps {eps:g}: bugs flagged {len([c for c in args.cases if c != 'honest']) - len(missed)}"
                       f"/{len([c for c in args.cases if c != 'honest'])}" + (f"; missed: {', '.join(missed)}" if missed else ""))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
