"""The mesh the end-to-end tests share: the five services as `make run` starts them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support import REPO, free_port_run, wait_serving


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """The five services as `make run` starts them (launcher), with every setting at its default
    (relative paths included) and started from another working directory than the repository's:
    each service must make its paths absolute once, at startup, and hand only those downstream
    (the Blender child, for one, runs in a directory of its own)."""
    tmp = tmp_path_factory.mktemp("mesh")
    # What `make setup` leaves in the directory it runs in: the smoother's first checkpoint.
    shutil.copytree(REPO / "data" / "smoother" / "checkpoints", tmp / "data" / "smoother" / "checkpoints")
    base = free_port_run(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCAP_")}
    env.update(PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "mocap_common.launcher", "--base-port", str(base)],
        cwd=tmp, env=env, stdout=open(tmp / "launcher.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    gateway = f"127.0.0.1:{base + 4}"
    try:
        wait_serving(gateway, timeout_s=300)
        yield {"gateway": gateway, "env": env, "logs": tmp / "data" / "logs", "data": tmp / "data"}
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
