"""The report's words: scope, privacy definition, threat model, guarantee statement, summary, hazards,
regulatory mapping, glossary. Every number in a sentence is taken from the report's own fields."""

from __future__ import annotations

from typing import Any

_RANK = {"not_applicable": -1, "pass": 0, "attention": 1, "fail": 2}


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


def _mode_words(mode: str) -> str:
    return {"he": "CKKS homomorphic encryption", "secagg": "SecAgg+ secure aggregation", "plain": "plain (unencrypted) aggregation"}[mode]


# ------------------------------------------------------------------------------------------ scope
def scope(cfg, partner: str | None, n_hospitals: int) -> dict:
    mode = cfg.federation.aggregation
    form = {"he": "CKKS ciphertext, signed (Ed25519)", "secagg": "SecAgg+-masked vector", "plain": "plaintext weights"}[mode]
    dp = cfg.privacy.dp
    roles = [
        {"party": "each hospital", "role": "controller of its patients' records; runs its own node, its DP-SGD and its privacy ledger"},
        {"party": "aggregation server (federation operator)", "role": "processor for the hospitals: sums updates, injects "
         "the aggregate into the foundation model on its public split (joint-controller terms, GDPR Art. 26, to be agreed)"},
    ]
    if mode == "he":
        roles.append({"party": "CKKS key holder", "role": "a separate process that alone holds the secret key and "
                      "decrypts only sums of at least min_clients hospitals, once per round"})
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


def privacy_definition(cfg, any_dp: bool, per_patient: dict, view: list[str]) -> dict:
    covered = "covered" if any_dp else "not covered"
    return {
        "dp": any_dp,
        "dp_setting": ("record-level DP-SGD at each hospital (Opacus; Poisson sampling, per-record clipping, Gaussian "
                       "noise): each hospital is the curator of its own records (central DP per hospital)")
        if any_dp else "no differential privacy",
        "privacy_unit": "record" if any_dp else None,
        "max_records_per_patient": {c: per_patient.get(c) for c in view} if any_dp else None,
        "adjacency": "add/remove one record" if any_dp else None,
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
            {"access": "single-hospital baselines (simulation only)", "status": "not covered",
             "reason": "trained without DP to compare; only their test metrics are published, the models are not"},
        ],
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
    mode = cfg.federation.aggregation
    dp_words = "DP-SGD bounds what it reveals about any one record (epsilon per hospital)" if dp else None
    none = "nothing: no differential privacy in this run"
    rows = []

    def row(adversary, asset, protected_by, not_protected):
        rows.append({"adversary": adversary, "asset": asset, "protected_by": protected_by, "not_protected": not_protected})

    row("curious aggregation server", "raw patient records", "records never leave the hospital (federated training)",
        "nothing beyond what updates and the released models reveal")
    if mode == "he":
        row("curious aggregation server", "one hospital's update",
            "CKKS encryption; the server holds a public-only context and never the secret key"
            + ("; " + dp_words if dp else ""),
            "a malicious server could submit one hospital's ciphertext as an 'aggregate' (SecAgg+ mode answers that); "
            "collusion with the key holder reveals every update")
    elif mode == "secagg":
        row("curious aggregation server", "one hospital's update",
            "SecAgg+ masks that cancel only in the sum" + ("; " + dp_words if dp else ""),
            "a server that also controls enough hospitals (at least the reconstruction threshold) could unmask one")
    else:
        row("curious aggregation server", "one hospital's update", dp_words or "nothing",
            "the update itself: the server sees it in the clear")
    row("curious aggregation server", "the aggregate of all updates", dp_words or none,
        "the aggregate is in the clear at the server by design" + ("" if dp else "; without DP it can reveal records"))
    if mode == "he":
        row("CKKS key holder", "one hospital's update", "it decrypts only sums of at least min_clients signed "
            "contributions, once per round, with noise flooding", "collusion with the server (assumed absent)")
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
        st = _worst(checks[n]["status"] for n in names) if names else "pass"
        if names and st == "not_applicable":
            how = how + " (not applicable: " + "; ".join(checks[n]["reason"] for n in names) + ")"
        out.append({"hazard": hazard, "status": st, "checks": names, "how_checked": how,
                    "detail": "; ".join(checks[n]["reason"] for n in names if checks[n]["status"] in ("attention", "fail"))})
    return out


