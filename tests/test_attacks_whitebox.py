"""White-box DP audits (attacks.whitebox, attacks.mechanism) against planted bugs (attacks.planted_bugs).

Every planted bug must be caught by the check that exists for it (a test here fails if the audit loses
that power); the honest mechanism must never be flagged; the per-step mu must match 1/sigma; and the
one-run / Clopper-Pearson statistics must agree with an implementation written here from the papers.

A small MLP stands in for the demo's client model (one 128x256 Linear, so the lean path keeps that
weight's per-sample gradient factored); ``bench/bench_audit_power.py`` runs the same on the demo's
heart-disease model and data. Accounting uses the RDP accountant (fast) at claimed epsilon 4.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, binomtest
from torch import nn

from attacks.dp_audit import clopper_pearson, empirical_epsilon, one_run_epsilon
from attacks.mechanism import mechanism_audit
from attacks.planted_bugs import BUGS, plant
from attacks.whitebox import (
    PLAN_SHARE,
    WhiteboxSection,
    _one_run_bound,
    fdp_one_run_bound,
    fdp_one_run_mu,
    gdp_epsilon,
    gdp_fit,
    one_run_audit,
    plan_one_run,
    replay_with_canaries,
    whitebox_entry,
)
from privacy.accounting import Step, calibrate_noise
from privacy.dp import HospitalDP, PrivacyProfile
from privacy.fast_dp import FusedDPOptimizer, add_canary_rows
from privacy.ledger import PrivacyLedger

N, FEATURES, BATCH, EPOCHS = 200, 12, 25, 4  # q = 1/8, 32 steps
CLAIM = 4.0
CANARIES = 4000


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FEATURES, 128), nn.GELU(), nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 1))

    def forward(self, x):
        return self.mlp(x).squeeze(-1)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.standard_normal(N) > 0).astype(np.float32)
    return x, y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sigma():
    q, steps = 1 / math.ceil(N / BATCH), math.ceil(N / BATCH) * EPOCHS
    return calibrate_noise(CLAIM, 1e-5, [(q, steps)], accountant="rdp")


def whitebox(data, sigma, case="honest", mode="lean", seed=0, canaries=CANARIES):
    x, y = data
    batches = math.ceil(N / BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        dp = HospitalDP(
            PrivacyProfile(target_epsilon=CLAIM, delta=1e-5, accountant="rdp"), PrivacyLedger(Path(tmp) / "l.jsonl"),
            "test", [(1 / batches, batches * EPOCHS)], 1, n_records=N, noise_multiplier=sigma,
        )
        with plant(case):
            obs = replay_with_canaries(make_model, x, y, dp, epochs=EPOCHS, batch_size=BATCH, lr=0.003,
                                       canaries=canaries, grad_sample_mode=mode, task="t", seed=seed)
        history = dp.history()
        return whitebox_entry(obs, steps_ledger=sum(h.num_steps for h in history), history_ledger=history,
                              delta=dp.delta, accountant=dp.accountant, accountant_epsilon=dp.spent_epsilon(), seed=seed)


def failed(entry) -> set[str]:
    return {c["name"] for c in entry["checks"] if not c["passed"]}


def mechanism(data, sigma, case="honest", mode="lean", trials=20_000, seed=0):
    x, y = data
    with plant(case):
        return mechanism_audit(make_model(seed), x, y, noise_multiplier=sigma, grad_sample_mode=mode,
                               trials=trials, batch_size=BATCH, seed=seed)


# ------------------------------------------------------------------------------------------- the hook


@pytest.mark.parametrize("mode", ["lean", "hooks"])
def test_canary_rows_are_clipped_and_summed_like_records(data, mode):
    """Without noise, a canary of norm 3C on coordinate k adds exactly C there, on both paths."""
    x, y = data
    with tempfile.TemporaryDirectory() as tmp:
        dp = HospitalDP(PrivacyProfile(target_epsilon=1.0, delta=1e-5, accountant="rdp"),
                        PrivacyLedger(Path(tmp) / "l.jsonl"), "t", [(0.5, 1)], 1, n_records=N,
                        noise_multiplier=0.0, allow_no_noise=True)
        model = make_model(0)
        params = list(model.parameters())
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=BATCH)
        module, opt, _ = dp.make_private(model, torch.optim.SGD(params, lr=0.0), loader,
                                         criterion=nn.BCEWithLogitsLoss(), grad_sample_mode=mode)
    assert isinstance(opt, FusedDPOptimizer) == (mode == "lean")
    xb, yb = torch.from_numpy(x[:BATCH]), torch.from_numpy(y[:BATCH])

    def summed(index, values):
        opt.zero_grad(set_to_none=True)
        nn.BCEWithLogitsLoss()(module(xb), yb).backward()
        add_canary_rows(opt, torch.tensor(index), torch.tensor(values))
        opt.step()
        return torch.cat([p.summed_grad.reshape(-1) for p in opt.params])

    base = summed([], [])
    k = [5, 20_000, 34_800]  # first weight, the factored 128x256 weight, the last layer
    with_canaries = summed(k, [3.0, -3.0, 0.5])
    diff = with_canaries - base
    expected = torch.zeros_like(diff)
    expected[k] = torch.tensor([1.0, -1.0, 0.5])
    torch.testing.assert_close(diff, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="parameter count"):
        add_canary_rows(opt, torch.tensor([10**7]), torch.tensor([1.0]))


# ------------------------------------------------------------------------------ white-box every step


def test_honest_whitebox_never_flagged_over_seeds(data, sigma):
    for seed in range(3):
        e = whitebox(data, sigma, seed=seed, canaries=2000)
        assert e["status"] != "inconsistent", e["reasons"]
        assert not failed(e)
        assert e["steps_observed"] == e["steps_ledger"] == 32
        assert e["threat_model"] == "white-box every step"
        assert 0 < e["eps_lb_one_run"] <= e["accountant_epsilon_audited_steps"] <= CLAIM
        assert 0 < e["eps_lb_one_run_steinke"] <= e["eps_lb_one_run"]  # f-DP: the tighter headline, same guesses
        assert e["max_certifiable_epsilon_steinke"] < e["max_certifiable_epsilon"]
        lo, hi = e["gdp_mu_interval"]
        assert lo <= e["gdp_mu_estimate"] <= hi and lo <= 1.1 * e["claimed_score_mu"]
        assert e["claimed_score_mu"] == pytest.approx(e["accountant_gdp_mu"], rel=0.1)  # exact vs CLT
        assert e["accountant_gdp_mu"] == pytest.approx(math.sqrt(32 * math.expm1(sigma**-2)) / 8, rel=1e-9)  # CLT mu


def test_honest_whitebox_opacus_path(data, sigma):
    e = whitebox(data, sigma, mode="hooks", canaries=1000)
    assert e["grad_sample_mode"] == "hooks"
    assert e["status"] != "inconsistent", e["reasons"]


@pytest.mark.parametrize("case,mode", [("no_noise", "lean"), ("half_noise", "lean"), ("no_clipping", "lean"),
                                       pytest.param("no_noise", "hooks", marks=pytest.mark.slow)])
def test_noise_and_clipping_bugs_break_the_bounds(data, sigma, case, mode):
    e = whitebox(data, sigma, case=case, mode=mode, canaries=CANARIES if mode == "lean" else 1000)
    assert e["status"] == "inconsistent"
    assert e["gdp_mu_interval"][0] > 1.1 * e["claimed_score_mu"]
    assert gdp_epsilon(e["gdp_mu_interval"][0], 1e-5) > e["accountant_epsilon_audited_steps"]
    if case == "no_noise":
        assert e["eps_lb_one_run"] > e["accountant_epsilon_audited_steps"]


@pytest.mark.parametrize("mode", ["lean", pytest.param("hooks", marks=pytest.mark.slow)])
def test_reused_noise_fails_the_independence_check(data, sigma, mode):
    e = whitebox(data, sigma, case="reused_noise", mode=mode, canaries=2000 if mode == "lean" else 1000)
    assert e["status"] == "inconsistent"
    assert failed(e) == {"noise independent across steps"}


def test_ledger_under_reporting_steps_fails_the_steps_check(data, sigma):
    e = whitebox(data, sigma, case="ledger_half_steps", canaries=1000)
    assert e["steps_ledger"] == 16 and e["steps_observed"] == 32
    assert e["status"] == "inconsistent" and "steps observed <= steps in the ledger" in failed(e)


def test_accountant_told_half_the_rate_fails_the_rate_check(data, sigma):
    e = whitebox(data, sigma, case="accountant_half_rate", canaries=1000)
    assert e["sample_rate_ledger"] == pytest.approx(e["sample_rate_loader"] / 2)
    assert e["status"] == "inconsistent" and "observed sample rate <= the ledger's" in failed(e)


def test_claim_above_what_canaries_certify_is_inconclusive(data):
    x, y = data
    with tempfile.TemporaryDirectory() as tmp:  # sigma 0.7: about epsilon 8 for these 32 steps
        dp = HospitalDP(PrivacyProfile(target_epsilon=1e6, delta=1e-5, accountant="rdp"),
                        PrivacyLedger(Path(tmp) / "l.jsonl"), "t", [(1 / 8, 32)], 1, n_records=N,
                        noise_multiplier=0.7)
        obs = replay_with_canaries(make_model, x, y, dp, epochs=EPOCHS, batch_size=BATCH, lr=0.003, canaries=500)
        h = dp.history()
        e = whitebox_entry(obs, steps_ledger=32, history_ledger=h, delta=1e-5, accountant="rdp",
                           accountant_epsilon=None)
    assert e["max_certifiable_epsilon"] < e["accountant_epsilon_audited_steps"]
    assert e["status"] == "inconclusive"
    assert "can certify" in e["reasons"][0] and f"{e['max_certifiable_epsilon']:.3g}" in e["reasons"][0]


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_same_seed_same_audit_different_seed_different(data, sigma):
    """The noise comes from a generator seeded by the audit's seed (not Opacus's global RNG): the same seed
    gives the same numbers, whatever torch's global RNG state; another seed gives others."""
    torch.manual_seed(123)
    a = whitebox(data, sigma, seed=7, canaries=500)
    torch.manual_seed(456)
    b = whitebox(data, sigma, seed=7, canaries=500)
    c = whitebox(data, sigma, seed=8, canaries=500)
    assert _same(a, b)
    assert a["gdp_mu_estimate"] != c["gdp_mu_estimate"] and not _same(a, c)
    x, y = data
    runs = []
    for global_seed, seed in [(1, 3), (2, 3), (1, 4)]:
        model = make_model(0)
        torch.manual_seed(global_seed)  # a different global RNG state must not change the noise
        runs.append(mechanism_audit(model, x, y, noise_multiplier=sigma, trials=2000, batch_size=BATCH, seed=seed))
    assert _same(runs[0], runs[1]) and runs[0]["mu_estimate"] != runs[2]["mu_estimate"]


