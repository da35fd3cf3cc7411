"""An audit kind added from this file alone (issue #26), touching no project file: its config section, its part of
audit.json and row type, its report reading and partner redaction, its terminal lines, registered with
`register_audit_kind`; its rows appear in audit.json and the report, and reach a partner's report only when the kind
declares them safe (deny by default).

Two toy run-scope kinds on the 5ecdfde fixture run (a real 4-hospital run; every built-in kind disabled, so the
audit takes seconds): ``toy_probe`` declares nothing about partners, ``toy_shared`` declares ``partner_view="rows"``.
Both are unregistered after each test.
"""

import json
import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

import attacks.audit as audit_mod
from attacks.audit import (
    AuditKind,
    audit_run,
    format_audit_table,
    register_audit_kind,
    unregister_audit_kind,
)
from attacks.audit_config import AuditConfigError, parse_audit_config
from secure_fedkim.audit_schema import ROW_TYPES, RowType
from secure_fedkim.report.build import build_report

FIXTURE = Path(__file__).parent / "fixtures" / "run_5ecdfde"
CLIENTS = ["cleveland", "hungary", "switzerland", "va_long_beach"]
THREAT = "toy: the released global model's size"
OFF = {"mia": {"enabled": False}, "canary": {"enabled": False}, "game": {"enabled": False},
       "inversion": {"enabled": False}, "whitebox": {"enabled": False}, "runlevel": {"enabled": False},
       "tasks": ["heart_disease"], "workers": 1}


class ToySection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    level: int = Field(1, ge=1)


def _row_type(part: str) -> RowType:
    return RowType(part, "a toy row per hospital", required={"threat_model": "str", "score": "number"},
                   optional={"hospital": "str", "shard_index": "int"}, record_ids=("shard_index",))


def _runner(part: str, key: str):
    def run(ctx, clients):  # scope "run": once per audit, over the audited hospitals
        level = getattr(ctx.config, key).level
        for i, h in enumerate(clients):
            ctx.audit[part].append({"hospital": h, "threat_model": THREAT, "score": level + i / 10, "shard_index": i})
        ctx.audit[part].append({"threat_model": THREAT, "score": -1.0})  # about no one hospital

    return run


def _kind(name: str, **extra) -> AuditKind:
    return AuditKind(name, name, _row_type(name), ToySection, name, THREAT, "run",
                     enabled=lambda c, run, task: getattr(c, name).enabled, run=_runner(name, name), **extra)


@pytest.fixture
def toy_kinds():
    probe = register_audit_kind(_kind("toy_probe", table_lines=lambda audit: [
        "", f"Toy probe: {len(audit.get('toy_probe', []))} rows"]))
    shared = register_audit_kind(_kind("toy_shared", partner_view="rows"))
    yield probe, shared
    unregister_audit_kind("toy_probe")
    unregister_audit_kind("toy_shared")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_a_registered_kinds_section_is_accepted_in_the_audit_config_and_unknown_keys_still_refused(toy_kinds):
    cfg = parse_audit_config({"toy_probe": {"level": 3}})
    assert cfg.toy_probe == ToySection(level=3) and cfg.toy_shared == ToySection()  # absent: its defaults
    assert parse_audit_config({}).model_dump()["toy_probe"] == {"enabled": True, "level": 1}
    with pytest.raises(AuditConfigError, match=r"a\.yaml: toy_probe\.levle: unknown key \(allowed: enabled, level\)"):
        parse_audit_config({"toy_probe": {"levle": 2}}, "a.yaml")
    with pytest.raises(AuditConfigError, match=r"a\.yaml: toy_probe\.level: "):
        parse_audit_config({"toy_probe": {"level": 0}}, "a.yaml")
    with pytest.raises(AuditConfigError, match=r"a\.yaml: toy_probes: unknown key \(allowed: .*toy_probe"):
        parse_audit_config({"toy_probes": {}}, "a.yaml")


