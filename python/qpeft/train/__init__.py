"""Supervised fine-tuning: TrainConfig and SFTTrainer (see :mod:`qpeft.train.trainer`)."""

from .config import METHODS, OPTIMIZERS, TrainConfig
from .evaluate import exact_match_accuracy, generate_answers, mean_loss, token_loss_sum
from .fastpath import enable_fast_path
from .plot import write_curve_png
from .trainer import SFTTrainer, TrainingDiverged, peak_rss_bytes, resolve_compute_dtype

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "SFTTrainer",
    "TrainConfig",
    "TrainingDiverged",
    "enable_fast_path",
    "exact_match_accuracy",
    "generate_answers",
    "mean_loss",
    "peak_rss_bytes",
    "resolve_compute_dtype",
    "token_loss_sum",
    "write_curve_png",
]
