"""`secure-fedkim`: the command line. The one place that wires secure_fedkim, privacy and attacks together."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"secure-fedkim: warning: {message}\n"


def _cmd_run(args) -> int:
    import warnings

    from secure_fedkim.config import load_config
    from secure_fedkim.drivers.run import (
        format_comparison,
        format_injection,
        run_federation,
    )
    from secure_fedkim.hospital.baseline import format_spend

    warnings.formatwarning = _one_line_warning  # a warning is one line, not a file name and a source line
    cfg, text = load_config(args.config)
    if cfg.study is not None:
        from secure_fedkim.drivers.study import format_study, run_study

        study_dir, results = run_study(cfg, text, out_dir=args.out, progress=not args.quiet)
        print(format_study(results))  # AUROC: accuracy on tasks of 5-10% positives says little (study.json has it)
        print(f"study written to {study_dir}")
        return 0
    result = run_federation(cfg, text, out_dir=args.out, progress=not args.quiet, config_path=args.config)
    if result.single_hospital:
        print(format_comparison(result))
    if result.privacy_spend:
        print(format_spend(result.privacy_spend))
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

    _check_budget_args(args)
    if args.home is not None and args.config is None:
        return _budget_for_home(args)
    if args.config is not None:
        return _budget_for_config(args)
    missing = [f"--{k}" for k in ("records", "rounds") if getattr(args, k) is None]
    if missing or (args.epsilon is None) == (args.noise is None):
        raise UsageError("budget: give --epsilon (plan the noise) or --noise (epsilon per round), with --records "
                         "and --rounds; or --config CONFIG --epsilon E to plan every hospital of a federation")
    units, what = (args.patients, "--patients") if args.patients is not None else (args.records, "--records")
    if args.patients is not None and args.patients > args.records:
        raise UsageError(f"budget: --patients {args.patients} is more than --records {args.records} (a patient has >= 1 record)")
    if args.batch > units:
        raise UsageError(f"budget: --batch {args.batch} is larger than {what} {units}")
    try:
        if args.epsilon is not None:
            for i, target in enumerate(args.epsilon):  # several targets: one plan after another
                plan = b.forecast(target, args.delta, args.records, args.batch, args.epochs, args.rounds, args.accountant,
                                  unit="patient" if args.patients is not None else "record", n_patients=args.patients)
                comparison = b.compare_accountants(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.rounds, plan.delta)
                print(("\n" if i else "") + b.format_table(plan, comparison), end="")
        else:
            _print_noise_budget(args, b)
    except ValueError as e:  # an unreachable target, a delta >= 1/records: the accountant's own reason
        raise UsageError(f"budget: {e}") from None
    print("budget printed to standard output (nothing written)")
    return 0


def _home_policy(args):
    """`--home`'s state directory and its signed policy (None when it has none), verified."""
    from secure_fedkim.deploy.policy import PolicyError, load_policy
    from secure_fedkim.rundir.layout import HospitalDir

    home = HospitalDir(args.home)
    if not home.ledger.is_file():
        raise UsageError(f"budget: {home.ledger} not found: --home is a hospital's state directory (its ledger.jsonl)")
    policy_path = args.policy or home.policy
    if not Path(policy_path).is_file():
        if args.policy is not None:
            raise UsageError(f"budget: --policy {args.policy} not found")
        return home, None
    try:
        if args.public_key is not None:
            key = args.public_key
        else:
            from secure_fedkim.deploy.identity import load_signing_key

            key = load_signing_key(home.path).public_key()
        return home, load_policy(policy_path, key)
    except (PolicyError, OSError, ValueError) as e:
        raise UsageError(f"budget: {e}") from None


