"""``verify``'s own recomputation of every derived figure of a report, by a code path of its own (issue #30).

The builder computes each derived figure once (:func:`secure_fedkim.report.collect.derive`,
:func:`secure_fedkim.report.audit_section.settle_audit`, :func:`~secure_fedkim.report.audit_section.worst_leakage`,
:func:`~secure_fedkim.report.collect.randomness_findings`); comparing a report with a second run of those
functions would agree with any bug in them. This module reads the ledgers and audit.json itself and recomputes,
with the accountants of :mod:`privacy.accounting` and nothing from the builder:

* per hospital: the federation's spend, the composed spend (federation and single-hospital baseline), the budget,
  the remaining budget (budget minus the composed spend), Gaussian-DP mu of the federation alone and composed, the
  patient-level (group privacy) epsilon and delta of the composed spend; and the same figures where the first page,
  the headline and the disclosure card repeat them;
* every audit row's one status (DP-consistency and membership inference), the worst measured leakage, and the
  partner view's counts of the other hospitals' statuses;
* the randomness checks ``noise_randomness`` and ``noise_fresh`` from every DP session's ledger entry;
* a hospital's lifetime spend (every earlier run of its ledger on the same data composed with this run) and that a
  lifetime over the node's recorded cap fails ``budget_respected``.

Each mismatch is one message naming the report field and what the evidence gives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

from privacy.accounting import Step, epsilon as accountant_epsilon, gdp_mu as accountant_gdp_mu
from privacy.ledger import LedgerTampered, PrivacyLedger

RTOL = 1e-6
_CONSISTENCY_PARTS = ("dp_audit", "whitebox", "mechanism", "runlevel")


def part_of(row: dict) -> str | None:
    return row.get("_part")
_VERDICTS = ("consistent", "inconsistent", "inconclusive")
_STATUS_RANK = {"not_applicable": -1, "pass": 0, "inconclusive": 1, "attention": 2, "fail": 3}


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b or abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12)


def _fin(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _read(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    try:
        return PrivacyLedger(path).entries()
    except LedgerTampered:
        return None  # named by verify's ledger checks


def _history(rounds: list[dict]) -> list[Step]:
    return [Step(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in rounds]


class _Ledgers:
    """A hospital's DP sessions as its own ledgers record them (this run's federation entries and the baseline's)."""

    def __init__(self, run_dir: Path, hospital: str, ledger_rel: str, run_id: str):
        entries = _read(run_dir / ledger_rel) or []
        self.entries = entries
        self.run_id = run_id
        of_run = [e for e in entries if e.get("run_id") in (run_id, None)]
        self.plan = next((e for e in of_run if e.get("event") == "dp_plan"), None)
        self.rounds = [e for e in of_run if e.get("event") == "dp_round"]
        base = _read(run_dir / "baseline" / hospital / "ledger.jsonl")
        self.base_rounds = [e for e in base or [] if e.get("event") == "dp_round"]
        self.hospital = hospital

    def sessions(self) -> list[tuple[str, dict]]:
        out = []
        for prefix, rounds in (("", self.rounds), ("baseline ", self.base_rounds)):
            out += [(f"{prefix}round {e.get('round')} at {self.hospital} (task {e.get('task')})", e) for e in rounds]
        return out


def check_report(report: dict, run_dir: Path, clients: list[str], standalone: bool) -> list[str]:
    """Every derived figure of ``report`` recomputed from the run's ledgers and audit.json (module docstring)."""
    msgs: list[str] = []
    ledgers = {}
    for h in report["hospitals"]:
        ledgers[h["hospital"]] = _Ledgers(run_dir, h["hospital"], h["ledger"]["path"], report["run_id"])
        if h.get("accounting"):
            msgs += _hospital(report, h, ledgers[h["hospital"]])
    msgs += _headline(report)
    msgs += _audit(report, run_dir, clients)
    view = [h["hospital"] for h in report["hospitals"]]
    for c in clients:
        if c not in ledgers:
            ledgers[c] = _Ledgers(run_dir, c, f"clients/{c}/ledger.jsonl", report["run_id"])
    msgs += _randomness(report, [ledgers[c] for c in (view if standalone else clients)], standalone)
    return msgs


