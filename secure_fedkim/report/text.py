"""The report's words: scope, privacy definition, threat model, guarantee statement, summary, hazards,
regulatory mapping, glossary. Every number in a sentence is taken from the report's own fields."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from .checks import action_for, title_of

_RANK = {"not_applicable": -1, "pass": 0, "inconclusive": 1, "attention": 2, "fail": 3}

DECISIONS = {"fail": "do not release", "attention": "release with conditions", "inconclusive": "release with conditions",
             "pass": "release", "not_applicable": "do not release"}


def tpr_at_fpr(mu: float | None, fpr: float = 0.01) -> float | None:
    """The best attacker's true-positive rate at false-positive rate ``fpr`` against mu-Gaussian-DP:
    TPR = Phi(Phi^-1(fpr) + mu) (Dong, Roth and Su 2022)."""
    if mu is None or not math.isfinite(mu):
        return None
    n = NormalDist()
    return n.cdf(n.inv_cdf(fpr) + mu)


def _worst(statuses) -> str:
    s = [x for x in statuses if x != "not_applicable"]
    return max(s, key=_RANK.__getitem__) if s else "not_applicable"


def g(x: float | None, digits: int = 3) -> str:
    """A number for a sentence (significant digits), or 'n/a'."""
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _transport(cfg):
    """The run's transport: its own words for what it protects (secure_fedkim.federation.transports)."""
    from secure_fedkim.federation.transports import transport_for

    return transport_for(cfg)


# ------------------------------------------------------------------------------------------ scope
def scope(cfg, partner: str | None, n_hospitals: int) -> dict:
    t = _transport(cfg)
    form = t.update_form
    dp = cfg.privacy.dp
    roles = [
        {"party": "each hospital", "role": "controller of its patients' records; runs its own node, its DP-SGD and its privacy ledger"},
        {"party": "aggregation server (federation operator)", "role": "processor for the hospitals: sums updates, injects "
         "the aggregate into the foundation model on its public split (joint-controller terms, GDPR Art. 26, to be agreed)"},
    ]
    roles += [{"party": party, "role": role} for party, role in t.parties]
    roles.append({"party": "report issuer", "role": "whoever holds the report-signing key (report_signing/); in deployment "
                  "the party that issues the report"})
    return {
        "intended_use": "Evidence for a hospital's privacy officer, a data-protection expert and engineers about what one "
                        "federated training run released and how it was protected. Not a certification.",
        "purpose": "FEDKIM: each hospital trains lightweight multimodal encoders on its own records; the server injects "
                   "their aggregate into a medical foundation model (M3OE) for the training tasks and unseen tasks: "
                   + ", ".join(t.name for t in cfg.tasks.train + cfg.tasks.unseen) + ".",
        "federation_size": n_hospitals,
        "rounds_planned": cfg.run.rounds,
        "release_scope": [
            {"artifact": "client model update (encoders and heads), every round", "from": "each hospital",
             "to": "aggregation server", "form": form, "privacy_protection": "DP-SGD" if dp else "none (no DP)"},
            {"artifact": "round statistics (record counts, steps, epsilon spent)", "from": "each hospital",
             "to": "aggregation server", "form": "plaintext" + ("; no training loss leaves a DP hospital" if dp else
                                                                  "; includes training losses"),
             "privacy_protection": "none (exact counts)"},
            {"artifact": "aggregated client model", "from": "aggregation server", "to": "every hospital and the run directory",
             "form": "plaintext", "privacy_protection": "DP-SGD (post-processing)" if dp else "none (no DP)"},
            {"artifact": "injected foundation model (M3OE experts, projection, gate)", "from": "aggregation server",
             "to": "model users", "form": "plaintext",
             "privacy_protection": ("DP-SGD for what comes from the hospitals; the server's public split is not protected"
                                    if dp else "none (no DP)")},
            {"artifact": "each hospital's last local model", "from": "each hospital", "to": "its own state directory",
             "form": "plaintext", "privacy_protection": "DP-SGD" if dp else "none (no DP)"},
            {"artifact": "this report", "from": "report issuer", "to": "hospital partners" if partner is None else partner,
             "form": "JSON, HTML, PDF, Ed25519 signature", "privacy_protection": "counts only; no record values or ids"},
        ],
        "roles": roles,
    }


def _baseline_access(cfg, any_dp: bool, baseline_ledgers: bool) -> list[dict]:
    if not cfg.baseline.single_hospital and not baseline_ledgers:
        return []
    if baseline_ledgers:
        return [{"access": "single-hospital baselines (each hospital alone, same records; test metrics released)",
                 "status": "covered", "reason": "trained with DP-SGD under its own ledger (baseline/<hospital>/ledger.jsonl); "
                 "its spend is composed with the federation's into the hospital's epsilon (sequential composition)"}]
    return [{"access": "single-hospital baselines (each hospital alone, same records; test metrics released)",
             "status": "not covered", "reason": "trained without DP in this run (the run has no DP)" if not any_dp else
             "no baseline ledger found: its spend cannot be composed (see the checks)"}]


