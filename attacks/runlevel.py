"""The run-level audit: re-execute the run's hospitals through their own code path and examine the randomness
of every DP step as it executed.

The white-box and per-step audits (``attacks/whitebox.py``, ``attacks/mechanism.py``) test one clip-and-noise
step with the auditor's own generator; they cannot see how a run draws its randomness (seeding, rounds,
hospitals, tasks, the baseline, a resumed round), which is where the bug of ea4bf7b lived (every round at
every hospital drew the same noise). This audit re-executes the federation from the run directory's config
with the hospitals' own code: for every round, each hospital's ``client_app.hospital_round`` (its policy
check, its DP plan from its own ledger, ``local_training.local_round`` with the session randomness of
``local_training.dp_randomness``, the spend written before release), the global model averaged as FedAvg
does, then the single-hospital baseline (``baseline.train_alone``). The rerun writes its own run-shaped
directory (ledgers included) under the audit's folder. What is not re-executed: the server's transport
(encryption or masking happens after the release point this audit taps) and the FM injection.

The randomness stays exactly as in production: nothing here seeds the noise or the batches. The audit taps,
through ``privacy.randomness.observed`` (inert unless an audit sets it), each DP step's noise as applied (the
released sum minus the clipped sum) at ``coordinates`` coordinates chosen with the audit's seed, and each
Poisson sample. Statistics over the whole run, each with what it can detect:

* exact repeats: a noise vector (at the tapped coordinates) seen at two steps anywhere in the run (two
  independent Gaussian vectors are equal with probability 0);
* correlation: for every pair of sessions (hospital x round x task, federation and baseline) of the same
  model, the step-aligned inner products of their noise, z ~ N(0, 1) under independence, flagged above a
  Bonferroni threshold over all pairs;
* Poisson batches: for every pair of sessions sampling the same units, the step-aligned overlap of the
  samples against its binomial expectation (one-sided z, Bonferroni);
* noise scale: the tapped noise's standard deviation against sigma x C per hospital (chi-square interval);
* steps: every tapped session against the rerun's ledger (a round trained and not recorded), and the
  rerun's ledger against the run's own (rounds, tasks and steps).

* whole-run lower bound: gradient canaries (:class:`RunTap`) join every DP step of every round, task and the
  baseline at each hospital as records (or patients) of it would; their scores over the whole run give the
  f-DP one-run lower bound (Mahloujifar, Melis and Chaudhuri 2025; Steinke, Nasr and Jagielski's beside it) on
  the hospital's whole-run epsilon, against the ledger's. It shows a mechanism much weaker than claimed; at the
  budgets hospitals use it cannot reach the claim (``max_certifiable_epsilon`` says how far it can), and the
  randomness faults above (repeats, correlations) are the independence tests' business, not this score's.
  Canaries are added by the fused step (``grad_sample_mode`` lean, the hospitals' default); a session on
  Opacus's own optimizers is tapped for its noise but carries none.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import chi2, norm

from attacks._runs import run_id_of
from attacks.whitebox import ONE_RUN_METHOD, one_run_audit, step_llr
from privacy.accounting import epsilon
from privacy.ledger import DP_PLAN, DP_ROUND, PrivacyLedger
from privacy.randomness import observed
from secure_fedkim.rundir.artifacts import Run, load_run
from secure_fedkim.rundir.layout import RunDir

__all__ = ["RunTap", "reexecute", "run_level_audit", "THREAT_RUN"]

_MAX_REASONS = 8
THREAT_RUN = ("the run as executed: every DP step of every round, task and hospital and of the single-hospital "
              "baseline, re-executed through the hospitals' own code with the production randomness")


@dataclass
class Session:
    """One DP training session as tapped: (run id, hospital, round, task) and what each step drew."""

    label: tuple
    dimension: int = 0
    std: float = 0.0
    noise: list = field(default_factory=list)  # per step: the noise at the tapped coordinates
    samples: list = field(default_factory=list)  # per step: (units, sample rate, chosen indices)
    canary: list = field(default_factory=list)  # per step with canaries: (release at their coordinates, C, sigma, q)
    pending: tuple | None = None  # the canaries of the step being taken: (coordinates, C, sigma, q)

    @property
    def role(self) -> str:
        return "baseline" if str(self.label[0]).startswith("baseline-") else "federation"

    @property
    def hospital(self) -> str:
        return str(self.label[1])

    def where(self, step: int | None = None) -> str:
        run_id, hospital, rnd, task = self.label
        at = "" if step is None else f"step {step + 1} of "
        return f"{at}round {rnd} at {hospital} ({task}{', baseline' if self.role == 'baseline' else ''})"


class RunTap:
    """The observer of ``privacy.randomness.observed``: keeps each session's noise at ``coordinates`` coordinates
    (chosen per model size from ``seed``, the same for every session of that size) and its Poisson samples.

    With ``canaries`` > 0 it also supplies the fused DP step with gradient canaries (``canary_rows``, called by
    ``privacy.fast_dp.FusedDPOptimizer`` only while observed): canary j of a hospital is one record (at patient
    level, one patient) that is in that hospital's data with probability 1/2 (drawn once per hospital from
    ``seed``) and, when in, joins each DP step with the step's own sample rate (drawn from the audit's generator,
    never the run's): its per-sample gradient is ``canary_norm x C`` at the j-th canary coordinate of the model
    (coordinates other than the tapped ones), clipped, summed and noised by the optimizer's own code. The tap
    keeps each step's release minus the records' clipped sum at those coordinates: the canaries plus the noise."""

    def __init__(self, coordinates: int, seed: int, canaries: int = 0, canary_norm: float = 2.0):
        self.k, self.seed, self.m, self.canary_norm = coordinates, seed, canaries, canary_norm
        self.sessions: dict[int, Session] = {}
        self._coords: dict[int, np.ndarray] = {}
        self._canary_coords: dict[int, np.ndarray] = {}
        self._included: dict[str, np.ndarray] = {}
        self._draws: dict[str, np.random.Generator] = {}
        self._held: list = []

    def _session(self, randomness) -> Session:
        if len(randomness.label) != 4:
            raise RuntimeError(f"a DP session without a (run, hospital, round, task) label: {randomness.label!r}")
        if id(randomness) not in self.sessions:
            self._held.append(randomness)  # held, so that its id is never reused by a later session's source
            self.sessions[id(randomness)] = Session(tuple(randomness.label))
        return self.sessions[id(randomness)]

    def coordinates(self, dimension: int) -> np.ndarray:
        if dimension not in self._coords:
            rng = np.random.default_rng([self.seed, dimension])
            self._coords[dimension] = np.sort(rng.choice(dimension, min(self.k, dimension), replace=False))
        return self._coords[dimension]

    def canary_coordinates(self, dimension: int) -> np.ndarray:
        """The canaries' coordinates in a model of ``dimension`` parameters (none of the tapped ones), canary j at [j]."""
        if dimension not in self._canary_coords:
            free = np.setdiff1d(np.arange(dimension), self.coordinates(dimension))
            rng = np.random.default_rng([self.seed, dimension, 1])
            self._canary_coords[dimension] = rng.choice(free, min(self.m, len(free)), replace=False)
        return self._canary_coords[dimension]

    def included(self, hospital: str) -> np.ndarray:
        """Which of the ``canaries`` canaries are in ``hospital``'s data (each with probability 1/2)."""
        if hospital not in self._included:
            seq = np.random.SeedSequence([self.seed, 25, *hospital.encode()])
            self._included[hospital] = np.random.default_rng(seq).random(self.m) < 0.5
            self._draws[hospital] = np.random.default_rng(seq.spawn(1)[0])
        return self._included[hospital]

    def canary_rows(self, optimizer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The canary rows of this DP step (``privacy.fast_dp.add_canary_rows``'s layout), or None: no canaries,
        no noise, or no Poisson sample seen yet for this session (its rate is the canaries' rate)."""
        s = self._session(optimizer.randomness)
        if not self.m or not s.samples or optimizer.noise_multiplier <= 0:
            return None
        rate = s.samples[-1][1]
        coords = self.canary_coordinates(sum(p.numel() for p in optimizer.params))
        inside = self.included(s.hospital)[:len(coords)]
        sampled = np.flatnonzero(inside & (self._draws[s.hospital].random(len(coords)) < rate))
        c = float(optimizer.max_grad_norm)
        s.pending = (coords, c, float(optimizer.noise_multiplier), float(rate))
        dtype = optimizer.params[0].dtype
        return torch.from_numpy(coords[sampled]), torch.full((len(sampled),), self.canary_norm * c, dtype=dtype)

    def noise(self, randomness, noise: torch.Tensor, std: float) -> None:
        s = self._session(randomness)
        flat = noise.detach().reshape(-1)
        s.dimension, s.std = flat.numel(), float(std)
        s.noise.append(flat[torch.from_numpy(self.coordinates(flat.numel()))].double().numpy().copy())
        if s.pending is not None:
            coords, c, sigma, rate = s.pending
            s.canary.append((flat[torch.from_numpy(coords)].double().numpy().copy(), c, sigma, rate))
            s.pending = None

    def sample(self, randomness, n: int, sample_rate: float, chosen: torch.Tensor) -> None:
        self._session(randomness).samples.append((int(n), float(sample_rate), chosen.numpy().copy()))


# ---------------------------------------------------------------------------------------------- re-execution


def reexecute(run: Run, workdir: Path, tap: RunTap, *, progress: bool = False) -> Path:
    """Re-execute ``run``'s hospitals (federation rounds, then the baseline) in this process under ``tap``.
    Returns the rerun's directory, named as the run (so its run id is the run's): ``workdir/<run name>``."""
    from flwr.app import Context, RecordDict
    from tqdm.auto import tqdm

    from secure_fedkim.hospital.baseline import train_alone
    from secure_fedkim.hospital.client_app import hospital_round
    from secure_fedkim.federation.aggregation import flatten_state, unflatten_state, weighted_mean
    from secure_fedkim.hospital.local_training import new_client_model

    cfg = run.cfg
    rerun = workdir / _run_id(run)
    if rerun.exists():
        shutil.rmtree(rerun)
    rerun.mkdir(parents=True)
    (rerun / RunDir(run.run_dir).resolved_config.name).write_text(cfg.model_dump_json())
    state = new_client_model(cfg, run.plans).state_dict()
    clients = list(cfg.federation.clients)
    bar = tqdm(total=cfg.run.rounds * len(clients) + len(clients), desc="run-level audit: re-execution", disable=not progress)
    with observed(tap), torch.random.fork_rng(devices=[]):
        for rnd in range(1, cfg.run.rounds + 1):
            results = []
            for i, client in enumerate(clients):
                context = Context(run_id=1, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(), run_config={})
                config = {"server-round": rnd, "run-dir": str(rerun), "run-id": rerun.name}
                result = hospital_round(cfg, context, config, {k: v.clone() for k, v in state.items()})
                if result.model is not None:
                    results.append((result.model.state_dict(), result.metrics["num-examples"]))
                bar.update(1)
            if results:  # FedAvg, as the strategy aggregates
                mean = weighted_mean([flatten_state(s) for s, _ in results], [float(n) for _, n in results])
                state = unflatten_state(mean, state)
        if cfg.baseline.single_hospital:
            for client in clients:
                train_alone(cfg.model_dump_json(), str(rerun), client)
                bar.update(1)
    bar.close()
    return rerun


# ---------------------------------------------------------------------------------------------- statistics


def _threshold(alpha: float, tests: int, two_sided: bool = True) -> float:
    return float(norm.isf(alpha / max(tests, 1) / (2 if two_sided else 1)))


def exact_repeats(sessions: list[Session]) -> list[tuple[Session, int, Session, int]]:
    """Pairs of steps (anywhere in the run) whose tapped noise is identical."""
    seen: dict[bytes, tuple[Session, int]] = {}
    out = []
    for s in sessions:
        for i, v in enumerate(s.noise):
            if not np.any(v):
                continue  # no noise at all is the noise-scale check's business
            key = hashlib.sha256(np.float32(v).tobytes()).digest()
            if key in seen:
                out.append((*seen[key], s, i))
            else:
                seen[key] = (s, i)
    return out


def noise_correlations(sessions: list[Session]) -> list[tuple[float, Session, Session]]:
    """z of every pair of sessions of the same model: sum over aligned steps of <a_i, b_i> / (std_a std_b),
    over sqrt(k x steps); N(0, 1) when the two noises are independent."""
    out = []
    for a, b in itertools.combinations([s for s in sessions if s.noise and s.std > 0], 2):
        if a.dimension != b.dimension:
            continue
        m = min(len(a.noise), len(b.noise))
        x, y = np.stack(a.noise[:m]), np.stack(b.noise[:m])
        out.append((float((x * y).sum() / (a.std * b.std) / math.sqrt(x.size)), a, b))
    return out


def batch_overlaps(sessions: list[Session]) -> list[tuple[float, Session, Session]]:
    """One-sided z of every pair of sessions sampling the same units at the same rate (< 1): the step-aligned
    overlap of their samples against n q^2 per step (variance n q^2 (1 - q^2))."""
    out = []
    usable = [s for s in sessions if s.samples and s.samples[0][1] < 1]
    for a, b in itertools.combinations(usable, 2):
        if (a.samples[0][0], a.samples[0][1]) != (b.samples[0][0], b.samples[0][1]) or a.label[3] != b.label[3]:
            continue
        n, q = a.samples[0][0], a.samples[0][1]
        m = min(len(a.samples), len(b.samples))
        overlap = sum(len(np.intersect1d(a.samples[i][2], b.samples[i][2])) for i in range(m))
        mean, var = m * n * q * q, m * n * q * q * (1 - q * q)
        out.append(((overlap - mean) / math.sqrt(var) if var > 0 else 0.0, a, b))
    return out


def noise_scale(sessions: list[Session], confidence: float) -> tuple[float, float, float, int] | None:
    """(ratio, low, high, values): the tapped noise's std over the claimed std, with its chi-square interval."""
    values = [(np.stack(s.noise) / s.std) for s in sessions if s.noise and s.std > 0]
    if not values:
        return None
    x = np.concatenate([v.ravel() for v in values])
    n, ss = x.size, float((x * x).sum())
    alpha = 1 - confidence
    return math.sqrt(ss / n), math.sqrt(ss / chi2.isf(alpha / 2, n)), math.sqrt(ss / chi2.ppf(alpha / 2, n)), n


def run_history(run_dir: Path, hospital: str, run_id: str) -> tuple[list, float, str] | None:
    """The hospital's whole-run claim from the run's own ledgers: (the federation's then the baseline's accountant
    steps, delta, accountant), or None without a DP plan."""
    files = RunDir(run_dir)
    if not files.ledger(hospital).exists():
        return None
    ledger = PrivacyLedger(files.ledger(hospital))
    plan = ledger.plan(run_id)
    if plan is None:
        return None
    history = ledger.dp_history(run_id)
    if files.baseline_ledger(hospital).exists():
        history += PrivacyLedger(files.baseline_ledger(hospital)).dp_history(f"baseline-{hospital}")
    return history, float(plan.delta), str(plan.accountant)


def canary_bound(tap: RunTap, hospital: str, claim: tuple[list, float, str] | None, confidence: float,
                 seed: int) -> dict | None:
    """The one-run lower bound on the hospital's whole-run epsilon from its canaries (f-DP, Steinke's beside it;
    ``attacks.whitebox.one_run_audit``) against the ledger's epsilon for the same steps, or None without canaries.
    Canary j's score is the log-likelihood ratio, summed over every step it could join (every round, task and the
    baseline), of its coordinate's release under the claimed Poisson-subsampled Gaussian of that step."""
    mine = [s for s in tap.sessions.values() if s.hospital == hospital and s.canary]
    if not tap.m or not mine or not claim or not claim[0]:
        return None
    history, delta, accountant = claim
    included = tap.included(hospital)
    scores = np.zeros(len(included))
    steps = 0
    for s in mine:
        for y, c, sigma, rate in s.canary:
            scores[:len(y)] += step_llr(y, c, sigma, rate)
            steps += 1
    one = one_run_audit(scores, included, history, delta, confidence, seed=seed)
    return {"canaries": len(included), "canary_steps": steps, "accountant_epsilon": epsilon(history, delta, accountant),
            "ledger_steps": sum(b.num_steps for b in history), "eps_lb_one_run": one["eps_lb"],
            "eps_lb_one_run_steinke": one["eps_lb_steinke"], "max_certifiable_epsilon": one["max_certifiable"],
            "eps_lb_one_run_method": ONE_RUN_METHOD,
            "one_run_guesses": one["guesses"], "one_run_correct": one["correct"], "confidence": confidence}


def ledger_steps(rundir: Path, client: str, run_id: str, baseline: bool) -> dict[tuple, int]:
    """{(round, task): steps} recorded in a hospital's federation (or baseline) ledger for ``run_id``."""
    files = RunDir(rundir)
    path = files.baseline_ledger(client) if baseline else files.ledger(client)
    if not path.exists():
        return {}
    rid = f"baseline-{client}" if baseline else run_id
    return {(e["round"], e["task"]): int(e["steps"]) for e in PrivacyLedger(path).events(DP_ROUND) if e.get("run_id") == rid}


# ---------------------------------------------------------------------------------------------- the audit


def run_level_audit(run_dir: str | Path, workdir: str | Path | None = None, *, coordinates: int = 64, seed: int = 0,
                    false_alarm: float = 1e-4, canaries: int = 5000, confidence: float = 0.95, progress: bool = False,
                    tap: RunTap | None = None) -> list[dict]:
    """Re-execute the run and return one audit.json ``runlevel`` row per DP hospital (see the module docstring).

    ``false_alarm``: the probability that an honest run is flagged by each family of tests (correlations, batch
    overlaps, noise scales; Bonferroni within each), so about 3x it in all: a flag is a failure, not a hint.
    ``canaries``: gradient canaries per hospital (:class:`RunTap`) for the whole-run lower bound, which holds with
    probability ``confidence`` (the audit's confidence, as the white-box bounds; 0: no canaries).

    ``tap``: an already-filled tap (tests); otherwise the run is re-executed under a new one in ``workdir``
    (default: the run's ``audit/runlevel``)."""
    run = load_run(run_dir)
    run_id = _run_id(run)
    dp_clients = [c for c in run.clients if run.cfg.dp_profile(c) is not None]
    if not dp_clients:
        return []
    workdir = Path(workdir) if workdir is not None else RunDir(run.run_dir).audit_dir / "runlevel"
    if tap is None:
        tap = RunTap(coordinates, seed, canaries)
        rerun = reexecute(run, workdir, tap, progress=progress)
    else:
        rerun = workdir / run_id
    sessions = list(tap.sessions.values())
    alpha = false_alarm
    findings: dict[str, list[str]] = defaultdict(list)

    def flag(hospitals, text: str) -> None:
        for h in dict.fromkeys(hospitals):
            findings[h].append(text)

    for a, i, b, j in exact_repeats(sessions):
        flag([a.hospital, b.hospital], f"the noise of {b.where(j)} repeats {a.where(i)}")
    corr = noise_correlations(sessions)
    t_corr = _threshold(alpha, len(corr))
    for z, a, b in corr:
        if abs(z) > t_corr:
            flag([a.hospital, b.hospital], f"the noise of {a.where()} and of {b.where()} are correlated (z = {z:.1f}, "
                                           f"threshold {t_corr:.1f} for {len(corr)} pairs)")
    over = batch_overlaps(sessions)
    t_over = _threshold(alpha, len(over), two_sided=False)
    for z, a, b in over:
        if z > t_over:
            flag([a.hospital, b.hospital], f"the Poisson batches of {a.where()} and of {b.where()} overlap far more than "
                                           f"independent samples do (z = {z:.1f}, threshold {t_over:.1f})")
    rows = []
    for h in dp_clients:
        mine = [s for s in sessions if s.hospital == h]
        reasons = list(dict.fromkeys(findings.get(h, [])))
        if len(reasons) > _MAX_REASONS:
            reasons = reasons[:_MAX_REASONS] + [f"and {len(reasons) - _MAX_REASONS} more findings of these kinds"]
        scale = noise_scale(mine, 1 - alpha / len(dp_clients))
        if scale is not None and scale[2] < 1:
            reasons.append(f"the noise applied is {scale[0]:.3f} x sigma*C (interval {scale[1]:.3f}-{scale[2]:.3f}): less than planned")
        steps_problems = _step_problems(mine, rerun, run.run_dir, h, run_id)
        reasons += steps_problems
        claim = run_history(run.run_dir, h, run_id) or run_history(rerun, h, run_id)  # the rerun's: same plan, same steps
        bound = canary_bound(tap, h, claim, confidence, seed)
        if bound is not None and bound["eps_lb_one_run"] > bound["accountant_epsilon"]:
            reasons.append(f"the whole-run canary lower bound on epsilon {bound['eps_lb_one_run']:.2f} ({bound['canaries']} "
                           f"canaries over {bound['canary_steps']} steps, f-DP one run at {confidence:.0%}) exceeds the "
                           f"ledger's epsilon {bound['accountant_epsilon']:.2f} for the whole run")
        tapped = sum(len(s.noise) for s in mine)
        status = "inconsistent" if reasons else ("consistent" if tapped else "inconclusive")
        detect = (f"{len(mine)} sessions, {tapped} steps tapped at {coordinates} coordinates: an exact repeat of any step's "
                  f"noise; a correlation of two sessions' noise above {t_corr / math.sqrt(max(coordinates, 1)):.2f} per "
                  f"aligned step (one step, {len(corr)} pairs); a batch overlap above independence; a noise scale off "
                  f"by more than the interval; a step count that differs from the ledgers")
        if bound is not None:
            detect += (f"; a whole-run epsilon above the ledger's {bound['accountant_epsilon']:.2f} by its canaries' lower "
                       f"bound, which {bound['canaries']} canaries can take to at most {bound['max_certifiable_epsilon']:.2f}"
                       + (" (below the claim: the bound can show a gross excess only)"
                          if bound["max_certifiable_epsilon"] < bound["accountant_epsilon"] else ""))
        if not tapped:
            reasons.append("no DP step was tapped: the re-execution trained nothing at this hospital")
        rows.append({
            "hospital": h, "threat_model": THREAT_RUN, "status": status,
            "reasons": reasons if reasons else [f"consistent: {detect}"],
            "could_detect": detect, "sessions": len(mine), "steps_tapped": tapped, "coordinates": coordinates,
            "noise_scale_ratio": None if scale is None else scale[0],
            "noise_scale_interval": None if scale is None else [scale[1], scale[2]],
            "max_abs_noise_z": max((abs(z) for z, a, b in corr if h in (a.hospital, b.hospital)), default=None),
            "noise_z_threshold": t_corr,
            "max_batch_overlap_z": max((z for z, a, b in over if h in (a.hospital, b.hospital)), default=None),
            "batch_z_threshold": t_over, "false_alarm": false_alarm, **(bound or {}),
        })
    return rows


def _run_id(run: Run) -> str:
    """This run's id in its DP hospitals' ledgers (the run directory's name for a run of this version)."""
    for c in run.clients:
        path = RunDir(run.run_dir).ledger(c)
        if path.exists():
            found = run_id_of(run, PrivacyLedger(path).events(DP_PLAN))
            if found:
                return found
    return Path(run.run_dir).name


def _step_problems(mine: list[Session], rerun: Path, run_dir: Path, h: str, run_id: str) -> list[str]:
    """Tapped steps against the rerun's ledgers, and the rerun's ledger against the run's own."""
    problems = []
    for baseline in (False, True):
        recorded = ledger_steps(rerun, h, run_id, baseline)
        tapped = {(int(s.label[2]), str(s.label[3])): len(s.noise) for s in mine if (s.role == "baseline") == baseline}
        for key, n in sorted(tapped.items()):
            if recorded.get(key, 0) < n:
                what = "baseline round" if baseline else "round"
                problems.append(f"{what} {key[0]} at {h} ({key[1]}) trained {n} DP steps; its ledger records "
                                f"{recorded.get(key, 0)}")
        original = ledger_steps(run_dir, h, run_id, baseline)
        if not baseline and original and recorded and original != recorded:
            missing = sorted(set(recorded) - set(original))
            differ = sorted(k for k in set(recorded) & set(original) if recorded[k] != original[k])
            if missing or differ:
                problems.append(f"the run's ledger at {h} differs from its re-execution: rounds/tasks not recorded "
                                f"{missing[:5]}, step counts differing {differ[:5]}")
    return problems
