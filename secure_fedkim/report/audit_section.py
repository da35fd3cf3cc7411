"""The report's audit section: audit/audit.json read strictly through its schema (each part by its row type), one
status per row (``settle_audit``), the worst measured leakage, and the findings the audit's checks are judged by
(their entries in :mod:`secure_fedkim.report.checks` call them). Record ids are never copied."""

from __future__ import annotations

import json
import math
from pathlib import Path

from secure_fedkim.audit_schema import (
    RECORD_ID_FIELDS,
    REPORT_READERS,
    ROW_TYPES,
    AuditJson,
    read_audit_json,
)
from secure_fedkim.rundir.layout import RunDir

from .collect import Finding, HospitalFacts

#: the statuses a DP-consistency audit row can have
AUDIT_CONSISTENCY = ("consistent", "inconsistent", "inconclusive")

def _fpr_value(key) -> float | None:
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _histogram(h) -> dict | None:
    """A per-record exposure histogram (bin edges and counts: no ids), or None."""
    if not isinstance(h, dict):
        return None
    out = {k: v for k, v in h.items() if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)}
    return out or None


def read_audit(run_dir: Path, clients: list[str], tasks: list[str]) -> tuple[dict, dict[str, list[Finding]]]:
    """audit/audit.json, read strictly through its schema (:mod:`secure_fedkim.audit_schema`): each part by its
    row type. A row that does not follow it is named (part, row, field) in a finding and left out; the other rows
    are read. Returns the audit section and the findings by check name. Record ids (``top_exposed``, ...) are
    never copied."""
    files = RunDir(run_dir)
    path = files.audit_json
    rel = files.relative(path)
    out = {"run": False, "source": rel, "mia": [], "dp_audit": [], "reconstruction": [], "consistency": [],
           "roc_images": [], "note": None, "auditor_knowledge": None, "skipped": [], "low_fpr_note": None}
    if not path.is_file():
        out["note"] = f"audit not run: no {rel} in the run directory (run `secure-fedkim audit RUN_DIR`)"
        return out, {"audit_run": [Finding("attention", out["note"], None, out["note"])]}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        out["note"] = f"{rel} is unreadable ({e}); treated as not run"
        return out, {"audit_run": [Finding("attention", out["note"], None, "the audit file is unreadable")]}
    out["run"] = True
    parsed = read_audit_json(data, rel)
    for part, rows in parsed.rows.items():  # in the file's order
        for i, row in rows:
            _part_reader(part)(out, row, [part, str(i)], _row_context(row, clients))
        if part not in PART_READERS and part not in REPORT_READERS:
            out.setdefault(part, [])  # a registered part read by _read_registered: its key even without rows
    out["_clients"] = list(clients)
    by_png = {m["roc_png"]: m["hospital"] for m in out["mia"] if m.get("roc_png")}
    out["roc_images"] = [
        {"path": files.relative(p),
         "hospital": by_png[p.name] if p.name in by_png else next((c for c in clients if p.name.startswith(f"roc_{c}_")), None)}
        for p in sorted(files.audit_dir.glob("*.png"))
    ]
    out["auditor_knowledge"] = parsed.auditor_knowledge
    out["low_fpr_note"] = _low_fpr_note(out["mia"])
    return out, {"audit_run": _schema_findings(parsed, data, clients, "attention"),
                 "audit_consistent_with_accountant": _schema_findings(parsed, data, clients, "fail"),
                 "mia_low_fpr": _low_fpr_findings(out["mia"])}


def _row_context(node: dict, clients: list[str]) -> dict:
    """The hospital (a client named by the row), target and task a row is about."""
    ctx = {}
    for key in ("hospital", "client", "site", "partner", "target"):
        if isinstance(node.get(key), str) and node[key] in clients:
            ctx["hospital"] = node[key]
    for key in ("target", "artifact", "model"):
        if isinstance(node.get(key), str):
            ctx["target"] = node[key]
    if isinstance(node.get("task"), str):
        ctx["task"] = node["task"]
    return ctx


def _read_mia(out: dict, node: dict, where: list[str], ctx: dict) -> None:
    out["mia"].append(_mia_entry(node, "/".join(where), where, ctx))


