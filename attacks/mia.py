"""Membership inference against one task path of a released model (a module x -> one logit).

Attacks, weakest to strongest:

* ``loss``: Yeom et al. (2018) threshold attack; score = -BCE loss of the record under the target.
* ``lira_online`` / ``lira_offline``: LiRA (Carlini et al. 2022). Per record, fit Gaussians to the
  logit-scaled confidence phi = log(p / (1 - p)) of the true label under reference models trained with
  (IN) and without (OUT) the record; score = log N(phi_target; IN) - log N(phi_target; OUT) online, and
  the one-sided log Pr[Z < phi_target], Z ~ N(OUT), offline. For a binary head with logit z and label y,
  phi is exactly (2y - 1) z, so it is computed without rounding a probability.
  With few references the variance is pooled over records (Carlini et al. fix the variance below 64
  reference models); per-record variances are used from ``per_record_variance_min`` references per side.
* ``rmia`` / ``rmia_offline``: RMIA (Zarifzadeh et al. 2024). Pr(x|theta) = probability of the true
  label; Pr(x) = its mean over reference models (online: all of them, so half IN and half OUT;
  offline: the OUT ones, corrected as (1/2)((1 + a) Pr_OUT(x) + (1 - a))). LR(x, z) =
  (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z)) for population records z; score(x) = the fraction of
  z with LR(x, z) >= gamma.

Who sees what (the auditor's knowledge, stated in every result):

* the target model's outputs (logits) on the records it queries (black-box, logit access);
* the candidate records whose membership is in question: the members (the hospital's training shard, or
  every shard for the aggregated model) and as many non-members (held-out test records of the same
  task), balanced; the candidates' identity as member/non-member is used only for scoring the attack;
* population data it may hold: the server's public split and the half of the test split that is not
  used as non-members (nothing from any hospital's shard);
* the architecture and training hyperparameters (from the run's config).

The auditor-controlled game (:func:`auditor_game`, as in LiRA's own experiments, Carlini et al. 2022,
Sec. V): the auditor trains K models with the target's recipe, each on a random half of a hospital's
candidate records (each record IN for exactly K/2), and plays every model as the target in turn, with the
other K - 1 as its reference models (LiRA online). Membership is the auditor's own coin, so members and
non-members come from the same distribution by construction, and the K x n (model, record) pairs give
K x n / 2 non-member pairs: TPR at 0.1% FPR becomes measurable on a shard of a few hundred records. The
figure is about the hospital's training recipe on its own kind of records, not about the released model.
Pairs share records and models, so the intervals, which treat pairs as independent, are approximate.

Reference models (``online`` mode): K models of the target's architecture, each trained on a random half
of the candidates (each candidate is IN for exactly K/2 of them, as in Carlini et al.'s code), topped up
with population records to the target's training-set size. All five attacks come from this one set;
the offline variants use only each record's OUT models. ``offline`` mode trains each reference on
population records only (each on a random half of the population, at most the target's training-set
size), for an auditor that may not train on the candidates; ``lira_online`` and ``rmia`` are then
skipped, with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from attacks._training import train_model
from attacks.stats import clopper_pearson
from privacy.plan import DPPlan
from secure_fedkim.hospital.training import as_tensors

__all__ = [
    "ATTACKS",
    "MIA_ATTACKS",
    "AttackSpec",
    "Records",
    "ReferenceTraining",
    "ReferenceSet",
    "MIAResult",
    "target_logits",
    "signed_logit",
    "train_references",
    "loss_scores",
    "lira_scores",
    "rmia_scores",
    "membership_inference",
    "auditor_game",
    "game_auc_interval",
    "game_scores",
    "game_models_needed",
]


@dataclass(frozen=True)
class AttackSpec:
    """One membership-inference attack: which score it computes and what it needs."""

    kind: str  # "loss" (the target alone), "lira" or "rmia" (scored against reference models)
    online: bool = False  # needs reference models trained on the candidates (reference_mode 'online')

    @property
    def needs_references(self) -> bool:
        return self.kind != "loss"


MIA_ATTACKS: dict[str, AttackSpec] = {  # the attack names (config, output), in the order they are reported
    "loss": AttackSpec("loss"),
    "lira_online": AttackSpec("lira", online=True),
    "lira_offline": AttackSpec("lira"),
    "rmia": AttackSpec("rmia", online=True),
    "rmia_offline": AttackSpec("rmia"),
}
ATTACKS = tuple(MIA_ATTACKS)
_MIN_STD = 1e-3


@dataclass
class Records:
    """Records as the auditor holds them: inputs, binary labels and opaque ids (never written out)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None = None

    def __post_init__(self):
        self.y = np.asarray(self.y).astype(np.int64)
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} records but y has {len(self.y)}")
        if self.ids is None:
            self.ids = np.arange(len(self.y))

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx) -> "Records":
        idx = np.asarray(idx, dtype=np.int64)
        return Records(self.x[idx], self.y[idx], self.ids[idx])

    @staticmethod
    def concat(parts: Sequence["Records"]) -> "Records":
        parts = [p for p in parts if len(p)]
        return Records(
            np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
            np.concatenate([p.ids for p in parts]),
        )