def privacy_definition(cfg, any_dp: bool, per_patient: dict, view: list[str], baseline_ledgers: bool = False) -> dict:
    covered = "covered" if any_dp else "not covered"
    unit = cfg.privacy.unit
    return {
        "dp": any_dp,
        "dp_setting": (f"{unit}-level DP-SGD at each hospital (Opacus; Poisson sampling of {unit}s, per-{unit} clipping, "
                       f"Gaussian noise): each hospital is the curator of its own records (central DP per hospital)")
        if any_dp else "no differential privacy",
        "privacy_unit": unit if any_dp else None,
        "max_records_per_patient": {c: per_patient.get(c) for c in view} if any_dp else None,
        "adjacency": (f"add/remove one {unit}" + (" with all their records" if unit == "patient" else "")) if any_dp else None,
        "release_scope": ("all checkpoints: every update a hospital sent in every round; the spend composes over all of "
                          "them, and the final models are post-processing") if any_dp else None,
        "covered_accesses": [
            {"access": "training of the client encoders and heads on a hospital's records", "status": covered,
             "reason": "DP-SGD with the ledger's noise, clipping and sampling" if any_dp else "no DP"},
            {"access": "every update sent to the server (all rounds)", "status": covered,
             "reason": "released after DP-SGD; accounted over all rounds" if any_dp else "no DP"},
            {"access": "record counts and step counts sent each round", "status": "not covered",
             "reason": "exact counts are sent in the clear to the server"},
            {"access": "preprocessing statistics", "status": "covered" if any_dp else "not covered",
             "reason": "the loaders use fixed reference scales per record; no statistic is computed across records"
             if any_dp else "no DP"},
            {"access": "hyperparameter tuning on private data", "status": "not covered",
             "reason": "any tuning done before the run is outside the accounting"},
            {"access": "evaluation on held-out test splits (aggregate metrics)", "status": "not covered",
             "reason": "test metrics are computed without DP and published"},
            {"access": "the server's public split used for knowledge injection", "status": "not covered",
             "reason": "treated as public data: it must be public for the guarantee to hold"},
        ] + _baseline_access(cfg, any_dp, baseline_ledgers),
        "not_differential_privacy": ["CKKS encryption and SecAgg+ masking protect the confidentiality of updates; "
                                     "they are not differential privacy and add nothing to epsilon"],
    }


# ------------------------------------------------------------------------------------------ budget
def budget_section(cfg, view_hs: list, other_hs: list, partner: str | None) -> dict:
    policy = {
        "enforcement": "hard: before each round a hospital projects its spend after the round and does not train if it "
                       "would exceed its budget; each spend is written and fsynced to its ledger before the update leaves",
        "on_exhaustion": cfg.privacy.on_exhaustion,
        "budgets": {h.name: (h.accounting or {}).get("epsilon_budget") for h in view_hs} if cfg.privacy.dp else None,
    }
    events, resumes, projections = [], [], []
    for h in view_hs:
        for e in h.events:
            item = {"hospital": h.name, **e}
            (resumes if e["event"] == "resume" else events).append(item)
            if e["event"] == "skipped_budget":
                projections.append({"hospital": h.name, "round": e["round"], "projected_epsilon": e.get("projected_epsilon"),
                                    "epsilon_budget": e.get("epsilon_budget")})
    out = {"policy": policy, "events": events, "resumes": resumes, "pre_round_projection": projections,
           "other_hospitals_events": None}
    if partner is not None:
        counts: dict[str, int] = {}
        for h in other_hs:
            for e in h.events:
                counts[e["event"]] = counts.get(e["event"], 0) + 1
        out["other_hospitals_events"] = counts
    return out


# ------------------------------------------------------------------------------------------ threats
def threat_model(cfg, dp: bool) -> list[dict]:
    t = _transport(cfg)
    dp_words = f"DP-SGD bounds what it reveals about any one {cfg.privacy.unit} (epsilon per hospital)" if dp else None
    none = "nothing: no differential privacy in this run"
    rows = []

    def row(adversary, asset, protected_by, not_protected):
        rows.append({"adversary": adversary, "asset": asset, "protected_by": protected_by, "not_protected": not_protected})

    row("curious aggregation server", "raw patient records", "records never leave the hospital (federated training)",
        "nothing beyond what updates and the released models reveal")
    protected = "; ".join(w for w in (t.protects_one_update, dp_words) if w)
    row("curious aggregation server", "one hospital's update", protected or "nothing", t.exposes_one_update)
    row("curious aggregation server", "the aggregate of all updates", dp_words or none,
        "the aggregate is in the clear at the server by design" + ("" if dp else "; without DP it can reveal records"))
    for threat in t.threats:
        row(*threat)
    row("other hospitals (colluding partners)", "another hospital's records and update",
        "they receive only the aggregated model" + ("; " + dp_words if dp else ""),
        "with DP off, the aggregated model can reveal records" if not dp else "nothing beyond the DP bound")
    row("external network attacker", "updates in transit",
        "this run was a local simulation (no network); deployments use TLS with node authentication (Flower)",
        "a deployment without TLS")
    row("model user (anyone who gets a released model)", "membership or attributes of a patient",
        dp_words or none, "the server's public split used for injection; test metrics")
    row("the hospital's own operators", "its own patients' records", "outside this toolkit",
        "a hospital's own staff see its own data (by design)")
    return rows


