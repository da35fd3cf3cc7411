"""What `secure-fedkim audit` is asked to do: :class:`AuditConfig` (configs/audit.yaml), one section per kind of
audit, validated with one error naming the file and the key (:class:`AuditConfigError`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from attacks.mia import ATTACKS, MIA_ATTACKS
from attacks.whitebox import WhiteboxSection
from secure_fedkim.config import ConfigError
from secure_fedkim.config_errors import validate_mapping

#: family-wise error rate of the MIA rows (attacks.audit corrects their p-values with Holm-Bonferroni)
SIGNIFICANCE = 0.05

__all__ = ["SIGNIFICANCE", "AuditConfig", "AuditConfigError", "CanarySection", "GameSection", "InversionSection",
           "MIASection", "load_audit_config", "parse_audit_config", "register_section", "unregister_section"]


class AuditConfigError(ConfigError):
    """A bad audit config; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MIASection(_Strict):
    enabled: bool = True
    attacks: list[Literal[ATTACKS]] = Field(  # attacks.mia.MIA_ATTACKS
        default_factory=lambda: list(ATTACKS), min_length=1
    )
    reference_models: int = Field(4, ge=1)  # 4: references are most of the audit's time (module docstring)
    reference_mode: Literal["online", "offline"] = "online"
    reference_epochs: int | None = Field(None, ge=1)  # None: the run's rounds x the task's local epochs
    nonmember_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # of the test split; the rest is population data
    max_records: int | None = Field(1000, ge=10)  # members (and as many non-members) per target
    min_records: int = Field(10, ge=2)  # a target with fewer candidates is skipped, with the reason
    rmia_gamma: float = Field(1.0, gt=0.0)
    rmia_offline_a: float = Field(0.3, ge=0.0, le=1.0)
    per_record_variance_min: int = Field(32, ge=2)
    top_k: int = Field(10, ge=0)
    bootstrap: int = Field(200, ge=10)

    @model_validator(mode="after")
    def _check(self):
        needs_refs = any(MIA_ATTACKS[a].needs_references for a in self.attacks)
        if needs_refs and self.reference_mode == "online" and (self.reference_models < 2 or self.reference_models % 2):
            raise ValueError(
                f"reference_models: online reference models need an even number >= 2 (each record IN for half "
                f"of them), got {self.reference_models}; use reference_mode: offline for one"
            )
        return self


class CanarySection(_Strict):
    enabled: bool = True
    canaries: int = Field(200, ge=2)
    kind: Literal["ood", "flip"] = "ood"
    trials: int = Field(1, ge=1)  # 1: one-run auditing; more: repeated trainings, pooled
    epochs: int | None = Field(None, ge=1)  # None: the hospital's steps of that task, from its ledger
    tasks: list[str] | None = None  # None: every audited task
    # patient-unit runs only: records of one canary patient (copies of one canary; attacks.dp_audit, step 8);
    # None: the run's max_records_per_patient_step (more than that adds nothing: a step takes at most k)
    records_per_canary_patient: int | None = Field(None, strict=True)

    @model_validator(mode="after")
    def _check(self):
        r = self.records_per_canary_patient
        if r is not None and r < 1:
            raise ValueError(
                f"records_per_canary_patient: must be an integer >= 1 (the records of one canary patient in a "
                f"patient-level run) or null (the run's max_records_per_patient_step), got {r!r}"
            )
        return self


class GameSection(_Strict):
    """The auditor-controlled membership game (attacks.mia.auditor_game), per hospital and task."""

    enabled: bool = True
    min_nonmember_pairs: int = Field(1000, ge=10)  # K x n / 2 non-member pairs wanted: 1000 measures TPR@0.1%
    min_models: int = Field(4, ge=4)
    max_models: int = Field(16, ge=4)  # cost cap: a shard too small for min_nonmember_pairs gets max_models
    epochs: int | None = Field(None, ge=1)  # None: the hospital's own (rounds x the task's local epochs)
    tasks: list[str] | None = None  # None: every audited task

    @model_validator(mode="after")
    def _check(self):
        if self.max_models < self.min_models:
            raise ValueError(f"max_models: must be >= min_models ({self.min_models}), got {self.max_models}")
        return self


class InversionSection(_Strict):
    enabled: bool = True
    records: int = Field(1, ge=1)  # per hospital and task
    modalities: list[Literal["tabular", "timeseries", "signal", "image"]] = ["tabular"]
    loss: Literal["cosine", "l2"] = "cosine"
    optimizer: Literal["adam", "lbfgs"] = "adam"
    steps: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0.0)
    noise_multiplier: float = Field(1.0, gt=0.0)  # for hospitals without DP: what DP-SGD at this noise would do
    max_grad_norm: float = Field(1.0, gt=0.0)


