"""Uncertainty for evaluation figures: Wilson intervals, McNemar's exact test, bootstrap intervals.

At 135M parameters an MMLU subset sits near chance (25%), and a few points between two models on a few
hundred questions is often noise; every accuracy therefore carries an interval, and every comparison of
two models on the same questions a paired test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
ALPHA = 0.05


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    accuracy: float
    stderr: float
    """Binomial standard error sqrt(p(1-p)/n)."""
    ci_low: float
    ci_high: float
    """Wilson score interval at 95%."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); stays inside [0, 1] for small n."""
    if total <= 0:
        return float("nan"), float("nan")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # The clamps only absorb rounding: at p = 0 or 1 the exact bound equals p.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def accuracy(hits: np.ndarray) -> Accuracy:
    """Accuracy of a boolean vector of per-question hits, with its standard error and Wilson interval."""
    hits = np.asarray(hits, dtype=bool)
    total, correct = int(hits.size), int(hits.sum())
    p = correct / total if total else float("nan")
    stderr = math.sqrt(p * (1 - p) / total) if total else float("nan")
    low, high = wilson_interval(correct, total)
    return Accuracy(correct, total, p, stderr, low, high)


def mcnemar_exact(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float]:
    """McNemar's exact test of two models on the same questions.

    Only the discordant questions count: b = right for A only, c = right for B only. Under the null
    hypothesis of equal accuracy b ~ Binomial(b + c, 1/2); the p-value is two-sided, min(1, 2 P(X <= min)).
    """
    hits_a, hits_b = np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool)
    if hits_a.shape != hits_b.shape:
        raise ValueError("McNemar needs the same questions for both models")
    only_a, only_b = int(np.sum(hits_a & ~hits_b)), int(np.sum(~hits_a & hits_b))
    discordant = only_a + only_b
    if discordant == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(discordant, i) for i in range(min(only_a, only_b) + 1)) / 2**discordant
        p_value = min(1.0, 2 * tail)
    difference = float(hits_a.mean() - hits_b.mean()) if hits_a.size else float("nan")
    return {"only_a": only_a, "only_b": only_b, "difference": difference, "p_value": p_value}


def bootstrap_perplexity(
    nll: np.ndarray, counts: np.ndarray, samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of token-weighted perplexity, resampling documents with replacement."""
    nll, counts = np.asarray(nll, dtype=float), np.asarray(counts, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(nll), size=(samples, len(nll)))
    values = np.exp(nll[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap_perplexity(
    nll_a: np.ndarray, nll_b: np.ndarray, counts: np.ndarray, samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap over documents of log(ppl_a) - log(ppl_b) on the same documents.

    `counts` is per document (the same tokenizer scores the same tokens; for models with different
    tokenizers the per-model counts differ and each uses its own). Two-sided p-value: twice the share of
    resamples on the far side of zero.
    """
    nll_a, nll_b = np.asarray(nll_a, dtype=float), np.asarray(nll_b, dtype=float)
    counts = np.asarray(counts, dtype=float)
    if counts.ndim == 1:
        counts = np.stack([counts, counts])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(nll_a), size=(samples, len(nll_a)))
    diff = nll_a[picks].sum(axis=1) / counts[0][picks].sum(axis=1) - nll_b[picks].sum(axis=1) / counts[1][picks].sum(
        axis=1
    )
    observed = nll_a.sum() / counts[0].sum() - nll_b.sum() / counts[1].sum()
    p_value = min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))
    low, high = np.percentile(diff, [2.5, 97.5])
    return {"log_ratio": float(observed), "ci_low": float(low), "ci_high": float(high), "p_value": float(p_value)}


def student_t_sf(t: float, df: int) -> float:
    """P(T >= t) for Student's t with `df` degrees of freedom: for t >= 0, half the regularised incomplete
    beta function I_x(df/2, 1/2) at x = df / (df + t^2) (Abramowitz and Stegun 26.7.1), which keeps its
    relative accuracy however far out in the tail t lies."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if t < 0:
        return 1.0 - student_t_sf(-t, df)
    if math.isinf(t):
        return 0.0
    return 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, by its continued fraction (Numerical Recipes,
    sec. 6.4), evaluated on the side where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} must be in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, steps: int = 300, tiny: float = 1e-300) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, steps + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def seed_t_test(differences: list[float]) -> dict[str, float]:
    """One-sample two-sided t-test that the mean of per-seed paired differences is zero: the variance
    between training seeds, which a bootstrap over held-out documents does not see."""
    values = np.asarray(differences, dtype=float)
    if len(values) < 2:
        raise ValueError("a t-test over seeds needs at least 2 seeds")
    mean, std = float(values.mean()), float(values.std(ddof=1))
    t = mean / (std / math.sqrt(len(values))) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    p_value = 0.0 if math.isinf(t) else min(1.0, 2 * student_t_sf(abs(t), len(values) - 1))
    return {"mean": mean, "std": std, "t": t, "df": len(values) - 1, "p_value": p_value}


def significance_word(p_value: float, alpha: float = ALPHA) -> str:
    return f"significant (p={p_value:.3g})" if p_value < alpha else f"not significant (p={p_value:.2g})"
