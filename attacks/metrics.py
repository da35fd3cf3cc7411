"""Attack metrics computed exactly from scores: ROC, AUC, balanced accuracy, TPR at a fixed FPR.

Convention everywhere in ``attacks/``: a higher score means "more likely a member"; ``labels`` are 1 for
members and 0 for non-members.

TPR at a target FPR is read off the exact empirical ROC (no interpolation): the largest TPR among the
thresholds whose FPR is at most the target. With N non-members the smallest non-zero FPR is 1/N, so a
target below 1/N cannot be measured: the figure is then ``None`` with a reason, never a number that only
reflects the sample size (Carlini et al. 2022, "Membership inference attacks from first principles").

Records are identified by opaque indices only (positions in the hospital's own shard); no function here
ever sees or returns a record's values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "AttackMetrics",
    "roc_points",
    "roc_auc",
    "balanced_accuracy",
    "tpr_at_fpr",
    "auc_null_std",
    "auc_p_value",
    "holm_bonferroni",
    "measurability",
    "bootstrap_auc_ci",
    "attack_metrics",
    "top_exposed",
    "plot_roc",
    "fpr_key",
]

DEFAULT_FPRS = (0.01, 0.001)


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"scores ({len(s)}) and labels ({len(y)}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    y = y.astype(np.int64)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError(f"need both members and non-members, got {int(y.sum())} members of {len(y)}")
    return s, y


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact empirical ROC: (fpr, tpr, thresholds), one point per distinct score, starting at (0, 0).

    The point for threshold t counts "member" for every score >= t; tied scores move together.
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(1 - y)[distinct]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def roc_auc(scores, labels) -> float:
    """Area under the ROC (ties count one half), i.e. P(member score > non-member score) + P(tie)/2."""
    fpr, tpr, _ = roc_points(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def balanced_accuracy(scores, labels) -> float:
    """Best balanced accuracy over thresholds, max_t (TPR + TNR) / 2 (= (1 + membership advantage) / 2).

    The threshold is chosen on the same scores it is evaluated on, so this is the attack's best case.
    """
    fpr, tpr, _ = roc_points(scores, labels)
    return float(np.max((tpr + 1.0 - fpr) / 2.0))


def fpr_key(fpr: float) -> str:
    """JSON key for a target FPR: 0.01 -> '0.01', 0.001 -> '0.001'."""
    return f"{fpr:g}"


def tpr_at_fpr(scores, labels, fpr: float) -> tuple[float | None, str | None]:
    """(TPR, None) at target FPR, exactly from the scores; (None, reason) if the sample is too small.

    The sample is too small when there are fewer than 1/fpr non-members: one false positive is then
    already more than the target FPR, and the figure would describe the sample size, not the attack.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"target FPR must be in (0, 1), got {fpr!r}")
    s, y = _check(scores, labels)
    n_neg = int(len(y) - y.sum())
    need = math.ceil(1.0 / fpr - 1e-9)
    if n_neg < need:
        return None, (
            f"too few non-members for FPR {fpr:g}: {n_neg} non-members, at least {need} needed "
            f"(the smallest measurable FPR here is 1/{n_neg} = {1.0 / n_neg:.3g})"
        )
    fpr_pts, tpr_pts, _ = roc_points(s, y)
    ok = fpr_pts <= fpr + 1e-12
    return float(tpr_pts[ok].max()), None


def auc_null_std(n_members: int, n_nonmembers: int) -> float:
    """Standard deviation of the AUC of a useless attack (Mann-Whitney U under H0, continuous scores).

    sqrt((n1 + n0 + 1) / (12 n1 n0)); used to say how far from 0.5 an AUC must be to mean anything.
    """
    n1, n0 = int(n_members), int(n_nonmembers)
    return math.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0))


def auc_p_value(scores, labels) -> float:
    """One-sided p-value of H0 "AUC <= 0.5" against "AUC > 0.5": the Mann-Whitney U test (members score
    higher), exact for small samples without ties, normal with tie correction otherwise (scipy's choice)."""
    from scipy.stats import mannwhitneyu

    s, y = _check(scores, labels)
    return float(mannwhitneyu(s[y == 1], s[y == 0], alternative="greater").pvalue)