def _plan_against_lifetime(args, cfg, plans, planned: dict) -> None:
    """`budget --config C --epsilon E --home STATE_DIR`: each planned target of that hospital composed with the
    earlier runs its ledger holds on the same data, against its policy's lifetime cap (what its node will check)."""
    from privacy.accounting import Step
    from privacy.ledger import LedgerTampered
    from privacy.lifetime import LifetimeIntegrityError, fmt_eps
    from secure_fedkim.deploy.policy import dataset_commitment, lifetime_of

    home, policy = _home_policy(args)
    name = policy.hospital if policy is not None else home.path.name
    if name not in planned:
        raise UsageError(f"budget: --home is hospital {name!r}'s state, not a hospital of {args.config} "
                         f"({', '.join(cfg.federation.clients)})")
    caps = policy.privacy if policy is not None else None
    delta = caps.resolved_lifetime_delta() if caps else 1e-5  # the lifetime's delta (--delta is the run's)
    cap = caps.max_lifetime_epsilon if caps else None
    tasks = dataset_commitment(cfg, plans, name)
    print(f"lifetime at {name} ({home.path}), epsilon at delta {delta:g}, cap "
          f"{'none' if cap is None else f'{cap:g}'}:")
    for target, sigma, schedule in planned[name]:
        try:
            lt = lifetime_of(home.path, delta, cap=cap, current="(planned run)", tasks=tasks,
                             planned=[Step(sigma, q, n) for q, n in schedule],
                             scope=caps.lifetime_scope if caps else "data")
        except (LedgerTampered, LifetimeIntegrityError) as e:
            raise UsageError(f"budget: {home.ledger}: the lifetime spend cannot be known: {e}") from None
        names = ", ".join(r.run_id for r in lt.counted) or "no earlier run"
        action = "calibrates it to what is left" if caps.on_lifetime_exceeded == "calibrate" else "refuses this run"
        verdict = "" if cap is None else (f" -> over the cap: the node {action}" if lt.exceeds else " -> within the cap")
        print(f"  epsilon {target:g}: {fmt_eps(lt.spent)} spent in {names}; this run {fmt_eps(lt.planned)}; "
              f"composed {fmt_eps(lt.total)}{verdict}")


