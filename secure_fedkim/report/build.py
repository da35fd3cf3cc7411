"""``build_report``: the content of ``report.json`` (REPORTING.md §2.2) and its status rules (§2.3).

Status rules, deterministic (each check has a name, a status and a reason; the overall status is the worst, with
``not_applicable`` < ``pass`` < ``inconclusive`` < ``attention`` < ``fail``). A check with nothing behind it is
``not_applicable``, never ``pass``; the decision on the first page is ``do not release`` for fail, ``release with
conditions`` for attention or inconclusive, ``release`` when everything with evidence behind it passed.

Each check's own rule (when it fails, needs attention or is inconclusive; whether it needs DP; when it is not
applicable and why) is its entry in :mod:`secure_fedkim.report.checks`; ``_check_rows`` applies them in the
registry's order.

Every derived figure comes from one place (``collect.derive``: remaining budget and patient level from the composed
spend; ``settle_audit``: one status per audit row; ``worst_leakage``), and ``verify`` recomputes each by its own code
path (``recompute``).

Partner reports show the other hospitals only as a count and coarse bands (ranges widened to whole steps), and
nothing when there are fewer than ``report.min_other_hospitals`` (default 3): a min, median or max over a few
hospitals is one of them.
"""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import uuid
from pathlib import Path
from typing import Any

from secure_fedkim.audit_schema import PARTNER_VIEWS
from secure_fedkim.rundir.layout import RunDir

from . import text
from .aggregation import aggregation_facts
from .audit_section import (
    AUDIT_CONSISTENCY,
    MIA_BELOW_CHANCE,
    MIA_NO_SIGNAL,
    MIA_SIGNAL,
    PART_READERS,  # noqa: F401 (where attacks.audit and its tests name it)
    read_audit,
    settle_audit,
    worst_leakage,
)
from .checks import (
    CHECKS,
    NO_DP_REASON,
    applies,
    not_applicable_reason,
    own_findings,
    pass_reason,
)
from .collect import (
    Finding,
    HospitalFacts,
    RunFacts,
    _version,
    collect_hospital,
    digest_of,
    dp_sessions,
    load_run_facts,
    read_ledger,
    sha256_file,
    suppress,
)

SCHEMA_VERSION = "2.1.0"
STATUSES = ("pass", "inconclusive", "attention", "fail", "not_applicable")
# inconclusive ranks above pass: a report with an undecided audit is never "pass" overall
_RANK = {"not_applicable": -1, "pass": 0, "inconclusive": 1, "attention": 2, "fail": 3}
#: default of the config key report.min_other_hospitals: a partner report shows no figure about fewer others
MIN_OTHERS_FOR_STATS = 3

def worst(statuses) -> str:
    statuses = [s for s in statuses if s != "not_applicable"]
    if not statuses:
        return "not_applicable"
    return max(statuses, key=_RANK.__getitem__)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")



# ------------------------------------------------------------------------------------------ provenance
def code_version() -> dict:
    here = Path(__file__).resolve().parents[2]
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip() or None
        if commit:
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10).stdout
            dirty = bool(st.strip())
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git_commit": commit, "git_dirty": dirty, "package_version": _version("secure-fedkim")}


PACKAGES = ("torch", "opacus", "tenseal", "flwr", "transformers", "peft", "dp-accounting", "cryptography", "numpy",
            "secure-fedkim", "matplotlib", "fpdf2", "jsonschema")


def artifact_paths(run_dir: Path, clients: list[str]) -> list[tuple[str, str | None]]:
    """(relative path, hospital or None) of every file the report's numbers or guarantees rest on.
    Never a private key."""
    files = RunDir(run_dir)
    out: list[tuple[str, str | None]] = []
    for p in (files.config_yaml, files.resolved_config, files.summary):
        if p.is_file():
            out.append((files.relative(p), None))
    for p in files.round_metrics_files():
        out.append((files.relative(p), None))
    for p in sorted(files.model_dir.glob("*")):
        if p.is_file():
            out.append((files.relative(p), None))
    for c in clients:
        for p in sorted(files.client(c).path.glob("*.safetensors")):
            out.append((files.relative(p), c))
        key = files.public_key(c)
        if key.is_file():
            out.append((files.relative(key), c))
    audit = files.audit_dir
    for p in sorted(audit.glob("*")) if audit.is_dir() else []:
        if p.is_file() and p.suffix in (".json", ".png"):
            hosp = next((c for c in clients if c in p.name), None)
            out.append((files.relative(p), hosp))
    return out