REGULATORY = [
    ("HIPAA Expert Determination, 45 CFR 164.514(b)(1)", "methods and results for a qualified expert",
     ["privacy_definition", "accounting", "audit"], ["dp_label_has_accountant", "audit_run", "audit_consistent_with_accountant"],
     "evidence only: this tool does not certify de-identification; an expert must determine the risk"),
    ("HIPAA Security Rule, 45 CFR 164.312(b)", "audit controls", ["provenance"], ["ledger_verified"],
     "hash-chained privacy ledgers per hospital, heads in this signed report"),
    ("GDPR Art. 35(7)(a)", "systematic description of the processing and its purposes", ["scope"], [], ""),
    ("GDPR Art. 35(7)(b)", "necessity and proportionality", ["utility", "privacy_definition"], ["*attention"],
     "needs a person's assessment; the report gives utility and privacy figures to weigh"),
    ("GDPR Art. 35(7)(c)", "risks to the rights and freedoms of data subjects", ["threat_model", "audit"], ["audit_run", "mia_low_fpr"], ""),
    ("GDPR Art. 35(7)(d)", "measures, safeguards and security mechanisms", ["accounting", "aggregation"],
     ["differential_privacy", "secure_aggregation", "server_secret_key"], ""),
    ("EU AI Act Art. 12", "automatic logging of events", ["provenance", "budget"], ["ledger_verified"], ""),
    ("EU AI Act Art. 19 / 26(6)", "keep logs for at least six months", ["provenance"], ["*attention"],
     "retention is the operator's duty; the toolkit does not enforce it"),
    ("EU AI Act Art. 15", "robustness and cybersecurity, incl. confidentiality attacks", ["audit", "aggregation"],
     ["audit_run", "audit_consistent_with_accountant", "mia_low_fpr", "server_secret_key"], ""),
    ("EHDS (Reg. 2025/327) secondary use", "processing logs; only non-personal data leaves", ["provenance", "accounting", "audit"],
     ["ledger_verified", "differential_privacy", "audit_run"], "released artifacts are DP-trained aggregates; see the guarantee"),
    ("NIST SP 800-226, top of the pyramid", "the privacy-loss parameters", ["accounting"],
     ["differential_privacy", "epsilon_tier", "delta_below_1_over_n", "budget_respected"], ""),
    ("NIST SP 800-226, middle of the pyramid", "factors that can undermine the guarantee (security)", ["aggregation", "threat_model"],
     ["server_secret_key", "secure_aggregation", "ledger_verified"], ""),
    ("NIST SP 800-226, bottom of the pyramid", "data collection exposure", ["data_inventory"], ["*attention"],
     "how the hospitals collected and store the data is outside this run"),
]


def regulatory(checks: dict[str, dict]) -> list[dict]:
    out = []
    for framework, requirement, sections, names, note in REGULATORY:
        if names == ["*attention"]:
            st = "attention"
        elif not names:
            st = "pass"
        else:
            st = _worst(checks[n]["status"] for n in names)
            st = "pass" if st == "not_applicable" else st
        out.append({"framework": framework, "requirement": requirement, "sections": sections, "status": st,
                    "checks": [n for n in names if not n.startswith("*")], "note": note})
    return out


# ------------------------------------------------------------------------------------------ statements
def does_not_cover(cfg, dp: bool) -> list[str]:
    mode = cfg.federation.aggregation
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
    if mode == "he":
        out.append("a server colluding with the CKKS key holder (encryption is confidentiality, not DP)")
    if mode == "secagg":
        out.append("a server controlling enough hospitals to unmask one (masking is confidentiality, not DP)")
    return out


