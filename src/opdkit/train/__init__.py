"""The on-policy distillation trainer (see ``opdkit.train.loop`` for the algorithm)."""

from opdkit.train.loop import Trainer, TrainingAborted, TrainResult, train

__all__ = ["Trainer", "TrainResult", "TrainingAborted", "train"]
