"""Training run settings, with no Keras in them, so the command line reads its defaults quickly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cells.contract import MODEL_NAME
from cells.errors import BadInput
from cells.repository import DEFAULT_REPOSITORY, source_onnx

STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5", "head")  # where a fine-tune may start training


@dataclasses.dataclass
class TrainConfig:
    data: Path
    out: Path
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-5
    warmup_epochs: int = 1
    split: str = "patient"
    val_fraction: float = 0.3
    seed: int = 42
    weights: str = "none"
    class_weight: bool = True
    rotation: float = 20.0
    channel_gain: float = 0.0
    desaturate: float = 0.0
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    resume: bool = False


@dataclasses.dataclass
class AdaptConfig(TrainConfig):
    """TrainConfig's recipe fields (schedule, augmentation, resume) with a fine-tune's defaults."""

    weights: str = str(source_onnx(DEFAULT_REPOSITORY, MODEL_NAME))  # the model to start from
    fields: Path = Path("annotations.json")
    field_images: Path = Path("images")
    field_val_fraction: float = 0.3
    epochs: int = 8
    steps_per_epoch: int | None = 150
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-6
    warmup_epochs: int = 0
    rotation: float = 180.0
    nih_share: float = 0.5
    infected_share: float = 0.25
    stain_normalise: bool = True
    trainable_from: str = "conv4"
    finder: str = "learned"
    max_false_positive_rate: float = 0.005
    evaluate: Path | None = None  # a model to score and choose the threshold for, instead of training

    def __post_init__(self) -> None:
        if self.trainable_from not in STAGES:
            raise BadInput(f"trainable-from must be one of {', '.join(STAGES)}, not {self.trainable_from!r}")
        for name in ("nih_share", "infected_share", "field_val_fraction", "max_false_positive_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BadInput(f"{name.replace('_', '-')} must be in [0, 1), not {getattr(self, name)}")