def test_register_audit_kind_refuses_a_taken_name_part_or_key_and_an_incomplete_kind(toy_kinds):
    with pytest.raises(ValueError, match="already registered"):
        register_audit_kind(_kind("toy_probe"))
    taken_part = AuditKind("toy_other", "mia", _row_type("mia"), ToySection, "toy_other", THREAT, "run",
                           enabled=lambda c, run, task: True, run=lambda ctx, clients: None)
    with pytest.raises(ValueError, match="part 'mia' is already written"):
        register_audit_kind(taken_part)
    taken_key = AuditKind("toy_other", "toy_other", _row_type("toy_other"), ToySection, "mia", THREAT, "run",
                          enabled=lambda c, run, task: True, run=lambda ctx, clients: None)
    with pytest.raises(ValueError, match="key 'mia' is already the section MIASection"):
        register_audit_kind(taken_key)
    no_units = AuditKind("toy_other", "toy_other", _row_type("toy_other"), ToySection, "toy_other", THREAT, "task",
                         enabled=lambda c, run, task: True, run=lambda ctx, job, unit: None)
    with pytest.raises(ValueError, match="needs units"):
        register_audit_kind(no_units)
    with pytest.raises(ValueError, match="partner_view must be"):
        register_audit_kind(_kind("toy_other", partner_view="everyone"))
    assert "toy_other" not in ROW_TYPES and "toy_other" not in [k.name for k in audit_mod.AUDIT_KINDS]
    with pytest.raises(AuditConfigError, match="unknown key"):  # nothing of a refused kind stayed registered
        parse_audit_config({"toy_other": {}})


def test_a_toy_kinds_rows_reach_audit_json_and_the_report_and_a_partner_only_when_declared_safe(toy_kinds, run_dir):
    audit = audit_run(run_dir, parse_audit_config({**OFF, "toy_probe": {"level": 2}}), progress=False)
    written = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert written == audit and written["config"]["toy_probe"] == {"enabled": True, "level": 2}
    assert [r["score"] for r in written["toy_probe"]] == [2.0, 2.1, 2.2, 2.3, -1.0]
    assert [r.get("hospital") for r in written["toy_shared"]] == CLIENTS + [None]
    assert not written["mia"] and not written["dp_audit"] and not written["runlevel"]  # the built-ins were off
    assert "Toy probe: 5 rows" in format_audit_table(written)

    full = build_report(run_dir)["audit"]
    assert [(r["hospital"], r["score"], r["path"]) for r in full["toy_probe"]] == (
        [(h, 2.0 + i / 10, f"toy_probe/{i}") for i, h in enumerate(CLIENTS)] + [(None, -1.0, "toy_probe/4")])
    assert all("shard_index" not in r for r in full["toy_probe"] + full["toy_shared"])  # record ids never copied
    assert [r["hospital"] for r in full["toy_shared"]] == CLIENTS + [None]

    partner = build_report(run_dir, partner="hungary")
    assert "toy_probe" not in partner["audit"]  # declared nothing: never in a partner's report
    assert "toy_probe" not in json.dumps(partner["audit"])
    assert [r["hospital"] for r in partner["audit"]["toy_shared"]] == ["hungary", None]  # its own, and no one's
    others = [h for h in CLIENTS if h != "hungary"]
    assert not any(h in json.dumps(partner["audit"]["toy_shared"]) for h in others)


def test_an_unregistered_kind_leaves_nothing_behind(toy_kinds):
    unregister_audit_kind("toy_probe")
    unregister_audit_kind("toy_shared")
    assert [k.name for k in audit_mod.AUDIT_KINDS] == ["mia", "game", "canary", "inversion", "whitebox", "mechanism",
                                                       "runlevel"]
    assert "toy_probe" not in ROW_TYPES
    with pytest.raises(AuditConfigError, match="unknown key"):
        parse_audit_config({"toy_probe": {}})
    with pytest.raises(ValueError, match="built in"):
        unregister_audit_kind("mia")
