"""The stream worker's watchdog (stream.stall): when a stall starts, what resets it.
The real-broker case is the soak (tests/test_soak.py), where a consumer that stops
after the broker restart is restarted by it."""

from __future__ import annotations

from stream.stall import StallWatch


def test_a_stall_grows_only_while_records_wait_and_nothing_is_applied():
    w = StallWatch()
    assert w.observe({0: 5, 1: 0}, {0: 4}, now=0.0) == 0.0  # caught up: nothing to time
    assert w.observe({0: 9, 1: 0}, {0: 4}, now=10.0) == 10.0  # 4 waiting since
    assert w.behind == 4
    assert w.observe({0: 9, 1: 3}, {0: 4}, now=25.0) == 25.0  # 7 waiting, none applied
    assert w.unknown(now=40.0) == 40.0  # a failed sample shows no progress either
    assert w.observe({0: 9, 1: 3}, {0: 4, 1: 0}, now=41.0) == 0.0  # partition 1 moved
    assert w.observe({0: 9, 1: 3}, {0: 4, 1: 0}, now=50.0) == 9.0
    assert w.observe({0: 9, 1: 3}, {0: 8, 1: 2}, now=51.0) == 0.0  # caught up


def test_before_its_first_sample_the_worker_is_not_timed_and_an_assignment_resets():
    w = StallWatch()
    assert w.unknown(now=100.0) == 0.0  # starting or joining: nothing to time
    assert w.observe({0: 9}, {}, now=0.0) == 0.0  # 9 waiting: the clock starts
    assert w.observe({0: 9}, {}, now=30.0) == 30.0
    w.reset()
    assert w.unknown(now=31.0) == 0.0
    assert w.observe({0: 9}, {}, now=31.0) == 0.0
