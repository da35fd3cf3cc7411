"""The report's aggregation section: what a run directory shows about how updates reached the server.

The transport owns both its words (what it protects) and its evidence (key custody, CKKS parameters, SecAgg+
dropouts: `Transport.report_evidence`, read from the run directory); this module starts the section the same
for every transport and asks the run's transport to fill it in.
"""

from __future__ import annotations

from typing import Any

from secure_fedkim.federation.transports import TRANSPORTS, transport_for

from .collect import Finding, RunFacts


def aggregation_facts(run: RunFacts) -> tuple[dict, dict[str, list[Finding]]]:
    """What the run directory shows about its transport: the report's `aggregation` section and its findings."""
    transport = transport_for(run.cfg)
    sections = {t.report_section: None for t in TRANSPORTS.values() if t.report_section}  # ckks, secagg
    out: dict[str, Any] = {"mode": transport.report_mode, "is_differential_privacy": False, **sections,
                           "server_has_secret_key": None, "authenticated_payloads": None}
    f: dict[str, list[Finding]] = {}
    transport.report_evidence(run, out, f)
    return out, f
