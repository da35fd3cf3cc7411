"""grad_sample_mode "lean" (privacy.fast_dp) against an independent DP-SGD computation.

The reference is a loop of one backward pass per record (no Opacus): each record's gradient of its own
loss, clipped to norm C over all parameters, summed. With noise off, the DP optimizer's clipped sum must
equal it, and the gradient handed to Adam/SGD must be that sum / expected batch size. Run for every
encoder of the demo's client models and for Opacus's "hooks" mode too (same reference, so the modes agree).
"""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import HospitalDP, PrivacyProfile
from privacy.fast_dp import FusedDPOptimizer, LeanGradSampleModule, LeanPrivacyEngine, lean_supported
from privacy.ledger import PrivacyLedger
from secure_fedkim.hospital.models import TaskHead, TaskModel, build_encoder

torch.set_num_threads(1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]

TOKENS, B = 4, 12


def _text_ids(n):
    ids = torch.randint(1, 5000, (n, 20))
    ids[:, 15:] = 0  # padding
    return ids


ENCODERS = {  # modality -> (one sample's shape, batch maker), as secure_fedkim.data produces them
    "tabular": ((13,), lambda n: torch.randn(n, 13)),
    "timeseries": ((24, 5), lambda n: torch.randn(n, 24, 5)),
    "signal": ((3, 200), lambda n: torch.randn(n, 3, 200)),
    "image": ((1, 32, 32), lambda n: torch.randn(n, 1, 32, 32)),
    "text": ((20,), _text_ids),
}


def task_model(modality, seed=0, dim=16):
    torch.manual_seed(seed)
    shape, _ = ENCODERS[modality]
    return TaskModel(build_encoder(modality, shape, dim, TOKENS), TaskHead(dim))


def batch(modality, n=B, seed=1):
    torch.manual_seed(seed)
    return ENCODERS[modality][1](n), torch.randint(0, 2, (n,)).float()


def reference_clipped_sum(model, x, y, c):
    """sum_i clip_C(grad of record i's own loss), one backward pass per record; the clip factors; the norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    factors, norms = [], []
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.BCEWithLogitsLoss()(model(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        f = min(1.0, c / (norm + 1e-6))
        factors.append(f)
        norms.append(norm)
        for t, g in zip(total, grads):
            t.add_(g, alpha=f)
    return total, factors, norms


def private_step_grads(model, x, y, c, mode, sigma=0.0, n=None):
    """One DP-SGD step's (summed clipped grads, grads given to the optimizer, expected batch size)."""
    n = n or len(x)
    dl = DataLoader(TensorDataset(x, y), batch_size=len(x))
    engine = LeanPrivacyEngine(accountant="rdp")
    module, opt, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=dl,
        noise_multiplier=sigma, max_grad_norm=c, poisson_sampling=True, grad_sample_mode=mode,
    )
    opt.zero_grad(set_to_none=True)
    nn.BCEWithLogitsLoss()(module(x), y).backward()
    opt.step()
    params = [p for p in model.parameters() if p.requires_grad]
    out = [p.summed_grad.detach().clone() for p in params], [p.grad.detach().clone() for p in params], opt
    module._close()
    return out


@pytest.mark.parametrize("dim", [16, 64])  # 64 (the demo's) keeps more Linear weights factored
@pytest.mark.parametrize("mode", ["lean", "hooks"])
@pytest.mark.parametrize("modality", sorted(ENCODERS))
def test_clipped_per_sample_sum_matches_per_record_backward_passes(modality, mode, dim):
    x, y = batch(modality)
    ref_model = task_model(modality, dim=dim)
    # C at the median per-record norm: about half the records are clipped, half are not
    c = sorted(reference_clipped_sum(ref_model, x, y, 1.0)[2])[B // 2]
    ref, factors, _ = reference_clipped_sum(ref_model, x, y, c)
    assert 0 < sum(f < 1 for f in factors) < len(factors)

    summed, grads, opt = private_step_grads(task_model(modality, dim=dim), x, y, c, mode)
    assert isinstance(opt, FusedDPOptimizer) == (mode == "lean")
    for r, s, g in zip(ref, summed, grads):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, r / opt.expected_batch_size, rtol=1e-4, atol=1e-7)


class Twice(nn.Module):
    """One Linear applied twice per forward pass: on [B, W] inputs, then on [B, T, W].

    Width 128 (16384 weights) keeps it factored where T*(in+out) <= in*out; width 8 never does."""

    def __init__(self, positions, width, seq_first=False):
        super().__init__()
        self.positions, self.seq_first = positions, seq_first
        self.lin, self.out = nn.Linear(width, width), nn.Linear(width, 1)

    def spread(self, h):  # [B, W] -> [B, T, W]
        return h.unsqueeze(1).expand(-1, self.positions, -1) * torch.linspace(0.5, 1.5, self.positions)[:, None]

    def forward(self, x):
        if self.seq_first:  # backward then reaches the [B, W] call first
            h = torch.tanh(self.lin(torch.tanh(self.lin(self.spread(x))).mean(dim=1)))
        else:
            h = torch.tanh(self.lin(self.spread(torch.tanh(self.lin(x))))).mean(dim=1)
        return self.out(h).squeeze(-1)