def _budget_for_home(args) -> int:
    """`budget --home STATE_DIR`: a hospital's lifetime spend, per run of its ledger, and what its policy leaves."""
    from privacy.ledger import REFUSED, LedgerTampered, PrivacyLedger
    from privacy.lifetime import LifetimeIntegrityError, fmt_eps
    from secure_fedkim.deploy.policy import lifetime_of

    if args.epsilon is not None or args.noise is not None:
        raise UsageError("budget: --home alone reads a hospital's ledger (with --delta, --policy, --public-key); "
                         "with --config CONFIG --epsilon E it also plans a run against what is left")
    home, policy = _home_policy(args)
    caps = policy.privacy if policy is not None else None
    delta = args.delta if args.delta is not None else (caps.resolved_lifetime_delta() if caps else 1e-5)
    cap = caps.max_lifetime_epsilon if caps else None
    try:
        lt = lifetime_of(home.path, delta, cap=cap, scope=caps.lifetime_scope if caps else "data", cumulative=True)
    except (LedgerTampered, LifetimeIntegrityError) as e:
        print(f"secure-fedkim: error: budget: {home.ledger}: the lifetime spend cannot be known: {e}", file=sys.stderr)
        return 1
    refused = PrivacyLedger(home.ledger).events(REFUSED)
    print(f"lifetime privacy loss at {home.path} ({len(lt.runs)} run(s) in {home.ledger.name}, chain verified): "
          f"epsilon per {lt.unit} at delta {delta:g}, Opacus {lt.accountant}, runs composed step by step")
    rows = [("run", "DP rounds", "baseline", "data", "run alone", "lifetime after")]
    after = iter(lt.cumulative)
    for r in lt.runs:
        data = {"same": "same", "other": "other (not counted)", "none": "no commitment (counted)"}[r.data]
        rows.append((r.run_id, str(r.rounds), r.baseline, data, fmt_eps(r.epsilon),
                     fmt_eps(next(after)) if r.counted else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    names = ", ".join(r.run_id for r in lt.counted) or "none"
    if cap is not None:
        print(f"lifetime budget {cap:g} (policy {policy.file_sha256[:12]}, scope {caps.lifetime_scope}): "
              f"{fmt_eps(lt.spent)} spent in runs {names}; {fmt_eps(max(lt.remaining, 0.0))} left"
              + (" (OVER the cap)" if lt.exceeds else ""))
        print("  (a next run is accepted when its whole plan, composed with these runs step by step, stays within the "
              "cap; composition is not a sum, so what is left is a guide, not the test)")
    else:
        print(f"lifetime spend {fmt_eps(lt.spent)} in runs {names}; no lifetime budget "
              f"({'the policy sets no max_lifetime_epsilon' if policy else 'no policy found'})")
    for e in refused:
        print(f"refused: run {e.get('run_id')} round {e.get('round')}: {e.get('reason')}")
    print("budget printed to standard output (nothing written)")
    return 0


def _print_noise_budget(args, b) -> None:
    from privacy.accounting import poisson_schedule, resolve_delta

    unit, n = ("patient", args.patients) if args.patients is not None else ("record", args.records)
    delta = resolve_delta(args.delta, n)
    q, steps = poisson_schedule(n, args.batch, args.epochs)
    by_round = b.epsilon_by_round(args.noise, q, steps, args.rounds, delta, args.accountant)
    print(f"noise multiplier {args.noise:g}, sample rate {q:.6g} per {unit} (Poisson), {steps} steps per round, "
          f"delta {delta:.3g}")
    print(f"{'round':>5}  {'epsilon':>10}  (epsilon per {unit}; {b.round_accountant(args.accountant)}, composed round by round)")
    for r, eps in zip(b.table_rounds(args.rounds), by_round):
        print(f"{r:>5}  {eps:>10.4f}")
    for name, eps in b.compare_accountants(args.noise, q, steps, args.rounds, delta).items():
        print(f"{name:<20}  {eps:>10.4f}")
    if b.noise_dominates(args.noise, args.batch):
        print(f"warning: noise multiplier {args.noise:g} over batch {args.batch} means each step's mean gradient is "
              f"mostly noise; a model typically stays at its untrained AUROC")


# Largest values `budget` accepts: beyond them one accountant call takes minutes (steps grow with
# records x epochs x rounds), and no hospital federation is that large.
_BUDGET_LIMITS = {"records": 10**8, "patients": 10**8, "rounds": 10**5, "epochs": 10**3}


def _check_budget_args(args) -> None:
    """One line naming the option for every value the accountants cannot or should not take."""
    import math

    from privacy.budget import MIN_NOISE_MULTIPLIER

    def bad(option: str, why: str, value) -> UsageError:
        return UsageError(f"budget: --{option} {why}, got {value!r}")

    for target in args.epsilon or ():
        if not (math.isfinite(target) and target > 0):
            raise bad("epsilon", "must be a finite number > 0", target)
    if args.epsilon is not None and len(set(args.epsilon)) != len(args.epsilon):
        raise bad("epsilon", "lists a target twice", args.epsilon)
    if args.delta is not None and not (0 < args.delta < 1):
        raise bad("delta", "must lie strictly between 0 and 1", args.delta)
    if args.noise is not None and not (math.isfinite(args.noise) and args.noise >= MIN_NOISE_MULTIPLIER):
        raise bad("noise", f"must be a finite number >= {MIN_NOISE_MULTIPLIER:g} (below it the accountants' cost "
                           f"grows without bound and epsilon is far above any useful budget)", args.noise)
    for option in ("records", "patients", "rounds", "batch", "epochs"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise bad(option, "must be an integer >= 1", value)
        if value is not None and value > _BUDGET_LIMITS.get(option, value):
            raise bad(option, f"must be at most {_BUDGET_LIMITS[option]:,}", value)


def _calibrate_for(target: float, delta: float, schedule: list, accountant: str):
    """privacy.accounting.calibrate (the run's own calibration), never searching below the noise floor of
    privacy.budget (see MIN_NOISE_MULTIPLIER); an unreachable target is one usage line."""
    from privacy.accounting import calibrate
    from privacy.budget import MIN_NOISE_MULTIPLIER

    try:
        return calibrate(target, delta, schedule, accountant=accountant, floor=MIN_NOISE_MULTIPLIER)
    except ValueError as e:
        raise UsageError(f"budget: {e}") from None


def _expected_batches(cfg, plans, client: str) -> list[float]:
    """Expected Poisson batch (privacy units sampled per step, ``q * n``) of each task the hospital trains."""
    import numpy as np

    from privacy.accounting import poisson_schedule
    from secure_fedkim.hospital.local_training import patients_of, train_plans

    out = []
    for _, plan in train_plans(plans):
        shard = plan.shard(client)
        if len(shard):
            n = len(shard) if cfg.privacy.unit != "patient" else len(np.unique(patients_of(shard)))
            q, _ = poisson_schedule(n, cfg.client.batch_size, 1)
            out.append(q * n)
    return out


def _plan_hospital(args, cfg, plans, listed: list[int], client: str) -> tuple:
    """One hospital's plan for each target: (privacy units, delta, its dp_plan inputs, smallest expected batch,
    [(target, calibration, epsilon after each listed round, signal/noise)])."""
    from privacy.accounting import resolve_delta
    from privacy.budget import epsilon_by_round_schedule, signal_to_noise
    from secure_fedkim.hospital.local_training import dp_plan_inputs

    inputs = dp_plan_inputs(cfg, plans, client)  # what the run's own plan is calibrated on
    n = inputs["n_patients"] or inputs["n_records"]
    try:
        delta = resolve_delta(args.delta, n)
    except ValueError as e:
        raise UsageError(f"budget --config: {client}: {e}") from None
    schedule, rounds = inputs["round_schedule"], cfg.run.rounds
    batch = min(_expected_batches(cfg, plans, client))
    rows = []
    for target in args.epsilon:
        cal = _calibrate_for(target, delta, schedule * rounds + inputs["reserved"], args.accountant)
        eps = epsilon_by_round_schedule(cal.noise_multiplier, schedule, rounds, delta, args.accountant, listed)
        rows.append((target, cal, eps, signal_to_noise(cal.noise_multiplier, batch)))
    return n, delta, inputs, batch, rows


_FORKED: tuple = ()  # what a forked planning worker inherits instead of receiving it pickled (the shards)


def _plan_forked(client: str) -> tuple:
    return _plan_hospital(*_FORKED, client)


def _plan_hospitals(args, cfg, plans, listed: list[int]) -> list[tuple]:
    """Every hospital's `_plan_hospital`, in config order. Hospitals are independent and each costs seconds of
    accountant arithmetic (most of it pure Python), so they run in forked processes, one per core: forked
    after the imports and the data loading, a worker starts at once and shares the parent's pages."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _FORKED
    clients = list(cfg.federation.clients)
    workers = min(len(clients), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_plan_hospital(args, cfg, plans, listed, c) for c in clients]
    import opacus.accountants  # noqa: F401  (imported once here, not once per worker)

    _FORKED = (args, cfg, plans, listed)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_plan_forked, clients))
    finally:
        _FORKED = ()



def _budget_for_config(args) -> int:
    """Plan each hospital of a federation from its real shards (the schedule a run will use), for one target or
    several side by side."""
    import yaml

    from privacy.budget import round_accountant, table_rounds
    from secure_fedkim.config import load_config
    from secure_fedkim.hospital.local_training import load_plans

    if args.epsilon is None:
        raise UsageError("budget --config: give --epsilon, the budget to plan for every hospital")
    if args.patients is not None:
        raise UsageError("budget --config: --patients comes from the config's data (set privacy.unit: patient)")
    if args.write is not None and len(args.epsilon) > 1:
        raise UsageError(f"budget --config: --write writes one budget; give one --epsilon, got {len(args.epsilon)}")
    cfg, text = load_config(args.config)
    plans = load_plans(cfg, args.config)
    rounds, unit = cfg.run.rounds, cfg.privacy.unit
    listed = table_rounds(rounds)
    units = "patients" if unit == "patient" else "records"
    by_round_acc = round_accountant(args.accountant)
    several = len(args.epsilon) > 1
    if not several:
        print(f"{'hospital':<16}{units:>9}{'delta':>10}{'noise':>9}  epsilon per {unit} after each of {rounds} rounds "
              f"({by_round_acc}, composed round by round; the whole run and its verification by {args.accountant})")
    reserved = False
    planned: dict[str, list] = {}  # per hospital: (target, noise, the whole run's schedule with what it reserves)
    for client, (n, delta, inputs, batch, rows) in zip(cfg.federation.clients,
                                                       _plan_hospitals(args, cfg, plans, listed)):
        schedule, reserved = inputs["round_schedule"], bool(inputs["reserved"])
        for target, cal, _, _ in rows:
            planned.setdefault(client, []).append((target, cal.noise_multiplier, schedule * rounds + inputs["reserved"]))
        if not several:
            target, cal, eps, _ = rows[0]
            line = f"{client:<16}{n:>9}{delta:>10.3g}{cal.noise_multiplier:>9.4f}  " + " ".join(f"{e:.3f}" for e in eps)
            if inputs["reserved"]:
                line += f"  + baseline -> {cal.epsilon:.3f}"
            elif cal.epsilon != eps[-1]:
                line += f"  (whole run: {cal.epsilon:.3f} {args.accountant})"
            print(line)
            continue
        print(f"{client}: {n} {units}, delta {delta:.3g}, smallest expected batch {batch:.4g} {units}")
        head = " ".join(f"{'r' + str(r):>6}" for r in listed)
        whole = "+ baseline" if inputs["reserved"] else "whole run"
        print(f"  {'epsilon':>8} {'noise':>8} {'signal/noise':>12}  {head}  {whole} ({args.accountant})")
        for target, cal, eps, snr in rows:
            flag = "  mostly noise" if snr < 1 else ""
            print(f"  {target:>8g} {cal.noise_multiplier:>8.4f} {snr:>12.3g}  " + " ".join(f"{e:>6.3f}" for e in eps)
                  + f"  {cal.epsilon:>10.3f}{flag}")
    if several:
        print(f"(epsilon per {unit} after each round by {by_round_acc}, composed round by round; the last column is the "
              f"whole run by {args.accountant}, the accountant the run enforces. signal/noise: the smallest expected batch "
              f"over the noise multiplier, assuming a typical clipped gradient of norm C (clip norm); below 1 a step is "
              f"mostly noise and a model typically stays near its untrained AUROC)")
    if reserved:
        print("(the config trains a single-hospital baseline on the same records: the noise is calibrated for the "
              "federation and the baseline together, so both compose within each epsilon)" if several else
              f"(the config trains a single-hospital baseline on the same records: the noise is calibrated for the "
              f"federation and the baseline together, so both compose within epsilon {args.epsilon[0]:g})")
    if args.home is not None:
        _plan_against_lifetime(args, cfg, plans, planned)
    if args.write is not None:
        data = yaml.safe_load(text)
        profile = {"target_epsilon": args.epsilon[0], "accountant": args.accountant}
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

    try:
        p = write_report(args.run_dir, partner=args.partner, reference=args.reference, key=args.key)
    except ValueError as e:  # a key inside the run directory, or not Ed25519, or an unknown partner
        raise UsageError(str(e)) from e
    print(f"report written to {p.json}, {p.html}, {p.pdf} (signature {p.sig})")
    return 0


def _cmd_report_key(args) -> int:
    from secure_fedkim.report.sign import new_issuer_key, public_key_path

    try:
        path = new_issuer_key(args.out, args.name, args.organisation)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"report-signing key written to {path} (mode 0600; keep it outside run directories); publish "
          f"{public_key_path(path)} for `secure-fedkim verify --public-key`")
    return 0


def _cmd_verify(args) -> int:
    from secure_fedkim.report import verify_report

    if args.public_key is None:
        raise UsageError("verify: give --public-key, the issuer's public key obtained from the issuer (a key found "
                         "beside a report proves nothing)")
    problems = verify_report(args.report, public_key=args.public_key)
    for m in problems:
        print(m)
    print("report verified: signatures, status, summary, ledgers, config and artifacts match" if not problems
          else f"{len(problems)} mismatch(es)")
    return 1 if problems else 0


class UsageError(ValueError):
    """A command was called with arguments that do not fit together."""


_BUDGET_EXAMPLES = """examples:
  secure-fedkim budget --epsilon 8 --records 5000 --rounds 5
      the noise multiplier for epsilon 8 over 5 rounds of 2 local epochs, batch 64, and epsilon after each round
  secure-fedkim budget --noise 1.1 --records 5000 --rounds 5 --batch 32 --epochs 1
      epsilon after each round for a given noise
  secure-fedkim budget --epsilon 4 --records 20000 --patients 2000 --batch 32 --rounds 5
      patient-level DP-SGD: 32 patients per step, epsilon per patient
  secure-fedkim budget --config configs/demo.yaml --epsilon 8 --write configs/my_dp.yaml
      every hospital of a federation from its real shards, and a copy of the config with that budget
  secure-fedkim budget --config configs/demo.yaml --epsilon 1 2 4 8
      what-if: each hospital's noise, epsilon after each round and signal-to-noise of a step, per target
  secure-fedkim budget --home /srv/fedkim/north
      a hospital's lifetime spend: every run of its ledger on the same data, composed, and what its policy leaves
  secure-fedkim budget --config configs/deploy/federation.yaml --epsilon 2 4 --home /srv/fedkim/north
      the same plans, each composed with north's earlier runs against its lifetime budget
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secure-fedkim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a federation (Flower simulation on this machine)")
    r.add_argument("config", type=Path, help="YAML run config, e.g. configs/demo.yaml")
    r.add_argument("--out", type=Path, default=None, help="run directory (default: <out_dir>/<name>-<UTC time>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser(
        "budget", help="plan a DP budget: noise for a target epsilon, or epsilon per round",
        description="Plan a hospital's DP-SGD budget (epsilon per record, or per patient with --patients) before a run: the noise\n"
                    "multiplier that keeps a whole run within a target epsilon, or the epsilon a given noise\n"
                    "spends after each round, with four accountants side by side. A bad value: one error line, exit 2.",
        epilog=_BUDGET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--epsilon", type=float, nargs="+", metavar="E",
                   help="target epsilon per record for the whole run, e.g. 8; several (e.g. 1 2 4 8) plan each, side by side")
    b.add_argument("--noise", type=float, help="a noise multiplier (>= 0.5), to see epsilon after each round")
    b.add_argument("--delta", type=float, default=None, help="target delta in (0, 1/records) (default: min(1e-5, 1/(10 n)))")
    b.add_argument("--records", type=int, help="training records at the hospital (required without --config)")
    b.add_argument("--patients", type=int, help="patients among those records: plan patient-level DP-SGD (epsilon "
                   "per patient; --batch then counts patients)")
    b.add_argument("--batch", type=int, default=64, help="expected batch size, <= records (default: %(default)s)")
    b.add_argument("--epochs", type=int, default=2,
                   help="local epochs per round (default: %(default)s, client.local_epochs of configs/demo.yaml)")
    b.add_argument("--rounds", type=int, help="federated rounds (required without --config)")
    b.add_argument("--accountant", choices=["prv", "rdp"], default="prv",
                   help="the accountant that calibrates and enforces the budget (default: %(default)s)")
    b.add_argument("--config", type=Path, help="plan every hospital of this federation from its real shards")
    b.add_argument("--write", type=Path, help="with --config: write a copy of the config with this budget")
    b.add_argument("--home", type=Path, help="a hospital's state directory: its lifetime spend per run (every run of "
                   "its ledger on the same data, composed) and what its policy's max_lifetime_epsilon leaves")
    b.add_argument("--policy", type=Path, help="with --home: the signed policy (default: STATE_DIR/policy.yaml)")
    b.add_argument("--public-key", type=Path, help="with --home: the policy's verification key (default: the "
                   "hospital's own signing key in STATE_DIR)")
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
    rp.add_argument("--key", type=Path, default=None, help="the issuer's signing key, outside the run directory "
                    "(default: $SECURE_FEDKIM_REPORT_KEY or ~/.config/secure-fedkim/report_signing_key.pem)")
    rp.set_defaults(func=_cmd_report)

    rk = sub.add_parser("report-key", help="create the report issuer's signing key (once, outside any run directory)")
    rk.add_argument("--name", required=True, help="the signer's name, written into every report it signs")
    rk.add_argument("--organisation", required=True, help="the signer's organisation")
    rk.add_argument("--out", type=Path, default=None, help="key path (default: $SECURE_FEDKIM_REPORT_KEY or "
                    "~/.config/secure-fedkim/report_signing_key.pem); the public key is written beside as .pub.pem")
    rk.set_defaults(func=_cmd_report_key)

    v = sub.add_parser("verify", help="check a report's signatures against the issuer's key and its run's ledgers")
    v.add_argument("report", type=Path, help="report.json (or report_<partner>.json)")
    v.add_argument("--public-key", type=Path, default=None, help="the issuer's public key (.pub.pem), required")
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
    from secure_fedkim.deploy.policy import PolicyError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, UsageError, DeployError, PolicyError) as e:
        print(f"secure-fedkim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
