"""The audit as the terminal shows it after `secure-fedkim audit`: the per-target summary and one table row per
MIA target and canary replay, with the notes a reader needs (reads audit.json files of earlier releases too)."""

from __future__ import annotations

import math
from collections.abc import Callable

from attacks.audit_config import SIGNIFICANCE
from attacks.metrics import fpr_key

__all__ = ["TABLE_LINES", "format_audit_table", "format_summary"]

#: registered audit kinds' terminal lines (``AuditKind.table_lines``; ``attacks.audit.register_audit_kind``), by
#: kind name: ``table_lines(audit) -> list[str]``, printed after the built-in kinds' lines in registration order
TABLE_LINES: dict[str, Callable[[dict], list[str]]] = {}

def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tpr_cell(entry: dict, fpr: float) -> str:
    key = fpr_key(fpr)
    v = entry.get("tpr_at_fpr", {}).get(key)
    if v is not None:
        return f"{v:.3f}"
    if key in entry.get("tpr_at_fpr_note", {}):
        return f"n/a (<{math.ceil(1 / fpr - 1e-9)} non-m.)"
    return "-"


def _acc_cell(acc: dict | None) -> str:
    if acc is None:
        return "n/a (non-private)"
    if "error" in acc:
        return "ledger does not verify"
    return "inf (no noise)" if acc.get("epsilon") is None else f"{acc['epsilon']:.3f}"