def _read_dp_consistency(out: dict, node: dict, where: list[str], ctx: dict) -> None:
    """A DP-consistency audit (canary replay, white-box, per-step): its verdict, and its lower bound if it has one."""
    if node.get("status") in AUDIT_CONSISTENCY:
        out["consistency"].append(_consistency_entry(node, "/".join(where), where, ctx))
    if isinstance(node.get("eps_lb"), (int, float)):
        out["dp_audit"].append(_dp_audit_entry(node, "/".join(where), ctx))


def _read_reconstruction(out: dict, node: dict, where: list[str], ctx: dict) -> None:
    out["reconstruction"].append(_reconstruction_entry(node, "/".join(where), ctx))


def _read_skipped(out: dict, node: dict, where: list[str], ctx: dict) -> None:
    out["skipped"].append({"what": node["what"], "why": node["why"]})


#: how the report reads each part of audit.json (secure_fedkim.audit_schema.ROW_TYPES): (section, row, [part,
#: index], row context); a row reaches its reader only when it follows its row type
PART_READERS = {"mia": _read_mia, "dp_audit": _read_dp_consistency, "whitebox": _read_dp_consistency,
                "mechanism": _read_dp_consistency, "runlevel": _read_dp_consistency,
                "reconstruction": _read_reconstruction, "skipped": _read_skipped}


def _part_reader(part: str):
    """A built-in part's reader (:data:`PART_READERS`), else the one its registered audit kind declares
    (``secure_fedkim.audit_schema.REPORT_READERS``), else :func:`_read_registered`."""
    return PART_READERS.get(part) or REPORT_READERS.get(part) or _read_registered


def _read_registered(out: dict, node: dict, where: list[str], ctx: dict) -> None:
    """A registered part without a reader of its own: its rows as written, less their record ids, under the part's
    own key, each with its ``path`` in audit.json and the ``hospital`` it names (None: about no one hospital)."""
    drop = set(RECORD_ID_FIELDS) | set(ROW_TYPES[where[0]].record_ids)
    entry = {k: v for k, v in node.items() if k not in drop}
    entry.update(path="/".join(where), hospital=ctx.get("hospital"))
    out.setdefault(where[0], []).append(entry)


#: the audit.json parts whose rows are DP-consistency verdicts
CONSISTENCY_PARTS = ("dp_audit", "whitebox", "mechanism", "runlevel")


