"""The OPD trainer: build (config -> components), step (one rollout batch), loop (the run), checkpoints."""

from opdkit.train.loop import Trainer, TrainingAborted, TrainResult, train

__all__ = ["Trainer", "TrainResult", "TrainingAborted", "train"]