def _hospital_statement(h: dict, mode: str) -> str:
    name = h["hospital"]
    if not h["dp"] or not h.get("accounting"):
        if h["dp"]:
            return (f"{name}: labelled DP, but no epsilon can be stated: its ledger gives no accountable record "
                    f"(see the checks). No guarantee is claimed.")
        return f"{name}: no differential privacy. Its updates and the models trained on them carry no formal guarantee."
    m, a = h["mechanism"], h["accounting"]
    ind = a["independent_recomputation"]
    rates = ", ".join(g(q) for q in m["sample_rates"])
    text = (
        f"{name}: every update this hospital sent ({m['rounds_attended']} of {m['rounds_planned']} planned rounds; all "
        f"checkpoints, not only the final model) was trained with DP-SGD (Opacus; Poisson sampling at rate {rates}; "
        f"noise multiplier {g(m['noise_multiplier'], 4)}; per-record clipping norm {g(m['max_grad_norm'])}; "
        f"{m['steps_total']} steps) on {m['n_records']} records. Under add/remove adjacency of one record, the run "
        f"satisfies (epsilon = {g(a['epsilon_spent'])}, delta = {g(a['delta'])})-differential privacy for this "
        f"hospital, as computed by the {a['accountant'].upper()} accountant ({a['accountant_library']}) from its "
        f"ledger, against a budget of {g(a['epsilon_budget'])}."
    )
    if ind.get("epsilon") is not None:
        text += (f" An independent recomputation ({ind['library']}, {ind['method'].upper()}) gives "
                 f"{g(ind['epsilon'])} ({ind['relative_difference']:+.2%}).")
    text += f" Gaussian-DP mu is about {g(a['gdp_mu'])} (central-limit approximation)."
    p = a.get("patient_level")
    if p and p["max_records_per_patient"] > 1:
        text += (f" A patient with up to {p['max_records_per_patient']} records is protected at (epsilon = "
                 f"{g(p['epsilon'])}, delta = {g(p['delta'])}) by group privacy.")
    elif p:
        text += " Each patient has one record here, so this is also a patient-level guarantee."
    elif (a.get("records_per_patient_at_least") or 1) > 1:
        text += (f" A patient can have at least {a['records_per_patient_at_least']} records here: this is a record-level "
                 f"guarantee only and does not bound what the run reveals about one patient.")
    else:
        text += " Records per patient are unknown: this is a record-level guarantee only."
    if mode in ("he", "secagg"):
        text += (f" Its updates were also protected in transit and at the server by {_mode_words(mode)}; that is "
                 f"confidentiality, not differential privacy, and adds nothing to epsilon.")
    return text


def guarantee(report: dict, cfg) -> dict:
    mode = cfg.federation.aggregation
    dp = report["privacy_definition"]["dp"]
    per = [{"hospital": h["hospital"], "text": _hospital_statement(h, mode)} for h in report["hospitals"]]
    others = None
    o = report.get("other_hospitals")
    if o:
        if o["stats_shown"] and o["epsilon_spent"]:
            e = o["epsilon_spent"]
            others = (f"The other {o['count']} hospitals' statements are not part of this partner report; their epsilon "
                      f"spent ranges from {g(e['min'])} to {g(e['max'])} (median {g(e['median'])}).")
        else:
            others = f"The other {o['count']} hospitals' figures are not part of this partner report."
    dnc = does_not_cover(cfg, dp)
    head = ("Differential privacy guarantee, per hospital (the federation as a whole has no single epsilon: each "
            "hospital's records are protected by its own DP-SGD)." if dp else
            "No differential privacy: this run trained without DP-SGD, so no epsilon is stated and the released models "
            "carry no formal privacy guarantee.")
    if not dp and mode != "plain":
        head += f" {_mode_words(mode)} protected the confidentiality of updates; it is not differential privacy."
    parts = [head] + [p["text"] for p in per] + ([others] if others else [])
    parts.append("This guarantee does not cover: " + "; ".join(dnc) + ".")
    return {"text": "\n\n".join(parts), "per_hospital": per, "other_hospitals": others, "does_not_cover": dnc}


