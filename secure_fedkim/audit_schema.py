"""The schema of ``RUN_DIR/audit/audit.json``: what `secure-fedkim audit` writes and the report reads.

One place for the contract between the writer (:mod:`attacks.audit`, which checks every row here before it writes
the file) and the reader (:func:`secure_fedkim.report.build.read_audit`, which reads each part through its row
type and names what it cannot read). It lives beside :mod:`secure_fedkim.rundir.layout` (the run directory's paths), not
under ``secure_fedkim.report``: ``attacks`` may import ``secure_fedkim`` but not the other way round, and the writer
should not load the report package to write a file. Standard library only.

audit.json is an object with ``schema`` (:data:`SCHEMA`), the run's facts (``run_dir``, ``config``,
``accountant``, ``auditor_knowledge``, ...) and one list per part (:data:`PARTS`), each row an object of that part's
:class:`RowType`. A row type has required fields (present, of their type, in every row the audit writes today and
in every row the previous release, commit 5ecdfde, wrote) and optional ones (fields added later, or absent from
some rows: checked for their type when present; ``null`` is allowed). Fields a row type does not name are
allowed and not read. An audit.json from that release has no ``whitebox`` or ``mechanism`` part: a missing part
reads as empty.

Messages name the part, the row and the field: ``audit.json: mia[3] lacks field 'auc'``,
``audit.json: dp_audit[0].eps_lb is not a number: 'x'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEMA = "secure-fedkim-audit/1"

#: field kinds: a name, with a trailing "?" when a required field may be null
_TYPES: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
}


@dataclass(frozen=True)
class Problem:
    """One thing in audit.json that does not follow the schema. ``index``/``field`` are None when the problem is
    the part or the file; ``refused``: the row (or part) cannot be read; otherwise only ``field`` is ignored."""

    message: str
    part: str | None = None
    index: int | None = None
    field: str | None = None
    refused: bool = True

    def __str__(self) -> str:
        return self.message


class AuditSchemaError(ValueError):
    """audit.json (or a row about to be written to it) does not follow the schema; ``problems`` names each."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("; ".join(p.message for p in self.problems))


@dataclass(frozen=True)
class RowType:
    """The rows of one audit.json part: required and optional fields with their kinds (see :data:`_TYPES`), and
    the fields that identify records (``record_ids``: written for the auditor, never copied into a report)."""

    part: str
    doc: str
    required: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)
    record_ids: tuple[str, ...] = ()

    def problems(self, row: Any, index: int, source: str = "audit.json") -> list[Problem]:
        """What is wrong with ``row`` (the ``index``-th of its part); [] when it reads."""
        where = f"{source}: {self.part}[{index}]"
        if not isinstance(row, dict):
            return [Problem(f"{where} is not an object: {_show(row)}", self.part, index)]
        out = []
        for name, kind in self.required.items():
            if name not in row:
                out.append(Problem(f"{where} lacks field {name!r}", self.part, index, name))
            elif not _is(kind, row[name]):
                out.append(Problem(_wrong(where, name, kind, row[name]), self.part, index, name))
        for name, kind in self.optional.items():
            if row.get(name) is not None and not _is(kind, row[name]):
                out.append(Problem(_wrong(where, name, kind, row[name]), self.part, index, name, refused=False))
        return out

    def check(self, row: Any, index: int = 0, source: str = "audit.json") -> dict:
        """``row`` when it follows the schema (optional fields included); else :class:`AuditSchemaError`."""
        found = self.problems(row, index, source)
        if found:
            raise AuditSchemaError(found)
        return row


