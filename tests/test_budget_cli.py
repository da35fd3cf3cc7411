"""`secure-fedkim budget`: the printed plan is the accountant's own numbers."""

import pytest

from privacy.accounting import Step, epsilon, independent_epsilon
from privacy.budget import forecast
from secure_fedkim.cli import main


def test_budget_plan_prints_the_calibrated_noise_and_epsilon_by_round(capsys):
    assert main(["budget", "--epsilon", "3", "--records", "2000", "--batch", "50", "--epochs", "1", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    p = forecast(3.0, None, 2000, 50, 1, 4)
    assert f"noise multiplier   {p.noise_multiplier:.6g}" in out
    # the whole run by the accountant the run enforces, within the target
    eps4 = epsilon([Step(p.noise_multiplier, 50 / 2000, 40 * 4)], 1e-5, "prv")
    assert f"final epsilon      {eps4:.4f} per record (prv" in out and eps4 <= 3.0
    # each round composed round by round by dp_accounting PLD (PRV has no incremental composition): the report's
    # cross-check of the same prefix
    pld4 = independent_epsilon([Step(p.noise_multiplier, 50 / 2000, 40 * 4)], 1e-5, "pld")
    assert f"    4  {pld4:>10.4f}" in out and "dp_accounting pld, composed round by round" in out
    assert "dp_accounting_pld" in out and out.strip().endswith("(nothing written)")


def test_budget_from_a_noise_multiplier(capsys):
    assert main(["budget", "--noise", "1.2", "--records", "1000", "--batch", "100", "--epochs", "1", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    eps2 = epsilon([Step(1.2, 0.1, 20)], 1e-5, "prv")
    assert f"opacus_prv            {eps2:>10.4f}" in out
    pld2 = independent_epsilon([Step(1.2, 0.1, 20)], 1e-5, "pld")
    assert f"    2  {pld2:>10.4f}" in out


def test_budget_usage_error(capsys):
    assert main(["budget", "--records", "10"]) == 2
    assert "give --epsilon" in capsys.readouterr().err


def test_budget_for_a_config_writes_a_dp_config(tmp_path, capsys):
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(
        "run: {rounds: 2}\n"
        "federation: {clients: [cleveland, hungary, switzerland, va_long_beach]}\n"
        "tasks: {train: [{name: heart_disease, partition: natural}]}\n"
    )
    out_cfg = tmp_path / "fed_dp.yaml"
    assert main(["budget", "--config", str(cfg), "--epsilon", "2", "--accountant", "rdp", "--write", str(out_cfg)]) == 0
    printed = capsys.readouterr().out
    assert "switzerland" in printed and f"written to {out_cfg}" in printed
    from secure_fedkim.config import load_config

    written, _ = load_config(out_cfg)
    assert written.privacy.dp and written.dp_profile("hungary").target_epsilon == 2.0


@pytest.mark.parametrize("args, option", [
    (["--epsilon", "-1"], "--epsilon"), (["--epsilon", "0"], "--epsilon"), (["--epsilon", "nan"], "--epsilon"),
    (["--epsilon", "inf"], "--epsilon"), (["--epsilon", "1", "--records", "0"], "--records"),
    (["--epsilon", "1", "--rounds", "0"], "--rounds"), (["--epsilon", "1", "--batch", "0"], "--batch"),
    (["--epsilon", "1", "--batch", "6000"], "--batch"), (["--epsilon", "1", "--epochs", "0"], "--epochs"),
    (["--epsilon", "1", "--delta", "2"], "--delta"), (["--epsilon", "1", "--delta", "0"], "--delta"),
    (["--noise", "-1"], "--noise"), (["--noise", "0.01"], "--noise"), (["--epsilon", "1", "--rounds", "10000000"], "--rounds"),
])
def test_budget_bad_values_are_one_line_and_exit_2(args, option, capsys):
    base = {"--records": "5000", "--rounds": "5"}
    given = dict(zip(args[::2], args[1::2]))
    argv = ["budget", *args] + [x for k, v in base.items() if k not in given for x in (k, v)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
    assert captured.out == ""


def test_budget_delta_not_below_one_over_n_is_one_line(capsys):
    assert main(["budget", "--epsilon", "1", "--records", "500", "--rounds", "1", "--delta", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1/n" in err


def test_a_huge_epsilon_is_answered_at_the_noise_floor_not_searched_below_it():
    from privacy.budget import MIN_NOISE_MULTIPLIER, format_table

    p = forecast(1e6, None, 500, 50, 1, 2, "rdp")  # searching below the floor grew to 22 GB with PRV
    assert p.at_noise_floor and p.noise_multiplier == MIN_NOISE_MULTIPLIER
    assert p.epsilon == epsilon([Step(MIN_NOISE_MULTIPLIER, 0.1, 20)], 1e-5, "rdp") < 1e6
    assert f"noise multiplier below {MIN_NOISE_MULTIPLIER:g} is not needed" in format_table(p)
    assert not forecast(3.0, None, 500, 50, 1, 2, "rdp").at_noise_floor


def test_a_budget_too_small_to_learn_is_warned():
    from dataclasses import replace

    from privacy.budget import format_table, noise_dominates

    usable = forecast(3.0, None, 500, 50, 1, 1, "rdp")
    assert "mostly noise" not in format_table(usable)
    assert "untrained AUROC" in format_table(replace(usable, noise_multiplier=51.0))  # sigma / batch > 1
    assert noise_dominates(33, 32) and not noise_dominates(32, 32)


def test_the_epsilon_table_of_a_long_run_lists_at_most_20_rounds():
    from privacy.budget import MAX_TABLE_ROUNDS, table_rounds

    assert table_rounds(5) == [1, 2, 3, 4, 5]
    many = table_rounds(1000)
    assert len(many) == MAX_TABLE_ROUNDS and many[-1] == 1000 and many == sorted(set(many))


def test_budget_help_has_examples_and_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["budget", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "examples:" in out and "secure-fedkim budget --epsilon 8 --records 5000 --rounds 5" in out
    for option, default in (("--batch", "64"), ("--epochs", "2"), ("--accountant", "prv")):
        assert f"(default: {default}" in out.split(option)[-1].split("--")[0] or f"default: {default}" in out
    assert "--rounds ROUNDS federated rounds" in out and "--epochs EPOCHS local epochs per round (default: 2" in out
