"""What a Triton model repository's layout means, for export (which writes it) and serve (which reads it).

    <repository>/<model>/config.pbtxt, labels.txt, 1/model.onnx | 1/model.plan [, 1/model.xml + model.bin]
                         [, source/model.onnx] [, configs/openvino.pbtxt]

1/model.xml is the OpenVINO model of a CPU repository (the classifier's INT8 by NNCF); the
`openvino` config serves the version with Triton's OpenVINO backend (`--model-config-name=openvino`).
"""
from __future__ import annotations

from pathlib import Path

from cells.errors import MissingInput

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"  # the released model, from any cwd
CONFIG_FILE = "config.pbtxt"
VERSION = 1
# The file each platform serves from a version directory, in order of preference.
PLATFORM_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}
OPENVINO_FILE = "model.xml"  # its weights: model.bin beside it
CONFIGS_DIR = "configs"  # Triton's custom configs, chosen by `tritonserver --model-config-name`
OPENVINO_CONFIG = "openvino"
# Not a version (Triton ignores directories that are not numbers): the FP16 ONNX beside an INT8 version.
SOURCE_DIR = "source"


def released_path(path: Path | str) -> str:
    """How a released file (a report, decision.json) names a path: relative to the working directory
    when inside it, else only its folder and name, so no path of the machine that made it is kept."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(path.parent.name) / path.name)


def model_dir(repository: Path, name: str) -> Path:
    return Path(repository) / name


def version_dir(repository: Path, name: str) -> Path:
    return model_dir(repository, name) / str(VERSION)


def served_onnx(repository: Path, name: str) -> Path:
    """The ONNX model Triton serves on CPUs: 1/model.onnx."""
    return version_dir(repository, name) / "model.onnx"


def openvino_model(repository: Path, name: str) -> Path:
    """1/model.xml: the model OpenVINO serves where export made one (else it serves 1/model.onnx)."""
    return version_dir(repository, name) / OPENVINO_FILE


def runtime_model(repository: Path, name: str, runtime: str) -> Path:
    """The file `runtime` (cells.runtime) serves: OpenVINO its own model where there is one."""
    own = openvino_model(repository, name)
    return own if runtime == "openvino" and own.is_file() else served_onnx(repository, name)


def custom_config(repository: Path, name: str, config_name: str) -> Path:
    return model_dir(repository, name) / CONFIGS_DIR / f"{config_name}.pbtxt"


def source_onnx(repository: Path, name: str) -> Path:
    """source/model.onnx: the FP16 model kept beside an INT8 version, for GPU engines."""
    return model_dir(repository, name) / SOURCE_DIR / "model.onnx"


def adapt_split(repository: Path, name: str) -> Path:
    """assets/adapt-split.json: the lab's training and validation fields (and NIH patients) of an adapted model."""
    return model_dir(repository, name) / "assets" / "adapt-split.json"


def platform_of(version: Path) -> str:
    """tensorrt_plan when the version holds an engine, else onnxruntime_onnx; an empty version is an error."""
    for platform, filename in PLATFORM_FILES.items():
        if (version / filename).is_file():
            return platform
    raise MissingInput(f"no {' or '.join(PLATFORM_FILES.values())} in {version}")


def read_model_config(model: Path):
    """Parse a model's config.pbtxt with Triton's schema (a ModelConfig); unknown fields are an error, as in Triton."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    path = Path(model, CONFIG_FILE)
    if not path.is_file():
        raise MissingInput(f"no {CONFIG_FILE} in {model}")
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def engine_source(repository: Path, name: str) -> Path:
    """The ONNX a GPU engine is built from: source/model.onnx (FP16) where the version serves INT8 to CPUs."""
    source = source_onnx(repository, name)
    return source if source.is_file() else served_onnx(repository, name)
