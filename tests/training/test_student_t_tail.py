"""Student's t upper tail against reference values (scipy.stats.t.sf), near the centre and far in the tail."""

from __future__ import annotations

import pytest

from training.evaluation import stats

# (df, t, P(T >= t)) from scipy.stats.t.sf.
REFERENCE = [
    (2, 5000.0, 1.999999880000008e-08),
    (3, 10.0, 0.0010641995292070751),
    (5, 2.5, 0.02724504967118813),
    (30, 4.0, 0.0001909228180418782),
    (1, 100.0, 0.003182992764908255),
    (10, 0.7, 0.2499437850864422),
]


@pytest.mark.parametrize(("df", "t", "expected"), REFERENCE)
def test_student_t_sf_matches_reference_values_to_relative_precision(df, t, expected):
    assert stats.student_t_sf(t, df) == pytest.approx(expected, rel=1e-8)
    assert stats.student_t_sf(-t, df) == pytest.approx(1 - expected, rel=1e-8)