# ------------------------------------------------------------------------------------------ accounting
def _hospital(report: dict, h: dict, L: _Ledgers) -> list[str]:
    name, a = h["hospital"], h["accounting"]
    where = f"hospitals[{name}].accounting"
    if L.plan is None or not L.rounds:
        return [f"{where}: the report states an epsilon, but {h['ledger']['path']} has no DP plan and rounds of run "
                f"{report['run_id']!r} to recompute it from"]
    delta, acc = float(L.plan["delta"]), L.plan["accountant"]
    fed = _history(L.rounds)
    both = fed + _history(L.base_rounds)
    eps_fed = _fin(accountant_epsilon(fed, delta, acc))
    eps_total = _fin(accountant_epsilon(both, delta, acc)) if L.base_rounds else eps_fed
    budget = min([float(L.plan["target_epsilon"])] + [float(e["target_epsilon"]) for e in L.rounds if "target_epsilon" in e])
    mu_fed, mu_total = _fin(accountant_gdp_mu(fed)), _fin(accountant_gdp_mu(both))
    want = {"epsilon_spent": eps_fed, "epsilon_total": eps_total, "epsilon_budget": budget,
            "epsilon_remaining": None if eps_total is None else budget - eps_total,
            "gdp_mu": mu_fed, "gdp_mu_total": mu_total}
    source = f"{h['ledger']['path']}" + (f" and baseline/{name}/ledger.jsonl" if L.base_rounds else "")
    msgs = [f"{where}.{k}: the report says {a.get(k)!r}, recomputed from {source}: {v!r}"
            for k, v in want.items() if not _same(a.get(k), v)]
    msgs += _lifetime(report, name, a, L, both, source)
    k = (report["privacy_definition"].get("max_records_per_patient") or {}).get(name)
    p = a.get("patient_level")
    if a.get("privacy_unit", "record") == "record" and isinstance(k, int) and eps_total is not None:
        e_k = k * eps_total
        try:
            d_k = min(1.0, k * math.exp((k - 1) * eps_total) * delta)
        except OverflowError:
            d_k = 1.0
        if p is None:
            msgs.append(f"{where}.patient_level: missing; a patient with up to {k} records is protected at epsilon "
                        f"{e_k!r}, delta {d_k!r} (group privacy of the composed spend)")
        else:
            for key, v in (("max_records_per_patient", k), ("epsilon", e_k), ("delta", d_k)):
                if not _same(p.get(key), v):
                    msgs.append(f"{where}.patient_level.{key}: the report says {p.get(key)!r}, group privacy of the "
                                f"composed spend recomputed from {source} gives {v!r}")
    elif p is not None and a.get("privacy_unit") == "patient":
        msgs.append(f"{where}.patient_level: a patient-level run needs no group-privacy figure, the report gives one")
    fp = next((x for x in report["summary"]["first_page"]["hospitals"] if x["hospital"] == name), None)
    if fp is not None:
        tpr = None if mu_total is None else NormalDist().cdf(NormalDist().inv_cdf(0.01) + mu_total)
        for key, v in (("epsilon", eps_total), ("epsilon_remaining", want["epsilon_remaining"]), ("gdp_mu", mu_total),
                       ("tpr_at_1pct_fpr", tpr), ("delta", delta)):
            if not _same(fp.get(key), v):
                msgs.append(f"summary.first_page.hospitals[{name}].{key}: the report says {fp.get(key)!r}, recomputed "
                            f"from {source}: {v!r}")
    card = report.get("dp_disclosure_card") or {}
    if card and not _same((card.get("epsilon") or {}).get(name), eps_total):
        msgs.append(f"dp_disclosure_card.epsilon.{name}: the report says {(card.get('epsilon') or {}).get(name)!r}, "
                    f"recomputed from {source}: {eps_total!r}")
    hl = report["summary"]["headline"]
    if report["partner"] == name:
        for key, v in (("epsilon", eps_total), ("gdp_mu", mu_total), ("epsilon_remaining", want["epsilon_remaining"])):
            if key in hl and not _same(hl[key], v):
                msgs.append(f"summary.headline.{key}: the report says {hl[key]!r}, recomputed from {source}: {v!r}")
    return msgs


