"""The live training process: ``userstream train-worker``.

Start reading at :mod:`model.live.worker` (one cycle: dirty users + replay ->
train -> checkpoint -> re-embed -> stores), then :mod:`model.live.reservoir`
(the replay sample) and :mod:`model.live.drift` (ADWIN on the learner's own
signals). The learner itself is :class:`model.trainer.Trainer`.
"""

from model.live.drift import Drift, DriftMonitor
from model.live.reservoir import Reservoir
from model.live.worker import CycleReport, TrainingWorker, load_trainer, main

__all__ = [
    "CycleReport",
    "Drift",
    "DriftMonitor",
    "Reservoir",
    "TrainingWorker",
    "load_trainer",
    "main",
]
