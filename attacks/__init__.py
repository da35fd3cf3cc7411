"""Leakage audits of what a secure-fedkim run released.

* :mod:`attacks.metrics`: exact ROC, AUC, balanced accuracy, TPR at a fixed FPR (refused when the run has
  too few non-members for it), log-log ROC PNGs, most exposed records as opaque ids.
* :mod:`attacks.mia`: membership inference (loss, LiRA online/offline, RMIA online/offline).
* :mod:`attacks.dp_audit`: canary DP audits, empirical epsilon lower bound beside the accountant's.
* :mod:`attacks.inversion`: gradient inversion of one record's update, plain vs DP, and he/secagg.
* :mod:`attacks.audit`: ``audit_run(run_dir, AuditConfig)`` and ``format_audit_table`` (the CLI's
  ``secure-fedkim audit``).

Importing this package imports nothing heavy; the names below load their module on first use.
``attacks`` reads runs only through ``secure_fedkim.rundir.artifacts.load_run`` and is imported only by the CLI.
"""

from __future__ import annotations

__all__ = ["audit_run", "format_audit_table", "AuditConfig", "AuditConfigError", "load_audit_config"]


def __getattr__(name: str):
    if name in __all__:
        from attacks import audit

        return getattr(audit, name)
    raise AttributeError(f"module 'attacks' has no attribute {name!r}")
