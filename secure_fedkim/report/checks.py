"""The report's checks, one :class:`ReportCheck` each, in one registry (:data:`CHECKS`): the rule for a check is its
entry here. The builder iterates it (``build._facts``, ``build._check_rows``; ``verify`` re-derives every row through
``_check_rows``), and the words (``text``) and the renderer take each check's title and actions from it
(:func:`title_of`, :func:`action_for`); nothing else lists the checks.

A check's status comes from its findings (:class:`~secure_fedkim.report.collect.Finding`): the worst of them, or,
with none, ``pass`` (its ``passed`` reason) or ``not_applicable`` when it has nothing to judge (``applies`` false,
or it is a check of another transport: ``Transport.report_checks``). A check that ``needs_dp`` fails in a run where no
hospital trained with DP. Its findings are made by its own ``findings(facts)``, and, for the built-in checks, under
its name by the evidence readers: each hospital's ledger (``collect.collect_hospital``), the transport's evidence
(``aggregation.aggregation_facts``) and audit.json's reader (``audit_section.read_audit``).

``facts`` (what ``findings``, ``applies``, ``passed`` and ``not_applicable`` read) is the run as the builder read it:
``run`` (``collect.RunFacts``), ``hospitals`` (name -> ``collect.HospitalFacts``), ``audit`` (the report's audit
section, every row's status settled), ``aggregation`` (the transport's evidence), ``any_dp`` (whether a hospital
trained with DP) and ``config_sha256`` (config.yaml's hash now, None when it is missing).

Adding a check: a :class:`ReportCheck` passed to :func:`register_check` (from any module; :func:`unregister_check`
forgets it). Its row joins report.json's ``checks`` after the built-in ones, with its title wherever a person reads
the checks. Hazards and regulatory rows name the checks behind them in their own lists (``text.HAZARD_CHECKS``,
``text.REGULATORY``): a hazard or a framework is not one check's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from secure_fedkim.federation.transports import TRANSPORTS

from .audit_section import (
    LOW_FPR,
    below_chance_findings,
    consistency_findings,
    leakage_findings,
    lower_bound_findings,
)
from .collect import Finding, randomness_findings

#: a check's reason: a sentence, or one made from the run's facts
Reason = str | Callable[[dict], str]
#: the report.json sections a check can stand under
CHECK_SECTIONS = ("privacy_definition", "accounting", "budget", "aggregation", "audit", "provenance", "utility",
                  "data_inventory")
#: the statuses a check's findings can give it, and so the statuses an action can be for
FINDING_STATUSES = ("pass", "inconclusive", "attention", "fail")
NO_DP_REASON = "no differential privacy in this run: no hospital's records carry a DP guarantee, so this cannot hold"


def full_reason(found: list[Finding]) -> str:
    """A check's reason in the federation's report: every finding's message, once each."""
    return "; ".join(dict.fromkeys(x.message for x in found))


def anonymised_reason(found: list[Finding], partner: str) -> str:
    """A check's reason in ``partner``'s report: its own findings and those about no hospital in full; another
    hospital's only as its ``anonymous`` line, with how many other hospitals it is about."""
    parts, anon = [], {}
    for x in found:
        if x.hospital in (None, partner) and all(o == partner for o in x.also):
            parts.append(x.message)
        else:
            anon.setdefault((x.anonymous, x.status), set()).add(x.hospital)
    for (msg, _), hs in anon.items():
        parts.append(f"{msg} ({len(hs)} other hospital{'s' if len(hs) > 1 else ''})")
    return "; ".join(dict.fromkeys(parts))


@dataclass(frozen=True)
class ReportCheck:
    """One check of the report, everything about it.

    name: its machine name in report.json. section: the report.json section it stands under. title: the check in
    words, wherever a person reads it. rule: when it fails, needs attention or is inconclusive, in words. passed:
    its reason when it has findings of none of those and something to judge (what then holds). needs_dp: a run
    without DP fails it (its reason then :data:`NO_DP_REASON`, unless it has findings). applies(facts): whether
    there is anything to judge (None: always); when false and nothing was found, the check is not applicable, for
    the reason ``not_applicable``. findings(facts): the findings it makes itself. actions: what a privacy officer
    does about it, by status (others: "Resolve: <title>"). partner_reason(findings, partner): how its reason reads
    in a partner's report, where the findings about other hospitals must not name them (its status is the worst of
    every finding, whosever: a partner learns that a check failed somewhere)."""

    name: str
    section: str
    title: str
    rule: str
    passed: Reason
    needs_dp: bool = False
    applies: Callable[[dict], bool] | None = None
    not_applicable: Reason | None = None
    findings: Callable[[dict], list[Finding]] | None = None
    actions: dict[str, str] = field(default_factory=dict)
    partner_reason: Callable[[list[Finding], str], str] = anonymised_reason

    def reason(self, found: list[Finding], partner: str | None) -> str:
        """Its reason from its findings, as the report's reader (``partner``, or the federation: None) sees it."""
        return full_reason(found) if partner is None else self.partner_reason(found, partner)