def aggregated_only_note(cfg, mode: str) -> str:
    """The reconstruction note of a transport whose aggregator holds no per-client update, in the same terms as the
    threat model's "one hospital's update" row (its own ``exposes_one_update``): what holds against a server that
    follows the protocol, and what a malicious one can still do. The audit's own note ("only the aggregate of at
    least N hospitals is ever in the clear") holds only for the first and would contradict the threat model."""
    from secure_fedkim.federation.transports import TRANSPORTS

    t = TRANSPORTS[mode] if mode in TRANSPORTS else _transport(cfg)
    n = cfg.federation.min_clients
    return (f"no per-client update visible to a server that follows the protocol: under {mode!r} it holds "
            f"{t.update_held_as}, and only what is declared as the aggregate of at least {n} hospitals is released, so "
            f"there is no single client's gradient to invert; not against a malicious server (threat model): "
            f"{t.exposes_one_update}")


def qualify_reconstruction_notes(audit: dict, cfg) -> None:
    """Give each audit row of an aggregated-only transport (``visible`` false) :func:`aggregated_only_note`."""
    for r in audit.get("reconstruction", []):
        if r.get("visible") is False and isinstance(r.get("update"), str) and r["update"] not in ("plain", "dp"):
            r["note"] = aggregated_only_note(cfg, r["update"])


# ------------------------------------------------------------------------------------------ hazards
HAZARD_CHECKS = [
    ("Heuristic filter labelled as DP (clipping without noise, filters)", ["dp_label_has_accountant"],
     "every DP label needs a dp_plan with an accountant and a non-zero noise multiplier"),
    ("Per-round epsilon presented as the total", [],
     "every epsilon in this report is composed over all rounds and tasks from the ledger; per-round values are cumulative"),
    ("Understated steps", ["epsilon_recomputed", "independent_accountant_agreement"],
     "ledger steps are compared with the optimizer's observed steps and the round metrics; epsilon is recomputed "
     "by the accountant and by an independent library"),
    ("Sampling assumption mismatch (Poisson assumed, shuffling used)", ["sampling_assumption"],
     "the ledger records the sampling actually used by the private data loader"),
    ("delta not well below 1/n for small hospitals", ["delta_below_1_over_n"], "delta is compared with 1/n per hospital"),
    ("Record-level unit when patients have several records", ["privacy_unit"],
     "patient-level epsilon by group privacy when records per patient are known"),
    ("Accounting library limits (PRV at large epsilon, failures)", ["independent_accountant_agreement", "epsilon_tier"],
     "accountant, library version and error bound are reported; a second library recomputes"),
    ("Key custody (server with the secret key; unnoised updates at the server)", ["server_secret_key", "secure_aggregation"],
     "the key holder's ledger shows who decrypted what"),
    ("Public or server-side data outside the guarantee", [],
     "the server's public split is named as outside the guarantee (covered_accesses, guarantee statement)"),
    ("Lost or reset accountant state", ["ledger_verified"],
     "spend is rebuilt from the hash-chained ledger; the report embeds each chain head"),
]


def hazards(checks: dict[str, dict]) -> list[dict]:
    out = []
    for hazard, names, how in HAZARD_CHECKS:
        st = _worst(checks[n]["status"] for n in names) if names else "not_applicable"
        if not names:  # handled by how the report is built, with no check that could fail: never "pass"
            how = "by construction, no check: " + how
        elif st == "not_applicable":
            how = how + " (not applicable: " + "; ".join(checks[n]["reason"] for n in names) + ")"
        out.append({"hazard": hazard, "status": st, "checks": names, "how_checked": how,
                    "detail": "; ".join(checks[n]["reason"] for n in names if checks[n]["status"] in ("attention", "fail"))})
    return out


REGULATORY = [
    ("HIPAA Expert Determination, 45 CFR 164.514(b)(1)", "methods and results for a qualified expert",
     ["privacy_definition", "accounting", "audit"], ["differential_privacy", "dp_label_has_accountant", "audit_run",
                                                     "audit_consistent_with_accountant", "measured_leakage"],
     "evidence only: this tool does not certify de-identification; an expert must determine the risk"),
    ("HIPAA Security Rule, 45 CFR 164.312(b)", "audit controls", ["provenance"], ["ledger_verified"],
     "hash-chained privacy ledgers per hospital, heads in this signed report"),
    ("GDPR Art. 35(7)(a)", "systematic description of the processing and its purposes", ["scope"], [], ""),
    ("GDPR Art. 35(7)(b)", "necessity and proportionality", ["utility", "privacy_definition"], ["*attention"],
     "needs a person's assessment; the report gives utility and privacy figures to weigh"),
    ("GDPR Art. 35(7)(c)", "risks to the rights and freedoms of data subjects", ["threat_model", "audit"],
     ["differential_privacy", "audit_run", "mia_low_fpr", "measured_leakage", "dp_lower_bound"], ""),
    ("GDPR Art. 35(7)(d)", "measures, safeguards and security mechanisms", ["accounting", "aggregation"],
     ["differential_privacy", "secure_aggregation", "server_secret_key"], ""),
    ("EU AI Act Art. 12", "automatic logging of events", ["provenance", "budget"], ["ledger_verified"], ""),
    ("EU AI Act Art. 19 / 26(6)", "keep logs for at least six months", ["provenance"], ["*attention"],
     "retention is the operator's duty; the toolkit does not enforce it"),
    ("EU AI Act Art. 15", "robustness and cybersecurity, incl. confidentiality attacks", ["audit", "aggregation"],
     ["audit_run", "audit_consistent_with_accountant", "mia_low_fpr", "measured_leakage", "dp_lower_bound",
      "server_secret_key"], ""),
    ("EHDS (Reg. 2025/327) secondary use", "processing logs; only non-personal data leaves", ["provenance", "accounting", "audit"],
     ["ledger_verified", "differential_privacy", "audit_run"], "released artifacts are DP-trained aggregates; see the guarantee"),
    ("NIST SP 800-226, top of the pyramid", "the privacy-loss parameters", ["accounting"],
     ["differential_privacy", "epsilon_tier", "delta_below_1_over_n", "budget_respected", "baseline_spend_composed"], ""),
    ("NIST SP 800-226, middle of the pyramid", "factors that can undermine the guarantee (security)", ["aggregation", "threat_model"],
     ["server_secret_key", "secure_aggregation", "ledger_verified"], ""),
    ("NIST SP 800-226, bottom of the pyramid", "data collection exposure", ["data_inventory"], ["*attention"],
     "how the hospitals collected and store the data is outside this run"),
]


