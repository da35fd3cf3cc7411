"""DP auditing with canaries: honest DP stays under its accountant, broken DP is caught."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom

from attacks.dp_audit import (
    canary_audit,
    clopper_pearson,
    consistency_status,
    empirical_epsilon,
    max_certifiable_epsilon,
    one_run_epsilon,
    replay_batch_size,
)
from attacks.mia import Records
from privacy.plan import DPPlan
from privacy.accounting import calibrate_noise
from secure_fedkim.data import load_task
from secure_fedkim.hospital.models import ClientModel

N_TRAIN, CANARIES, EPOCHS, BATCH = 200, 200, 100, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def dp_plan(sigma: float, **kw) -> DPPlan:
    """A hospital's DP plan as its ledger records it: noise sigma, clip 1, delta 1e-5 (what the audit replays)."""
    return DPPlan(run_id="audited-run", noise_multiplier=sigma, delta=1e-5, accountant="prv", max_grad_norm=1.0, **kw)


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
    res = canary_audit(hospital, make, epochs=EPOCHS, batch_size=BATCH, lr=1e-2, dp=dp_plan(sigma),
                       canaries=CANARIES, seed=0)
    assert res["dp"] and res["noise_multiplier"] == sigma
    assert 1.5 < res["eps_accountant"] < 2.5  # the accountant over the steps this training took
    assert res["eps_lb"] <= res["eps_accountant"] and res["eps_lb_one_run"] <= res["eps_accountant"]
    assert res["consistent_with_accountant"] is True
    assert res["n_included"] + res["n_excluded"] == CANARIES


def test_broken_dp_without_noise_is_caught(hospital):
    """The implementation claims the noise for epsilon 1 but adds none (clipping only)."""
    claimed = sigma_for(1.0)
    res = canary_audit(hospital, make, epochs=EPOCHS, batch_size=BATCH, lr=1e-2, dp=dp_plan(0.0),
                       canaries=CANARIES, accountant_noise_multiplier=claimed, seed=0)
    assert res["eps_accountant"] == pytest.approx(1.0, abs=0.15)  # what the accountant claims for that noise
    assert res["eps_lb"] > 2 * res["eps_accountant"], res  # measured about 2.7 (95% confidence)
    assert res["consistent_with_accountant"] is False
    assert res["note"].startswith("DP BUG")


def test_non_private_training_has_no_claim_to_check(hospital):
    res = canary_audit(hospital, make, epochs=5, batch_size=BATCH, lr=1e-2, dp=None, canaries=20, seed=1)
    assert res["eps_accountant"] is None and res["consistent_with_accountant"] is None
    assert res["note"].startswith("n/a (non-private)")


# ------------------------------------------------------------------------------------- what an audit can decide


def test_the_certifiable_maximum_of_200_canaries_is_the_designs():
    """DESIGN.md: every guess right, 100 in / 100 out, delta 1e-5, 95%: one-run 4.19, Clopper-Pearson 3.28."""
    inc = np.r_[np.ones(100), np.zeros(100)].astype(bool)
    cap = max_certifiable_epsilon(inc, 1e-5)
    assert cap["one_run"] == pytest.approx(4.19, abs=0.01)
    cp = math.log((beta.ppf(0.025, 100, 1) - 1e-5) / beta.ppf(0.975, 1, 100))  # perfect separation, by hand
    assert cap["clopper_pearson"] == pytest.approx(cp) == pytest.approx(3.28, abs=0.01)
    assert cap["max"] == cap["one_run"]


def test_consistency_status_never_passes_a_claim_it_cannot_check():
    assert consistency_status(4.19, 8.0, 4.19, "200 canaries") == ("inconclusive", [
        "the claimed epsilon 8 is above the largest epsilon 4.19 that 200 canaries can certify, so this audit "
        "could not have caught a violation"])
    status, reasons = consistency_status(2.5, 1.0, 4.19)
    assert status == "inconsistent" and "exceeds the accountant's epsilon 1.000 by 1.500" in reasons[0]
    assert consistency_status(0.3, 2.0, 4.19)[0] == "consistent"
    assert consistency_status(0.3, None, 4.19)[0] == "inconclusive"  # no DP claim: nothing to pass


def test_no_noise_at_a_claim_of_8_reads_inconclusive_not_consistent(hospital):
    """The issue's case: a training with no noise, claimed epsilon 8, checked by 40 canaries. Its lower
    bound cannot exceed what 40 canaries certify, so it is not a pass, and the reason states the maximum."""
    res = canary_audit(hospital, make, epochs=10, batch_size=BATCH, lr=1e-2, dp=dp_plan(0.0),
                       canaries=40, accountant_noise_multiplier=sigma_for(8.0), claimed_epsilon=8.0, seed=0)
    assert res["accountant_epsilon"] == 8.0 and res["max_certifiable_epsilon"] < 8.0
    assert res["status"] == "inconclusive" and res["consistent_with_accountant"] is True
    assert f"largest epsilon {res['max_certifiable_epsilon']:.3g} that 40 canaries can certify" in res["reasons"][0]
    assert res["ratio"] == pytest.approx(max(res["eps_lb"], res["eps_lb_one_run"]) / 8.0)


def test_the_replay_trains_at_the_requested_sample_rate(hospital):
    """The hospital's Poisson rate, not the one its batch size gives on the shard plus the canaries."""
    assert replay_batch_size(160, 0.5) == 80 and replay_batch_size(210, 1 / 7) == 30
    res = canary_audit(hospital, make, epochs=3, batch_size=BATCH, lr=1e-2, dp=dp_plan(1.0),
                       canaries=20, sample_rate=0.25, seed=0)
    assert res["sample_rate"] == 0.25 and res["steps_per_training"] == 3 * 4
