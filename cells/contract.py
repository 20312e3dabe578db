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
UNINFECTED = CLASSES.index("Uninfected")
LABELS_FILE = "labels.txt"
# Image files every stage reads (cell folders, smear fields, archive members).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})


def write_labels(directory: Path) -> Path:
    """Write the class order next to a model, one name per line (Triton's label file format)."""
    path = Path(directory) / LABELS_FILE
    path.write_text("".join(f"{name}\n" for name in CLASSES))
    return path


# Serving defaults shared by export (Triton config, TensorRT profile), the client and the batch job.
MAX_BATCH_SIZE = 256  # the largest request Triton accepts, and the TensorRT profile's max
OPT_BATCH_SIZE = 64  # the TensorRT profile's optimum
REQUEST_BATCH_SIZE = 64  # crops per request the client sends
MAX_IN_FLIGHT = 4  # requests the client keeps in flight


# The learned red-cell detector (train/detector.py, cells/detect.py): a second model in the repository.
DETECTOR_NAME = "rbc_detector"
DETECTOR_INPUT = "field"  # uint8 [N, H, W, 3]: fields at 1/DETECTOR_SCALE, H and W multiples of DETECTOR_MULTIPLE
DETECTOR_OUTPUT = "maps"  # FP32 [N, H, W, 2]: P(inside a red cell), centre heatmap
DETECTOR_SCALE = 4
DETECTOR_MULTIPLE = 16  # the detector downsamples 4 times
# A typical red cell at the IML fields' magnification, px: fields at other magnifications are
# rescaled to it (--cell-diameter), for the detector and the classical finder alike.
DETECTOR_CELL_DIAMETER = 70.0

# The crop graph (export/crop_graph.py): a field's cells cut, masked, resized and stain-normalised in a graph.
CROPS_NAME = "cell_crops"
CROPS_INPUTS = ("field", "labels", "windows", "factor", "normalise")  # uint8 [H,W,3], int32 [h,w], int32 [N,4], float32 [1], bool [1]
CROPS_OUTPUT = "crops"  # uint8 [N, 128, 128, 3]

# The field model: one encoded field in (JPEG, PNG, TIFF as stored), its cells out, in one request.
FIELD_NAME = "smear_field"
FIELD_INPUT = "encoded"  # BYTES [1]
# Optional inputs, each [1]: name -> Triton datatype. A request without them gets the server's defaults.
FIELD_OPTIONS = {"threshold": "FP32", "cell_diameter": "FP32", "keep_border": "BOOL", "stain_normalise": "BOOL",
                 "max_pixels": "INT64"}
# Outputs: boxes INT32 [n,4] (x, y, w, h in the field's px), areas INT32 [n], probabilities FP32 [n,2],
# calls INT32 [n] (index into CLASSES, by the classifier's decision rule), counts INT32 [2] (per class),
# size INT32 [2] (width, height), error BYTES [1] (empty, or why the field cannot be read).
FIELD_OUTPUTS = {"boxes": ("INT32", (-1, 4)), "areas": ("INT32", (-1,)), "probabilities": ("FP32", (-1, 2)),
                 "calls": ("INT32", (-1,)), "counts": ("INT32", (2,)), "size": ("INT32", (2,)), "error": ("BYTES", (1,))}
# The NumPy type of each Triton datatype the field model's tensors use (server and client alike).
NUMPY_TYPES = {"FP32": "float32", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "BYTES": "bytes"}
FIELD_MAX_BATCH = 8  # fields a call of the field model takes at once (their crops are classified together)
