"""Training: DSM losses on any forward SDE, the trainer (EMA, checkpoints, exact resume, DDP),
bundled data and the FD-digits quality measure."""
from .checkpoint import CheckpointError, load_checkpoint, load_model, read_config, save_checkpoint
from .data import DATASETS, TOYS, Dataset, load_dataset, mode_coverage, sample_toy
from .fd_digits import FDDigits, frechet_distance
from .losses import LOSSES, DSMLoss
from .sampling import generate
from .trainer import RECIPES, TrainConfig, Trainer, TrainingDiverged, TrainResult, recipe

__all__ = ["DSMLoss", "LOSSES", "Trainer", "TrainConfig", "TrainResult", "TrainingDiverged",
           "recipe", "RECIPES", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "load_model", "read_config", "Dataset", "DATASETS", "TOYS", "load_dataset",
           "sample_toy", "mode_coverage", "generate", "FDDigits", "frechet_distance"]
