"""Seed statistics: values pinned against hand computation."""

from __future__ import annotations

import math

import pytest

from fusion_errors import InputError
from recipes.sweep.stats import format_mean_ci, paired_ttest, summarize, t_interval

T_975_2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom


def test_summarize_pins_mean_std_and_ci() -> None:
    s = summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    half = T_975_2 / math.sqrt(3)
    assert s.ci_low == pytest.approx(2.0 - half, abs=1e-12)
    assert s.ci_high == pytest.approx(2.0 + half, abs=1e-12)
    assert s.half_width == pytest.approx(2.4841377117503303, abs=1e-12)
    assert t_interval([1.0, 2.0, 3.0]) == (s.ci_low, s.ci_high)


def test_summarize_edge_cases() -> None:
    one = summarize([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low)
    flat = summarize([0.5, 0.5, 0.5])
    assert flat.std == 0.0 and flat.ci_low == flat.ci_high == 0.5
    assert summarize([1.0, 3.0], confidence=0.9).half_width == pytest.approx(6.313751514675043, abs=1e-9)
    with pytest.raises(InputError):
        summarize([])
    with pytest.raises(InputError):
        summarize([1.0, 2.0], confidence=1.5)


def test_paired_ttest_pins_t_and_p() -> None:
    r = paired_ttest([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert r.mean_diff == 2.0
    assert r.t == pytest.approx(2.0 * math.sqrt(3), abs=1e-12)
    assert r.p_value == pytest.approx(0.07417990022744853, abs=1e-12)
    assert not r.significant and r.verdict == "within seed noise"
    big = paired_ttest([0.9, 0.91, 0.92, 0.93], [0.5, 0.5, 0.52, 0.5])
    assert big.significant and big.verdict == "larger than seed noise" and big.p_value < 1e-3


def test_paired_ttest_degenerate_cases() -> None:
    same = paired_ttest([0.8, 0.9], [0.8, 0.9])
    assert math.isnan(same.t) and (same.p_value, same.significant) == (1.0, False)
    shift = paired_ttest([1.0, 2.0], [0.5, 1.5])  # a constant shift: zero variance, so no test (issue 27)
    assert math.isnan(shift.t) and shift.p_value == 1.0 and not shift.significant
    single = paired_ttest([0.8], [0.7])
    assert math.isnan(single.p_value) and not single.significant
    with pytest.raises(InputError, match="matched seeds"):
        paired_ttest([1.0, 2.0], [1.0])


def test_paired_ttest_zero_variance_differences_are_no_test() -> None:
    # issue 27: 0.95 - 0.94 and 0.94 - 0.93 are both "0.01" but differ in the last bits; the old code divided
    # that noise by a ~8e-17 std and reported t ~ 1.8e14, p ~ 0, significant.
    noisy = paired_ttest([0.95, 0.94], [0.94, 0.93])
    assert noisy.mean_diff == pytest.approx(0.01, abs=1e-12)
    assert math.isnan(noisy.t) and noisy.p_value == 1.0 and not noisy.significant
    assert noisy.note == "zero variance in paired differences: no test" and noisy.verdict == noisy.note
    exact = paired_ttest([0.95, 0.96], [0.94, 0.95])  # 0.95 - 0.94 == 0.96 - 0.95 bit for bit
    assert math.isnan(exact.t) and exact.p_value == 1.0 and not exact.significant and exact.note
    # float noise scales with the values compared, not with the mean difference: std here is ~1.3e-12
    big = paired_ttest([10000.1, 20000.1], [10000.0, 20000.0])
    assert math.isnan(big.t) and not big.significant
    single = paired_ttest([0.95], [0.94])
    assert math.isnan(single.t) and not single.significant and single.note


def test_paired_ttest_with_seed_noise_still_computes_a_finite_t() -> None:
    r = paired_ttest([0.95, 0.97, 0.93], [0.94, 0.95, 0.93])  # differences 0.01, 0.02, 0.00
    assert math.isfinite(r.t) and r.t == pytest.approx(0.01 / (0.01 / math.sqrt(3)), rel=1e-9)
    assert 0.0 < r.p_value < 1.0 and not r.note and r.verdict == "within seed noise"
    tiny = paired_ttest([0.5 + 1e-9, 0.5 + 3e-9], [0.5, 0.5])  # small but real spread (well above float noise)
    assert math.isfinite(tiny.t) and not tiny.note


def test_format_mean_ci() -> None:
    assert format_mean_ci(summarize([1.0, 2.0, 3.0])) == "2.000 ± 2.484"
    assert format_mean_ci(summarize([0.5]), digits=2) == "0.50"
