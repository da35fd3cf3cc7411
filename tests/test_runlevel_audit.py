"""The run-level audit (attacks/runlevel.py): the run re-executed through the hospitals' own code, its randomness
examined as executed. Each plumbing bug of attacks.planted_bugs is caught; the honest run never is."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from attacks.planted_bugs import PLUMBING_BUGS, plant
from attacks.runlevel import RunTap, Session, batch_overlaps, noise_correlations, noise_scale, run_level_audit
from privacy.ledger import DP_ROUND, PrivacyLedger
from secure_fedkim.config import parse_config
from test_patient_federation import VISITS as PATIENT_VISITS

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

CFG = {
    "run": {"rounds": 3, "seed": 2, "name": "rl"},
    "federation": {"clients": ["cleveland", "hungary", "va_long_beach"], "min_clients": 2},
    "tasks": {"train": [{"name": "heart_disease", "partition": "iid"}], "max_test_records": 50},
    "client": {"token_dim": 16, "num_tokens": 2, "batch_size": 32, "local_epochs": 1},
    "privacy": {"dp": True, "profile": {"target_epsilon": 4.0}},
    "baseline": {"single_hospital": True},
}


def audit(tmp_path, bug="honest", seed=0, **overrides):
    cfg = parse_config({**CFG, **overrides})
    run = tmp_path / bug / "rl"
    run.mkdir(parents=True)
    (run / "resolved_config.json").write_text(cfg.model_dump_json())
    with warnings.catch_warnings(), plant(bug):
        warnings.simplefilter("ignore")
        return run_level_audit(run, tmp_path / bug / "work", seed=seed), tmp_path / bug / "work" / "rl"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_honest_run_is_never_flagged(tmp_path, seed):
    rows, rerun = audit(tmp_path, seed=seed)
    assert [r["status"] for r in rows] == ["consistent"] * 3
    for r in rows:
        assert r["steps_tapped"] > 0 and r["sessions"] == 6  # 3 rounds + 3 baseline rounds, one task
        lo, hi = r["noise_scale_interval"]
        assert lo <= 1 <= hi
        # canaries in every DP step of the run; their whole-run lower bound below the ledger's epsilon (4, composed
        # with the baseline's spend) and above 0: the bound sees the canaries
        assert r["canary_steps"] == r["steps_tapped"] == r["ledger_steps"]
        assert 0.5 < r["eps_lb_one_run"] <= r["accountant_epsilon"] <= 4.0 + 1e-6, r
        assert r["eps_lb_one_run_steinke"] <= r["eps_lb_one_run"] and r["max_certifiable_epsilon"] > r["accountant_epsilon"]
    # the re-execution is a run directory of its own: every DP round in its ledgers, drawn by the secure source
    entries = PrivacyLedger(rerun / "clients" / "cleveland" / "ledger.jsonl").events(DP_ROUND)
    assert [e["round"] for e in entries] == [1, 2, 3] and {e["randomness"] for e in entries} == {"secure"}


@pytest.mark.parametrize("bug,expect", [
    ("rounds_reseeded", "repeats"),
    ("hospitals_alike", "correlated"),
    ("baseline_replays_federation", "baseline) repeats"),
    ("resume_repeats_round", "round 3"),
    ("batches_repeated", "Poisson batches"),
    ("round_not_recorded", "its ledger records 0"),
])
def test_each_plumbing_bug_is_caught_and_named(tmp_path, bug, expect):
    rows, _ = audit(tmp_path, bug)
    assert all(r["status"] == "inconsistent" for r in rows), [r["reasons"] for r in rows]
    assert any(expect in reason for r in rows for reason in r["reasons"]), rows[0]["reasons"]


@pytest.mark.parametrize("bug", ["half_noise", "no_clipping"])
def test_a_mechanism_weaker_than_its_ledger_says_is_caught_by_the_whole_run_canary_bound(tmp_path, bug):
    """The noise-scale check sees half the noise, not clipping that is skipped; the canaries' bound sees both (it
    would lose this power if the canaries stopped reaching the fused step or the tap stopped subtracting only the
    records' own sum).

    The bound is random (the audit's canaries and the run's OS-keyed noise): measured on this run, half_noise
    puts one hospital's bound above its ledger's 4.0 in about 85% of audits (3.7-5.8), no_clipping in all
    (4.7-5.8 over 9). So at least one of the three hospitals must be caught by it; an honest run's bound stays
    below its ledger (test_the_honest_run_is_never_flagged)."""
    rows, _ = audit(tmp_path, bug)
    caught = [r for r in rows if r["eps_lb_one_run"] > r["accountant_epsilon"]]
    assert caught, [(r["eps_lb_one_run"], r["accountant_epsilon"]) for r in rows]
    for r in caught:
        assert r["status"] == "inconsistent", r
        assert any("whole-run canary lower bound" in reason for reason in r["reasons"]), r["reasons"]
    if bug == "half_noise":  # the noise-scale check flags every hospital whatever its canaries drew
        assert all(r["status"] == "inconsistent" for r in rows), [r["reasons"] for r in rows]


def test_the_canaries_are_released_as_records_of_the_run(tmp_path):
    """Each canary's release, over every step it could join, against its claimed law: an included canary adds the
    clipped C with the step's sample rate q, an excluded one nothing, both under N(0, (sigma C)^2) noise."""
    from attacks.runlevel import reexecute
    from secure_fedkim.rundir.artifacts import load_run

    cfg = parse_config(CFG)
    run = tmp_path / "rl"
    run.mkdir()
    (run / "resolved_config.json").write_text(cfg.model_dump_json())
    tap = RunTap(16, seed=3, canaries=3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reexecute(load_run(run), tmp_path / "work", tap)
    for hospital in cfg.federation.clients:
        inside = tap.included(hospital)
        steps = [(y, c, sigma, q) for s in tap.sessions.values() if s.hospital == hospital for y, c, sigma, q in s.canary]
        assert steps and 0.4 < inside.mean() < 0.6
        z_in = sum((y[inside] / c - q).sum() for y, c, sigma, q in steps)
        z_out = sum((y[~inside] / c).sum() for y, c, sigma, q in steps)
        var_in = sum(inside.sum() * (sigma**2 + q * (1 - q)) for y, c, sigma, q in steps)
        var_out = sum((~inside).sum() * sigma**2 for y, c, sigma, q in steps)
        assert abs(z_in) / math.sqrt(var_in) < 5 and abs(z_out) / math.sqrt(var_out) < 5
        # the noise alone (excluded canaries) has the claimed scale
        ratio = math.sqrt(sum((y[~inside] ** 2).sum() / (sigma * c) ** 2 for y, c, sigma, q in steps)
                          / sum((~inside).sum() for _ in steps))
        assert 0.97 < ratio < 1.03
        # included canaries carry a signal far above the test's own spread: the check above could see them missing
        signal = sum(inside.sum() * q for y, c, sigma, q in steps) / math.sqrt(var_in)
        assert signal > 20


def test_every_plumbing_bug_has_a_test():
    assert set(PLUMBING_BUGS) == {"rounds_reseeded", "hospitals_alike", "baseline_replays_federation",
                                  "resume_repeats_round", "batches_repeated", "round_not_recorded"}


# ---------------------------------------------------------------- the statistics, against direct computations
def _session(label, noise, std=2.0, samples=()):
    s = Session(label, dimension=noise.shape[1], std=std, noise=list(noise))
    s.samples = list(samples)
    return s


def test_noise_correlation_z_is_the_normalised_aligned_inner_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 2, (5, 64)), rng.normal(0, 2, (7, 64))
    ((z, _, _),) = noise_correlations([_session(("r", "h", 1, "t"), a), _session(("r", "h", 2, "t"), b)])
    assert z == pytest.approx(sum(a[i] @ b[i] for i in range(5)) / 4 / math.sqrt(5 * 64))
    ((z_same, _, _),) = noise_correlations([_session(("r", "h", 1, "t"), a), _session(("r", "h", 2, "t"), a)])
    assert z_same > 15  # the same noise twice: z = sum ||a_i||^2 / 4 / sqrt(320) ~ sqrt(320)