#: rows whose evidence is the DP guarantee: without DP they fail
DP_ROWS = {"HIPAA Expert Determination, 45 CFR 164.514(b)(1)", "GDPR Art. 35(7)(c)", "EU AI Act Art. 15",
           "EHDS (Reg. 2025/327) secondary use", "NIST SP 800-226, top of the pyramid"}


def regulatory(checks: dict[str, dict], dp: bool = True) -> list[dict]:
    out = []
    for framework, requirement, sections, names, note in REGULATORY:
        if framework.startswith("EHDS") and not dp:
            note = "released artifacts are NOT differentially private: nothing argues that they are non-personal data"
        if framework in DP_ROWS and not dp:
            st = "fail"
            note = (note + "; " if note else "") + "no differential privacy in this run"
        elif names == ["*attention"]:
            st = "attention"
        elif not names:
            st = "not_applicable"
            note = note or "descriptive: see the report sections named; no check stands behind this row"
        else:
            st = _worst(checks[n]["status"] for n in names)
        out.append({"framework": framework, "requirement": requirement, "sections": sections, "status": st,
                    "checks": [n for n in names if not n.startswith("*")], "note": note})
    return out


# ------------------------------------------------------------------------------------------ statements
def does_not_cover(cfg, dp: bool) -> list[str]:
    t = _transport(cfg)
    out = [
        "the server's public split used for knowledge injection (treated as public data; it is outside the guarantee)",
        "the held-out test splits and the aggregate metrics computed on them (accuracy, AUROC, F1, MCC)",
        "record and step counts sent to the server each round (exact, not DP)",
        "training losses: " + ("they stay at the hospital in DP runs" if dp else "they were sent to the server unprotected"),
        "hyperparameter choices and any tuning done on private data before the run",
        "patients with several records beyond the record level, unless a patient-level epsilon is given",
        "which rounds each hospital attended (participation pattern) and timing",
        "what each hospital's own staff can see of its own data",
    ]
    if t.not_covered:
        out.append(t.not_covered)
    return out


