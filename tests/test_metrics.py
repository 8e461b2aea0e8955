"""How many users a paired difference needs (``metrics.users_needed``, ``metrics.paired_sd``); the metric
rules themselves are checked by hand in ``tests/data/test_data_metrics.py``."""

from __future__ import annotations

import numpy as np
import pytest

from tailorlm import metrics


def test_users_needed_matches_the_textbook_value():
    # One-sided alpha 0.05, power 0.8: z = 1.6449 + 0.8416 = 2.4865, z^2 = 6.183. An effect of half a
    # standard deviation needs 6.183 / 0.25 = 24.7 -> 25 users; ROUGE's 0.01 with a spread of 0.1 needs
    # 6.183 * 100 = 618.3 -> 619.
    assert metrics.users_needed(1.0, 0.5) == 25
    assert metrics.users_needed(0.1, 0.01) == 619
    assert metrics.users_needed(0.1, -0.01) == 619  # the direction does not change the count
    # Power 0.9: z = 1.6449 + 1.2816 = 2.9265, z^2 = 8.564 -> 34.3 -> 35.
    assert metrics.users_needed(1.0, 0.5, power=0.9) == 35
    # No spread: any difference shows, but a paired test needs two users.
    assert metrics.users_needed(0.0, 0.01) == 2


def test_users_needed_gives_the_stated_power_to_the_reports_bootstrap():
    # The report's test is the paired bootstrap, not the z test the formula is for: at the count the
    # formula gives, the bootstrap must detect the difference in 0.8 of simulated runs, within 0.05
    # (1000 runs: the estimate's standard error is 0.013).
    n = metrics.users_needed(1.0, 0.3)  # 6.183 / 0.09 = 68.7 -> 69
    assert n == 69
    rng = np.random.default_rng(7)
    runs = 1000
    detected = 0
    for run in range(runs):
        gains = rng.normal(0.3, 1.0, size=n)
        p = metrics.paired_bootstrap(gains, np.zeros(n), n_resamples=1000, seed=run)
        detected += p < 0.05
    assert abs(detected / runs - 0.8) < 0.05


def test_paired_sd_is_the_spread_of_per_user_differences():
    a = {"u1": 0.5, "u2": 0.3, "u3": 0.4}
    b = {"u1": 0.4, "u2": 0.3, "u3": 0.2}
    # Differences 0.1, 0.0, 0.2: mean 0.1, squares 0.01 + 0.01 + 0.01 over n - 1 = 2 -> sd 0.1.
    assert metrics.paired_sd(a, b) == pytest.approx(0.1)
    # Users are matched by id, not by position.
    assert metrics.paired_sd(a, {"u3": 0.2, "u2": 0.3, "u1": 0.4}) == pytest.approx(0.1)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-zero"):
        metrics.users_needed(0.1, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        metrics.users_needed(-0.1, 0.01)
    with pytest.raises(ValueError, match="alpha and power"):
        metrics.users_needed(0.1, 0.01, power=1.0)
    with pytest.raises(ValueError, match="at least 2 users"):
        metrics.paired_sd([0.1], [0.2])
    with pytest.raises(ValueError, match="different users"):
        metrics.paired_sd({"u1": 0.1, "u2": 0.2}, {"u1": 0.1, "u3": 0.2})
