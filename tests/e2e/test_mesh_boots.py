"""`make run` brings up five services that answer health SERVING and list their API through
server reflection (grpcurl), and Ctrl-C/SIGTERM stops all of them, leaving no orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import REPO, free_port_run

pytestmark = pytest.mark.e2e

GRPCURL = Path(sys.executable).parent / "grpcurl"
EXPECTED_API = {
    "resource": "mocap.v1.ResourceService",
    "tracker": "mocap.v1.TrackerService",
    "smoother": "mocap.v1.SmootherService",
    "exporter": "mocap.v1.ExporterService",
    "gateway": "mocap.v1.GatewayService",
}
ORDER = ("resource", "tracker", "smoother", "exporter", "gateway")


def _grpcurl(*args: str) -> str:
    return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.mark.timeout(400)
def test_make_run_boots_five_services_and_stops_them_all(tmp_path):
    base = free_port_run(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCAP_")}
    env.update(
        PYTHONUNBUFFERED="1",
        MOCAP_GATEWAY_DATA_DIR=str(tmp_path / "data"),
        MOCAP_RESOURCE_DB_PATH=str(tmp_path / "data" / "leases.sqlite3"),
        MOCAP_SMOOTHER_CHECKPOINT_DIR=str(tmp_path / "data" / "checkpoints"),
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "mocap_common.launcher", "--base-port", str(base), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            if not line:
                break
            output.append(line)
            if "all services SERVING" in line:
                break
        assert any("all services SERVING" in line for line in output), "".join(output)
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 5

        for i, name in enumerate(ORDER):
            address = f"127.0.0.1:{base + i}"
            health = _grpcurl(address, "grpc.health.v1.Health/Check")
            assert '"status": "SERVING"' in health, (name, health)
            services = set(_grpcurl(address, "list").split())
            assert {EXPECTED_API[name], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
            methods = _grpcurl(address, "describe", EXPECTED_API[name])
            assert "rpc " in methods

        launcher.send_signal(signal.SIGTERM)
        rest, _ = launcher.communicate(timeout=90)
        output.append(rest)
        assert launcher.returncode == 0, "".join(output)
        assert "all services stopped" in "".join(output)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphans left: {alive}"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
