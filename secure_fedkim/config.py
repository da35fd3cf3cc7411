"""Run configuration: YAML validated into typed objects.

Every problem with a config file (unknown key, wrong type, bad value, missing data path, a task whose
modality does not match its data) raises one `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from privacy.profile import PrivacyProfile
from secure_fedkim.config_errors import validate_mapping
from secure_fedkim.data.formats import USER_FORMATS
from secure_fedkim.data.tasks import MODALITIES, TASKS
from secure_fedkim.federation.transport_specs import HESection, SecAggSection, check_federation, unknown_transport
from secure_fedkim.variants import METHODS, VARIANTS


class ConfigError(ValueError):
    """A config file is malformed; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Strict):
    name: str = "fedkim"
    seed: int = 0
    rounds: int = Field(3, ge=1)
    out_dir: str = "runs"


class FederationSection(_Strict):
    clients: list[str] = Field(min_length=1)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0.0)
    min_clients: int = Field(2, ge=1)
    aggregation: str = "plain"  # a registered transport (secure_fedkim.federation.transport_specs.SPECS)
    he: HESection = HESection()  # the transports' own sections (transport_specs)
    secagg: SecAggSection = SecAggSection()

    @field_validator("aggregation")
    @classmethod
    def _registered(cls, v: str) -> str:
        problem = unknown_transport(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("clients: names must be unique")
        if self.min_clients > len(self.clients):
            raise ValueError(f"min_clients: {self.min_clients} is more than the {len(self.clients)} clients")
        check_federation(self)  # the transport's own checks (transport_specs)
        if self.strategy == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError("proximal_mu: fedprox needs proximal_mu > 0 (the paper uses 1e-6)")
        return self


_TABLE_FORMATS = tuple(f for f, spec in USER_FORMATS.items() if spec.table)
_LABEL_FILE_FORMATS = tuple(f for f, spec in USER_FORMATS.items() if spec.label_file)  # resolved like `path`


class DataSource(_Strict):
    """User-brought data in a standard format (see secure_fedkim.data.load_user_data for every key)."""

    format: Literal[tuple(USER_FORMATS)]
    path: str
    label: str
    features: list[str] | None = None
    site: str | None = None
    group: str | None = None  # patient-id column: a patient's records never straddle two splits
    key: str | None = None  # .npz: the samples array
    fs: float | None = Field(None, gt=0.0)  # npy signals: sampling rate in Hz
    channel: int | str | None = None  # wfdb / npy signals: channel name (wfdb) or index
    task: str | None = None  # the name of the loaded data in messages (default user:<file name>)

    @model_validator(mode="after")
    def _check(self):
        only = {"features": _TABLE_FORMATS, "key": ("npy",), "fs": ("npy",), "channel": ("npy", "wfdb")}
        for key, formats in only.items():
            if getattr(self, key) is not None and self.format not in formats:
                raise ValueError(f"{key}: only for format {' / '.join(formats)}, not {self.format!r}")
        if self.format == "npy" and (self.site is not None or self.group is not None):
            raise ValueError("site: npy arrays have no columns; site and group are for tables and label CSVs")
        if self.group is not None and self.format in ("png", "dicom", "wfdb"):
            raise ValueError("group: png/dicom use the label CSV's own 'group' column; wfdb groups windows by record")
        if isinstance(self.channel, int) and self.channel < 0:
            raise ValueError(f"channel: an index must be >= 0, got {self.channel}")
        if self.format == "npy" and isinstance(self.channel, str):
            raise ValueError(f"channel: npy channels are indices, not names like {self.channel!r}")
        return self


class TaskEntry(_Strict):
    name: str
    partition: Literal["natural", "iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0.0)
    max_records: int | None = Field(None, ge=20)
    local_epochs: int | None = Field(None, ge=1)  # this task's local epochs per round (default: client.local_epochs)
    # Only for tasks that are not in the registry, or to override the registry's wording:
    modality: str | None = None
    source: DataSource | None = None
    task_description: str | None = None
    question: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"modality: unknown modality {self.modality!r}; expected one of {list(MODALITIES)}")
        known = TASKS.get(self.name)
        if known is None:
            if self.source is None:
                raise ValueError(f"name: unknown task {self.name!r} with no 'source'; known tasks: {sorted(TASKS)}")
            if self.modality is None or self.task_description is None or self.question is None:
                raise ValueError(f"task {self.name!r} is not in the registry: give modality, task_description and question")
        elif self.modality is not None and self.modality != known.modality:
            raise ValueError(f"modality: task {self.name!r} is {known.modality!r} data, not {self.modality!r}")
        return self


class TasksSection(_Strict):
    train: list[TaskEntry] = Field(min_length=1)
    unseen: list[TaskEntry] = []
    public_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    max_test_records: int | None = Field(400, ge=20)

    @field_validator("unseen", mode="before")
    @classmethod
    def _names_to_entries(cls, v: Any):
        return [{"name": e} if isinstance(e, str) else e for e in (v or [])]

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.train + self.unseen]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task(s) listed twice: {sorted(dup)} (a task is either trained on or unseen)")
        return self


