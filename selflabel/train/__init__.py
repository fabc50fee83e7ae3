"""The thin training loop (SeLa and CARP) that uses the solver: ``selflabel.train.train``."""

from .loop import TrainConfig, TrainResult, label_schedule, train

__all__ = ["TrainConfig", "TrainResult", "label_schedule", "train"]