def test_one_run_test_is_planned_from_the_claim_only_and_agrees_with_the_paper():
    """The planned test depends on the claim, m and the seed, never on the scores; both bounds of the tests run
    equal the papers' (Mahloujifar et al.'s f-DP bound and Steinke et al.'s, written here) on the same guesses at
    the planned k and level; the union with the all-canaries test holds at the overall confidence."""
    history = [Step(1.6, 1 / 8, 32)]
    plan = plan_one_run(history, 3000, 1e-5, seed=1)
    assert plan == plan_one_run(history, 3000, 1e-5, seed=1) and plan["side"] in ("top", "both")
    assert 10 <= plan["k"] <= 1500 and plan["median_bound"] > 0
    rng = np.random.default_rng(9)
    included = rng.random(3000) < 0.5
    scores = rng.standard_normal(3000) + 1.5 * included
    out = one_run_audit(scores, included, history, 1e-5, seed=1)
    assert out["plan"] == plan
    a_plan, a_all = PLAN_SHARE * 0.05, (1 - PLAN_SHARE) * 0.05
    planned = steinke_epsilon(scores, included, plan["k"], 1e-5, confidence=1 - a_plan, side=plan["side"])
    every = steinke_epsilon(scores, included, 1500, 1e-5, confidence=1 - a_all)
    assert out["eps_lb_steinke"] == pytest.approx(max(planned, every), abs=1e-6) and out["eps_lb_steinke"] > 0.5
    r, v = guesses(scores, included, plan["side"], plan["k"])
    r_all, v_all = guesses(scores, included, "both", 1500)
    assert [(t["guesses"], t["correct"]) for t in out["tests"]] == [(r, v), (r_all, v_all)]
    fdp = max(fdp_epsilon(3000, r, v, 1e-5, a_plan), fdp_epsilon(3000, r_all, v_all, 1e-5, a_all))
    assert out["eps_lb"] == pytest.approx(fdp, abs=1e-3) and out["eps_lb"] > out["eps_lb_steinke"]
    inc = np.arange(3000) < 1500  # every guess correct: the all-canaries test certifies the most
    assert out["max_certifiable_steinke"] == pytest.approx(steinke_epsilon(inc.astype(float), inc, 1500, 1e-5, 0.99), abs=1e-6)
    assert out["max_certifiable"] == pytest.approx(fdp_epsilon(3000, 3000, 3000, 1e-5, a_all), abs=1e-3)
    assert out["max_certifiable"] > 1.5 * out["max_certifiable_steinke"]


