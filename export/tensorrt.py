"""FP16 TensorRT engine from the ONNX model, for the GPU host (TensorRT is not installable here).

Engines are specific to the GPU and the TensorRT version: build them on the target, e.g. inside the
official Triton container (`deploy/`), and keep `engine.json` (versions, GPU) beside the plan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from cells.contract import DETECTOR_INPUT, DETECTOR_NAME, INPUT_NAME, INPUT_SHAPE, MAX_BATCH_SIZE, OPT_BATCH_SIZE
from cells.errors import BadInput, UserError


class TensorRTUnavailable(UserError, RuntimeError):
    """`import tensorrt` failed: build the engine on the GPU host instead."""


@dataclass(frozen=True)
class EngineProfile:
    min_batch: int = 1
    opt_batch: int = OPT_BATCH_SIZE
    max_batch: int = MAX_BATCH_SIZE
    fp16: bool = True
    workspace_mib: int = 4096
    input_name: str = INPUT_NAME
    item_shapes: tuple[tuple[int, ...], ...] = (INPUT_SHAPE, INPUT_SHAPE, INPUT_SHAPE)  # min, opt, max of one item

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BadInput(
                f"need 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) <= max batch ({self.max_batch})"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The optimization profile of the dynamic batch dimension."""
        low, typical, high = self.item_shapes
        return {
            "min": (self.min_batch, *low),
            "opt": (self.opt_batch, *typical),
            "max": (self.max_batch, *high),
        }


# The detector takes fields of any size: 1/4-resolution IML fields (240x320) are the optimum.
DETECTOR_PROFILE = EngineProfile(opt_batch=1, max_batch=8, input_name=DETECTOR_INPUT,
                                 item_shapes=((64, 64, 3), (240, 320, 3), (1024, 1024, 3)))


def trtexec_command(onnx: Path, plan: Path, profile: EngineProfile, timing_cache: Path | None = None) -> list[str]:
    """The equivalent trtexec invocation, for a GPU host with TensorRT's command-line tools."""
    dims = {k: "x".join(map(str, v)) for k, v in profile.shapes().items()}
    command = [
        "trtexec",
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        f"--minShapes={profile.input_name}:{dims['min']}",
        f"--optShapes={profile.input_name}:{dims['opt']}",
        f"--maxShapes={profile.input_name}:{dims['max']}",
        f"--memPoolSize=workspace:{profile.workspace_mib}M",
    ]
    if profile.fp16:
        command.append("--fp16")
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    return command


def build_engine(onnx: Path, plan: Path, profile: EngineProfile, timing_cache: Path | None = None) -> dict:
    """Parse the ONNX model, build a serialized engine with the profile, write it and its metadata."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTUnavailable(
            f"TensorRT is not installed here ({error}); on the GPU host run: "
            + " ".join(trtexec_command(onnx, plan, profile, timing_cache))
        ) from error

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    if profile.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    optimization = builder.create_optimization_profile()
    shapes = profile.shapes()
    optimization.set_shape(profile.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(optimization)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    metadata = {
        "tensorrt_version": trt.__version__,
        "gpu": _gpu_name(),
        "fp16": profile.fp16,
        "profile": {k: list(v) for k, v in shapes.items()},
        "onnx": str(onnx),
        "plan_bytes": plan.stat().st_size,
    }
    (plan.parent.parent / "engine.json").write_text(json.dumps(metadata, indent=2))
    return metadata


def _gpu_name() -> str:
    """The GPU the engine was built on, as nvidia-smi names it (metadata only)."""
    import subprocess

    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    names = result.stdout.strip().splitlines()
    return names[0] if result.returncode == 0 and names else "unknown"


def build_repository_engine(repository: Path, name: str, profile: EngineProfile) -> tuple[dict, Path]:
    """On the GPU host: model.plan from the repository's ONNX model, and config.pbtxt regenerated for it."""
    from cells.repository import engine_source, version_dir
    from export.triton_config import DETECTOR_SERVING, ServingParameters, write_model_config

    if name == DETECTOR_NAME:
        profile, serving = replace(DETECTOR_PROFILE, fp16=profile.fp16), DETECTOR_SERVING
    else:
        serving = ServingParameters(name=name, max_batch_size=profile.max_batch)
    plan = version_dir(repository, name) / "model.plan"
    metadata = build_engine(engine_source(repository, name), plan, profile, Path(repository) / "timing.cache")
    config = write_model_config(repository, serving)
    return metadata, config