def test_noise_correlation_is_standard_normal_under_independence():
    rng = np.random.default_rng(1)
    zs = [noise_correlations([_session(("r", "h", 1, "t"), rng.normal(0, 2, (4, 64))),
                              _session(("r", "h", 2, "t"), rng.normal(0, 2, (4, 64)))])[0][0] for _ in range(400)]
    assert stats.kstest(zs, "norm").pvalue > 1e-3


def test_noise_scale_interval_is_the_chi_square_one():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1.5, (10, 64))  # claimed std 2: the noise is 0.75 of it
    ratio, lo, hi, n = noise_scale([_session(("r", "h", 1, "t"), x)], 0.95)
    ss = float(((x / 2) ** 2).sum())
    assert n == 640 and ratio == pytest.approx(math.sqrt(ss / 640))
    assert (lo, hi) == pytest.approx((math.sqrt(ss / stats.chi2.ppf(0.975, 640)), math.sqrt(ss / stats.chi2.ppf(0.025, 640))))
    assert hi < 1


def test_batch_overlap_against_the_binomial():
    rng = np.random.default_rng(3)
    n, q, steps = 200, 0.25, 6
    draw = lambda: [(n, q, np.flatnonzero(rng.random(n) < q)) for _ in range(steps)]  # noqa: E731
    a, b = draw(), draw()
    noise = np.zeros((steps, 4))
    ((z, _, _),) = batch_overlaps([_session(("r", "h", 1, "t"), noise, samples=a), _session(("r", "h", 2, "t"), noise, samples=b)])
    overlap = sum(len(np.intersect1d(a[i][2], b[i][2])) for i in range(steps))
    assert z == pytest.approx((overlap - steps * n * q * q) / math.sqrt(steps * n * q * q * (1 - q * q)))
    ((z_same, _, _),) = batch_overlaps([_session(("r", "h", 1, "t"), noise, samples=a), _session(("r", "h", 2, "t"), noise, samples=a)])
    assert z_same > 10