def _hospital_statement(h: dict, t) -> str:
    name = h["hospital"]
    if not h["dp"] or not h.get("accounting"):
        if h["dp"]:
            return (f"{name}: labelled DP, but no epsilon can be stated: its ledger gives no accountable record "
                    f"(see the checks). No guarantee is claimed.")
        return f"{name}: no differential privacy. Its updates and the models trained on them carry no formal guarantee."
    m, a = h["mechanism"], h["accounting"]
    ind = a["independent_recomputation"]
    rates = ", ".join(g(q) for q in m["sample_rates"])
    if a.get("privacy_unit") == "patient":
        how = (f"patient-level DP-SGD (Poisson sampling of patients at rate {rates}; each sampled patient's gradient, summed "
               f"over at most {m.get('max_records_per_patient_step')} of its records per step, clipped to norm "
               f"{g(m['max_grad_norm'])}")
        data, adjacent = f"{m['n_records']} records of {m.get('n_patients')} patients", "one patient with all their records"
    else:
        how = f"DP-SGD (Opacus; Poisson sampling at rate {rates}; per-record clipping norm {g(m['max_grad_norm'])}"
        data, adjacent = f"{m['n_records']} records", "one record"
    text = (
        f"{name}: every update this hospital sent ({m['rounds_attended']} of {m['rounds_planned']} planned rounds; all "
        f"checkpoints, not only the final model) was trained with {how}; "
        f"noise multiplier {g(m['noise_multiplier'], 4)}; "
        f"{m['steps_total']} steps) on {data}. Under add/remove adjacency of {adjacent}, the "
        f"federated training satisfies (epsilon = {g(a['epsilon_spent'])}, delta = {g(a['delta'])})-differential privacy "
        f"for this hospital, as computed by the {a['accountant'].upper()} accountant ({a['accountant_library']}) from its "
        f"ledger, against a budget of {g(a['epsilon_budget'])}."
    )
    if len(a.get("released_spends", [])) > 1:
        text += (f" Its records were also used by a released single-hospital baseline trained with DP (epsilon "
                 f"{g(a['released_spends'][1]['epsilon'])}); composed, this hospital's records carry (epsilon = "
                 f"{g(a['epsilon_total'])}, delta = {g(a['delta'])}): this is the hospital's reported epsilon.")
    lt = a.get("lifetime")
    if lt:
        counted = [r["run_id"] for r in lt["runs"] if r["counted"]]
        text += (f" Over its lifetime, the same records were used by {len(counted)} earlier run(s) ("
                 f"{', '.join(counted) or 'none on the same data'}; epsilon {g(lt['epsilon_earlier'])} composed); with "
                 f"this run they carry (epsilon = {g(lt['epsilon'])}, delta = {g(lt['delta'])})"
                 + (f", against a lifetime cap of {g(lt['cap'])} set by the hospital's policy." if lt["cap"] is not None
                    else " (the hospital's policy sets no lifetime cap)."))
    if ind.get("epsilon") is not None:
        text += (f" An independent recomputation ({ind['library']}, {ind['method'].upper()}) gives "
                 f"{g(ind['epsilon'])} ({ind['relative_difference']:+.2%}).")
    if len(a.get("released_spends", [])) > 1:
        text += (f" Gaussian-DP mu is about {g(a['gdp_mu_total'])} for the federation and the baseline composed "
                 f"({g(a['gdp_mu'])} for the federation alone; central-limit approximation).")
    else:
        text += f" Gaussian-DP mu is about {g(a['gdp_mu_total'])} (the federation's steps; central-limit approximation)."
    p = a.get("patient_level")
    if a.get("privacy_unit") == "patient":
        text += " This is a patient-level guarantee: every epsilon above is per patient."
    elif p and p["max_records_per_patient"] > 1:
        text += (f" A patient with up to {p['max_records_per_patient']} records is protected at (epsilon = "
                 f"{g(p['epsilon'])}, delta = {g(p['delta'])}) by group privacy.")
    elif p:
        text += " Each patient has one record here, so this is also a patient-level guarantee."
    elif (a.get("records_per_patient_at_least") or 1) > 1:
        text += (f" A patient can have at least {a['records_per_patient_at_least']} records here: this is a record-level "
                 f"guarantee only and does not bound what the run reveals about one patient.")
    else:
        text += " Records per patient are unknown: this is a record-level guarantee only."
    if t.protects_one_update:
        text += (f" Its updates were also protected in transit and at the server by {t.title}; that is "
                 f"confidentiality, not differential privacy, and adds nothing to epsilon.")
    return text


def guarantee(report: dict, cfg) -> dict:
    t = _transport(cfg)
    dp = report["privacy_definition"]["dp"]
    per = [{"hospital": h["hospital"], "text": _hospital_statement(h, t)} for h in report["hospitals"]]
    others = None
    o = report.get("other_hospitals")
    if o:
        if o["stats_shown"] and o.get("epsilon_total"):
            e = o["epsilon_total"]
            others = (f"The other {o['count']} hospitals' statements are not part of this partner report; each of their "
                      f"epsilons lies between {g(e['low'])} and {g(e['high'])} (a coarse band that hides each one).")
        else:
            others = f"The other {o['count']} hospitals' figures are not part of this partner report."
    dnc = does_not_cover(cfg, dp)
    head = ("Differential privacy guarantee, per hospital (the federation as a whole has no single epsilon: each "
            "hospital's records are protected by its own DP-SGD)." if dp else
            "No differential privacy: this run trained without DP-SGD, so no epsilon is stated and the released models "
            "carry no formal privacy guarantee.")
    if not dp and t.protects_one_update:
        head += f" {t.title} protected the confidentiality of updates; it is not differential privacy."
    parts = [head] + [p["text"] for p in per] + ([others] if others else [])
    parts.append("This guarantee does not cover: " + "; ".join(dnc) + ".")
    return {"text": "\n\n".join(parts), "per_hospital": per, "other_hospitals": others, "does_not_cover": dnc}


def _lead(report: dict) -> str:
    """The summary's first sentence: the overall status, the decision and why."""
    st = report["status"]["overall"]
    lead = f"Overall status: {st.upper()} ({DECISIONS[st]})"
    if not report["privacy_definition"]["dp"]:
        return lead + (": this run used no differential privacy, so the released models carry no formal privacy "
                       "guarantee.")
    for status, words in (("fail", "failed"), ("attention", "need attention"), ("inconclusive", "are inconclusive")):
        names = [title_of(c["name"]) for c in report["checks"] if c["status"] == status]
        if names:
            return lead + f": {len(names)} check(s) {words}: " + "; ".join(names) + "."
    return lead + "."


