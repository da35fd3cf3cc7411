"""Patient-level DP-SGD (privacy.patient): per-patient clipped sums, the patient sampler, ledger and budget.

The reference for the clipped sum is a loop of one backward pass per record (no Opacus): each patient's
gradient is the sum of its records' own-loss gradients, clipped to norm C over all parameters, summed over
the sampled patients. With noise off the DP optimizer's clipped sum must equal it, and the gradient handed
to the optimizer must be that sum / the expected number of sampled patients.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.accounting import Step, epsilon, poisson_schedule
from privacy.budget import forecast, format_table
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.fast_dp import FusedDPOptimizer
from privacy.ledger import PrivacyLedger
from privacy.patient import PatientDPOptimizer, PatientPoissonLoader
from privacy.randomness import DPRandomness

torch.set_num_threads(1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]


class Net(nn.Module):
    """Conv1d, then Linear layers; the 128x128 weight is kept factored by grad_sample_mode "lean"."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc1, self.fc2, self.out = nn.Linear(32, 128), nn.Linear(128, 128), nn.Linear(128, 1)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(h))))).squeeze(-1)


SIZES = {"ann": 1, "bob": 3, "cy": 7}  # records per patient


def records(seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.array([p for p, n in SIZES.items() for _ in range(n)]))  # rows interleaved
    torch.manual_seed(seed)
    x, y = torch.randn(len(groups), 2, 10), torch.randint(0, 2, (len(groups),)).float()
    return x, y, groups


def hospital(tmp_path, k, *, unit="patient", n_patients=3, run="r", **kw):
    profile = PrivacyProfile(target_epsilon=1.0, unit=unit, max_records_per_patient_step=k, max_grad_norm=kw.pop("c", 1.0))
    return HospitalDP(profile, PrivacyLedger(tmp_path / "ledger.jsonl"), run, [(1.0, 1)], 1, n_records=11,
                      n_patients=n_patients, **kw)