def test_whitebox_section_rejects_bad_options():
    assert WhiteboxSection().enabled and WhiteboxSection().canaries >= 1000
    with pytest.raises(ValueError, match="canaries"):
        WhiteboxSection(canaries=10)
    with pytest.raises(ValueError, match="extra"):
        WhiteboxSection(canary=5)


# ------------------------------------------------------------------------------ per-step mechanism


@pytest.mark.parametrize("mode,trials,seeds", [("lean", 20_000, 3), ("hooks", 8000, 1)])
def test_per_step_mu_matches_the_configured_noise(data, sigma, mode, trials, seeds):
    # a 95% interval misses 1 time in 20 (seed 2 on the lean path did, just: [0.7985, ...] vs 0.7950; with the
    # session randomness of #24, seed 0 on hooks: [0.7999, 0.8914] vs 0.7984, while 12 seeds average 0.991 x the
    # configured mu), so containment is asserted at 99.9% and the 95% interval only for its precision (half-width
    # within 10% of mu): asserting both ends within 10% failed about one correct seed in 15
    x, y = data
    for seed in range(seeds):
        m = mechanism(data, sigma, mode=mode, trials=trials, seed=seed)
        lo, hi = m["mu_interval"]
        assert m["status"] == "consistent" and m["threat_model"] == "white-box one step"
        assert lo <= m["mu_estimate"] <= hi and (hi - lo) / 2 <= 0.1 * m["mu_configured"]
        wide = mechanism_audit(make_model(seed), x, y, noise_multiplier=sigma, grad_sample_mode=mode, trials=trials,
                               batch_size=BATCH, seed=seed, confidence=0.999)
        assert wide["mu_estimate"] == m["mu_estimate"]  # same seed, same noise
        assert wide["mu_interval"][0] <= m["mu_configured"] <= wide["mu_interval"][1]