def summary(report: dict, cfg, rounds: int) -> dict:
    partner = report["partner"]
    hs = report["hospitals"]
    dp_h = [h for h in hs if h["dp"] and h.get("accounting")]
    tasks = [t.name for t in cfg.tasks.train]
    n = report["scope"]["federation_size"]
    s = _lead(report)
    s += (f" This report covers run '{report['run_id']}' of the federation '{report['federation_name']}': {n} hospitals "
          f"trained {', '.join(tasks)} over {rounds} round(s)")
    s += f" (a report for {partner})." if partner else "."
    headline: dict[str, Any]
    if partner:
        h = hs[0]
        a = h.get("accounting")
        if a:
            composed = len(a["released_spends"]) > 1
            s += (f" Your hospital's records carry epsilon {g(a['epsilon_total'])} per {cfg.privacy.unit} (budget {g(a['epsilon_budget'])}, "
                  f"remaining {g(a['epsilon_remaining'])}), at delta {g(a['delta'])} (Gaussian-DP mu about {g(a['gdp_mu_total'])}, "
                  + ("federation and baseline composed)" if composed else "federation)")
                  + (", the federation's and the single-hospital baseline's spends composed." if composed else "."))
            headline = {"hospital": partner, "epsilon": a["epsilon_total"], "delta": a["delta"], "gdp_mu": a["gdp_mu_total"],
                        "gdp_mu_covers": a["gdp_mu_covers"]["gdp_mu_total"], "epsilon_budget": a["epsilon_budget"],
                        "epsilon_remaining": a["epsilon_remaining"]}
        else:
            s += (" Your hospital did not train with differential privacy: no epsilon is stated." if not h["dp"] else
                  " Your hospital is labelled DP but no epsilon can be stated (see the failed checks).")
            headline = {"hospital": partner, "epsilon": None, "delta": None, "gdp_mu": None, "epsilon_budget": None}
        o = report["other_hospitals"]
        if o and o["stats_shown"] and o.get("epsilon_total"):
            s += (f" Each of the other {o['count']} hospitals' epsilons lies between {g(o['epsilon_total']['low'])} and "
                  f"{g(o['epsilon_total']['high'])}.")
    else:
        eps = [h["accounting"]["epsilon_total"] for h in dp_h if h["accounting"]["epsilon_total"] is not None]
        if dp_h and eps:
            s += (f" {len(dp_h)} of {len(hs)} hospitals trained with differential privacy ({cfg.privacy.unit}-level "
                  f"DP-SGD): each hospital's records carry epsilon per {cfg.privacy.unit} {g(min(eps))} to {g(max(eps))} (every released spend composed), at "
                  f"delta up to {g(max(h['accounting']['delta'] for h in dp_h))}.")
        else:
            s += " No epsilon is stated and the models carry no formal guarantee."
        headline = {"epsilon_spent": {"min": min(eps), "max": max(eps)} if eps else None,
                    "delta_max": max((h["accounting"]["delta"] for h in dp_h), default=None),
                    "gdp_mu_max": max((h["accounting"]["gdp_mu_total"] for h in dp_h
                                       if h["accounting"]["gdp_mu_total"] is not None), default=None),
                    "gdp_mu_covers": "every released spend on a hospital's records composed (gdp_mu_total)"}
    s += " " + _transport(cfg).summary_sentence
    audit = report["audit"]
    if not audit["run"]:
        s += " No leakage audit was run."
    else:
        w = audit.get("worst_leakage")
        s += f" A leakage audit was run ({len(audit['mia'])} membership-inference results"
        s += f"; worst measured leakage: {leakage_words(w)})." if w else ")."
    s += " This report is evidence for people to judge; it does not certify compliance with HIPAA, GDPR or any law."
    return {"plain_language": s, "headline": headline}


def _reading(mu: float | None) -> str:
    tpr = tpr_at_fpr(mu)
    if tpr is None:
        return "no differential privacy: nothing bounds what an attacker can learn about a record"
    return (f"an attacker who wrongly flags 1% of people who were not in the training data finds at most about "
            f"{tpr:.0%} of this hospital's training records (from Gaussian-DP mu {mu:.3g}, an approximation)")


def leakage_words(w: dict) -> str:
    """The worst measured leakage (``audit.worst_leakage``, computed once by the builder) in words."""
    ci = w.get("auc_ci")
    interval = f", 95% interval {g(ci[0])} to {g(ci[1])}" if ci else ", no interval reported"
    return f"{w['attack']} attack on {w['where']}: AUC {g(w['auc'])}{interval} ({w['status']}; 0.5 is chance)"


