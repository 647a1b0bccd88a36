"""The offline protocol (PROTOCOL section 1): ``userstream train`` and ``evaluate``.

Start reading at :mod:`model.offline.train` (epochs over prefixes or windows,
early stopping on validation, :class:`OfflineConfig`), then
:mod:`model.offline.split` (leave-one-out), :mod:`model.offline.evaluate`
(full ranking, history masked, ties against the target) and
:mod:`model.offline.averaging` (the weights' moving average).
:mod:`model.offline.datasets` reads a data set file into sequences.
"""

from model.offline.datasets import load_sequences, sequences_from_events
from model.offline.evaluate import evaluate_checkpoint, evaluate_split
from model.offline.split import LeaveOneOut, leave_one_out
from model.offline.train import TrainResult, train_offline
from userstream.settings import RANKING_MODEL, OfflineConfig

__all__ = [
    "RANKING_MODEL",
    "LeaveOneOut",
    "OfflineConfig",
    "TrainResult",
    "evaluate_checkpoint",
    "evaluate_split",
    "leave_one_out",
    "load_sequences",
    "sequences_from_events",
    "train_offline",
]