def _words(reason: Reason | None, facts: dict, default: str) -> str:
    if reason is None:
        return default
    return reason(facts) if callable(reason) else reason


def pass_reason(check: ReportCheck, facts: dict) -> str:
    """The reason of ``check`` when it passes with nothing found."""
    return _words(check.passed, facts, "")


def not_applicable_reason(check: ReportCheck, facts: dict) -> str:
    """The reason of ``check`` when it has nothing to judge (a check of another transport may give none)."""
    transport = facts["run"].cfg.federation.aggregation
    return _words(check.not_applicable, facts, f"not checked for the {transport} transport")


def own_findings(check: ReportCheck, facts: dict) -> list[Finding]:
    """What ``check.findings`` finds in ``facts``; a finding that is not a :class:`Finding` with a status of
    :data:`FINDING_STATUSES` is refused, naming the check."""
    found = list(check.findings(facts)) if check.findings is not None else []
    bad = [x for x in found if not (isinstance(x, Finding) and x.status in FINDING_STATUSES)]
    if bad:
        raise ValueError(f"report check {check.name!r}: findings must be Findings with a status of "
                         f"{', '.join(FINDING_STATUSES)}, not {bad[0]!r}")
    return found


def title_of(name: str) -> str:
    """The check ``name`` in words (a name this version does not know: the name)."""
    check = CHECK_BY_NAME.get(name)
    return check.title if check else name


def action_for(name: str, status: str) -> str:
    """What a privacy officer does about the check ``name`` at ``status``."""
    check = CHECK_BY_NAME.get(name)
    return (check.actions.get(status) if check else None) or f"Resolve: {title_of(name)}"


def applies(check: ReportCheck, facts: dict) -> bool:
    """Whether ``check`` has anything to judge in this run: not a check of another transport only
    (``Transport.report_checks``), and its own ``applies``."""
    transport = TRANSPORTS[facts["run"].cfg.federation.aggregation]
    of_transports = {c for t in TRANSPORTS.values() for c in t.report_checks}
    if check.name in of_transports and check.name not in transport.report_checks:
        return False
    return check.applies is None or bool(check.applies(facts))


# ------------------------------------------------------------------------------------------ the built-in checks
def _audit_words(if_run: str) -> Callable[[dict], str]:
    """A not-applicable reason about audit.json: ``if_run`` when the audit was run, else "audit not run"."""
    return lambda facts: if_run if facts["audit"]["run"] else "audit not run"


def _no_dp_findings(facts: dict) -> list[Finding]:
    dp_hosp = [h for h in facts["hospitals"].values() if h.dp]
    if not dp_hosp:
        return [Finding("fail", "no differential privacy: no hospital trained with DP-SGD, so the released models carry "
                                "no formal privacy guarantee and no epsilon is claimed", None, "no differential privacy")]
    return [Finding("fail", f"{h.name} trained without differential privacy: its records carry no guarantee", h.name,
                    "a hospital trained without DP") for h in facts["hospitals"].values() if not h.dp]


def _config_hash_findings(facts: dict) -> list[Finding]:
    files, sha = facts["run"].files, facts["config_sha256"]
    config, summary = files.config_yaml.name, files.summary.name
    recorded = facts["run"].summary.get("config_sha256")
    if sha is None:
        return [Finding("fail", f"{config} is missing from the run directory", None, f"{config} missing")]
    if recorded and sha != recorded:
        return [Finding("fail", f"{config} hashes to {sha}, {summary} recorded {recorded}: the config was changed "
                                "after the run", None, f"{config} changed after the run")]
    return []