def first_page(report: dict, cfg) -> dict:
    """What a privacy officer acts on: the decision with its reasons, epsilon per hospital in plain terms, the
    worst measured leakage, what is not covered, and the checks in words."""
    st = report["status"]["overall"]
    checks = report["checks"]
    reasons = []
    if not report["privacy_definition"]["dp"]:  # one reason for all the checks that fail for want of DP
        no_dp = [c for c in checks if c["status"] == "fail" and (c["name"] == "differential_privacy"
                                                                 or c["reason"].startswith("no differential privacy in this run"))]
        reasons.append("No differential privacy: the released models carry no formal privacy guarantee, so every check "
                       "that needs one fails (" + ", ".join(title_of(c["name"]) for c in no_dp) + ")")
        checks = [c for c in checks if c not in no_dp]
    reasons += [f"{title_of(c['name'])}: {c['reason']}" for status in ("fail", "attention", "inconclusive")
                for c in checks if c["status"] == status]
    hospitals = []
    for h in report["hospitals"]:
        a = h.get("accounting")
        mu = a["gdp_mu_total"] if a else None
        hospitals.append({"hospital": h["hospital"], "epsilon": a["epsilon_total"] if a else None,
                          "epsilon_of": "every released spend on its records composed (federation and baseline)" if a
                          and len(a["released_spends"]) > 1 else "the federation's spend (no other release)" if a else None,
                          "epsilon_remaining": a["epsilon_remaining"] if a else None,
                          "delta": a["delta"] if a else None, "gdp_mu": mu,
                          "gdp_mu_covers": a["gdp_mu_covers"]["gdp_mu_total"] if a else None,
                          "tpr_at_1pct_fpr": tpr_at_fpr(mu), "reading": _reading(mu)})
    o = report.get("other_hospitals")
    others = None
    if o:
        e = o.get("epsilon_total")
        if e:
            others = f"{o['count']} other hospitals: each epsilon between {g(e['low'])} and {g(e['high'])}"
        elif o["stats_shown"]:
            others = f"{o['count']} other hospitals: no epsilon to show (no differential privacy)"
        else:
            others = f"{o['count']} other hospitals: figures withheld ({o['stats_note']})"
    worst = report["audit"].get("worst_leakage")
    if worst is not None:
        worst = {**worst, "text": leakage_words(worst)}
    return {
        "decision": DECISIONS[st],
        "reasons": reasons or ["every check with evidence behind it passed"],
        "hospitals": hospitals,
        "other_hospitals": others,
        "worst_leakage": worst,
        "worst_leakage_text": worst["text"] if worst else ("no leakage audit was run" if not report["audit"]["run"] else
                                                           "the audit has no membership-inference result that is not "
                                                           "an audit fault"),
        "conditions": conditions(report),
        "setting": setting(report),
        "patient_exposure": patient_exposure(report),
        "not_covered": report["guarantee_statement"]["does_not_cover"][:4],
        "checks": [{"name": c["name"], "title": title_of(c["name"]), "status": c["status"]}
                   for c in report["checks"]],
    }


def conditions(report: dict) -> list[dict]:
    """The decision's conditions as actions (``summary.first_page.conditions``): one per check that did not pass,
    worst first, and one per task whose records are one person."""
    out = []
    for status in ("fail", "attention", "inconclusive"):
        for c in report["checks"]:
            if c["status"] == status:
                action = action_for(c["name"], status)
                out.append({"action": action, "check": c["name"], "status": status})
    for t in (report.get("data_inventory") or {}).get("tasks", []):
        if t.get("persons") == "one" and t.get("role") == "train" and report["privacy_definition"]["dp"]:
            out.append({"action": f"Do not release the {t['task']} task's model as protecting its patient: its records "
                                  "are all one person, so the record-level guarantee says nothing about that person",
                        "check": "privacy_unit", "status": "attention"})
    return out


def setting(report: dict) -> str:
    """Simulation or deployment, in words."""
    if report["scope"].get("engine") == "flower deployment":
        return ("deployment: the hospitals ran their own nodes (Flower deployment engine); the evidence is from that run")
    return ("simulation: every hospital ran as a process on one machine (Flower's simulation engine); no network, TLS or "
            "separate custody was exercised, so this is evidence about the method, not about a deployment")


def patient_exposure(report: dict) -> dict:
    """What the guarantee means for a patient, in plain words, per hospital and per task."""
    lines, per = [], []
    if not report["privacy_definition"]["dp"]:
        return {"text": "No differential privacy: no patient is protected by a formal guarantee.", "hospitals": [], "tasks": []}
    for h in report["hospitals"]:
        a = h.get("accounting")
        if not a:
            continue
        p = a.get("patient_level")
        if a.get("privacy_unit") == "patient":
            words = f"{h['hospital']}: every epsilon is per patient (epsilon {g(a['epsilon_total'])} for a patient with all their records)."
            meaningful = True
        elif p and p["max_records_per_patient"] <= 1:
            words = f"{h['hospital']}: one record per patient, so each patient has the record-level epsilon {g(a['epsilon_total'])}."
            meaningful = True
        elif p:
            meaningful = p.get("meaningful", False)
            words = (f"{h['hospital']}: a patient can have up to {p['max_records_per_patient']} records, so one patient is "
                     f"protected only at epsilon {g(p['epsilon'])} with delta {g(p['delta'])} (group privacy)"
                     + (": no meaningful patient-level guarantee." if not meaningful else "."))
        else:
            meaningful = False
            words = (f"{h['hospital']}: records per patient are unknown (a task has no patient ids), so the guarantee is per "
                     "record only and says nothing certain about a patient with several records.")
        lines.append(words)
        per.append({"hospital": h["hospital"], "meaningful": meaningful, "text": words})
    tasks = []
    for t in (report.get("data_inventory") or {}).get("tasks", []):
        if t.get("persons") in ("one", "few") and t.get("role") == "train":
            words = (f"The {t['task']} task's records come from {'one person' if t['persons'] == 'one' else 'a few persons'}"
                     f": they carry no meaningful patient-level guarantee ({t.get('persons_note') or 'see the task registry'}).")
            lines.append(words)
            tasks.append({"task": t["task"], "persons": t["persons"], "text": words})
    return {"text": " ".join(lines), "hospitals": per, "tasks": tasks}


def _tier(eps: float | None) -> str:
    if eps is None:
        return "none (no finite epsilon)"
    return "strong (epsilon <= 1)" if eps <= 1 else "reasonable (epsilon <= 10)" if eps <= 10 else "weak (epsilon > 10)"


