import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.accounting import Step, epsilon, independent_epsilon
from privacy.dp import (
    BudgetExceeded,
    DPCompatibilityError,
    HospitalDP,
    PrivacyProfile,
    assert_dp_compatible,
)
from privacy.ledger import PrivacyLedger

torch.set_num_threads(1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

N, B = 128, 32
Q, STEPS = B / N, N // B  # Opacus's Poisson loader: rate 1/len(loader) = 0.25, 4 steps per epoch


class EmbedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids).mean(dim=1)))


def mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.GroupNorm(4, 16), nn.ReLU(), nn.Linear(16, 2))


def conv1d():
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 2))


def conv2d():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


MODELS = {
    "linear_norm": (mlp, lambda n: torch.randn(n, 12)),
    "embedding": (EmbedBag, lambda n: torch.randint(0, 40, (n, 6))),
    "conv1d_groupnorm": (conv1d, lambda n: torch.randn(n, 2, 16)),
    "conv2d_groupnorm": (conv2d, lambda n: torch.randn(n, 1, 8, 8)),
}


def loader(make_x, n=N):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(make_x(n), torch.randint(0, 2, (n,), generator=g)), batch_size=B)


def train(hdp, model, dl, mode="hooks"):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = hdp.make_private(model, opt, dl, grad_sample_mode=mode)
    if mode == "ghost":
        m, o, crit, l = out
    else:
        (m, o, l), crit = out, nn.CrossEntropyLoss()
    steps = 0
    for x, y in l:
        o.zero_grad()
        crit(m(x), y).backward()
        o.step()
        steps += 1
    return steps