def _has_ledger(facts: dict) -> bool:
    kh = (facts["aggregation"].get("ckks") or {}).get("key_holder_ledger") or {}
    return any(h.ledger_exists for h in facts["hospitals"].values()) or bool(kh.get("exists"))


def _measured_low_fpr(facts: dict) -> bool:
    mia = facts["audit"]["mia"]
    return bool(mia) and not all(m["tpr_at_fpr"].get(LOW_FPR) is None for m in mia)


def _low_fpr_passed(facts: dict) -> str:
    note = facts["audit"].get("low_fpr_note")
    return ("no MIA's TPR at FPR 1e-3 is shown above 2 x 1e-3 (the 95% Clopper-Pearson lower bound of its TPR is at "
            "most 2e-3)" + (f" ({note})" if note else ""))


def _low_fpr_not_applicable(facts: dict) -> str:
    audit = facts["audit"]
    return (audit.get("low_fpr_note") or "no MIA result in audit.json") if audit["run"] else "audit not run"


def _has_lower_bound(facts: dict) -> bool:
    audit = facts["audit"]
    return bool(audit["dp_audit"]) or any(e["eps_lb"] is not None for e in audit["consistency"])


def _randomness(name: str) -> Callable[[dict], list[Finding]]:
    def findings(facts: dict) -> list[Finding]:
        hospitals = facts["hospitals"]
        return randomness_findings([hospitals[c] for c in facts["run"].clients]).get(name, [])

    return findings


def _thresholds(facts: dict):
    return facts["run"].cfg.report


