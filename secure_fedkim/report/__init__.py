"""Compliance reports for a finished run: build (report.json content), write (JSON, HTML, PDF, signature), verify.

    from secure_fedkim.report import build_report, write_report, verify_report
    paths = write_report("runs/demo", key="~/.config/secure-fedkim/report_signing_key.pem")  # federation report
    paths = write_report("runs/demo", partner="hungary")  # that hospital's figures, the others as coarse bands
    problems = verify_report(paths.json, public_key="issuer.pub.pem")  # [] when everything matches

See REPORTING.md (fields, status rules, plots, hazards) and :mod:`secure_fedkim.report.build` for the rules.

Public API:
    build_report(run_dir, partner=None, *, reference=None) -> dict        report.json content (reads only)
    write_report(run_dir, partner=None, *, reference=None, key=None) -> ReportPaths  (json, html, pdf, sig)
    verify_report(report_json_path, *, public_key, run_dir=None) -> list[str]   [] = everything matches
    load_schema() -> dict; validate_report(report) -> None (raises jsonschema.ValidationError)

The CLI (`secure-fedkim report-key`, `secure-fedkim report RUN_DIR [--partner NAME] [--key KEY]`,
`secure-fedkim verify REPORT --public-key PEM`) calls new_issuer_key, write_report and verify_report; verify exits
non-zero when the list is not empty.
"""

from .build import SCHEMA_VERSION, build_report, status_of

__all__ = ["SCHEMA_VERSION", "build_report", "status_of", "write_report", "verify_report", "validate_report",
           "load_schema", "ReportPaths"]


def __getattr__(name):  # the writer and verifier pull in matplotlib/fpdf2 only when used
    if name in ("write_report", "ReportPaths", "validate_report", "load_schema"):
        from . import render

        return getattr(render, name)
    if name == "verify_report":
        from .verify import verify_report

        return verify_report
    raise AttributeError(name)
