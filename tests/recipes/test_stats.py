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
    assert (same.t, same.p_value, same.significant) == (0.0, 1.0, False)
    shift = paired_ttest([1.0, 2.0], [0.5, 1.5])
    assert shift.p_value == 0.0 and shift.significant
    single = paired_ttest([0.8], [0.7])
    assert math.isnan(single.p_value) and not single.significant
    with pytest.raises(InputError, match="matched seeds"):
        paired_ttest([1.0, 2.0], [1.0])


def test_format_mean_ci() -> None:
    assert format_mean_ci(summarize([1.0, 2.0, 3.0])) == "2.000 ± 2.484"
    assert format_mean_ci(summarize([0.5]), digits=2) == "0.50"
