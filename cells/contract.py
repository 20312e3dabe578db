"""The serving contract: one definition, used by training, export, serving and the batch job."""
from __future__ import annotations

from pathlib import Path

MODEL_NAME = "malaria_resnet50v2"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
IMAGE_SIZE = 128
CHANNELS = 3
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
INPUT_DTYPE = "UINT8"
OUTPUT_DTYPE = "FP32"
# Alphabetical, as the published folder layout and the reference tutorial order them.
CLASSES = ("Parasitized", "Uninfected")
PARASITIZED = CLASSES.index("Parasitized")
LABELS_FILE = "labels.txt"


def write_labels(directory: Path) -> Path:
    """Write the class order next to a model, one name per line (Triton's label file format)."""
    path = Path(directory) / LABELS_FILE
    path.write_text("".join(f"{name}\n" for name in CLASSES))
    return path
