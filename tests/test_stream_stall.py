"""The stream worker's watchdog (stream.stall): when a stall starts, what resets it.
The real-broker case is the soak (tests/test_soak.py), where a consumer that stops
after the broker restart is restarted by it."""

from __future__ import annotations

from stream.stall import StallWatch


def test_a_stall_grows_only_while_records_wait_and_nothing_is_applied():
    w = StallWatch()
    assert w.observe({0: 5, 1: 0}, {0: 4}, now=0.0) == 0.0  # caught up: nothing to time
    assert w.observe({0: 9, 1: 0}, {0: 4}, now=10.0) == 0.0  # 4 waiting: the clock starts
    assert w.behind == 4
    assert w.observe({0: 9, 1: 3}, {0: 4}, now=25.0) == 15.0  # 7 waiting, none applied
    assert w.unknown(now=40.0) == 40.0 - 10.0  # a failed sample keeps a stall going
    assert w.observe({0: 9, 1: 3}, {0: 4, 1: 0}, now=41.0) == 0.0  # partition 1 moved
    assert w.observe({0: 9, 1: 3}, {0: 4, 1: 0}, now=50.0) == 0.0  # a new stall starts
    assert w.observe({0: 9, 1: 3}, {0: 4, 1: 0}, now=80.0) == 30.0


def test_a_failed_sample_without_a_stall_times_nothing_and_an_assignment_resets():
    w = StallWatch()
    assert w.unknown(now=100.0) == 0.0
    w.observe({0: 9}, {}, now=0.0)  # nothing applied yet, 9 waiting
    assert w.observe({0: 9}, {}, now=30.0) == 30.0
    w.reset()
    assert w.observe({0: 9}, {}, now=31.0) == 0.0
