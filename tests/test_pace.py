"""When the daemon scans and saves: pure, on given times."""

from __future__ import annotations

from portwatch.pace import (
    EARLY_SCAN_PERIOD,
    EARLY_SCAN_WINDOW,
    STATE_SAVE_CHANGES_EVERY,
    STATE_SAVE_EVERY,
    Pacer,
    SaveThrottle,
)


def test_regular_scans_keep_their_cadence_and_start_afresh_after_a_slow_one() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    assert pace.next_scan(100.0) == 101.0
    pace.scanning(101.2)  # a late wake-up: the next one is still on the beat
    assert pace.next_scan(101.2) == 102.0
    pace.scanning(105.5)  # a scan that took seconds: the beat starts again from here
    assert pace.next_scan(105.5) == 106.5


def test_processes_starting_bring_early_scans_while_they_run_within_the_window() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    pace.saw([("fork", 7), ("exec", 8)], 100.05)
    # The first look is a period after the event, not at once: a process that exits at once
    # (most of what a busy host starts) is gone by then.
    assert pace.next_scan(100.05) == 100.05 + EARLY_SCAN_PERIOD and pace.early(100.15)
    assert pace.waiting(100.05)
    assert pace.take(100.15) == ({7, 8}, [8])
    assert pace.take(100.15) == ({7, 8}, [])  # looked at again until the window ends; execs once
    pace.scanning(100.15)
    assert pace.next_scan(100.15) == 100.15 + EARLY_SCAN_PERIOD
    pace.saw([("exec", 7)], 100.5)  # a new program: its window starts again
    after = 100.05 + EARLY_SCAN_WINDOW
    assert pace.young(after) == {7}
    assert pace.young(100.5 + EARLY_SCAN_WINDOW) == set()
    assert pace.next_scan(100.5 + EARLY_SCAN_WINDOW) == 101.0 and not pace.waiting(101.6)


def test_a_process_is_due_a_look_a_period_after_it_started_until_the_window_ends() -> None:
    pace = Pacer(1.0)
    pace.saw([("fork", 7)], 100.0)
    pace.saw([("fork", 8)], 100.08)
    assert pace.due(100.05) == set() and pace.due(100.1) == {7}
    assert pace.due(100.2) == {7, 8} and pace.due(100.0 + EARLY_SCAN_WINDOW) == {8}


def test_an_exec_read_late_does_not_put_off_the_look_at_the_program() -> None:
    """The fork wakes the daemon; the exec that follows at once waits in the queue for the look
    and is read with it: the program is looked at then, and for a window from its exec."""
    pace = Pacer(1.0)
    pace.scanning(100.0)
    pace.saw([("fork", 7)], 100.0)
    pace.saw([("exec", 7)], 100.1)
    assert pace.due(100.1) == {7} and pace.next_scan(100.1) <= 100.1
    assert pace.young(100.0 + EARLY_SCAN_WINDOW) == {7} and pace.young(100.1 + EARLY_SCAN_WINDOW) == set()


def test_fresh_are_the_young_that_forked_or_execd_since_the_last_look() -> None:
    pace = Pacer(1.0)
    pace.saw([("fork", 7), ("fork", 8), ("exit", 8)], 100.0)
    assert pace.fresh() == {7} and pace.fresh() == set()
    pace.saw([("exec", 7), ("fork", 9)], 100.5)
    assert pace.young(101.2) == {7, 9} and pace.fresh() == {7, 9}
    pace.saw([("fork", 10)], 100.6)
    assert pace.young(101.7) == set() and pace.fresh() == set()  # gone with the window


def test_an_exit_ends_the_early_scans_of_a_process() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    pace.saw([("fork", 7), ("exec", 7), ("exit", 7)], 100.0)  # /bin/true, read in one batch
    assert pace.next_scan(100.0) == 101.0 and not pace.waiting(100.0)
    assert pace.take(100.1) == (set(), [7])  # its exec is still said (nothing holds it: harmless)
    pace.saw([("fork", 8), ("fork", 9)], 100.2)
    pace.scanning(100.3)
    pace.saw([("exit", 8)], 100.35)
    assert pace.young(100.4) == {9} and pace.next_scan(100.35) == 100.3 + EARLY_SCAN_PERIOD


def test_an_overrun_loses_the_young_processes_and_only_exits_bring_nothing() -> None:
    pace = Pacer(1.0)
    pace.scanning(100.0)
    pace.saw([("fork", 7), ("overrun", 0)], 100.0)
    assert pace.take(100.0) == (set(), [])
    quiet = Pacer(1.0)
    quiet.scanning(100.0)
    quiet.saw([("exit", 9)], 100.0)
    assert quiet.next_scan(100.0) == 101.0


def test_state_is_saved_soon_when_urgent_later_when_only_listeners_changed_or_when_forced() -> None:
    saves = SaveThrottle()
    assert not saves.due(0.0) and saves.due(0.0, force=True)
    saves.saved(0.0)
    saves.dirty = True
    assert not saves.due(STATE_SAVE_EVERY) and not saves.due(STATE_SAVE_CHANGES_EVERY - 0.1)
    assert saves.due(STATE_SAVE_CHANGES_EVERY)
    saves.urgent = True
    assert not saves.due(STATE_SAVE_EVERY - 0.1) and saves.due(STATE_SAVE_EVERY)
    saves.saved(STATE_SAVE_EVERY)
    assert not saves.dirty and not saves.urgent and not saves.due(1000.0)