def _is(kind: str, value: Any) -> bool:
    nullable = kind.endswith("?")
    return (nullable and value is None) or _TYPES[kind.rstrip("?")][1](value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _wrong(where: str, name: str, kind: str, value: Any) -> str:
    return f"{where}.{name} is not {_TYPES[kind.rstrip('?')][0]}{' or null' if kind.endswith('?') else ''}: {_show(value)}"


MIA_ROW = RowType(
    "mia", "one membership-inference attack on one target (a released model, or the auditor's game) and task",
    required={"attack": "str", "target": "str", "target_kind": "str", "task": "str", "auc": "number",
              "auc_ci95": "list", "tpr_at_fpr": "dict", "n_members": "int", "n_nonmembers": "int"},
    optional={"tpr_at_fpr_note": "dict", "balanced_accuracy": "number", "auc_null_std": "number", "top_exposed": "list",
              "target_artifact": "str", "modality": "str", "access": "str", "matched_on": "str",
              "training_records": "int", "reference_models": "int", "reference_mode": "str", "reference_dp": "dict",
              "per_record_exposure": "dict", "roc_png": "str", "lira_variance": "str",
              # added after 5ecdfde (issue #15 and later)
              "threat_model": "str", "p_value": "number", "p_adjusted": "number", "significant": "bool",
              "auc_ci": "list", "n_pairs": "int", "min_measurable_fpr": "number", "tpr_measurable": "dict",
              "tpr_ci": "dict", "game_models": "int", "game_epochs": "int", "game_sample_rate": "number",
              "candidate_records": "int"},
    record_ids=("top_exposed",),
)

DP_AUDIT_ROW = RowType(
    "dp_audit", "one black-box canary replay of a hospital's training of a task, checked against its accountant",
    required={"hospital": "str", "task": "str", "canaries": "int", "kind": "str", "mode": "str", "trials": "int",
              "dp": "bool", "eps_lb": "number", "eps_accountant": "number?", "canary_auc": "number?",
              "confidence": "number"},
    optional={"eps_lb_one_run": "number", "consistent_with_accountant": "bool", "note": "str", "delta": "number",
              "noise_multiplier": "number", "max_grad_norm": "number", "accountant": "str",
              "accountant_noise_multiplier": "number", "accountant_epsilon": "number", "training_records": "int",
              # added after 5ecdfde
              "threat_model": "str", "status": "str", "reasons": "list", "max_certifiable_epsilon": "number",
              "accountant_epsilon": "number", "ratio": "number", "privacy_unit": "str", "epsilon_unit": "str",
              "canary_unit": "str", "records_per_canary": "int", "steps_ledger": "int", "sample_rate_ledger": "number",
              "replay_schedule_from": "str", "eps_lb_one_run_method": "str"},
)

WHITEBOX_ROW = RowType(
    "whitebox", "the white-box gradient-canary audit of one hospital's DP-SGD step on one task (after 5ecdfde)",
    required={"hospital": "str", "task": "str", "threat_model": "str", "canaries": "int", "eps_lb_one_run": "number",
              "status": "str", "reasons": "list"},
    optional={"eps_lb_one_run_method": "str", "gdp_mu_estimate": "number", "gdp_mu_interval": "list",
              "accountant_gdp_mu": "number", "accountant_epsilon": "number",
              "accountant_epsilon_audited_steps": "number", "max_certifiable_epsilon": "number", "ratio": "number",
              "checks": "list", "delta": "number", "confidence": "number", "noise_multiplier": "number",
              "max_grad_norm": "number", "steps_observed": "int", "steps_ledger": "int"},
)

MECHANISM_ROW = RowType(
    "mechanism", "the per-step mechanism audit of one hospital's DP plan (after 5ecdfde)",
    required={"hospital": "str", "threat_model": "str", "noise_multiplier": "number", "trials": "int",
              "status": "str", "reasons": "list"},
    optional={"task": "str", "max_grad_norm": "number", "mu_configured": "number", "mu_estimate": "number",
              "mu_interval": "list", "tolerance": "number", "confidence": "number", "steps": "int"},
)

RECONSTRUCTION_ROW = RowType(
    "reconstruction", "one update-inversion attempt on one record's single-record update (or the transport's row)",
    required={"update": "str", "visible": "bool", "hospital": "str", "task": "str"},
    optional={"shard_index": "int", "model": "str", "mse": "number", "relative_mse": "number", "cosine": "number",
              "cosine_centered": "number", "matching_loss": "number", "noise_multiplier": "number",
              "max_grad_norm": "number", "steps": "int", "note": "str", "dp_source": "str",
              "threat_model": "str"},  # threat_model: after 5ecdfde
    record_ids=("shard_index",),
)

RUNLEVEL_ROW = RowType(
    "runlevel", "the run-level audit of one DP hospital: the run re-executed, its randomness examined as executed (#25)",
    required={"hospital": "str", "threat_model": "str", "status": "str", "reasons": "list"},
    optional={"could_detect": "str", "sessions": "int", "steps_tapped": "int", "coordinates": "int",
              "noise_scale_ratio": "number", "noise_scale_interval": "list", "max_abs_noise_z": "number",
              "noise_z_threshold": "number", "max_batch_overlap_z": "number", "batch_z_threshold": "number",
              "false_alarm": "number", "canaries": "int", "canary_steps": "int", "accountant_epsilon": "number",
              "ledger_steps": "int", "eps_lb_one_run": "number", "eps_lb_one_run_steinke": "number",
              "max_certifiable_epsilon": "number", "eps_lb_one_run_method": "str", "one_run_guesses": "int", "one_run_correct": "int",
              "confidence": "number"},
)

SKIPPED_ROW = RowType(
    "skipped", "an audit that was not run, and why",
    required={"what": "str", "why": "str"},
    optional={"threat_model": "str"},  # after 5ecdfde
)

#: every part of audit.json, in the order the audit writes them
ROW_TYPES: dict[str, RowType] = {t.part: t for t in (MIA_ROW, DP_AUDIT_ROW, WHITEBOX_ROW, MECHANISM_ROW,
                                                     RUNLEVEL_ROW, RECONSTRUCTION_ROW, SKIPPED_ROW)}
PARTS = tuple(ROW_TYPES)  # the built-in parts; with registered ones: parts()
#: what a registered part (:func:`register_part`; ``attacks.audit.register_audit_kind``) declares for the report,
#: which reads it here so that ``secure_fedkim.report`` never imports ``attacks``: ``partner_view`` (None: never
#: in a partner's report; ``"rows"``: the partner's own rows and the hospital-free ones; ``"run"``: as is) and
#: ``report_reader`` (``(audit section, row, [part, index], row context)``; None: the report keeps the row, less
#: its record ids, under the part's own key of its audit section)
PARTNER_VIEWS: dict[str, str | None] = {}
REPORT_READERS: dict[str, Any] = {}
_BUILT_IN = frozenset(ROW_TYPES)
#: keys audit.json and the report's audit section hold besides the parts' rows: no part may take one
_REPORT_KEYS = frozenset({"run", "source", "note", "auditor_knowledge", "low_fpr_note", "consistency", "roc_images",
                          "worst_leakage", "other_hospitals", "summary", "schema", "config", "accountant", "seconds",
                          "workers", "cpu_seconds_by_part", "generated_at", "run_dir", "run_name", "aggregation"})


def parts() -> tuple[str, ...]:
    """Every part of audit.json, built-in and registered, in the order the audit writes them."""
    return tuple(ROW_TYPES)


def register_part(row: RowType, partner_view: str | None = None, report_reader: Any = None) -> None:
    """A new part of audit.json: its row type (the writer checks its rows, :func:`read_audit_json` reads them) and
    how the report reads it and shows it to a partner. Refuses a part already known."""
    if not isinstance(row, RowType):
        raise TypeError(f"register_part: {row!r} is not a RowType")
    if row.part in ROW_TYPES:
        raise ValueError(f"audit.json part {row.part!r} is already registered")
    if row.part in _REPORT_KEYS or not row.part.isidentifier() or row.part.startswith("_"):
        raise ValueError(f"audit.json part {row.part!r}: not a name a part may take (a key of the report's audit "
                         f"section, or not an identifier)")
    if partner_view not in (None, "rows", "run"):
        raise ValueError(f"{row.part}: partner_view must be None (never), 'rows' or 'run', not {partner_view!r}")
    if report_reader is not None and not callable(report_reader):
        raise TypeError(f"{row.part}: report_reader must be callable or None")
    ROW_TYPES[row.part] = row
    PARTNER_VIEWS[row.part] = partner_view
    if report_reader is not None:
        REPORT_READERS[row.part] = report_reader


def unregister_part(part: str) -> None:
    """Forget a registered part (a built-in one stays)."""
    if part in _BUILT_IN:
        raise ValueError(f"audit.json part {part!r} is built in")
    ROW_TYPES.pop(part, None)
    PARTNER_VIEWS.pop(part, None)
    REPORT_READERS.pop(part, None)
#: per-record fields of any part: never copied into a report
RECORD_ID_FIELDS = ("top_exposed", "scores", "labels", "member_ids", "ids", "shard_index")


@dataclass
class AuditJson:
    """audit.json as read: the rows of each part that follow the schema (with their index in the file), in the
    order the parts appear in the file, and the problems found (each naming part, row and field)."""

    schema: Any = None
    rows: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    auditor_knowledge: str | None = None
    accountant: dict = field(default_factory=dict)

    def part(self, name: str) -> list[tuple[int, dict]]:
        return self.rows.get(name, [])


def read_audit_json(data: Any, source: str = "audit.json") -> AuditJson:
    """Read parsed audit.json strictly: each part through its row type. A row missing a required field, or with
    one of the wrong type, is left out and named in ``problems``; a wrong optional field is named and the row is
    kept; an unknown schema id is named and the parts are read all the same. Never raises."""
    out = AuditJson()
    if not isinstance(data, dict):
        out.problems.append(Problem(f"{source}: the top level is not an object but {type(data).__name__}"))
        return out
    out.schema = data.get("schema")
    if out.schema != SCHEMA:
        out.problems.append(Problem(
            f"{source}: schema is {_show(out.schema)}, not {SCHEMA!r}: written by another program or version"
            if "schema" in data else f"{source}: lacks field 'schema' (expected {SCHEMA!r})", refused=False))
    if isinstance(data.get("auditor_knowledge"), str):
        out.auditor_knowledge = data["auditor_knowledge"]
    if isinstance(data.get("accountant"), dict):
        out.accountant = data["accountant"]
    for part in [k for k in data if k in ROW_TYPES]:  # the file's order (the report keeps it)
        rows = data[part]
        if not isinstance(rows, list):
            out.problems.append(Problem(f"{source}: {part} is not a list: {_show(rows)}", part))
            continue
        kept = out.rows.setdefault(part, [])
        for i, row in enumerate(rows):
            found = ROW_TYPES[part].problems(row, i, source)
            out.problems.extend(found)
            if not any(p.refused for p in found):
                kept.append((i, row))
    return out


def check_audit_json(data: Any, source: str = "audit.json") -> None:
    """The writer's check: every part present and every row (optional fields included) following the schema;
    :class:`AuditSchemaError` naming each problem otherwise."""
    read = read_audit_json(data, source)
    problems = list(read.problems)
    if isinstance(data, dict):
        problems += [Problem(f"{source}: lacks part {p!r}", p) for p in parts() if p not in data]
    if problems:
        raise AuditSchemaError(problems)