def reference(model, x, y, rows, slots, c):
    """sum over patients of clip_C(sum of the patient's rows' own-loss gradients); the patients' norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, norms = [torch.zeros_like(p) for p in params], []
    for j in range(int(slots.max()) + 1):
        grads = [torch.zeros_like(p) for p in params]
        for r in rows[slots == j]:
            loss = nn.BCEWithLogitsLoss()(model(x[r : r + 1]), y[r : r + 1])
            for g, d in zip(grads, torch.autograd.grad(loss, params)):
                g.add_(d)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        norms.append(norm)
        for t, g in zip(total, grads):
            t.add_(g, alpha=min(1.0, c / (norm + 1e-6)))
    return total, norms


def private_step(tmp_path, mode, k, c, seed=0):
    """One patient-level DP-SGD step (noise off, all 3 patients sampled): summed, grads, optimizer, loader."""
    x, y, groups = records()
    torch.manual_seed(seed)
    model = Net()
    dp = hospital(tmp_path, k, c=c, noise_multiplier=0.0, allow_no_noise=True, run=f"{mode}-{k}-{c}")
    module, opt, loader = dp.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(TensorDataset(x, y), batch_size=3),
        criterion=nn.BCEWithLogitsLoss(), groups=groups, grad_sample_mode=mode,
        randomness=DPRandomness.reproducible(seed, "test"),
    )
    xb, yb = next(iter(loader))
    opt.zero_grad(set_to_none=True)
    nn.BCEWithLogitsLoss()(module(xb), yb).backward()
    factored = any(getattr(p, "_lean_factors", None) is not None for p in model.parameters())
    opt.step()
    out = ([p.summed_grad.detach().clone() for p in model.parameters()],
           [p.grad.detach().clone() for p in model.parameters()], opt, loader, factored)
    module._close()
    return out


@pytest.mark.parametrize("k", [8, 2])  # 8: every record of every patient; 2: bob and cy truncated to 2
@pytest.mark.parametrize("mode", ["lean", "hooks"])
def test_clipped_per_patient_sum_matches_per_record_backward_passes(tmp_path, mode, k):
    x, y, groups = records()
    torch.manual_seed(0)
    ref_model = Net()
    _, _, _, loader, _ = private_step(tmp_path / "probe", mode, k, 1.0)
    rows, slots = loader.records, loader.row_groups
    assert loader.n_groups == 3 and sorted(torch.bincount(slots).tolist()) == sorted(min(n, k) for n in SIZES.values())
    # C at the median patient norm: one patient clipped, one not (cy's records each stay below C)
    c = sorted(reference(ref_model, x, y, rows, slots, 1.0)[1])[1]
    ref, norms = reference(ref_model, x, y, rows, slots, c)
    assert min(norms) < c < max(norms)

    summed, grads, opt, loader, factored = private_step(tmp_path, mode, k, c)
    assert torch.equal(loader.records, rows)  # the same draw (same seed)
    assert isinstance(opt, FusedDPOptimizer if mode == "lean" else PatientDPOptimizer)
    assert factored == (mode == "lean")  # the factored path is exercised by "lean"
    assert opt.expected_batch_size == 3 and loader.sample_rate == 1.0
    for r, s, g in zip(ref, summed, grads):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, r / 3, rtol=1e-5, atol=1e-6)


def test_per_record_clipping_is_not_the_reference(tmp_path, monkeypatch):
    """The reference tells per-patient from per-record clipping (the bug the test above must catch)."""
    import privacy.fast_dp

    x, y, groups = records()
    torch.manual_seed(0)
    ref_model = Net()
    _, _, _, loader, _ = private_step(tmp_path / "probe", "lean", 8, 1.0)
    rows, slots = loader.records, loader.row_groups
    c = sorted(reference(ref_model, x, y, rows, slots, 1.0)[1])[1]
    ref, _ = reference(ref_model, x, y, rows, slots, c)
    monkeypatch.setattr(privacy.fast_dp, "group_per_sample_grads", lambda params, loader: None)
    summed, _, opt, _, _ = private_step(tmp_path, "lean", 8, c)
    assert max((s - r).abs().max().item() for s, r in zip(summed, ref)) > 1e-3


def test_sampler_rate_cap_and_patient_slots():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 10, size=200)
    groups = rng.permutation(np.repeat(np.array([f"p{i:03d}" for i in range(200)]), sizes))
    n = len(groups)
    ds = TensorDataset(torch.arange(n), torch.zeros(n))
    k, steps = 3, 400
    loader = PatientPoissonLoader(ds, groups, 20, k, DPRandomness.reproducible(7, "test"))
    q = loader.sample_rate
    assert (q, len(loader)) == poisson_schedule(200, 20) == (0.1, 10) and loader.expected_batch_size == 20
    hits = {p: 0 for p in np.unique(groups)}
    picked = np.zeros(n)
    for _ in range(steps // len(loader)):
        for xb, _ in loader:
            assert torch.equal(xb, loader.records)
            patients = groups[xb.numpy()]
            for slot in range(loader.n_groups):
                mine = patients[(loader.row_groups == slot).numpy()]
                assert len(set(mine)) == 1 and 1 <= len(mine) <= k  # one patient per slot, at most k rows
                hits[mine[0]] += 1
            assert len(set(patients)) == loader.n_groups  # one slot per patient
            picked[xb.numpy()] += 1
    freq = np.array(list(hits.values())) / steps
    sd = math.sqrt(q * (1 - q) / steps)
    assert abs(freq.mean() - q) < 4 * sd / math.sqrt(200)
    assert np.all(np.abs(freq - q) < 5 * sd)
    # a patient with c > k records has each record used with rate q * k / c (uniform without replacement)
    big = [p for p, c in zip(*np.unique(groups, return_counts=True)) if c > k]
    obs = np.concatenate([picked[groups == p] for p in big])
    exp = np.concatenate([np.full((groups == p).sum(), hits[p] * k / (groups == p).sum()) for p in big])
    assert obs.sum() == exp.sum() and (obs == 0).mean() < 0.01  # no record left out
    assert ((obs - exp) ** 2 / exp).sum() / (len(obs) - len(big)) < 1.5  # none favoured (chi-square per dof)


def test_ledger_records_the_unit_and_resolves_delta_on_patients(tmp_path):
    x, y, groups = records()
    dp = hospital(tmp_path, 4)
    plan_entry = dp.ledger.events("dp_plan")[0]
    assert plan_entry["privacy_unit"] == "patient" and plan_entry["n_patients"] == 3
    assert plan_entry["max_records_per_patient_step"] == 4
    big = HospitalDP(PrivacyProfile(target_epsilon=1.0, unit="patient"), PrivacyLedger(tmp_path / "big.jsonl"), "r",
                     [(0.01, 10)], 1, n_records=10**6, n_patients=2 * 10**5)
    assert big.delta == pytest.approx(5e-7) == big.ledger.events("dp_plan")[0]["delta"]  # 1/(10 n_patients)
    model = Net()
    module, opt, loader = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                          DataLoader(TensorDataset(x, y), batch_size=1), criterion=nn.BCEWithLogitsLoss(),
                                          groups=groups)
    assert loader.sample_rate == pytest.approx(1 / 3)
    for xb, yb in loader:
        if len(xb):
            opt.zero_grad(set_to_none=True)
            nn.BCEWithLogitsLoss()(module(xb), yb).backward()
            opt.step()
    with pytest.raises(ValueError, match="understates the Poisson sample rate"):
        dp.record_round(round=1, task="t", steps=3, sample_rate=0.1)
    dp.record_round(round=1, task="t", steps=3, sample_rate=loader.sample_rate)
    module._close()
    entry = dp.ledger.events("dp_round")[0]
    assert entry["privacy_unit"] == "patient" and entry["max_records_per_patient_step"] == 4
    assert dp.spent_epsilon() == epsilon([Step(dp.noise_multiplier, 1 / 3, 3)], dp.delta, "prv")


def test_record_unit_is_unchanged_and_old_plans_read_as_record(tmp_path):
    dp = hospital(tmp_path, 4, unit="record", n_patients=None)
    assert dp.ledger.events("dp_plan")[0]["privacy_unit"] == "record" and dp.delta == 1e-5
    assert "n_patients" not in dp.ledger.events("dp_plan")[0]
    ledger = PrivacyLedger(tmp_path / "old.jsonl")
    old = {k: v for k, v in dp.plan.items() if k not in ("privacy_unit", "seq", "prev_hash", "hash", "event", "time")}
    ledger.append("dp_plan", **old)
    HospitalDP(PrivacyProfile(target_epsilon=1.0), ledger, "r", [(1.0, 1)], 1, n_records=11)  # adopted as record
    with pytest.raises(ValueError, match="privacy unit 'patient' != planned 'record'"):
        HospitalDP(PrivacyProfile(target_epsilon=1.0, unit="patient"), ledger, "r", [(1.0, 1)], 1, n_records=11, n_patients=3)


def test_unit_mismatch_and_missing_arguments_are_refused(tmp_path):
    hospital(tmp_path, 4)
    with pytest.raises(ValueError, match="profile contradicts the DP plan.*privacy unit 'record' != planned 'patient'"):
        hospital(tmp_path, 4, unit="record")
    with pytest.raises(ValueError, match="n_patients"):
        hospital(tmp_path / "b", 4, n_patients=None)
    with pytest.raises(ValueError, match="unit"):
        PrivacyProfile(target_epsilon=1.0, unit="visit")
    with pytest.raises(ValueError, match="max_records_per_patient_step"):
        PrivacyProfile(target_epsilon=1.0, unit="patient", max_records_per_patient_step=0)
    x, y, groups = records()
    dp = hospital(tmp_path / "c", 4)
    model, dl = Net(), DataLoader(TensorDataset(x, y), batch_size=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs groups"):
        dp.make_private(model, opt, dl)
    with pytest.raises(ValueError, match="groups must hold one patient id per record"):
        dp.make_private(model, opt, dl, groups=groups[:5])
    with pytest.raises(ValueError, match="n_patients"):
        dp.make_private(model, opt, dl, groups=np.arange(11))
    with pytest.raises(ValueError, match="ghost"):
        dp.make_private(model, opt, dl, groups=groups, grad_sample_mode="ghost")


def test_budget_plan_per_patient_names_the_unit_and_equals_the_record_plan_on_patients():
    patients = forecast(2.0, None, 5000, 25, 2, 3, "rdp", unit="patient", n_patients=1000)
    as_records = forecast(2.0, None, 1000, 25, 2, 3, "rdp")  # the same (q, steps) with patients counted as records
    assert patients.sample_rate == 25 / 1000 and patients.steps_per_round == 2 * 40
    assert patients.noise_multiplier == as_records.noise_multiplier and patients.epsilon == as_records.epsilon
    assert patients.delta == 1e-5 and patients.n_units == 1000 and patients.unit == "patient"
    table = format_table(patients)
    assert "per record" not in table
    eps_lines = [line for line in table.splitlines() if "epsilon" in line]
    assert len(eps_lines) == 3 and all("per patient" in line for line in eps_lines)
    assert all("per record" in line for line in format_table(as_records).splitlines() if "epsilon" in line)
    assert forecast(2.0, None, 50, 5, 1, 1, unit="patient", n_patients=20).delta == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="n_patients"):
        forecast(2.0, None, 5000, 25, 2, 3, unit="patient")
    with pytest.raises(ValueError, match="1/n"):
        forecast(2.0, 0.01, 5000, 5, 1, 1, unit="patient", n_patients=100)
