"""GPU-host and Kubernetes files, validated offline (they are not run here: no GPU, no cluster)."""
import argparse
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from batch.commands import configure_run

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_triton_manifests_pass_the_kubernetes_schema():
    documents = _documents(DEPLOY / "k8s" / "triton.yaml")
    assert [d["kind"] for d in documents] == ["DaemonSet", "Service", "Service"]
    for document in documents:
        kubernetes_validate.validate(document, "1.30", strict=True)
    deployment = next(d for d in documents if d["kind"] == "DaemonSet")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    # The pod is SIGKILLed at the end of its grace period: it must cover the preStop sleep, Triton's
    # wait for requests in flight and the unloading of its models.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + exit_timeout + 5
    services = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "Service"}
    assert sorted(p["port"] for p in services["triton"]["ports"]) == [8000, 8001, 8002]
    assert services["triton-local"]["internalTrafficPolicy"] == "Local"  # the caller's own node only
    assert services["triton-local"]["selector"] == services["triton"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_rayjob_runs_the_batch_job_against_the_triton_service():
    (job,) = _documents(DEPLOY / "k8s" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = job["spec"]["entrypoint"].split()
    assert "batch/run.py" in entrypoint
    urls = entrypoint[entrypoint.index("--triton-url") + 1 : entrypoint.index("--triton-url") + 3]
    assert urls == ["triton-local:8001", "triton:8001"]  # node-local first, then any
    assert entrypoint[entrypoint.index("--triton-policy") + 1] == "first-up"
    parser = argparse.ArgumentParser()
    configure_run(parser)
    parser.parse_args(entrypoint[2:])  # every flag of the entrypoint is one the job takes
    for flag in ("--input", "--output"):  # archives in object storage
        assert entrypoint[entrypoint.index(flag) + 1].startswith("s3://")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert "volumes" not in pod["spec"]  # no shared filesystem: every pod reads and writes the bucket
        assert all(c["envFrom"] == [{"secretRef": {"name": "smearscope-s3"}}] for c in pod["spec"]["containers"])
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": pod}, "1.30", strict=True)


def test_compose_builds_the_engine_before_serving():
    compose = yaml.safe_load((DEPLOY / "gpu" / "docker-compose.yml").read_text())
    engine, triton = compose["services"]["engine"], compose["services"]["triton"]
    assert engine["image"].startswith("nvcr.io/nvidia/tensorrt:") and triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert engine["image"].split(":")[1] == triton["image"].split(":")[1]  # one NGC release: same TensorRT
    assert triton["depends_on"]["engine"]["condition"] == "service_completed_successfully"
    assert "--model-repository=/models" in triton["command"]
    script = (DEPLOY / "gpu" / "build-engine.sh").read_text()
    assert "python -m smearscope build-engine" in script


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_engine_entry_point_without_tensorrt_names_trtexec(tmp_path):
    from export.tensorrt import TensorRTUnavailable
    from smearscope.cli import main

    with pytest.raises(TensorRTUnavailable, match="trtexec --onnx="):
        main(["build-engine", "--debug", "--repository", str(tmp_path)])


def test_cpu_compose_serves_the_generated_cpu_config():
    from cells.repository import read_model_config
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    compose = yaml.safe_load((DEPLOY / "cpu" / "docker-compose.yml").read_text())
    (triton,) = compose["services"].values()
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and "deploy" not in triton  # no GPU reserved
    assert "--model-repository=/models" in triton["command"]
    # The repository, and the project for the field model's Python backend to import (installed at start).
    assert triton["volumes"] == ["../../model_repository:/models:ro", "../..:/workspace/smearscope"]
    assert "pip install -q /workspace/smearscope" in triton["entrypoint"][2]
    assert "--model-config-name=${TRITON_MODEL_CONFIG:-openvino}" in triton["command"]
    repository = DEPLOY.parent / "model_repository"
    config = read_model_config(repository / "malaria_resnet50v2")
    assert config.platform == "onnxruntime_onnx"
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_CPU"]
    for model in ("malaria_resnet50v2", "rbc_detector"):  # the OpenVINO backend's: what its version folder holds
        openvino = text_format.Parse((repository / model / "configs" / "openvino.pbtxt").read_text(), pb.ModelConfig())
        assert openvino.backend == "openvino" and not openvino.platform
        assert (repository / model / "1" / openvino.default_model_filename).is_file()
        assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in openvino.instance_group] == ["KIND_CPU"]
        assert (openvino.input, openvino.output) == tuple(getattr(read_model_config(repository / model), side)
                                                          for side in ("input", "output"))