def other_commitment(h: HospitalFacts) -> str:
    """A public, anonymous commitment to one hospital's ledgers (federation and baseline heads): a partner checks
    the others' part of its report against these hashes without their figures."""
    return digest_of({"ledger": h.head, "baseline": (h.baseline or {}).get("head"), "hospital": h.name})


def _ledger_times(run_dir: Path, hospitals: dict[str, HospitalFacts]) -> list[str]:
    times = []
    for h in hospitals.values():
        if h.ledger_verified:
            entries, _ = read_ledger(run_dir / h.ledger_rel, run_dir)
            times += [e["time"] for e in entries or [] if "time" in e]
    return sorted(times)


def _mtime(p: Path) -> str | None:
    if not p.exists():
        return None
    return dt.datetime.fromtimestamp(p.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------ the report
def _facts(run_dir: Path) -> dict:
    """The run as the report reads it, and every check's findings (``findings``: check name -> findings), made
    under its name by the evidence readers, then by the check itself (:mod:`secure_fedkim.report.checks`)."""
    run = load_run_facts(run_dir)
    hospitals = {c: collect_hospital(run, c) for c in run.clients}
    tasks = list((run.summary.get("tasks") or {}).keys()) or list(run.inventory.get("tasks", {}))
    audit, audit_f = read_audit(run_dir, run.clients, tasks)
    text.qualify_reconstruction_notes(audit, run.cfg)  # in the threat model's terms, never contradicting it
    agg, agg_f = aggregation_facts(run)
    run_ids = [h.run_id for h in hospitals.values() if h.run_id]
    run.run_id = run_ids[0] if run_ids else (Path(str(run.summary.get("run_dir", ""))).name or run_dir.name)
    findings: dict[str, list[Finding]] = {c.name: [] for c in CHECKS}
    for source in [h.findings for h in hospitals.values()] + [agg_f, audit_f]:
        for k, v in source.items():
            findings[k].extend(v)
    settle_audit(audit, hospitals)
    config_file = run.files.config_yaml
    facts = {"run": run, "hospitals": hospitals, "audit": audit, "aggregation": agg,
             "config_sha256": sha256_file(config_file) if config_file.is_file() else None,
             "any_dp": any(h.dp for h in hospitals.values())}
    for check in CHECKS:
        findings[check.name].extend(own_findings(check, facts))
    return {**facts, "findings": findings}


def _check_rows(f: dict, partner: str | None) -> list[dict]:
    """report.json's ``checks``: one row per registered check, its status and reason from its findings as
    ``partner`` (None: the federation) reads them."""
    rows = []
    for check in CHECKS:
        found = f["findings"][check.name]
        if found:
            status = "fail" if check.needs_dp and not f["any_dp"] else worst(x.status for x in found)
            reason = check.reason(found, partner)
        elif check.needs_dp and not f["any_dp"]:
            status, reason = "fail", NO_DP_REASON
        elif applies(check, f):
            status, reason = "pass", pass_reason(check, f)
        else:
            status, reason = "not_applicable", not_applicable_reason(check, f)
        rows.append({"name": check.name, "status": status, "reason": reason, "section": check.section})
    return rows


def _hospital_entry(h: HospitalFacts) -> dict:
    return {
        "hospital": h.name,
        "dp": h.dp,
        "ledger": {"path": h.ledger_rel, "exists": h.ledger_exists, "verified": h.ledger_verified,
                   "error": h.ledger_error, "entries": h.n_entries, "head": h.head},
        "mechanism": h.mechanism,
        "accounting": h.accounting,
        "participation": [{"round": p["round"], "status": p["status"]} for p in h.participation],
        "events": h.events,
    }


def coarse_band(values: list, step: float) -> dict | None:
    """The values' range widened outward to multiples of ``step`` (never anyone's exact value): statistical
    disclosure control for a partner report, where a min, median or max over a few hospitals is one of them."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None
    low = math.floor(min(vals) / step) * step
    high = math.ceil(max(vals) / step) * step
    if high <= low:
        high = low + step
    return {"low": round(low, 10), "high": round(high, 10), "step": step}


def min_others(run: RunFacts) -> int:
    return int(getattr(getattr(run.cfg, "report", None), "min_other_hospitals", MIN_OTHERS_FOR_STATS))


def _others(hs: list[HospitalFacts], k: int) -> dict:
    """The other hospitals of a partner report: counts, and coarse bands only when there are at least ``k``."""
    n = len(hs)
    acc = [h.accounting or {} for h in hs]
    mech = [h.mechanism or {} for h in hs]
    shown = n >= k
    band = lambda values, step: coarse_band(values, step) if shown else None
    return {
        "count": n,
        "dp_count": sum(h.dp for h in hs),
        "ledgers_verified": sum(h.ledger_verified for h in hs),
        "min_others": k,
        "stats_shown": shown,
        "stats_note": ("only coarse bands (ranges widened to whole steps) are shown: a minimum, median or maximum over "
                       "a few hospitals is one hospital's own value") if shown else
        f"fewer than {k} other hospitals (report.min_other_hospitals): their figures are withheld",
        "epsilon_total": band([a.get("epsilon_total") for a in acc], 1.0),
        "epsilon_budget": band([a.get("epsilon_budget") for a in acc], 1.0),
        "gdp_mu": band([a.get("gdp_mu_total") for a in acc], 0.5),
        "noise_multiplier": band([m.get("noise_multiplier") for m in mech], 0.5),
    }


def _epsilon_series(hs: dict[str, HospitalFacts], view: list[str], others: list[str], rounds: int) -> dict | None:
    def series(h):
        acc = h.accounting or {}
        return [x["epsilon"] for x in acc.get("epsilon_by_round", [])][:rounds]

    if not any(hs[c].accounting for c in hs):
        return None
    out = {"rounds": list(range(1, rounds + 1)), "series": {}, "budget": {}, "planned_epsilon": {}, "skipped": {}}
    for c in view:
        acc = hs[c].accounting
        if acc:
            out["series"][c] = series(hs[c])
            out["budget"][c] = acc["epsilon_budget"]
            out["planned_epsilon"][c] = acc["planned_epsilon"]
            out["skipped"][c] = [x["round"] for x in acc["epsilon_by_round"] if x["status"] != "trained"]
    if others:
        out["others"] = None  # a per-round band over the others would trace each of them: not shown
    return out


def _utility(f: dict, partner: str | None, reference: dict | None) -> dict:
    run = f["run"]
    s = run.summary
    tasks_meta = s.get("tasks") or {n: {"role": t["role"]} for n, t in run.inventory.get("tasks", {}).items()}
    fed = s.get("federated_test") or {}
    fm = s.get("fm_test") or {}
    fm0 = s.get("fm_test_round0") or {}
    single = s.get("single_hospital_test") or {}
    ref_fed = (reference or {}).get("federated_test") or {}
    ref_fm = (reference or {}).get("fm_test") or {}
    rows = []
    for task, meta in tasks_meta.items():
        role = meta.get("role", "train")
        row = {"task": task, "role": role, "seen": role == "train", "metrics": ["accuracy", "auroc", "f1", "mcc"],
               "client_model": _pick(fed.get(task)), "foundation_model": _pick(fm.get(task)),
               "foundation_model_before_injection": _pick(fm0.get(task)),
               "non_private_reference": _pick(ref_fm.get(task) or ref_fed.get(task)) if reference else None,
               "single_hospital": None, "single_hospital_others": None, "delta_vs_reference": None}
        if row["non_private_reference"] and (row["foundation_model"] or row["client_model"]):
            mine = row["foundation_model"] or row["client_model"]
            row["delta_vs_reference"] = {k: mine[k] - row["non_private_reference"][k] for k in mine
                                         if isinstance(mine.get(k), (int, float)) and isinstance(row["non_private_reference"].get(k), (int, float))}
        if single:
            if partner is None:
                row["single_hospital"] = {c: _pick(v.get(task)) for c, v in single.items() if v.get(task)}
            else:
                if single.get(partner, {}).get(task):
                    row["single_hospital"] = {partner: _pick(single[partner][task])}
                others = [c for c in single if c != partner and single[c].get(task)]
                row["single_hospital_others"] = {"count": len(others)}  # no figure: each would be one hospital's
        if not row["client_model"] and not row["foundation_model"]:
            row["note"] = "not evaluated in this run" + (" (unseen tasks are answered only by the foundation model)" if role != "train" else "")
        rows.append(row)
    return {
        "tasks": rows,
        "source": "summary.json (federated_test, fm_test, single_hospital_test); test splits held out from training",
        "reference_run": (reference or {}).get("_source"),
        "subgroups": "not computed: the task labels carry no subgroup attributes",
    }


def _pick(m: dict | None) -> dict | None:
    if not m:
        return None
    return {k: m[k] for k in ("accuracy", "auroc", "f1", "mcc", "precision", "recall", "n") if isinstance(m.get(k), (int, float))}


def _inventory(f: dict, partner: str | None) -> dict:
    run = f["run"]
    inv = run.inventory
    view = [partner] if partner else run.clients
    tasks = []
    for name, t in (inv.get("tasks") or {}).items():
        entry = {"task": name, "role": t["role"], "modality": t["modality"], "records": suppress(t["records"]),
                 "positives": suppress(t["positives"]) if t["records"] - t["positives"] >= 10 else "suppressed",
                 "test_records": suppress(t["test_records"]), "public_records": suppress(t["public_records"]),
                 "patient_ids_available": t["patient_ids"], "task_privacy_unit": t.get("privacy_unit"),
                 "persons": t.get("persons"), "persons_note": t.get("persons_note"), "hospitals": {}}
        for c in view:
            hc = t["hospitals"].get(c)
            if hc:
                pos_ok = hc["records"] - hc["positives"] >= 10
                entry["hospitals"][c] = {"records": suppress(hc["records"]),
                                         "positives": suppress(hc["positives"]) if pos_ok else "suppressed",
                                         "max_records_per_patient": hc["max_records_per_patient"]}
        if partner:
            others = [hc for c, hc in t["hospitals"].items() if c != partner]
            entry["other_hospitals"] = {"count": len(others),
                                        "records": suppress(sum(h["records"] for h in others)) if len(others) >= min_others(run) else None}
        tasks.append(entry)
    if not tasks:  # no data plan: the summary's totals only
        for name, t in (run.summary.get("tasks") or {}).items():
            tasks.append({"task": name, "role": t.get("role"), "modality": t.get("modality"),
                          "records": suppress(t.get("records")), "hospitals": {}})
    return {"suppression_threshold": 10, "rule": "counts below 10 (zero included) are shown as '<10'; a positive "
            "count is 'suppressed' when the negatives it implies are below 10", "source": inv.get("source"),
            "note": inv.get("error"), "date_ranges": "no record dates are used by this run", "tasks": tasks}


def _provenance(f: dict, partner: str | None, generated_at: str) -> dict:
    run, hs = f["run"], f["hospitals"]
    run_dir = run.run_dir
    view = [partner] if partner else run.clients
    others = [c for c in run.clients if c not in view]
    artifacts, other_art = [], {}
    for rel, hosp in artifact_paths(run_dir, run.clients):
        p = run_dir / rel
        if hosp is not None and hosp not in view:
            other_art[rel] = sha256_file(p)
            continue
        artifacts.append({"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size})
    times = _ledger_times(run_dir, hs)
    agg = f["aggregation"]
    kh = (agg.get("ckks") or {}).get("key_holder_ledger") or {}
    commitments = []
    for c in view:
        commitments += [{"hospital": c, **x} for x in hs[c].commitments]
    return {
        "config_sha256": f["config_sha256"],
        "config_sha256_recorded": run.summary.get("config_sha256"),
        "resolved_config_sha256": sha256_file(run.files.resolved_config),
        "code_version": code_version(),
        "package_versions": {p: _version(p) for p in PACKAGES},
        "package_versions_note": "of the environment that generated this report; the run's accountant library is in each ledger's dp_plan",
        "timestamps": {
            "report_generated_at": generated_at,
            "run_first_ledger_entry": times[0] if times else None,
            "run_last_ledger_entry": times[-1] if times else None,
            "summary_written_at": _mtime(run.files.summary),
            "run_seconds": run.summary.get("seconds"),
        },
        "ledger_heads": {c: hs[c].head for c in view},
        "baseline_ledger_heads": {c: hs[c].baseline["head"] for c in view if hs[c].baseline},
        "ledger_entries": {c: hs[c].n_entries for c in view},
        "other_hospitals_ledger_heads_sha256": digest_of({c: hs[c].head for c in others}) if others else None,
        "other_hospitals_commitments": sorted(other_commitment(hs[c]) for c in others),
        "keyholder_ledger_head": kh.get("head"),
        "artifacts": artifacts,
        "other_hospitals_artifacts_sha256": digest_of(other_art) if other_art else None,
        "dataset_commitments": commitments,
        "signature": None,
        "verify_command": None,
    }


def build_report(run_dir, partner: str | None = None, *, reference=None) -> dict:
    """The content of report.json for the run in ``run_dir`` (REPORTING.md §2.2), as a JSON-ready dict.

    Args:
        run_dir: a run directory written by ``secure-fedkim run``.
        partner: a hospital of the federation: its figures in full, the other hospitals only in aggregate
            (count; min/median/max when there are at least 3 of them) and never by name. None: the
            federation report, every hospital by name.
        reference: optional run directory of a non-private reference run with the same tasks; its test
            metrics are shown beside this run's (utility, delta).

    Reads only; writes nothing. ``provenance.signature`` stays None until :func:`write_report` signs.
    Raises ValueError for an unknown partner, FileNotFoundError for a directory that is not a run.
    """
    run_dir = Path(run_dir)
    f = _facts(run_dir)
    run, hs = f["run"], f["hospitals"]
    if partner is not None and partner not in run.clients:
        raise ValueError(f"partner {partner!r} is not a hospital of this federation ({len(run.clients)} hospitals)")
    view = [partner] if partner else list(run.clients)
    others = [c for c in run.clients if c not in view]
    generated_at = utc_now()
    checks = _check_rows(f, partner)
    overall = worst(c["status"] for c in checks)
    rounds = rounds_of(run, hs)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "report_id": uuid.uuid4().hex,
        "generated_at": generated_at,
        "generator": {"name": "secure-fedkim report", "version": _version("secure-fedkim")},
        "run_id": run.run_id,
        "federation_name": run.cfg.run.name,
        "partner": partner,
        "status": {"overall": overall, "counts": {s: sum(c["status"] == s for c in checks) for s in STATUSES}},
        "checks": checks,
        "scope": text.scope(run.cfg, partner, len(run.clients)),
        "privacy_definition": text.privacy_definition(run.cfg, f["any_dp"], _per_patient(run), view,
                                                      any(hs[c].baseline for c in view)),
        "hospitals": [_hospital_entry(hs[c]) for c in view],
        "other_hospitals": _others([hs[c] for c in others], min_others(run)) if partner else None,
        "accounting": _accounting_section(hs),
        "budget": text.budget_section(run.cfg, [hs[c] for c in view], [hs[c] for c in others], partner),
        "aggregation": _aggregation_view(f["aggregation"], partner),
        "threat_model": text.threat_model(run.cfg, f["any_dp"]),
        "audit": _audit_view(f["audit"], partner),
        "utility": _utility(f, partner, _reference(run, reference)),
        "data_inventory": _inventory(f, partner),
        "provenance": _provenance(f, partner, generated_at),
        "limitations": text.LIMITATIONS,
        "sign_off": _sign_off(),
        "glossary": text.GLOSSARY,
        "plots": {"epsilon_by_round": _epsilon_series(hs, view, others, rounds)},
    }
    report["scope"]["engine"] = run.summary.get("engine") or "flower simulation"
    report["privacy_definition"].update(_adjacency([hs[c] for c in view], f["any_dp"]))
    by_name = {c["name"]: c for c in checks}
    report["hazards"] = text.hazards(by_name)
    report["regulatory_mapping"] = text.regulatory(by_name, f["any_dp"])
    report["guarantee_statement"] = text.guarantee(report, run.cfg)
    report["summary"] = text.summary(report, run.cfg, rounds)
    report["dp_disclosure_card"] = text.disclosure_card(report, run.cfg, {c: randomness_of(hs[c]) for c in view})
    report["summary"]["first_page"] = text.first_page(report, run.cfg)
    return {k: report[k] for k in REPORT_ORDER}


def randomness_of(h: HospitalFacts) -> dict:
    """The generators a hospital's DP sessions (federation and baseline) recorded, and how many recorded none."""
    sessions = dp_sessions(h)
    return {"kinds": sorted({str(e["randomness"]) for _, e in sessions if "randomness" in e}),
            "sessions": len(sessions), "not_recorded": sum("randomness" not in e for _, e in sessions)}


def _adjacency(hs: list[HospitalFacts], any_dp: bool) -> dict:
    """The neighbouring relation as the hospitals' DP plans state it (``dp_plan.adjacency``: a sentence, including that
    the record count n is treated as public); older ledgers record only "add/remove"."""
    said = {h.name: h.plan.get("adjacency") for h in hs if h.dp and h.plan and isinstance(h.plan.get("adjacency"), str)}
    sentences = sorted(set(said.values()))
    if not any_dp:
        return {"adjacency_statement": None, "adjacency_source": None}
    if not sentences:
        return {"adjacency_statement": None, "adjacency_source": "no dp_plan records its adjacency: the relation above is "
                                                                "the toolkit's (add/remove one unit)"}
    return {"adjacency_statement": sentences[0] if len(sentences) == 1 else
            "; ".join(f"{c}: {a}" for c, a in sorted(said.items())),
            "adjacency_source": "the hospitals' dp_plan entries" + ("" if len(said) == len([h for h in hs if h.dp])
                                                                    else " (not every hospital's plan records it)")}


#: report.json's keys, in the order a reader meets them (the summary and checks first)
REPORT_ORDER = ("schema_version", "report_id", "generated_at", "generator", "run_id", "federation_name", "partner",
                "status", "summary", "checks", "guarantee_statement", "dp_disclosure_card", "scope", "privacy_definition", "hospitals",
                "other_hospitals", "accounting", "budget", "aggregation", "threat_model", "audit", "utility",
                "data_inventory", "provenance", "regulatory_mapping", "hazards", "limitations", "sign_off", "glossary",
                "plots")


def _reference(run: RunFacts, reference) -> dict | None:
    """The non-private reference run's summary (``--reference`` or summary.json's own), tagged with its source."""
    if reference is not None:
        ref = RunDir(reference).read_summary()
        ref["_source"] = str(Path(reference).name)
        return ref
    if isinstance(run.summary.get("non_private_reference"), dict):
        ref = dict(run.summary["non_private_reference"])
        ref["_source"] = "summary.json non_private_reference"
        return ref
    return None


def _aggregation_view(aggregation: dict, partner: str | None) -> dict:
    """The aggregation facts as one reader may see them: a partner learns only how many CKKS decryptions
    included it, not which hospitals each one combined."""
    agg = dict(aggregation)
    if agg.get("ckks"):
        ckks = dict(agg["ckks"])
        clients_lists = ckks.pop("_decrypt_clients")
        if partner is None:
            ckks["decryptions_by_round"] = clients_lists
        else:
            ckks["partner_included_in_decryptions"] = sum(partner in c for c in clients_lists)
        agg["ckks"] = ckks
    return agg


def _accounting_section(hs: dict[str, HospitalFacts]) -> dict:
    return {
        "accountants": sorted({h.accounting["accountant"] for h in hs.values() if h.accounting}),
        "accountant_libraries": sorted({str(h.accounting["accountant_library"]) for h in hs.values() if h.accounting}),
        "independent_library": f"dp_accounting {_version('dp-accounting')}",
        "composition": "all DP-SGD steps of the run composed (every round, every task); epsilon_by_round is cumulative",
        "gdp_note": "Gaussian-DP mu by the central-limit approximation (Bu et al. 2020): an approximation, not a bound",
    }


def _sign_off() -> dict:
    return {"hospital_dpo": {"name": None, "date": None, "decision": None},
            "expert": {"name": None, "date": None, "determination": None},
            "note": "To be completed by people. This tool does not certify HIPAA de-identification or "
                    "compliance with any regulation; it provides evidence."}


def rounds_of(run: RunFacts, hs: dict[str, HospitalFacts]) -> int:
    return max(run.rounds_run, max((len((h.accounting or {}).get("epsilon_by_round", [])) for h in hs.values()), default=0))


def _per_patient(run: RunFacts) -> dict[str, int | None]:
    configured = getattr(run.cfg.privacy, "max_records_per_patient", None)
    return {c: configured if configured is not None else run.records_per_patient.get(c) for c in run.clients}


#: How each key of the audit section reaches a partner's report, declared key by key: ``"run"`` (about the whole run,
#: naming no hospital: as is), ``"rows"`` (one row per hospital or none: the partner's own and the hospital-free ones;
#: the others only as counts in ``other_hospitals``), ``"skipped"`` (notes: those naming no other hospital). A key
#: not declared here never reaches a partner: a new part is private until someone decides how it may be shared. A
#: part added with ``attacks.audit.register_audit_kind`` declares its own (``audit_schema.PARTNER_VIEWS``: None, the
#: default, never; ``"rows"``; ``"run"``).
PARTNER_VIEW = {"run": "run", "source": "run", "note": "run", "auditor_knowledge": "run", "low_fpr_note": "run",
                "mia": "rows", "dp_audit": "rows", "reconstruction": "rows", "consistency": "rows", "roc_images": "rows",
                "skipped": "skipped"}


def _audit_view(audit: dict, partner: str | None) -> dict:
    """The audit as one reader sees it: every row with its one status (``settle_audit``), the worst measured leakage
    of the rows shown, and in a partner report (deny by default, :data:`PARTNER_VIEW`) the partner's own rows, the
    other hospitals' only as counts of those same statuses."""
    if partner is None:
        out = {k: v for k, v in audit.items() if k != "_clients"}
        out["other_hospitals"] = None
        out["worst_leakage"] = worst_leakage(out["mia"])
        return out
    mine = lambda e: e.get("hospital") in (None, partner)
    names = [c for c in audit.get("_clients", []) if c != partner]
    out = {}
    for key, value in audit.items():
        how = PARTNER_VIEW.get(key) or PARTNER_VIEWS.get(key)  # a registered part: what its kind declared
        if how == "run":
            out[key] = value
        elif how == "rows":
            out[key] = [e for e in value if mine(e)]
        elif how == "skipped":
            out[key] = [x for x in value if not any(c in x["what"] + x["why"] for c in names)]
    others_mia = [e for e in audit["mia"] if not mine(e)]
    others_dp = [e for e in audit["dp_audit"] if not mine(e)]
    others_rows = [e for e in audit["consistency"] if not mine(e)]
    others_rows += [e for e in others_dp if e["path"] not in {c["path"] for c in others_rows}]
    out["worst_leakage"] = worst_leakage(out["mia"])
    out["other_hospitals"] = {
        "hospitals": len({e["hospital"] for e in others_mia + others_rows}),
        "mia_results": len(others_mia),
        "dp_audits": len(others_dp),
        # the same statuses as every row of this report (settle_audit): no second verdict
        "consistency_statuses": {st: sum(e["status"] == st for e in others_rows) for st in AUDIT_CONSISTENCY},
        "mia_statuses": {st: sum(e["status"] == st for e in others_mia) for st in (MIA_SIGNAL, MIA_NO_SIGNAL, MIA_BELOW_CHANCE)},
    }
    return out


def status_of(report: dict, name: str) -> dict:
    """The check ``name`` of a built report (for tests and the CLI)."""
    return next(c for c in report["checks"] if c["name"] == name)