def _auc_cell(e: dict) -> str:
    ci = e.get("auc_ci") or e.get("auc_ci95")
    cell = _fmt(e["auc"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    return cell + (" *" if e.get("significant") else "")


def _target_cell(e: dict) -> str:
    kind = e.get("target_kind")
    if kind == "local":
        return f"{e['target']} (local)"
    if kind == "game":
        return f"{e['target']} (game)"
    return e["target"]


def _canary_lb_cell(d: dict) -> str:
    lb = max(d["eps_lb"], d.get("eps_lb_one_run") or 0.0)
    status = d.get("status")
    if status is None:  # an audit.json from before statuses
        return f"{lb:.3f}" + ("  DP BUG" if d.get("consistent_with_accountant") is False else "")
    if status == "inconsistent":
        return f"{lb:.3f}  DP BUG (inconsistent)"
    cap = d.get("max_certifiable_epsilon")
    return f"{lb:.3f}  {status}" + (f" (max {cap:.2f})" if cap is not None else "")


def format_summary(audit: dict) -> list[str]:
    """The per-target summary lines (audit.json ``summary``): worst row with its interval, significant rows."""
    rows = audit.get("summary")
    if rows is None:
        return []
    out = ["Summary per target (worst = highest lower end of the AUC's 95% interval; * = significant after Holm)"]
    for r in rows:
        w = r["worst"]
        tpr = w.get("tpr_at_smallest_measurable_fpr")
        tpr_txt = "no TPR measurable" if tpr is None else f"TPR@{tpr['fpr']:g} {tpr['tpr']:.3f}" + (
            f" [{tpr['tpr_ci'][0]:.3f}, {tpr['tpr_ci'][1]:.3f}]" if tpr.get("tpr_ci") else "")
        out.append(
            f"  {r['target']}: worst {w['attack']} on {w['task']}, AUC {w['auc']:.3f} "
            f"[{w['auc_ci'][0]:.3f}, {w['auc_ci'][1]:.3f}] (n={w['n_pairs']}), {tpr_txt}; "
            f"{r['significant_rows']} of {r['rows']} rows significant"
        )
    for d in audit.get("dp_audit", []):
        if d.get("status"):
            unit = f" ({d['epsilon_unit']})" if d.get("epsilon_unit") else ""
            out.append(f"  canary replay {d['hospital']}/{d['task']}{unit}: {d['status']}: {'; '.join(d.get('reasons', []))}")
    return out + [""]


def format_audit_table(audit: dict) -> str:
    """The audit as text: the per-target summary, then the table (rows target x attack; n, AUC with its
    95% interval, TPR@1%, TPR@0.1%, eps lower bound, accountant eps). Reads old audit.json files too."""
    rows = _mia_table_rows(audit) + _canary_table_rows(audit)
    out = [f"Leakage audit of {audit.get('run_dir', '?')}", *format_summary(audit), *_table_lines(rows),
           *_inversion_lines(audit), *_runlevel_lines(audit),
           *[line for lines in TABLE_LINES.values() for line in lines(audit)]]
    return "\n".join(out + [""] + _table_notes(audit, rows))


_TABLE_HEADER = ["target", "task", "attack", "n", "AUC", "TPR@1%", "TPR@0.1%", "eps lower bound", "accountant eps"]


def _mia_accountant_cell(e: dict, accountant: dict) -> str:
    """A local model's (or game's) hospital's spend; for the global model and the FM, the max over hospitals."""
    if e["target_kind"] in ("local", "game"):
        return _acc_cell(accountant.get(e["target"]))
    cells = [accountant.get(h) for h in accountant]
    if not cells or any(a is None for a in cells):
        return "n/a (non-private)"
    if any("error" in a for a in cells):
        return "ledger does not verify"
    eps = [a["epsilon"] for a in cells]
    return "inf (no noise)" if any(x is None for x in eps) else f"max {max(eps):.3f}"


def _mia_table_rows(audit: dict) -> list[list[str]]:
    accountant = audit.get("accountant", {})
    return [[_target_cell(e), e["task"], e["attack"], str(e.get("n_pairs", e["n_members"])), _auc_cell(e),
             _tpr_cell(e, 0.01), _tpr_cell(e, 0.001), "-", _mia_accountant_cell(e, accountant)]
            for e in audit.get("mia", [])]


def _canary_table_rows(audit: dict) -> list[list[str]]:
    rows = []
    for d in audit.get("dp_audit", []):
        per = f" patients x{d['records_per_canary']}" if d.get("canary_unit") == "patient" else ""
        attack = f"canaries ({d['mode'].replace('_', '-')}, {d['canaries']} {d['kind']}{per})"
        if not d["dp"]:
            acc = "n/a (non-private)"
        else:
            acc = "inf (no noise)" if d["eps_accountant"] is None else f"{d['eps_accountant']:.3f} *"
        rows.append([f"{d['hospital']} (training)", d["task"], attack, str(d["canaries"] * d["trials"]),
                     _fmt(d["canary_auc"]), "-", "-", _canary_lb_cell(d), acc])
    return rows


def _table_lines(rows: list[list[str]]) -> list[str]:
    """The header, its rule and the rows, each column as wide as its widest cell."""
    widths = [max(len(str(r[i])) for r in rows + [_TABLE_HEADER]) for i in range(len(_TABLE_HEADER))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(_TABLE_HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _runlevel_lines(audit: dict) -> list[str]:
    """The run-level audit: one line per DP hospital, its first findings when it flags."""
    rows = audit.get("runlevel", [])
    if not rows:
        return []
    out = ["", "Run-level audit (the run re-executed; every DP step's noise and Poisson sample tapped)"]
    for r in rows:
        scale = r.get("noise_scale_ratio")
        out.append(f"  {r['hospital']:<16} {r['status']:<13} {r.get('sessions', 0)} sessions, {r.get('steps_tapped', 0)} "
                   f"steps; noise {'-' if scale is None else format(scale, '.3f')} x sigma*C; max |z| noise "
                   f"{_z(r.get('max_abs_noise_z'))} (threshold {_z(r.get('noise_z_threshold'))}), batches "
                   f"{_z(r.get('max_batch_overlap_z'))} (threshold {_z(r.get('batch_z_threshold'))})")
        if r.get("eps_lb_one_run") is not None:
            out.append(f"    whole-run lower bound on epsilon {r['eps_lb_one_run']:.2f} (Steinke {r['eps_lb_one_run_steinke']:.2f}) "
                       f"from {r['canaries']} canaries over {r['canary_steps']} steps; the ledger's {r['accountant_epsilon']:.2f}; "
                       f"at most {r['max_certifiable_epsilon']:.2f} certifiable")
        if r["status"] != "consistent":
            out += [f"    {reason}" for reason in r["reasons"][:3]]
    return out


def _z(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _inversion_lines(audit: dict) -> list[str]:
    """The update inversions (plain and DP rows), then the transport's row when it has one."""
    recon = [r for r in audit.get("reconstruction", []) if r.get("update") in ("plain", "dp")]
    if not recon:
        return []
    out = ["", "Update inversion (one record's single-record update of the global model; relative MSE 1.0 = prior only)"]
    for r in recon:
        seen = "" if r.get("visible", True) else " (not visible to the aggregator)"
        out.append(
            f"  {r['hospital']}/{r['task']} {r['update']:5s} relative MSE {r['relative_mse']:.3f}  "
            f"centered cosine {r['cosine_centered']:.3f}{seen}"
        )
    for r in audit.get("reconstruction", []):
        if "relative_mse" not in r:  # the transport's row: no single update to invert
            out.append(f"  {r['hospital']}/{r['task']} {r['update']}: {r['note']}")
            break
    return out


def _canary_note(dp_rows: list[dict]) -> str:
    """What the canary rows' accountant epsilon and lower bound are (an audit.json before statuses: the replay's)."""
    new = "status" in dp_rows[0]
    units = sorted({d["epsilon_unit"] for d in dp_rows if d.get("epsilon_unit")})
    return (
        ("* canary rows: the hospital's whole-run epsilon from its ledger; the replay trains the task with "
         "the ledger's steps and sample rate. " if new else
         "* canary rows: the accountant's epsilon for the audit's own replay of that hospital's training "
         "(its noise, clip, sample rate and steps); ")
        + "the lower bound is the larger of the Clopper-Pearson "
        f"and one-run bounds at {dp_rows[0]['confidence']:.0%} confidence"
        + ("; inconclusive (max E): the claim is above the largest epsilon E these canaries can certify." if new else ".")
        + (f" Canary rows' epsilons are {' or '.join(units)}" + (
            "; 'patients xR': each canary is a patient of R records, included or excluded with all of them"
            if "epsilon per patient" in units else "") + "." if units else "")
    )


def _table_notes(audit: dict, rows: list[list[str]]) -> list[str]:
    """The notes under the table: what its columns mean for the rows it has, then what was skipped and why."""
    mia = audit.get("mia", [])
    notes = [_canary_note(audit["dp_audit"])] if audit.get("dp_audit") else []
    notes.append("n: matched member/non-member pairs per MIA row ((model, record) pairs per model in a game row); "
                 "canaries (x trials) per canary row. AUC [95% bootstrap interval].")
    if any(e.get("p_adjusted") is not None for e in mia):
        notes.append(
            f"*: significant after the Holm-Bonferroni correction over all {len(audit['mia'])} MIA rows "
            f"(one-sided Mann-Whitney p-value for AUC > 0.5, adjusted p < {SIGNIFICANCE})."
        )
    if any(e.get("target_kind") == "game" for e in mia):
        notes.append("(game): the auditor's own models trained with the hospital's recipe on random halves of its "
                     "shard, each played as the target against the others (LiRA's experiment).")
    if any(r[5].startswith("n/a") or r[6].startswith("n/a") for r in rows):
        notes.append("n/a (<N non-m.): too few non-members to measure that FPR; the audit says so instead of a number.")
    notes.append("accountant eps of a local model: the hospital's whole-run spend from its ledger; global: the max over hospitals.")
    return notes + [f"skipped {s['what']}: {s['why']}" for s in audit.get("skipped", [])]
