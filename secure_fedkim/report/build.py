"""``build_report``: the content of ``report.json`` (REPORTING.md §2.2) and its status rules (§2.3).

Status rules, deterministic (each check has a name, a status and a reason; the overall status is the worst, with
``not_applicable`` < ``pass`` < ``inconclusive`` < ``attention`` < ``fail``). A check with nothing behind it is
``not_applicable``, never ``pass``; the decision on the first page is ``do not release`` for fail, ``release with
conditions`` for attention or inconclusive, ``release`` when everything with evidence behind it passed.

fail
  * every DP-dependent check (``DP_DEPENDENT``) when no hospital trained with DP, and ``differential_privacy``
    when any hospital trained without it (its records carry no guarantee).
  * ``budget_respected``: a hospital's recomputed spend, composed with every other released DP spend on its
    records (the single-hospital baseline), exceeds its budget (or a ledger entry says over_budget).
  * ``baseline_spend_composed``: a baseline's test metrics are released but its ledger is missing or broken.
  * ``ledger_verified``: a privacy ledger (or the key holder's) does not verify, or a DP hospital has none.
  * ``delta_below_1_over_n``: delta >= 1/n for a hospital's n records.
  * ``audit_consistent_with_accountant``: an audit's empirical epsilon lower bound exceeds the accountant's
    epsilon, or an audit entry has status ``inconsistent`` (named with its reasons), or says so in a row that does
    not follow audit.json's schema (a malformed row cannot clear the DP bug it reports).
  * ``measured_leakage``: an MIA with a signal above chance (Holm-adjusted p < 0.05 with AUC above 0.5, or an AUC
    interval wholly above 0.5: ``mia_status``) whose AUC lower bound reaches ``report.mia_auc_fail`` (default 0.65).
  * ``noise_randomness``: a DP session (federation or baseline) whose dp_round entry records randomness other than
    "secure" (a reproducible generator is not fit for release).
  * ``noise_fresh``: two DP sessions of the run share a noise_fingerprint or a non-null sampling_fingerprint.
  * ``server_secret_key``: the run shows the aggregating server held the CKKS secret key, or an aggregate was
    used without a key-holder decryption on record, or fewer than min_clients contributions were decrypted.
  * ``dp_label_has_accountant``: a hospital is labelled DP (config or ledger) without a dp_plan naming an
    accountant, a delta and a non-zero noise multiplier, or the accountant cannot compute its epsilon.
  * ``epsilon_recomputed``: a recorded epsilon (ledger, baseline ledger, metrics) differs from the recomputation,
    or the ledger records fewer steps than the optimizer or the metrics.
  * ``config_hash``: config.yaml no longer hashes to the run's recorded config_sha256.
attention
  * ``measured_leakage``: a significant MIA below the fail threshold.
  * ``dp_lower_bound``: an audit's epsilon lower bound above ``report.eps_lower_bound_attention`` (default 1.0).
  * ``epsilon_tier``: epsilon spent (composed) or budget > 10.
  * ``sampling_assumption``: the accountant assumes Poisson sampling and the ledger does not record it as used.
  * ``privacy_unit``: record-level unit while a patient has several records, or records per patient unknown.
  * ``mia_low_fpr``: the 95% Clopper-Pearson lower bound of an MIA's TPR at FPR 1e-3 exceeds 2 x 1e-3 (an attack
    below chance is not counted).
  * ``mia_below_chance``: an MIA whose AUC interval lies wholly below 0.5: an audit fault, not a membership signal.
  * ``noise_randomness`` / ``noise_fresh``: a DP session records no randomness source / no noise fingerprint (a run
    written before they were recorded).
  * ``secagg_dropout_margin``: a SecAgg+ round lost at least as many hospitals as it tolerates.
  * ``audit_run``: no audit/audit.json; or a part of it does not follow its schema (``secure_fedkim.audit_schema``:
    an unknown schema id, a row lacking a required field or with a field of the wrong type), each named by part,
    row and field: such a row is left out, the rest of the audit is read.
  * ``secure_aggregation``: plain aggregation (the server sees every update).
  * ``independent_accountant_agreement``: dp_accounting's epsilon is more than 5% above the accountant's.
  * ``he_parameters``: CKKS parameters not shown to meet 128-bit security.
  * ``server_secret_key`` (attention only): he mode without a key-holder ledger to show the key's custody.
inconclusive
  * ``audit_consistent_with_accountant``: an audit entry with status ``inconclusive`` (with the largest epsilon
    it can certify) and no failing one; an underpowered black-box canary audit (its claim above what it can certify)
    does not hold the decision when the white-box audit of the same hospital and task, or the hospital's run-level
    audit (whose canaries could certify more than its whole-run claim), decided consistent.

Every derived figure comes from one place (``collect.derive``: remaining budget and patient level from the composed
spend; ``settle_audit``: one status per audit row; ``worst_leakage``), and ``verify`` recomputes each by its own code
path (``recompute``).

Partner reports show the other hospitals only as a count and coarse bands (ranges widened to whole steps), and
nothing when there are fewer than ``report.min_other_hospitals`` (default 3): a min, median or max over a few
hospitals is one of them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import uuid
from pathlib import Path
from typing import Any

from secure_fedkim.audit_schema import (
    PARTNER_VIEWS, RECORD_ID_FIELDS, REPORT_READERS, ROW_TYPES, AuditJson, read_audit_json,
)
from secure_fedkim.run_dir import RunDir

from . import text
from .aggregation import aggregation_facts
from .collect import (
    Finding,
    HospitalFacts,
    RunFacts,
    collect_hospital,
    digest_of,
    load_run_facts,
    dp_sessions,
    randomness_findings,
    read_ledger,
    sha256_file,
    suppress,
    _version,
)

SCHEMA_VERSION = "2.1.0"
STATUSES = ("pass", "inconclusive", "attention", "fail", "not_applicable")
# inconclusive ranks above pass: a report with an undecided audit is never "pass" overall
_RANK = {"not_applicable": -1, "pass": 0, "inconclusive": 1, "attention": 2, "fail": 3}
#: default of the config key report.min_other_hospitals: a partner report shows no figure about fewer others
MIN_OTHERS_FOR_STATS = 3
AUDIT_CONSISTENCY = ("consistent", "inconsistent", "inconclusive")

# name, report section, reason when nothing was found
CHECKS: list[tuple[str, str, str]] = [
    ("differential_privacy", "privacy_definition", "every hospital trained with DP-SGD"),
    ("dp_label_has_accountant", "accounting", "every DP label has a dp_plan with an accountant, delta and noise"),
    ("ledger_verified", "provenance", "every privacy ledger verifies (hash chain intact)"),
    ("epsilon_recomputed", "accounting", "every recorded epsilon and step count equals its recomputation from the ledger"),
    ("budget_respected", "budget", "no hospital spent more than its budget"),
    ("delta_below_1_over_n", "accounting", "delta < 1/n at every hospital"),
    ("epsilon_tier", "accounting", "epsilon <= 10 at every hospital"),
    ("sampling_assumption", "accounting", "Poisson sampling assumed and used (recorded in every ledger entry)"),
    ("privacy_unit", "privacy_definition", "one record per patient: the record-level guarantee is patient-level"),
    ("independent_accountant_agreement", "accounting", "the independent recomputation is within 5% of the accountant"),
    ("server_secret_key", "aggregation", "the aggregating server never held the secret key"),
    ("secure_aggregation", "aggregation", "updates reached the server encrypted or masked"),
    ("he_parameters", "aggregation", "CKKS parameters meet 128-bit security (HE standard)"),
    ("secagg_dropout_margin", "aggregation", "SecAgg+ dropouts stayed below the tolerated number"),
    ("audit_run", "audit", "a leakage audit was run"),
    ("audit_consistent_with_accountant", "audit", "every empirical epsilon lower bound is at most the accountant's epsilon"),
    ("mia_low_fpr", "audit", "no MIA's TPR at FPR 1e-3 is shown above 2 x 1e-3 (the 95% Clopper-Pearson lower bound "
     "of its TPR is at most 2e-3)"),
    ("measured_leakage", "audit", "no membership-inference result shows leakage above chance (neither a Holm-adjusted "
     "p < 0.05 with AUC above 0.5 nor an AUC interval wholly above 0.5)"),
    ("mia_below_chance", "audit", "no membership-inference result scores reliably below chance (an AUC interval wholly "
     "below 0.5 is an audit fault)"),
    ("dp_lower_bound", "audit", "every empirical epsilon lower bound is at most the configured threshold"),
    ("baseline_spend_composed", "accounting", "every released DP spend on a hospital's records is composed into its epsilon"),
    ("noise_randomness", "privacy_definition", "every DP session's noise and sampling were drawn by the secure generator "
     "(recorded in each dp_round entry)"),
    ("noise_fresh", "privacy_definition", "no two DP sessions of this run (hospitals, rounds, tasks, federation and "
     "baseline) share a noise or a Poisson-sample fingerprint"),
    ("config_hash", "provenance", "config.yaml hashes to the run's recorded config_sha256"),
]
DP_ONLY = {"epsilon_recomputed", "budget_respected", "delta_below_1_over_n", "epsilon_tier", "sampling_assumption",
           "privacy_unit", "independent_accountant_agreement", "noise_randomness", "noise_fresh"}
#: a run without DP fails these: there is no guarantee for them to hold
DP_DEPENDENT = DP_ONLY | {"differential_privacy", "dp_label_has_accountant", "audit_consistent_with_accountant",
                          "baseline_spend_composed"}
NO_DP_REASON = "no differential privacy in this run: no hospital's records carry a DP guarantee, so this cannot hold"


def worst(statuses) -> str:
    statuses = [s for s in statuses if s != "not_applicable"]
    if not statuses:
        return "not_applicable"
    return max(statuses, key=_RANK.__getitem__)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------ audit
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

    hits = int(round(t * n))
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
    run = load_run_facts(run_dir)
    hospitals = {c: collect_hospital(run, c) for c in run.clients}
    tasks = list((run.summary.get("tasks") or {}).keys()) or list(run.inventory.get("tasks", {}))
    audit, audit_f = read_audit(run_dir, run.clients, tasks)
    text.qualify_reconstruction_notes(audit, run.cfg)  # in the threat model's terms, never contradicting it
    agg, agg_f = aggregation_facts(run)
    run_ids = [h.run_id for h in hospitals.values() if h.run_id]
    run.run_id = run_ids[0] if run_ids else (Path(str(run.summary.get("run_dir", ""))).name or run_dir.name)
    findings: dict[str, list[Finding]] = {name: [] for name, _, _ in CHECKS}
    for h in hospitals.values():
        for k, v in h.findings.items():
            findings[k].extend(v)
    for k, v in agg_f.items():
        findings[k].extend(v)
    for k, v in audit_f.items():
        findings[k].extend(v)
    settle_audit(audit, hospitals)
    findings["audit_consistent_with_accountant"].extend(consistency_findings(audit, hospitals))
    thresholds = run.cfg.report
    findings["measured_leakage"].extend(leakage_findings(audit, thresholds.mia_auc_fail))
    findings["mia_below_chance"].extend(below_chance_findings(audit))
    for k, v in randomness_findings([hospitals[c] for c in run.clients]).items():
        findings[k].extend(v)
    findings["dp_lower_bound"].extend(lower_bound_findings(audit, thresholds.eps_lower_bound_attention))
    dp_hosp = [h for h in hospitals.values() if h.dp]
    if not dp_hosp:
        findings["differential_privacy"].append(Finding("fail", "no differential privacy: no hospital trained with DP-SGD, "
                                                        "so the released models carry no formal privacy guarantee and no "
                                                        "epsilon is claimed", None, "no differential privacy"))
    for h in hospitals.values():
        if not h.dp and dp_hosp:
            findings["differential_privacy"].append(Finding("fail", f"{h.name} trained without differential privacy: "
                                                            "its records carry no guarantee", h.name,
                                                            "a hospital trained without DP"))
    config_file = run.files.config_yaml
    config, summary = config_file.name, run.files.summary.name
    recorded = run.summary.get("config_sha256")
    config_sha = sha256_file(config_file) if config_file.is_file() else None
    if config_sha is None:
        findings["config_hash"].append(Finding("fail", f"{config} is missing from the run directory", None, f"{config} missing"))
    elif recorded and config_sha != recorded:
        findings["config_hash"].append(Finding("fail", f"{config} hashes to {config_sha}, {summary} recorded {recorded}: "
                                               "the config was changed after the run", None, f"{config} changed after the run"))
    return {"run": run, "hospitals": hospitals, "audit": audit, "aggregation": agg, "findings": findings,
            "config_sha256": config_sha, "any_dp": bool(dp_hosp)}


def _check_rows(f: dict, partner: str | None) -> list[dict]:
    rows = []
    any_dp = f["any_dp"]
    from secure_fedkim.federation.transports import TRANSPORTS

    transport = TRANSPORTS[f["run"].cfg.federation.aggregation]
    transport_only = {c for t in TRANSPORTS.values() for c in t.report_checks}
    no_ledger = (not any(h.ledger_exists for h in f["hospitals"].values())
                 and not ((f["aggregation"].get("ckks") or {}).get("key_holder_ledger") or {}).get("exists"))
    for name, section, ok in CHECKS:
        found = f["findings"][name]
        if not any_dp and name in DP_DEPENDENT:
            reason = _reason(found, partner) if found else NO_DP_REASON
            rows.append({"name": name, "status": "fail", "reason": reason, "section": section})
            continue
        na = (
            (not any_dp and (name in DP_ONLY or name == "dp_label_has_accountant"))
            or (name in transport_only and name not in transport.report_checks)
            or (name == "audit_consistent_with_accountant" and not f["audit"]["dp_audit"] and not f["audit"]["consistency"])
            or (name == "ledger_verified" and no_ledger)
            or (name in ("measured_leakage", "mia_below_chance") and not f["audit"]["mia"])
            or (name == "dp_lower_bound" and not f["audit"]["dp_audit"]
                and not any(e["eps_lb"] is not None for e in f["audit"]["consistency"]))
            or (name == "baseline_spend_composed")
            or (name == "mia_low_fpr" and (not f["audit"]["mia"]
                                           or all(m["tpr_at_fpr"].get("0.001") is None for m in f["audit"]["mia"])))
        )
        if not found:
            status = "not_applicable" if na else "pass"
            reason = {
                "not_applicable": {
                    "he_parameters": "not he mode", "secagg_dropout_margin": "not secagg mode",
                    "server_secret_key": "plain mode has no secret key (see secure_aggregation)",
                    "audit_consistent_with_accountant": "no canary DP audit in audit.json" if f["audit"]["run"] else "audit not run",
                    "mia_low_fpr": (f["audit"].get("low_fpr_note") or "no MIA result in audit.json") if f["audit"]["run"]
                    else "audit not run",
                    "measured_leakage": "no MIA result in audit.json" if f["audit"]["run"] else "audit not run",
                    "mia_below_chance": "no MIA result in audit.json" if f["audit"]["run"] else "audit not run",
                    "dp_lower_bound": "no epsilon lower bound in audit.json" if f["audit"]["run"] else "audit not run",
                    "ledger_verified": "no privacy ledger in this run",
                    "baseline_spend_composed": "no single-hospital baseline's DP spend in this run: the federation's "
                                               "spend is the only one on each hospital's records",
                }.get(name, "no differential privacy in this run"),
                "pass": ok + (f" ({f['audit']['low_fpr_note']})" if name == "mia_low_fpr" and f["audit"].get("low_fpr_note") else ""),
            }[status]
        else:
            status = worst(x.status for x in found)
            reason = _reason(found, partner)
        rows.append({"name": name, "status": status, "reason": reason, "section": section})
    return rows


def _reason(found: list[Finding], partner: str | None) -> str:
    parts, anon = [], {}
    for x in found:
        if partner is None or (x.hospital in (None, partner) and all(o == partner for o in x.also)):
            parts.append(x.message)
        else:
            key = (x.anonymous, x.status)
            anon.setdefault(key, set()).add(x.hospital)
    for (msg, _), hs in anon.items():
        parts.append(f"{msg} ({len(hs)} other hospital{'s' if len(hs) > 1 else ''})")
    return "; ".join(dict.fromkeys(parts))


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