def _fingerprints(entry: dict | None) -> set[str]:
    out: set[str] = set()
    for t in ((entry or {}).get("tasks") or {}).values():
        if isinstance(t, dict):
            out |= {str(t["x_sha256"])} if t.get("x_sha256") else set()
            out |= {str(v) for v in (t.get("files_sha256") or {}).values()}
    return out


def _lifetime(report: dict, name: str, a: dict, L: _Ledgers, mine: list[Step], source: str) -> list[str]:
    """The lifetime figures (issue #29) from the ledger's entries before this run, by this module's own reading: which
    earlier runs share this run's data, their rounds (and a trained run's reserved baseline steps), composed with this
    run's steps by the Opacus accountant; and a lifetime over the node's recorded cap must fail budget_respected."""
    where = f"hospitals[{name}].accounting.lifetime"
    entries = L.entries
    first = next((i for i, e in enumerate(entries) if e.get("run_id") == L.run_id), None)
    earlier = entries[:first] if first is not None else []
    ids = list(dict.fromkeys(str(e["run_id"]) for e in earlier if e.get("run_id")
                             and e.get("event") in ("dp_plan", "dp_round", "dataset_commitment")))
    lt = a.get("lifetime")
    if not ids:
        return [f"{where}: the report gives a lifetime, but {source} holds no run before {L.run_id!r}"] if lt else []
    if not lt:
        return [f"{where}: missing; {source} holds runs before this one ({', '.join(ids)}) on the hospital's records"]
    check = next((e for e in entries if e.get("event") == "lifetime_check" and e.get("run_id") == L.run_id), None)
    cap = None if check is None or check.get("cap") is None else float(check["cap"])
    delta = float(check["delta"]) if check is not None and check.get("delta") is not None else float(L.plan["delta"])
    scope = str((check or {}).get("scope") or "data")
    mine_fp = _fingerprints(next((e for e in entries if e.get("event") == "dataset_commitment"
                                  and e.get("run_id") == L.run_id), None))
    acc = L.plan["accountant"]
    counted: list[Step] = []
    for rid in ids:
        commit = next((e for e in earlier if e.get("event") == "dataset_commitment" and e.get("run_id") == rid), None)
        if commit is not None and scope != "all" and mine_fp and not (_fingerprints(commit) & mine_fp):
            continue
        rounds = _history([e for e in earlier if e.get("event") == "dp_round" and e.get("run_id") == rid])
        if not rounds and commit is not None and commit.get("dp") is False:
            rounds = [Step(0.0, 1.0, 1)]  # trained without DP on these records: no finite epsilon
        plan = next((e for e in earlier if e.get("event") == "dp_plan" and e.get("run_id") == rid), None)
        if rounds and plan is not None and plan.get("reserved_schedule"):
            rounds += [Step(float(plan["noise_multiplier"]), float(q), int(n)) for q, n in plan["reserved_schedule"]]
        counted += rounds
    want = {"epsilon_earlier": _fin(accountant_epsilon(counted, delta, acc)),
            "epsilon_run": _fin(accountant_epsilon(mine, delta, acc)),
            "epsilon": _fin(accountant_epsilon(counted + mine, delta, acc)), "cap": cap, "delta": delta}
    msgs = [f"{where}.{k}: the report says {lt.get(k)!r}, recomputed from {source}: {v!r}"
            for k, v in want.items() if not _same(lt.get(k), v)]
    over = cap is not None and want["epsilon"] is not None and want["epsilon"] > cap * (1 + 1e-9)
    status = next((c["status"] for c in report["checks"] if c["name"] == "budget_respected"), None)
    if over and status != "fail":
        msgs.append(f"checks[budget_respected].status: the report says {status}, but {name}'s lifetime epsilon "
                    f"{want['epsilon']!r} recomputed from {source} is over its lifetime cap {cap!r}")
    return msgs