def test_the_tap_keeps_the_same_coordinates_for_a_model_size():
    tap = RunTap(8, seed=4)
    assert np.array_equal(tap.coordinates(100), tap.coordinates(100)) and len(tap.coordinates(5)) == 5


# ---------------------------------------------------------------- a patient-level run, end to end (slow)
# the patient-level federation of test_patient_federation.py, without the foundation model
VISITS = PATIENT_VISITS + "injection: {enabled: false}\n"


@pytest.mark.slow
def test_an_honest_patient_level_run_is_audited_without_a_false_flag_and_its_plumbing_bugs_are_caught(tmp_path):
    """A real patient-level federation (NAFLD visits, several per patient, SecAgg+-free plain transport): the white-box
    audit replays it patient-level (its steps and rate match the ledger: it used to replay record-level and fail an
    honest run), the run-level audit finds it honest, the report does not fail on the audits; each plumbing bug
    planted into the run-level re-execution of the same run is caught (about 2 minutes)."""
    from attacks.audit import audit_run, parse_audit_config
    from secure_fedkim.cli import main
    from secure_fedkim.report.build import build_report, status_of

    cfg = tmp_path / "visits.yaml"
    cfg.write_text(VISITS)
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0
    small = {"mia": {"enabled": False}, "canary": {"enabled": False}, "game": {"enabled": False},
             "inversion": {"enabled": False}, "whitebox": {"canaries": 2000, "mechanism_trials": 5000}, "workers": 1}
    audit = audit_run(run, parse_audit_config(small), progress=False)
    for part in ("whitebox", "runlevel"):
        assert audit[part] and all(r["status"] == "consistent" for r in audit[part]), audit[part]
    for r in audit["whitebox"]:
        assert r["steps_observed"] == r["steps_ledger"]
    for r in audit["runlevel"]:  # canary patients in every patient-level step, their bound below the whole-run claim
        assert r["canary_steps"] == r["steps_tapped"] and r["eps_lb_one_run"] <= r["accountant_epsilon"], r
    report = build_report(run)
    assert status_of(report, "audit_consistent_with_accountant")["status"] == "pass"
    assert status_of(report, "noise_randomness")["status"] == "pass" and status_of(report, "noise_fresh")["status"] == "pass"
    for bug in PLUMBING_BUGS:
        with plant(bug):
            rows = run_level_audit(run, tmp_path / f"work-{bug}")
        assert all(r["status"] == "inconsistent" for r in rows), (bug, [r["reasons"] for r in rows])
    # the same federation with secure_mode off: its noise came from a generator reproducible from the run seed,
    # which the ledger records and the report fails (#24)
    cfg.write_text(VISITS.replace("profile: {target_epsilon: 3.0}", "profile: {target_epsilon: 3.0, secure_mode: false}"))
    seeded = tmp_path / "seeded"
    assert main(["run", str(cfg), "--out", str(seeded), "--quiet"]) == 0
    check = status_of(build_report(seeded), "noise_randomness")
    assert check["status"] == "fail" and "reproducible" in check["reason"] and "not fit for release" in check["reason"]
