"""DP auditing with canaries: honest DP stays under its accountant, broken DP is caught."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom

from attacks.dp_audit import DPSettings, canary_audit, clopper_pearson, empirical_epsilon, one_run_epsilon
from attacks.mia import Records
from privacy.accounting import calibrate_noise
from secure_fedkim.data import load_task
from secure_fedkim.models import ClientModel

N_TRAIN, CANARIES, EPOCHS, BATCH = 200, 200, 100, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed):
    torch.manual_seed(seed)
    return ClientModel({"t": "tabular"}, {"tabular": (35,)}, 16, 2).task_model("t")


@pytest.fixture(scope="module")
def hospital():
    data = load_task("heart_disease")
    idx = np.random.default_rng(0).permutation(len(data))[:N_TRAIN]
    return Records(data.x[idx], data.y[idx])


def sigma_for(eps, delta=1e-5):
    """The noise an implementation would use for `eps` over this training (about 300 records, 100 epochs)."""
    batches = math.ceil((N_TRAIN + CANARIES // 2) / BATCH)
    return calibrate_noise(eps, delta, [(1.0 / batches, batches * EPOCHS)])


# ------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (0, 1), (37, 200), (200, 200), (3, 1000)])
def test_clopper_pearson_matches_beta_quantiles_and_its_definition(k, n):
    lo, hi = clopper_pearson(k, n, 0.95)
    assert lo == pytest.approx(0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1), abs=1e-12)
    assert hi == pytest.approx(1.0 if k == n else beta.ppf(0.975, k + 1, n - k), abs=1e-12)
    # the defining property: each end leaves 2.5% in its tail of the binomial
    if k > 0:
        assert binom.sf(k - 1, n, lo) == pytest.approx(0.025, rel=1e-6)
    if k < n:
        assert binom.cdf(k, n, hi) == pytest.approx(0.025, rel=1e-6)


def test_empirical_epsilon_by_hand_and_in_both_directions():
    # 50 included canaries all score 1, 50 excluded all score 0: perfect separation
    scores, inc = np.r_[np.ones(50), np.zeros(50)], np.r_[np.ones(50), np.zeros(50)].astype(bool)
    out = empirical_epsilon(scores, inc, delta=1e-5)
    tpr_lo = beta.ppf(0.025, 50, 1)  # 50 of 50
    fpr_hi = beta.ppf(0.975, 1, 50)  # 0 of 50
    assert out["eps_lb"] == pytest.approx(math.log((tpr_lo - 1e-5) / fpr_hi))
    assert (out["tpr"], out["fpr"]) == (1.0, 0.0)
    # the other direction: the attack is only sure about who is OUT (low scores), not about who is IN
    scores = np.r_[np.ones(50), np.zeros(25), np.ones(25)]
    out = empirical_epsilon(scores, inc, delta=1e-5)
    assert out["direction"] == "score < threshold means excluded"
    assert out["eps_lb"] == pytest.approx(math.log((beta.ppf(0.025, 25, 26) - 1e-5) / beta.ppf(0.975, 1, 50)))
    # no signal: no bound
    assert empirical_epsilon(np.zeros(100), inc, 1e-5)["eps_lb"] == 0.0
    assert one_run_epsilon(np.zeros(100), inc, 1e-5)["eps_lb"] == 0.0


# ------------------------------------------------------------------------------------- audits


def test_dp_training_never_yields_a_lower_bound_above_its_accountant(hospital):
    sigma = sigma_for(2.0)
    res = canary_audit(hospital, make, epochs=EPOCHS, batch_size=BATCH, lr=1e-2, dp=DPSettings(sigma, 1.0, delta=1e-5),
                       canaries=CANARIES, seed=0)
    assert res["dp"] and res["noise_multiplier"] == sigma
    assert 1.5 < res["eps_accountant"] < 2.5  # the accountant over the steps this training took
    assert res["eps_lb"] <= res["eps_accountant"] and res["eps_lb_one_run"] <= res["eps_accountant"]
    assert res["consistent_with_accountant"] is True
    assert res["n_included"] + res["n_excluded"] == CANARIES


def test_broken_dp_without_noise_is_caught(hospital):
    """The implementation claims the noise for epsilon 1 but adds none (clipping only)."""
    claimed = sigma_for(1.0)
    res = canary_audit(hospital, make, epochs=EPOCHS, batch_size=BATCH, lr=1e-2, dp=DPSettings(0.0, 1.0, delta=1e-5),
                       canaries=CANARIES, accountant_noise_multiplier=claimed, seed=0)
    assert res["eps_accountant"] == pytest.approx(1.0, abs=0.15)  # what the accountant claims for that noise
    assert res["eps_lb"] > 2 * res["eps_accountant"], res  # measured about 2.7 (95% confidence)
    assert res["consistent_with_accountant"] is False
    assert res["note"].startswith("DP BUG")


def test_non_private_training_has_no_claim_to_check(hospital):
    res = canary_audit(hospital, make, epochs=5, batch_size=BATCH, lr=1e-2, dp=None, canaries=20, seed=1)
    assert res["eps_accountant"] is None and res["consistent_with_accountant"] is None
    assert res["note"].startswith("n/a (non-private)")
