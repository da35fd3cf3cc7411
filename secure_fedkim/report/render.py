"""Writing a report: report.json (schema-validated), report.html (one self-contained file), report.pdf (fpdf2,
pure Python) and report.sig (Ed25519 over the exact JSON bytes).

HTML and PDF are rendered from one list of blocks built from report.json alone (plus the audit's ROC PNGs), so
they hold the same content in the section order of REPORTING.md §2.3. Plots are PNGs drawn with matplotlib's Agg
canvas (pyplot's global state is left alone) from the data series that report.json carries.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from .build import build_report
from .sign import PUBLIC_KEY, SIGNING_DIR, ensure_report_key, fingerprint, sign_bytes
from .text import g

COLORS = {"pass": "#1e7b34", "attention": "#b26a00", "fail": "#b3261e", "not_applicable": "#6b6b6b"}
FILLS = {"pass": (214, 240, 220), "attention": (255, 236, 200), "fail": (248, 215, 212), "not_applicable": (230, 230, 230)}
SECTIONS = [
    ("summary", "1. Summary"),
    ("guarantee", "2. Guarantee statement"),
    ("privacy", "3. Privacy definition and accounting"),
    ("budget", "4. Budget ledger and enforcement"),
    ("aggregation", "5. Aggregation confidentiality"),
    ("threats", "6. Threat model"),
    ("audit", "7. Empirical audits"),
    ("utility", "8. Utility"),
    ("inventory", "9. Data inventory (counts only)"),
    ("provenance", "10. Provenance and integrity"),
    ("regulatory", "11. Regulatory mapping"),
    ("hazards", "12. Hazards and limitations"),
    ("glossary", "13. Glossary and sign-off"),
]


class ReportPaths(NamedTuple):
    json: Path
    html: Path
    pdf: Path
    sig: Path


# ------------------------------------------------------------------------------------------ schema
def load_schema() -> dict:
    """The shipped JSON Schema (package data ``secure_fedkim/report/schema/report.schema.json``)."""
    return json.loads(resources.files("secure_fedkim.report").joinpath("schema/report.schema.json").read_text())


def validate_report(report: dict) -> None:
    """Raise ``jsonschema.ValidationError`` (with the failing path) unless ``report`` fits the schema."""
    import jsonschema

    schema = load_schema()
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(report)


def schema_errors(report: dict) -> list[str]:
    import jsonschema

    v = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
    return [f"{e.json_path}: {e.message}" for e in sorted(v.iter_errors(report), key=lambda e: list(e.path))]


# ------------------------------------------------------------------------------------------ plots
def _figure(w=6.4, h=3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_epsilon(series: dict | None) -> bytes | None:
    """Epsilon over rounds per hospital, budget lines (dotted), planned end-of-run epsilon (dashed),
    rounds not trained marked x; the other hospitals' min-max band in a partner report."""
    if not series or not series.get("series"):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    rounds = series["rounds"]
    colors = [f"C{i}" for i in range(10)]
    for i, (name, ys) in enumerate(series["series"].items()):
        c = colors[i % 10]
        xs = rounds[: len(ys)]
        ax.plot(xs, ys, marker="o", color=c, label=name)
        ax.axhline(series["budget"][name], color=c, ls=":", lw=1)
        planned = series["planned_epsilon"].get(name)
        if planned is not None and xs:
            ax.plot([xs[-1], max(rounds[-1], xs[-1])], [ys[-1], planned], ls="--", color=c, lw=1)
        skipped = series["skipped"].get(name, [])
        sx = [r for r in skipped if r <= len(ys)]
        if sx:
            ax.plot(sx, [ys[r - 1] for r in sx], "x", color="k", ms=8, label=f"{name}: not trained")
    band = series.get("others")
    if band:
        xs = [r for r, b in zip(rounds, band) if b]
        if xs:
            lo = [b["min"] for b in band if b]
            hi = [b["max"] for b in band if b]
            ax.fill_between(xs, lo, hi, color="grey", alpha=0.25, label="other hospitals (min-max)")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("Epsilon over rounds (dotted: budget; dashed: planned end of run)", fontsize=9)
    ax.set_xticks(rounds)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_burndown(report: dict) -> bytes | None:
    rows = [(h["hospital"], h["accounting"]) for h in report["hospitals"] if h.get("accounting")]
    o = report.get("other_hospitals")
    if o and o.get("stats_shown") and o.get("epsilon_spent") and o.get("epsilon_budget"):
        rows.append(("others (median)", {"epsilon_spent": o["epsilon_spent"]["median"],
                                         "epsilon_budget": o["epsilon_budget"]["median"]}))
    if not rows:
        return None
    fig = _figure(6.4, 0.6 + 0.45 * len(rows))
    ax = fig.add_subplot()
    names = [r[0] for r in rows]
    spent = [r[1]["epsilon_spent"] or 0 for r in rows]
    remaining = [max(r[1]["epsilon_budget"] - (r[1]["epsilon_spent"] or 0), 0) for r in rows]
    ax.barh(names, spent, color="C0", label="spent")
    ax.barh(names, remaining, left=spent, color="C2", alpha=0.4, label="remaining")
    ax.set_xlabel("epsilon")
    ax.set_title("Budget burn-down at the end of the run", fontsize=9)
    ax.legend(fontsize=7)
    ax.invert_yaxis()
    return _png(fig)