class RunLevelSection(_Strict):
    """The run-level audit (attacks/runlevel.py): the run's hospitals re-executed, every DP step's randomness tapped."""

    enabled: bool = True  # on by default for every run with DP (it does nothing without)
    coordinates: int = Field(64, ge=8)  # tapped per step: the noise correlation test sees 3.6-5 / sqrt(64 x steps)
    false_alarm: float = Field(1e-4, gt=0.0, lt=0.1)  # per family of tests: a flag fails the report
    canaries: int = Field(5000, ge=0)  # gradient canaries per hospital for the whole-run lower bound (0: none)


class AuditConfig(_Strict):
    """What `secure-fedkim audit` runs; defaults are configs/audit.yaml's."""

    targets: list[Literal["local", "global", "fm"]] = Field(default_factory=lambda: ["local", "global", "fm"], min_length=1)
    clients: list[str] | None = None  # None: every hospital of the run
    tasks: list[str] | None = None  # None: every training task of the run
    fprs: list[float] = Field(default_factory=lambda: [0.1, 0.01, 0.001], min_length=1)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    workers: int | None = Field(None, ge=1)  # processes, one job per task; None: 2 where 2 cores are free, else 1
    mia: MIASection = MIASection()
    canary: CanarySection = CanarySection()
    game: GameSection = GameSection()
    inversion: InversionSection = InversionSection()
    whitebox: WhiteboxSection = WhiteboxSection()
    runlevel: RunLevelSection = RunLevelSection()

    @model_validator(mode="after")
    def _check(self):
        bad = [f for f in self.fprs if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"fprs: each target false positive rate must be in (0, 1), got {bad}")
        return self


#: config sections of registered audit kinds (``attacks.audit.register_audit_kind``), by key: accepted in
#: audit.yaml beside the built-in ones (:func:`parse_audit_config`), with their defaults when absent
SECTIONS: dict[str, type[BaseModel]] = {}
_models: dict[tuple, type[AuditConfig]] = {}


def register_section(key: str, section: type[BaseModel]) -> None:
    """Accept ``key`` in audit configs, validated as ``section`` (every field with a default: an absent section
    reads as ``section()``). Refuses a key already taken by another section."""
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        raise TypeError(f"audit config section {key!r}: {section!r} is not a pydantic model")
    if not key.isidentifier() or key.startswith("_"):
        raise ValueError(f"audit config key {key!r} is not an identifier")
    taken = AuditConfig.model_fields[key].annotation if key in AuditConfig.model_fields else SECTIONS.get(key)
    if taken is not None and taken is not section:
        raise ValueError(f"audit config key {key!r} is already the section {getattr(taken, '__name__', taken)}")
    try:
        section()
    except Exception as e:  # noqa: BLE001 (pydantic's ValidationError and a validator's own)
        raise ValueError(f"audit config section {key!r}: {section.__name__}() must validate (defaults for every "
                         f"field): {e}") from None
    if key not in AuditConfig.model_fields:
        SECTIONS[key] = section


def unregister_section(key: str) -> None:
    SECTIONS.pop(key, None)


def config_model() -> type[AuditConfig]:
    """:class:`AuditConfig`, or with registered sections a subclass of it with one field per section (still
    refusing unknown keys)."""
    if not SECTIONS:
        return AuditConfig
    fields = tuple(SECTIONS.items())
    if fields not in _models:
        _models[fields] = create_model("AuditConfig", __base__=AuditConfig, __module__=__name__,
                                       **{k: (sec, Field(default_factory=sec)) for k, sec in fields})
    return _models[fields]


def parse_audit_config(data: Any, source: str = "<audit config>") -> AuditConfig:
    """Validate a mapping; one :class:`AuditConfigError` naming ``source`` and the key. The registered kinds'
    sections (:data:`SECTIONS`) are accepted beside the built-in ones."""
    return validate_mapping(config_model(), {} if data is None else data, source, AuditConfigError)


def load_audit_config(path: str | Path | None) -> AuditConfig:
    """Read and validate an audit YAML (``None``: the defaults, as in configs/audit.yaml)."""
    if path is None:
        return parse_audit_config({})
    path = Path(path)
    if not path.is_file():
        raise AuditConfigError(f"{path}: audit config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AuditConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_audit_config(data, str(path))