# width 128: T=1 and T=1 (factors concatenated: Gram), T=1 and T=3 (Gram), T=1 and T=100 (100*256 > 16384:
# built, and the factored call is built and added, in either backward order); width 8: always built
@pytest.mark.parametrize("positions,width,seq_first", [(1, 128, False), (3, 128, False), (100, 128, False), (100, 128, True), (3, 8, False)])
def test_lean_sums_a_layer_used_twice_in_one_pass(positions, width, seq_first):
    torch.manual_seed(0)
    x, y = torch.randn(8, width), torch.randint(0, 2, (8,)).float()
    torch.manual_seed(3)
    ref, factors, _ = reference_clipped_sum(Twice(positions, width, seq_first), x, y, 0.05)
    assert min(factors) < 1
    torch.manual_seed(3)
    summed, _, _ = private_step_grads(Twice(positions, width, seq_first), x, y, 0.05, "lean")
    for r, s in zip(ref, summed):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-6)


def test_lean_layer_output_modified_in_place():
    """The gradient hook sees the gradient of the layer's output as produced, before later in-place ops."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.relu, self.b = nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 1)

        def forward(self, x):
            h = self.a(x)
            h.mul_(2.0)
            return self.b(self.relu(h)).squeeze(-1)

    torch.manual_seed(0)
    x, y = torch.randn(10, 5), torch.randint(0, 2, (10,)).float()
    torch.manual_seed(1)
    ref, factors, _ = reference_clipped_sum(InPlace(), x, y, 0.1)
    assert min(factors) < 1
    torch.manual_seed(1)
    summed, _, _ = private_step_grads(InPlace(), x, y, 0.1, "lean")
    for r, s in zip(ref, summed):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-6)


def test_lean_unfused_fallback_gives_the_same_step(monkeypatch):
    """Where the fused step does not apply (secure mode, virtual steps), factored weights are built and
    Opacus's own DPOptimizer step runs: same clipped sums."""
    x, y = batch("tabular")
    fused, _, _ = private_step_grads(task_model("tabular", dim=64), x, y, 0.5, "lean")
    monkeypatch.setattr(FusedDPOptimizer, "_split", lambda self, params: None)
    unfused, _, _ = private_step_grads(task_model("tabular", dim=64), x, y, 0.5, "lean")
    for f, u in zip(fused, unfused):
        torch.testing.assert_close(f, u, rtol=1e-4, atol=1e-6)


def test_lean_noise_has_the_calibrated_scale():
    """grad * expected_batch - clipped sum is the noise: mean 0, std sigma * C on every coordinate."""
    x, y = batch("tabular", n=16)
    sigma, c = 1.7, 0.5
    summed, grads, opt = private_step_grads(task_model("tabular"), x, y, c, "lean", sigma=sigma)
    noise = torch.cat([(g * opt.expected_batch_size - s).flatten() for s, g in zip(summed, grads)])
    assert noise.numel() > 10_000
    assert abs(noise.std().item() / (sigma * c) - 1) < 0.03
    assert abs(noise.mean().item()) < 4 * sigma * c / math.sqrt(noise.numel())
    # independent draws per coordinate: neighbouring parameters' noise is uncorrelated
    a, b = noise[:-1], noise[1:]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_lean_refuses_gradient_accumulation_and_unsupported_layers():
    x, y = batch("tabular")
    model = task_model("tabular")
    engine = LeanPrivacyEngine(accountant="rdp")
    module, opt, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True, grad_sample_mode="lean",
    )
    assert isinstance(module, LeanGradSampleModule)
    nn.BCEWithLogitsLoss()(module(x), y).backward()
    with pytest.raises(ValueError, match="grad accumulation"):
        nn.BCEWithLogitsLoss()(module(x), y).backward()

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    assert not lean_supported(Bare()) and lean_supported(task_model("text"))
    with pytest.raises(NotImplementedError, match="no per-sample gradient rule"):
        LeanGradSampleModule(Bare())


def test_hospital_dp_lean_trains_counts_steps_and_feeds_the_accountant(tmp_path):
    x, y = batch("signal", n=64)
    hdp = HospitalDP(
        PrivacyProfile(target_epsilon=50.0, accountant="rdp"), PrivacyLedger(tmp_path / "l.jsonl"), "run",
        [(0.25, 4)], 2, n_records=64,
    )
    assert hdp.grad_sample_mode == "lean"
    model = task_model("signal")
    module, opt, dl = hdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(x, y), batch_size=16), criterion=nn.BCEWithLogitsLoss())
    assert hdp.last_grad_sample_mode == "lean" and isinstance(opt, FusedDPOptimizer)
    assert dl.sample_rate == 0.25 and opt.noise_multiplier == hdp.noise_multiplier
    before = [p.detach().clone() for p in model.parameters()]
    steps = 0
    for xb, yb in dl:
        opt.zero_grad(set_to_none=True)
        if len(xb):
            nn.BCEWithLogitsLoss()(module(xb), yb).backward()
            opt.step()
            steps += 1
    assert steps >= 1 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert hdp.engine.accountant.history == [(hdp.noise_multiplier, 0.25, steps)]
    with pytest.raises(ValueError, match="understates"):
        hdp.record_round(0, "t", steps - 1, 0.25) if steps > 1 else hdp.record_round(0, "t", 1, 0.2)
    assert math.isfinite(hdp.record_round(0, "t", steps, 0.25))


def test_hospital_dp_falls_back_to_hooks_without_a_layer_rule(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    hdp = HospitalDP(
        PrivacyProfile(target_epsilon=50.0, accountant="rdp"), PrivacyLedger(tmp_path / "l.jsonl"), "run",
        [(0.25, 4)], 2, n_records=64,
    )
    model = Scaled()
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    module, opt, dl = hdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=16))
    assert hdp.last_grad_sample_mode == "hooks" and not isinstance(opt, FusedDPOptimizer)
