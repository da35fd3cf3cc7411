"""One fast calibration (issue #28): verified against every accountant the report uses, as tight as the previous
PRV bisection, the same noise for `budget --config` and a run's plan, per-round epsilons composed incrementally,
and several targets in one `budget` call."""

import pytest

from privacy import accounting
from privacy.accounting import (RoundComposer, Step, calibrate, calibrate_noise, epsilon, epsilon_after_rounds,
                                independent_epsilon)
from secure_fedkim.cli import main

DELTA = 1e-5
# a heterogeneous round: three tasks with their own sample rates and steps (like a hospital's round)
ROUND = [(0.2, 10), (0.05, 40), (0.5, 4)]


def _history(sigma, schedule):
    return [Step(sigma, q, n) for q, n in schedule]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_calibrated_noise_meets_the_target_under_both_report_accountants_and_is_tight(accountant):
    schedule = ROUND * 3
    target = 3.0
    cal = calibrate(target, DELTA, schedule, accountant)
    sigma = cal.noise_multiplier
    other = "pld" if accountant == "prv" else "rdp"
    assert epsilon(_history(sigma, schedule), DELTA, accountant) <= target
    assert independent_epsilon(_history(sigma, schedule), DELTA, other) <= target
    assert cal.checks == {f"opacus {accountant}": epsilon(_history(sigma, schedule), DELTA, accountant),
                          f"dp_accounting {other}": independent_epsilon(_history(sigma, schedule), DELTA, other)}
    assert cal.epsilon >= 0.99 * target  # tight: tol 1% of the target
    assert max(epsilon(_history(0.99 * sigma, schedule), DELTA, accountant),
               independent_epsilon(_history(0.99 * sigma, schedule), DELTA, other)) > target
    assert calibrate_noise(target, DELTA, schedule, accountant) == sigma  # deterministic, the same path


def test_the_fast_calibration_is_within_1pct_of_the_previous_prv_bisection():
    schedule = ROUND * 2
    before = calibrate_noise(2.0, DELTA, schedule, method="prv-bisect")
    after = calibrate_noise(2.0, DELTA, schedule)
    assert abs(after - before) / before <= 0.01


def test_a_sigma_that_fails_verification_is_stepped_up_never_returned(monkeypatch):
    # pretend the search accountant agrees with PRV: the first sigma it finds is ~eps_error above the target by
    # PRV, so verification must reject it and search again against the measured gap
    monkeypatch.setitem(accounting._EXPECTED_GAP, "prv", 0.0)
    schedule = ROUND * 2
    cal = calibrate(1.0, DELTA, schedule)
    assert cal.verifications >= 2
    assert epsilon(_history(cal.noise_multiplier, schedule), DELTA, "prv") <= 1.0
    assert independent_epsilon(_history(cal.noise_multiplier, schedule), DELTA, "pld") <= 1.0


def test_a_target_met_at_the_floor_is_answered_with_it():
    cal = calibrate(500.0, DELTA, [(0.1, 20)], "rdp", floor=0.5)
    assert cal.at_floor and cal.noise_multiplier == 0.5 and cal.epsilon <= 500.0
    assert not calibrate(2.0, DELTA, [(0.1, 20)], "rdp", floor=0.5).at_floor
    with pytest.raises(ValueError, match="method"):
        calibrate(2.0, DELTA, [(0.1, 20)], method="nope")


def test_independent_epsilon_is_dp_accountings_pld_accountant_exactly():
    from dp_accounting import pld

    history = [Step(1.7, 0.05, 120), Step(1.7, 0.3, 8)]
    acc = pld.PLDAccountant()
    acc.compose(accounting._dp_event(history))
    assert independent_epsilon(history, DELTA, "pld") == acc.get_epsilon(DELTA)


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_incremental_per_round_epsilons_equal_a_full_recomposition(method):
    sigma, rounds = 1.3, 6
    composer = RoundComposer(sigma, ROUND, DELTA, method)
    incremental = [composer.after(r) for r in (1, 2, 4, 6)]  # uneven gaps: composes 1, 1, 2, 2 rounds
    for r, eps in zip((1, 2, 4, 6), incremental):
        full = (independent_epsilon(_history(sigma, ROUND * r), DELTA, "pld") if method == "pld"
                else epsilon(_history(sigma, ROUND * r), DELTA, "rdp"))
        assert eps == pytest.approx(full, rel=1e-9)
    # something else after the rounds (the single-hospital baseline's steps) composes onto them
    extra = [(0.2, 10)]
    full = (independent_epsilon(_history(sigma, ROUND * rounds + extra), DELTA, "pld") if method == "pld"
            else epsilon(_history(sigma, ROUND * rounds + extra), DELTA, "rdp"))
    assert composer.then(extra) == pytest.approx(full, rel=1e-9)
    assert incremental == sorted(incremental)
    assert epsilon_after_rounds(sigma, ROUND, [1, 2, 4, 6], DELTA, method) == pytest.approx(incremental, rel=1e-12)
    with pytest.raises(ValueError, match="rounds"):
        composer.after(3)  # already past round 3