class ClientSection(_Strict):
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    token_dim: int = Field(64, ge=8)
    num_tokens: int = Field(4, ge=1)


class DPProfileSection(_Strict):
    """The YAML shape of a hospital's DP budget (``privacy.profile``, ``privacy.hospitals.NAME``). Parsing only:
    the program uses the :class:`privacy.profile.PrivacyProfile` that :meth:`RunConfig.dp_profile` makes of it."""

    target_epsilon: float = Field(gt=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # None: min(1e-5, 1/(10 n)) for the hospital's n records
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["prv", "rdp"] = "prv"
    # true (default): every DP draw from a ChaCha20 keystream keyed from the OS (privacy.randomness). false: a
    # reproducible generator keyed from the run seed, for tests and benches; the report fails such a release.
    secure_mode: bool = True


class PrivacySection(_Strict):
    dp: bool = False
    profile: DPProfileSection | None = None  # every hospital's budget unless overridden below
    hospitals: dict[str, DPProfileSection] = {}  # per-hospital overrides
    on_exhaustion: Literal["exclude_client", "stop_run"] = "exclude_client"
    # What one epsilon protects. "record" (the default, as in Opacus): one record. "patient": patient-level
    # DP-SGD; each step samples patients (client.batch_size is then patients per step) and each sampled
    # patient contributes the clipped sum of at most max_records_per_patient_step of its records.
    unit: Literal["record", "patient"] = "record"
    max_records_per_patient_step: int | None = Field(None, ge=1)  # None: privacy.profile.PrivacyProfile's 4
    # Record unit only: when a patient may have up to k records, say so; each hospital then also reports the
    # patient-level (k*eps, k*e^((k-1)eps)*delta) of group privacy (loose, but honest).
    max_records_per_patient: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.dp and self.profile is None and not self.hospitals:
            raise ValueError("profile: dp is on but no privacy profile (target_epsilon) is given")
        if not self.dp and (self.profile is not None or self.hospitals):
            raise ValueError("dp: a privacy profile is given but dp is false; set dp: true (nothing is called DP without it)")
        if self.unit == "patient" and not self.dp:
            raise ValueError("unit: patient-level privacy needs DP-SGD; set dp: true and a profile")
        if self.unit == "patient" and self.max_records_per_patient is not None:
            raise ValueError("max_records_per_patient: group privacy is for unit: record; with unit: patient every "
                             "epsilon is already per patient (remove it)")
        if self.unit == "record" and self.max_records_per_patient_step is not None:
            raise ValueError("max_records_per_patient_step: only used with unit: patient")
        return self


class InjectionSection(_Strict):
    """Knowledge injection into the foundation model (METHOD.md): M3OE or a baseline, trained on the server's
    labelled public split after every round."""

    enabled: bool = True
    method: Literal[tuple(METHODS)] = "fedkim"  # secure_fedkim.variants.METHODS
    gate_inputs: Literal["both", "task_only", "modality_only"] = "both"  # task_only = w/o M, modality_only = w/o T
    num_experts: int = Field(12, ge=1)
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query", "value"]
    apply_scaling: bool = True  # the published code never applies lora_alpha / r
    gating: Literal["dense", "topk"] = "dense"
    top_k: int = Field(2, ge=1)
    trainable: Literal["as_described", "as_published"] = "as_described"
    fm_path: str | None = None  # a local Hugging Face model directory; None = the installed all-MiniLM-L6-v2
    fm_kind: Literal["encoder", "causal"] = "encoder"
    order: Literal["mixed", "task_by_task"] = "mixed"
    epochs_per_round: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    max_public_per_task: int = Field(256, ge=1)
    sync_back: bool = True  # send the injected (public-data-updated) encoders back to the hospitals

    @model_validator(mode="after")
    def _check(self):
        if self.gating == "topk" and self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} is more than num_experts={self.num_experts}")
        if self.fm_path is not None and not Path(self.fm_path).is_dir():
            raise ValueError(f"fm_path: no such model directory: {self.fm_path}")
        return self