def plot_participation(report: dict) -> bytes | None:
    rows = [(h["hospital"], h["participation"]) for h in report["hospitals"] if h["participation"]]
    if not rows:
        return None
    codes = {"trained": 0, "skipped_budget": 1, "rejected": 2, "absent": 3, "no_record": 3}
    from matplotlib.colors import ListedColormap

    n_rounds = max(len(p) for _, p in rows)
    grid = [[codes.get(p[i]["status"], 3) if i < len(p) else 3 for i in range(n_rounds)] for _, p in rows]
    fig = _figure(6.4, 0.8 + 0.4 * len(rows))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap=ListedColormap(["#4c9a5b", "#e0a030", "#c0392b", "#bbbbbb"]), vmin=0, vmax=3, aspect="auto")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xticks(range(n_rounds), [str(i + 1) for i in range(n_rounds)])
    ax.set_xlabel("round (green trained, amber skipped for budget, red rejected, grey absent)")
    ax.set_title("Participation", fontsize=9)
    return _png(fig)


def plot_utility(report: dict) -> bytes | None:
    tasks = [t for t in report["utility"]["tasks"] if t["client_model"] or t["foundation_model"]]
    if not tasks:
        return None
    fig = _figure(7.2, 3.8)
    ax = fig.add_subplot()
    labels = [f"{t['task']} ({'seen' if t['seen'] else 'unseen'})" for t in tasks]
    kinds = [("client_model", "federated client model"), ("foundation_model", "foundation model"),
             ("non_private_reference", "non-private reference")]
    width = 0.8 / (len(kinds) + 1)
    for k, (key, label) in enumerate(kinds):
        vals = [(t[key] or {}).get("auroc", (t[key] or {}).get("accuracy")) for t in tasks]
        if any(v is not None for v in vals):
            ax.bar([i + k * width for i in range(len(tasks))], [v or 0 for v in vals], width, label=label)
    single = [t.get("single_hospital") or {} for t in tasks]
    if any(single):
        vals = [sum((m or {}).get("auroc", 0) for m in s.values()) / len(s) if s else 0 for s in single]
        ax.bar([i + len(kinds) * width for i in range(len(tasks))], vals, width,
               label="single hospital" + (" (mean)" if report["partner"] is None else ""))
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks([i + width for i in range(len(tasks))], labels, fontsize=7, rotation=25, ha="right")
    ax.set_ylabel("AUROC (test split)")
    ax.set_ylim(0, 1)
    ax.set_title("Utility per task", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_audit_bounds(report: dict) -> bytes | None:
    rows = [a for a in report["audit"]["dp_audit"] if isinstance(a.get("eps_lb"), (int, float))]
    if not rows:
        return None
    fig = _figure(6.4, 3.0)
    ax = fig.add_subplot()
    names = [f"{a.get('hospital') or ''} {a.get('task') or a['path']}"[:30] for a in rows]
    lbs = [max(a["eps_lb"], a.get("eps_lb_one_run") or 0) for a in rows]
    acc = [a.get("eps_accountant") or 0 for a in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], lbs, 0.4, label="empirical lower bound", color="C3")
    ax.bar([x + 0.2 for x in xs], acc, 0.4, label="accountant epsilon", color="C0")
    ax.set_xticks(list(xs), names, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("epsilon")
    ax.set_title("Empirical epsilon lower bound vs accountant", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------------------------------ blocks
@dataclass
class Block:
    kind: str  # h1 h2 h3 p ul kv table img big pre
    data: Any
    extra: Any = None


def _st(s: str) -> str:
    return s.replace("_", " ")


def _v(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return g(x, 4)
    if isinstance(x, (list, tuple)):
        return ", ".join(_v(i) for i in x)
    if isinstance(x, dict):
        return "; ".join(f"{k} {_v(v)}" for k, v in x.items())
    return str(x)


def blocks(report: dict, run_dir: Path) -> list[Block]:
    B: list[Block] = []
    h2 = lambda key: B.append(Block("h2", dict(SECTIONS)[key], key))
    partner = report["partner"]
    title = f"Compliance report: run {report['run_id']}" + (f" for {partner}" if partner else " (federation)")
    B.append(Block("h1", title))
    st = report["status"]["overall"]
    B.append(Block("p", f"Federation '{report['federation_name']}'. Generated {report['generated_at']}. Report id "
                   f"{report['report_id']}. Schema {report['schema_version']}. Overall status: {st.upper()}.", st))
    # 1 summary
    h2("summary")
    B.append(Block("p", report["summary"]["plain_language"]))
    hl = report["summary"]["headline"]
    if partner:
        B.append(Block("big", [("epsilon", _v(hl.get("epsilon"))), ("delta", _v(hl.get("delta"))),
                               ("Gaussian-DP mu", _v(hl.get("gdp_mu"))), ("budget", _v(hl.get("epsilon_budget")))]))
    elif hl.get("epsilon_spent"):
        e = hl["epsilon_spent"]
        B.append(Block("big", [("epsilon (min-max)", f"{g(e['min'])} - {g(e['max'])}"), ("delta (max)", _v(hl.get("delta_max"))),
                               ("Gaussian-DP mu (max)", _v(hl.get("gdp_mu_max")))]))
    else:
        B.append(Block("big", [("differential privacy", "none")]))
    B.append(Block("table", (["check", "status", "reason"],
                             [[c["name"], c["status"], c["reason"]] for c in report["checks"]]), 1))
    # 2 guarantee
    h2("guarantee")
    gs = report["guarantee_statement"]
    for para in gs["text"].split("\n\n")[:-1]:
        B.append(Block("p", para))
    B.append(Block("p", "This guarantee does not cover:"))
    B.append(Block("ul", gs["does_not_cover"]))
    # 3 privacy definition and accounting
    h2("privacy")
    pdef = report["privacy_definition"]
    B.append(Block("kv", [("DP setting", pdef["dp_setting"]), ("privacy unit", _v(pdef["privacy_unit"])),
                          ("records per patient (max)", "; ".join(f"{c} {'unknown' if k is None else k}" for c, k in
                                                                  (pdef["max_records_per_patient"] or {}).items()) or "-"),
                          ("adjacency", _v(pdef["adjacency"])), ("release scope", _v(pdef["release_scope"])),
                          ("not differential privacy", "; ".join(pdef["not_differential_privacy"]))]))
    B.append(Block("table", (["access", "status", "reason"],
                             [[a["access"], a["status"], a["reason"]] for a in pdef["covered_accesses"]]), None))
    dp_h = [h for h in report["hospitals"] if h.get("accounting")]
    if dp_h:
        B.append(Block("h3", "Mechanism per hospital"))
        B.append(Block("table", (["hospital", "noise multiplier", "clip norm", "sampling", "sample rates", "batch",
                                  "steps/round", "steps", "rounds attended", "records", "secure mode"],
                                 [[h["hospital"], _v(m["noise_multiplier"]), _v(m["max_grad_norm"]), m["sampling"],
                                   _v(m["sample_rates"]), _v(m["batch_size"]), _v(m["steps_per_round"]), _v(m.get("steps_total")),
                                   f"{m['rounds_attended']} / {m['rounds_planned']}", _v(m["n_records"]), _v(m["secure_mode"])]
                                  for h in dp_h for m in [h["mechanism"]]]), None))
        B.append(Block("h3", "Accounting per hospital"))
        B.append(Block("table", (["hospital", "accountant", "epsilon spent", "budget", "remaining", "delta", "1/n",
                                  "Gaussian-DP mu", "independent (library, method)", "relative difference", "patient level"],
                                 [[h["hospital"], f"{a['accountant']} ({a['accountant_library']})", _v(a["epsilon_spent"]),
                                   _v(a["epsilon_budget"]), _v(a["epsilon_remaining"]), _v(a["delta"]), _v(a["one_over_n"]),
                                   _v(a["gdp_mu"]),
                                   f"{_v(a['independent_recomputation']['epsilon'])} ({a['independent_recomputation']['library']}, "
                                   f"{a['independent_recomputation']['method']})",
                                   "-" if a["independent_recomputation"]["relative_difference"] is None else
                                   f"{a['independent_recomputation']['relative_difference']:+.2%}",
                                   "unknown records per patient" if not a["patient_level"] else
                                   f"k={a['patient_level']['max_records_per_patient']}: eps {g(a['patient_level']['epsilon'])}"]
                                  for h in dp_h for a in [h["accounting"]]]), None))
        rounds = sorted({x["round"] for h in dp_h for x in h["accounting"]["epsilon_by_round"]})
        B.append(Block("table", (["hospital"] + [f"round {r}" for r in rounds],
                                 [[h["hospital"]] + [_v(next((x["epsilon"] for x in h["accounting"]["epsilon_by_round"]
                                                             if x["round"] == r), None)) +
                                                     next(("" if x["status"] == "trained" else f" ({_st(x['status'])})"
                                                           for x in h["accounting"]["epsilon_by_round"] if x["round"] == r), "")
                                                     for r in rounds] for h in dp_h]), None))
    o = report.get("other_hospitals")
    if o:
        B.append(Block("h3", f"The other {o['count']} hospitals (aggregate only)"))
        if o["stats_shown"]:
            B.append(Block("table", (["figure", "min", "median", "max"],
                                     [[k.replace("_", " "), _v(o[k]["min"]), _v(o[k]["median"]), _v(o[k]["max"])]
                                      for k in ("epsilon_spent", "epsilon_budget", "delta", "gdp_mu", "noise_multiplier",
                                                "rounds_attended") if o.get(k)]), None))
        else:
            B.append(Block("p", o["stats_note"]))
    img = plot_epsilon(report["plots"]["epsilon_by_round"])
    if img:
        B.append(Block("img", img, "Epsilon over rounds per hospital, with budgets"))
    acc = report["accounting"]
    B.append(Block("kv", [("composition", acc["composition"]), ("independent library", acc["independent_library"]),
                          ("Gaussian-DP", acc["gdp_note"])]))
    # 4 budget
    h2("budget")
    b = report["budget"]
    B.append(Block("kv", [("enforcement", b["policy"]["enforcement"]), ("on exhaustion", b["policy"]["on_exhaustion"]),
                          ("budgets", _v(b["policy"].get("budgets")))]))
    if b["events"]:
        B.append(Block("table", (["hospital", "round", "event", "reason", "epsilon spent", "projected"],
                                 [[e["hospital"], _v(e["round"]), _st(e["event"]), e["reason"], _v(e.get("epsilon_spent")),
                                   _v(e.get("projected_epsilon"))] for e in b["events"]]), None))
    else:
        B.append(Block("p", "No enforcement events: no round skipped, refused or rejected."))
    if b["resumes"]:
        B.append(Block("table", (["hospital", "event", "epsilon restored"],
                                 [[e["hospital"], e["reason"], _v(e.get("epsilon_spent"))] for e in b["resumes"]]), None))
    if b.get("other_hospitals_events") is not None:
        B.append(Block("p", "Other hospitals' events (counts): " + (_v(b["other_hospitals_events"]) or "none") + "."))
    for maker, cap in ((plot_burndown, "Budget burn-down"), (plot_participation, "Participation by round")):
        img = maker(report)
        if img:
            B.append(Block("img", img, cap))
    # 5 aggregation
    h2("aggregation")
    agg = report["aggregation"]
    B.append(Block("p", agg["description"]))
    kv = [("mode", agg["mode"]), ("is differential privacy", "no"), ("server has secret key", _v(agg["server_has_secret_key"])),
          ("authenticated payloads", _v(agg["authenticated_payloads"]))]
    for part in ("ckks", "secagg"):
        if agg.get(part):
            kv += [(k.replace("_", " "), _v(v)) for k, v in agg[part].items() if k not in ("key_holder_ledger", "decryptions_by_round")]
    B.append(Block("kv", kv))
    if agg.get("ckks") and agg["ckks"].get("key_holder_ledger"):
        kh = agg["ckks"]["key_holder_ledger"]
        B.append(Block("p", f"Key custody: hospitals encrypt under the key holder's public context; the server adds "
                            f"ciphertexts; only the key holder decrypts, and its ledger ({kh['path']}, {kh['entries']} "
                            f"entries, verified: {_v(kh['verified'])}, head {kh['head']}) records each decryption."))
    # 6 threats
    h2("threats")
    B.append(Block("table", (["adversary", "asset", "protected by", "not protected"],
                             [[t["adversary"], t["asset"], t["protected_by"], t["not_protected"]] for t in report["threat_model"]]), None))
    # 7 audit
    h2("audit")
    au = report["audit"]
    if not au["run"]:
        B.append(Block("p", au["note"] or "audit not run"))
    else:
        if au["mia"]:
            fprs = sorted({k for m in au["mia"] for k in m["tpr_at_fpr"]}, key=float)
            B.append(Block("table", (["hospital", "target", "task", "attack", "AUC", "AUC 95% CI"] + [f"TPR@{k}" for k in fprs] +
                                     ["members / non-members"],
                                     [[_v(m["hospital"]), _v(m["target"]), _v(m["task"]), m["attack"], _v(m["auc"]),
                                       _v(m["auc_ci95"])] + ["n/a (too few non-members)" if m["tpr_at_fpr"].get(k) is None and
                                                             k in (m.get("tpr_at_fpr_note") or {}) else _v(m["tpr_at_fpr"].get(k))
                                                             for k in fprs] +
                                      [f"{_v(m['n_members'])} / {_v(m['n_nonmembers'])}"] for m in au["mia"]]), None))
        if au["dp_audit"]:
            B.append(Block("table", (["hospital", "task", "canaries", "eps lower bound", "one-run bound",
                                      "accountant eps (audit's replay)", "consistent"],
                                     [[_v(a.get("hospital")), _v(a.get("task")), _v(a.get("canaries")), _v(a.get("eps_lb")),
                                       _v(a.get("eps_lb_one_run")), _v(a.get("eps_accountant")),
                                       _v(a.get("consistent_with_accountant"))] for a in au["dp_audit"]]), None))
        if au["reconstruction"]:
            B.append(Block("table", (["hospital", "task", "update", "visible to server", "relative MSE", "cosine", "note"],
                                     [[_v(r.get("hospital")), _v(r.get("task")), _v(r.get("update")), _v(r.get("visible")),
                                       _v(r.get("relative_mse")), _v(r.get("cosine")), _v(r.get("note"))]
                                      for r in au["reconstruction"]]), None))
        if au.get("other_hospitals"):
            B.append(Block("p", "Other hospitals' audits (aggregate): " + _v(au["other_hospitals"]) + "."))
        img = plot_audit_bounds(report)
        if img:
            B.append(Block("img", img, "Empirical epsilon lower bound vs accountant epsilon"))
        for roc in au["roc_images"]:
            p = run_dir / roc["path"]
            if p.is_file():
                B.append(Block("img", p.read_bytes(), f"ROC curve (log-log): {roc['path']}"))
    # 8 utility
    h2("utility")
    ut = report["utility"]
    rows = []
    for t in ut["tasks"]:
        for key, label in (("client_model", "federated client model"), ("foundation_model", "foundation model"),
                           ("foundation_model_before_injection", "FM before injection"),
                           ("non_private_reference", "non-private reference")):
            m = t.get(key)
            if m:
                rows.append([t["task"], "seen" if t["seen"] else "unseen", label, _v(m.get("accuracy")), _v(m.get("auroc")),
                             _v(m.get("f1")), _v(m.get("mcc")), _v(m.get("n"))])
        for c, m in (t.get("single_hospital") or {}).items():
            if m:
                rows.append([t["task"], "seen" if t["seen"] else "unseen", f"single hospital {c}", _v(m.get("accuracy")),
                             _v(m.get("auroc")), _v(m.get("f1")), _v(m.get("mcc")), _v(m.get("n"))])
        if t.get("single_hospital_others"):
            so = t["single_hospital_others"]
            rows.append([t["task"], "seen" if t["seen"] else "unseen", "single hospital, others (median)",
                         _v((so.get("accuracy") or {}).get("median")), _v((so.get("auroc") or {}).get("median")), "-", "-", "-"])
        if t.get("note"):
            rows.append([t["task"], "seen" if t["seen"] else "unseen", t["note"], "-", "-", "-", "-", "-"])
    B.append(Block("table", (["task", "seen", "model", "accuracy", "AUROC", "F1", "MCC", "n"], rows), None))
    B.append(Block("p", f"Source: {ut['source']}. Subgroups: {ut['subgroups']}."))
    img = plot_utility(report)
    if img:
        B.append(Block("img", img, "Utility per task"))
    # 9 inventory
    h2("inventory")
    inv = report["data_inventory"]
    rows = []
    for t in inv["tasks"]:
        rows.append([t["task"], _v(t.get("role")), _v(t.get("modality")), "all", _v(t["records"]), _v(t.get("positives")),
                     _v(t.get("patient_ids_available"))])
        for c, hc in (t.get("hospitals") or {}).items():
            rows.append([t["task"], "", "", c, _v(hc["records"]), _v(hc["positives"]), _v(hc["max_records_per_patient"])])
        if t.get("other_hospitals"):
            rows.append([t["task"], "", "", f"{t['other_hospitals']['count']} other hospitals",
                         _v(t["other_hospitals"]["records"]), "-", "-"])
    B.append(Block("table", (["task", "role", "modality", "where", "records", "positives", "patient ids / max per patient"], rows), None))
    B.append(Block("p", f"{inv['rule']}. Source: {inv['source']}." + (f" {inv['note']}" if inv.get("note") else "")
                   + f" Dates: {inv['date_ranges']}."))
    # 10 provenance
    h2("provenance")
    pv = report["provenance"]
    cv = pv["code_version"]
    B.append(Block("kv", [("config sha256", _v(pv["config_sha256"])), ("resolved config sha256", pv["resolved_config_sha256"]),
                          ("code", f"git {cv['git_commit'] or 'unavailable'}" + (" (uncommitted changes)" if cv.get("git_dirty") else "")
                           + f"; package {cv['package_version']}"),
                          ("packages", _v(pv["package_versions"])), ("timestamps", _v(pv["timestamps"])),
                          ("key holder ledger head", _v(pv.get("keyholder_ledger_head"))),
                          ("other hospitals' ledger heads (sha256 commitment)", _v(pv.get("other_hospitals_ledger_heads_sha256"))),
                          ("other hospitals' artifacts (sha256 commitment)", _v(pv.get("other_hospitals_artifacts_sha256")))]))
    B.append(Block("table", (["hospital", "ledger chain head", "entries"],
                             [[c, _v(hd), _v(pv["ledger_entries"].get(c))] for c, hd in pv["ledger_heads"].items()]), None))
    B.append(Block("table", (["artifact", "sha256", "bytes"], [[a["path"], a["sha256"], _v(a["bytes"])] for a in pv["artifacts"]]), None))
    sig = pv.get("signature") or {}
    B.append(Block("p", f"Signature: {sig.get('algorithm', '-')} over {sig.get('signed_bytes', '-')}, in {sig.get('signature_file', '-')}; "
                        f"public key {sig.get('public_key_path', '-')} (sha256 of the raw key {sig.get('public_key_sha256', '-')}). "
                        f"{sig.get('key_custody', '')}"))
    B.append(Block("pre", (pv.get("verify_command") or "") + ("\n" + sig["openssl_command"] if sig.get("openssl_command") else "")))
    # 11 regulatory
    h2("regulatory")
    B.append(Block("table", (["framework", "requirement", "report sections", "status", "note"],
                             [[r["framework"], r["requirement"], ", ".join(r["sections"]), r["status"], r["note"]]
                              for r in report["regulatory_mapping"]]), 3))
    # 12 hazards
    h2("hazards")
    B.append(Block("table", (["hazard", "status", "how checked", "detail"],
                             [[hz["hazard"], hz["status"], hz["how_checked"], hz.get("detail") or ""] for hz in report["hazards"]]), 1))
    B.append(Block("h3", "Limitations"))
    B.append(Block("ul", report["limitations"]))
    # 13 glossary + sign-off
    h2("glossary")
    B.append(Block("table", (["term", "meaning"], [[x["term"], x["meaning"]] for x in report["glossary"]]), None))
    so = report["sign_off"]
    B.append(Block("table", (["role", "name", "date", "decision"],
                             [["hospital data protection officer", "", "", ""], ["expert (HIPAA expert determination)", "", "", ""]]), None))
    B.append(Block("p", so["note"]))
    return B


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222;font-size:14px;line-height:1.45}
h1{font-size:22px;border-bottom:3px solid #333;padding-bottom:6px}
h2{font-size:18px;margin-top:32px;border-bottom:1px solid #aaa;padding-bottom:3px}
h3{font-size:15px;margin-top:18px}
table{border-collapse:collapse;width:100%;margin:8px 0 14px 0;font-size:12.5px}
th,td{border:1px solid #c8c8c8;padding:4px 6px;vertical-align:top;text-align:left;overflow-wrap:anywhere}
th{background:#f0f0f0}
td.st{font-weight:bold;white-space:nowrap}
.pass{background:#d6f0dc;color:#1e7b34}.attention{background:#ffecc8;color:#8a5200}.fail{background:#f8d7d4;color:#b3261e}.not_applicable{background:#e6e6e6;color:#555}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:bold}
.big{display:flex;gap:18px;flex-wrap:wrap;margin:12px 0}.big>div{border:1px solid #ccc;border-radius:6px;padding:8px 14px;min-width:130px}
.big .v{font-size:26px;font-weight:bold}.big .l{font-size:12px;color:#555}
dl{display:grid;grid-template-columns:220px 1fr;gap:3px 12px;font-size:13px}dt{font-weight:bold;color:#444}dd{margin:0;overflow-wrap:anywhere}
pre{background:#f5f5f5;padding:8px;overflow-x:auto;font-size:12px}
figure{margin:10px 0}figcaption{font-size:12px;color:#555}img{max-width:100%}
nav a{margin-right:10px;font-size:12.5px}
@media print{nav{display:none}}
"""


def render_html(report: dict, run_dir: Path, bl: list[Block] | None = None) -> str:
    bl = bl if bl is not None else blocks(report, run_dir)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(bl[0].data)}</title><style>{CSS}</style></head><body>"]
    for b in bl:
        if b.kind == "h1":
            out.append(f"<h1>{e(b.data)}</h1>")
            out.append("<nav>" + "".join(f'<a href="#{k}">{e(t)}</a>' for k, t in SECTIONS) + "</nav>")
        elif b.kind == "h2":
            out.append(f'<h2 id="{b.extra}">{e(b.data)}</h2>')
        elif b.kind == "h3":
            out.append(f"<h3>{e(b.data)}</h3>")
        elif b.kind == "p":
            cls = f' <span class="badge {b.extra}">{e(b.extra.upper())}</span>' if b.extra else ""
            out.append(f"<p>{e(b.data)}{cls}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b.data) + "</ul>")
        elif b.kind == "kv":
            out.append("<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in b.data) + "</dl>")
        elif b.kind == "big":
            out.append('<div class="big">' + "".join(f'<div><div class="v">{e(v)}</div><div class="l">{e(k)}</div></div>'
                                                    for k, v in b.data) + "</div>")
        elif b.kind == "pre":
            out.append(f"<pre>{e(b.data)}</pre>")
        elif b.kind == "img":
            data = base64.b64encode(b.data).decode()
            out.append(f'<figure><img alt="{e(b.extra)}" src="data:image/png;base64,{data}"><figcaption>{e(b.extra)}</figcaption></figure>')
        elif b.kind == "table":
            head, rows = b.data
            col = b.extra
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
            for r in rows:
                cells = []
                for i, c in enumerate(r):
                    if i == col:
                        cells.append(f'<td class="st {e(str(c))}">{e(_st(str(c)))}</td>')
                    else:
                        cells.append(f"<td>{e(str(c))}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ PDF
def _fonts() -> dict[str, str]:
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return {"": str(d / "DejaVuSans.ttf"), "B": str(d / "DejaVuSans-Bold.ttf"), "mono": str(d / "DejaVuSansMono.ttf")}


def render_pdf(report: dict, run_dir: Path, bl: list[Block] | None = None) -> bytes:
    from fpdf import FPDF
    from fpdf.enums import TableCellFillMode, XPos, YPos
    from fpdf.fonts import FontFace

    bl = bl if bl is not None else blocks(report, run_dir)
    fonts = _fonts()

    class PDF(FPDF):
        def footer(self):
            self.set_y(-12)
            self.set_font("dv", size=7)
            self.set_text_color(110)
            self.cell(0, 6, f"{report['run_id']} - report {report['report_id']} - page {self.page_no()}/{{nb}}", align="C")
            self.set_text_color(0)

    pdf = PDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(bl[0].data)
    pdf.set_creator("secure-fedkim report")
    pdf.add_font("dv", "", fonts[""])
    pdf.add_font("dv", "B", fonts["B"])
    pdf.add_font("dvmono", "", fonts["mono"])
    pdf.set_auto_page_break(True, margin=15)
    pdf.set_margins(14, 14, 14)
    pdf.add_page()
    width = pdf.epw

    def para(text, size=9.5, style=""):
        pdf.set_font("dv", style, size)
        pdf.multi_cell(width, size * 0.5, text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(1.5)

    for b in bl:
        if b.kind == "h1":
            para(b.data, 15, "B")
        elif b.kind == "h2":
            if pdf.get_y() > pdf.h - 60:
                pdf.add_page()
            pdf.ln(3)
            pdf.start_section(b.data, level=0)
            para(b.data, 12.5, "B")
        elif b.kind == "h3":
            para(b.data, 10.5, "B")
        elif b.kind == "p":
            if b.extra:
                pdf.set_fill_color(*FILLS[b.extra])
                pdf.set_font("dv", "B", 9.5)
                pdf.multi_cell(width, 5, b.data, fill=True, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
                pdf.set_fill_color(255, 255, 255)
                pdf.ln(1.5)
            else:
                para(b.data)
        elif b.kind == "ul":
            for item in b.data:
                para("\u2022 " + item, 9)
        elif b.kind == "kv":
            pdf.set_font("dv", size=8)
            with pdf.table(col_widths=(1, 3), first_row_as_headings=False, text_align="LEFT",
                           line_height=3.8, cell_fill_mode=TableCellFillMode.NONE) as t:
                for k, v in b.data:
                    row = t.row()
                    row.cell(str(k), style=FontFace(emphasis="BOLD"))
                    row.cell(str(v))
            pdf.ln(2)
        elif b.kind == "big":
            pdf.set_font("dv", "B", 15)
            para("    ".join(f"{k}: {v}" for k, v in b.data), 13, "B")
        elif b.kind == "pre":
            pdf.set_font("dvmono", size=7.5)
            pdf.multi_cell(width, 4, b.data, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1.5)
        elif b.kind == "img":
            from PIL import Image

            im = Image.open(io.BytesIO(b.data))
            w_mm = min(width, im.width / 110 * 25.4)
            h_mm = w_mm * im.height / im.width
            if pdf.get_y() + h_mm > pdf.h - 20:
                pdf.add_page()
            pdf.image(io.BytesIO(b.data), w=w_mm)
            para(b.extra, 7.5)
        elif b.kind == "table":
            head, rows = b.data
            col = b.extra
            n = len(head)
            size = 7.5 if n <= 5 else (6.5 if n <= 8 else 5.8)
            pdf.set_font("dv", size=size)
            widths = _col_widths(head, rows, col)
            with pdf.table(col_widths=widths, text_align="LEFT", line_height=size * 0.48,
                           headings_style=FontFace(emphasis="BOLD", fill_color=(235, 235, 235)),
                           cell_fill_mode=TableCellFillMode.NONE) as t:
                hr = t.row()
                for h in head:
                    hr.cell(str(h))
                for r in rows:
                    row = t.row()
                    for i, c in enumerate(r):
                        c = str(c)
                        if i == col and c in FILLS:
                            row.cell(_st(c), style=FontFace(emphasis="BOLD", fill_color=FILLS[c]))
                        else:
                            row.cell(c)
            pdf.ln(2)
    return bytes(pdf.output())


def _col_widths(head, rows, status_col=None) -> tuple:
    lens = []
    for i in range(len(head)):
        cells = [len(str(head[i]))] + [min(len(str(r[i])), 120) for r in rows if i < len(r)]
        lens.append(max(6, sum(cells) / len(cells) + 0.3 * max(cells)))
    if status_col is not None:
        lens[status_col] = max(lens[status_col], 0.12 * sum(lens))
    return tuple(lens)


# ------------------------------------------------------------------------------------------ writer
def _stem(partner: str | None) -> str:
    if partner is None:
        return "report"
    if not partner or any(ch in partner for ch in "/\\\0") or partner.startswith("."):
        raise ValueError(f"partner {partner!r} cannot name a file")
    return f"report_{partner}"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_report(run_dir, partner: str | None = None, *, reference=None) -> ReportPaths:
    """Write ``report.json`` (schema-validated), ``report.html``, ``report.pdf`` and ``report.sig`` into
    ``run_dir`` (``report_<partner>.*`` for a partner report) and return their paths.

    The signature is Ed25519 over the exact bytes of the JSON file, with the run's report-signing key
    (``run_dir/report_signing/``, created at first use, private key mode 0600; see :mod:`.sign`).
    Raises ``jsonschema.ValidationError`` if the report does not fit the shipped schema (nothing is written then).
    """
    run_dir = Path(run_dir)
    stem = _stem(partner)
    report = build_report(run_dir, partner, reference=reference)
    key = ensure_report_key(run_dir)
    report["provenance"]["signature"] = {
        "algorithm": "Ed25519",
        "public_key_sha256": fingerprint(key.public_key()),
        "public_key_path": f"{SIGNING_DIR}/{PUBLIC_KEY}",
        "signature_file": f"{stem}.sig",
        "signed_bytes": f"the exact bytes of {stem}.json",
        "key_custody": "This key was made for the run in report_signing/ (private key mode 0600). In deployment the "
                       "signing key belongs to the party issuing the report; verify against its published public key.",
        "openssl_command": f"openssl pkeyutl -verify -pubin -inkey {SIGNING_DIR}/{PUBLIC_KEY} -rawin -in {stem}.json -sigfile {stem}.sig",
    }
    report["provenance"]["verify_command"] = f"secure-fedkim verify RUN_DIR/{stem}.json"
    validate_report(report)
    data = (json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    bl = blocks(report, run_dir)
    page = render_html(report, run_dir, bl).encode("utf-8")
    pdf = render_pdf(report, run_dir, bl)
    paths = ReportPaths(run_dir / f"{stem}.json", run_dir / f"{stem}.html", run_dir / f"{stem}.pdf", run_dir / f"{stem}.sig")
    _write(paths.json, data)
    _write(paths.sig, sign_bytes(key, data))
    _write(paths.html, page)
    _write(paths.pdf, pdf)
    return paths
