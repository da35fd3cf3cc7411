"""Gradient inversion of one record's update of the tabular encoder + head: plain leaks it, DP does not."""

import numpy as np
import pytest
import torch

from attacks.inversion import (
    aggregated_only_row,
    inversion_audit,
    invert_gradient,
    privatize_gradient,
    record_gradient,
    reconstruction_error,
)
from secure_fedkim.data import load_task
from secure_fedkim.hospital.models import ClientModel
from secure_fedkim.hospital.training import train_task


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting():
    data = load_task("heart_disease")
    torch.manual_seed(0)
    model = ClientModel({"heart_disease": "tabular"}, {"tabular": (35,)}, 16, 2).task_model("heart_disease")
    train_task(model, data.x[:200], data.y[:200], epochs=5, batch_size=32, lr=3e-3, seed=0)  # a released model
    return model, data, data.x[200:].mean(axis=0)  # the attacker's prior: the population mean


@pytest.mark.parametrize("i", [0, 5, 11])
def test_plain_single_record_update_is_inverted_and_dp_update_is_not(setting, i):
    model, data, mean = setting
    x, y = data.x[i], int(data.y[i])
    plain, dp = inversion_audit(model, x, y, mean, max_grad_norm=1.0, noise_multiplier=1.0, seed=i)
    assert plain["update"] == "plain" and dp["update"] == "dp"
    assert plain["cosine_centered"] > 0.9 and plain["relative_mse"] < 0.2, plain
    # clip 1.0 + sigma 1.0: the noise (norm ~ sqrt(#params)) drowns the gradient; the attack recovers no
    # more than the prior (the population mean) already says
    assert dp["cosine_centered"] < 0.5 and dp["relative_mse"] > 0.5, dp
    assert set(plain) >= {"mse", "relative_mse", "cosine", "cosine_centered"}
    assert not any(isinstance(v, (list, np.ndarray)) for v in plain.values())  # never the record itself


def test_lbfgs_with_l2_matching_recovers_the_record_exactly(setting):
    model, data, mean = setting
    grad = record_gradient(model, data.x[3], int(data.y[3]))
    x_hat, final = invert_gradient(model, grad, int(data.y[3]), mean, loss="l2", optimizer="lbfgs", steps=100, lr=1.0)
    err = reconstruction_error(x_hat, data.x[3], mean)
    assert err["relative_mse"] < 1e-3 and err["cosine"] > 0.999, err


def test_privatized_gradient_is_clipped_then_noised():
    g = [torch.full((10,), 3.0), torch.full((6,), 4.0)]
    clipped = privatize_gradient(g, max_grad_norm=1.0, noise_multiplier=0.0)
    assert torch.sqrt(sum((c**2).sum() for c in clipped)).item() == pytest.approx(1.0)
    noisy = privatize_gradient(g, max_grad_norm=2.0, noise_multiplier=1.0, seed=3)
    resid = torch.cat([(n - c * 2.0).reshape(-1) for n, c in zip(noisy, clipped)])
    assert 1.0 < resid.std().item() < 3.5  # std sigma * C = 2 on 16 coordinates


def test_encrypted_or_masked_aggregation_exposes_no_per_client_update(setting):
    model, data, mean = setting
    rows = inversion_audit(model, data.x[0], int(data.y[0]), mean, steps=5, aggregation="secagg", min_clients=3)
    assert [r["update"] for r in rows] == ["plain", "dp", "secagg"]
    assert not rows[0]["visible"] and not rows[2]["visible"]
    assert rows[2]["note"].startswith("no per-client update visible")
    assert "masks cancel only in the sum" in rows[2]["note"]  # the transport's own words
    he = aggregated_only_row("he", "CKKS ciphertexts it cannot decrypt", 3)["note"]
    assert "at least 3 hospitals" in he and "ciphertexts" in he
    plain = inversion_audit(model, data.x[0], int(data.y[0]), mean, steps=5, aggregation="plain")
    assert [r["update"] for r in plain] == ["plain", "dp"] and plain[0]["visible"]