_BUILT_IN: list[ReportCheck] = [
    ReportCheck(
        "differential_privacy", "privacy_definition", "Differential privacy used by every hospital",
        "fail when no hospital trained with DP (the released models carry no guarantee), and when any hospital trained "
        "without it (its records carry none)",
        "every hospital trained with DP-SGD", needs_dp=True, findings=_no_dp_findings,
        actions={"fail": "Do not release models trained without differential privacy as privacy-protected"}),
    ReportCheck(
        "dp_label_has_accountant", "accounting", "Every DP claim backed by an accountant",
        "fail when a hospital is labelled DP (config or ledger) without a dp_plan naming an accountant, a delta and a "
        "non-zero noise multiplier, or the accountant cannot compute its epsilon",
        "every DP label has a dp_plan with an accountant, delta and noise", needs_dp=True,
        actions={"fail": "Do not call this run differentially private until every DP hospital has an accountant "
                         "record"}),
    ReportCheck(
        "ledger_verified", "provenance", "Privacy ledgers intact",
        "fail when a privacy ledger (or the key holder's) does not verify, or a DP hospital has none",
        "every privacy ledger verifies (hash chain intact)", applies=_has_ledger,
        not_applicable="no privacy ledger in this run",
        actions={"fail": "Do not release: a privacy ledger does not verify; find out who changed it"}),
    ReportCheck(
        "epsilon_recomputed", "accounting", "Epsilon recomputed independently matches",
        "fail when a recorded epsilon (ledger, baseline ledger, metrics) differs from the recomputation, or the ledger "
        "records fewer steps than the optimizer or the metrics",
        "every recorded epsilon and step count equals its recomputation from the ledger", needs_dp=True,
        actions={"fail": "Do not release: a recorded epsilon or step count differs from its recomputation; have the "
                         "accounting investigated"}),
    ReportCheck(
        "budget_respected", "budget", "Privacy budget respected",
        "fail when a hospital's recomputed spend, composed with every other released DP spend on its records (the "
        "single-hospital baseline), exceeds its budget (or a ledger entry says over_budget)",
        "no hospital spent more than its budget", needs_dp=True,
        actions={"fail": "Do not release what was trained on the records of the hospitals over budget; rerun within the "
                         "budget, the single-hospital baseline's spend counted"}),
    ReportCheck(
        "delta_below_1_over_n", "accounting", "Delta small enough for each hospital's size",
        "fail when delta >= 1/n for a hospital's n records",
        "delta < 1/n at every hospital", needs_dp=True,
        actions={"fail": "Rerun with a delta well below 1/n at the hospitals named"}),
    ReportCheck(
        "epsilon_tier", "accounting", "Epsilon at most 10",
        "attention when the epsilon spent (composed) or the budget is above 10",
        "epsilon <= 10 at every hospital", needs_dp=True,
        actions={"attention": "Accept in writing an epsilon above 10 (a weak guarantee), or rerun with a smaller "
                              "budget"}),
    ReportCheck(
        "sampling_assumption", "accounting", "Sampling as the accountant assumes",
        "attention when the accountant assumes Poisson sampling and the ledger does not record it as used",
        "Poisson sampling assumed and used (recorded in every ledger entry)", needs_dp=True,
        actions={"attention": "Have the sampling checked: the accountant assumes Poisson sampling"}),
    ReportCheck(
        "privacy_unit", "privacy_definition", "Guarantee covers whole patients",
        "attention when the unit is the record while a patient has several records, or records per patient are "
        "unknown",
        "one record per patient: the record-level guarantee is patient-level", needs_dp=True,
        actions={"attention": "Do not present the guarantee as patient-level: patients have several records (see the "
                              "patient-level exposure below)"}),
    ReportCheck(
        "independent_accountant_agreement", "accounting", "Second accounting library agrees",
        "attention when dp_accounting's epsilon is more than 5% above the accountant's",
        "the independent recomputation is within 5% of the accountant", needs_dp=True,
        actions={"attention": "Have the accounting reviewed: the second library disagrees by more than 5%"}),
    ReportCheck(
        "server_secret_key", "aggregation", "Server never held the decryption key",
        "fail when the run shows the aggregating server held the CKKS secret key, or an aggregate was used without a "
        "key-holder decryption on record, or fewer than min_clients contributions were decrypted; attention in he "
        "mode without a key-holder ledger to show the key's custody",
        "the aggregating server never held the secret key",
        not_applicable="plain mode has no secret key (see secure_aggregation)",
        actions={"fail": "Do not release: the aggregating server could decrypt single updates",
                 "attention": "Keep the key holder's ledger with the run to show the key's custody"}),
    ReportCheck(
        "secure_aggregation", "aggregation", "Updates encrypted or masked at the server",
        "attention for plain aggregation (the server sees every update)",
        "updates reached the server encrypted or masked",
        actions={"attention": "Use encrypted (he) or masked (secagg) aggregation before a deployment"}),
    ReportCheck(
        "he_parameters", "aggregation", "Encryption parameters at 128-bit security",
        "attention when the CKKS parameters are not shown to meet 128-bit security",
        "CKKS parameters meet 128-bit security (HE standard)", not_applicable="not he mode",
        actions={"attention": "Use CKKS parameters that meet 128-bit security"}),
    ReportCheck(
        "secagg_dropout_margin", "aggregation", "Secure aggregation kept its dropout margin",
        "attention when a SecAgg+ round lost at least as many hospitals as it tolerates",
        "SecAgg+ dropouts stayed below the tolerated number", not_applicable="not secagg mode",
        actions={"attention": "Review the rounds that lost as many hospitals as SecAgg+ tolerates"}),
    ReportCheck(
        "audit_run", "audit", "Leakage audit run",
        "attention when there is no audit/audit.json, or a part of it does not follow its schema "
        "(secure_fedkim.audit_schema: an unknown schema id, a row lacking a required field or with a field of the "
        "wrong type), each named by part, row and field: such a row is left out, the rest of the audit is read",
        "a leakage audit was run",
        actions={"attention": "Run the leakage audit (`secure-fedkim audit RUN_DIR`) and report again before release"}),
    ReportCheck(
        "audit_consistent_with_accountant", "audit", "Audit consistent with the claimed epsilon",
        "fail when an audit's empirical epsilon lower bound exceeds the accountant's epsilon, or an audit row has "
        "status inconsistent (named with its reasons), or says so in a row that does not follow audit.json's schema "
        "(a malformed row cannot clear the DP bug it reports); inconclusive for a row with status inconclusive (with "
        "the largest epsilon it can certify) and no failing one: an underpowered black-box canary audit (its claim "
        "above what it can certify) does not hold the decision when the white-box audit of the same hospital and "
        "task, or the hospital's run-level audit (whose canaries could certify more than its whole-run claim), "
        "decided consistent",
        "every empirical epsilon lower bound is at most the accountant's epsilon", needs_dp=True,
        applies=lambda facts: bool(facts["audit"]["dp_audit"] or facts["audit"]["consistency"]),
        not_applicable=_audit_words("no canary DP audit in audit.json"),
        findings=lambda facts: consistency_findings(facts["audit"], facts["hospitals"]),
        actions={"fail": "Do not release: an audit found the training leaks more than its accounting claims (a DP "
                         "bug); have the implementation fixed and rerun",
                 "inconclusive": "Run an audit that can decide at this budget (the white-box gradient-canary audit, "
                                 "or enough canaries) before release"}),
    ReportCheck(
        "mia_low_fpr", "audit", "Membership attack weak at 0.1% false positives",
        "attention when the 95% Clopper-Pearson lower bound of an MIA's TPR at FPR 1e-3 exceeds 2 x 1e-3 (an attack "
        "below chance is not counted)",
        _low_fpr_passed, applies=_measured_low_fpr, not_applicable=_low_fpr_not_applicable,
        actions={"attention": "Review the attack that finds members at a 0.1% false-positive rate (section 4)"}),
    ReportCheck(
        "measured_leakage", "audit", "No measurable membership leakage",
        "fail for an MIA with a signal above chance (Holm-adjusted p < 0.05 with AUC above 0.5, or an AUC interval "
        "wholly above 0.5: audit_section.mia_status) whose AUC lower bound reaches report.mia_auc_fail (default "
        "0.65); attention for such a signal below the fail threshold",
        "no membership-inference result shows leakage above chance (neither a Holm-adjusted p < 0.05 with AUC above "
        "0.5 nor an AUC interval wholly above 0.5)",
        applies=lambda facts: bool(facts["audit"]["mia"]), not_applicable=_audit_words("no MIA result in audit.json"),
        findings=lambda facts: leakage_findings(facts["audit"], _thresholds(facts).mia_auc_fail),
        actions={"fail": "Do not release: an attack detects membership well above chance",
                 "attention": "Review the membership leakage the audit measured before release (section 4)"}),
    ReportCheck(
        "mia_below_chance", "audit", "No membership attack scores below chance (audit fault)",
        "attention for an MIA whose AUC interval lies wholly below 0.5: an audit fault, not a membership signal",
        "no membership-inference result scores reliably below chance (an AUC interval wholly below 0.5 is an audit "
        "fault)",
        applies=lambda facts: bool(facts["audit"]["mia"]), not_applicable=_audit_words("no MIA result in audit.json"),
        findings=lambda facts: below_chance_findings(facts["audit"]),
        actions={"attention": "Have the auditor fix the attacks that score below chance and rerun the audit: they "
                              "under-report leakage"}),
    ReportCheck(
        "dp_lower_bound", "audit", "Measured epsilon lower bound below threshold",
        "attention when an audit's epsilon lower bound is above report.eps_lower_bound_attention (default 1.0)",
        "every empirical epsilon lower bound is at most the configured threshold", applies=_has_lower_bound,
        not_applicable=_audit_words("no epsilon lower bound in audit.json"),
        findings=lambda facts: lower_bound_findings(facts["audit"], _thresholds(facts).eps_lower_bound_attention),
        actions={"attention": "Review the measured epsilon lower bound against the claim (section 4)"}),
    ReportCheck(
        "baseline_spend_composed", "accounting", "Every released privacy spend counted",
        "fail when a baseline's test metrics are released but its ledger is missing or broken; its findings alone "
        "say that a baseline's spend was composed (without one, nothing is judged)",
        "every released DP spend on a hospital's records is composed into its epsilon", needs_dp=True,
        applies=lambda facts: False,
        not_applicable="no single-hospital baseline's DP spend in this run: the federation's spend is the only one on "
                       "each hospital's records",
        actions={"fail": "Do not release the single-hospital baseline's metrics until its privacy spend is on record "
                         "and composed"}),
    ReportCheck(
        "noise_randomness", "privacy_definition", "DP noise drawn by the secure generator",
        "fail for a DP session (federation or baseline) whose dp_round entry records randomness other than \"secure\" "
        "(a reproducible generator is not fit for release); attention for a DP session that records no randomness "
        "source (a run written before it was recorded)",
        "every DP session's noise and sampling were drawn by the secure generator (recorded in each dp_round entry)",
        needs_dp=True, findings=_randomness("noise_randomness"),
        actions={"fail": "Do not release: DP noise was drawn from a reproducible generator, not fit for release; rerun "
                         "with the secure generator",
                 "attention": "Rerun with a version that records where its DP noise comes from, or accept that it "
                              "cannot be shown"}),
    ReportCheck(
        "noise_fresh", "privacy_definition", "No DP noise or batch repeated across rounds, tasks or hospitals",
        "fail when two DP sessions of the run share a noise_fingerprint or a non-null sampling_fingerprint; attention "
        "for a DP session that records no noise fingerprint (a run written before it was recorded)",
        "no two DP sessions of this run (hospitals, rounds, tasks, federation and baseline) share a noise or a "
        "Poisson-sample fingerprint",
        needs_dp=True, findings=_randomness("noise_fresh"),
        actions={"fail": "Do not release: two DP sessions drew the same randomness, so the accountant's epsilon does "
                         "not hold; rerun",
                 "attention": "Rerun with a version that records noise fingerprints, or accept that fresh noise cannot "
                              "be shown"}),
    ReportCheck(
        "config_hash", "provenance", "Configuration unchanged since the run",
        "fail when config.yaml is missing or no longer hashes to the run's recorded config_sha256",
        "config.yaml hashes to the run's recorded config_sha256", findings=_config_hash_findings,
        actions={"fail": "Do not release: the run's configuration changed after the run"}),
]
_BUILT_IN_NAMES = frozenset(c.name for c in _BUILT_IN)

