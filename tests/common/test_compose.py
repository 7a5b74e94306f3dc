"""compose.yaml stays true to the code: one container per service (plus PostgreSQL for the job
store), each started with flags and variables its config accepts, grpc health checks, a GPU for the
tracker, job data on a named volume shared by the gateway replicas, replica counts from variables."""

from __future__ import annotations

import dataclasses
import importlib
import re
from urllib.parse import urlsplit

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


# Containers that are not ours: images run as they are.
INFRASTRUCTURE = {"postgres"}
# Services that may run as several replicas, and the variable that sets how many.
REPLICAS = {"gateway": "GATEWAY_REPLICAS", "tracker": "TRACKER_REPLICAS", "smoother": "SMOOTHER_REPLICAS",
            "exporter": "EXPORTER_REPLICAS"}


def _compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def _interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """compose's `${VAR}` / `${VAR:-default}` / `${VAR-default}` with `env` (empty: the defaults)."""
    env = env or {}

    def one(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-)([^}]*))?\}", one, value)


def _environment(service: dict) -> dict[str, str]:
    return {name: _interpolate(str(value)) for name, value in (service.get("environment") or {}).items()}


def test_one_container_per_service_started_with_valid_flags():
    services = _compose()["services"]
    assert set(services) == set(SERVICE_CONFIGS) | INFRASTRUCTURE
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


def test_every_variable_is_a_setting_and_the_gateway_config_loads():
    """Each MOCAP_* variable a container gets is read by some service's config (one with a
    service's prefix by that service's), so a misspelt name cannot pass silently; the gateway's
    config loads from its command and environment as compose interpolates them by default."""
    services = _compose()["services"]
    configs = {name: getattr(importlib.import_module(module), cls_name)
               for name, (module, cls_name, _) in SERVICE_CONFIGS.items()}
    env_names = {name: {f.metadata.get("env") or cls.env_prefix() + f.name.upper() for f in dataclasses.fields(cls)}
                 for name, cls in configs.items()}
    # Shared names (a setting's explicit env=, like MOCAP_TRACKER_ADDR) may be read by any service.
    shared = {f.metadata["env"] for cls in configs.values() for f in dataclasses.fields(cls) if f.metadata.get("env")}
    for name in SERVICE_CONFIGS:
        for variable in _environment(services[name]):
            assert variable.startswith("MOCAP_"), f"{name}: {variable}"
            if variable in shared:
                continue
            owner = next((svc for svc, cls in configs.items() if variable.startswith(cls.env_prefix())), None)
            assert owner and variable in env_names[owner], \
                f"{name}'s {variable} is no setting of {owner or 'any service'}'s config"
    gateway = services["gateway"]
    config = load_config(configs["gateway"], gateway["command"][3:], env=_environment(gateway))
    assert config.tracker_addr == "dns:///tracker:50052"
    assert config.smoother_addr == "dns:///smoother:50053"
    assert config.exporter_addr == "dns:///exporter:50054"
    assert config.database_url.startswith("postgresql://")
    assert config.job_claim_ttl_s == 10


def test_gateway_job_store_is_the_postgres_service():
    compose = _compose()
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "ports" not in postgres, "PostgreSQL is for the gateways only: not published on the host"
    volume, target = postgres["volumes"][0].split(":")
    assert volume in compose["volumes"] and target == "/var/lib/postgresql/data"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    pg_env = postgres["environment"]
    # The password comes from the environment, with a development default.
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:-[^}]+\}", pg_env["POSTGRES_PASSWORD"])

    gateway = services["gateway"]
    url = urlsplit(_environment(gateway)["MOCAP_GATEWAY_DATABASE_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("postgresql", "postgres", 5432, "/" + pg_env["POSTGRES_DB"])
    assert url.username == pg_env["POSTGRES_USER"] and url.password == _interpolate(pg_env["POSTGRES_PASSWORD"])
    # The same variable sets both ends.
    assert "${POSTGRES_PASSWORD:-" in gateway["environment"]["MOCAP_GATEWAY_DATABASE_URL"]
    assert _interpolate(gateway["environment"]["MOCAP_GATEWAY_DATABASE_URL"], {"POSTGRES_PASSWORD": "s3cret"}) \
        == "postgresql://mocap:s3cret@postgres:5432/mocap"
    assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_replicas_from_variables_stages_by_dns_and_one_shared_jobs_volume():
    compose = _compose()
    services = compose["services"]
    for name, variable in REPLICAS.items():
        replicas = services[name]["deploy"]["replicas"]
        assert re.fullmatch(rf"\$\{{{variable}:-1\}}", str(replicas)), f"{name}: {replicas}"
        assert _interpolate(replicas) == "1" and _interpolate(replicas, {variable: "3"}) == "3"
    # The broker owns the leases: one container, never scaled.
    assert services["resource"].get("deploy", {}).get("replicas", 1) == 1
    # Replicas need compose's generated names; a fixed one would refuse the second container.
    assert not any("container_name" in service for service in services.values())
    # Stages by dns:/// (every replica's address); the default is one gateway on host port 50051,
    # several take one port each from a GATEWAY_PORTS range.
    environment = _environment(services["gateway"])
    for name in ("tracker", "smoother", "exporter"):
        port = SERVICE_CONFIGS[name][2]
        assert environment[f"MOCAP_{name.upper()}_ADDR"] == f"dns:///{name}:{port}"
    (ports,) = services["gateway"]["ports"]
    assert _interpolate(ports) == "50051:50051"
    assert _interpolate(ports, {"GATEWAY_PORTS": "50051-50053"}) == "50051-50053:50051"
    # Stages publish nothing on the host, so any number of them fit.
    assert not any("ports" in services[name] for name in ("tracker", "smoother", "exporter"))
    # Every gateway replica mounts the same named volume (not a per-container anonymous one).
    volume, target = services["gateway"]["volumes"][0].split(":")
    assert volume == "jobs" and volume in compose["volumes"] and target == "/data"
