"""Paired tests over queries, the IR standard for "is system B better than system A"
(Smucker, Allan & Carterette, CIKM 2007): pure numpy functions of per-query differences.

    d_q = B_q - A_q for every query q (each already averaged over seeds)
    mean difference, its 95% confidence interval (Student t over queries),
    the two-sided p of a paired randomization test (random sign flips of d, seeded) and of the
    paired t-test, the minimal detectable effect at 80% power, and Holm's step-down correction
    across the rows compared.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special  # stdtr/stdtrit: Student's t without scipy.stats' ~1 s import

PERMUTATIONS = 100_000
ALPHA, POWER = 0.05, 0.80


def randomization_p(diffs: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0, chunk: int = 4096) -> float:
    """Two-sided p of the paired randomization test: under the null each query's two systems
    are exchangeable, so each difference's sign is a fair coin; p = (1 + #{|mean of a random
    sign flip| >= |observed mean|}) / (1 + permutations), never 0."""
    d = np.asarray(diffs, np.float64)
    if len(d) == 0:
        return float("nan")
    observed = abs(d.mean())
    # A tolerance so that a flip equal to the observed mean up to rounding counts as extreme.
    tol = 1e-12 * max(1.0, np.abs(d).max(initial=0.0))
    rng = np.random.default_rng(seed)
    q, total = len(d), d.sum()
    extreme, done = 0, 0
    while done < permutations:
        n = min(chunk, permutations - done)
        # One random bit per query and flip (bit 1 keeps the sign): sum_i (2 b_i - 1) d_i.
        bits = np.unpackbits(np.frombuffer(rng.bytes(n * ((q + 7) // 8)), np.uint8).reshape(n, -1), axis=1, count=q)
        flipped = 2.0 * (bits.astype(np.float64) @ d) - total  # [n]
        extreme += int(np.count_nonzero(np.abs(flipped) / q >= observed - tol))
        done += n
    return (1 + extreme) / (1 + permutations)


def t_critical(n: int, q: float) -> float:
    """The q-quantile of Student's t with n - 1 degrees of freedom."""
    return float(special.stdtrit(n - 1, q))


def min_detectable(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test at `alpha` detects with
    probability `power`, for n queries whose differences have standard deviation sd:
    (t_{1-alpha/2} + t_{power}) * sd / sqrt(n)."""
    if n < 2:
        return float("nan")
    return (t_critical(n, 1 - alpha / 2) + t_critical(n, power)) * sd / math.sqrt(n)


def paired_test(base: np.ndarray, other: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """other - base over the same queries (aligned arrays [Q]): the mean difference, its 95% CI,
    the randomization and t-test p-values, the SD of the differences and the minimal detectable
    effect, and how many queries each system wins."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test: expected two aligned 1-d arrays of per-query values, got {a.shape} and {b.shape}")
    d = b - a
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    half = t_critical(n, 0.975) * se if n > 1 else float("nan")
    if n > 1 and sd > 0:
        t_p = float(2 * special.stdtr(n - 1, -abs(mean) / se))
    else:  # identical runs (or a constant shift, which no test over queries can weigh)
        t_p = 1.0 if mean == 0 else 0.0
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half], "sd": sd, "se": se,
            "p_randomization": randomization_p(d, permutations, seed), "p_t": t_p,
            "mde80": min_detectable(sd, n), "wins": int((d > 0).sum()), "losses": int((d < 0).sum()),
            "mean_base": float(a.mean()) if n else float("nan"), "mean_row": float(b.mean()) if n else float("nan")}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: sort ascending, multiply the
    i-th smallest (from 0) by (m - i), carry the running maximum, cap at 1. A NaN stays NaN
    and does not count among the m tests."""
    p = np.asarray(pvalues, np.float64)
    out = np.full(len(p), np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for i, j in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out.tolist()