STUDY_VARIANTS = {name: v.injection_settings() for name, v in VARIANTS.items()}  # variant -> injection keys it sets


STUDY_PRIVACY = ("dp", "plain")  # dp: the config's privacy section as given; plain: the same runs without DP


class StudySection(_Strict):
    """Run the same federation once per privacy mode, variant and seed, and compare the variants with paired
    statistics over the seeds (secure_fedkim.drivers.study). ``seed_count: N`` is short for ``seeds: [0, ..., N-1]``."""

    variants: list[Literal[tuple(VARIANTS)]] = Field(min_length=1)  # secure_fedkim.variants.VARIANTS
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    privacy: list[Literal[STUDY_PRIVACY]] | None = Field(None, min_length=1)  # None: the config's own (dp or plain)
    workers: int | None = Field(None, ge=1)  # parallel runs; None: one per CPU core

    @model_validator(mode="before")
    @classmethod
    def _seed_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed_count" in data:
            data = dict(data)
            count = data.pop("seed_count")
            if "seeds" in data:
                raise ValueError("seed_count: give seeds or seed_count, not both")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"seed_count: must be a whole number >= 1, not {count!r}")
            data["seeds"] = list(range(count))
        return data

    @model_validator(mode="after")
    def _check(self):
        for key, values in (("variants", self.variants), ("seeds", self.seeds), ("privacy", self.privacy or [])):
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: listed twice: {sorted({v for v in values if values.count(v) > 1})}")
        return self


class BaselineSection(_Strict):
    single_hospital: bool = True


class ReportSection(_Strict):
    """Disclosure and leakage thresholds of the compliance report (secure_fedkim.report)."""

    min_other_hospitals: int = Field(3, ge=2)  # a partner report shows no figure about fewer other hospitals
    mia_auc_fail: float = Field(0.65, gt=0.5, le=1.0)  # a significant MIA whose AUC lower bound reaches this fails
    eps_lower_bound_attention: float = Field(1.0, gt=0.0)  # an audit's epsilon lower bound above this needs attention


