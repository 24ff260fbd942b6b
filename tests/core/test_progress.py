"""Progress lines: the count, the share, the rate and the ETA, on a fake clock; the ticker on a real one."""

from __future__ import annotations

import threading
import time

import pytest

from core.errors import ConfigError
from core.progress import Progress, default_interval, format_duration, format_rate


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(total=50_000, unit="docs", interval=30.0, **kw):
    clock, lines = FakeClock(), []
    progress = Progress("curate encode", total, unit, interval=interval, clock=clock, emit=lines.append, **kw)
    return progress, clock, lines


def test_format_duration_and_rate():
    assert [format_duration(s) for s in (0, 4.4, 59.6, 60, 909, 3599, 3600, 7380, 86400 + 4 * 3600)] == [
        "0s", "4s", "1m00s", "1m00s", "15m09s", "59m59s", "1h00m", "2h03m", "1d04h",
    ]  # fmt: skip
    assert [format_rate(r) for r in (0.0492, 41.33, 99.96, 1234.4)] == ["0.0492", "41.3", "100", "1,234"]


def test_a_line_is_logged_once_per_interval_with_share_rate_and_eta():
    progress, clock, lines = make()
    clock.now += 10
    progress.add(400)  # not due yet: 10 s < 30 s
    assert lines == []
    clock.now += 20
    progress.add(839)  # 1,239 docs in 30 s: 41.3 docs/s, 48,761 left: 1,181 s
    assert lines == ["curate encode: 1,239/50,000 docs (2%) 41.3 docs/s, ETA 19m41s"]
    clock.now += 5
    progress.add(10)
    assert len(lines) == 1  # the next one is due 30 s after the last
    assert progress.tick() is None


def test_no_total_gives_count_and_rate_without_eta():
    progress, clock, lines = make(total=None)
    clock.now += 30
    progress.add(1200)
    assert lines == ["curate encode: 1,200 docs 40 docs/s"]


def test_before_the_first_unit_the_line_says_how_long_ago_it_started():
    progress, clock, lines = make()
    clock.now += 95
    assert progress.tick() == "curate encode: 0/50,000 docs (0%) started 1m35s ago"


def test_the_rate_follows_the_recent_speed_not_the_start_up():
    progress, clock, lines = make(total=10_000, unit="rows", interval=10.0)
    clock.now += 300  # a slow start: model loads, nothing done
    progress.tick()
    for _ in range(10):  # then 100 rows/s, a line every 10 s
        clock.now += 10
        progress.add(1000)
    # Over the whole run the rate would be 10,000 / 400 s = 25 rows/s; measured from the last idle line, 100.
    assert lines[-1] == "curate encode: 10,000/10,000 rows (100%) 100 rows/s"
    assert lines[-2] == "curate encode: 9,000/10,000 rows (90%) 100 rows/s, ETA 10s"
    assert progress.finish() == "curate encode: 10,000/10,000 rows (100%) 25 rows/s, done in 6m40s"


def test_the_rate_window_drops_lines_older_than_ten():
    progress, clock, lines = make(total=None, unit="rows", interval=10.0)
    for _ in range(10):  # 10 rows/s for 100 s
        clock.now += 10
        progress.add(100)
    for _ in range(10):  # then 50 rows/s: after ten more lines the slow ones are out of the window
        clock.now += 10
        progress.add(500)
    assert lines[-1] == "curate encode: 6,000 rows 50 rows/s"
    assert lines[10] == "curate encode: 1,500 rows 14 rows/s"  # 1,400 rows over the last 10 intervals (100 s)


def test_final_line_gives_whole_run_rate_and_duration_and_the_note():
    progress, clock, lines = make(total=1_600, unit="steps", initial=400)  # resumed at step 400
    clock.now += 600
    progress.update(1_600, note="loss 2.3100")
    assert progress.finish() == "curate encode: 1,600/1,600 steps (100%) 2 steps/s, done in 10m00s, loss 2.3100"
    assert lines[-1].endswith("done in 10m00s, loss 2.3100")


def test_share_never_reads_100_before_the_end_nor_over_it_after_a_recount():
    progress, clock, _ = make(total=1000)
    clock.now += 30
    progress.update(999)
    assert "(99%)" in progress.line()
    progress.update(1010)  # a retried batch counted twice: no share over 100, no ETA
    assert progress.line().startswith("curate encode: 1,010/1,000 docs (100%) ")
    assert "ETA" not in progress.line()


def test_poll_supplies_the_count_only_when_a_line_is_due():
    calls = []

    def poll():
        calls.append(1)
        return 70

    progress, clock, lines = make(total=None, poll=poll)
    progress.tick()
    assert calls == []
    clock.now += 30
    assert progress.tick() == "curate encode: 70 docs 2.33 docs/s"
    assert progress.finish() == "curate encode: 70 docs 2.33 docs/s, done in 30s"
    assert len(calls) == 2


def test_disabled_progress_logs_nothing():
    progress, clock, lines = make(enabled=False)
    clock.now += 100
    progress.add(5)
    with progress:
        pass
    assert lines == [] and progress.finish() is None


def test_the_ticker_logs_while_nothing_is_added_and_the_block_ends_with_the_final_line():
    lines: list[str] = []
    lock = threading.Lock()

    def emit(line):
        with lock:
            lines.append(line)

    with Progress("wait", 3, "steps", interval=0.1, emit=emit) as progress:
        time.sleep(0.45)
        progress.add(3)
    assert len(lines) >= 4
    assert lines[0].startswith("wait: 0/3 steps (0%) started ")
    assert lines[-1].startswith("wait: 3/3 steps (100%) ") and "done in" in lines[-1]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("FINESCOPE_PROGRESS_S", raising=False)
    assert default_interval() == 30.0
    monkeypatch.setenv("FINESCOPE_PROGRESS_S", "2.5")
    assert default_interval() == 2.5
    for bad in ("0", "-1", "nan", "soon"):
        monkeypatch.setenv("FINESCOPE_PROGRESS_S", bad)
        with pytest.raises(ConfigError, match="FINESCOPE_PROGRESS_S"):
            default_interval()
