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

ZERO_VARIANCE_RTOL = 1e-12  # a paired-difference std at or below this × the values' scale is float noise
NOTE_ZERO_VARIANCE = "zero variance in paired differences: no test"
NOTE_ONE_PAIR = "fewer than 2 pairs: no test"


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
        t: the t statistic; NaN when no test was run (fewer than 2 pairs, or zero variance in the differences).
        p_value: two-sided p-value; NaN with fewer than 2 pairs, 1.0 when the differences have zero variance.
        significant: ``p_value < alpha`` — the difference is larger than seed noise at that level; always
            False when no test was run.
        note: why no test was run (empty when the test ran).
    """

    n: int
    mean_diff: float
    t: float
    p_value: float
    significant: bool
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.note:
            return self.note
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

    No test is run — ``t`` is NaN, ``significant`` is False and ``note`` says why — with fewer than 2 pairs
    (``p_value`` NaN) or when the differences have (numerically) zero variance (``p_value`` 1.0): their sample
    std is at most ``ZERO_VARIANCE_RTOL · max(1, |a_i|, |b_i|, |mean diff|)``, i.e. floating-point noise
    such as ``0.95 - 0.94`` against ``0.94 - 0.93``. Dividing by such a std gives a huge meaningless t.
    """
    xa, xb = _values(a, "a"), _values(b, "b")
    if len(xa) != len(xb):
        raise InputError(f"paired test needs matched seeds: a has {len(xa)} values, b has {len(xb)}.")
    diffs = [x - y for x, y in zip(xa, xb, strict=True)]
    n = len(diffs)
    mean_diff = math.fsum(diffs) / n
    if n < 2:
        return PairedTest(n, mean_diff, math.nan, math.nan, False, NOTE_ONE_PAIR)
    sd = math.sqrt(math.fsum((d - mean_diff) ** 2 for d in diffs) / (n - 1))
    scale = max(1.0, abs(mean_diff), *(abs(v) for v in xa), *(abs(v) for v in xb))
    if sd <= ZERO_VARIANCE_RTOL * scale:
        return PairedTest(n, mean_diff, math.nan, 1.0, False, NOTE_ZERO_VARIANCE)
    t = mean_diff / (sd / math.sqrt(n))
    p = float(2.0 * _st.t.sf(abs(t), n - 1))
    return PairedTest(n, mean_diff, t, p, p < alpha)


def format_mean_ci(summary: Summary, digits: int = 3, scale: float = 1.0) -> str:
    """``"0.912 ± 0.021"`` (mean ± CI half-width, times ``scale``); just the mean with a single value."""
    if summary.n < 2 or math.isnan(summary.half_width):
        return f"{summary.mean * scale:.{digits}f}"
    return f"{summary.mean * scale:.{digits}f} ± {summary.half_width * scale:.{digits}f}"
