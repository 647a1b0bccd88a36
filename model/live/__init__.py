"""The live training process: ``userstream train-worker``.

Start reading at :mod:`model.live.worker` (one cycle: dirty users + replay ->
train -> checkpoint -> new weights to the embedder), :mod:`model.live.embedder`
(changed users embedded within a moment, whatever a cycle costs), then
:mod:`model.live.reservoir`
(the replay sample) and :mod:`model.live.drift` (ADWIN on the learner's own
signals). The learner itself is :class:`model.trainer.Trainer`.
"""

from model.live.drift import Drift, DriftMonitor
from model.live.embedder import Embedder
from model.live.reservoir import Reservoir
from model.live.worker import CycleReport, TrainingWorker, load_trainer, main

__all__ = [
    "CycleReport",
    "Drift",
    "DriftMonitor",
    "Embedder",
    "Reservoir",
    "TrainingWorker",
    "load_trainer",
    "main",
]
