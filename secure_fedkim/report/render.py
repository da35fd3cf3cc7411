"""Writing a report: report.json (schema-validated), report.html (one self-contained file), report.pdf (fpdf2,
pure Python) and report.sig (Ed25519 over the exact JSON bytes).

HTML and PDF are rendered from one list of blocks built from report.json alone (plus the audit's ROC PNGs), so
they hold the same content in the section order of REPORTING.md §2.3: ``SECTIONS`` lists the sections in order, one
builder function each. Plots are PNGs drawn with matplotlib's Agg canvas (pyplot's global state is left alone)
from the data series that report.json carries.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple

from secure_fedkim.rundir.layout import RunDir

from .build import build_report
from .checks import title_of
from .sign import load_issuer, manifest, sign_bytes
from .text import g

COLORS = {"pass": "#1e7b34", "attention": "#b26a00", "fail": "#b3261e", "not_applicable": "#6b6b6b", "inconclusive": "#3b5b8c"}
FILLS = {"pass": (214, 240, 220), "attention": (255, 236, 200), "fail": (248, 215, 212), "not_applicable": (230, 230, 230),
         "inconclusive": (216, 226, 242)}
DECISION_STATUS = {"do not release": "fail", "release with conditions": "attention", "release": "pass"}
MIN_PDF_PT = 8  # no PDF text below this size
MAX_ROC_IMAGES = 6


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
    rows = [(h["hospital"], {"epsilon_spent": h["accounting"]["epsilon_total"],
                             "epsilon_budget": h["accounting"]["epsilon_budget"]})
            for h in report["hospitals"] if h.get("accounting")]
    if not rows:
        return None
    fig = _figure(6.4, 0.6 + 0.45 * len(rows))
    ax = fig.add_subplot()
    names = [r[0] for r in rows]
    spent = [r[1]["epsilon_spent"] or 0 for r in rows]
    remaining = [max(r[1]["epsilon_budget"] - (r[1]["epsilon_spent"] or 0), 0) for r in rows]
    ax.barh(names, spent, color="C0", label="spent")
    ax.barh(names, remaining, left=spent, color="C2", alpha=0.4, label="remaining")
    ax.set_xlabel("epsilon (every released spend composed)")
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
    kind: str  # h1 h2 h3 p ul kv table img big pre decision break
    data: Any
    extra: Any = None
    style: str | None = None  # "compact": a narrow two-column table


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


def _interval(ci) -> str:
    """An interval as one unbreakable word (an en dash, no spaces): it never wraps between its ends."""
    return "-" if not ci else f"{g(ci[0], 3)}\u2013{g(ci[1], 3)}"


def _title(B: list[Block], report: dict) -> None:
    """The title and the overall status, above section 1."""
    partner = report["partner"]
    title = f"Compliance report: run {report['run_id']}" + (f" for {partner}" if partner else " (federation)")
    B.append(Block("h1", title))
    st = report["status"]["overall"]
    B.append(Block("p", f"Federation '{report['federation_name']}'. Generated {report['generated_at']}. Overall status: "
                   f"{st.upper()}.", st))


def _section_summary(B: list[Block], report: dict, run_dir: Path) -> None:
    """Section 1: the decision and its reasons, epsilon per hospital in plain words, the worst measured leakage,
    what is not covered, the checks in words. Fits on the first PDF page."""
    fp = report["summary"]["first_page"]
    B.append(Block("decision", f"Decision: {fp['decision'].upper()}", DECISION_STATUS[fp["decision"]]))
    reasons = [r if len(r) <= 300 else r[:290].rsplit(" ", 1)[0] + " ... (appendix A)" for r in fp["reasons"]]
    if fp.get("conditions"):
        B.append(Block("p", "Conditions, as actions (each from a check in appendix A):"))
        B.append(Block("ul", [f"{c['action']} [{title_of(c['check'])}: {_st(c['status'])}]"
                              for c in fp["conditions"]]))
    else:
        B.append(Block("ul", reasons[:6] + ([f"... and {len(reasons) - 6} more (appendix A)"] if len(reasons) > 6 else [])))
    B.append(Block("kv", [("setting", fp["setting"]), ("patients", fp["patient_exposure"]["text"] or "-")]))
    rows = [[h["hospital"], _v(h["epsilon"]), _v(h.get("epsilon_remaining")), _v(h["delta"]), _v(h["gdp_mu"]), h["reading"]]
            for h in fp["hospitals"]]
    B.append(Block("table", (["hospital", "epsilon (every release composed)", "budget remaining", "delta",
                              "Gaussian-DP mu (composed)", "what it means"], rows), None))
    if fp.get("other_hospitals"):
        B.append(Block("p", fp["other_hospitals"] + "."))
    B.append(Block("kv", [("worst measured leakage", fp["worst_leakage_text"]),
                          ("not covered", "; ".join(fp["not_covered"]) + " (full list in section 2)")]))
    B.append(Block("table", (["check", "status"], [[c["title"], c["status"]] for c in fp["checks"]]), 1, "compact"))
    B.append(Block("p", report["summary"]["plain_language"]))
    B.append(Block("break", None))  # the checks start on page 2


def _section_checks(B: list[Block], report: dict, run_dir: Path) -> None:
    """Every check with its status and reason."""
    B.append(Block("table", (["check", "status", "reason"],
                             [[title_of(c["name"]), c["status"], c["reason"]] for c in report["checks"]]), 1))
    B.append(Block("p", "Status rules: a check with nothing behind it is 'not applicable', never 'pass'; 'inconclusive' "
                        "means the evidence cannot decide. The machine names of the checks are in report.json."))


def _section_guarantee(B: list[Block], report: dict, run_dir: Path) -> None:
    """The guarantee statement in prose and what it does not cover."""
    gs = report["guarantee_statement"]
    for para in gs["text"].split("\n\n")[:-1]:
        B.append(Block("p", para))
    B.append(Block("p", "This guarantee does not cover:"))
    B.append(Block("ul", gs["does_not_cover"]))
    card = report.get("dp_disclosure_card")
    if card:
        B.append(Block("h3", "DP disclosure card"))
        B.append(Block("kv", [(k.replace("_", " "), _v(v) if not isinstance(v, list) or not v or not isinstance(v[0], dict)
                               else "; ".join(f"{x['task']}: {x['record']}" for x in v)) for k, v in card.items()]))


def _section_scope(B: list[Block], report: dict, run_dir: Path) -> None:
    """Intended use, roles, and what leaves which boundary in which form."""
    sc = report["scope"]
    B.append(Block("kv", [("intended use", sc["intended_use"]), ("purpose", sc["purpose"])]))
    B.append(Block("h3", "Roles"))
    B.append(Block("table", (["party", "role"], [[r["party"], r["role"]] for r in sc["roles"]]), None))
    B.append(Block("h3", "Data flow: what leaves which boundary, in which form"))
    B.append(Block("table", (["artifact", "from", "to", "form", "privacy protection"],
                             [[r["artifact"], r["from"], r["to"], r["form"], r["privacy_protection"]]
                              for r in sc["release_scope"]]), None))
    accesses = report["privacy_definition"]["covered_accesses"]
    if accesses:
        B.append(Block("h3", "Accesses covered by the DP guarantee"))
        B.append(Block("table", (["access", "status", "reason"], [[a["access"], a["status"], a["reason"]] for a in accesses]),
                       None))


def _privacy_per_hospital(B: list[Block], dp_h: list[dict]) -> None:
    """Section 5 for the hospitals with DP: mechanism, accounting, budget and epsilon per round."""
    B.append(Block("h3", "Mechanism per hospital"))
    B.append(Block("table", (["hospital", "noise multiplier", "clip norm", "sampling", "sample rates", "batch",
                              "steps/round", "steps", "rounds attended", "records", "secure mode"],
                             [[h["hospital"], _v(m["noise_multiplier"]), _v(m["max_grad_norm"]), m["sampling"],
                               _v(m["sample_rates"]), _v(m["batch_size"]), _v(m["steps_per_round"]), _v(m.get("steps_total")),
                               f"{m['rounds_attended']} / {m['rounds_planned']}", _v(m["n_records"]), _v(m["secure_mode"])]
                              for h in dp_h for m in [h["mechanism"]]]), None))
    B.append(Block("h3", "Accounting per hospital"))
    B.append(Block("table", (["hospital", "released spends (ledger: epsilon)", "epsilon (composed)", "dp_accounting PLD",
                              "Gaussian-DP mu (composed)"],
                             [[h["hospital"], "; ".join(f"{x['source']}: {_v(x['epsilon'])}" for x in a["released_spends"]),
                               _v(a["epsilon_total"]), _v(a.get("epsilon_total_pld")), _v(a.get("gdp_mu_total"))]
                              for h in dp_h for a in [h["accounting"]]]), None))
    B.append(Block("table", (["hospital", "accountant", "federation epsilon", "budget", "remaining (budget - composed)",
                              "delta", "1/n", "Gaussian-DP mu (federation alone)", "independent (library, method)",
                              "relative difference", "patient level (composed)"],
                             [[h["hospital"], f"{a['accountant']} ({a['accountant_library']})", _v(a["epsilon_spent"]),
                               _v(a["epsilon_budget"]), _v(a["epsilon_remaining"]), _v(a["delta"]), _v(a["one_over_n"]),
                               _v(a["gdp_mu"]),
                               f"{_v(a['independent_recomputation']['epsilon'])} ({a['independent_recomputation']['library']}, "
                               f"{a['independent_recomputation']['method']})",
                               "-" if a["independent_recomputation"]["relative_difference"] is None else
                               f"{a['independent_recomputation']['relative_difference']:+.2%}",
                               "unknown records per patient" if not a["patient_level"] else
                               f"k={a['patient_level']['max_records_per_patient']}: eps {g(a['patient_level']['epsilon'])}, "
                               f"delta {g(a['patient_level']['delta'])}"]
                              for h in dp_h for a in [h["accounting"]]]), None))
    lifetime = [(h["hospital"], a["lifetime"]) for h in dp_h for a in [h["accounting"]] if a.get("lifetime")]
    if lifetime:
        B.append(Block("h3", "Lifetime spend per hospital (every run of its ledger on the same data, composed)"))
        B.append(Block("table", (["hospital", "earlier runs (epsilon alone; data)", "earlier runs composed", "this run",
                                  "lifetime with this run", "lifetime cap", "delta"],
                                 [[name, "; ".join(f"{r['run_id']}: {_v(r['epsilon'])} ({r['data']}"
                                                   f"{'' if r['counted'] else ', not counted'})" for r in lt["runs"]),
                                   _v(lt["epsilon_earlier"]), _v(lt["epsilon_run"]), _v(lt["epsilon"]),
                                   "none" if lt["cap"] is None else _v(lt["cap"]), _v(lt["delta"])]
                                  for name, lt in lifetime]), None))


def _epsilon_by_round_table(B: list[Block], dp_h: list[dict]) -> None:
    """Epsilon after each round per hospital (the plot of section 3, as numbers)."""
    rounds = sorted({x["round"] for h in dp_h for x in h["accounting"]["epsilon_by_round"]})
    B.append(Block("table", (["hospital"] + [f"round {r}" for r in rounds],
                             [[h["hospital"]] + [_v(next((x["epsilon"] for x in h["accounting"]["epsilon_by_round"]
                                                         if x["round"] == r), None)) +
                                                 next(("" if x["status"] == "trained" else f" ({_st(x['status'])})"
                                                       for x in h["accounting"]["epsilon_by_round"] if x["round"] == r), "")
                                                 for r in rounds] for h in dp_h]), None))


def _privacy_other_hospitals(B: list[Block], o: dict) -> None:
    """Section 5 in a partner report: the other hospitals as ranges only."""
    B.append(Block("h3", f"The other {o['count']} hospitals (aggregate only)"))
    if o["stats_shown"]:
        B.append(Block("table", (["figure", "each of them lies between"],
                                 [[k.replace("_", " "), f"{_v(o[k]['low'])} and {_v(o[k]['high'])}"]
                                  for k in ("epsilon_total", "epsilon_budget", "gdp_mu", "noise_multiplier") if o.get(k)]),
                       None))
    B.append(Block("p", o["stats_note"]))


def _section_privacy(B: list[Block], report: dict, run_dir: Path) -> None:
    """The DP definition, covered accesses, mechanism and accounting per hospital, the epsilon plot."""
    pdef = report["privacy_definition"]
    B.append(Block("kv", [("DP setting", pdef["dp_setting"]), ("privacy unit", _v(pdef["privacy_unit"])),
                          ("records per patient (max)", "; ".join(f"{c} {'unknown' if k is None else k}" for c, k in
                                                                  (pdef["max_records_per_patient"] or {}).items()) or "-"),
                          ("adjacency", _v(pdef.get("adjacency_statement") or pdef["adjacency"])
                           + (f" ({pdef['adjacency_source']})" if pdef.get("adjacency_source") else "")),
                          ("release scope", _v(pdef["release_scope"])),
                          ("not differential privacy", "; ".join(pdef["not_differential_privacy"]))]))
    B.append(Block("p", "What each access the run makes is covered by (and why): appendix F. What the guarantee does "
                        "not cover: section 2."))
    dp_h = [h for h in report["hospitals"] if h.get("accounting")]
    if dp_h:
        _privacy_per_hospital(B, dp_h)
    o = report.get("other_hospitals")
    if o:
        _privacy_other_hospitals(B, o)
    img = plot_epsilon(report["plots"]["epsilon_by_round"])
    if img:
        B.append(Block("img", img, "Epsilon over rounds per hospital, with budgets"))
    acc = report["accounting"]
    B.append(Block("kv", [("composition", acc["composition"]), ("independent library", acc["independent_library"]),
                          ("Gaussian-DP", acc["gdp_note"])]))


def _section_budget(B: list[Block], report: dict, run_dir: Path) -> None:
    """Budget policy, enforcement events, resumes, burn-down and participation plots."""
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
    dp_h = [h for h in report["hospitals"] if h.get("accounting")]
    if dp_h:
        B.append(Block("h3", "Epsilon after each round (composed over the rounds so far)"))
        _epsilon_by_round_table(B, dp_h)
    if b.get("other_hospitals_events") is not None:
        B.append(Block("p", "Other hospitals' events (counts): " + (_v(b["other_hospitals_events"]) or "none") + "."))
    for maker, cap in ((plot_burndown, "Budget burn-down"), (plot_participation, "Participation by round")):
        img = maker(report)
        if img:
            B.append(Block("img", img, cap))


def _section_aggregation(B: list[Block], report: dict, run_dir: Path) -> None:
    """How updates are aggregated (CKKS / secure aggregation / plain) and who holds keys."""
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


def _section_threats(B: list[Block], report: dict, run_dir: Path) -> None:
    """The threat model table."""
    B.append(Block("table", (["adversary", "asset", "protected by", "not protected"],
                             [[t["adversary"], t["asset"], t["protected_by"], t["not_protected"]] for t in report["threat_model"]]), None))


def _audit_consistency(B: list[Block], consistency: list[dict]) -> None:
    """Section 9: whether the training is consistent with its claimed epsilon, per audit. A reason several rows share
    is printed once under the table, not in every row."""
    B.append(Block("h3", "Is the training consistent with its claimed epsilon?"))
    shared: dict[str, int] = {}
    for c in consistency:
        for r in c["reasons"]:
            shared[r] = shared.get(r, 0) + 1
    notes = [r for r, n in shared.items() if n > 1]
    cell = lambda c: "; ".join(f"see note {notes.index(r) + 1}" if r in notes else r for r in c["reasons"])
    B.append(Block("table", (["audit", "hospital", "task", "status", "epsilon lower bound", "claim checked",
                              "largest epsilon it can certify", "reasons"],
                             [[c["kind"].replace("_", " "), _v(c["hospital"]), _v(c["task"]),
                               c["status"] + (" (underpowered)" if c.get("underpowered") else ""),
                               _v(c.get("eps_lb")), _v(c.get("claim_checked")),
                               _v(c["max_certifiable_epsilon"]), cell(c)] for c in consistency]),
                   3))
    for i, r in enumerate(notes, 1):
        B.append(Block("p", f"Note {i} ({shared[r]} rows): {r}"))
    B.append(Block("p", "Claim checked: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in
                                                     {c["kind"]: c.get("claim_checked_of") for c in consistency}.items() if v)
                   + ". Underpowered: the claim is above the largest epsilon the audit could certify, so it could not "
                   "have decided; it holds no decision where the white-box audit of the same training or the "
                   "run-level audit of the whole run decided."))


def _audit_mia(B: list[Block], mia: list[dict]) -> None:
    """Every membership-inference result, with TPR at each false-positive rate measured (appendix A)."""
    fprs = sorted({k for m in mia for k in m["tpr_at_fpr"]}, key=float)
    B.append(Block("table", (["hospital", "target", "task", "attack", "AUC", "AUC 95% CI", "status"]
                             + [f"TPR@{k}" for k in fprs] + ["members / non-members"],
                             [[_v(m["hospital"]), _v(m["target"]), _v(m["task"]), m["attack"], _v(m["auc"]),
                               _interval(m.get("auc_ci") or m["auc_ci95"]), m["status"]] + ["n/a (too few non-members)" if m["tpr_at_fpr"].get(k) is None and
                                                     k in (m.get("tpr_at_fpr_note") or {}) else _v(m["tpr_at_fpr"].get(k))
                                                     for k in fprs] +
                              [f"{_v(m['n_members'])} / {_v(m['n_nonmembers'])}"] for m in mia]), None))


def _section_audit(B: list[Block], report: dict, run_dir: Path) -> None:
    """Empirical audits in the main body, in counts: consistency with the claimed epsilon per audit kind, the
    membership-inference results per status (and, for the statuses other than 'no signal shown', per hospital) with
    the worst measured leakage, and update inversion in one sentence. Every row, the bounds plot and the ROC curves
    are in appendix B (issue #30: a main body of at most 6 PDF pages, no per-row table in it)."""
    au = report["audit"]
    if not au["run"]:
        B.append(Block("p", au["note"] or "audit not run"))
        return
    if au.get("consistency"):
        _audit_consistency_counts(B, au["consistency"])
    B.append(Block("h3", "Membership inference"))
    counts: dict[str, int] = {}
    for m in au["mia"]:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    B.append(Block("p", f"{len(au['mia'])} results: " + (", ".join(f"{n} {st}" for st, n in counts.items()) or "none")
                   + (f". Worst measured leakage: {report['summary']['first_page']['worst_leakage_text']}." if au["mia"] else ".")
                   + " Every row is in appendix B."))
    if _audit_mia_where(au["mia"]):
        B.append(Block("p", _audit_mia_where(au["mia"])))
    if au["reconstruction"]:
        B.append(Block("p", _reconstruction_sentence(au["reconstruction"])))
    if au.get("other_hospitals"):
        o = au["other_hospitals"]
        B.append(Block("p", f"Other hospitals' audits (aggregate, {o['hospitals']} hospitals): {o['mia_results']} "
                            "membership-inference results (" + _v(o["mia_statuses"]) + "); DP-consistency audits: "
                            + _v(o["consistency_statuses"]) + "."))


def _audit_mia_where(mia: list[dict]) -> str:
    """Where the rows that are not 'no signal shown' are, in one sentence: per status, the count per hospital."""
    parts = []
    for st in dict.fromkeys(m["status"] for m in mia if m["status"] != "no signal shown"):
        per: dict[str, int] = {}
        for m in mia:
            if m["status"] == st:
                who = _v(m.get("hospital") or m.get("target"))
                per[who] = per.get(who, 0) + 1
        parts.append(f"{st}: " + ", ".join(f"{w} {n}" for w, n in per.items()))
    return ("By hospital (or target): " + "; ".join(parts) + ".") if parts else ""


def _reconstruction_sentence(rows: list[dict]) -> str:
    """Update inversion in one sentence: how many rows, and in how many the server saw a per-client update (what the
    others mean, for a server that follows the protocol and for a malicious one, is under the rows in appendix B)."""
    visible = sum(r.get("visible") is True for r in rows)
    hidden = [r.get("update") for r in rows if r.get("visible") is False and r.get("update") not in ("plain", "dp")]
    return (f"Update inversion: {len(rows)} rows; a per-client update visible to the server in {visible} of them"
            + (f" (under {', '.join(repr(m) for m in dict.fromkeys(hidden))}: none to a server that follows the "
               f"protocol; what a malicious one can do is in appendix B and E)" if hidden else "") + ".")


def _audit_consistency_counts(B: list[Block], consistency: list[dict]) -> None:
    """The main body's view of the DP-consistency audits: each kind's rows counted by status (every row in appendix
    B), the rows that are not consistent named."""
    B.append(Block("h3", "Is the training consistent with its claimed epsilon?"))
    kinds = list(dict.fromkeys(c["kind"] for c in consistency))
    statuses = ("consistent", "inconclusive", "inconsistent")
    B.append(Block("table", (["audit", "what its claim is"] + list(statuses) + ["of which underpowered"],
                             [[k.replace("_", " "), next(c.get("claim_checked_of") or "-" for c in consistency if c["kind"] == k)]
                              + [str(sum(c["kind"] == k and c["status"] == st for c in consistency)) for st in statuses]
                              + [str(sum(c["kind"] == k and c.get("underpowered") for c in consistency))]
                              for k in kinds]), None))
    bad = [c for c in consistency if c["status"] == "inconsistent"]
    if bad:
        B.append(Block("ul", [f"{_v(c['hospital'])} {_v(c['task'])} ({c['kind'].replace('_', ' ')}): inconsistent: "
                              + "; ".join(c["reasons"]) for c in bad][:8]))
    B.append(Block("p", "Underpowered: the claim is above the largest epsilon the audit could certify, so it could not "
                        "have decided; it holds no decision where the white-box audit of the same training or the "
                        "run-level audit of the whole run decided. "
                        "Every row, with its reasons, is in appendix B."))


def _section_audit_appendix(B: list[Block], report: dict, run_dir: Path) -> None:
    """Appendix B: every DP-consistency row, every membership-inference row, every update-inversion row (a note several
    rows share printed once), every black-box canary row, the bounds plot, the ROC curves."""
    au = report["audit"]
    if not au["run"]:
        B.append(Block("p", au["note"] or "audit not run"))
        return
    if au.get("consistency"):
        _audit_consistency(B, au["consistency"])
    if au["mia"]:
        _audit_mia(B, au["mia"])
    if au["reconstruction"]:
        B.append(Block("table", (["hospital", "task", "update", "visible to server", "relative MSE", "cosine"],
                                 [[_v(r.get("hospital")), _v(r.get("task")), _v(r.get("update")), _v(r.get("visible")),
                                   _v(r.get("relative_mse")), _v(r.get("cosine"))] for r in au["reconstruction"]]), None))
        notes = list(dict.fromkeys(r["note"] for r in au["reconstruction"] if r.get("note")))
        for n in notes:  # a note several rows share is printed once, not in every row
            B.append(Block("p", f"{n[0].upper()}{n[1:]} ({sum(r.get('note') == n for r in au['reconstruction'])} rows: "
                                + ", ".join(f"{_v(r.get('hospital'))} {_v(r.get('task'))} {_v(r.get('update'))}"
                                            for r in au["reconstruction"] if r.get("note") == n) + ")."))
    if au["dp_audit"]:
        B.append(Block("table", (["hospital", "task", "canaries", "eps lower bound", "one-run bound",
                                  "claim checked (federation's spend)", "status"],
                                 [[_v(a.get("hospital")), _v(a.get("task")), _v(a.get("canaries")), _v(a.get("eps_lb")),
                                   _v(a.get("eps_lb_one_run")), _v(a.get("eps_accountant")),
                                   a["status"] + (" (underpowered)" if a.get("underpowered") else "")]
                                  for a in au["dp_audit"]]), None))
    img = plot_audit_bounds(report)
    if img:
        B.append(Block("img", img, "Empirical epsilon lower bound vs accountant epsilon"))
    shown = [r for r in au["roc_images"] if (run_dir / r["path"]).is_file()][:MAX_ROC_IMAGES]
    for roc in shown:
        B.append(Block("img", (run_dir / roc["path"]).read_bytes(), f"ROC curve (log-log): {roc['path']}"))
    if len(au["roc_images"]) > len(shown):
        B.append(Block("p", f"{len(au['roc_images']) - len(shown)} more ROC curves are in the run's audit/ directory "
                            f"(listed with their hashes in appendix J)."))


def _section_utility(B: list[Block], report: dict, run_dir: Path) -> None:
    """Metrics per task and model, and the utility plot."""
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
            rows.append([t["task"], "seen" if t["seen"] else "unseen",
                         f"single hospital, {t['single_hospital_others']['count']} others: not shown", "-", "-", "-", "-", "-"])
        if t.get("note"):
            rows.append([t["task"], "seen" if t["seen"] else "unseen", t["note"], "-", "-", "-", "-", "-"])
    B.append(Block("table", (["task", "seen", "model", "accuracy", "AUROC", "F1", "MCC", "n"], rows), None))
    B.append(Block("p", f"Source: {ut['source']}. Subgroups: {ut['subgroups']}."))
    img = plot_utility(report)
    if img:
        B.append(Block("img", img, "Utility per task"))


def _section_inventory(B: list[Block], report: dict, run_dir: Path) -> None:
    """Record counts per task and hospital (counts only)."""
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
    B.append(Block("table", (["task", "role", "modality", "where", "records", "positives", "patient ids (task registry) / max per patient"], rows), None))
    B.append(Block("p", f"{inv['rule']}. Source: {inv['source']}." + (f" {inv['note']}" if inv.get("note") else "")
                   + f" Dates: {inv['date_ranges']}."))


def _section_provenance(B: list[Block], report: dict, run_dir: Path) -> None:
    """Hashes, ledger heads, artifacts, signature and the verify commands."""
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
    who = sig.get("signer") or {}
    B.append(Block("p", f"Signed by {who.get('name', '-')} ({who.get('organisation', '-')}), Ed25519 key fingerprint "
                        f"(sha256 of the raw public key) {sig.get('public_key_sha256', '-')}: {sig.get('signed_bytes', '-')} "
                        f"in {sig.get('signature_file', '-')}; {sig.get('files_manifest', '')}. {sig.get('key_custody', '')}"))
    B.append(Block("pre", (pv.get("verify_command") or "") + ("\n" + sig["openssl_command"] if sig.get("openssl_command") else "")))


def _section_regulatory(B: list[Block], report: dict, run_dir: Path) -> None:
    """The regulatory mapping table."""
    B.append(Block("table", (["framework", "requirement", "report sections", "status", "note"],
                             [[r["framework"], r["requirement"], ", ".join(r["sections"]), r["status"], r["note"]]
                              for r in report["regulatory_mapping"]]), 3))


def _section_hazards(B: list[Block], report: dict, run_dir: Path) -> None:
    """Hazards with their status, then the limitations."""
    B.append(Block("table", (["hazard", "status", "how checked", "detail"],
                             [[hz["hazard"], hz["status"], hz["how_checked"], hz.get("detail") or ""] for hz in report["hazards"]]), 1))
    B.append(Block("h3", "Limitations"))
    B.append(Block("ul", report["limitations"]))


def _section_glossary(B: list[Block], report: dict, run_dir: Path) -> None:
    """The glossary and the empty sign-off table."""
    B.append(Block("table", (["term", "meaning"], [[x["term"], x["meaning"]] for x in report["glossary"]]), None))
    so = report["sign_off"]
    B.append(Block("table", (["role", "name", "date", "decision"],
                             [["hospital data protection officer", "", "", ""], ["expert (HIPAA expert determination)", "", "", ""]]), None))
    B.append(Block("p", so["note"]))


class Section(NamedTuple):
    key: str  # the HTML anchor
    title: str  # the heading, numbered as in REPORTING.md §2.3
    build: Callable[[list[Block], dict, Path], None]  # appends the section's blocks after its heading


# The report's sections, in order. Adding a section: write one builder above and add one line here.
SECTIONS: list[Section] = [
    # the main body: what a privacy officer reads (issue #30: at most about 6 pages)
    Section("summary", "1. Summary and decision", _section_summary),
    Section("guarantee", "2. Guarantee statement and DP disclosure card", _section_guarantee),
    Section("privacy", "3. Privacy definition and accounting", _section_privacy),
    Section("audit", "4. Empirical audits", _section_audit),
    # appendices: the evidence in full
    Section("checks", "Appendix A. Every check with its reason", _section_checks),
    Section("appendix_audit", "Appendix B. Every audit row and ROC curve", _section_audit_appendix),
    Section("budget", "Appendix C. Budget ledger and enforcement", _section_budget),
    Section("aggregation", "Appendix D. Aggregation confidentiality", _section_aggregation),
    Section("threats", "Appendix E. Threat model", _section_threats),
    Section("scope", "Appendix F. Intended use, roles and data flow", _section_scope),
    Section("utility", "Appendix G. Utility", _section_utility),
    Section("inventory", "Appendix H. Data inventory (counts only)", _section_inventory),
    Section("hazards", "Appendix I. Hazards and limitations", _section_hazards),
    Section("provenance", "Appendix J. Provenance and integrity", _section_provenance),
    Section("regulatory", "Appendix K. Regulatory mapping", _section_regulatory),
    Section("glossary", "Appendix L. Glossary and sign-off", _section_glossary),
]


def blocks(report: dict, run_dir: Path) -> list[Block]:
    """The report as one list of blocks (the title, then each section of ``SECTIONS`` under its heading), which
    HTML and PDF both render."""
    B: list[Block] = []
    _title(B, report)
    first_appendix = next((s.key for s in SECTIONS if s.title.startswith("Appendix")), None)
    for section in SECTIONS:
        if section.key == first_appendix:
            B.append(Block("break", None))  # the main body ends here: the appendices start on a new page
        B.append(Block("h2", section.title, section.key))
        section.build(B, report, run_dir)
    return B


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222;font-size:14px;line-height:1.45}
h1{font-size:22px;border-bottom:3px solid #333;padding-bottom:6px}
h2{font-size:18px;margin-top:32px;border-bottom:1px solid #aaa;padding-bottom:3px}
h3{font-size:15px;margin-top:18px}
table{border-collapse:collapse;width:100%;margin:8px 0 14px 0;font-size:12.5px}
th,td{border:1px solid #c8c8c8;padding:4px 6px;vertical-align:top;text-align:left;overflow-wrap:break-word}
table.compact{width:auto;min-width:50%}
.decision{font-size:24px;font-weight:bold;padding:8px 14px;border-radius:6px}
.hash{font-size:11px;color:#555;overflow-wrap:anywhere}
.inconclusive{background:#d8e2f2;color:#3b5b8c}
th{background:#f0f0f0}
td.st{font-weight:bold;white-space:nowrap}
.pass{background:#d6f0dc;color:#1e7b34}.attention{background:#ffecc8;color:#8a5200}.fail{background:#f8d7d4;color:#b3261e}.not_applicable{background:#e6e6e6;color:#555}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:bold}
.big{display:flex;gap:18px;flex-wrap:wrap;margin:12px 0}.big>div{border:1px solid #ccc;border-radius:6px;padding:8px 14px;min-width:130px}
.big .v{font-size:26px;font-weight:bold}.big .l{font-size:12px;color:#555}
dl{display:grid;grid-template-columns:220px 1fr;gap:3px 12px;font-size:13px}dt{font-weight:bold;color:#444}dd{margin:0;overflow-wrap:break-word}
pre{background:#f5f5f5;padding:8px;overflow-x:auto;font-size:12px}
figure{margin:10px 0}figcaption{font-size:12px;color:#555}img{max-width:100%}
nav a{margin-right:10px;font-size:12.5px}
@media print{nav{display:none}}
"""


def render_html(report: dict, run_dir: Path, bl: list[Block] | None = None, json_sha256: str | None = None) -> str:
    """One self-contained page; ``json_sha256`` (the sha256 of the report.json it renders) goes into a meta tag
    and under the title, where ``verify`` and readers find it."""
    bl = bl if bl is not None else blocks(report, run_dir)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="report-json-sha256" content="{e(json_sha256 or "")}">',
           f"<title>{e(bl[0].data)}</title><style>{CSS}</style></head><body>"]
    for b in bl:
        if b.kind == "h1":
            out.extend(_html_h1(b, json_sha256))
        elif b.kind in HTML_BLOCKS:
            out.append(HTML_BLOCKS[b.kind](b))
    out.append("</body></html>")
    return "\n".join(out)


def _html_h1(b: Block, json_sha256: str | None) -> list[str]:
    """The title, the sha256 of the JSON it renders, and the table of contents."""
    e = html.escape
    out = [f"<h1>{e(b.data)}</h1>"]
    if json_sha256:
        out.append(f'<p class="hash">Renders report.json with sha256 {e(json_sha256)}</p>')
    out.append("<nav>" + "".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in SECTIONS) + "</nav>")
    return out


def _html_p(b: Block) -> str:
    cls = f' <span class="badge {b.extra}">{html.escape(b.extra.upper())}</span>' if b.extra else ""
    return f"<p>{html.escape(b.data)}{cls}</p>"


def _html_big(b: Block) -> str:
    e = html.escape
    return '<div class="big">' + "".join(f'<div><div class="v">{e(v)}</div><div class="l">{e(k)}</div></div>'
                                         for k, v in b.data) + "</div>"


def _html_img(b: Block) -> str:
    e = html.escape
    data = base64.b64encode(b.data).decode()
    return f'<figure><img alt="{e(b.extra)}" src="data:image/png;base64,{data}"><figcaption>{e(b.extra)}</figcaption></figure>'


def _html_table(b: Block) -> str:
    """A table; the status column (``b.extra``) is bold on its status colour."""
    e = html.escape
    head, rows = b.data
    col = b.extra
    compact = ' class="compact"' if b.style == "compact" else ""
    out = [f"<table{compact}><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            if i == col:
                cells.append(f'<td class="st {e(str(c))}">{e(_st(str(c)))}</td>')
            else:
                cells.append(f"<td>{e(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# How the HTML page draws each kind of block but the title (``_html_h1``); a "break" draws nothing.
HTML_BLOCKS = {
    "h2": lambda b: f'<h2 id="{b.extra}">{html.escape(b.data)}</h2>',
    "h3": lambda b: f"<h3>{html.escape(b.data)}</h3>",
    "p": _html_p,
    "decision": lambda b: f'<p class="decision {b.extra}">{html.escape(b.data)}</p>',
    "ul": lambda b: "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b.data) + "</ul>",
    "kv": lambda b: "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in b.data) + "</dl>",
    "big": _html_big,
    "pre": lambda b: f"<pre>{html.escape(b.data)}</pre>",
    "img": _html_img,
    "table": _html_table,
}


# ------------------------------------------------------------------------------------------ PDF
def _fonts() -> dict[str, str]:
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return {"": str(d / "DejaVuSans.ttf"), "B": str(d / "DejaVuSans-Bold.ttf"), "mono": str(d / "DejaVuSansMono.ttf")}


def _pdf_document(report: dict, title: str, json_sha256: str | None):
    """Page set-up: an A4 FPDF with the DejaVu fonts, metadata, margins, the footer on every page, and page 1."""
    from fpdf import FPDF

    fonts = _fonts()

    class PDF(FPDF):
        def footer(self):
            _pdf_footer(self, report, json_sha256)

    pdf = PDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(title)
    pdf.set_creator("secure-fedkim report")
    pdf.set_creation_date(__import__("datetime").datetime.fromisoformat(report["generated_at"].replace("Z", "+00:00")))
    if json_sha256:
        pdf.set_subject(f"report-json-sha256:{json_sha256}")
    pdf.add_font("dv", "", fonts[""])
    pdf.add_font("dv", "B", fonts["B"])
    pdf.add_font("dvmono", "", fonts["mono"])
    pdf.set_auto_page_break(True, margin=18)
    pdf.set_margins(14, 14, 14)
    pdf.add_page()
    return pdf


def _pdf_footer(pdf, report: dict, json_sha256: str | None) -> None:
    """Page number, report id and the sha256 of the report.json rendered, at the foot of every page."""
    from fpdf.enums import XPos, YPos

    pdf.set_y(-12)
    pdf.set_font("dv", size=MIN_PDF_PT)
    pdf.set_text_color(110)
    pdf.cell(0, 4, f"page {pdf.page_no()}/{{nb}} - report {report['report_id']}", align="C",
             new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if json_sha256:
        pdf.cell(0, 4, f"renders report.json sha256 {json_sha256}", align="C")
    pdf.set_text_color(0)


def _pdf_para(pdf, text, size=9.5, style="") -> None:
    from fpdf.enums import XPos, YPos

    pdf.set_font("dv", style, size)
    pdf.multi_cell(pdf.epw, size * 0.5, text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(1.5)


def _pdf_filled(pdf, text: str, status: str, size: float, line_height: float) -> None:
    """Bold text on the status's fill colour (the decision, the overall status)."""
    from fpdf.enums import XPos, YPos

    pdf.set_fill_color(*FILLS[status])
    pdf.set_font("dv", "B", size)
    pdf.multi_cell(pdf.epw, line_height, text, fill=True, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_fill_color(255, 255, 255)
    pdf.ln(1.5)


def _pdf_h2(pdf, b: Block) -> None:
    if pdf.get_y() > pdf.h - 60:
        pdf.add_page()
    pdf.ln(3)
    pdf.start_section(b.data, level=0)
    _pdf_para(pdf, b.data, 12.5, "B")


def _pdf_p(pdf, b: Block) -> None:
    if b.extra:
        _pdf_filled(pdf, b.data, b.extra, 9.5, 5)
    else:
        _pdf_para(pdf, b.data)


def _pdf_ul(pdf, b: Block) -> None:
    for item in b.data:
        _pdf_para(pdf, "\u2022 " + item, 8.5)


def _pdf_kv(pdf, b: Block) -> None:
    from fpdf.enums import TableCellFillMode
    from fpdf.fonts import FontFace

    pdf.set_font("dv", size=MIN_PDF_PT)
    with pdf.table(col_widths=(1, 3), first_row_as_headings=False, text_align="LEFT",
                   line_height=3.8, cell_fill_mode=TableCellFillMode.NONE) as t:
        for k, v in b.data:
            row = t.row()
            row.cell(str(k), style=FontFace(emphasis="BOLD"))
            row.cell(str(v))
    pdf.ln(2)


def _pdf_big(pdf, b: Block) -> None:
    pdf.set_font("dv", "B", 15)
    _pdf_para(pdf, "    ".join(f"{k}: {v}" for k, v in b.data), 13, "B")


def _pdf_pre(pdf, b: Block) -> None:
    from fpdf.enums import XPos, YPos

    pdf.set_font("dvmono", size=MIN_PDF_PT)
    pdf.multi_cell(pdf.epw, 4, b.data, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(1.5)


def _pdf_img(pdf, b: Block) -> None:
    """The PNG at its 110 dpi size (at most the text width), on a new page unless it fits, then its caption."""
    from PIL import Image

    im = Image.open(io.BytesIO(b.data))
    w_mm = min(pdf.epw, im.width / 110 * 25.4)
    h_mm = w_mm * im.height / im.width
    if pdf.get_y() + h_mm > pdf.h - 20:
        pdf.add_page()
    pdf.image(io.BytesIO(b.data), w=w_mm)
    _pdf_para(pdf, b.extra, MIN_PDF_PT)


PDF_CELL_MAX = 1500  # characters: a longer table cell would not fit on one PDF page (fpdf refuses such a row)


def _fits_a_page(text: str) -> str:
    """``text``, cut at :data:`PDF_CELL_MAX` characters with a pointer to the full text (HTML and JSON)."""
    if len(text) <= PDF_CELL_MAX:
        return text
    cut = text.rfind(" ", 0, PDF_CELL_MAX)
    cut = cut if cut > PDF_CELL_MAX // 2 else PDF_CELL_MAX
    return f"{text[:cut]} ... [{len(text) - cut:,} more characters: the full text is in the HTML and JSON report]"


def _pdf_table(pdf, b: Block) -> None:
    """A table with bold grey headings; the status column (``b.extra``) is bold on its status colour."""
    from fpdf.enums import TableCellFillMode
    from fpdf.fonts import FontFace

    head, rows = b.data
    col = b.extra
    n = len(head)
    size = 8.5 if n <= 5 else MIN_PDF_PT
    pdf.set_font("dv", size=size)
    table_width = pdf.epw * 0.62 if b.style == "compact" else pdf.epw
    widths = _col_widths(pdf, head, [[_st(c) if i == col else c for i, c in enumerate(r)] for r in rows], table_width)
    with pdf.table(col_widths=widths, width=table_width, align="LEFT", text_align="LEFT", line_height=size * 0.48,
                   headings_style=FontFace(emphasis="BOLD", fill_color=(235, 235, 235)),
                   cell_fill_mode=TableCellFillMode.NONE) as t:
        hr = t.row()
        for h in head:
            hr.cell(str(h))
        for r in rows:
            row = t.row()
            for i, c in enumerate(r):
                c = _fits_a_page(str(c))
                if i == col and c in FILLS:
                    row.cell(_st(c), style=FontFace(emphasis="BOLD", fill_color=FILLS[c]))
                else:
                    row.cell(c)
    pdf.ln(2)


# How the PDF draws each kind of block (see ``Block.kind``).
PDF_BLOCKS = {
    "h1": lambda pdf, b: _pdf_para(pdf, b.data, 15, "B"),
    "h2": _pdf_h2,
    "h3": lambda pdf, b: _pdf_para(pdf, b.data, 10.5, "B"),
    "break": lambda pdf, b: pdf.add_page(),
    "decision": lambda pdf, b: _pdf_filled(pdf, b.data, b.extra, 16, 9),
    "p": _pdf_p,
    "ul": _pdf_ul,
    "kv": _pdf_kv,
    "big": _pdf_big,
    "pre": _pdf_pre,
    "img": _pdf_img,
    "table": _pdf_table,
}


def render_pdf(report: dict, run_dir: Path, bl: list[Block] | None = None, json_sha256: str | None = None) -> bytes:
    bl = bl if bl is not None else blocks(report, run_dir)
    pdf = _pdf_document(report, bl[0].data, json_sha256)
    for b in bl:
        draw = PDF_BLOCKS.get(b.kind)
        if draw:
            draw(pdf, b)
    return bytes(pdf.output())


def _col_widths(pdf, head, rows, total: float) -> tuple:
    """Column widths (mm) summing to ``total``: each column at least as wide as its longest word in the current
    font (so no number is split across lines; hashes longer than 40% of the table may wrap), the rest shared by
    the columns' text lengths."""
    mins, weights = [], []
    for i in range(len(head)):
        cells = [str(r[i]) for r in rows if i < len(r)]
        words = [w for c in cells for w in c.split()]
        widest = max([pdf.get_string_width(w) for w in words] + [1.12 * pdf.get_string_width(w) for w in str(head[i]).split()])
        mins.append(min(widest + 2.5, 0.4 * total))
        lens = [min(len(c), 120) for c in cells + [str(head[i])]]
        weights.append(sum(lens) / len(lens) + 0.3 * max(lens))
    spare = total - sum(mins)
    if spare <= 0:
        return tuple(m * total / sum(mins) for m in mins)
    return tuple(m + spare * w / sum(weights) for m, w in zip(mins, weights))


# ------------------------------------------------------------------------------------------ writer
def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_report(run_dir, partner: str | None = None, *, reference=None, key=None) -> ReportPaths:
    """Write ``report.json`` (schema-validated), ``report.html``, ``report.pdf``, ``report.sig`` and the signed
    manifest ``report.sha256`` / ``report.sha256.sig`` into ``run_dir`` (``report_<partner>.*`` for a partner
    report) and return their paths.

    ``key`` is the issuer's signing key (a path; default ``$SECURE_FEDKIM_REPORT_KEY`` or
    ``~/.config/secure-fedkim/report_signing_key.pem``, made by ``secure-fedkim report-key``); it must lie outside
    the run directory. The HTML and PDF carry the sha256 of the JSON they render.
    Raises FileNotFoundError without a key, ``jsonschema.ValidationError`` if the report does not fit the shipped
    schema (nothing is written then).
    """
    run_dir = Path(run_dir)
    files = RunDir(run_dir)
    paths = ReportPaths(*(files.report_file(partner, s) for s in (".json", ".html", ".pdf", ".sig")))
    sha, sha_sig = files.report_file(partner, ".sha256"), files.report_file(partner, ".sha256.sig")
    signing_key, signer = load_issuer(key, run_dir)
    report = build_report(run_dir, partner, reference=reference)
    report["provenance"]["signature"] = {
        "algorithm": "Ed25519",
        "public_key_sha256": signer["public_key_sha256"],
        "signer": signer,
        "signature_file": paths.sig.name,
        "signed_bytes": f"the exact bytes of {paths.json.name}",
        "files_manifest": f"{sha.name} lists the sha256 of {paths.json.name}, {paths.html.name} and {paths.pdf.name}; "
                          f"{sha_sig.name} signs it",
        "key_custody": "The issuer's key, kept outside the run directory. Verify against the issuer's published "
                       "public key, never against a key found beside the report.",
        "openssl_command": f"openssl pkeyutl -verify -pubin -inkey ISSUER.pub.pem -rawin -in {paths.json.name} "
                           f"-sigfile {paths.sig.name}",
    }
    report["provenance"]["verify_command"] = f"secure-fedkim verify RUN_DIR/{paths.json.name} --public-key ISSUER.pub.pem"
    validate_report(report)
    data = (json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    json_sha = hashlib.sha256(data).hexdigest()
    bl = blocks(report, run_dir)
    page = render_html(report, run_dir, bl, json_sha).encode("utf-8")
    pdf = render_pdf(report, run_dir, bl, json_sha)
    manifest_bytes = manifest({paths.json.name: data, paths.html.name: page, paths.pdf.name: pdf})
    _write(paths.json, data)
    _write(paths.sig, sign_bytes(signing_key, data))
    _write(paths.html, page)
    _write(paths.pdf, pdf)
    _write(sha, manifest_bytes)
    _write(sha_sig, sign_bytes(signing_key, manifest_bytes))
    return paths