def test_the_budget_table_composes_round_by_round():
    from privacy.budget import epsilon_by_round, forecast

    p = forecast(2.0, None, 1000, 50, 1, 25, "rdp")  # 25 rounds: 20 evenly spaced rows
    full = [epsilon([Step(p.noise_multiplier, p.sample_rate, p.steps_per_round * r)], p.delta, "rdp")
            for r in p.table_rounds]
    assert p.epsilon_by_round == pytest.approx(full, rel=1e-9)
    assert p.epsilon == pytest.approx(p.epsilon_by_round[-1], rel=1e-9) and p.epsilon <= 2.0
    prv = epsilon_by_round(1.1, 0.05, 20, 3, DELTA, "prv")  # PRV cannot compose incrementally: PLD does
    assert prv == pytest.approx([independent_epsilon([Step(1.1, 0.05, 20 * r)], DELTA) for r in (1, 2, 3)], rel=1e-9)


FED = ("run: {rounds: 2}\n"
       "federation: {clients: [cleveland, hungary, switzerland, va_long_beach]}\n"
       "tasks: {train: [{name: heart_disease, partition: natural}]}\n"
       "privacy: {dp: true, profile: {target_epsilon: 3.0, accountant: prv}}\n")


def test_budget_config_prints_the_noise_a_runs_dp_plan_calibrates(tmp_path, capsys):
    from secure_fedkim.hospital.client_app import hospital_dp
    from secure_fedkim.config import load_config
    from secure_fedkim.plan import build_plan

    path = tmp_path / "fed.yaml"
    path.write_text(FED)
    cfg, _ = load_config(path)
    plans = build_plan(cfg)
    assert main(["budget", "--config", str(path), "--epsilon", "3"]) == 0
    out = capsys.readouterr().out
    for client in ("cleveland", "switzerland"):
        dp = hospital_dp(cfg, plans, client, tmp_path / client, f"run-{client}")
        line = next(x for x in out.splitlines() if x.startswith(client))
        assert f"{dp.noise_multiplier:.4f}" in line and "+ baseline ->" in line
        whole = epsilon(_history(dp.noise_multiplier, dp.round_schedule * 2 + dp.reserved), dp.delta, "prv")
        assert f"+ baseline -> {whole:.3f}" in line and whole <= 3.0


def test_several_targets_in_one_call_side_by_side(tmp_path, capsys):
    path = tmp_path / "fed.yaml"
    path.write_text(FED)
    assert main(["budget", "--config", str(path), "--epsilon", "1", "4"]) == 0
    out = capsys.readouterr().out
    assert "signal/noise" in out and "clipped gradient of norm C" in out and out.strip().endswith("(nothing written)")
    block = out.split("hungary:")[1].split("switzerland:")[0].splitlines()
    rows = {float(x.split()[0]): x.split() for x in block if x.startswith("  ") and x.split()[0].replace(".", "").isdigit()}
    assert set(rows) == {1.0, 4.0}
    noise = {t: float(r[1]) for t, r in rows.items()}
    assert noise[1.0] > noise[4.0]  # a smaller budget needs more noise
    snr = {t: float(r[2]) for t, r in rows.items()}
    assert snr[1.0] < snr[4.0]
    for t, r in rows.items():
        per_round = [float(x) for x in r[3:5]]  # 2 rounds
        assert per_round == sorted(per_round) and float(r[5]) <= t  # the whole run with the baseline, by prv
    # --write needs one budget
    assert main(["budget", "--config", str(path), "--epsilon", "1", "4", "--write", str(tmp_path / "w.yaml")]) == 2
    assert "one --epsilon" in capsys.readouterr().err


def test_several_targets_without_a_config_print_one_plan_each(capsys):
    from privacy.budget import forecast

    assert main(["budget", "--epsilon", "2", "6", "--records", "1000", "--batch", "50", "--epochs", "1",
                 "--rounds", "2", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    for target in (2.0, 6.0):
        p = forecast(target, None, 1000, 50, 1, 2, "rdp")
        assert f"target epsilon     {target:g} per record" in out
        assert f"noise multiplier   {p.noise_multiplier:.6g}" in out
    assert out.count("budget printed to standard output") == 1
    assert main(["budget", "--epsilon", "2", "2", "--records", "1000", "--rounds", "2"]) == 2
    assert "--epsilon lists a target twice" in capsys.readouterr().err


def test_a_target_below_prvs_resolution_is_unreachable_at_once():
    with pytest.raises(ValueError, match="eps_error"):
        calibrate(0.005, DELTA, [(0.1, 10)])
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise(1e-7, DELTA, [(1.0, 10**6)], accountant="rdp")


def test_budget_config_plans_hospitals_in_forked_workers_in_config_order(tmp_path, capsys, monkeypatch):
    """The hospitals are planned in parallel processes; the table keeps the config's order, the numbers equal the
    one-process path, and a hospital's error in a worker is still one usage line naming it."""
    from secure_fedkim import cli

    path = tmp_path / "fed.yaml"
    path.write_text(FED.replace("[cleveland, hungary, switzerland, va_long_beach]",
                                "[va_long_beach, hungary, cleveland, switzerland]"))
    assert main(["budget", "--config", str(path), "--epsilon", "3"]) == 0
    forked = capsys.readouterr().out
    rows = [x.split()[0] for x in forked.splitlines()[1:5]]
    assert rows == ["va_long_beach", "hungary", "cleveland", "switzerland"]
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one core: no workers
    assert main(["budget", "--config", str(path), "--epsilon", "3"]) == 0
    assert capsys.readouterr().out == forked
    monkeypatch.undo()
    # every hospital has more than 100 records, so delta 0.01 is not below 1/n: the first in order is named
    assert main(["budget", "--config", str(path), "--epsilon", "3", "--delta", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget --config: va_long_beach: " in err and "1/n" in err, err
