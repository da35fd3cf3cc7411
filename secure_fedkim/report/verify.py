"""``verify_report``: does a written report still match its signature and the run it describes?

Checks, each mismatch one message naming the file, ledger entry or report field:
  1. the Ed25519 signature (``<stem>.sig``) over the exact bytes of ``<stem>.json``;
  2. the report against the shipped JSON Schema, and its recorded signing-key fingerprint;
  3. every privacy ledger re-read (hash chain) and its head compared with ``provenance.ledger_heads``
     (entries appended or dropped after the report are named), the key holder's ledger head, and the
     commitment to the other hospitals' heads in a partner report;
  4. config.yaml, resolved_config.json and every listed artifact re-hashed (and artifacts present now
     but absent from the report);
  5. every epsilon (spent, per round, planned, independent, GDP mu, patient level) recomputed from the
     ledgers by the accountants, every per-hospital figure compared, and every check's status re-derived.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from privacy.ledger import LedgerTampered, PrivacyLedger

from .build import SCHEMA_VERSION, _check_rows, _facts, _hospital_entry, _others, artifact_paths
from .collect import digest_of, sha256_file
from .sign import PUBLIC_KEY, SIGNING_DIR, fingerprint, load_public_key, verify_bytes

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
        public_key: the issuer's Ed25519 public key (PEM or raw bytes, a path, or a key object). Default: the
            run's ``report_signing/public_key.pem``, which proves integrity to whoever trusts that file.
        run_dir: the run the report describes (default: the report's directory).
    """
    path = Path(report_json_path)
    if not path.is_file():
        return [f"{path}: no such report file"]
    name = path.name
    run_dir = Path(run_dir) if run_dir is not None else path.parent
    msgs: list[str] = []
    data = path.read_bytes()
    # 1. signature
    key, key_desc = None, "the given public key"
    try:
        if public_key is None:
            key_desc = f"{SIGNING_DIR}/{PUBLIC_KEY}"
            if (run_dir / SIGNING_DIR / PUBLIC_KEY).is_file():
                key = load_public_key(run_dir / SIGNING_DIR / PUBLIC_KEY)
            else:
                msgs.append(f"{key_desc}: missing, so the signature of {name} cannot be checked (pass the issuer's public key)")
        else:
            key = load_public_key(public_key)
    except (ValueError, TypeError, OSError) as e:
        msgs.append(f"{key_desc}: not a readable Ed25519 public key ({e})")
    sig_path = path.with_suffix(".sig")
    if not sig_path.is_file():
        msgs.append(f"{sig_path.name}: missing: {name} is not signed")
    elif key is not None and not verify_bytes(key, data, sig_path.read_bytes()):
        msgs.append(f"{name}: the Ed25519 signature in {sig_path.name} does not verify under {key_desc}: {name} was "
                    f"changed after it was signed (or signed with another key)")
    # 2. content
    try:
        report = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return msgs + [f"{name}: not valid JSON ({e}); nothing further can be checked"]
    if not isinstance(report, dict):
        return msgs + [f"{name}: not a report object"]
    from .render import schema_errors

    errs = schema_errors(report)
    for e in errs[:MAX_SCHEMA_MESSAGES]:
        msgs.append(f"{name}: does not fit the report schema {SCHEMA_VERSION}: {e}")
    if len(errs) > MAX_SCHEMA_MESSAGES:
        msgs.append(f"{name}: {len(errs) - MAX_SCHEMA_MESSAGES} more schema errors")
    if errs:
        return msgs
    prov = report["provenance"]
    sig = prov.get("signature") or {}
    if key is not None and sig.get("public_key_sha256") != fingerprint(key):
        msgs.append(f"{name}: provenance.signature.public_key_sha256 {sig.get('public_key_sha256')} is not the "
                    f"fingerprint of {key_desc} ({fingerprint(key)})")
    # 3-5. the run
    try:
        f = _facts(run_dir)
    except Exception as e:  # not a run (any more): say so, do not crash
        return msgs + [f"{run_dir}: the run directory cannot be read ({type(e).__name__}: {e})"]
    run, hs = f["run"], f["hospitals"]
    partner = report["partner"]
    if partner is not None and partner not in hs:
        return msgs + [f"{name}: partner {partner!r} is not a hospital of the run in {run_dir}"]
    view = [h["hospital"] for h in report["hospitals"]]
    unknown = [h for h in view if h not in hs]
    if unknown:
        return msgs + [f"{name}: hospitals {unknown} are not in the run in {run_dir}"]
    others = [c for c in run.clients if c not in view]
    # config and artifacts
    for label, field, file in (("config.yaml", "config_sha256", "config.yaml"),
                               ("resolved_config.json", "resolved_config_sha256", "resolved_config.json")):
        p = run_dir / file
        now = sha256_file(p) if p.is_file() else None
        if now != prov.get(field):
            msgs.append(f"{label}: sha256 {now or '(missing)'} differs from the report's provenance.{field} {prov.get(field)}")
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
    if others:
        other_art = {rel: sha256_file(run_dir / rel) for rel, hosp in current if hosp is not None and hosp not in view}
        if (digest_of(other_art) if other_art else None) != prov.get("other_hospitals_artifacts_sha256"):
            msgs.append("provenance.other_hospitals_artifacts_sha256: another hospital's artifact (local model or "
                        "public key) changed, was added or removed after the report")
    # ledgers
    heads = prov["ledger_heads"]
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
            try:
                PrivacyLedger(run_dir / rel).verify(expected_head=expected)
                entries = PrivacyLedger(run_dir / rel).entries()
                at = next(i for i, e in enumerate(entries) if e["hash"] == expected)
                msgs.append(f"{rel}: {len(entries) - at - 1} entr{'y' if len(entries) - at - 1 == 1 else 'ies'} appended "
                            f"after the report (seq {at + 1} to {len(entries) - 1}); head now {h.head}, the report's "
                            f"provenance.ledger_heads.{c} is {expected}")
            except (LedgerTampered, StopIteration) as e:
                msgs.append(f"{rel}: chain head {h.head} differs from the report's provenance.ledger_heads.{c} "
                            f"{expected}: {e}")
            continue
        mine = next(x for x in report["hospitals"] if x["hospital"] == c)
        diff(mine, json.loads(json.dumps(_hospital_entry(h))), f"hospitals[{c}]", msgs, rel)
    if others:
        now = digest_of({c: hs[c].head for c in others})
        if now != prov.get("other_hospitals_ledger_heads_sha256"):
            bad = sum(not hs[c].ledger_verified for c in others)
            msgs.append("provenance.other_hospitals_ledger_heads_sha256: another hospital's ledger changed after the "
                        f"report ({bad} of {len(others)} other ledgers do not verify)")
        if report.get("other_hospitals") is not None:
            diff(report["other_hospitals"], json.loads(json.dumps(_others([hs[c] for c in others]))), "other_hospitals",
                 msgs, "the other hospitals' ledgers")
    kh = ((f["aggregation"].get("ckks") or {}).get("key_holder_ledger")) or {}
    if kh.get("error"):
        msgs.append(f"{kh['path']}: does not verify: {kh['error']}")
    elif kh.get("head") != prov.get("keyholder_ledger_head"):
        msgs.append(f"keyholder/ledger.jsonl: chain head {kh.get('head')} differs from the report's "
                    f"provenance.keyholder_ledger_head {prov.get('keyholder_ledger_head')}")
    # checks re-derived
    now_checks = {c["name"]: c for c in _check_rows(f, partner)}
    for c in report["checks"]:
        n = now_checks.get(c["name"])
        if n is None:
            msgs.append(f"checks[{c['name']}]: no such check in this version of the rules")
        elif n["status"] != c["status"]:
            msgs.append(f"checks[{c['name']}].status: the report says {c['status']}, the run now gives {n['status']} "
                        f"({n['reason']})")
    return list(dict.fromkeys(msgs))
