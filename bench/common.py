"""What every benchmark shares: machine facts, the JSON result file, and the bare gRPC server
that measures the transport's ceiling."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bare_server(name: str) -> Iterator[tuple[str, int]]:
    """Runs `python -m bench.bare_server NAME` in its own process group until the block ends;
    yields its address and pid once it accepts connections."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.bare_server", name, str(port)], cwd=REPO,
                              start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield address, server.pid
    finally:
        server.kill()
        server.wait()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_model(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(area: str, figures: dict[str, Any]) -> Path:
    """Writes bench/results/<area>-<UTC timestamp>.json and returns its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{area}-{stamp}.json"
    payload = {"area": area, "time_utc": stamp, "machine": machine(), **figures}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"results written to {path.relative_to(RESULTS.parent.parent)}")
    return path
