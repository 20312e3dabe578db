"""FP16 TensorRT engine from the ONNX model, for the GPU host (TensorRT is not installable here).

Engines are specific to the GPU and the TensorRT version: build them on the target, e.g. inside the
official Triton container (`deploy/`), and keep `engine.json` (versions, GPU) beside the plan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from cells.contract import (
    CROPS_INPUTS, CROPS_NAME, DETECTOR_INPUT, DETECTOR_NAME, INPUT_NAME, INPUT_SHAPE, MAX_BATCH_SIZE, OPT_BATCH_SIZE,
)
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
    # Inputs without a batch dimension, each with its min, opt and max shape (the crop graph's); when
    # given, they are the profile and the batched input above is not.
    unbatched: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()
    tf32: bool = True  # TensorRT's default for FP32 layers; off where exact float results matter

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BadInput(
                f"need 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) <= max batch ({self.max_batch})"
            )

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """The optimization profile: each input's min, opt and max shape."""
        if self.unbatched:
            return {name: dict(zip(("min", "opt", "max"), shapes)) for name, shapes in self.unbatched}
        low, typical, high = self.item_shapes
        return {self.input_name: {
            "min": (self.min_batch, *low),
            "opt": (self.opt_batch, *typical),
            "max": (self.max_batch, *high),
        }}


# The detector takes fields of any size: 1/4-resolution IML fields (240x320) are the optimum.
DETECTOR_PROFILE = EngineProfile(opt_batch=1, max_batch=8, input_name=DETECTOR_INPUT,
                                 item_shapes=((64, 64, 3), (240, 320, 3), (1024, 1024, 3)))
# The crop graph: one field of up to 4096 px a side (1280x960 IML fields the optimum), its label map
# at 1/4, up to 1,024 cells. FP32 without TF32: its levels are rounded as PIL rounds them, and
# FP16 or TF32 products would move many by a level.
CROPS_PROFILE = EngineProfile(fp16=False, tf32=False, unbatched=tuple(zip(CROPS_INPUTS, (
    ((16, 16, 3), (960, 1280, 3), (4096, 4096, 3)),
    ((4, 4), (240, 320), (1024, 1024)),
    ((1, 4), (128, 4), (1024, 4)),
    ((1,), (1,), (1,)),
    ((1,), (1,), (1,)),
))))


def trtexec_command(onnx: Path, plan: Path, profile: EngineProfile, timing_cache: Path | None = None) -> list[str]:
    """The equivalent trtexec invocation, for a GPU host with TensorRT's command-line tools."""
    shapes = profile.shapes()

    def dims(kind: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[kind]))}" for name, s in shapes.items())

    command = [
        "trtexec",
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        f"--minShapes={dims('min')}",
        f"--optShapes={dims('opt')}",
        f"--maxShapes={dims('max')}",
        f"--memPoolSize=workspace:{profile.workspace_mib}M",
    ]
    if profile.fp16:
        command.append("--fp16")
    if not profile.tf32:
        command.append("--noTF32")
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
    if not profile.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    optimization = builder.create_optimization_profile()
    shapes = profile.shapes()
    for name, shape in shapes.items():
        optimization.set_shape(name, shape["min"], shape["opt"], shape["max"])
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
        "profile": {name: {k: list(v) for k, v in shape.items()} for name, shape in shapes.items()},
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
    from cells.repository import engine_source, served_onnx, version_dir
    from export.triton_config import DETECTOR_SERVING, ServingParameters, write_model_config

    if name == CROPS_NAME:  # not a model of weights: always its own profile, FP32
        from export.field_model import write_crops_config

        plan = version_dir(repository, name) / "model.plan"
        metadata = build_engine(served_onnx(repository, name), plan, CROPS_PROFILE, Path(repository) / "timing.cache")
        return metadata, write_crops_config(repository, platform="tensorrt_plan")
    if name == DETECTOR_NAME:
        profile, serving = replace(DETECTOR_PROFILE, fp16=profile.fp16), DETECTOR_SERVING
    else:
        serving = ServingParameters(name=name, max_batch_size=profile.max_batch)
    plan = version_dir(repository, name) / "model.plan"
    metadata = build_engine(engine_source(repository, name), plan, profile, Path(repository) / "timing.cache")
    config = write_model_config(repository, serving)
    return metadata, config
