"""One training loop for every method, batch sampling, and atomic result records."""

from groupmixnorm.training.loop import TrainConfig, TrainingDiverged, TrainResult, evaluate, seed_everything, train
from groupmixnorm.training.records import environment_versions, write_json_atomic, write_text_atomic

__all__ = [
    "TrainConfig", "TrainResult", "TrainingDiverged", "environment_versions", "evaluate", "seed_everything", "train",
    "write_json_atomic", "write_text_atomic",
]