class RunConfig(_Strict):
    run: RunSection = RunSection()
    federation: FederationSection
    tasks: TasksSection
    client: ClientSection = ClientSection()
    privacy: PrivacySection = PrivacySection()
    injection: InjectionSection = InjectionSection(enabled=False)
    baseline: BaselineSection = BaselineSection()
    report: ReportSection = ReportSection()
    study: StudySection | None = None

    def dp_profile(self, client: str) -> PrivacyProfile | None:
        """``client``'s DP policy for the run (its budget, or the run's default, with the run's privacy unit and
        what to do on exhaustion); None when the run trains without DP."""
        if not self.privacy.dp:
            return None
        p = self.privacy
        budget = p.hospitals.get(client, p.profile)
        k = {"max_records_per_patient_step": p.max_records_per_patient_step} if p.max_records_per_patient_step else {}
        return PrivacyProfile(**budget.model_dump(), on_exhaustion=p.on_exhaustion, unit=p.unit, **k)

    def task_modality(self, entry: TaskEntry) -> str:
        return entry.modality or TASKS[entry.name].modality

    @model_validator(mode="after")
    def _check(self):
        natural = [t.name for t in self.tasks.train if t.partition == "natural" and t.source is None]
        if natural and sorted(self.federation.clients) != sorted(_NATURAL_SITES.get(natural[0], self.federation.clients)):
            sites = _NATURAL_SITES[natural[0]]
            raise ValueError(
                f"federation.clients: task {natural[0]!r} is partitioned 'natural' over its real sites "
                f"{sites}; clients {self.federation.clients} do not match"
            )
        if self.study is not None and not self.injection.enabled:
            raise ValueError("study: comparing injection variants needs an enabled injection section")
        if self.study is not None and "dp" in (self.study.privacy or []) and not self.privacy.dp:
            raise ValueError("study: privacy lists 'dp' but the config's privacy section has no DP (set privacy.dp: "
                             "true and a profile; the study's 'dp' runs use it as given)")
        unknown = sorted(set(self.privacy.hospitals) - set(self.federation.clients))
        if unknown:
            raise ValueError(f"privacy.hospitals: {unknown} are not clients of this federation {self.federation.clients}")
        if self.privacy.dp and self.privacy.profile is None:
            missing = sorted(set(self.federation.clients) - set(self.privacy.hospitals))
            if missing:
                raise ValueError(f"privacy.hospitals: no privacy profile for {missing} and no default profile")
        train_modalities = {self.task_modality(t) for t in self.tasks.train}
        for t in self.tasks.unseen:
            if self.task_modality(t) not in train_modalities:
                raise ValueError(
                    f"tasks.unseen: {t.name!r} is {self.task_modality(t)!r} data but no training task has that "
                    f"modality, so no client encoder exists for it"
                )
        return self


# Real sites of the registry tasks that have them (the natural partition's clients).
_NATURAL_SITES = {"heart_disease": ["cleveland", "hungary", "switzerland", "va_long_beach"]}


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    """Validate a config mapping; `source` names the file in error messages."""
    cfg = validate_mapping(RunConfig, data, source, ConfigError)
    base = base_dir or Path.cwd()
    resolved = {}
    for section, entries in (("train", cfg.tasks.train), ("unseen", cfg.tasks.unseen)):
        fixed = []
        for i, t in enumerate(entries):
            if t.source is not None:
                path = (base / t.source.path).resolve()
                if not path.exists():
                    raise ConfigError(
                        f"{source}: tasks.{section}[{i}].source.path: no such file or directory: {t.source.path}"
                    )
                fixed_paths = {"path": str(path)}
                if t.source.format in _LABEL_FILE_FORMATS and not _is_npz_array(path, t.source.label):
                    label = (base / t.source.label).resolve()
                    if not label.is_file():
                        raise ConfigError(f"{source}: tasks.{section}[{i}].source.label: no such file (resolved "
                                          f"against the config's folder, like path): {t.source.label}")
                    fixed_paths["label"] = str(label)
                t = t.model_copy(update={"source": t.source.model_copy(update=fixed_paths)})
            fixed.append(t)
        resolved[section] = fixed
    return cfg.model_copy(update={"tasks": cfg.tasks.model_copy(update=resolved)})


def _is_npz_array(path: Path, label: str) -> bool:
    """True when `label` names an array inside the .npz archive at `path` (its labels), not a file."""
    if path.suffix != ".npz" or not path.is_file():
        return False
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return label in archive.files
    except Exception:
        return False  # the loader reports an unreadable archive with its own message


def load_config(path: str | Path) -> tuple[RunConfig, str]:
    """Read and validate a YAML config; returns the config and its exact text (for hashing and the run dir)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None  # one line
    return parse_config(data, source=str(path), base_dir=path.parent), text


def config_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
