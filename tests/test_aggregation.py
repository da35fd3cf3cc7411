"""FedAvg against a hand computation; flat-vector round trips; FedProx's proximal step."""

import numpy as np
import pytest
import torch
from torch import nn

from secure_fedkim.federation.aggregation import flatten_state, unflatten_state, weighted_mean
from secure_fedkim.hospital.training import train_task


def test_weighted_mean_equals_hand_computation():
    a, b, c = np.array([1.0, 2.0], np.float32), np.array([3.0, -2.0], np.float32), np.array([0.0, 10.0], np.float32)
    got = weighted_mean([a, b, c], [10, 30, 60])
    # (10*1 + 30*3 + 60*0)/100 = 1.0 ; (10*2 - 30*2 + 60*10)/100 = 5.6
    np.testing.assert_allclose(got, [1.0, 5.6], rtol=1e-6)


def test_weighted_mean_rejects_bad_input():
    v = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="no client updates"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="differ in length"):
        weighted_mean([v, np.ones(4, np.float32)], [1, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        weighted_mean([v, np.array([1, np.nan, 1], np.float32)], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean([v], [0])


def test_flatten_roundtrip_and_shape_check():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    state = model.state_dict()
    vec = flatten_state(state)
    assert vec.size == sum(p.numel() for p in model.parameters())
    back = unflatten_state(vec, state)
    for k in state:
        assert torch.equal(back[k], state[k])
    with pytest.raises(ValueError, match="update has 3 values, the model has"):
        unflatten_state(vec[:3], state)


def _distance_after_training(mu: float) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 1))
    model = _Squeeze(model)
    start = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    train_task(model, x, y, epochs=3, batch_size=32, lr=0.01, proximal_mu=mu, seed=1)
    with torch.no_grad():
        return float(sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start)).sqrt())


class _Squeeze(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).squeeze(-1)


def test_fedprox_proximal_step_pulls_towards_the_global_model():
    free, prox = _distance_after_training(0.0), _distance_after_training(20.0)
    assert prox < 0.8 * free, (free, prox)
