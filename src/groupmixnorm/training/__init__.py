"""One training loop for every method, batch sampling, and what a run's record says about its environment."""

from groupmixnorm.training.environment import environment_versions
from groupmixnorm.training.loop import TrainConfig, TrainingDiverged, TrainResult, evaluate, seed_everything, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "environment_versions", "evaluate", "seed_everything", "train"]
