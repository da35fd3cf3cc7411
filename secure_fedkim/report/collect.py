"""Reading a finished run for its report: ledgers, metrics, summary, audit, artifacts.

Every figure is taken from its source and every epsilon is recomputed here by the accountant from the
hospital's verified ledger (``privacy.accounting``); a value recorded in the ledger or the metrics is
only compared against the recomputation, never printed instead of it.

Nothing here writes to the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from privacy.accounting import Step, epsilon, gdp_mu, group_privacy_epsilon, independent_epsilon, merge_history
from privacy.ledger import (DATASET_COMMITMENT, DP_PLAN, DP_ROUND, GENESIS_HASH, REFUSED, RESUME, SKIPPED_BUDGET,
                            LedgerTampered, PrivacyLedger, this_run_id)
from secure_fedkim.hospital.local_training import task_local_epochs
from secure_fedkim.rundir.layout import RunDir

#: relative tolerance when a recorded epsilon (ledger, metrics) is compared with the recomputation
EPS_RTOL = 1e-6
#: budget slack, the same as privacy.dp's enforcement
BUDGET_SLACK = 1e-9
#: PRV accountant's error bound as Opacus 1.6 uses it (privacy.accounting.epsilon)
PRV_EPS_ERROR = 0.01


# ------------------------------------------------------------------------------------------ accounting
def _blocks(history: list[Step]) -> tuple[tuple[float, float, int], ...]:
    return tuple(sorted((b.noise_multiplier, b.sample_rate, b.num_steps) for b in merge_history(history)))


@lru_cache(maxsize=8192)
def _eps(blocks: tuple, delta: float, accountant: str) -> float:
    return epsilon([Step(*b) for b in blocks], delta, accountant)


@lru_cache(maxsize=8192)
def _indep(blocks: tuple, delta: float, method: str) -> float:
    return independent_epsilon([Step(*b) for b in blocks], delta, method)


def account(history: list[Step], delta: float, accountant: str) -> float:
    """The Opacus accountant's epsilon for ``history`` (cached: the function is pure)."""
    return _eps(_blocks(history), float(delta), accountant)


def independent(history: list[Step], delta: float, method: str) -> float:
    """Google dp_accounting's epsilon for ``history`` (cached)."""
    return _indep(_blocks(history), float(delta), method)


