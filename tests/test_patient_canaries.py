"""Canary patients (#18): a patient-level run is audited with canaries that are patients, so the empirical
lower bound is an epsilon per patient, like the claim; a record-level run keeps single-record canaries."""

import math

import numpy as np
import pytest
import torch

import attacks.dp_audit as dp_audit
from attacks.audit import AuditConfigError, format_audit_table, format_summary, ledger_epsilon, parse_audit_config
from attacks.dp_audit import canary_audit
from attacks.mia import Records
from attacks.planted_bugs import plant
from privacy.accounting import calibrate_noise
from privacy.plan import DPPlan
from privacy.ledger import PrivacyLedger
from secure_fedkim.data import load_task
from secure_fedkim.hospital.models import ClientModel

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed):
    torch.manual_seed(seed)
    return ClientModel({"t": "tabular"}, {"tabular": (35,)}, 16, 2).task_model("t")


def shard(n: int, patients: int) -> tuple[Records, np.ndarray]:
    """``n`` heart-disease records of ``patients`` patients (each patient's records spread over the shard)."""
    data = load_task("heart_disease")
    idx = np.random.default_rng(0).permutation(len(data))[:n]
    return Records(data.x[idx], data.y[idx]), (np.arange(n) % patients).astype(str)


@pytest.fixture
def trainings(monkeypatch):
    """What every replay training was given: (x, y, groups, batch_size)."""
    seen = []
    real = dp_audit.train_model

    def spy(make_model, x, y, **kw):
        seen.append((x, y, kw.get("groups"), kw["batch_size"]))
        return real(make_model, x, y, **kw)

    monkeypatch.setattr(dp_audit, "train_model", spy)
    return seen


def record_dp(sigma: float, **kw) -> DPPlan:
    """A hospital's DP plan as its ledger records it: noise sigma, clip 1, delta 1e-5."""
    return DPPlan(run_id="audited-run", noise_multiplier=sigma, delta=1e-5, accountant="prv", max_grad_norm=1.0, **kw)


def patient_dp(sigma: float, k: int = 3) -> DPPlan:
    return record_dp(sigma, privacy_unit="patient", max_records_per_patient_step=k)


# ------------------------------------------------------------------------------------- (a) patient unit


@pytest.mark.parametrize("records_per_canary,expected_r", [(None, 3), (2, 2)])
def test_a_patient_level_replay_inserts_whole_canary_patients(trainings, records_per_canary, expected_r):
    train, groups = shard(60, 30)
    res = canary_audit(train, make, epochs=2, batch_size=10, lr=1e-2, dp=patient_dp(1.0, k=3), canaries=20, seed=0,
                       groups=groups, records_per_canary=records_per_canary, trials=2)
    assert len(trainings) == 2
    for x, y, g, batch in trainings:
        # the shard's records come first, unchanged, with their own patients
        np.testing.assert_array_equal(x[:60], train.x)
        np.testing.assert_array_equal(g[:60], groups)
        canary_ids, counts = np.unique(g[60:], return_counts=True)
        assert all(c.startswith("canary-patient-") for c in canary_ids)
        assert set(counts) == {expected_r}  # every canary patient in the data has all its r records: in or out whole
        assert len(x) == 60 + expected_r * len(canary_ids)
        assert 0 < len(canary_ids) < 20
        rows, labels = x[60:].reshape(len(canary_ids), expected_r, -1), y[60:].reshape(len(canary_ids), expected_r)
        assert all((p == p[0]).all() for p in rows) and (labels == labels[:, :1]).all()  # r copies of one canary
        assert len(np.unique(rows[:, 0], axis=0)) == len(canary_ids)
        # the labels do not say who is in (they once shared the inclusion draws' random stream)
        assert set(labels[:, 0]) == {0, 1}
        assert batch == 10
    assert res["n_included"] + res["n_excluded"] == 2 * 20  # one score per canary patient and training
    assert res["n_included"] == sum(len(np.unique(g[60:])) for _, _, g, _ in trainings)
    # patients, not records, are Poisson-sampled: 30 patients + the included canary patients, 10 per step
    batches = [math.ceil((30 + len(np.unique(g[60:]))) / 10) for _, _, g, _ in trainings]
    assert res["sample_rate"] == pytest.approx(1 / min(batches))  # the highest rate of the two trainings
    assert res["steps_per_training"] == sum(2 * b for b in batches) // 2
    # the bound is labelled per patient, and so is what it is checked against
    assert (res["privacy_unit"], res["epsilon_unit"], res["canary_unit"]) == ("patient", "epsilon per patient", "patient")
    assert res["records_per_canary"] == expected_r and res["training_patients"] == 30 and res["training_records"] == 60
    assert f"20 canary patients ({expected_r} records each)" in res["reasons"][0]


def test_a_patient_level_replay_at_the_hospitals_patient_rate(trainings):
    """``sample_rate`` (the ledger's patient rate) picks the batch of patients, not of records."""
    train, groups = shard(60, 20)
    res = canary_audit(train, make, epochs=1, batch_size=32, lr=1e-2, dp=patient_dp(1.0, k=4), canaries=10, seed=1,
                       groups=groups, sample_rate=0.25)
    assert res["sample_rate"] == 0.25 and res["steps_per_training"] == 4
    assert len(np.unique(trainings[0][2])) == 20 + res["n_included"]