@pytest.mark.parametrize("case,mode", [("no_noise", "lean"), ("half_noise", "lean"), ("no_clipping", "lean"),
                                       ("no_clipping", "hooks"), pytest.param("half_noise", "hooks", marks=pytest.mark.slow)])
def test_per_step_audit_catches_noise_and_clipping_bugs(data, sigma, case, mode):
    m = mechanism(data, sigma, case=case, mode=mode, trials=2000)
    assert m["status"] == "inconsistent"
    assert m["mu_interval"][0] > 1.5 * m["mu_configured"]


def test_every_bug_has_a_test():
    assert set(BUGS) == {"no_noise", "half_noise", "no_clipping", "reused_noise", "ledger_half_steps", "accountant_half_rate"}


def test_planted_bugs_restore_the_shipped_code():
    before = (FusedDPOptimizer._draw_noise, FusedDPOptimizer._clip_factor, HospitalDP.record_round)
    for name in BUGS:
        with plant(name):
            pass
    assert (FusedDPOptimizer._draw_noise, FusedDPOptimizer._clip_factor, HospitalDP.record_round) == before
    with pytest.raises(ValueError, match="unknown planted bug"):
        plant("typo")


# ------------------------------------------------------------- statistics against the papers, independently


def steinke_epsilon(scores, included, k, delta, confidence=0.95, side="both"):
    """Steinke, Nasr and Jagielski (2023), Algorithm 1 + Theorem 3, written from the paper: guess IN for
    the k highest scores and (``side="both"``) OUT for the k lowest, or (``side="top"``) abstain on the rest;
    v correct of r guesses; the largest eps whose p-value
    P[Bin(r, e^eps/(1+e^eps)) >= v] + 2 m delta max_i P[v-i <= Bin < v] / i is below 1 - confidence."""
    s, b = np.asarray(scores), np.asarray(included, bool)
    m, order = len(s), np.argsort(-s)
    v = int(b[order[:k]].sum() + ((~b[order[m - k:]]).sum() if side == "both" else 0))
    r = 2 * k if side == "both" else k

    def p_value(eps):
        p = math.exp(eps) / (1 + math.exp(eps))
        tail = binom.sf(v - 1, r, p)
        i = np.arange(1, v + 1)
        window = binom.cdf(v - 1, r, p) - binom.cdf(v - 1 - i, r, p)
        return tail + 2 * m * delta * float(np.max(window / i))

    alpha = 1 - confidence
    if p_value(0.0) >= alpha:
        return 0.0
    hi = 1.0
    while p_value(hi) < alpha:
        hi *= 2
    return brentq(lambda e: p_value(e) - alpha, 0.0, hi, xtol=1e-9)