@dataclass
class ReferenceTraining:
    """How the auditor trains a reference model: the target's architecture and hyperparameters.

    Attributes:
        make_model: ``make_model(seed)`` returns a fresh module x -> one logit (independently initialised
            from ``seed``; LiRA's reference models differ in initialisation as well as in data).
        train_size: records per reference training set (the target's training-set size).
        epochs, batch_size, lr, max_grad_norm: passed to :func:`secure_fedkim.hospital.training.train_task`.
        dp: train the references with DP-SGD like the target (None: plain training); Opacus with the
            same noise, clip and Poisson sampling, not accounted (they are the auditor's own models).
    """

    make_model: Callable[[int], nn.Module]
    train_size: int
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    dp: DPPlan | None = None

    def train(self, x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
        model, _, _ = train_model(
            self.make_model, x, y, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            max_grad_norm=self.max_grad_norm, dp=self.dp, seed=seed, accounted=False,
        )
        return model


@torch.no_grad()
def target_logits(model: Callable, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The model's logits on ``x`` (a module or any callable tensor -> logits), float64."""
    if isinstance(model, nn.Module):
        model.eval()
    ds = as_tensors(x, np.zeros(len(x)))
    out = [model(ds.tensors[0][i : i + batch_size]).reshape(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def signed_logit(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """phi = log(p / (1 - p)) for p = probability of the true label: (2y - 1) * logit."""
    return (2.0 * np.asarray(y) - 1.0) * np.asarray(logits, dtype=np.float64)


def _log_sigmoid(v: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -v)


@dataclass
class ReferenceSet:
    """Signed logits of K reference models on the candidates and the population, with IN masks."""

    mode: str  # "online" or "offline"
    phi_candidates: np.ndarray  # [K, n_candidates]
    phi_population: np.ndarray  # [K, n_population]
    in_candidates: np.ndarray  # [K, n_candidates] bool
    in_population: np.ndarray  # [K, n_population] bool
    train_seconds: float = 0.0

    @property
    def k(self) -> int:
        return int(self.phi_candidates.shape[0])


def _balanced_masks(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[k, n] bool: each column has exactly k/2 True, placed at random (Carlini et al.'s keep matrix)."""
    order = rng.random((k, n)).argsort(axis=0)
    return order < k // 2


def train_references(
    candidates: Records,
    population: Records,
    training: ReferenceTraining,
    k: int,
    mode: str = "online",
    seed: int = 0,
    progress: bool = False,
    desc: str = "reference models",
) -> ReferenceSet:
    """Train ``k`` reference models and record their signed logits on candidates and population.

    ``online``: k must be even and >= 2; each candidate is IN for exactly k/2 models; each training set is
    that half of the candidates topped up with random population records to ``training.train_size``.
    ``offline``: each model trains on a random half of the population (at most ``train_size`` records).
    """
    if mode not in ("online", "offline"):
        raise ValueError(f"reference mode must be 'online' or 'offline', got {mode!r}")
    if mode == "online" and (k < 2 or k % 2):
        raise ValueError(
            f"online reference models need an even number >= 2 (half IN, half OUT per record), got {k}; "
            f"use reference_mode 'offline' for a single reference model"
        )
    if k < 1:
        raise ValueError(f"need at least one reference model, got {k}")
    rng = np.random.default_rng(seed)
    n_c, n_p = len(candidates), len(population)
    if mode == "online":
        in_c = _balanced_masks(k, n_c, rng)
    else:
        in_c = np.zeros((k, n_c), dtype=bool)
        if n_p < 2:
            raise ValueError(f"offline reference models need population data; the auditor holds {n_p} records")
    in_p = np.zeros((k, n_p), dtype=bool)
    phi_c = np.zeros((k, n_c))
    phi_p = np.zeros((k, n_p))
    both = Records.concat([candidates, population])
    t0 = time.perf_counter()
    it = range(k)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    for j in it:
        if mode == "online":
            fill = max(0, training.train_size - int(in_c[j].sum()))
        else:
            fill = min(training.train_size, max(1, n_p // 2))
        pick = rng.choice(n_p, size=min(fill, n_p), replace=False) if fill and n_p else np.zeros(0, np.int64)
        in_p[j, pick] = True
        train = Records.concat([candidates.take(np.flatnonzero(in_c[j])), population.take(np.flatnonzero(in_p[j]))])
        model = training.train(train.x, train.y, seed=int(rng.integers(2**31 - 1)))
        phi = signed_logit(target_logits(model, both.x), both.y)
        phi_c[j], phi_p[j] = phi[:n_c], phi[n_c:]
    return ReferenceSet(mode, phi_c, phi_p, in_c, in_p, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- scores


def loss_scores(phi_target: np.ndarray) -> np.ndarray:
    """Yeom et al.: -BCE = log Pr(true label) = log sigmoid(phi)."""
    return _log_sigmoid(np.asarray(phi_target, dtype=np.float64))


def _masked_mean_std(phi: np.ndarray, mask: np.ndarray, min_per_record: int) -> tuple[np.ndarray, np.ndarray | float, str]:
    """Per-record mean over the masked references; per-record std if every record has at least
    ``min_per_record`` of them, else a std pooled over records (within-record deviations when records
    have >= 2 references, the global std of all values otherwise, as Carlini et al.'s fixed variance)."""
    cnt = mask.sum(axis=0)
    if (cnt == 0).any():
        raise ValueError(f"{int((cnt == 0).sum())} records have no reference model on this side")
    mean = np.where(mask, phi, 0.0).sum(axis=0) / cnt
    dev = np.where(mask, phi - mean, 0.0)
    if cnt.min() >= max(min_per_record, 2):
        std = np.sqrt((dev**2).sum(axis=0) / (cnt - 1))
        return mean, np.maximum(std, _MIN_STD), "per-record"
    if (cnt >= 2).all():
        pooled = math.sqrt(float((dev**2).sum()) / float((cnt - 1).sum()))
        return mean, max(pooled, _MIN_STD), "pooled within-record"
    return mean, max(float(phi[mask].std()), _MIN_STD), "global"


def lira_scores(phi_target: np.ndarray, refs: ReferenceSet, online: bool, per_record_variance_min: int = 32) -> tuple[np.ndarray, str]:
    """LiRA scores for the candidates and the variance mode used."""
    from scipy.stats import norm

    out_mask = ~refs.in_candidates
    mu_out, sd_out, how = _masked_mean_std(refs.phi_candidates, out_mask, per_record_variance_min)
    if not online:
        return norm.logcdf((phi_target - mu_out) / sd_out), how
    mu_in, sd_in, how_in = _masked_mean_std(refs.phi_candidates, refs.in_candidates, per_record_variance_min)
    score = norm.logpdf(phi_target, mu_in, sd_in) - norm.logpdf(phi_target, mu_out, sd_out)
    return score, how if how == how_in else f"{how_in} (IN), {how} (OUT)"


def _rmia_marginal(phi: np.ndarray, in_mask: np.ndarray, online: bool, a: float) -> np.ndarray:
    """Pr(x) over the reference models: the mean of all (online) or the a-corrected OUT mean (offline)."""
    p = 1.0 / (1.0 + np.exp(-phi))
    if online:
        return p.mean(axis=0)
    out = ~in_mask
    cnt = out.sum(axis=0)
    mean_out = np.where(cnt > 0, np.where(out, p, 0.0).sum(axis=0) / np.maximum(cnt, 1), p.mean(axis=0))
    return 0.5 * ((1.0 + a) * mean_out + (1.0 - a))


def rmia_scores(
    phi_target_candidates: np.ndarray,
    phi_target_population: np.ndarray,
    refs: ReferenceSet,
    online: bool,
    gamma: float = 1.0,
    a: float = 0.3,
) -> np.ndarray:
    """RMIA: for each candidate x, the fraction of population z with LR(x, z) >= gamma.

    Ties between candidates with the same fraction are broken by the mean log LR over z (a strictly
    monotone refinement, so the ROC only gains resolution; documented deviation from the paper).
    """
    if len(phi_target_population) == 0:
        raise ValueError("RMIA needs population records (z samples); the auditor holds none")
    if not gamma > 0:
        raise ValueError(f"RMIA gamma must be > 0, got {gamma!r}")
    if not 0 <= a <= 1:
        raise ValueError(f"RMIA offline a must be in [0, 1], got {a!r}")
    px = _rmia_marginal(refs.phi_candidates, refs.in_candidates, online, a)
    pz = _rmia_marginal(refs.phi_population, refs.in_population, online, a)
    log_rx = _log_sigmoid(phi_target_candidates) - np.log(px)
    log_rz = _log_sigmoid(phi_target_population) - np.log(pz)
    log_lr = log_rx[:, None] - log_rz[None, :]  # [n_candidates, n_z]
    frac = (log_lr >= math.log(gamma)).mean(axis=1)
    tiebreak = log_lr.mean(axis=1)
    # fraction is on a grid of 1/n_z; squeeze the tie-break into less than one grid step
    squash = (np.arctan(tiebreak) / math.pi + 0.5) / (len(phi_target_population) + 1)
    return frac + squash


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class MIAResult:
    """Scores of each attack on the balanced candidates (labels 1 = member) and what was skipped."""

    labels: np.ndarray
    member_ids: np.ndarray  # opaque ids of the members, in the order of scores[attack][labels == 1]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def metrics(self, fprs=(0.01, 0.001), top_k: int = 10, n_boot: int = 200, seed: int = 0) -> dict:
        from attacks.metrics import attack_metrics

        return {
            a: attack_metrics(a, s, self.labels, fprs, self.member_ids, top_k, n_boot=n_boot, seed=seed)
            for a, s in self.scores.items()
        }


def balance(members: Records, nonmembers: Records, max_records: int | None, seed: int) -> tuple[Records, Records]:
    """Equal numbers of members and non-members (at most ``max_records`` each), drawn at random."""
    n = min(len(members), len(nonmembers), max_records or 10**12)
    if n < 1:
        raise ValueError(f"need members and non-members, got {len(members)} and {len(nonmembers)}")
    rng = np.random.default_rng(seed)
    return (
        members.take(np.sort(rng.choice(len(members), n, replace=False))),
        nonmembers.take(np.sort(rng.choice(len(nonmembers), n, replace=False))),
    )


def membership_inference(
    target: Callable,
    members: Records,
    nonmembers: Records,
    population: Records,
    training: ReferenceTraining | None,
    *,
    attacks: Sequence[str] = ATTACKS,
    num_references: int = 8,
    reference_mode: str = "online",
    rmia_gamma: float = 1.0,
    rmia_offline_a: float = 0.3,
    per_record_variance_min: int = 32,
    max_records: int | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "reference models",
    references: ReferenceSet | None = None,
) -> MIAResult:
    """Run the requested attacks against ``target`` (module x -> logit) for one task.

    ``members``/``nonmembers`` are balanced here (equal counts, at most ``max_records`` each).
    ``training`` may be None when only ``loss`` is requested. ``references``: a reference set already
    trained (by :func:`train_references`) on these same balanced candidates, members first, and this
    population, to score several targets against one set; ``num_references`` and ``reference_mode``
    then come from it.
    """
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {list(ATTACKS)}")
    members, nonmembers = balance(members, nonmembers, max_records, seed)
    cand = Records.concat([members, nonmembers])
    labels = np.r_[np.ones(len(members), np.int64), np.zeros(len(nonmembers), np.int64)]
    res = MIAResult(labels=labels, member_ids=members.ids.copy())
    t0 = time.perf_counter()
    phi_c = signed_logit(target_logits(target, cand.x), cand.y)
    phi_p = signed_logit(target_logits(target, population.x), population.y) if len(population) else np.zeros(0)
    res.details.update(
        n_members=len(members), n_nonmembers=len(nonmembers), n_population=len(population),
        reference_mode=reference_mode, num_references=0,
    )
    for a in attacks:
        if MIA_ATTACKS[a].kind == "loss":
            res.scores[a] = loss_scores(phi_c)
    ref_attacks = [a for a in attacks if MIA_ATTACKS[a].needs_references]
    if ref_attacks:
        if training is None:
            raise ValueError(f"attacks {ref_attacks} need reference models: give `training`")
        if references is not None:
            reference_mode = references.mode
            res.details["reference_mode"] = reference_mode
        if reference_mode == "offline":
            ref_attacks = _skip_online_attacks(res, ref_attacks)
        refs = _reference_set(cand, population, training, references, num_references, reference_mode, seed + 1,
                              progress, desc)
        res.details.update(num_references=refs.k, reference_train_seconds=refs.train_seconds)
        _score_with_references(res, ref_attacks, phi_c, phi_p, refs, len(population), rmia_gamma=rmia_gamma,
                               rmia_offline_a=rmia_offline_a, per_record_variance_min=per_record_variance_min)
    res.details["seconds"] = time.perf_counter() - t0
    res.scores = {a: res.scores[a] for a in attacks if a in res.scores}
    return res


def _skip_online_attacks(res: MIAResult, ref_attacks: list[str]) -> list[str]:
    """The attacks offline references can run; the online ones are recorded as skipped, with why."""
    for a in ref_attacks:
        if MIA_ATTACKS[a].online:
            res.skipped[a] = "needs reference models trained on the candidates (reference_mode 'online')"
    return [a for a in ref_attacks if not MIA_ATTACKS[a].online]


def _reference_set(cand: Records, population: Records, training: ReferenceTraining, references: ReferenceSet | None,
                   num_references: int, reference_mode: str, seed: int, progress: bool, desc: str) -> ReferenceSet:
    """``references`` when given (checked against these candidates and population), else freshly trained ones."""
    if references is None:
        return train_references(cand, population, training, num_references, reference_mode, seed, progress, desc)
    if references.phi_candidates.shape[1] != len(cand) or references.phi_population.shape[1] != len(population):
        raise ValueError(
            f"the reference set was trained for {references.phi_candidates.shape[1]} candidates and "
            f"{references.phi_population.shape[1]} population records, not {len(cand)} and {len(population)}"
        )
    return references


def _score_with_references(res: MIAResult, ref_attacks: list[str], phi_c: np.ndarray, phi_p: np.ndarray,
                           refs: ReferenceSet, n_population: int, *, rmia_gamma: float, rmia_offline_a: float,
                           per_record_variance_min: int) -> None:
    """LiRA and RMIA scores of the candidates into ``res`` (RMIA is skipped without population records)."""
    for a in ref_attacks:
        spec = MIA_ATTACKS[a]
        if spec.kind == "lira":
            res.scores[a], how = lira_scores(phi_c, refs, online=spec.online, per_record_variance_min=per_record_variance_min)
            res.details[f"{a}_variance"] = how
        elif spec.kind == "rmia":
            if not n_population:
                res.skipped[a] = "needs population records (z samples); the auditor holds none"
                continue
            res.scores[a] = rmia_scores(phi_c, phi_p, refs, online=spec.online, gamma=rmia_gamma, a=rmia_offline_a)
        else:
            raise ValueError(f"attack {a!r}: no scoring for kind {spec.kind!r}")


# ---------------------------------------------------------------------------------------------- game


def game_models_needed(n_candidates: int, min_nonmember_pairs: int, min_models: int, max_models: int) -> int:
    """Models for the auditor game: enough that K x n / 2 >= ``min_nonmember_pairs``, even, in
    [max(min_models, 4), max_models] (each record needs IN and OUT references besides the target)."""
    k = max(min_models, 4, math.ceil(2 * min_nonmember_pairs / max(n_candidates, 1)))
    k = min(k + k % 2, max_models - max_models % 2)
    if k < 4:
        raise ValueError(f"the auditor game needs at least 4 models (an even number), got max_models {max_models}")
    return k


def game_scores(refs: ReferenceSet, seed: int, per_record_variance_min: int = 32) -> tuple[np.ndarray, np.ndarray, str]:
    """LiRA online scores of the game: every model j of ``refs`` played as the target against the other k - 1.

    Returns scores and labels as [k, n] arrays (label 1: record i was in model j's training set) and the variance
    mode used. Score = log N(phi_j; IN) - log N(phi_j; OUT), the IN and OUT Gaussians of each record fitted on the
    other models (Carlini et al. 2022, online LiRA): higher means "member".
    """
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    k, n = refs.phi_candidates.shape
    scores, labels, how = np.empty((k, n)), np.empty((k, n), np.int64), ""
    for j in range(k):
        others = np.arange(k) != j
        phi, in_o, target_in = refs.phi_candidates[others], refs.in_candidates[others], refs.in_candidates[j]
        # Without model j, a record has k/2 - 1 references on j's side and k/2 on the other; a mean over
        # fewer models sits farther from phi_j, which biases members' scores down (AUC ~0.33 with no signal
        # at k = 4). Drop one random model of the larger side per record: k/2 - 1 on each side.
        larger = np.where(target_in, ~in_o, in_o)
        drop = (rng.random(larger.shape) * larger).argmax(axis=0)
        keep = np.ones_like(in_o)
        keep[drop, np.arange(n)] = False
        mu_in, sd_in, how = _masked_mean_std(phi, in_o & keep, per_record_variance_min)
        mu_out, sd_out, _ = _masked_mean_std(phi, ~in_o & keep, per_record_variance_min)
        phi_j = refs.phi_candidates[j]
        scores[j] = norm.logpdf(phi_j, mu_in, sd_in) - norm.logpdf(phi_j, mu_out, sd_out)
        labels[j] = target_in
    return scores, labels, how


def _weighted_auc(group: np.ndarray, pos: np.ndarray, w: np.ndarray) -> float:
    """The AUC of pairs whose scores fall in the ordered groups ``group`` (tied scores share a group and count 1/2),
    ``pos`` 1 for members, pair weights ``w``."""
    p = np.bincount(group, weights=w * pos)
    q = np.bincount(group, weights=w * (1.0 - pos))
    denom = p.sum() * q.sum()
    return float((p * (np.cumsum(q) - 0.5 * q)).sum() / denom) if denom > 0 else float("nan")


def game_auc_interval(scores: np.ndarray, labels: np.ndarray, n_boot: int = 200, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """The game's AUC interval by a two-way (pigeonhole) bootstrap over its models and its records.

    ``scores`` and ``labels`` are [k, n] (:func:`game_scores`). The K x n (model, record) pairs are not independent:
    a model's pairs share its training run, and every model is a reference of every other target; a record's pairs
    share the record. Resampling the pairs as if independent (:func:`attacks.metrics.bootstrap_auc_ci`, what the
    game reported before) gave intervals too narrow for the game's own variability: on hungary's heart_disease shard
    of the demo at its DP noise (205 records, 10 models), 17 games with fresh models gave AUCs 0.459-0.535 (mean
    0.504, sd 0.019) while each such interval was about +-0.024 (se 0.012), and 3 of the 17 lay wholly below or above
    0.5 with no signal to find. Each replicate here draws k models and n records with replacement and weighs each
    pair by (times its model was drawn) x (times its record was drawn): on those 17 games its se was 0.023 and no
    interval left out 0.5; on 30 games of a random heart_disease subset (sd 0.013 over games, where the pair interval
    was right) it was 0.024, so it is conservative there. Returns auc, auc_ci, auc_se and p_value (one-sided,
    "AUC <= 0.5", from the normal approximation with that standard error).
    """
    from scipy.stats import norm

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores and labels must both be [models, records], got {s.shape} and {y.shape}")
    k, n = s.shape
    _, group = np.unique(s.reshape(-1), return_inverse=True)
    group, pos = group.reshape(-1), y.reshape(-1)
    auc = _weighted_auc(group, pos, np.ones(k * n))
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        wm = np.bincount(rng.integers(k, size=k), minlength=k).astype(np.float64)
        wr = np.bincount(rng.integers(n, size=n), minlength=n).astype(np.float64)
        boots[b] = _weighted_auc(group, pos, np.outer(wm, wr).reshape(-1))
    boots = boots[np.isfinite(boots)]
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    se = float(boots.std(ddof=1)) if len(boots) > 1 else float("nan")
    p_value = float(norm.sf((auc - 0.5) / se)) if se > 0 else float(auc <= 0.5)
    return {"auc": auc, "auc_ci": [float(lo), float(hi)], "auc_se": se, "p_value": p_value}


def auditor_game(
    candidates: Records,
    training: ReferenceTraining,
    k: int,
    *,
    fprs: Sequence[float] = (0.01, 0.001),
    confidence: float = 0.95,
    per_record_variance_min: int = 32,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
    desc: str = "auditor game",
) -> dict:
    """The auditor-controlled membership game (module docstring) with LiRA online; a JSON-ready dict.

    Trains ``k`` (even, >= 4) models with ``training`` on random halves of ``candidates``, scores every
    (model, record) pair with the other models as references (``k/2 - 1`` IN and as many OUT per record), and
    returns the pooled metrics
    (:func:`attacks.metrics.attack_metrics`) plus ``tpr_ci``: a Clopper-Pearson interval of the TPR at
    each measurable FPR (the threshold is taken as fixed).
    """
    from attacks.metrics import attack_metrics, fpr_key

    if k < 4 or k % 2:
        raise ValueError(f"the auditor game needs an even number of models >= 4, got {k}")
    if len(candidates) < 2:
        raise ValueError(f"the auditor game needs at least 2 candidate records, got {len(candidates)}")
    empty = Records(candidates.x[:0], candidates.y[:0], candidates.ids[:0])
    refs = train_references(candidates, empty, training, k, "online", seed, progress, desc)
    scores, labels, how = game_scores(refs, seed + 1, per_record_variance_min)
    s, y = scores.reshape(-1), labels.reshape(-1)
    out = attack_metrics("lira_online", s, y, fprs, n_boot=n_boot, seed=seed).as_dict()
    # the pairs share models and records: the AUC's interval and p-value account for both (game_auc_interval)
    g = game_auc_interval(scores, labels, n_boot=n_boot, seed=seed)
    out.update(auc_ci95=g["auc_ci"], auc_ci=g["auc_ci"], auc_se=g["auc_se"], p_value=g["p_value"],
               auc_ci_method="two-way bootstrap over the game's models and records",
               auc_ci_pairs_independent=list(out["auc_ci95"]))
    n_in = int(y.sum())
    out["tpr_ci"] = {}
    for f in fprs:
        t = out["tpr_at_fpr"][fpr_key(f)]
        if t is not None:
            lo, hi = clopper_pearson(round(t * n_in), n_in, confidence)
            out["tpr_ci"][fpr_key(f)] = [float(lo), float(hi)]
    out.update(game_models=k, candidate_records=len(candidates), lira_variance=how,
               train_seconds=refs.train_seconds)
    return out
