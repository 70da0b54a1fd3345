"""Small statistics for ablations over seeds: mean, sample std, t-based 95% CI and a paired t-test.

Pure functions on plain sequences of floats; no state, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _st

from fusion_errors import InputError

__all__ = ["Summary", "PairedTest", "summarize", "t_interval", "paired_ttest", "format_mean_ci"]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1) and a two-sided t confidence interval of one cell."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        """Half the CI width (``mean ± half_width``); NaN with fewer than two values."""
        return (self.ci_high - self.ci_low) / 2.0


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of ``a - b`` over matched seeds.

    Attributes:
        n: number of pairs.
        mean_diff: mean of ``a - b``.
        t: the t statistic (NaN when undefined: fewer than 2 pairs).
        p_value: two-sided p-value (1.0 when all differences are exactly equal to zero).
        significant: ``p_value < alpha`` — the difference is larger than seed noise at that level.
    """

    n: int
    mean_diff: float
    t: float
    p_value: float
    significant: bool

    @property
    def verdict(self) -> str:
        return "larger than seed noise" if self.significant else "within seed noise"


def _values(values: Sequence[float], name: str) -> list[float]:
    vals = [float(v) for v in values]
    if not vals:
        raise InputError(f"{name} is empty: give at least one value (one per seed).")
    return vals


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval of the mean: ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)``.

    With a single value both bounds are NaN (there is no spread estimate).
    """
    s = summarize(values, confidence)
    return s.ci_low, s.ci_high


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std and t confidence interval of ``values`` (one value per seed).

    With one value the std and the interval are NaN; with zero spread the interval collapses to the mean.
    """
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence={confidence} must be in (0, 1), e.g. 0.95.")
    vals = _values(values, "values")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(_st.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_ttest(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> PairedTest:
    """Paired two-sided t-test of ``a`` against ``b`` (same seeds, same order).

    Differences that are all identical and zero give ``t=0, p=1``; identical non-zero differences give
    ``t=±inf, p=0`` (a constant shift with no seed noise at all).
    """
    xa, xb = _values(a, "a"), _values(b, "b")
    if len(xa) != len(xb):
        raise InputError(f"paired test needs matched seeds: a has {len(xa)} values, b has {len(xb)}.")
    diffs = [x - y for x, y in zip(xa, xb, strict=True)]
    n = len(diffs)
    mean_diff = math.fsum(diffs) / n
    if n < 2:
        return PairedTest(n, mean_diff, math.nan, math.nan, False)
    sd = math.sqrt(math.fsum((d - mean_diff) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        if mean_diff == 0.0:
            return PairedTest(n, 0.0, 0.0, 1.0, False)
        return PairedTest(n, mean_diff, math.copysign(math.inf, mean_diff), 0.0, True)
    t = mean_diff / (sd / math.sqrt(n))
    p = float(2.0 * _st.t.sf(abs(t), n - 1))
    return PairedTest(n, mean_diff, t, p, p < alpha)


def format_mean_ci(summary: Summary, digits: int = 3, scale: float = 1.0) -> str:
    """``"0.912 ± 0.021"`` (mean ± CI half-width, times ``scale``); just the mean with a single value."""
    if summary.n < 2 or math.isnan(summary.half_width):
        return f"{summary.mean * scale:.{digits}f}"
    return f"{summary.mean * scale:.{digits}f} ± {summary.half_width * scale:.{digits}f}"
