"""fastpref's lean training loop (`fastpref train sft|dpo|reward`): data, the model's head boundary,
the loop, checkpoints, metrics and plots. Needs the `train` extra (transformers, PyYAML, tqdm,
matplotlib, datasets)."""

from fastpref.train.config import CONFIGS, DPOConfig, RewardConfig, SFTConfig, TrainConfig, make_config, parse_config
from fastpref.train.loop import Trainer, TrainingInterrupted, train

__all__ = [
    "CONFIGS",
    "DPOConfig",
    "RewardConfig",
    "SFTConfig",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "make_config",
    "parse_config",
    "train",
]