def guesses(scores, included, side, k):
    """(guesses, correct) of IN for the k highest scores and, side "both", OUT for the k lowest (no ties here)."""
    s, b = np.asarray(scores), np.asarray(included, bool)
    order = np.argsort(-s)
    v = int(b[order[:k]].sum())
    return (2 * k, v + int((~b[order[len(s) - k:]]).sum())) if side == "both" else (k, v)


def fdp_epsilon(m, r, v, delta, alpha):
    """Mahloujifar, Melis and Chaudhuri (2025, arXiv 2410.22235), written from the paper: the largest eps whose
    Gaussian mechanism at (eps, delta) (mu = 1 / sigma, sigma from dp_accounting's Gaussian calibration) the
    guesses refute at level alpha, refuting when the guessing game's recursion (with the cap at 1) ends with the
    correct and incorrect masses above r / m. Root in eps by brentq (scipy's normal, not the module's)."""
    import dp_accounting
    from scipy.stats import norm

    def margin(eps):
        mu = 1.0 / dp_accounting.get_sigma_gaussian(eps, delta)
        correct, incorrect = alpha * v / m, alpha * (r - v) / m
        for i in reversed(range(v)):
            lifted = max(incorrect, float(norm.cdf(norm.ppf(correct) - mu)))
            if lifted == incorrect:  # nothing moves any more (the paper's early exit)
                break
            correct, incorrect = min(1.0, correct + (lifted - incorrect) * i / (r - i)), lifted
        return correct + incorrect - r / m

    if v == 0 or margin(0.0) <= 0:
        return 0.0
    hi = 1.0
    while margin(hi) > 0:
        hi *= 2
    return brentq(margin, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-7)