def independent_method(accountant: str) -> str:
    """The independent library's method comparable to ``accountant`` (PRV ~ PLD, RDP ~ RDP)."""
    return "rdp" if accountant == "rdp" else "pld"


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def close(a: float | None, b: float | None, rtol: float = EPS_RTOL) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def dist(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_of(mapping: dict[str, str | None]) -> str:
    """One SHA-256 over name=value lines (sorted): a commitment to values a partner report may not list."""
    text = "".join(f"{k}={v}\n" for k, v in sorted(mapping.items()))
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ findings
@dataclass
class Finding:
    """One observation behind a check. ``message`` may name ``hospital`` and its figures; ``anonymous``
    says the same without name or figures, for partner reports about other hospitals."""

    status: str
    message: str
    hospital: str | None = None
    anonymous: str = ""
    also: tuple[str, ...] = ()  # other hospitals ``message`` names: a partner report shows it only when it is them


# ------------------------------------------------------------------------------------------ hospitals
@dataclass
class HospitalFacts:
    name: str
    ledger_rel: str
    ledger_exists: bool = False
    ledger_verified: bool = False
    ledger_error: str | None = None
    head: str | None = None
    n_entries: int = 0
    run_id: str | None = None
    plan: dict | None = None
    dp: bool = False
    dp_rounds: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    participation: list[dict] = field(default_factory=list)
    mechanism: dict | None = None
    accounting: dict | None = None
    commitments: list[dict] = field(default_factory=list)
    baseline: dict | None = None  # the single-hospital baseline's ledger, when the run has one
    baseline_rounds: list[dict] = field(default_factory=list)  # its verified dp_round entries
    patient_bound: Any = None  # k, the most records of one patient (None: unknown), and where it comes from
    patient_bound_source: str | None = None
    findings: dict[str, list[Finding]] = field(default_factory=dict)

    def add(self, check: str, status: str, message: str, anonymous: str) -> None:
        self.findings.setdefault(check, []).append(Finding(status, message, self.name, anonymous))


def _clean_error(text: str, run_dir: Path) -> str:
    return text.replace(str(run_dir.resolve()) + "/", "").replace(str(run_dir) + "/", "")


def read_ledger(path: Path, run_dir: Path) -> tuple[list[dict] | None, str | None]:
    """(entries, None) when the chain verifies, (None, message naming the first bad entry) otherwise."""
    try:
        return PrivacyLedger(path).entries(), None
    except LedgerTampered as e:
        msg = _clean_error(str(e), run_dir)
        rel = path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else str(path)
        return None, msg.removeprefix(f"{rel}: ")


def pick_run_id(plans: list[dict], run_dir: Path, summary: dict) -> str | None:
    """The run id the hospital's facts are read for: :func:`privacy.ledger.this_run_id` of the ``dp_plan`` entries
    (the run directory's name, else the name recorded in summary.json, else the only run id). A report must cover
    one run, and names it (``run_id``): when the ledger holds several runs none of which is this one, the latest."""
    ids = [p.get("run_id") for p in plans if p.get("run_id")]
    picked = this_run_id(ids, run_dir.name, Path(str(summary.get("run_dir", ""))).name)
    return picked if picked is not None or not ids else ids[-1]


def _commitment(e: dict) -> dict:
    """A dataset_commitment entry for the report: hashes, with record counts suppressed below 10."""
    tasks = {}
    for name, t in (e.get("tasks") or {}).items():
        if isinstance(t, dict):
            tasks[name] = {k: (suppress(v) if k == "records" and isinstance(v, int) else v) for k, v in t.items()
                           if k == "records" or (isinstance(v, (str, dict)) and "sha" in k)}
    return {"seq": e.get("seq"), "time": e.get("time"), "tasks": tasks}


def history_of(dp_rounds: list[dict]) -> list[Step]:
    return [Step(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in dp_rounds]


def collect_hospital(run: "RunFacts", name: str) -> HospitalFacts:
    run_dir = run.run_dir
    path = run.files.ledger(name)
    h = HospitalFacts(name=name, ledger_rel=run.files.relative(path))
    h.ledger_exists = path.is_file()
    config_dp = run.config_dp
    entries: list[dict] = []
    if h.ledger_exists:
        got, err = read_ledger(path, run_dir)
        if got is None:
            h.ledger_error = err
            h.add("ledger_verified", "fail", f"{h.ledger_rel} does not verify: {err}", "a privacy ledger does not verify")
        else:
            entries = got
            h.ledger_verified = True
            h.n_entries = len(entries)
            h.head = entries[-1]["hash"] if entries else GENESIS_HASH
    elif config_dp:
        h.add("ledger_verified", "fail", f"{h.ledger_rel} is missing although the run is configured with DP",
              "a privacy ledger is missing")
    plans = [e for e in entries if e.get("event") == DP_PLAN]
    h.run_id = pick_run_id(plans, run_dir, run.summary)
    # a node's ledger holds every run (#29): a run this hospital refused has entries (refusal, commitment) but no plan,
    # and must not be read as the latest run it did train in
    mentioned = {e.get("run_id") for e in entries if e.get("run_id")}
    named = [n for n in (run_dir.name, Path(str(run.summary.get("run_dir", ""))).name) if n]
    if h.run_id not in named and any(n in mentioned for n in named):
        h.run_id = next(n for n in named if n in mentioned)
    of_run = [e for e in entries if h.run_id is None or e.get("run_id") in (h.run_id, None)]
    # the run's first plan (PrivacyLedger.plan's rule), kept raw: a malformed plan is a finding here, not an error
    h.plan = next((e for e in of_run if e.get("event") == DP_PLAN), None)
    h.dp_rounds = [e for e in of_run if e.get("event") == DP_ROUND]
    h.commitments = [_commitment(e) for e in of_run if e.get("event") == DATASET_COMMITMENT]
    h.participation = run.participation(name)
    _dp_facts(run, h, of_run, config_dp)
    _baseline_facts(run, h)
    derive(h)
    _lifetime_facts(h, entries)
    if h.accounting is not None:
        _unit_wording(run, h, h.plan or {}, h.patient_bound, h.accounting["patient_level"])
    return h


def _lifetime_facts(h: HospitalFacts, entries: list[dict]) -> None:
    """A hospital's lifetime spend when its ledger holds runs before this one (issue #29): every earlier run on the
    same data composed with this run's own steps (federation and baseline) by the run's accountant
    (privacy.lifetime), at the delta and against the cap the node's lifetime_check recorded (else the run's delta and
    no cap). A run that took the hospital past its lifetime cap fails ``budget_respected``."""
    from privacy.ledger import LIFETIME_CHECK
    from privacy.lifetime import LifetimeIntegrityError, data_fingerprints, lifetime

    a = h.accounting
    if a is None or h.run_id is None:
        return
    first = next((i for i, e in enumerate(entries) if e.get("run_id") == h.run_id), None)
    if first is None:
        return
    earlier = entries[:first]
    if not any(e.get("run_id") and e.get("event") in (DP_PLAN, DP_ROUND, DATASET_COMMITMENT) for e in earlier):
        return
    check = next((e for e in entries if e.get("event") == LIFETIME_CHECK and e.get("run_id") == h.run_id), None)
    cap = float(check["cap"]) if check and check.get("cap") is not None else None
    delta = float(check["delta"]) if check and check.get("delta") is not None else float(a["delta"])
    commit = next((e for e in entries if e.get("event") == DATASET_COMMITMENT and e.get("run_id") == h.run_id), None)
    try:
        mine = history_of(h.dp_rounds) + history_of(h.baseline_rounds)
        lt = lifetime(earlier, delta, accountant=a["accountant"], cap=cap, current=h.run_id, planned=mine,
                      planned_unit=a.get("privacy_unit", "record"),
                      fingerprints=data_fingerprints(commit.get("tasks")) if commit else frozenset(),
                      scope=str((check or {}).get("scope") or "data"))
    except (LifetimeIntegrityError, KeyError, TypeError, ValueError) as e:
        h.add("budget_respected", "fail", f"{h.name}: its lifetime spend cannot be known from {h.ledger_rel}: {e}",
              "a hospital's lifetime spend cannot be known")
        return
    a["lifetime"] = {
        "runs": [{"run_id": r.run_id, "epsilon": finite(r.epsilon), "data": r.data, "baseline": r.baseline,
                  "counted": r.counted} for r in lt.runs],
        "epsilon_earlier": finite(lt.spent),
        "epsilon_run": finite(lt.planned),
        "epsilon": finite(lt.total),
        "delta": delta,
        "accountant": lt.accountant,
        "unit": lt.unit,
        "cap": cap,
        "cap_source": f"{h.ledger_rel} lifetime_check seq {check.get('seq')} (the node's signed policy)" if check else None,
        "composition": ("every earlier run of the ledger on the same data (dataset commitments; runs without one "
                        "count) composed step by step with this run's federation and baseline steps"),
    }
    if lt.exceeds:
        names = ", ".join(r.run_id for r in lt.counted)
        h.add("budget_respected", "fail",
              f"{h.name}: with this run its records carry lifetime epsilon {lt.total:.4g} (runs {names} and this one, "
              f"composed), over its lifetime budget {cap:g}", "a hospital's lifetime spend exceeds its lifetime budget")


# ------------------------------------------------------------------------------------------ randomness
#: the one randomness source fit for release (privacy.randomness: a ChaCha20 keystream keyed from the OS)
SECURE_RANDOMNESS = "secure"


def dp_sessions(h: HospitalFacts) -> list[tuple[str, dict]]:
    """Every DP session (one dp_round entry: one round of one task) of a hospital in this run, federation and
    single-hospital baseline, with its name in words."""
    out = []
    for source, rounds in (("", h.dp_rounds), ("the single-hospital baseline's ", h.baseline_rounds)):
        for e in rounds:
            task = f" (task {e['task']})" if e.get("task") else ""
            out.append((f"{source}round {e.get('round')} at {h.name}{task}", e))
    return out


def randomness_findings(hospitals: list[HospitalFacts]) -> dict[str, list[Finding]]:
    """``noise_randomness`` and ``noise_fresh`` (issue #30, item 5) from the run's own ledgers: which generator drew
    every DP session's noise and Poisson samples, and whether two sessions drew the same (their fingerprints)."""
    out: dict[str, list[Finding]] = {"noise_randomness": [], "noise_fresh": []}
    sessions = [(h, name, e) for h in hospitals if h.dp for name, e in dp_sessions(h)]
    for h in hospitals:
        mine = [(name, e) for hh, name, e in sessions if hh is h]
        bad = [(name, e.get("randomness")) for name, e in mine if "randomness" in e and e.get("randomness") != SECURE_RANDOMNESS]
        for name, r in bad:
            what = ("drawn from a reproducible generator: not fit for release" if r == "reproducible" else
                    f"drawn from randomness {r!r}, not the secure generator: not fit for release")
            out["noise_randomness"].append(Finding("fail", f"the noise of {name} was {what}", h.name,
                                                   "a hospital's DP noise was drawn from a generator not fit for release"))
        missing = [name for name, e in mine if "randomness" not in e]
        if missing:
            out["noise_randomness"].append(Finding(
                "attention", f"{h.name}: {len(missing)} of {len(mine)} DP sessions record no randomness source (a run "
                "written before it was recorded): where the noise came from cannot be shown", h.name,
                "a hospital's ledger does not record where its DP noise came from"))
        unfingerprinted = [name for name, e in mine if "noise_fingerprint" not in e
                           or (e.get("noise_fingerprint") is None and int(e.get("steps") or 0) > 0)]
        if unfingerprinted:
            out["noise_fresh"].append(Finding(
                "attention", f"{h.name}: {len(unfingerprinted)} of {len(mine)} DP sessions record no noise fingerprint "
                "(a run written before it was recorded): fresh noise in every session cannot be shown", h.name,
                "a hospital's ledger does not record noise fingerprints"))
    out["noise_fresh"] += _repeats(sessions, "noise_fingerprint") + _repeats(sessions, "sampling_fingerprint")
    return out


def sampling_collision_bound(e: dict) -> float | None:
    """The probability that an honest session draws one given Poisson sample again: at most
    exp(-2 * units * q * (1 - q) * steps) (each unit is in or out with probability q at every step)."""
    try:
        units, q, steps = int(e["units"]), float(e["sample_rate"]), int(e["steps"])
    except (KeyError, TypeError, ValueError):
        return None
    return math.exp(-2.0 * units * q * (1.0 - q) * steps)


def _repeats(sessions: list[tuple[HospitalFacts, str, dict]], key: str) -> list[Finding]:
    """A fail for every DP session whose fingerprint ``key`` repeats an earlier session's (null: nothing random)."""
    first: dict[str, tuple[HospitalFacts, str, dict]] = {}
    out = []
    for h, name, e in sessions:
        fp = e.get(key)
        if not isinstance(fp, str) or not fp:
            continue
        if fp not in first:
            first[fp] = (h, name, e)
            continue
        h0, name0, e0 = first[fp]
        same_place = h0 is h and e0.get("task") == e.get("task") and name0.startswith("round") == name.startswith("round")
        earlier = f"round {e0.get('round')}'s" if same_place else f"that of {name0}"
        if key == "noise_fingerprint":
            msg = (f"the noise of {name} repeats {earlier} (the same noise_fingerprint {fp[:12]}...): repeated noise "
                   "cancels in the difference of two updates, so the accountant's independence assumption fails")
        else:
            bounds = [b for b in (sampling_collision_bound(e0), sampling_collision_bound(e)) if b is not None]
            honest = (f"; an honest run repeats a Poisson sample with probability at most {max(bounds):.2g} per pair "
                      "(exp(-2 units q (1-q) steps))") if bounds else ""
            msg = f"the Poisson samples of {name} repeat {earlier} (the same sampling_fingerprint {fp[:12]}...){honest}"
        out.append(Finding("fail", msg, h.name, "two DP sessions drew the same randomness",
                           also=() if h0 is h else (h0.name,)))
    return out


# ------------------------------------------------------------------------------------------ derived figures
GROUP_PRIVACY_METHOD = "group privacy: (k*eps, k*exp((k-1)*eps)*delta), loose"
MU_COVERS = {"gdp_mu": "the federation's DP-SGD steps alone",
             "gdp_mu_total": "every released spend on these records composed (federation and single-hospital baseline)"}


def derive(h: HospitalFacts) -> None:
    """Every figure derived from a hospital's composed spend, computed here and only here (issue #30): the
    remaining budget, the patient-level (group privacy) guarantee and what each Gaussian-DP mu covers. The composed
    spend ``epsilon_total`` (federation and single-hospital baseline) is the hospital's epsilon; the federation's
    ``epsilon_spent`` alone is never the base of a derived figure. ``verify`` recomputes each of them by its own
    code path (:mod:`secure_fedkim.report.recompute`)."""
    a = h.accounting
    if a is None:
        return
    total = a["epsilon_total"]
    a["epsilon_remaining"] = finite(a["epsilon_budget"] - total) if total is not None else None
    a["epsilon_remaining_of"] = ("budget minus the composed spend (federation and single-hospital baseline)"
                                 if len(a["released_spends"]) > 1 else "budget minus the federation's spend")
    a["gdp_mu_covers"] = {"gdp_mu": MU_COVERS["gdp_mu"],
                          "gdp_mu_total": MU_COVERS["gdp_mu_total"] if len(a["released_spends"]) > 1 else
                          "the federation's DP-SGD steps alone (no other release on these records)"}
    k = h.patient_bound
    patient = None
    if k is not None and total is not None and a.get("privacy_unit", "record") == "record":
        e_k, d_k = group_privacy_epsilon(total, a["delta"], k)
        patient = {"max_records_per_patient": k, "epsilon": e_k, "delta": d_k, "source": h.patient_bound_source,
                   "method": GROUP_PRIVACY_METHOD, "of": "the composed epsilon (epsilon_total)",
                   "meaningful": bool(d_k < 1.0 and e_k <= 10)}
    a["patient_level"] = patient


def _baseline_facts(run: "RunFacts", h: HospitalFacts) -> None:
    """Compose the single-hospital baseline's DP spend (``baseline/<h>/ledger.jsonl``) into the hospital's epsilon.

    The baseline trains on the same records and its test metrics are released, so by sequential composition
    its spend counts against the same records: the reported epsilon is that of both histories together."""
    path = run.files.baseline_ledger(h.name)
    rel = run.files.relative(path)
    released = h.name in (run.summary.get("single_hospital_test") or {})
    if not path.is_file():
        if released and h.dp:
            h.add("baseline_spend_composed", "fail",
                  f"{h.name}: the single-hospital baseline's test metrics are released but {rel} is missing, so its "
                  f"DP spend on the same records cannot be composed", "a released baseline's spend is not accounted")
        return
    entries, err = read_ledger(path, run.run_dir)
    h.baseline = {"ledger": rel, "verified": entries is not None, "error": err,
                  "head": (entries[-1]["hash"] if entries else GENESIS_HASH) if entries is not None else None,
                  "released": released, "epsilon": None}
    if entries is None:
        h.add("baseline_spend_composed", "fail", f"{rel} does not verify: {err}", "a baseline ledger does not verify")
        return
    rounds = [e for e in entries if e.get("event") == DP_ROUND]
    h.baseline_rounds = rounds
    if not rounds or h.accounting is None:
        return
    acc, delta = h.accounting["accountant"], h.accounting["delta"]
    try:
        baseline_history = history_of(rounds)
    except (KeyError, TypeError, ValueError) as e:
        h.add("baseline_spend_composed", "fail", f"{rel}: a dp_round entry is not accountable: {e}",
              "a baseline ledger entry cannot be accounted")
        return
    own = account(baseline_history, delta, acc)
    recorded = rounds[-1].get("epsilon")
    if recorded is not None and not close(recorded, finite(account(baseline_history, float(rounds[-1].get("delta", delta)), acc))):
        h.add("epsilon_recomputed", "fail", f"{rel} seq {rounds[-1].get('seq')} records epsilon {recorded!r}; the {acc} "
              f"accountant recomputes {own!r}", "a recorded epsilon differs from its recomputation")
    both = history_of(h.dp_rounds) + baseline_history
    total = account(both, delta, acc)
    try:
        total_pld = independent(both, delta, "pld")
    except Exception:  # the cross-check must not hide the report
        total_pld = None
    h.baseline["epsilon"] = finite(own)
    a = h.accounting
    a["released_spends"].append({"source": rel, "what": "single-hospital baseline (same records, metrics released)",
                                 "epsilon": finite(own)})
    a["epsilon_total"] = finite(total)
    a["epsilon_total_pld"] = finite(total_pld) if total_pld is not None else None
    a["gdp_mu_total"] = finite(gdp_mu(both))
    a["composition"] = ("sequential composition of the federation's and the baseline's DP-SGD steps on the same "
                        f"records, by the {acc.upper()} accountant (dp_accounting PLD as a cross-check)")
    h.add("baseline_spend_composed", "pass",
          f"{h.name}: the baseline's spend ({rel}, epsilon {own:.4g}) is composed with the federation's "
          f"({a['epsilon_spent']:.4g}) into epsilon {total:.4g}", "the single-hospital baseline's spend is composed")
    budget = a["epsilon_budget"]
    if total > budget * (1 + BUDGET_SLACK):
        h.add("budget_respected", "fail",
              f"{h.name}: its records carry epsilon {total:.4g} (federation {a['epsilon_spent']:.4g} composed with the "
              f"single-hospital baseline {own:.4g}), over its budget {budget:.4g}",
              "a hospital's composed spend exceeds its budget")
    if total > 10 and a["epsilon_spent"] <= 10 and budget <= 10:
        h.add("epsilon_tier", "attention", f"{h.name}: composed epsilon {total:.4g} (federation and baseline) is above 10: "
              "a weak guarantee", "a hospital's epsilon is above 10")


def _dp_facts(run: "RunFacts", h: HospitalFacts, of_run: list[dict], config_dp: bool) -> None:
    """A hospital's DP facts (``h.dp``, ``h.mechanism``, ``h.accounting``, ``h.events``) and findings, every epsilon
    recomputed from its verified ledger: the plan and history read, each check run, the figures gathered."""
    if not _dp_accountable(run, h, of_run, config_dp):
        return
    h.dp = True
    plan = h.plan
    try:
        history = history_of(h.dp_rounds)
    except (KeyError, TypeError, ValueError) as e:
        h.add("dp_label_has_accountant", "fail", f"{h.ledger_rel}: a dp_round entry is not accountable: {e}",
              "a ledger entry cannot be accounted")
        return
    acc, delta = plan["accountant"], float(plan["delta"])
    sigma = float(plan["noise_multiplier"])
    try:
        spent = account(history, delta, acc)
    except ValueError as e:
        h.add("dp_label_has_accountant", "fail", f"{h.name}: the {acc} accountant cannot compute epsilon: {e}",
              "the accountant could not compute a hospital's epsilon")
        return
    unit, n = _privacy_unit(run, h, plan)
    schedule = [(float(q), int(k)) for q, k in plan.get("round_schedule", [])]
    rounds_planned = int(plan.get("rounds", run.rounds_planned))
    targets = [float(plan["target_epsilon"])] + [float(e["target_epsilon"]) for e in h.dp_rounds if "target_epsilon" in e]
    budget = min(targets)
    by_round, last_round = _epsilon_by_round(run, h, of_run, delta, acc)
    _check_budget(h, spent, budget, delta, acc)
    delta_ok = _check_delta(h, plan, delta, n)
    sampling_used = _check_sampling(h, plan)
    if spent > 10 or budget > 10:
        h.add("epsilon_tier", "attention",
              f"{h.name}: epsilon spent {spent:.4g}, budget {budget:.4g}: above 10 is a weak guarantee",
              "a hospital's epsilon is above 10")
    method, ind, rel = _independent_check(h, history, spent, delta, acc)
    planned = _check_planned(h, plan, schedule, rounds_planned, sigma, delta, acc)
    k, patient = _patient_level(run, h, spent, delta, unit, by_round, last_round)
    h.mechanism = _mechanism(run, h, plan, sigma, schedule, sampling_used, rounds_planned)
    h.accounting = {
        "accountant": acc,
        "accountant_library": plan.get("accountant_library"),
        "eps_error": PRV_EPS_ERROR if acc == "prv" else None,
        "delta": delta,
        "delta_default": plan.get("delta_default"),
        "one_over_n": 1.0 / n if isinstance(n, int) and n > 0 else None,
        "delta_lt_1_over_n": delta_ok,
        "epsilon_spent": finite(spent),
        "epsilon_total": finite(spent),
        "epsilon_total_pld": finite(ind) if method == "pld" and ind is not None else None,
        "gdp_mu_total": finite(gdp_mu(history)),
        "released_spends": [{"source": h.ledger_rel, "what": "federated training (every update sent)", "epsilon": finite(spent)}],
        "composition": "the federation's DP-SGD steps only: no other DP release on these records",
        "epsilon_budget": budget,
        "epsilon_remaining": None,  # set by derive(): budget minus the composed spend
        "planned_epsilon": finite(planned) if planned is not None else None,
        "gdp_mu": finite(gdp_mu(history)),
        "epsilon_by_round": by_round,
        "assumptions": {"sampling_assumed": "poisson", "sampling_used": sampling_used,
                        "assumptions_hold": sampling_used == "poisson"},
        "independent_recomputation": {
            "library": f"dp_accounting {_version('dp-accounting')}", "method": method,
            "epsilon": finite(ind), "relative_difference": rel,
        },
        "patient_level": None,  # set by derive(), from the composed spend
        "records_per_patient_at_least": run.records_per_patient_at_least.get(h.name),
        "privacy_unit": plan.get("privacy_unit", "record"),
        "adjacency": plan.get("adjacency", "add/remove"),
        "on_exhaustion": plan.get("on_exhaustion"),
    }
    _dp_events(run, h, of_run, delta, acc, sigma, schedule)


def _dp_accountable(run: "RunFacts", h: HospitalFacts, of_run: list[dict], config_dp: bool) -> bool:
    """Whether the hospital's DP spend can be accounted: labelled DP, its ledger verified, a complete plan and
    noisy rounds. Otherwise sets ``h.dp``, records why and (where its participation is trustworthy) its events."""
    plan = h.plan
    labelled = config_dp or bool(plan and plan.get("dp")) or any(e.get("dp") for e in h.dp_rounds)
    if not labelled:
        h.dp = False
        if h.ledger_verified or not h.ledger_exists:
            _non_dp_events(run, h, of_run)
        return False
    if h.ledger_verified and plan is None and not h.dp_rounds and any(e.get("event") == REFUSED for e in of_run):
        h.dp = False  # the hospital refused the run (its policy) before planning or training: nothing to account
        _non_dp_events(run, h, of_run)
        h.events = sorted([{"round": e.get("round"), "event": "refused", "reason": str(e.get("reason", ""))}
                           for e in of_run if e.get("event") == REFUSED] + h.events,
                          key=lambda ev: (ev["round"] is None, ev["round"] or 0))
        return False
    if not h.ledger_verified:
        h.dp = True  # labelled DP, but there is no trustworthy source for any figure
        if not h.ledger_exists:
            h.add("dp_label_has_accountant", "fail",
                  f"{h.name} is labelled DP (config privacy.dp) but has no ledger, so no accountant record ({h.ledger_rel})",
                  "a hospital is labelled DP without an accountant record")
        return False
    problems = _plan_problems(plan, h.dp_rounds)
    if problems:
        h.dp = True
        h.add("dp_label_has_accountant", "fail",
              f"{h.name} is labelled DP but " + "; ".join(problems) + f" ({h.ledger_rel})",
              "a hospital is labelled DP without an accountant record")
        _non_dp_events(run, h, of_run)
        return False
    return True


def _plan_problems(plan: dict | None, dp_rounds: list[dict]) -> list[str]:
    """What keeps a DP-labelled ledger from naming an accountant, noise and delta (empty: nothing)."""
    problems = []
    if plan is None:
        problems.append("its ledger has no dp_plan entry (no accountant, noise or delta recorded)")
    else:
        if plan.get("accountant") not in ("prv", "rdp"):
            problems.append(f"its dp_plan names no known accountant ({plan.get('accountant')!r})")
        if not plan.get("dp") or not plan.get("noise_multiplier"):
            problems.append(f"its dp_plan records noise multiplier {plan.get('noise_multiplier')!r} and dp={plan.get('dp')!r} "
                            "(clipping without noise is not DP)")
        delta = plan.get("delta")
        if not isinstance(delta, (int, float)) or not 0 < delta < 1:
            problems.append(f"its dp_plan has no valid delta ({delta!r})")
    for e in dp_rounds:
        if not e.get("dp", True) or e.get("accountant") not in ("prv", "rdp") or not e.get("noise_multiplier"):
            problems.append(f"dp_round seq {e.get('seq')} (line {e.get('seq', 0) + 1}) has dp={e.get('dp')!r}, "
                            f"accountant={e.get('accountant')!r}, noise_multiplier={e.get('noise_multiplier')!r}")
            break
    return problems


def _privacy_unit(run: "RunFacts", h: HospitalFacts, plan: dict) -> tuple[str, Any]:
    """The plan's privacy unit and its count n (delta is resolved on the unit), checked against the config."""
    unit = plan.get("privacy_unit", "record")
    n = plan.get("n_patients") if unit == "patient" else plan.get("n_records")  # delta is resolved on the unit
    if unit != run.cfg.privacy.unit:
        h.add("privacy_unit", "fail", f"{h.ledger_rel}: the DP plan's privacy unit is {unit!r}, the run config's "
              f"{run.cfg.privacy.unit!r}", "a ledger's privacy unit contradicts the config")
    return unit, n


def _epsilon_by_round(run: "RunFacts", h: HospitalFacts, of_run: list[dict], delta: float,
                      acc: str) -> tuple[list[dict], int]:
    """Epsilon by round, recomputed from the ledger prefix; compared with the ledger and the metrics, and the
    ledger's steps with those observed. Returns the rows and the last round."""
    by_round = []
    last_round = max([run.rounds_run] + [int(e.get("round", 0)) for e in h.dp_rounds])
    part = {p["round"]: p for p in h.participation}
    skip_rounds = {int(e["round"]) for e in of_run if e.get("event") == SKIPPED_BUDGET and "round" in e}
    for r in range(1, last_round + 1):
        prefix = [e for e in h.dp_rounds if int(e.get("round", 0)) <= r]
        in_round = [e for e in h.dp_rounds if int(e.get("round", 0)) == r]
        eps_r = account(history_of(prefix), delta, acc)
        status = "trained" if in_round else ("skipped_budget" if r in skip_rounds else part.get(r, {}).get("status", "absent"))
        by_round.append({"round": r, "epsilon": finite(eps_r), "status": status})
        if in_round:
            recorded = in_round[-1].get("epsilon")
            if not close(recorded, finite(eps_r)):
                h.add("epsilon_recomputed", "fail",
                      f"{h.ledger_rel} seq {in_round[-1].get('seq')} (round {r}) records epsilon {recorded!r}; "
                      f"the {acc} accountant recomputes {eps_r!r} from the ledger's history",
                      "a recorded epsilon differs from its recomputation")
        reported = run.metric_epsilon(h.name, r)
        if reported is not None and not close(reported, finite(eps_r)):
            h.add("epsilon_recomputed", "fail",
                  f"{run.files.relative(run.files.round_metrics(r))} reports epsilon-spent {reported!r} for {h.name}; "
                  f"the ledger gives {eps_r!r}", "a reported epsilon differs from its recomputation")
        _check_steps(run, h, r, in_round)
    return by_round, last_round


def _check_steps(run: "RunFacts", h: HospitalFacts, r: int, in_round: list[dict]) -> None:
    """Understated steps: the ledger must cover what the optimizer and the metrics say."""
    for e in in_round:
        observed = e.get("steps_observed")
        if observed is not None and int(e["steps"]) < int(observed):
            h.add("epsilon_recomputed", "fail",
                  f"{h.ledger_rel} seq {e.get('seq')}: steps {e['steps']} < steps observed {observed}",
                  "a ledger understates the steps taken")
        m_steps = run.metric_steps(h.name, r, e.get("task"))
        if m_steps is not None and int(m_steps) > int(e["steps"]):
            h.add("epsilon_recomputed", "fail",
                  f"{run.files.relative(run.files.round_metrics(r))}: {h.name} reports {m_steps} steps on {e.get('task')!r}, "
                  f"its ledger (seq {e.get('seq')}) accounts for {e['steps']}",
                  "a ledger understates the steps taken")


def _check_budget(h: HospitalFacts, spent: float, budget: float, delta: float, acc: str) -> None:
    """The federation's spend within the budget; over it, the first entry that crossed it is named."""
    if spent > budget * (1 + BUDGET_SLACK) or any(e.get("over_budget") for e in h.dp_rounds):
        first = next((e for e in h.dp_rounds if e.get("over_budget")), None)
        if first is None:
            for i in range(1, len(h.dp_rounds) + 1):
                e = h.dp_rounds[i - 1]
                if account(history_of(h.dp_rounds[:i]), delta, acc) > float(e.get("target_epsilon", budget)) * (1 + BUDGET_SLACK):
                    first = e
                    break
        where = f" (first at seq {first.get('seq')}, round {first.get('round')})" if first else ""
        h.add("budget_respected", "fail",
              f"{h.name} spent epsilon {spent:.4g} over its budget {budget:.4g}{where}", "a hospital exceeded its budget")


def _check_delta(h: HospitalFacts, plan: dict, delta: float, n) -> bool | None:
    """Delta below 1/n (None: n not recorded)."""
    delta_ok = None
    if isinstance(n, int) and n > 0:
        delta_ok = delta < 1.0 / n
        if not delta_ok:
            h.add("delta_below_1_over_n", "fail",
                  f"{h.name}: delta {delta:g} >= 1/n = {1.0 / n:.3g} for n = {n} records ({h.ledger_rel} seq {plan.get('seq')})",
                  "delta is not below 1/n at a hospital")
    else:
        h.add("delta_below_1_over_n", "attention", f"{h.name}: the dp_plan records no record count n",
              "a hospital's record count is not recorded")
    return delta_ok


def _check_sampling(h: HospitalFacts, plan: dict) -> str:
    """The sampling the ledger records; the accountants assume Poisson sampling."""
    used = {plan.get("sampling")} | {e.get("sampling") for e in h.dp_rounds}
    sampling_used = "poisson" if used == {"poisson"} else ", ".join(sorted(str(u) if u else "not recorded" for u in used))
    if sampling_used != "poisson":
        h.add("sampling_assumption", "attention",
              f"{h.name}: the accountant assumes Poisson sampling, the ledger records {sampling_used}",
              "Poisson sampling is assumed but not recorded as used")
    return sampling_used


def _independent_check(h: HospitalFacts, history: list[Step], spent: float, delta: float,
                       acc: str) -> tuple[str, float | None, float | None]:
    """The spend recomputed by dp_accounting: (method, epsilon or None, relative difference or None)."""
    method = independent_method(acc)
    try:
        ind = independent(history, delta, method)
    except Exception as e:  # the cross-check must not hide the report
        ind = None
        h.add("independent_accountant_agreement", "attention", f"{h.name}: dp_accounting failed: {e}",
              "the independent accountant failed")
    rel = (ind - spent) / spent if ind is not None and spent and math.isfinite(spent) and math.isfinite(ind) else None
    if rel is not None and rel > 0.05:
        h.add("independent_accountant_agreement", "attention",
              f"{h.name}: dp_accounting {method.upper()} gives {ind:.4g}, {rel:+.1%} above Opacus {acc.upper()}'s {spent:.4g}",
              "the independent recomputation is more than 5% above the accountant")
    return method, ind, rel


def _check_planned(h: HospitalFacts, plan: dict, schedule: list[tuple[float, int]], rounds_planned: int,
                   sigma: float, delta: float, acc: str) -> float | None:
    """The planned epsilon recomputed from the plan's schedule, compared with the one it records."""
    planned = account([Step(sigma, q, k) for q, k in schedule] * rounds_planned, delta, acc) if schedule else None
    if planned is not None and plan.get("planned_epsilon") is not None and not close(plan["planned_epsilon"], finite(planned)):
        h.add("epsilon_recomputed", "fail",
              f"{h.ledger_rel} dp_plan records planned_epsilon {plan['planned_epsilon']!r}, recomputed {planned!r}",
              "a recorded epsilon differs from its recomputation")
    return planned


def _patient_level(run: "RunFacts", h: HospitalFacts, spent: float, delta: float, unit: str, by_round: list[dict],
                   last_round: int) -> tuple[Any, dict | None]:
    """Patient level: the config's bound on records per patient, else what the data's patient ids show.
    Returns that bound k and the group-privacy guarantee (None unless a record-level spend with k known),
    whose per-round values the metrics report are compared."""
    configured = getattr(run.cfg.privacy, "max_records_per_patient", None)
    k = configured if configured is not None else run.records_per_patient.get(h.name)
    h.patient_bound = k
    h.patient_bound_source = "config privacy.max_records_per_patient" if configured is not None else "patient ids in the data"
    patient = None
    if k is not None and math.isfinite(spent) and unit == "record":
        e_k, d_k = group_privacy_epsilon(spent, delta, k)
        patient = {"max_records_per_patient": k, "epsilon": e_k, "delta": d_k,
                   "source": "config privacy.max_records_per_patient" if configured is not None else "patient ids in the data",
                   "method": "group privacy: (k*eps, k*exp((k-1)*eps)*delta), loose"}
        for r in range(1, last_round + 1):
            rec = (run.record(r) or {}).get("clients", {}).get(h.name) or {}
            if "epsilon-patient" in rec:
                eps_r = next((x["epsilon"] for x in by_round if x["round"] == r), None)
                want = group_privacy_epsilon(eps_r, delta, k) if eps_r is not None else (None, None)
                if not (close(rec["epsilon-patient"], want[0]) and close(rec.get("delta-patient"), want[1])):
                    h.add("epsilon_recomputed", "fail",
                          f"{run.files.relative(run.files.round_metrics(r))} reports patient-level ({rec['epsilon-patient']!r}, "
                          f"{rec.get('delta-patient')!r}) for {h.name}; group privacy of the ledger's spend gives {want}",
                          "a reported epsilon differs from its recomputation")
    return k, patient


def _unit_wording(run: "RunFacts", h: HospitalFacts, plan: dict, k, patient: dict | None) -> None:
    """What a record-level unit means for patients with several records (nothing at the patient level)."""
    if plan.get("privacy_unit") == "patient":
        pass  # accounted at the patient level: nothing to add
    elif k is None and run.records_per_patient_at_least.get(h.name, 1) > 1:
        least = run.records_per_patient_at_least[h.name]
        h.add("privacy_unit", "attention",
              f"{h.name}: record-level unit while a patient has at least {least} records "
              f"({run.records_per_patient_where.get(h.name)}); other tasks carry no patient ids",
              "patients with several records under a record-level unit")
    elif k is None:
        h.add("privacy_unit", "attention",
              f"{h.name}: record-level unit; records per patient unknown (no privacy.max_records_per_patient in the "
              f"config and no patient ids in the data)",
              "records per patient unknown at a hospital")
    elif k > 1:
        h.add("privacy_unit", "attention",
              f"{h.name}: record-level unit while a patient has up to {k} records ("
              + (f"patient-level epsilon {patient['epsilon']:.4g} by group privacy)" if patient is not None else
                 "no patient-level epsilon: the record-level spend is not finite)"),
              "patients with several records under a record-level unit")


def _mechanism(run: "RunFacts", h: HospitalFacts, plan: dict, sigma: float, schedule: list[tuple[float, int]],
               sampling_used: str, rounds_planned: int) -> dict:
    """The report's description of the DP-SGD mechanism, from the plan, the ledger and the run."""
    attended = sum(1 for p in h.participation if p["status"] == "trained")
    return {
        "noise_multiplier": sigma,
        "noise_source": plan.get("noise_source"),
        "max_grad_norm": float(plan.get("max_grad_norm")),
        "sampling": sampling_used,
        "sample_rates": sorted({float(q) for q, _ in schedule}),
        "round_schedule": [[q, k_] for q, k_ in schedule],
        "batch_size": run.batch_size,
        "local_epochs": run.local_epochs,
        "local_epochs_by_task": run.local_epochs_by_task,
        "steps_per_round": sum(k_ for _, k_ in schedule),
        "steps_total": sum(int(e["steps"]) for e in h.dp_rounds),
        "rounds_planned": rounds_planned,
        "rounds_attended": attended,
        "n_records": plan.get("n_records"),
        "n_patients": plan.get("n_patients"),
        "max_records_per_patient_step": plan.get("max_records_per_patient_step"),
        "secure_mode": bool(plan.get("secure_mode")),
    }


def _non_dp_events(run: "RunFacts", h: HospitalFacts, of_run: list[dict]) -> None:
    h.events = [ev for p in h.participation for ev in p.get("events", [])]


def _dp_events(run, h: HospitalFacts, of_run, delta, acc, sigma, schedule) -> None:
    events = []
    for e in of_run:
        kind = e.get("event")
        if kind == SKIPPED_BUDGET:
            before = [x for x in h.dp_rounds if x["seq"] < e["seq"]]
            spent = account(history_of(before), delta, acc)
            projected = account(history_of(before) + [Step(sigma, q, k) for q, k in schedule], delta, acc)
            for field_, mine in (("epsilon_spent", spent), ("projected_epsilon", projected)):
                if e.get(field_) is not None and not close(e[field_], finite(mine)):
                    h.add("epsilon_recomputed", "fail",
                          f"{h.ledger_rel} seq {e['seq']}: skipped_budget records {field_} {e[field_]!r}, recomputed {mine!r}",
                          "a recorded epsilon differs from its recomputation")
            events.append({"round": e.get("round"), "event": "skipped_budget", "reason": e.get("reason", "budget"),
                           "epsilon_spent": finite(spent), "projected_epsilon": finite(projected),
                           "epsilon_budget": e.get("target_epsilon"), "action": e.get("on_exhaustion")})
        elif kind == REFUSED:
            events.append({"round": e.get("round"), "event": "refused", "reason": str(e.get("reason", ""))})
        elif kind == RESUME:
            restored = account(history_of([x for x in h.dp_rounds if x["seq"] < e["seq"]]), delta, acc)
            events.append({"round": None, "event": "resume", "reason": "ledger-restored spend after a restart",
                           "epsilon_spent": finite(restored), "rounds_recorded": e.get("rounds_recorded")})
    for p in h.participation:
        events.extend(ev for ev in p.get("events", []) if ev["event"] != "skipped_budget")
    h.events = sorted(events, key=lambda ev: (ev["round"] is None, ev["round"] or 0))


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ the run
@dataclass
class RunFacts:
    run_dir: Path
    cfg: Any
    summary: dict
    rounds: list[dict]
    clients: list[str]
    config_dp: bool
    rounds_planned: int
    batch_size: int
    local_epochs: int
    local_epochs_by_task: dict[str, int] = field(default_factory=dict)
    records_per_patient: dict[str, int | None] = field(default_factory=dict)
    records_per_patient_at_least: dict[str, int] = field(default_factory=dict)
    records_per_patient_where: dict[str, str] = field(default_factory=dict)
    inventory: dict = field(default_factory=dict)
    run_id: str = ""

    @property
    def files(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def rounds_run(self) -> int:
        return max([r["round"] for r in self.rounds if r.get("round", 0) >= 1] or [0])

    def record(self, r: int) -> dict | None:
        return next((x for x in self.rounds if x.get("round") == r), None)

    def aggregated_rounds(self) -> list[int]:
        return [x["round"] for x in self.rounds if x.get("round", 0) >= 1 and "client_model_test" in x]

    def metric_epsilon(self, client: str, r: int) -> float | None:
        rec = self.record(r) or {}
        return (rec.get("clients", {}).get(client) or {}).get("epsilon-spent")

    def metric_steps(self, client: str, r: int, task: str | None) -> int | None:
        rec = self.record(r) or {}
        return (rec.get("clients", {}).get(client) or {}).get(f"{task}.steps")

    def participation(self, client: str) -> list[dict]:
        out = []
        for r in range(1, self.rounds_run + 1):
            rec = self.record(r)
            if rec is None:
                out.append({"round": r, "status": "no_record", "events": []})
                continue
            stats = rec.get("clients", {}).get(client)
            events = []
            rejected = rec.get("rejected", {}) or {}
            if client in rejected:
                status = "rejected"
                events.append({"round": r, "event": "rejected", "reason": str(rejected[client])})
            elif stats is None:
                status = "absent"
                events.append({"round": r, "event": "absent", "reason": "no reply this round (failed or dropped out)"})
            elif stats.get("skipped-budget"):
                status = "skipped_budget"
                events.append({"round": r, "event": "skipped_budget", "reason": "budget"})
            else:
                status = "trained"
            if rec.get("stopped"):
                events.append({"round": r, "event": "run_stopped", "reason": str(rec["stopped"])})
            out.append({"round": r, "status": status, "events": events})
        return out


def load_run_facts(run_dir: Path) -> RunFacts:
    from secure_fedkim.config import RunConfig

    files = RunDir(run_dir)
    cfg_file = files.resolved_config
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a secure-fedkim run directory (no {cfg_file.name})")
    cfg = RunConfig.model_validate_json(cfg_file.read_text())
    summary = files.read_summary() if files.summary.is_file() else {}
    rounds = []
    for p in files.round_metrics_files():
        rec = json.loads(p.read_text())
        rec.setdefault("round", int(re.sub(r"\D", "", p.stem)))
        rounds.append(rec)
    facts = RunFacts(
        run_dir=run_dir, cfg=cfg, summary=summary, rounds=rounds, clients=list(cfg.federation.clients),
        config_dp=bool(cfg.privacy.dp), rounds_planned=cfg.run.rounds, batch_size=cfg.client.batch_size,
        local_epochs=cfg.client.local_epochs,
        local_epochs_by_task={t.name: task_local_epochs(cfg, t.name) for t in cfg.tasks.train},
    )
    _data_facts(facts)
    return facts


SUPPRESS_BELOW = 10


def patient_ids_available(p) -> bool:
    """Whether a task's records carry patient (person) ids, from the task registry for a built-in task
    (:data:`secure_fedkim.data.tasks.TASKS`: its privacy unit names a patient, or its records are one or a few named
    persons); a report id or a row number is not a patient id (report_abnormal's IU study uid names the report). For
    a user's own task: whether its data names a group or person (``source.group``)."""
    from secure_fedkim.data.tasks import TASKS

    reg = TASKS.get(p.task.name)
    if reg is not None and reg == p.task:
        return reg.privacy_unit.startswith("patient") or (reg.persons in ("one", "few") and p.data.person is not None)
    return p.data.persons is not None


def suppress(n: int | None) -> int | str | None:
    """A count for the data inventory: cells below 10 (zero included) are shown as "<10"."""
    if n is None:
        return None
    return int(n) if n >= SUPPRESS_BELOW else f"<{SUPPRESS_BELOW}"


def _data_facts(facts: RunFacts) -> None:
    """Counts from the run's data plan (a simulation can rebuild it): per hospital and task, records,
    positives and the largest number of records of one patient. Counts only, suppressed below 10 later."""
    import numpy as np

    inv: dict = {"source": f"data plan rebuilt from {facts.files.resolved_config.name}", "tasks": {}, "error": None}
    try:
        from secure_fedkim.rundir.artifacts import load_run

        plans = load_run(facts.run_dir).plans
    except Exception as e:  # a report must not need the hospitals' data; say what is missing instead
        inv["error"] = f"the data plan could not be rebuilt here ({type(e).__name__}: {e}); counts from the run's metrics only"
        inv["source"] = f"metrics and {facts.files.summary.name}"
        facts.inventory = inv
        facts.records_per_patient = {c: None for c in facts.clients}
        return
    per_patient: dict[str, int | None] = {c: 1 for c in facts.clients}
    known: dict[str, int] = {c: 1 for c in facts.clients}  # the most records of one patient among tasks with ids
    for name, p in plans.items():
        t = {"role": p.task.role, "modality": p.task.modality, "records": len(p.data),
             "positives": int(np.asarray(p.data.y).sum()), "test_records": len(p.split.test),
             "public_records": len(p.split.public), "patient_ids": patient_ids_available(p),
             "privacy_unit": p.task.privacy_unit, "persons": p.task.persons, "persons_note": p.task.persons_note,
             "hospitals": {}}
        if p.task.role == "train":
            for c in facts.clients:
                shard = p.shard(c)
                k = None
                if t["patient_ids"] and len(shard):  # persons, not the split's unit (ECG windows)
                    _, counts = np.unique(np.asarray(shard.persons).astype(str), return_counts=True)
                    k = int(counts.max())
                if len(shard):
                    per_patient[c] = None if (per_patient[c] is None or k is None) else max(per_patient[c], k)
                    if k is not None and k > known[c]:
                        known[c] = k
                        facts.records_per_patient_where[c] = name
                t["hospitals"][c] = {"records": len(shard), "positives": int(np.asarray(shard.y).sum()),
                                     "max_records_per_patient": k}
        inv["tasks"][name] = t
    facts.inventory = inv
    facts.records_per_patient = per_patient
    facts.records_per_patient_at_least = known
