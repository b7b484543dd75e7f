"""When the daemon scans and saves: pure, on given times."""

from __future__ import annotations

from portwatch.pace import EARLY_SCAN_PERIOD, EARLY_SCAN_WINDOW, STATE_SAVE_EVERY, Pacer, SaveThrottle


def test_regular_scans_keep_their_cadence_and_start_afresh_after_a_slow_one() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    assert pace.next_scan(100.0) == 101.0
    pace.scanning(101.2)  # a late wake-up: the next one is still on the beat
    assert pace.next_scan(101.2) == 102.0
    pace.scanning(105.5)  # a scan that took seconds: the beat starts again from here
    assert pace.next_scan(105.5) == 106.5


def test_processes_starting_bring_early_scans_for_a_while() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    pace.saw([("fork", 7), ("exit", 7), ("exec", 8)], 100.05)
    assert pace.next_scan(100.05) == 100.0 + EARLY_SCAN_PERIOD and pace.early(100.1)
    assert pace.take() == ({7, 8}, [8]) and pace.take() == (set(), [])
    pace.scanning(100.1)
    assert pace.next_scan(100.1) == 100.1 + EARLY_SCAN_PERIOD  # still within the window
    after = 100.05 + EARLY_SCAN_WINDOW
    assert pace.next_scan(after) == 101.0 and not pace.early(after)


def test_an_overrun_loses_the_hints_and_only_exits_bring_nothing() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    pace.saw([("fork", 7), ("overrun", 0)], 100.0)
    assert pace.take() == (set(), [])
    quiet = Pacer(1.0)
    quiet.scanning(100.0)
    quiet.saw([("exit", 9)], 100.0)
    assert quiet.next_scan(100.0) == 101.0


def test_state_is_saved_when_stale_at_most_every_few_seconds_or_when_forced() -> None:
    saves = SaveThrottle()
    assert not saves.due(0.0) and saves.due(0.0, force=True)
    saves.saved(0.0)
    saves.dirty = True
    assert not saves.due(STATE_SAVE_EVERY - 0.1)
    assert saves.due(STATE_SAVE_EVERY)
    saves.saved(STATE_SAVE_EVERY)
    assert not saves.dirty and not saves.due(100.0)
