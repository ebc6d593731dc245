"""docker-compose.yml: Compose accepts it (`docker compose config`), and the production stack keeps its
properties — restart policies, healthchecks, pinned images, workers after the API's migrations, MLflow's
allowed hosts, Flower behind a login, and a CUDA torch on the GPU worker.

The `config` tests need Compose (the v2 plugin `docker compose` or v1 `docker-compose`; .ci/run installs
Debian's `docker-compose`). Without it they skip, unless REGISTRY_TEST_REQUIRE_SERVICES=1, then they fail.
No image is pulled or built here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ONE_SHOT = {"buckets"}  # runs to completion; everything else is long-running
AFTER_API = {"worker", "gpu-worker", "dispatcher"}
CPU_TORCH_INDEX = "download.pytorch.org/whl/cpu"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _long_running() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _services().items() if name not in ONE_SHOT}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _compose_binary() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    msg = "neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " (REGISTRY_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(msg)


def _config(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # An empty env file: a developer's .env must not supply (or hide the absence of) a required variable.
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    base = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH" and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [*_compose_binary(), "--env-file", str(empty_env), "-f", str(COMPOSE_FILE), "--profile", "gpu",
         "config", *args],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- Compose itself


def test_compose_config_is_valid(tmp_path: Path) -> None:
    p = _config(tmp_path, {"FLOWER_BASIC_AUTH": "admin:test-only"}, "-q")
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_resolves_every_service(tmp_path: Path) -> None:
    p = _config(tmp_path, {"FLOWER_BASIC_AUTH": "admin:test-only"}, "--services")
    assert p.returncode == 0, p.stdout + p.stderr
    assert set(p.stdout.split()) == set(_services())


def test_compose_refuses_to_start_without_a_flower_password(tmp_path: Path) -> None:
    p = _config(tmp_path, {}, "-q")
    assert p.returncode != 0
    assert "FLOWER_BASIC_AUTH" in p.stdout + p.stderr


# --------------------------------------------------------------------------- properties of the stack


def test_long_running_services_restart_and_have_a_healthcheck() -> None:
    for name, svc in _long_running().items():
        assert svc.get("restart") in {"unless-stopped", "always", "on-failure"}, f"{name}: no restart policy"
        check = svc.get("healthcheck")
        assert isinstance(check, dict) and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_images_are_pinned() -> None:
    for name, svc in _services().items():
        image = svc.get("image")
        if image is None:
            assert "build" in svc, f"{name}: neither image nor build"
            continue
        ref = image.split("@", 1)[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: image {image!r} is not pinned"


def test_workers_and_dispatcher_start_after_the_api_migrated() -> None:
    services = _services()
    assert "healthcheck" in services["api"]
    for name in AFTER_API:
        deps = services[name].get("depends_on")
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        assert deps.get("api") == {"condition": "service_healthy"}, f"{name}: does not wait for a healthy api"


def test_mlflow_allows_the_compose_host_names() -> None:
    cmd = _command(_services()["mlflow"])
    assert cmd[:2] == ["mlflow", "server"]
    assert "--allowed-hosts" in cmd, "MLflow 3.x answers 403 to Host: mlflow:5000 without --allowed-hosts"
    hosts = set(cmd[cmd.index("--allowed-hosts") + 1].split(","))
    assert {"mlflow", "mlflow:5000", "localhost", "localhost:5000"} <= hosts
    assert "*" not in hosts
    env = _services()["api"]["environment"]
    assert env["REGISTRY_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_flower_requires_basic_auth_without_a_default() -> None:
    svc = _services()["flower"]
    value = str(svc.get("environment", {}).get("FLOWER_BASIC_AUTH", ""))
    flag = [a for a in _command(svc) if a.startswith("--basic-auth")]
    assert value or flag, "flower has no basic auth"
    for v in [value, *flag]:
        # Only `${FLOWER_BASIC_AUTH:?...}` (required, no default) is accepted: no password baked into the file.
        assert re.search(r"\$\{FLOWER_BASIC_AUTH:?\?", v), f"flower's basic auth is not a required variable: {v!r}"
    for port in svc.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"flower published beyond loopback: {port}"


def test_gpu_worker_gets_a_cuda_torch() -> None:
    svc = _services()["gpu-worker"]
    assert svc["environment"]["REGISTRY_DEVICE"] == "cuda"
    build = svc.get("build")
    assert isinstance(build, dict), "gpu-worker must build with its own TORCH_INDEX_URL (the default is CPU torch)"
    index = build.get("args", {}).get("TORCH_INDEX_URL")
    assert index is not None, "gpu-worker does not set TORCH_INDEX_URL"
    assert CPU_TORCH_INDEX not in index and "+cpu" not in index
    # The Dockerfile must install torch through that argument, with the CPU index only as its default.
    dockerfile = (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).read_text()
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.M)
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN") and "pip install" in line]
    assert installs and all("TORCH_INDEX_URL" in line and CPU_TORCH_INDEX not in line for line in installs)
    # And the CPU services keep the small CPU build (the Dockerfile's default).
    for name in ("api", "worker", "dispatcher", "flower", "mlflow"):
        b = _services()[name]["build"]
        assert b == "." or "TORCH_INDEX_URL" not in (b.get("args") or {}), name