def disclosure_card(report: dict, cfg, randomness: dict[str, dict]) -> dict | None:
    """The DP disclosure card (DP Deployments Registry fields and NIST SP 800-226's lower layers), from the report's
    own fields and the run's ledgers (``randomness``: per hospital, the generators its DP sessions recorded)."""
    dp_h = [h for h in report["hospitals"] if h.get("accounting")]
    if not report["privacy_definition"]["dp"]:
        return None
    eps = [h["accounting"]["epsilon_total"] for h in dp_h if h["accounting"]["epsilon_total"] is not None]
    pdef = report["privacy_definition"]
    prov = report["provenance"]["package_versions"]
    kinds = sorted({k for r in randomness.values() for k in r["kinds"]})
    if kinds == ["secure"]:
        source = ("secure: a ChaCha20 keystream keyed from the OS for every DP session (privacy.randomness), as every "
                  "dp_round entry of the run records")
        fp = ("Gaussian noise as the sum of four Box-Muller draws halved, at the gradient's precision (float32 on 24-bit "
              "uniforms, float64 on 53-bit; Holohan and Braghin 2021), against "
              "floating-point attacks on the sampler (privacy.randomness)")
    elif kinds:
        source = "as recorded per DP session: " + ", ".join(kinds) + ("; a reproducible generator is not fit for release"
                                                                       if "reproducible" in kinds else "")
        fp = "not shown: the noise did not come only from the secure generator"
    else:
        source = "not recorded: the ledgers were written before the randomness source was recorded"
        fp = "not recorded"
    return {
        "tier": _tier(max(eps) if eps else None),
        "unit_of_privacy": pdef["privacy_unit"],
        "adjacency": pdef.get("adjacency_statement") or pdef["adjacency"],
        "epsilon": {h["hospital"]: h["accounting"]["epsilon_total"] for h in dp_h},
        "epsilon_of": "per hospital, every released spend on its records composed (federation and single-hospital baseline)",
        "delta": {h["hospital"]: h["accounting"]["delta"] for h in dp_h},
        "model": "central DP per hospital: each hospital is the curator of its own records and adds the noise itself "
                 "(DP-SGD); neither the server nor the other hospitals need to be trusted for the guarantee",
        "accounting": sorted({f"{h['accounting']['accountant'].upper()} ({h['accounting']['accountant_library']})"
                              for h in dp_h}) + [f"cross-check: {report['accounting']['independent_library']} "
                                                 f"({'PLD' if any(h['accounting']['accountant'] == 'prv' for h in dp_h) else 'RDP'})"],
        "implementation": f"secure-fedkim {prov.get('secure-fedkim')} (DP-SGD on Opacus {prov.get('opacus')}, torch "
                          f"{prov.get('torch')})",
        "trust_model": "each hospital runs its own training and ledger; an honest-but-curious aggregation server and key "
                       "holder that do not collude see only encrypted or masked updates and their aggregate",
        "randomness_source": source,
        "randomness_by_hospital": {c: r["kinds"] or ["not recorded"] for c, r in randomness.items()},
        "floating_point_protection": fp,
        "record_per_task": [{"task": t["task"], "record": t.get("task_privacy_unit"), "persons": t.get("persons")}
                            for t in (report.get("data_inventory") or {}).get("tasks", [])],
        "setting": setting(report),
    }


LIMITATIONS = [
    "The guarantee is per hospital, at the run's privacy unit (add/remove one record, or one patient with all their "
    "records); there is no single federation epsilon.",
    "A hash chain is not a signature: a ledger rewritten whole verifies on its own; this signed report's chain heads detect it.",
    "Gaussian-DP mu is a central-limit approximation, not a bound; the (epsilon, delta) of the accountant is the claim.",
    "Membership-inference audits give empirical evidence, not proof; a lower bound below epsilon does not show tightness.",
    "HE and SecAgg+ assume no collusion between the aggregation server and the key holder or enough hospitals.",
    "The signature shows who issued the report and that nothing changed since; it does not make the figures true.",
]

GLOSSARY = [
    {"term": "differential privacy (DP)", "meaning": "a guarantee that the output changes little whether or not any one record was used; epsilon and delta measure how little"},
    {"term": "epsilon", "meaning": "the privacy loss: smaller is stronger (<= 1 strong, <= 10 reasonable, > 10 weak)"},
    {"term": "delta", "meaning": "the small probability that the epsilon bound fails; it must be far below 1/n for n records"},
    {"term": "Gaussian-DP mu", "meaning": "a one-number summary of the same guarantee; an attacker's power relates to mu directly"},
    {"term": "DP-SGD", "meaning": "training that clips each record's gradient and adds Gaussian noise at every step"},
    {"term": "accountant", "meaning": "the software that adds up the privacy loss of all training steps (here Opacus PRV or RDP)"},
    {"term": "privacy ledger", "meaning": "a hospital's append-only, hash-chained record of every privacy-relevant event"},
    {"term": "CKKS", "meaning": "homomorphic encryption: the server adds encrypted updates without seeing them"},
    {"term": "SecAgg+", "meaning": "secure aggregation by masking: the server learns only the sum of the updates"},
    {"term": "membership inference (MIA)", "meaning": "an attack that guesses whether a record was used in training; AUC 0.5 is chance"},
    {"term": "TPR at FPR", "meaning": "how many training records an attack finds while wrongly flagging only that fraction of others"},
    {"term": "canary audit", "meaning": "inserting marked records to measure, from below, how much the training leaks"},
]