FDP_CASES = [  # m, r, v, delta, alpha
    (1000, 1000, 1000, 1e-5, 0.05),
    (2000, 200, 170, 1e-5, 0.04),
    (3000, 3000, 1900, 1e-5, 0.01),
    (20000, 904, 700, 1e-5, 0.04),
    (20000, 20000, 10600, 1e-5, 0.01),
    (5000, 100, 80, 1e-6, 0.05),
    (3000, 3000, 3000, 1e-3, 0.1),
    (400, 50, 30, 1e-5, 0.05),  # refutes nothing: 0
]


@pytest.mark.parametrize("m,r,v,delta,alpha", FDP_CASES)
def test_fdp_one_run_bound_agrees_with_the_paper_and_is_tighter_than_steinke(m, r, v, delta, alpha):
    ours = fdp_one_run_bound(m, r, v, delta, alpha)
    theirs = fdp_epsilon(m, r, v, delta, alpha)
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert (ours > 0) == ((r, v) != (50, 30))
    assert gdp_epsilon(fdp_one_run_mu(m, r, v, delta, alpha), delta) == pytest.approx(ours, abs=1e-9)
    steinke = _one_run_bound(m, r, v, delta, alpha)
    assert ours >= steinke and (ours > steinke or ours == 0.0)  # tighter on the same guesses


def test_fdp_bound_with_every_guess_correct_does_not_saturate():
    """Steinke et al.'s bound with every guess correct saturates near 8.2 (20,000 canaries, delta 1e-5: the
    2 m delta term); the f-DP bound keeps growing with m."""
    fdp = {m: fdp_one_run_bound(m, m, m, 1e-5, 0.05) for m in (1000, 5000, 20000)}
    steinke = {m: _one_run_bound(m, m, m, 1e-5, 0.05) for m in (1000, 5000, 20000)}
    assert steinke[20000] == pytest.approx(8.2, abs=0.05)
    assert fdp[1000] > 1.5 * steinke[1000] and fdp[20000] > 16 and fdp[1000] < fdp[5000] < fdp[20000]


