"""`secure-fedkim budget`: the printed plan is the accountant's own numbers."""

import pytest

from privacy.accounting import Step, epsilon
from privacy.budget import plan
from secure_fedkim.cli import main


def test_budget_plan_prints_the_calibrated_noise_and_epsilon_by_round(capsys):
    assert main(["budget", "--epsilon", "3", "--records", "2000", "--batch", "50", "--epochs", "1", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    p = plan(3.0, None, 2000, 50, 1, 4)
    assert f"noise multiplier   {p.noise_multiplier:.6g}" in out
    eps4 = epsilon([Step(p.noise_multiplier, 50 / 2000, 40 * 4)], 1e-5, "prv")
    assert f"    4  {eps4:>10.4f}" in out and eps4 <= 3.0
    assert "dp_accounting_pld" in out and out.strip().endswith("(nothing written)")


def test_budget_from_a_noise_multiplier(capsys):
    assert main(["budget", "--noise", "1.2", "--records", "1000", "--batch", "100", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    eps2 = epsilon([Step(1.2, 0.1, 20)], 1e-5, "prv")
    assert f"    2  {eps2:>10.4f}" in out


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
