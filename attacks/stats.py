"""Statistics the audits share (no model, no torch): exact binomial intervals.

Lower than both `attacks.mia` (the auditor game's TPR intervals) and `attacks.dp_audit` (epsilon lower bounds),
so neither imports the other for them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clopper_pearson"]


def clopper_pearson(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided Clopper-Pearson interval for k successes in n trials (vectorised).

    lower = B^-1((1 - c)/2; k, n - k + 1) (0 when k = 0), upper = B^-1((1 + c)/2; k + 1, n - k)
    (1 when k = n), where B^-1 is the inverse regularised incomplete beta function.
    """
    from scipy.special import betaincinv

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= k <= n")
    a = (1.0 - confidence) / 2.0
    with np.errstate(all="ignore"):
        lo = np.where(k > 0, betaincinv(np.maximum(k, 1e-300), n - k + 1, a), 0.0)
        hi = np.where(k < n, betaincinv(k + 1, np.maximum(n - k, 1e-300), 1.0 - a), 1.0)
    return lo, hi
