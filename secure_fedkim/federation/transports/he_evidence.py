"""What a compliance report reads in an `he` run's directory: key custody from the key holder's own ledger (every
aggregated round decrypted there, once, from enough hospitals) and the CKKS parameters at 128-bit security.

The `he` transport's report evidence (`CKKSTransport.report_evidence`), in its own module: it needs the report's
types (`secure_fedkim.report.collect`), which a federation run never loads.
"""

from __future__ import annotations

from privacy.ledger import GENESIS_HASH, HE_DECRYPT
from secure_fedkim.report.collect import Finding, RunFacts, read_ledger


def ckks_evidence(run: RunFacts, out: dict, f: dict) -> None:
    """Key custody from the key holder's own ledger: every aggregated round decrypted there, once, from enough
    hospitals; CKKS parameters at 128-bit security."""
    agg_summary = run.summary.get("aggregation", {}) or {}
    ckks = dict(agg_summary.get("ckks") or {})
    kh, decrypts = _keyholder_ledger(run, f)
    min_clients = ckks.get("min_clients", run.cfg.federation.min_clients)
    server_key, f["server_secret_key"] = _key_custody(run, agg_summary, ckks, kh, decrypts, min_clients)
    _check_ckks_parameters(ckks, f)
    out["server_has_secret_key"] = server_key
    out["ckks"] = _ckks_section(run, ckks, kh, decrypts, min_clients, server_key)
    out["authenticated_payloads"] = "Ed25519: each hospital signs its ciphertext (public keys in keys/<hospital>.pub)"
    out["description"] = ("Hospitals sent only CKKS ciphertexts; the server summed them with a public-only context; "
                          "a separate key holder decrypted, once per round, only an aggregate that listed at least "
                          "min_clients hospitals' signed contributions, and noise-flooded what it released. It cannot check "
                          "that the ciphertext it decrypts is their sum: a server that follows the protocol releases only "
                          "sums of at least min_clients hospitals, a malicious one could have one hospital's update "
                          "decrypted (threat model). Encryption is confidentiality, not differential privacy.")


def _keyholder_ledger(run: RunFacts, f: dict) -> tuple[dict, list[dict]]:
    """The key holder's ledger as the report shows it, and its ``he_decrypt`` entries (none unless it verifies)."""
    kh_path = run.files.keyholder_ledger
    kh_rel = run.files.relative(kh_path)
    kh = {"path": kh_rel, "exists": kh_path.is_file(), "verified": False, "head": None,
          "entries": 0, "error": None}
    decrypts: list[dict] = []
    if kh["exists"]:
        entries, err = read_ledger(kh_path, run.run_dir)
        if entries is None:
            kh["error"] = err
            f.setdefault("ledger_verified", []).append(
                Finding("fail", f"{kh_rel} does not verify: {err}", None, "the key holder's ledger does not verify"))
        else:
            kh.update(verified=True, head=entries[-1]["hash"] if entries else GENESIS_HASH, entries=len(entries))
            decrypts = [e for e in entries if e.get("event") == HE_DECRYPT]
    return kh, decrypts


def _key_custody(run: RunFacts, agg_summary: dict, ckks: dict, kh: dict, decrypts: list[dict],
                 min_clients) -> tuple[bool | None, list[Finding]]:
    """Whether the server held the secret key (None: not shown), and the findings that say why."""
    kh_rel = kh["path"]
    aggregated = run.aggregated_rounds()
    decrypted_rounds = [int(e.get("round", -1)) for e in decrypts]
    claimed = ckks.get("server_has_secret_key", agg_summary.get("server_has_secret_key"))
    if claimed is True or ckks.get("secret_key_holder") == "server":
        return True, [Finding("fail", f"{run.files.summary.name} records that the aggregating server held the CKKS secret key",
                              None, "the server held the secret key")]
    if not kh["exists"]:
        return None, [Finding("attention", f"he mode, but no {kh_rel}: the run cannot show who decrypted",
                              None, "key custody not shown")]
    if not kh["verified"]:
        return None, [Finding("fail", "the key holder's ledger does not verify, so key custody is not shown", None,
                              "key custody not shown")]
    return _decryptions_checked(aggregated, decrypted_rounds, decrypts, kh_rel, min_clients)


def _decryptions_checked(aggregated: list[int], decrypted_rounds: list[int], decrypts: list[dict], kh_rel: str,
                         min_clients) -> tuple[bool | None, list[Finding]]:
    """Every aggregated round decrypted by the key holder, once, from at least ``min_clients`` hospitals."""
    missing = [r for r in aggregated if r not in decrypted_rounds]
    twice = sorted({r for r in decrypted_rounds if decrypted_rounds.count(r) > 1})
    few = [e for e in decrypts if len(e.get("clients", [])) < int(min_clients)]
    key_f = []
    server_key = False
    if missing:
        server_key = None
        key_f.append(Finding("fail", f"round(s) {missing} were aggregated in he mode with no he_decrypt entry in "
                             f"{kh_rel}: the aggregate was decrypted outside the key holder",
                             None, "an aggregate was decrypted outside the key holder"))
    if twice:
        key_f.append(Finding("fail", f"the key holder decrypted round(s) {twice} more than once", None,
                             "a round was decrypted more than once"))
    if few:
        key_f.append(Finding("fail", f"{kh_rel} seq {few[0].get('seq')}: a decryption of "
                             f"{len(few[0].get('clients', []))} contributions, fewer than min_clients={min_clients}",
                             None, "an aggregate of too few hospitals was decrypted"))
    return server_key, key_f


def _check_ckks_parameters(ckks: dict, f: dict) -> None:
    """A finding unless the summary shows the CKKS parameters within the 128-bit security bound."""
    bits = ckks.get("total_modulus_bits")
    cap = ckks.get("max_total_modulus_bits_128")
    level = str(ckks.get("security_level", ""))
    if not (isinstance(bits, int) and isinstance(cap, int) and bits <= cap and level.startswith("128")):
        f["he_parameters"] = [Finding("attention", f"CKKS parameters not shown to meet 128-bit security "
                                      f"(total modulus bits {bits!r}, 128-bit maximum {cap!r}, level {level!r})",
                                      None, "CKKS security level not shown")]


def _ckks_section(run: RunFacts, ckks: dict, kh: dict, decrypts: list[dict], min_clients, server_key) -> dict:
    return {
        "scheme": ckks.get("scheme", "CKKS"),
        "poly_modulus_degree": ckks.get("poly_modulus_degree"),
        "coeff_mod_bit_sizes": ckks.get("coeff_mod_bit_sizes"),
        "total_modulus_bits": ckks.get("total_modulus_bits"),
        "max_total_modulus_bits_128": ckks.get("max_total_modulus_bits_128"),
        "global_scale": ckks.get("global_scale"),
        "security_level": ckks.get("security_level"),
        "ciphertext_expansion": ckks.get("ciphertext_expansion"),
        "flooding_sigma": ckks.get("flooding_sigma", run.cfg.federation.he.flooding_sigma),
        "min_clients_per_decrypt": min_clients,
        "key_holder": "a separate key-holder process (secure_fedkim.federation.keyholder); the aggregating server holds a "
                      "public-only CKKS context and sums ciphertexts",
        "server_has_secret_key": server_key,
        "decryptions": len(decrypts),
        "min_contributions_per_decryption": min((len(e.get("clients", [])) for e in decrypts), default=None),
        "key_holder_ledger": kh,
        "_decrypt_clients": [list(e.get("clients", [])) for e in decrypts],
    }
