"""`secure-fedkim`: the command line. The one place that wires secure_fedkim, privacy and attacks together."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_run(args) -> int:
    from secure_fedkim.config import load_config
    from secure_fedkim.run import format_comparison, format_injection, run_federation

    cfg, text = load_config(args.config)
    if cfg.study is not None:
        from secure_fedkim.study import format_study, run_study

        study_dir, results = run_study(cfg, text, out_dir=args.out, progress=not args.quiet)
        print(format_study(results, "auroc"))
        print(format_study(results, "accuracy"))
        print(f"study written to {study_dir}")
        return 0
    result = run_federation(cfg, text, out_dir=args.out, progress=not args.quiet)
    if result.single_hospital:
        print(format_comparison(result))
    injection = format_injection(result)
    if injection:
        print(injection)
    print(f"run written to {result.run_dir}")
    return 0


def _cmd_budget(args) -> int:
    import logging

    from privacy import budget as b

    # Opacus's RDP analysis warns for every order it drops at small noise; the result stays an upper bound
    logging.getLogger("opacus").setLevel(logging.ERROR)

    if args.config is not None:
        return _budget_for_config(args)
    missing = [f"--{k}" for k in ("records", "rounds") if getattr(args, k) is None]
    if missing or (args.epsilon is None) == (args.noise is None):
        raise UsageError("budget: give --epsilon (plan the noise) or --noise (epsilon per round), with --records "
                         "and --rounds; or --config CONFIG --epsilon E to plan every hospital of a federation")
    if args.epsilon is not None:
        plan = b.plan(args.epsilon, args.delta, args.records, args.batch, args.epochs, args.rounds, args.accountant)
        comparison = b.compare_accountants(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.rounds, plan.delta)
        print(b.format_table(plan, comparison), end="")
    else:
        from privacy.accounting import resolve_delta

        delta = resolve_delta(args.delta, args.records)
        q, steps = args.batch / args.records, args.epochs * -(-args.records // args.batch)
        by_round = b.epsilon_by_round(args.noise, q, steps, args.rounds, delta, args.accountant)
        print(f"noise multiplier {args.noise:g}, sample rate {q:.6g} (Poisson), {steps} steps per round, delta {delta:.3g}")
        print(f"{'round':>5}  {'epsilon':>10}")
        for r, eps in enumerate(by_round, 1):
            print(f"{r:>5}  {eps:>10.4f}")
        for name, eps in b.compare_accountants(args.noise, q, steps, args.rounds, delta).items():
            print(f"{name:<20}  {eps:>10.4f}")
    print("budget printed to standard output (nothing written)")
    return 0


def _budget_for_config(args) -> int:
    """Plan each hospital of a federation from its real shards (the schedule a run will use)."""
    import yaml

    from privacy.accounting import Step, calibrate_noise, epsilon, resolve_delta
    from secure_fedkim.client import dp_round_schedule, hospital_records
    from secure_fedkim.config import load_config
    from secure_fedkim.plan import build_plan

    if args.epsilon is None:
        raise UsageError("budget --config: give --epsilon, the budget to plan for every hospital")
    cfg, text = load_config(args.config)
    plans = build_plan(cfg)
    rounds = cfg.run.rounds
    print(f"{'hospital':<16}{'records':>9}{'delta':>10}{'noise':>9}  epsilon after each of {rounds} rounds ({args.accountant})")
    for client in cfg.federation.clients:
        n = hospital_records(plans, client)
        delta = resolve_delta(args.delta, n)
        schedule = dp_round_schedule(plans, client, cfg)
        sigma = calibrate_noise(args.epsilon, delta, schedule * rounds, accountant=args.accountant)
        eps = [epsilon([Step(sigma, q, k) for q, k in schedule * r], delta, args.accountant) for r in range(1, rounds + 1)]
        print(f"{client:<16}{n:>9}{delta:>10.3g}{sigma:>9.4f}  " + " ".join(f"{e:.3f}" for e in eps))
    if args.write is not None:
        data = yaml.safe_load(text)
        profile = {"target_epsilon": args.epsilon, "accountant": args.accountant}
        if args.delta is not None:
            profile["delta"] = args.delta
        data["privacy"] = {**data.get("privacy", {}), "dp": True, "profile": profile}
        args.write.write_text(yaml.safe_dump(data, sort_keys=False))
        print(f"config with this budget written to {args.write}")
    else:
        print("budget printed to standard output (nothing written)")
    return 0


def _cmd_audit(args) -> int:
    from attacks.audit import audit_run, format_audit_table, load_audit_config

    audit = audit_run(args.run_dir, load_audit_config(args.config), progress=not args.quiet)
    print(format_audit_table(audit))
    print(f"audit written to {Path(args.run_dir) / 'audit'}")
    return 0


def _cmd_report(args) -> int:
    from secure_fedkim.report import write_report

    p = write_report(args.run_dir, partner=args.partner, reference=args.reference)
    print(f"report written to {p.json}, {p.html}, {p.pdf} (signature {p.sig})")
    return 0


def _cmd_verify(args) -> int:
    from secure_fedkim.report import verify_report

    problems = verify_report(args.report, public_key=args.public_key)
    for m in problems:
        print(m)
    print("report verified: signature, ledgers, config and artifacts match" if not problems else f"{len(problems)} mismatch(es)")
    return 1 if problems else 0


class UsageError(ValueError):
    """A command was called with arguments that do not fit together."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secure-fedkim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a federation (Flower simulation on this machine)")
    r.add_argument("config", type=Path, help="YAML run config, e.g. configs/demo.yaml")
    r.add_argument("--out", type=Path, default=None, help="run directory (default: <out_dir>/<name>-<UTC time>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser("budget", help="plan a DP budget: noise for a target epsilon, or epsilon per round")
    b.add_argument("--epsilon", type=float, help="target epsilon for the whole run")
    b.add_argument("--noise", type=float, help="a noise multiplier, to see epsilon after each round")
    b.add_argument("--delta", type=float, default=None, help="default: min(1e-5, 1/(10 n))")
    b.add_argument("--records", type=int, help="training records at the hospital")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    b.add_argument("--rounds", type=int)
    b.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    b.add_argument("--config", type=Path, help="plan every hospital of this federation from its real shards")
    b.add_argument("--write", type=Path, help="with --config: write a copy of the config with this budget")
    b.set_defaults(func=_cmd_budget)

    a = sub.add_parser("audit", help="leakage audits of a finished run: membership inference, DP canaries, inversion")
    a.add_argument("run_dir", type=Path)
    a.add_argument("--config", type=Path, default=None, help="audit config (default: the values in configs/audit.yaml)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=_cmd_audit)

    rp = sub.add_parser("report", help="signed compliance report of a run: report.json, report.html, report.pdf")
    rp.add_argument("run_dir", type=Path)
    rp.add_argument("--partner", default=None, help="one hospital's report: its figures in full, others in aggregate")
    rp.add_argument("--reference", type=Path, default=None, help="a non-private run to show utility beside")
    rp.set_defaults(func=_cmd_report)

    v = sub.add_parser("verify", help="check a report's signature against its run's ledgers, config and artifacts")
    v.add_argument("report", type=Path, help="report.json (or report_<partner>.json)")
    v.add_argument("--public-key", type=Path, default=None, help="the issuer's public key (default: beside the run)")
    v.set_defaults(func=_cmd_verify)

    from secure_fedkim.deploy import add_deploy_parser

    add_deploy_parser(sub)  # secure-fedkim deploy {tls, node-keys, hospital, check-policy, code-hash, init, local}
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from secure_fedkim.config import ConfigError
    from secure_fedkim.data import DataError
    from secure_fedkim.deploy import DeployError
    from secure_fedkim.policy import PolicyError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, UsageError, DeployError, PolicyError) as e:
        print(f"secure-fedkim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