def holm_bonferroni(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979): sort ascending, multiply the i-th smallest (0-based)
    by m - i, take the running maximum, cap at 1. Rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha over all m tests, with no assumption on their dependence."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if np.any((p < 0) | (p > 1)) or np.isnan(p).any():
        raise ValueError("p-values must be in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="mergesort")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def measurability(n_members: int, n_nonmembers: int, fprs: Sequence[float]) -> dict:
    """What a sample of this size can measure: ``n_pairs``, ``min_measurable_fpr`` (1 / non-members) and
    ``tpr_measurable`` ({fpr key: bool}; TPR at an FPR below 1/N is never a number)."""
    n0 = int(n_nonmembers)
    return {
        "n_pairs": min(int(n_members), n0),
        "min_measurable_fpr": 1.0 / n0 if n0 else None,
        "tpr_measurable": {fpr_key(f): n0 >= math.ceil(1.0 / f - 1e-9) for f in fprs},
    }


def bootstrap_auc_ci(scores, labels, n_boot: int = 200, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling members and non-members separately."""
    s, y = _check(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    for b in range(n_boot):
        p = rng.choice(pos, size=len(pos))
        n = rng.choice(neg, size=len(neg))
        r = rankdata(np.r_[p, n])  # Mann-Whitney U via average ranks of the pooled sample (ties count 1/2)
        aucs[b] = (r[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n))
    lo, hi = np.quantile(aucs, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(lo), float(hi)


@dataclass
class AttackMetrics:
    """One attack's figures on one target; JSON-ready via :meth:`as_dict`."""

    attack: str
    auc: float
    auc_ci95: tuple[float, float]
    balanced_accuracy: float
    tpr_at_fpr: dict[str, float | None]
    tpr_at_fpr_note: dict[str, str] = field(default_factory=dict)
    n_members: int = 0
    n_nonmembers: int = 0
    auc_null_std: float = 0.0
    top_exposed: list[dict] = field(default_factory=list)
    p_value: float | None = None  # one-sided, AUC > 0.5 (auc_p_value); adjusted over a family by the caller
    n_pairs: int = 0
    min_measurable_fpr: float | None = None
    tpr_measurable: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["auc_ci95"] = list(self.auc_ci95)
        d["auc_ci"] = list(self.auc_ci95)
        return d


def attack_metrics(
    attack: str,
    scores,
    labels,
    fprs: Sequence[float] = DEFAULT_FPRS,
    member_ids: Sequence[int] | None = None,
    top_k: int = 0,
    n_boot: int = 200,
    seed: int = 0,
) -> AttackMetrics:
    """All figures for one attack. ``member_ids``: opaque ids of the members, in the order their scores
    appear among ``scores[labels == 1]`` (needed only for ``top_k`` > 0)."""
    s, y = _check(scores, labels)
    tprs, notes = {}, {}
    for f in fprs:
        t, why = tpr_at_fpr(s, y, f)
        tprs[fpr_key(f)] = t
        if why:
            notes[fpr_key(f)] = why
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    top = top_exposed(s[y == 1], member_ids, top_k) if top_k and member_ids is not None else []
    return AttackMetrics(
        attack=attack,
        auc=roc_auc(s, y),
        auc_ci95=bootstrap_auc_ci(s, y, n_boot=n_boot, seed=seed),
        balanced_accuracy=balanced_accuracy(s, y),
        tpr_at_fpr=tprs,
        tpr_at_fpr_note=notes,
        n_members=n1,
        n_nonmembers=n0,
        auc_null_std=auc_null_std(n1, n0),
        top_exposed=top,
        p_value=auc_p_value(s, y),
        **measurability(n1, n0, fprs),
    )


def top_exposed(member_scores, member_ids: Sequence[int] | None, k: int) -> list[dict]:
    """The k members with the highest membership scores, as ``{"id": <opaque index>, "score": s}``.

    Ids are positions in the hospital's own training shard (it can look its records up; the audit
    output never contains a record's values). Ties keep the lower id first.
    """
    s = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    ids = np.arange(len(s)) if member_ids is None else np.asarray(member_ids).reshape(-1)
    if len(ids) != len(s):
        raise ValueError(f"{len(ids)} ids for {len(s)} member scores")
    order = np.lexsort((ids, -s))[: max(int(k), 0)]
    return [{"id": int(ids[i]), "score": float(s[i])} for i in order]


def plot_roc(curves: dict[str, tuple], path: str | Path, title: str = "") -> Path:
    """Save ROC curves on log-log axes (Carlini et al.'s presentation) to a PNG; returns the path.

    ``curves`` maps a label to ``(scores, labels)``. Zero rates are drawn at half the smallest measurable
    rate (1/(2 x non-members)) so that they stay on the log axes. Uses matplotlib's Agg canvas directly,
    so the caller's pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.6, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo = 1.0
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_points(scores, labels)
        n0 = int((np.asarray(labels) == 0).sum())
        floor = 0.5 / n0
        lo = min(lo, floor)
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {auc:.3f})", lw=1.4)
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path
