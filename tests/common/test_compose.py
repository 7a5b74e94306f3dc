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


def test_smoother_trains_its_first_checkpoint_into_its_volume_at_start():
    """The smoother's entrypoint trains the first checkpoint (a no-op when one exists) into the
    directory the service serves from, on a named volume, then execs the service (PID 1 gets
    SIGTERM); the health check's start period covers that first training."""
    compose = _compose()
    smoother = compose["services"]["smoother"]
    shell, flag, script, _name = smoother["entrypoint"]
    script = script.replace("$$", "$")  # compose's own interpolation escape
    command = smoother["command"]
    checkpoint_dir = command[command.index("--checkpoint-dir") + 1]
    assert (shell, flag) == ("sh", "-c")
    assert f"python -m smoother_svc.first_checkpoint --checkpoint-dir {checkpoint_dir} &&" in script
    assert script.endswith('exec "$@"')
    volume, target = smoother["volumes"][0].split(":")
    assert volume in compose["volumes"] and checkpoint_dir.startswith(target.rstrip("/") + "/")
    start_period = smoother["healthcheck"]["start_period"]
    assert start_period.endswith("s") and int(start_period[:-1]) >= 120


def test_each_image_installs_only_its_services_extra():
    services = _compose()["services"]
    extras = {"gateway": "gateway", "tracker": "tracker", "smoother": "smoother", "exporter": "exporter",
              "resource": "resource"}
    for name, extra in extras.items():
        assert services[name]["build"]["args"]["EXTRAS"] == extra
    dockerfile = (REPO / "Dockerfile").read_text()
    assert '[${EXTRAS}]"' in dockerfile and "pip install -e" not in dockerfile