def _mia_entry(node: dict, label: str, where: list[str], ctx: dict) -> dict:
    tpr = {}
    for k, v in (node.get("tpr_at_fpr") or {}).items():
        if _fpr_value(k) is not None and (v is None or isinstance(v, (int, float))):
            tpr[f"{_fpr_value(k):g}"] = v
    ci = node.get("auc_ci95")
    return {
        "path": label, "hospital": ctx.get("hospital"), "task": ctx.get("task"),
        "target": ctx.get("target") or (where[0] if where else None),
        "attack": node.get("attack") if isinstance(node.get("attack"), str) else (where[-1] if where else "attack"),
        "access": node.get("access") if isinstance(node.get("access"), str) else None,
        "auc": float(node["auc"]),
        "auc_ci95": [float(x) for x in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
        "balanced_accuracy": node.get("balanced_accuracy") if isinstance(node.get("balanced_accuracy"), (int, float)) else None,
        "tpr_at_fpr": tpr,
        "n_members": node.get("n_members") if isinstance(node.get("n_members"), int) else None,
        "n_nonmembers": node.get("n_nonmembers") if isinstance(node.get("n_nonmembers"), int) else None,
        "tpr_at_fpr_note": {f"{_fpr_value(k):g}": str(v) for k, v in (node.get("tpr_at_fpr_note") or {}).items()
                            if _fpr_value(k) is not None} if isinstance(node.get("tpr_at_fpr_note"), dict) else {},
        "per_record_exposure": _histogram(node.get("per_record_exposure")),
        "roc_png": node.get("roc_png") if isinstance(node.get("roc_png"), str) else None,
        **_mia_significance(node, ci),
    }


#: what a black-box canary row keeps; its verdict is ``status`` only, set by ``settle_audit`` (audit.json's
#: ``consistent_with_accountant`` and ``status`` are read there, never copied: one status per row)
_DP_AUDIT_KEEP = ("eps_lb", "eps_lb_one_run", "eps_accountant", "canaries", "kind", "mode",
                  "trials", "confidence", "delta", "noise_multiplier", "accountant_noise_multiplier", "accountant", "dp",
                  "canary_auc", "note", "max_certifiable_epsilon", "accountant_epsilon", "ratio",
                  "threat_model", "epsilon_unit", "canary_unit", "records_per_canary")


def _dp_audit_entry(node: dict, label: str, ctx: dict) -> dict:
    entry = {"path": label, "hospital": ctx.get("hospital"), "task": ctx.get("task"), "target": ctx.get("target")}
    entry.update({k: node.get(k) for k in _DP_AUDIT_KEEP if k in node and _scalar(node.get(k))})
    entry["_consistent_with_accountant"] = node.get("consistent_with_accountant")  # read by settle_audit, then dropped
    return entry


_RECONSTRUCTION_KEEP = ("update", "visible", "mse", "relative_mse", "cosine", "cosine_centered", "noise_multiplier",
                        "max_grad_norm", "note", "steps")


def _reconstruction_entry(node: dict, label: str, ctx: dict) -> dict:
    row = {k: v for k, v in node.items() if _scalar(v) and not isinstance(v, float) or isinstance(v, float) and math.isfinite(v)}
    row = {k: v for k, v in row.items() if k in _RECONSTRUCTION_KEEP}
    return {"path": label, "hospital": ctx.get("hospital"), "task": ctx.get("task"), **row}


def _schema_findings(parsed: AuditJson, data, clients: list[str], status: str) -> list[Finding]:
    """What does not follow audit.json's schema, one finding each. A left-out DP-consistency row that says
    ``inconsistent`` (or inconsistent_with_accountant) is a fail (``status="fail"``): a malformed row cannot clear a
    DP bug it reports; every other problem needs attention (``status="attention"``): evidence is missing."""
    out = []
    for p in parsed.problems:
        row = data[p.part][p.index] if p.index is not None else None
        row = row if isinstance(row, dict) else {}
        claims_bug = p.refused and p.part in CONSISTENCY_PARTS and (
            row.get("status") == "inconsistent" or row.get("consistent_with_accountant") is False)
        if claims_bug != (status == "fail"):
            continue
        hospital = _row_context(row, clients).get("hospital")
        what = ("the row says the training is inconsistent with its accounting (a DP bug), and is left out"
                if claims_bug else "the row is left out of this report" if p.refused and p.index is not None
                else "that field is ignored" if p.index is not None else "")
        out.append(Finding(status, f"{p.message}" + (f": {what}" if what else ""), hospital,
                           "an audit row reporting a DP bug does not follow the audit schema" if claims_bug
                           else "audit.json does not follow the audit schema"))
    return out


def _low_fpr_note(mia: list[dict]) -> str | None:
    unmeasured = [m for m in mia if m["tpr_at_fpr"].get("0.001") is None]
    if mia and len(unmeasured) == len(mia):
        return ("TPR at FPR 1e-3 was not measurable in any MIA result (fewer than 1000 non-members); "
                "the rule cannot be checked")
    if unmeasured:
        return f"{len(unmeasured)} of {len(mia)} MIA results could not measure TPR at FPR 1e-3"
    return None


def _low_fpr_findings(mia: list[dict]) -> list[Finding]:
    """``mia_low_fpr`` from an interval, not a point estimate: attention when the 95% lower end of an attack's TPR at
    FPR 1e-3 (``tpr_lower_bound``) is above 2e-3. An attack below chance is an audit fault, not a signal: not counted."""
    findings = []
    for m in mia:
        t = m["tpr_at_fpr"].get(LOW_FPR)
        lo = tpr_lower_bound(m)
        if t is None or lo is None or lo <= LOW_FPR_LIMIT or mia_status(m) == MIA_BELOW_CHANCE:
            continue
        who = f"{m['hospital']}: " if m["hospital"] else ""
        findings.append(Finding(
            "attention", f"{who}{m['attack']} on {m['target']}{' / ' + m['task'] if m['task'] else ''}: TPR {t:.4g} at FPR "
            f"1e-3, 95% lower bound {lo:.3g} (> 2 x FPR)", m["hospital"], "an MIA exceeds TPR 2e-3 at FPR 1e-3"))
    return findings


def _num_or_none(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _mia_significance(node: dict, ci) -> dict:
    """The audit's significance fields of one MIA row (absent in old audit.json files: None)."""
    ci = node.get("auc_ci") if isinstance(node.get("auc_ci"), (list, tuple)) else ci
    measurable = node.get("tpr_measurable")
    return {
        "threat_model": node.get("threat_model") if isinstance(node.get("threat_model"), str) else None,
        "n_pairs": node.get("n_pairs") if isinstance(node.get("n_pairs"), int) else None,
        "min_measurable_fpr": _num_or_none(node.get("min_measurable_fpr")),
        "tpr_measurable": {f"{_fpr_value(k):g}": bool(v) for k, v in measurable.items() if _fpr_value(k) is not None}
        if isinstance(measurable, dict) else None,
        "p_value": _num_or_none(node.get("p_value")),
        "p_adjusted": _num_or_none(node.get("p_adjusted")),
        "significant": node.get("significant") if isinstance(node.get("significant"), bool) else None,
        "auc_ci": [float(x) for x in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
    }


def _consistency_entry(node: dict, label: str, where: list[str], ctx: dict) -> dict:
    """A DP-consistency audit (canary replay, white-box gradient canaries, per-step mechanism) with its verdict."""
    kind = where[0] if where and where[0] in CONSISTENCY_PARTS else "dp_audit"
    lbs = [_num_or_none(node.get(k)) for k in ("eps_lb", "eps_lb_one_run")]
    return {
        "path": label, "kind": kind, "hospital": ctx.get("hospital"), "task": ctx.get("task"),
        "threat_model": node.get("threat_model") if isinstance(node.get("threat_model"), str) else None,
        "status": node["status"],
        "reasons": [str(r) for r in node.get("reasons", []) if isinstance(r, str)] if isinstance(node.get("reasons"), list) else [],
        "eps_lb": max((x for x in lbs if x is not None), default=None),
        "lower_bound_method": node.get("eps_lb_one_run_method") if isinstance(node.get("eps_lb_one_run_method"), str) else None,
        "max_certifiable_epsilon": _num_or_none(node.get("max_certifiable_epsilon")),
        "accountant_epsilon": _num_or_none(node.get("accountant_epsilon")),
        # the claim the lower bound is checked against: the white-box audit checks the steps it replayed
        "claim_checked": _num_or_none(node.get("accountant_epsilon_audited_steps", node.get("accountant_epsilon"))),
        "claim_checked_of": CLAIM_CHECKED_OF[kind],
        "ratio": _num_or_none(node.get("ratio")),
        "mu_estimate": _num_or_none(node.get("gdp_mu_estimate", node.get("mu_estimate"))),
        "mu_interval": [float(x) for x in node.get("gdp_mu_interval", node.get("mu_interval"))]
        if isinstance(node.get("gdp_mu_interval", node.get("mu_interval")), list)
        and len(node.get("gdp_mu_interval", node.get("mu_interval"))) == 2 else None,
    }


KIND_WORDS = {"dp_audit": "black-box canary audit", "whitebox": "white-box gradient-canary audit",
              "mechanism": "per-step mechanism audit", "runlevel": "run-level audit (the run re-executed)"}
#: what each kind of DP-consistency audit checks its lower bound against (``claim_checked``)
CLAIM_CHECKED_OF = {
    "dp_audit": "the federation's own whole-run epsilon from the hospital's ledger (the replay retrains the federation's "
                "training only; the single-hospital baseline's spend is not part of this claim)",
    "whitebox": "the epsilon of the DP-SGD steps the audit replayed",
    "mechanism": "the configured Gaussian-DP mu of one DP-SGD step",
    "runlevel": "the accountant's assumptions over the whole run (fresh, independent noise of scale sigma x C at every "
                "step, independent Poisson samples, every step in the ledger) and, for its canaries' lower bound, the "
                "hospital's whole-run epsilon from its ledgers (federation and baseline composed)",
}
#: a membership-inference row's one status (``mia[].status``), read by every section
MIA_SIGNAL, MIA_NO_SIGNAL, MIA_BELOW_CHANCE = "signal above chance", "no signal shown", "below chance (audit fault)"
#: the false-positive rate mia_low_fpr reads, its limit (2 x FPR) and the confidence of the TPR interval
LOW_FPR, LOW_FPR_LIMIT, LOW_FPR_CONFIDENCE = "0.001", 2e-3, 0.95


def _lb(a: dict) -> float | None:
    vals = [_num_or_none(a.get(k)) for k in ("eps_lb", "eps_lb_one_run")]
    return max((x for x in vals if x is not None), default=None)


def mia_interval(m: dict) -> list[float] | None:
    """The AUC interval a row is judged by: the audit's pair-level ``auc_ci`` when it has one, else ``auc_ci95``."""
    return m.get("auc_ci") or m.get("auc_ci95")


def mia_status(m: dict) -> str:
    """One status per membership-inference row (the rule ``measured_leakage`` states): a signal above chance when the
    audit's test says so with the AUC above 0.5 (Holm-adjusted p < 0.05) or the AUC interval lies wholly above 0.5;
    below chance (an audit fault, not a membership signal) when the interval lies wholly below 0.5."""
    ci = mia_interval(m)
    if ci is not None and ci[1] < 0.5:
        return MIA_BELOW_CHANCE
    if (ci is not None and ci[0] > 0.5) or (m.get("significant") is True and m["auc"] > 0.5):
        return MIA_SIGNAL
    return MIA_NO_SIGNAL


def tpr_lower_bound(m: dict, fpr: str = LOW_FPR) -> float | None:
    """The 95% lower end of the TPR at ``fpr``: the audit's own Clopper-Pearson interval (``tpr_ci``) when it has
    one, else Clopper-Pearson (one-sided) on the row's hits among its members."""
    t = m["tpr_at_fpr"].get(fpr)
    if t is None:
        return None
    ci = (m.get("tpr_ci") or {}).get(fpr)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return float(ci[0])
    n = m.get("n_members")
    if not isinstance(n, int) or n <= 0:
        return None
    from scipy.stats import beta

    hits = round(t * n)
    return 0.0 if hits == 0 else float(beta.ppf(1 - LOW_FPR_CONFIDENCE, hits, n - hits + 1))


def settle_audit(audit: dict, hospitals: dict[str, HospitalFacts]) -> None:
    """One status per audit row, set here and nowhere else; every section (checks, tables, first page, partner view)
    reads it. A DP-consistency row is ``inconsistent`` when the audit says so, says it is not consistent with the
    accountant, or its lower bound exceeds the claim it was checked against; its black-box and table entries (the same
    row of audit.json) carry the same status. ``underpowered``: inconclusive because the claim is above the largest
    epsilon the audit could certify."""
    by_path = {e["path"]: e for e in audit["consistency"]}
    for a in audit["dp_audit"]:
        lb = _lb(a)
        acc, source = a.get("eps_accountant"), "the audit's accountant epsilon"
        if not isinstance(acc, (int, float)) and a.get("hospital") in hospitals:
            acc, source = (hospitals[a["hospital"]].accounting or {}).get("epsilon_spent"), "the hospital's spent epsilon"
        c = by_path.get(a["path"])
        over = a.pop("_consistent_with_accountant", None) is False or (
            lb is not None and isinstance(acc, (int, float)) and lb > acc * (1 + 1e-9))
        if over:
            a["status"] = "inconsistent"
            a["inconsistency"] = (f"empirical epsilon lower bound {lb:.4g} exceeds {source} "
                                  f"{acc if acc is None else format(acc, '.4g')}")
            if c is not None:
                c["status"] = "inconsistent"
        else:
            a["status"] = c["status"] if c is not None else "consistent"
    for e in audit["consistency"]:
        cert, claim = e["max_certifiable_epsilon"], e["claim_checked"]
        e["underpowered"] = bool(e["status"] == "inconclusive" and cert is not None and claim is not None and claim > cert)
    for a in audit["dp_audit"]:
        c = by_path.get(a["path"])
        a["underpowered"] = bool(c and c["underpowered"])
        a["claim_checked_of"] = CLAIM_CHECKED_OF["dp_audit"]
    for m in audit["mia"]:
        m["status"] = mia_status(m)
        m["tpr_lower_at_low_fpr"] = tpr_lower_bound(m)


def _decided_by(audit: dict, e: dict) -> dict | None:
    """An audit that decided (consistent) what an underpowered black-box canary audit cannot, and so carries the
    decision: the white-box audit of the same hospital and task, or the hospital's run-level audit, whose canaries
    join every step of every task and the baseline and could certify more than its whole-run claim."""
    def decides(w: dict) -> bool:
        if w["status"] != "consistent" or w["hospital"] != e["hospital"]:
            return False
        if w["kind"] == "whitebox":
            return w["task"] == e["task"]
        cert, claim = w["max_certifiable_epsilon"], w["claim_checked"]
        return w["kind"] == "runlevel" and cert is not None and claim is not None and cert >= claim

    return next((w for w in audit["consistency"] if w["kind"] == "whitebox" and decides(w)),
                next((w for w in audit["consistency"] if decides(w)), None))


def consistency_findings(audit: dict, hospitals: dict[str, HospitalFacts] | None = None) -> list[Finding]:
    """From each row's settled status: ``inconsistent`` is evidence of a DP bug (fail, naming the case);
    ``inconclusive`` cannot decide, and holds the decision unless it is underpowered and an audit of the same
    training that could decide did (``_decided_by``) (then it is said, as such, under a pass). Rows of an older audit.json without a verdict are
    judged by their lower bound against the accountant (``settle_audit``)."""
    out = []
    hospitals = hospitals or {}
    paths = {e["path"] for e in audit["consistency"]}
    for a in audit["dp_audit"]:
        if a["path"] not in paths and a["status"] == "inconsistent":
            who = f"{a['hospital']}: " if a.get("hospital") else ""
            out.append(Finding("fail", f"{who}audit {a['path']}: {a['inconsistency']}: the training leaks more than its "
                               "accounting claims (a DP bug)", a.get("hospital"),
                               "an audit lower bound exceeds the accountant's epsilon"))
    for e in audit["consistency"]:
        who = f"{e['hospital']}: " if e["hospital"] else ""
        case = f"{who}{KIND_WORDS[e['kind']]}{' on ' + e['task'] if e['task'] else ''} ({e['path']})"
        why = "; ".join(e["reasons"]) or "no reason given"
        if e["status"] == "inconsistent":
            extra = next((a["inconsistency"] for a in audit["dp_audit"] if a["path"] == e["path"] and a.get("inconsistency")), None)
            out.append(Finding("fail", f"{case} is inconsistent with the accountant: {why}" + (f"; {extra}" if extra else ""),
                               e["hospital"], "an audit found the training inconsistent with its accounting (a DP bug)"))
        elif e["status"] == "inconclusive":
            cert = e["max_certifiable_epsilon"]
            h = hospitals.get(e["hospital"])
            total = ((h.accounting or {}).get("epsilon_total") if h else None)
            claim = e["claim_checked"]
            named = (f" (the claim checked, {claim:.3g}, is {CLAIM_CHECKED_OF[e['kind']]}"
                     + (f"; the hospital's composed epsilon is {total:.4g}" if total is not None and e["kind"] == "dp_audit"
                        and claim is not None and abs(total - claim) > 1e-9 else "") + ")") if claim is not None else ""
            cap = f" (the largest epsilon it can certify is {cert:.3g})" if cert is not None else ""
            decided = _decided_by(audit, e) if e["underpowered"] else None
            if decided is not None:
                by = (f"white-box audit of the same training ({decided['path']})" if decided["kind"] == "whitebox" else
                      f"run-level audit of the whole run, this task included ({decided['path']}; its canaries can "
                      f"certify up to {decided['max_certifiable_epsilon']:.3g}, above its claim "
                      f"{decided['claim_checked']:.3g})")
                out.append(Finding("pass", f"{case} is underpowered: it cannot decide at this budget{cap}{named}; the "
                                   f"{by} decided consistent and carries the decision", e["hospital"],
                                   "an underpowered audit could not decide; an audit of the same training that could, did"))
            else:
                out.append(Finding("inconclusive", f"{case} is inconclusive"
                                   + (" (underpowered: it cannot decide at this budget)" if e["underpowered"] else "")
                                   + f": {why}{cap}{named}", e["hospital"], "an audit could not decide"))
    return out


def leakage_findings(audit: dict, auc_fail: float) -> list[Finding]:
    """Measured membership leakage, from each row's status (``mia_status``): a signal above chance needs attention,
    and fails when the interval's lower bound reaches ``auc_fail`` (config report.mia_auc_fail)."""
    out = []
    for m in audit["mia"]:
        if m["status"] != MIA_SIGNAL:
            continue
        ci = mia_interval(m)
        status = "fail" if ci is not None and ci[0] >= auc_fail else "attention"
        who = f"{m['hospital']}: " if m["hospital"] else ""
        interval = f" (95% interval {ci[0]:.3g} to {ci[1]:.3g})" if ci else ""
        p = f", Holm-adjusted p {m['p_adjusted']:.2g}" if m.get("p_adjusted") is not None else ""
        out.append(Finding(status, f"{who}{m['attack']} attack on {m['target']}{' / ' + m['task'] if m['task'] else ''}: "
                           f"AUC {m['auc']:.3g}{interval}{p}: membership is measurably detectable"
                           + (f" (lower bound at or above {auc_fail:g})" if status == "fail" else ""),
                           m["hospital"], "an attack measured significant membership leakage"))
    return out


def below_chance_findings(audit: dict) -> list[Finding]:
    """An attack whose AUC interval lies wholly below 0.5 is an audit fault, never a membership signal: its scores are
    on the wrong side of chance (leakage measured with the wrong sign: the audit under-reports), or its interval is
    narrower than the attack's own variability (the auditor game's intervals were, before #30: they resampled the
    game's (model, record) pairs as independent), or, about 1 time in 40, a 95% interval misses 0.5 by chance."""
    out = []
    for m in audit["mia"]:
        if m["status"] != MIA_BELOW_CHANCE:
            continue
        ci = mia_interval(m)
        who = f"{m['hospital']}: " if m["hospital"] else ""
        out.append(Finding("attention", f"{who}{m['attack']} attack on {m['target']}{' / ' + m['task'] if m['task'] else ''}: "
                           f"AUC {m['auc']:.3g} (95% interval {ci[0]:.3g} to {ci[1]:.3g}) lies below chance: an audit "
                           "fault (inverted scores, or an interval too narrow for the attack's variability), not a "
                           "membership signal; this attack may under-report",
                           m["hospital"], "an attack scored below chance (an audit fault)"))
    return out


def lower_bound_findings(audit: dict, threshold: float) -> list[Finding]:
    out = []
    rows = [(a, _lb(a)) for a in audit["dp_audit"]]
    rows += [(e, e["eps_lb"]) for e in audit["consistency"] if e["kind"] != "dp_audit"]
    for a, lb in rows:
        if lb is not None and lb > threshold:
            who = f"{a['hospital']}: " if a.get("hospital") else ""
            out.append(Finding("attention", f"{who}audit {a['path']}: empirical epsilon lower bound {lb:.3g} is above the "
                               f"configured threshold {threshold:g} (report.eps_lower_bound_attention): the training "
                               f"measurably leaks", a.get("hospital"), "an audit's epsilon lower bound is above the threshold"))
    return out


def worst_leakage(mia: list[dict]) -> dict | None:
    """The worst measured leakage, computed here once for the report (``audit.worst_leakage``) and read by the first
    page and the summary: among rows that are not audit faults, the highest AUC interval lower bound (its AUC without
    an interval), then the highest AUC."""
    rows = [m for m in mia if m["status"] != MIA_BELOW_CHANCE]
    if not rows:
        return None
    m = max(rows, key=lambda m: ((mia_interval(m) or [m["auc"]])[0], m["auc"]))
    where = " / ".join(str(x) for x in (m.get("hospital"), m.get("target"), m.get("task")) if x)
    return {"path": m["path"], "attack": m["attack"], "where": where, "auc": m["auc"], "auc_ci": mia_interval(m),
            "status": m["status"], "threat_model": m.get("threat_model"),
            "rule": "the highest AUC interval lower bound among rows that are not audit faults (below chance)"}