def summary(report: dict, cfg, rounds: int) -> dict:
    mode = cfg.federation.aggregation
    partner = report["partner"]
    hs = report["hospitals"]
    dp_h = [h for h in hs if h["dp"] and h.get("accounting")]
    checks = report["checks"]
    fails = [c["name"] for c in checks if c["status"] == "fail"]
    atts = [c["name"] for c in checks if c["status"] == "attention"]
    tasks = [t.name for t in cfg.tasks.train]
    n = report["scope"]["federation_size"]
    s = (f"This report covers run '{report['run_id']}' of the federation '{report['federation_name']}': {n} hospitals "
         f"trained {', '.join(tasks)} over {rounds} round(s)")
    s += f" (a report for {partner})." if partner else "."
    headline: dict[str, Any]
    if partner:
        h = hs[0]
        a = h.get("accounting")
        if a:
            s += (f" Your hospital trained with differential privacy: epsilon {g(a['epsilon_spent'])} spent of a budget "
                  f"of {g(a['epsilon_budget'])}, at delta {g(a['delta'])} (Gaussian-DP mu about {g(a['gdp_mu'])}).")
            headline = {"hospital": partner, "epsilon": a["epsilon_spent"], "delta": a["delta"], "gdp_mu": a["gdp_mu"],
                        "epsilon_budget": a["epsilon_budget"]}
        else:
            s += (" Your hospital did not train with differential privacy: no epsilon is stated." if not h["dp"] else
                  " Your hospital is labelled DP but no epsilon can be stated (see the failed checks).")
            headline = {"hospital": partner, "epsilon": None, "delta": None, "gdp_mu": None, "epsilon_budget": None}
        o = report["other_hospitals"]
        if o and o["stats_shown"] and o["epsilon_spent"]:
            s += (f" The other {o['count']} hospitals spent between {g(o['epsilon_spent']['min'])} and "
                  f"{g(o['epsilon_spent']['max'])}.")
    else:
        eps = [h["accounting"]["epsilon_spent"] for h in dp_h if h["accounting"]["epsilon_spent"] is not None]
        if dp_h and eps:
            s += (f" {len(dp_h)} of {len(hs)} hospitals trained with differential privacy (record-level DP-SGD): epsilon "
                  f"spent ranges from {g(min(eps))} to {g(max(eps))}, at delta up to "
                  f"{g(max(h['accounting']['delta'] for h in dp_h))}.")
        else:
            s += " The run used no differential privacy: no epsilon is stated and the models carry no formal guarantee."
        headline = {"epsilon_spent": {"min": min(eps), "max": max(eps)} if eps else None,
                    "delta_max": max((h["accounting"]["delta"] for h in dp_h), default=None),
                    "gdp_mu_max": max((h["accounting"]["gdp_mu"] for h in dp_h if h["accounting"]["gdp_mu"] is not None), default=None)}
    if mode == "he":
        s += (" Updates reached the server only as CKKS ciphertexts; a separate key holder decrypted only sums of several "
              "hospitals (encryption, not differential privacy).")
    elif mode == "secagg":
        s += " Updates reached the server SecAgg+-masked: it learned only their sum (masking, not differential privacy)."
    else:
        s += " The server saw every hospital's update in the clear (no secure aggregation)."
    audit = report["audit"]
    if not audit["run"]:
        s += " No leakage audit was run."
    else:
        aucs = [m["auc"] for m in audit["mia"]]
        s += f" A leakage audit was run ({len(audit['mia'])} membership-inference results"
        s += f", highest AUC {g(max(aucs))})." if aucs else ")."
    st = report["status"]["overall"]
    s += f" Overall status: {st.upper()}"
    if fails or atts:
        s += (f" ({len(fails)} check(s) failed{': ' + ', '.join(fails) if fails else ''}; {len(atts)} need attention"
              f"{': ' + ', '.join(atts) if atts else ''}).")
    else:
        s += "."
    s += " This report is evidence for people to judge; it does not certify compliance with HIPAA, GDPR or any law."
    return {"plain_language": s, "headline": headline}


LIMITATIONS = [
    "The guarantee is per hospital and record-level (add/remove one record); there is no single federation epsilon.",
    "A hash chain is not a signature: a ledger rewritten whole verifies on its own; this signed report's chain heads detect it.",
    "Gaussian-DP mu is a central-limit approximation, not a bound; the (epsilon, delta) of the accountant is the claim.",
    "Membership-inference audits give empirical evidence, not proof; a lower bound below epsilon does not show tightness.",
    "HE and SecAgg+ assume no collusion between the aggregation server and the key holder or enough hospitals.",
    "The report-signing key shown is the run's; in deployment the issuing party signs with its own key.",
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