def _headline(report: dict) -> list[str]:
    """The federation headline's range against the hospitals' (already recomputed) composed epsilons."""
    if report["partner"] is not None:
        return []
    eps = [h["accounting"]["epsilon_total"] for h in report["hospitals"] if h.get("accounting")
           and h["accounting"]["epsilon_total"] is not None]
    got = report["summary"]["headline"].get("epsilon_spent")
    want = {"min": min(eps), "max": max(eps)} if eps else None
    if (got is None) != (want is None) or (got and not (_same(got["min"], want["min"]) and _same(got["max"], want["max"]))):
        return [f"summary.headline.epsilon_spent: the report says {got!r}, the hospitals' composed epsilons give {want!r}"]
    return []


# ------------------------------------------------------------------------------------------ audit
def _row_hospital(row: dict, clients: list[str]) -> str | None:
    found = None
    for key in ("hospital", "client", "site", "partner", "target"):
        if isinstance(row.get(key), str) and row[key] in clients:
            found = row[key]
    return found


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _verdict(row: dict, spent: float | None = None) -> str:
    """A DP-consistency row's status from audit.json: the audit's verdict, unless its lower bound says worse than the
    claim (the row's accountant epsilon, else the hospital's federation spend ``spent``)."""
    lbs = [v for v in (_num(row.get("eps_lb")), _num(row.get("eps_lb_one_run"))) if v is not None]
    claim = _num(row.get("eps_accountant"))
    claim = claim if claim is not None or part_of(row) != "dp_audit" else spent
    if row.get("consistent_with_accountant") is False or (lbs and claim is not None and max(lbs) > claim * (1 + 1e-9)):
        return "inconsistent"
    return row["status"] if row.get("status") in _VERDICTS else "consistent"


def _mia_verdict(row: dict) -> str:
    ci = row.get("auc_ci") if isinstance(row.get("auc_ci"), list) else row.get("auc_ci95")
    ci = [float(x) for x in ci] if isinstance(ci, list) and len(ci) == 2 else None
    if ci and ci[1] < 0.5:
        return "below chance (audit fault)"
    if (ci and ci[0] > 0.5) or (row.get("significant") is True and float(row["auc"]) > 0.5):
        return "signal above chance"
    return "no signal shown"


