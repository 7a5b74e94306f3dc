"""deploy/k8s/ is valid Kubernetes and stays true to the mesh: every manifest passes the API
schemas (kubernetes-validate, strict: an unknown or misspelt field fails; its schemas ship with the
package, no network), each Deployment is probed through grpc.health.v1 on its gRPC port, the
tracker asks for a GPU, the gateway's database URL comes from a Secret, the stages are headless
Services the gateways reach by dns:///, and every container starts the way compose.yaml starts it."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import yaml
from kubernetes_validate import utils as k8s_validate

from tests.common.test_compose import SERVICE_CONFIGS
from tests.support import REPO

K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes minor these manifests are for, and the newest the pinned validator ships.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
STAGES = ("tracker", "smoother", "exporter")
REPLICAS = {"gateway": 2, "tracker": 2, "smoother": 1, "exporter": 1, "resource": 1}


def _files():
    return sorted(K8S.glob("*.yaml"))


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in _files():
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] == kind}


def _container(name: str) -> dict:
    (container,) = _objects("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def test_manifests_are_there():
    names = {path.name for path in _files()}
    assert {"gateway.yaml", "tracker.yaml", "smoother.yaml", "exporter.yaml", "resource.yaml", "postgres.yaml",
            "storage.yaml", "secret.example.yaml"} <= names
    assert (K8S / "README.md").is_file()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_the_kubernetes_schemas_strictly(version):
    documents = _documents()
    assert len(documents) >= 15
    for filename, doc in documents:
        where = f"{filename}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        # A kind without a schema (a typo in kind or apiVersion) raises SchemaNotFoundError: a
        # failure here, where the command line would only warn.
        try:
            k8s_validate.validate(doc, version, strict=True)
        except k8s_validate.ValidationError as exc:
            pytest.fail(f"{where} against {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except k8s_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")
        # Namespace-less: `kubectl apply -n NS` puts them where the operator wants.
        assert "namespace" not in doc["metadata"], where


def test_the_validator_is_strict():
    """The check above can fail: an unknown field and a named port in a grpc probe are refused."""
    gateway = _objects("Deployment")["gateway"]
    typo = copy.deepcopy(gateway)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(k8s_validate.ValidationError, match="replica"):
        k8s_validate.validate(typo, KUBERNETES_VERSIONS[0], strict=True)
    named = copy.deepcopy(gateway)
    named["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(named, KUBERNETES_VERSIONS[0], strict=True)


def test_deployments_replicas_labels_and_grpc_probes():
    deployments = _objects("Deployment")
    assert set(deployments) == set(REPLICAS)
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        assert spec["replicas"] == REPLICAS[name], name
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        (container,) = spec["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["grpc"] == SERVICE_CONFIGS[name][2], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # Kubernetes' own gRPC probe calls grpc.health.v1.Health/Check on the port.
            assert container[probe]["grpc"]["port"] == ports["grpc"], f"{name} {probe}"
            assert container[probe]["grpc"].get("service", "") == "", f"{name} {probe}"
        assert container["resources"]["requests"].keys() >= {"cpu", "memory"}, name
        # A stateful single pod (RWO volume, one broker) must not overlap with its successor.
        if REPLICAS[name] == 1 and name != "exporter":
            assert spec["strategy"]["type"] == "Recreate", name


def test_containers_start_as_compose_starts_them_with_known_settings():
    """The same command as compose.yaml (which test_compose checks against each config), and every
    MOCAP_* variable a setting of that service (or a shared one such as MOCAP_RESOURCE_ADDR)."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for name, (module, cls_name, _) in SERVICE_CONFIGS.items():
        container = _container(name)
        started = [*container.get("command", []), *container.get("args", [])]
        expected = [*(compose[name].get("entrypoint") or []), *compose[name]["command"]]
        assert started == [part.replace("$$", "$") for part in expected], name
        cls = getattr(importlib.import_module(module), cls_name)
        settings = {f.metadata.get("env") or cls.env_prefix() + f.name.upper() for f in dataclasses.fields(cls)}
        for variable in _env(container):
            assert variable in settings, f"{name}: {variable} is no setting of {cls_name}"


def test_tracker_requests_a_gpu():
    resources = _container("tracker")["resources"]
    # An extended resource: requests, when given, must equal limits.
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) \
        == resources["limits"]["nvidia.com/gpu"]
    for name in set(REPLICAS) - {"tracker"}:
        assert "nvidia.com/gpu" not in str(_container(name)["resources"]), name


def test_gateway_database_url_from_a_secret_and_replica_settings():
    env = _env(_container("gateway"))
    ref = env["MOCAP_GATEWAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["MOCAP_GATEWAY_DATABASE_URL"]
    secret = _objects("Secret")[ref["name"]]
    assert secret["stringData"][ref["key"]].startswith("postgresql://")
    # The template's placeholder is obvious.
    assert "CHANGE-ME" in secret["stringData"][ref["key"]]
    assert env["MOCAP_GATEWAY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert float(env["MOCAP_GATEWAY_JOB_CLAIM_TTL_S"]["value"]) > 0
    # PostgreSQL's password comes from the same Secret.
    postgres = _objects("StatefulSet")["postgres"]["spec"]["template"]["spec"]["containers"][0]
    assert _env(postgres)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == ref["name"]


def test_stage_services_are_headless_and_the_gateway_reaches_them_by_dns():
    services = _objects("Service")
    deployments = _objects("Deployment")
    env = _env(_container("gateway"))
    for name in STAGES:
        service = services[name]["spec"]
        assert service["clusterIP"] == "None", f"{name}: headless, one DNS record per pod"
        (port,) = service["ports"]
        assert port["port"] == SERVICE_CONFIGS[name][2] and port["targetPort"] == "grpc"
        assert service["selector"].items() <= deployments[name]["spec"]["template"]["metadata"]["labels"].items()
        assert env[f"MOCAP_{name.upper()}_ADDR"]["value"] == f"dns:///{name}:{port['port']}"
    gateway = services["gateway"]["spec"]
    assert gateway.get("clusterIP") != "None" and gateway["ports"][0]["port"] == 50051
    for name in ("tracker", "smoother"):
        assert _env(_container(name))["MOCAP_RESOURCE_ADDR"]["value"] == f"resource:{services['resource']['spec']['ports'][0]['port']}"


def test_gateway_replicas_share_one_read_write_many_data_directory():
    spec = _objects("Deployment")["gateway"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    data_dir = container["command"][container["command"].index("--data-dir") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    claim = _objects("PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