def test_one_run_bound_agrees_with_the_paper():
    rng = np.random.default_rng(3)
    m = 2000
    included = rng.random(m) < 0.5
    scores = rng.standard_normal(m) + 1.5 * included
    ours = one_run_epsilon(scores, included, 1e-5, grid=10)
    ks = sorted({max(1, (m // 2) * j // 10) for j in range(1, 11)})
    theirs = max(steinke_epsilon(scores, included, k, 1e-5) for k in ks)
    assert ours["eps_lb"] > 0.5
    assert ours["eps_lb"] == pytest.approx(theirs, abs=1e-6)
    # every guess correct: the documented saturation values (200 canaries: 4.19, 1,000: 5.78)
    for m, expected in [(200, 4.19), (1000, 5.78)]:
        inc = np.arange(m) < m // 2
        assert one_run_epsilon(inc.astype(float), inc, 1e-5)["eps_lb"] == pytest.approx(expected, abs=0.01)
        assert steinke_epsilon(inc.astype(float), inc, m // 2, 1e-5) == pytest.approx(expected, abs=0.01)


def test_clopper_pearson_and_empirical_epsilon_agree_with_scipy():
    for k, n in [(0, 20), (3, 20), (17, 20), (20, 20), (512, 1000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        lo, hi = clopper_pearson(k, n, 0.95)
        assert float(lo) == pytest.approx(ci.low, abs=1e-9) and float(hi) == pytest.approx(ci.high, abs=1e-9)
    rng = np.random.default_rng(4)
    included = rng.random(80) < 0.5
    scores = rng.standard_normal(80) + 2.0 * included
    ours = empirical_epsilon(scores, included, 1e-5)["eps_lb"]
    n_in, n_out, best = int(included.sum()), int((~included).sum()), 0.0
    for t in np.r_[np.inf, np.sort(scores)]:
        guess = scores >= t
        tp, fp = int((guess & included).sum()), int((guess & ~included).sum())
        ci = lambda k, n: binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")  # noqa: E731
        tpr_lo, fpr_hi = ci(tp, n_in).low, ci(fp, n_out).high
        tnr_lo, fnr_hi = ci(n_out - fp, n_out).low, ci(n_in - tp, n_in).high
        for num, den in [(tpr_lo - 1e-5, fpr_hi), (tnr_lo - 1e-5, fnr_hi)]:
            if num > 0:
                best = max(best, math.log(num / den))
    assert ours > 0.5 and ours == pytest.approx(best, abs=1e-9)


def test_gdp_fit_recovers_mu_and_epsilon_matches_dong_roth_su():
    rng = np.random.default_rng(5)
    included = rng.random(20_000) < 0.5
    mu, lo, hi = gdp_fit(rng.standard_normal(20_000) + 1.2 * included, included)
    assert lo <= 1.2 <= hi and hi - lo < 0.1
    # GDP-to-(eps, delta), Dong, Roth and Su (2022) Corollary 2.13: delta(eps) at our eps equals delta
    from scipy.stats import norm

    for m in (0.5, 1.0, 2.0):
        e = gdp_epsilon(m, 1e-5)
        assert norm.cdf(-e / m + m / 2) - math.exp(e) * norm.cdf(-e / m - m / 2) == pytest.approx(1e-5, rel=1e-4)
    assert gdp_epsilon(1e6, 1e-5) > 1e3  # an unbounded fit stays above any claim


@pytest.mark.slow
def test_honest_power_sweep_over_ten_seeds(data, sigma):
    """Ten honest audits: never flagged; the f-DP one-run bound reaches a useful share of the claim, more than
    Steinke et al.'s on the same guesses (measured: median 0.39 against 0.29 of the accountant's epsilon)."""
    ratios, ratios_steinke = [], []
    for seed in range(10):
        e = whitebox(data, sigma, seed=100 + seed)
        assert e["status"] != "inconsistent", e["reasons"]
        ratios.append(e["ratio"])
        ratios_steinke.append(e["ratio_steinke"])
    assert np.median(ratios) > 0.35 and np.median(ratios) > 1.2 * np.median(ratios_steinke)


TINY_RUN = """
run: {name: tiny-whitebox, seed: 1, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3}
tasks:
  max_test_records: 120
  train:
    - {name: heart_disease, partition: natural, local_epochs: 3}
client: {local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}
privacy: {dp: true, profile: {target_epsilon: 8.0}}
injection: {enabled: false}
baseline: {single_hospital: false}
"""


@pytest.mark.slow
def test_whitebox_and_mechanism_for_a_finished_run(tmp_path):
    """A real tiny DP run made by the CLI (one Flower simulation), audited as `audit_run` would."""
    from attacks.mechanism import mechanism_for_run
    from attacks.whitebox import whitebox_for_run
    from privacy.accounting import epsilon
    from secure_fedkim.rundir.artifacts import load_run
    from secure_fedkim.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_RUN)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    run = load_run(tmp_path / "run")
    ledger = PrivacyLedger(run.ledger_path("cleveland"))
    plan = ledger.events("dp_plan")[-1]
    rounds = [e for e in ledger.events("dp_round", plan["run_id"]) if e["task"] == "heart_disease"]
    e = whitebox_for_run(run, "cleveland", "heart_disease", WhiteboxSection(canaries=2000), seed=1)
    assert e["steps_observed"] == e["steps_ledger"] == sum(r["steps"] for r in rounds)  # per-task local_epochs: 3
    assert e["steps_ledger"] == len(rounds) * 3 * math.ceil(len(run.plans["heart_disease"].split.clients["cleveland"]) / 32)
    assert e["accountant_epsilon"] == pytest.approx(epsilon(ledger.dp_history(plan["run_id"]), plan["delta"], plan["accountant"]))
    assert e["status"] in ("consistent", "inconclusive") and not failed(e)
    m = mechanism_for_run(run, "cleveland", "heart_disease", trials=10_000, seed=1)
    assert m["noise_multiplier"] == plan["noise_multiplier"] and m["status"] == "consistent"
