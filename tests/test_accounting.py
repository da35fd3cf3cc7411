import math

import pytest
import torch

from privacy.accounting import (
    Step,
    calibrate_noise,
    default_delta,
    epsilon,
    gdp_mu,
    group_privacy_epsilon,
    independent_epsilon,
    resolve_delta,
)

torch.set_num_threads(1)

REF = [Step(1.0, 0.01, 1000)]  # DESIGN.md "Verified on this machine"
DELTA = 1e-5


def rel(a, b):
    return abs(a - b) / abs(b)


def test_reference_values_from_design():
    assert epsilon(REF, DELTA, "rdp") == pytest.approx(2.101, abs=1e-3)
    assert independent_epsilon(REF, DELTA, "rdp") == pytest.approx(2.101, abs=1e-3)
    assert independent_epsilon(REF, DELTA, "pld") == pytest.approx(1.828, abs=1e-3)
    # Opacus PRV returns its upper bound (eps_error 0.01): within 1% of the PLD estimate, and not below it
    prv = epsilon(REF, DELTA, "prv")
    assert rel(prv, 1.828) < 0.01
    assert prv >= independent_epsilon(REF, DELTA, "pld")


def test_opacus_matches_dp_accounting_within_1pct():
    for history in (
        [Step(1.0, 0.01, 1000)],
        [Step(0.8, 0.02, 300)],
        [Step(1.2, 0.05, 200), Step(1.2, 0.01, 500)],  # multi-block: two tasks with different q
        [Step(1.1, 0.02, 100), Step(0.9, 0.02, 50), Step(1.1, 0.03, 100)],
    ):
        assert rel(epsilon(history, DELTA, "prv"), independent_epsilon(history, DELTA, "pld")) < 0.01, history
        assert rel(epsilon(history, DELTA, "rdp"), independent_epsilon(history, DELTA, "rdp")) < 0.01, history


def test_blocks_compose_like_one_block():
    one = epsilon([Step(1.0, 0.01, 1000)], DELTA)
    split = epsilon([Step(1.0, 0.01, 400), Step(1.0, 0.01, 600)], DELTA)
    assert split == pytest.approx(one, rel=1e-9)


def test_composition_two_rounds_spend_more_than_one():
    r = [Step(1.0, 0.02, 100)]
    for acc in ("prv", "rdp"):
        assert epsilon(r + r, DELTA, acc) > epsilon(r, DELTA, acc) > 0