def _audit(report: dict, run_dir: Path, clients: list[str]) -> list[str]:
    au = report["audit"]
    path = run_dir / "audit" / "audit.json"
    if not au["run"] or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    partner = report["partner"]
    mine = lambda row: _row_hospital(row, clients) in (None, partner) if partner else True
    msgs = []
    verdicts, other_verdicts = {}, {st: 0 for st in _VERDICTS}
    spent = {h["hospital"]: (h.get("accounting") or {}).get("epsilon_spent") for h in report["hospitals"]}
    for part in _CONSISTENCY_PARTS:
        for i, row in enumerate(data.get(part) or []):
            if not isinstance(row, dict):
                continue
            v = _verdict({**row, "_part": part}, spent.get(_row_hospital(row, clients)))
            if mine(row):
                verdicts[f"{part}/{i}"] = v
            elif row.get("status") in _VERDICTS or isinstance(row.get("eps_lb"), (int, float)):
                other_verdicts[v] += 1
    for section in ("consistency", "dp_audit"):
        for e in au.get(section) or []:
            want = verdicts.get(e["path"])
            if want is not None and e.get("status") != want:
                msgs.append(f"audit.{section}[{e['path']}].status: the report says {e.get('status')!r}, audit.json "
                            f"gives {want!r}")
    mia_rows = {}
    for i, row in enumerate(data.get("mia") or []):
        if isinstance(row, dict) and isinstance(row.get("auc"), (int, float)) and mine(row):
            mia_rows[f"mia/{i}"] = row
    for m in au.get("mia") or []:
        row = mia_rows.get(m["path"])
        if row is not None and m.get("status") != _mia_verdict(row):
            msgs.append(f"audit.mia[{m['path']}].status: the report says {m.get('status')!r}, audit.json gives "
                        f"{_mia_verdict(row)!r}")
    shown = [(p, r) for p, r in mia_rows.items() if p in {m["path"] for m in au.get("mia") or []}]
    candidates = [(p, r) for p, r in shown if _mia_verdict(r) != "below chance (audit fault)"]

    def key(pr):
        r = pr[1]
        ci = r.get("auc_ci") if isinstance(r.get("auc_ci"), list) else r.get("auc_ci95")
        return (float(ci[0]) if isinstance(ci, list) and len(ci) == 2 else float(r["auc"]), float(r["auc"]))

    worst = max(candidates, key=key) if candidates else None
    for where, got in (("audit.worst_leakage", au.get("worst_leakage")),
                       ("summary.first_page.worst_leakage", report["summary"]["first_page"].get("worst_leakage"))):
        if worst is None and got is not None:
            msgs.append(f"{where}: the report names {got.get('path')}, audit.json has no row that is not an audit fault")
        elif worst is not None and (got is None or not _same(got.get("auc"), float(worst[1]["auc"]))
                                    or key((got.get("path"), worst[1])) != key(worst)):
            msgs.append(f"{where}: the report says {None if got is None else (got.get('path'), got.get('auc'))}, the worst "
                        f"measured leakage in audit.json is {worst[0]} (AUC {worst[1]['auc']!r})")
    o = au.get("other_hospitals")
    if partner and o is not None and o.get("consistency_statuses") != other_verdicts:
        msgs.append(f"audit.other_hospitals.consistency_statuses: the report says {o.get('consistency_statuses')!r}, "
                    f"audit.json gives {other_verdicts!r}")
    return msgs


# ------------------------------------------------------------------------------------------ randomness
def _randomness(report: dict, ledgers: list[_Ledgers], standalone: bool) -> list[str]:
    checks = {c["name"]: c for c in report["checks"]}
    if not report["privacy_definition"]["dp"]:
        return []
    sessions = [(L.hospital, name, e) for L in ledgers for name, e in L.sessions()]
    # noise_randomness
    if any("randomness" in e and e["randomness"] != "secure" for _, _, e in sessions):
        rnd = "fail"
    elif any("randomness" not in e for _, _, e in sessions):
        rnd = "attention"
    else:
        rnd = "pass"
    # noise_fresh
    seen: dict[tuple[str, str], str] = {}
    fresh = "pass"
    for _, name, e in sessions:
        for key in ("noise_fingerprint", "sampling_fingerprint"):
            fp = e.get(key)
            if isinstance(fp, str) and fp:
                if (key, fp) in seen:
                    fresh = "fail"
                seen[(key, fp)] = name
    if fresh != "fail" and any("noise_fingerprint" not in e or (e.get("noise_fingerprint") is None and int(e.get("steps") or 0) > 0)
                               for _, _, e in sessions):
        fresh = "attention"
    msgs = []
    for name, want in (("noise_randomness", rnd), ("noise_fresh", fresh)):
        got = (checks.get(name) or {}).get("status")
        ok = got == want or (standalone and got in _STATUS_RANK and _STATUS_RANK[got] >= _STATUS_RANK[want])
        if not ok:
            msgs.append(f"checks[{name}].status: the report says {got!r}, the DP sessions' ledger entries give {want!r}")
    return msgs
