"""Configuration precedence (defaults < environment < flags) and structured JSON log lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mocap.v1 import smoother_pb2, smoother_pb2_grpc
from mocap_common.config import ServiceConfig, describe_config, load_config, setting
from mocap_common.logs import bind_context, configure_logging, get_logger
from mocap_common.server import ServiceHost
from mocap_common.services import SERVICES


@dataclass(frozen=True)
class _ExampleConfig(ServiceConfig):
    service_name = "example"
    port: int = setting(50099, "gRPC port.")
    data_dir: Path = setting(Path("data"), "Where state lives.")
    formats: tuple[str, ...] = setting(("bvh", "fbx"), "Formats.")
    verbose: bool = setting(False, "Chatty.")
    shared_addr: str = setting("127.0.0.1:50055", "A shared address.", env="MOCAP_SHARED_ADDR")
    secrets_file: Path | None = setting(None, "An optional file.")


def test_paths_are_absolute_once_loaded_whatever_the_working_directory_becomes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(_ExampleConfig, ["--secrets-file", "conf/secrets.yaml"], env={})
    assert config.data_dir == tmp_path / "data"  # the relative default, resolved at load time
    assert config.secrets_file == tmp_path / "conf" / "secrets.yaml"
    monkeypatch.chdir("/")
    assert config.data_dir == tmp_path / "data"  # a later chdir changes nothing
    assert load_config(_ExampleConfig, [], env={"MOCAP_EXAMPLE_SECRETS_FILE": ""}).secrets_file is None
    assert load_config(_ExampleConfig, ["--data-dir", "~/x"], env={}).data_dir == Path.home() / "x"
    assert _ExampleConfig(secrets_file="").secrets_file is None  # built directly, e.g. by a test


def test_defaults_then_environment_then_flags():
    assert load_config(_ExampleConfig, [], env={}).port == 50099
    env = {"MOCAP_EXAMPLE_PORT": "6000", "MOCAP_EXAMPLE_FORMATS": "glb, bvh", "MOCAP_SHARED_ADDR": "x:1",
           "MOCAP_EXAMPLE_VERBOSE": "yes"}
    config = load_config(_ExampleConfig, [], env=env)
    assert (config.port, config.formats, config.shared_addr, config.verbose) == (6000, ("glb", "bvh"), "x:1", True)
    config = load_config(_ExampleConfig, ["--port", "7000", "--data-dir", "/tmp/x"], env=env)
    assert config.port == 7000 and config.data_dir == Path("/tmp/x")


def test_bad_values_name_their_source():
    with pytest.raises(SystemExit, match=r"MOCAP_EXAMPLE_PORT"):
        load_config(_ExampleConfig, [], env={"MOCAP_EXAMPLE_PORT": "fifty"})
    with pytest.raises(SystemExit, match=r"--verbose"):
        load_config(_ExampleConfig, ["--verbose", "maybe"], env={})


def test_every_option_is_documented():
    docs = {d.name: d for d in describe_config(_ExampleConfig)}
    assert docs["shared_addr"].env == "MOCAP_SHARED_ADDR"
    assert docs["formats"].default == "bvh,fbx"
    assert all(d.help for d in docs.values())


async def test_rpc_log_line_is_json_with_request_id_job_and_latency(capsys):
    configure_logging("example", "info", "json")

    class Servicer(smoother_pb2_grpc.SmootherServiceServicer):
        async def ListCheckpoints(self, request, context):
            bind_context(job="jobs/j-1")
            get_logger("test").info("inside")
            return smoother_pb2.ListCheckpointsResponse()

    host = ServiceHost(ServiceConfig(port=0, metrics_port=0))
    host.add_servicer(smoother_pb2_grpc.add_SmootherServiceServicer_to_server, Servicer(), smoother_pb2, "SmootherService")
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = smoother_pb2_grpc.SmootherServiceStub(channel)
            await stub.ListCheckpoints(smoother_pb2.ListCheckpointsRequest(), metadata=(("x-request-id", "req-42"),))
    finally:
        await host.stop(0)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    inside = next(l for l in lines if l["event"] == "inside")
    rpc = next(l for l in lines if l["event"] == "rpc")
    assert inside["request_id"] == "req-42" and inside["job"] == "jobs/j-1" and inside["service"] == "example"
    assert rpc["request_id"] == "req-42" and rpc["code"] == "OK" and rpc["latency_ms"] >= 0
    assert rpc["rpc"] == "/mocap.v1.SmootherService/ListCheckpoints"


def test_configuration_reference_is_current():
    from mocap_common.config import configuration_reference
    from tests.support import REPO

    assert (REPO / "docs" / "configuration.md").read_text() == configuration_reference(), \
        "regenerate with: python -m mocap_common.config > docs/configuration.md"


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_every_service_prints_its_help(spec, capsys):
    # argparse formats help texts with %: an option that says "±25 % jitter" once broke --help.
    with pytest.raises(SystemExit) as ended:
        load_config(spec.load_config_class(), ["--help"])
    assert ended.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "[env MOCAP_" in out
