"""The run directory: every file and folder a run writes or reads, each named here once.

`RunDir(path)` has one property or method per entry of the layout below; `HospitalDir(path)` is one
hospital's own state (``clients/<hospital>/`` in a simulated run, the node's ``state-dir`` when deployed;
the single-hospital baseline's ``baseline/<hospital>/`` has the same shape). No module spells these names
itself. Pure paths: this module imports nothing of secure_fedkim (the key holder's process, the
deployment's apps and the transports use it without loading torch); `secure_fedkim.rundir.artifacts` loads what
the files hold.

Run directory layout:
    config.yaml, resolved_config.json     the config as given, and as validated (absolute paths)
    features.json                         per task: what became the model input (columns or arrays used, left out)
    metrics/round_NNN.json                per-round metrics (round 0 = before training)
    metrics/fm_test_scores.npz            the FM's test probabilities at round 0 and after the latest round
    model/client_model.safetensors        the final global lightweight model (encoders + heads)
    clients/<hospital>/                   each hospital's own state (HospitalDir):
        ledger.jsonl                      its privacy ledger (when DP is on; refusals, dataset commitments)
        local_model.safetensors           its last local model (what it sent last)
        signing_key.pem                   its Ed25519 signing key (HE mode; never leaves the hospital)
        policy.yaml                       its signed policy (a deployed hospital's state-dir)
    keys/<hospital>.pub                   the hospitals' public signing keys (HE mode; a deployment may keep
                                          them in a keys directory of its own, same file names)
    keyholder/ledger.jsonl                every CKKS decryption the key holder made (HE mode)
    baseline/<hospital>/ledger.jsonl      the single-hospital baseline's own DP spend (a HospitalDir)
    summary.json                          final metrics and baselines (one writer: RunDir.write_summary)
    status.json                           a deployed run's state (running, completed, crashed, failed)
    checkpoint.safetensors, checkpoint.json, checkpoint_fm.safetensors
                                          a deployed run's last checkpoint (federation.checkpoint)
    audit/audit.json, audit/*.png         after `secure-fedkim audit`: results and ROC plots
    fm/                                   the injected foundation model's adapter, when a run saves it
    report.json, .html, .pdf, .sig, .sha256, .sha256.sig
                                          after `secure-fedkim report` (report_<partner>.* for a partner)

A study directory (StudyDir): config.yaml (the study's config as last run), federation.json (the validated
config without its study section: a re-run resumes only the same federation), study.json (runs, paired
statistics; rewritten after every finished run), auroc_<privacy>.png, one run directory per privacy mode,
variant and seed (<privacy>/<variant>-seed<seed>/; <variant>-seed<seed>/ without a mode) and its log
(logs/<privacy>-<variant>-seed<seed>.log). A run directory without summary.json is unfinished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FM_SCORES = "fm_test_scores.npz"
ROUND_GLOB = "round_*.json"


def public_key_file(keys_dir: str | os.PathLike, hospital: str) -> Path:
    """A hospital's registered public signing key in a keys directory (the run's keys/ or a deployment's own)."""
    return Path(keys_dir) / f"{hospital}.pub"


class HospitalDir:
    """One hospital's own state directory (see the layout in the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"HospitalDir({str(self.path)!r})"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.jsonl"

    @property
    def local_model(self) -> Path:
        return self.path / "local_model.safetensors"

    @property
    def signing_key(self) -> Path:
        return self.path / "signing_key.pem"

    @property
    def policy(self) -> Path:
        return self.path / "policy.yaml"


class RunDir:
    """The run directory at `path` (see the layout in the module docstring). Creates nothing on its own."""

    FM_SCORES = FM_SCORES

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def name(self) -> str:
        """The directory's name: the run id hospitals' ledgers record."""
        return self.root.name

    def relative(self, path: str | os.PathLike) -> str:
        """`path` relative to the run directory, with forward slashes (how reports name a run's files)."""
        return Path(path).relative_to(self.root).as_posix()

    # -- config and summary
    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def resolved_config(self) -> Path:
        return self.root / "resolved_config.json"

    @property
    def features(self) -> Path:
        return self.root / "features.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def write_summary(self, summary: dict) -> Path:
        """The one writer of summary.json (indented JSON; anything JSON cannot encode is written as its str)."""
        self.summary.write_text(json.dumps(summary, indent=2, default=str))
        return self.summary

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    # -- metrics and models
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def round_metrics(self, server_round: int) -> Path:
        return self.metrics_dir / f"round_{server_round:03d}.json"

    def round_metrics_files(self) -> list[Path]:
        """Every metrics/round_NNN.json there is, sorted by name."""
        return sorted(self.metrics_dir.glob(ROUND_GLOB))

    @property
    def fm_scores(self) -> Path:
        return self.metrics_dir / FM_SCORES

    @property
    def fm_routing(self) -> Path:
        """How the FM's M3OE gate routes each task, before injection and after the run (a study writes it)."""
        return self.metrics_dir / "fm_routing.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def global_model(self) -> Path:
        return self.model_dir / "client_model.safetensors"

    # -- hospitals
    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    def client(self, hospital: str) -> HospitalDir:
        return HospitalDir(self.clients_dir / hospital)

    def local_model(self, hospital: str) -> Path:
        return self.client(hospital).local_model

    def ledger(self, hospital: str) -> Path:
        return self.client(hospital).ledger

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    def public_key(self, hospital: str) -> Path:
        return public_key_file(self.keys_dir, hospital)

    @property
    def keyholder_dir(self) -> Path:
        return self.root / "keyholder"

    @property
    def keyholder_ledger(self) -> Path:
        return self.keyholder_dir / "ledger.jsonl"

    @property
    def baselines_dir(self) -> Path:
        return self.root / "baseline"

    def baseline(self, hospital: str) -> HospitalDir:
        return HospitalDir(self.baselines_dir / hospital)

    def baseline_ledger(self, hospital: str) -> Path:
        return self.baseline(hospital).ledger

    # -- a deployed run's checkpoint
    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def checkpoint_meta(self) -> Path:
        return self.root / "checkpoint.json"

    @property
    def checkpoint_fm(self) -> Path:
        return self.root / "checkpoint_fm.safetensors"

    # -- after the run
    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def audit_json(self) -> Path:
        return self.audit_dir / "audit.json"

    @property
    def fm_dir(self) -> Path:
        return self.root / "fm"

    @staticmethod
    def report_stem(partner: str | None = None) -> str:
        """``report`` (the federation's report) or ``report_<partner>``; a partner that cannot name a file is refused."""
        if partner is None:
            return "report"
        if not partner or any(ch in partner for ch in "/\\\0") or partner.startswith("."):
            raise ValueError(f"partner {partner!r} cannot name a file")
        return f"report_{partner}"

    def report_file(self, partner: str | None, suffix: str) -> Path:
        """One report file: `suffix` is ``.json``, ``.html``, ``.pdf``, ``.sig``, ``.sha256`` or ``.sha256.sig``."""
        return self.root / f"{self.report_stem(partner)}{suffix}"


class StudyDir:
    """A comparison study's directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def federation_config(self) -> Path:
        return self.root / "federation.json"

    @property
    def results(self) -> Path:
        return self.root / "study.json"

    def run(self, variant: str, seed: int, privacy: str | None = None) -> Path:
        name = f"{variant}-seed{seed}"
        return self.root / name if privacy is None else self.root / privacy / name

    def log(self, variant: str, seed: int, privacy: str) -> Path:
        return self.root / "logs" / f"{privacy}-{variant}-seed{seed}.log"

    def plot(self, privacy: str) -> Path:
        return self.root / f"auroc_{privacy}.png"
