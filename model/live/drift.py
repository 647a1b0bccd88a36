"""Concept-drift monitoring on the learner's own signals (River's ADWIN).

:class:`DriftMonitor` watches two streams of numbers:

* ``loss``: the self-supervised training loss of each cycle (the training
  worker feeds it; higher is worse);
* ``hit_rate``: per-event prequential hits (1 when the next item was in the
  top 10 predicted just before it happened; the benchmark feeds it, a live
  system can too; lower is worse).

Each stream goes to its own ``river.drift.ADWIN``. ADWIN reports any
significant change of the mean, including the improvement of a model that is
still learning; a change counts as a drift only when the signal got WORSE
(the mean of the window ADWIN keeps after the cut is worse than the mean
before it). A drift is logged, counted (``count``, published by the worker as
field ``drifts`` of the Redis model hash) and arms a catch-up: the next cycle
takes ``catchup_factor`` times its usual number of optimizer steps.

>>> m = DriftMonitor()
>>> for _ in range(200):
...     _ = m.update("loss", 5.0)
>>> [m.update("loss", 9.0) for _ in range(30)].count(None) < 30
True
>>> m.count, m.catchup_steps(4), m.catchup_steps(4)
(1, 16, 4)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from river.drift import ADWIN

__all__ = ["Drift", "DriftMonitor", "SIGNALS"]

LOG = logging.getLogger(__name__)

# signal -> True when a higher value is worse
SIGNALS: dict[str, bool] = {"loss": True, "hit_rate": False}


@dataclass(frozen=True)
class Drift:
    signal: str  # "loss" or "hit_rate"
    at: int  # 1-based position in that signal's stream (cycle / scored event)
    before: float  # mean of ADWIN's window before the cut
    after: float  # mean of the window ADWIN keeps (the recent part)


class DriftMonitor:
    """ADWIN per signal; counts degradations and arms a larger catch-up step."""

    def __init__(
        self,
        delta: float = 0.002,
        catchup_factor: int = 4,
        clock: dict[str, int] | None = None,
        grace_period: int = 10,
    ) -> None:
        if catchup_factor < 1:
            raise ValueError("catchup_factor must be >= 1")
        # the loss arrives once per cycle (few values): check every value;
        # hits arrive once per event: check every 32 (ADWIN's default)
        clocks = {"loss": 1, "hit_rate": 32} | (clock or {})
        self.delta = delta
        self.catchup_factor = catchup_factor
        self._detectors = {
            name: ADWIN(delta=delta, clock=clocks[name], grace_period=grace_period)
            for name in SIGNALS
        }
        self._seen = dict.fromkeys(SIGNALS, 0)
        self.drifts: list[Drift] = []
        self.count = 0  # degradations detected (may start > 0 after a restart)
        self._pending_catchup = False

    def update(self, signal: str, value: float) -> Drift | None:
        """Feed one value; returns the :class:`Drift` when this value revealed one."""
        detector = self._detectors[signal]  # KeyError names an unknown signal
        self._seen[signal] += 1
        before = detector.estimation
        detector.update(float(value))
        if not detector.drift_detected:
            return None
        after = detector.estimation
        worse = after > before if SIGNALS[signal] else after < before
        if not worse:
            LOG.debug("%s improved at %d: %.4f -> %.4f", signal, self._seen[signal], before, after)
            return None
        drift = Drift(signal, self._seen[signal], before, after)
        self.drifts.append(drift)
        self.count += 1
        self._pending_catchup = True
        LOG.warning(
            "drift #%d on %s at %d: mean %.4f -> %.4f; next cycle catches up (x%d steps)",
            self.count, signal, drift.at, before, after, self.catchup_factor,
        )  # fmt: skip
        return drift

    def update_many(self, signal: str, values) -> list[Drift]:
        return [d for v in values if (d := self.update(signal, v)) is not None]

    def catchup_steps(self, steps: int) -> int:
        """Steps for the next cycle: ``steps * catchup_factor`` once after a drift."""
        if self._pending_catchup:
            self._pending_catchup = False
            return steps * self.catchup_factor
        return steps

    @property
    def catchup_pending(self) -> bool:
        return self._pending_catchup
