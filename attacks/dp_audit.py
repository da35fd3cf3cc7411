"""DP auditing with canaries: an empirical lower bound on epsilon, beside the accountant's epsilon.

Procedure (Jagielski et al. 2020; Nasr et al. 2021; one-run auditing, Steinke, Nasr and Jagielski 2023):

1. Make ``m`` canaries: records built to be easy to detect. ``ood``: out-of-distribution inputs (the
   data's mean plus 4 standard deviations of Gaussian noise per feature; for token-id inputs, random
   token sequences) with random labels. ``flip``: held-out real records with their label flipped.
2. Include each canary in the hospital's training data independently with probability 1/2 (one-run
   mode: one training; repeated mode: ``trials`` trainings, each with a fresh draw, pooled).
3. Train as the hospital does: DP-SGD through :class:`privacy.dp.HospitalDP` (Opacus, Poisson sampling,
   per-sample clipping at C, Gaussian noise sigma*C), or without DP.
4. Score each canary by its logit-scaled confidence of the canary label under the trained model.
5. Lower bound: for every threshold t, guessing IN when score >= t gives TP/FN/FP/TN counts. Two-sided
   Clopper-Pearson intervals at ``confidence`` give TPR_lo, FPR_hi, TNR_lo, FNR_hi; (eps, delta)-DP
   implies TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta, so

       eps_lb = max over t of max(log((TPR_lo - delta) / FPR_hi), log((TNR_lo - delta) / FNR_hi)).

   Each interval fails with probability (1 - confidence)/2 on one side, so one bound holds with
   probability >= confidence for a fixed threshold; like Jagielski et al. we take the best threshold
   without a multiple-testing correction (say so when quoting it).
   In one-run mode the bound of Steinke et al. (their Algorithm / Theorem 3 with the delta term
   ``2 m delta alpha``) is reported as well (``eps_lb_one_run``): guess IN for the k highest and OUT for
   the k lowest scores, count the correct guesses, and find the largest eps for which that many correct
   guesses would have p-value < 1 - confidence; max over a grid of k.
6. The claim to check: the ledger's whole-run epsilon of the hospital (``claimed_epsilon``, what
   :func:`attacks.audit.audit_run` passes), or, without one, :func:`privacy.accounting.epsilon` over the
   steps the replay took (``eps_accountant_replay``: its Poisson sample rate, its noise multiplier, the
   run's delta and accountant).
7. What the audit can decide (DESIGN.md, "Evidence must be able to fail"): ``max_certifiable_epsilon``
   is the larger of the two bounds above when every guess is correct (perfectly separated scores with
   the same inclusion draw); 200 canaries certify at most about 4.19 (one-run) and 3.28
   (Clopper-Pearson). ``status`` (:func:`consistency_status`): ``inconsistent`` when a lower bound
   exceeds the claim (a DP bug); otherwise ``inconclusive`` when the claim is above the certifiable
   maximum (the audit could not have caught a violation), or when there is no claim (no DP); otherwise
   ``consistent``. ``reasons`` says why, in words. ``consistent_with_accountant`` (kept for old readers)
   is False only for ``inconsistent``: True is no evidence of a bug, never a pass.

8. The unit (issue #18): a replay of a patient-level run (``dp.privacy_unit == "patient"``: patients Poisson-sampled,
   each patient's summed gradient over at most k records clipped to C) inserts canary *patients*: each
   canary is ``r`` copies of one canary record (default r = k, the run's ``max_records_per_patient_step``,
   so a sampled canary patient has all its records in the step), included or excluded as a whole; the
   shard's records keep their patients (``groups``). A canary patient's score is the mean of its records'
   scores (with copies, the score of its one input), and the bound is an epsilon per patient, checked
   against the ledger's per-patient epsilon. ``epsilon_unit`` in the result names it ("epsilon per
   patient" / "epsilon per record"); a record-level run is audited as before (r = 1).
   Why copies: the copies' gradients point the same way, so the patient's sum spends the whole clipping
   norm C (the most one patient may move a step) on one input, where r distinct inputs split it. Measured
   (heart disease, 100 records of 50 patients, 200 canary patients, k = r = 4, 40 epochs): at noise
   multiplier 2, copies gave eps_lb 0.06-0.83 (mean 0.38, AUC 0.57-0.70, seeds 0-4) against 0.0-0.24
   (mean 0.12) for 4 distinct OOD records with their own random labels. Without noise distinct records
   separate better (3.6 against 2.5, seeds 0-1: r independent scores averaged), but both then exceed any
   claim by far; what the audit must resolve is the noised training.

``accountant_noise_multiplier`` lets a test train with one noise multiplier (e.g. 0: a broken
mechanism) while the accountant is told another (what the implementation claims), to check that the
audit catches the difference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import nn

from attacks._training import train_model
from attacks.mia import Records, signed_logit, target_logits
from attacks.stats import clopper_pearson  # re-exported: attacks.dp_audit.clopper_pearson
from privacy.accounting import Step, epsilon, resolve_delta
from privacy.plan import DPPlan

__all__ = [
    "clopper_pearson",
    "empirical_epsilon",
    "one_run_epsilon",
    "max_certifiable_epsilon",
    "consistency_status",
    "replay_batch_size",
    "make_canaries",
    "canary_audit",
]

THREAT_MODEL = "black-box final model"


# ----------------------------------------------------------------------------------- statistics


def empirical_epsilon(scores, included, delta: float, confidence: float = 0.95) -> dict:
    """The Clopper-Pearson epsilon lower bound over all thresholds, both directions (module docstring)."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included).astype(bool)
    n_in, n_out = int(b.sum()), int((~b).sum())
    if n_in == 0 or n_out == 0:
        raise ValueError(f"need included and excluded canaries, got {n_in} and {n_out}")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, b_sorted = s[order], b[order]
    cut = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # guess IN for scores >= s_sorted[cut]
    tp = np.r_[0, np.cumsum(b_sorted)[cut]]
    fp = np.r_[0, np.cumsum(~b_sorted)[cut]]
    thresholds = np.r_[np.inf, s_sorted[cut]]
    fn, tn = n_in - tp, n_out - fp
    tpr_lo, _ = clopper_pearson(tp, n_in, confidence)
    _, fpr_hi = clopper_pearson(fp, n_out, confidence)
    tnr_lo, _ = clopper_pearson(tn, n_out, confidence)
    _, fnr_hi = clopper_pearson(fn, n_in, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        e_in = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
        e_out = np.log(np.maximum(tnr_lo - delta, 0.0) / fnr_hi)
    e_in = np.nan_to_num(e_in, nan=-np.inf)
    e_out = np.nan_to_num(e_out, nan=-np.inf)
    i_in, i_out = int(np.argmax(e_in)), int(np.argmax(e_out))
    if e_in[i_in] >= e_out[i_out]:
        best, i, direction = float(e_in[i_in]), i_in, "score >= threshold means included"
    else:
        best, i, direction = float(e_out[i_out]), i_out, "score < threshold means excluded"
    return {
        "eps_lb": max(best, 0.0),
        "threshold": float(thresholds[i]),
        "direction": direction,
        "tpr": float(tp[i] / n_in),
        "fpr": float(fp[i] / n_out),
        "n_included": n_in,
        "n_excluded": n_out,
        "confidence": confidence,
        "delta": delta,
    }


def _one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of v correct guesses out of r under (eps, delta)-DP with m canaries (Steinke et al. 2023)."""
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomised response
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, acc = 0.0, 0.0
    if delta > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v - i) for i = 1..v
        cums = np.cumsum(pmf)
        i = np.arange(1, v + 1)
        alpha = float(np.max(cums / i)) if v else 0.0
        acc = alpha * delta * 2 * m
    return min(beta + acc, 1.0)


def one_run_epsilon(scores, included, delta: float, confidence: float = 0.95, grid: int = 10, seed: int = 0) -> dict:
    """Steinke-Nasr-Jagielski one-run lower bound: best over guessing the top/bottom k (k on a grid)."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included).astype(bool)
    m = len(s)
    # rank by score, ties in random order: a guess must not depend on the canaries' input order
    order = np.lexsort((np.random.default_rng(seed).random(m), -s))
    p = 1.0 - confidence
    best = {"eps_lb": 0.0, "guesses": 0, "correct": 0}
    for k in sorted({max(1, (m // 2) * j // grid) for j in range(1, grid + 1)}):
        top, bottom = order[:k], order[m - k :]  # disjoint: k <= m // 2
        r = 2 * k
        v = int(b[top].sum() + (~b[bottom]).sum())
        lo, hi = 0.0, 1.0
        if _one_run_p_value(m, r, v, 0.0, delta) >= p:
            continue
        while _one_run_p_value(m, r, v, hi, delta) < p and hi < 64:
            lo, hi = hi, hi * 2
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if _one_run_p_value(m, r, v, mid, delta) < p:
                lo = mid
            else:
                hi = mid
        if lo > best["eps_lb"]:
            best = {"eps_lb": lo, "guesses": r, "correct": v}
    return best


def max_certifiable_epsilon(included, delta: float, confidence: float = 0.95) -> dict:
    """The largest lower bound these canaries can give: every guess correct (perfectly separated scores).

    Returns ``{"one_run", "clopper_pearson", "max"}`` for this inclusion draw; a claim above ``max`` cannot
    be refuted by this audit however the training behaves.
    """
    b = np.asarray(included).astype(bool)
    perfect = b.astype(np.float64)
    one = one_run_epsilon(perfect, b, delta, confidence)["eps_lb"]
    cp = empirical_epsilon(perfect, b, delta, confidence)["eps_lb"]
    return {"one_run": one, "clopper_pearson": cp, "max": max(one, cp)}


def consistency_status(lower_bound: float, claimed: float | None, max_certifiable: float | None, what: str = "canaries") -> tuple[str, list[str]]:
    """``(status, reasons)`` of a DP-consistency check (module docstring, step 7).

    ``claimed`` None: no finite DP claim (non-private training, or no noise). ``max_certifiable`` None:
    unknown (no cap is applied).
    """
    if claimed is None:
        return "inconclusive", [
            f"no DP claim to check (no finite accountant epsilon); the lower bound {lower_bound:.3f} shows "
            f"what the training leaks"
        ]
    if lower_bound > claimed:
        return "inconsistent", [
            f"the empirical lower bound {lower_bound:.3f} exceeds the accountant's epsilon {claimed:.3f} by "
            f"{lower_bound - claimed:.3f}: the training leaks more than its accounting claims (a DP bug)"
        ]
    if max_certifiable is not None and claimed > max_certifiable:
        return "inconclusive", [
            f"the claimed epsilon {claimed:.3g} is above the largest epsilon {max_certifiable:.3g} that "
            f"{what} can certify, so this audit could not have caught a violation"
        ]
    return "consistent", [
        f"the lower bound {lower_bound:.3f} is at most the accountant's epsilon {claimed:.3f}, which "
        f"{what} could have refuted (they certify up to {max_certifiable:.3g})"
        if max_certifiable is not None else
        f"the lower bound {lower_bound:.3f} is at most the accountant's epsilon {claimed:.3f}"
    ]


def replay_batch_size(n: int, sample_rate: float) -> int:
    """The batch size whose Poisson rate 1/ceil(n/b) on ``n`` records is closest to ``sample_rate``.

    Ties go to the higher rate (the replay must not be more subsampled, so more private, than the
    hospital's training).
    """
    if n < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"need n >= 1 and a sample rate in (0, 1], got {n} and {sample_rate!r}")
    rates = 1.0 / np.ceil(n / np.arange(1, n + 1))
    gap = np.abs(rates - sample_rate) - 1e-12 * rates  # the tie-break: higher rate first
    return int(np.argmin(gap)) + 1


# ----------------------------------------------------------------------------------- canaries


def make_canaries(like: Records, m: int, kind: str = "ood", seed: int = 0, pool: Records | None = None) -> Records:
    """``m`` canaries shaped like ``like``'s records (see module docstring). Ids are -1, -2, ..."""
    rng = np.random.default_rng(seed)
    ids = -np.arange(1, m + 1)
    if kind == "flip":
        if pool is None or len(pool) < m:
            raise ValueError(f"'flip' canaries need {m} held-out records; got {0 if pool is None else len(pool)}")
        pick = rng.choice(len(pool), m, replace=False)
        return Records(pool.x[pick].copy(), 1 - pool.y[pick], ids)
    if kind != "ood":
        raise ValueError(f"canary kind must be 'ood' or 'flip', got {kind!r}")
    x = like.x
    y = rng.integers(0, 2, m)
    if x.dtype == np.int64:  # token ids: random token sequences of the same length
        hi = max(int(x.max()), 2)
        return Records(rng.integers(1, hi + 1, size=(m,) + x.shape[1:]).astype(np.int64), y, ids)
    flat = x.reshape(len(x), -1).astype(np.float64)
    mu, sd = flat.mean(axis=0), flat.std(axis=0)
    sd = np.maximum(sd, 0.1 * max(float(sd.mean()), 1e-3))
    c = mu + 4.0 * sd * rng.standard_normal((m, flat.shape[1]))
    return Records(c.reshape((m,) + x.shape[1:]).astype(np.float32), y, ids)


def canary_audit(
    train: Records,
    make_model: Callable[[int], nn.Module],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    dp: DPPlan | None,
    max_grad_norm: float = 1.0,
    canaries: int = 100,
    kind: str = "ood",
    trials: int = 1,
    pool: Records | None = None,
    accountant_noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    claimed_epsilon: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    desc: str = "canary audit",
    groups: np.ndarray | None = None,
    records_per_canary: int | None = None,
) -> dict:
    """Insert canaries into ``train``, train (``trials`` times), score them, and bound epsilon from below.

    ``make_model(seed)`` returns a fresh module x -> one logit; ``max_grad_norm`` is the global-norm
    clipping of non-private training (DP training clips per sample at ``dp.max_grad_norm``). ``trials`` = 1 is one-run auditing;
    more trials pool fresh inclusion draws over repeated trainings. ``sample_rate``: replay at the
    hospital's Poisson rate (the batch size is chosen by :func:`replay_batch_size`; default: the rate
    ``batch_size`` gives). ``claimed_epsilon``: the epsilon to check (the ledger's whole-run epsilon;
    default: the accountant's for this replay). Returns a JSON-ready dict (module docstring, 6-7).

    With ``dp.privacy_unit == "patient"`` the canaries are patients (module docstring, 8): ``groups`` is the patient
    of each record of ``train`` (default: each record its own patient), ``records_per_canary`` the records of
    one canary patient (default ``dp.max_records_per_patient_step``), ``batch_size`` and ``sample_rate``
    count patients, and the bound is per patient. Both are ignored for a record-level (or non-private) run.
    """
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    t0 = time.perf_counter()
    # the inclusion draws must not share make_canaries' stream: default_rng(seed).integers(0, 2) and
    # default_rng(seed).random() read the same words, and label 2i+1 was exactly 1 - (canary i included)
    rng = np.random.default_rng([seed, 1])
    unit = dp.privacy_unit if dp is not None else "record"
    cs = _canary_set(train, canaries, kind, seed, pool, dp, unit, groups, records_per_canary)
    replay = _replay_trainings(
        train, cs, make_model, rng, trials=trials, progress=progress, desc=desc, batch_size=batch_size,
        sample_rate=sample_rate, seed=seed, epochs=epochs, lr=lr,
        max_grad_norm=dp.max_grad_norm if dp else max_grad_norm, dp=dp,
    )
    scores, included = np.concatenate(replay.scores), np.concatenate(replay.included)
    delta = replay.delta
    if delta is None:
        delta = resolve_delta(dp.delta if dp else None, cs.n_units + canaries // 2)
    out = _canary_result(train, cs, replay, scores, included, delta, unit=unit, kind=kind, trials=trials, dp=dp,
                         epochs=epochs, sample_rate=sample_rate, confidence=confidence)
    _add_one_run_and_certifiable(out, scores, included, replay.included[0], delta, confidence, trials)
    _check_claim(out, cs, replay, delta, dp=dp, trials=trials, claimed_epsilon=claimed_epsilon,
                 accountant_noise_multiplier=accountant_noise_multiplier)
    out["seconds"] = time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class _CanarySet:
    """The canaries of one audit (module docstring, 1 and 8) and the units of the training set they join."""

    count: int
    r: int  # records per canary (copies of one canary record; 1 for a record-level run)
    owner: np.ndarray  # the canary (patient) of each canary record
    records: Records  # r copies of each canary's record
    patients: np.ndarray | None  # the patient of each training record (patient-level runs only)
    ids: np.ndarray | None  # the canary patients' ids (patient-level runs only)
    n_units: int  # training records, or training patients


@dataclass
class _Replay:
    """What the replayed trainings gave: each training's canary scores and inclusion draw, and their steps."""

    scores: list[np.ndarray]
    included: list[np.ndarray]
    steps: int  # over all trainings
    observed_rate: float  # the largest sample rate a training used
    delta: float | None
    batch: int | None  # the last training's batch size


def _canary_set(train: Records, canaries: int, kind: str, seed: int, pool: Records | None, dp: DPPlan | None,
                unit: str, groups: np.ndarray | None, records_per_canary: int | None) -> _CanarySet:
    r, patients, canary_ids = 1, None, None
    if unit == "patient":
        r = dp.max_records_per_patient_step if records_per_canary is None else records_per_canary
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"records per canary patient must be an integer >= 1, got {r!r}")
        patients = np.arange(len(train)).astype(str) if groups is None else np.asarray(groups).astype(str)
        if len(patients) != len(train):
            raise ValueError(f"groups must hold one patient id per training record: got {len(patients)} for {len(train)}")
        canary_ids = np.char.add("canary-patient-", np.arange(canaries).astype(str))
        if np.isin(canary_ids, patients).any():
            raise ValueError("a training record's patient id collides with a canary patient's id ('canary-patient-<j>')")
    owner = np.repeat(np.arange(canaries), r)
    records = make_canaries(train, canaries, kind, seed=seed, pool=pool).take(owner)
    n_units = len(train) if patients is None else len(np.unique(patients))
    return _CanarySet(canaries, r, owner, records, patients, canary_ids, n_units)


def _replay_trainings(train: Records, cs: _CanarySet, make_model: Callable[[int], nn.Module], rng: np.random.Generator,
                      *, trials: int, progress: bool, desc: str, batch_size: int, sample_rate: float | None, seed: int,
                      **train_kw) -> _Replay:
    """Train ``trials`` times, each on ``train`` plus a fresh half of the canaries, and score every canary."""
    replay = _Replay([], [], 0, 0.0, None, None)
    it = range(trials)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    for t in it:
        inc = _draw_inclusion(rng, cs.count)
        rows = np.flatnonzero(inc[cs.owner])  # a canary patient's records are all in, or all out
        data = Records.concat([train, cs.records.take(rows)])
        data_groups = None if cs.patients is None else np.concatenate([cs.patients, cs.ids[cs.owner[rows]]])
        units = len(data) if cs.patients is None else cs.n_units + int(inc.sum())
        replay.batch = batch_size if sample_rate is None else replay_batch_size(units, sample_rate)
        model, stats, d = train_model(make_model, data.x, data.y, batch_size=replay.batch, seed=seed * 1000 + t,
                                      groups=data_groups, **train_kw)
        replay.delta = d if d is not None else replay.delta
        replay.steps += int(stats["steps"])
        replay.observed_rate = max(replay.observed_rate, float(stats["sample_rate"]))
        per_record = signed_logit(target_logits(model, cs.records.x), cs.records.y)
        replay.scores.append(np.bincount(cs.owner, weights=per_record, minlength=cs.count) / cs.r)  # mean per canary (patient)
        replay.included.append(inc)
    return replay


def _draw_inclusion(rng: np.random.Generator, canaries: int) -> np.ndarray:
    """Each canary in with probability 1/2; never all in or all out."""
    inc = rng.random(canaries) < 0.5
    if inc.all() or not inc.any():
        inc[0] = not inc[0]
    return inc


def _canary_result(train: Records, cs: _CanarySet, replay: _Replay, scores: np.ndarray, included: np.ndarray,
                   delta: float, *, unit: str, kind: str, trials: int, dp: DPPlan | None, epochs: int,
                   sample_rate: float | None, confidence: float) -> dict:
    """The result's set-up and Clopper-Pearson bound (module docstring, 5)."""
    from attacks.metrics import roc_auc

    bound = empirical_epsilon(scores, included, delta, confidence)
    return {
        "threat_model": THREAT_MODEL,
        "privacy_unit": unit,
        "epsilon_unit": f"epsilon per {unit}",  # what eps_lb and the claim it is checked against protect
        "canaries": cs.count,
        "canary_unit": unit,  # a canary is one record, or one patient of records_per_canary records
        "records_per_canary": cs.r,
        "kind": kind,
        "mode": "one_run" if trials == 1 else "repeated",
        "trials": trials,
        "training_records": len(train),
        "training_patients": None if cs.patients is None else cs.n_units,
        "dp": dp is not None,
        "noise_multiplier": None if dp is None else dp.noise_multiplier,
        "max_grad_norm": None if dp is None else dp.max_grad_norm,
        "accountant": None if dp is None else dp.accountant,
        "epochs": epochs,
        "batch_size": replay.batch,
        "steps_per_training": replay.steps // trials,
        "sample_rate": replay.observed_rate,
        "sample_rate_requested": sample_rate,
        "delta": delta,
        "confidence": confidence,
        "canary_auc": roc_auc(scores, included.astype(np.int64)),
        **{k: bound[k] for k in ("eps_lb", "threshold", "direction", "tpr", "fpr", "n_included", "n_excluded")},
    }


def _add_one_run_and_certifiable(out: dict, scores: np.ndarray, included: np.ndarray, first_in: np.ndarray,
                                 delta: float, confidence: float, trials: int) -> None:
    """The one-run bound (one training only) and the largest epsilon these canaries can certify (module docstring, 5, 7)."""
    cap = max_certifiable_epsilon(first_in, delta, confidence) if trials == 1 else {
        "one_run": None, "clopper_pearson": max_certifiable_epsilon(included, delta, confidence)["clopper_pearson"]}
    if trials == 1:
        one = one_run_epsilon(scores, included, delta, confidence)
        out["eps_lb_one_run"] = one["eps_lb"]
        out["one_run_guesses"], out["one_run_correct"] = one["guesses"], one["correct"]
    out["max_certifiable_epsilon"] = max(v for v in (cap["one_run"], cap["clopper_pearson"]) if v is not None)
    out["max_certifiable_one_run"], out["max_certifiable_clopper_pearson"] = cap["one_run"], cap["clopper_pearson"]


def _check_claim(out: dict, cs: _CanarySet, replay: _Replay, delta: float, *, dp: DPPlan | None, trials: int,
                 claimed_epsilon: float | None, accountant_noise_multiplier: float | None) -> None:
    """The claim the lower bounds are checked against, and the verdict (module docstring, 6-7)."""
    claimed_sigma = accountant_noise_multiplier if accountant_noise_multiplier is not None else (dp.noise_multiplier if dp else None)
    out["accountant_noise_multiplier"] = claimed_sigma
    eps_replay = None
    if dp is not None:
        # one training's steps; repeated trials are independent trainings, each with this guarantee
        e = epsilon([Step(float(claimed_sigma), replay.observed_rate, replay.steps // trials)], delta, dp.accountant)
        eps_replay = e if math.isfinite(e) else None
    claim = None if dp is None else (claimed_epsilon if claimed_epsilon is not None else eps_replay)
    lb = max(out["eps_lb"], out.get("eps_lb_one_run", 0.0))
    out["eps_accountant_replay"] = eps_replay
    out["accountant_epsilon"] = out["eps_accountant"] = claim
    out["ratio"] = lb / claim if claim else None
    what = f"{cs.count} canaries" if cs.patients is None else f"{cs.count} canary patients ({cs.r} records each)"
    out["status"], out["reasons"] = consistency_status(lb, claim, out["max_certifiable_epsilon"], what)
    out["consistent_with_accountant"] = None if claim is None else out["status"] != "inconsistent"
    if dp is None:
        out["note"] = "n/a (non-private): no accountant claim to check; eps_lb shows what the training leaks"
    elif out["status"] == "inconsistent":
        out["note"] = f"DP BUG: {out['reasons'][0]} (noise multiplier {claimed_sigma})"
