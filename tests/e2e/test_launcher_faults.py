"""`make run` under faults: a launcher killed with SIGKILL takes all five services with it, and a
launcher whose port is already served by someone else (an old mesh's service still running)
refuses to start, naming the port and the service, instead of reporting SERVING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_mesh_boots import ORDER
from tests.support import REPO, ServiceProcess, free_port_run


def _launcher_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCAP_")}
    env.update(
        PYTHONUNBUFFERED="1",
        MOCAP_GATEWAY_DATA_DIR=str(tmp_path / "data"),
        MOCAP_RESOURCE_DB_PATH=str(tmp_path / "data" / "leases.sqlite3"),
        MOCAP_SMOOTHER_CHECKPOINT_DIR=str(tmp_path / "data" / "checkpoints"),
    )
    return env


def _start_launcher(tmp_path: Path, base: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mocap_common.launcher", "--base-port", str(base), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, env=_launcher_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def _read_until(launcher: subprocess.Popen[str], stop_at: str, timeout_s: float) -> list[str]:
    """Output lines up to one containing `stop_at`, the end of the output, or the timeout."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = launcher.stdout.readline()
        if not line:
            break
        lines.append(line)
        if stop_at in line:
            break
    return lines


def _alive(process: psutil.Process) -> bool:
    """Running; a zombie waiting for an unrelated reaper (a container's PID 1) counts as gone."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_all(launcher: subprocess.Popen[str], processes: list[psutil.Process]) -> None:
    """Test cleanup, whatever a failure left: the launcher's group and each child's own group."""
    for pid in [launcher.pid, *(p.pid for p in processes if _alive(p))]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    launcher.wait(10)


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_launcher_killed_with_sigkill_takes_all_five_services_with_it(tmp_path):
    launcher = _start_launcher(tmp_path, free_port_run(5))
    children: list[psutil.Process] = []
    try:
        output = _read_until(launcher, "all services SERVING", 300)
        assert any("all services SERVING" in line for line in output), "".join(output)
        children = psutil.Process(launcher.pid).children(recursive=True)
        services = [p for p in children if any(f"{name}" in " ".join(p.cmdline()) for name in ORDER)]
        assert len(services) >= 5, [p.cmdline() for p in children]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [(p.pid, p.cmdline()) for p in children if _alive(p)]
        assert left == [], f"outlived the launcher: {left}"
    finally:
        _kill_all(launcher, children)


def test_launcher_refuses_a_port_someone_else_serves(tmp_path):
    base = free_port_run(5)
    # An old mesh's service still running on the tracker's port (any gRPC service answers health
    # checks, and gRPC servers bind with SO_REUSEPORT, so a new one could start beside it).
    squatter = ServiceProcess("resource_svc", ["--db-path", str(tmp_path / "old.sqlite3"), "--inventory", "cpu",
                                               "--log-format", "console"],
                              log_path=tmp_path / "old-resource.log", port=base + ORDER.index("tracker"))
    launcher = None
    children: list[psutil.Process] = []
    with squatter:
        try:
            launcher = _start_launcher(tmp_path, base)
            output = _read_until(launcher, "SERVING", 120)
            if launcher.poll() is None:  # still running: note what it started, for the cleanup
                children = psutil.Process(launcher.pid).children(recursive=True)
            text = "".join(output)
            assert "SERVING" not in text, text
            assert launcher.wait(30) == 2, text
            assert f"port {squatter.port}" in text and "tracker" in text, text
            assert not (tmp_path / "logs").exists(), "a service was started"
        finally:
            if launcher is not None:
                _kill_all(launcher, children)