def make(tmp_path, target=4.0, rounds=3, accountant="rdp", name="h.jsonl", **kw):
    led = PrivacyLedger(tmp_path / name)
    prof = PrivacyProfile(target_epsilon=target, accountant=accountant)
    return HospitalDP(prof, led, "run1", [(Q, STEPS)], rounds, n_records=N, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_trains_under_opacus_and_reports_epsilon(tmp_path, name):
    factory, make_x = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    before = [p.detach().clone() for p in model.parameters()]
    hdp = make(tmp_path, accountant="rdp")
    steps = train(hdp, model, loader(make_x))
    assert steps == STEPS
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    eps = hdp.record_round(0, name, steps, Q)
    assert eps == epsilon([Step(hdp.noise_multiplier, Q, steps)], hdp.delta, "rdp")  # exactly
    assert eps == pytest.approx(independent_epsilon(hdp.history(), hdp.delta, "rdp"), rel=0.01)
    assert hdp.spent_epsilon() == eps
    e = hdp.ledger.events("dp_round")[-1]
    assert (e["steps"], e["steps_observed"], e["dp"], e["task"]) == (steps, steps, True, name)
    # Opacus's own (per-session) accountant saw exactly the steps the ledger recorded
    assert hdp.engine.accountant.history == [Step(hdp.noise_multiplier, Q, steps).as_opacus()]


def test_prv_spend_matches_independent_pld_and_calibration_covers_the_run(tmp_path):
    hdp = make(tmp_path, target=3.0, rounds=3, accountant="prv")
    assert hdp.plan["event"] == "dp_plan" and hdp.plan["noise_multiplier"] == hdp.noise_multiplier
    assert hdp.plan["planned_epsilon"] <= 3.0
    for r in range(3):
        assert hdp.can_train()
        eps = hdp.record_round(r, "t", STEPS, Q)
        assert eps == pytest.approx(independent_epsilon(hdp.history(), hdp.delta, "pld"), rel=0.01)
    assert eps <= 3.0
    assert not hdp.can_train()  # the planned run is exactly what the budget buys


def test_ghost_clipping_mode(tmp_path):
    hdp = make(tmp_path)
    torch.manual_seed(0)
    steps = train(hdp, mlp(), loader(MODELS["linear_norm"][1]), mode="ghost")
    assert steps == STEPS
    assert hdp.record_round(0, "t", steps, Q) > 0


def test_understated_spend_is_refused(tmp_path):
    hdp = make(tmp_path)
    steps = train(hdp, mlp(), loader(MODELS["linear_norm"][1]))
    with pytest.raises(ValueError, match="understates the 4 DP-SGD steps"):
        hdp.record_round(0, "t", steps - 1, Q)
    with pytest.raises(ValueError, match="understates the Poisson sample rate"):
        hdp.record_round(0, "t", steps, Q / 2)
    with pytest.raises(RuntimeError, match="never recorded"):
        train(hdp, mlp(), loader(MODELS["linear_norm"][1]))
    assert hdp.ledger.events("dp_round") == []


def test_exhausted_budget_blocks_training_before_it_starts(tmp_path):
    hdp = make(tmp_path, target=1.0, rounds=1, noise_multiplier=0.6)  # configured sigma too small
    assert hdp.projected_epsilon() > 1.0
    assert not hdp.can_train()
    assert hdp.can_train([(Q, 0)])  # a round without steps costs nothing
    skip = hdp.record_skip(round=0)
    assert skip["event"] == "skipped_budget" and skip["projected_epsilon"] > 1.0
    assert skip["on_exhaustion"] == "exclude_client"
    # a caller that trains anyway: the spend is still recorded, and the release is blocked
    with pytest.raises(BudgetExceeded, match="must not be released"):
        hdp.record_round(0, "t", STEPS, Q)
    assert hdp.ledger.events("dp_round")[-1]["over_budget"] is True


def test_crash_then_resume_never_undercounts(tmp_path):
    hdp = make(tmp_path, target=3.0, rounds=4)
    sigma = hdp.noise_multiplier
    steps = train(hdp, conv2d(), loader(MODELS["conv2d_groupnorm"][1]))
    eps1 = hdp.record_round(0, "img", steps, Q)
    del hdp  # crash after the spend was written, before the update was sent

    again = make(tmp_path, target=3.0, rounds=4)
    assert again.noise_multiplier == sigma
    assert again.spent_epsilon() >= eps1
    assert len(again.ledger.events("dp_plan")) == 1  # plan not recalibrated
    resume = again.note_resume()
    assert resume["epsilon_restored"] == pytest.approx(eps1) and resume["rounds_recorded"] == 1
    eps2 = again.record_round(1, "img", steps, Q)
    assert eps2 > eps1
    # a profile that tries to raise the budget mid-run is refused
    with pytest.raises(ValueError, match="cannot be raised mid-run"):
        make(tmp_path, target=5.0, rounds=4)


def test_delta_validation(tmp_path):
    assert PrivacyProfile(target_epsilon=1.0).resolve_delta(50) == 1e-5
    assert PrivacyProfile(target_epsilon=1.0).resolve_delta(10**6) == pytest.approx(1e-7)
    with pytest.raises(ValueError, match=r"delta=0\.05.*n=50.*1/n=0\.02"):
        PrivacyProfile(target_epsilon=1.0, delta=0.05).resolve_delta(50)
    with pytest.raises(ValueError, match=r"delta=0\.01 .*n=128"):
        HospitalDP(PrivacyProfile(target_epsilon=1.0, delta=0.01), PrivacyLedger(tmp_path / "d.jsonl"),
                   "r", [(Q, STEPS)], 2, n_records=N)
    with pytest.raises(ValueError, match="on_exhaustion"):
        PrivacyProfile(target_epsilon=1.0, on_exhaustion="ignore")


def test_batchnorm_rejected_with_clear_message(tmp_path):
    bn = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(DPCompatibilityError, match="BatchNorm found.*GroupNorm or LayerNorm"):
        assert_dp_compatible(bn)
    hdp = make(tmp_path)
    with pytest.raises(DPCompatibilityError, match="BatchNorm"):
        hdp.make_private(bn, torch.optim.SGD(bn.parameters(), lr=0.1), loader(MODELS["linear_norm"][1]))
    assert_dp_compatible(mlp())  # GroupNorm/LayerNorm pass


def test_zero_noise_is_not_dp(tmp_path):
    with pytest.raises(ValueError, match="not differential privacy"):
        make(tmp_path, noise_multiplier=0.0)
    assert not (tmp_path / "h.jsonl").exists()
    hdp = make(tmp_path, name="nodp.jsonl", noise_multiplier=0.0, allow_no_noise=True)
    assert hdp.plan["dp"] is False and hdp.plan["planned_epsilon"] is None
    assert hdp.spent_epsilon() == 0.0
    assert hdp.can_train()  # no guarantee claimed, so no budget enforced
    assert hdp.record_round(0, "t", STEPS, Q) == math.inf
    e = hdp.ledger.events("dp_round")[-1]
    assert e["dp"] is False and e["epsilon"] is None
    assert math.isinf(hdp.spent_epsilon())
    with pytest.raises(ValueError, match="allow_no_noise"):  # continuing such a run still needs the flag
        make(tmp_path, name="nodp.jsonl")
