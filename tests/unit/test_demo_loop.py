"""The demo loop's own health: a loop that falls behind real time says so in the report."""

from __future__ import annotations

from recsys.demo.report import DemoResult
from recsys.demo.run import _record_lag


def test_a_late_demo_loop_is_recorded_and_flagged_in_the_report():
    on_time = DemoResult(minutes=1.0, arms={})
    _record_lag(on_time, [0.01] * 60)
    assert on_time.extra["loop_lag_s"]["max"] == 0.01
    assert on_time.notes == []
    late = DemoResult(minutes=1.0, arms={})
    _record_lag(late, [0.01] * 40 + [12.0] * 20)
    assert late.extra["loop_lag_s"]["max"] == 12.0
    (note,) = late.notes
    assert "fell behind real time" in note
    assert "33%" in note
