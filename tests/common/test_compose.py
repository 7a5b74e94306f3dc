"""compose.yaml stays true to the code: one container per service, each started with flags its
config accepts, grpc health checks, a GPU for the tracker, job data on a named volume."""

from __future__ import annotations

import importlib

import yaml

from mocap_common.config import load_config
from tests.support import REPO

SERVICE_CONFIGS = {
    "gateway": ("gateway.config", "GatewayConfig", 50051),
    "tracker": ("tracker_svc.config", "TrackerServiceConfig", 50052),
    "smoother": ("smoother_svc.config", "SmootherConfig", 50053),
    "exporter": ("exporter_svc.config", "ExporterConfig", 50054),
    "resource": ("resource_svc.config", "ResourceConfig", 50055),
}


def _compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_one_container_per_service_started_with_valid_flags():
    services = _compose()["services"]
    assert set(services) == set(SERVICE_CONFIGS)
    for name, (module, cls_name, port) in SERVICE_CONFIGS.items():
        command = services[name]["command"]
        assert command[:3] == ["python", "-m", module.split(".")[0]]
        config_cls = getattr(importlib.import_module(module), cls_name)
        config = load_config(config_cls, command[3:], env={})
        assert config.port == port
        assert load_config(config_cls, [], env={}).port == port, f"{name}'s default port"


def test_health_checks_gpu_and_volumes():
    compose = _compose()
    services = compose["services"]
    for name, (_, _, port) in SERVICE_CONFIGS.items():
        test = services[name]["healthcheck"]["test"]
        assert test[-2:] == ["mocap_common.healthcheck", f"localhost:{port}"]
    gpu = services["tracker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "jobs" in compose["volumes"]
    assert any(v.startswith("jobs:") for v in services["gateway"]["volumes"])