def test_empty_and_no_noise_and_bad_args():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([Step(1.0, 0.1, 0)], DELTA) == 0.0
    assert independent_epsilon([], DELTA) == 0.0
    assert gdp_mu([]) == 0.0
    assert epsilon([Step(0.0, 0.1, 10)], DELTA) == math.inf
    with pytest.raises(ValueError, match="accountant"):
        epsilon(REF, DELTA, "gdpx")
    with pytest.raises(ValueError, match="delta"):
        epsilon(REF, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        Step(1.0, 1.5, 10)
    with pytest.raises(ValueError, match="noise_multiplier"):
        Step(-1.0, 0.1, 10)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrate_noise_meets_target_and_is_tight(accountant):
    schedule = [(0.02, 50), (0.05, 20)] * 4  # 4 rounds x 2 tasks
    target = 2.0
    sigma = calibrate_noise(target, DELTA, schedule, accountant=accountant)
    eps = epsilon([Step(sigma, q, n) for q, n in schedule], DELTA, accountant)
    assert eps <= target
    assert eps >= 0.98 * target
    smaller = epsilon([Step(0.98 * sigma, q, n) for q, n in schedule], DELTA, accountant)
    assert smaller > target


def test_calibrate_noise_whole_run_needs_more_noise_than_one_round():
    one_round = calibrate_noise(1.0, DELTA, [(0.05, 40)], accountant="rdp")
    ten_rounds = calibrate_noise(1.0, DELTA, [(0.05, 40)] * 10, accountant="rdp")
    assert ten_rounds > one_round


def test_calibrate_noise_errors():
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise(1e-7, DELTA, [(1.0, 10**6)], accountant="rdp")
    with pytest.raises(ValueError, match="no steps"):
        calibrate_noise(1.0, DELTA, [])
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(0.0, DELTA, [(0.1, 10)])


def test_gdp_mu_hand_computation():
    # mu = q sqrt(T (e^{1/sigma^2} - 1)), blocks in quadrature
    assert gdp_mu([Step(1.0, 0.01, 1000)]) == pytest.approx(0.01 * math.sqrt(1000 * (math.e - 1)), rel=1e-12)
    mu1 = 0.05 * math.sqrt(200 * (math.exp(1 / 1.5**2) - 1))
    mu2 = 0.01 * math.sqrt(300 * (math.exp(1 / 0.8**2) - 1))
    got = gdp_mu([Step(1.5, 0.05, 200), Step(0.8, 0.01, 300)])
    assert got == pytest.approx(math.hypot(mu1, mu2), rel=1e-12)
    assert gdp_mu([Step(1.0, 0.01, 1000)]) == pytest.approx(0.41452, abs=1e-5)


def test_group_privacy():
    assert group_privacy_epsilon(1.0, 1e-6, 1) == (1.0, 1e-6)
    eps_k, delta_k = group_privacy_epsilon(0.5, 1e-6, 3)
    assert eps_k == pytest.approx(1.5)
    assert delta_k == pytest.approx(3 * math.exp(2 * 0.5) * 1e-6)
    assert group_privacy_epsilon(2.0, 1e-5, 50)[1] == 1.0  # vacuous: capped
    with pytest.raises(ValueError):
        group_privacy_epsilon(1.0, 1e-5, 0)


def test_delta_resolution():
    assert default_delta(1000) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    assert resolve_delta(None, 200) == 1e-5
    assert resolve_delta(1e-4, 200) == 1e-4
    with pytest.raises(ValueError, match=r"delta=0\.01.*n=200.*1/n=0\.005"):
        resolve_delta(0.01, 200)


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_opacus_history_layout_is_sigma_q_steps(mechanism):
    # epsilon() sets Opacus's history directly; check the tuple layout Opacus 1.6 itself builds
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism)
    for _ in range(5):
        acc.step(noise_multiplier=1.3, sample_rate=0.02)
    assert acc.history == [Step(1.3, 0.02, 5).as_opacus()]
    assert epsilon([Step(1.3, 0.02, 5)], DELTA, mechanism) == acc.get_epsilon(delta=DELTA)


def test_budget_plan_table_and_comparison():
    from privacy.budget import compare_accountants, forecast, format_table

    p = forecast(2.0, None, n_records=1000, batch_size=64, local_epochs=2, rounds=5, accountant="rdp")
    # the loaders' own rule (Opacus's DPDataLoader, privacy.patient): q = 1/ceil(n/b), ceil(n/b) steps per epoch
    assert p.sample_rate == 1 / 16 and p.steps_per_round == 2 * 16 and p.total_steps == 160
    assert p.delta == 1e-5
    assert p.epsilon_by_round == sorted(p.epsilon_by_round) and p.epsilon == p.epsilon_by_round[-1] <= 2.0
    assert p.epsilon == epsilon([Step(p.noise_multiplier, p.sample_rate, 160)], p.delta, "rdp")
    cmp = compare_accountants(p.noise_multiplier, p.sample_rate, p.steps_per_round, p.rounds, p.delta)
    assert cmp["opacus_rdp"] == pytest.approx(p.epsilon)
    assert rel(cmp["opacus_prv"], cmp["dp_accounting_pld"]) < 0.01
    assert rel(cmp["opacus_rdp"], cmp["dp_accounting_rdp"]) < 0.01
    table = format_table(p, cmp)
    assert f"{p.epsilon_by_round[0]:.4f}" in table and "dp_accounting_pld" in table
    with pytest.raises(ValueError, match="1/n"):
        forecast(1.0, 0.05, n_records=50, batch_size=10, local_epochs=1, rounds=1)
