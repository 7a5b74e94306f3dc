"""Helpers for tests that run services as real child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
# What ships with the product (a fresh clone has it): the demo clip and the smoother's training
# motion (CMU clips, xz-compressed; `smoother_svc.reference_data.clip_path` finds them).
RUNNER_MP4 = REPO / "mocap_common" / "demo" / "runner_1080p.mp4"
MOCAP = REPO / "smoother_svc" / "training_motion"
# The project's shared/ folder beside the checkout (CI has it; a fresh clone does not): tests that
# need its media skip with a message when it is absent.
SHARED = REPO.parent / "shared"
MEDIA = SHARED / "media"
STREET_AVI = MEDIA / "street_720p.avi"


def shared_file(path: Path) -> Path:
    """`path` under ../shared, or a skip naming it when the folder is not beside the checkout."""
    import pytest

    if not path.is_file():
        pytest.skip(f"needs {path.name} from the shared/ folder beside the repository ({path}); CI has it")
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports that were all free a moment ago (for the
    launcher's --base-port, which puts the five services on base .. base + 4)."""
    for _ in range(100):
        base = free_port()
        if base + count < 65000 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no run of {count} free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_serving(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Blocks until grpc health at `address` reports SERVING, or raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = status
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout_s}s (last: {last})")


class ServiceProcess:
    """`python -m <module> --port P ...` as a child process in its own process group.

    Logs go to `log_path`; `stop()` sends SIGTERM (graceful), `kill()` SIGKILL to the group.
    `launcher` replaces `python -m`: the command the module name and its arguments are appended
    to (e.g. a `python -c BOOTSTRAP` that installs an import blocker before running the module).
    """

    def __init__(self, module: str, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 log_path: Path, port: int | None = None, ready_timeout_s: float = 60.0,
                 launcher: Sequence[str] = ()) -> None:
        self.module = module
        self.launcher = list(launcher) or [sys.executable, "-m"]
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = ["--port", str(self.port), "--metrics-port", "0", *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> "ServiceProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.launcher, self.module, *self.args],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if wait:
            try:
                wait_serving(self.address, self.ready_timeout_s)
            except TimeoutError:
                self.kill()
                raise TimeoutError(f"{self.module} did not become SERVING; log:\n{self.log_text()[-4000:]}") from None
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait (graceful shutdown); SIGKILL the group if it does not exit in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group, as a crash would."""
        if self.proc is None:
            return
        self._kill_group()
        self.proc.wait(10)

    def _kill_group(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
