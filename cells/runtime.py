"""The CPU runtimes of the repository's ONNX models (ONNX Runtime, OpenVINO): evaluation, export parity,
benchmarks and the embedded server share them."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np

from cells.contract import CLASSES, INPUT_NAME, OUTPUT_NAME


def predict_in_batches(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Bounded memory for any number of crops; an empty input gives an empty [0,2] result."""
    parts = [np.asarray(predict(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)), np.float32)


def onnx_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session of the model at `path`, on `threads` threads (0: every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Spinning threads steal the cores that decoding and other servers need on small machines.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxGraph:
    """A graph of several inputs (the crop graph) run by ONNX Runtime: inputs by name -> its first output."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.session = onnx_session(path, threads)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, inputs)[0]


class OnnxModel:
    """One input, one output, in chunks of `batch_size`: by default the classifier's contract,
    uint8 crops [N,128,128,3] in, probabilities [N,2] out."""

    def __init__(self, path: Path, batch_size: int = 64, threads: int = 0, input_name: str = INPUT_NAME,
                 output_name: str = OUTPUT_NAME) -> None:
        self.session = onnx_session(path, threads)
        self.batch_size, self.input_name, self.output_name = batch_size, input_name, output_name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return predict_in_batches(self._run, images, self.batch_size)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class OpenVinoModel:
    """`OnnxModel`'s contract, run by OpenVINO's CPU plugin from an ONNX file or OpenVINO's own model
    (model.xml), in its default precision for this CPU: BF16 for FP32 layers where the CPU has AMX or
    AVX-512 BF16, else FP32; INT8 layers stay INT8.

    `throughput`: for calls of many small images (the classifier's crops), each call is split over
    OpenVINO's CPU streams, one request each (on 2 cores: 2 streams of 1 thread, 1.1x a single
    2-thread request, docs/performance.md). Without it, a call runs as one request on every thread:
    the detector's one field per call.
    """

    def __init__(self, path: Path, batch_size: int = 64, threads: int = 0, input_name: str = INPUT_NAME,
                 output_name: str = OUTPUT_NAME, throughput: bool = False) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.requests = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if throughput else 1
        self.queue = ov.AsyncInferQueue(compiled, self.requests)
        self.output = compiled.output(output_name)
        self.batch_size, self.input_name = batch_size, input_name
        self.lock = threading.Lock()  # one call at a time: the server's threads share the requests

    def __call__(self, images: np.ndarray) -> np.ndarray:
        chunk = max(1, min(self.batch_size, -(-len(images) // self.requests)))
        return predict_in_batches(self._run_parallel, images, chunk * self.requests)

    def _run_parallel(self, batch: np.ndarray) -> np.ndarray:
        """`batch` in one piece per request, run at once; the answers in order."""
        pieces = np.array_split(batch, min(self.requests, len(batch)))
        answers: list[np.ndarray | None] = [None] * len(pieces)

        def keep(request, index: int) -> None:
            answers[index] = request.get_tensor(self.output).data.copy()

        with self.lock:
            self.queue.set_callback(keep)
            for index, piece in enumerate(pieces):
                self.queue.start_async({self.input_name: piece}, index)
            self.queue.wait_all()
        return np.concatenate(answers)


RUNTIMES = {"onnxruntime": OnnxModel, "openvino": OpenVinoModel}
AUTO = "auto"
# Which runtime ran each form of model faster, by the CPU's kind: `smearscope bench runtimes`, the
# released models, 2 threads (docs/performance.md, "CPU runtimes"). The forms: "openvino-int8", a
# model with OpenVINO's own INT8 (NNCF) beside its ONNX; "int8", an INT8 (QDQ) ONNX only; "fp32", an
# FP32 ONNX only. OpenVINO's speed on FP32 models is BF16 (its default where the CPU has AMX or
# AVX-512 BF16; at FP32 it matched ONNX Runtime), so it is chosen only where its answers passed the
# gates against ONNX Runtime's: the detector's cells F1 0.999 (gate 0.99). On a QDQ ONNX it was
# slower than ONNX Runtime. A CPU kind not measured keeps ONNX Runtime, the runtime the models were
# validated with.
MEASURED_FASTER = {
    ("amx", "openvino-int8"): "openvino",  # Intel Xeon (AMX), NNCF INT8: 410-449 vs 299 img/s (issue 28)
    ("amx", "int8"): "onnxruntime",  # 299 vs 217 img/s
    ("amx", "fp32"): "openvino",  # detector 105 vs 31 fields/s
    ("avx512-vnni", "openvino-int8"): "openvino",  # AMD EPYC: NNCF INT8 vs QDQ, see bench/results/runtimes.json
    ("avx512-vnni", "int8"): "onnxruntime",  # 246 vs 237 img/s
    ("avx512-vnni", "fp32"): "openvino",  # detector 41.0 vs 22.3 fields/s, cells F1 0.999
}


def cpu_kind(flags: set[str] | None = None) -> str:
    """"amx", "avx512-vnni" or "avx2": what decides which runtime's CPU kernels are fastest."""
    if flags is None:
        lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    if "amx_int8" in flags:
        return "amx"
    return "avx512-vnni" if "avx512_vnni" in flags else "avx2"


def is_quantized(path: Path) -> bool:
    """An INT8 (QDQ) model: one with QuantizeLinear nodes."""
    import onnx

    return any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path), load_external_data=False).graph.node)


def model_form(repository: Path, name: str) -> str:
    """"openvino-int8", "int8" or "fp32": what each runtime would serve of the named model."""
    from cells.repository import openvino_model, served_onnx

    if openvino_model(repository, name).is_file():
        return "openvino-int8"
    return "int8" if is_quantized(served_onnx(repository, name)) else "fp32"


def choose_runtime(repository: Path, name: str, runtime: str = AUTO, flags: set[str] | None = None) -> str:
    """`runtime` itself, or for "auto" the one measured faster for this model's form on this kind of CPU."""
    if runtime != AUTO:
        return runtime
    return MEASURED_FASTER.get((cpu_kind(flags), model_form(repository, name)), "onnxruntime")