#: every check, in the order of report.json's ``checks``: the built-in ones, then the registered ones
CHECKS: list[ReportCheck] = list(_BUILT_IN)
CHECK_BY_NAME: dict[str, ReportCheck] = {c.name: c for c in CHECKS}


def _problems(check: ReportCheck) -> list[str]:
    """What keeps ``check`` from being registered, each in words (none: it can be)."""
    out = []
    if not (isinstance(check.name, str) and check.name.isidentifier()):
        out.append(f"name {check.name!r} is not an identifier")
    elif check.name in CHECK_BY_NAME:
        out.append(f"a check named {check.name!r} is already registered")
    if check.section not in CHECK_SECTIONS:
        out.append(f"section must be one of {', '.join(CHECK_SECTIONS)}, not {check.section!r}")
    for key in ("title", "rule"):
        if not (isinstance(getattr(check, key), str) and getattr(check, key).strip()):
            out.append(f"{key} must be a non-empty sentence")
    if not (callable(check.passed) or isinstance(check.passed, str) and check.passed.strip()):
        out.append("passed must be a non-empty sentence (its reason when it passes) or a function of the facts")
    if not isinstance(check.needs_dp, bool):
        out.append(f"needs_dp must be True or False, not {check.needs_dp!r}")
    if not callable(check.findings):
        out.append("findings must be a function findings(facts) -> list[Finding]: nothing else makes a registered "
                   "check's findings")
    if check.applies is not None and not callable(check.applies):
        out.append("applies must be a function of the facts or None (always)")
    if check.applies is not None and not (callable(check.not_applicable) or isinstance(check.not_applicable, str)
                                          and check.not_applicable.strip()):
        out.append("a check that may not apply needs not_applicable: the reason, in words or from the facts")
    if not (isinstance(check.actions, dict) and set(check.actions) <= set(FINDING_STATUSES)
            and all(isinstance(v, str) and v.strip() for v in check.actions.values())):
        out.append(f"actions must map statuses ({', '.join(FINDING_STATUSES)}) to sentences, not {check.actions!r}")
    if not callable(check.partner_reason):
        out.append("partner_reason must be a function (findings, partner) -> str")
    return out


def register_check(check: ReportCheck) -> ReportCheck:
    """Add ``check`` to :data:`CHECKS`: every report built from now on has its row (after the built-in ones), its
    title, its not-applicable rule and its actions, and ``verify`` re-derives it. Refuses, naming what, a check that
    is incomplete or whose name is taken. Returns ``check``."""
    if not isinstance(check, ReportCheck):
        raise TypeError(f"register_check: {check!r} is not a ReportCheck")
    problems = _problems(check)
    if problems:
        raise ValueError(f"report check {check.name!r}: " + "; ".join(problems))
    CHECKS.append(check)
    CHECK_BY_NAME[check.name] = check
    return check


def unregister_check(name: str) -> None:
    """Forget a check added with :func:`register_check` (a built-in check stays)."""
    if name in _BUILT_IN_NAMES:
        raise ValueError(f"report check {name!r} is built in")
    check = CHECK_BY_NAME.pop(name, None)
    if check is not None:
        CHECKS.remove(check)
