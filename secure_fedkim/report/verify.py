"""``verify_report``: does a written report still match its signature and the run it describes?

Checks, each mismatch one message naming the file, ledger entry or report field:
  1. the Ed25519 signature (``<stem>.sig``) over the exact bytes of ``<stem>.json``, and the signed manifest
     (``<stem>.sha256`` / ``.sha256.sig``) of the JSON, HTML and PDF, under the issuer's public key (required);
     the HTML and PDF name the sha256 of the JSON they render; the overall status, decision and summary text are
     recomputed from the report's own facts;
  2. the report against the shipped JSON Schema, and its recorded signing-key fingerprint;
  3. every privacy ledger re-read (hash chain) and its head compared with ``provenance.ledger_heads``
     (entries appended or dropped after the report are named), the key holder's ledger head, and the
     commitment to the other hospitals' heads in a partner report; every single-hospital baseline ledger whose
     spend the report composed;
  4. config.yaml, resolved_config.json and every listed artifact re-hashed (and artifacts present now
     but absent from the report);
  5. every epsilon (spent, per round, planned, independent, GDP mu, patient level) recomputed from the
     ledgers by the accountants, every per-hospital figure compared, and every check's status re-derived;
  6. every derived figure (composed and remaining budget, patient level, both Gaussian-DP mu, the first page, the
     headline, the disclosure card, each audit row's status, the worst leakage, the randomness checks) recomputed by
     :mod:`secure_fedkim.report.recompute`, a code path of its own, so that a bug in the builder fails here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from privacy.ledger import LedgerTampered, PrivacyLedger
from secure_fedkim.rundir.layout import RunDir

from . import text
from .build import (_RANK, SCHEMA_VERSION, _check_rows, _facts, _hospital_entry, _others, artifact_paths, min_others,
                    other_commitment, rounds_of, worst)
from .collect import digest_of, sha256_file
from .recompute import check_report
from .sign import fingerprint, load_public_key, verify_bytes

MAX_SCHEMA_MESSAGES = 5


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff(reported, recomputed, path: str, out: list[str], source: str, rtol: float = 1e-9) -> None:
    """Append one message per difference between a report value and its recomputation."""
    if isinstance(reported, dict) and isinstance(recomputed, dict):
        for k in list(dict.fromkeys(list(reported) + list(recomputed))):
            if k not in reported:
                out.append(f"{path}.{k}: missing from the report (recomputed from {source}: {recomputed[k]!r})")
            elif k not in recomputed:
                out.append(f"{path}.{k}: in the report ({reported[k]!r}) but not produced by recomputation from {source}")
            else:
                diff(reported[k], recomputed[k], f"{path}.{k}", out, source, rtol)
    elif isinstance(reported, list) and isinstance(recomputed, list):
        if len(reported) != len(recomputed):
            out.append(f"{path}: the report has {len(reported)} items, recomputation from {source} gives {len(recomputed)}")
        for i, (a, b) in enumerate(zip(reported, recomputed)):
            diff(a, b, f"{path}[{i}]", out, source, rtol)
    elif _num(reported) and _num(recomputed):
        if not (reported == recomputed or abs(reported - recomputed) <= rtol * max(abs(reported), abs(recomputed))
                or (math.isnan(reported) and math.isnan(recomputed))):
            out.append(f"{path}: the report says {reported!r}, recomputed from {source}: {recomputed!r}")
    elif reported != recomputed:
        out.append(f"{path}: the report says {reported!r}, recomputed from {source}: {recomputed!r}")


def verify_report(report_json_path, *, public_key=None, run_dir=None) -> list[str]:
    """Check a written report; return one precise message per mismatch (empty list: everything matches).

    Args:
        report_json_path: ``RUN_DIR/report.json`` or ``RUN_DIR/report_<partner>.json``.
        public_key: the issuer's Ed25519 public key (PEM or raw bytes, a path, or a key object), obtained out of
            band. Required: a key found beside a report proves nothing.
        run_dir: the run the report describes (default: the report's directory). For a partner report, the
            partner's own files suffice: the other hospitals' parts are checked against their commitments only
            when their files are present.
    """
    path = Path(report_json_path)
    if not path.is_file():
        return [f"{path}: no such report file"]
    name = path.name
    run_dir = Path(run_dir) if run_dir is not None else path.parent
    data = path.read_bytes()
    # 1-2. the signatures, the content, the rendered files
    msgs, key = _check_signatures(path, data, public_key)
    report, found = _read_report(name, data)
    msgs += found
    if report is None:
        return msgs
    prov = report["provenance"]
    msgs += _check_signer(name, prov, key)
    msgs += _check_rendered(path, data)
    # 3-5. the run
    try:
        f = _facts(run_dir)
    except Exception as e:  # not a run (any more): say so, do not crash
        return msgs + [f"{run_dir}: the run directory cannot be read ({type(e).__name__}: {e})"]
    run, hs = f["run"], f["hospitals"]
    partner = report["partner"]
    view, wrong = _view_of(report, hs, name, run_dir)
    if wrong:
        return msgs + [wrong]
    others = [c for c in run.clients if c not in view]
    # a partner holding only its own files: the others' parts rest on the report's signed commitments
    standalone = partner is not None and any(not hs[c].ledger_exists for c in others)
    msgs += _check_summary(report, f, name)
    msgs += _check_configs(run, prov)
    msgs += _check_artifacts(run_dir, run, prov, view, others, standalone)
    msgs += _check_ledgers(run_dir, report, hs, view)
    msgs += _check_baselines(run_dir, hs, view, prov)
    if others and not standalone:
        msgs += _check_others(report, run, hs, others, prov)
    msgs += _check_keyholder(f, prov)
    msgs += _check_checks(report, f, partner, standalone)
    # every derived figure again, by verify's own code path from the ledgers and audit.json (not the builder's)
    msgs += check_report(report, run_dir, run.clients, standalone)
    return list(dict.fromkeys(msgs))


def _read_report(name: str, data: bytes) -> tuple[dict | None, list[str]]:
    """The report parsed and checked against the schema: (report, []), or (None, why nothing further is checked)."""
    try:
        report = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{name}: not valid JSON ({e}); nothing further can be checked"]
    if not isinstance(report, dict):
        return None, [f"{name}: not a report object"]
    if report.get("schema_version") != SCHEMA_VERSION:
        return None, [f"{name}: schema version {report.get('schema_version')!r}, this verifier reads {SCHEMA_VERSION}: "
                      f"regenerate the report with `secure-fedkim report` (an older report cannot be checked)"]
    from .render import schema_errors

    errs = schema_errors(report)
    msgs = [f"{name}: does not fit the report schema {SCHEMA_VERSION}: {e}" for e in errs[:MAX_SCHEMA_MESSAGES]]
    if len(errs) > MAX_SCHEMA_MESSAGES:
        msgs.append(f"{name}: {len(errs) - MAX_SCHEMA_MESSAGES} more schema errors")
    return (None if errs else report), msgs


def _check_signer(name: str, prov: dict, key) -> list[str]:
    """The signing-key fingerprint the report records, and its named signer, are those of the given key."""
    msgs = []
    sig = prov.get("signature") or {}
    if key is not None and sig.get("public_key_sha256") != fingerprint(key):
        msgs.append(f"{name}: provenance.signature.public_key_sha256 {sig.get('public_key_sha256')} is not the "
                    f"fingerprint of the given public key ({fingerprint(key)})")
    if key is not None and (sig.get("signer") or {}).get("public_key_sha256") != fingerprint(key):
        msgs.append(f"{name}: the signer named in provenance.signature.signer does not hold the given public key")
    return msgs


def _view_of(report: dict, hs: dict, name: str, run_dir: Path) -> tuple[list[str], str | None]:
    """The hospitals the report covers, or a message when the report's partner or hospitals are not the run's."""
    partner = report["partner"]
    if partner is not None and partner not in hs:
        return [], f"{name}: partner {partner!r} is not a hospital of the run in {run_dir}"
    view = [h["hospital"] for h in report["hospitals"]]
    unknown = [h for h in view if h not in hs]
    if unknown:
        return view, f"{name}: hospitals {unknown} are not in the run in {run_dir}"
    return view, None


def _check_configs(run, prov: dict) -> list[str]:
    """config.yaml and resolved_config.json re-hashed."""
    msgs = []
    for field, p in (("config_sha256", run.files.config_yaml), ("resolved_config_sha256", run.files.resolved_config)):
        now = sha256_file(p) if p.is_file() else None
        if now != prov.get(field):
            msgs.append(f"{run.files.relative(p)}: sha256 {now or '(missing)'} differs from the report's provenance.{field} {prov.get(field)}")
    return msgs


def _check_artifacts(run_dir: Path, run, prov: dict, view: list[str], others: list[str], standalone: bool) -> list[str]:
    """Every listed artifact re-hashed, artifacts added since named, the other hospitals' against their digest."""
    msgs = []
    listed = {a["path"]: a for a in prov["artifacts"]}
    current = artifact_paths(run_dir, run.clients)
    for rel, a in listed.items():
        p = run_dir / rel
        if not p.is_file():
            msgs.append(f"{rel}: missing (the report lists sha256 {a['sha256']})")
        else:
            now = sha256_file(p)
            if now != a["sha256"]:
                msgs.append(f"{rel}: sha256 {now} differs from the report's provenance.artifacts entry {a['sha256']}: "
                            f"the file changed after the report")
    for rel, hosp in current:
        if rel not in listed and (hosp is None or hosp in view):
            msgs.append(f"{rel}: present in the run but not in the report's provenance.artifacts (added after the report)")
    if others and not standalone:
        other_art = {rel: sha256_file(run_dir / rel) for rel, hosp in current if hosp is not None and hosp not in view}
        if (digest_of(other_art) if other_art else None) != prov.get("other_hospitals_artifacts_sha256"):
            msgs.append("provenance.other_hospitals_artifacts_sha256: another hospital's artifact (local model or "
                        "public key) changed, was added or removed after the report")
    return msgs


def _check_ledgers(run_dir: Path, report: dict, hs: dict, view: list[str]) -> list[str]:
    """Each covered hospital's ledger: present, intact, the recorded head (entries appended since named), and its
    report entry recomputed from it."""
    msgs: list[str] = []
    heads = report["provenance"]["ledger_heads"]
    for c in view:
        h = hs[c]
        rel = h.ledger_rel
        expected = heads.get(c)
        if not h.ledger_exists:
            if expected is not None:
                msgs.append(f"{rel}: missing; the report recorded chain head {expected}")
            continue
        if not h.ledger_verified:
            msgs.append(f"{rel}: does not verify: {h.ledger_error}")
            continue
        if h.head != expected:
            msgs.append(_head_moved(run_dir, rel, c, h.head, expected))
            continue
        mine = next(x for x in report["hospitals"] if x["hospital"] == c)
        diff(mine, json.loads(json.dumps(_hospital_entry(h))), f"hospitals[{c}]", msgs, rel)
    return msgs


def _head_moved(run_dir: Path, rel: str, c: str, head: str | None, expected: str | None) -> str:
    """A verified ledger whose head is not the report's: entries appended after the report, or another chain."""
    try:
        PrivacyLedger(run_dir / rel).verify(expected_head=expected)
        entries = PrivacyLedger(run_dir / rel).entries()
        at = next(i for i, e in enumerate(entries) if e["hash"] == expected)
        return (f"{rel}: {len(entries) - at - 1} entr{'y' if len(entries) - at - 1 == 1 else 'ies'} appended "
                f"after the report (seq {at + 1} to {len(entries) - 1}); head now {head}, the report's "
                f"provenance.ledger_heads.{c} is {expected}")
    except (LedgerTampered, StopIteration) as e:
        return (f"{rel}: chain head {head} differs from the report's provenance.ledger_heads.{c} "
                f"{expected}: {e}")


def _check_others(report: dict, run, hs: dict, others: list[str], prov: dict) -> list[str]:
    """The hospitals a partner report does not cover: ledger heads, commitments and aggregates against the report's
    digests, without naming their figures."""
    msgs = []
    now = digest_of({c: hs[c].head for c in others})
    if now != prov.get("other_hospitals_ledger_heads_sha256"):
        bad = sum(not hs[c].ledger_verified for c in others)
        msgs.append("provenance.other_hospitals_ledger_heads_sha256: another hospital's ledger changed after the "
                    f"report ({bad} of {len(others)} other ledgers do not verify)")
    if sorted(other_commitment(hs[c]) for c in others) != prov.get("other_hospitals_commitments"):
        msgs.append("provenance.other_hospitals_commitments: another hospital's federation or baseline ledger "
                    "differs from its commitment")
    if report.get("other_hospitals") is not None:
        now_others: list[str] = []
        diff(report["other_hospitals"], json.loads(json.dumps(_others([hs[c] for c in others], min_others(run)))),
             "other_hospitals", now_others, "the other hospitals' ledgers")
        if now_others:  # never print the others' figures in a partner's message
            msgs.append(f"other_hospitals: {len(now_others)} aggregate figure(s) differ from the other hospitals' "
                        f"ledgers")
    return msgs


def _check_keyholder(f: dict, prov: dict) -> list[str]:
    """The key holder's ledger: intact, with the head the report recorded."""
    run = f["run"]
    kh = ((f["aggregation"].get("ckks") or {}).get("key_holder_ledger")) or {}
    if kh.get("error"):
        return [f"{kh['path']}: does not verify: {kh['error']}"]
    if kh.get("head") != prov.get("keyholder_ledger_head"):
        return [f"{run.files.relative(run.files.keyholder_ledger)}: chain head {kh.get('head')} differs from the report's "
                f"provenance.keyholder_ledger_head {prov.get('keyholder_ledger_head')}"]
    return []


def _check_checks(report: dict, f: dict, partner: str | None, standalone: bool) -> list[str]:
    """Every check's status re-derived; a partner alone re-derives from its own findings, and the report may only
    be worse."""
    msgs = []
    if standalone:
        f = {**f, "findings": {k: [x for x in v if x.hospital in (None, partner)] for k, v in f["findings"].items()}}
    now_checks = {c["name"]: c for c in _check_rows(f, partner)}
    for c in report["checks"]:
        n = now_checks.get(c["name"])
        if n is None:
            msgs.append(f"checks[{c['name']}]: no such check in this version of the rules")
        elif n["status"] != c["status"] and not (standalone and _RANK[c["status"]] > _RANK[n["status"]]):
            msgs.append(f"checks[{c['name']}].status: the report says {c['status']}, the run now gives {n['status']} "
                        f"({n['reason']})")
    return msgs


def _check_signatures(path: Path, data: bytes, public_key) -> tuple[list[str], object]:
    """The Ed25519 signature of the JSON and of the files manifest, under the issuer's public key."""
    name = path.name
    if public_key is None:
        return [f"{name}: no issuer public key given (--public-key ISSUER.pub.pem): a key found beside a report proves "
                f"nothing, so the signature is not checked"], None
    try:
        key = load_public_key(public_key)
    except (ValueError, TypeError, OSError) as e:
        return [f"the given public key is not a readable Ed25519 public key ({e})"], None
    msgs = []
    sig_path = path.with_suffix(".sig")
    if not sig_path.is_file():
        msgs.append(f"{sig_path.name}: missing: {name} is not signed")
    elif not verify_bytes(key, data, sig_path.read_bytes()):
        msgs.append(f"{name}: the Ed25519 signature in {sig_path.name} does not verify under the given public key: "
                    f"{name} was changed after it was signed (or signed with another key)")
    man, man_sig = path.with_suffix(".sha256"), path.with_suffix(".sha256.sig")
    if not man.is_file() or not man_sig.is_file():
        msgs.append(f"{man.name} / {man_sig.name}: missing: the HTML and PDF are not covered by a signature")
        return msgs, key
    listing = man.read_bytes()
    if not verify_bytes(key, listing, man_sig.read_bytes()):
        msgs.append(f"{man.name}: the signature in {man_sig.name} does not verify under the given public key")
    for line in listing.decode("utf-8", "replace").splitlines():
        digest, _, fname = line.partition("  ")
        p = path.parent / fname
        if "/" in fname or not p.is_file():
            msgs.append(f"{fname}: listed in {man.name} but missing")
        elif hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            msgs.append(f"{fname}: sha256 differs from the signed {man.name}: the file was changed after signing")
    return msgs, key


def _check_rendered(path: Path, data: bytes) -> list[str]:
    """report.html and report.pdf must name the sha256 of the JSON they render."""
    want = hashlib.sha256(data).hexdigest()
    msgs = []
    page = path.with_suffix(".html")
    if page.is_file():
        m = re.search(r'<meta name="report-json-sha256" content="([0-9a-f]*)"', page.read_text("utf-8", "replace"))
        if not m or m.group(1) != want:
            msgs.append(f"{page.name}: does not carry the sha256 of {path.name} ({want}): it renders another report")
    pdf = path.with_suffix(".pdf")
    if pdf.is_file() and f"report-json-sha256:{want}".encode() not in pdf.read_bytes():
        msgs.append(f"{pdf.name}: does not carry the sha256 of {path.name} ({want}): it renders another report")
    return msgs


def _check_summary(report: dict, f: dict, name: str) -> list[str]:
    """The overall status, the decision and the summary text, recomputed from the report's own facts."""
    msgs = []
    overall = worst(c["status"] for c in report["checks"])
    if report["status"]["overall"] != overall:
        msgs.append(f"{name}: status.overall says {report['status']['overall']}, its checks give {overall}")
    summary = text.summary(report, f["run"].cfg, rounds_of(f["run"], f["hospitals"]))
    if report["summary"]["plain_language"] != summary["plain_language"]:
        msgs.append(f"{name}: summary.plain_language is not the text its facts give (recomputed: "
                    f"{summary['plain_language'][:160]}...)")
    decision = text.first_page(report, f["run"].cfg)["decision"]
    if report["summary"]["first_page"]["decision"] != decision:
        msgs.append(f"{name}: summary.first_page.decision says {report['summary']['first_page']['decision']!r}, "
                    f"its status gives {decision!r}")
    return msgs


def _check_baselines(run_dir: Path, hs: dict, view: list[str], prov: dict) -> list[str]:
    """Every single-hospital baseline ledger the report composed: present, intact, same head."""
    msgs = []
    files = RunDir(run_dir)
    recorded = prov.get("baseline_ledger_heads") or {}
    for c in view:
        rel = files.relative(files.baseline_ledger(c))
        now = hs[c].baseline
        if c in recorded and now is None:
            msgs.append(f"{rel}: missing; the report composed this baseline's spend (head {recorded[c]})")
        elif now is not None and not now["verified"]:
            msgs.append(f"{rel}: does not verify: {now['error']}")
        elif now is not None and now["head"] != recorded.get(c):
            msgs.append(f"{rel}: chain head {now['head']} differs from the report's provenance.baseline_ledger_heads."
                        f"{c} {recorded.get(c)}")
    return msgs