def test_patient_unit_input_checks():
    train, groups = shard(20, 10)
    with pytest.raises(ValueError, match="one patient id per training record"):
        canary_audit(train, make, epochs=1, batch_size=4, lr=1e-2, dp=patient_dp(1.0), canaries=4, groups=groups[:5])
    with pytest.raises(ValueError, match="records per canary patient must be an integer >= 1"):
        canary_audit(train, make, epochs=1, batch_size=4, lr=1e-2, dp=patient_dp(1.0), canaries=4, groups=groups,
                     records_per_canary=0)
    with pytest.raises(ValueError, match="collides with a canary patient"):
        canary_audit(train, make, epochs=1, batch_size=4, lr=1e-2, dp=patient_dp(1.0), canaries=4,
                     groups=np.append(groups[:-1], "canary-patient-0"))


def test_the_audit_config_and_ledger_carry_the_unit(tmp_path):
    assert parse_audit_config({}).canary.records_per_canary_patient is None
    assert parse_audit_config({"canary": {"records_per_canary_patient": 2}}).canary.records_per_canary_patient == 2
    with pytest.raises(AuditConfigError, match=r"canary\.records_per_canary_patient: must be an integer >= 1 .*got 0"):
        parse_audit_config({"canary": {"records_per_canary_patient": 0}})
    with pytest.raises(AuditConfigError, match=r"canary\.records_per_canary_patient: Input should be a valid integer"):
        parse_audit_config({"canary": {"records_per_canary_patient": True}})

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append("dp_plan", run_id="run-a", dp=True, delta=1e-5, accountant="prv", noise_multiplier=1.0,
                  max_grad_norm=1.0, target_epsilon=8.0, privacy_unit="patient", n_patients=40,
                  max_records_per_patient_step=3)
    ledger.append("dp_round", run_id="run-a", round=1, task="t", steps=8, sample_rate=0.25, noise_multiplier=1.0,
                  epsilon=None, privacy_unit="patient", max_records_per_patient_step=3)

    class FakeRun:
        run_dir = tmp_path / "run-a"

        def ledger_path(self, client):
            return tmp_path / "ledger.jsonl"

        def summary(self):
            return {}

    got = ledger_epsilon(FakeRun(), "h")
    assert (got["privacy_unit"], got["n_patients"], got["max_records_per_patient_step"]) == ("patient", 40, 3)


def test_the_printed_audit_names_the_unit():
    train, groups = shard(40, 20)
    rows = []
    for h, dp in (("a", patient_dp(1.0, k=2)), ("b", record_dp(1.0))):
        res = canary_audit(train, make, epochs=1, batch_size=10, lr=1e-2, dp=dp, canaries=10, seed=0, groups=groups)
        rows.append(dict(res, hospital=h, task="t"))
    audit = {"run_dir": "r", "summary": [], "dp_audit": rows}
    table = format_audit_table(audit)
    assert "canaries (one-run, 10 ood patients x2)" in table and "canaries (one-run, 10 ood)" in table
    assert "epsilon per patient or epsilon per record" in table
    summary = "\n".join(format_summary(audit))
    assert "canary replay a/t (epsilon per patient)" in summary and "canary replay b/t (epsilon per record)" in summary


# ------------------------------------------------------------------------------------- (b) record unit


def test_a_record_level_replay_is_unchanged(trainings):
    """Single-record canaries, no patients passed to training (groups are ignored), a bound per record."""
    train, groups = shard(60, 30)
    kw = dict(epochs=2, batch_size=10, lr=1e-2, dp=record_dp(1.0), canaries=20, seed=0)
    res = canary_audit(train, make, groups=groups, records_per_canary=3, **kw)
    x, _, g, _ = trainings[0]
    assert g is None and len(x) == 60 + res["n_included"]
    assert res["sample_rate"] == pytest.approx(1 / math.ceil(len(x) / 10))
    assert (res["privacy_unit"], res["epsilon_unit"], res["canary_unit"]) == ("record", "epsilon per record", "record")
    assert res["records_per_canary"] == 1 and res["training_patients"] is None
    assert "20 canaries can certify" in res["reasons"][0]
    plain = canary_audit(train, make, **kw)  # the same training and canaries without groups
    np.testing.assert_array_equal(trainings[1][0], x)
    assert {k: v for k, v in plain.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}


# ------------------------------------------------------------------------------------- (c) it can fail


def test_per_patient_bound_without_noise_is_far_above_the_calibrated_one():
    """The planted bug 'no_noise' (clipped patient sums released without noise, the ledger still claiming the
    noise for epsilon 1 per patient): the canary patients' bound exceeds the claim and the honest run's bound.
    Measured at seeds 0 and 3 (k = r = 2, about 10 s): without noise eps_lb 2.6-2.8; honest at most 0.05."""
    train, groups = shard(100, 50)
    batches = math.ceil((50 + 100) / 16)  # 50 patients + about half of 200 canary patients, 16 per step
    sigma = calibrate_noise(1.0, 1e-5, [(1.0 / batches, batches * 40)])
    out = {}
    for bug in ("honest", "no_noise"):
        with plant(bug):
            out[bug] = canary_audit(train, make, epochs=40, batch_size=16, lr=0.02, dp=patient_dp(sigma, k=2),
                                    canaries=200, seed=0, groups=groups)
    honest, broken = out["honest"], out["no_noise"]
    for r in (honest, broken):
        assert r["epsilon_unit"] == "epsilon per patient" and r["records_per_canary"] == 2
        assert r["eps_accountant"] == pytest.approx(1.0, abs=0.15)
    lb = {k: max(r["eps_lb"], r["eps_lb_one_run"]) for k, r in out.items()}
    assert honest["status"] == "consistent" and lb["honest"] <= honest["eps_accountant"]
    assert broken["status"] == "inconsistent" and broken["note"].startswith("DP BUG")
    assert lb["no_noise"] > 2 * broken["eps_accountant"] and lb["no_noise"] > lb["honest"] + 1.5, out
