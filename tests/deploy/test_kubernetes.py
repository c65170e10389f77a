"""Offline checks of deploy/kubernetes: every kustomization renders with the real `kubectl kustomize`,
every rendered object validates against the Kubernetes OpenAPI schemas (`kubernetes-validate`,
bundled schemas, strict: unknown fields fail) or, for the prometheus-operator ServiceMonitor, against
the JSON schema in tests/deploy/schemas/; then the wiring a reviewer would check: labels and
selectors agree, ports and probes, the export step feeds the model Triton loads, GPUs only on gpu.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from neco.cli import build_parser
from neco.export.cli import _load as load_export_config  # the exact args -> config step of `neco export`
from neco.export.config import ExportConfig

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu")
OVERLAYS = ("overlays/gpu", "overlays/cpu")
# The oldest Kubernetes the manifests target and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())
SERVICE_MONITOR_SCHEMA = Path(__file__).parent / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json"
EXPECTED_KINDS = {
    "Namespace": 1,
    "PersistentVolumeClaim": 1,
    "Deployment": 1,
    "Service": 2,
    "PodDisruptionBudget": 1,
    "HorizontalPodAutoscaler": 1,
    "ServiceMonitor": 1,
}

Manifest = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: `make deps-system` installs it (Debian package kubectl)")
    return found


def render(kustomization: str) -> list[Manifest]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def pod_spec(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]


def container(manifests: list[Manifest], name: str) -> Manifest:
    spec = pod_spec(manifests)
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def validate(manifest: Manifest, version: str) -> None:
    if manifest["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema for it
        jsonschema.Draft202012Validator(json.loads(SERVICE_MONITOR_SCHEMA.read_text())).validate(manifest)
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_validates(rendered, kustomization: str, version: str) -> None:
    manifests = rendered[kustomization]
    kinds = {kind: sum(m["kind"] == kind for m in manifests) for kind in {m["kind"] for m in manifests}}
    assert kinds == EXPECTED_KINDS
    for manifest in manifests:
        validate(manifest, version)
        assert manifest["kind"] == "Namespace" or manifest["metadata"]["namespace"] == "neco"


def test_validators_reject_broken_objects(rendered) -> None:
    """The validation above is not vacuous: a misspelt field or a malformed duration fails."""
    deployment = one(rendered["base"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError, match="httpGett"):
        validate(deployment, KUBERNETES_VERSIONS[-1])
    monitor = one(rendered["base"], "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError, match="15 seconds"):
        validate(monitor, KUBERNETES_VERSIONS[-1])


def test_triton_image_is_the_compose_release() -> None:
    """One NGC release everywhere: a TensorRT plan only deserialises in the Triton of its release."""
    compose = re.search(
        r"NECO_TRITON_IMAGE:-(nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3)", (REPO / "docker-compose.yml").read_text()
    )
    assert compose
    for manifests in render("overlays/gpu"), render("overlays/cpu"):
        assert container(manifests, "triton")["image"] == compose.group(1)
        assert container(manifests, "export")["image"] == "neco-prepare:0.1.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labels_selectors_and_ports_agree(rendered, overlay: str) -> None:
    manifests = rendered[overlay]
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    ports = {p["name"]: p["containerPort"] for c in ("triton", "gateway") for p in container(manifests, c)["ports"]}
    assert ports == {"http": 8010, "grpc": 8011, "metrics": 8002}  # clients reach Triton through the gateway
    service = one(manifests, "Service", "neco-triton")
    assert selects(service["spec"]["selector"], pod_labels)
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 8000, "http"),
        ("grpc", 8001, "grpc"),
        ("metrics", 8002, "metrics"),
    }
    headless = one(manifests, "Service", "neco-triton-pods")
    assert headless["spec"]["clusterIP"] == "None" and selects(headless["spec"]["selector"], pod_labels)
    monitor = one(manifests, "ServiceMonitor")["spec"]
    scraped = [
        s
        for s in manifests
        if s["kind"] == "Service" and selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert scraped == [service]  # exactly one scrape per replica
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    assert "namespaceSelector" not in monitor  # its own namespace: every object is in neco (first test)
    hpa = one(manifests, "HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["minReplicas"] >= 2 and one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_model_repository(rendered, overlay: str) -> None:
    manifests = rendered[overlay]
    triton, gateway = container(manifests, "triton"), container(manifests, "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert "http://127.0.0.1:8000/v2/health/live" in triton["livenessProbe"]["exec"]["command"]
    assert "http://127.0.0.1:8000/v2/health/ready" in triton["startupProbe"]["exec"]["command"]
    args = triton["args"]
    assert "--model-repository=/models" in args and "--model-control-mode=explicit" in args
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1"} <= set(args)  # only the gateway reaches it
    from neco.config import load_config
    from neco.serving.config import GatewayConfig

    assert gateway["command"] == ["neco", "gateway", "--config", "configs/gateway.yaml"]
    cfg = load_config(GatewayConfig, REPO / "configs" / "gateway.yaml", gateway["args"])
    assert (cfg.upstream_host, cfg.upstream_http_port, cfg.upstream_grpc_port) == ("127.0.0.1", 8000, 8001)
    assert (cfg.host, cfg.http_port, cfg.grpc_port) == ("0.0.0.0", 8010, 8011)
    assert gateway["image"] == container(manifests, "export")["image"]
    export = container(manifests, "export")
    assert {m["name"]: m.get("readOnly", False) for m in triton["volumeMounts"]}["model-repository"] is True
    assert {m["name"]: (m["mountPath"], m.get("readOnly", False)) for m in export["volumeMounts"]}[
        "model-repository"
    ] == ("/models", False)
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert "emptyDir" in volumes["model-repository"]
    assert (
        volumes["artefacts"]["persistentVolumeClaim"]["claimName"]
        == one(manifests, "PersistentVolumeClaim")["metadata"]["name"]
    )
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def export_config(manifests: list[Manifest]) -> tuple[str, ExportConfig]:
    """The initContainer's command line as `neco export` reads it: the CLI's parser, then the CLI's
    own arguments -> ExportConfig step (overrides validated by the config model)."""
    export = container(manifests, "export")
    env = {e["name"]: e["value"] for e in export["env"]}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in export["command"][1:] + export["args"]]
    args = build_parser().parse_args(argv)
    backend = "tensorrt" if args.export_command == "tensorrt" else "onnxruntime"
    return args.export_command, load_export_config(args, [f"backend={backend}"])


@pytest.mark.parametrize(
    ("overlay", "command", "kind"), [("overlays/gpu", "tensorrt", "KIND_GPU"), ("overlays/cpu", "onnx", "KIND_CPU")]
)
def test_export_step_writes_the_model_triton_loads(rendered, overlay: str, command: str, kind: str) -> None:
    manifests = rendered[overlay]
    subcommand, cfg = export_config(manifests)
    assert subcommand == command and cfg.triton.instance_kind == kind
    assert str(cfg.output) == "/models" and cfg.overwrite  # an emptyDir, but a restarted init must not fail
    assert f"--load-model={cfg.model_name}" in container(manifests, "triton")["args"]
    mounts = {m["name"]: m["mountPath"] for m in container(manifests, "export")["volumeMounts"]}
    assert cfg.source.startswith(mounts["artefacts"] + "/")
    if command == "tensorrt":  # caches on the pod's scratch volume, not the image's filesystem
        assert str(cfg.tensorrt.timing_cache).startswith(mounts["scratch"] + "/")


def gpus(resources: Manifest) -> set[str]:
    return {
        str(section.get("nvidia.com/gpu")) for section in (resources.get("requests", {}), resources.get("limits", {}))
    }


def test_gpus_only_on_the_gpu_overlay(rendered) -> None:
    gpu, cpu = rendered["overlays/gpu"], rendered["overlays/cpu"]
    for name in ("triton", "export"):
        assert gpus(container(gpu, name)["resources"]) == {"1"}
        assert gpus(container(cpu, name)["resources"]) == {"None"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(gpu)["tolerations"])
    assert "tolerations" not in pod_spec(cpu)
    cpu_triton = container(cpu, "triton")["resources"]
    assert cpu_triton["limits"]["cpu"] == cpu_triton["requests"]["cpu"]


def test_autoscaler_metric_is_served_by_the_adapter_rule(rendered) -> None:
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert (
        "nv_inference_queue_duration_us" in rule["seriesQuery"]
        and "nv_inference_request_success" in rule["metricsQuery"]
    )
    for overlay in OVERLAYS:
        metrics = one(rendered[overlay], "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metrics[0]["type"] == "Pods" and metrics[0]["pods"]["metric"]["name"] == rule["name"]["as"]
        assert metrics[0]["pods"]["target"]["type"] == "AverageValue"
    fallback = one(rendered["overlays/cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"][1]
    assert fallback["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
